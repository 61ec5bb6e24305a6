"""Retrain FineTuneJobs the drift loop starts, each run by the local FineTuneJob adapter
(`kubetune_operator.local.finetunejob`) in a thread, as the cluster's FineTuneJob controller would run it."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kubetune_operator.local import finetunejob
from kubetune_operator.reconcile import driftloop
from kubetune_operator.shell.drift import retrain_view

log = logging.getLogger("kubetune_operator.local.adapterdeployment")


class Cancelled(Exception):
    """Raised from a retrain's on_change to stop `finetunejob.run` (its finally stops the trainer)."""


@dataclass
class Retrain:
    """A retrain FineTuneJob run in a thread; `job` is its latest object."""
    job: dict
    adapter: str
    run_dir: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> dict:
        with self.lock:
            return copy.deepcopy(self.job)

    def view(self) -> driftloop.RetrainJob:
        return retrain_view(self.snapshot())

    @property
    def finished(self) -> bool:
        return ((self.snapshot().get("status") or {}).get("phase")) in driftloop.FINISHED


def start_retrain(job: dict, adep: dict, run_dir: Path, event: Callable[[str, str, str], None]) -> Retrain:
    """Run the retrain FineTuneJob in a thread; its Events go to `event(type, reason, message)`."""
    name = job["metadata"]["name"]
    adapter_name = job["metadata"]["labels"][driftloop.LABEL_RETRAIN_ADAPTER]
    spec_adapter = next(a for a in adep["spec"]["adapters"] if a["name"] == adapter_name)
    template_output = spec_adapter["drift"]["retrain"]["template"]["spec"].get("output") or {}
    job = finetunejob.prepare_job(job, namespace=adep["metadata"]["namespace"], output=template_output.get("uri"))
    job["status"] = {"phase": "Pending"}
    retrain = Retrain(job, adapter_name, run_dir / "retrains" / name)

    def on_change(current: dict, events: list) -> None:
        with retrain.lock:
            retrain.job = copy.deepcopy(current)
        for change in events:
            event(change.type, change.reason, f"FineTuneJob/{name}: {change.message}")
        if retrain.cancel.is_set():
            raise Cancelled(name)

    def run() -> None:
        try:
            result = finetunejob.run(job, run_dir=retrain.run_dir, on_change=on_change, poll_seconds=1.0)
            log.info("retrain finished", extra={"job": name, "phase": result.phase})
        except Cancelled:
            log.info("retrain stopped", extra={"job": name})
        except Exception as exc:  # the FineTuneJob fails, as a cluster's would, with the reason
            log.exception("retrain crashed", extra={"job": name})
            with retrain.lock:
                retrain.job["status"] = {**(retrain.job.get("status") or {}), "phase": "Failed",
                                         "message": f"kubetune local: {type(exc).__name__}: {exc}"}

    retrain.thread = threading.Thread(target=run, name=f"retrain-{name}", daemon=True)
    retrain.thread.start()
    log.info("retrain running locally", extra={"job": name, "runDir": str(retrain.run_dir)})
    return retrain
