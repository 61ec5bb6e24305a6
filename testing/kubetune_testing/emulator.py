"""A Kubernetes API emulator for tests and benches: KMock plus the server-side behaviour kopf relies on
(resourceVersion, uid/generation/creationTimestamp, generateName, status subresource semantics, 422 on
failed JSON-patch tests, label selectors, race-free watches). KMock has no garbage collector, admission
or resourceVersion conflicts on merge patches: decisions are unit-tested as pure functions; this checks
the wiring and the flows.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import parsing as _kmock_parsing
from kmock._internal import rendering as _kmock_rendering

from kubetune_testing import apiserver_views as views
from kubetune_testing import write_checks
from kubetune_testing.emulator_faults import USER_KEY, Faults, Write
from kubetune_testing.object_index import IndexedStore, labels_match

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
_kmock_parse_request = _kmock_rendering.Request._parse.__func__


async def _parse_request_binary_safe(cls, raw_request, *, id: int = 0):
    """kmock decodes every body as UTF-8 text; kubectl and helm send built-in kinds as protobuf,
    whose bytes are not (helm's release Secrets): give kmock the bytes, and text only when it is text."""
    if views.PROTOBUF not in (raw_request.headers.get('Content-Type') or ''):
        return await _kmock_parse_request(cls, raw_request, id=id)
    body = await raw_request.read()
    k8s = _kmock_parsing.parse_path(raw_request.path)
    resource = None if k8s is None or k8s.group is None else kmock.resource(
        group=k8s.group, version=k8s.version, plural=k8s.plural)
    method = kmock.method(raw_request.method)
    return cls(id=id, raw_request=raw_request, url=raw_request.url, method=raw_request.method,
               params=dict(raw_request.query), headers=dict(raw_request.headers),
               cookies=dict(raw_request.cookies), data=None, body=body,
               text=body.decode('utf-8', errors='replace'),
               action=_kmock_parsing.guess_k8s(k8s, method, dict(raw_request.query)), resource=resource,
               namespace=k8s.namespace, name=k8s.name, subresource=k8s.subresource)


_kmock_rendering.Request._parse = classmethod(_parse_request_binary_safe)


EXEMPT_HEADER = 'X-Emulator-Exempt'  # a client sending it (the test's own) never gets faults or cut-offs
WRITES = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)


class K8sEmulator(IndexedStore, kmock.KubernetesEmulator):
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
    * stored objects indexed (``object_index``): a LIST, WATCH, GET or write costs what the API
      server's watch cache costs, not a scan of every stored object.

    For the fault tests (``tests/integration/test_faults.py``): ``faults`` (a :class:`Faults`, off by
    default) injects 409/429/500, slow responses and dropped watch streams into the operator's
    requests; ``cut_off_after(n)`` lets n more writes of the operator through and then drops every
    request of it (its connection closed, nothing served), as if its process died at that point,
    until ``restore()``; ``journal`` records every write and its answer, ``phases`` every object's
    ``status.phase`` history. A client sending ``X-Emulator-Exempt`` (the test itself) is spared.

    And what a real ``kubectl`` needs (the docs' commands run against this emulator, see
    ``tests/integration/test_docs_commands.py``): lists with their ``kind``, ``fieldSelector`` (``kubectl
    describe`` reads a object's Events by ``involvedObject.*``; ``kubectl wait`` watches by
    ``metadata.name``), server-side printing (``as=Table``: a CRD's ``additionalPrinterColumns``
    evaluated as the API server does, a Name/Age table for other kinds, the Events table),
    OpenAPI v3 built from the CRDs' schemas (``kubectl explain``, client-side validation), no
    short names on subresources, and optionally admission (``admission``: a callable that returns
    the errors for a kubetune object, i.e. the CRD's schema and CEL rules, refused with 422 as the
    API server does).

    Other API-server parts plug in through ``gates`` (``auth.TokenAuthenticator``: bearer tokens and
    their rotation, 401), ``mutators`` (mutating webhooks, e.g. Kueue's suspend-on-create) and ``checks``
    (``write_checks``: every kind's object validated as the API server does, 413, fieldValidation).
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = 1000                      # last committed resourceVersion
        self._write_lock = asyncio.Lock()    # serializes writes + lists (RV consistency)
        # (kind, object) -> (["path: message", ...], the object with the schema's defaults); None: no
        # admission (the operator's own handling of invalid specs is tested by creating them)
        self.admission: Callable[[str, dict], tuple[list[str], dict]] | None = None
        self.faults: Faults | None = None
        self.journal: list[Write] = []
        self.phases: dict[tuple[str, str | None, str | None], list[str | None]] = {}
        self.operator_writes = 0            # writes of non-exempt clients let through
        self.operator_requests = 0          # requests of non-exempt clients (served or faulted)
        self.cut = asyncio.Event()          # set once a cut-off dropped a request
        self._cut_after: int | None = None
        # hooks for stand-ins of other API-server parts, each in its own module: `gates` see every
        # request first (authentication, authorization) and may answer it instead (401, 403); `mutators`
        # change a create's body before admission and storage (mutating webhooks such as Kueue's)
        self.gates: list[Callable[[kmock.Request], Awaitable[aiohttp.web.StreamResponse | None]]] = []
        self.mutators: list[Callable[[kmock.Request], None]] = []
        # `checks` see a write once decoded and mutated (the API server's validation of every kind): they
        # answer it instead (413, 400, 422) or add to the warnings its response carries
        self.checks: list[Callable[[K8sEmulator, kmock.Request, list[str]], aiohttp.web.Response | None]] = [
            write_checks.check]

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # aiohttp reads at most 1 MiB; the API server takes 3 MiB and answers 413 above (write_checks)
        raw_request._client_max_size = 4 * write_checks.kv.MAX_REQUEST_BYTES
        return await super().__call__(raw_request)

    # --- fault injection ---
    def cut_off_after(self, writes: int) -> None:
        """Let `writes` more writes of the operator through, then drop all of its requests."""
        self.cut.clear()
        self._cut_after = self.operator_writes + writes

    def cut_off_now(self) -> None:
        """Drop every request of the operator from now on (until `restore()`)."""
        self._cut_after = self.operator_writes
        self.cut.set()

    def restore(self) -> None:
        self._cut_after = None
        self.cut.clear()

    @staticmethod
    def _exempt(request: kmock.Request) -> bool:
        raw = request._raw_request
        return raw is not None and raw.headers.get(EXEMPT_HEADER) is not None

    async def _inject(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        """A response that replaces the request's (a fault, a cut-off), or None to serve it. Discovery
        is never faulted (kopf re-authenticates on a dropped discovery request, slowly)."""
        if self._exempt(request) or request.resource is None or not request.resource.plural:
            return None
        self.operator_requests += 1
        write = request.action in WRITES
        if self._cut_after is not None and (self.cut.is_set() or (write and self.operator_writes >= self._cut_after)):
            self.cut.set()
            request._raw_request.transport.close()  # the process is gone: no answer at all
            return aiohttp.web.Response(status=503)
        faults = self.faults
        if faults is not None and request.action != kmock.action.WATCH:
            if faults.slow and faults.rng.random() < faults.slow:
                faults.counts['slow'] += 1
                await asyncio.sleep(faults.slow_seconds)
            fault = faults.status_fault(write)
            if fault is not None:
                code, reason = fault
                headers = {'Retry-After': str(faults.retry_after_seconds)} if code == 429 else None
                details = {'retryAfterSeconds': faults.retry_after_seconds} if code == 429 else {}
                self._record(request, code, exempt=False)
                return aiohttp.web.json_response({
                    'apiVersion': 'v1', 'kind': 'Status', 'metadata': {}, 'status': 'Failure', 'code': code,
                    'reason': reason, 'message': f'injected fault: {reason}', 'details': details,
                }, status=code, headers=headers)
        if write:
            self.operator_writes += 1
        return None

    def _record(self, request: kmock.Request, status: int, exempt: bool) -> None:
        if request.action not in WRITES or request.resource is None:
            return
        name = request.name
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            name = (request.data.get('metadata') or {}).get('name') or name
        method = str(getattr(request.method, 'value', request.method)).upper()
        self.journal.append(Write(method, request.resource.plural, request.namespace, name, request.subresource,
                                  status, exempt, request._raw_request and request._raw_request.get(USER_KEY)))
        key = (request.resource, request.namespace, name)
        if status < 400 and key in self.objects and not self.objects[key].deleted:
            phase = (self.objects[key].get('status') or {}).get('phase')
            history = self.phases.setdefault((request.resource.plural, request.namespace, name), [])
            if not history or history[-1] != phase:
                history.append(phase)

    def creates(self, plural: str, *, succeeded: bool = True) -> collections.Counter:
        """How many creates of each object name of `plural` the emulator served (with success)."""
        return collections.Counter(w.name for w in self.journal if w.method == 'POST' and w.plural == plural
                                   and (w.status < 400) == succeeded)

    # --- helpers ---
    @staticmethod
    def _labels_match(selector: str | None, labels: dict[str, str] | None) -> bool:
        return labels_match(selector, labels)

    @classmethod
    def _matches(cls, request: kmock.Request, res: Any, ns: str | None, obj: Any) -> bool:
        meta = obj.get('metadata', {}) or {}
        return bool(
            res == request.resource
            and (request.namespace is None or ns == request.namespace)
            and (request.name is None or meta.get('name') == request.name)
            and cls._labels_match(request.params.get('labelSelector'), meta.get('labels'))
            and views.field_selector_matches(request.params.get('fieldSelector'), obj)
        )

    @staticmethod
    def _wants_table(request: kmock.Request) -> bool:
        return views.TABLE_ACCEPT in (request.headers.get('Accept') or '')

    def _kind(self, request: kmock.Request) -> str | None:
        info = self.resources[request.resource] if request.resource in self.resources else None  # noqa: SIM401
        return info.kind if info is not None else None

    def _builtin_kinds(self) -> dict[tuple[str, str], dict[str, tuple[str, bool]]]:
        """(group, version) → {plural: (kind, namespaced)} of the declared kinds not from crds/."""
        out: dict[tuple[str, str], dict[str, tuple[str, bool]]] = {}
        for resource in self.resources:
            if (resource.group, resource.version, resource.plural) in views.crds():
                continue
            info = self.resources[resource]
            if info.kind:
                out.setdefault((resource.group, resource.version), {})[resource.plural] = (
                    info.kind, bool(info.namespaced))
        return out

    def _replace(self, request: kmock.Request) -> None:
        """PUT (helm updates its release Secrets with it): the object becomes the body; served as the
        merge patch that turns the stored object into it. In place: kmock routes only recorded requests."""
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesError(404, 'NotFound', f'{request.resource.plural} "{request.name}" not found')
        patch = views.merge_patch_between(self.objects[key].raw, request.data or {})
        for field, value in {'data': patch, 'action': kmock.action.UPDATE, 'method': kmock.method.PATCH}.items():
            object.__setattr__(request, field, value)

    def _server_side_apply(self, request: kmock.Request) -> None:
        """Server-side apply (helm 4 installs with it), approximated: the applied configuration creates
        the object, or is merged into it (no field ownership, no removal of fields it stops setting).
        The request is changed in place: kmock routes only the requests it recorded."""
        data = yaml.safe_load(request.body or b'{}') or {}
        key = (request.resource, request.namespace, request.name)
        change = {'data': data, 'headers': {**request.headers, 'Content-Type': 'application/json'}}
        if key not in self.objects or self.objects[key].deleted:
            change.update(method=kmock.method.POST, action=kmock.action.CREATE, name=None,
                          url=request.url.with_path(request.url.path.rsplit('/', 1)[0]))
        for field, value in change.items():
            object.__setattr__(request, field, value)

    def _admit(self, request: kmock.Request) -> None:
        """The API server's admission of kubetune objects (schema + CEL): 422 with every error."""
        if self.admission is None or request.resource is None or request.resource.group != views.GROUP:
            return
        if request.subresource is not None or not isinstance(request.data, dict):
            return
        if request.action == kmock.action.CREATE:
            candidate = request.data
        elif request.action == kmock.action.UPDATE and 'spec' in request.data:
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return
            candidate = views.merge_patch(self.objects[key].raw, request.data)
        else:
            return
        kind = self._kind(request)
        errors, defaulted = self.admission(kind, candidate)
        if errors:
            name = (candidate.get('metadata') or {}).get('name') or request.name
            raise kmock.KubernetesError(422, 'Invalid', f'{kind}.{views.GROUP} "{name}" is invalid: '
                                        + ', '.join(errors))
        if request.action == kmock.action.CREATE:  # stored with its defaults, as the API server does
            request.data.update(defaulted)

    # --- request interception ---
    def _openapi(self, path: str) -> aiohttp.web.Response | None:
        """The OpenAPI v3 documents kubectl reads (explain, client-side validation); None: not one."""
        if path == '/openapi/v3':
            return aiohttp.web.json_response(views.openapi_v3_index(set(self._builtin_kinds())))
        if path.startswith('/openapi/v3/'):
            group, _, version = path.removeprefix('/openapi/v3/').removeprefix('apis/').rpartition('/')
            group = '' if group == 'api' else group
            document = views.openapi_v3_group(group, version)
            if document is None and (group, version) in self._builtin_kinds():
                document = views.openapi_v3_builtin(group, version, self._builtin_kinds()[group, version])
            if document is not None:
                return aiohttp.web.json_response(document)
        return None

    def _stamp(self, request: kmock.Request, rv: str) -> None:
        """What the API server sets on a write: metadata of a new object, resourceVersion, and the status
        subresource's split (a status write changes only status; a main write never does)."""
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

    async def _handle(self, request: kmock.Request) -> Any:
        for gate in self.gates:
            answer = await gate(request)
            if answer is not None:
                return answer
        if request.resource is None:
            openapi = self._openapi(request.url.path)
            if openapi is not None:
                return openapi
            return await super()._handle(request)
        injected = await self._inject(request)
        if injected is not None:
            return injected
        if views.APPLY_PATCH in (request.headers.get('Content-Type') or ''):
            self._server_side_apply(request)
        if (views.PROTOBUF in (request.headers.get('Content-Type') or '') and request.body
                and request.method != kmock.method.DELETE):  # DeleteOptions: not needed
            try:
                object.__setattr__(request, 'data', views.decode_protobuf(request.body))
            except ValueError as e:
                raise kmock.KubernetesError(415, 'UnsupportedMediaType', str(e)) from e
        if request.method == kmock.method.PUT and request.name is not None:
            self._replace(request)
        if request.resource.plural == 'secrets' and request.resource.group == '':
            views.secret_string_data(request.data)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            for mutate in self.mutators:
                mutate(request)
        warnings: list[str] = []
        for check in self.checks:
            if (answer := check(self, request, warnings)) is not None:
                return answer
        self._admit(request)
        if request.action == kmock.action.LIST:
            async with self._write_lock:
                return await super()._handle(request)
        if request.action not in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            return await super()._handle(request)  # WATCH/FETCH/discovery: no lock (long-lived)

        async with self._write_lock:
            rv = str(self._rv + 1)
            self._stamp(request, rv)
            target = (request.resource, request.namespace, request.name)
            target_uid = None
            if request.name is not None and target in self.objects and not self.objects[target].deleted:
                target_uid = self.objects[target].get('metadata', {}).get('uid')
            try:
                response = await super()._handle(request)
            except jsonpatch.JsonPatchException as e:  # incl. JsonPatchTestFailed/Conflict
                self._record(request, 422, self._exempt(request))
                raise kmock.KubernetesError(422, 'Invalid', str(e)) from e
            except kmock.KubernetesError as e:
                self._record(request, e.status, self._exempt(request))
                raise
            self._record(request, response.status, self._exempt(request))
            for warning in warnings:
                response.headers.add('Warning', f'299 - {json.dumps(warning)}')
            if response.status < 400:
                self._rv += 1
            if target_uid and self.objects[target].deleted:
                await self._collect_garbage(target_uid)
            return response

    async def _collect_garbage(self, owner_uid: str) -> None:
        """The garbage collector's background propagation: delete every object that names the
        deleted one in its ownerReferences, then their dependents."""
        for key in self._dependents(owner_uid):
            resource, obj = key[0], self.objects[key]
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

    def _dependents(self, owner_uid: str) -> list:
        """The keys of the objects that may name `owner_uid` as an owner (checked again by the caller)."""
        return list(self.objects.index.dependents(owner_uid))

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        result['metadata']['resourceVersion'] = str(self._rv)
        sel = request.params.get('labelSelector')
        result['items'] = [i for i in result['items']
                           if self._labels_match(sel, i.get('metadata', {}).get('labels'))
                           and views.field_selector_matches(request.params.get('fieldSelector'), i)]
        resource = request.resource
        if self._wants_table(request):
            return views.table(resource.group, resource.version, resource.plural, result['items'],
                               str(self._rv))
        kind = self._kind(request)
        result['apiVersion'] = f'{resource.group}/{resource.version}' if resource.group else resource.version
        result['kind'] = f'{kind}List' if kind else 'List'
        return result

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        result = await super()._serve_fetch(request)
        if self._wants_table(request) and request.subresource is None:
            resource = request.resource
            return views.table(resource.group, resource.version, resource.plural, [result], str(self._rv))
        if views.PARTIAL_METADATA_ACCEPT in (request.headers.get('Accept') or '') and request.subresource is None:
            return views.partial_metadata(result)  # metadata only: a Secret's data never leaves
        return result

    async def _serve_server_version(self, request: kmock.Request) -> Any:
        """The Kubernetes version the chart and the CRDs (CEL, kubeVersion >= 1.30) are written for;
        kubectl and helm from the same wheel are v1.34."""
        return {**await super()._serve_server_version(request), 'major': '1', 'minor': '34',
                'gitVersion': 'v1.34.0+kubetune-emulator'}

    async def _serve_version(self, request: kmock.Request) -> Any:
        """As the API server: the core group version is `v1`, and subresources have no short names or
        categories of their own (kmock repeats them; kubectl then warns that `ftj` could also mean
        finetunejobs/status)."""
        result = await super()._serve_version(request)
        if result.get('groupVersion', '').startswith('/'):  # the core group is "v1", not "/v1"
            result['groupVersion'] = result['groupVersion'][1:]
        for entry in result.get('resources', []):
            if '/' in entry['name']:
                entry['shortNames'], entry['categories'] = [], []
        return result

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b''  # send the headers now
        since = request.params.get('resourceVersion')
        since_int = int(since) if since and since.isdigit() else None
        bus = self._buses[request.resource]
        async with self._lock:  # the same lock under which kmock puts events to the bus
            marker = await bus.mark()
            initial = []
            keys = self.objects.index.live_candidates(request.resource, request.namespace, request.name,
                                                      request.params.get('labelSelector'),
                                                      request.params.get('fieldSelector'))
            for (res, ns, _), obj in self.objects.live(keys):
                raw = obj.raw  # a dict: field selectors read dicts (a kmock Object never matched one)
                if self._matches(request, res, ns, raw):
                    obj_rv = str(raw.get('metadata', {}).get('resourceVersion') or '0')
                    if since_int is None:
                        initial.append({'type': 'ADDED', 'object': raw})
                    elif obj_rv.isdigit() and int(obj_rv) > since_int:
                        initial.append({'type': 'MODIFIED', 'object': raw})
        max_events, max_seconds = (None, None)
        if self.faults is not None and not self._exempt(request):
            max_events, max_seconds = self.faults.watch_limits()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        transport = request._raw_request.transport if request._raw_request is not None else None
        sent = 0
        stream = bus.stream(since=marker)
        pending: asyncio.Future | None = None
        try:
            for event in initial:
                yield event
                sent += 1
                if max_events is not None and sent >= max_events:
                    self.faults.counts['watch_drop'] += 1
                    return
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(stream))
                wait = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
                done, _ = await asyncio.wait({pending}, timeout=wait)
                if not done:
                    # a client gone (a stopped or killed operator) ends its stream here, not at the
                    # next event: the server then closes without waiting for idle watches
                    if transport is None or transport.is_closing():
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        self.faults.counts['watch_drop'] += 1
                        return
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    pending = None
                obj = event.get('object', {})
                ns = obj.get('metadata', {}).get('namespace')
                if self._matches(request, request.resource, ns, obj):
                    yield event
                    sent += 1
                    if max_events is not None and sent >= max_events:
                        self.faults.counts['watch_drop'] += 1
                        return
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            await stream.aclose()
            await bus.unmark(marker)


def declare_resources(k8s: kmock.KubernetesEmulator) -> None:
    # All K3s builtins: namespaces, events, configmaps, pods, CRDs (apiextensions), etc.
    # kopf's "backbone" REQUIRES v1/namespaces, v1/events, apiextensions.k8s.io CRDs to be
    # discoverable, otherwise the namespace/resource observers block forever.
    k8s.resources.load_bundled()
    # The kubetune kinds as their CRDs declare them (kind, singular, short names, categories).
    for (group, version, plural), crd in views.crds().items():
        names = crd['spec']['names']
        k8s.resources[f'{group}/{version}/{plural}'] = kmock.ResourceInfo(
            kind=names['kind'], singular=names['singular'], namespaced=crd['spec']['scope'] == 'Namespaced',
            shortnames=set(names.get('shortNames', [])), categories=set(names.get('categories', [])),
            verbs={'list', 'watch', 'get', 'create', 'patch', 'update', 'delete'},
            subresources=set(crd_version_subresources(crd, version)),
        )
    for path, kind in (('kubeflow.org/v1/pytorchjobs', 'PyTorchJob'), ('trainer.kubeflow.org/v1alpha1/trainjobs',
                                                                          'TrainJob')):  # the training backends
        k8s.resources[path] = kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=True, subresources={
            'status'}, verbs={'list', 'watch', 'get', 'create', 'patch', 'update', 'delete'})


def crd_version_subresources(crd: dict, version: str) -> list[str]:
    return list(views.crd_version(crd, version).get('subresources') or {})
