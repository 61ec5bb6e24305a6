"""Pre-flight refuses what the runtime cannot serve and compares base models by identity, not URI:
base_identity's digests and comparison, the refusals, and the I/O that reads both sides."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from kubetune.api import base_identity
from kubetune.api.validation import validate
from kubetune.clients import storage
from kubetune_operator.clients import base_models, sources
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_testing.factories import adapterdeployment

DIGEST = "sha256:" + "a" * 64
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "_name_or_path": "/cache/models/llama", "transformers_version": "4.46.0", "torch_dtype": "float32"}
LORA_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none",
               "modules_to_save": None}
IDENTITY = base_identity.identity(CONFIG, "main")


def spec_adep(engine: str | None = None, base: dict | None = None) -> dict:
    adep = adapterdeployment()
    if engine:
        adep["spec"]["runtime"]["engine"] = engine
    if base:
        adep["spec"]["baseModel"] = base
    result = validate(adep)
    assert result.ok, result.errors
    return {**adep, "metadata": {**adep["metadata"], "generation": 1}, "spec": result.defaulted["spec"]}


def refusals(adep: dict, served_base: tuple | None = None, **source) -> list:
    fields = {"manifest_uri": "s3://adapters/x/manifest.json", "digest": DIGEST, "rank": 8, "method": "LoRA",
              "adapter_config": LORA_CONFIG,
              "base_model": {"uri": adep["spec"]["baseModel"]["uri"], "identity": IDENTITY}, **source}
    return adp.preflight(adep, adep["spec"]["adapters"][0], adp.Source(**fields), adp.Settings(), 64, served_base)


# --- base_identity ---------------------------------------------------------------------------------------


def test_the_config_digest_ignores_what_differs_between_copies_of_the_same_weights():
    copy_elsewhere = {**CONFIG, "_name_or_path": "meta-llama/Llama-2-7b-hf", "transformers_version": "4.57.1",
                      "_commit_hash": "abc", "_attn_implementation_autoset": True}
    assert base_identity.config_digest(copy_elsewhere) == base_identity.config_digest(CONFIG)
    nested = {"text_config": {**CONFIG}}
    assert base_identity.config_digest(nested) == base_identity.config_digest(
        {"text_config": {**CONFIG, "_name_or_path": "elsewhere"}})
    assert base_identity.config_digest({**CONFIG, "hidden_size": 128}) != base_identity.config_digest(CONFIG)
    assert base_identity.config_digest({**CONFIG, "torch_dtype": "bfloat16"}) != base_identity.config_digest(CONFIG)
    assert base_identity.architecture(CONFIG) == "LlamaForCausalLM"
    assert base_identity.architecture({"model_type": "bert"}) == "bert"


def test_the_weights_digest_covers_the_safetensors_files_only():
    files = {"model.safetensors": "1" * 64, "tokenizer.json": "2" * 64}
    assert base_identity.weights_digest(files) == base_identity.weights_digest({"model.safetensors": "1" * 64})
    assert base_identity.weights_digest(files) != base_identity.weights_digest({"model.safetensors": "3" * 64})
    assert base_identity.weights_digest({"tokenizer.json": "2" * 64}) is None


def test_compare_says_what_differs_and_when_it_cannot_tell():
    weights = {"model.safetensors": "1" * 64}
    trained = base_identity.identity(CONFIG, "main", weights)
    assert base_identity.compare(trained, base_identity.identity(CONFIG, None))[0] is True  # a mirror: no revision
    assert base_identity.compare(trained, base_identity.identity(CONFIG, "v2", weights))[0] is True
    same, why = base_identity.compare(trained, base_identity.identity({**CONFIG, "hidden_size": 32}, "main"))
    assert same is False and "config.json digest" in why
    same, why = base_identity.compare(trained, base_identity.identity(CONFIG, "main", {"model.safetensors": "9" * 64}))
    assert same is False and "weights digest" in why
    same, why = base_identity.compare(base_identity.identity(CONFIG, "main"), base_identity.identity(CONFIG, "v2"))
    assert same is False and "revision main (trained) vs v2 (served)" in why
    same, why = base_identity.compare(trained, base_identity.identity({**CONFIG, "architectures": ["Other"]}, "main"))
    assert same is False and "architecture" in why
    assert base_identity.compare(None, trained) == (None, "the manifest records no base model identity")
    assert base_identity.compare(trained, None)[0] is None


# --- what the runtime cannot serve --------------------------------------------------------------------------


def test_whole_weights_are_refused_on_every_runtime():
    for engine in ("vllm", "kubetune-cpu"):
        for method in ("Full", "FreezeThaw"):
            found = refusals(spec_adep(engine), method=method, rank=None, adapter_config=None)
            assert [r for r, _ in found] == ["NotAnAdapter"]
            assert f"method {method} publishes whole weights" in found[0][1]
    found = refusals(spec_adep(), adapter_config={**LORA_CONFIG, "peft_type": "IA3"})
    assert found[0][0] == "NotAnAdapter" and "peft_type IA3" in found[0][1]


def test_a_classification_adapter_is_refused_on_vllm_and_served_by_the_cpu_engine():
    classification = {**LORA_CONFIG, "modules_to_save": ["score"]}
    found = refusals(spec_adep("vllm"), adapter_config=classification)
    assert [r for r, _ in found] == ["AdapterUnsupported"]
    message = found[0][1]
    assert "adapters[support-bot]: adapter_config.json modules_to_save ['score']" in message
    assert "vLLM only supports modules_to_save being None" in message
    assert "spec.runtime.engine vllm cannot serve it, serve it with spec.runtime.engine: kubetune-cpu" in message
    assert refusals(spec_adep("kubetune-cpu"), adapter_config=classification) == []


def test_vllm_refuses_dora_and_adapter_bias():
    found = refusals(spec_adep(), adapter_config={**LORA_CONFIG, "use_dora": True, "bias": "lora_only"})
    assert [r for r, _ in found] == ["AdapterUnsupported", "AdapterUnsupported"]
    assert "use_dora" in found[0][1] and "bias 'lora_only'" in found[1][1]
    assert refusals(spec_adep("kubetune-cpu"), adapter_config={**LORA_CONFIG, "use_dora": True}) == []


# --- the base model by identity ----------------------------------------------------------------------------


def test_an_s3_mirror_of_the_same_base_is_accepted():
    mirror = spec_adep(base={"uri": "s3://models/llama-2-7b"})
    trained_on = {"uri": "hf://meta-llama/Llama-2-7b-hf", "revision": "main", "identity": IDENTITY}
    served = (base_identity.identity({**CONFIG, "_name_or_path": "/mnt/mirror"}, None), "read")
    assert refusals(mirror, served, base_model=trained_on) == []


def test_another_model_at_the_same_uri_is_refused_naming_what_differs():
    adep = spec_adep()
    served = (base_identity.identity({**CONFIG, "hidden_size": 4096}, None), "read")
    found = refusals(adep, served)
    assert [r for r, _ in found] == ["BaseModelMismatch"]
    assert "which is another model: config.json digest" in found[0][1]


def test_an_unverifiable_base_falls_back_to_the_uri():
    unknown = (None, "baseModel.uri hf://meta-llama/Llama-2-7b-hf: HTTP Error 401")
    assert refusals(spec_adep(), unknown) == []  # same URI, as before identities were recorded
    found = refusals(spec_adep(base={"uri": "s3://models/llama-2-7b"}), unknown,
                     base_model={"uri": "hf://meta-llama/Llama-2-7b-hf", "identity": IDENTITY})
    assert found[0][0] == "BaseModelMismatch" and "cannot be verified: baseModel.uri" in found[0][1]
    old_manifest = {"uri": "hf://mistralai/Mistral-7B-v0.1", "revision": None}  # no identity recorded
    assert refusals(spec_adep(), None, base_model=old_manifest)[0][0] == "BaseModelMismatch"


# --- the I/O around it ---------------------------------------------------------------------------------------


def write_model(directory, config: dict, weights: bytes = b"weights") -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(weights)


def test_the_served_identity_is_read_from_storage_with_its_weights(tmp_path):
    write_model(tmp_path / "base", CONFIG)
    write_model(tmp_path / "mirror", {**CONFIG, "_name_or_path": "mirror"})
    store = storage.ObjectStore()
    found, _ = base_models.read_identity(store, {"uri": f"file://{tmp_path}/base", "revision": None})
    mirrored, _ = base_models.read_identity(store, {"uri": f"file://{tmp_path}/mirror"})
    sha = hashlib.sha256(b"weights").hexdigest()
    assert found == mirrored == base_identity.identity(CONFIG, None, {"model.safetensors": sha})
    missing, why = base_models.read_identity(store, {"uri": f"file://{tmp_path}/nothing"})
    assert missing is None and "no config.json" in why
    assert base_models.hub_config_url("org/m", None).endswith("/org/m/resolve/main/config.json")
    listing = {"siblings": [{"rfilename": "model.safetensors", "lfs": {"sha256": sha}},
                            {"rfilename": "config.json"}, {"rfilename": "onnx/model.safetensors",
                                                           "lfs": {"sha256": "0" * 64}}]}
    assert base_models.hub_weights(json.dumps(listing).encode()) == {"model.safetensors": sha}
    assert base_models.hub_weights(b"not json") is None


async def test_the_served_identity_is_cached_per_uri_and_revision(tmp_path):
    write_model(tmp_path / "base", CONFIG)
    base, cache = {"uri": f"file://{tmp_path}/base"}, {}
    first = await base_models.served_identity(storage.ObjectStore(), base, cache)
    (tmp_path / "base" / "config.json").write_text(json.dumps({**CONFIG, "hidden_size": 1}))
    assert await base_models.served_identity(storage.ObjectStore(), base, cache) == first
    assert list(cache) == [(base["uri"], None)]


def test_adapter_config_is_read_only_when_it_matches_the_manifest(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    raw = json.dumps(LORA_CONFIG).encode()
    (adapter / "adapter_config.json").write_bytes(raw)
    files = [{"path": "adapter_config.json", "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}]
    store, uri = storage.ObjectStore(), f"file://{adapter}/"
    assert sources.read_adapter_config(store, uri, {"files": files, "method": "LoRA"}) == LORA_CONFIG
    tampered = copy.deepcopy(files)
    tampered[0]["sha256"] = "0" * 64
    with pytest.raises(sources.AdapterConfigProblem, match="does not match its sha256"):
        sources.read_adapter_config(store, uri, {"files": tampered, "method": "LoRA"})
    weights_only = [{"path": "model.safetensors", "sha256": "1" * 64, "size": 1}]
    assert sources.read_adapter_config(store, uri, {"files": weights_only, "method": "Full"}) is None
    with pytest.raises(sources.AdapterConfigProblem, match=r"no adapter_config\.json"):
        sources.read_adapter_config(store, uri, {"files": weights_only, "method": "LoRA"})
