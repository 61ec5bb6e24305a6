"""kubetune's CPU engine (`kubetune_engine`, transformers + peft): it imitates vLLM's control API and
limits, so a rollout tried with `kubetune local` is accepted the same way on vLLM. It serves
`kubetune local`, the tests, `runtime.selector` pods and, managed, a Deployment of the trainer image
whose engine fetches the base model itself into the model cache (kubetune_engine.model_source)."""

from __future__ import annotations

from kubetune.runtimes import PodLayout, ServingRuntime, vllm
from kubetune.runtimes.base_model import base_model_env

IMAGE = "ghcr.io/kubetune/trainer:0.1.0"  # the trainer image ships kubetune_engine
ALL_INTERFACES = "0.0.0.0"  # the kubelet probes the pod's IP, not its loopback

# Where Python, torch and the Hugging Face libraries write, so that the root filesystem can be read-only.
WRITABLE_ENV = (
    ("HOME", "/tmp/home"),
    ("XDG_CACHE_HOME", "/tmp/home/.cache"),
    ("TMPDIR", "/tmp"),
    ("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("PYTHONUNBUFFERED", "1"),
)


def model_args(base: dict) -> list[str]:
    """The base model as the engine's positional argument: a directory, an s3:// prefix or an hf:// repository
    (the engine keeps the scheme: a bare ORG/NAME could be a relative directory)."""
    uri = base["uri"]
    if uri.startswith("file://"):
        return [uri.removeprefix("file://")]
    if uri.startswith("hf://"):
        return [uri, "--revision", base.get("revision") or "main"]
    return [uri]


def engine_container(spec: dict, layout: PodLayout, max_lora_rank: int) -> dict:
    base, managed = spec["baseModel"], spec["runtime"]["managed"]
    command = ["python", "-m", "kubetune_engine", *model_args(base), "--download-dir", layout.model_cache,
               "--fidelity", "kubetune", "--served-model-name", base["uri"], "--host", ALL_INTERFACES,
               "--port", str(layout.port), *vllm.lora_args(managed, max_lora_rank)]
    # The engine sets HF_HUB_OFFLINE=1 unless told otherwise: an hf:// base is the one case it may download.
    hub = [{"name": "HF_HUB_OFFLINE", "value": "0"}] if base["uri"].startswith("hf://") else []
    probe = {"httpGet": {"path": vllm.ENGINE_API.health, "port": layout.port}}
    return {
        "name": "engine",
        "image": layout.image,
        "imagePullPolicy": layout.image_pull_policy,
        "command": command,
        "env": [{"name": "HF_HOME", "value": f"{layout.model_cache}/huggingface"},
                *({"name": name, "value": value} for name, value in WRITABLE_ENV), *hub,
                *base_model_env(base, layout.storage)],
        "ports": [{"name": "engine", "containerPort": layout.port}],
        "readinessProbe": {**probe, "periodSeconds": 5},
        # the first start downloads the base into the model cache before /health answers
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 180},
        "volumeMounts": [{"name": "models", "mountPath": layout.model_cache},
                         {"name": "adapters", "mountPath": layout.adapter_cache, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": layout.security_context,
    }


RUNTIME = ServingRuntime(name="kubetune-cpu", title="the kubetune CPU engine", lora_ranks=vllm.LORA_RANKS,
                         api=vllm.ENGINE_API, default_image=IMAGE, engine_container=engine_container)
