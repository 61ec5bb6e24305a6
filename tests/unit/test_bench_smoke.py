"""The benchmarks in bench/ still run: each in its smoke mode, as a subprocess from the repository root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, SHARED, shared_file


def _run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBETUNE_SHARED": str(SHARED), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def test_trainer_throughput_smoke(tmp_path: Path):
    shared_file("datasets", "clinc150", "data_full.json")  # fails clearly when ../shared is missing
    out = tmp_path / "throughput.json"
    _run("trainer_throughput.py", "--smoke", "--json", str(out), timeout=120)
    report = json.loads(out.read_text())
    kubetune, seed = report["results"]["kubetune"], report["results"]["seed"]
    for result in (kubetune, seed):
        assert result["real_tokens_per_second"] > 0, result
        assert result["steps"] == report["settings"]["steps"], result
    assert kubetune["padding_fraction"] < 0.05, kubetune  # packed, padding-free
    assert seed["padding_fraction"] > 0.5, seed  # every example padded to 512
    assert report["ratio"] > 0


def test_gpu_lora_llama_cpu_smoke(tmp_path: Path):
    out = tmp_path / "lora.json"
    _run("gpu_lora_llama.py", "--cpu-smoke", "--json", str(out), timeout=180)
    report = json.loads(out.read_text())
    assert report["tokens_per_second"] > 0, report
    assert report["tokens_per_step"] == report["seq"]  # rows are packed full
    assert report["trainable_params"] < report["params"]  # LoRA: the base is frozen
    assert report["mfu"] is None and report["peak_memory_gib"] is None  # CPU: n/a


def test_rank_sweep_smoke(tmp_path: Path):
    out = tmp_path / "sweep.json"
    # 1 min 50 s of CPU in two jobs of three processes each: on a shared 2-core machine the wall time is 5 min
    _run("rank_sweep.py", "--smoke", "--json", str(out), timeout=600)
    report = json.loads(out.read_text())
    results = report["results"]
    assert results["plain"]["best_rank"] is None and results["plain"]["sweep_seconds"] == 0
    swept = results["sweep"]
    assert sorted({t["rank"] for t in swept["trials"]}) == report["settings"]["ranks"]
    assert [t["state"] for t in swept["trials"]].count("Succeeded") == 1
    assert swept["steps"]["usedSteps"] <= max(swept["steps"]["budgetSteps"], 2)
    assert swept["sweep_seconds"] > 0 and report["sweep_to_plain_ratio"] > 0


def test_adapter_rollout_smoke(tmp_path: Path):
    out = tmp_path / "rollout.json"
    _run("adapter_rollout.py", "--smoke", "--json", str(out), timeout=240)
    report = json.loads(out.read_text())
    assert report["settings"]["pods"] == 2 and report["settings"]["strategies"] == ["rolling"]
    results = report["results"]
    hot, rolling = results["hot"], results["restart_rolling"]
    for result in (hot, rolling):
        [run] = result["runs"]
        assert (run["from"], run["to"]) == ("a", "b")
        assert len(run["per_pod_s"]) == 2 and run["all_serving_s"] == max(run["per_pod_s"]) > 0
        assert result["requests"] > 0
    assert hot["failed_requests"] == 0  # the hot load never drops a request
    [run] = hot["runs"]
    assert all(a["read_desired_s"] is not None and a["loaded_s"] is not None for a in run["agents"])
    assert report["ratio"]["rolling"] > 1  # two engine start-ups in a row vs a watch event and a load


def test_drift_analysis_smoke(tmp_path: Path):
    out = tmp_path / "drift.json"
    _run("drift_analysis.py", "--smoke", "--json", str(out), timeout=120)
    report = json.loads(out.read_text())
    assert report["settings"]["window"] == 100 and report["settings"]["smoke"]
    assert len(report["runs"]) == 2
    for run in report["runs"]:
        assert run["requests"] == 100  # every sampled record parsed into one observation
        assert run["without_s"] > 0 and run["with_http_s"] > 0 and run["embed_http_s"] > 0
        assert "embed_inprocess_s" not in run  # --smoke skips the in-process encoder
    assert [run["oos_share"] for run in report["runs"]] == [0.0, 0.5]
    one_off = report["one_off"]
    assert one_off["calibrate_s"] > 0 and one_off["build_reference_s"] > 0 and one_off["holdout"] == 60
    assert set(report["ratio"]) == {"http"}


def test_generative_drift_smoke(tmp_path: Path):
    out = tmp_path / "gendrift.json"
    _run("generative_drift.py", "--smoke", "--json", str(out), timeout=240)
    report = json.loads(out.read_text())
    [result] = report["results"]
    assert result["format"] == "chat" and result["holdoutAnswers"] > 0
    for traffic in ("plain", "streamed"):  # windows from the agent's sample records of each
        for reference in ("answers", "teacherForced"):
            rates = result["rates"][traffic][reference]
            assert set(rates) == {"quiet", "shifted10", "shifted20", "shifted30", "shifted100"}
            assert rates["shifted100"]["drifted"] == 1.0, rates  # every prompt shifted: both references see it
    assert result["rates"]["plain"] == result["rates"]["streamed"]  # a stream is sampled as the same answer
    assert result["streamedVsPlainMaxDifference"] <= 1e-6
    assert result["served"]["quiet"]["confidence"] > result["served"]["shifted100"]["confidence"]


def test_scale_smoke(tmp_path: Path):
    out = tmp_path / "scale.json"
    _run("scale.py", "--sizes", "5", "--adeps", "1", "--namespaces", "2", "--probes", "3", "--probe-rate", "20",
         "--settle", "1", "--timeout", "60", "--out", str(out), timeout=120)
    report = json.loads(out.read_text())
    [result] = report["results"]
    assert (result["jobs"], result["adapterdeployments"], result["namespaces"]) == (5, 1, 2)
    assert result["converged"] and result["missing"] == 0 and result["converge_s"] > 0
    assert result["pytorchjobs"] == 5 + 3 and result["duplicate_child_creates"] == []  # one per job and probe
    assert result["probe_missing"] == 0 and result["probe_FineTuneJob_child_latency_p99_s"] > 0
    assert result["limited_by"] and set(result["converge_cores"]) >= {"operator", "emulator", "client", "s3"}
    assert result["settle_unfinished_jobs"] == 5 and result["settle_requests_per_s_per_1000_jobs"] is not None
    assert result["operator_alive"] and result["operator_exit"] == 0 and result["reconcile_errors"] == 0
    assert result["FineTuneJob_child_latency_p50_s"] > 0 and result["AdapterDeployment_child_latency_p99_s"] > 0
    assert result["FineTuneJob_reconciles"] >= 5 and result["FineTuneJob_reconcile_p99_s"] > 0
    assert result["rss_peak_mib"] >= result["rss_after_mib"] > 0 and result["cpu_s"] > 0
    assert result["requests"] > 0 and result["requests_by_verb"]["CREATE"] >= 5 + 1 + 5  # FTJs, ADep, PyTorchJobs
    assert result["settle_requests_per_s"] is not None


def test_node_downloads_smoke(tmp_path: Path):
    out = tmp_path / "downloads.json"
    _run("node_downloads.py", "--smoke", "--json", str(out), timeout=300)
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["model_bytes"] == report["model_bytes"] and row["data_bytes"] == report["data_bytes"], row


def test_gpu_lora_llama_qlora_cpu_smoke(tmp_path: Path):
    # the QLoRA row of scripts/gpu-check.sh: the base saved, loaded 4-bit NF4 by modeling.load_model, stepped
    out = tmp_path / "qlora.json"
    _run("gpu_lora_llama.py", "--cpu-smoke", "--method", "QLoRA", "--json", str(out), timeout=180)
    report = json.loads(out.read_text())
    assert report["method"] == "QLoRA" and report["quantization"]["quantType"] == "nf4"
    assert report["quantized_layers"] == 2 * 7  # every linear layer of the 2 decoder layers, not the head
    assert report["tokens_per_second"] > 0 and len(report["losses"]) == report["timed_steps"]


def test_emulator_list_smoke(tmp_path: Path):
    out = tmp_path / "emulator_list.json"
    _run("emulator_list.py", "--smoke", "--out", str(out), timeout=120)
    report = json.loads(out.read_text())
    history = report["results"].pop("history")
    assert 0 < history["bounded_mib"] < history["every_version_mib"]
    [result] = report["results"].values()
    for side in ("indexed", "kmock_scan"):
        assert set(result[side]) == {"list_ns_label_us", "get_us", "create_us"}
        assert all(us > 0 for us in result[side].values()), result


def test_quality_smoke(tmp_path: Path):
    """The CLINC150 side by side on 2 lines per intent: the PEFT script and kubetune both train and score
    the same test split; kubetune derived its settings and pooled as MiniLM was trained."""
    _run("quality.py", "--runs", "baseline", "kubetune", "--per-intent", "2", "--baseline-epochs", "1",
         "--set", "training.maxSteps=6", "--out", str(tmp_path), timeout=600)
    report = json.loads((tmp_path / "quality.json").read_text())
    for name in ("baseline", "kubetune"):
        assert 0 <= report[name]["accuracy"] <= 1 and report[name]["wall_seconds"] > 0, report[name]
    kubetune = report["kubetune"]
    assert kubetune["pooling"] == "mean" and kubetune["steps"] == 6
    assert {"learningRate", "headLearningRate", "perDeviceBatchSize"} <= set(kubetune["derived"])
