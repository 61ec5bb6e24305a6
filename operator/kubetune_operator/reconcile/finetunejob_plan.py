"""What a FineTuneJob pass decides (`Plan`, `Event`), the status builder the decision fills in, and
the `StageReport` a stage job leaves in storage."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from . import conditions as cond


@dataclass(frozen=True)
class StageReport:
    """What a stage job (data, baseline, sweep) left in its storage prefix."""

    result: dict | None = None  # result.json: written last, so its presence means the stage finished
    progress: dict | None = None  # progress.json: carries the trainer's failure reason


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    create: list[dict] = field(default_factory=list)
    suspend_workload: bool | None = None  # suspend (True) or resume (False) the training workload
    suspend_stage_jobs: dict = field(default_factory=dict)  # stage job name -> suspend (True) or resume
    activate_kueue_workloads: dict = field(default_factory=dict)  # Kueue Workload name -> its spec.active
    status: dict = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


def seconds_between(start: str | None, end: str) -> float:
    if not start:
        return 0.0
    return (dt.datetime.fromisoformat(end.replace("Z", "+00:00"))
            - dt.datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


class Status:
    """Mutable builder of the new status, remembering the generation and the clock."""

    def __init__(self, job: dict, now: str):
        self.now = now
        self.generation = int(job["metadata"].get("generation", 1))
        self.value = deep_copy(job.get("status") or {})
        self.value["observedGeneration"] = self.generation

    def condition(self, kind: str, status: bool, reason: str, message: str) -> None:
        self.value["conditions"] = cond.set_condition(
            self.value.get("conditions"), kind, status, reason, message, self.generation, self.now
        )

    def clear(self, kind: str, reason: str, message: str) -> None:
        """Set a condition False, but only if it was ever set (no noise on a fresh object)."""
        if cond.find(self.value.get("conditions"), kind):
            self.condition(kind, False, reason, message)

    def fail(self, reason: str, message: str) -> None:
        self.value["phase"] = "Failed"
        self.value["failure"] = {"reason": reason, "message": message}
        self.condition("Failed", True, reason, message)
        self.clear("Running", reason, "training is not running")
        self.value.setdefault("completionTime", self.now)


def deep_copy(value):
    if isinstance(value, dict):
        return {k: deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [deep_copy(v) for v in value]
    return value
