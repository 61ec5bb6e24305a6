"""The emulator without kmock's request history: a request is forgotten once served, as an API server
forgets it. kmock (0.8) keeps every request and routes each new one by testing its fallback filters
against that whole history, so request k costs O(k) and a flow O(requests^2). Why and what it saved:
docs/testing.md ("Request history")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import kmock

from .emulator import K8sEmulator


class ForgetfulEmulator(K8sEmulator):
    """K8sEmulator whose history holds only the requests in flight (watches included). Tests that read
    the history (`list(k8s)`, `k8s[...]`) need the plain K8sEmulator; the journal, counters and
    objects are the emulator's own and stay."""

    forget_served: ClassVar[bool] = True  # False: kmock's own behaviour (bench/scale.py --keep-history)

    async def _handle(self, request: kmock.Request) -> Any:
        try:
            return await super()._handle(request)
        finally:
            if self.forget_served:
                forget(self._requests, request)

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        # Routed already; a watch streams for minutes, and every request routed meanwhile would test each
        # fallback's filters against it (an operator keeps a watch per kind and namespace open).
        if self.forget_served:
            forget(self._requests, request)
        async for event in super()._serve_watch(request):
            yield event


def forget(history: list, request: kmock.Request) -> None:
    """Drops `request` (by identity; the newest are searched first: it is almost always near the end)."""
    for index in range(len(history) - 1, -1, -1):
        if history[index] is request:
            del history[index]
            return
