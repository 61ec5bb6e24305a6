"""What `kubectl get ftj,adep` shows: the CRDs' printer columns evaluated on realistic objects, as the
API server's table convertor does (testing/kubetune_testing/apiserver_views.py; the real kubectl against the
emulator runs in tests/integration/test_docs_commands.py)."""

from __future__ import annotations

from kubetune_operator.reconcile.adapterdeployment import versions_summary
from kubetune_testing import apiserver_views as views

DIGEST_A = "sha256:" + "1a2b3c4d5e6f" + "0" * 52
DIGEST_B = "sha256:" + "9f8e7d6c5b4a" + "1" * 52


def _row(plural: str, obj: dict, wide: bool = False) -> dict[str, object]:
    table = views.table("kubetune.io", "v1alpha1", plural, [obj], "1")
    columns = table["columnDefinitions"]
    cells = table["rows"][0]["cells"]
    return {c["name"]: cell for c, cell in zip(columns, cells, strict=True) if wide or c["priority"] == 0}


def test_versions_summary_names_stable_and_canary_with_weight():
    assert versions_summary([]) == ""
    assert versions_summary([{"name": "support-bot"}]) == "support-bot (none yet)"
    assert versions_summary([{"name": "support-bot", "stable": {"digest": DIGEST_A}}]) == "support-bot 1a2b3c4d5e6f"
    assert versions_summary([
        {"name": "support-bot", "stable": {"digest": DIGEST_A}, "canary": {"digest": DIGEST_B}, "canaryWeight": 10},
        {"name": "sql", "stable": {"digest": DIGEST_B}},
    ]) == "support-bot 1a2b3c4d5e6f -> 9f8e7d6c5b4a 10%, sql 9f8e7d6c5b4a"


def test_a_failed_job_shows_its_reason_and_a_published_one_its_adapter_when_wide():
    failed = {"metadata": {"name": "sql-assistant-qlora", "creationTimestamp": "2026-01-01T00:00:00Z"},
              "spec": {"method": {"type": "QLoRA"}, "baseModel": {"uri": "hf://m"}},
              "status": {"phase": "Failed",
                         "failure": {"reason": "NonFiniteLoss", "message": "loss is nan at step 212"}}}
    row = _row("finetunejobs", failed)
    assert row["Phase"] == "Failed" and row["Reason"] == "NonFiniteLoss" and row["Method"] == "QLoRA"
    assert "Adapter" not in row and "Base Model" not in row  # -o wide only
    done = {"metadata": {"name": "ticket-router", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"method": {"type": "LoRA"}},
            "status": {"phase": "Succeeded", "rank": 16, "progress": {"percent": 100, "evalLoss": 0.31},
                       "baseline": {"summary": "accuracy 0.41 < 0.92"}, "sweep": {"summary": "4/4 done, best r16"},
                       "adapter": {"digest": DIGEST_A}}}
    row = _row("finetunejobs", done, wide=True)
    assert (row["Rank"], row["Progress"], row["Eval Loss"]) == (16, 100, 0.31)
    assert row["Sweep"] == "4/4 done, best r16" and row["Adapter"] == DIGEST_A and row["Reason"] is None


def test_an_adapterdeployment_shows_its_versions_and_drift():
    adep = {"metadata": {"name": "support", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"strategy": {"type": "Canary"}, "baseModel": {"uri": "hf://m"}},
            "status": {"phase": "Progressing", "summary": "support-bot 1a2b3c4d5e6f -> 9f8e7d6c5b4a 10%",
                       "adapters": [{"name": "support-bot", "drift": {"state": "Watching"}}]}}
    row = _row("adapterdeployments", adep)
    assert row["Versions"] == "support-bot 1a2b3c4d5e6f -> 9f8e7d6c5b4a 10%"
    assert row["Drift"] == "Watching" and row["Strategy"] == "Canary" and "Base Model" not in row
