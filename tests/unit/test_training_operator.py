"""The training-operator stand-in's own decisions: kubeflow's env, volume binding, secrets, restarts."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from kubetune_testing import training_operator as to


def _pytorchjob(nodes: int = 2, nproc: str = "4", restart: str = "ExitCode", backoff: int = 3) -> dict:
    container = {"name": "pytorch", "command": ["python", "-c", "import sys; sys.exit(0)"],
                 "env": [{"name": "KUBETUNE_JOB_CONFIG", "value": "/etc/kubetune/job/config.json"},
                         {"name": "AWS_SECRET_ACCESS_KEY",
                          "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "secret"}}}],
                 "volumeMounts": [{"name": "job-config", "mountPath": "/etc/kubetune/job"},
                                  {"name": "cache", "mountPath": "/var/cache/kubetune"}]}
    template = {"spec": {"containers": [container],
                         "volumes": [{"name": "job-config", "configMap": {"name": "j-config"}},
                                     {"name": "cache", "emptyDir": {}}]}}
    replicas = {"Master": {"replicas": 1, "restartPolicy": restart, "template": template}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": restart, "template": template}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j", "namespace": "ns"},
            "spec": {"nprocPerNode": nproc, "runPolicy": {"backoffLimit": backoff}, "pytorchReplicaSpecs": replicas}}


def test_env_is_what_kubeflows_setpodenv_appends():
    env = to.operator_env(_pytorchjob(nodes=3), "Worker", 1, 29500)
    assert env == [("PYTHONUNBUFFERED", "1"), ("MASTER_PORT", "29500"), ("PET_MASTER_PORT", "29500"),
                   ("MASTER_ADDR", "127.0.0.1"), ("PET_MASTER_ADDR", "127.0.0.1"), ("WORLD_SIZE", "12"),
                   ("RANK", "2"), ("PET_NODE_RANK", "2"), ("PET_NPROC_PER_NODE", "4"), ("PET_NNODES", "3")]
    assert ("RANK", "0") in to.operator_env(_pytorchjob(), "Master", 0, 1)
    assert ("WORLD_SIZE", "2") in to.operator_env(_pytorchjob(nproc="auto"), "Master", 0, 1)  # getNprocPerNodeInt
    assert to.pod_name("j", "Worker", 0) == "j-worker-0"
    assert [to.is_retryable_exit_code(c) for c in (0, 1, 2, 127, 128, 137, 143)] == [False] * 4 + [True] * 3


def test_mount_paths_are_bound_to_the_pods_own_directories(tmp_path):
    job = _pytorchjob()
    run = to.PyTorchJobRun(job, tmp_path, config_maps={"j-config": {"config.json": "{}"}},
                           secrets={"s3-creds": {"secret": "s3cr3t"}})
    run.master_port = 1234
    argv, env = run.pod_process(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"], "Master", 0,
                                tmp_path / "pod")
    assert argv == ["python", "-c", "import sys; sys.exit(0)"]  # nothing appended
    assert env["KUBETUNE_JOB_CONFIG"] == str(tmp_path / "pod/volumes/job-config/config.json")
    assert (tmp_path / "pod/volumes/job-config/config.json").read_text() == "{}"
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and env["PET_NNODES"] == "2"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    mounts = {"/var/cache/kubetune": tmp_path / "cache", "/var": tmp_path / "var"}
    assert to.translate("/var/cache/kubetune/work", mounts) == f"{tmp_path}/cache/work"
    assert to.translate("/var/cachex", mounts) == f"{tmp_path}/var/cachex"
    assert to.translate("/etc/passwd", mounts) == "/etc/passwd"


@pytest.mark.parametrize(("secrets", "message"), [({}, 'secret "s3-creds" not found'),
                                                   ({"s3-creds": {}}, "couldn't find key secret in Secret s3-creds")])
def test_a_missing_secret_keeps_the_pod_from_starting(secrets, message, tmp_path):
    run = to.PyTorchJobRun(_pytorchjob(nodes=1), tmp_path, config_maps={"j-config": {}}, secrets=secrets)
    run.start()
    assert run.wait(5) == "Created"  # never Running: the kubelet cannot build the container
    pod = run.pod()
    assert pod.process is None and pod.waiting == to.CREATE_CONTAINER_CONFIG_ERROR and message in pod.message


def _exit_with(code: int, marker: Path | None = None) -> list[str]:
    """Exit with `code`; with a marker file, only the first time (the next attempt succeeds)."""
    if marker is None:
        return ["python", "-c", f"import sys; sys.exit({code})"]
    return ["python", "-c", f"import pathlib, sys; m = pathlib.Path({str(marker)!r}); first = not m.exists(); "
                            f"m.touch(); sys.exit({code} if first else 0)"]


@pytest.mark.parametrize(("code", "backoff", "phase", "restarts"),
                         [(0, 3, "Succeeded", 0), (2, 3, "Failed", 0), (143, 3, "Succeeded", 1), (137, 0, "Failed", 0)])
def test_exit_codes_as_restart_policy_exit_code_treats_them(code, backoff, phase, restarts, tmp_path):
    job = _pytorchjob(nodes=1, backoff=backoff)
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    container["command"] = _exit_with(code, tmp_path / "marker" if code >= 128 else None)
    run = to.PyTorchJobRun(job, tmp_path, config_maps={"j-config": {}}, secrets={"s3-creds": {"secret": "x"}})
    run.start()
    assert run.wait(60) == phase
    assert run.restarts == restarts  # >= 128 is retried (backoffLimit 0 aside), each time in a fresh directory
    assert len({p.directory for p in run.history}) == restarts + 1
    assert [p.exit_code for p in run.history] == ([code, 0] if restarts else [code])
    condition = next(c for c in run.conditions if c["type"] == phase)
    assert condition["reason"] == f"PyTorchJob{phase}" and condition["status"] == "True"
    if phase == "Failed":
        assert "backoff limit" in condition["message"] if backoff == 0 else "Master" in condition["message"]
    assert run.status()["replicaStatuses"]["Master"]["succeeded" if phase == "Succeeded" else "failed"] == 1


def test_a_killed_pod_takes_every_process_with_it_even_in_other_sessions(tmp_path):
    """torchrun starts its workers in sessions of their own: killing the process group would miss them."""
    spawn = ("import subprocess, sys, time, pathlib; child = subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(120)'], start_new_session=True); "
             f"pathlib.Path({str(tmp_path / 'child.pid')!r}).write_text(str(child.pid)); time.sleep(120)")
    job = _pytorchjob(nodes=1)
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"] = \
        ["python", "-c", spawn]
    run = to.PyTorchJobRun(job, tmp_path, config_maps={"j-config": {}}, secrets={"s3-creds": {"secret": "x"}})
    run.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "child.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int((tmp_path / "child.pid").read_text())
    assert run.kill().poll() == 137
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone (or a reaped zombie)
    run.stop_pods()
