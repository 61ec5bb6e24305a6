"""The shard lease loop (docs/sharding.md): every retry period one LIST of the Leases in the operator's
namespace, this replica's member Lease renewed, and reconcile.sharding's plan written with optimistic
concurrency. As client-go's tools/leaderelection (leaderelection.go, resourcelock/leaselock.go), per shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import AsyncIterator, Callable

import kopf

from kubetune.api import v1alpha1 as api
from kubetune.clients import credentials as creds
from kubetune.clients import kube
from kubetune_operator.reconcile import sharding
from kubetune_operator.reconcile.sharding import Seen, Timings

from .ownership import OWNERSHIP

log = logging.getLogger("kubetune.sharding")
FINALIZER = "kubetune.io/finalizer"  # kopf's (settings.persistence.finalizer)
LOST = frozenset({404, 409, 422})  # gone, or written by someone else since we read it: another replica won


def _micro_time() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _seen_of(lease: dict, previous: Seen | None, default_duration: float, now: float) -> Seen:
    spec = lease.get("spec") or {}
    return sharding.observe(previous, spec.get("holderIdentity") or None, lease["metadata"]["resourceVersion"],
                            float(spec.get("leaseDurationSeconds") or default_duration), now)


class ShardLeases:
    """What this replica holds, and the loop that keeps it. `owns` is the handlers' answer (Ownership)."""

    def __init__(self, client: kube.KubeClient, namespace: str, identity: str, shards: int, timings: Timings,
                 on_gain: Callable[[], None], clock: Callable[[], float] = time.monotonic):
        self.client, self.namespace, self.identity = client, namespace, identity
        self.shards, self.timings, self.on_gain, self.clock = shards, timings, on_gain, clock
        self.seen: dict[int, Seen] = {}
        self.members: dict[str, Seen] = {}
        self.renewed_at: dict[int, float] = {}  # shard -> when its last successful renewal was sent
        self.draining: dict[int, float] = {}    # shard -> when its hand-over to another replica began
        self._leases: dict[str, dict] = {}      # name -> the Lease as last listed or written

    def owns(self, namespace: str, name: str) -> bool:
        return sharding.shard_of(namespace, self.shards) in self.acting()

    def acting(self) -> frozenset[int]:
        return sharding.acting(self.renewed_at, frozenset(self.draining), self.timings.renew_deadline,
                               self.clock())

    async def run(self) -> None:
        """Rounds every retry period until cancelled; then the shards and the member Lease are given back."""
        try:
            while True:
                started = self.clock()
                await self.round_logged()
                await asyncio.sleep(max(0.0, self.timings.retry_period - (self.clock() - started)))
        finally:
            await asyncio.shield(self.release_all())

    async def round_logged(self) -> None:
        try:
            await self.round()
        except (kube.ApiError, OSError, TimeoutError) as exc:  # the deadline decides; the next round retries
            log.warning("shard lease round failed", extra={"error": repr(exc)})

    async def round(self) -> None:
        before = self.acting()
        self._observe(await self.client.list(kube.LEASES, self.namespace), self.clock())
        await self._renew_member()
        now = self.clock()
        live = sharding.live_member_count(self.identity, self.members, now)
        step = sharding.plan(self.identity, self.shards, self.seen, live, now)
        for shard in set(self.renewed_at) - set(step.renew) - set(step.release):  # taken while we stalled
            self._drop(shard, "lost")
        for shard in step.release:
            began = self.draining.setdefault(shard, now)
            if now - began >= self.timings.drain_seconds:
                await self._release(shard)
            else:
                await self._write(shard, acquire=False)
        for shard in step.renew:
            self.draining.pop(shard, None)
            await self._write(shard, acquire=False)
        for shard in step.acquire:
            await self._write(shard, acquire=True)
        for name in sharding.forgotten_members(self.identity, self.members, now):
            await self.client.delete(kube.LEASES, self.namespace, name)
        if self.acting() - before:
            log.info("shards acquired", extra={"shards": sorted(self.acting() - before), "members": live})
            self.on_gain()

    def _observe(self, leases: list[dict], now: float) -> None:
        shards, members, self._leases = {}, {}, {}
        for lease in leases:
            name = lease["metadata"]["name"]
            if name.startswith(sharding.SHARD_LEASE_PREFIX):
                suffix = name.removeprefix(sharding.SHARD_LEASE_PREFIX)
                if not suffix.isdigit() or int(suffix) >= self.shards:
                    continue  # another --shards setting's Lease: not ours to judge
                shards[int(suffix)] = _seen_of(lease, self.seen.get(int(suffix)), self.timings.lease_duration, now)
            elif name.startswith(sharding.MEMBER_LEASE_PREFIX):
                member = name.removeprefix(sharding.MEMBER_LEASE_PREFIX)
                members[member] = _seen_of(lease, self.members.get(member), self.timings.lease_duration, now)
            else:
                continue
            self._leases[name] = lease
        self.seen, self.members = shards, members

    def _spec(self, holder: str | None, previous: dict, acquire: bool) -> dict:
        now = _micro_time()
        spec = {"leaseDurationSeconds": math.ceil(self.timings.lease_duration), "renewTime": now,
                "acquireTime": now if acquire else previous.get("acquireTime", now),
                "leaseTransitions": int(previous.get("leaseTransitions") or 0) + (
                    1 if acquire and previous.get("holderIdentity") else 0)}
        return {**spec, "holderIdentity": holder} if holder else spec

    async def _write(self, shard: int, *, acquire: bool) -> None:
        """Acquire or renew one shard Lease: created if absent, else patched only if unchanged since listed."""
        name = sharding.shard_lease_name(shard)
        sent = self.clock()
        written = await self._put(name, self._spec(self.identity, (self._leases.get(name) or {}).get("spec") or {},
                                                   acquire))
        if written is None:
            self._drop(shard, "lost")
            return
        if shard not in self.renewed_at:
            log.info("shard lease acquired", extra={"shard": shard, "lease": name})
        self.renewed_at[shard] = sent
        self.seen[shard] = _seen_of(written, None, self.timings.lease_duration, sent)

    async def _put(self, name: str, spec: dict) -> dict | None:
        """The Lease written with `spec`, or None when another replica wrote it first."""
        lease = self._leases.get(name)
        try:
            if lease is None:
                written, _ = await self.client.create(kube.LEASES, {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}, adopt=False)
            else:
                written = await self.client.json_patch(kube.LEASES, self.namespace, name, [
                    {"op": "test", "path": "/metadata/resourceVersion", "value": lease["metadata"]["resourceVersion"]},
                    {"op": "replace", "path": "/spec", "value": spec}])
        except kube.ApiError as exc:
            if exc.status in LOST:
                return None
            raise
        self._leases[name] = written
        return written

    async def _release(self, shard: int) -> None:
        """The hand-over's end: no holder, so the next replica takes it at once (client-go's ReleaseOnCancel)."""
        name = sharding.shard_lease_name(shard)
        self.renewed_at.pop(shard, None)  # stop acting first, whatever the write's fate
        released = await self._put(name, self._spec(None, (self._leases.get(name) or {}).get("spec") or {},
                                                     acquire=False))
        self.draining.pop(shard, None)
        log.info("shard lease " + ("released" if released is not None else "not released: written by another"),
                 extra={"shard": shard})

    def _drop(self, shard: int, why: str) -> None:
        if self.renewed_at.pop(shard, None) is not None:
            log.info(f"shard lease {why}", extra={"shard": shard})
        self.draining.pop(shard, None)

    async def _renew_member(self) -> None:
        """This replica's own Lease, so that the others count it before it holds any shard."""
        name = sharding.member_lease_name(self.identity)
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": math.ceil(self.timings.lease_duration),
                "renewTime": _micro_time()}
        if name in self._leases:
            try:
                self._leases[name] = await self.client.patch(kube.LEASES, self.namespace, name, {"spec": spec})
                return
            except kube.ApiError as exc:
                if exc.status != 404:
                    raise
        self._leases[name], _ = await self.client.create(kube.LEASES, {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}, adopt=False)

    async def release_all(self) -> None:
        """On shutdown: every held shard released and the member Lease deleted, so the others take over now."""
        try:  # read afresh: a round cancelled mid-write leaves this replica's view of the Leases stale
            self._observe(await self.client.list(kube.LEASES, self.namespace), self.clock())
            for shard in sorted(s for s, seen in self.seen.items() if seen.holder == self.identity):
                await self._release(shard)
            await self.client.delete(kube.LEASES, self.namespace, sharding.member_lease_name(self.identity))
        except (kube.ApiError, OSError, TimeoutError) as exc:  # they expire instead
            log.warning("shard leases not released", extra={"error": repr(exc)})


def from_args(args, client: kube.KubeClient, on_gain: Callable[[], None]) -> ShardLeases:
    """The loop the operator's flags describe (--shards > 1); a clear exit on a missing or wrong setting."""
    try:
        timings = Timings(args.lease_duration, args.renew_deadline, args.retry_period)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not args.lease_namespace:
        raise SystemExit("--shards > 1 needs --lease-namespace (or $POD_NAMESPACE): where the shard Leases live")
    if not args.identity or not sharding.valid_identity(args.identity):
        raise SystemExit(f"--identity {args.identity!r}: a replica's name in a Lease's name (lowercase letters, "
                         "digits, '-' and '.', at most 236 characters)")
    return ShardLeases(client, args.lease_namespace, args.identity, args.shards, timings, on_gain)


@contextlib.asynccontextmanager
async def holding(args, credentials: creds.CredentialsProvider) -> AsyncIterator[None]:
    """With --shards > 1: the handlers own what this replica's Leases hold, the first round taken before
    kopf starts (its resume handlers then see this replica's shards), and the shards given back at exit."""
    if args.shards == 1:
        yield
        return
    # no retries within a round (the next round is the retry); a request slower than the renew deadline
    # cannot keep a shard anyway
    client = kube.KubeClient(credentials=credentials, retries=0, timeout=args.renew_deadline)
    leases = from_args(args, client, OWNERSHIP.gained)
    OWNERSHIP.delegate(leases.owns)
    await leases.round_logged()
    task = asyncio.create_task(leases.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        OWNERSHIP.delegate(None)
        await client.close()


def _foreign_with_finalizer(namespace, name, meta, **_) -> bool:
    return not OWNERSHIP.owns(namespace, name) and FINALIZER in (meta.get("finalizers") or [])


def register_finalizer_keepers(registry: kopf.OperatorRegistry | None = None) -> None:
    """kopf adds its finalizer where a matching handler needs one and removes it where none does; the
    handlers' ownership filter would make every other replica remove the owner's finalizer (and the owner
    add it back). A timer that does nothing, matching exactly the foreign objects that carry it, makes a
    non-owner leave the finalizer as it finds it. On deletion the clean-up handler, which every replica
    matches, keeps it until the owner has cleaned up (docs/sharding.md)."""
    kw = {"registry": registry} if registry is not None else {}
    for plural in ("finetunejobs", "adapterdeployments"):
        @kopf.timer(api.GROUP, api.VERSION, plural, id=f"{plural}_finalizer_keeper", interval=86400.0,
                    initial_delay=86400.0, idle=None, when=_foreign_with_finalizer, **kw)
        async def keep_finalizer(**_) -> None:
            return None
