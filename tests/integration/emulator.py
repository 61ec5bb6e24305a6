"""A Kubernetes API emulator for the integration tests: KMock plus the server-side behaviour kopf
relies on (resourceVersion, uid/generation/creationTimestamp, generateName, status subresource
semantics, 422 on failed JSON-patch tests, label selectors, race-free watches).

KMock (by kopf's author) serves the real Kubernetes HTTP API in-process; it has no garbage
collector, no admission and no resourceVersion conflicts on merge patches, so decisions are
unit-tested as pure functions and this emulator checks the wiring and the flows.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jsonpatch
import kmock
from kmock._internal import parsing as _kmock_parsing

_parse_path = _kmock_parsing.parse_path


def _parse_path_with_namespaces(path: str):
    """KMock 0.8 reads `/api/v1/namespaces[/NAME]` as "a namespace called ..." with no resource,
    so kopf's namespace observer (needed for `--namespace` scoping) gets HTTP 500. Parse the core
    Namespace collection and objects as the API server does."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
        name = parts[3] if len(parts) == 4 else None
        return _kmock_parsing.ParsedPath("", "v1", "namespaces", None, name, None)
    return _parse_path(path)


_kmock_parsing.parse_path = _parse_path_with_namespaces


class K8sEmulator(kmock.KubernetesEmulator):
    """
    Adds what kopf needs but kmock 0.8 does not do by itself (see the report):

    * metadata.resourceVersion (global counter, bumped on every write; LIST returns it):
      kopf's finalizer add/remove is a JSON-patch with a ``test /metadata/resourceVersion``
      op, and kopf's "consistency" logic waits for the RV of its own patch in the watch.
    * metadata.uid / creationTimestamp / generation / namespace (from URL) / generateName
      (kopf posts Events with generateName; vanilla kmock stores them under name=None,
      so the 2nd event is a 409 conflict).
    * 422 (not 500) for failed JSON-patch "test" ops — what kopf expects on conflicts.
    * status-subresource semantics: PATCH on the main endpoint ignores ``status``,
      PATCH on ``/status`` changes only ``status`` (vanilla kmock merges anything anywhere).
    * WATCH race fix: vanilla kmock snapshots objects and only THEN subscribes to its bus,
      so writes in between are lost (kopf then acts on stale bodies forever). Here, the bus
      is marked under the lock, and ``?resourceVersion=N`` replays only objects newer than N.
    * ``labelSelector`` (k=v, k==v, k!=v, k, !k) on LIST & WATCH (vanilla kmock ignores it).
    * garbage collection: deleting an object deletes its dependents (``ownerReferences`` by uid),
      as the cluster's garbage collector does with background propagation.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = 1000                      # last committed resourceVersion
        self._write_lock = asyncio.Lock()    # serializes writes + lists (RV consistency)

    # --- helpers ---
    @staticmethod
    def _labels_match(selector: str | None, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        for term in filter(None, (t.strip() for t in (selector or '').split(','))):
            if '!=' in term:
                k, v = term.split('!=', 1)
                if labels.get(k.strip()) == v.strip():
                    return False
            elif '=' in term:
                k, v = term.replace('==', '=').split('=', 1)
                if labels.get(k.strip()) != v.strip():
                    return False
            elif term.startswith('!'):
                if term[1:].strip() in labels:
                    return False
            elif term not in labels:
                return False
        return True

    @classmethod
    def _matches(cls, request: kmock.Request, res: Any, ns: str | None, obj: Any) -> bool:
        meta = obj.get('metadata', {}) or {}
        return bool(
            res == request.resource
            and (request.namespace is None or ns == request.namespace)
            and (request.name is None or meta.get('name') == request.name)
            and cls._labels_match(request.params.get('labelSelector'), meta.get('labels'))
        )

    # --- request interception ---
    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is None:
            return await super()._handle(request)
        if request.action == kmock.action.LIST:
            async with self._write_lock:
                return await super()._handle(request)
        if request.action not in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            return await super()._handle(request)  # WATCH/FETCH/discovery: no lock (long-lived)

        async with self._write_lock:
            rv = str(self._rv + 1)
            data = request.data
            info = self.resources[request.resource] if request.resource in self.resources else None  # noqa: SIM401
            has_status = info is not None and 'status' in info.subresources
            if request.action == kmock.action.CREATE and isinstance(data, dict):
                meta = data.setdefault('metadata', {})
                if not meta.get('name') and meta.get('generateName'):
                    meta['name'] = meta['generateName'] + secrets.token_hex(3)
                if request.namespace and not meta.get('namespace'):
                    meta['namespace'] = request.namespace
                meta.setdefault('uid', str(uuid.uuid4()))
                meta.setdefault('creationTimestamp',
                                datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ'))
                meta.setdefault('generation', 1)
                meta['resourceVersion'] = rv
            elif request.action == kmock.action.UPDATE and isinstance(data, dict):  # merge-patch
                if has_status and request.subresource == 'status':
                    for key in [k for k in data if k != 'status']:
                        del data[key]
                elif has_status and request.subresource is None:
                    data.pop('status', None)
                data.setdefault('metadata', {})['resourceVersion'] = rv
            elif request.action == kmock.action.UPDATE and isinstance(data, list):  # json-patch
                data.append({'op': 'replace', 'path': '/metadata/resourceVersion', 'value': rv})
            elif request.action == kmock.action.DELETE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                obj = self.objects[key] if key in self.objects else None  # noqa: SIM401 (kmock views)
                if obj is not None and not obj.deleted:
                    meta = obj.get('metadata', {})
                    if meta.get('finalizers') and not meta.get('deletionTimestamp'):
                        obj['metadata']['resourceVersion'] = rv  # in-place; kmock then patches
            target = (request.resource, request.namespace, request.name)
            target_uid = None
            if request.name is not None and target in self.objects and not self.objects[target].deleted:
                target_uid = self.objects[target].get('metadata', {}).get('uid')
            try:
                response = await super()._handle(request)
            except jsonpatch.JsonPatchException as e:  # incl. JsonPatchTestFailed/Conflict
                raise kmock.KubernetesError(422, 'Invalid', str(e)) from e
            if response.status < 400:
                self._rv += 1
            if target_uid and self.objects[target].deleted:
                await self._collect_garbage(target_uid)
            return response

    async def _collect_garbage(self, owner_uid: str) -> None:
        """The garbage collector's background propagation: delete every object that names the
        deleted one in its ownerReferences, then their dependents."""
        for (resource, _, _), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            meta = obj.get('metadata', {}) or {}
            if not any(ref.get('uid') == owner_uid for ref in meta.get('ownerReferences') or []):
                continue
            async with self._lock:
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({'type': 'DELETED', 'object': raw})
            if meta.get('uid'):
                await self._collect_garbage(meta['uid'])

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        result['metadata']['resourceVersion'] = str(self._rv)
        sel = request.params.get('labelSelector')
        result['items'] = [i for i in result['items']
                           if self._labels_match(sel, i.get('metadata', {}).get('labels'))]
        return result

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b''  # send the headers now
        since = request.params.get('resourceVersion')
        since_int = int(since) if since and since.isdigit() else None
        bus = self._buses[request.resource]
        async with self._lock:  # the same lock under which kmock puts events to the bus
            marker = await bus.mark()
            initial = []
            for (res, ns, _), obj in self.objects.items():
                if not obj.deleted and self._matches(request, res, ns, obj):
                    obj_rv = str(obj.get('metadata', {}).get('resourceVersion') or '0')
                    if since_int is None:
                        initial.append({'type': 'ADDED', 'object': obj.raw})
                    elif obj_rv.isdigit() and int(obj_rv) > since_int:
                        initial.append({'type': 'MODIFIED', 'object': obj.raw})
        try:
            for event in initial:
                yield event
            async for event in bus.stream(since=marker):
                obj = event.get('object', {})
                ns = obj.get('metadata', {}).get('namespace')
                if self._matches(request, request.resource, ns, obj):
                    yield event
        finally:
            await bus.unmark(marker)


def declare_resources(k8s: kmock.KubernetesEmulator) -> None:
    # All K3s builtins: namespaces, events, configmaps, pods, CRDs (apiextensions), etc.
    # kopf's "backbone" REQUIRES v1/namespaces, v1/events, apiextensions.k8s.io CRDs to be
    # discoverable, otherwise the namespace/resource observers block forever.
    k8s.resources.load_bundled()
    k8s.resources['kubetune.io/v1alpha1/finetunejobs'] = kmock.ResourceInfo(
        kind='FineTuneJob', singular='finetunejob', namespaced=True, shortnames={'ftj'},
        verbs={'list', 'watch', 'get', 'create', 'patch', 'update', 'delete'},
        subresources={'status'},
    )
    k8s.resources['kubetune.io/v1alpha1/adapterdeployments'] = kmock.ResourceInfo(
        kind='AdapterDeployment', singular='adapterdeployment', namespaced=True, shortnames={'adep'},
        verbs={'list', 'watch', 'get', 'create', 'patch', 'update', 'delete'},
        subresources={'status'},
    )
    k8s.resources['kubeflow.org/v1/pytorchjobs'] = kmock.ResourceInfo(
        kind='PyTorchJob', singular='pytorchjob', namespaced=True,
        verbs={'list', 'watch', 'get', 'create', 'patch', 'update', 'delete'},
        subresources={'status'},
    )
