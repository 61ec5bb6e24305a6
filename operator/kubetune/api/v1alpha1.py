"""The kubetune.io/v1alpha1 API: FineTuneJob and AdapterDeployment, defined once.

`crds/`, the Helm chart's CRDs, defaulting, client-side validation, the CEL rule tests and the
field reference are generated from the schemas in this module. Edit here, then run
``kubetune generate`` (CI fails when the generated files differ).

A FineTuneJob runs up to three stages, each its own PyTorchJob: the baseline evaluation of the base
model (``spec.baseline``, a separate job only when a target can stop the run), the LoRA rank sweep
(``spec.rankSweep``, one trial per rank on a holdout carved from the training split), and training.
"""

from __future__ import annotations

from .schema import (
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

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubetune"

TASKS = ("CausalLM", "SequenceClassification")
TRAINING_BACKENDS = ("PyTorchJob",)  # kubetune.backends.BACKENDS keys
DATASET_FORMATS = ("prompt-completion", "chat", "text", "text-label")
METHODS = ("LoRA", "QLoRA", "Full", "FreezeThaw")
PRECISIONS = ("Auto", "BF16", "FP16", "FP32")
SCHEDULERS = ("linear", "cosine", "constant")
MAX_LORA_RANK = 512
METRICS = ("eval_loss", "accuracy", "macro_f1", "perplexity")
HIGHER_IS_BETTER = ("accuracy", "macro_f1")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
CAUSAL_LM_METRICS = ("perplexity",)

# --- shared pieces ---------------------------------------------------------------------------------

STORAGE_URI = r"^(s3|file)://.+"


def _s3_credentials(what: str) -> dict:
    return obj(
        f"Credentials for {what}, read from a Secret in the job's namespace through secretKeyRef "
        "(never copied into ConfigMaps, arguments or logs).",
        {
            "secretName": string("Name of the Secret holding the keys.", pattern=DNS_LABEL_PATTERN, max_length=253),
            "accessKeyIdKey": string("Key of the access key id in the Secret.", default="AWS_ACCESS_KEY_ID"),
            "secretAccessKeyKey": string(
                "Key of the secret access key in the Secret.", default="AWS_SECRET_ACCESS_KEY"
            ),
        },
        required=["secretName"],
    )


def _s3_endpoint() -> dict:
    return string(
        "Endpoint URL of an S3-compatible store (MinIO, SeaweedFS, Ceph). Empty means AWS S3.",
        pattern=r"^https?://.+",
    )


# --- FineTuneJob ------------------------------------------------------------------------------------

BASE_MODEL = obj(
    "The model to fine-tune.",
    {
        "uri": string(
            "Where the weights come from: hf://ORG/NAME (a Hugging Face repository, or a mirror), "
            "s3://BUCKET/PREFIX or file:///PATH (a directory in the trainer image or a mounted volume).",
            pattern=r"^(hf|s3|file)://.+",
            max_length=1024,
        ),
        "revision": string(
            "Revision to pin (commit, tag or branch) so a rerun trains on the same weights.",
            default="main",
            max_length=255,
        ),
        "trustRemoteCode": boolean(
            "Allow custom modelling code shipped with the model. Off by default: it is code execution.",
            default=False,
        ),
        "credentials": obj(
            "Token for a private model repository, read from a Secret through secretKeyRef.",
            {
                "secretName": string("Name of the Secret.", pattern=DNS_LABEL_PATTERN, max_length=253),
                "tokenKey": string("Key of the token in the Secret.", default="token"),
            },
            required=["secretName"],
        ),
        "s3": obj(
            "Access to the model when uri is s3://.",
            {"endpoint": _s3_endpoint(), "credentials": _s3_credentials("the model bucket")},
        ),
    },
    required=["uri"],
    rules=[
        rule(
            "!has(self.s3) || self.uri.startsWith('s3://')",
            "baseModel.s3 applies only when baseModel.uri is s3://",
            field_path=".s3",
        ),
    ],
)

DATASET = obj(
    "Training data: JSON Lines, one example per line.",
    {
        "uri": string("JSONL file: s3://BUCKET/KEY or file:///PATH.", pattern=STORAGE_URI, max_length=1024),
        "format": string(
            "Line format. prompt-completion: {prompt, completion}; chat: {messages: [{role, content}]}; "
            "text: {text}; text-label: {text, label} for sequence classification.",
            enum=DATASET_FORMATS,
        ),
        "validationUri": string(
            "Optional separate validation file; when set, validationSplit is not used.",
            pattern=STORAGE_URI,
            max_length=1024,
        ),
        "validationSplit": number(
            "Fraction of the data held out for evaluation when no validationUri is given.",
            default=0.1,
            minimum=0,
            maximum=0.5,
        ),
        "stratifyBy": string(
            "Field whose values must appear in both splits in proportion (defaults to the label for "
            "text-label data).",
            max_length=128,
        ),
        "seed": integer("Seed of the shuffle and the split.", default=42, minimum=0),
        "maxInvalidFraction": number(
            "Share of invalid lines tolerated (skipped and reported). 0 rejects the dataset on the first "
            "error class, before any GPU time is spent.",
            default=0.0,
            minimum=0,
            maximum=1,
        ),
        "s3": obj(
            "Access to the data when uri is s3://. Defaults to the output's endpoint and credentials.",
            {"endpoint": _s3_endpoint(), "credentials": _s3_credentials("the data bucket")},
        ),
    },
    required=["uri", "format"],
)

LORA = obj(
    "Low-rank adapter parameters (LoRA and QLoRA).",
    {
        "rank": integer("Adapter rank r.", default=16, minimum=1, maximum=MAX_LORA_RANK),
        "alpha": integer("Scaling alpha; the update is scaled by alpha/r.", default=32, minimum=1, maximum=4096),
        "dropout": number("Dropout on the adapter input.", default=0.05, minimum=0, maximum=0.9),
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

TRAINING = obj(
    "Optimisation hyperparameters. Set exactly one of epochs or maxSteps.",
    {
        "epochs": number("Passes over the training split.", minimum=0, exclusive_minimum=True, maximum=1000),
        "maxSteps": integer("Optimizer steps to run.", minimum=1, maximum=10_000_000),
        "learningRate": number("Peak learning rate.", default=2e-4, minimum=0, exclusive_minimum=True,
                               maximum=1),
        "scheduler": obj(
            "Learning-rate schedule.",
            {
                "type": string("linear decay, cosine decay, or constant, each after warmup.", default="linear",
                               enum=SCHEDULERS),
                "warmupRatio": number("Share of the steps spent warming up linearly from 0.", default=0.1,
                                      minimum=0, maximum=0.5),
            },
            default={},
        ),
        "weightDecay": number("AdamW weight decay.", default=0.0, minimum=0, maximum=1),
        "maxGradNorm": number("Gradient clipping norm.", default=1.0, minimum=0, exclusive_minimum=True),
        "perDeviceBatchSize": integer("Sequences (or packed rows) per device per micro-step.", default=4,
                                      minimum=1, maximum=4096),
        "effectiveBatchSize": integer(
            "Sequences per optimizer step across all devices; gradient accumulation is derived from it, "
            "the per-device batch and the world size. Default: per-device batch x world size.",
            minimum=1,
            maximum=1_000_000,
        ),
        "maxSeqLength": integer("Tokens per sequence after tokenisation; longer examples are truncated "
                                "and counted.", default=2048, minimum=16, maximum=262_144),
        "precision": string("Auto picks bf16 where the GPU supports it, fp16 with loss scaling otherwise, "
                            "fp32 on CPU.", default="Auto", enum=PRECISIONS),
        "gradientCheckpointing": boolean("Recompute activations in backward (non-reentrant).", default=True),
        "packing": boolean("Padding-free packing of several sequences per row (position ids reset per "
                           "sequence); off means length-grouped dynamic padding.", default=True),
        "evalSteps": integer("Evaluate every N optimizer steps (default: once per epoch, or every 10% of "
                             "maxSteps).", minimum=1),
        "checkpointSteps": integer("Save a resumable checkpoint to storage every N steps.", default=500,
                                   minimum=1),
        "earlyStopping": obj(
            "Stop when the eval metric stops improving.",
            {
                "patience": integer("Evaluations without improvement before stopping.", default=3, minimum=1),
                "metric": string("Metric to watch.", default="eval_loss",
                                 enum=["eval_loss", "accuracy", "macro_f1", "perplexity"]),
                "minDelta": number("Smallest improvement that counts.", default=0.0, minimum=0),
            },
        ),
        "seed": integer("Seed of initialisation, dropout and data order.", default=42, minimum=0),
    },
    default={},
    rules=[
        rule(
            "has(self.epochs) != has(self.maxSteps)",
            "training: set exactly one of training.epochs or training.maxSteps",
            reason="FieldValueInvalid",
        ),
        rule(
            "!has(self.effectiveBatchSize) || self.effectiveBatchSize >= self.perDeviceBatchSize",
            "training.effectiveBatchSize must be >= training.perDeviceBatchSize",
            field_path=".effectiveBatchSize",
        ),
    ],
)

DISTRIBUTED = obj(
    "Where and how wide training runs: a PyTorchJob of `nodes` pods (1 Master + nodes-1 Workers), "
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

SCHEDULING = obj(
    "Placement of the training pods.",
    {
        "nodeSelector": string_map("Node labels the pods must match."),
        "tolerations": array("Tolerations (core/v1 Toleration).", opaque_object("A toleration.")),
        "affinity": opaque_object("Affinity (core/v1 Affinity)."),
        "priorityClassName": string("PriorityClass of the pods.", max_length=253),
        "queueName": string("Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label on the PyTorchJob.",
                            max_length=253),
    },
)

OUTPUT = obj(
    "Where checkpoints and the published adapter go.",
    {
        "uri": string("S3 prefix (s3://BUCKET/PREFIX); each job writes under PREFIX/NAMESPACE/NAME/UID/. "
                      "file:///PATH is accepted only by `kubetune local` (a cluster's pods cannot write to it).",
                      pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file:///.+)$", max_length=1024),
        "endpoint": _s3_endpoint(),
        "region": string("Region of the bucket.", default="us-east-1", max_length=64),
        "credentials": _s3_credentials("the output bucket"),
        "mergeAdapter": boolean("Also publish the adapter merged into the base weights (QLoRA merges into "
                                "a bf16 copy of the base, never into 4-bit weights).", default=False),
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
                        "secretName": string("Name of the Secret.", pattern=DNS_LABEL_PATTERN, max_length=253),
                        "tokenKey": string("Key of the token in the Secret.", default="token"),
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
                        "secretName": string("Name of the Secret.", pattern=DNS_LABEL_PATTERN, max_length=253),
                        "apiKeyKey": string("Key of the API key in the Secret.", default="api-key"),
                    },
                    required=["secretName"],
                ),
            },
            required=["project"],
        ),
    },
)

RUN_POLICY = obj(
    "Lifecycle of the training run, passed through to the PyTorchJob.",
    {
        "suspend": boolean("Suspend the run (pods are removed; resume by setting it back to false).",
                           default=False),
        "backoffLimit": integer("Retries after retryable failures before the job fails.", default=3, minimum=0,
                                maximum=100),
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
    "Choose the LoRA rank before training: one short trial per rank, each its own PyTorchJob, trained on "
    "the training split minus a holdout and scored on that holdout (the validation split stays unseen "
    "until the final evaluation). The best rank (ties go to the smaller rank) is used for the full run.",
    {
        "ranks": array("Ranks to try.", integer("A LoRA rank.", minimum=1, maximum=MAX_LORA_RANK),
                       default=[4, 8, 16, 32], min_items=2, max_items=16, list_type="set",
                       rules=[rule("self.all(r, self.exists_one(s, s == r))",
                                   "rankSweep.ranks must not repeat a rank")]),
        "holdoutFraction": number("Share of the training split held out to score the trials.", default=0.1,
                                  minimum=0, exclusive_minimum=True, maximum=0.5),
        "epochs": number("Passes over the remaining training data per trial.", default=1, minimum=0,
                         exclusive_minimum=True, maximum=100),
        "maxSteps": integer("Cap on each trial's optimizer steps (default: no cap beyond epochs).", minimum=1),
        "metric": string("Holdout metric that ranks the trials: eval_loss, perplexity (lower is better), "
                         "accuracy or macro_f1 (higher is better; SequenceClassification).",
                         default="eval_loss", enum=list(METRICS)),
        "parallelism": integer("Trials running at once.", default=1, minimum=1, maximum=16),
        "alpha": string("Proportional keeps alpha/rank at the spec's ratio for every trial (and the full run), "
                        "so ranks are compared at the same update scale; Fixed keeps method.lora.alpha.",
                        default="Proportional", enum=["Proportional", "Fixed"]),
        "tieTolerance": number("Metrics within this distance of the best count as a tie; the smallest tied "
                               "rank wins.", default=0.0, minimum=0),
        "nodes": integer("Pods per trial (default: distributed.nodes). Trials are short: a smaller world "
                         "lets several run side by side; the effective batch stays the same.", minimum=1,
                         maximum=1024),
        "gpusPerNode": integer("GPUs per trial pod (default: distributed.gpusPerNode).", minimum=0, maximum=16),
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
            min_items=1, max_items=8,
            rules=[rule("self.all(a, self.exists_one(b, b.name == a.name))", "evaluation.sets[].name must be unique")],
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
        "training": TRAINING,
        "backend": string("Which workload kind trains the job (and runs its baseline and sweep trials).",
                          default="PyTorchJob", enum=TRAINING_BACKENDS),
        "distributed": DISTRIBUTED,
        "resources": RESOURCES,
        "scheduling": SCHEDULING,
        "image": string("Trainer image override (default: the operator's configured trainer image).",
                        max_length=1024),
        "serviceAccountName": string("ServiceAccount of the training pods.", pattern=DNS_LABEL_PATTERN,
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
            "rankSweep.gpusPerNode: trials run on the same kind of device as training (both on GPUs or both on CPU)",
            field_path=".rankSweep.gpusPerNode",
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
            "self.method.type != 'QLoRA' || self.distributed.gpusPerNode > 0",
            "method.type QLoRA needs GPUs (distributed.gpusPerNode > 0)",
            field_path=".distributed.gpusPerNode",
        ),
    ],
)

CONDITION = obj(
    "A metav1.Condition.",
    {
        "type": string("Condition type.", max_length=316),
        "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "observedGeneration": integer("The .metadata.generation this condition was set against.", minimum=0),
        "lastTransitionTime": string("When the status last changed.", fmt="date-time"),
        "reason": string("CamelCase reason.", max_length=1024),
        "message": string("Human-readable detail.", max_length=32_768),
    },
    required=["type", "status", "lastTransitionTime", "reason", "message"],
)


def _conditions() -> dict:
    schema = array("Conditions (metav1.Condition).", CONDITION, list_type="map")
    schema["x-kubernetes-list-map-keys"] = ["type"]
    return schema


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

FINETUNEJOB_PHASES = ("Pending", "Baseline", "Sweeping", "Suspended", "Running", "Publishing", "Succeeded",
                      "Skipped", "Failed")
STAGE_STATES = ("Pending", "Running", "Succeeded", "Failed")
TRIAL_STATES = ("Queued", *STAGE_STATES)  # Queued: waiting for a free slot (rankSweep.parallelism)

BASELINE_STATUS = obj(
    "The base model's evaluation on the validation split.",
    {
        "source": string("BaselineJob: a separate evaluation job (a target can stop the run); TrainingJob: the "
                         "training job's first evaluation.", enum=["BaselineJob", "TrainingJob"]),
        "job": string("The PyTorchJob that evaluates it.", max_length=253),
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

SWEEP_TRIAL = obj(
    "One rank's trial.",
    {
        "rank": integer("LoRA rank.", minimum=1),
        "alpha": integer("LoRA alpha used.", minimum=1),
        "job": string("The trial's PyTorchJob.", max_length=253),
        "state": string("Queued (waiting for a free slot), Pending (created), Running, Succeeded or Failed.",
                        enum=list(TRIAL_STATES)),
        "metric": number("The sweep metric on the holdout."),
        "metrics": _METRICS,
        "durationSeconds": number("Wall time from start to completion.", minimum=0),
        "startTime": string("When the trial started.", fmt="date-time"),
        "completionTime": string("When it finished.", fmt="date-time"),
        "message": string("Why it failed, when it did.", max_length=32_768),
    },
    required=["rank", "state"],
)


def _trials() -> dict:
    schema = array("Trials in rank order.", SWEEP_TRIAL, list_type="map", max_items=16)
    schema["x-kubernetes-list-map-keys"] = ["rank"]
    return schema


SWEEP_STATUS = obj(
    "The rank sweep: every trial and the choice.",
    {
        "metric": string("Metric that ranks the trials.", max_length=64),
        "trials": _trials(),
        "bestRank": integer("The rank chosen for training.", minimum=1),
        "bestMetric": number("The chosen rank's metric."),
        "completed": integer("Trials finished (succeeded or failed).", minimum=0),
        "total": integer("Trials in the sweep.", minimum=0),
        "summary": string("One line for kubectl get, e.g. '3/4 done, best r8'.", max_length=256),
    },
)

_LAST_UPDATE_TIME = string(
    "When the operator last wrote this status. Fields that change on every poll (a FineTuneJob's progress, "
    "an AdapterDeployment's open drift window and running canary analysis counts) are written at most every "
    "--status-min-interval seconds; every other change is written at once.", fmt="date-time")

FINETUNEJOB_STATUS = obj(
    "Observed state, written only by the operator.",
    {
        "phase": string("Informational summary; use conditions for decisions. Baseline and Sweeping come "
                        "before training when configured; Skipped means the base model met the target.",
                        enum=list(FINETUNEJOB_PHASES)),
        "observedGeneration": integer("The generation the operator last acted on.", minimum=0),
        "lastUpdateTime": _LAST_UPDATE_TIME,
        "conditions": _conditions(),
        "method": string("Method in use.", max_length=32),
        "rank": integer("LoRA rank in use.", minimum=0),
        "trainingJob": obj(
            "The PyTorchJob running the training.",
            {
                "name": string("Name of the PyTorchJob.", max_length=253),
                "configMap": string("Name of the job config ConfigMap.", max_length=253),
                "generation": integer("Spec generation the training job was created from.", minimum=0),
            },
        ),
        "startTime": string("When training started.", fmt="date-time"),
        "completionTime": string("When the job finished (succeeded or failed).", fmt="date-time"),
        "attempts": integer("Training pod launches of the Master replica (1 + retries).", minimum=0),
        "replicas": {
            "type": "object",
            "description": "Pod counts per replica type (Master, Worker).",
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

# --- AdapterDeployment ------------------------------------------------------------------------------

ADAPTER_SOURCE = obj(
    "Where an adapter version comes from: a FineTuneJob's published adapter, or a uri with its digest.",
    {
        "fineTuneJobRef": obj(
            "A FineTuneJob in this namespace; resolves to its status.adapter (uri and digest).",
            {"name": string("Name of the FineTuneJob.", pattern=DNS_LABEL_PATTERN, max_length=253)},
            required=["name"],
        ),
        "uri": string("Location of the adapter's manifest.json or its directory.", pattern=STORAGE_URI,
                      max_length=2048),
        "digest": string("Expected sha256:HEX digest of the adapter.", pattern=r"^sha256:[a-f0-9]{64}$"),
    },
    rules=[
        rule(
            "has(self.fineTuneJobRef) != has(self.uri)",
            "source: set exactly one of source.fineTuneJobRef or source.uri",
        ),
        rule(
            "!has(self.uri) || has(self.digest)",
            "source.digest is required with source.uri, so the weights served are the weights meant",
            field_path=".digest",
        ),
    ],
)

ANALYSIS = obj(
    "Canary-versus-stable comparison over a window; failing any threshold rolls back.",
    {
        "windowSeconds": integer("Length of the comparison window.", default=300, minimum=10),
        "minRequests": integer("Requests the canary must serve before a verdict.", default=100, minimum=1),
        "maxErrorRateIncrease": number("Allowed canary error rate minus stable error rate.", default=0.01,
                                       minimum=0, maximum=1),
        "maxLatencyRatio": number("Allowed canary/stable p95 latency ratio.", default=1.5, minimum=1),
        "maxConfidenceDrop": number("Allowed drop of mean confidence against stable.", default=0.05, minimum=0,
                                    maximum=1),
    },
)

CANARY_STEP = obj(
    "One step of a canary: exactly one of setWeight, pause or analysis.",
    {
        "setWeight": integer("Percent of the alias's traffic sent to the canary.", minimum=0, maximum=100),
        "pause": obj("Wait before the next step.",
                     {"seconds": integer("Seconds to wait.", minimum=1, maximum=86_400)},
                     required=["seconds"]),
        "analysis": ANALYSIS,
    },
    rules=[
        rule(
            "[has(self.setWeight), has(self.pause), has(self.analysis)].filter(x, x).size() == 1",
            "strategy.canary.steps[]: set exactly one of setWeight, pause or analysis",
        )
    ],
)

DRIFT = obj(
    "Watch this adapter's sampled traffic (spec.trafficSampling) for drift that hurts the model; retrain "
    "through a new FineTuneJob and promote it only if it is better.",
    {
        "window": obj(
            "Windows of sampled requests, accumulated in storage (not in memory) and analysed when full.",
            {
                "requests": integer("A window closes after this many scored requests.", default=1000, minimum=10,
                                    maximum=100_000),
                "maxSeconds": integer("...or after this long, if it has at least minRequests.", default=3600,
                                      minimum=10),
                "minRequests": integer("A window with fewer scored requests is never analysed (it keeps filling).",
                                       default=200, minimum=10),
            },
            default={},
            rules=[rule("self.minRequests <= self.requests", "window.minRequests must not exceed window.requests",
                        field_path=".minRequests")],
        ),
        "thresholds": obj(
            "Thresholds are calibrated per adapter by bootstrapping windows of the window's size from the "
            "holdout in its drift profile; these set how far out a window must be.",
            {
                "sigmas": number("Mean-based tests fire beyond this many standard deviations of the bootstrapped "
                                 "window means.", default=3.0, minimum=1, maximum=10),
                "pValue": number("Two-sample tests fire above the (1 - pValue) quantile of bootstrapped null "
                                 "windows.", default=0.01, minimum=0.0001, maximum=0.2),
                "bootstraps": integer("Bootstrapped windows per calibration.", default=500, minimum=100,
                                      maximum=10_000),
                "triggerOnDiagnostics": array(
                    "Diagnostics that also count as evidence of harm (by default they are reported only).",
                    string("A diagnostic.", enum=["inputLength", "oov", "embedding"]),
                    default=[], max_items=3, list_type="set"),
            },
            default={},
        ),
        "embeddings": boolean("Compute the embedding diagnostics (centroid cosine distance, MMD) with the "
                              "operator's embedding service (--embedding-url).", default=True),
        "guard": obj(
            "What it takes to start a retrain, and to stop calling the adapter drifted.",
            {
                "triggerWindows": integer("Drifted windows needed among the last ofWindows.", default=3, minimum=1,
                                          maximum=100),
                "ofWindows": integer("Consecutive windows considered.", default=4, minimum=1, maximum=100),
                "clearWindows": integer("Consecutive clean windows before the drifted state clears "
                                        "(hysteresis).", default=2, minimum=1, maximum=100),
                "cooldownSeconds": integer("No new retrain this long after a retrain ends.", default=3600,
                                           minimum=0),
                "maxRetrainsPerPeriod": integer("Retrain budget per period.", default=3, minimum=0, maximum=1000),
                "periodSeconds": integer("The budget's period.", default=86_400, minimum=60),
            },
            default={},
            rules=[rule("self.triggerWindows <= self.ofWindows", "guard.triggerWindows must not exceed "
                        "guard.ofWindows", field_path=".triggerWindows")],
        ),
        "retrain": obj(
            "How a retrain is built. Without it, drift is detected and reported only.",
            {
                "labelledData": obj(
                    "New labelled examples (JSON Lines in the template's dataset format) collected after "
                    "deployment: every object under the prefix that no earlier retrain used.",
                    {
                        "uri": string("S3 (or file://) prefix.", pattern=STORAGE_URI, max_length=2048),
                        "minExamples": integer("No retrain with fewer new labelled examples.", default=100,
                                               minimum=1),
                        "holdoutFraction": number("Share of the new examples held out to judge the candidate.",
                                                  default=0.2, minimum=0.05, maximum=0.5),
                    },
                    required=["uri"],
                ),
                "includeOriginalData": boolean("Train on the serving adapter's training data plus the new "
                                               "examples (else the new examples only).", default=True),
                "template": obj(
                    "The FineTuneJob to create. Its spec is a FineTuneJob spec without dataset and evaluation, "
                    "which the operator fills in; the result is validated like any FineTuneJob.",
                    {
                        "metadata": obj("Labels and annotations for the FineTuneJob.", {
                            "labels": string_map("Labels."),
                            "annotations": string_map("Annotations."),
                        }),
                        "spec": opaque_object("A FineTuneJob spec (baseModel, task, method, training, "
                                              "distributed, output...)."),
                    },
                    required=["spec"],
                ),
            },
            required=["labelledData", "template"],
        ),
        "promotion": obj(
            "The gate a retrained candidate must pass before its canary starts.",
            {
                "metric": string("Metric compared (default: accuracy for classification, eval_loss otherwise).",
                                 enum=["accuracy", "macro_f1", "eval_loss", "perplexity"]),
                "minImprovement": number("The candidate must beat the serving adapter on the new holdout by more "
                                         "than this.", default=0.0, minimum=0),
                "maxRegression": number("Allowed loss of the metric on the original holdout.", default=0.02,
                                        minimum=0),
            },
            default={},
        ),
    },
)

ADAPTER = obj(
    "An adapter served under a stable alias.",
    {
        "name": string("Stable alias clients request as the model name (served namespace-qualified).",
                       pattern=DNS_LABEL_PATTERN, max_length=63),
        "source": ADAPTER_SOURCE,
        "drift": DRIFT,
    },
    required=["name", "source"],
)

ADAPTERDEPLOYMENT_SPEC = obj(
    "Which adapters to serve on which base model, and how new versions roll out.",
    {
        "baseModel": obj(
            "The base model the serving pods run; adapters trained on another base are refused.",
            {
                "uri": string("Same form as FineTuneJob spec.baseModel.uri.", pattern=r"^(hf|s3|file)://.+"),
                "revision": string("Revision of the base model.", default="main"),
            },
            required=["uri"],
        ),
        "runtime": obj(
            "Serving pods: a managed vLLM Deployment, or existing pods selected by labels.",
            {
                "managed": obj(
                    "A vLLM Deployment and Service rendered by the operator.",
                    {
                        "replicas": integer("Serving pods.", default=1, minimum=0, maximum=1000),
                        "image": string("vLLM image override.", max_length=1024),
                        "gpusPerReplica": integer("GPUs per pod (tensor parallel size).", default=1, minimum=0,
                                                  maximum=16),
                        "maxLoras": integer("Adapters resident at once per pod.", default=4, minimum=1,
                                            maximum=256),
                        "maxLoraRank": integer("Largest rank served (vLLM allows 8, 16, 32, 64, 128, 256, "
                                               "320, 512); default derived from the adapters.",
                                               enum=[1, 8, 16, 32, 64, 128, 256, 320, 512]),
                    },
                ),
                "selector": obj(
                    "Existing serving pods (every matching pod of every replica), each running the kubetune agent "
                    "next to its engine.",
                    {
                        "matchLabels": string_map("Labels the serving pods carry."),
                        "maxLoraRank": integer("The --max-lora-rank the existing engines run with (adapters above "
                                               "it are refused).", minimum=1, maximum=512),
                    },
                    required=["matchLabels"],
                ),
            },
            rules=[rule("has(self.managed) != has(self.selector)",
                        "runtime: set exactly one of runtime.managed or runtime.selector")],
        ),
        "adapters": array("Adapters to serve.", ADAPTER, min_items=1, max_items=256, list_type="map",
                          rules=[rule("self.all(a, self.exists_one(b, b.name == a.name))",
                                      "adapters[].name must be unique")]),
        "strategy": obj(
            "How a new adapter version replaces the serving one.",
            {
                "type": string("Immediate switches every pod; Canary follows the steps.", default="Canary",
                               enum=["Immediate", "Canary"]),
                "canary": obj(
                    "Canary steps.",
                    {"steps": array("Steps in order.", CANARY_STEP, min_items=1, max_items=64)},
                    required=["steps"],
                ),
                "unloadGraceSeconds": integer("Keep the old version loaded this long after promotion.",
                                              default=60, minimum=0),
            },
            default={},
            rules=[rule("self.type != 'Canary' || has(self.canary)",
                        "strategy.canary is required when strategy.type is Canary",
                        field_path=".canary")],
        ),
        "storage": obj(
            "How the serving pods' agents reach the adapters and the sample prefix (S3-compatible).",
            {
                "endpoint": _s3_endpoint(),
                "region": string("Region of the bucket.", default="us-east-1", max_length=64),
                "credentials": _s3_credentials("the adapter and sample buckets"),
            },
        ),
        "trafficSampling": obj(
            "Requests and responses sampled to storage for drift analysis.",
            {
                "rate": number("Share of requests sampled.", default=0.0, minimum=0, maximum=1),
                "uri": string("S3 prefix for samples (file:// only with `kubetune local`).", pattern=STORAGE_URI,
                              max_length=2048),
            },
            default={},
        ),
    },
    required=["baseModel", "runtime", "adapters"],
    rules=[rule("!self.adapters.exists(a, has(a.drift)) || (has(self.trafficSampling.uri) "
                "&& self.trafficSampling.rate > 0.0)",
                "adapters[].drift needs trafficSampling.uri and trafficSampling.rate > 0 (drift is measured on "
                "sampled traffic)", field_path=".trafficSampling")],
)
# The list-map above is keyed by name.
ADAPTERDEPLOYMENT_SPEC["properties"]["adapters"]["x-kubernetes-list-map-keys"] = ["name"]

ADAPTER_VERSION = obj(
    "One version of an adapter.",
    {
        "version": string("Served name: <namespace>/<adapter>@<first 12 hex of the digest>.", max_length=320),
        "digest": string("sha256:HEX of the adapter's manifest file list.", max_length=80),
        "manifestUri": string("Location of its manifest.json.", max_length=2048),
        "rank": integer("LoRA rank.", minimum=0),
        "podsLoaded": integer("Serving pods whose agent has this version loaded.", minimum=0),
    },
)

ADAPTERDEPLOYMENT_STATUS = obj(
    "Observed state, written only by the operator.",
    {
        "phase": string("Informational summary.", enum=["Pending", "Progressing", "Ready", "Degraded"]),
        "summary": string("One line for kubectl get: each alias's stable version (first 12 hex of its digest), "
                          "and the canary with its weight, e.g. 'support-bot 1a2b3c4d5e6f -> 9f8e7d6c5b4a 10%'.",
                          max_length=1024),
        "observedGeneration": integer("The generation the operator last acted on.", minimum=0),
        "lastUpdateTime": _LAST_UPDATE_TIME,
        "conditions": _conditions(),
        "adapters": array(
            "Per-alias rollout state.",
            obj(
                "Versions behind one alias.",
                {
                    "name": string("Adapter name (spec.adapters[].name).", max_length=63),
                    "alias": string("What clients request: <namespace>/<name>.", max_length=320),
                    "stable": ADAPTER_VERSION,
                    "canary": ADAPTER_VERSION,
                    "canaryWeight": integer("Percent of traffic on the canary.", minimum=0, maximum=100),
                    "stepIndex": integer("Current canary step.", minimum=0),
                    "stepStartTime": string("When the current step started.", fmt="date-time"),
                    "analysis": opaque_object("The running analysis step: per-pod counter snapshots taken at its "
                                              "start and the last verdict."),
                    "retiring": array("Former stable versions kept loaded (weight 0) until their grace period ends.",
                                      obj("A retiring version.", {
                                          **ADAPTER_VERSION["properties"],
                                          "unloadAfter": string("When it is unloaded.", fmt="date-time"),
                                      })),
                    "rolledBack": obj("The last canary rolled back; its digest is not tried again.", {
                        "digest": string("Digest.", max_length=80),
                        "version": string("Served name.", max_length=320),
                        "reason": string("Reason.", max_length=256),
                        "metric": string("The metric that failed.", max_length=64),
                        "message": string("Detail.", max_length=32_768),
                        "time": string("When.", fmt="date-time"),
                    }),
                    "refused": obj("Why the source's version is refused (preflight).", {
                        "digest": string("Digest.", max_length=80),
                        "reason": string("Reason.", max_length=256),
                        "message": string("Detail.", max_length=32_768),
                    }),
                    "podsReady": integer("Pods serving the desired version.", minimum=0),
                    "podsTotal": integer("Pods selected.", minimum=0),
                    "drift": opaque_object("Drift watch: state (Calibrating, Watching, Suspect, Drifted, "
                                           "Retraining, Cooldown), the open window, the last windows' verdicts, "
                                           "the retrain in flight, the retrain history with the gate's numbers, "
                                           "and the promoted retrain (served instead of the spec's source while "
                                           "that source is unchanged)."),
                    "podErrors": array("Errors the agents report for this alias's versions.", obj("An error.", {
                        "pod": string("Pod.", max_length=253),
                        "version": string("Served name.", max_length=320),
                        "reason": string("Reason.", max_length=256),
                        "message": string("Detail.", max_length=4096),
                    }), max_items=20),
                },
            ),
        ),
    },
)

ADAPTERDEPLOYMENT_PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Versions", "type": "string", "jsonPath": ".status.summary",
     "description": "Each alias's stable version, and the canary with its weight"},
    {"name": "Base Model", "type": "string", "jsonPath": ".spec.baseModel.uri", "priority": 1},
    {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy.type"},
    {"name": "Drift", "type": "string", "jsonPath": ".status.adapters[0].drift.state"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

KINDS = {
    "FineTuneJob": {
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "spec": FINETUNEJOB_SPEC,
        "status": FINETUNEJOB_STATUS,
        "printerColumns": FINETUNEJOB_PRINTER_COLUMNS,
        "description": "Fine-tune a base model with LoRA, QLoRA, full or freeze-thaw training and publish "
                       "a checksummed adapter to S3.",
    },
    "AdapterDeployment": {
        "plural": "adapterdeployments",
        "singular": "adapterdeployment",
        "shortNames": ["adep"],
        "spec": ADAPTERDEPLOYMENT_SPEC,
        "status": ADAPTERDEPLOYMENT_STATUS,
        "printerColumns": ADAPTERDEPLOYMENT_PRINTER_COLUMNS,
        "description": "Serve versioned LoRA adapters on a base model, rolled out by canary with "
                       "automatic rollback.",
    },
}
