"""The base model's tokenizer files, and only those: what the data stage downloads (never the weights).

file:// is read in place, s3:// listed and filtered, hf:// fetched with `snapshot_download(allow_patterns=)`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from pathlib import Path

from .errors import BadInput

log = logging.getLogger(__name__)

# What AutoTokenizer reads: its own files, the vocabularies of every tokenizer family (BPE vocab/merges,
# WordPiece vocab, SentencePiece and tiktoken models), chat templates, config.json (which names the
# tokenizer class when tokenizer_config.json does not) and remote tokenizer code. Never weights.
TOKENIZER_PATTERNS = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.tiktoken", "tiktoken.*",
    "chat_template.json", "chat_template.jinja", "additional_chat_templates/*.jinja", "tokenization_*.py",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def is_tokenizer_file(relative_path: str) -> bool:
    """Whether a file of a model directory (path relative to it, "/"-separated) is one the tokenizer reads."""
    if relative_path.lower().endswith(WEIGHT_SUFFIXES):
        return False
    return any(fnmatch.fnmatchcase(relative_path, pattern) for pattern in TOKENIZER_PATTERNS)


def resolve_tokenizer_dir(base_model: dict, store, cache_dir: Path) -> Path:
    """A local directory holding the base model's tokenizer files (and no weights unless file://)."""
    uri, revision = base_model["uri"], base_model.get("revision", "main")
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        path = Path("/" + rest.lstrip("/"))
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise BadInput(f"baseModel.uri {uri}: no config.json or tokenizer_config.json in {path}")
        return path
    if scheme == "s3":
        return _from_s3(uri, store, cache_dir)
    if scheme == "hf":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(rest, revision=revision, token=os.environ.get("HF_TOKEN") or None,
                                          cache_dir=str(cache_dir / "hf"), allow_patterns=list(TOKENIZER_PATTERNS)))
        except Exception as exc:  # offline, private, missing: all need a spec or mirror fix
            raise BadInput(f"baseModel.uri {uri}@{revision}: {exc}") from exc
    raise BadInput(f"baseModel.uri {uri}: unsupported scheme")


def _from_s3(uri: str, store, cache_dir: Path) -> Path:
    prefix = uri.rstrip("/") + "/"
    target = cache_dir / "tokenizers" / re.sub(r"[^A-Za-z0-9._-]", "_", prefix)
    done = target / ".complete"
    if done.exists():
        return target
    wanted = [u for u in store.list(prefix) if is_tokenizer_file(u[len(prefix):])]
    if not wanted:
        raise BadInput(f"baseModel.uri {uri}: no tokenizer files under that prefix "
                       f"(looked for {', '.join(TOKENIZER_PATTERNS[:4])}, ...)")
    for object_uri in wanted:
        store.download_file(object_uri, target / object_uri[len(prefix):])
    log.info("tokenizer files downloaded", extra={"files": [u[len(prefix):] for u in wanted], "model": uri})
    done.write_text("ok")
    return target
