"""kubetune's CPU engine (`kubetune_engine`, transformers + peft): it imitates vLLM's control API and
limits, so a rollout tried with `kubetune local` is accepted the same way on vLLM. It serves
`kubetune local`, the tests and `runtime.selector` pods; a managed runtime renders no Deployment for it
(it needs the base model in a local directory, which the managed pod does not provide)."""

from __future__ import annotations

from kubetune.runtimes import ServingRuntime, vllm

IMAGE = "ghcr.io/kubetune/trainer:0.1.0"  # the trainer image ships kubetune_engine

RUNTIME = ServingRuntime(name="kubetune-cpu", title="the kubetune CPU engine", lora_ranks=vllm.LORA_RANKS,
                         api=vllm.ENGINE_API, default_image=IMAGE, engine_container=None)
