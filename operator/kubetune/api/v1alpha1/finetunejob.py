"""FineTuneJob's spec: what to train, on which data, how, and where to publish it.

A FineTuneJob runs up to three stages, each its own training job: the baseline evaluation of the base
model (`spec.baseline`), the LoRA rank sweep (`spec.rankSweep`) and training.
"""

from __future__ import annotations

from ..k8s_values import DNS1123_SUBDOMAIN_PATTERN, LABEL_VALUE_PATTERN
from ..schema import (
    DNS_LABEL_PATTERN,
    array,
    boolean,
    integer,
    number,
    obj,
    opaque_object,
    quantity,
    quantity_map,
    rule,
    string,
    string_map,
)
from .common import (
    STORAGE_PREFIX,
    STORAGE_URI,
    base_model,
    s3_credentials,
    s3_endpoint,
    s3_region,
    secret_key,
    secret_name,
)
from .dataset import DATASET
from .training import CLASSIFIER, PRECISIONS, SCHEDULERS, TRAINING  # noqa: F401 - PRECISIONS, SCHEDULERS: API

TASKS = ("CausalLM", "SequenceClassification")
TRAINING_BACKENDS = ("PyTorchJob", "TrainJob")  # kubetune_operator.backends.BACKENDS keys
METHODS = ("LoRA", "QLoRA", "Full", "FreezeThaw")
MAX_LORA_RANK = 512
METRICS = ("eval_loss", "accuracy", "macro_f1", "perplexity")
HIGHER_IS_BETTER = ("accuracy", "macro_f1")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
CAUSAL_LM_METRICS = ("perplexity",)


BASE_MODEL = base_model("The model to fine-tune.")

LORA = obj(
    "Low-rank adapter parameters (LoRA and QLoRA).",
    {
        "rank": integer("Adapter rank r.", default=16, minimum=1, maximum=MAX_LORA_RANK),
        "alpha": integer("Scaling alpha; the update is scaled by alpha/r.", default=32, minimum=1, maximum=4096),
        "dropout": number("Dropout on the adapter input. Left out: 0.05 when the run passes over its training "
                          "examples more than twice (small data), else 0.", minimum=0, maximum=0.9),
        "targetModules": array(
            "Module names to adapt (e.g. q_proj, v_proj), or the single entry all-linear for every linear "
            "layer except the output head. A name that matches no module fails the job at once and lists "
            "the model's real linear module names.",
            string("A module name suffix, or all-linear.", min_length=1, max_length=128),
            default=["all-linear"],
            min_items=1,
            max_items=64,
            list_type="set",
            rules=[
                rule(
                    "!self.exists(m, m == 'all-linear') || size(self) == 1",
                    "method.lora.targetModules: all-linear cannot be combined with other names",
                )
            ],
        ),
        "useRslora": boolean("Rank-stabilised scaling alpha/sqrt(r).", default=False),
    },
)

QUANTIZATION = obj(
    "4-bit quantization of the frozen base model (QLoRA, bitsandbytes).",
    {
        "bits": integer("Bits per base weight.", default=4, enum=[4]),
        "quantType": string("4-bit data type; nf4 suits normally distributed weights.", default="nf4",
                            enum=["nf4", "fp4"]),
        "doubleQuant": boolean("Quantize the quantization constants too (saves ~0.4 bit/param).", default=True),
        "computeDtype": string("Dtype of the matmuls on dequantized weights.", default="bfloat16",
                               enum=["bfloat16", "float16", "float32"]),
    },
)

FREEZE_THAW = obj(
    "Freeze-thaw: train the top blocks and the head, unfreeze one more block when the eval metric "
    "plateaus.",
    {
        "initialTrainableBlocks": integer("Top transformer blocks trainable from the start.", default=2,
                                          minimum=0),
        "thawPerPlateau": integer("Blocks unfrozen at each plateau.", default=1, minimum=1),
        "plateauPatience": integer("Evaluations without improvement that count as a plateau.", default=2,
                                   minimum=1),
        "minDelta": number("Smallest improvement of the metric that counts.", default=0.0, minimum=0),
        "maxTrainableBlocks": integer("Stop thawing at this many blocks (default: all).", minimum=1),
    },
    rules=[
        rule(
            "!has(self.maxTrainableBlocks) || self.maxTrainableBlocks >= self.initialTrainableBlocks",
            "method.freezeThaw.maxTrainableBlocks must be >= initialTrainableBlocks",
            field_path=".maxTrainableBlocks",
        )
    ],
)

METHOD = obj(
    "How the weights are adapted.",
    {
        "type": string("LoRA, QLoRA (LoRA on a 4-bit base), Full, or FreezeThaw.", default="LoRA", enum=METHODS),
        "lora": LORA,
        "quantization": QUANTIZATION,
        "freezeThaw": FREEZE_THAW,
    },
    default={},
    rules=[
        rule(
            "self.type != 'QLoRA' || has(self.quantization)",
            "method.quantization is required when method.type is QLoRA",
            field_path=".quantization",
            reason="FieldValueRequired",
        ),
        rule(
            "self.type == 'QLoRA' || !has(self.quantization)",
            "method.quantization is only valid when method.type is QLoRA",
            field_path=".quantization",
        ),
        rule(
            "self.type in ['LoRA', 'QLoRA'] || !has(self.lora)",
            "method.lora is only valid when method.type is LoRA or QLoRA",
            field_path=".lora",
        ),
        rule(
            "self.type == 'FreezeThaw' || !has(self.freezeThaw)",
            "method.freezeThaw is only valid when method.type is FreezeThaw",
            field_path=".freezeThaw",
        ),
    ],
)

DISTRIBUTED = obj(
    "Where and how wide training runs: `nodes` pods (PyTorchJob: 1 Master + nodes-1 Workers; TrainJob: numNodes), "
    "each running torchrun with one process per GPU.",
    {
        "nodes": integer("Pods (machines).", default=1, minimum=1, maximum=1024),
        "gpusPerNode": integer("GPUs per pod; 0 runs on CPU (gloo), for small models and tests.", default=1,
                               minimum=0, maximum=16),
        "processesPerNode": integer("torchrun processes per pod when gpusPerNode is 0.", default=1,
                                    minimum=1, maximum=256),
        "deepspeed": obj(
            "DeepSpeed ZeRO settings; the config is generated from the world size and the method.",
            {
                "enabled": boolean("Use DeepSpeed (otherwise plain DDP).", default=True),
                "zeroStage": integer("ZeRO stage: 3 partitions weights, gradients and optimizer state.",
                                     default=3, enum=[0, 1, 2, 3]),
                "offloadOptimizer": boolean("Keep optimizer state in CPU memory.", default=False),
                "offloadParams": boolean("Keep partitioned weights in CPU memory (ZeRO-3 only).",
                                         default=False),
            },
            default={},
            rules=[
                rule(
                    "!self.offloadParams || self.zeroStage == 3",
                    "distributed.deepspeed.offloadParams requires distributed.deepspeed.zeroStage 3",
                    field_path=".offloadParams",
                ),
                rule(
                    "!self.offloadOptimizer || self.zeroStage > 0",
                    "distributed.deepspeed.offloadOptimizer requires distributed.deepspeed.zeroStage 1, 2 or 3",
                    field_path=".offloadOptimizer",
                ),
            ],
        ),
    },
    default={},
    rules=[
        rule(
            "self.gpusPerNode == 0 || self.processesPerNode == 1",
            "distributed.processesPerNode applies only to CPU jobs (gpusPerNode 0): a GPU job runs one "
            "process per GPU",
            field_path=".processesPerNode",
        ),
    ],
)

RESOURCES = obj(
    "Compute resources of each training pod beyond the GPUs.",
    {
        "requests": quantity_map("Resource requests (cpu, memory, ephemeral-storage...)."),
        "limits": quantity_map("Resource limits."),
        "gpuResourceName": string("Extended resource name of the GPUs.", default="nvidia.com/gpu",
                                  max_length=253),
        "sharedMemory": quantity("Size of the memory-backed /dev/shm (NCCL and data loaders need it).",
                                 default="16Gi"),
    },
    default={},
)

# core/v1 Toleration's fields, so a typo or a bad operator is refused at apply, not by the pod.
TOLERATION = obj(
    "A toleration (core/v1 Toleration).",
    {
        "key": string("Taint key (a label key); empty with operator Exists matches every taint.", max_length=317),
        "operator": string("Equal (the default) or Exists.", enum=["Equal", "Exists"]),
        "value": string("Taint value for Equal (a label value).", pattern=LABEL_VALUE_PATTERN, max_length=63),
        "effect": string("Taint effect to match (empty: all).", enum=["", "NoSchedule", "PreferNoSchedule",
                                                                      "NoExecute"]),
        "tolerationSeconds": integer("How long a NoExecute taint is tolerated (default: forever).", minimum=0),
    },
    rules=[rule("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "scheduling.tolerations[].value must be empty when operator is Exists", field_path=".value")],
)

SCHEDULING = obj(
    "Placement of the training pods.",
    {
        "nodeSelector": string_map("Node labels the pods must match."),
        "tolerations": array("Tolerations (core/v1 Toleration).", TOLERATION, max_items=64),
        "affinity": opaque_object("Affinity (core/v1 Affinity)."),
        "priorityClassName": string("PriorityClass of the pods (a DNS-1123 subdomain).",
                                    pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253),
        "queueName": string("Kueue LocalQueue: every workload is created suspended with the kueue.x-k8s.io/queue-name "
                            "label and runs once Kueue admits it (phase Queued until then). It is a label value: "
                            "at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric.",
                            pattern=LABEL_VALUE_PATTERN, min_length=1, max_length=63),
    },
)

OUTPUT = obj(
    "Where checkpoints and the published adapter go.",
    {
        "uri": string("S3 prefix (s3://BUCKET/PREFIX); each job writes under PREFIX/NAMESPACE/NAME/UID/. "
                      "file:///PATH is accepted only by `kubetune local` (a cluster's pods cannot write to it).",
                      pattern=STORAGE_PREFIX, max_length=1024),
        "endpoint": s3_endpoint(),
        "region": s3_region(),
        "credentials": s3_credentials("the output bucket"),
        "mergeAdapter": boolean("Also publish the adapter merged into the base weights (QLoRA merges into "
                                "a bf16 copy of the base, never into 4-bit weights), as its own artifact beside the "
                                "adapter (own manifest and digest, status.merged); serving agents never fetch it.",
                                default=False),
    },
    required=["uri"],
)

TRACKING = obj(
    "Experiment tracking. Parameters, per-step losses and eval metrics go to the tracker from rank 0; "
    "when the tracker is unreachable or its client is not installed the run goes on and says so in its log.",
    {
        "mlflow": obj(
            "MLflow tracking server.",
            {
                "trackingUri": string("Tracking URI (https://mlflow.example.com).", pattern=r"^(https?|file)://.+",
                                      max_length=1024),
                "experiment": string("Experiment name (default: the job's namespace).", max_length=256),
                "credentials": obj(
                    "Token for the server, from a Secret (MLFLOW_TRACKING_TOKEN in the pod).",
                    {
                        "secretName": secret_name(),
                        "tokenKey": secret_key("Key of the token in the Secret.", "token"),
                    },
                    required=["secretName"],
                ),
            },
            required=["trackingUri"],
        ),
        "wandb": obj(
            "Weights & Biases.",
            {
                "project": string("Project.", max_length=256),
                "entity": string("Entity (team or user).", max_length=256),
                "mode": string("online, or offline (written to the pod's disk only).", default="online",
                               enum=["online", "offline"]),
                "credentials": obj(
                    "API key, from a Secret (WANDB_API_KEY in the pod).",
                    {
                        "secretName": secret_name(),
                        "apiKeyKey": secret_key("Key of the API key in the Secret.", "api-key"),
                    },
                    required=["secretName"],
                ),
            },
            required=["project"],
        ),
    },
)

RUN_POLICY = obj(
    "Lifecycle of the training run, passed through to the workload (a TrainJob takes suspend and "
    "activeDeadlineSeconds; its retries are its training runtime's).",
    {
        "suspend": boolean("Suspend the run (pods are removed; resume by setting it back to false).",
                           default=False),
        "backoffLimit": integer("Retries after retryable failures before the job fails (PyTorchJob).", default=3,
                                minimum=0, maximum=100),
        "activeDeadlineSeconds": integer("Fail the job after this long.", minimum=1),
        "ttlSecondsAfterFinished": integer("Remove the PyTorchJob this long after it finishes; the "
                                           "FineTuneJob keeps its final status.", minimum=0),
    },
    default={},
)

BASELINE = obj(
    "Evaluate the base model on the validation split before any training, with the task's metrics "
    "(recorded in status.baseline). With a target, a base model that already meets it stops the job "
    "(phase Skipped, condition BaselineSufficient) before any training GPU time is spent.",
    {
        "enabled": boolean("Evaluate the base model first.", default=True),
        "target": obj(
            "The metric value that is good enough. Loss and perplexity are met at or below the value, "
            "accuracy and macro_f1 at or above it.",
            {
                "metric": string("Metric to compare: eval_loss, perplexity (CausalLM), accuracy or macro_f1 "
                                 "(SequenceClassification).", enum=list(METRICS)),
                "value": number("Target value of the metric."),
            },
            required=["metric", "value"],
            rules=[
                rule(
                    "!(self.metric in ['accuracy', 'macro_f1']) || (self.value >= 0.0 && self.value <= 1.0)",
                    "baseline.target.value of accuracy or macro_f1 must be between 0 and 1",
                    field_path=".value",
                ),
            ],
        ),
        "forceTraining": boolean("Train even when the base model meets the target (the baseline is still "
                                 "evaluated and recorded).", default=False),
    },
    default={},
    rules=[
        rule("!has(self.target) || self.enabled", "baseline.target needs baseline.enabled: true",
             field_path=".target"),
    ],
)

RANK_SWEEP = obj(
    "Choose the LoRA rank (and, when asked, the learning rate) before training, in one workload: every "
    "config (rank x learning rate) trains a few steps on the training split minus a holdout and is scored "
    "on that holdout (the validation split stays unseen until the final evaluation); the better half "
    "trains on to twice the steps, and so on until one is left (successive halving), within `budget`. A "
    "config that diverges or stays at chance is marked so and retried once at a quarter of its learning "
    "rate. The winner (ties go to the smaller rank) is used for the full run.",
    {
        "ranks": array("Ranks to try.", integer("A LoRA rank.", minimum=1, maximum=MAX_LORA_RANK),
                       default=[4, 8, 16, 32], min_items=2, max_items=16, list_type="set"),
        "learningRates": array("Learning rates to try with every rank (default: training.learningRate "
                               "alone); the chosen one is used for the full run.",
                               number("A learning rate.", minimum=0, exclusive_minimum=True, maximum=1),
                               min_items=1, max_items=4, list_type="set"),
        "budget": number("Optimizer steps all configs together may use, as a share of the full run's steps "
                         "(computed from spec.training and the dataset's size).", default=0.3, minimum=0,
                         exclusive_minimum=True, maximum=1),
        "holdoutFraction": number("Share of the training split held out to score the configs.", default=0.1,
                                  minimum=0, exclusive_minimum=True, maximum=0.5),
        "epochs": number("Deprecated, no longer used: `budget` sizes the sweep. Still accepted.", default=1,
                         minimum=0, exclusive_minimum=True, maximum=100),
        "maxSteps": integer("Cap on the first rung's optimizer steps per config (later rungs double it); "
                            "default: what the budget allows.", minimum=1),
        "metric": string("Holdout metric that ranks the configs: eval_loss, perplexity (lower is better), "
                         "accuracy or macro_f1 (higher is better; SequenceClassification).",
                         default="eval_loss", enum=list(METRICS)),
        "parallelism": integer("Deprecated, no longer used: every config trains in the one sweep process. "
                               "Still accepted.", default=1, minimum=1, maximum=16),
        "alpha": string("Proportional keeps alpha/rank at the spec's ratio for every config (and the full run), "
                        "so ranks are compared at the same update scale; Fixed keeps method.lora.alpha.",
                        default="Proportional", enum=["Proportional", "Fixed"]),
        "tieTolerance": number("Metrics within this distance of the best count as a tie; the smallest tied "
                               "rank wins.", default=0.0, minimum=0),
        "nodes": integer("Pods of the sweep workload (default: distributed.nodes); the effective batch stays "
                         "the same.", minimum=1, maximum=1024),
        "gpusPerNode": integer("GPUs per sweep pod (default: distributed.gpusPerNode).", minimum=0, maximum=16),
    },
)

EVALUATION = obj(
    "Extra evaluations after training: each named held-out set is scored for the new adapter and, with a "
    "reference, for the reference adapter too, on the same examples. The scores go into the manifest "
    "(`evaluations`); the drift loop's promotion gate reads them.",
    {
        "sets": array(
            "Held-out sets in the dataset's format.",
            obj("One named set.", {
                "name": string("Name of the set (a key in the manifest's evaluations).", pattern=DNS_LABEL_PATTERN,
                               max_length=63),
                "uri": string("Location of the set (JSON Lines).", pattern=STORAGE_URI, max_length=2048),
            }, required=["name", "uri"]),
            min_items=1, max_items=8, list_type="map", map_keys=["name"],
        ),
        "reference": obj(
            "An adapter already published on the same base model, scored on the same sets (the one serving now).",
            {"manifestUri": string("Location of its manifest.json.", pattern=STORAGE_URI, max_length=2048)},
            required=["manifestUri"],
        ),
    },
    required=["sets"],
)

FINETUNEJOB_SPEC = obj(
    "What to fine-tune, on what data, how, and where the adapter goes.",
    {
        "baseModel": BASE_MODEL,
        "task": string("CausalLM (generation) or SequenceClassification (a trainable head is saved with "
                       "the adapter).", default="CausalLM", enum=TASKS),
        "labels": array(
            "Class names for SequenceClassification, in id order (default: discovered from the data, "
            "sorted).",
            string("A class name.", min_length=1, max_length=256),
            max_items=10_000,
            list_type="set",
        ),
        "dataset": DATASET,
        "method": METHOD,
        "classifier": CLASSIFIER,
        "training": TRAINING,
        "backend": string("Which workload kind trains the job (and runs its data, baseline and sweep stages): "
                          "a Kubeflow PyTorchJob (kubeflow.org/v1) or a Kubeflow Trainer v2 TrainJob "
                          "(trainer.kubeflow.org/v1alpha1).", default="PyTorchJob", enum=TRAINING_BACKENDS),
        "trainingRuntime": string("backend TrainJob: the ClusterTrainingRuntime its TrainJobs reference "
                                  "(default torch-distributed, the torch runtime Kubeflow Trainer ships).",
                                  pattern=DNS_LABEL_PATTERN, max_length=253),
        "distributed": DISTRIBUTED,
        "resources": RESOURCES,
        "scheduling": SCHEDULING,
        "image": string("Trainer image override (default: the operator's configured trainer image).",
                        max_length=1024),
        "serviceAccountName": string("ServiceAccount of the training pods.", pattern=DNS1123_SUBDOMAIN_PATTERN,
                                     max_length=253),
        "output": OUTPUT,
        "tracking": TRACKING,
        "runPolicy": RUN_POLICY,
        "baseline": BASELINE,
        "rankSweep": RANK_SWEEP,
        "evaluation": EVALUATION,
    },
    required=["baseModel", "dataset", "output"],
    rules=[
        rule(
            "!has(self.rankSweep) || self.method.type in ['LoRA', 'QLoRA']",
            "rankSweep applies only when method.type is LoRA or QLoRA",
            field_path=".rankSweep",
        ),
        rule(
            "!has(self.rankSweep) || !(self.rankSweep.metric in ['accuracy', 'macro_f1']) "
            "|| self.task == 'SequenceClassification'",
            "rankSweep.metric accuracy and macro_f1 need task SequenceClassification",
            field_path=".rankSweep.metric",
        ),
        rule(
            "!has(self.rankSweep) || !has(self.rankSweep.gpusPerNode) "
            "|| (self.rankSweep.gpusPerNode > 0) == (self.distributed.gpusPerNode > 0)",
            "rankSweep.gpusPerNode: the sweep runs on the same kind of device as training (both on GPUs or both "
            "on CPU)",
            field_path=".rankSweep.gpusPerNode",
        ),
        rule(
            "!has(self.rankSweep) || !has(self.rankSweep.learningRates) "
            "|| size(self.rankSweep.ranks) * size(self.rankSweep.learningRates) <= 32",
            "rankSweep: at most 32 configs (ranks x learningRates)",
            field_path=".rankSweep.learningRates",
        ),
        rule(
            "!has(self.rankSweep) || self.rankSweep.metric != 'perplexity' || self.task == 'CausalLM'",
            "rankSweep.metric perplexity needs task CausalLM",
            field_path=".rankSweep.metric",
        ),
        rule(
            "!has(self.baseline.target) || !(self.baseline.target.metric in ['accuracy', 'macro_f1']) "
            "|| self.task == 'SequenceClassification'",
            "baseline.target.metric accuracy and macro_f1 need task SequenceClassification",
            field_path=".baseline.target.metric",
        ),
        rule(
            "!has(self.baseline.target) || self.baseline.target.metric != 'perplexity' || self.task == 'CausalLM'",
            "baseline.target.metric perplexity needs task CausalLM",
            field_path=".baseline.target.metric",
        ),
        rule(
            "!has(self.baseline.target) || has(self.dataset.validationUri) || self.dataset.validationSplit > 0.0",
            "baseline.target needs validation data (dataset.validationUri or dataset.validationSplit > 0)",
            field_path=".baseline.target",
        ),
        rule(
            "self.task == 'SequenceClassification' || self.dataset.format != 'text-label'",
            "dataset.format text-label needs task SequenceClassification",
            field_path=".dataset.format",
        ),
        rule(
            "self.task != 'SequenceClassification' || self.dataset.format == 'text-label'",
            "task SequenceClassification needs dataset.format text-label",
            field_path=".task",
        ),
        rule(
            "!has(self.labels) || self.task == 'SequenceClassification'",
            "labels: only valid when task is SequenceClassification",
            field_path=".labels",
        ),
        rule(
            "!has(self.training.headLearningRate) || self.task == 'SequenceClassification'",
            "training.headLearningRate: only valid when task is SequenceClassification (a causal LM's head is "
            "the base model's own)",
            field_path=".training.headLearningRate",
        ),
        rule(
            "!has(self.classifier) || !has(self.classifier.pooling) || self.classifier.pooling == 'Auto' "
            "|| self.task == 'SequenceClassification'",
            "classifier.pooling: only valid when task is SequenceClassification",
            field_path=".classifier.pooling",
        ),
        rule(
            "!has(self.trainingRuntime) || self.backend == 'TrainJob'",
            "trainingRuntime: applies only when backend is TrainJob",
            field_path=".trainingRuntime",
        ),
        rule(
            "self.backend != 'TrainJob' || !has(self.scheduling) || !has(self.scheduling.priorityClassName)",
            "scheduling.priorityClassName: a TrainJob cannot set its pods' priority class (its training runtime "
            "does); leave it out or use backend PyTorchJob",
            field_path=".scheduling.priorityClassName",
        ),
        rule(
            "self.backend != 'TrainJob' || !has(self.runPolicy.ttlSecondsAfterFinished)",
            "runPolicy.ttlSecondsAfterFinished: a TrainJob has no such setting (its training runtime's JobSet "
            "does); leave it out or use backend PyTorchJob",
            field_path=".runPolicy.ttlSecondsAfterFinished",
        ),
        rule(
            "self.method.type != 'QLoRA' || self.distributed.gpusPerNode > 0",
            "method.type QLoRA needs GPUs (distributed.gpusPerNode > 0)",
            field_path=".distributed.gpusPerNode",
        ),
    ],
)

