"""A FineTuneJob's children (job-config ConfigMaps, workloads) from the watch, not two LISTs per pass.

kopf indexes fed by its watches hold a small view of each child by (namespace, job); kopf runs no
handler before every index has its initial listing. A child this process has just created is
remembered until the watch brings it (client-go's "expectations"), so the next pass does not create it
again. Without the indexes (a pass before any handler has seen them) the port LISTs as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import kopf

from kubetune.api import v1alpha1 as api
from kubetune_operator.backends import BACKENDS
from kubetune_operator.render import training as render
from kubetune_operator.shell import finetunejob as shell

CONFIG_MAPS = "finetunejob_config_maps"
ADAPTERDEPLOYMENTS = "adapterdeployments_by_finetunejob"  # (namespace, job) -> the names that serve it
Key = tuple[str, str]  # (namespace, the FineTuneJob's name)


def workloads_index(kind: str) -> str:
    return f"{kind.lower()}_by_finetunejob"


NAMES = (CONFIG_MAPS, ADAPTERDEPLOYMENTS, *(workloads_index(b.kind) for b in BACKENDS.values()))


def metadata_view(metadata: Mapping) -> dict:
    """What a pass reads of a child's metadata: its name and its owners' uids (shell._owned_by)."""
    return {"name": metadata.get("name"),
            "ownerReferences": [{"uid": o.get("uid")} for o in metadata.get("ownerReferences") or []]}


def workload_view(kind: str, body: Mapping) -> shell.Workload:
    """A workload as the state machine reads it (its backend's status), without the rest of the object."""
    raw = {"metadata": dict(body.get("metadata") or {}), "spec": body.get("spec") or {},
           "status": body.get("status") or {}}
    return shell.Workload(metadata_view(raw["metadata"]), BACKENDS[kind].read_status(raw))


class Children:
    """The indexes kopf fills (attached from any handler's kwargs) and the children created but not yet
    seen in them."""

    def __init__(self) -> None:
        self.indexes: dict[str, Mapping] = {}
        self._created: dict[Key, dict[str, object]] = {}  # (namespace, job) -> {child name: view}

    def attach(self, handler_kwargs: Mapping) -> None:
        """The indexes of the running kopf operator (each handler call brings them: a restarted operator
        in the same process has new ones)."""
        for name in NAMES:
            index = handler_kwargs.get(name)
            if index is not None and self.indexes.get(name) is not index:
                self.indexes[name] = index

    def _views(self, index_name: str, key: Key, kind: str) -> list | None:
        index = self.indexes.get(index_name)
        if index is None:
            return None
        seen = list(index.get(key, ()))
        names = {self._name(v) for v in seen}
        pending = self._created.get(key, {})
        for name in [n for n in pending if n in names]:
            del pending[name]  # the watch has it now
        if key in self._created and not pending:
            del self._created[key]
        return seen + [v for n, v in pending.items() if self._kind(v) == kind]

    @staticmethod
    def _name(view) -> str:
        return view.metadata["name"] if isinstance(view, shell.Workload) else view["metadata"]["name"]

    @staticmethod
    def _kind(view) -> str:
        return view.status.kind if isinstance(view, shell.Workload) else "ConfigMap"

    def config_maps(self, namespace: str, job: str) -> list[dict] | None:
        """The job's ConfigMaps (views); None: no index yet (the caller lists)."""
        return self._views(CONFIG_MAPS, (namespace, job), "ConfigMap")

    def workloads(self, kind: str, namespace: str, job: str) -> list[shell.Workload] | None:
        return self._views(workloads_index(kind), (namespace, job), kind)

    def serving(self, namespace: str, job: str) -> list[str]:
        """The AdapterDeployments whose adapters name this FineTuneJob (none known without the index)."""
        index = self.indexes.get(ADAPTERDEPLOYMENTS)
        return sorted(set(index.get((namespace, job), ()))) if index is not None else []

    def created(self, namespace: str, job: str, child: dict) -> None:
        """A child this process created (the API's answer): counted until the watch delivers it."""
        name, kind = child["metadata"]["name"], child["kind"]
        view = {"metadata": metadata_view(child["metadata"])} if kind == "ConfigMap" else workload_view(kind, child)
        self._created.setdefault((namespace, job), {})[name] = view

    def forget(self, namespace: str, job: str) -> None:
        self._created.pop((namespace, job), None)

    def __len__(self) -> int:
        return sum(len(v) for v in self._created.values())


def register(registry: kopf.OperatorRegistry | None = None) -> None:
    """The indexes: every child labelled with its FineTuneJob, by (namespace, job)."""
    kw = {"registry": registry} if registry is not None else {}

    @kopf.index("", "v1", "configmaps", id=CONFIG_MAPS, labels={render.LABEL_JOB: kopf.PRESENT}, **kw)
    async def finetunejob_config_maps(namespace, labels, meta, **_):
        return {(namespace, labels[render.LABEL_JOB]): {"metadata": metadata_view(meta)}}

    @kopf.index(api.GROUP, api.VERSION, "adapterdeployments", id=ADAPTERDEPLOYMENTS, **kw)
    async def adapterdeployments_by_finetunejob(namespace, name, spec, **_):
        refs = {((a.get("source") or {}).get("fineTuneJobRef") or {}).get("name")
                for a in spec.get("adapters") or [] if isinstance(a, dict)}
        return {(namespace, ref): name for ref in refs if isinstance(ref, str)}

    for backend in BACKENDS.values():
        kopf.index(*backend.api_resource, id=workloads_index(backend.kind), labels={render.LABEL_JOB: kopf.PRESENT},
                   **kw)(_workload_indexer(backend.kind))


def _workload_indexer(kind: str):
    async def workloads_by_finetunejob(namespace, labels, body, **_):
        return {(namespace, labels[render.LABEL_JOB]): workload_view(kind, body)}
    return workloads_by_finetunejob
