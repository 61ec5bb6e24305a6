"""The rank sweep in one process: successive halving over rank x learning rate on the training holdout.

One base model carries a named PEFT adapter per config (its own rank, classification head and AdamW);
every config trains s0 steps, the better half goes on to 2*s0, ... within rankSweep.budget. The rules
(plan, marking, choice) are kubetune.api.sweep_rules; docs/trainer.md "Rank sweep" explains the design.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from kubetune.api import manifest as manifest_api
from kubetune.api import sweep_rules as rules

from . import distributed, text
from .evaluation import evaluate
from .modeling import BadInput
from .publishing import finish_stage
from .step_runner import StepRunner

log = logging.getLogger(__name__)


@dataclass
class _Trial:
    """One config's adapter, optimizer, position in the data and its row of the table."""

    config: rules.Config
    adapter: str
    runner: StepRunner | None
    schedule: object
    row: dict
    step: int = 0
    epoch: int = 0
    micro: int = 0
    seconds: float = 0.0


@dataclass
class _Sweep:
    run: object  # train.TrainingRun (not imported: train imports this module)
    model: object
    plan: rules.Plan
    base: dict
    classes: int
    trials: list[_Trial] = field(default_factory=list)
    spent: int = 0

    @property
    def rows(self) -> list[dict]:
        return [t.row for t in self.trials]


def run_sweep(run) -> dict:
    """Load the base model once, halve the configs down to one, and write the table as result.json."""
    from .train import Schedule

    spec = run.spec
    if spec["distributed"]["deepspeed"]["enabled"]:
        # the operator turns DeepSpeed off for the sweep workload (stages.sweep_spec): a config asking for it
        # here was written by hand
        raise BadInput("the rank sweep cannot run under distributed.deepspeed: DeepSpeed owns one optimizer "
                       "per model and the sweep trains one per config")
    sweep_spec = spec["rankSweep"]
    full_steps = Schedule.from_spec(spec["training"], run.dist.world_size,
                                    len(run.train_examples) + len(run.val_examples)).total_steps
    configs = rules.configs(spec)
    the_plan = rules.plan(len(configs), full_steps, sweep_spec.get("budget", rules.DEFAULT_BUDGET),
                          sweep_spec.get("maxSteps"))
    log.info("sweep plan", extra={"configs": [c.name for c in configs], "fullRunSteps": full_steps,
                                  **dataclasses.asdict(the_plan)})
    sweep = _Sweep(run, None, the_plan, {}, len(run.label_ids or {}))
    first = _load_model(sweep, configs)
    sweep.base = evaluate(first.runner, run.val_examples, task=spec["task"], batch_size=first.schedule.per_device_batch,
                          pad_id=run.pad_id, pack=run.pack).metrics
    log.info("sweep baseline", extra={"metrics": sweep.base})
    pool = [first] + [_add_trial(sweep, config) for config in configs[1:]]
    winner = _halve(sweep, pool)
    best = rules.choose(sweep.rows, sweep_spec["metric"], sweep_spec["tieTolerance"])
    return finish_stage(run, {
        "metric": sweep_spec["metric"], "trials": sweep.rows, "baseMetrics": manifest_api.numeric_metrics(sweep.base),
        "metrics": (best or {}).get("metrics") or {}, "fullRunSteps": full_steps, "budgetSteps": the_plan.budget_steps,
        "usedSteps": sweep.spent, "firstRungSteps": the_plan.first_rung_steps, "rungs": list(the_plan.rungs),
        "best": None if best is None else {k: best[k] for k in ("rank", "alpha", "learningRate", "name")},
        "stopReason": winner, "examples": {"train": len(run.train_examples), "holdout": len(run.val_examples)},
        "seconds": round(run.seconds(), 1)})


def _load_model(sweep: _Sweep, configs: list[rules.Config]) -> _Trial:
    """The base model once, loaded and wrapped exactly as the full run's `build_model` does, with the
    first config's adapter ("default") and its runner."""
    from .train import build_model

    first = _config_run(sweep, configs[0])
    build_model(first)
    sweep.run.precision = first.precision
    sweep.model = first.runner.module
    return _record(sweep, configs[0], "default", first.runner, first.schedule)


def _add_trial(sweep: _Sweep, config: rules.Config) -> _Trial:
    """A new named adapter (fresh LoRA weights, a fresh copy of the initial head) and its optimizer."""
    from .train import Schedule, _step_runner

    name = f"c{len(sweep.trials)}"
    # the first adapter's config (targets, head, dropout) at this config's rank and alpha
    lora = copy.deepcopy(sweep.model.peft_config["default"])
    lora.r, lora.lora_alpha = config.rank, config.alpha
    sweep.model.add_adapter(name, lora)
    sweep.model.set_adapter(name)  # only this adapter's weights (and head) require grad now
    config_run = _config_run(sweep, config)
    config_run.schedule = Schedule.from_spec(config_run.spec["training"], sweep.run.dist.world_size,
                                             len(sweep.run.train_examples))
    return _record(sweep, config, name, _step_runner(config_run, sweep.model), config_run.schedule)


def _config_run(sweep: _Sweep, config: rules.Config):
    """The run as one config sees it: its rank, alpha and learning rate, and a schedule (warmup, LR decay)
    spanning its last planned step rather than a whole run."""
    run = sweep.run
    spec = rules.config_spec(run.spec, config.rank, config.learning_rate)
    spec["training"] = {**spec["training"], "maxSteps": sweep.plan.final_steps}
    spec["training"].pop("epochs", None)
    return dataclasses.replace(run, config=dataclasses.replace(run.config, spec=spec), schedule=None, runner=None)


def _record(sweep: _Sweep, config: rules.Config, adapter: str, runner: StepRunner, schedule) -> _Trial:
    row = {"name": config.name, "rank": config.rank, "alpha": config.alpha, "learningRate": config.learning_rate,
           "state": rules.RUNNING, "steps": 0, "rung": 0}
    if config.retry_of:
        row["retryOf"] = config.retry_of
    trial = _Trial(config, adapter, runner, schedule, row)
    sweep.trials.append(trial)
    return trial


def _halve(sweep: _Sweep, pool: list[_Trial]) -> str:
    """Rung after rung until one config is left or the budget is spent; returns why it stopped."""
    spec = sweep.run.spec["rankSweep"]
    allowance = rules.allowance(sweep.plan)
    rung = 0
    while pool:
        target = sweep.plan.first_rung_steps * rules.ETA ** rung
        if rung and sweep.spent + sum(target - t.step for t in pool) > allowance:
            for trial in pool:
                _set(sweep, trial, rules.SUCCEEDED, f"a finalist: the budget ({allowance} steps) has no room for "
                     f"rung {rung} ({target} steps each)")
            return "budget spent"
        pool = _run_rung(sweep, pool, rung, target, allowance)
        if not pool:
            return "no config learned"
        order = rules.ranked([t.row for t in pool], spec["metric"], spec["tieTolerance"])
        keep = rules.survivors_after(len(pool)) if len(pool) > 1 else 1
        kept = [next(t for t in pool if t.row is row) for row in order[:keep]]
        for trial in pool:
            if trial not in kept:
                _set(sweep, trial, rules.STOPPED, f"halved out after rung {rung} ({trial.step} steps)")
                trial.runner = None  # its optimizer state is no longer needed
        pool = kept
        if len(pool) == 1:
            _set(sweep, pool[0], rules.SUCCEEDED, f"the last config left after rung {rung}")
            return "one config left"
        rung += 1
    return "no config left"


def _run_rung(sweep: _Sweep, pool: list[_Trial], rung: int, target: int, allowance: int) -> list[_Trial]:
    """Train each config of the pool to `target` steps and score it; a config that diverged or stayed at
    chance is replaced by its retry at a lower learning rate when the budget allows (once per config)."""
    healthy = []
    for trial in pool:
        if _advance(sweep, trial, rung, target):
            healthy.append(trial)
            continue
        if trial.config.retry_of or sweep.spent + target > allowance:
            if not trial.config.retry_of:
                trial.row["message"] += f"; not retried: the budget has no room for {target} more steps"
            continue
        retry = _add_trial(sweep, rules.retry_config(trial.config))
        log.info("sweep retry", extra={"config": trial.config.name, "learningRate": retry.config.learning_rate})
        if _advance(sweep, retry, rung, target):
            healthy.append(retry)
    return healthy


def _advance(sweep: _Sweep, trial: _Trial, rung: int, target: int) -> bool:
    """Train `trial` to `target` steps, score it on the holdout and mark it; True while it is healthy."""
    run = sweep.run
    started = time.monotonic()
    sweep.model.set_adapter(trial.adapter)
    finite = _train_to(sweep, trial, target)
    trial.row.update(steps=trial.step, rung=rung)
    if not finite:
        trial.seconds += time.monotonic() - started
        _set(sweep, trial, rules.DIVERGED, f"the training loss became non-finite at step {trial.step}")
        return False
    result = evaluate(trial.runner, run.val_examples, task=run.spec["task"],
                      batch_size=trial.schedule.per_device_batch, pad_id=run.pad_id, pack=run.pack).metrics
    trial.seconds += time.monotonic() - started
    value = result.get(run.spec["rankSweep"]["metric"])
    trial.row["metrics"] = manifest_api.numeric_metrics(result)
    trial.row["metric"] = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
    if trial.row["metric"] is None:
        trial.row.pop("metric")
    verdict = rules.mark(result, sweep.base, task=run.spec["task"], classes=sweep.classes)
    if verdict is not None:
        _set(sweep, trial, *verdict)
        return False
    log.info("sweep rung", extra={"config": trial.config.name, "rung": rung, "steps": trial.step, "metrics": result})
    _set(sweep, trial, rules.RUNNING, "")
    return True


def _train_to(sweep: _Sweep, trial: _Trial, target: int) -> bool:
    """Optimizer steps on this config until `target`; False when a loss became non-finite (the weights
    never see it: the check comes before backward, on every rank alike)."""
    run, runner, schedule = sweep.run, trial.runner, trial.schedule
    lengths = [len(e.input_ids) for e in run.train_examples]
    runner.train(True)
    while trial.step < target:
        batches = text.batch_order(lengths, schedule.per_device_batch, run.spec["training"]["seed"] + trial.epoch,
                                   group_by_length=not run.pack)
        mine = batches[run.dist.rank::run.dist.world_size][: schedule.micro_batches_per_epoch]
        while trial.micro < len(mine) and trial.step < target:
            batch = text.make_batch([run.train_examples[i] for i in mine[trial.micro]], pack=run.pack,
                                    pad_id=run.pad_id, torch=torch)
            loss = runner.forward(batch.tensors).loss
            if not math.isfinite(float(distributed.all_reduce_mean(loss.detach().float()))):
                runner.zero_grad()
                return False
            runner.backward(loss)
            trial.micro += 1
            boundary = trial.micro % schedule.grad_accum == 0 or trial.micro == len(mine)
            runner.micro_step(boundary)
            if boundary:
                trial.step += 1
                sweep.spent += 1
        if trial.micro >= len(mine):
            trial.epoch += 1
            trial.micro = 0
    return True


def _set(sweep: _Sweep, trial: _Trial, state: str, message: str) -> None:
    """A row's state and message, and the live table in progress.json."""
    trial.row.update(state=state, seconds=round(trial.seconds, 2))
    if message:
        trial.row["message"] = message
    else:
        trial.row.pop("message", None)
    sweep.run.progress.update(force=True, stage="sweeping", sweep={
        "trials": sweep.rows, "usedSteps": sweep.spent, "budgetSteps": sweep.plan.budget_steps})
