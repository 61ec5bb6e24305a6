"""Adapter rollout on N serving pods: kubetune's hot load (operator decision -> ConfigMap -> agents watching
it in the emulator -> engines) against a restart-the-engine rollout of the same adapter change, in one run.

    .venv/bin/python bench/adapter_rollout.py --json /tmp/rollout.json           # N=3, 5 runs of each, ~3.5 min
    .venv/bin/python bench/adapter_rollout.py --pods 30 --engine standin --restart-repeats 1 --json /tmp/r30.json
    .venv/bin/python bench/adapter_rollout.py --smoke --json /tmp/rollout.json   # N=2, 1 run of each, < 60 s
What is timed, the restart baselines and the fairness details: BENCHMARKS.md ("Adapter rollout")."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

from common import load_average, minilm_dir  # noqa: E402  (bench/, on sys.path)
from kubetune.api import jobconfig, serving, storage_layout  # noqa: E402
from kubetune.api.validation import validate  # noqa: E402
from kubetune.clients.storage import ObjectStore, S3Settings, check_published  # noqa: E402
from rollout_cluster import Cluster, ClusterAgent, ClusterOperator  # noqa: E402  (bench/, on sys.path)
from rollout_pods import (  # noqa: E402  (bench/, on sys.path)
    ALIAS,
    FIXED_NAME,
    NS,
    PROBE,
    ROLLOUT_TIMEOUT,
    AdapterVersion,
    Agent,
    Engine,
    Trickle,
    http,
    wait_serving,
    wait_until,
)

EXAMPLE_JOB = REPO_ROOT / "examples" / "finetunejob-local-intents.yaml"
INTENTS = REPO_ROOT / "examples" / "data" / "intents"

DEFAULTS = {"pods": 3, "repeats": 5}
SMOKE = {"pods": 2, "repeats": 1}
TRAIN_STEPS = {"a": 8, "b": 4}  # two real versions over the same 12 intents (one head size), seconds each


# --- adapters ----------------------------------------------------------------------------------------------

def _train(root: Path, label: str, steps: int) -> str:
    """Train one adapter with the real trainer (`python -m kubetune_trainer`, its log in a file); its
    manifest URI."""
    import yaml

    doc = yaml.safe_load(EXAMPLE_JOB.read_text())
    spec = doc["spec"]
    spec["baseModel"]["uri"] = f"file://{minilm_dir()}"
    spec["dataset"].update(uri=f"file://{INTENTS / 'train.jsonl'}",
                           validationUri=f"file://{INTENTS / 'validation.jsonl'}")
    spec["output"]["uri"] = f"file://{root / 'store'}"
    training = {k: v for k, v in spec["training"].items() if k not in ("epochs", "earlyStopping")}
    spec["training"] = {**training, "maxSteps": steps, "evalSteps": steps}
    name = f"bench-rollout-{label}"
    doc["metadata"] = {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1}
    result = validate(doc, local=True)
    if not result.ok:
        raise SystemExit(f"the bench's job does not validate: {result.errors}")
    config = jobconfig.job_config(NS, name, f"uid-{name}", result.defaulted["spec"])
    config_path = root / f"config-{label}.json"
    config_path.write_text(config.to_json())
    with open(root / f"train-{label}.log", "wb") as log:
        code = subprocess.call([sys.executable, "-m", "kubetune_trainer", "--config", str(config_path),
                                "--work-dir", str(root / f"work-{label}")], stdout=log, stderr=subprocess.STDOUT,
                               cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if code != 0:
        raise SystemExit(f"training {label} failed ({code}): see {root / f'train-{label}.log'}")
    return config.storage.manifest_uri


def adapters(root: Path) -> tuple[list[AdapterVersion], float]:
    """The two versions, trained now or reused from `root/adapters.json`; and the seconds spent training."""
    index = root / "adapters.json"
    started = time.monotonic()
    uris = json.loads(index.read_text()) if index.is_file() else {}
    versions = []
    for label, steps in TRAIN_STEPS.items():
        uri = uris.get(label)
        check = check_published(ObjectStore(S3Settings()), uri.rsplit("/", 1)[0] + "/") if uri else None
        if check is None or not check.found or check.problems:
            uri = uris[label] = _train(root, label, steps)
            check = check_published(ObjectStore(S3Settings()), uri.rsplit("/", 1)[0] + "/")
            assert check.found and not check.problems, check
        prefix = storage_layout.adapter_prefix(uri.rsplit("/", 1)[0] + "/", check.document["digest"])
        versions.append(AdapterVersion(label, uri, check.document["digest"], Path(storage_layout.split_uri(prefix)[2])))
    index.write_text(json.dumps(uris, indent=2))
    assert versions[0].digest != versions[1].digest
    return versions, time.monotonic() - started


# --- the two rollouts ---------------------------------------------------------------------------------------


def reference_restart(versions: list[AdapterVersion], log_dir: Path) -> dict:
    """One real engine restarted alone (nothing else running): cold start to /health, the first adapter
    load, the first answer, then a second adapter's load into the running engine (a hot load's engine
    part). A rolling restart of N pods cannot beat N times the first three; the stand-in charges them."""
    standin, Engine.standin = Engine.standin, None
    try:
        t0 = time.monotonic()
        engine = Engine(log_dir, "reference").spawn().wait_ready()
    finally:
        Engine.standin = standin
    ready = time.monotonic()
    engine.load(FIXED_NAME, versions[1].path)
    loaded = time.monotonic()
    status, _, text = http("POST", engine.url + serving.ENGINE_CLASSIFY, {"model": FIXED_NAME, "input": PROBE})
    done = time.monotonic()
    engine.load("second", versions[0].path)
    reloaded = time.monotonic()
    engine.stop()
    if status != 200:
        raise RuntimeError(f"reference engine: {status} {text}")
    return {"start_s": round(ready - t0, 3), "load_s": round(loaded - ready, 3),
            "first_answer_s": round(done - loaded, 3), "total_s": round(done - t0, 3),
            "hot_load_s": round(reloaded - done, 3)}


def hot_runs(engines: list[Engine], versions: list[AdapterVersion], runs: int, args, work: Path) -> list[dict]:
    # Agents started together would tick in phase (all read the new desired state at one moment); pods of a
    # Deployment start at unrelated moments. Each agent starts at a random offset within one sync period.
    rng = random.Random(5)
    offsets = sorted(rng.uniform(0, args.sync_seconds) for _ in engines)
    agents, began = [], time.monotonic()
    cluster = Cluster(work).start()
    try:
        for i, (engine, offset) in enumerate(zip(engines, offsets, strict=True)):
            time.sleep(max(0.0, began + offset - time.monotonic()))
            agents.append(ClusterAgent(cluster, engine, work / f"agent-{i}", f"pod-{i}", args.sync_seconds))
        for agent in agents:
            agent.wait_ready()
        base_model = check_published(ObjectStore(S3Settings()),
                                     versions[0].manifest_uri.rsplit("/", 1)[0] + "/").document["baseModel"]
        operator = ClusterOperator(cluster, agents, versions[0], base_model)
        operator.reconcile()
        wait_until(lambda: all((a.report() or {}).get("loaded") == {versions[0].name: versions[0].digest}
                               for a in agents), ROLLOUT_TIMEOUT, "every pod loading the first version")
        wait_until(lambda: operator.reconcile() and operator.status.get("phase") == "Ready", 30, "Ready")
        trickles = [Trickle(lambda a=a: (a.url, ALIAS, None), args.trickle_interval).start() for a in agents]
        results = []
        try:
            time.sleep(1.0)
            for run in range(runs):
                old, new = versions[run % 2], versions[(run + 1) % 2]
                time.sleep(rng.uniform(0.5, 0.5 + args.sync_seconds))  # t0 at a random phase of the ticks
                wall0, t0 = time.time(), time.monotonic()
                operator.set_source(new)
                plan = operator.reconcile()
                decided = time.monotonic() - t0
                assert plan.desired is not None and operator.status["adapters"][0]["canary"]["digest"] == new.digest
                generation = plan.desired.generation
                per_pod = wait_serving(trickles, new.name, t0)
                wait_until(lambda n=new: operator.reconcile() and operator.stable_digest() == n.digest,
                           ROLLOUT_TIMEOUT, "promotion")
                promoted = time.monotonic() - t0
                # settled: the old version unloaded everywhere (grace 0) before the next run
                wait_until(lambda n=new: all((a.report() or {}).get("loaded") == {n.name: n.digest} for a in agents),
                           ROLLOUT_TIMEOUT, "the old version unloaded")
                end = time.monotonic()
                failed = [t.failed(t0, end) for t in trickles]
                results.append({
                    "run": run + 1, "from": old.label, "to": new.label, "all_serving_s": max(per_pod),
                    "per_pod_s": per_pod, "decide_and_write_s": round(decided, 4), "promoted_s": round(promoted, 3),
                    "agents": [_agent_phases(a, wall0, generation, new.name) for a in agents],
                    "requests": sum(n for _, n in failed), "failed_requests": sum(f for f, _ in failed)})
                print(f"  hot run {run + 1}: {old.label}->{new.label} all pods serving in {max(per_pod):.2f} s "
                      f"(per pod {per_pod}), promoted at {promoted:.2f} s, failed requests "
                      f"{results[-1]['failed_requests']}/{results[-1]['requests']}", flush=True)
        finally:
            for trickle in trickles:
                trickle.halt()
        return results
    finally:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(Agent.stop, agents))
        cluster.stop()


def _agent_phases(agent: Agent, wall0: float, generation: int, version: str) -> dict:
    """From the agent's log: when it read the new desired state and when the engine had the version loaded."""
    read = loaded = None
    for moment, line in agent.log_times():
        if moment < wall0 - 0.01:
            continue
        if read is None and line.get("message") == "desired state" and line.get("generation") == generation:
            read = round(moment - wall0, 3)
        if loaded is None and line.get("message") == "adapter loaded" and line.get("version") == version:
            loaded = round(moment - wall0, 3)
    return {"pod": agent.pod, "read_desired_s": read, "loaded_s": loaded}


@dataclass(eq=False)
class Pod:
    engine: Engine | None  # where the pod's endpoint points (None: no endpoint)


def _rolling(pods: list[Pod], new: AdapterVersion, log_dir: Path, tag: str, t0: float,
             stopping: list, surge: int = 1) -> list[dict]:
    """maxSurge `surge`, maxUnavailable 0: per batch of `surge` pods, new engines next to the old ones; once
    one is ready with the new version loaded, its pod's endpoint switches to it and the old one gets
    SIGTERM. The next batch does not wait for the old processes to exit (terminating pods do not count
    against a Deployment's surge)."""

    def replace(index: int) -> dict:
        pod, began = pods[index], time.monotonic()
        fresh = Engine(log_dir, f"pod{index}-{tag}").spawn().wait_ready()
        ready = time.monotonic()
        fresh.load(FIXED_NAME, new.path)
        fresh.version = new.name
        previous, pod.engine = pod.engine, fresh
        switched = time.monotonic()
        stopping.append(threading.Thread(target=previous.stop, daemon=True))
        stopping[-1].start()
        return {"pod": index, "start_s": round(ready - began, 3), "load_s": round(switched - ready, 3),
                "switched_s": round(switched - t0, 3)}

    phases = []
    with concurrent.futures.ThreadPoolExecutor(surge) as pool:
        for first in range(0, len(pods), surge):
            phases += list(pool.map(replace, range(first, min(first + surge, len(pods)))))
    return phases


def _recreate(pods: list[Pod], new: AdapterVersion, log_dir: Path, tag: str, t0: float) -> list[dict]:
    """Strategy Recreate: every engine stopped (SIGTERM, waited for), then every new one started at once."""
    previous = [pod.engine for pod in pods]
    for pod in pods:
        pod.engine = None
    with concurrent.futures.ThreadPoolExecutor(len(pods)) as pool:
        list(pool.map(Engine.stop, previous))
    stopped = time.monotonic()
    fresh = [Engine(log_dir, f"pod{i}-{tag}").spawn() for i in range(len(pods))]

    def bring_up(index: int) -> dict:
        engine = fresh[index].wait_ready()
        ready = time.monotonic()
        engine.load(FIXED_NAME, new.path)
        engine.version = new.name
        pods[index].engine = engine
        return {"pod": index, "stop_s": round(stopped - t0, 3), "start_s": round(ready - stopped, 3),
                "load_s": round(time.monotonic() - ready, 3)}

    with concurrent.futures.ThreadPoolExecutor(len(pods)) as pool:
        return list(pool.map(bring_up, range(len(pods))))


def restart_runs(engines: list[Engine], versions: list[AdapterVersion], runs: int, strategy: str, args,
                 log_dir: Path) -> tuple[list[dict], list[Engine]]:
    """The restart baseline; returns its results and the engines left running."""
    pods = [Pod(e) for e in engines]
    current = versions[0]
    for pod in pods:  # every pod serves version A under the fixed name, loaded at its (earlier) start
        pod.engine.unload_all()
        pod.engine.load(FIXED_NAME, current.path)
        pod.engine.version = current.name

    def target(pod: Pod):
        engine = pod.engine
        return None if engine is None else (engine.url, FIXED_NAME, engine.version)

    trickles = [Trickle(lambda p=pod: target(p), args.trickle_interval).start() for pod in pods]
    results, stopping = [], []
    try:
        time.sleep(1.0)
        for run in range(runs):
            old, new = versions[run % 2], versions[(run + 1) % 2]
            time.sleep(0.5)
            t0 = time.monotonic()
            tag = f"run{run + 1}"
            if strategy == "rolling":
                phases = _rolling(pods, new, log_dir, tag, t0, stopping, args.max_surge)
            else:
                phases = _recreate(pods, new, log_dir, tag, t0)
            per_pod = wait_serving(trickles, new.name, t0)
            end = time.monotonic()
            failed = [t.failed(t0, end) for t in trickles]
            results.append({"run": run + 1, "from": old.label, "to": new.label, "all_serving_s": max(per_pod),
                            "per_pod_s": per_pod, "phases": sorted(phases, key=lambda p: p["pod"]),
                            "requests": sum(n for _, n in failed),
                            "failed_requests": sum(f for f, _ in failed)})
            print(f"  restart ({strategy}) run {run + 1}: {old.label}->{new.label} all pods serving in "
                  f"{max(per_pod):.2f} s (per pod {per_pod}), failed requests "
                  f"{results[-1]['failed_requests']}/{results[-1]['requests']}", flush=True)
    finally:
        for trickle in trickles:
            trickle.halt()
        for thread in stopping:
            thread.join(60)
    return results, [pod.engine for pod in pods if pod.engine is not None]


# --- main ---------------------------------------------------------------------------------------------------


def summary(runs: list[dict]) -> dict:
    values = [r["all_serving_s"] for r in runs]
    return {"median_all_serving_s": round(statistics.median(values), 3), "min_s": min(values), "max_s": max(values),
            "failed_requests": sum(r["failed_requests"] for r in runs), "requests": sum(r["requests"] for r in runs)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=None, help=f"engine(+agent) pairs (default {DEFAULTS['pods']})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"rollouts of each kind (default {DEFAULTS['repeats']})")
    parser.add_argument("--smoke", action="store_true", help=f"CI-sized: {SMOKE}, rolling restarts only")
    parser.add_argument("--restart", choices=("rolling", "recreate", "both", "none"), default=None,
                        help="restart baseline strategies (default both; --smoke: rolling; none: the hot path only)")
    parser.add_argument("--restart-repeats", type=int, default=None,
                        help="rollouts of each restart baseline (default: --repeats; a rolling restart of 30 pods "
                             "takes minutes)")
    parser.add_argument("--max-surge", type=int, default=1,
                        help="the rolling baseline's maxSurge (maxUnavailable 0); a Deployment's default is 25%%")
    parser.add_argument("--engine", choices=("real", "standin"), default="real",
                        help="real: kubetune_engine on MiniLM; standin: kubetune_testing.lora_standin, charging the "
                             "real engine's start and load seconds measured in the same run")
    parser.add_argument("--sync-seconds", type=float, default=2.0,
                        help="the agents' sync period (shipped default 2): the engine check; changes come by watch")
    parser.add_argument("--engine-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each engine process (N+1 engines share this machine's cores)")
    parser.add_argument("--trickle-interval", type=float, default=0.1,
                        help="each pod's client sleeps this long between requests")
    parser.add_argument("--adapters", type=Path, default=None,
                        help="keep the two trained adapters here and reuse them on the next run")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the processes' logs, desired and report files here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


def measure(args, pods: int, repeats: int, strategies: list[str]) -> dict:
    """Train (or reuse) the two versions, start the engines, and run the hot and restart rollouts."""
    with tempfile.TemporaryDirectory(prefix="kubetune-rollout-") as tmp:
        work = Path(tmp)
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        adapter_root = args.adapters or work / "adapters"
        adapter_root.mkdir(parents=True, exist_ok=True)
        versions, train_seconds = adapters(adapter_root)
        print(f"adapters ready in {train_seconds:.1f} s: {versions[0].name} (a), {versions[1].name} (b)", flush=True)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        wanted = args.engine == "standin" or not (args.smoke or not strategies)
        reference = reference_restart(versions, logs) if wanted else None
        if reference:
            print(f"one real engine alone: start {reference['start_s']} s, first load {reference['load_s']} s, "
                  f"first answer {reference['first_answer_s']} s, a second load {reference['hot_load_s']} s",
                  flush=True)
        if args.engine == "standin":
            Engine.standin = {"start": reference["start_s"], "first_load": reference["load_s"],
                              "load": reference["hot_load_s"]}
        t = time.monotonic()
        engines = [Engine(logs, f"pod{i}").spawn() for i in range(pods)]
        try:
            for engine in engines:
                engine.wait_ready()
            engine_start = time.monotonic() - t
            print(f"{pods} engines started at once in {engine_start:.1f} s", flush=True)
            hot = hot_runs(engines, versions, repeats, args, work)
            restart = {}
            for strategy in strategies:
                restart[strategy], engines = restart_runs(engines, versions, args.restart_repeats or repeats,
                                                          strategy, args, logs)
        finally:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(Engine.stop, Engine.spawned))
    return {"versions": versions, "train_seconds": train_seconds, "reference": reference,
            "engine_start": engine_start, "hot": hot, "restart": restart}


def print_table(results: dict, pods: int, ratios: dict, restart: dict) -> None:
    print()
    print(f"| rollout | runs | all {pods} pods serving the new version, median s (min-max) | failed requests |")
    print("|---|---|---|---|")
    rows = [("kubetune hot load (agent)", "hot")] + [(f"engine restart, {s}", f"restart_{s}") for s in restart]
    for title, key in rows:
        r = results[key]
        print(f"| {title} | {len(r['runs'])} | {r['median_all_serving_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) "
              f"| {r['failed_requests']} of {r['requests']} |")
    for strategy, ratio in ratios.items():
        print(f"ratio restart ({strategy}) / hot: {ratio}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else DEFAULTS
    Engine.threads = args.engine_threads
    pods = args.pods or sizes["pods"]
    repeats = args.repeats or sizes["repeats"]
    strategies = {"rolling": ["rolling"], "recreate": ["recreate"], "both": ["rolling", "recreate"], "none": []}[
        args.restart or ("rolling" if args.smoke else "both")]
    # this process runs the operator's decision, the emulator, its TLS front and every pod's client in
    # threads: a shorter GIL switch interval keeps the busy client loop from delaying the others by 5 ms
    # at each hand-over (at 30 pods the decision took 1-2 s with the default)
    sys.setswitchinterval(0.0005)
    load_before = load_average()
    print(f"adapter rollout bench: {pods} pods, {repeats} run(s) each, sync {args.sync_seconds} s, "
          f"{os.cpu_count()} CPUs, load average {load_before}", flush=True)
    started = time.monotonic()
    measured = measure(args, pods, repeats, strategies)
    hot, restart, versions = measured["hot"], measured["restart"], measured["versions"]
    load_after = load_average()
    results = {"hot": {"runs": hot, **summary(hot)}}
    for strategy, runs in restart.items():
        results[f"restart_{strategy}"] = {"runs": runs, **summary(runs)}
    hot_median = results["hot"]["median_all_serving_s"]
    ratios = {strategy: round(results[f"restart_{strategy}"]["median_all_serving_s"] / hot_median, 2)
              for strategy in restart}
    report = {"settings": {"pods": pods, "repeats": repeats, "restart_repeats": args.restart_repeats or repeats,
                           "max_surge": args.max_surge,
                           "engine": args.engine, "standin_costs": Engine.standin, "sync_seconds": args.sync_seconds,
                           "trickle_interval": args.trickle_interval,
                           "engine_threads": args.engine_threads, "smoke": args.smoke, "strategies": strategies,
                           "train_steps": TRAIN_STEPS},
              "machine": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after},
              "adapters": {v.label: {"version": v.name, "digest": v.digest} for v in versions},
              "train_seconds": round(measured["train_seconds"], 1),
              "engine_start_seconds": round(measured["engine_start"], 2),
              "reference_restart_one_engine": measured["reference"],
              "results": results, "ratio": ratios, "wall_seconds": round(time.monotonic() - started, 1)}
    print_table(results, pods, ratios, restart)
    print(f"load average before {load_before}, after {load_after}; wall {report['wall_seconds']} s")
    if max(load_before, load_after) > 1.5 * (os.cpu_count() or 1):
        print("warning: the machine was busy (load average above 1.5 x CPUs): timings are inflated", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
