"""Generative drift: false-alarm and detection rates of the drift triggers for a causal-LM adapter, with the
reference of its own greedy answers (now) and the teacher-forced reference (before), on the same windows,
built from the agent's sampled records of plain and of streamed requests (clients ask for no logprobs).

    .venv/bin/python bench/generative_drift.py --json /tmp/gendrift.json           # 20 + 4 x 10 windows of 30
    .venv/bin/python bench/generative_drift.py --smoke --json /tmp/gendrift.json   # chat, 2 + 4 x 1 windows (CI)
Method: bench/README.md ("generative_drift.py"); figures: BENCHMARKS.md ("Generative drift")."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image", REPO_ROOT / "testing"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

from common import free_port, stop_process  # noqa: E402  (bench/, on sys.path)
from drift_analysis import post  # noqa: E402
from kubetune.api import answer_scores, jobconfig, serving, storage_layout  # noqa: E402
from kubetune.api.validation import validate  # noqa: E402
from kubetune_operator import stats  # noqa: E402
from kubetune_testing import cycle_lm  # noqa: E402
from rollout_pods import Agent, wait_until  # noqa: E402

NS = "team-a"
DEFAULTS = {"window": 30, "quiet": 20, "shifted": 10, "formats": list(cycle_lm.FORMATS)}
SMOKE = {"window": 30, "quiet": 2, "shifted": 1, "formats": ["chat"]}
SHARES = (0.1, 0.2, 0.3, 1.0)  # shifted windows: this share of their prompts shifted, the rest in distribution


class Engine:
    """`python -m kubetune_engine` serving the taught base (adapters loaded later), one thread."""

    def __init__(self, base: Path, log_path: Path):
        self.port = free_port()
        command = [sys.executable, "-m", "kubetune_engine", str(base), "--port", str(self.port),
                   "--served-model-name", "cycle", "--max-lora-rank", "8"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"engine exited {self.process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the engine was not healthy within 180 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)


def train(root: Path, base: Path, fmt: str) -> tuple[dict, str]:
    """The real trainer (in process) on cycle_lm lines of `fmt`: the published manifest and its URI."""
    from kubetune_trainer import train as trainer

    data = root / f"{fmt}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in cycle_lm.rows(fmt, 320, seed=1)))
    spec = {"baseModel": {"uri": f"file://{base}"}, "task": "CausalLM",
            "dataset": {"uri": f"file://{data}", "format": fmt, "validationSplit": 0.25},
            "method": {"type": "LoRA", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0,
                                                "targetModules": ["q_proj", "v_proj"]}},
            "training": {"maxSteps": 10, "learningRate": 1e-3, "perDeviceBatchSize": 8, "maxSeqLength": 64,
                         "precision": "FP32", "gradientCheckpointing": False, "evalSteps": 10},
            "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
            "output": {"uri": f"file://{root / ('out-' + fmt)}"}}
    name = f"gendrift-{fmt}"
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"}, "spec": spec}
    result = validate(doc, local=True)
    if not result.ok:
        raise SystemExit(f"the bench's job does not validate: {result.errors}")
    config = jobconfig.job_config(NS, name, f"uid-{name}", result.defaulted["spec"])
    with cycle_lm.one_thread():
        manifest = trainer.run(config, work_dir=root / f"work-{fmt}")
    return manifest, storage_layout.manifest_uri(config.storage.job_prefix)


def teacher_forced(profile: dict) -> dict:
    """The profile as published before answers were scored: teacher-forced values, no decoding."""
    old = {k: v for k, v in profile.items() if k not in ("decoding", "teacherForced")}
    old["confidence"], old["entropy"] = profile["teacherForced"]["confidence"], profile["teacherForced"]["entropy"]
    return old


def ask(agent: Agent, alias: str, prompt: str, chat: bool, stream: bool) -> None:
    """A client's request through the agent, without logprobs (the agent asks the engine for them)."""
    body = cycle_lm.request_body(alias, prompt, chat=chat, max_tokens=answer_scores.REFERENCE_MAX_TOKENS,
                                 top_logprobs=0)
    body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
    raw = post(agent.url + (serving.ENGINE_CHAT if chat else serving.ENGINE_COMPLETIONS), {**body, "stream": stream})
    if b'"logprobs":{' in raw.replace(b" ", b"") or b'"logprobs":[' in raw.replace(b" ", b""):
        raise RuntimeError(f"the client got logprobs it did not ask for: {raw[:300]!r}")


def sampled(samples: Path) -> dict[bool, list[stats.Observation]]:
    """streamed? -> the observations of the sample records, in request order, parsed as the operator's
    drift pass parses them (`stats.observations`)."""
    found: dict[bool, list[stats.Observation]] = {False: [], True: []}
    for path in sorted(samples.rglob("*.jsonl")):  # <date>/<timestamp>-<sequence>.jsonl: in write order
        for line in path.read_text().splitlines():
            record = json.loads(line)
            found[bool(record["request"].get("stream"))].extend(stats.observations(record))
    return found


def serve(engine: Engine, root: Path, fmt: str, manifest: dict, manifest_uri: str,
          prompts: list[str]) -> dict[bool, list]:
    """The adapter behind an agent that samples every request; `prompts` sent plain, then streamed."""
    adapter = f"gendrift-{fmt.split('-')[0]}"
    name, alias = serving.version_name(NS, adapter, manifest["digest"]), serving.alias_name(NS, adapter)
    samples = root / f"samples-{fmt}"
    agent = Agent(engine, root / f"agent-{fmt}", "serve-0", sync_seconds=0.2)
    try:
        agent.wait_ready()
        version = serving.Version(name, manifest["digest"], manifest_uri, 100, "stable")
        agent.set_desired(serving.DesiredState(1, [serving.AliasState(alias, [version])], sampling_rate=1.0,
                                               sampling_uri=f"file://{samples}"))
        wait_until(lambda: name in ((agent.report() or {}).get("loaded") or []), 120, f"{name} loaded")
        for stream in (False, True):
            for prompt in prompts:
                ask(agent, alias, prompt, fmt == "chat", stream)
    finally:
        agent.stop()  # flushes the samples
    found = sampled(samples)
    for stream, observed in found.items():
        if [o.text for o in observed] != prompts:  # every answer scored (the EOS ends it), in order
            raise RuntimeError(f"stream={stream}: {len(observed)} sampled observations for {len(prompts)} requests")
    return found


def windows(settings: dict, seed: int) -> dict[str, list[list[str]]]:
    """`quiet` windows of fresh in-distribution prompts, then `shifted` windows per share of SHARES."""
    rng, m = random.Random(seed), settings["window"]

    def window(share: float) -> list[str]:
        shifted = round(share * m)
        return [cycle_lm.shifted(rng) for _ in range(shifted)] + [cycle_lm.pair(rng)[0] for _ in range(m - shifted)]

    found = {"quiet": [window(0.0) for _ in range(settings["quiet"])]}
    for share in SHARES:
        found[f"shifted{round(share * 100)}"] = [window(share) for _ in range(settings["shifted"])]
    return found


def judge(references: dict, calibrations: dict, cut: list[list], thresholds: stats.Thresholds) -> dict:
    """Per reference: the share of the windows `cut` drifted, and of each trigger fired."""
    rates = {}
    for key, reference in references.items():
        found = [stats.analyse(reference, calibrations[key], w, None, thresholds) for w in cut]
        rates[key] = {"windows": len(found), "drifted": sum(v["drifted"] for v in found) / len(found),
                      "confidence": sum(v["triggers"]["confidence"]["fired"] for v in found) / len(found),
                      "twoSample": sum(v["triggers"]["entropy"]["fired"] for v in found) / len(found)}
    return rates


def measure(engine: Engine, base: Path, root: Path, fmt: str, settings: dict) -> dict:
    manifest, manifest_uri = train(root, base, fmt)
    profile, thresholds = manifest["driftProfile"], stats.Thresholds()
    references = {"answers": stats.build_reference(profile, [], None),
                  "teacherForced": stats.build_reference(teacher_forced(profile), [], None)}
    calibrations = {k: stats.calibrate(r, settings["window"], thresholds) for k, r in references.items()}
    kinds = windows(settings, seed=11)
    prompts = [p for kind in kinds.values() for window in kind for p in window]
    plain, streamed = (observed for _, observed in sorted(serve(engine, root, fmt, manifest, manifest_uri,
                                                                prompts).items()))
    rates: dict = {"plain": {k: {} for k in references}, "streamed": {k: {} for k in references}}
    served: dict = {}
    start = 0
    for kind, prompts in kinds.items():
        count = sum(len(w) for w in prompts)
        for traffic, observed in (("plain", plain), ("streamed", streamed)):
            cut, at = [], start
            for window in prompts:
                cut.append(observed[at:at + len(window)])
                at += len(window)
            for key, found in judge(references, calibrations, cut, thresholds).items():
                rates[traffic][key][kind] = found
        scores = plain[start:start + count]
        served[kind] = {"confidence": sum(o.confidence for o in scores) / max(len(scores), 1),
                        "entropy": sum(o.entropy for o in scores) / max(len(scores), 1), "answers": len(scores)}
        start += count
    gap = max(max(abs(a.confidence - b.confidence), abs(a.entropy - b.entropy))
              for a, b in zip(plain, streamed, strict=True))
    means = {"answers": {"confidence": profile["confidence"]["mean"], "entropy": profile["entropy"]["mean"]},
             "teacherForced": {"confidence": profile["teacherForced"]["confidence"]["mean"]}}
    return {"format": fmt, "holdoutAnswers": profile["decoding"]["answered"], "reference": means,
            "served": served, "rates": rates, "streamedVsPlainMaxDifference": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="few windows (CI)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    settings = SMOKE if args.smoke else DEFAULTS
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gendrift-") as tmp:
        root = Path(tmp)
        base = cycle_lm.taught_llama(root / "base")
        engine = Engine(base, root / "engine.log")
        try:
            results = [measure(engine, base, root, fmt, settings) for fmt in settings["formats"]]
        finally:
            engine.stop()
    report = {"settings": settings, "shares": SHARES, "results": results,
              "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
