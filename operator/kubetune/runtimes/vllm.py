"""vLLM's OpenAI-compatible server with runtime LoRA updating: its limits, its control API and the
engine container of a managed AdapterDeployment (`vllm serve MODEL ...`, as vllm/vllm-openai's
ENTRYPOINT runs it; the flags as vLLM v0.11.0's engine/arg_utils.py and config/lora.py read them)."""

from __future__ import annotations

from kubetune.runtimes import EngineApi, PodLayout, ServingRuntime, peft_rules
from kubetune.runtimes.base_model import base_model_env

ENGINE_API = EngineApi(health="/health", models="/v1/models", load="/v1/load_lora_adapter",
                       unload="/v1/unload_lora_adapter", already_loaded="already been loaded",
                       not_found="cannot be found")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
IMAGE = "vllm/vllm-openai:v0.11.0"

# Where the engine's caches go, so that its root filesystem can be read-only (docs/security.md).
ENGINE_WRITABLE_ENV = (
    ("HOME", "/tmp/home"),
    ("XDG_CACHE_HOME", "/tmp/home/.cache"),
    ("XDG_CONFIG_HOME", "/tmp/home/.config"),
    ("VLLM_CACHE_ROOT", "/tmp/home/.cache/vllm"),
    ("TRITON_CACHE_DIR", "/tmp/home/.triton"),
    ("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor"),
    ("NUMBA_CACHE_DIR", "/tmp/numba"),
    ("VLLM_NO_USAGE_STATS", "1"),
    ("DO_NOT_TRACK", "1"),
)


def model_args(base: dict) -> list[str]:
    """The model, positional (`--model` is deprecated in `vllm serve`), and how vLLM loads it."""
    uri, revision = base["uri"], base.get("revision")
    if uri.startswith("hf://"):
        args = [uri.removeprefix("hf://")] + (["--revision", revision] if revision else [])
    elif uri.startswith("s3://"):  # streamed straight from object storage (the image ships runai-model-streamer)
        args = [uri, "--load-format", "runai_streamer"]
    else:
        args = [uri.removeprefix("file://")]
    return args + (["--trust-remote-code"] if base.get("trustRemoteCode") else [])


def lora_args(managed: dict, max_lora_rank: int) -> list[str]:
    """--max-loras: adapters in one batch; --max-cpu-loras: vLLM's LRU cache of loaded adapters."""
    args = ["--max-lora-rank", str(max_lora_rank), "--max-loras", str(managed["maxLoras"])]
    return args + (["--max-cpu-loras", str(managed["maxCpuLoras"])] if managed.get("maxCpuLoras") else [])


def engine_container(spec: dict, layout: PodLayout, max_lora_rank: int) -> dict:
    managed = spec["runtime"]["managed"]
    gpus = int(managed.get("gpusPerReplica", 1))
    args = [*model_args(spec["baseModel"]), "--served-model-name", spec["baseModel"]["uri"], "--port",
            str(layout.port), "--enable-lora", *lora_args(managed, max_lora_rank), "--download-dir", layout.model_cache]
    if gpus > 1:
        args += ["--tensor-parallel-size", str(gpus)]
    probe = {"httpGet": {"path": ENGINE_API.health, "port": layout.port}}
    return {
        "name": "engine",
        "image": layout.image,
        "imagePullPolicy": layout.image_pull_policy,
        "command": ["vllm", "serve"],  # the image's ENTRYPOINT, stated: an image override may lack it
        "args": args,
        # runtime LoRA loading and unloading through /v1/load_lora_adapter and /v1/unload_lora_adapter
        # The root filesystem is read-only: every cache vLLM, torch, Triton and FlashInfer write goes to
        # the "tmp" emptyDir (HOME, XDG dirs, compile caches) or the model cache; no usage-stats phone-home.
        "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
                {"name": "HF_HOME", "value": f"{layout.model_cache}/huggingface"},
                *({"name": name, "value": value} for name, value in ENGINE_WRITABLE_ENV),
                *base_model_env(spec["baseModel"], layout.storage)],
        "ports": [{"name": "engine", "containerPort": layout.port}],
        "readinessProbe": {**probe, "periodSeconds": 5},
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 180},
        "resources": {"requests": {"nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}} if gpus else {},
        "volumeMounts": [{"name": "models", "mountPath": layout.model_cache},
                         {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "adapters", "mountPath": layout.adapter_cache, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": layout.security_context,
    }


RUNTIME = ServingRuntime(name="vllm", title="vLLM", lora_ranks=LORA_RANKS, api=ENGINE_API, default_image=IMAGE,
                         engine_container=engine_container, adapter_refusals=peft_rules.vllm_refusals)
