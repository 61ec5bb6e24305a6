"""A serving agent process in cluster mode against the emulator (TLS, a pod-bound token, the chart's
RBAC and the agents' Role as the operator renders it): it learns of a new desired state by watching
its ConfigMap, not at its sync tick, survives dropped watches, and is refused the watch without the grant."""

from __future__ import annotations

import asyncio
import os
import subprocess

from kubetune.api import serving
from kubetune_operator.render import serving as serving_render
from kubetune_testing import serving_pods
from kubetune_testing.emulator_faults import Faults
from kubetune_testing.ports import free_port
from kubetune_testing.tls_front import TlsFront
from tests.agent.conftest import FakeEngine, desired_state, publish

from .conftest import NS, admin_client, eventually

POD = "intents-serving-0"


async def _report_with(client, generation: int) -> serving.AgentReport | None:
    report = await serving_pods.report_of(client, NS, POD)
    return report if report is not None and report.generation == generation else None


async def test_an_agent_follows_its_configmap_by_watch_through_dropped_watches(k8s, tmp_path):
    versions = [publish(tmp_path, "intents", bytes([n]) * 512) for n in (1, 2, 3)]
    desired = [desired_state(g + 1, {f"{NS}/intents": [v]}) for g, v in enumerate(versions)]
    adep = serving_pods.adapter_deployment(NS, "intents")
    client, engine = admin_client(k8s), FakeEngine()
    await engine.start()
    await serving_pods.create_agent_objects(client, adep, desired[0])
    await serving_pods.create_pod(client, adep, POD)
    # the API server ends each watch of the agent after 1-3 s (as a load balancer's idle timeout or an
    # API server's shutdown does): it must watch again from where it was, never miss a change
    k8s.faults = Faults(watch_drop_seconds=2.0)
    async with TlsFront(str(k8s.url), tmp_path / "tls") as front:
        account = serving_pods.project_account(k8s.authenticator, tmp_path / "account", adep, POD, front.ca_path)
        # a sync tick of an hour: only the watch can bring a change within the test
        command = serving_pods.agent_command(adep=adep, pod=POD, account_dir=account, engine_url=engine.url,
                                             port=free_port(), cache_dir=tmp_path / "cache", sync_seconds=3600)
        log = tmp_path / "agent.log"
        with open(log, "wb") as out:
            agent = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                     env=serving_pods.agent_env(dict(os.environ), front.url))
        try:
            first = await eventually(lambda: _report_with(client, 1), timeout=60)
            assert first.loaded == {versions[0].name: versions[0].digest}

            await serving_pods.set_desired(client, adep, desired[1])
            second = await eventually(lambda: _report_with(client, 2), timeout=20)
            assert second.loaded == {versions[1].name: versions[1].digest}

            await eventually(lambda: k8s.faults.counts["watch_drop"] >= 2, timeout=20)
            await serving_pods.set_desired(client, adep, desired[2])
            third = await eventually(lambda: _report_with(client, 3), timeout=20)
            assert third.loaded == {versions[2].name: versions[2].digest}
            assert engine.loads == [v.name for v in versions]

            # a Role without watch (an older operator's): the next watch is refused with 403
            role = next(d for d in serving_render.render_agent_rbac(adep) if d["kind"] == "Role")
            role["rules"][0]["verbs"] = ["get"]
            await client.patch(serving_pods.RESOURCES["Role"], NS, role["metadata"]["name"], {"rules": role["rules"]})
            refused = k8s.enforcement.authorizer.refused
            await eventually(lambda: any('cannot watch resource "configmaps"' in r for r in refused), timeout=20)
        finally:
            agent.terminate()
            await asyncio.to_thread(agent.wait, 15)
            await engine.stop()
            await client.close()
    text = log.read_text()
    assert "desired-state watch failed" in text, text[-3000:]
