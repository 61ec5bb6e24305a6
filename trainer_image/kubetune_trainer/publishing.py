"""What a run leaves behind: the adapter (or whole weights) and its manifest, or a stage's result.json."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kubetune.api import jobconfig
from kubetune.clients.storage import publish_adapter

from . import __version__, distributed, metrics, modeling, storage

if TYPE_CHECKING:
    from .answers import Answers
    from .evaluation import Evaluation
    from .step_runner import StepRunner
    from .train import TrainingRun

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"  # classification adapters: class names in id order, next to the head


def gather_adapter_state(runner: StepRunner, only_trainable: bool) -> dict | None:
    """Under DeepSpeed, the weights to save, whole on rank 0. A collective (ZeRO-3 gathers the partitioned
    tensors): every rank calls it, before rank 0 alone publishes. None without DeepSpeed (saved as they are)."""
    if runner.deepspeed is None:
        return None
    # ZeRO-3 prefetching can leave parameters in flight after the last forward (seen with a LoRA above the
    # persistence threshold on a classifier); gathering would then fail. Release them all first.
    runner.deepspeed.empty_partition_cache()
    # The module's own keys: PeftModel.save_pretrained applies get_peft_model_state_dict itself (twice
    # breaks modules_to_save, the classification head).
    return distributed.gathered_trainable_state_dict(runner.deepspeed, peft_keys=False,
                                                     only_trainable=only_trainable)


def save_weights(run: TrainingRun, target: Path, state_dict: dict | None) -> None:
    """The method's files, the tokenizer and the class names: what a serving agent downloads."""
    spec, labels = run.spec, list(run.loaded.labels)
    target.mkdir(parents=True, exist_ok=True)
    run.method.save(run.runner.module, target, state_dict)
    run.tokenizer.save_pretrained(target)
    if labels and spec["task"] == "SequenceClassification":
        # the serving engine needs the class names in id order to size the head and name its predictions
        # and how the head pools, so that it reads the encoder as it was trained to
        (target / LABELS_FILE).write_text(json.dumps({"labels": labels, "pooling": (run.head or {}).get("pooling")}))
    refuse_empty_tensors(target)


def save_merged(run: TrainingRun, adapter_dir: Path) -> Path | None:
    """output.mergeAdapter: the adapter merged into the base, in a directory of its own (published as its
    own artifact, never inside the adapter). None when not asked for or the method has nothing to merge."""
    if not (run.spec["output"].get("mergeAdapter") and run.method.publishes_adapter):
        return None
    target = Path(tempfile.mkdtemp(prefix="merged-", dir=run.work_dir))
    merge(run.model_dir, adapter_dir, run.spec, target, list(run.loaded.labels), (run.head or {}).get("pooling"))
    run.tokenizer.save_pretrained(target)  # a merged model is used on its own: it needs its tokenizer
    refuse_empty_tensors(target)
    return target


def refuse_empty_tensors(directory: Path) -> None:
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


def merge(model_dir: Path, adapter_dir: Path, spec: dict, target: Path, labels: list[str],
          pooling: str | None = None) -> None:
    """Merge into a bf16 (or fp32 on CPU) copy of the base: never into 4-bit weights. A classifier's
    pooling goes into its config (`kubetune_pooling`), which the serving engine honours."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    cls = AutoModelForSequenceClassification if spec["task"] == "SequenceClassification" else AutoModelForCausalLM
    kwargs = {"num_labels": len(labels)} if spec["task"] == "SequenceClassification" else {}
    base = cls.from_pretrained(model_dir, dtype=dtype, **kwargs)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if pooling is not None:
        merged.config.kubetune_pooling = pooling
    merged.save_pretrained(target, safe_serialization=True)


def input_text(fields: dict) -> str:
    """What a user sends (for the vocabulary of the drift profile): never the completion."""
    if "messages" in fields:
        return " ".join(m["content"] for m in fields["messages"] if m["role"] != "assistant")
    return fields.get("prompt") or fields.get("text") or ""


def publish(run: TrainingRun, final: Evaluation, state_dict: dict | None, evaluations: dict | None,
            answers: Answers | None = None) -> dict:
    """Rank 0: save the weights and publish them with the manifest; returns the manifest document."""
    seconds = run.seconds()  # the run's duration, saving and uploading left out
    adapter_dir = Path(tempfile.mkdtemp(prefix="adapter-", dir=run.work_dir))
    save_weights(run, adapter_dir, state_dict)
    fields = manifest_fields(run, final, seconds, answers)
    if evaluations is not None:  # spec.evaluation: every set scored for this adapter (and the reference)
        fields["evaluations"] = evaluations
    if run.reference is not None:
        fields["evaluationReference"] = {"manifestUri": run.reference.manifest_uri, "digest": run.reference.digest}
    document = publish_adapter(run.store, adapter_dir, run.prefix, fields, merged_dir=save_merged(run, adapter_dir))
    log.info("adapter published", extra={"digest": document["digest"], "files": len(document["files"]),
                                         "manifest": run.config.storage.manifest_uri,
                                         "merged": (document.get("merged") or {}).get("manifestUri")})
    return document


def drift_profile(run: TrainingRun, final: Evaluation, answers: Answers | None) -> dict:
    """The manifest's driftProfile. A causal LM's confidence and entropy are those of its own greedy
    answers (`answers`), as serving measures them; the teacher-forced values stay as a diagnostic."""
    kind = "classification" if run.spec["task"] == "SequenceClassification" else "causal-lm"
    common = {"input_lengths": [len(e.input_ids) for e in run.val_examples],
              "texts": [input_text(r.fields) for r in run.loaded.train], "kind": kind}
    if answers is None:
        return metrics.drift_profile(confidences=final.confidences, entropies=final.entropies, **common)
    return metrics.drift_profile(confidences=answers.confidences, entropies=answers.entropies,
                                 decoding=answers.decoding, teacher_forced=(final.confidences, final.entropies),
                                 **common)


def manifest_fields(run: TrainingRun, final: Evaluation, seconds: float, answers: Answers | None = None) -> dict:
    import peft
    import transformers

    config, spec, loaded, state = run.config, run.spec, run.loaded, run.state
    padding = state.padding_tokens / max(1, state.padding_tokens + state.real_tokens)
    return {
        "job": {"namespace": config.job.namespace, "name": config.job.name, "uid": config.job.uid},
        "task": spec["task"],
        "method": spec["method"]["type"],
        **run.method.manifest_fields(spec),
        "labels": list(loaded.labels) if spec["task"] == "SequenceClassification" else None,
        "head": run.head,
        "baseModel": {"uri": spec["baseModel"]["uri"], "revision": spec["baseModel"].get("revision"),
                      "identity": modeling.model_identity(run.model_dir, spec["baseModel"])},
        "dataset": {"uri": spec["dataset"]["uri"], "validationUri": spec["dataset"].get("validationUri"),
                    "format": spec["dataset"]["format"], "digest": loaded.digest,
                    "trainExamples": len(loaded.train), "validationExamples": len(loaded.validation),
                    "tokens": run.token_stats, "leakage": loaded.leakage_outcome.as_report()},
        "config": spec,
        "metrics": final.metrics,
        "baselineMetrics": state.baseline,
        "training": {"steps": state.step, "stopReason": run.stop_reason, "bestStep": state.best_step,
                     "precision": run.precision, "derivedDefaults": run.derived_defaults,
                     "schedule": run.schedule.__dict__, "paddingFraction": padding, "realTokens": state.real_tokens,
                     "trainSeconds": round(state.train_seconds, 3),
                     "realTokensPerSecond": state.real_tokens / max(state.train_seconds, 1e-9),
                     "seconds": round(seconds, 1), "history": metrics.bounded_history(state.history)},
        "trainer": {"version": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__},
        "driftProfile": drift_profile(run, final, answers),
    }


def finish_stage(run: TrainingRun, fields: dict) -> dict:
    """A baseline, data or sweep stage ends with its result.json (written last: its presence means done)."""
    config = run.config
    document = {"api": jobconfig.STAGE_RESULT_API, "kind": config.stage.kind,
                "job": {"namespace": config.job.namespace, "name": config.job.name, "uid": config.job.uid},
                "createdAt": storage.now_rfc3339(), **fields}
    if run.dist.is_main:
        run.store.write(config.storage.result_uri, json.dumps(document, sort_keys=True).encode())
        run.progress.update(stage="done", force=True)
        log.info("stage finished", extra={"stage": config.stage.kind,
                                          "metrics": fields.get("metrics"), "result": config.storage.result_uri})
    distributed.barrier()
    return document
