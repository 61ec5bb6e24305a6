"""Training methods (`spec.method.type`), one module each, registered in METHODS under the spec's name.

A method loads and prepares the model, states what DeepSpeed may do with it, and says what it
publishes. Import-light (torch only inside functions) so the pure ds_config can read the limits.
Adding a method: one module here, one row in METHODS and one in kubetune.api.methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from .freeze_thaw import Thawing


@dataclass(frozen=True)
class DeepSpeedLimits:
    """What the DeepSpeed config may do with a method's model."""

    max_zero_stage: int = 3
    offload_params: bool = True  # ZeRO-3 may move the parameters to host memory
    zero_init: bool = True  # ZeRO-3 may partition the weights while they load (deepspeed.zero.Init)


class TrainingMethod(Protocol):
    name: str
    deepspeed: DeepSpeedLimits
    quantized: bool  # a 4-bit base, placed on its device while loading and computing in its own dtype
    publishes_adapter: bool  # PEFT adapter files on top of the base (mergeable), not whole weights

    def load_options(self, spec: dict, *, dtype, device) -> dict[str, Any]:
        """Extra `from_pretrained` keyword arguments for the base model."""

    def prepare(self, model: nn.Module, spec: dict, *, gradient_checkpointing: bool) -> tuple[nn.Module,
                                                                                         Thawing | None]:
        """The model to train, and the thawing schedule of a method that unfreezes blocks as it goes."""

    def optimizer_parameters(self, model: nn.Module) -> list:
        """The parameters AdamW is built over."""

    def save(self, model: nn.Module, target, state_dict: dict | None) -> None:
        """Write what is published (adapter files or whole weights) to `target`."""

    def manifest_fields(self, spec: dict) -> dict[str, Any]:
        """Method-specific fields of the published manifest."""


def _registry() -> dict[str, TrainingMethod]:
    from .freeze_thaw import FreezeThaw
    from .full import Full
    from .lora import LoRA
    from .qlora import QLoRA

    return {method.name: method for method in (LoRA(), QLoRA(), Full(), FreezeThaw())}


METHODS: dict[str, TrainingMethod] = _registry()


def method_of(spec: dict) -> TrainingMethod:
    return METHODS[spec["method"]["type"]]
