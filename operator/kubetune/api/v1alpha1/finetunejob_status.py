"""FineTuneJob's status (written only by the operator) and its kubectl columns."""

from __future__ import annotations

from ..schema import (
    array,
    boolean,
    integer,
    number,
    obj,
    string,
)
from .common import LAST_UPDATE_TIME, conditions

REPLICA_STATUS = obj(
    "Pod counts of one replica type.",
    {
        "active": integer("Running pods.", minimum=0),
        "succeeded": integer("Succeeded pods.", minimum=0),
        "failed": integer("Failed pods.", minimum=0),
    },
)

_METRICS = {
    "type": "object",
    "description": "Metric name to value.",
    "additionalProperties": {"type": "number"},
}

FINETUNEJOB_PHASES = ("Pending", "Queued", "Validating", "Baseline", "Sweeping", "Suspended", "Running", "Publishing",
                      "Succeeded", "Skipped", "Failed")
STAGE_STATES = ("Pending", "Running", "Succeeded", "Failed")
SWEEP_TRIAL_STATES = ("Running", "Succeeded", "Stopped", "Diverged", "AtChance", "Failed")  # sweep_rules

BASELINE_STATUS = obj(
    "The base model's evaluation on the validation split.",
    {
        "source": string("BaselineJob: a separate evaluation job (a target can stop the run); TrainingJob: the "
                         "training job's first evaluation.", enum=["BaselineJob", "TrainingJob"]),
        "job": string("The workload (PyTorchJob or TrainJob) that evaluates it.", max_length=253),
        "state": string("State of the evaluation.", enum=list(STAGE_STATES)),
        "metrics": _METRICS,
        "examples": integer("Validation examples evaluated.", minimum=0),
        "target": obj("The target from the spec.", {"metric": string("Metric.", max_length=64),
                                                    "value": number("Value.")}),
        "met": boolean("Whether the base model meets the target."),
        "summary": string("One line for kubectl get, e.g. 'accuracy 0.41 < 0.90'.", max_length=256),
        "startTime": string("When the evaluation job started.", fmt="date-time"),
        "completionTime": string("When it finished.", fmt="date-time"),
        "durationSeconds": number("Wall time from start to completion.", minimum=0),
        "message": string("Why the evaluation failed, when it did.", max_length=32_768),
    },
)

_SPLIT_COUNTS = {"train": integer("In the training split.", minimum=0),
                 "validation": integer("In the validation split.", minimum=0)}
_TOKEN_LENGTHS = obj("Tokens per example (before truncation).",
                     {"p50": integer("Median.", minimum=0), "p95": integer("95th percentile.", minimum=0),
                      "max": integer("Longest.", minimum=0)})

DATA_STATUS = obj(
    "What the data stage (a CPU-only pod, before any GPU) found in the dataset.",
    {
        "job": string("The data stage's workload.", max_length=253),
        "state": string("State of the data stage.", enum=list(STAGE_STATES)),
        "digest": string("sha256 of the dataset file (and of the validation file, when given).", max_length=256),
        "examples": obj("Examples per split, after invalid lines and leakage were removed.", _SPLIT_COUNTS),
        "invalidLines": integer("Lines skipped as invalid (within dataset.maxInvalidFraction).", minimum=0),
        "labels": array("Labels and their counts per split (text-label data).",
                        obj("One label.", {"name": string("Label.", max_length=256), **_SPLIT_COUNTS}),
                        max_items=4096),
        "tokens": obj("Token lengths per split.", {"train": _TOKEN_LENGTHS, "validation": _TOKEN_LENGTHS}),
        "truncated": obj("Share of examples longer than training.maxSeqLength (truncated).",
                         {"train": number("Training split.", minimum=0, maximum=1),
                          "validation": number("Validation split.", minimum=0, maximum=1)}),
        "duplicates": obj("Examples whose normalised text repeats (case, whitespace and punctuation ignored).",
                          {"withinTrain": integer("Repeats within training.", minimum=0),
                           "withinValidation": integer("Repeats within validation.", minimum=0),
                           "acrossSplits": integer("Validation examples also in training.", minimum=0)}),
        "leakage": obj("Validation examples also in training, and what dataset.leakage did with them.",
                       {"policy": string("dataset.leakage.", enum=["Drop", "Fail", "Warn"]),
                        "matched": integer("Validation examples found in training.", minimum=0),
                        "dropped": integer("Removed from validation.", minimum=0)}),
        "findings": array(
            "What the dataset policy found (docs/trainer.md): an Error refused the dataset, a Warning was kept.",
            obj("One finding.", {"severity": string("Error or Warning.", enum=["Error", "Warning"]),
                                 "code": string("CamelCase kind, e.g. TooFewLabels.", max_length=64),
                                 "message": string("What was found, with labels and line numbers.",
                                                   max_length=4096)}),
            max_items=32),
        "message": string("Why the data stage refused the dataset, with line numbers.", max_length=32_768),
    },
)

SWEEP_TRIAL = obj(
    "One config (rank x learning rate) of the rank sweep, as far as successive halving took it.",
    {
        "name": string("The config, e.g. r8-lr0.003 (a retry ends in -retry).", max_length=64),
        "rank": integer("LoRA rank.", minimum=1),
        "alpha": integer("LoRA alpha used.", minimum=1),
        "learningRate": number("Learning rate used.", minimum=0),
        "state": string("Running; Succeeded (a finalist); Stopped (halved out at `rung`); Diverged (a "
                        "non-finite loss, or a holdout loss above the base model's); AtChance (learned "
                        "nothing: accuracy near 1/classes, loss near ln(classes), or no better than the base "
                        "model for a causal LM); Failed.", enum=list(SWEEP_TRIAL_STATES)),
        "metric": number("The sweep metric on the holdout at the config's last rung."),
        "steps": integer("Optimizer steps the config trained.", minimum=0),
        "rung": integer("The last rung the config reached (0: the first).", minimum=0),
        "seconds": number("Training and scoring time of this config.", minimum=0),
        "retryOf": string("The config this one retries at a quarter of its learning rate.", max_length=64),
        "message": string("Why it stopped, diverged or is at chance.", max_length=1024),
    },
    required=["rank", "state"],
)

SWEEP_STATUS = obj(
    "The rank sweep (one workload, successive halving): every config and the choice.",
    {
        "job": string("The sweep's workload (PyTorchJob or TrainJob).", max_length=253),
        "state": string("Pending (created), Running, Succeeded or Failed.", enum=list(STAGE_STATES)),
        "metric": string("Metric that ranks the configs.", max_length=64),
        "trials": array("Configs in the order they were tried.", SWEEP_TRIAL, max_items=64),
        "bestRank": integer("The rank chosen for training.", minimum=1),
        "bestLearningRate": number("The learning rate of the chosen config (applied to the full run when "
                                   "rankSweep.learningRates is set).", minimum=0),
        "bestMetric": number("The chosen config's metric."),
        "fullRunSteps": integer("Optimizer steps of the full run (the budget's base).", minimum=0),
        "budgetSteps": integer("Steps the sweep may use: rankSweep.budget x fullRunSteps.", minimum=0),
        "usedSteps": integer("Steps the configs trained, all together.", minimum=0),
        "startTime": string("When the sweep started.", fmt="date-time"),
        "completionTime": string("When it finished.", fmt="date-time"),
        "durationSeconds": number("Wall time from start to completion.", minimum=0),
        "message": string("Why it failed, when it did.", max_length=32_768),
        "summary": string("One line for kubectl get, e.g. '4 configs, 3 halved, best r8 lr0.003'.",
                          max_length=256),
    },
)

FINETUNEJOB_STATUS = obj(
    "Observed state, written only by the operator.",
    {
        "phase": string("Informational summary; use conditions for decisions. Validating (the CPU-only data "
                        "stage) comes first; Baseline and Sweeping come before training when configured; "
                        "Skipped means the base model met the target.",
                        enum=list(FINETUNEJOB_PHASES)),
        "observedGeneration": integer("The generation the operator last acted on.", minimum=0),
        "lastUpdateTime": LAST_UPDATE_TIME,
        "conditions": conditions(),
        "method": string("Method in use.", max_length=32),
        "rank": integer("LoRA rank in use.", minimum=0),
        "trainingJob": obj(
            "The workload (PyTorchJob or TrainJob) running the training.",
            {
                "name": string("Name of the workload.", max_length=253),
                "configMap": string("Name of the job config ConfigMap.", max_length=253),
                "generation": integer("Spec generation the training job was created from.", minimum=0),
            },
        ),
        "startTime": string("When training started.", fmt="date-time"),
        "completionTime": string("When the job finished (succeeded or failed).", fmt="date-time"),
        "attempts": integer("Training pod launches of the Master replica (1 + retries); for a TrainJob, its "
                            "node Jobs.", minimum=0),
        "replicas": {
            "type": "object",
            "description": "Pod counts per replica type (Master, Worker); for a TrainJob, Job counts per "
                           "replicated job (node).",
            "additionalProperties": REPLICA_STATUS,
        },
        "progress": obj(
            "Training progress reported by the trainer (through progress.json in the job's storage prefix).",
            {
                "stage": string("What the trainer is doing: validating, loading, baseline, training, evaluating, "
                                "publishing, done.", max_length=256),
                "step": integer("Optimizer step.", minimum=0),
                "totalSteps": integer("Planned optimizer steps.", minimum=0),
                "epoch": number("Fractional epoch."),
                "percent": integer("Percent of planned steps done.", minimum=0, maximum=100),
                "trainLoss": number("Latest training loss."),
                "evalLoss": number("Latest evaluation loss."),
                "accuracy": number("Latest evaluation accuracy (classification)."),
                "macroF1": number("Latest evaluation macro-F1 (classification)."),
                "perplexity": number("Latest evaluation perplexity (causal LM)."),
                "tokensPerSecond": number("Training throughput."),
                "etaSeconds": integer("Estimated seconds to finish.", minimum=0),
                "updateTime": string("When the trainer reported this.", fmt="date-time"),
            },
        ),
        "adapter": obj(
            "The published adapter, recorded only after its manifest was read and verified.",
            {
                "uri": string("Content-addressed location of the adapter files.", max_length=2048),
                "manifestUri": string("Location of manifest.json.", max_length=2048),
                "digest": string("sha256:HEX over the manifest's file list.", max_length=80),
                "sizeBytes": integer("Total size of the adapter files.", minimum=0),
                "metrics": _METRICS,
                "baselineMetrics": _METRICS,
                "publishTime": string("When the manifest was written.", fmt="date-time"),
            },
        ),
        "merged": obj(
            "output.mergeAdapter: the merged model, its own artifact beside the adapter (serving agents never "
            "fetch it), recorded only after its manifest and every file were verified.",
            {
                "uri": string("Content-addressed location of the merged model's files.", max_length=2048),
                "manifestUri": string("Location of the merged model's own manifest.json.", max_length=2048),
                "digest": string("sha256:HEX over the merged model's file list.", max_length=80),
                "sizeBytes": integer("Total size of the merged model's files.", minimum=0),
            },
        ),
        "data": DATA_STATUS,
        "baseline": BASELINE_STATUS,
        "sweep": SWEEP_STATUS,
        "failure": obj(
            "Why the job failed.",
            {
                "reason": string("CamelCase reason.", max_length=1024),
                "message": string("Detail.", max_length=32_768),
            },
        ),
    },
)

FINETUNEJOB_PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Base Model", "type": "string", "jsonPath": ".spec.baseModel.uri", "priority": 1},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
    {"name": "Queue", "type": "string", "jsonPath": ".spec.scheduling.queueName", "priority": 1,
     "description": "The Kueue LocalQueue that admits its workloads"},
    {"name": "Baseline", "type": "string", "jsonPath": ".status.baseline.summary",
     "description": "The base model's score against the target"},
    {"name": "Sweep", "type": "string", "jsonPath": ".status.sweep.summary",
     "description": "Rank sweep progress and choice"},
    {"name": "Rank", "type": "integer", "jsonPath": ".status.rank"},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent",
     "description": "Percent of planned steps done"},
    {"name": "Eval Loss", "type": "number", "jsonPath": ".status.progress.evalLoss"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.failure.reason",
     "description": "Why the job failed (docs/troubleshooting.md)"},
    {"name": "Adapter", "type": "string", "jsonPath": ".status.adapter.digest", "priority": 1,
     "description": "Digest of the published adapter"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

