"""Sentence embeddings for `/v1/embeddings` (`--embedding-model DIR`): the sentence-transformers recipe of
all-MiniLM-L6-v2 on plain transformers (mean pooling, L2 normalisation), matching
`SentenceTransformer(DIR).encode(texts, normalize_embeddings=True)`. Not thread-safe: the server calls it
from one worker thread at a time. How it pools and batches: docs/serving-runtimes.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length (its positions go to 512; it was trained on 128)
BATCH_SIZE = 64
POOLING_CONFIG = Path("1_Pooling") / "config.json"
SENTENCE_CONFIG = "sentence_bert_config.json"


@dataclass
class Embedded:
    vectors: list[list[float]]
    tokens: int  # input tokens after truncation, special tokens included (the usage the API reports)


class SentenceEncoder:
    """A sentence-encoder directory (config.json, weights, tokenizer; optionally the sentence-transformers
    files) served under `name`."""

    def __init__(self, model_dir: Path, *, name: str, batch_size: int = BATCH_SIZE):
        self.model_dir = Path(model_dir)
        self.name = name
        self.batch_size = batch_size
        self.max_seq_length = MAX_SEQ_LENGTH
        self.dimension: int | None = None
        self.tokenizer = None
        self.model = None

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"--embedding-model {self.model_dir}: no config.json there")
        pooling = _json(self.model_dir / POOLING_CONFIG)
        if pooling and not pooling.get("pooling_mode_mean_tokens", False):
            raise ValueError(f"--embedding-model {self.model_dir}: {POOLING_CONFIG} asks for another pooling than "
                             "mean pooling, the only one served")
        configured = (_json(self.model_dir / SENTENCE_CONFIG) or {}).get("max_seq_length")
        if isinstance(configured, int) and configured > 0:
            self.max_seq_length = configured
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.eval()
        self.dimension = int(self.model.config.hidden_size)
        log.info("embedding model loaded", extra={"model": str(self.model_dir), "served_name": self.name,
                                                  "dimension": self.dimension, "max_seq_length": self.max_seq_length})

    def embed(self, texts: list[str]) -> Embedded:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # long first, as sentence-transformers
        vectors: list[list[float] | None] = [None] * len(texts)
        tokens = 0
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                encoded = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                         max_length=self.max_seq_length, return_tensors="pt")
                hidden = self.model(**encoded).last_hidden_state.float()
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                normalised = torch.nn.functional.normalize(pooled, p=2, dim=1)
                tokens += int(encoded["attention_mask"].sum())
                for i, row in zip(chunk, normalised.tolist(), strict=True):
                    vectors[i] = row
        return Embedded(vectors, tokens)  # type: ignore[arg-type]


def _json(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None
