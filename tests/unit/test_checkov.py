"""checkov on the rendered chart: no failed check in the chart's main configurations.

The checks the chart skips are listed, each with its reason, in ONE place: charts/kubetune/checkov-skips.yaml.
docs/security.md must list every skipped id with the same reason. checkov lives in its own virtualenv
(.tools/checkov, exposed as .tools/bin/checkov by scripts/setup.sh): its pinned dependencies conflict
with the project's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.test_chart import find_helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
SKIPS_FILE = CHART / "checkov-skips.yaml"
SECURITY_DOC = REPO / "docs" / "security.md"

# The chart's main configurations: what `helm install` renders with these --set flags.
CONFIGURATIONS = {
    "default": [],
    "watch-namespaces": ["--set", "watchNamespaces={team-a,team-b}"],
    "service-monitor": ["--set", "metrics.serviceMonitor.enabled=true"],
    "argocd-health-configmap": ["--set", "argocd.healthChecks.configMap=true"],
    "network-policy-tenancy": ["--set", "networkPolicy.enabled=true",
                               "--set", "tenancy.allowedStorage.team-a={s3://team-a/}"],
}


def skips() -> list[dict]:
    return yaml.safe_load(SKIPS_FILE.read_text())["skips"]


def find_checkov() -> str | None:
    for candidate in (REPO / ".tools" / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _normalize(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def test_every_skip_has_an_id_a_check_and_a_reason():
    entries = skips()
    assert entries, "no skips listed"
    ids = [s["id"] for s in entries]
    assert len(ids) == len(set(ids)), "a check is listed twice"
    for entry in entries:
        assert set(entry) == {"id", "check", "reason"}, entry
        assert entry["id"].startswith(("CKV_K8S_", "CKV2_K8S_")), entry["id"]
        assert len(entry["reason"]) > 40, f"{entry['id']}: say why"


def test_docs_security_lists_every_skip_with_its_reason():
    doc = _normalize(SECURITY_DOC.read_text())
    for entry in skips():
        row = f"| {entry['id']} | {_normalize(entry['check'])} | {_normalize(entry['reason'])} |"
        assert row in doc, f"docs/security.md lacks the row for {entry['id']}: {row}"


@pytest.fixture(scope="module")
def rendered_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    helm = find_helm()
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    out = {}
    for name, args in CONFIGURATIONS.items():
        proc = subprocess.run([helm, "template", "kt", str(CHART), "--namespace", "kubetune-system", *args],
                              capture_output=True, text=True, env=env, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        folder = tmp_path_factory.mktemp(f"rendered-{name}")
        (folder / "chart.yaml").write_text(proc.stdout)
        out[name] = folder
    return out


def run_checkov(folder: Path, skip_ids: list[str]) -> dict:
    checkov = find_checkov()
    if checkov is None:
        pytest.skip("checkov not installed: run scripts/setup.sh (installs it into .tools/checkov and links "
                    ".tools/bin/checkov)")
    # --skip-download: offline; no calls to the Prisma Cloud API (guidelines, policies)
    args = [checkov, "-d", str(folder), "--framework", "kubernetes", "--skip-download", "--output", "json",
            "--quiet"]
    if skip_ids:
        args += ["--skip-check", ",".join(skip_ids)]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.stdout.strip(), f"checkov printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in (r.get("results") or {}).get("failed_checks") or []]
    summary = {"passed": sum(r["summary"]["passed"] for r in reports if "summary" in r),
               "failed": failed,
               "parsing_errors": sum(r["summary"].get("parsing_errors", 0) for r in reports if "summary" in r)}
    return summary


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_chart_passes_checkov(rendered_dirs, configuration):
    result = run_checkov(rendered_dirs[configuration], [s["id"] for s in skips()])
    failures = [f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in result["failed"]]
    assert not failures, "checkov failed checks:\n" + "\n".join(failures)
    assert result["parsing_errors"] == 0
    assert result["passed"] > 20  # it did check something


def test_network_policy_needs_no_skip(rendered_dirs):
    """With networkPolicy.enabled the NetworkPolicy check passes on its own (the skip covers the default)."""
    result = run_checkov(rendered_dirs["network-policy-tenancy"],
                         [s["id"] for s in skips() if s["id"] != "CKV2_K8S_6"])
    assert not [c["check_id"] for c in result["failed"]]
