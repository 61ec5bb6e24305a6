"""Every command in README.md and docs/*.md, tried as a new user would (see docs_commands.py).

kubectl and helm run for real against the Kubernetes API emulator with the operator running and the
API server's admission (schema + CEL) on; `kubetune validate|render|generate --check` run for real;
long runs are checked to be run by a named test or CI script. Where a document shows sample output,
the command's real output must agree: the same table columns for `kubectl get`, the same error lines
for a refused spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from kubetune_testing import auth
from kubetune_testing.kubectl import admission
from kubetune_testing.tls_front import TlsFront

from .conftest import write_kubeconfig
from .docs_commands import REPO, RUN_BY, DocCommand, all_commands, documents, extract, how

# no test here reads kmock's request history: each request is forgotten once served
pytestmark = [pytest.mark.integration, pytest.mark.forget_served_requests]

TOOLS = REPO / ".tools" / "bin"
COMMAND_TIMEOUT = 120
# verbs that change nothing in the cluster (`kubectl config` edits the kubeconfig only)
READ_ONLY_KUBECTL = {"get", "describe", "explain", "api-resources", "config"}
READ_ONLY_HELM = {"list", "status", "template", "lint", "get"}


def _docs_with(way: str) -> list[str]:
    return [str(path.relative_to(REPO)) for path in documents()
            if any(how(command)[0] == way for command in extract(path))]


def _columns(header: str) -> list[str]:
    return re.split(r"\s{2,}", header.strip())


def _expects_failure(command: DocCommand) -> bool:
    first = next((line for line in command.output if line.strip()), "")
    return bool(re.match(r"^(error|Error)\b", first) or re.search(r"\b(is invalid|: error:)", first))


def _check_output(command: DocCommand, returncode: int, output: str) -> None:
    expect_failure = _expects_failure(command)
    if expect_failure:
        assert returncode != 0, f"{command.where()}: the docs show a refusal, but it exited 0:\n{output}"
    else:
        assert returncode == 0, f"{command.where()}: exited {returncode}:\n{output}"
    shown = [line for line in command.output if line.strip()]
    if not shown:
        return
    if command.argv[:2] == ("kubectl", "get") and re.match(r"^(NAMESPACE|NAME)\s", shown[0]):
        headers = [line for line in output.splitlines() if re.match(r"^(NAMESPACE|NAME)\s", line)]
        assert headers, f"{command.where()}: no table in the output:\n{output}"
        assert any(_columns(h) == _columns(shown[0]) for h in headers), (
            f"{command.where()}: the docs show the columns {_columns(shown[0])}, kubectl prints "
            f"{[_columns(h) for h in headers]}")
    if expect_failure or ": error:" in "\n".join(shown):
        for line in shown:
            if ": error:" in line:
                assert line.strip() in output, f"{command.where()}: the docs show {line.strip()!r}; got:\n{output}"


def test_every_command_in_the_docs_is_exercised():
    commands = all_commands()
    assert len(commands) >= 20, "the README and docs lost their commands?"
    unexercised = [command.where() for command in commands if how(command)[0] == "unexercised"]
    assert not unexercised, ("commands in the docs that no test or CI script runs (add them to "
                             "tests/integration/docs_commands.py, or do not show them as commands):\n"
                             + "\n".join(unexercised))
    for prefix, runner, needle in RUN_BY:
        assert needle in (REPO / runner).read_text(), f"{runner} no longer runs {' '.join(prefix)} ({needle})"


def test_the_readme_starts_with_the_two_commands():
    first = extract(REPO / "README.md")[:2]
    assert [command.text for command in first] == ["make run", "make test"]
    assert (REPO / ".ci" / "run").read_text().strip().endswith("exec make test")


@pytest.mark.parametrize("doc", _docs_with("cli"))
def test_cli_commands_of(doc):
    for command in extract(REPO / doc):
        if how(command)[0] != "cli":
            continue
        result = subprocess.run([sys.executable, "-m", "kubetune_operator.cli", *command.argv[1:]], cwd=REPO,
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
        _check_output(command, result.returncode, result.stdout + result.stderr)


def _prelude() -> list[DocCommand]:
    """The docs talk about the examples' resources by name (ticket-router, support...): each document
    starts in a cluster where a user applied them (with kubectl too, all in one `kubectl apply`: one
    process instead of one per example)."""
    examples = sorted(str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*.yaml")
                      if re.search(r"^kind: (FineTuneJob|AdapterDeployment)$", p.read_text(), re.M))
    argv = ("kubectl", "apply", *(arg for path in examples for arg in ("-f", path)))
    return [DocCommand("(prelude)", 0, " ".join(argv), argv)]


def _changes_the_cluster(command: DocCommand) -> bool:
    """Whether the operator has something to react to after it (a read leaves nothing to react to)."""
    tool, verb = command.argv[0], (command.argv[1] if len(command.argv) > 1 else "")
    reads = READ_ONLY_KUBECTL if tool == "kubectl" else READ_ONLY_HELM
    return verb not in reads


@pytest_asyncio.fixture()
async def tls_front(k8s, tmp_path) -> AsyncIterator[TlsFront]:
    """kubectl and helm send their kubeconfig's token only over TLS."""
    async with TlsFront(str(k8s.url), tmp_path / "tls") as front:
        yield front


@pytest.mark.parametrize("doc", _docs_with("cluster"))
async def test_cluster_commands_of(doc, k8s, operator, tls_front, tmp_path):
    """The document's kubectl and helm commands, in order, against one cluster (the emulator with the
    operator running), from a kubeconfig whose namespace is team-a, as after
    `kubectl config set-context --current --namespace team-a`."""
    k8s.admission = admission
    # the user's kubectl and helm authenticate as a cluster admin (kubeadm's admin.conf user)
    admin = {"token": k8s.authenticator.issue(auth.ADMIN)}
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", tls_front.url, admin, namespace="team-a",
                                  ca_path=tls_front.ca_path)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig),
           "HOME": str(tmp_path), "PATH": f"{TOOLS}:{os.environ.get('PATH', '')}",
           "HELM_CACHE_HOME": str(tmp_path / "helm-cache"), "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
           "HELM_DATA_HOME": str(tmp_path / "helm-data")}
    for command in [*_prelude(), *extract(REPO / doc)]:
        if how(command)[0] != "cluster":
            continue
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(*command.argv, cwd=REPO, env=env,
                                                       stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it may end while the timeout fires
                process.kill()
            pytest.fail(f"{command.where()}: still running after {COMMAND_TIMEOUT}s")
        print(f"{time.monotonic() - started:6.1f}s {command.where()}")
        _check_output(command, process.returncode, out.decode(errors="replace"))
        if _changes_the_cluster(command):
            await asyncio.sleep(0.5)  # let the operator react, as between a user's commands
