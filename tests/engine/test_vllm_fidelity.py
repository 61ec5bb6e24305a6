"""The CPU engine answers as vLLM v0.11.0 does (`kubetune_engine.vllm_api`): PEFTHelper's refusals in
its words, runtime loading that never refuses for count (an LRU cache of --max-cpu-loras adapter
weights), and `vllm serve`'s arguments. Real engine processes, adapters the real trainer published."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.api import serving

from .conftest import EngineProcess
from .test_engine import assert_error, complete, loaded, token_logprobs


def variant(adapter: Path, root: Path, name: str, **changes) -> Path:
    """A copy of a published adapter with its adapter_config.json changed (None: the key removed)."""
    copy = shutil.copytree(adapter, root / name)
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(changes)
    config = {key: value for key, value in config.items() if value is not None}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def test_vllm_fidelity_refuses_what_peft_helper_refuses(llama_engine, lm_adapters, tmp_path):
    r4 = lm_adapters[4]
    cases = {
        "head": ({"modules_to_save": ["lm_head"]}, "vLLM only supports modules_to_save being None."),
        "dora": ({"use_dora": True}, "vLLM does not yet support DoRA."),
        "bias": ({"bias": "all"}, "Adapter bias cannot be used without bias_enabled."),
        "alpha": ({"lora_alpha": None}, "Missing required configuration fields: {'lora_alpha'}"),
        # every broken rule at once, joined as validate_legal joins them
        "all": ({"modules_to_save": ["lm_head"], "use_dora": True, "r": 16},
                "vLLM only supports modules_to_save being None. vLLM does not yet support DoRA. "
                "LoRA rank 16 is greater than max_lora_rank 8."),
    }
    for name, (changes, message) in cases.items():
        error = assert_error(llama_engine.load(f"test/{name}@1", variant(r4, tmp_path, name, **changes)), 400,
                             "BadRequestError")
        assert error["message"] == message
    assert llama_engine.model_ids() == [llama_engine.served_name]  # nothing half-registered


def test_kubetune_fidelity_differs_only_by_serving_classifiers(minilm_engine, intent_classifier, tmp_path):
    with loaded(minilm_engine, test_intents=intent_classifier.path) as [name]:  # modules_to_save: served
        assert minilm_engine.post(serving.ENGINE_CLASSIFY, {"model": name, "input": "hi"}).status == 200
    dora = variant(intent_classifier.path, tmp_path, "dora", use_dora=True)
    error = assert_error(minilm_engine.load("test/dora@1", dora), 400, "BadRequestError")
    assert error["message"] == "vLLM does not yet support DoRA."


def test_loads_beyond_the_cpu_cache_are_registered_and_served_correctly(llama_engine, lm_adapters):
    """--max-loras 2 (so --max-cpu-loras 2): four adapters load, every one answers as it did alone,
    and at most two hold weights in memory at any time (the engine's log says which)."""
    with loaded(llama_engine, test_a=lm_adapters[4], test_b=lm_adapters[8]) as (a, b):
        alone = {4: token_logprobs(complete(llama_engine, a)), 8: token_logprobs(complete(llama_engine, b))}
    names = {f"test/lru{i}@0123456789ab": rank for i, rank in enumerate((4, 8, 4, 8))}
    try:
        for name, rank in names.items():
            reply = llama_engine.load(name, lm_adapters[rank])
            assert reply.status == 200, reply.text
        assert llama_engine.model_ids() == [llama_engine.served_name, *names]
        for name in [*names, *reversed(names), *names]:  # every use but a repeat reloads an evicted adapter
            assert token_logprobs(complete(llama_engine, name)) == pytest.approx(alone[names[name]], abs=1e-5), name
    finally:
        for name in names:
            llama_engine.unload(name)
    log = [json.loads(line) for line in llama_engine.log().splitlines() if line.startswith("{")]
    cached = [entry for entry in log if entry["message"] == "adapter in the CPU cache"]
    evicted = [entry for entry in log if entry["message"] == "adapter evicted from the CPU cache"]
    assert cached and max(entry["resident"] for entry in cached) == 2
    assert {entry["max_cpu_loras"] for entry in cached} == {2}
    assert {entry["lora_name"] for entry in evicted} >= set(names)


def engine_command(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune_engine", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_vllm_serve_arguments(tmp_path):
    # --model still works, with vLLM's deprecation warning (here: then no config.json, exit 1)
    deprecated = engine_command("--model", str(tmp_path), "--port", "0")
    assert deprecated.returncode == 1
    assert "you should provide the model as a positional argument" in deprecated.stdout + deprecated.stderr
    twice = engine_command(str(tmp_path), "--model", str(tmp_path))
    assert twice.returncode == 2 and "the model is given twice" in twice.stderr
    # LoRAConfig's rule: the CPU cache holds at least one batch's adapters
    small_cache = engine_command(str(tmp_path), "--max-loras", "2", "--max-cpu-loras", "1")
    assert small_cache.returncode == 2 and "max_cpu_loras (1) must be >= max_loras (2)" in small_cache.stderr


def test_positional_model_serves(llama_engine: EngineProcess):
    assert llama_engine.process.args[3] == str(llama_engine.model)  # python -m kubetune_engine MODEL ...
    assert llama_engine.model_ids() == [llama_engine.served_name]
