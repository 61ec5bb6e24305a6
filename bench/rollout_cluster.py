"""The rollout bench's cluster: the emulator (token authentication, its TLS front) in a thread of this
process, agents as processes in cluster mode (watching their desired-state ConfigMap, reporting on their
own Pod object), and the operator's decision writing the ConfigMap and reading the Pods' annotations."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from pathlib import Path

import kmock

from kubetune.api import serving
from kubetune.clients import kube
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_testing import auth, serving_pods
from kubetune_testing.emulator import EXEMPT_HEADER, declare_resources
from kubetune_testing.served_requests import ForgetfulEmulator
from kubetune_testing.tls_front import TlsFront
from rollout_pods import ADAPTER, NS, REPO_ROOT, AdapterVersion, Agent, Engine, LocalOperator, unique_port


class Cluster:
    """`call(coroutine)` runs it on the emulator's event loop with the admin `client` (spared faults)."""

    def __init__(self, work: Path):
        self.work = work
        self.adep = serving_pods.adapter_deployment(NS, ADAPTER)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.client: kube.KubeClient | None = None
        self.front: TlsFront | None = None
        self.authenticator: auth.TokenAuthenticator | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Cluster:
        ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(ready),), name="emulator", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise TimeoutError("the emulator did not start")
        return self

    async def _serve(self, ready: threading.Event) -> None:
        self.loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with ForgetfulEmulator() as k8s, kmock.Server(k8s):
            declare_resources(k8s)
            self.authenticator = auth.TokenAuthenticator().install(k8s)
            async with TlsFront(str(k8s.url), self.work / "tls") as front:
                self.front = front
                self.client = kube.KubeClient(str(k8s.url), headers={EXEMPT_HEADER: "1"})
                ready.set()
                await self._stop.wait()
                await self.client.close()

    def call(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)


class ClusterAgent(Agent):
    """`python -m kubetune_agent` in cluster mode: its Pod in the emulator, a pod-bound token, the
    ConfigMap watched through the TLS front."""

    def __init__(self, cluster: Cluster, engine: Engine, root: Path, pod: str, sync_seconds: float):
        self.cluster, self.engine, self.pod = cluster, engine, pod
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "agent.log"
        self.port = unique_port()
        cluster.call(serving_pods.create_pod(cluster.client, cluster.adep, pod))
        account = serving_pods.project_account(cluster.authenticator, root / "account", cluster.adep, pod,
                                               cluster.front.ca_path)
        command = serving_pods.agent_command(adep=cluster.adep, pod=pod, account_dir=account, engine_url=engine.url,
                                             port=self.port, cache_dir=root / "cache", sync_seconds=sync_seconds)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                            env=serving_pods.agent_env(dict(os.environ), cluster.front.url))

    def set_desired(self, desired: serving.DesiredState) -> None:
        raise AssertionError("in cluster mode the operator writes the ConfigMap, never an agent's file")

    def report(self) -> dict | None:
        report = self.cluster.call(serving_pods.report_of(self.cluster.client, NS, self.pod))
        return None if report is None else json.loads(report.to_json())


class ClusterOperator(LocalOperator):
    """The AdapterDeployment controller's decision with its cluster I/O: the desired state is the
    ConfigMap it renders (created with the agents' RBAC on the first write, then merge-patched)."""

    def __init__(self, cluster: Cluster, agents: list[Agent], source: AdapterVersion, base_model: dict):
        super().__init__(agents, source, base_model)
        self.cluster = cluster
        self.created = False

    def pods(self) -> list[adp.Pod]:
        """One LIST of the namespace's Pods, their reports from the annotation (as the controller reads them)."""
        listed = self.cluster.call(self.cluster.client.list(serving_pods.RESOURCES["Pod"], NS))
        reports = {p["metadata"]["name"]: ((p["metadata"].get("annotations") or {}).get(serving.ANNOTATION_REPORT))
                   for p in listed}
        return [adp.Pod(a.pod, True, json.loads(reports[a.pod]) if reports.get(a.pod) else None) for a in self.agents]

    def write(self, desired: serving.DesiredState) -> None:
        if not self.created:
            self.cluster.call(serving_pods.create_agent_objects(self.cluster.client, self.cluster.adep, desired))
            self.created = True
        else:
            self.cluster.call(serving_pods.set_desired(self.cluster.client, self.cluster.adep, desired))
