"""Serving runtimes (pure): per inference engine, the LoRA ranks it accepts, the dialect of its control
API (what the agent's engine client speaks) and the engine container a managed runtime renders.
`spec.runtime.engine` of an AdapterDeployment picks one of `RUNTIMES`; adding a runtime is one module
here plus its tests (docs/serving-runtimes.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kubetune.api.storage_location import AWS, StorageLocation
from kubetune.runtimes import peft_rules


@dataclass(frozen=True)
class EngineApi:
    """The engine's control calls (runtime LoRA loading) and the error words that mean "no change"."""

    health: str
    models: str
    load: str
    unload: str
    already_loaded: str  # in a failed load's message: the adapter is loaded, which is what was wanted
    not_found: str  # in a failed unload's message: the adapter is gone already


@dataclass(frozen=True)
class PodLayout:
    """What the serving pod gives its engine container (render.serving owns the pod)."""

    image: str
    image_pull_policy: str
    port: int
    model_cache: str
    adapter_cache: str
    security_context: dict
    storage: StorageLocation = AWS  # the operator's storage setting, for an s3:// base the spec leaves open


# (AdapterDeployment spec, the pod's layout, --max-lora-rank) -> the engine container
ContainerRenderer = Callable[[dict, PodLayout, int], dict]


@dataclass(frozen=True)
class ServingRuntime:
    name: str  # the value of spec.runtime.engine
    title: str  # how messages name it
    lora_ranks: tuple[int, ...]  # the --max-lora-rank values it accepts, ascending
    api: EngineApi
    default_image: str
    engine_container: ContainerRenderer  # what a managed runtime's pods run
    # adapter_config.json -> why this runtime cannot load it (empty: it can), for pre-flight
    adapter_refusals: Callable[[dict], list[str]] = peft_rules.peft_refusals

    def smallest_rank_for(self, needed: int) -> int | None:
        """The smallest accepted --max-lora-rank that fits `needed` (None: above every one)."""
        return next((rank for rank in self.lora_ranks if rank >= needed), None)


DEFAULT_ENGINE = "vllm"


def runtime_of(spec: dict) -> ServingRuntime:
    """The runtime an AdapterDeployment's spec selects (vLLM when it names none)."""
    return RUNTIMES[(spec.get("runtime") or {}).get("engine") or DEFAULT_ENGINE]


# The runtime modules import the types above, so the registry is assembled after them.
from kubetune.runtimes import cpu, vllm  # noqa: E402

RUNTIMES: dict[str, ServingRuntime] = {runtime.name: runtime for runtime in (vllm.RUNTIME, cpu.RUNTIME)}
