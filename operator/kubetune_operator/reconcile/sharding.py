"""Sharding decisions (docs/sharding.md): a namespace's shard, whether a Lease is expired, and which shard
Leases a replica acquires, renews and releases. Pure: the lease loop (controllers/sharding.py) does the I/O.
Timings and the expiry rule follow client-go's tools/leaderelection (leaderelection.go).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

SHARD_LEASE_PREFIX = "kubetune-shard-"
MEMBER_LEASE_PREFIX = "kubetune-member-"


def shard_of(namespace: str, shards: int) -> int:
    """A stable hash of the namespace (crc32, the same in every process and release): a tenant's objects,
    and an AdapterDeployment with its FineTuneJobs, land in one shard."""
    return zlib.crc32(namespace.encode()) % shards


_IDENTITY = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


def valid_identity(identity: str) -> bool:
    """Whether the member Lease's name (a DNS subdomain, at most 253 characters) can carry it."""
    return len(member_lease_name(identity)) <= 253 and _IDENTITY.fullmatch(identity) is not None


def shard_lease_name(shard: int) -> str:
    return f"{SHARD_LEASE_PREFIX}{shard}"


def member_lease_name(identity: str) -> str:
    return f"{MEMBER_LEASE_PREFIX}{identity}"


@dataclass(frozen=True)
class Timings:
    """As client-go's LeaderElectionConfig: a holder that has not renewed for `renew_deadline` stops acting;
    a candidate takes a Lease it has seen unchanged for `lease_duration`; every `retry_period` the loop runs."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("lease timings: need 0 < --retry-period < --renew-deadline < --lease-duration "
                             f"(got {self.retry_period}, {self.renew_deadline}, {self.lease_duration})")

    @property
    def drain_seconds(self) -> float:
        """How long a pass may outlive its shard's stop and still end before anyone else can start one."""
        return self.lease_duration - self.renew_deadline


@dataclass(frozen=True)
class Seen:
    """A Lease as this replica last saw it: its holder, its resourceVersion (which changes on every write,
    so a renewal is seen as a change) and this replica's monotonic clock when that version first appeared."""

    holder: str | None
    version: str
    observed_at: float
    duration: float  # the record's leaseDurationSeconds: its holder's promise, as client-go reads it


def observe(previous: Seen | None, holder: str | None, version: str, duration: float, now: float) -> Seen:
    """client-go's observedTime: reset only when the record changed, so expiry never trusts another clock."""
    if previous is not None and previous.version == version:
        return previous
    return Seen(holder, version, now, duration)


def expired(seen: Seen, now: float) -> bool:
    return now >= seen.observed_at + seen.duration


def fair_share(shards: int, live_members: int) -> int:
    """At most this many shards per replica: ceil(S / replicas alive), so a second replica gets half."""
    return math.ceil(shards / max(1, live_members))


@dataclass(frozen=True)
class Plan:
    acquire: tuple[int, ...] = ()
    renew: tuple[int, ...] = ()
    release: tuple[int, ...] = ()


def plan(identity: str, shards: int, leases: dict[int, Seen], live_members: int, now: float) -> Plan:
    """One round of the lease loop. `leases`: the shard Leases that exist, as seen; a missing one is free.
    Renew what this replica holds up to its fair share, release the rest (highest shards first, so that
    every replica converges on the same split), and acquire free or expired shards up to the share."""
    share = fair_share(shards, live_members)
    held = sorted(s for s, seen in leases.items() if seen.holder == identity)
    keep, release = held[:share], held[share:]
    free = [s for s in range(shards) if s not in leases or not leases[s].holder
            or (leases[s].holder != identity and expired(leases[s], now))]
    return Plan(acquire=tuple(free[:max(0, share - len(keep))]), renew=tuple(keep), release=tuple(release))


def live_member_count(identity: str, members: dict[str, Seen], now: float) -> int:
    """Replicas alive: this one, and every other whose member Lease changed within its duration."""
    return 1 + sum(1 for name, seen in members.items() if name != identity and not expired(seen, now))


def forgotten_members(identity: str, members: dict[str, Seen], now: float) -> list[str]:
    """Member Leases of replicas gone for three lease durations (a Deployment names every new pod anew):
    deleted, so that they do not pile up. A replica that was only slow creates its Lease again."""
    return sorted(name for name, seen in members.items()
                  if name != identity and now >= seen.observed_at + 3 * seen.duration)


def acting(renewed_at: dict[int, float], draining: frozenset[int], renew_deadline: float, now: float
           ) -> frozenset[int]:
    """The shards this replica reconciles now: held, renewed (the renewal *sent*) within the renew
    deadline, and not being handed over. Judged at each call, so a stalled loop stops reconciling in time."""
    return frozenset(s for s, at in renewed_at.items() if now - at < renew_deadline and s not in draining)
