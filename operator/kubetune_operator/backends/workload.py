"""The backend-neutral view of a training workload: what the FineTuneJob state machine reads of it,
and what a local run needs to play it on this machine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .kueue import Admission, managed

CREATED, RUNNING, RESTARTING, SUCCEEDED, FAILED = "Created", "Running", "Restarting", "Succeeded", "Failed"
FINISHED = (SUCCEEDED, FAILED)


@dataclass(frozen=True)
class WorkloadStatus:
    """One workload (the training job or a stage job) as the state machine sees it."""

    name: str
    kind: str  # the workload's kind, for messages ("PyTorchJob")
    labels: dict = field(default_factory=dict)  # kubetune's labels on it (stage, rank)
    phase: str = CREATED  # Created | Running | Restarting | Succeeded | Failed
    started: bool = False  # its pods ran at some point (progress.json may exist)
    reason: str = ""  # of the phase (Failed: the backend's failure reason)
    message: str = ""  # of the phase, as the backend said it
    since: str | None = None  # when the phase began
    start_time: str | None = None
    completion_time: str | None = None
    replicas: dict = field(default_factory=dict)  # replica type -> {"active", "succeeded", "failed"}
    attempts: int = 0  # pods started for it so far (restarts included)
    suspended: bool = False
    uid: str = ""
    # Kueue's view of a workload it manages (backends.kueue): read by the shell only when asked
    # (`kueue.needs_admission`), else None
    admission: Admission | None = None

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    @property
    def queued(self) -> bool:
        """Held by Kueue: suspended, carrying a queue label, not finished (kueue.managed)."""
        return self.suspended and not self.finished and managed(self.labels)


@dataclass(frozen=True)
class LocalLaunch:
    """What `kubetune local` needs to run a workload as processes on this machine."""

    command: list[str]  # the pods' command: `python -m <launcher> <torchrun-style args>`
    processes: int  # the whole world: processes per pod x pods
    config_map: str  # the job-config ConfigMap its pods mount
    backoff_limit: int = 0  # retryable exits (>= 128) restart it up to this many times
    replica: str = "Master"  # the replica type its status counts (a cluster's first pod's)


@dataclass(frozen=True)
class Backend:
    """A training backend made of its module's pure functions (the `TrainingBackend` protocol), so that
    each backend module states only what differs: its kind, API resource and four functions."""

    kind: str  # the spec.backend value and the workload's kind
    api_resource: tuple[str, str, str]  # group, version, plural
    render: Callable[..., dict]  # (job, settings, config_data, stage) -> the workload
    read_status: Callable[[dict], WorkloadStatus]
    suspend_patch: Callable[[bool], dict]
    local_launch: Callable[[dict], LocalLaunch]
