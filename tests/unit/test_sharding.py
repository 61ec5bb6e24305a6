"""Sharding decisions (reconcile/sharding.py): a namespace's shard, Lease expiry on the candidate's own
clock, the fair share, and which shards a replica acquires, renews and releases."""

from __future__ import annotations

import pytest

from kubetune_operator.reconcile import sharding
from kubetune_operator.reconcile.sharding import Seen, Timings


def _seen(holder: str | None, at: float = 0.0, version: str = "1", duration: float = 15.0) -> Seen:
    return Seen(holder, version, at, duration)


def test_shard_of_is_stable_and_spreads_namespaces():
    assert sharding.shard_of("team-a", 4) == sharding.shard_of("team-a", 4)
    assert sharding.shard_of("team-a", 1) == 0
    spread = {sharding.shard_of(f"team-{i}", 4) for i in range(40)}
    assert spread == {0, 1, 2, 3}
    assert sharding.shard_of("team-a", 4) == 1  # crc32: the same in every process, Python release and restart


def test_expiry_is_judged_from_when_the_record_last_changed_here():
    first = sharding.observe(None, "a", "7", 15.0, now=100.0)
    assert sharding.observe(first, "a", "7", 15.0, now=110.0) is first  # unchanged: the clock keeps running
    assert not sharding.expired(first, now=114.9)
    assert sharding.expired(first, now=115.0)
    renewed = sharding.observe(first, "a", "8", 15.0, now=112.0)
    assert renewed.observed_at == 112.0 and not sharding.expired(renewed, now=120.0)


def test_fair_share_is_the_ceiling():
    assert sharding.fair_share(4, 1) == 4
    assert sharding.fair_share(4, 2) == 2
    assert sharding.fair_share(4, 3) == 2
    assert sharding.fair_share(3, 0) == 3


def test_a_lone_replica_takes_every_free_shard():
    step = sharding.plan("a", 4, {}, live_members=1, now=0.0)
    assert step == sharding.Plan(acquire=(0, 1, 2, 3))


def test_a_second_replica_makes_the_first_hand_over_its_highest_shards():
    held = {s: _seen("a") for s in range(4)}
    assert sharding.plan("a", 4, held, live_members=2, now=1.0) == sharding.Plan(renew=(0, 1), release=(2, 3))
    # b waits: nothing is free until a lets go, and a's Leases are renewed
    assert sharding.plan("b", 4, held, live_members=2, now=1.0) == sharding.Plan()
    released = {**held, 2: _seen(None, version="2"), 3: _seen(None, version="2")}
    assert sharding.plan("b", 4, released, live_members=2, now=2.0) == sharding.Plan(acquire=(2, 3))


def test_a_dead_replicas_shards_are_taken_once_expired():
    leases = {0: _seen("b", at=10.0), 1: _seen("b", at=10.0), 2: _seen("a", at=10.0), 3: _seen("a", at=10.0)}
    assert sharding.plan("b", 4, leases, live_members=1, now=24.0).acquire == ()
    assert sharding.plan("b", 4, leases, live_members=1, now=25.0) == sharding.Plan(acquire=(2, 3), renew=(0, 1))


def test_shards_of_another_replica_are_not_taken_beyond_the_share():
    leases = {0: _seen("a"), 1: _seen(None), 2: _seen(None), 3: _seen(None)}
    assert sharding.plan("b", 4, leases, live_members=2, now=0.0).acquire == (1, 2)


def test_members_are_counted_while_their_lease_changes():
    members = {"a": _seen("a", at=0.0), "b": _seen("b", at=0.0), "c": _seen("c", at=5.0)}
    assert sharding.live_member_count("a", members, now=10.0) == 3
    assert sharding.live_member_count("a", members, now=16.0) == 2  # b unchanged for 15 s: gone
    assert sharding.forgotten_members("a", members, now=44.9) == []
    assert sharding.forgotten_members("a", members, now=45.0) == ["b"]


def test_a_replica_acts_only_within_the_renew_deadline_and_not_while_handing_over():
    renewed = {0: 100.0, 1: 95.0, 2: 100.0}
    assert sharding.acting(renewed, frozenset({2}), renew_deadline=10.0, now=104.9) == {0, 1}
    assert sharding.acting(renewed, frozenset(), renew_deadline=10.0, now=105.0) == {0, 2}


def test_timings_keep_the_stop_before_the_takeover():
    assert Timings().drain_seconds == 5.0
    with pytest.raises(ValueError, match="--renew-deadline"):
        Timings(lease_duration=10, renew_deadline=10, retry_period=2)
    with pytest.raises(ValueError, match="--retry-period"):
        Timings(lease_duration=15, renew_deadline=2, retry_period=2)


def test_identity_must_fit_a_lease_name():
    assert sharding.valid_identity("kubetune-7d9f-abcde")
    assert not sharding.valid_identity("Kubetune_1")
    assert not sharding.valid_identity("x" * 240)
