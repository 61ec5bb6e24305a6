"""A Kueue stand-in for the emulator: its job webhook (a managed job with a queue label is created
suspended) and its admission (per-LocalQueue quota), told through Kueue's Workload objects. Imitates
kueue pkg/controller/jobframework (defaults.go ApplyDefaultForSuspend, reconciler.go: start an admitted
job, stop a deactivated one) and pkg/controller/core/workload_controller.go's QuotaReserved reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import kmock

from kubetune.clients import kube

from .emulator import K8sEmulator

LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_JOB_UID = "kueue.x-k8s.io/job-uid"
WORKLOADS = kube.Resource("kueue.x-k8s.io", "v1beta1", "workloads")
# The kinds Kueue manages that the operator creates: their resource -> (kind, where their suspend lives).
MANAGED = {kube.PYTORCHJOBS: ("PyTorchJob", ("spec", "runPolicy", "suspend")),
           kube.Resource("trainer.kubeflow.org", "v1alpha1", "trainjobs"): ("TrainJob", ("spec", "suspend"))}
FINISHED = ("Succeeded", "Failed", "Complete")


def _suspend_path(group: str, plural: str) -> tuple[str, ...] | None:
    return next((path for r, (_, path) in MANAGED.items() if (r.group, r.plural) == (group, plural)), None)


def _set(document: dict, path: tuple[str, ...], value: object) -> None:
    for key in path[:-1]:
        document = document.setdefault(key, {})
    document[path[-1]] = value


def _get(document: dict, path: tuple[str, ...]) -> object:
    for key in path:
        document = (document or {}).get(key) if isinstance(document, dict) else None
    return document


def workload_name(kind: str, job_name: str, uid: str) -> str:
    """jobframework GetWorkloadNameForOwnerWithGVK: `<kind>-<job>-<5 hex of a hash>`."""
    return f"{kind.lower()}-{job_name}-{hashlib.sha256(uid.encode()).hexdigest()[:5]}"


def _condition(kind: str, status: bool, reason: str, message: str) -> dict:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message}


def _finished(job: dict) -> bool:
    return any(c.get("type") in FINISHED and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


class Kueue:
    """Kueue for one namespace. `quotas`: LocalQueue -> how many of its workloads may be admitted at once (a
    queue not named does not exist: Inadmissible); raise a quota to admit what waits. `admitted` and
    `suspended_on_create` name the jobs it admitted and the creates its webhook suspended."""

    def __init__(self, client: kube.KubeClient, namespace: str, quotas: dict[str, int], interval: float = 0.2):
        self.client, self.namespace, self.quotas, self.interval = client, namespace, dict(quotas), interval
        self.admitted: list[str] = []
        self.suspended_on_create: list[str] = []

    def webhook(self, request: kmock.Request) -> None:
        """The mutating webhook: a managed kind created with a queue label is stored suspended."""
        resource = request.resource
        path = resource is not None and _suspend_path(resource.group, resource.plural)
        labels = (request.data.get("metadata") or {}).get("labels") or {}
        if path and labels.get(LABEL_QUEUE):
            if not _get(request.data, path):
                self.suspended_on_create.append(request.data["metadata"].get("name"))
            _set(request.data, path, True)

    async def _jobs(self) -> list[tuple[dict, kube.Resource]]:
        jobs = []
        for resource in MANAGED:
            with contextlib.suppress(kube.ApiError):  # a kind this emulator does not serve
                jobs += [(j, resource) for j in await self.client.list(resource, self.namespace)
                         if ((j.get("metadata") or {}).get("labels") or {}).get(LABEL_QUEUE)]
        return jobs

    async def _workload(self, job: dict, resource: kube.Resource) -> dict:
        meta = job["metadata"]
        found = await self.client.list(WORKLOADS, self.namespace, f"{LABEL_JOB_UID}={meta['uid']}")
        if found:
            return found[0]
        kind = MANAGED[resource][0]
        body = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                "metadata": {"name": workload_name(kind, meta["name"], meta["uid"]), "namespace": self.namespace,
                             "labels": {LABEL_JOB_UID: meta["uid"]},
                             "ownerReferences": [{"apiVersion": f"{resource.group}/{resource.version}", "kind": kind,
                                                  "name": meta["name"], "uid": meta["uid"], "controller": True}]},
                "spec": {"queueName": meta["labels"][LABEL_QUEUE], "active": True}}
        created, _ = await self.client.create(WORKLOADS, body)
        return created

    async def _set_conditions(self, workload: dict, *conditions: dict) -> None:
        current = {c["type"]: c for c in (workload.get("status") or {}).get("conditions") or []}
        if all(current.get(c["type"], {}).get(k) == c[k] for c in conditions for k in ("status", "reason", "message")):
            return
        current.update({c["type"]: c for c in conditions})
        await self.client.patch(WORKLOADS, self.namespace, workload["metadata"]["name"],
                                {"status": {"conditions": list(current.values())}}, subresource="status")

    async def _suspend(self, job: dict, resource: kube.Resource, suspend: bool) -> None:
        patch: dict = {}
        _set(patch, MANAGED[resource][1], suspend)
        await self.client.patch(resource, self.namespace, job["metadata"]["name"], patch)

    async def reconcile(self) -> None:
        """One pass: a Workload per queued job; admit what its queue's quota allows (oldest first), stop
        what was deactivated, release the quota of finished jobs."""
        jobs = sorted(await self._jobs(), key=lambda j: j[0]["metadata"].get("creationTimestamp") or "")
        in_use: dict[str, int] = {}
        pending = []
        for job, resource in jobs:
            workload = await self._workload(job, resource)
            queue, suspended = job["metadata"]["labels"][LABEL_QUEUE], bool(_get(job, MANAGED[resource][1]))
            if (workload.get("spec") or {}).get("active") is False:
                if not suspended:
                    await self._suspend(job, resource, True)  # evicted: its pods go, its quota is freed
                await self._set_conditions(workload, _condition("QuotaReserved", False, "Inactive",
                                                                "the workload is deactivated"),
                                           _condition("Admitted", False, "Inactive", "the workload is deactivated"))
                continue
            if _finished(job):
                continue
            if not suspended:
                in_use[queue] = in_use.get(queue, 0) + 1
            else:
                pending.append((job, resource, workload, queue))
        for job, resource, workload, queue in pending:
            if queue not in self.quotas:
                await self._set_conditions(workload, _condition("QuotaReserved", False, "Inadmissible",
                                                                f"LocalQueue {queue} doesn't exist"))
            elif in_use.get(queue, 0) >= self.quotas[queue]:
                await self._set_conditions(workload, _condition(
                    "QuotaReserved", False, "Pending", "couldn't assign flavors to pod set master: insufficient "
                    "unused quota for cpu in flavor default-flavor, 1 more needed"))
            else:
                in_use[queue] = in_use.get(queue, 0) + 1
                await self._set_conditions(workload, _condition("QuotaReserved", True, "QuotaReserved",
                                                                f"Quota reserved in ClusterQueue {queue}"),
                                           _condition("Admitted", True, "Admitted", "The workload is admitted"))
                await self._suspend(job, resource, False)  # reconciler.go startJob
                self.admitted.append(job["metadata"]["name"])

    async def run_forever(self) -> None:
        while True:
            await self.reconcile()
            await asyncio.sleep(self.interval)


def install(k8s: K8sEmulator) -> None:
    """Serve Kueue's Workload kind on the emulator (its CRD, as Kueue's chart installs it)."""
    k8s.resources[f"{WORKLOADS.group}/{WORKLOADS.version}/{WORKLOADS.plural}"] = kmock.ResourceInfo(
        kind="Workload", singular="workload", namespaced=True,
        verbs={"list", "watch", "get", "create", "patch", "update", "delete"}, subresources={"status"})


@contextlib.asynccontextmanager
async def running(k8s: K8sEmulator, client: kube.KubeClient, namespace: str,
                  quotas: dict[str, int]) -> AsyncIterator[Kueue]:
    """Kueue's webhook on the emulator and its controller's loop for the duration of a test."""
    install(k8s)
    kueue = Kueue(client, namespace, quotas)
    k8s.mutators.append(kueue.webhook)
    task = asyncio.create_task(kueue.run_forever())
    try:
        yield kueue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        k8s.mutators.remove(kueue.webhook)
