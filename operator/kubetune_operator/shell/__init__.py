"""One reconcile pass per kind (`run_pass`), over ports that the cluster and local adapters implement."""

import datetime as dt


def now_rfc3339() -> str:
    """The time a pass runs at, as Kubernetes writes times ("...Z", whole seconds)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
