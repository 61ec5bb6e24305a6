"""The agent's watch of its desired-state ConfigMap, decided without I/O: what a LIST, each watch event
and a closed, dropped or refused stream mean, as client-go's reflector decides them
(kubernetes/client-go tools/cache/reflector.go: ListAndWatch, watchHandler, the 410 Gone relist and its
backoff manager). The I/O around it is `kube.DesiredConfigMap.watch`; the why is in README.md ("Sync").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kubetune.api import serving

# the reflector's default backoff between failed list/watch attempts: 800 ms doubling up to 30 s, with
# up to +100% jitter (NewExponentialBackoffManager(800ms, 30s, 2min, 2.0, 1.0, clock) in reflector.go)
BACKOFF_INITIAL_SECONDS = 0.8
BACKOFF_MAX_SECONDS = 30.0
# each watch asks the server to end it after timeoutSeconds in [5, 10) min (reflector's minWatchTimeout),
# so that watches spread over API servers and a half-open connection is noticed within minutes
MIN_WATCH_TIMEOUT_SECONDS = 300
GONE = 410  # the resourceVersion is older than the server's history: only a new LIST can continue


@dataclass(frozen=True)
class Cursor:
    """Where the watch stands: the last resourceVersion seen (None: LIST first) and the failures in a row."""

    resource_version: str | None = None
    failures: int = 0


@dataclass(frozen=True)
class Step:
    """What to do next. `deliver`: `text` (the ConfigMap's desired state; None when it has none) is new
    for the sync loop. `restart`: end this stream, then after `delay` s list again (cursor without a
    resourceVersion) or watch again from the cursor's."""

    cursor: Cursor
    deliver: bool = False
    text: str | None = None
    restart: bool = False
    delay: float = 0.0


def backoff(failures: int, jitter: float = 0.0) -> float:
    """The wait before attempt number `failures` + 1 (`jitter` in [0, 1) adds up to that fraction)."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** (failures - 1)) * (1.0 + jitter)


def list_params(name: str) -> dict[str, str]:
    return {"fieldSelector": f"metadata.name={name}"}


def watch_params(cursor: Cursor, name: str, spread: float) -> dict[str, str]:
    """The WATCH query from the cursor; `spread` in [0, 1) picks the timeout within [5, 10) min."""
    return {"watch": "true", "fieldSelector": f"metadata.name={name}", "allowWatchBookmarks": "true",
            "resourceVersion": cursor.resource_version or "",
            "timeoutSeconds": str(int(MIN_WATCH_TIMEOUT_SECONDS * (1.0 + spread)))}


def _desired_text(obj: dict) -> str | None:
    return (obj.get("data") or {}).get(serving.DESIRED_KEY)


def after_list(body: dict, name: str) -> Step:
    """A LIST answered: watch from its resourceVersion; its ConfigMap (if any) is the desired state now.
    None found delivers nothing: a missing ConfigMap keeps the last desired state (README.md)."""
    cursor = Cursor(str((body.get("metadata") or {}).get("resourceVersion") or "") or None)
    found = [item for item in body.get("items") or [] if (item.get("metadata") or {}).get("name") == name]
    if not found:
        return Step(cursor)
    text = _desired_text(found[0])
    return Step(cursor, deliver=text is not None, text=text)


def on_event(cursor: Cursor, event: dict, name: str, jitter: float = 0.0) -> Step:
    """One watch event. ADDED/MODIFIED of our ConfigMap delivers its text at once; DELETED keeps the last
    desired state (a missing ConfigMap never means "unload everything"); BOOKMARK only moves the
    resourceVersion; ERROR 410 Gone lists again at once (after backoff if it repeats), any other ERROR
    lists again after backoff."""
    kind, obj = event.get("type"), event.get("object") or {}
    if kind == "ERROR":
        failures = cursor.failures + 1
        delay = 0.0 if obj.get("code") == GONE and failures == 1 else backoff(failures, jitter)
        return Step(Cursor(None, failures), restart=True, delay=delay)
    meta = obj.get("metadata") or {}
    moved = Cursor(str(meta.get("resourceVersion") or "") or cursor.resource_version, 0)
    if kind in ("ADDED", "MODIFIED") and meta.get("name") == name:
        text = _desired_text(obj)
        return Step(moved, deliver=text is not None, text=text)
    return Step(moved)  # DELETED, BOOKMARK, another object, an unknown type: nothing to apply


def on_stream_end(cursor: Cursor, status: int | None = None, dropped: bool = False, jitter: float = 0.0) -> Step:
    """The stream is over. Ended by the server (its timeoutSeconds): watch again at once from the cursor.
    Refused with `status`: 410 lists again (at once the first time), anything else (403 from a Role
    without `watch`, 5xx) waits out the backoff first. `dropped` (the connection broke, a read timed
    out): watch again from the cursor after backoff, as the reflector does for a broken watch."""
    if status is None and not dropped:
        return Step(replace(cursor, failures=0), restart=True)
    failures = cursor.failures + 1
    if status == GONE:
        return Step(Cursor(None, failures), restart=True, delay=0.0 if failures == 1 else backoff(failures, jitter))
    return Step(replace(cursor, failures=failures), restart=True, delay=backoff(failures, jitter))


def on_list_failed(cursor: Cursor, jitter: float = 0.0) -> Step:
    failures = cursor.failures + 1
    return Step(Cursor(None, failures), restart=True, delay=backoff(failures, jitter))
