"""Missing Secrets and keys the pods reference: found before any pod waits on them (reconcile.secrets),
and how the FineTuneJob state machine reports them."""

from __future__ import annotations

import copy

from kubetune_operator.backends import pytorchjob as pytorchjob_backend
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile import secrets
from kubetune_operator.render import training as render
from kubetune_testing.factories import data_validated, finetunejob

NOW = "2026-11-29T12:00:00Z"
S3_KEYS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})


def step(job, found, pytorchjob=None, stage_jobs=None):
    workload = pytorchjob_backend.read_status(pytorchjob) if pytorchjob is not None else None
    plan = ftj.decide(ftj.Observed(job=job, now=NOW, workload=workload, secrets=found,
                                   stage_jobs=stage_jobs or {}), ftj.Settings())
    after = copy.deepcopy(job)
    after["status"] = plan.status
    return plan, after


def condition(job):
    return cond.find(job["status"].get("conditions"), secrets.CONDITION)


def test_refs_are_read_from_the_rendered_pod_environment():
    job = finetunejob(baseModel={"uri": "hf://meta-llama/Llama-3.2-1B", "credentials": {"secretName": "hf"}},
                      tracking={"mlflow": {"trackingUri": "http://mlflow:5000", "credentials": {"secretName": "ml"}}})
    from kubetune.api.validation import validate

    refs = secrets.secret_refs(render.trainer_env(validate(job).defaulted["spec"]))
    assert [(r.secret, r.key, r.env) for r in refs] == [
        ("s3-creds", "AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        ("s3-creds", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"), ("hf", "token", "HF_TOKEN"),
        ("ml", "token", "MLFLOW_TRACKING_TOKEN")]
    assert secrets.named_secrets(job["spec"]) == ["hf", "s3-creds", "ml"]
    assert secrets.secret_refs([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k",
                                                                            "optional": True}}}]) == []


def test_problem_names_the_secret_the_key_and_the_variable():
    refs = [secrets.SecretRef("s3", "AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
            secrets.SecretRef("s3", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
            secrets.SecretRef("hf", "token", "HF_TOKEN")]
    assert secrets.problem(refs, {"s3": S3_KEYS, "hf": frozenset({"token"})}, "team-a") is None
    assert secrets.problem(refs, {}, "team-a") is None  # not looked at (kubetune local)
    missing = secrets.problem(refs, {"s3": None, "hf": frozenset()}, "team-a")
    assert missing.reason == secrets.SECRET_NOT_FOUND
    assert missing.message.startswith('Secret "s3" not found in namespace team-a '
                                      "(for AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); "
                                      'Secret "hf" has no key "token" (for HF_TOKEN)')
    # read as metadata only (values never reach the operator): its existence is all that is checked
    assert secrets.problem(refs, {"s3": S3_KEYS, "hf": secrets.EXISTS}, "team-a") is None
    key = secrets.problem(refs, {"s3": frozenset({"AWS_ACCESS_KEY_ID"}), "hf": frozenset({"token"})}, "team-a")
    assert key.reason == secrets.SECRET_KEY_NOT_FOUND and '"AWS_SECRET_ACCESS_KEY"' in key.message
    # RBAC refused the read (a namespace that did not grant the chart's Secrets role): said so, with the fix
    refused = secrets.problem(refs, {"s3": secrets.NOT_READABLE, "hf": frozenset({"token"})}, "team-b")
    assert refused.reason == secrets.SECRET_NOT_READABLE
    assert refused.message.startswith('the operator may not read Secret "s3" in namespace team-b (for '
                                      "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): grant it with a RoleBinding of "
                                      "the chart's <release>-secrets ClusterRole in team-b")


def test_a_missing_secret_holds_the_job_in_pending_with_a_condition_and_one_warning():
    plan, job = step(finetunejob(), {"s3-creds": None})
    assert plan.create == []
    assert job["status"]["phase"] == "Pending" and "trainingJob" not in job["status"]
    assert condition(job)["status"] == "False" and condition(job)["reason"] == "SecretNotFound"
    assert 'Secret "s3-creds" not found in namespace' in condition(job)["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "SecretNotFound"), ("Normal", "Pending")]
    assert plan.requeue_after is not None  # looked at again: it may be created any moment
    plan, job = step(job, {"s3-creds": None})
    assert plan.create == [] and plan.events == []  # said once


def test_the_job_starts_once_the_secret_exists():
    _, job = step(finetunejob(), {"s3-creds": frozenset({"AWS_ACCESS_KEY_ID"})})
    assert condition(job)["reason"] == "SecretKeyNotFound"
    plan, job = step(job, {"s3-creds": S3_KEYS})
    assert [c["kind"] for c in plan.create] == ["ConfigMap", "PyTorchJob"]
    assert condition(job)["status"] == "True" and condition(job)["reason"] == "SecretsFound"
    assert job["status"]["data"]["job"] == "llama-lora-data"  # the first child: the CPU data stage


def test_no_condition_when_every_secret_is_there_from_the_start():
    plan, job = step(finetunejob(), {"s3-creds": S3_KEYS})
    assert [c["kind"] for c in plan.create] == ["ConfigMap", "PyTorchJob"]
    assert condition(job) is None


def test_a_missing_secret_reported_under_a_running_job_does_not_stop_it():
    _, job = step(finetunejob(), {"s3-creds": S3_KEYS})
    running = {"metadata": {"name": "llama-lora"}, "spec": {}, "status": {"conditions": [
        {"type": "Running", "status": "True", "reason": "Running", "message": "",
         "lastTransitionTime": NOW}]}}
    plan, after = step(job, {"s3-creds": None}, pytorchjob=running)
    assert condition(after)["reason"] == "SecretNotFound"
    assert after["status"]["phase"] == "Running"
    assert "Warning" in [e.type for e in plan.events]


def test_secrets_are_read_until_training_starts_and_while_one_is_missing():
    job = finetunejob()
    assert ftj.needs_secrets(job) == ["s3-creds"]
    _, validating = step(job, {"s3-creds": S3_KEYS})
    assert validating["status"]["data"]["job"] and ftj.needs_secrets(validating) == ["s3-creds"]  # no training yet
    _, started = step(data_validated(finetunejob()), {"s3-creds": S3_KEYS})
    assert started["status"]["trainingJob"] and ftj.needs_secrets(started) == []  # not on every progress pass
    _, waiting = step(job, {"s3-creds": None})
    assert ftj.needs_secrets(waiting) == ["s3-creds"]
    reported = copy.deepcopy(started)
    reported["status"]["conditions"] = cond.set_condition(reported["status"]["conditions"], secrets.CONDITION,
                                                          False, "SecretNotFound", "gone", 1, NOW)
    assert ftj.needs_secrets(reported) == ["s3-creds"]  # looked at until it is fixed
    finished = copy.deepcopy(reported)
    finished["status"]["phase"] = "Succeeded"
    assert ftj.needs_secrets(finished) == []


def test_an_adapterdeployment_reports_its_serving_pods_missing_secret_and_recovers():
    from kubetune.api.validation import validate
    from kubetune_operator.reconcile import adapterdeployment as adp
    from kubetune_testing.factories import adapterdeployment

    doc = adapterdeployment()
    doc["spec"]["storage"] = {"credentials": {"secretName": "s3-creds"}}
    adep = {**doc, "spec": validate(doc).defaulted["spec"]}
    assert adp.needs_secrets(adep) == ["s3-creds"]
    source = adp.Source(manifest_uri="s3://adapters/x/manifest.json", digest="sha256:" + "a" * 64, rank=16)

    def decide(found, status=None):
        plan = adp.decide(adp.Observed(adep={**adep, "status": status or {}}, now=NOW,
                                       sources={"support-bot": source}, pods=[], secrets=found), adp.Settings())
        return plan, cond.find(plan.status["conditions"], secrets.CONDITION)

    plan, missing = decide({"s3-creds": None})
    assert missing["status"] == "False" and missing["reason"] == "SecretNotFound"
    assert "(for AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)" in missing["message"]
    assert ("Warning", "SecretNotFound") in [(e.type, e.reason) for e in plan.events]
    assert plan.status["adapters"][0]["stable"]["digest"] == source.digest  # the rollout itself goes on
    again, _ = decide({"s3-creds": None}, plan.status)
    assert "SecretNotFound" not in [e.reason for e in again.events]
    _, found = decide({"s3-creds": S3_KEYS}, plan.status)
    assert found["status"] == "True" and found["reason"] == "SecretsFound"
    _, untouched = decide(None)  # not looked at (kubetune local)
    assert untouched is None
    user_pods = {**adep, "spec": {**adep["spec"], "runtime": {"selector": {"app": "vllm"}}}}
    assert adp.needs_secrets(user_pods) == []  # the user's own pods are not ours to check
