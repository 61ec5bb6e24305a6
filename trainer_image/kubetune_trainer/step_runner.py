"""Stepping the model: plain, DDP or DeepSpeed behind one interface, and its checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from . import distributed, modeling, zero_state
from .checkpoints import TrainerState, cpu_snapshot


class StepRunner:
    """Forward, backward and optimizer steps for a plain, DDP or DeepSpeed model, behind one interface."""

    def __init__(self, model, optimizer, scheduler, dist: distributed.DistInfo, ds: dict | None, max_grad_norm: float,
                 grad_accum: int, scaler: torch.amp.GradScaler | None, autocast_dtype):
        self.module, self.optimizer, self.scheduler, self.dist = model, optimizer, scheduler, dist
        self.max_grad_norm, self.grad_accum, self.scaler = max_grad_norm, grad_accum, scaler
        self.autocast_dtype = autocast_dtype
        self.deepspeed = None
        self.ddp = None
        # Named before DeepSpeed takes the optimizer (ZeRO replaces its parameter groups with flat buffers);
        # ZeRO converts the parameters in place, so these stay the model's own.
        self.deepspeed_parameters = self._optimized_parameters() if ds is not None else {}
        if ds is not None:
            self.deepspeed = distributed.wrap_deepspeed(model, optimizer, scheduler, ds)
        elif dist.world_size > 1:
            self._wrap_ddp()
        self.last_grad_norm = 0.0
        self.monitor_layers = False  # set by the loop before a step it will evaluate
        self.layer_grad_norms: dict[str, float] = {}
        self.best_weights: dict | None = None  # early stopping: a CPU copy of the best evaluation's weights

    def _wrap_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.module, device_ids=ids)

    def parameters_changed(self) -> None:
        """Freeze-thaw made more parameters trainable: DDP must register them."""
        if self.ddp is not None:
            self._wrap_ddp()

    def forward(self, tensors: dict):
        model = self.deepspeed or self.ddp or self.module
        tensors = {k: v.to(self.dist.device) for k, v in tensors.items()}
        if self.autocast_dtype is not None and self.deepspeed is None:
            with torch.autocast(self.dist.device.type, dtype=self.autocast_dtype):
                return model(**tensors, use_cache=False) if "position_ids" in tensors else model(**tensors)
        return model(**tensors, use_cache=False) if "position_ids" in tensors else model(**tensors)

    def backward(self, loss) -> None:
        if self.deepspeed is not None:
            self.deepspeed.backward(loss)  # DeepSpeed scales by 1/accumulation itself
        elif self.scaler is not None:
            self.scaler.scale(loss / self.grad_accum).backward()
        else:
            (loss / self.grad_accum).backward()

    def micro_step(self, boundary: bool) -> None:
        """After every micro-batch; the optimizer steps only at an accumulation boundary."""
        if self.deepspeed is not None:
            if boundary and self.monitor_layers:  # reduced, not yet clipped: step() clips and zeroes them
                self.layer_grad_norms = zero_state.layer_grad_norms(self.deepspeed, self.deepspeed_parameters)
            self.deepspeed.step()
            if boundary:
                norm = self.deepspeed.get_global_grad_norm()
                self.last_grad_norm = float(norm) if norm is not None else 0.0
            return
        if not boundary:
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.monitor_layers:  # before clipping: the gradients as the loss made them
            self.layer_grad_norms = modeling.layer_grad_norms(self.module)
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _optimized_parameters(self) -> dict:
        """Name -> parameter for everything the optimizer updates (the adapter, a thawed block, all)."""
        ids = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        return {n: p for n, p in self.module.named_parameters() if id(p) in ids}

    def lora_to_base_ratios(self) -> dict[str, float]:
        """How far the adapter moved each adapted layer; a collective under ZeRO-3 (gathers the weights)."""
        if self.deepspeed is not None:
            return zero_state.lora_to_base_ratios(self.deepspeed)
        return modeling.lora_to_base_ratios(self.module)

    def remember_best(self) -> None:
        """Early stopping: a CPU copy of the weights the optimizer trains (under DeepSpeed, this rank's
        share: `zero_state.remember_best`)."""
        if self.deepspeed is not None:
            self.best_weights = zero_state.remember_best(self.deepspeed, self.deepspeed_parameters)
            return
        self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in self._optimized_parameters().items()}

    def restore_best(self) -> None:
        """Back to `remember_best`'s weights (a collective under ZeRO-3)."""
        if self.deepspeed is not None:
            zero_state.restore_best(self.deepspeed, self.deepspeed_parameters, self.best_weights)
            return
        parameters = self._optimized_parameters()
        with torch.no_grad():
            for name, value in self.best_weights.items():
                parameters[name].copy_(value.to(parameters[name].device))

    def zero_grad(self) -> None:
        if self.deepspeed is not None:
            self.deepspeed.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        (self.deepspeed or self.module).train(mode)

    # checkpoints --------------------------------------------------------------------------------

    def save(self, directory: Path, state: TrainerState) -> dict:
        """Every rank writes its part now (a collective under DeepSpeed: frozen weights left out, one RNG
        file per rank). The plain/DDP model and optimizer are the same on every rank: rank 0 returns them
        as CPU copies, {file name: object}, for the upload thread to write while training goes on."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.deepspeed is not None:
            checkpoint = distributed.save_checkpoint(self.deepspeed, directory, "ds", {"trainer": state.__dict__})
            if self.best_weights is not None:  # each rank's own share (the checkpoint's barrier follows)
                torch.save(self.best_weights, checkpoint / _best_file(self.dist.rank))
            return {}
        torch.save(distributed.capture_rng_state(), directory / f"rng-rank{self.dist.rank}.pt")
        if not self.dist.is_main:
            return {}
        trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        # best_weights is already a CPU copy that remember_best replaces, never updates in place
        return {"state.pt": {**cpu_snapshot({
            "model": trainable, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None, "trainer": state.__dict__}),
            "best": self.best_weights}}

    def load(self, directory: Path) -> TrainerState:
        if self.deepspeed is not None:
            saved = distributed.load_checkpoint(self.deepspeed, directory, "ds")["trainer"]
            best = directory / "ds" / _best_file(self.dist.rank)
            if best.is_file():
                self.best_weights = torch.load(best, map_location="cpu", weights_only=True)
            elif saved.get("best_step") is not None:
                raise RuntimeError(f"checkpoint {directory} remembers best step {saved['best_step']} but has "
                                   f"no {best.name}: it was written by a different world size")
            return TrainerState(**saved)
        else:
            blob = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
            loaded = self.module.load_state_dict(blob["model"], strict=False)  # frozen weights are not in it
            if loaded.unexpected_keys:
                raise RuntimeError(f"checkpoint does not fit the model: unexpected {loaded.unexpected_keys[:5]}")
            self.optimizer.load_state_dict(blob["optimizer"])
            self.best_weights = blob.get("best")
            self.scheduler.load_state_dict(blob["scheduler"])
            if self.scaler and blob.get("scaler"):
                self.scaler.load_state_dict(blob["scaler"])
            saved = blob["trainer"]
        rng_file = directory / f"rng-rank{self.dist.rank}.pt"
        if rng_file.exists():
            distributed.restore_rng_state(torch.load(rng_file, weights_only=False))
        return TrainerState(**saved)


def _best_file(rank: int) -> str:
    return f"best_rank{rank}.pt"
