"""How every handler turns an API error into kopf's retry (one place, for every kind)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import kopf
from prometheus_client import Counter

from kubetune.clients import kube


async def reconcile_or_retry(reconcile: Callable[[str, str], Awaitable[object]], namespace: str, name: str,
                             errors: Counter, retry: Callable[[tuple[str, str]], None] | None = None) -> None:
    """Run one reconcile; an API error (409, 429, 5xx, a dropped connection) is counted and retried by
    kopf after a short delay instead of failing the handler for good. A dropped connection or a timeout
    reaches here as aiohttp's error, not an ApiError: without catching it kopf retried it only after
    its default backoff (60 s), the resync timer included. `retry(key)` also queues it with the kind's
    scheduler: kopf retries its own handlers, but not when writing its retry state failed as well."""
    try:
        await reconcile(namespace, name)
    except (kube.ApiError, aiohttp.ClientError, TimeoutError) as exc:
        errors.inc()
        if retry is not None:
            retry((namespace, name))
        raise kopf.TemporaryError(f"API error: {exc}", delay=5) from exc
