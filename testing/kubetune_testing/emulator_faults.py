"""What the emulator records and injects: API faults (conflicts, throttling, errors, slow answers,
dropped watches) and the journal of writes."""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Any

import aiohttp.web

USER_KEY = aiohttp.web.RequestKey("kubetune.user", "UserInfo")  # where auth.py's gate leaves the user


@dataclasses.dataclass
class Faults:
    """API faults injected into every request of a non-exempt client (the operator: kopf and its
    KubeClient), each drawn at its rate from a seeded generator. Off unless set on the emulator.

    `conflict` (409, writes only), `throttle` (429 with Retry-After), `error` (500) are answered
    instead of serving the request (nothing is written); `slow` delays a request by `slow_seconds`
    before serving it; a watch stream is closed after a random 1..2x`watch_drop_events` events (or
    `watch_drop_seconds`), as an API server or a load balancer does, and the client must re-watch.
    `counts` counts what was injected, by kind."""

    seed: int = 0
    conflict: float = 0.0
    throttle: float = 0.0
    retry_after_seconds: int = 1
    error: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 0.5
    watch_drop_events: int = 0
    watch_drop_seconds: float = 0.0
    budget: int | None = None  # at most this many 409/429/500 in all (None: no limit)
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def status_fault(self, write: bool) -> tuple[int, str] | None:
        if self.budget is not None and sum(self.counts[c] for c in ('409', '429', '500')) >= self.budget:
            return None
        draw = self.rng.random()
        for code, reason, rate in ((409, 'Conflict', self.conflict if write else 0.0),
                                   (429, 'TooManyRequests', self.throttle), (500, 'InternalError', self.error)):
            if draw < rate:
                self.counts[str(code)] += 1
                return code, reason
            draw -= rate
        return None

    def watch_limits(self) -> tuple[int | None, float | None]:
        events = self.rng.randint(1, 2 * self.watch_drop_events) if self.watch_drop_events else None
        seconds = self.rng.uniform(0.5, 1.5) * self.watch_drop_seconds if self.watch_drop_seconds else None
        return events, seconds


@dataclasses.dataclass(frozen=True)
class Write:
    """One write request as the emulator answered it (the journal: duplicates, request counts)."""

    method: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None
    status: int
    exempt: bool
    user: Any = None  # the auth.UserInfo that sent it, where an authenticator is installed
