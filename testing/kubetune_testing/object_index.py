"""The emulator's stored objects, indexed as the API server's watch cache indexes them: by resource,
(resource, namespace), (resource, name), label key=value and owner uid, kept current on every write.
kmock 0.8 finds the objects of every LIST, WATCH, GET and write by scanning all of them; here the same
lookups read candidates from the index and apply kmock's own filters to them, so the results (and their
order) are kmock's. Opt-in: `bounded_history` keeps an object's first and last versions only.
Why and what it saves: docs/testing.md ("Indexed objects").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import kmock
from kmock._internal import k8s_dicts, k8s_views

from kubetune_testing import apiserver_views as views

Key = tuple[Any, str | None, str]  # kmock's (resource, namespace, name)
LabelTerm = tuple[str, str, str]  # (operator, key, value): '=', '!=', 'exists', '!exists'

# the kmock lookup this module replaces: fail at import, not with wrong answers, if kmock renames it
_KMOCK_LOOKUP = '_KubernetesEmulator__get_objs'
assert hasattr(kmock.KubernetesEmulator, _KMOCK_LOOKUP), f'kmock no longer has {_KMOCK_LOOKUP}'


def label_selector_terms(selector: str | None) -> list[LabelTerm]:
    """`k=v`, `k==v`, `k!=v`, `k`, `!k` terms of a labelSelector, comma-separated."""
    terms: list[LabelTerm] = []
    for term in filter(None, (t.strip() for t in (selector or '').split(','))):
        if '!=' in term:
            key, value = term.split('!=', 1)
            terms.append(('!=', key.strip(), value.strip()))
        elif '=' in term:
            key, value = term.replace('==', '=').split('=', 1)
            terms.append(('=', key.strip(), value.strip()))
        elif term.startswith('!'):
            terms.append(('!exists', term[1:].strip(), ''))
        else:
            terms.append(('exists', term, ''))
    return terms


def labels_match(selector: str | None, labels: Mapping[str, Any] | None) -> bool:
    labels = labels or {}
    for operator, key, value in label_selector_terms(selector):
        if operator == '!=' and labels.get(key) == value:
            return False
        if operator == '=' and labels.get(key) != value:
            return False
        if operator == '!exists' and key in labels:
            return False
        if operator == 'exists' and key not in labels:
            return False
    return True


def _string_labels(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The labels an equality selector can match: a selector's values are strings."""
    labels = meta.get('labels')
    if not isinstance(labels, Mapping):
        return []
    return [(k, v) for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)]


def _owner_uids(meta: Mapping[str, Any]) -> list[str]:
    refs = meta.get('ownerReferences')
    if not isinstance(refs, list):
        return []
    return [ref['uid'] for ref in refs if isinstance(ref, Mapping) and isinstance(ref.get('uid'), str)]


class ObjectIndex:
    """Every stored key (soft-deleted ones too, as kmock keeps them) by resource, namespace and name, in
    kmock's order; the live ones also by label and owner uid. Lookups return a superset of the matches:
    callers keep their own filters."""

    def __init__(self) -> None:
        self._position: dict[Key, int] = {}  # kmock's order: its dict's insertion order
        self._counter = itertools.count()
        self._by_resource: dict[Any, dict[Key, None]] = {}
        self._by_namespace: dict[tuple[Any, str | None], dict[Key, None]] = {}
        self._by_name: dict[tuple[Any, str], dict[Key, None]] = {}
        self._by_label: dict[tuple[Any, str, str], set[Key]] = {}
        self._by_owner: dict[str, set[Key]] = {}
        self._by_field_name: dict[tuple[Any, str], set[Key]] = {}  # (resource, the object's metadata.name)
        # live key -> what it is indexed under: labels, owner uids, metadata.name
        self._indexed: dict[Key, tuple[list[tuple[str, str]], list[str], str | None]] = {}

    # --- maintenance ---
    def refresh(self, key: Key, obj: k8s_dicts.Object) -> None:
        """Index `key` as `obj` now is (called after every change of it)."""
        resource, namespace, name = key
        if key not in self._position:
            self._position[key] = next(self._counter)
            self._by_resource.setdefault(resource, {})[key] = None
            self._by_namespace.setdefault((resource, namespace), {})[key] = None
            self._by_name.setdefault((resource, name), {})[key] = None
        self._unindex_live(key)
        if obj.deleted:
            return
        meta = obj.last.raw.get('metadata')
        meta = meta if isinstance(meta, Mapping) else {}
        labels, owners = _string_labels(meta), _owner_uids(meta)
        field_name = meta.get('name') if isinstance(meta.get('name'), str) else None
        for label, value in labels:
            self._by_label.setdefault((resource, label, value), set()).add(key)
        for uid in owners:
            self._by_owner.setdefault(uid, set()).add(key)
        if field_name is not None:
            self._by_field_name.setdefault((resource, field_name), set()).add(key)
        self._indexed[key] = (labels, owners, field_name)

    def remove(self, key: Key) -> None:
        """`key` hard-deleted (`del objects[key]`): forgotten, a re-creation goes to the end."""
        if self._position.pop(key, None) is None:
            return
        resource, namespace, name = key
        self._unindex_live(key)
        for bucket, sub in ((self._by_resource, resource), (self._by_namespace, (resource, namespace)),
                            (self._by_name, (resource, name))):
            bucket[sub].pop(key, None)
            if not bucket[sub]:
                del bucket[sub]

    def clear(self) -> None:
        self.__init__()

    def _unindex_live(self, key: Key) -> None:
        labels, owners, field_name = self._indexed.pop(key, ([], [], None))
        resource = key[0]
        for label, value in labels:
            self._discard(self._by_label, (resource, label, value), key)
        for uid in owners:
            self._discard(self._by_owner, uid, key)
        if field_name is not None:
            self._discard(self._by_field_name, (resource, field_name), key)

    @staticmethod
    def _discard(bucket: dict, sub: Any, key: Key) -> None:
        keys = bucket.get(sub)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del bucket[sub]

    # --- lookups ---
    def resources(self) -> list[Any]:
        """Every resource with a stored key (what kmock adds to the declared ones in discovery)."""
        return list(self._by_resource)

    def keys(self, resource: Any, namespace: str | None = None, name: str | None = None,
             strict: bool = False) -> Iterable[Key]:
        """The keys of `resource` in `namespace` (None: every namespace, unless `strict`: cluster-scoped
        only, as kmock's strict lookups read it) named `name` (None: any), in kmock's order."""
        if name is not None:
            if namespace is not None or strict:
                key = (resource, namespace, name)
                return [key] if key in self._position else []
            return self._by_name.get((resource, name), {})
        if namespace is not None or strict:
            return self._by_namespace.get((resource, namespace), {})
        return self._by_resource.get(resource, {})

    def live_candidates(self, resource: Any, namespace: str | None, name: str | None,
                        label_selector: str | None, field_selector: str | None) -> list[Key]:
        """A superset of the live keys a LIST or WATCH of these parameters matches (soft-deleted keys may
        be left out), in kmock's order: the smallest of the buckets the request pins down."""
        best: Iterable[Key] = self.keys(resource, namespace, name)
        narrower: list[Iterable[Key]] = [self._by_label.get((resource, label, value), ())
                                         for operator, label, value in label_selector_terms(label_selector)
                                         if operator == '=']
        field_name = views.field_selector_equalities(field_selector).get('metadata.name')
        if field_name is not None:  # the object's own field, as the selector reads it (not the key's)
            narrower.append(self._by_field_name.get((resource, field_name), ()))
        for keys in narrower:
            if len(keys) < len(best):  # type: ignore[arg-type]
                best = keys
        if isinstance(best, set):
            return sorted(best, key=self._position.__getitem__)
        return list(best)

    def dependents(self, owner_uid: str) -> list[Key]:
        """The live keys whose ownerReferences name `owner_uid`, in kmock's order."""
        return sorted(self._by_owner.get(owner_uid, ()), key=self._position.__getitem__)


class IndexedObject(k8s_dicts.Object):
    """kmock's Object that tells the index after each change made through its methods (what kmock's
    write path and the tests use). Nested dicts changed in place are not seen: write through these."""

    def __init__(self, history: Any = (), /, *, store: dict, index: ObjectIndex, key: Key, bounded: bool) -> None:
        super().__init__(history)
        self._store, self._index, self._key, self._bounded = store, index, key, bounded

    def _changed(self) -> None:
        if self._bounded:
            _trim(self.history)
        if self._store.get(self._key) is self:  # one replaced by a newer object no longer speaks for its key
            self._index.refresh(self._key, self)

    def create(self, changes: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        super().create(changes, **kwargs)
        self._changed()

    def patch(self, changes: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        super().patch(changes, **kwargs)
        self._changed()

    def delete(self) -> None:
        super().delete()
        self._changed()

    def __setitem__(self, key: str, value: Any, /) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str, /) -> None:
        super().__delitem__(key)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()


def _trim(history: k8s_dicts.ObjectHistory) -> None:
    """Keep the first version and everything from the last live one on (its deletion markers)."""
    last_live = next((i for i in range(len(history) - 1, -1, -1) if history[i] is not None), None)
    if last_live is not None and last_live > 1:
        del history[1:last_live]


class IndexedObjects(k8s_views.ObjectsArray):
    """kmock's ObjectsArray whose objects keep `index` current (and their history bounded if asked)."""

    def __init__(self, bounded_history: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, 'index', ObjectIndex())
        object.__setattr__(self, 'bounded_history', bounded_history)

    def __setitem__(self, key: tuple, value: Any, /) -> None:
        if len(key) == 3:
            full = (k8s_views._parse_resource(key[0]), key[1], key[2])
            # a new history; an existing key keeps its place in the dict (and so in kmock's order)
            obj = IndexedObject(value, store=self._objects, index=self.index, key=full,
                                bounded=self.bounded_history)
            self._objects[full] = obj
            obj._changed()
        else:  # a version or a slice of the history
            super().__setitem__(key, value)
            self._refresh(key)

    def __delitem__(self, key: tuple, /) -> None:
        super().__delitem__(key)
        full = (k8s_views._parse_resource(key[0]), key[1], key[2])
        if len(key) == 3:
            self.index.remove(full)
        else:
            self._refresh(key)

    def _refresh(self, key: tuple) -> None:
        full = (k8s_views._parse_resource(key[0]), key[1], key[2])
        self.index.refresh(full, self._objects[full])

    def clear(self) -> None:
        super().clear()
        self.index.clear()

    def live(self, keys: Iterable[Key]) -> Iterator[tuple[Key, k8s_dicts.Object]]:
        for key in keys:
            obj = self._objects[key]
            if not obj.deleted:
                yield key, obj


class IndexedStore:
    """Mixed into the emulator before kmock's KubernetesEmulator: its objects indexed, and kmock's one
    object lookup (behind every LIST, GET, create, patch and delete) reading candidates from the index
    before applying kmock's own check. `bounded_history = True` (a class attribute, for benchmarks):
    each object keeps its first and last versions only; tests that read `.history` keep the default."""

    bounded_history: ClassVar[bool] = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # type: ignore[misc]
        self._objects = IndexedObjects(self.bounded_history)

    def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list[k8s_dicts.Object]:
        if request.resource is None:
            return []
        index: ObjectIndex = self._objects.index
        if strict:  # GET, create, patch, delete: soft-deleted objects count (kmock answers with them)
            keys: Iterable[Key] = index.keys(request.resource, request.namespace, request.name, strict=True)
        else:  # LIST (and kmock's WATCH): the caller drops the soft-deleted ones
            keys = index.live_candidates(request.resource, request.namespace, request.name,
                                         request.params.get('labelSelector'), request.params.get('fieldSelector'))
        check = self._KubernetesEmulator__check
        objects = self._objects._objects
        return [objects[key] for key in keys if check(request, key[0], key[1], key[2], strict=strict)]

    def _get_resources(self) -> list[Any]:
        declared = kmock.KubernetesScaffold._get_resources(self)  # type: ignore[arg-type]
        return list(set(declared) | set(self._objects.index.resources()))
