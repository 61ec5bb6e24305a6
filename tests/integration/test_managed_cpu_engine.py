"""A managed `runtime.engine: kubetune-cpu` AdapterDeployment's engine container, run as the kubelet would:
its own command and env (secretKeyRefs resolved from a Secret, mountPaths mapped to directories standing
in for the pod's volumes), fetching its base model from a real S3 server (SeaweedFS). The one change: the
port, because a pod has its own network namespace and this test does not."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kubetune.api import serving
from kubetune.api.validation import validate
from kubetune_operator.render import serving as render
from kubetune_testing.factories import adapterdeployment
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY
from kubetune_testing.training_operator import (
    base_env,
    container_env,
    free_port,
    materialise_volumes,
    mount_map,
    translate,
)

MODEL_URI = f"s3://{BUCKET}/managed-cpu/tiny-llama"
SECRET = "model-bucket"
STARTUP_TIMEOUT = 120

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_in_s3(s3_server, tiny_llama) -> str:
    store = s3_server.store()
    for path in sorted(p for p in tiny_llama.rglob("*") if p.is_file()):
        store.upload_file(path, f"{MODEL_URI}/{path.relative_to(tiny_llama)}")
    return MODEL_URI


def rendered_pod(endpoint: str) -> dict:
    doc = adapterdeployment()
    doc["spec"]["baseModel"] = {"uri": MODEL_URI, "s3": {"endpoint": endpoint, "credentials": {"secretName": SECRET}}}
    doc["spec"]["runtime"] = {"engine": "kubetune-cpu", "managed": {"replicas": 1, "maxLoras": 2, "maxCpuLoras": 4}}
    result = validate(doc)
    assert result.ok, result.errors
    adep = {**doc, "metadata": {**doc["metadata"], "uid": "uid-1"}, "spec": result.defaulted["spec"]}
    children = render.render_children(adep, render.ServingSettings(), serving.DesiredState(generation=1), 16)
    return next(c for c in children if c["kind"] == "Deployment")["spec"]["template"]["spec"]


def engine_process(pod: dict, pod_dir: Path, secrets: dict) -> tuple[list[str], dict, int]:
    """The engine container's argv and environment as the kubelet builds them, on a free port."""
    engine = next(c for c in pod["containers"] if c["name"] == "engine")
    mounts = mount_map(engine, pod["volumes"], pod_dir)
    materialise_volumes(pod["volumes"], pod_dir, {})
    env = base_env(pod_dir / "home")
    for key, value in container_env(engine, secrets):
        env[key] = translate(value, mounts)
    Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
    argv = [translate(part, mounts) for part in [*engine["command"], *engine.get("args", [])]]
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    return argv, env, port


def get(url: str) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def serve_until_healthy(argv: list[str], env: dict, port: int, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the engine exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if get(f"http://127.0.0.1:{port}/health")[0] == 200:
                return process
        except OSError:
            pass  # not listening yet: it fetches the base model first
        time.sleep(0.3)
    process.kill()
    pytest.fail(f"the engine was not healthy within {STARTUP_TIMEOUT}s: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_the_rendered_cpu_engine_fetches_its_base_from_s3_and_serves_it(s3_server, model_in_s3, tmp_path):
    pod = rendered_pod(s3_server.endpoint)
    secret = {SECRET: {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}}
    argv, env, port = engine_process(pod, tmp_path, secret)
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint and env["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    process = serve_until_healthy(argv, env, port, tmp_path / "engine.log")
    try:
        status, models = get(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == [MODEL_URI]
    finally:
        stop(process)
    copies = list((tmp_path / "volumes" / "models").iterdir())
    assert len(copies) == 1 and (copies[0] / "config.json").is_file()  # in the pod's model cache
    # a restarted container reusing that copy: tests/engine/test_model_source.py (a start costs ~20 s here)
