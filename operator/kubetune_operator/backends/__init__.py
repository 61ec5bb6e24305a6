"""Training backends: the workload kinds that run a FineTuneJob's stages, keyed by `spec.backend`.

A backend renders its workload, reads it back as a neutral `WorkloadStatus`, says how to suspend it,
where its API lives, and how `kubetune local` plays it. Adding one is a new module and an entry here.
"""

from __future__ import annotations

from typing import Protocol

from kubetune.api import jobconfig
from kubetune_operator.render import training as render

from . import pytorchjob, trainjob
from .workload import LocalLaunch, WorkloadStatus

DEFAULT = "PyTorchJob"


class TrainingBackend(Protocol):
    kind: str  # the spec.backend value and the workload's kind
    api_resource: tuple[str, str, str]  # group, version, plural

    def render(self, job: dict, settings: render.RenderSettings, config_data: dict[str, str],
               stage: jobconfig.Stage) -> dict: ...

    def read_status(self, workload: dict) -> WorkloadStatus: ...

    def suspend_patch(self, suspend: bool) -> dict: ...

    def local_launch(self, workload: dict) -> LocalLaunch: ...


BACKENDS: dict[str, TrainingBackend] = {b.kind: b for b in (pytorchjob.BACKEND, trainjob.BACKEND)}


def backend_of(job: dict) -> TrainingBackend:
    """The backend a FineTuneJob names (the default when unset or unknown: validation reports the latter)."""
    return BACKENDS.get((job.get("spec") or {}).get("backend") or DEFAULT, BACKENDS[DEFAULT])


def backend_for_kind(kind: str) -> TrainingBackend | None:
    return next((b for b in BACKENDS.values() if b.kind == kind), None)


def render_children(job: dict, settings: render.RenderSettings, stage: jobconfig.Stage | None = None) -> list[dict]:
    """The children of one stage of a defaulted FineTuneJob, in creation order (the ConfigMap first:
    pods mount it): its job config and its backend's workload."""
    data = render.config_map_data(job, stage)
    return [render.render_config_map(job, data, stage), backend_of(job).render(job, settings, data, stage)]
