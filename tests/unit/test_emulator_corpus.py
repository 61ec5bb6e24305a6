"""`tests/corpus/children/`: objects the API server refuses, each posted to the emulator, which must give
the exact status code and message of its `# expect:` line."""

from __future__ import annotations

import aiohttp
import kmock
import pytest
import yaml

from kubetune_testing.emulator import K8sEmulator, declare_resources
from tests.conftest import REPO_ROOT

CORPUS = REPO_ROOT / "tests" / "corpus" / "children"
COLLECTIONS = {"v1/Service": "api/v1/namespaces/team-a/services", "v1/ConfigMap": "api/v1/namespaces/team-a/configmaps",
               "v1/Secret": "api/v1/namespaces/team-a/secrets", "v1/Pod": "api/v1/namespaces/team-a/pods",
               "apps/v1/Deployment": "apis/apps/v1/namespaces/team-a/deployments",
               "batch/v1/Job": "apis/batch/v1/namespaces/team-a/jobs",
               "kubeflow.org/v1/PyTorchJob": "apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"}


def expectation(path) -> tuple[int, str]:
    line = next(line for line in path.read_text().splitlines() if line.startswith("# expect: "))
    code, _, message = line.removeprefix("# expect: ").partition(" ")
    return int(code), message


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.yaml")))
async def test_the_emulator_refuses_as_the_api_server_does(name):
    path = CORPUS / name
    document = yaml.safe_load(path.read_text())
    async with K8sEmulator() as emulator, kmock.Server(emulator), aiohttp.ClientSession() as session:
        declare_resources(emulator)
        url = f"{str(emulator.url).rstrip('/')}/{COLLECTIONS[document['apiVersion'] + '/' + document['kind']]}"
        response = await session.post(url, json=document)
        body = await response.json()
    assert (response.status, body["message"]) == expectation(path)
    assert body["kind"] == "Status" and body["status"] == "Failure"
