"""The emulator's object index (`kubetune_testing.object_index`) answers as kmock's full scans do: random
creates, patches (labels, owners, finalizers) and deletes through HTTP, run against the indexed emulator
and against one whose lookups and garbage collector are kmock's scans (the old code path), then LISTs
with random selectors compared item by item; plus the index's own cases and the bounded history."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import kmock
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune_testing.emulator import K8sEmulator, declare_resources
from kubetune_testing.emulator_oracle import ScanningEmulator
from kubetune_testing.object_index import ObjectIndex, label_selector_terms, labels_match

SETTINGS = settings(max_examples=30, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KINDS = {"configmaps": "ConfigMap", "serviceaccounts": "ServiceAccount"}
NAMESPACES = ("ns-a", "ns-b")
NAMES = ("x", "y", "z", "w")
LABEL_KEYS = ("app", "kubetune.io/finetunejob", "tier")
LABEL_VALUES = ("a", "b")
VOLATILE = ("creationTimestamp", "deletionTimestamp", "resourceVersion")  # clocks and counters, not lookups


def path(plural: str, namespace: str | None, name: str | None = None) -> str:
    where = f"/api/v1/namespaces/{namespace}/{plural}" if namespace else f"/api/v1/{plural}"
    return f"{where}/{name}" if name else where


def normalized(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: normalized(v) for k, v in body.items() if k not in VOLATILE}
    if isinstance(body, list):
        return [normalized(v) for v in body]
    return body


labels = st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=3)
label_term = st.one_of(
    st.tuples(st.sampled_from(LABEL_KEYS), st.sampled_from(("=", "==", "!=")), st.sampled_from(LABEL_VALUES))
    .map("".join),
    st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_KEYS).map(lambda key: "!" + key))
selector = st.lists(label_term, max_size=3).map(",".join)
field_selector = st.one_of(st.just(""), st.tuples(st.sampled_from(("metadata.name=", "metadata.name!=")),
                                                 st.sampled_from(NAMES)).map("".join))
where = st.tuples(st.sampled_from(sorted(KINDS)), st.sampled_from(NAMESPACES), st.sampled_from(NAMES))
create = st.tuples(st.just("create"), where, labels, st.integers(0, 5), st.booleans())
operation = st.one_of(
    create, create,
    st.tuples(st.just("patch"), st.integers(0, 30), st.dictionaries(
        st.sampled_from(LABEL_KEYS), st.sampled_from((*LABEL_VALUES, None)), max_size=2),
        st.integers(0, 5), st.booleans()),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("list"), st.sampled_from(sorted(KINDS)), st.sampled_from((None, *NAMESPACES)), selector,
              field_selector))


class Pair:
    """The same requests to the indexed emulator and the scanning one; their answers must be equal."""

    def __init__(self, session: aiohttp.ClientSession, indexed: K8sEmulator, scanning: ScanningEmulator):
        self.session, self.indexed, self.scanning = session, indexed, scanning
        self.uids: list[str] = []
        self.created: list[tuple[str, str, str]] = []  # what patches and deletes pick from (gone ones too)
        self.serial = itertools.count()

    async def both(self, method: str, url: str, **kw: Any) -> tuple[int, Any]:
        answers = []
        for emulator in (self.indexed, self.scanning):
            async with self.session.request(method, str(emulator.url).rstrip("/") + url, **kw) as response:
                answers.append((response.status, normalized(await response.json())))
        assert answers[0] == answers[1], f"{method} {url} {kw}"
        return answers[0]

    def owners(self, pick: int) -> list[dict]:
        if pick == 0 or not self.uids:
            return []
        uid = self.uids[pick % len(self.uids)]
        return [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]

    def target(self, pick: int) -> tuple[str, str, str]:
        return self.created[pick % len(self.created)] if self.created else ("configmaps", "ns-a", "x")

    async def run(self, op: tuple) -> None:
        if op[0] == "create":
            (_, (plural, ns, name), labels_, owner, finalizer) = op
            uid = f"uid-{next(self.serial)}"
            meta = {"name": name, "uid": uid, "labels": labels_, "ownerReferences": self.owners(owner),
                    "finalizers": ["kubetune.io/test"] if finalizer else []}
            status, _ = await self.both("POST", path(plural, ns), json={
                "apiVersion": "v1", "kind": KINDS[plural], "metadata": meta})
            if status < 400:
                self.uids.append(uid)
                self.created.append((plural, ns, name))
        elif op[0] == "patch":
            (_, pick, labels_, owner, drop_finalizers) = op
            plural, ns, name = self.target(pick)
            meta: dict = {"labels": labels_ or None, "ownerReferences": self.owners(owner) or None}
            if drop_finalizers:
                meta["finalizers"] = None
            await self.both("PATCH", path(plural, ns, name), json={"metadata": meta},
                            headers={"Content-Type": "application/merge-patch+json"})
        elif op[0] == "delete":
            plural, ns, name = self.target(op[1])
            await self.both("DELETE", path(plural, ns, name))
        else:
            await self.check_list(*op[1:])

    async def check_list(self, plural: str, ns: str | None, labels_: str, fields: str) -> None:
        params = {k: v for k, v in (("labelSelector", labels_), ("fieldSelector", fields)) if v}
        status, body = await self.both("GET", path(plural, ns), params=params)
        assert status == 200
        # and the full scan over what is stored, with the emulator's own filter (the old LIST)
        request = kmock.Request(resource=kmock.resource("", "v1", plural), namespace=ns, params=params)
        expected = [obj.raw for (res, key_ns, _), obj in self.indexed.objects.items()
                    if not obj.deleted and K8sEmulator._matches(request, res, key_ns, obj.raw)]
        assert body["items"] == normalized(expected)


async def run_pair(operations: list[tuple]) -> Pair:
    async with (K8sEmulator() as indexed, kmock.Server(indexed), ScanningEmulator() as scanning,
                kmock.Server(scanning), aiohttp.ClientSession() as session):
        for emulator in (indexed, scanning):
            declare_resources(emulator)
        pair = Pair(session, indexed, scanning)
        for op in operations:
            await pair.run(op)
        for plural, ns in itertools.product(sorted(KINDS), (None, *NAMESPACES)):
            await pair.check_list(plural, ns, "", "")
        assert_index_is_rebuilt_the_same(indexed)
        return pair


def assert_index_is_rebuilt_the_same(emulator: K8sEmulator) -> None:
    """What was kept current write by write equals an index built from scratch of what is stored."""
    rebuilt = ObjectIndex()
    for key, obj in emulator.objects.items():
        rebuilt.refresh(key, obj)
    assert vars(rebuilt) | {"_counter": None} == vars(emulator.objects.index) | {"_counter": None}


@SETTINGS
@given(st.lists(operation, min_size=8, max_size=40))
def test_the_index_answers_as_kmocks_scans(operations):
    asyncio.run(run_pair(operations))


def test_garbage_collection_follows_owners_through_the_index():
    owner, child = ("create", ("configmaps", "ns-a", "x"), {}, 0, False), \
        ("create", ("configmaps", "ns-a", "y"), {"app": "a"}, 1, False)  # owned by uid-0
    grandchild, other = ("create", ("serviceaccounts", "ns-b", "z"), {}, 1, False), \
        ("create", ("serviceaccounts", "ns-b", "w"), {}, 0, False)  # owned by uid-1; no owner
    pair = asyncio.run(run_pair([owner, child, grandchild, other, ("delete", 0)]))
    live = sorted(key[2] for key, obj in pair.indexed.objects.items() if not obj.deleted)
    assert live == ["w"]
    assert pair.indexed.objects.index.dependents("uid-0") == pair.indexed.objects.index.dependents("uid-1") == []


def test_selectors_parse_as_the_api_server_reads_them():
    assert label_selector_terms("a=b, c==d,e!=f,g,!h") == [
        ("=", "a", "b"), ("=", "c", "d"), ("!=", "e", "f"), ("exists", "g", ""), ("!exists", "h", "")]
    assert labels_match("a=b,!h", {"a": "b"}) and not labels_match("a=b,!h", {"a": "b", "h": "1"})
    assert labels_match("", None) and not labels_match("a", None)


@pytest.mark.parametrize("selectors", [{"labelSelector": "app=a"}, {"fieldSelector": "metadata.name=one"}])
async def test_a_watch_replays_only_the_selected_objects(selectors):
    async with K8sEmulator() as k8s, kmock.Server(k8s), aiohttp.ClientSession() as session:
        declare_resources(k8s)
        base = str(k8s.url).rstrip("/")
        for name, app in (("one", "a"), ("two", "b"), ("three", "a")):
            await session.post(base + path("configmaps", "ns-a"), json={"metadata": {"name": name,
                                                                                    "labels": {"app": app}}})
        await session.delete(base + path("configmaps", "ns-a", "three"))
        params = {"watch": "true", **selectors}
        async with session.get(base + path("configmaps", None), params=params) as response:
            first = await asyncio.wait_for(response.content.readline(), 5)
        assert b'"one"' in first and b'"two"' not in first and b'"three"' not in first


@pytest.mark.parametrize("bounded", [False, True])
def test_bounded_history_keeps_the_first_and_the_last_version(bounded):
    class Emulator(K8sEmulator):
        bounded_history = bounded

    emulator = Emulator()
    key = (kmock.resource("", "v1", "configmaps"), "ns-a", "x")
    emulator.objects[key] = {"metadata": {"name": "x"}, "data": {"v": "0"}}
    obj = emulator.objects[key]
    for version in range(1, 6):
        obj.patch({"data": {"v": str(version)}})
    obj.delete()
    assert obj.deleted and obj.last["data"]["v"] == "5" and obj.history[0]["data"]["v"] == "0"
    assert len(obj.history) == (3 if bounded else 7)
    obj.create({"metadata": {"name": "x"}, "data": {"v": "6"}})
    assert not obj.deleted and obj.history[0]["data"]["v"] == "0" and obj["data"]["v"] == "6"
    assert len(obj.history) == (2 if bounded else 8)


def test_a_hard_deleted_key_is_forgotten_and_comes_back_last():
    emulator = K8sEmulator()
    res = kmock.resource("", "v1", "configmaps")
    for name in ("a", "b"):
        emulator.objects[res, "ns", name] = {"metadata": {"name": name, "labels": {"app": "x"}}}
    del emulator.objects[res, "ns", "a"]
    emulator.objects[res, "ns", "a"] = {"metadata": {"name": "a", "labels": {"app": "x"}}}
    index = emulator.objects.index
    assert index.live_candidates(res, None, None, "app=x", None) == [(res, "ns", "b"), (res, "ns", "a")]
    assert list(index.keys(res, "ns")) == [key for key in emulator.objects]
    emulator.objects[res, "ns", "b"]["metadata"] = {"name": "b"}  # the label goes with the new metadata
    assert index.live_candidates(res, None, None, "app=x", None) == [(res, "ns", "a")]
    replaced = emulator.objects[res, "ns", "a"]
    emulator.objects[res, "ns", "a"] = {"metadata": {"name": "a"}}  # a new object in a's place
    replaced.patch({"metadata": {"labels": {"app": "x"}}})  # the old one speaks for no key
    assert index.live_candidates(res, None, None, "app=x", None) == []
    assert list(index.keys(res, "ns")) == [key for key in emulator.objects]  # still kmock's order
