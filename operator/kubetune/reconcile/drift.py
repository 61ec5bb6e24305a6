"""Drift detection (pure): is the traffic an adapter serves now hurting it, judged against its own holdout?

The trainer publishes a drift profile with every adapter (`manifest.driftProfile`): per holdout example
the model's confidence (classification: the highest class probability; causal LM: the mean probability of
the reference tokens) and predictive entropy, plus the training vocabulary. The serving agents sample
traffic (request + engine response) to storage. Per adapter, the operator turns sampled records into
`Observation`s (`observations`), collects windows of them and asks `analyse` whether a window looks like
the holdout did.

Two kinds of tests, because only some evidence says the *model* is hurt:

- **Triggers** (decide `drifted`): the model's own uncertainty.
  - *confidence*: the window's mean confidence below the holdout's mean by more than `sigmas` standard
    deviations of the difference of means (one-sided: a more confident model is not hurt).
  - *entropy*: a one-sided two-sample Kolmogorov-Smirnov statistic of the window's predictive entropies
    against the holdout's, D+ = max_x (F_holdout(x) - F_window(x)): how far the window's distribution
    lies to the right (more uncertain). KS and not a second mean test: harm often shows in part of the
    traffic only (say 15% of requests on an unseen topic, scored near-uniformly), which moves the upper
    tail of the entropies long before it moves their mean; KS sees any such change in shape, needs no
    assumption about the distribution (entropies are far from normal: a mass near 0 and a tail), and
    is bounded in [0, 1], so it reads the same for every adapter. One-sided: a window that is *more*
    certain than the holdout is not evidence of harm. For a causal LM the engine returns only the
    chosen tokens' log-probabilities (no full distribution, so no entropy): the same test runs on the
    per-request mean token probability, one-sided towards *lower* ("less confident").
- **Diagnostics** (reported; they set `drifted` only when listed in `trigger_on_diagnostics`): what the
  inputs look like, which changes far more often than the model's competence does.
  - *inputLength*: mean words per input (the profile's `metrics.WORD` words), two-sided |z| test;
  - *oov*: mean per-input share of words not in the training vocabulary, one-sided (higher);
  - *embedding* (with sentence embeddings of the inputs, e.g. all-MiniLM-L6-v2 from the engine's
    `/v1/embeddings`): cosine distance between the window's and the holdout's centroids, and the squared
    maximum mean discrepancy (MMD^2, unbiased, RBF kernel with the bandwidth set to the median pairwise
    distance of the holdout embeddings). Both fire above their null quantile.
  Why only diagnostics: on CLINC150 a benign label shift (traffic narrowing to a few of the trained
  intents) sets off every embedding test while the model stays exactly as confident, and a fixed
  centroid threshold (0.3) missed out-of-scope traffic that the confidence tests catch at once.

"Calibrated" means no fixed numbers: every threshold comes from the adapter's own holdout and the window
size. `calibrate` bootstraps `bootstraps` null pairs: a window of `window_size` values and a pseudo-holdout
of the holdout's size, both drawn with replacement from the holdout, and computes each test's statistic
for the pair. Resampling the reference as well as the window matters: the holdout is itself a finite
sample (often 100-200 examples), so a genuine in-distribution window differs from it by the holdout's
sampling error as well as its own; a null that resampled only windows would be too narrow and fire on
healthy traffic. Thresholds: mean-based tests fire beyond `sigmas` standard deviations of the null
differences of means (3 -> about 0.1% one-sided under normality); two-sample tests fire when the
statistic exceeds the (1 - `p_value`) quantile of the null statistics (a bootstrap test at level p).
Draws with replacement work for any holdout and window size (a window of 1,000 from a holdout of 150).
In the MMD null, pairs of draws of the *same* holdout example are left out of every kernel mean (they
would count as identical texts, which a real window seldom has, and bias the null), just as the real
statistic leaves out each text's pairing with itself.

Windows of another size than calibrated are still analysed: thresholds are rescaled by the sampling
error's dependence on the size (sqrt(1/m + 1/n) for means and KS, (1/m + 1/n) for the squared distances),
an approximation; the controller calibrates for the size it analyses to be exact.

Everything here is deterministic (a seeded numpy Generator), JSON-serialisable and free of I/O: the
operator stores the reference and calibrations in storage and reuses them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from kubetune.api import serving

WORD = re.compile(r"[a-z0-9']+")  # kubetune_trainer.metrics.WORD: the profile's vocabulary is made of these
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
DIAGNOSTICS = ("inputLength", "oov", "embedding")
REFERENCE_API = "kubetune.io/drift-reference/v1"
CALIBRATION_API = "kubetune.io/drift-calibration/v1"
MAX_EMBEDDINGS = 2000  # holdout embeddings kept in a reference (kernel matrices are O(n^2))
EMBEDDING_DECIMALS = 5
VALUE_DECIMALS = 6  # the profile's values are rounded so; window values too, so ties stay ties
ENTROPY_FLOOR = 1e-12  # as the trainer: p * log(max(p, 1e-12))


# --- observations ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One scored input from sampled traffic."""

    text: str  # what the user sent (classification: the input; generation: prompt / non-assistant messages)
    confidence: float  # classification: max prob; generation: mean token probability
    entropy: float | None  # classification: predictive entropy (nats) from the probs; generation: None


def observations(record: dict) -> list[Observation]:
    """The scored inputs of one sample record (`kubetune.agent.proxy` writes them): one per input of a
    `/classify` (batched inputs included), one per choice of a completion or chat completion that carries
    logprobs (the same confidence as `kubetune.agent.plan.confidences`). None for failed requests
    (status != 200), streams (the sample holds the event text), and answers without probabilities."""
    if not isinstance(record, dict) or record.get("status") != 200:
        return []
    request, response = record.get("request"), record.get("response")
    if not isinstance(request, dict) or not isinstance(response, dict) or request.get("stream"):
        return []
    path = record.get("path")
    if path == serving.ENGINE_CLASSIFY:
        return _classified(request, response)
    if path == serving.ENGINE_COMPLETIONS:
        prompt = request.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else (
            [p if isinstance(p, str) else "" for p in prompt]  # token-id prompts have no text
            if isinstance(prompt, list) and prompt and not all(_is_int(t) for t in prompt) else [""])
        return _generated(response, prompts, request.get("n"), chat=False)
    if path == serving.ENGINE_CHAT:
        return _generated(response, [_chat_input(request.get("messages"))], request.get("n"), chat=True)
    return []


def _classified(request: dict, response: dict) -> list[Observation]:
    inputs = request.get("input")
    texts = [inputs] if isinstance(inputs, str) else (inputs if isinstance(inputs, list) else [])
    found = []
    for position, item in enumerate(_list(response.get("data"))):
        if not isinstance(item, dict):
            continue
        index = item.get("index", position)
        probs = [float(p) for p in _list(item.get("probs")) if _number(p)]
        if not probs or not _is_int(index) or not 0 <= index < len(texts) or not isinstance(texts[index], str):
            continue
        entropy = -sum(p * math.log(max(p, ENTROPY_FLOOR)) for p in probs)
        found.append(Observation(texts[index], round(max(probs), VALUE_DECIMALS), round(entropy, VALUE_DECIMALS)))
    return found


def _generated(response: dict, prompts: list[str], n: object, *, chat: bool) -> list[Observation]:
    per_prompt = n if _is_int(n) and n >= 1 else 1
    found = []
    for position, choice in enumerate(_list(response.get("choices"))):
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if not isinstance(logprobs, dict):
            continue
        if chat:
            tokens = [t.get("logprob") for t in _list(logprobs.get("content")) if isinstance(t, dict)]
        else:
            tokens = _list(logprobs.get("token_logprobs"))
        tokens = [float(t) for t in tokens if _number(t)]
        if not tokens:
            continue
        index = choice.get("index", position)
        prompt = index // per_prompt if _is_int(index) else -1
        text = prompts[prompt] if 0 <= prompt < len(prompts) else ""
        confidence = sum(math.exp(t) for t in tokens) / len(tokens)
        found.append(Observation(text, round(confidence, VALUE_DECIMALS), None))
    return found


def example_input(fields: dict) -> str:
    """What a user sends in one dataset line of any format (never the completion or the label): the
    holdout texts a reference compares windows with."""
    if isinstance(fields.get("messages"), list):
        return _chat_input(fields["messages"])
    return str(fields.get("prompt") or fields.get("text") or "")


def _chat_input(messages: object) -> str:
    """The non-assistant messages' text, joined as the trainer joins them for the profile's vocabulary."""
    parts = []
    for message in _list(messages):
        if not isinstance(message, dict) or message.get("role") == "assistant":
            continue
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: the text ones
            content = "\n".join(p["text"] for p in content
                                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
        if isinstance(content, str):
            parts.append(content)
    return " ".join(parts)


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- thresholds --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """spec.adapters[].drift.thresholds (defaults as in the CRD)."""

    sigmas: float = 3.0  # mean-based tests fire beyond mean +- sigmas x sigma of the bootstrapped differences
    p_value: float = 0.01  # two-sample tests fire above the (1 - p) quantile of bootstrapped null statistics
    bootstraps: int = 500
    trigger_on_diagnostics: tuple[str, ...] = ()  # subset of DIAGNOSTICS that also trigger

    def __post_init__(self):
        unknown = set(self.trigger_on_diagnostics) - set(DIAGNOSTICS)
        if unknown:
            raise ValueError(f"trigger_on_diagnostics: unknown {sorted(unknown)} (known: {', '.join(DIAGNOSTICS)})")
        if self.sigmas <= 0 or not 0 < self.p_value < 1 or self.bootstraps < 10:
            raise ValueError("thresholds need sigmas > 0, 0 < p_value < 1 and bootstraps >= 10")

    @classmethod
    def from_spec(cls, spec: dict | None) -> Thresholds:
        """From the spec's camelCase object (absent fields: the defaults)."""
        spec = spec or {}
        return cls(sigmas=float(spec.get("sigmas", cls.sigmas)), p_value=float(spec.get("pValue", cls.p_value)),
                   bootstraps=int(spec.get("bootstraps", cls.bootstraps)),
                   trigger_on_diagnostics=tuple(spec.get("triggerOnDiagnostics") or ()))


# --- the reference -----------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def oov_rate(text: str, vocabulary: dict[str, int] | set[str] | frozenset[str], leave_one_out: bool = False) -> float:
    """Share of a text's words not in the training vocabulary (0 for a text without words).

    `leave_one_out` (with a counted vocabulary): the text was itself a training example, so a word counts
    as out of vocabulary when the text holds every occurrence the vocabulary counted, i.e. as if the
    vocabulary had been built without this text."""
    found = words(text)
    if not found:
        return 0.0
    if leave_one_out and isinstance(vocabulary, dict):
        own = Counter(found)
        return sum(1 for w in found if vocabulary.get(w, 0) - own[w] <= 0) / len(found)
    return sum(1 for w in found if w not in vocabulary) / len(found)


def build_reference(profile: dict, holdout_texts: list[str], holdout_embeddings: list[list[float]] | None,
                    *, leave_one_out: bool = False, max_embeddings: int = MAX_EMBEDDINGS, seed: int = 0) -> dict:
    """What windows are compared with, from the adapter's drift profile and its holdout inputs.

    `holdout_texts`: inputs the adapter was not trained on (the dataset's validation set); with
    `leave_one_out` they may be training inputs (no validation set): their out-of-vocabulary rates are
    then measured as if each had been left out of the vocabulary. `holdout_embeddings`: sentence
    embeddings of (a sample of) those texts, or None (no embedding diagnostics); at most
    `max_embeddings` are kept (a seeded sample). JSON-serialisable; build it once per adapter digest.
    """
    kind = profile.get("kind")
    if kind not in (CLASSIFICATION, CAUSAL_LM):
        raise ValueError(f"driftProfile.kind {kind!r} is not {CLASSIFICATION!r} or {CAUSAL_LM!r}")
    confidence = _values((profile.get("confidence") or {}).get("values"))
    if len(confidence) < 2:
        raise ValueError("the drift profile holds fewer than 2 holdout confidence values: nothing to calibrate")
    if kind == CLASSIFICATION:
        tested = _values((profile.get("entropy") or {}).get("values"))
        if len(tested) < 2:
            raise ValueError("the drift profile holds fewer than 2 holdout entropy values")
        two_sample = {"of": "entropy", "direction": "greater", "values": tested}
    else:  # the engine gives chosen-token log-probabilities only: the test runs on them
        two_sample = {"of": "confidence", "direction": "less", "values": confidence}
    counted = {str(w): int(c) for w, c in (profile.get("vocabulary") or {}).items()}
    texts = [t for t in holdout_texts if isinstance(t, str)]
    reference = {
        "apiVersion": REFERENCE_API,
        "kind": kind,
        "holdoutSize": len(confidence),
        "confidence": confidence,
        "twoSample": two_sample,
        "texts": len(texts),
        "inputLength": [len(words(t)) for t in texts],
        "oov": [round(oov_rate(t, counted, leave_one_out), VALUE_DECIMALS) for t in texts],
        "leaveOneOut": leave_one_out,
        "vocabulary": sorted(counted),
        "embeddings": None,
    }
    if holdout_embeddings:
        matrix = np.asarray(holdout_embeddings, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] < 2 or not np.isfinite(matrix).all():
            raise ValueError("holdout_embeddings must be at least 2 finite vectors of one dimension")
        if matrix.shape[0] > max_embeddings:
            keep = np.sort(np.random.default_rng(seed).choice(matrix.shape[0], max_embeddings, replace=False))
            matrix = matrix[keep]
        matrix = np.round(matrix, EMBEDDING_DECIMALS)
        distances = np.sqrt(_squared_distances(matrix, matrix))
        upper = distances[np.triu_indices(matrix.shape[0], 1)]
        bandwidth = float(np.median(upper))
        if not bandwidth > 0:
            bandwidth = float(upper.max()) if upper.max() > 0 else 1.0
        kernel = _rbf(distances ** 2, bandwidth)
        n = matrix.shape[0]
        reference["embeddings"] = {
            "dimension": int(matrix.shape[1]),
            "vectors": matrix.tolist(),
            "centroid": matrix.mean(axis=0).tolist(),
            "bandwidth": bandwidth,
            # the holdout's own kernel mean (pairs of distinct examples): a constant of every window's MMD^2
            "holdoutKernelMean": float((kernel.sum() - np.trace(kernel)) / (n * (n - 1))),
        }
    return reference


def _values(values: object) -> list[float]:
    return [round(float(v), VALUE_DECIMALS) for v in _list(values) if _number(v)]


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(squared, 0.0)


def _rbf(squared: np.ndarray, bandwidth: float) -> np.ndarray:
    return np.exp(-squared / (2.0 * bandwidth * bandwidth))


# --- calibration -------------------------------------------------------------------------------------


def calibrate(reference: dict, window_size: int, thresholds: Thresholds, seed: int = 0) -> dict:
    """The tests' null distributions for windows of `window_size`, by bootstrapping (module docstring).

    Depends on the reference, the window size, `thresholds.bootstraps` and the seed only: `analyse` applies
    `sigmas` and `p_value` to the stored null distributions (the `thresholds` here are those values at
    calibration time, for reading). JSON-serialisable; cache it per (adapter digest, window size).
    """
    if window_size < 2:
        raise ValueError("window_size must be at least 2")
    rng = np.random.default_rng(seed)
    boots, m = thresholds.bootstraps, window_size
    null: dict = {}

    confidence = np.asarray(reference["confidence"])
    window_counts, holdout_counts = _draws(rng, len(confidence), m, boots)
    null["confidence"] = _mean_null(confidence, window_counts, holdout_counts, m)
    two_sample = reference["twoSample"]
    tested = np.asarray(two_sample["values"])
    if len(tested) != len(confidence):
        window_counts, holdout_counts = _draws(rng, len(tested), m, boots)
    null["twoSample"] = {"ks": sorted(_ks_null(tested, window_counts, holdout_counts, two_sample["direction"]))}

    if reference.get("texts", 0) >= 2:
        lengths, rates = np.asarray(reference["inputLength"], dtype=float), np.asarray(reference["oov"])
        window_counts, holdout_counts = _draws(rng, len(lengths), m, boots)
        null["inputLength"] = _mean_null(lengths, window_counts, holdout_counts, m)
        null["oov"] = _mean_null(rates, window_counts, holdout_counts, m)

    embeddings = reference.get("embeddings")
    if embeddings:
        vectors = np.asarray(embeddings["vectors"])
        window_counts, holdout_counts = _draws(rng, len(vectors), m, boots)
        null["embedding"] = _embedding_null(vectors, embeddings["bandwidth"], window_counts, holdout_counts)

    calibration = {
        "apiVersion": CALIBRATION_API,
        "kind": reference["kind"],
        "windowSize": m,
        "holdoutSize": len(confidence),
        "texts": reference.get("texts", 0),
        "embeddings": len(embeddings["vectors"]) if embeddings else 0,
        "bootstraps": boots,
        "seed": seed,
        "null": null,
    }
    calibration["thresholds"] = _limits(calibration, thresholds, m)
    return calibration


def _draws(rng: np.random.Generator, n: int, m: int, boots: int) -> tuple[np.ndarray, np.ndarray]:
    """Per bootstrap, how often each holdout example is drawn into a window of m and into a pseudo-holdout
    of n (both with replacement): two (boots, n) count matrices."""
    uniform = np.full(n, 1.0 / n)
    return rng.multinomial(m, uniform, size=boots).astype(float), rng.multinomial(n, uniform, size=boots).astype(float)


def _mean_null(values: np.ndarray, window_counts: np.ndarray, holdout_counts: np.ndarray, m: int) -> dict:
    differences = window_counts @ values / m - holdout_counts @ values / len(values)
    return {"mean": float(values.mean()), "sigma": float(differences.std(ddof=1)), "holdout": len(values)}


def _ks_null(values: np.ndarray, window_counts: np.ndarray, holdout_counts: np.ndarray, direction: str) -> list[float]:
    """One-sided KS statistics of bootstrapped (window, pseudo-holdout) pairs: both live on the holdout's
    values, so their ECDFs are cumulative counts over the sorted distinct values."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    last_of_tie = np.append(ordered[1:] != ordered[:-1], True)  # an ECDF counts every tie of a value
    window_cdf = np.cumsum(window_counts[:, order], axis=1)[:, last_of_tie] / window_counts[0].sum()
    holdout_cdf = np.cumsum(holdout_counts[:, order], axis=1)[:, last_of_tie] / holdout_counts[0].sum()
    gap = holdout_cdf - window_cdf if direction == "greater" else window_cdf - holdout_cdf
    return np.maximum(gap.max(axis=1), 0.0).tolist()


def _embedding_null(vectors: np.ndarray, bandwidth: float, window_counts: np.ndarray,
                    holdout_counts: np.ndarray) -> dict:
    kernel = _rbf(_squared_distances(vectors, vectors), bandwidth)
    m, n = window_counts[0].sum(), holdout_counts[0].sum()
    kw, kh = window_counts @ kernel, holdout_counts @ kernel
    diagonal = np.diag(kernel)  # 1 for an RBF kernel; kept general
    # kernel means over pairs of draws of *different* holdout examples (see the module docstring)
    same_w, same_h = (window_counts ** 2) @ diagonal, (holdout_counts ** 2) @ diagonal
    same_wh = (window_counts * holdout_counts) @ diagonal
    ww = ((kw * window_counts).sum(axis=1) - same_w) / np.maximum(m * m - (window_counts ** 2).sum(axis=1), 1)
    hh = ((kh * holdout_counts).sum(axis=1) - same_h) / np.maximum(n * n - (holdout_counts ** 2).sum(axis=1), 1)
    shared = (window_counts * holdout_counts).sum(axis=1)
    wh = ((kw * holdout_counts).sum(axis=1) - same_wh) / np.maximum(m * n - shared, 1)
    mmd = ww + hh - 2.0 * wh
    # The centroid's direction: the holdout's centroid is the population mean plus the holdout's sampling
    # error, so its squared norm is too large by tr(Σ)/n, and bootstrapped centroids scatter around it:
    # in the bootstrap world every centroid would look longer, hence closer in angle, than real ones.
    # The null's centroids are shifted to an estimate of the population mean with an unbiased squared
    # norm (|c|^2 - tr(Σ)/n), so windows and holdout stand at the same distance from the origin as in reality.
    center = vectors.mean(axis=0)
    spread = ((vectors - center) ** 2).sum() / max(len(vectors) - 1, 1) / len(vectors)
    norm = float(center @ center)
    population = center * math.sqrt(max(norm - spread, 0.0) / norm) if norm > 0 else center
    centroids_w = window_counts @ vectors / m - center + population
    centroids_h = holdout_counts @ vectors / n - center + population
    return {"centroidCosine": sorted(_cosine_distance(centroids_w, centroids_h).tolist()),
            "mmd": sorted(mmd.tolist()), "holdout": int(n)}


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return 1.0 - (a * b).sum(axis=-1) / np.maximum(norms, 1e-12)


def _quantile(ordered: list[float], p_value: float) -> float:
    return float(np.quantile(np.asarray(ordered), 1.0 - p_value, method="higher"))


def _limits(calibration: dict, thresholds: Thresholds, m: int) -> dict:
    """Thresholds for a window of m from the null distributions (rescaled when m is not the calibrated
    size: sqrt(1/m + 1/n) for sigma and KS, (1/m + 1/n) for squared distances)."""
    null, calibrated = calibration["null"], calibration["windowSize"]

    def scale(n: int, power: float) -> float:
        return ((1 / m + 1 / n) / (1 / calibrated + 1 / n)) ** power if m != calibrated else 1.0

    confidence = null["confidence"]
    n = confidence["holdout"]
    limits = {
        "confidence": confidence["mean"] - thresholds.sigmas * confidence["sigma"] * scale(n, 0.5),
        "twoSample": _quantile(null["twoSample"]["ks"], thresholds.p_value) * scale(n, 0.5),
    }
    if "inputLength" in null:
        length, oov = null["inputLength"], null["oov"]
        limits["inputLength"] = thresholds.sigmas  # a |z| bound; z uses the rescaled sigma
        limits["inputLengthSigma"] = length["sigma"] * scale(length["holdout"], 0.5)
        limits["oov"] = oov["mean"] + thresholds.sigmas * oov["sigma"] * scale(oov["holdout"], 0.5)
    if "embedding" in null:
        embedding = null["embedding"]
        squared = scale(embedding["holdout"], 1.0)
        limits["centroidCosine"] = _quantile(embedding["centroidCosine"], thresholds.p_value) * squared
        limits["mmd"] = _quantile(embedding["mmd"], thresholds.p_value) * squared
    return limits


# --- analysis ----------------------------------------------------------------------------------------


def analyse(reference: dict, calibration: dict, window: list[Observation],
            window_embeddings: list[list[float]] | None, thresholds: Thresholds) -> dict:
    """Judge one window of observations (and, optionally, its inputs' embeddings, aligned with `window`).

    Result (JSON-serialisable):
    `{"requests", "windowSize", "kind", "triggers": {"confidence", "entropy"}, "diagnostics": {"inputLength",
    "oov", "embedding"}, "drifted", "summary"}`; every test has "fired"; a diagnostic the reference cannot
    compute (no holdout texts or embeddings, or no window embeddings) is absent. `drifted`: any trigger
    fired, or a diagnostic listed in `thresholds.trigger_on_diagnostics`.
    """
    m = len(window)
    result: dict = {"requests": m, "windowSize": calibration["windowSize"], "kind": reference["kind"],
                    "triggers": {}, "diagnostics": {}, "drifted": False, "summary": ""}
    if m == 0:
        result["summary"] = "no scored requests in the window"
        return result
    limits = _limits(calibration, thresholds, m)
    null = calibration["null"]
    triggers, diagnostics = result["triggers"], result["diagnostics"]

    confidence = np.asarray([o.confidence for o in window], dtype=float)
    value = float(confidence.mean())
    triggers["confidence"] = {"value": value, "reference": null["confidence"]["mean"],
                              "threshold": limits["confidence"], "sigmas": thresholds.sigmas,
                              "fired": bool(value < limits["confidence"])}

    two_sample = reference["twoSample"]
    if two_sample["of"] == "entropy":
        tested = np.asarray([o.entropy for o in window if o.entropy is not None], dtype=float)
    else:
        tested = confidence
    statistic = _ks(np.asarray(two_sample["values"]), tested, two_sample["direction"]) if len(tested) else None
    triggers["entropy"] = {
        "of": two_sample["of"], "test": "ks", "direction": two_sample["direction"], "statistic": statistic,
        "threshold": limits["twoSample"], "pValue": thresholds.p_value,
        "mean": float(tested.mean()) if len(tested) else None,
        "referenceMean": float(np.mean(two_sample["values"])),
        "fired": bool(statistic is not None and statistic > limits["twoSample"]),
    }

    if "inputLength" in null:
        texts = [o.text for o in window]
        lengths = np.asarray([len(words(t)) for t in texts], dtype=float)
        mean, sigma = float(lengths.mean()), limits["inputLengthSigma"]
        reference_mean = null["inputLength"]["mean"]
        z = (mean - reference_mean) / sigma if sigma > 0 else (0.0 if mean == reference_mean else math.inf)
        diagnostics["inputLength"] = {"value": mean, "reference": reference_mean, "z": z,
                                      "threshold": limits["inputLength"], "fired": bool(abs(z) > limits["inputLength"])}
        vocabulary = frozenset(reference["vocabulary"])
        rate = float(np.mean([oov_rate(t, vocabulary) for t in texts]))
        diagnostics["oov"] = {"value": rate, "reference": null["oov"]["mean"], "threshold": limits["oov"],
                              "fired": bool(rate > limits["oov"])}

    embeddings = reference.get("embeddings")
    if embeddings and "embedding" in null and window_embeddings:
        if len(window_embeddings) != m:
            raise ValueError(f"{len(window_embeddings)} window embeddings for {m} observations")
        diagnostics["embedding"] = _embedding_tests(embeddings, np.asarray(window_embeddings, dtype=float),
                                                    limits)

    fired_triggers = [name for name, test in triggers.items() if test["fired"]]
    fired_diagnostics = [name for name, test in diagnostics.items() if test["fired"]]
    result["drifted"] = bool(fired_triggers) or any(d in thresholds.trigger_on_diagnostics for d in fired_diagnostics)
    result["summary"] = _summary(triggers, fired_diagnostics, thresholds)
    return result


def _ks(reference: np.ndarray, window: np.ndarray, direction: str) -> float:
    """One-sided two-sample KS: max over x of F_reference(x) - F_window(x) ("greater": the window lies to
    the right), or the reverse ("less"); 0 when the window is nowhere on that side."""
    reference, window = np.sort(reference), np.sort(window)
    points = np.concatenate([reference, window])
    reference_cdf = np.searchsorted(reference, points, side="right") / len(reference)
    window_cdf = np.searchsorted(window, points, side="right") / len(window)
    gap = reference_cdf - window_cdf if direction == "greater" else window_cdf - reference_cdf
    return float(max(gap.max(), 0.0))


def _embedding_tests(embeddings: dict, window: np.ndarray, limits: dict) -> dict:
    vectors = np.asarray(embeddings["vectors"])
    if window.ndim != 2 or window.shape[1] != vectors.shape[1]:
        raise ValueError(f"window embeddings of dimension {window.shape[-1]}, the reference's are "
                         f"{vectors.shape[1]}")
    m = window.shape[0]
    bandwidth = embeddings["bandwidth"]
    centroid = _cosine_distance(window.mean(axis=0), np.asarray(embeddings["centroid"]))
    within = _rbf(_squared_distances(window, window), bandwidth)
    ww = (within.sum() - np.trace(within)) / (m * (m - 1)) if m > 1 else float(np.trace(within))
    wh = _rbf(_squared_distances(window, vectors), bandwidth).mean()
    mmd = float(ww + embeddings["holdoutKernelMean"] - 2.0 * wh)
    fired = {"centroid": bool(centroid > limits["centroidCosine"]), "mmd": bool(mmd > limits["mmd"])}
    return {"centroidCosine": float(centroid), "centroidThreshold": limits["centroidCosine"], "mmd": mmd,
            "mmdThreshold": limits["mmd"], "bandwidth": bandwidth,
            "firedTests": sorted(k for k, v in fired.items() if v), "fired": any(fired.values())}


def _summary(triggers: dict, fired_diagnostics: list[str], thresholds: Thresholds) -> str:
    """One line for an Event: each trigger with its threshold, then the diagnostics that fired."""
    confidence, entropy = triggers["confidence"], triggers["entropy"]
    sign = "<" if confidence["fired"] else ">="
    parts = [f"confidence {confidence['value']:.2f} {sign} {confidence['threshold']:.2f} ({thresholds.sigmas:g}σ)"]  # noqa: RUF001
    label = "entropy KS" if entropy["of"] == "entropy" else "token-probability KS"
    if entropy["statistic"] is None:
        parts.append(f"{label} n/a")
    else:
        sign = ">" if entropy["fired"] else "<="
        parts.append(f"{label} {entropy['statistic']:.2f} {sign} {entropy['threshold']:.2f} "
                     f"(p {thresholds.p_value:g})")
    fired = [name for name in ("confidence", "entropy") if triggers[name]["fired"]]
    head = "drift: " if fired else "no trigger: "
    marked = [d + (" (trigger)" if d in thresholds.trigger_on_diagnostics else "") for d in fired_diagnostics]
    tail = f"diagnostics: {', '.join(marked)}" if marked else "no diagnostics"
    return head + "; ".join(parts) + "; " + tail
