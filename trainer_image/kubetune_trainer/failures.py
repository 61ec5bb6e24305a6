"""Which failures a pod restart may fix: the entrypoint's exit code and the node cache's peers agree."""

from __future__ import annotations

from collections.abc import Iterator

RETRYABLE_ERRORS = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "TimeoutError", "DistBackendError",
    "DistNetworkError"})


# A peer process gone mid-collective (its pod killed, preempted, its node lost). gloo raises a plain
# RuntimeError for it, which would otherwise read as a bug (exit 1, never retried) on every surviving pod.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "gloo/transport/tcp",
             "NCCL communicator was aborted", "ncclRemoteError")


def is_retryable(exc: BaseException) -> bool:
    """Storage and network trouble (by name or as a ConnectionError), a lost peer: the next attempt may
    succeed."""
    return any(type(e).__name__ in RETRYABLE_ERRORS or isinstance(e, ConnectionError) or _lost_peer(e)
               for e in chain(exc))


def _lost_peer(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in LOST_PEER)


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__
