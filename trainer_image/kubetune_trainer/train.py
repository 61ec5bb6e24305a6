"""One fine-tuning run, top to bottom: the recipe every process of a torchrun launch follows.

load inputs ─▶ build model + method ─▶ resume or baseline ─▶ smoke step ─▶ train ─▶ finish (final eval,
evaluation sets, publish on rank 0). The run's state lives on one `TrainingRun`; stepping, evaluation,
checkpoints and publishing have their own modules, and pure decisions (metrics, DeepSpeed config) theirs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kubetune.api import jobconfig, training_defaults
from kubetune.api.jobconfig import JobConfig
from kubetune.clients.storage import ObjectStore

from . import answers, data, distributed, ds_config, evalsets, metrics, modeling, pooling, storage, text, tracking
from .checkpoints import CheckpointUploads, TrainerState, abandon_uploads, resume, save_checkpoint, settle_uploads
from .evaluation import Evaluation, evaluate, evaluate_sets
from .inputs import fetch_reference, load_data, load_evaluation_sets, prepare_data, resolve_base_model
from .methods import TrainingMethod, method_of
from .methods.freeze_thaw import Thawing
from .modeling import BadInput
from .publishing import finish_stage, gather_adapter_state, publish
from .step_runner import StepRunner
from .sweep import run_sweep

log = logging.getLogger(__name__)


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
        """`cap` bounds the steps; warmup and evaluation follow the cap."""
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
class TrainingRun:
    """Everything one process knows about its run, filled in step by step by the recipe."""

    config: JobConfig
    dist: distributed.DistInfo
    work_dir: Path
    tracker: tracking.Tracker
    store: ObjectStore  # the output store: progress, checkpoints, the published adapter
    progress: storage.ProgressWriter
    method: TrainingMethod
    started: float = field(default_factory=time.monotonic)
    # inputs
    loaded: data.LoadedData | None = None
    model_dir: Path | None = None
    tokenizer: object = None
    label_ids: dict | None = None
    train_examples: list[text.Example] = field(default_factory=list)
    val_examples: list[text.Example] = field(default_factory=list)
    token_stats: dict = field(default_factory=dict)
    eval_sets: list[evalsets.EvalSet] = field(default_factory=list)
    reference: evalsets.Reference | None = None
    # model
    precision: str = "fp32"
    schedule: Schedule | None = None
    deepspeed_config: dict | None = None  # None without DeepSpeed
    runner: StepRunner | None = None
    thawing: Thawing | None = None
    pad_id: int = 0
    pack: bool = False
    head: dict | None = None  # classification: how the head pools (pooling.prepare_head), for the manifest
    derived_defaults: dict = field(default_factory=dict)  # training settings derived, and why
    # progress
    state: TrainerState = field(default_factory=TrainerState)
    uploads: CheckpointUploads = field(default_factory=CheckpointUploads)
    stop_reason: str = ""
    # (step, result) of the latest in-loop evaluation; cleared when other weights are restored. The final
    # validation of those same weights reuses it instead of scoring the split twice.
    last_evaluation: tuple[int, Evaluation] | None = None

    @property
    def spec(self) -> dict:
        return self.config.spec

    @property
    def prefix(self) -> str:
        return self.config.storage.job_prefix

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def validate(self) -> Evaluation:
        return evaluate(self.runner, self.val_examples, task=self.spec["task"],
                        batch_size=self.schedule.per_device_batch, pad_id=self.pad_id, pack=self.pack)


# --- the recipe ----------------------------------------------------------------------------------------


def run(config: JobConfig, *, work_dir: Path) -> dict:
    """Train and publish. Returns the manifest document (on rank 0; other ranks get {})."""
    work_dir.mkdir(parents=True, exist_ok=True)
    dist = distributed.init_process_group()
    tracker = tracking.Tracker(config, storage.output_store_from_env(config.spec), enabled=dist.is_main)
    status = "FAILED"
    try:
        document = _run(config, dist, work_dir, tracker)
        status = "FINISHED"
        return document
    finally:
        tracker.finish(status)
        distributed.cleanup()


def _run(config: JobConfig, dist, work_dir: Path, tracker: tracking.Tracker) -> dict:
    seed = config.spec["training"]["seed"]
    random.seed(seed)
    torch.manual_seed(seed)
    store = storage.output_store_from_env(config.spec)
    progress = storage.ProgressWriter(store, config.storage.job_prefix, enabled=dist.is_main)
    run = TrainingRun(config, dist, work_dir, tracker, store, progress, method_of(config.spec))
    load_inputs(run)
    if config.stage.kind == jobconfig.STAGE_SWEEP:
        return run_sweep(run)
    build_model(run)
    stage_result = resume_or_baseline(run)
    if stage_result is not None:
        return stage_result
    smoke_step(run)
    try:
        run.stop_reason = train(run)
    except TrainingHalted as halt:
        # Every rank halts at the same micro-step (the guarded loss is all-reduced). Rank 0 records why
        # before any rank exits: the launcher stops the other workers as soon as one exits, which could
        # cut rank 0 off before the entrypoint records it.
        abandon_uploads(run)
        run.progress.update(force=True, stage="failed", failure={"reason": halt.reason, "message": str(halt)})
        distributed.barrier()
        raise
    except BaseException:
        abandon_uploads(run)
        raise
    settle_uploads(run)  # the last checkpoint uploaded (and marked) before anything is published
    log.info("training finished", extra={"step": run.state.step, "reason": run.stop_reason})
    restore_best_weights(run)
    return finish(run)


def load_inputs(run: TrainingRun) -> None:
    """Data validated before the model is even loaded; evaluation sets and reference checked now (a bad
    one fails in seconds), scored after training. Only the training stage publishes, so only it loads them."""
    from transformers import AutoTokenizer

    config, spec = run.config, run.spec
    run.loaded = load_data(config, run.progress, run.work_dir / "cache")
    run.progress.update(stage="loading", force=True)
    run.model_dir = resolve_base_model(spec, run.dist, run.work_dir / "cache")
    run.tokenizer = tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    causal = spec["task"] == "CausalLM"
    pad_note = text.choose_pad_token(tokenizer) if causal else "classification: the tokenizer's pad"
    run.label_ids, run.train_examples, run.val_examples, run.token_stats = prepare_data(config, run.loaded, tokenizer)
    # Settings left out of the spec are derived from the task and the data, once, for every later stage.
    spec["training"], run.derived_defaults = training_defaults.resolve(
        spec["training"], task=spec["task"], method=spec["method"]["type"],
        train_examples=len(run.train_examples), world_size=run.dist.world_size)
    dropout, why = training_defaults.lora_dropout(spec["method"], spec["training"],
                                                  train_examples=len(run.train_examples),
                                                  world_size=run.dist.world_size)
    if why:
        spec["method"]["lora"] = {**spec["method"].get("lora", {}), "dropout": dropout}
        run.derived_defaults[training_defaults.LORA_DROPOUT_KEY] = why
    if run.derived_defaults:
        log.info("derived training defaults", extra={"derived": {k: training_defaults.derived_value(spec, k)
                                                                 for k in run.derived_defaults}})
    log.info("dataset report", extra={"summary": run.loaded.summary()})
    log.info("data ready", extra={"train": len(run.train_examples), "validation": len(run.val_examples),
                                  "truncated": run.token_stats["train"]["truncated"], "pad": pad_note})
    if config.stage.kind == jobconfig.STAGE_TRAIN and spec.get("evaluation"):
        run.eval_sets = load_evaluation_sets(config, run.loaded, tokenizer, run.work_dir / "cache")
        run.reference = fetch_reference(config, run.store, run.dist, run.work_dir)
    run.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pack, why = training_defaults.packing(spec["training"], run.dist.device.type)
    if why and causal:
        spec["training"]["packing"] = pack
        run.derived_defaults["packing"] = why
    run.pack = pack and causal


def build_model(run: TrainingRun) -> None:
    """The base model, prepared by the method, behind a StepRunner with its optimizer and LR schedule."""
    spec, training, dist = run.spec, run.spec["training"], run.dist
    run.precision = modeling.pick_precision(training["precision"], dist.device)
    run.schedule = Schedule.from_spec(training, dist.world_size, len(run.train_examples))
    log.info("schedule", extra=run.schedule.__dict__)
    run.deepspeed_config = _make_deepspeed_config(run)
    zero_stage = spec["distributed"]["deepspeed"]["zeroStage"]
    zero_init = None
    if run.deepspeed_config is not None and ds_config.use_zero_init(zero_stage=zero_stage, method=run.method.name):
        # Held while loading: weights are partitioned as they load, so no rank ever holds the whole
        # base model (8 ranks x a 70B model would not fit in one node's memory otherwise).
        zero_init = distributed.hf_deepspeed_config(run.deepspeed_config)
    model = modeling.load_model(run.model_dir, spec, precision=run.precision,
                                num_labels=len(run.label_ids or {}) or None, label_ids=run.label_ids,
                                device=dist.device)
    if spec["task"] == "SequenceClassification":
        if model.config.pad_token_id is None:
            model.config.pad_token_id = run.tokenizer.pad_token_id
        run.head = pooling.prepare_head(model, run.model_dir, (spec.get("classifier") or {}).get("pooling", "Auto"))
    checkpointing, why = training_defaults.gradient_checkpointing(training, modeling.trainable_parameters(model)[1])
    if why:
        training["gradientCheckpointing"] = checkpointing
        run.derived_defaults["gradientCheckpointing"] = why
    model, run.thawing = run.method.prepare(model, spec, gradient_checkpointing=checkpointing)
    if not run.method.quantized and run.deepspeed_config is None:  # DeepSpeed places (and partitions) it itself
        model.to(dist.device)
    trainable, total = modeling.trainable_parameters(model)
    log.info("model ready", extra={"method": run.method.name, "precision": run.precision, "trainable": trainable,
                                   "total": total, "zeroInit": zero_init is not None})
    run.runner = _step_runner(run, model)
    del zero_init  # the runner owns the partitioned model now


def _make_deepspeed_config(run: TrainingRun) -> dict | None:
    deepspeed_spec = run.spec["distributed"]["deepspeed"]
    if not deepspeed_spec["enabled"]:
        return None
    from transformers import AutoConfig

    return ds_config.deepspeed_config(
        world_size=run.dist.world_size, per_device_batch=run.schedule.per_device_batch,
        grad_accum=run.schedule.grad_accum, zero_stage=deepspeed_spec["zeroStage"], precision=run.precision,
        method=run.method.name, offload_optimizer=deepspeed_spec["offloadOptimizer"],
        offload_params=deepspeed_spec["offloadParams"], max_grad_norm=run.spec["training"]["maxGradNorm"],
        hidden_size=getattr(AutoConfig.from_pretrained(run.model_dir), "hidden_size", None),
        accelerator=run.dist.device.type)


def _step_runner(run: TrainingRun, model) -> StepRunner:
    training, schedule, precision = run.spec["training"], run.schedule, run.precision
    groups = modeling.optimizer_groups(model, run.method.optimizer_parameters(model), training["learningRate"],
                                       training.get("headLearningRate"))
    optimizer = torch.optim.AdamW(groups, lr=training["learningRate"], weight_decay=training["weightDecay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(training["scheduler"]["type"], schedule.warmup_steps, schedule.total_steps))
    use_scaler = precision == "fp16" and run.deepspeed_config is None
    # a quantized base computes in its own compute dtype: no autocast around it
    autocast = None if run.method.quantized else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return StepRunner(model, optimizer, scheduler, run.dist, run.deepspeed_config, training["maxGradNorm"],
                      schedule.grad_accum, torch.amp.GradScaler(run.dist.device.type) if use_scaler else None,
                      autocast)


def resume_or_baseline(run: TrainingRun) -> dict | None:
    """Resume from the latest checkpoint, or evaluate the base model first (the baseline). A baseline
    stage ends here: its result document is returned."""
    config, progress = run.config, run.progress
    resumed = resume(run)
    if resumed is not None:
        run.state = resumed
        if run.thawing is not None and resumed.trainable_blocks is not None:
            run.thawing.set_trainable(resumed.trainable_blocks)
            run.runner.parameters_changed()
        log.info("resumed from checkpoint", extra={"step": resumed.step, "epoch": resumed.epoch})
    elif config.stage.baseline_metrics is not None:
        run.state.baseline = dict(config.stage.baseline_metrics)  # the separate baseline job measured it
        progress.update(force=True, baselineMetrics=run.state.baseline)
    elif run.val_examples and (run.spec.get("baseline") or {}).get("enabled", True):
        progress.update(stage="baseline", force=True)
        baseline = run.state.baseline = run.validate().metrics
        log.info("baseline", extra={"metrics": baseline})
        progress.update(force=True, evalMetrics=baseline, baselineMetrics=baseline)
        run.tracker.log({f"baseline_{k}": v for k, v in baseline.items()}, step=0)
        if config.stage.kind == jobconfig.STAGE_BASELINE:
            return finish_stage(run, {"metrics": baseline, "examples": {"validation": len(run.val_examples)},
                                      "seconds": round(run.seconds(), 1)})
    if config.stage.kind == jobconfig.STAGE_BASELINE:
        raise BadInput("the baseline cannot be evaluated: the validation split is empty")
    return None


def smoke_step(run: TrainingRun) -> None:
    """One step on one batch: shapes, memory and a finite loss before the long run."""
    runner, schedule = run.runner, run.schedule
    order = text.batch_order([len(e.input_ids) for e in run.train_examples], schedule.per_device_batch,
                             run.spec["training"]["seed"], group_by_length=not run.pack)
    smoke = text.make_batch([run.train_examples[i] for i in order[0]], pack=run.pack, pad_id=run.pad_id,
                            torch=torch)
    if runner.deepspeed is None:
        smoke_loss = runner.forward(smoke.tensors).loss
        runner.backward(smoke_loss)
        runner.zero_grad()
    else:
        # Forward only: a backward outside the engine's own step would leave gradients in ZeRO's
        # partitioned buffers and leak them into the first real step.
        with torch.no_grad():
            smoke_loss = runner.forward(smoke.tensors).loss
    if not torch.isfinite(smoke_loss):
        raise TrainingHalted("NonFiniteLoss", f"the smoke step's loss is {float(smoke_loss)} before any update")
    log.info("smoke step passed", extra={"loss": float(smoke_loss.detach())})


# --- training ------------------------------------------------------------------------------------------


@dataclass
class _Pace:
    """Since this process began training: throughput and ETA, and the recent step losses (spike guard)."""

    start_step: int
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0
    recent: list[float] = field(default_factory=list)


def train(run: TrainingRun) -> str:
    """Optimizer steps until the schedule ends or early stopping; evaluations, thaws and checkpoints on
    the way. Returns why it stopped."""
    state, schedule, dist = run.state, run.schedule, run.dist
    lengths = [len(e.input_ids) for e in run.train_examples]
    pace = _Pace(state.step)
    run.runner.train(True)
    while state.step < schedule.total_steps:
        batches = text.batch_order(lengths, schedule.per_device_batch, run.spec["training"]["seed"] + state.epoch,
                                   group_by_length=not run.pack)
        mine = batches[dist.rank::dist.world_size][: schedule.micro_batches_per_epoch]
        step_losses: list[float] = []
        while state.micro_in_epoch < len(mine) and state.step < schedule.total_steps:
            loss, boundary = _micro_step(run, mine, pace)
            step_losses.append(loss)
            if not boundary:
                continue
            _record_step(run, sum(step_losses) / len(step_losses), pace, len(mine))
            step_losses = []
            if state.step % schedule.eval_every == 0 or state.step == schedule.total_steps:
                logged = len(state.history)
                stop = _evaluate_and_decide(run)
                for entry in state.history[logged:]:  # the evaluation, and a thaw if one happened
                    run.tracker.log(entry, step=state.step)
                if stop:
                    return stop
            if state.step % schedule.checkpoint_every == 0 and state.step < schedule.total_steps:
                save_checkpoint(run)
        if state.micro_in_epoch >= len(mine):
            state.epoch += 1
            state.micro_in_epoch = 0
    return "completed"


def _micro_step(run: TrainingRun, mine: list[list[int]], pace: _Pace) -> tuple[float, bool]:
    """Forward and backward on this rank's next micro-batch; the optimizer steps at an accumulation
    boundary. Returns the loss averaged over the ranks, and whether this was a boundary."""
    state, schedule, runner, world = run.state, run.schedule, run.runner, run.dist.world_size
    micro_started = time.monotonic()
    runner.monitor_layers = (state.step + 1) % schedule.eval_every == 0
    batch = text.make_batch([run.train_examples[i] for i in mine[state.micro_in_epoch]], pack=run.pack,
                            pad_id=run.pad_id, torch=torch)
    loss = runner.forward(batch.tensors).loss
    value = float(distributed.all_reduce_mean(loss.detach().float()))
    if not math.isfinite(value):  # before backward: a NaN must never reach the weights
        raise TrainingHalted(*metrics.loss_guard(state.step + 1, value, []))
    runner.backward(loss)
    state.micro_in_epoch += 1
    boundary = state.micro_in_epoch % schedule.grad_accum == 0 or state.micro_in_epoch == len(mine)
    runner.micro_step(boundary)
    state.real_tokens += batch.real_tokens * world
    state.padding_tokens += (batch.total_tokens - batch.real_tokens) * world
    pace.tokens += batch.real_tokens * world
    state.train_seconds += time.monotonic() - micro_started
    return value, boundary


def _record_step(run: TrainingRun, step_loss: float, pace: _Pace, micro_batches: int) -> None:
    """An optimizer step happened: guard the loss, then history, tracker and progress."""
    state = run.state
    state.step += 1
    halt = metrics.loss_guard(state.step, step_loss, pace.recent)
    if halt:
        raise TrainingHalted(*halt)
    pace.recent = [*pace.recent, step_loss][-metrics.SPIKE_WINDOW:]
    elapsed = max(time.monotonic() - pace.started, 1e-9)
    tokens_per_second = pace.tokens / elapsed
    remaining = run.schedule.total_steps - state.step
    state.history.append({"step": state.step, "trainLoss": step_loss, "lr": run.runner.lr(),
                          "gradNorm": run.runner.last_grad_norm})
    run.tracker.log({**state.history[-1], "tokensPerSecond": tokens_per_second}, step=state.step)
    run.progress.update(stage="training", step=state.step, totalSteps=run.schedule.total_steps,
                        epoch=state.epoch + state.micro_in_epoch / micro_batches, trainLoss=step_loss,
                        tokensPerSecond=tokens_per_second,
                        etaSeconds=int(remaining * elapsed / max(1, state.step - pace.start_step)))


def _evaluate_and_decide(run: TrainingRun) -> str | None:
    """Evaluate, then early stopping and thawing decide; returns a stop reason, or None to go on."""
    state, runner, thawing = run.state, run.runner, run.thawing
    stopping = run.spec["training"].get("earlyStopping")
    evaluation = run.validate()
    run.last_evaluation = (state.step, evaluation)
    result = evaluation.metrics
    watch = (stopping or {}).get("metric", "eval_loss")
    if watch not in result:  # e.g. accuracy asked of a causal LM: the loss is what there is
        watch = "eval_loss"
    monitor = _monitors(runner)
    state.history.append({"step": state.step, **result, **monitor})
    log.info("evaluation", extra={"step": state.step, "metrics": result, "gradNorm": runner.last_grad_norm,
                                  **monitor})
    run.progress.update(force=True, evalLoss=result.get("eval_loss"), evalMetrics=result)
    decision = metrics.after_evaluation(
        result.get(watch, result.get("eval_loss")), metric=watch, best=state.best_metric,
        stale=state.evals_without_improvement, plateau=state.plateau_evals,
        stop_patience=(stopping or {}).get("patience"), stop_min_delta=(stopping or {}).get("minDelta", 0.0),
        thaw_patience=thawing.patience if thawing else None, thaw_min_delta=thawing.min_delta if thawing else 0.0,
        can_thaw=bool(thawing and thawing.can_thaw))
    if stopping and decision.best is not None and decision.best != state.best_metric:
        runner.remember_best()
        state.best_step = state.step
    state.best_metric, state.evals_without_improvement, state.plateau_evals = (
        decision.best, decision.stale, decision.plateau)
    if decision.thaw:
        thawing.thaw()
        state.trainable_blocks = thawing.trainable
        runner.parameters_changed()
        state.history.append({"step": state.step, "thawedBlocks": thawing.trainable})
        log.info("plateau: thawed more blocks", extra={"trainableBlocks": thawing.trainable, "step": state.step})
    if decision.stop:
        return f"early stopping: {watch} did not improve for {stopping['patience']} evaluations"
    return None


def _monitors(runner: StepRunner) -> dict:
    """How far each adapted layer moved from its base, and the per-layer gradient norms of the last step."""
    monitor = {}
    ratios = runner.lora_to_base_ratios()
    if ratios:
        top = max(ratios, key=ratios.get)
        monitor |= {"loraToBaseMax": ratios[top], "loraToBaseMean": sum(ratios.values()) / len(ratios),
                    "loraToBaseTopLayer": top}
    norms = runner.layer_grad_norms
    if norms:
        top = max(norms, key=norms.get)
        monitor |= {"layerGradNormMax": norms[top], "layerGradNormMean": sum(norms.values()) / len(norms),
                    "layerGradNormTopLayer": top}
    return monitor


def restore_best_weights(run: TrainingRun) -> None:
    """Early stopping publishes the best evaluation's weights, not the last (as load_best_model_at_end)."""
    state, runner = run.state, run.runner
    if runner.best_weights is not None and state.best_step != state.step:
        runner.restore_best()
        run.last_evaluation = None
        run.stop_reason += f"; restored the weights of step {state.best_step} (best {state.best_metric:.6g})"
        log.info("restored the best weights", extra={"step": state.best_step, "metric": state.best_metric})


# --- the end: final evaluation, then a stage result or the published adapter ----------------------------


def finish(run: TrainingRun) -> dict:
    state, progress = run.state, run.progress
    progress.update(stage="evaluating", force=True)
    final = _final_validation(run)
    run.tracker.log({f"final_{k}": v for k, v in final.metrics.items()}, step=state.step)
    evaluations = evaluate_sets(run) if run.eval_sets else None
    reference_answers = answers.measure(run)  # all ranks under ZeRO-3 (collective forwards), else rank 0
    weights = gather_adapter_state(run.runner, only_trainable=run.method.publishes_adapter)
    document: dict = {}
    if run.dist.is_main:
        progress.update(stage="publishing", force=True, evalMetrics=final.metrics,
                        evalLoss=final.metrics.get("eval_loss"))
        document = publish(run, final, weights, evaluations, reference_answers)
        progress.update(stage="done", force=True, step=state.step)
    distributed.barrier()
    return document


def _final_validation(run: TrainingRun) -> Evaluation:
    if not run.val_examples:
        return Evaluation({}, [], [])
    if run.last_evaluation is not None and run.last_evaluation[0] == run.state.step:
        log.info("final validation: the evaluation of this step, same weights", extra={"step": run.state.step})
        return run.last_evaluation[1]
    return run.validate()
