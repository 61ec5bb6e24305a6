"""FineTuneJob's training settings (`spec.training`) and classification head (`spec.classifier`).

Settings left out are derived by the trainer from the task and the data (kubetune.api.training_defaults).
"""

from __future__ import annotations

from ..schema import boolean, integer, number, obj, rule, string

PRECISIONS = ("Auto", "BF16", "FP16", "FP32")
SCHEDULERS = ("linear", "cosine", "constant")


TRAINING = obj(
    "Optimisation hyperparameters. Set exactly one of epochs or maxSteps.",
    {
        "epochs": number("Passes over the training split. Without epochs or maxSteps: derived from the task "
                         "and the training split's size (docs/trainer.md#defaults).", minimum=0,
                         exclusive_minimum=True, maximum=1000),
        "maxSteps": integer("Optimizer steps to run.", minimum=1, maximum=10_000_000),
        "learningRate": number("Peak learning rate of the trained weights (LoRA adapters, or the whole model). "
                               "Default: derived from the task and method (docs/trainer.md#defaults).",
                               minimum=0, exclusive_minimum=True, maximum=1),
        "headLearningRate": number("Peak learning rate of a new classification head (SequenceClassification), "
                                   "which starts from random weights and needs a larger one than the adapters. "
                                   "Default: derived (docs/trainer.md#defaults).", minimum=0,
                                   exclusive_minimum=True, maximum=1),
        "scheduler": obj(
            "Learning-rate schedule.",
            {
                "type": string("linear decay, cosine decay, or constant, each after warmup.", default="linear",
                               enum=SCHEDULERS),
                "warmupRatio": number("Share of the steps spent warming up linearly from 0. Default: derived "
                                      "from the run's length (docs/trainer.md#defaults).", minimum=0, maximum=0.5),
            },
            default={},
        ),
        "weightDecay": number("AdamW weight decay.", default=0.0, minimum=0, maximum=1),
        "maxGradNorm": number("Gradient clipping norm.", default=1.0, minimum=0, exclusive_minimum=True),
        "perDeviceBatchSize": integer("Sequences (or packed rows) per device per micro-step. Default: derived "
                                      "from the task (docs/trainer.md#defaults).", minimum=1, maximum=4096),
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
        "gradientCheckpointing": boolean("Recompute activations in backward (non-reentrant): less memory, ~30% "
                                         "more compute. Default: on for models of 1B parameters or more, or "
                                         "micro-batches of 16k tokens or more (docs/trainer.md#defaults)."),
        "packing": boolean("Padding-free packing of several sequences per row (position ids reset per sequence); "
                           "off means length-grouped dynamic padding. Default: on GPUs, off on CPU, where "
                           "attention over a packed row costs more than the padding it saves "
                           "(docs/trainer.md#defaults)."),
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
            "!(has(self.epochs) && has(self.maxSteps))",
            "training: set at most one of training.epochs or training.maxSteps",
            reason="FieldValueInvalid",
        ),
        rule(
            "!has(self.effectiveBatchSize) || !has(self.perDeviceBatchSize) "
            "|| self.effectiveBatchSize >= self.perDeviceBatchSize",
            "training.effectiveBatchSize must be >= training.perDeviceBatchSize",
            field_path=".effectiveBatchSize",
        ),
    ],
)

CLASSIFIER = obj(
    "The classification head (task SequenceClassification).",
    {
        "pooling": string("How the head reads the encoder's tokens. Auto pools as the checkpoint was trained "
                          "(a sentence-transformers Pooling config: Mean, CLS or Max) and otherwise keeps the "
                          "architecture's own head (BERT: dense + tanh over [CLS]). Recorded in the manifest; "
                          "the serving engine pools the same way.", default="Auto",
                          enum=["Auto", "Mean", "CLS", "Max", "Architecture"]),
    },
    default={},
)
