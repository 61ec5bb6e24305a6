"""Throttled status writes (pure): which status patch to send now, and which can wait.

Volatile fields (training progress, the open drift window) are written at most every
`min_interval_seconds`; any other change is written at once, with them. Nothing is lost by waiting:
the next diff against the stored status carries it. See docs/concepts.md (Where status comes from).
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass

from .finetunejob import status_patch

LAST_WRITE = "lastUpdateTime"  # status field: when the operator last wrote the status
ANY = "*"  # a path element matching every list item / dict key

# Paths (from the status root) of fields that change on every poll without changing what the object is.
FINETUNEJOB_VOLATILE: tuple[tuple[str, ...], ...] = (
    ("progress",),  # the trainer's step, percent, losses, tokens/s, ETA, updateTime
)
ADAPTERDEPLOYMENT_VOLATILE: tuple[tuple[str, ...], ...] = (
    ("adapters", ANY, "drift", "window", "requests"),  # the open drift window filling up
    ("adapters", ANY, "drift", "window", "startTime"),
    ("adapters", ANY, "drift", "lastDecision", "time"),  # a standing decision re-stamped on every pass
    # a canary analysis step in progress: its request counts (and the message quoting them) grow per pass;
    # its outcome, step and snapshots are not volatile
    ("adapters", ANY, "analysis", "last", "canaryRequests"),
    ("adapters", ANY, "analysis", "last", "stableRequests"),
    ("adapters", ANY, "analysis", "last", "message"),
)
VOLATILE = {"FineTuneJob": FINETUNEJOB_VOLATILE, "AdapterDeployment": ADAPTERDEPLOYMENT_VOLATILE}


@dataclass(frozen=True)
class StatusWrite:
    patch: dict | None  # the merge patch of status to send now (None: nothing to send)
    throttled: bool = False  # volatile changes held back until the interval has passed
    due_in: float | None = None  # when throttled: seconds until they may be written


def parse_rfc3339(value: object) -> dt.datetime | None:
    """An RFC 3339 time as Kubernetes writes it ("...Z"), timezone-aware; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _drop(node: object, path: tuple[str, ...]) -> None:
    if not path or node is None:
        return
    head, rest = path[0], path[1:]
    if isinstance(node, list) and head == ANY:
        children = node
    elif isinstance(node, dict) and head == ANY:
        children = list(node.values())
    elif isinstance(node, dict) and head in node:
        if not rest:
            del node[head]
            return
        children = [node[head]]
    else:
        return
    if not rest:
        if isinstance(node, dict):
            node.clear()
        else:
            node[:] = []
        return
    for child in children:
        _drop(child, rest)


def without_volatile(status: dict | None, volatile: tuple[tuple[str, ...], ...]) -> dict:
    """The status less its volatile fields and the last-write time: what must be written at once."""
    out = copy.deepcopy(status or {})
    out.pop(LAST_WRITE, None)
    for path in volatile:
        _drop(out, path)
    return out


def volatile_only(old: dict | None, new: dict, volatile: tuple[tuple[str, ...], ...]) -> bool:
    """Whether old and new differ only in volatile fields."""
    return without_volatile(old, volatile) == without_volatile(new, volatile)


def should_write(old: dict | None, new: dict, now: str, min_interval_seconds: float,
                 volatile: tuple[tuple[str, ...], ...]) -> bool:
    """Whether a pass that turns the stored status `old` into `new` writes now: any non-volatile change,
    throttling disabled (interval 0), no (readable) last write time, a last write time in the future
    (clock skew must not freeze the status), or the interval passed since the last write."""
    if min_interval_seconds <= 0 or not volatile_only(old, new, volatile):
        return True
    last = parse_rfc3339((old or {}).get(LAST_WRITE))
    current = parse_rfc3339(now)
    if last is None or current is None:
        return True
    elapsed = (current - last).total_seconds()
    return elapsed < 0 or elapsed >= min_interval_seconds


def status_write(old: dict | None, new: dict, now: str, min_interval_seconds: float,
                 volatile: tuple[tuple[str, ...], ...]) -> StatusWrite:
    """The status patch a pass sends: `status_patch(old, new)` plus the new last-write time, or None when
    nothing changed or only volatile fields changed within the interval."""
    old = old or {}
    new = dict(new)
    if LAST_WRITE in old:
        new[LAST_WRITE] = old[LAST_WRITE]  # decide() may rebuild status without it: never a removal
    patch = status_patch(old, new)
    if not patch:
        return StatusWrite(None)
    if not should_write(old, new, now, min_interval_seconds, volatile):
        last, current = parse_rfc3339(old.get(LAST_WRITE)), parse_rfc3339(now)
        due = min_interval_seconds - (current - last).total_seconds() if last and current else 0.0
        return StatusWrite(None, throttled=True, due_in=max(0.0, due))
    return StatusWrite({**patch, LAST_WRITE: now})
