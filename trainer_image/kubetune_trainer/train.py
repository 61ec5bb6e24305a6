"""One fine-tuning run, top to bottom.

    validate data (+ evaluation sets, reference adapter) ─▶ load model + method ─▶ baseline eval ─▶
    smoke step ─▶ train (eval, early stop, thaw, checkpoint) ─▶ final eval ─▶ evaluation sets (candidate,
    then reference) ─▶ publish adapter + manifest (rank 0)

Every process of a torchrun launch runs this file; rank 0 alone writes progress and publishes.
Decisions that need no tensors (metrics, early stopping, the DeepSpeed config, data checks) live in
plain modules with their own unit tests; this file is the loop that strings them together.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kubetune.api import jobconfig, storage_layout
from kubetune.api.jobconfig import JobConfig
from kubetune.clients.storage import publish_adapter

from . import __version__, data, distributed, ds_config, evalsets, metrics, modeling, storage, text, tracking
from .modeling import BadInput

log = logging.getLogger(__name__)


LABELS_FILE = "labels.json"  # classification adapters: class names in id order, next to the head


class TrainingHalted(Exception):
    """The guard stopped training (NaN/inf or a loss spike): not retryable, the config must change."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Schedule:
    """The numbers derived from the spec and the world size (logged, and saved in the manifest)."""

    world_size: int
    per_device_batch: int
    grad_accum: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def from_spec(cls, training: dict, world_size: int, train_size: int, cap: int | None = None) -> Schedule:
        """`cap` bounds the steps (a rank-sweep trial's maxSteps); warmup and evaluation follow the cap."""
        per_device = training["perDeviceBatchSize"]
        effective = training.get("effectiveBatchSize") or per_device * world_size
        accum = max(1, effective // (per_device * world_size))
        micro = max(1, train_size // (per_device * world_size))  # equal on every rank (collectives align)
        steps_per_epoch = max(1, micro // accum)
        if training.get("maxSteps"):
            total = training["maxSteps"]
        else:
            total = max(1, math.ceil(training["epochs"] * steps_per_epoch))
        if cap:
            total = min(total, cap)
        eval_every = training.get("evalSteps") or (steps_per_epoch if training.get("epochs") else max(1, total // 10))
        warmup = round(training["scheduler"]["warmupRatio"] * total)
        return cls(world_size, per_device, accum, micro, steps_per_epoch, total, warmup, min(eval_every, total),
                   training["checkpointSteps"])


def lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs (saved in every checkpoint)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # next micro-batch of `epoch` (data position)
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    plateau_evals: int = 0
    trainable_blocks: int | None = None
    baseline: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # [{step, trainLoss | eval metrics}]
    padding_tokens: int = 0
    real_tokens: int = 0
    train_seconds: float = 0.0  # optimizer steps only (no evaluation, checkpointing or loading)


# --- the engine: plain, DDP or DeepSpeed ----------------------------------------------------------------


class Engine:
    """The three ways of stepping, behind one interface the loop uses."""

    def __init__(self, model, optimizer, scheduler, dist: distributed.DistInfo, ds: dict | None, max_grad_norm: float,
                 grad_accum: int, scaler: torch.amp.GradScaler | None, autocast_dtype):
        self.module, self.optimizer, self.scheduler, self.dist = model, optimizer, scheduler, dist
        self.max_grad_norm, self.grad_accum, self.scaler = max_grad_norm, grad_accum, scaler
        self.autocast_dtype = autocast_dtype
        self.deepspeed = None
        self.ddp = None
        if ds is not None:
            self.deepspeed = distributed.wrap_deepspeed(model, optimizer, scheduler, ds)
        elif dist.world_size > 1:
            self._wrap_ddp()
        self.last_grad_norm = 0.0
        self.monitor_layers = False  # set by the loop before a step it will evaluate
        self.layer_grad_norms: dict[str, float] = {}
        self.best_weights: dict | None = None  # early stopping: a CPU copy of the best evaluation's weights

    def _wrap_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.module, device_ids=ids)

    def parameters_changed(self) -> None:
        """Freeze-thaw made more parameters trainable: DDP must register them."""
        if self.ddp is not None:
            self._wrap_ddp()

    def forward(self, tensors: dict):
        model = self.deepspeed or self.ddp or self.module
        tensors = {k: v.to(self.dist.device) for k, v in tensors.items()}
        if self.autocast_dtype is not None and self.deepspeed is None:
            with torch.autocast(self.dist.device.type, dtype=self.autocast_dtype):
                return model(**tensors, use_cache=False) if "position_ids" in tensors else model(**tensors)
        return model(**tensors, use_cache=False) if "position_ids" in tensors else model(**tensors)

    def backward(self, loss) -> None:
        if self.deepspeed is not None:
            self.deepspeed.backward(loss)  # DeepSpeed scales by 1/accumulation itself
        elif self.scaler is not None:
            self.scaler.scale(loss / self.grad_accum).backward()
        else:
            (loss / self.grad_accum).backward()

    def micro_step(self, boundary: bool) -> None:
        """After every micro-batch; the optimizer steps only at an accumulation boundary."""
        if self.deepspeed is not None:
            self.deepspeed.step()
            if boundary:
                norm = self.deepspeed.get_global_grad_norm()
                self.last_grad_norm = float(norm) if norm is not None else 0.0
            return
        if not boundary:
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.monitor_layers:  # before clipping: the gradients as the loss made them
            self.layer_grad_norms = modeling.layer_grad_norms(self.module)
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _optimized_parameters(self) -> dict:
        """Name -> parameter for everything the optimizer updates (the adapter, a thawed block, all)."""
        ids = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        return {n: p for n, p in self.module.named_parameters() if id(p) in ids}

    @property
    def can_keep_best(self) -> bool:
        return self.deepspeed is None  # ZeRO partitions the weights: no cheap local copy

    def remember_best(self) -> None:
        self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in self._optimized_parameters().items()}

    def restore_best(self) -> None:
        parameters = self._optimized_parameters()
        with torch.no_grad():
            for name, value in self.best_weights.items():
                parameters[name].copy_(value.to(parameters[name].device))

    def zero_grad(self) -> None:
        if self.deepspeed is not None:
            self.deepspeed.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        (self.deepspeed or self.module).train(mode)

    # checkpoints --------------------------------------------------------------------------------

    def save(self, directory: Path, state: TrainerState) -> None:
        """Every rank writes its part (a collective under DeepSpeed: frozen weights left out, one RNG file
        per rank); the plain/DDP model and optimizer are the same on every rank, so rank 0 writes them."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.deepspeed is not None:
            distributed.save_checkpoint(self.deepspeed, directory, "ds", {"trainer": state.__dict__})
            return
        torch.save(distributed.capture_rng_state(), directory / f"rng-rank{self.dist.rank}.pt")
        if self.dist.is_main:
            trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
            torch.save({"model": trainable, "optimizer": self.optimizer.state_dict(), "best": self.best_weights,
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler else None,
                        "trainer": state.__dict__}, directory / "state.pt")

    def load(self, directory: Path) -> TrainerState:
        if self.deepspeed is not None:
            return TrainerState(**distributed.load_checkpoint(self.deepspeed, directory, "ds")["trainer"])
        else:
            blob = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
            loaded = self.module.load_state_dict(blob["model"], strict=False)  # frozen weights are not in it
            if loaded.unexpected_keys:
                raise RuntimeError(f"checkpoint does not fit the model: unexpected {loaded.unexpected_keys[:5]}")
            self.optimizer.load_state_dict(blob["optimizer"])
            self.best_weights = blob.get("best")
            self.scheduler.load_state_dict(blob["scheduler"])
            if self.scaler and blob.get("scaler"):
                self.scaler.load_state_dict(blob["scaler"])
            saved = blob["trainer"]
        rng_file = directory / f"rng-rank{self.dist.rank}.pt"
        if rng_file.exists():
            distributed.restore_rng_state(torch.load(rng_file, weights_only=False))
        return TrainerState(**saved)


# --- evaluation ---------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    metrics: dict
    confidences: list[float]
    entropies: list[float]
    predictions: list[int] = field(default_factory=list)  # classification: predicted class ids, in order
    scored: int = 0  # examples (classification) or tokens (causal LM) in eval_loss


class Scorer:
    """A model that is only evaluated (the reference adapter): the Engine's forward, no optimizer.

    Under ZeRO-3 it runs inside a DeepSpeed engine (partitioned weights; every forward is a collective,
    so every rank scores the same examples, as `evaluate` does for the candidate); otherwise a plain
    module on this rank's device."""

    def __init__(self, model, dist: distributed.DistInfo, zero3: dict | None, autocast_dtype, quantized: bool):
        self.module, self.dist, self.autocast_dtype = model, dist, autocast_dtype
        self.deepspeed = self.ddp = None
        if zero3 is not None:
            # ZeRO inference: no optimizer (and none of its settings) in the engine.
            config = {k: v for k, v in zero3.items() if k not in ("gradient_clipping", "zero_force_ds_cpu_optimizer")}
            zero = dict(config["zero_optimization"])
            zero.pop("offload_optimizer", None)
            config["zero_optimization"] = zero
            self.deepspeed = distributed.wrap_deepspeed(model, None, None, config)
        elif not quantized:  # QLoRA's 4-bit base is placed while loading
            model.to(dist.device)

    forward = Engine.forward

    def train(self, mode: bool = True) -> None:
        (self.deepspeed or self.module).train(mode)


@torch.no_grad()
def evaluate(engine: Engine, examples: list[text.Example], *, task: str, batch_size: int, pad_id: int,
             pack: bool) -> Evaluation:
    """Loss, and accuracy + macro-F1 (classification) or perplexity (causal LM), on every rank.

    Every rank evaluates the whole holdout: under ZeRO-3 each forward is a collective, so all ranks
    must run the same number of them; the holdout is small next to training.
    """
    engine.train(False)
    loss_sum, weight, predictions, labels, confidences, entropies = 0.0, 0, [], [], [], []
    # Classification gold ids may be text.IGNORE (an evaluation set's label the model does not know): left
    # out of the loss, always a wrong prediction.
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if task == "SequenceClassification":
            batch = text.padded_batch(chunk, pad_id, torch)
            out = engine.forward(batch.tensors)
            logits = out.logits.float()
            gold = batch.tensors["labels"]
            loss_sum += float(F.cross_entropy(logits, gold.to(logits.device), reduction="sum",
                                              ignore_index=text.IGNORE))
            weight += int((gold != text.IGNORE).sum())
            probs = logits.softmax(-1)
            predictions.extend(probs.argmax(-1).tolist())
            labels.extend(gold.tolist())
            confidences.extend(probs.max(-1).values.tolist())
            entropies.extend((-(probs * probs.clamp_min(1e-12).log()).sum(-1)).tolist())
            continue
        # One forward per micro-batch (packed or padded, as in training); per-example confidence and
        # entropy come from knowing which sequence owns each predicted token.
        batch = text.make_batch(chunk, pack=pack, pad_id=pad_id, torch=torch)
        logits = engine.forward(batch.tensors).logits.float()
        rows, width = batch.tensors["input_ids"].shape
        if rows == 1:  # packed: sequences side by side in one row
            owner_rows = [[i for i, e in enumerate(chunk) for _ in e.input_ids]]
        else:  # padded: one sequence per row, -1 on padding
            owner_rows = [[i] * len(e.input_ids) + [-1] * (width - len(e.input_ids)) for i, e in enumerate(chunk)]
        owner = torch.tensor(owner_rows, device=logits.device)
        target = batch.tensors["labels"][:, 1:].to(logits.device)
        keep = target != text.IGNORE
        log_probs = logits[:, :-1][keep].log_softmax(-1)
        token_lp = log_probs.gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)
        token_entropy = -(log_probs.exp() * log_probs).sum(-1)
        token_owner = owner[:, 1:][keep]
        loss_sum += float(-token_lp.sum())
        weight += int(keep.sum())
        for index in range(len(chunk)):
            mine = token_owner == index
            if bool(mine.any()):
                confidences.append(float(token_lp[mine].exp().mean()))
                entropies.append(float(token_entropy[mine].mean()))
    engine.train(True)
    mean_loss = loss_sum / max(weight, 1)
    result = {"eval_loss": mean_loss}
    if task == "SequenceClassification":
        result["accuracy"] = metrics.accuracy(predictions, labels)
        result["macro_f1"] = metrics.macro_f1(predictions, labels)
    else:
        result["perplexity"] = metrics.perplexity(mean_loss)
    return Evaluation(result, confidences, entropies, predictions, weight)


# --- the run ------------------------------------------------------------------------------------------


def load_data(config: JobConfig, progress: storage.ProgressWriter) -> data.LoadedData:
    spec = config.spec
    dataset = spec["dataset"]
    store = storage.data_store(spec)
    progress.update(stage="validating", force=True)
    raw = store.read(dataset["uri"])
    if raw is None:
        raise BadInput(f"dataset.uri {dataset['uri']} does not exist")
    validation_raw = None
    if dataset.get("validationUri"):
        validation_raw = store.read(dataset["validationUri"])
        if validation_raw is None:
            raise BadInput(f"dataset.validationUri {dataset['validationUri']} does not exist")
    stratify = dataset.get("stratifyBy") or ("label" if dataset["format"] == "text-label" else None)
    loaded = data.load_dataset(raw, dataset["format"], labels=spec.get("labels"), validation_bytes=validation_raw,
                               validation_fraction=dataset["validationSplit"], seed=dataset["seed"],
                               stratify_by=stratify, source_name=dataset["uri"],
                               validation_source_name=dataset.get("validationUri") or "validation.jsonl")
    return loaded


def _length_check_functions(tokenizer, fmt: str) -> tuple:
    """(count_tokens, render_chat or None): what the data length check needs from the tokenizer."""

    def count(piece: str) -> int:
        return len(tokenizer(piece, add_special_tokens=True)["input_ids"])

    def render_chat(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False)

    chat_template = fmt == "chat" and getattr(tokenizer, "chat_template", None)
    return count, render_chat if chat_template else None


def prepare_data(config: JobConfig, loaded: data.LoadedData, tokenizer) -> tuple:
    spec = config.spec
    fmt, max_len = spec["dataset"]["format"], spec["training"]["maxSeqLength"]
    holdout = config.stage.holdout_fraction if config.stage.kind == jobconfig.STAGE_TRIAL else None
    count, render_chat = _length_check_functions(tokenizer, fmt)
    loaded.apply_length_check(count, max_len, render_chat=render_chat)
    if not loaded.acceptable(spec["dataset"]["maxInvalidFraction"]):
        raise BadInput("the dataset has invalid lines (nothing was trained):\n" + loaded.summary())
    if holdout:
        # A rank-sweep trial trains on the training split minus a holdout and is scored on that holdout:
        # the validation split stays unseen until the full run's final evaluation (no selection bias).
        stratify = spec["dataset"].get("stratifyBy") or ("label" if fmt == "text-label" else None)
        loaded.train, loaded.validation = data.split_records(loaded.train, holdout, spec["dataset"]["seed"] + 1,
                                                             stratify)
        if not loaded.validation:
            raise BadInput(f"rankSweep.holdoutFraction {holdout} of {len(loaded.train)} training examples "
                           "leaves no holdout to score the trial")
    label_ids = None
    if fmt == "text-label":
        label_ids = {name: i for i, name in enumerate(loaded.labels)}
    train_examples, train_stats = text.tokenize(loaded.train, fmt, tokenizer, max_len, label_ids)
    val_examples, val_stats = text.tokenize(loaded.validation, fmt, tokenizer, max_len, label_ids)
    if not train_examples:
        raise BadInput("the dataset has no valid training examples")
    return label_ids, train_examples, val_examples, {"train": train_stats.as_dict(), "validation": val_stats.as_dict()}


def load_evaluation_sets(config: JobConfig, loaded: data.LoadedData, tokenizer) -> list[evalsets.EvalSet]:
    """spec.evaluation.sets, read with the dataset's credentials, validated and tokenized like the dataset."""
    spec = config.spec
    fmt, max_len = spec["dataset"]["format"], spec["training"]["maxSeqLength"]
    count, render_chat = _length_check_functions(tokenizer, fmt)
    store = storage.data_store(spec)
    out = []
    for entry in spec["evaluation"]["sets"]:
        raw = store.read(entry["uri"])
        records = evalsets.parse_set(raw, entry["name"], entry["uri"], fmt, count_tokens=count, max_tokens=max_len,
                                     render_chat=render_chat)
        examples, gold = evalsets.tokenize_set(records, fmt, tokenizer, max_len, list(loaded.labels))
        out.append(evalsets.EvalSet(entry["name"], entry["uri"], data.dataset_digest(raw), records, examples, gold))
        duplicates = data.duplicates_across(loaded.train, records)
        log.info("evaluation set ready", extra={"set": entry["name"], "examples": len(examples),
                                                "unknownLabels": sum(g not in loaded.labels for g in gold),
                                                "duplicatesOfTraining": len(duplicates)})
        if duplicates:
            log.warning("evaluation set lines duplicate training examples (leakage)",
                        extra={"set": entry["name"], "pairs": len(duplicates), "first": duplicates[:10]})
    return out


def fetch_reference(config: JobConfig, store, dist, work_dir: Path) -> evalsets.Reference | None:
    """spec.evaluation.reference verified and downloaded once per pod (local rank 0), before training.

    The manifest's cheap checks (same base model and task) run on every rank, so a wrong reference fails
    all of them alike; a failed verification on one pod is shared through a collective."""
    reference_spec = (config.spec.get("evaluation") or {}).get("reference")
    if not reference_spec:
        return None
    uri = reference_spec["manifestUri"]
    document, labels = evalsets.read_reference(store, uri, config.spec)
    target = work_dir / "reference" / str(document.get("digest", "unknown")).replace(":", "-")
    error: BadInput | None = None
    reference = None
    if dist.local_rank == 0:
        try:
            reference = evalsets.fetch_reference(store, uri, config.spec, target)
        except BadInput as exc:
            error = exc
    failed = distributed.all_reduce_mean(1.0 if error else 0.0)  # a collective: every rank learns of a failure
    if error is not None:
        raise error
    if failed:
        raise BadInput(f"evaluation.reference {uri}: the adapter did not verify on another pod (see its log)")
    return reference or evalsets.Reference(uri, document, target, labels)


def run(config: JobConfig, *, work_dir: Path) -> dict:
    """Train and publish. Returns the manifest document (on rank 0; other ranks get {})."""
    work_dir.mkdir(parents=True, exist_ok=True)
    dist = distributed.init_process_group()
    tracker = tracking.Tracker(config.spec, config.job.__dict__, enabled=dist.is_main)
    status = "FAILED"
    try:
        document = _run(config, dist, work_dir, tracker)
        status = "FINISHED"
        return document
    finally:
        tracker.finish(status)
        distributed.cleanup()


def _run(config: JobConfig, dist, work_dir: Path, tracker: tracking.Tracker) -> dict:
    from transformers import AutoTokenizer

    spec, training = config.spec, config.spec["training"]
    task, method = spec["task"], spec["method"]["type"]
    random.seed(training["seed"])
    torch.manual_seed(training["seed"])
    out_store = storage.output_store_from_env(spec)
    prefix = config.storage.job_prefix
    progress = storage.ProgressWriter(out_store, prefix, enabled=dist.is_main)
    started = time.monotonic()

    # 1. data, validated before the model is even loaded ----------------------------------------------
    loaded = load_data(config, progress)
    progress.update(stage="loading", force=True)
    model_dir = modeling.resolve_model_dir(spec["baseModel"], storage.model_store(spec), work_dir / "cache")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_note = text.choose_pad_token(tokenizer) if task == "CausalLM" else "classification: the tokenizer's pad"
    label_ids, train_examples, val_examples, token_stats = prepare_data(config, loaded, tokenizer)
    if loaded.leakage:
        log.warning("exact duplicates across the train and validation splits (leakage)",
                    extra={"pairs": len(loaded.leakage), "first": loaded.leakage[:10]})
    log.info("dataset report", extra={"summary": loaded.summary()})
    log.info("data ready", extra={"train": len(train_examples), "validation": len(val_examples),
                                  "truncated": token_stats["train"]["truncated"], "pad": pad_note})
    # spec.evaluation: checked now (a bad set or reference fails in seconds), scored after training. Only
    # the training stage publishes, so baseline and trial stages leave it alone.
    eval_sets: list[evalsets.EvalSet] = []
    reference = None
    if config.stage.kind == jobconfig.STAGE_TRAIN and spec.get("evaluation"):
        eval_sets = load_evaluation_sets(config, loaded, tokenizer)
        reference = fetch_reference(config, out_store, dist, work_dir)

    # 2. model and method ----------------------------------------------------------------------------
    precision = modeling.pick_precision(training["precision"], dist.device)
    schedule = Schedule.from_spec(training, dist.world_size, len(train_examples), cap=config.stage.max_steps)
    log.info("schedule", extra=schedule.__dict__)
    ds = None
    deepspeed_spec = spec["distributed"]["deepspeed"]
    zero_init = None
    if deepspeed_spec["enabled"]:
        from transformers import AutoConfig

        ds = ds_config.deepspeed_config(
            world_size=dist.world_size, per_device_batch=schedule.per_device_batch, grad_accum=schedule.grad_accum,
            zero_stage=deepspeed_spec["zeroStage"], precision=precision, method=method,
            offload_optimizer=deepspeed_spec["offloadOptimizer"], offload_params=deepspeed_spec["offloadParams"],
            max_grad_norm=training["maxGradNorm"],
            hidden_size=getattr(AutoConfig.from_pretrained(model_dir), "hidden_size", None),
            accelerator=dist.device.type)
        if ds_config.use_zero_init(zero_stage=deepspeed_spec["zeroStage"], method=method):
            # Held while loading: weights are partitioned as they load, so no rank ever holds the whole
            # base model (8 ranks x a 70B model would not fit in one node's memory otherwise).
            zero_init = distributed.hf_deepspeed_config(ds)
    model = modeling.load_model(model_dir, spec, precision=precision, num_labels=len(label_ids or {}) or None,
                                label_ids=label_ids, device=dist.device)
    if task == "SequenceClassification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model, freeze = modeling.prepare(model, spec, gradient_checkpointing=training["gradientCheckpointing"])
    if method != "QLoRA" and ds is None:  # DeepSpeed places (and partitions) the module itself
        model.to(dist.device)
    trainable, total = modeling.trainable_parameters(model)
    log.info("model ready", extra={"method": method, "precision": precision, "trainable": trainable, "total": total,
                                   "zeroInit": zero_init is not None})
    if freeze is not None:  # every block may thaw later; AdamW skips parameters without gradients
        params = [p for p in model.parameters() if p.dtype.is_floating_point]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training["learningRate"], weight_decay=training["weightDecay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(training["scheduler"]["type"], schedule.warmup_steps, schedule.total_steps))
    use_scaler = precision == "fp16" and ds is None
    engine = Engine(model, optimizer, scheduler, dist, ds, training["maxGradNorm"], schedule.grad_accum,
                    torch.amp.GradScaler(dist.device.type) if use_scaler else None,
                    {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if method != "QLoRA" else None)
    del zero_init  # the engine owns the partitioned model now
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pack = bool(training["packing"]) and task == "CausalLM"

    def run_eval() -> Evaluation:
        return evaluate(engine, val_examples, task=task, batch_size=schedule.per_device_batch, pad_id=pad_id,
                        pack=pack)

    # 3. resume, or evaluate the base model first (the baseline) ----------------------------------------
    state = TrainerState()
    resumed = _resume(engine, out_store, prefix, work_dir, dist)
    if resumed is not None:
        state = resumed
        if freeze is not None and state.trainable_blocks is not None:
            freeze.set_trainable(state.trainable_blocks)
            engine.parameters_changed()
        log.info("resumed from checkpoint", extra={"step": state.step, "epoch": state.epoch})
    elif config.stage.baseline_metrics is not None:
        state.baseline = dict(config.stage.baseline_metrics)  # the separate baseline job measured it
        progress.update(force=True, baselineMetrics=state.baseline)
    elif val_examples and (spec.get("baseline") or {}).get("enabled", True):
        progress.update(stage="baseline", force=True)
        baseline_eval = run_eval()
        state.baseline = baseline_eval.metrics
        log.info("baseline", extra={"metrics": state.baseline})
        progress.update(force=True, evalMetrics=state.baseline, baselineMetrics=state.baseline)
        tracker.log({f"baseline_{k}": v for k, v in state.baseline.items()}, step=0)
        if config.stage.kind == jobconfig.STAGE_BASELINE:
            return _finish_stage(config, dist, out_store, progress, {
                "metrics": state.baseline, "examples": {"validation": len(val_examples)},
                "seconds": round(time.monotonic() - started, 1)})
    if config.stage.kind == jobconfig.STAGE_BASELINE:
        raise BadInput("the baseline cannot be evaluated: the validation split is empty")

    # 4. one smoke step on one batch: shapes, memory and a finite loss before the long run -----------------
    order = text.batch_order([len(e.input_ids) for e in train_examples], schedule.per_device_batch,
                             training["seed"], group_by_length=not pack)
    smoke = text.make_batch([train_examples[i] for i in order[0]], pack=pack, pad_id=pad_id, torch=torch)
    if engine.deepspeed is None:
        smoke_loss = engine.forward(smoke.tensors).loss
        engine.backward(smoke_loss)
        engine.zero_grad()
    else:
        # Forward only: a backward outside the engine's own step would leave gradients in ZeRO's
        # partitioned buffers and leak them into the first real step.
        with torch.no_grad():
            smoke_loss = engine.forward(smoke.tensors).loss
    if not torch.isfinite(smoke_loss):
        raise TrainingHalted("NonFiniteLoss", f"the smoke step's loss is {float(smoke_loss)} before any update")
    log.info("smoke step passed", extra={"loss": float(smoke_loss.detach())})

    # 5. training ------------------------------------------------------------------------------------
    stop_reason = _train(engine, state, schedule, train_examples, training, freeze, pack, pad_id, progress,
                         out_store, prefix, work_dir, dist, run_eval, tracker)
    log.info("training finished", extra={"step": state.step, "reason": stop_reason})
    if engine.best_weights is not None and state.best_step != state.step:
        # Early stopping publishes the best evaluation's weights, not the last (as load_best_model_at_end).
        engine.restore_best()
        stop_reason += f"; restored the weights of step {state.best_step} (best {state.best_metric:.6g})"
        log.info("restored the best weights", extra={"step": state.best_step, "metric": state.best_metric})

    # 6. final evaluation and publishing -------------------------------------------------------------
    progress.update(stage="evaluating", force=True)
    final = run_eval() if val_examples else Evaluation({}, [], [])
    tracker.log({f"final_{k}": v for k, v in final.metrics.items()}, step=state.step)
    if config.stage.kind == jobconfig.STAGE_TRIAL:
        lora = spec["method"].get("lora") or {}
        return _finish_stage(config, dist, out_store, progress, {
            "rank": lora.get("rank"), "alpha": lora.get("alpha"), "metrics": final.metrics,
            "examples": {"train": len(train_examples), "holdout": len(val_examples)},
            "steps": state.step, "stopReason": stop_reason, "trainSeconds": round(state.train_seconds, 3),
            "seconds": round(time.monotonic() - started, 1), "history": state.history[-200:]})
    evaluations = None
    if eval_sets:
        evaluations = _evaluate_sets(config, engine, eval_sets, reference, list(loaded.labels), model_dir,
                                     precision=precision, zero3=ds if engine.deepspeed is not None
                                     and deepspeed_spec["zeroStage"] == 3 else None,
                                     batch_size=schedule.per_device_batch, pad_id=pad_id, pack=pack,
                                     progress=progress, tracker=tracker, step=state.step)
    adapter_state = gather_adapter_state(engine, spec)
    document: dict = {}
    if dist.is_main:
        progress.update(stage="publishing", force=True, evalMetrics=final.metrics,
                        evalLoss=final.metrics.get("eval_loss"))
        document = _publish(config, engine, tokenizer, model_dir, loaded, val_examples, final, state, schedule,
                            token_stats, precision, stop_reason, out_store, work_dir, time.monotonic() - started,
                            adapter_state=adapter_state, evaluations=evaluations, reference=reference)
        progress.update(stage="done", force=True, step=state.step)
    distributed.barrier()
    return document


def _score(model, eval_set: evalsets.EvalSet, labels: list[str], *, task: str, batch_size: int, pad_id: int,
           pack: bool) -> dict:
    """One model on one set: the validation metrics; for classification on label names, unknown labels
    counted (wrong predictions, not in eval_loss)."""
    examples = evalsets.relabel(eval_set, labels)
    evaluation = evaluate(model, examples, task=task, batch_size=batch_size, pad_id=pad_id, pack=pack)
    if task != "SequenceClassification":
        return evaluation.metrics
    predicted = [labels[i] for i in evaluation.predictions]
    loss = evaluation.metrics["eval_loss"] if evaluation.scored else None
    return evalsets.classification_scores(predicted, eval_set.gold, loss, labels)


def _evaluate_sets(config: JobConfig, engine: Engine, eval_sets: list[evalsets.EvalSet],
                   reference: evalsets.Reference | None, labels: list[str], model_dir: Path, *, precision: str,
                   zero3: dict | None, batch_size: int, pad_id: int, pack: bool, progress, tracker,
                   step: int) -> dict:
    """manifest["evaluations"]: the trained model, then the reference (loaded, scored, freed), on every set.

    On every rank, like the final evaluation (under ZeRO-3 each forward is a collective); rank 0 publishes.
    """
    spec = config.spec
    task = spec["task"]
    common = {"task": task, "batch_size": batch_size, "pad_id": pad_id, "pack": pack}
    results = {s.name: {"uri": s.uri, "digest": s.digest, "examples": len(s.examples)} for s in eval_sets}
    for eval_set in eval_sets:
        log.info("evaluating set", extra={"set": eval_set.name, "model": "candidate",
                                          "examples": len(eval_set.examples)})
        progress.update(stage="evaluating", force=True, evaluationSet=eval_set.name)
        results[eval_set.name]["candidate"] = _score(engine, eval_set, labels, **common)
        log.info("evaluated set", extra={"set": eval_set.name, "model": "candidate",
                                         "metrics": results[eval_set.name]["candidate"]})
    if reference is not None:
        if engine.deepspeed is None:
            engine.optimizer.state.clear()  # training is over: room for the reference next to the candidate
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("loading the reference adapter", extra={"manifest": reference.manifest_uri,
                                                         "digest": reference.digest})
        model = evalsets.load_reference_model(reference, model_dir, spec, precision=precision,
                                               device=engine.dist.device, zero3=zero3)
        if task == "SequenceClassification" and model.config.pad_token_id is None:
            model.config.pad_token_id = pad_id
        scorer = Scorer(model, engine.dist, zero3, engine.autocast_dtype, quantized=spec["method"]["type"] == "QLoRA")
        try:
            for eval_set in eval_sets:
                log.info("evaluating set", extra={"set": eval_set.name, "model": "reference",
                                                  "examples": len(eval_set.examples)})
                progress.update(stage="evaluating", force=True, evaluationSet=f"{eval_set.name} (reference)")
                results[eval_set.name]["reference"] = _score(scorer, eval_set, reference.labels, **common)
                log.info("evaluated set", extra={"set": eval_set.name, "model": "reference",
                                                 "metrics": results[eval_set.name]["reference"]})
        finally:
            del scorer, model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    tracker.log({f"set_{name}_{who}_{k}": v for name, result in results.items()
                 for who in ("candidate", "reference") for k, v in result.get(who, {}).items()}, step=step)
    return results


def _finish_stage(config: JobConfig, dist, store, progress, fields: dict) -> dict:
    """A baseline or trial stage ends with its result.json (written last: its presence means done)."""
    document = {"api": jobconfig.STAGE_RESULT_API, "kind": config.stage.kind,
                "job": {"namespace": config.job.namespace, "name": config.job.name, "uid": config.job.uid},
                "createdAt": storage.now_rfc3339(), **fields}
    if dist.is_main:
        store.write(config.storage.result_uri, json.dumps(document, sort_keys=True).encode())
        progress.update(stage="done", force=True)
        log.info("stage finished", extra={"stage": config.stage.kind, "rank": config.stage.rank,
                                          "metrics": fields.get("metrics"), "result": config.storage.result_uri})
    distributed.barrier()
    return document


def _resume(engine: Engine, store, prefix: str, work_dir: Path, dist) -> TrainerState | None:
    pointer = storage.latest_checkpoint(store, prefix)
    if pointer is None:
        return None
    local = work_dir / "resume" / f"step-{pointer['step']}"
    if dist.local_rank == 0:
        count = storage.download_prefix(store, pointer["path"], local)
        log.info("downloaded checkpoint", extra={"step": pointer["step"], "files": count})
    distributed.barrier()
    return engine.load(local)


def _checkpoint(engine: Engine, state: TrainerState, store, prefix: str, work_dir: Path, dist) -> None:
    local = work_dir / "checkpoints" / f"step-{state.step}"
    engine.save(local, state)
    distributed.barrier()
    if dist.local_rank == 0:  # one uploader per pod; each pod holds its own ranks' shards
        count = storage.upload_dir(store, local, storage_layout.checkpoint_prefix(prefix, state.step))
        log.info("checkpoint uploaded", extra={"step": state.step, "files": count})
    distributed.barrier()
    if dist.is_main:
        storage.mark_latest_checkpoint(store, prefix, state.step)


def _train(engine: Engine, state: TrainerState, schedule: Schedule, examples, training: dict, freeze, pack: bool,
           pad_id: int, progress, store, prefix: str, work_dir: Path, dist, run_eval, tracker) -> str:
    stopping = training.get("earlyStopping")
    watch = (stopping or {}).get("metric", "eval_loss")
    lengths = [len(e.input_ids) for e in examples]
    recent: list[float] = []
    window_start, window_tokens, start_step = time.monotonic(), 0, state.step
    engine.train(True)
    while state.step < schedule.total_steps:
        batches = text.batch_order(lengths, schedule.per_device_batch, training["seed"] + state.epoch,
                                   group_by_length=not pack)
        mine = batches[dist.rank::dist.world_size][: schedule.micro_batches_per_epoch]
        step_losses: list[float] = []
        while state.micro_in_epoch < len(mine) and state.step < schedule.total_steps:
            micro_started = time.monotonic()
            engine.monitor_layers = (state.step + 1) % schedule.eval_every == 0
            batch = text.make_batch([examples[i] for i in mine[state.micro_in_epoch]], pack=pack, pad_id=pad_id,
                                    torch=torch)
            loss = engine.forward(batch.tensors).loss
            value = float(distributed.all_reduce_mean(loss.detach().float()))
            if not math.isfinite(value):  # before backward: a NaN must never reach the weights
                raise TrainingHalted(*metrics.loss_guard(state.step + 1, value, []))
            engine.backward(loss)
            state.micro_in_epoch += 1
            boundary = state.micro_in_epoch % schedule.grad_accum == 0 or state.micro_in_epoch == len(mine)
            engine.micro_step(boundary)
            step_losses.append(value)
            state.real_tokens += batch.real_tokens * dist.world_size
            state.padding_tokens += (batch.total_tokens - batch.real_tokens) * dist.world_size
            window_tokens += batch.real_tokens * dist.world_size
            state.train_seconds += time.monotonic() - micro_started
            if not boundary:
                continue
            state.step += 1
            step_loss = sum(step_losses) / len(step_losses)
            step_losses = []
            halt = metrics.loss_guard(state.step, step_loss, recent)
            if halt:
                raise TrainingHalted(*halt)
            recent = [*recent, step_loss][-metrics.SPIKE_WINDOW:]
            elapsed = max(time.monotonic() - window_start, 1e-9)
            tokens_per_second = window_tokens / elapsed
            remaining = schedule.total_steps - state.step
            state.history.append({"step": state.step, "trainLoss": step_loss, "lr": engine.lr(),
                                  "gradNorm": engine.last_grad_norm})
            tracker.log({**state.history[-1], "tokensPerSecond": tokens_per_second}, step=state.step)
            progress.update(stage="training", step=state.step, totalSteps=schedule.total_steps,
                            epoch=state.epoch + state.micro_in_epoch / len(mine), trainLoss=step_loss,
                            tokensPerSecond=tokens_per_second,
                            etaSeconds=int(remaining * elapsed / max(1, state.step - start_step)))
            if state.step % schedule.eval_every == 0 or state.step == schedule.total_steps:
                logged = len(state.history)
                stop = _evaluate_and_decide(engine, state, stopping, watch, freeze, progress, run_eval)
                for entry in state.history[logged:]:  # the evaluation, and a thaw if one happened
                    tracker.log(entry, step=state.step)
                if stop:
                    return stop
            if state.step % schedule.checkpoint_every == 0 and state.step < schedule.total_steps:
                _checkpoint(engine, state, store, prefix, work_dir, dist)
        if state.micro_in_epoch >= len(mine):
            state.epoch += 1
            state.micro_in_epoch = 0
    return "completed"


def _evaluate_and_decide(engine, state: TrainerState, stopping, watch: str, freeze, progress,
                         run_eval) -> str | None:
    evaluation = run_eval()
    result = evaluation.metrics
    if watch not in result:  # e.g. accuracy asked of a causal LM: the loss is what there is
        watch = "eval_loss"
    monitor = {}
    ratios = modeling.lora_to_base_ratios(engine.module)
    if ratios:  # how far each adapted layer has moved from its base weights
        top = max(ratios, key=ratios.get)
        monitor |= {"loraToBaseMax": ratios[top], "loraToBaseMean": sum(ratios.values()) / len(ratios),
                    "loraToBaseTopLayer": top}
    norms = engine.layer_grad_norms
    if norms:  # per-layer gradient norms of the step before this evaluation
        top = max(norms, key=norms.get)
        monitor |= {"layerGradNormMax": norms[top], "layerGradNormMean": sum(norms.values()) / len(norms),
                    "layerGradNormTopLayer": top}
    state.history.append({"step": state.step, **result, **monitor})
    log.info("evaluation", extra={"step": state.step, "metrics": result, "gradNorm": engine.last_grad_norm,
                                  **monitor})
    progress.update(force=True, evalLoss=result.get("eval_loss"), evalMetrics=result)
    value = result.get(watch, result.get("eval_loss"))
    decision = metrics.after_evaluation(
        value, metric=watch, best=state.best_metric, stale=state.evals_without_improvement,
        plateau=state.plateau_evals, stop_patience=(stopping or {}).get("patience"),
        stop_min_delta=(stopping or {}).get("minDelta", 0.0), thaw_patience=freeze.patience if freeze else None,
        thaw_min_delta=freeze.min_delta if freeze else 0.0, can_thaw=bool(freeze and freeze.can_thaw))
    if stopping and engine.can_keep_best and decision.best is not None and decision.best != state.best_metric:
        engine.remember_best()
        state.best_step = state.step
    state.best_metric, state.evals_without_improvement, state.plateau_evals = (
        decision.best, decision.stale, decision.plateau)
    if decision.thaw:
        freeze.thaw()
        state.trainable_blocks = freeze.trainable
        engine.parameters_changed()
        state.history.append({"step": state.step, "thawedBlocks": freeze.trainable})
        log.info("plateau: thawed more blocks", extra={"trainableBlocks": freeze.trainable, "step": state.step})
    if decision.stop:
        return f"early stopping: {watch} did not improve for {stopping['patience']} evaluations"
    return None


# --- publishing ----------------------------------------------------------------------------------------


def gather_adapter_state(engine: Engine, spec: dict) -> dict | None:
    """Under DeepSpeed, the weights to save, whole on rank 0. A collective (ZeRO-3 gathers the partitioned
    tensors): every rank calls it, before rank 0 alone publishes. None without DeepSpeed (saved as they are)."""
    if engine.deepspeed is None:
        return None
    # ZeRO-3 prefetching can leave parameters in flight after the last forward (seen with a LoRA above the
    # persistence threshold on a classifier); gathering would then fail. Release them all first.
    engine.deepspeed.empty_partition_cache()
    # The module's own keys: PeftModel.save_pretrained applies get_peft_model_state_dict itself (twice
    # breaks modules_to_save, the classification head).
    return distributed.gathered_trainable_state_dict(engine.deepspeed, peft_keys=False,
                                                     only_trainable=spec["method"]["type"] in ("LoRA", "QLoRA"))


def _save_adapter(engine: Engine, tokenizer, model_dir: Path, spec: dict, target: Path, labels: list[str],
                  state_dict: dict | None) -> None:
    method = spec["method"]["type"]
    model = engine.module
    target.mkdir(parents=True, exist_ok=True)
    if method in ("LoRA", "QLoRA"):
        model.save_pretrained(target, state_dict=state_dict)
    else:
        model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(target)
    if labels and spec["task"] == "SequenceClassification":
        # the serving engine needs the class names in id order to size the head and name its predictions
        (target / LABELS_FILE).write_text(json.dumps({"labels": list(labels)}))
    _refuse_empty_tensors(target)
    if spec["output"].get("mergeAdapter") and method in ("LoRA", "QLoRA"):
        _merge(model_dir, target, spec, target / "merged", labels)


def _refuse_empty_tensors(directory: Path) -> None:
    from safetensors import safe_open

    tensors = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                shape = handle.get_slice(key).get_shape()
                if not shape or math.prod(shape) == 0:
                    raise RuntimeError(f"refusing to publish: tensor {key} in {path.name} is empty {shape}")
                tensors += 1
    if tensors == 0:
        raise RuntimeError(f"refusing to publish: no tensors were saved in {directory}")


def _merge(model_dir: Path, adapter_dir: Path, spec: dict, target: Path, labels: list[str]) -> None:
    """Merge into a bf16 (or fp32 on CPU) copy of the base: never into 4-bit weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    cls = AutoModelForSequenceClassification if spec["task"] == "SequenceClassification" else AutoModelForCausalLM
    kwargs = {"num_labels": len(labels)} if spec["task"] == "SequenceClassification" else {}
    base = cls.from_pretrained(model_dir, dtype=dtype, **kwargs)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)


def input_text(fields: dict) -> str:
    """What a user sends (for the vocabulary of the drift profile): never the completion."""
    if "messages" in fields:
        return " ".join(m["content"] for m in fields["messages"] if m["role"] != "assistant")
    return fields.get("prompt") or fields.get("text") or ""


def _publish(config: JobConfig, engine: Engine, tokenizer, model_dir: Path, loaded, val_examples, final: Evaluation,
             state: TrainerState, schedule: Schedule, token_stats: dict, precision: str, stop_reason: str, store,
             work_dir: Path, seconds: float, adapter_state: dict | None = None, evaluations: dict | None = None,
             reference: evalsets.Reference | None = None) -> dict:
    import peft
    import transformers

    spec = config.spec
    adapter_dir = Path(tempfile.mkdtemp(prefix="adapter-", dir=work_dir))
    _save_adapter(engine, tokenizer, model_dir, spec, adapter_dir, list(loaded.labels), adapter_state)
    kind = "classification" if spec["task"] == "SequenceClassification" else "causal-lm"
    profile = metrics.drift_profile(
        input_lengths=[len(e.input_ids) for e in val_examples],
        texts=[input_text(r.fields) for r in loaded.train],
        confidences=final.confidences, entropies=final.entropies, kind=kind)
    padding = state.padding_tokens / max(1, state.padding_tokens + state.real_tokens)
    fields = {
        "job": {"namespace": config.job.namespace, "name": config.job.name, "uid": config.job.uid},
        "task": spec["task"],
        "method": spec["method"]["type"],
        "rank": spec["method"].get("lora", {}).get("rank"),
        "labels": list(loaded.labels) if spec["task"] == "SequenceClassification" else None,
        "baseModel": {"uri": spec["baseModel"]["uri"], "revision": spec["baseModel"].get("revision")},
        "dataset": {"uri": spec["dataset"]["uri"], "validationUri": spec["dataset"].get("validationUri"),
                    "format": spec["dataset"]["format"], "digest": loaded.digest,
                    "trainExamples": len(loaded.train), "validationExamples": len(loaded.validation),
                    "tokens": token_stats, "leakage": len(loaded.leakage)},
        "config": spec,
        "metrics": final.metrics,
        "baselineMetrics": state.baseline,
        "training": {"steps": state.step, "stopReason": stop_reason, "bestStep": state.best_step,
                     "precision": precision,
                     "schedule": schedule.__dict__, "paddingFraction": padding, "realTokens": state.real_tokens,
                     "trainSeconds": round(state.train_seconds, 3),
                     "realTokensPerSecond": state.real_tokens / max(state.train_seconds, 1e-9),
                     "seconds": round(seconds, 1), "history": metrics.bounded_history(state.history)},
        "trainer": {"version": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__},
        "driftProfile": profile,
    }
    if evaluations is not None:  # spec.evaluation: every set scored for this adapter (and the reference)
        fields["evaluations"] = evaluations
    if reference is not None:
        fields["evaluationReference"] = {"manifestUri": reference.manifest_uri, "digest": reference.digest}
    document = publish_adapter(store, adapter_dir, config.storage.job_prefix, fields)
    log.info("adapter published", extra={"digest": document["digest"], "files": len(document["files"]),
                                         "manifest": config.storage.manifest_uri})
    return document
