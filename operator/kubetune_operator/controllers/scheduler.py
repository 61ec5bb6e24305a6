"""The periodic passes of one kind, in one queue per process instead of one kopf timer per object.

Every pass (from any trigger) tells the scheduler what it needs next (`reconcile.schedule.Next`). Due
passes start at most at each class's budget of passes per second (a token bucket: a backlog of overdue
passes drains at that rate, not at once) and run at most `concurrency` at a time, so that event-driven
passes (a new object's first pass) never queue behind them. docs/scale.md says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable

from kubetune_operator.reconcile import schedule

from .ownership import OWNERSHIP

log = logging.getLogger("kubetune.scheduler")

Key = tuple[str, str]  # (namespace, name)


class Scheduler:
    """Due times of one kind's objects; `run()` is the loop that starts their passes."""

    def __init__(self, kind: str, run_pass: Callable[[str, str], Awaitable[None]],
                 budgets: schedule.Budgets | None = None, concurrency: int = 4,
                 clock: Callable[[], float] = time.monotonic):
        self.kind, self.run_pass, self.clock = kind, run_pass, clock
        self.budgets = budgets or schedule.Budgets()
        self.concurrency = concurrency
        self._due: dict[Key, tuple[float, str]] = {}  # key -> (due, class)
        self._heaps: dict[str, list[tuple[float, int, Key]]] = defaultdict(list)  # one per class
        self._tokens: dict[str, tuple[float, float]] = {}  # class -> (passes it may start now, as of when)
        self._seq = itertools.count()
        self._members: Counter = Counter()  # class -> objects in it
        self._in_flight: set[Key] = set()
        self._base: dict[str, float] = {}  # class -> the period its last pass asked for (retries wait that)
        self._wake = asyncio.Event()
        self.errors = 0

    def __len__(self) -> int:
        return len(self._due)

    def members(self, cls: str) -> int:
        return self._members[cls]

    def due_in(self, key: Key) -> float | None:
        entry = self._due.get(key)
        return None if entry is None else entry[0] - self.clock()

    def after_pass(self, key: Key, after: schedule.Next) -> None:
        """Record what a pass (of any trigger) needs next: a due time, or nothing."""
        self._drop(key)
        if after.cls is None:
            return
        self._members[after.cls] += 1  # counted before the period: this object is one of them
        if after.seconds is not None and not after.deadline:
            self._base[after.cls] = after.seconds
        seconds = schedule.delay(after, self._members[after.cls], self.budgets)
        if seconds is None:
            self._members[after.cls] -= 1
            return
        self._put(key, after.cls, self.clock() + seconds)

    def soon(self, key: Key, cls: str) -> None:
        """Due now (an object this process has just come to own): unless it is already queued."""
        if key not in self._due:
            self._members[cls] += 1
            self._put(key, cls, self.clock())

    def nudge(self, key: Key, cls: str) -> None:
        """Due now, even if queued for later (what it waited on has changed)."""
        self._drop(key)
        self._members[cls] += 1
        self._put(key, cls, self.clock())

    def retry(self, key: Key, cls: str) -> None:
        """A pass of any trigger failed: try again after the class's period (0.5-5 s) unless it is queued.
        kopf retries its own handlers too, but not when writing its retry state failed as well."""
        if key not in self._due:
            self._members[cls] += 1
            self._put(key, cls, self.clock() + min(5.0, max(0.5, self._base.get(cls, 5.0))))

    def forget(self, key: Key) -> None:
        self._drop(key)

    def _put(self, key: Key, cls: str, due: float) -> None:
        self._due[key] = (due, cls)
        heapq.heappush(self._heaps[cls], (due, next(self._seq), key))
        self._wake.set()

    def _drop(self, key: Key) -> None:
        entry = self._due.pop(key, None)
        if entry is not None:
            self._members[entry[1]] -= 1  # its heap item is skipped when it comes up

    def _tokens_now(self, cls: str, now: float) -> float:
        """Passes the class may start now: refilled at its budget per second, at most one second's worth."""
        budget = self.budgets.of(cls)
        if budget <= 0:
            return float("inf")
        tokens, when = self._tokens.get(cls, (max(1.0, budget), now))
        tokens = min(max(1.0, budget), tokens + (now - when) * budget)
        self._tokens[cls] = (tokens, now)
        return tokens

    def take_due(self) -> list[tuple[Key, str]]:
        """Pop the keys whose time has come (owned, not already running) within their class's budget,
        oldest first, with their class."""
        now, taken = self.clock(), []
        for cls in sorted(self._heaps, key=lambda c: self._heaps[c][0][0] if self._heaps[c] else float("inf")):
            heap = self._heaps[cls]
            while heap and heap[0][0] <= now and len(self._in_flight) + len(taken) < self.concurrency:
                due, _, key = heap[0]
                if self._due.get(key) != (due, cls) or key in self._in_flight:
                    heapq.heappop(heap)  # superseded by a later pass, forgotten, or running (it reschedules)
                    continue
                if self._tokens_now(cls, now) < 1:
                    break  # this class has spent its budget for now
                heapq.heappop(heap)
                tokens, when = self._tokens[cls]
                self._tokens[cls] = (tokens - 1, when)
                self._drop(key)
                if OWNERSHIP.owns(*key):
                    taken.append((key, cls))
            if len(heap) > 4 * self._members[cls] + 1024:  # superseded items: keep the heap bounded
                self._heaps[cls] = [(d, q, k) for d, q, k in heap if self._due.get(k) == (d, cls)]
                heapq.heapify(self._heaps[cls])
        return taken

    def _next_wait(self) -> float:
        if len(self._in_flight) >= self.concurrency:
            return 60.0
        now, waits = self.clock(), [60.0]
        for cls, heap in self._heaps.items():
            if heap:
                tokens = self._tokens_now(cls, now)
                refill = 0.0 if tokens >= 1 else (1 - tokens) / self.budgets.of(cls)
                waits.append(max(heap[0][0] - now, refill))
        return max(0.0, min(waits))

    async def _run_one(self, key: Key, cls: str) -> None:
        try:
            await self.run_pass(*key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the pass failed: counted, and tried again after its class's period (0.5-5 s)
            self.errors += 1
            log.warning("periodic pass failed", extra={"kind": self.kind, "namespace": key[0], "object": key[1],
                                                       "error": str(exc)})
            self.retry(key, cls)
        finally:
            self._in_flight.discard(key)
            self._wake.set()

    async def run(self) -> None:
        """Start due passes forever (cancelled at the operator's exit, with the passes in flight)."""
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                for key, cls in self.take_due():
                    self._in_flight.add(key)
                    task = asyncio.create_task(self._run_one(key, cls))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._next_wait())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
