"""Two `kubetune operator` processes with --shards against one emulator (docs/sharding.md): they split the
namespaces through Leases, no object is written by both while both live, and when one is SIGKILLed the
other takes its shards over and reconciles a job created in one of them before the takeover (re-queued on
OWNERSHIP.gained()); the takeover time is reported."""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import time

import kmock
import pytest

from kubetune.clients import kube
from kubetune_operator.reconcile import sharding
from kubetune_testing import auth, enforcement, operator_process
from kubetune_testing.factories import finetunejob
from kubetune_testing.seaweedfs import ACCESS_KEY, SECRET_KEY

from .conftest import RBAC_USES, admin_client, eventually, write_kubeconfig

pytestmark = pytest.mark.integration

SHARDS = 4
LEASE_NAMESPACE = "kubetune-system"
# short, so that the takeover fits the test; long enough that a loaded machine's slow answers do not make
# a replica drop a shard and hand it over in the middle of the test
LEASE_SECONDS, RENEW_DEADLINE, RETRY = 8, 6, 1
TENANTS = [f"team-{c}" for c in "abcdefgh"]  # crc32 spreads them over all four shards


def _job(name: str, namespace: str, endpoint: str) -> dict:
    doc = finetunejob()
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["output"] = {"uri": "s3://adapters/jobs", "endpoint": endpoint,
                             "credentials": {"secretName": "s3-creds"}}
    return doc


async def _holders(client: kube.KubeClient) -> dict[int, str | None]:
    leases = await client.list(kube.LEASES, LEASE_NAMESPACE)
    by_name = {lease["metadata"]["name"]: (lease.get("spec") or {}).get("holderIdentity") for lease in leases}
    return {shard: by_name.get(sharding.shard_lease_name(shard)) for shard in range(SHARDS)}


def _writers_by_namespace(k8s, since: int) -> dict[str, set[str]]:
    """Which replica (the pod its bound token names) wrote successfully into each tenant namespace."""
    writers: dict[str, set[str]] = collections.defaultdict(set)
    for write in k8s.journal[since:]:
        if write.exempt or write.status >= 400 or write.user is None or write.namespace not in TENANTS:
            continue
        writers[write.namespace].add(write.user.extra_map.get(auth.POD_NAME, ["?"])[0])
    return writers


async def _start(k8s, tmp_path, s3_endpoint: str, pod: str) -> operator_process.OperatorProcess:
    user = auth.service_account("kubetune-system", "kubetune", pod=pod, pod_uid=f"uid-{pod}")
    token = k8s.authenticator.issue(user)
    kubeconfig = write_kubeconfig(tmp_path / f"kubeconfig-{pod}", str(k8s.url), {"token": token})
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_S3_ENDPOINT": s3_endpoint}
    return await operator_process.start(
        env, "--all-namespaces", "--publish-timeout", "5", "--shards", str(SHARDS), "--identity", pod,
        "--lease-namespace", LEASE_NAMESPACE, "--lease-duration", str(LEASE_SECONDS),
        "--renew-deadline", str(RENEW_DEADLINE), "--retry-period", str(RETRY))


async def test_two_replicas_split_the_work_and_one_takes_over(k8s, s3_server, tmp_path):
    k8s.enforcement.remove()  # the chart as installed with sharding.shards: its Leases Role included
    k8s.enforcement = enforcement.enforce(k8s, secret_namespaces=TENANTS, uses=RBAC_USES,
                                          values={"sharding.shards": SHARDS})
    client = admin_client(k8s)
    for namespace in TENANTS:
        k8s.objects[kmock.resource("", "v1", "namespaces"), None, namespace] = {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        await client.create(kube.SECRETS, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": namespace},
            "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(ACCESS_KEY.encode()).decode(),
                     "AWS_SECRET_ACCESS_KEY": base64.b64encode(SECRET_KEY.encode()).decode()}})
    first = await _start(k8s, tmp_path, s3_server.endpoint, "kubetune-a")
    second = None
    try:
        await eventually(lambda: _all_held_by(client, "kubetune-a"), timeout=30, interval=0.2)
        second = await _start(k8s, tmp_path, s3_server.endpoint, "kubetune-b")
        joined = time.monotonic()
        split = await eventually(lambda: _split(client), timeout=30, interval=0.2)
        split_seconds = time.monotonic() - joined
        await eventually(second.healthy, timeout=30, interval=0.2)

        since = len(k8s.journal)
        for namespace in TENANTS:
            await client.create(kube.FINETUNEJOBS, _job("sharded", namespace, s3_server.endpoint))
        for namespace in TENANTS:
            await eventually(lambda ns=namespace: client.get(kube.PYTORCHJOBS, ns, "sharded-data"), timeout=60)
        await asyncio.sleep(2 * RETRY + 1)  # follow-up passes and kopf's own writes land too
        writers = _writers_by_namespace(k8s, since)
        assert set(writers) == set(TENANTS)
        both = {ns: w for ns, w in writers.items() if len(w) != 1}
        assert not both, f"written by both replicas while both were alive: {both}: " + "\n".join(
            str(w) for w in k8s.journal[since:] if w.namespace in both and w.status < 400 and w.user is not None
            and w.user.extra_map.get(auth.POD_NAME) != [split[sharding.shard_of(w.namespace, SHARDS)]])
        for namespace, (writer,) in writers.items():  # the one that holds its shard
            assert split[sharding.shard_of(namespace, SHARDS)] == writer, (namespace, writer, split)
        assert {w for (w,) in writers.values()} == {"kubetune-a", "kubetune-b"}
        created = collections.Counter((w.namespace, w.name) for w in k8s.journal
                                      if w.method == "POST" and w.plural == "pytorchjobs" and w.status < 400)
        assert created == {(namespace, "sharded-data"): 1 for namespace in TENANTS}  # one PyTorchJob each
        assert not k8s.creates("pytorchjobs", succeeded=False)

        # SIGKILL the second: no release, its Leases must expire. A job created in one of its shards at once
        # is filtered out by the survivor until it takes the shard over, then re-queued (OWNERSHIP.gained()).
        foreign = next(ns for ns in TENANTS if split[sharding.shard_of(ns, SHARDS)] == "kubetune-b")
        second.process.kill()
        killed = time.monotonic()
        await client.create(kube.FINETUNEJOBS, _job("after", foreign, s3_server.endpoint))
        await eventually(lambda: _all_held_by(client, "kubetune-a"), timeout=LEASE_SECONDS + 30, interval=0.1)
        leases_seconds = time.monotonic() - killed
        await eventually(lambda: client.get(kube.PYTORCHJOBS, foreign, "after-data"), timeout=30, interval=0.1)
        takeover_seconds = time.monotonic() - killed
        print(f"\nsharding: split in {split_seconds:.1f} s; after SIGKILL all shards held in {leases_seconds:.1f} s, "
              f"new job in a taken-over shard reconciled in {takeover_seconds:.1f} s (lease {LEASE_SECONDS} s)")
        assert leases_seconds < LEASE_SECONDS + 20  # generous: a loaded CI machine
    except BaseException:
        for namespace in TENANTS:
            job = await client.get(kube.FINETUNEJOBS, namespace, "sharded") or {}
            print(namespace, job.get("status"), [w for w in k8s.journal if w.namespace == namespace][-5:])
        for replica in (first, second):
            if replica is not None:
                print((await replica.stop(grace=5))[-4000:])
        raise
    finally:
        if second is not None:
            await second.stop(grace=5)
        output = await first.stop()
        await client.close()
    # a graceful stop gives the shards back (holderless) and deletes the member Lease
    assert set((await _holders(admin_client(k8s))).values()) == {None}, output[-3000:]
    assert await admin_client(k8s).get(kube.LEASES, LEASE_NAMESPACE, sharding.member_lease_name("kubetune-a")) is None


async def _all_held_by(client: kube.KubeClient, pod: str) -> bool:
    return set((await _holders(client)).values()) == {pod}


async def _split(client: kube.KubeClient) -> dict[int, str | None] | None:
    holders = await _holders(client)
    counts = collections.Counter(holders.values())
    return holders if counts == {"kubetune-a": SHARDS // 2, "kubetune-b": SHARDS // 2} else None
