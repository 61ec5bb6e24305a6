"""The training-operator stand-in watching a Kubernetes API (the KMock emulator): every PyTorchJob that
appears has its pods run for real (`training_operator.PyTorchJobRun`) and its status written back.
`trainer_v2.TrainerController` is the same loop for TrainJobs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from kubetune.clients import kube

from .training_operator import PyTorchJobRun


def referenced(pytorchjob: dict) -> tuple[set[str], set[str]]:
    """Names of the ConfigMaps (volumes) and Secrets (env secretKeyRefs) its pods use."""
    config_maps, secrets = set(), set()
    for replica in pytorchjob["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        config_maps |= {v["configMap"]["name"] for v in pod.get("volumes") or [] if "configMap" in v}
        for container in pod["containers"]:
            for item in container.get("env") or []:
                ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    secrets.add(ref["name"])
    return config_maps, secrets


class TrainingOperator:
    """Runs the PyTorchJobs of one namespace; `runs` by job name (the current run of each). Another
    workload kind's stand-in overrides `resource` and the methods that read its spec and status."""

    resource = kube.PYTORCHJOBS

    def __init__(self, client: kube.KubeClient, namespace: str, root: Path, interval: float = 0.2):
        self.client, self.namespace, self.root, self.interval = client, namespace, root, interval
        self.runs: dict[str, PyTorchJobRun] = {}
        self._uids: dict[str, str] = {}
        self._written: dict[str, dict] = {}

    def referenced(self, job: dict) -> tuple[set[str], set[str]]:
        return referenced(job)

    def suspended(self, job: dict) -> bool:
        return bool((job["spec"].get("runPolicy") or {}).get("suspend"))

    def finished_before(self, job: dict) -> bool:
        """It finished under an earlier stand-in (an operator restart): not run again."""
        return bool((job.get("status") or {}).get("completionTime"))

    def new_run(self, job: dict, config_maps: dict, secrets: dict):
        return PyTorchJobRun(job, self.root / job["metadata"]["uid"], config_maps=config_maps, secrets=secrets)

    def idle_status(self, job: dict) -> dict | None:
        """The status of a suspended job that has no pods (None: leave it as it is)."""
        return None

    async def _objects(self, pytorchjob: dict) -> tuple[dict, dict]:
        config_map_names, secret_names = self.referenced(pytorchjob)
        config_maps, secrets = {}, {}
        for name in config_map_names:
            found = await self.client.get(kube.CONFIGMAPS, self.namespace, name)
            if found is not None:
                config_maps[name] = found.get("data") or {}
        for name in secret_names:
            found = await self.client.get(kube.SECRETS, self.namespace, name)
            if found is not None:
                secrets[name] = {k: base64.b64decode(v).decode() for k, v in (found.get("data") or {}).items()}
        return config_maps, secrets

    async def reconcile(self) -> None:
        """One pass over every job: start new ones, restart or finish pods, write statuses."""
        jobs = {j["metadata"]["name"]: j for j in await self.client.list(self.resource, self.namespace)}
        for name in [n for n in self.runs if n not in jobs or jobs[n]["metadata"]["uid"] != self._uids[n]]:
            await asyncio.to_thread(self.runs.pop(name).stop_pods)  # deleted: its pods go with it
        for name, job in jobs.items():
            suspended = self.suspended(job)
            run = self.runs.get(name)
            if run is None and not suspended and not self.finished_before(job):
                config_maps, secrets = await self._objects(job)
                run = self.new_run(job, config_maps, secrets)
                self.runs[name], self._uids[name] = run, job["metadata"]["uid"]
                run.start()
            elif run is not None and suspended and not run.finished:  # kubeflow deletes a suspended job's pods
                await asyncio.to_thread(run.stop_pods)
                del self.runs[name]
                run = None
            if run is None:
                await self._write(name, self.idle_status(job) if suspended else None)
                continue
            if run.waiting_pods():
                run.config_maps, run.secrets = await self._objects(job)
                run.retry_waiting()
            await asyncio.to_thread(run.poll)
            await self._write(name, run.status())

    async def _write(self, name: str, status: dict | None) -> None:
        if status is not None and status != self._written.get(name):
            await self.client.patch(self.resource, self.namespace, name, {"status": status}, subresource="status")
            self._written[name] = status

    async def run_forever(self) -> None:
        while True:
            await self.reconcile()
            await asyncio.sleep(self.interval)

    def stop(self) -> None:
        for run in self.runs.values():
            run.stop_pods()


@contextlib.asynccontextmanager
async def running(client: kube.KubeClient, namespace: str, root: Path,
                  controller: type[TrainingOperator] = TrainingOperator) -> AsyncIterator[TrainingOperator]:
    """The stand-in's loop (`controller`: the PyTorchJob one by default) for the duration of a test; every
    pod it started is stopped at the end."""
    operator = controller(client, namespace, root)
    task = asyncio.create_task(operator.run_forever())
    try:
        yield operator
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(operator.stop)
