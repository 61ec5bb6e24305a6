"""Every CEL rule of the API, evaluated with a CEL engine on an accepted and a rejected example.

A rule added to the schema without a row here fails `test_every_rule_has_examples`.
"""

from __future__ import annotations

import pytest

from kubetune.api import v1alpha1 as api
from kubetune.api.schema import iter_fields
from kubetune.api.validation import cel_errors, root_schema, validate
from kubetune_testing.factories import adapterdeployment, finetunejob, set_path

F, A = "FineTuneJob", "AdapterDeployment"

SAMPLED = {"spec.trafficSampling": {"rate": 0.5, "uri": "s3://samples/p"}}
DRIFTING = {"name": "x", "source": {"fineTuneJobRef": {"name": "j"}}}
CLS = {"spec.task": "SequenceClassification", "spec.dataset": {"uri": "s3://data/x.jsonl", "format": "text-label"}}

# (kind, a distinctive part of the rule, accepted mutations, rejected mutations, expected message part)
CASES = [
    (F, "self.metadata.name.size()", {"metadata.name": "a" * 45}, {"metadata.name": "a" * 46}, "metadata.name"),
    (F, "self.metadata.name.size()", {"metadata.name": "job-1"}, {"metadata.name": "1job"}, "DNS-1035"),
    (F, "!has(self.s3) || self.uri.startsWith('s3://')",
     {"spec.baseModel": {"uri": "s3://models/llama", "s3": {"endpoint": "http://minio:9000"}}},
     {"spec.baseModel": {"uri": "hf://org/m", "s3": {"endpoint": "http://minio:9000"}}}, "baseModel.s3"),
    (F, "!self.exists(m, m == 'all-linear') || size(self) == 1",
     {"spec.method.lora": {"targetModules": ["q_proj", "v_proj"]}},
     {"spec.method.lora": {"targetModules": ["all-linear", "q_proj"]}}, "all-linear cannot be combined"),
    (F, "self.maxTrainableBlocks >= self.initialTrainableBlocks",
     {"spec.method": {"type": "FreezeThaw", "freezeThaw": {"initialTrainableBlocks": 2, "maxTrainableBlocks": 4}},
      "spec.distributed": {"nodes": 1, "gpusPerNode": 1}},
     {"spec.method": {"type": "FreezeThaw", "freezeThaw": {"initialTrainableBlocks": 3, "maxTrainableBlocks": 2}},
      "spec.distributed": {"nodes": 1, "gpusPerNode": 1}}, "maxTrainableBlocks must be >= initialTrainableBlocks"),
    (F, "self.type != 'QLoRA' || has(self.quantization)",
     {"spec.method": {"type": "QLoRA", "quantization": {}}},
     {"spec.method": {"type": "QLoRA"}}, "method.quantization is required when method.type is QLoRA"),
    (F, "self.type == 'QLoRA' || !has(self.quantization)",
     {"spec.method": {"type": "LoRA"}},
     {"spec.method": {"type": "LoRA", "quantization": {}}}, "method.quantization is only valid"),
    (F, "self.type in ['LoRA', 'QLoRA'] || !has(self.lora)",
     {"spec.method": {"type": "Full"}},
     {"spec.method": {"type": "Full", "lora": {"rank": 8}}}, "method.lora is only valid"),
    (F, "self.type == 'FreezeThaw' || !has(self.freezeThaw)",
     {"spec.method": {"type": "FreezeThaw", "freezeThaw": {}}, "spec.distributed": {"nodes": 1, "gpusPerNode": 1}},
     {"spec.method": {"type": "LoRA", "freezeThaw": {}}}, "method.freezeThaw is only valid"),
    (F, "!(has(self.epochs) && has(self.maxSteps))",
     {"spec.training": {"maxSteps": 100}},
     {"spec.training": {"epochs": 1, "maxSteps": 100}}, "at most one of training.epochs or training.maxSteps"),
    (F, "!(has(self.epochs) && has(self.maxSteps))",
     {"spec.training": {}},  # neither: derived from the data (training_defaults)
     {"spec.training": {"epochs": 0.5, "maxSteps": 3}}, "at most one of training.epochs or training.maxSteps"),
    (F, "self.effectiveBatchSize >= self.perDeviceBatchSize",
     {"spec.training": {"epochs": 1, "perDeviceBatchSize": 4, "effectiveBatchSize": 64}},
     {"spec.training": {"epochs": 1, "perDeviceBatchSize": 8, "effectiveBatchSize": 4}},
     "effectiveBatchSize must be >= training.perDeviceBatchSize"),
    (F, "!self.offloadParams || self.zeroStage == 3",
     {"spec.distributed": {"deepspeed": {"zeroStage": 3, "offloadParams": True}}},
     {"spec.distributed": {"deepspeed": {"zeroStage": 2, "offloadParams": True}}}, "offloadParams requires"),
    (F, "!self.offloadOptimizer || self.zeroStage > 0",
     {"spec.distributed": {"deepspeed": {"zeroStage": 1, "offloadOptimizer": True}}},
     {"spec.distributed": {"deepspeed": {"zeroStage": 0, "offloadOptimizer": True}}}, "offloadOptimizer requires"),
    (F, "self.gpusPerNode == 0 || self.processesPerNode == 1",
     {"spec.distributed": {"gpusPerNode": 0, "processesPerNode": 2, "deepspeed": {"enabled": False}}},
     {"spec.distributed": {"gpusPerNode": 1, "processesPerNode": 2}}, "processesPerNode applies only to CPU"),
    (F, "self.task == 'SequenceClassification' || self.dataset.format != 'text-label'",
     {"spec.task": "SequenceClassification", "spec.dataset": {"uri": "s3://data/x.jsonl", "format": "text-label"}},
     {"spec.dataset": {"uri": "s3://data/x.jsonl", "format": "text-label"}}, "text-label needs task"),
    (F, "self.task != 'SequenceClassification' || self.dataset.format == 'text-label'",
     {"spec.task": "CausalLM"},
     {"spec.task": "SequenceClassification"}, "task SequenceClassification needs dataset.format text-label"),
    (F, "!has(self.labels) || self.task == 'SequenceClassification'",
     {"spec.task": "SequenceClassification", "spec.labels": ["a", "b"],
      "spec.dataset": {"uri": "s3://data/x.jsonl", "format": "text-label"}},
     {"spec.labels": ["a", "b"]}, "labels: only valid when task is SequenceClassification"),
    (F, "!has(self.training.headLearningRate) || self.task == 'SequenceClassification'",
     {"spec.task": "SequenceClassification", "spec.training": {"headLearningRate": 0.01},
      "spec.dataset": {"uri": "s3://data/x.jsonl", "format": "text-label"}},
     {"spec.training": {"headLearningRate": 0.01}}, "training.headLearningRate: only valid when task is"),
    (F, "self.classifier.pooling == 'Auto' || self.task == 'SequenceClassification'",
     {"spec.task": "SequenceClassification", "spec.classifier": {"pooling": "Mean"},
      "spec.dataset": {"uri": "s3://data/x.jsonl", "format": "text-label"}},
     {"spec.classifier": {"pooling": "Mean"}}, "classifier.pooling: only valid when task is SequenceClassification"),
    (F, "!has(self.trainingRuntime) || self.backend == 'TrainJob'",
     {"spec.backend": "TrainJob", "spec.trainingRuntime": "torch-distributed"},
     {"spec.trainingRuntime": "torch-distributed"}, "trainingRuntime: applies only when backend is TrainJob"),
    (F, "!has(self.scheduling.priorityClassName)",
     {"spec.scheduling": {"priorityClassName": "batch"}},
     {"spec.backend": "TrainJob", "spec.scheduling": {"priorityClassName": "batch"}},
     "scheduling.priorityClassName: a TrainJob cannot set"),
    (F, "!has(self.runPolicy.ttlSecondsAfterFinished)",
     {"spec.backend": "TrainJob", "spec.runPolicy": {"activeDeadlineSeconds": 60}},
     {"spec.backend": "TrainJob", "spec.runPolicy": {"ttlSecondsAfterFinished": 60}},
     "runPolicy.ttlSecondsAfterFinished: a TrainJob has no such setting"),
    (F, "self.method.type != 'QLoRA' || self.distributed.gpusPerNode > 0",
     {"spec.method": {"type": "QLoRA", "quantization": {}}, "spec.distributed": {"gpusPerNode": 1}},
     {"spec.method": {"type": "QLoRA", "quantization": {}},
      "spec.distributed": {"gpusPerNode": 0, "deepspeed": {"enabled": False}}}, "QLoRA needs GPUs"),
    (A, "self.metadata.name.size() <= 63", {"metadata.name": "a" * 63}, {"metadata.name": "a" * 64},
     "the serving Service is named after it"),
    (A, "self.metadata.name.size() <= 63", {"metadata.name": "support"}, {"metadata.name": "2support"},
     "DNS-1035 label"),
    (F, "self.operator != 'Exists' || !has(self.value)",
     {"spec.scheduling": {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
     {"spec.scheduling": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "a100"}]}},
     "value must be empty when operator is Exists"),
    (F, "!self.metadata.name.endsWith('-baseline')", {"metadata.name": "support-baseline2"},
     {"metadata.name": "support-baseline"}, "must not end in -baseline"),
    (F, "!self.metadata.name.endsWith('-baseline')", {"metadata.name": "support-sweep"},
     {"metadata.name": "support-rank-sweep"}, "must not end in -baseline or -rank-sweep"),
    (F, "!has(self.target) || self.enabled",
     {"spec.baseline": {"target": {"metric": "eval_loss", "value": 1.2}}},
     {"spec.baseline": {"enabled": False, "target": {"metric": "eval_loss", "value": 1.2}}},
     "baseline.target needs baseline.enabled"),
    (F, "(self.value >= 0.0 && self.value <= 1.0)",
     {**CLS, "spec.baseline": {"target": {"metric": "accuracy", "value": 0.9}}},
     {**CLS, "spec.baseline": {"target": {"metric": "accuracy", "value": 90}}}, "must be between 0 and 1"),
    (F, "!has(self.rankSweep) || self.method.type in ['LoRA', 'QLoRA']",
     {"spec.method": {"type": "QLoRA", "quantization": {}}, "spec.rankSweep": {}},
     {"spec.method": {"type": "Full"}, "spec.rankSweep": {}}, "rankSweep applies only when method.type is LoRA"),
    (F, "self.rankSweep.metric in ['accuracy', 'macro_f1']",
     {**CLS, "spec.rankSweep": {"metric": "macro_f1"}},
     {"spec.rankSweep": {"metric": "accuracy"}}, "rankSweep.metric accuracy and macro_f1 need task"),
    (F, "(self.rankSweep.gpusPerNode > 0) == (self.distributed.gpusPerNode > 0)",
     {"spec.rankSweep": {"nodes": 1, "gpusPerNode": 2}},
     {"spec.rankSweep": {"gpusPerNode": 0}}, "the sweep runs on the same kind of device"),
    (F, "size(self.rankSweep.ranks) * size(self.rankSweep.learningRates) <= 32",
     {"spec.rankSweep": {"ranks": [4, 8, 16, 32, 64, 128, 256, 512], "learningRates": [1e-4, 1e-3, 1e-2, 1e-1]}},
     {"spec.rankSweep": {"ranks": list(range(1, 10)), "learningRates": [1e-4, 1e-3, 1e-2, 1e-1]}},
     "at most 32 configs"),
    (F, "self.rankSweep.metric != 'perplexity'",
     {"spec.rankSweep": {"metric": "perplexity"}},
     {**CLS, "spec.rankSweep": {"metric": "perplexity"}}, "rankSweep.metric perplexity needs task CausalLM"),
    (F, "self.baseline.target.metric in ['accuracy', 'macro_f1']",
     {**CLS, "spec.baseline": {"target": {"metric": "accuracy", "value": 0.8}}},
     {"spec.baseline": {"target": {"metric": "accuracy", "value": 0.8}}},
     "baseline.target.metric accuracy and macro_f1 need task"),
    (F, "self.baseline.target.metric != 'perplexity'",
     {"spec.baseline": {"target": {"metric": "perplexity", "value": 12}}},
     {**CLS, "spec.baseline": {"target": {"metric": "perplexity", "value": 12}}},
     "baseline.target.metric perplexity needs task CausalLM"),
    (F, "has(self.dataset.validationUri) || self.dataset.validationSplit > 0.0",
     {"spec.baseline": {"target": {"metric": "eval_loss", "value": 1}},
      "spec.dataset": {"uri": "s3://data/x.jsonl", "format": "chat", "validationSplit": 0,
                       "validationUri": "s3://data/v.jsonl"}},
     {"spec.baseline": {"target": {"metric": "eval_loss", "value": 1}},
      "spec.dataset": {"uri": "s3://data/x.jsonl", "format": "chat", "validationSplit": 0}},
     "baseline.target needs validation data"),
    (A, "has(self.fineTuneJobRef) != has(self.uri)",
     {"spec.adapters": [{"name": "x", "source": {"uri": "s3://bucket/m.json", "digest": "sha256:" + "a" * 64}}]},
     {"spec.adapters": [{"name": "x", "source": {"fineTuneJobRef": {"name": "j"}, "uri": "s3://bucket/m.json",
                                                 "digest": "sha256:" + "a" * 64}}]}, "exactly one of source"),
    (A, "!has(self.uri) || has(self.digest)",
     {"spec.adapters": [{"name": "x", "source": {"uri": "s3://bucket/m.json", "digest": "sha256:" + "b" * 64}}]},
     {"spec.adapters": [{"name": "x", "source": {"uri": "s3://bucket/m.json"}}]}, "source.digest is required"),
    (A, "[has(self.setWeight), has(self.pause), has(self.analysis)]",
     {"spec.strategy": {"type": "Canary", "canary": {"steps": [{"pause": {"seconds": 30}}]}}},
     {"spec.strategy": {"type": "Canary", "canary": {"steps": [{"setWeight": 5, "pause": {"seconds": 30}}]}}},
     "set exactly one of setWeight, pause or analysis"),
    (A, "has(self.managed) != has(self.selector)",
     {"spec.runtime": {"selector": {"matchLabels": {"app": "vllm"}}}},
     {"spec.runtime": {"managed": {}, "selector": {"matchLabels": {"app": "vllm"}}}}, "exactly one of runtime"),
    (A, "self.minRequests <= self.requests",
     {**SAMPLED, "spec.adapters": [{**DRIFTING, "drift": {"window": {"requests": 100, "minRequests": 100}}}]},
     {**SAMPLED, "spec.adapters": [{**DRIFTING, "drift": {"window": {"requests": 100, "minRequests": 101}}}]},
     "window.minRequests must not exceed"),
    (A, "self.triggerWindows <= self.ofWindows",
     {**SAMPLED, "spec.adapters": [{**DRIFTING, "drift": {"guard": {"triggerWindows": 2, "ofWindows": 2}}}]},
     {**SAMPLED, "spec.adapters": [{**DRIFTING, "drift": {"guard": {"triggerWindows": 3, "ofWindows": 2}}}]},
     "guard.triggerWindows must not exceed"),
    (A, "!self.adapters.exists(a, has(a.drift))",
     {**SAMPLED, "spec.adapters": [{**DRIFTING, "drift": {}}]},
     {"spec.adapters": [{**DRIFTING, "drift": {}}]}, "drift needs trafficSampling.uri"),
    (A, "self.type != 'Canary' || has(self.canary)",
     {"spec.strategy": {"type": "Immediate"}},
     {"spec.strategy": {"type": "Canary"}}, "strategy.canary is required"),
    # the AdapterDeployment's baseModel is the FineTuneJob's: the same rule, the same message
    (A, "!has(self.s3) || self.uri.startsWith('s3://')",
     {"spec.baseModel": {"uri": "s3://models/llama", "s3": {"endpoint": "http://minio:9000", "region": "eu-west-1",
                                                             "credentials": {"secretName": "models"}}}},
     {"spec.baseModel": {"uri": "hf://org/m", "s3": {"endpoint": "http://minio:9000"}}}, "baseModel.s3"),
    (A, "!has(self.maxCpuLoras) || self.maxCpuLoras >= self.maxLoras",
     {"spec.runtime.managed": {"maxLoras": 4, "maxCpuLoras": 4}},
     {"spec.runtime.managed": {"maxLoras": 4, "maxCpuLoras": 3}}, "maxCpuLoras must be at least maxLoras"),
    (A, "has(self.matchLabels) || has(self.matchExpressions)",
     {"spec.runtime": {"selector": {"matchLabels": {"app": "llm"}, "namespaceSelector": {
         "matchLabels": {"kubetune.io/serving": "on"}}}}},
     {"spec.runtime": {"selector": {"matchLabels": {"app": "llm"}, "namespaceSelector": {}}}},
     "an empty selector would select every namespace"),
    (A, "(self.operator in ['In', 'NotIn'])",
     {"spec.runtime": {"selector": {"matchLabels": {"app": "llm"}, "namespaceSelector": {"matchExpressions": [
         {"key": "team", "operator": "In", "values": ["a", "b"]}, {"key": "frozen", "operator": "DoesNotExist"}]}}}},
     {"spec.runtime": {"selector": {"matchLabels": {"app": "llm"}, "namespaceSelector": {"matchExpressions": [
         {"key": "team", "operator": "In"}]}}}}, "In and NotIn need values"),
    (A, "(self.operator in ['In', 'NotIn'])",
     {"spec.runtime": {"selector": {"matchLabels": {"app": "llm"}, "namespaceSelector": {"matchExpressions": [
         {"key": "team", "operator": "Exists", "values": []}]}}}},
     {"spec.runtime": {"selector": {"matchLabels": {"app": "llm"}, "namespaceSelector": {"matchExpressions": [
         {"key": "team", "operator": "Exists", "values": ["a"]}]}}}}, "Exists and DoesNotExist take none"),
    (A, "!has(self.maxCpuLoras) || self.maxCpuLoras >= self.maxLoras",
     {"spec.runtime.managed": {"maxCpuLoras": 8}},  # against the defaulted maxLoras (4)
     {"spec.runtime.managed": {"maxCpuLoras": 2}}, "maxCpuLoras must be at least maxLoras"),
]


def _apply(kind: str, mutations: dict) -> dict:
    doc = finetunejob() if kind == F else adapterdeployment()
    for path, value in mutations.items():
        doc = set_path(doc, path, value)
    return doc


def _all_rules(kind: str) -> set[str]:
    rules = set()
    for _, schema in iter_fields(root_schema(kind)):
        rules.update(entry["rule"] for entry in schema.get("x-kubernetes-validations", []))
    return rules


@pytest.mark.parametrize("kind", [F, A])
def test_every_rule_has_examples(kind):
    covered = {case[1] for case in CASES if case[0] == kind}
    uncovered = [rule for rule in _all_rules(kind) if not any(part in rule for part in covered)]
    assert uncovered == [], f"CEL rules without accepted/rejected examples: {uncovered}"


@pytest.mark.parametrize(("kind", "rule", "accepted", "rejected", "message"), CASES,
                         ids=[f"{c[0]}:{c[4][:40]}" for c in CASES])
def test_rule_accepts_and_rejects(kind, rule, accepted, rejected, message):
    good = validate(_apply(kind, accepted))
    assert good.ok, good.errors
    bad = validate(_apply(kind, rejected))
    assert not bad.ok
    assert any(message in error.message for error in bad.errors), bad.errors


def test_cel_runs_on_defaulted_object():
    # warmupRatio is defaulted to 0.1 (a double) and offloadParams to false; rules see the defaults
    doc = finetunejob()
    result = validate(doc)
    assert result.ok
    assert cel_errors(F, result.defaulted) == []


def test_all_rules_have_messages_naming_a_field():
    for kind in api.KINDS:
        for path, schema in iter_fields(root_schema(kind)):
            for entry in schema.get("x-kubernetes-validations", []):
                assert entry.get("message"), (kind, path, entry["rule"])
                assert "." in entry["message"] or ":" in entry["message"], entry["message"]
