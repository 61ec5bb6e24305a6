"""Drift analysis cost: what the operator spends on one window of sampled traffic, with and without the
embedding diagnostics, and once per adapter on the reference and its calibration.

    .venv/bin/python bench/drift_analysis.py --json /tmp/drift.json            # windows of 1,000, 5 runs, ~2 min
    .venv/bin/python bench/drift_analysis.py --smoke --json /tmp/drift.json    # windows of 100, 2 runs, ~15 s (CI)
Set-up, what is timed, and --smoke: BENCHMARKS.md ("Drift analysis cost per window")."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

from common import free_port, load_average, minilm_dir, stop_process  # noqa: E402  (bench/, on sys.path)
from kubetune.api import jobconfig, serving, storage_layout  # noqa: E402
from kubetune.api.validation import validate  # noqa: E402
from kubetune.runtimes import cpu  # noqa: E402
from kubetune_operator import stats  # noqa: E402
from kubetune_operator.clients.embeddings import EmbeddingClient  # noqa: E402

SHARED = Path(os.environ.get("KUBETUNE_SHARED", REPO_ROOT.parent / "shared"))
NS, ADAPTER = "team-a", "intents"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
STARTUP_TIMEOUT = 180
INTENTS, PER_INTENT = 10, 30

DEFAULTS = {"window": 1000, "runs": 5, "epochs": 3, "max_validation": None, "pool": None, "inprocess": True}
SMOKE = {"window": 100, "runs": 2, "epochs": None, "max_validation": 60, "pool": 100, "inprocess": False}


def post(url: str, body: dict, timeout: float = 60) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url}: {exc.code} {exc.read().decode(errors='replace')}") from exc


# --- data and adapter ---------------------------------------------------------------------------------------


def clinc() -> dict:
    path = SHARED / "datasets" / "clinc150" / "data_full.json"
    if not path.is_file():
        sys.exit(f"CLINC150 not found at {path}: the benchmark reads ../shared in place (or set KUBETUNE_SHARED)")
    return json.loads(path.read_text())


def subsets(data: dict, max_validation: int | None) -> dict:
    """The first 10 intents (sorted): 30 training utterances each, their validation utterances (the holdout),
    and the traffic pools: in-scope (test + the unused training utterances) and out-of-scope (oos_test)."""
    intents = sorted({intent for _, intent in data["train"]})[:INTENTS]
    by_intent: dict[str, list[str]] = {i: [] for i in intents}
    for text, intent in data["train"]:
        if intent in by_intent:
            by_intent[intent].append(text)
    train = [{"text": t, "label": i} for i in intents for t in by_intent[i][:PER_INTENT]]
    validation = [{"text": t, "label": i} for t, i in data["val"] if i in by_intent][:max_validation]
    in_scope = [t for t, i in data["test"] if i in by_intent] + [t for i in intents for t in by_intent[i][PER_INTENT:]]
    return {"intents": intents, "train": train, "validation": validation, "in_scope": in_scope,
            "out_of_scope": [t for t, _ in data["oos_test"]]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(root: Path, data: dict, epochs: int) -> tuple[dict, Path, float]:
    """The adapter (the real trainer, in this process, on one torch thread: steps this small run faster on
    one thread than on two that wait for each other, much faster when other processes share the cores);
    its manifest, directory and training seconds."""
    import torch

    from kubetune_trainer import train as trainer

    train_path = write_jsonl(root / "train.jsonl", data["train"])
    validation_path = write_jsonl(root / "validation.jsonl", data["validation"])
    training = {"epochs": epochs, "learningRate": 0.003, "perDeviceBatchSize": 16, "maxSeqLength": 48,
                "precision": "Auto", "gradientCheckpointing": False, "checkpointSteps": 10_000, "evalSteps": 10_000}
    spec = {"baseModel": {"uri": f"file://{minilm_dir()}"}, "task": "SequenceClassification",
            "dataset": {"uri": f"file://{train_path}", "validationUri": f"file://{validation_path}",
                        "format": "text-label"},
            "method": {"type": "LoRA", "lora": {"rank": 8, "alpha": 16, "dropout": 0.05,
                                                "targetModules": ["query", "key", "value", "dense"]}},
            "training": training,
            "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
            "output": {"uri": f"file://{root / 'store'}"}}
    name = "bench-drift"
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1}, "spec": spec}
    result = validate(doc, local=True)
    if not result.ok:
        raise SystemExit(f"the bench's job does not validate: {result.errors}")
    config = jobconfig.job_config(NS, name, f"uid-{name}", result.defaulted["spec"])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        manifest = trainer.run(config, work_dir=root / "work")
    finally:
        torch.set_num_threads(previous)
    prefix = storage_layout.adapter_prefix(config.storage.job_prefix, manifest["digest"])
    return manifest, Path(storage_layout.split_uri(prefix)[2]), time.monotonic() - started


def base_profile(engine: Engine, data: dict) -> dict:
    """--smoke: the base model's own answers on the holdout as the reference profile (no training)."""
    from kubetune_trainer import metrics

    confidences, entropies, lengths = [], [], []
    for row in data["validation"]:
        answer = json.loads(post(engine.url + serving.ENGINE_CLASSIFY, {"model": "minilm", "input": row["text"]}))
        probs = answer["data"][0]["probs"]
        confidences.append(max(probs))
        entropies.append(-sum(p * math.log(max(p, 1e-12)) for p in probs))
        lengths.append(answer["usage"]["prompt_tokens"])
    return metrics.drift_profile(input_lengths=lengths, texts=[r["text"] for r in data["train"]],
                                 confidences=confidences, entropies=entropies, kind="classification")


class Engine:
    """`python -m kubetune_engine` with the MiniLM base and the MiniLM embedding model."""

    def __init__(self, log_dir: Path, threads: int):
        self.port = free_port()
        self.log_path = log_dir / f"engine-{self.port}.log"
        command = [sys.executable, "-m", "kubetune_engine", str(minilm_dir()), "--fidelity", "kubetune",
                   "--port", str(self.port), "--served-model-name", "minilm", "--embedding-model", str(minilm_dir()),
                   "--embedding-model-name", EMBEDDING_MODEL]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> float:
        deadline = self.started + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"engine exited {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + cpu.RUNTIME.api.health, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the engine was not healthy within {STARTUP_TIMEOUT} s")

    def stop(self) -> None:
        stop_process(self.process)


def sample_lines(engine: Engine, version: str, texts: list[str]) -> list[str]:
    """One `/classify` per text; each answer as the JSON line the agent samples."""
    alias = serving.alias_name(NS, ADAPTER)
    lines = []
    for text in texts:
        started = time.monotonic()
        response = json.loads(post(engine.url + serving.ENGINE_CLASSIFY, {"model": version, "input": text}))
        record = {"time": "2025-06-01T12:00:00.000Z", "alias": alias, "version": version,
                  "path": serving.ENGINE_CLASSIFY, "status": 200, "latency": round(time.monotonic() - started, 6),
                  "confidence": max(response["data"][0]["probs"]), "request": {"model": alias, "input": text},
                  "response": response}
        lines.append(json.dumps(record))
    return lines


# --- the timed part -----------------------------------------------------------------------------------------


def parse(jsonl: str) -> list[stats.Observation]:
    return [o for line in jsonl.splitlines() if line for o in stats.observations(json.loads(line))]


def timed(fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def run_window(jsonl: str, reference: dict, calibration: dict, client: EmbeddingClient, encoder,
               thresholds: stats.Thresholds) -> dict:
    window, parse_s = timed(parse, jsonl)
    plain, analyse_s = timed(stats.analyse, reference, calibration, window, None, thresholds)
    texts = [o.text for o in window]
    http_vectors, embed_http_s = timed(client.embed, texts)
    with_http, analyse_embedding_s = timed(stats.analyse, reference, calibration, window, http_vectors, thresholds)
    assert plain["triggers"] == with_http["triggers"]  # embeddings add diagnostics, never change triggers
    result = {
        "requests": len(window), "drifted": with_http["drifted"], "summary": with_http["summary"],
        "parse_s": parse_s, "analyse_s": analyse_s, "embed_http_s": embed_http_s,
        "analyse_embeddings_s": analyse_embedding_s,
        "without_s": parse_s + analyse_s,
        "with_http_s": parse_s + embed_http_s + analyse_embedding_s,
    }
    if encoder is not None:
        local, embed_local_s = timed(encoder.embed, texts)
        with_local = stats.analyse(reference, calibration, window, local.vectors, thresholds)
        assert with_local["drifted"] == with_http["drifted"]
        result.update(embed_inprocess_s=embed_local_s, with_inprocess_s=parse_s + embed_local_s + analyse_embedding_s)
    return result


def at_limits(profile: dict, texts: list[str], vectors: list[list[float]], size: int,
              thresholds: stats.Thresholds) -> dict:
    """build_reference + calibrate for the largest reference: 5,000 holdout values, 2,000 embeddings."""
    rng = random.Random(7)
    picks = [rng.randrange(len(vectors)) for _ in range(stats.MAX_EMBEDDINGS)]
    noisy = [[x + rng.gauss(0, 0.01) for x in vectors[i]] for i in picks]
    values = [rng.randrange(profile["holdoutSize"]) for _ in range(5000)]
    big = {**profile, "confidence": {"values": [profile["confidence"]["values"][i] for i in values]},
           "entropy": {"values": [profile["entropy"]["values"][i] for i in values]}}
    reference, reference_s = timed(stats.build_reference, big, [texts[i % len(texts)] for i in values], noisy)
    calibration, calibrate_s = timed(stats.calibrate, reference, size, thresholds, 0)
    window = [stats.Observation(texts[i % len(texts)], big["confidence"]["values"][i], big["entropy"]["values"][i])
              for i in range(size)]
    window_vectors = [noisy[i % len(noisy)] for i in range(size)]
    _, analyse_s = timed(stats.analyse, reference, calibration, window, window_vectors, thresholds)
    return {"values": 5000, "embeddings": stats.MAX_EMBEDDINGS, "build_reference_s": round(reference_s, 3),
            "calibrate_s": round(calibrate_s, 3), "analyse_embeddings_s": round(analyse_s, 3),
            "reference_json_bytes": len(json.dumps(reference))}


def median(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=None, help=f"requests per window (default {DEFAULTS['window']})")
    parser.add_argument("--runs", type=int, default=None, help=f"windows timed (default {DEFAULTS['runs']})")
    parser.add_argument("--bootstraps", type=int, default=500, help="null windows per calibration (CRD default 500)")
    parser.add_argument("--engine-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the engine; the in-process encoder uses as many (default 1: on a "
                             "shared 2-core machine torch's spin-waiting threads make 2 slower than 1)")
    parser.add_argument("--smoke", action="store_true", help=f"CI-sized, no training: {SMOKE}")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


def serve_adapter(root: Path, engine: Engine, data: dict, sizes: dict) -> dict:
    """The served model and its drift profile: a trained adapter, or (no epochs) the base model."""
    if sizes["epochs"]:
        manifest, adapter, train_seconds = train(root, data, sizes["epochs"])
        engine_seconds = engine.wait_ready()
        version = serving.version_name(NS, ADAPTER, manifest["digest"])
        post(engine.url + cpu.RUNTIME.api.load, {"lora_name": version, "lora_path": str(adapter)})
        profile, accuracy = manifest["driftProfile"], manifest["metrics"].get("accuracy")
        print(f"adapter trained in {train_seconds:.1f} s (accuracy {accuracy:.3f}, holdout "
              f"{profile['holdoutSize']}); engine ready in {engine_seconds:.1f} s", flush=True)
    else:
        engine_seconds, train_seconds, accuracy, version = engine.wait_ready(), 0.0, None, "minilm"
        profile = base_profile(engine, data)
        print(f"engine ready in {engine_seconds:.1f} s; the base model's answers on the holdout of "
              f"{profile['holdoutSize']} are the reference (no training)", flush=True)
    return {"engine_seconds": engine_seconds, "train_seconds": train_seconds, "accuracy": accuracy,
            "version": version, "profile": profile}


def in_process_encoder(threads: int):
    import torch

    from kubetune_engine.embeddings import SentenceEncoder

    torch.set_num_threads(threads)
    encoder = SentenceEncoder(minilm_dir(), name=EMBEDDING_MODEL)
    encoder.load()
    return encoder


def one_off_costs(args, client: EmbeddingClient, profile: dict, data: dict, size: int,
                  thresholds: stats.Thresholds) -> tuple[dict, dict, dict]:
    """Once per adapter: the holdout embedded, the reference and the calibration; (reference, calibration,
    their costs)."""
    holdout_texts = [row["text"] for row in data["validation"]]
    holdout_vectors, embed_holdout_s = timed(client.embed, holdout_texts)
    reference, reference_s = timed(stats.build_reference, profile, holdout_texts, holdout_vectors)
    calibration, calibrate_s = timed(stats.calibrate, reference, size, thresholds, 0)
    one_off = {"embed_holdout_http_s": round(embed_holdout_s, 4), "build_reference_s": round(reference_s, 4),
               "calibrate_s": round(calibrate_s, 4), "holdout": len(holdout_texts),
               "reference_json_bytes": len(json.dumps(reference)),
               "calibration_json_bytes": len(json.dumps(calibration))}
    print(f"one-off: holdout of {len(holdout_texts)} embedded over HTTP in {embed_holdout_s:.3f} s, reference "
          f"built in {reference_s:.3f} s, calibration ({args.bootstraps} bootstraps of {size}) in "
          f"{calibrate_s:.3f} s", flush=True)
    if not args.smoke:
        one_off["at_limits"] = at_limits(profile, holdout_texts, holdout_vectors, size, thresholds)
        limits = one_off["at_limits"]
        print(f"at the size limits (5,000 values, 2,000 embeddings): reference built in "
              f"{limits['build_reference_s']:.3f} s, calibrated in {limits['calibrate_s']:.3f} s, a window "
              f"analysed with embeddings in {limits['analyse_embeddings_s']:.3f} s", flush=True)
    return reference, calibration, one_off


def timed_windows(pools: tuple[list, list], size: int, runs: int, reference: dict, calibration: dict,
                  client: EmbeddingClient, encoder, thresholds: stats.Thresholds) -> list[dict]:
    """A warm-up window (first calls pay for lazy imports and allocations), then the timed runs: even
    runs all in scope, odd ones half out of scope."""
    pool_in, pool_out = pools
    warm = random.Random(-1).sample(pool_in, size)
    run_window("\n".join(warm), reference, calibration, client, encoder, thresholds)
    results = []
    for index in range(runs):
        rng = random.Random(index)
        share = 0.0 if index % 2 == 0 else 0.5
        outside = round(size * share)
        lines = rng.sample(pool_in, size - outside) + rng.sample(pool_out, outside)
        rng.shuffle(lines)
        result = run_window("\n".join(lines), reference, calibration, client, encoder, thresholds)
        result["oos_share"] = share
        results.append(result)
        local = f", with (in-process) {result['with_inprocess_s']:.3f} s" if encoder else ""
        print(f"run {index}: {share:.0%} oos, without {result['without_s']:.3f} s, with (HTTP) "
              f"{result['with_http_s']:.3f} s{local}; {result['summary']}", flush=True)
    return results


def measure(args, sizes: dict, size: int, runs: int, thresholds: stats.Thresholds) -> dict:
    data = subsets(clinc(), sizes["max_validation"])
    with tempfile.TemporaryDirectory(prefix="kubetune-drift-") as tmp:
        root = Path(tmp)
        engine = Engine(root, args.engine_threads)  # starts while the adapter trains
        try:
            served = serve_adapter(root, engine, data, sizes)
            in_scope, out_of_scope = data["in_scope"][:sizes["pool"]], data["out_of_scope"][:sizes["pool"]]
            t = time.monotonic()
            version = served["version"]
            pool_in, pool_out = sample_lines(engine, version, in_scope), sample_lines(engine, version, out_of_scope)
            score_seconds = time.monotonic() - t
            print(f"{len(pool_in)} in-scope and {len(pool_out)} out-of-scope requests scored through the engine in "
                  f"{score_seconds:.1f} s", flush=True)
            encoder = in_process_encoder(args.engine_threads) if sizes["inprocess"] else None
            client = EmbeddingClient(engine.url, EMBEDDING_MODEL)
            reference, calibration, one_off = one_off_costs(args, client, served["profile"], data, size, thresholds)
            results = timed_windows((pool_in, pool_out), size, runs, reference, calibration, client, encoder,
                                    thresholds)
        finally:
            engine.stop()
    return {**served, "score_seconds": score_seconds, "pools": {"in_scope": len(pool_in),
            "out_of_scope": len(pool_out)}, "one_off": one_off, "results": results}


def print_table(medians: dict, ratio: dict, size: int, runs: int) -> None:
    def row(title: str, key: str) -> str:
        if key not in medians:
            return f"| {title} | - | not measured | |"
        m = medians[key]
        return (f"| {title} | {runs} | {m['median']:.3f} ({m['min']:.3f}-{m['max']:.3f}) | "
                f"{m['median'] / size * 1000:.2f} |")

    print()
    print(f"| per window of {size:,} requests | runs | median s (min-max) | ms per request |")
    print("|---|---|---|---|")
    print(row("without embeddings (parse + analyse)", "without_s"))
    print(row("with embeddings, /v1/embeddings over HTTP", "with_http_s"))
    print(row("with embeddings, encoder in-process", "with_inprocess_s"))
    print(row("- parse (json.loads + observations)", "parse_s"))
    print(row("- analyse, no embeddings", "analyse_s"))
    print(row("- embed over HTTP (EmbeddingClient, batches of 256)", "embed_http_s"))
    print(row("- embed in-process", "embed_inprocess_s"))
    print(row("- analyse with embeddings", "analyse_embeddings_s"))
    print("ratio with / without embeddings: " + ", ".join(f"{v}x ({k})" for k, v in ratio.items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else DEFAULTS
    size, runs = args.window or sizes["window"], args.runs or sizes["runs"]
    thresholds = stats.Thresholds(bootstraps=args.bootstraps)
    load_before = load_average()
    print(f"drift analysis bench: windows of {size}, {runs} runs, {os.cpu_count()} CPUs, load average {load_before}",
          flush=True)
    started = time.monotonic()
    measured = measure(args, sizes, size, runs, thresholds)
    results = measured["results"]
    load_after = load_average()
    keys = ("parse_s", "analyse_s", "embed_http_s", "analyse_embeddings_s", "embed_inprocess_s", "without_s",
            "with_http_s", "with_inprocess_s")
    medians = {key: median(results, key) for key in keys if key in results[0]}
    ratio = {kind: round(medians[f"with_{kind}_s"]["median"] / medians["without_s"]["median"], 1)
             for kind in ("http", "inprocess") if f"with_{kind}_s" in medians}
    report = {"settings": {"window": size, "runs": runs, "bootstraps": args.bootstraps,
                           "engine_threads": args.engine_threads, "smoke": args.smoke, "intents": INTENTS,
                           "train_per_intent": PER_INTENT, "epochs": sizes["epochs"]},
              "machine": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after},
              "setup": {"train_seconds": round(measured["train_seconds"], 1),
                        "engine_start_seconds": round(measured["engine_seconds"], 1),
                        "score_seconds": round(measured["score_seconds"], 1), "accuracy": measured["accuracy"],
                        "pools": measured["pools"]},
              "one_off": measured["one_off"], "runs": results, "medians": medians, "ratio": ratio,
              "wall_seconds": round(time.monotonic() - started, 1)}
    print_table(medians, ratio, size, runs)
    print(f"load average before {load_before}, after {load_after}; wall {report['wall_seconds']} s")
    if max(load_before, load_after) > 1.5 * (os.cpu_count() or 1):
        print("warning: the machine was busy (load average above 1.5 x CPUs): timings are inflated", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
