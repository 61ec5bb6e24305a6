"""The shard Lease loop (controllers/sharding.py) against the emulator, on a clock the test moves: a second
replica gets half after a drained hand-over, a silent one's shards are taken once expired, a replica that
resumes after losing its shards stops acting on them, and a shutdown gives everything back."""

from __future__ import annotations

import pytest

from kubetune.clients import kube
from kubetune_operator.controllers.sharding import ShardLeases
from kubetune_operator.reconcile import sharding
from kubetune_operator.reconcile.sharding import Timings
from kubetune_testing import enforcement

from .conftest import OPERATOR_USER, RBAC_USES, admin_client

pytestmark = pytest.mark.integration

NAMESPACE, SHARDS = "kubetune-system", 4
TIMINGS = Timings(lease_duration=15, renew_deadline=10, retry_period=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _replica(k8s, identity: str, clock: Clock, gains: list[str]) -> ShardLeases:
    client = kube.KubeClient(str(k8s.url), token=k8s.authenticator.issue(OPERATOR_USER))
    return ShardLeases(client, NAMESPACE, identity, SHARDS, TIMINGS, lambda: gains.append(identity), clock)


async def _holders(k8s) -> dict[int, str | None]:
    client = admin_client(k8s)
    leases = {lease["metadata"]["name"]: lease for lease in await client.list(kube.LEASES, NAMESPACE)}
    await client.close()
    return {s: (leases.get(sharding.shard_lease_name(s), {}).get("spec") or {}).get("holderIdentity")
            for s in range(SHARDS)}


async def test_hand_over_takeover_and_release(k8s):
    k8s.enforcement.remove()
    k8s.enforcement = enforcement.enforce(k8s, uses=RBAC_USES, values={"sharding.shards": SHARDS})
    clock, gains = Clock(), []
    a, b = _replica(k8s, "a", clock, gains), _replica(k8s, "b", clock, gains)
    try:
        await a.round()
        assert a.acting() == {0, 1, 2, 3} and gains == ["a"]
        await b.round()  # b is counted, holds nothing yet: a's Leases are live
        assert b.acting() == set()

        await a.round()  # a sees two members: hands 2 and 3 over, first stops acting on them
        assert a.acting() == {0, 1} and set(a.draining) == {2, 3}
        clock.now += TIMINGS.drain_seconds
        await a.round()  # drained: released
        assert (await _holders(k8s)) == {0: "a", 1: "a", 2: None, 3: None}
        await b.round()
        assert b.acting() == {2, 3} and gains == ["a", "b"]
        assert a.owns("team-a", "job") == (sharding.shard_of("team-a", SHARDS) in {0, 1})

        # b falls silent: it stops acting at its renew deadline, a takes over at the lease duration
        clock.now += TIMINGS.renew_deadline
        assert b.acting() == set()
        await a.round()  # a first sees b's last renewal now: expiry counts from here, on a's own clock
        assert a.acting() == {0, 1}
        clock.now += TIMINGS.lease_duration - 0.1
        await a.round()
        assert a.acting() == {0, 1}
        clock.now += 0.1
        await a.round()
        assert a.acting() == {0, 1, 2, 3} and gains[-1] == "a"
        assert set((await _holders(k8s)).values()) == {"a"}

        await b.round()  # b resumes: its Leases were taken, it acts on nothing and takes nothing back
        assert b.acting() == set() and not b.renewed_at

        await a.release_all()
        assert set((await _holders(k8s)).values()) == {None}
        assert await admin_client(k8s).get(kube.LEASES, NAMESPACE, sharding.member_lease_name("a")) is None
    finally:
        await a.client.close()
        await b.client.close()
