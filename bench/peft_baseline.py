"""The baseline of bench/quality.py: the plain PEFT + transformers script a user writes first (HF Trainer,
LoRA q/v r16, lr 2e-3, batch 32, 3 epochs, linear schedule with 10% warmup), then scored on a test file.

    python bench/peft_baseline.py TRAIN.jsonl TEST.jsonl OUT.json [--epochs 3]

Reads text-label JSON Lines; writes accuracy, macro-F1 and wall seconds to OUT.json. Kept as a user
would write it on purpose: it is the thing kubetune is measured against, not a part of kubetune.
"""

import argparse
import json
import time

STARTED = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from common import minilm_dir  # noqa: E402


def read(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows, tokenizer, label_ids):
        self.encodings = tokenizer([r["text"] for r in rows], truncation=True, max_length=64)
        self.labels = [label_ids[r["label"]] for r in rows]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.encodings["input_ids"][i], "attention_mask": self.encodings["attention_mask"][i],
                "labels": self.labels[i]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("train"), parser.add_argument("test"), parser.add_argument("out")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--work", default="/tmp/peft-baseline")
    args = parser.parse_args()
    train, test = read(args.train), read(args.test)
    labels = sorted({r["label"] for r in train})
    label_ids = {name: i for i, name in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32, lora_dropout=0.1,
                                             target_modules=["query", "value"]))
    arguments = TrainingArguments(args.work, num_train_epochs=args.epochs, learning_rate=2e-3,
                                  per_device_train_batch_size=32, per_device_eval_batch_size=64,
                                  warmup_steps=0.1, lr_scheduler_type="linear", logging_steps=50,
                                  save_strategy="no", report_to=[], seed=42)
    trainer = Trainer(model=model, args=arguments, train_dataset=Rows(train, tokenizer, label_ids),
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    predictions = trainer.predict(Rows(test, tokenizer, label_ids))
    predicted = np.argmax(predictions.predictions, axis=-1)
    truth = predictions.label_ids
    result = {"accuracy": float((predicted == truth).mean()),
              "macro_f1": float(f1_score(truth, predicted, average="macro")),
              "test": len(test), "train": len(train), "wall_seconds": round(time.time() - STARTED, 1)}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
