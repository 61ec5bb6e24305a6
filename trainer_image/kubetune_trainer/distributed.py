"""Process group, DeepSpeed engine and ZeRO-3 helpers for the trainer's hand-written training loop.

The recipe (init the group before deepspeed is imported, what is a collective, how checkpoints and
the adapter are gathered) was proved on CPU by bench/spikes/zero3_lora_cpu.py; it is written out step
by step in docs/trainer.md.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

DEFAULT_TIMEOUT = timedelta(minutes=30)  # rank 0 may upload a checkpoint while the others wait in a barrier
GATHER_CHUNK_NUMEL = 50_000_000  # gather at most this many elements at once: bounds peak memory on Full models


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes the adapter and reports status."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: the one per pod that prepares node-local files (downloads, checkpoint dirs)."""
        return self.local_rank == 0


_ENV_WE_SET: list[str] = []  # torchrun variables a single-process run set for DeepSpeed (cleanup removes them)


def _launched_by_torchrun() -> bool:
    # MASTER_ADDR too: a single-process run sets RANK/WORLD_SIZE itself (for DeepSpeed), and a second run
    # in the same process must not mistake that for a torchrun launch.
    return all(key in os.environ for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR"))


def configure_accelerator_env() -> str:
    """Pin DeepSpeed's accelerator before deepspeed is imported; returns the one in use.

    DeepSpeed resolves its accelerator once per process, at first use (importing deepspeed is enough), so
    this must run first. An explicit DS_ACCELERATOR from the pod spec wins.
    """
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


def get_dist_info() -> DistInfo:
    """The current process' placement; valid before and after `init_process_group`."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size, backend = dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    else:
        rank, world_size, backend = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), "none"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(rank, local_rank, world_size, local_world_size, backend, device)


def init_process_group(*, backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> DistInfo:
    """Create the torch process group from torchrun's environment (idempotent).

    backend: nccl when CUDA is available, else gloo (DeepSpeed ZeRO runs over gloo on CPU; oneCCL is not
    needed). Not under torchrun: a 1-rank group over an in-memory HashStore (no port, no rendezvous), so
    `deepspeed.initialize` and the collectives in this module work unchanged in a single process.
    """
    configure_accelerator_env()
    if dist.is_initialized():
        return get_dist_info()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    torchrun = _launched_by_torchrun()
    if not torchrun:
        # DeepSpeed reads these from the environment, not from the process group.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
            if key not in os.environ:
                os.environ[key] = value
                _ENV_WE_SET.append(key)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if backend == "nccl":
        # Bind this process to its GPU before NCCL creates communicators, or every rank lands on cuda:0.
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if torchrun:
        dist.init_process_group(**kwargs)  # env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    else:
        dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return get_dist_info()


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor) -> float | torch.Tensor:
    """Mean of `value` over all ranks (for logging losses and metrics); a float in, a float out."""
    is_float = not isinstance(value, torch.Tensor)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    # nccl only reduces CUDA tensors; fp64 so that summing many ranks' floats loses nothing.
    tensor = torch.as_tensor(value, dtype=torch.float64, device=get_dist_info().device).detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= dist.get_world_size()
    if is_float:
        return float(tensor.item())
    return tensor.to(device=value.device, dtype=value.dtype)


def cleanup() -> None:
    """Destroy the process group (lets gloo/nccl shut down cleanly instead of warning at exit).

    Through DeepSpeed when it has adopted the group: `deepspeed.comm.destroy_process_group` also drops the
    groups DeepSpeed cached (deepspeed.utils.groups), which would otherwise outlive the process group and
    make a second run in the same process (tests) fail with "Group ... is not registered".
    """
    # Leave the environment as we found it: a later subprocess (or HF Accelerate in the same process)
    # would read RANK/WORLD_SIZE as a torchrun launch.
    while _ENV_WE_SET:
        os.environ.pop(_ENV_WE_SET.pop(), None)
    if not dist.is_initialized():
        return
    if getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None) is not None:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def _quiet_deprecated_collectives() -> None:
    # DeepSpeed's ZeRO calls all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13 deprecates with
    # a FutureWarning per call: several lines per micro-step drowning the training log.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)",
                            category=FutureWarning)


def _deepspeed_comm() -> Any:
    """Import deepspeed and register our torch process group with deepspeed.comm (idempotent, must run
    before anything else in DeepSpeed touches deepspeed.comm).

    `deepspeed.initialize` does this itself, but zero.Init (ours or transformers') runs before it and
    builds a DeepSpeedConfig whose world size comes from deepspeed.comm: unregistered, it sees world size
    1 and fails the train_batch_size check ("16 != 4 * 2 * 1").
    """
    _quiet_deprecated_collectives()
    import deepspeed

    if not dist.is_initialized():
        raise RuntimeError("call init_process_group() before building a DeepSpeed model or engine")
    if get_dist_info().device.type == "cpu" and os.environ.get("KUBETUNE_DS_SHM_COMM") != "1":
        # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op (ninja + g++, ~25 s on
        # 2 cores) when it is created, and dies without a toolchain ("Unable to JIT load the
        # deepspeed_shm_comm op"). Only inference all-reduce (AutoTP) uses it, never ZeRO training, so mark
        # it unavailable; DeepSpeed documents that edits to this cached dict persist (deepspeed/ops).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=str(dist.get_backend()))
    return deepspeed


def zero3_init(config: Mapping[str, Any], *, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """Context for building a model from its config with weights partitioned as they are created.

    Only for ZeRO-3 (`ds_config.use_zero_init`); a no-op context otherwise. For `from_pretrained` use
    `hf_deepspeed_config` instead: transformers applies zero.Init and loads the shards into it.
    """
    if not enabled or config.get("zero_optimization", {}).get("stage") != 3:
        return contextlib.nullcontext()
    deepspeed = _deepspeed_comm()
    return deepspeed.zero.Init(config_dict_or_path=dict(config))


def hf_deepspeed_config(config: Mapping[str, Any]) -> Any:
    """The object to keep referenced while calling `from_pretrained` under ZeRO-3.

    transformers holds it by weakref only and checks it to decide on zero.Init: drop the reference and
    loading silently falls back to full copies on every rank.
    """
    from transformers.integrations import HfDeepSpeedConfig

    _deepspeed_comm()
    return HfDeepSpeedConfig(dict(config))


def wrap_deepspeed(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any, config: Mapping[str, Any]
) -> DeepSpeedEngine:
    """`deepspeed.initialize` with our own optimizer and scheduler; returns the engine.

    Needs `init_process_group()` first. The engine owns both from now on: it steps the scheduler at each
    accumulation boundary and saves/restores both in checkpoints. Under ZeRO-3 this is where parameters
    not created under zero.Init (a normally built model, the peft LoRA tensors) get partitioned.
    """
    if "optimizer" in config or "scheduler" in config:
        raise ValueError("the DeepSpeed config must not define 'optimizer'/'scheduler': we pass our own")
    deepspeed = _deepspeed_comm()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=dict(config))
    return engine


class MicroStep(NamedTuple):
    loss: torch.Tensor  # this rank's unscaled loss, detached; all_reduce_mean it for logging
    optimizer_stepped: bool  # this micro-step ended an accumulation window (optimizer + scheduler stepped)


def train_micro_step(engine: DeepSpeedEngine, batch: Mapping[str, torch.Tensor]) -> MicroStep:
    """One forward/backward/step on one micro-batch (a HF model: the batch carries `labels`)."""
    boundary = engine.is_gradient_accumulation_boundary()  # must be read before step() advances it
    batch = {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss = engine(**batch).loss
    engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself: pass the plain mean loss
    engine.step()  # a no-op for the optimizer except at the boundary
    return MicroStep(loss.detach(), boundary)


def unwrap(engine_or_model: Any) -> torch.nn.Module:
    """The module inside a DeepSpeed engine (or the model itself)."""
    return engine_or_model.module if hasattr(engine_or_model, "save_checkpoint") else engine_or_model


def _chunks(params: list[torch.nn.Parameter]) -> Iterator[list[torch.nn.Parameter]]:
    chunk: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if chunk and size + numel > GATHER_CHUNK_NUMEL:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += numel
    if chunk:
        yield chunk


def gathered_trainable_state_dict(
    engine_or_model: Any,
    only_trainable: bool = True,
    *,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
    peft_keys: bool = True,
) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) tensors on rank 0, CPU copies; `{}` on the other ranks. A collective.

    ZeRO-3 leaves each parameter as an empty placeholder plus a 1/world slice (`ds_tensor`); here each
    is all-gathered (`deepspeed.zero.GatheredParameters`, read-only: `modifier_rank=None`, re-partitioned
    on exit) in bounded chunks and copied. Without ZeRO-3 the tensors are copied as they are.
    For a peft model the keys are those of `peft.get_peft_model_state_dict` (adapter name stripped), so
    the dict can be written as `adapter_model.safetensors` next to the peft config. `peft_keys=False`
    keeps the module's own keys (`...lora_A.default.weight`): what `PeftModel.save_pretrained(dir,
    state_dict=...)` expects, since it applies get_peft_model_state_dict itself.

    Dtype: the parameters' own unless `dtype` is given (floating tensors only). Under bf16 it depends on
    how the model was built: built normally, `deepspeed.initialize` casts the whole module, LoRA included,
    to bf16; built under zero.Init (or from_pretrained with `hf_deepspeed_config`), only the base is cast
    and the LoRA tensors peft adds afterwards stay fp32. Pass `dtype` for a stable adapter format.
    """
    model = unwrap(engine_or_model)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    # keep_vars: Parameters (with their ZeRO attributes), not detached data; tied weights share one object.
    entries = model.state_dict(keep_vars=True)
    wanted = {k: v for k, v in entries.items() if not only_trainable or v.requires_grad}
    params: dict[int, torch.nn.Parameter] = {}
    for v in wanted.values():
        params.setdefault(id(v), v)
    zero_params = [p for p in params.values() if hasattr(p, "ds_id")]
    copies: dict[int, torch.Tensor] = {}
    for pid, p in params.items():
        if not hasattr(p, "ds_id") and is_main:
            copies[pid] = p.detach().to("cpu", copy=True)
    if zero_params:
        import deepspeed

        # Same order on every rank, or the all-gathers pair up different tensors and deadlock.
        zero_params.sort(key=lambda p: p.ds_id)
        for chunk in _chunks(zero_params):
            with deepspeed.zero.GatheredParameters(chunk, modifier_rank=None):
                if is_main:
                    for p in chunk:
                        copies[id(p)] = p.detach().to("cpu", copy=True)
    if not is_main:
        return {}
    if dtype is not None:
        copies = {pid: t.to(dtype) if t.is_floating_point() else t for pid, t in copies.items()}
    state = {k: copies[id(v)] for k, v in wanted.items()}
    if peft_keys and hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        # "auto" would look for base embedding weights, which a trainable-only dict does not carry.
        state = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name,
                                          save_embedding_layers=False if only_trainable else "auto")
    return state


def capture_rng_state() -> dict[str, Any]:
    """This rank's RNG states (python, numpy, torch CPU and CUDA), for a checkpoint's client_state."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng_state_rank{rank}.pt"


def save_checkpoint(
    engine: DeepSpeedEngine, directory: str | Path, tag: str, client_state: Mapping[str, Any] | None = None
) -> Path:
    """Every rank writes its part of the resumable state under `directory/tag`; returns that path.

    A collective. `client_state` (our step, epoch, data position...) must be the same on every rank:
    DeepSpeed keeps one copy per model-states file, and below ZeRO-3 only rank 0 writes that file, so a
    rank-specific value would come back as rank 0's. Rank-specific RNG state therefore goes to a file
    of its own, `rng_state_rank<r>.pt`, written here and restored by `load_checkpoint`.

    Files, W ranks, ZeRO-3:
      `<tag>/zero_pp_rank_<r>_mp_rank_00_model_states.pt` (one per rank): engine counters, LR scheduler
        state, client_state; no weights (ZeRO-2 and below: a single `mp_rank_00_model_states.pt`);
      `<tag>/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt` (one per rank): that rank's slice of
        the fp32 master weights of the trainable parameters and of the optimizer state;
      `<tag>/rng_state_rank<r>.pt` (one per rank, ours);
      `latest` (rank 0): the tag; `zero_to_fp32.py`, `zero_to_torch.py` (rank 0): DeepSpeed's offline
        consolidation scripts.
    Each rank writes into its own pod's `directory`; the trainer uploads every pod's directory to the same
    prefix, so the union is the checkpoint. Frozen weights (the base model) are left out
    (`exclude_frozen_parameters`): a resumed run reloads them from the base model, and ZeRO-3 would
    otherwise store every rank's slice of the base.
    """
    directory = Path(directory)
    # DeepSpeed creates `directory` on global rank 0 only; on other pods it must exist as well.
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=tag, client_state=dict(client_state or {}),
                           exclude_frozen_parameters=True)
    checkpoint = directory / tag
    checkpoint.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng_state(), _rng_file(checkpoint, get_dist_info().rank))
    barrier()  # nobody uploads or moves on before every rank has written its files
    return checkpoint


def load_checkpoint(
    engine: DeepSpeedEngine, directory: str | Path, tag: str | None = None, *, restore_rng: bool = True
) -> dict[str, Any]:
    """Restore trainable weights, optimizer, LR scheduler, engine counters and this rank's RNG state;
    returns the client_state (plus DeepSpeed's own bookkeeping keys, which the caller can ignore).

    A collective, on a freshly initialized engine (under ZeRO-3 DeepSpeed cannot load into an engine that
    has trained: build the model and engine again). `tag=None` reads `directory/latest`. Module loading
    is non-strict because the checkpoint holds no frozen weights; the trainable ones come back from the
    fp32 master slices in the optimizer files. The checkpoint must come from the same world size (ZeRO
    slices are per rank); a different one needs DeepSpeed's universal checkpoint conversion.
    """
    directory = Path(directory)
    if tag is None:
        latest = directory / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"no {latest}: pass the checkpoint tag")
        tag = latest.read_text().strip()
    load_path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory} (tag {tag!r})")
    rng_file = _rng_file(directory / tag, get_dist_info().rank)
    if restore_rng and rng_file.is_file():
        # Our own file (numpy's state is an ndarray, which weights_only=True refuses); DeepSpeed loads its
        # files with weights_only=False as well.
        restore_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
