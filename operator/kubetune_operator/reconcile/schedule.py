"""When an object's next periodic pass is due (docs/scale.md): a decision's own deadline exactly, polling
as often as what the object waits on needs, backed off so that a whole class of objects together costs at
most its budget of passes per second however many objects there are.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import finetunejob as ftj

# The classes of periodic work. PROGRESS: a job whose pods run and write progress.json, which storage
# cannot announce, so it is read on a period. WAITING: an object waiting on what is watched (a job's
# workloads, itself; an AdapterDeployment's FineTuneJobs) or on Kueue: polled only as a safety net.
# ROLLING: an AdapterDeployment on its way to Ready (its agents' reports are Pod annotations, not watched).
# SERVING: a Ready AdapterDeployment (new pods, drift samples).
PROGRESS, WAITING, ROLLING, SERVING = "progress", "waiting", "rolling", "serving"
# An AdapterDeployment whose every adapter waits for one of these is woken by its FineTuneJobs' passes.
WAITS_ON_JOBS = ("FineTuneJobNotReady", "FineTuneJobNotFound")


@dataclass(frozen=True)
class Budgets:
    """Passes per second each class may cost in all (`kubetune operator --poll-budget` is their total)."""

    progress: float = 25.0
    waiting: float = 5.0
    rolling: float = 15.0
    serving: float = 5.0

    @property
    def total(self) -> float:
        return self.progress + self.waiting + self.rolling + self.serving

    def of(self, cls: str) -> float:
        return {PROGRESS: self.progress, WAITING: self.waiting, ROLLING: self.rolling, SERVING: self.serving}[cls]

    def scaled(self, factor: float) -> Budgets:
        return Budgets(self.progress * factor, self.waiting * factor, self.rolling * factor, self.serving * factor)


@dataclass(frozen=True)
class Next:
    """What a pass leaves for the scheduler: its class (None: nothing to poll, e.g. a finished job), the
    period it asks for, and whether that is a deadline (a canary pause's end) rather than a poll."""

    cls: str | None
    seconds: float | None = None
    deadline: bool = False


def period(seconds: float, members: int, budget: float) -> float:
    """A class's polling period: what one object needs, or longer once `members` objects polled that often
    would exceed `budget` passes per second."""
    if budget <= 0:
        return seconds
    return max(seconds, members / budget)


def delay(after: Next, members: int, budgets: Budgets) -> float | None:
    """Seconds until the object's next periodic pass; None: none (it is forgotten until an event)."""
    if after.cls is None or after.seconds is None:
        return None
    if after.deadline:
        return after.seconds
    return period(after.seconds, members, budgets.of(after.cls))


def finetunejob_next(phase: str | None, requeue_after: float | None, reads_progress: bool = False,
                     resync_seconds: float | None = None) -> Next:
    """A FineTuneJob's class from the pass it just had: finished jobs are not polled; one whose running
    workload's progress.json the pass read is polled for it; every other one waits on what is watched
    (its workloads' events), and is re-read only as a safety net every `resync_seconds`."""
    if phase in ftj.TERMINAL or requeue_after is None:
        return Next(None)
    if reads_progress:
        return Next(PROGRESS, requeue_after)
    return Next(WAITING, max(requeue_after, resync_seconds or 0.0))


def waits_on_finetunejobs(status: dict) -> bool:
    """Every adapter is refused only because its FineTuneJob has not published (or does not exist yet)."""
    records = status.get("adapters") or []
    return bool(records) and all((r.get("refused") or {}).get("reason") in WAITS_ON_JOBS and not r.get("stable")
                                 for r in records)


SAFETY_NET_PERIODS = 6  # an object waiting on watched things is re-read every this many resync periods


def adapterdeployment_next(status: dict, requeue_after: float | None, resync_seconds: float) -> Next:
    """An AdapterDeployment's: a requeue shorter than its resync is a deadline the decision waits for (a
    pause, an analysis window, an unload grace), kept exactly; otherwise it polls, backed off, as often as
    its phase needs: waiting on its FineTuneJobs (their passes wake it), rolling out, or Ready."""
    if requeue_after is not None and requeue_after < resync_seconds:
        return Next(ROLLING, requeue_after, deadline=True)
    if waits_on_finetunejobs(status):
        return Next(WAITING, SAFETY_NET_PERIODS * resync_seconds)
    return Next(SERVING if status.get("phase") == "Ready" else ROLLING, resync_seconds)
