"""The DeepSpeed config the trainer hands to `deepspeed.initialize`, generated from the job spec.

Pure on purpose (no torch or deepspeed import): the operator side, the unit tests and `kubetune local`
build and inspect it without the training stack. What it leaves out, and QLoRA's limits (its method's
`DeepSpeedLimits`), are explained in docs/trainer.md.
"""

from __future__ import annotations

from typing import Any

from .methods import METHODS

PRECISIONS = ("bf16", "fp16", "fp32")
ACCELERATORS = ("cuda", "cpu")

# DeepSpeed's own defaults (deepspeed/runtime/zero/config.py), used when the hidden size is unknown.
_DS_REDUCE_BUCKET = 500_000_000
_DS_PREFETCH_BUCKET = 50_000_000
_DS_PERSISTENCE_THRESHOLD = 100_000
# DeepSpeed prints throughput every `steps_per_print` optimizer steps; our loop logs its own metrics.
_NO_DS_STEP_LOG = 1_000_000_000


def _check(
    *, world_size: int, per_device_batch: int, grad_accum: int, zero_stage: int, precision: str, method: str,
    offload_optimizer: bool, offload_params: bool, max_grad_norm: float,
) -> None:
    for name, value in (("world_size", world_size), ("per_device_batch", per_device_batch),
                        ("grad_accum", grad_accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (resolve 'Auto' first), got {precision!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    limits = METHODS[method].deepspeed
    if zero_stage > limits.max_zero_stage:
        raise ValueError(f"method {method} allows zero_stage up to {limits.max_zero_stage}, got {zero_stage}")
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
    if offload_params and zero_stage != 3:
        # Only ZeRO-3 owns the parameters; the CRD has the same rule.
        raise ValueError("offload_params needs zero_stage 3")
    if offload_optimizer and zero_stage == 0:
        # Without ZeRO there is no partitioned optimizer for DeepSpeed to move to the CPU.
        raise ValueError("offload_optimizer needs zero_stage >= 1")
    if offload_params and not limits.offload_params:
        raise ValueError("4-bit quantized weights cannot be offloaded by DeepSpeed; turn offload_params off for QLoRA")


def _zero_section(*, zero_stage: int, offload_optimizer: bool, offload_params: bool,
                  hidden_size: int | None, accelerator: str) -> dict[str, Any]:
    if zero_stage == 0:
        return {"stage": 0}
    reduce_bucket = hidden_size * hidden_size if hidden_size else _DS_REDUCE_BUCKET
    zero: dict[str, Any] = {
        "stage": zero_stage,
        # Overlap gradient reduction with the backward pass on a side CUDA stream (DeepSpeed defaults it on
        # for stage 3 only; we want it for 2 as well). Off on CPU: there are no streams there, and with
        # more than one intra-op thread per process it made ZeRO-3 about 40x slower in
        # bench/spikes/zero3_lora_cpu.py (14 s instead of 0.3 s for 10 steps).
        "overlap_comm": accelerator == "cuda",
        # Copy gradients into one contiguous buffer as they are produced: less fragmentation.
        "contiguous_gradients": True,
        # Reduce-scatter (not all-reduce) so each rank only receives the gradient slice it owns.
        "reduce_scatter": True,
        # Elements per gradient-reduction bucket; HF's "auto" is hidden_size**2, a few layers' worth.
        "reduce_bucket_size": reduce_bucket,
    }
    if zero_stage in (1, 2):
        # Stage 1/2 all-gather the updated weights after the step in buckets of this many elements.
        zero["allgather_bucket_size"] = reduce_bucket
    if zero_stage == 3:
        zero.update({
            # HF's "auto" formulas: prefetch about one layer's weights ahead, and keep tensors with
            # fewer than 10 x hidden elements (norms, biases, small LoRA matrices) unpartitioned on
            # every rank instead of all-gathering them at each use.
            "stage3_prefetch_bucket_size": int(0.9 * reduce_bucket) if hidden_size else _DS_PREFETCH_BUCKET,
            "stage3_param_persistence_threshold": 10 * hidden_size if hidden_size else _DS_PERSISTENCE_THRESHOLD,
            # Bound how many gathered parameters stay alive / are kept for reuse (DeepSpeed's defaults,
            # spelled out so the memory knobs are visible in the generated file).
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "sub_group_size": 1_000_000_000,
            # Lets `engine.save_16bit_model()` gather full 16-bit weights on rank 0 (Full fine-tuning
            # exports); without it ZeRO-3 saves only the partitioned checkpoint.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    # Pinned (page-locked) host memory makes host<->GPU copies faster and asynchronous; it means nothing
    # when the "device" is the CPU already.
    pin = accelerator == "cuda"
    if offload_optimizer:
        # Optimizer states and fp32 master weights in host memory.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return zero


def _precision_sections(precision: str) -> dict[str, Any]:
    if precision == "bf16":
        # bf16 has fp32's exponent range: no loss scaling needed. DeepSpeed keeps fp32 master weights.
        return {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    if precision == "fp16":
        return {
            "bf16": {"enabled": False},
            "fp16": {
                "enabled": True,
                # 0 selects dynamic loss scaling: start at 2**initial_scale_power, halve on overflow
                # (the step is skipped), double after loss_scale_window clean steps.
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                # Tolerate this many consecutive overflows before lowering the scale (spikes happen).
                "hysteresis": 2,
                # Never scale below 1: an underflowing loss should surface, not be scaled into noise.
                "min_loss_scale": 1,
            },
        }
    return {"bf16": {"enabled": False}, "fp16": {"enabled": False}}


def deepspeed_config(
    *,
    world_size: int,
    per_device_batch: int,
    grad_accum: int,
    zero_stage: int,
    precision: str,
    method: str,
    offload_optimizer: bool,
    offload_params: bool,
    max_grad_norm: float,
    hidden_size: int | None = None,
    accelerator: str = "cuda",
) -> dict[str, Any]:
    """The DeepSpeed config dict for one training run.

    Batch keys: DeepSpeed checks `train_batch_size == micro x accumulation x world size` at initialize, so
    all three are written (world size from torchrun, accumulation derived by the operator from the
    effective batch). `gradient_clipping` is applied by DeepSpeed at each accumulation boundary, on the
    global (all-rank) gradient norm; the loop must not clip itself.

    `hidden_size` (the model's) sizes the ZeRO buckets like HF's "auto" values; without it DeepSpeed's
    defaults are used. `accelerator` is "cuda" (GPU pods) or "cpu" (gpusPerNode 0: gloo, no CUDA streams,
    no pinned memory). Raises ValueError on combinations DeepSpeed cannot run (see module docstring).
    """
    _check(world_size=world_size, per_device_batch=per_device_batch, grad_accum=grad_accum, zero_stage=zero_stage,
           precision=precision, method=method, offload_optimizer=offload_optimizer, offload_params=offload_params,
           max_grad_norm=max_grad_norm)
    if hidden_size is not None and hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size!r}")
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": per_device_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": per_device_batch * grad_accum * world_size,
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": _zero_section(zero_stage=zero_stage, offload_optimizer=offload_optimizer,
                                           offload_params=offload_params, hidden_size=hidden_size,
                                           accelerator=accelerator),
        **_precision_sections(precision),
        # A tag that differs between ranks would leave a checkpoint no world size can load: fail, don't warn.
        "checkpoint": {"tag_validation": "Fail"},
        "steps_per_print": _NO_DS_STEP_LOG,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        # DeepSpeed insists on its DeepSpeedCPUAdam (a JIT-compiled C++ op) with optimizer offload unless
        # this is false; we pass our own torch.optim.AdamW. DeepSpeedCPUAdam is faster; a trainer that
        # builds it may keep this key, it is then ignored.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def use_zero_init(*, zero_stage: int, method: str) -> bool:
    """Whether to build the model under `deepspeed.zero.Init` (weights partitioned as they are created).

    Only ZeRO-3 partitions weights. Not for QLoRA: transformers does not apply zero.Init to quantized
    models, so the 4-bit base is loaded whole on each rank and partitioned by `deepspeed.initialize`.
    """
    return zero_stage == 3 and METHODS[method].deepspeed.zero_init


def qlora_quant_storage_dtype(precision: str) -> str:
    """The torch dtype name to pass both as `bnb_4bit_quant_storage` and as `from_pretrained(dtype=...)`
    for QLoRA, so that ZeRO-3 can partition the packed 4-bit weights with the rest of the model."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
