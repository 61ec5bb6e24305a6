"""Which objects this operator process reconciles: all of them, unless sharding (docs/sharding.md) is on.

The reconcilers ask `OWNERSHIP.owns(namespace, name)` before every pass; whoever changes what this
process owns calls `OWNERSHIP.gained()` so that the scheduler re-queues the objects it now owns.
"""

from __future__ import annotations

from collections.abc import Callable


class Ownership:
    """Owns everything (one operator process for the whole scope) until sharding `delegate`s the answer."""

    def __init__(self) -> None:
        self._on_gain: list[Callable[[], None]] = []
        self._owns: Callable[[str, str], bool] | None = None

    def owns(self, namespace: str, name: str) -> bool:
        return self._owns is None or self._owns(namespace, name)

    def delegate(self, owns: Callable[[str, str], bool] | None) -> None:
        """From now on `owns(namespace, name)` answers (None: everything is owned again)."""
        self._owns = owns

    def on_gain(self, callback: Callable[[], None]) -> None:
        """`callback()` runs whenever this process starts owning more objects than before."""
        self._on_gain.append(callback)

    def gained(self) -> None:
        for callback in self._on_gain:
            callback()


OWNERSHIP = Ownership()
