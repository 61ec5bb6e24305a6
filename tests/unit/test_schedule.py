"""When periodic passes are due (reconcile.schedule) and the queue that runs them (controllers.scheduler)."""

from __future__ import annotations

import asyncio

import pytest

from kubetune_operator.controllers import ownership
from kubetune_operator.controllers.scheduler import Scheduler
from kubetune_operator.reconcile import schedule
from kubetune_operator.reconcile.schedule import PROGRESS, ROLLING, SERVING, WAITING, Budgets, Next


def test_a_class_polls_at_its_own_period_until_its_budget_is_spent():
    assert schedule.period(4.0, 1, 25.0) == 4.0
    assert schedule.period(4.0, 100, 25.0) == 4.0  # 100 jobs every 4 s: exactly the budget
    assert schedule.period(4.0, 1000, 25.0) == 40.0  # then the period grows with the members
    assert schedule.period(30.0, 10_000, 10.0) == 1000.0
    assert schedule.period(4.0, 1000, 0) == 4.0  # no budget: no backoff


def test_the_load_of_a_class_never_exceeds_its_budget():
    for members in (1, 10, 100, 1000, 10_000, 100_000):
        for seconds, budget in ((4.0, 25.0), (30.0, 10.0), (5.0, 20.0)):
            assert members / schedule.period(seconds, members, budget) <= max(budget, members / seconds) + 1e-9


def test_finetunejobs_finished_are_not_polled_running_ones_read_progress_the_rest_wait():
    assert schedule.finetunejob_next("Succeeded", 30.0, True) == Next(None)
    assert schedule.finetunejob_next("Failed", 30.0) == Next(None)
    assert schedule.finetunejob_next("Running", 4.0, reads_progress=True) == Next(PROGRESS, 4.0)
    # a stage job (data validation, baseline, trials) reports when it finishes, by its watched status:
    # nothing to poll while it runs, however ACTIVE the phase
    assert schedule.finetunejob_next("Validating", 4.0, False, resync_seconds=30.0) == Next(WAITING, 30.0)
    assert schedule.finetunejob_next("Pending", 30.0, False, 30.0) == Next(WAITING, 30.0)
    assert schedule.finetunejob_next("Queued", 30.0) == Next(WAITING, 30.0)
    assert schedule.finetunejob_next("Pending", None) == Next(None)


READY = {"phase": "Ready", "adapters": [{"name": "a", "stable": {"version": 1}}]}
ROLLING_OUT = {"phase": "Progressing", "adapters": [{"name": "a", "stable": {"version": 1}, "canary": {}}]}
WAITING_ON_JOB = {"phase": "Pending", "adapters": [{"name": "a", "refused": {"reason": "FineTuneJobNotReady"}}]}


def test_an_adapterdeployment_deadline_is_kept_exactly_however_many_there_are():
    pause = schedule.adapterdeployment_next(ROLLING_OUT, 2.0, resync_seconds=5.0)
    assert pause == Next(ROLLING, 2.0, deadline=True)
    assert schedule.delay(pause, 100_000, Budgets()) == 2.0


def test_an_adapterdeployment_polls_as_its_phase_needs_backed_off_with_its_class():
    rolling = schedule.adapterdeployment_next(ROLLING_OUT, 10.0, resync_seconds=5.0)
    assert rolling == Next(ROLLING, 5.0)
    assert schedule.delay(rolling, 10, Budgets()) == 5.0
    assert schedule.delay(rolling, 300, Budgets()) == 20.0  # 300 / 15 passes per second
    ready = schedule.adapterdeployment_next(READY, 10.0, resync_seconds=5.0)
    assert ready == Next(SERVING, 5.0)
    assert schedule.delay(ready, 1000, Budgets()) == 200.0  # Ready ones: 5 passes per second in all
    assert schedule.adapterdeployment_next(READY, None, 5.0) == Next(SERVING, 5.0)


def test_an_adapterdeployment_waiting_for_its_jobs_is_only_a_safety_net():
    assert schedule.waits_on_finetunejobs(WAITING_ON_JOB)
    assert schedule.adapterdeployment_next(WAITING_ON_JOB, 10.0, resync_seconds=5.0) == Next(WAITING, 30.0)
    mixed = {"adapters": [*WAITING_ON_JOB["adapters"], {"name": "b", "refused": {"reason": "DigestMismatch"}}]}
    assert not schedule.waits_on_finetunejobs(mixed)
    serving_old = {"adapters": [{"name": "a", "stable": {"v": 1}, "refused": {"reason": "FineTuneJobNotReady"}}]}
    assert not schedule.waits_on_finetunejobs(serving_old)  # still serves its last version: rolling
    assert not schedule.waits_on_finetunejobs({})


def test_budgets_scale_to_a_total():
    scaled = Budgets().scaled(2.0)
    assert scaled.total == pytest.approx(2 * Budgets().total)
    assert scaled.of(WAITING) == 2 * Budgets().waiting


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _scheduler(clock, concurrency=4, passes=None, budgets=None):
    async def run_pass(namespace, name):
        passes.append((namespace, name))
    return Scheduler("FineTuneJob", run_pass, budgets or Budgets(progress=2.0, waiting=1.0, rolling=1.0, serving=1.0),
                     concurrency=concurrency, clock=clock)


def test_the_scheduler_backs_off_as_members_join_and_forgets_finished_objects():
    clock = Clock()
    s = _scheduler(clock, passes=[])
    for i in range(10):
        s.after_pass(("ns", f"j{i}"), Next(WAITING, 3.0))
    assert s.members(WAITING) == 10
    assert s.due_in(("ns", "j0")) == 3.0  # the first of them: 1 member at 1 pass/s
    assert s.due_in(("ns", "j9")) == 10.0  # the tenth: 10 members at 1 pass/s
    s.after_pass(("ns", "j0"), Next(None))  # finished
    assert s.members(WAITING) == 9 and s.due_in(("ns", "j0")) is None
    s.after_pass(("ns", "j1"), Next(PROGRESS, 3.0))  # started running: moves class
    assert s.members(WAITING) == 8 and s.members(PROGRESS) == 1
    s.forget(("ns", "j2"))
    assert len(s) == 8


def test_due_passes_are_taken_oldest_first_a_few_at_a_time_and_only_if_owned(monkeypatch):
    clock = Clock()
    s = _scheduler(clock, concurrency=2, passes=[], budgets=Budgets(100.0, 100.0, 100.0, 100.0))
    for i, seconds in enumerate((5.0, 1.0, 3.0)):
        s.after_pass(("ns", f"j{i}"), Next(PROGRESS, seconds))
    assert s.take_due() == []
    clock.now += 10
    assert [k for k, _ in s.take_due()] == [("ns", "j1"), ("ns", "j2")]  # two at a time
    assert [k for k, _ in s.take_due()] == [("ns", "j0")]

    class OwnsOdd(ownership.Ownership):
        def owns(self, namespace, name):
            return name.endswith(("1", "3"))

    monkeypatch.setattr("kubetune_operator.controllers.scheduler.OWNERSHIP", OwnsOdd())
    for i in range(4):
        s.after_pass(("ns", f"j{i}"), Next(WAITING, 1.0))
    clock.now += 10
    taken = [k for k, _ in s.take_due()]
    assert taken == [("ns", "j1"), ("ns", "j3")] and len(s) == 0  # the others are dropped, not run


def test_a_pass_rescheduled_by_an_event_supersedes_its_queued_one():
    clock = Clock()
    s = _scheduler(clock, passes=[])
    s.after_pass(("ns", "a"), Next(WAITING, 1.0))
    s.after_pass(("ns", "a"), Next(WAITING, 30.0))  # an event's pass ran meanwhile
    clock.now += 5
    assert s.take_due() == []
    clock.now += 30
    assert [k for k, _ in s.take_due()] == [("ns", "a")]


def test_soon_queues_an_object_now_unless_it_is_queued_already_and_nudge_does_anyway():
    clock = Clock()
    s = _scheduler(clock, passes=[])
    s.after_pass(("ns", "a"), Next(WAITING, 50.0))
    s.soon(("ns", "a"), WAITING)
    s.soon(("ns", "b"), WAITING)
    assert s.due_in(("ns", "a")) == 50.0 and s.due_in(("ns", "b")) == 0.0
    assert s.members(WAITING) == 2
    s.nudge(("ns", "a"), ROLLING)
    assert s.due_in(("ns", "a")) == 0.0 and s.members(WAITING) == 1 and s.members(ROLLING) == 1


async def test_the_loop_runs_due_passes_and_retries_a_failed_one_later():
    calls = []

    async def run_pass(namespace, name):
        calls.append(name)
        if name == "bad":
            raise RuntimeError("API down")
        s.after_pass((namespace, name), Next(WAITING, 3600.0))

    s = Scheduler("FineTuneJob", run_pass, Budgets(), concurrency=2)
    s.after_pass(("ns", "good"), Next(WAITING, 0.0, deadline=True))
    s.after_pass(("ns", "bad"), Next(WAITING, 0.0, deadline=True))
    loop = asyncio.create_task(s.run())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(calls) >= 2 and s.errors:
            break
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    assert sorted(calls) == ["bad", "good"] and s.errors == 1
    assert 4.0 < s.due_in(("ns", "bad")) <= 5.0  # tried again in 5 s
    assert s.due_in(("ns", "good")) > 3000


async def test_however_many_are_due_only_a_few_periodic_passes_run_at_once():
    running, most = 0, 0
    release = asyncio.Event()

    async def run_pass(namespace, name):
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1

    s = Scheduler("FineTuneJob", run_pass, Budgets(waiting=10_000.0), concurrency=4)
    for i in range(100):
        s.after_pass(("ns", f"j{i}"), Next(WAITING, 0.0, deadline=True))
    loop = asyncio.create_task(s.run())
    await asyncio.sleep(0.05)
    assert running == 4  # the other 96 wait in the queue, not on the API server
    release.set()
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(s) == 0 and running == 0:
            break
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    assert most == 4 and len(s) == 0


def test_a_backlog_of_overdue_passes_starts_at_its_class_budget_not_at_once():
    clock = Clock()
    s = _scheduler(clock, concurrency=1000, passes=[], budgets=Budgets(progress=5.0, waiting=2.0))
    for i in range(50):
        s.after_pass(("ns", f"w{i}"), Next(WAITING, 1.0, deadline=True))
        s.after_pass(("ns", f"p{i}"), Next(PROGRESS, 1.0, deadline=True))
    clock.now += 100  # all 100 overdue (an operator busy creating, say)
    first = s.take_due()
    assert sorted(c for _, c in first) == [PROGRESS] * 5 + [WAITING] * 2  # one second's worth each
    assert s.take_due() == []  # nothing more until the buckets refill
    clock.now += 1.0
    assert sorted(c for _, c in s.take_due()) == [PROGRESS] * 5 + [WAITING] * 2
    clock.now += 0.5
    assert sorted(c for _, c in s.take_due()) == [PROGRESS] * 2 + [WAITING]  # 2.5 and 1 tokens


def test_a_failed_pass_of_any_trigger_is_retried_unless_already_queued():
    clock = Clock()
    s = _scheduler(clock, passes=[])
    s.retry(("ns", "new"), WAITING)  # its first pass (kopf's create handler) failed: no entry yet
    assert s.due_in(("ns", "new")) == 5.0  # no period known yet for the class: 5 s
    s.after_pass(("ns", "other"), Next(WAITING, 0.5))
    s.retry(("ns", "again"), WAITING)
    assert s.due_in(("ns", "again")) == 0.5  # the class's period, at least 0.5 s
    s.retry(("ns", "other"), WAITING)
    assert s.due_in(("ns", "other")) == 2.0 and s.members(WAITING) == 3  # queued already: unchanged
