"""The local adapter plays any backend's workload from its `LocalLaunch`, reported as the neutral status."""

from __future__ import annotations

import time

from kubetune_operator.backends.workload import CREATED, FAILED, RUNNING, LocalLaunch
from kubetune_operator.local.finetunejob import LocalWorkload

WORKLOAD = {"kind": "PyTorchJob", "metadata": {"name": "j", "labels": {"kubetune.io/stage": "trial"}}}


def test_a_workload_that_exits_non_zero_fails_with_the_backends_reason(tmp_path):
    launch = LocalLaunch(command=["python", "-m", "kubetune_no_such_launcher", "--config", "/etc/x"], processes=1,
                         config_map="j-config", backoff_limit=3)
    workload = LocalWorkload(WORKLOAD, launch, tmp_path / "config.json", tmp_path, env={})
    assert workload.status().phase == CREATED and not workload.status().started
    assert str(tmp_path / "config.json") in workload.command()
    workload.start()
    status = workload.status()
    assert status.phase == RUNNING and status.started and status.attempts == 1
    assert status.labels == {"kubetune.io/stage": "trial"}
    deadline = time.monotonic() + 60
    while workload.status().phase == RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
        workload.poll()
    status = workload.status()
    # exit 1 is not retryable (only >= 128 is), whatever the backoff limit
    assert (status.phase, status.reason, status.attempts) == (FAILED, "PyTorchJobFailed", 1)
    assert status.completion_time and "exited with code 1" in status.message
