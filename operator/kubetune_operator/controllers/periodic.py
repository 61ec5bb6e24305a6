"""The two kinds' schedulers (controllers.scheduler): made at the operator's start-up, stopped at its exit,
and told of objects this process comes to own (sharding) by one LIST per kind."""

from __future__ import annotations

import asyncio
import logging

from kubetune.clients import kube
from kubetune_operator.reconcile import schedule

from . import adapterdeployment, finetunejob
from .children import Children
from .ownership import OWNERSHIP
from .scheduler import Scheduler

log = logging.getLogger("kubetune.periodic")

_TASKS: list[asyncio.Task] = []


def start() -> None:
    """Fresh schedulers for both kinds (an operator restarted in one process starts from nothing)."""
    budgets = finetunejob.RUNTIME.budgets
    finetunejob.RUNTIME.children = Children()  # a restarted operator has new indexes and creates anew
    finetunejob.RUNTIME.scheduler = Scheduler("FineTuneJob", finetunejob._reconcile_logged, budgets)
    adapterdeployment.RUNTIME.scheduler = Scheduler("AdapterDeployment", adapterdeployment._reconcile_logged,
                                                    budgets)
    finetunejob.RUNTIME.wake_serving = adapterdeployment.wake
    _TASKS[:] = [asyncio.create_task(s.run(), name=f"kubetune-{s.kind}-scheduler")
                 for s in (finetunejob.RUNTIME.scheduler, adapterdeployment.RUNTIME.scheduler)]


async def stop() -> None:
    for task in _TASKS:
        task.cancel()
    await asyncio.gather(*_TASKS, return_exceptions=True)
    _TASKS.clear()


async def requeue_owned() -> None:
    """Queue every unfinished object this process owns and has not queued yet (after it gained shards)."""
    client = finetunejob.RUNTIME.client
    if client is None or finetunejob.RUNTIME.scheduler is None:
        return
    kinds = ((kube.FINETUNEJOBS, finetunejob.RUNTIME.scheduler,
              lambda o: schedule.finetunejob_next((o.get("status") or {}).get("phase"), 0.0, True).cls),
             (adapterdeployment.ADAPTERDEPLOYMENTS, adapterdeployment.RUNTIME.scheduler,
              lambda o: schedule.SERVING))
    for resource, scheduler, cls_of in kinds:
        for namespace in adapterdeployment.RUNTIME.watch_namespaces or (None,):
            for obj in await client.list(resource, namespace):
                key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
                cls = cls_of(obj)
                if cls is not None and OWNERSHIP.owns(*key):
                    scheduler.soon(key, cls)
    log.info("requeued owned objects", extra={"finetunejobs": len(finetunejob.RUNTIME.scheduler),
                                              "adapterdeployments": len(adapterdeployment.RUNTIME.scheduler)})


def _on_gain() -> None:
    task = asyncio.get_running_loop().create_task(requeue_owned())
    _TASKS.append(task)


OWNERSHIP.on_gain(_on_gain)
