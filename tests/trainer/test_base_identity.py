"""The base model's identity the trainer records: the safetensors files' sha256 from the hub cache's
blob names, the node cache's marker, or hashed when small (kubetune_trainer.modeling.weight_hashes)."""

from __future__ import annotations

import hashlib
import json

from kubetune.api import base_identity
from kubetune_trainer import modeling, node_cache

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def test_the_hub_caches_blob_names_are_the_weights_sha256(tmp_path):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "0123abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    name = "f" * 64  # not the content's hash: proves the name is read, not the file
    (blobs / name).write_bytes(b"weights")
    (snapshot / "model.safetensors").symlink_to(blobs / name)
    (snapshot / "config.json").write_text(json.dumps(CONFIG))
    assert modeling.weight_hashes(snapshot) == {"model.safetensors": name}
    found = modeling.model_identity(snapshot, {"uri": "hf://org/m", "revision": "main"})
    assert found == base_identity.identity(CONFIG, "main", {"model.safetensors": name})


def test_the_node_caches_marker_or_the_files_themselves(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    hashed = hashlib.sha256(b"weights").hexdigest()
    assert modeling.weight_hashes(tmp_path) == {"model.safetensors": hashed}
    recorded = [node_cache.CachedFile("model.safetensors", 7, "etag", "e" * 64)]
    node_cache._write_marker(tmp_path, recorded)
    assert modeling.weight_hashes(tmp_path) == {"model.safetensors": "e" * 64}
    (tmp_path / "model.safetensors").unlink()
    assert modeling.weight_hashes(tmp_path) is None
