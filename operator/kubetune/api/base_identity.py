"""A base model's identity (pure): what its config.json and weights say it is, independent of where a
copy of it lives, so that an adapter trained on `hf://org/m` may be served from its `s3://` mirror and
another model at the same URI is refused. The trainer records it in the manifest (`baseModel.identity`);
the operator resolves the served base's and pre-flight compares the two (docs/concepts.md).
"""

from __future__ import annotations

import hashlib
import json

# Keys that differ between copies of the same weights, so they are left out of the config digest:
# where the copy was loaded from, the transformers version that last saved it, the hub commit it was
# fetched at (the revision is recorded on its own) and the attention kernel a loader picked at runtime.
VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash",
                                  "_attn_implementation_autoset", "_attn_implementation_internal"})
WEIGHT_SUFFIX = ".safetensors"
# Weights whose sha256 nobody recorded are hashed (trainer at publish time, operator when resolving the
# served base) only up to this total size: cheap for small models, never a pass spent reading 16 GB.
HASHED_WEIGHTS_LIMIT = 256 << 20


def _without_volatile(value: object) -> object:
    """The config with the volatile keys removed at every level (composite models nest sub-configs)."""
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def config_digest(config: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of config.json without its volatile keys."""
    canonical = json.dumps(_without_volatile(config), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def architecture(config: dict) -> str | None:
    """config.json's first `architectures` entry, else its `model_type`."""
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def weights_digest(file_sha256: dict[str, str]) -> str | None:
    """sha256 over the sorted `name sha256` lines of the safetensors files (None when there are none)."""
    lines = sorted(f"{name} {sha}" for name, sha in file_sha256.items() if name.endswith(WEIGHT_SUFFIX))
    if not lines:
        return None
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def revision_of(base: dict) -> str | None:
    """A baseModel's revision where it means something: hf:// (s3:// and file:// copies have none)."""
    return (base.get("revision") or "main") if base["uri"].startswith("hf://") else None


def identity(config: dict, revision: str | None, file_sha256: dict[str, str] | None = None) -> dict:
    """The identity of a model directory's metadata: {architecture, configDigest, revision, weightsDigest}."""
    return {"architecture": architecture(config), "configDigest": config_digest(config), "revision": revision,
            "weightsDigest": weights_digest(file_sha256) if file_sha256 else None}


def parse_config(raw: bytes, where: str) -> dict:
    """config.json's bytes as a dict; ValueError naming `where` when it is not a JSON object."""
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{where}: config.json is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config.json is not a JSON object")
    return config


def compare(trained: object, served: object) -> tuple[bool | None, str]:
    """(same, why): True when the two identities name the same model, False when they differ (why names
    what differs), None when one is unknown (why says which). The weights digest and the revision decide
    only where both sides know them: an s3:// mirror has no revision, and the operator reads no weights."""
    if not isinstance(trained, dict):
        return None, "the manifest records no base model identity"
    if not isinstance(served, dict):
        return None, "the served base model's identity is unknown"
    for key, what in (("architecture", "architecture"), ("configDigest", "config.json digest")):
        if trained.get(key) != served.get(key):
            return False, f"{what} {trained.get(key)} (trained) vs {served.get(key)} (served)"
    trained_weights, served_weights = trained.get("weightsDigest"), served.get("weightsDigest")
    if trained_weights and served_weights:
        if trained_weights != served_weights:
            return False, f"weights digest {trained_weights} (trained) vs {served_weights} (served)"
        return True, "same architecture, config.json and weights"
    trained_revision, served_revision = trained.get("revision"), served.get("revision")
    if trained_revision and served_revision and trained_revision != served_revision:
        return False, f"revision {trained_revision} (trained) vs {served_revision} (served)"
    return True, "same architecture and config.json"
