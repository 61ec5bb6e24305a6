"""Pre-flight through kopf + the API emulator + SeaweedFS with a really trained classification adapter:
its manifest's modules_to_save is refused on vLLM and served on the CPU engine; its base is matched by
identity, so an s3:// mirror of the model it was trained on is accepted and another model is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api import serving
from kubetune.clients import kube
from kubetune_operator.controllers.adapterdeployment import ADAPTERDEPLOYMENTS
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY
from kubetune_testing.tiny import make_tiny_llama
from tests.trainer.conftest import job_spec, lm_corpus, make_config, run_in_process, write_jsonl

from .conftest import NS, eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def classifier(tiny_llama, tmp_path_factory, s3_server) -> dict:
    """A LoRA classifier on the tiny Llama, trained and published by the trainer (2 steps): its head is
    saved as peft's modules_to_save, as for every SequenceClassification adapter. Served from object
    storage, as in a cluster (admission refuses file:// adapter sources outside `kubetune local`)."""
    root = tmp_path_factory.mktemp("classifier")
    rows = [{"text": f"{r['prompt']} {r['completion']} {i}", "label": "a" if i % 2 else "b"}  # no copies
            for i, r in enumerate(lm_corpus(24))]
    data = write_jsonl(root / "train.jsonl", rows)
    spec = job_spec(tiny_llama, data, root / "out", task="SequenceClassification", baseline={"enabled": False},
                    dataset={"uri": f"file://{data}", "format": "text-label", "validationSplit": 0.25},
                    training__maxSteps=2, training__evalSteps=2)
    config = make_config(spec, name="classifier")
    manifest = run_in_process(config, root / "work")
    published = Path(config.storage.manifest_uri.removeprefix("file://")).parent
    prefix = f"s3://{BUCKET}/adapters/classifier"
    for path in sorted(p for p in published.rglob("*") if p.is_file()):
        s3_server.store().upload_file(path, f"{prefix}/{path.relative_to(published)}")
    return {"manifestUri": f"{prefix}/manifest.json", "digest": manifest["digest"]}


def upload_model(s3_server, directory: Path, prefix: str) -> str:
    store = s3_server.store()
    for path in sorted(directory.iterdir()):
        store.upload_file(path, f"{prefix}/{path.name}")
    return prefix


async def submit(api, s3_server, name: str, adapter: dict, base_uri: str, engine: str) -> None:
    await api.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    await api.client.create(ADAPTERDEPLOYMENTS, {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"baseModel": {"uri": base_uri},
                 "runtime": {"engine": engine, "selector": {"matchLabels": {"app": name}}},
                 "storage": {"endpoint": s3_server.endpoint, "credentials": {"secretName": "s3-creds"}},
                 "adapters": [{"name": "intents", "source": {"uri": adapter["manifestUri"],
                                                             "digest": adapter["digest"]}}],
                 "strategy": {"type": "Immediate"}}})


async def validated(api, name: str) -> dict:
    async def condition() -> dict | None:
        adep = await api.get(ADAPTERDEPLOYMENTS, name)
        found = [c for c in (adep.get("status") or {}).get("conditions") or [] if c["type"] == "Validated"]
        return found[0] if found else None
    return await eventually(condition, timeout=30)


async def test_a_classifier_is_refused_on_vllm_and_served_on_the_cpu_engine_from_an_s3_mirror(
        operator, api, s3_server, classifier, tiny_llama, tmp_path):
    mirror = upload_model(s3_server, tiny_llama, f"s3://{BUCKET}/models/tiny-llama-mirror")
    await submit(api, s3_server, "on-vllm", classifier, mirror, "vllm")
    refused = await validated(api, "on-vllm")
    assert (refused["status"], refused["reason"]) == ("False", "AdapterUnsupported")
    assert "modules_to_save" in refused["message"] and "spec.runtime.engine: kubetune-cpu" in refused["message"]

    await submit(api, s3_server, "on-cpu", classifier, mirror, "kubetune-cpu")  # base and adapter from s3://
    accepted = await validated(api, "on-cpu")
    assert (accepted["status"], accepted["reason"]) == ("True", "PreflightPassed"), accepted
    config_map = await api.get(kube.CONFIGMAPS, serving.desired_config_map_name("on-cpu"))
    desired = serving.DesiredState.from_json(config_map["data"][serving.DESIRED_KEY])
    assert [v.digest for v in desired.adapters[0].versions] == [classifier["digest"]]

    texts = [f"{r['prompt']} {r['completion']}" for r in lm_corpus()] + ["system user assistant"]
    other = upload_model(s3_server, make_tiny_llama(tmp_path / "other", texts, seed=1),
                         f"s3://{BUCKET}/models/tiny-llama-other")  # the same config.json, other weights
    await submit(api, s3_server, "other-base", classifier, other, "kubetune-cpu")
    mismatch = await validated(api, "other-base")
    assert (mismatch["status"], mismatch["reason"]) == ("False", "BaseModelMismatch")
    assert "which is another model: weights digest" in mismatch["message"]
