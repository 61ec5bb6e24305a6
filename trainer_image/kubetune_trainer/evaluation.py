"""Scoring a model: the validation metrics, and the evaluation sets (candidate, then reference)."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import distributed, evalsets, metrics, text
from .step_runner import StepRunner

if TYPE_CHECKING:
    from .train import TrainingRun

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict
    confidences: list[float]
    entropies: list[float]
    predictions: list[int] = field(default_factory=list)  # classification: predicted class ids, in order
    scored: int = 0  # examples (classification) or tokens (causal LM) in eval_loss


class Scorer:
    """A model that is only evaluated (the reference adapter): the StepRunner's forward, no optimizer.

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

    forward = StepRunner.forward

    def train(self, mode: bool = True) -> None:
        (self.deepspeed or self.module).train(mode)


EVAL_BATCH_FACTOR = {"SequenceClassification": 4, "CausalLM": 1}  # no activations kept: larger batches fit
# (a causal LM's logits are batch x length x vocabulary floats: its batch stays the training one)


def evaluate(runner, examples: list[text.Example], *, task: str, batch_size: int, pad_id: int,
             pack: bool) -> Evaluation:
    """Loss, and accuracy + macro-F1 (classification) or perplexity (causal LM), on every rank.

    At inference speed: length-sorted batches (little padding), `EVAL_BATCH_FACTOR` x the training batch
    for classification, inference mode outside DeepSpeed (whose ZeRO-3 hooks must not create inference
    tensors), no loss inside the model, per-example figures vectorised; results come back in input order.
    Every rank evaluates the whole holdout: under ZeRO-3 each forward is a collective, so all ranks must
    run the same number of them; the holdout is small next to training.
    """
    runner.train(False)
    try:
        with torch.inference_mode() if getattr(runner, "deepspeed", None) is None else torch.no_grad():
            if task == "SequenceClassification":
                return _evaluate_classifier(runner, examples, batch_size * EVAL_BATCH_FACTOR[task], pad_id)
            return _evaluate_causal(runner, examples, batch_size * EVAL_BATCH_FACTOR["CausalLM"], pad_id, pack)
    finally:
        runner.train(True)


def _sorted_chunks(examples: list[text.Example], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _inputs(batch: text.Batch) -> dict:
    return {k: v for k, v in batch.tensors.items() if k != "labels"}


def _evaluate_classifier(runner, examples: list[text.Example], batch_size: int, pad_id: int) -> Evaluation:
    # Gold ids may be text.IGNORE (an evaluation set's label the model does not know): left out of the
    # loss, always a wrong prediction.
    n = len(examples)
    predictions, labels, confidences, entropies = [0] * n, [0] * n, [0.0] * n, [0.0] * n
    loss_sum, weight = 0.0, 0
    for chunk in _sorted_chunks(examples, batch_size):
        batch = text.padded_batch([examples[i] for i in chunk], pad_id, torch)
        logits = runner.forward(_inputs(batch)).logits.float()
        gold = batch.tensors["labels"].to(logits.device)
        loss_sum += float(F.cross_entropy(logits, gold, reduction="sum", ignore_index=text.IGNORE))
        weight += int((gold != text.IGNORE).sum())
        log_probs = logits.log_softmax(-1)
        confidence, predicted = log_probs.max(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        for i, p, g, c, e in zip(chunk, predicted.tolist(), gold.tolist(), confidence.exp().tolist(),
                                 entropy.tolist(), strict=True):
            predictions[i], labels[i], confidences[i], entropies[i] = p, g, c, e
    result = {"eval_loss": loss_sum / max(weight, 1), "accuracy": metrics.accuracy(predictions, labels),
              "macro_f1": metrics.macro_f1(predictions, labels)}
    return Evaluation(result, confidences, entropies, predictions, weight)


def _evaluate_causal(runner, examples: list[text.Example], batch_size: int, pad_id: int, pack: bool) -> Evaluation:
    """One forward per micro-batch (packed or padded, as in training); per-example confidence and entropy
    come from knowing which sequence owns each predicted token (summed per owner in one scatter)."""
    n = len(examples)
    confidence_sum, entropy_sum, token_count = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    loss_sum, weight = 0.0, 0
    for chunk in _sorted_chunks(examples, batch_size):
        batch = text.make_batch([examples[i] for i in chunk], pack=pack, pad_id=pad_id, torch=torch)
        logits = runner.forward(_inputs(batch)).logits.float()
        rows, width = batch.tensors["input_ids"].shape
        if rows == 1:  # packed: sequences side by side in one row
            owner_rows = [[i for i in chunk for _ in examples[i].input_ids]]
        else:  # padded: one sequence per row, -1 on padding
            owner_rows = [[i] * len(examples[i].input_ids) + [-1] * (width - len(examples[i].input_ids))
                          for i in chunk]
        owner = torch.tensor(owner_rows, device=logits.device)
        target = batch.tensors["labels"][:, 1:].to(logits.device)
        keep = target != text.IGNORE
        log_probs = logits[:, :-1][keep].log_softmax(-1)
        token_lp = log_probs.gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)
        token_entropy = -(log_probs.exp() * log_probs).sum(-1)
        token_owner = owner[:, 1:][keep].cpu()
        loss_sum += float(-token_lp.sum())
        weight += int(keep.sum())
        confidence_sum.index_add_(0, token_owner, token_lp.exp().cpu())
        entropy_sum.index_add_(0, token_owner, token_entropy.cpu())
        token_count.index_add_(0, token_owner, torch.ones_like(token_owner, dtype=torch.float))
    scored = token_count > 0  # an example with no scored token (all masked) has no confidence
    confidences = (confidence_sum[scored] / token_count[scored]).tolist()
    entropies = (entropy_sum[scored] / token_count[scored]).tolist()
    mean_loss = loss_sum / max(weight, 1)
    return Evaluation({"eval_loss": mean_loss, "perplexity": metrics.perplexity(mean_loss)}, confidences, entropies,
                      [], weight)


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



def evaluate_sets(run: TrainingRun) -> dict:
    """manifest["evaluations"]: the trained model, then the reference (loaded, scored, freed), on every set.

    On every rank, like the final evaluation (under ZeRO-3 each forward is a collective); rank 0 publishes.
    """
    task, labels = run.spec["task"], list(run.loaded.labels)
    common = {"task": task, "batch_size": run.schedule.per_device_batch, "pad_id": run.pad_id, "pack": run.pack}
    results = {s.name: {"uri": s.uri, "digest": s.digest, "examples": len(s.examples)} for s in run.eval_sets}
    for eval_set in run.eval_sets:
        log.info("evaluating set", extra={"set": eval_set.name, "model": "candidate",
                                          "examples": len(eval_set.examples)})
        run.progress.update(stage="evaluating", force=True, evaluationSet=eval_set.name)
        results[eval_set.name]["candidate"] = _score(run.runner, eval_set, labels, **common)
        log.info("evaluated set", extra={"set": eval_set.name, "model": "candidate",
                                         "metrics": results[eval_set.name]["candidate"]})
    if run.reference is not None:
        _score_reference(run, results, common)
    run.tracker.log({f"set_{name}_{who}_{k}": v for name, result in results.items()
                     for who in ("candidate", "reference") for k, v in result.get(who, {}).items()},
                    step=run.state.step)
    return results


def _score_reference(run: TrainingRun, results: dict, common: dict) -> None:
    runner, reference, task = run.runner, run.reference, run.spec["task"]
    zero3 = None  # the job's DeepSpeed config when the candidate runs under ZeRO-3: the reference does too
    if runner.deepspeed is not None and run.spec["distributed"]["deepspeed"]["zeroStage"] == 3:
        zero3 = run.deepspeed_config
    if runner.deepspeed is None:
        runner.optimizer.state.clear()  # training is over: room for the reference next to the candidate
    _free_memory()
    log.info("loading the reference adapter", extra={"manifest": reference.manifest_uri,
                                                     "digest": reference.digest})
    model = evalsets.load_reference_model(reference, run.model_dir, run.spec, precision=run.precision,
                                          device=run.dist.device, zero3=zero3)
    if task == "SequenceClassification" and model.config.pad_token_id is None:
        model.config.pad_token_id = run.pad_id
    scorer = Scorer(model, run.dist, zero3, runner.autocast_dtype, quantized=run.method.quantized)
    try:
        for eval_set in run.eval_sets:
            log.info("evaluating set", extra={"set": eval_set.name, "model": "reference",
                                              "examples": len(eval_set.examples)})
            run.progress.update(stage="evaluating", force=True, evaluationSet=f"{eval_set.name} (reference)")
            results[eval_set.name]["reference"] = _score(scorer, eval_set, reference.labels, **common)
            log.info("evaluated set", extra={"set": eval_set.name, "model": "reference",
                                             "metrics": results[eval_set.name]["reference"]})
    finally:
        del scorer, model
        _free_memory()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
