"""The Argo CD health checks (charts/kubetune/argocd/*.lua), run in Lua, the chart option shipping them, and the
example Argo CD Applications (examples/argocd/).

The scripts run in Lua 5.1, the language of Argo CD's gopher-lua, and in Lua 5.4 (lupa's default), on objects
converted the way Argo CD hands them over: JSON numbers become Lua numbers (floats), arrays 1-based tables.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.unit.test_chart import CHART, KUBE_VERSION, RELEASE, RELEASE_NS, find_helm, k8s_errors

lupa = pytest.importorskip("lupa")

SCRIPTS = {kind: (CHART / "argocd" / f"health-{kind.lower()}.lua").read_text()
           for kind in ("FineTuneJob", "AdapterDeployment")}
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
LUA_VERSIONS = [v for v in ("lua51", "lua54") if importlib.util.find_spec(f"lupa.{v}") is not None]
DIGEST = "sha256:" + "ab" * 32


def to_lua(runtime, value):
    """A Python value as Argo CD presents the object's JSON to Lua (numbers are float64)."""
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@pytest.fixture(params=LUA_VERSIONS)
def health(request):
    module = importlib.import_module(f"lupa.{request.param}")

    def run(kind: str, obj: dict) -> tuple[str, str]:
        runtime = module.LuaRuntime(unpack_returned_tuples=True)
        runtime.globals().obj = to_lua(runtime, obj)
        result = runtime.execute(SCRIPTS[kind])
        out = dict(result.items())
        assert set(out) <= {"status", "message"}, out
        assert out["status"] in STATUSES, out
        assert isinstance(out.get("message"), str) and out["message"], out
        return out["status"], out["message"]

    return run


def condition(kind: str, status: bool, reason: str = "R", message: str = "m") -> dict:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3}


# --- FineTuneJob ---------------------------------------------------------------------------------


def job(status: dict | None = None, generation: int = 3, suspend: bool | None = None) -> dict:
    obj = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "j", "namespace": "team-a", "generation": generation},
           "spec": {"task": "CausalLM"}}
    if suspend is not None:
        obj["spec"]["runPolicy"] = {"suspend": suspend}
    if status is not None:
        obj["status"] = {"observedGeneration": 3, **status}
    return obj


FINETUNEJOB_CASES = {
    "no status": (job(), "Progressing", ["waiting", "operator"]),
    "empty status": ({**job(), "status": {}}, "Progressing", ["waiting"]),
    "stale": (job({"phase": "Succeeded", "adapter": {"digest": DIGEST}}, generation=4), "Progressing",
              ["waiting", "generation 4", "observed 3"]),
    "no observedGeneration": ({**job(), "status": {"phase": "Running"}}, "Progressing", ["observed none"]),
    "pending": (job({"phase": "Pending"}), "Progressing", ["pending"]),
    "baseline": (job({"phase": "Baseline", "baseline": {"state": "Running", "source": "BaselineJob"}}),
                 "Progressing", ["baseline evaluation running"]),
    "sweeping": (job({"phase": "Sweeping", "sweep": {"summary": "4 configs, 2 halved, 1 running", "state": "Running"}}),
                 "Progressing", ["sweeping", "4 configs, 2 halved, 1 running"]),
    "sweeping without summary": (job({"phase": "Sweeping", "sweep": {"state": "Pending"}}), "Progressing",
                                 ["rank sweep Pending"]),
    "running with progress": (job({"phase": "Running", "progress": {"percent": 42, "step": 420, "totalSteps": 1000,
                                                                    "stage": "training", "evalLoss": 1.23456}}),
                              "Progressing", ["running", "42%", "step 420/1000", "training", "eval loss 1.235"]),
    "running without progress": (job({"phase": "Running"}), "Progressing", ["running"]),
    "publishing": (job({"phase": "Publishing", "progress": {"percent": 100, "stage": "publishing"}}), "Progressing",
                   ["publishing", "100%"]),
    "succeeded": (job({"phase": "Succeeded", "adapter": {"digest": DIGEST, "metrics": {"eval_loss": 0.8125,
                                                                                       "accuracy": 0.9}}}),
                  "Healthy", [DIGEST, "eval_loss 0.8125", "accuracy 0.9"]),
    "succeeded without adapter": (job({"phase": "Succeeded"}), "Healthy", ["succeeded"]),
    "skipped": (job({"phase": "Skipped", "baseline": {"summary": "accuracy 0.93 >= 0.90", "met": True}}), "Healthy",
                ["meets the target", "accuracy 0.93 >= 0.90", "skipped"]),
    "failed": (job({"phase": "Failed", "failure": {"reason": "TrainingFailed", "message": "master exited 1"}}),
               "Degraded", ["trainingfailed: master exited 1"]),
    "failed from condition": (job({"phase": "Failed", "conditions": [condition("Failed", True, "JobLost", "gone")]}),
                              "Degraded", ["joblost: gone"]),
    "failed without detail": (job({"phase": "Failed"}), "Degraded", ["failed"]),
    "queued by kueue": (job({"phase": "Queued", "conditions": [condition("Queued", True, "Pending", "no quota")]}),
                        "Progressing", ["queued", "pending: no quota"]),
    "suspended phase": (job({"phase": "Suspended"}, suspend=True), "Suspended", ["suspend"]),
    "suspend in spec": (job({"phase": "Running"}, suspend=True), "Suspended", ["running"]),
    "suspend false": (job({"phase": "Running"}, suspend=False), "Progressing", ["running"]),
    "finished beats suspend": (job({"phase": "Succeeded", "adapter": {"digest": DIGEST}}, suspend=True), "Healthy",
                               [DIGEST]),
    "unknown phase": (job({"phase": "Exploded"}), "Unknown", ["exploded"]),
    "no metadata": ({"kind": "FineTuneJob", "status": {"phase": "Running", "progress": {}}}, "Progressing",
                    ["running"]),
}


@pytest.mark.parametrize("case", list(FINETUNEJOB_CASES))
def test_finetunejob_health(health, case):
    obj, expected, words = FINETUNEJOB_CASES[case]
    status, message = health("FineTuneJob", copy.deepcopy(obj))
    assert status == expected, (case, message)
    for word in words:
        assert word.lower() in message.lower(), (case, message)


def test_finetunejob_every_phase_is_handled(health):
    from kubetune.api.v1alpha1.finetunejob_status import FINETUNEJOB_PHASES

    for phase in FINETUNEJOB_PHASES:
        status, _ = health("FineTuneJob", job({"phase": phase}))
        assert status != "Unknown", phase


# --- AdapterDeployment ---------------------------------------------------------------------------


def deployment(status: dict | None = None, generation: int = 3) -> dict:
    obj = {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
           "metadata": {"name": "d", "namespace": "team-a", "generation": generation},
           "spec": {"adapters": [{"name": "intents"}]}}
    if status is not None:
        obj["status"] = {"observedGeneration": 3, **status}
    return obj


STABLE = {"version": "team-a/intents@abababababab", "digest": DIGEST, "podsLoaded": 2}
CANARY = {"version": "team-a/intents@cdcdcdcdcdcd", "digest": "sha256:" + "cd" * 32, "podsLoaded": 2}


def conds(validated=True, progressing=False, ready=True, degraded=False, *, validated_why=("PreflightPassed", "ok"),
          progressing_why=("Stable", "stable"), degraded_why=("Healthy", "no rollback"),
          ready_why=("AllPodsServing", "every pod serves every alias")) -> list[dict]:
    return [condition("Validated", validated, *validated_why), condition("Progressing", progressing, *progressing_why),
            condition("Degraded", degraded, *degraded_why), condition("Ready", ready, *ready_why)]


ADAPTERDEPLOYMENT_CASES = {
    "no status": (deployment(), "Progressing", ["waiting", "operator"]),
    "stale": (deployment({"phase": "Ready", "conditions": conds()}, generation=5), "Progressing",
              ["waiting", "generation 5"]),
    "pending": (deployment({"phase": "Pending",
                            "conditions": conds(ready=False, ready_why=("NotReady", "no serving pods yet")),
                            "adapters": [{"name": "intents", "alias": "team-a/intents"}]}),
                "Progressing", ["no serving pods yet"]),
    "pending without conditions": (deployment({"phase": "Pending"}), "Progressing", ["pending"]),
    "progressing canary": (
        deployment({"phase": "Progressing",
                    "conditions": conds(progressing=True, progressing_why=("RollingOut", "rolling out: intents")),
                    "adapters": [{"name": "intents", "alias": "team-a/intents", "stable": STABLE, "canary": CANARY,
                                  "canaryWeight": 20, "stepIndex": 1}]}),
        "Progressing", ["rollingout: rolling out: intents", "team-a/intents: canary team-a/intents@cdcdcdcdcdcd",
                        "at 20%", "step 1"]),
    "retraining while rolling out": (
        deployment({"phase": "Progressing", "conditions": conds(progressing=True),
                    "adapters": [{"name": "intents", "stable": STABLE,
                                  "drift": {"state": "Retraining", "retrain": {"job": "intents-retrain-1"}}}]}),
        "Progressing", ["intents: drift retraining (finetunejob intents-retrain-1)"]),
    "retraining while serving": (
        deployment({"phase": "Ready", "conditions": conds(),
                    "adapters": [{"name": "intents", "alias": "team-a/intents", "stable": STABLE,
                                  "drift": {"state": "Retraining", "retrain": {"job": "intents-retrain-1"}}}]}),
        "Healthy", ["serving 1 adapter", "drift retraining", "intents-retrain-1"]),
    "ready": (deployment({"phase": "Ready", "conditions": conds(),
                          "adapters": [{"name": "intents", "stable": STABLE, "drift": {"state": "Watching"}},
                                       {"name": "faq", "stable": STABLE}]}),
              "Healthy", ["serving 2 adapters"]),
    "ready but progressing": (deployment({"phase": "Progressing", "conditions": conds(progressing=True)}),
                              "Progressing", []),
    "degraded": (deployment({"phase": "Degraded",
                             "conditions": conds(degraded=True, degraded_why=("AnalysisFailed", "error rate +5%"))}),
                 "Degraded", ["analysisfailed: error rate +5%"]),
    "degraded beats ready": (deployment({"conditions": conds(degraded=True, degraded_why=("AgentErrors", "pod p"))}),
                             "Degraded", ["agenterrors: pod p"]),
    "refused for good": (deployment({"conditions": conds(validated=False,
                                                         validated_why=("DigestMismatch", "digest differs"))}),
                         "Degraded", ["digestmismatch: digest differs"]),
    "waiting for the source": (
        deployment({"conditions": conds(validated=False, ready=False,
                                        validated_why=("FineTuneJobNotReady", "FineTuneJob j has no adapter yet"))}),
        "Progressing", ["waiting for the adapter source", "finetunejobnotready"]),
    "waiting for a new source while serving": (
        deployment({"conditions": conds(validated=False, validated_why=("ManifestMissing", "no manifest"))}),
        "Progressing", ["manifestmissing: no manifest"]),
    "odd shapes": (deployment({"conditions": [{"type": "Ready"}], "adapters": [{}, {"drift": {}}]}),
                   "Progressing", []),
}


@pytest.mark.parametrize("case", list(ADAPTERDEPLOYMENT_CASES))
def test_adapterdeployment_health(health, case):
    obj, expected, words = ADAPTERDEPLOYMENT_CASES[case]
    status, message = health("AdapterDeployment", copy.deepcopy(obj))
    assert status == expected, (case, message)
    for word in words:
        assert word.lower() in message.lower(), (case, message)


# --- the chart option ----------------------------------------------------------------------------


def helm_template(*args: str) -> list[dict]:
    proc = subprocess.run([find_helm(), "template", RELEASE, str(CHART), "--namespace", RELEASE_NS,
                           "--kube-version", KUBE_VERSION, *args], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def test_chart_renders_the_health_checks_configmap_when_enabled():
    docs = helm_template("--set", "argocd.healthChecks.configMap=true")
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(configmaps) == 1
    cm = configmaps[0]
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["metadata"]["namespace"] == "argocd"
    assert cm["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"
    assert cm["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert cm["data"] == {f"resource.customizations.health.kubetune.io_{kind}": script
                          for kind, script in SCRIPTS.items()}
    assert k8s_errors(cm) == []
    custom = helm_template("--set", "argocd.healthChecks.configMap=true", "--set", "argocd.healthChecks.name=cm-extra",
                           "--set", "argocd.healthChecks.namespace=gitops")
    cm = next(d for d in custom if d["kind"] == "ConfigMap")
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("cm-extra", "gitops")


def test_chart_renders_nothing_extra_when_disabled():
    default = helm_template()
    explicit = helm_template("--set", "argocd.healthChecks.configMap=false")
    assert default == explicit
    assert not [d for d in default if d["kind"] == "ConfigMap"]
    assert not any(d["metadata"].get("namespace") == "argocd" for d in default)


def test_chart_rejects_bad_health_check_values():
    for bad in (["--set", "argocd.healthChecks.configMap=maybe"], ["--set", "argocd.healthChecks.bogus=1"],
                ["--set", "argocd.healthChecks.namespace=Argo_CD"]):
        proc = subprocess.run([find_helm(), "template", RELEASE, str(CHART), *bad], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode != 0 and "schema" in proc.stderr, (bad, proc.stderr)


# --- the example Applications --------------------------------------------------------------------

ARGOCD_EXAMPLES = REPO_ROOT / "examples" / "argocd"


def test_operator_application_installs_the_chart_first():
    app = yaml.safe_load((ARGOCD_EXAMPLES / "kubetune-operator.yaml").read_text())
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert app["metadata"]["namespace"] == "argocd"
    assert app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1"
    assert app["spec"]["source"]["path"] == "charts/kubetune"
    assert "helm" in app["spec"]["source"]
    assert app["spec"]["destination"]["namespace"] == "kubetune-system"
    assert "CreateNamespace=true" in app["spec"]["syncPolicy"]["syncOptions"]


def test_jobs_application_never_prunes_finetunejobs():
    app = yaml.safe_load((ARGOCD_EXAMPLES / "team-a-jobs.yaml").read_text())
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert app["metadata"]["namespace"] == "argocd"
    assert app["spec"]["destination"]["namespace"] == "team-a"
    patches = app["spec"]["source"]["kustomize"]["patches"]
    [patch] = [p for p in patches if p["target"] == {"group": "kubetune.io", "kind": "FineTuneJob"}]
    body = yaml.safe_load(patch["patch"])
    assert body["kind"] == "FineTuneJob"
    assert body["metadata"]["annotations"]["argocd.argoproj.io/sync-options"] == "Prune=false"


def test_argocd_examples_are_not_taken_for_kubetune_examples():
    from tests.unit.test_cli import EXAMPLES

    assert sorted(p.name for p in ARGOCD_EXAMPLES.glob("*.yaml")) == ["kubetune-operator.yaml", "team-a-jobs.yaml"]
    assert not [p for p in EXAMPLES if ARGOCD_EXAMPLES in p.parents]
