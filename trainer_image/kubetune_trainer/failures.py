"""Which failures a pod restart may fix: the entrypoint's exit code and the node cache's peers agree."""

from __future__ import annotations

from collections.abc import Iterator

RETRYABLE_ERRORS = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "TimeoutError", "DistBackendError",
    "DistNetworkError"})


def is_retryable(exc: BaseException) -> bool:
    """Storage and network trouble (by name or as a ConnectionError): the next attempt may succeed."""
    return any(type(e).__name__ in RETRYABLE_ERRORS or isinstance(e, ConnectionError) for e in chain(exc))


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__
