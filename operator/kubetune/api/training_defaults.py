"""The training settings a user leaves out, derived from the task, the method and the training split's
size (pure). The evidence behind each number (bench/quality.py on CLINC150, the causal side-by-side) is
in docs/trainer.md#defaults; the values chosen are logged and kept in the manifest.
"""

from __future__ import annotations

import math

from .methods import METHODS

CLASSIFICATION = "SequenceClassification"

# Peak learning rates: (adapter methods, whole-model methods). A LoRA update starts at zero and moves a
# low-rank slice: it takes a rate ~10x a full fine-tune's.
LEARNING_RATES = {CLASSIFICATION: (2e-3, 5e-5), "CausalLM": (2e-4, 2e-5)}
HEAD_LEARNING_RATE_FACTOR = 5  # a new head starts at random: it moves further than the adapters
HEAD_LEARNING_RATE_MAX = 1e-2
BATCH = {CLASSIFICATION: 32, "CausalLM": 8}
# Classification: about this many examples seen in all (more passes over small splits), in bounds.
CLASSIFICATION_EXAMPLES_SEEN = 30_000
EPOCH_BOUNDS = {CLASSIFICATION: (1, 10), "CausalLM": (1, 3)}
CAUSAL_EXAMPLES_SEEN = 6_000
LONG_RUN_STEPS = 1_000  # longer runs warm up for 6% of their steps, shorter ones for 10%
# LoRA dropout regularises against memorising examples seen many times; over one or two passes it buys
# nothing (CLINC150, 2 epochs: 0.9582 with 0.05, 0.9589 without) and a CPU step costs 1.4x with it.
LORA_DROPOUT = 0.05
PASSES_WITHOUT_DROPOUT = 2
# The one derived default outside spec.training (the others are keyed by their path under it).
LORA_DROPOUT_KEY = "method.lora.dropout"
# Recomputing activations costs ~30% more compute: worth it only where activations are what fills memory.
CHECKPOINTING_PARAMETERS = 1_000_000_000
CHECKPOINTING_TOKENS = 16_384  # per micro-batch: perDeviceBatchSize x maxSeqLength


def learning_rate(training: dict, *, task: str, method: str) -> float:
    """The peak learning rate: the spec's, else the task's and method's default (needs no data)."""
    if training.get("learningRate") is not None:
        return float(training["learningRate"])
    adapter = METHODS[method].publishes_adapter if method in METHODS else True
    rates = LEARNING_RATES.get(task, LEARNING_RATES["CausalLM"])
    return rates[0] if adapter else rates[1]


def resolve(training: dict, *, task: str, method: str, train_examples: int, world_size: int) -> tuple[dict, dict]:
    """(the training settings with every unset field derived, {field: why} for the derived ones)."""
    out, why = dict(training), {}
    if out.get("learningRate") is None:
        out["learningRate"] = learning_rate(out, task=task, method=method)
        why["learningRate"] = f"{task}, method {method}"
    if task == CLASSIFICATION and out.get("headLearningRate") is None:
        out["headLearningRate"] = max(out["learningRate"], min(HEAD_LEARNING_RATE_MAX,
                                                               HEAD_LEARNING_RATE_FACTOR * out["learningRate"]))
        why["headLearningRate"] = f"{HEAD_LEARNING_RATE_FACTOR}x learningRate, at most {HEAD_LEARNING_RATE_MAX:g}"
    if out.get("perDeviceBatchSize") is None:
        out["perDeviceBatchSize"], why["perDeviceBatchSize"] = _batch(task, out.get("effectiveBatchSize"), world_size)
    if out.get("epochs") is None and out.get("maxSteps") is None:
        out["epochs"], why["epochs"] = _epochs(task, train_examples)
    scheduler = dict(out.get("scheduler") or {})
    if scheduler.get("warmupRatio") is None:
        steps = _planned_steps(out, train_examples, world_size)
        scheduler["warmupRatio"] = 0.06 if steps > LONG_RUN_STEPS else 0.1
        why["scheduler.warmupRatio"] = f"{steps} planned steps ({'>' if steps > LONG_RUN_STEPS else '<='} " \
                                       f"{LONG_RUN_STEPS})"
    out["scheduler"] = scheduler
    return out, why


def lora_dropout(method: dict, training: dict, *, train_examples: int,
                 world_size: int) -> tuple[float | None, str | None]:
    """(the LoRA dropout, why when derived): the spec's, else LORA_DROPOUT when the run passes over its
    examples more than PASSES_WITHOUT_DROPOUT times, else 0. None for methods without LoRA settings.
    `training` is resolved already (epochs or maxSteps, batch)."""
    facts = METHODS.get(method.get("type"))
    lora = method.get("lora") or {}
    if facts is None or facts.settings != "lora":
        return None, None
    if lora.get("dropout") is not None:
        return float(lora["dropout"]), None
    passes = (_planned_steps(training, train_examples, world_size) * _effective_batch(training, world_size)
              / max(1, train_examples))
    many = passes > PASSES_WITHOUT_DROPOUT
    return (LORA_DROPOUT if many else 0.0), (f"{passes:.1f} passes over the training examples "
                                             f"({'>' if many else '<='} {PASSES_WITHOUT_DROPOUT})")


def derived_value(spec: dict, key: str):
    """The value of a derived default, by its `derivedDefaults` key (see LORA_DROPOUT_KEY)."""
    node = spec if key == LORA_DROPOUT_KEY else spec["training"]
    for part in key.split("."):
        node = (node or {}).get(part)
    return node


def _effective_batch(training: dict, world_size: int) -> int:
    return training.get("effectiveBatchSize") or training["perDeviceBatchSize"] * world_size


def _batch(task: str, effective: int | None, world_size: int) -> tuple[int, str]:
    wanted = BATCH.get(task, BATCH["CausalLM"])
    if not effective:
        return wanted, f"{task}"
    per_rank = max(1, effective // max(1, world_size))
    # the largest divisor of the per-rank share not above the task's batch: accumulation stays whole
    best = max(d for d in range(1, min(wanted, per_rank) + 1) if per_rank % d == 0)
    return best, f"the largest divisor of effectiveBatchSize / world size = {per_rank} up to {wanted}"


def _epochs(task: str, train_examples: int) -> tuple[float, str]:
    low, high = EPOCH_BOUNDS.get(task, EPOCH_BOUNDS["CausalLM"])
    seen = CLASSIFICATION_EXAMPLES_SEEN if task == CLASSIFICATION else CAUSAL_EXAMPLES_SEEN
    epochs = min(high, max(low, round(seen / max(1, train_examples))))
    return epochs, f"about {seen} examples seen over {train_examples} training examples, in [{low}, {high}]"


def _planned_steps(training: dict, train_examples: int, world_size: int) -> int:
    """Optimizer steps the run will take (as the trainer's Schedule counts them)."""
    if training.get("maxSteps"):
        return int(training["maxSteps"])
    effective = _effective_batch(training, world_size)
    steps_per_epoch = max(1, train_examples // max(1, effective))
    return max(1, math.ceil(training["epochs"] * steps_per_epoch))


def gradient_checkpointing(training: dict, parameters: int) -> tuple[bool, str | None]:
    """(whether to recompute activations, why when derived): the user's choice, else on for big models or
    big micro-batches only (the model's size is known once it is loaded, after `resolve`)."""
    if training.get("gradientCheckpointing") is not None:
        return bool(training["gradientCheckpointing"]), None
    tokens = training["perDeviceBatchSize"] * training.get("maxSeqLength", 2048)
    on = parameters >= CHECKPOINTING_PARAMETERS or tokens >= CHECKPOINTING_TOKENS
    return on, (f"{parameters / 1e6:.0f}M parameters (on from {CHECKPOINTING_PARAMETERS / 1e9:g}B), {tokens} tokens "
                f"per micro-batch (on from {CHECKPOINTING_TOKENS})")


def packing(training: dict, accelerator: str) -> tuple[bool, str | None]:
    """(whether to pack causal-LM rows, why when derived): the user's choice, else on GPUs only. On CPU the
    attention over one long packed row (a block mask, still computed whole) costs more than the little
    padding length grouping leaves (bench/quality_causal.py: 0.76x TRL's tokens/s packed, 1.10x padded)."""
    if training.get("packing") is not None:
        return bool(training["packing"]), None
    return accelerator == "cuda", f"accelerator {accelerator}"
