"""A FineTuneJob's children from kopf's indexes, with those just created counted until the watch has them."""

from __future__ import annotations

from kubetune_operator.controllers import children
from kubetune_operator.controllers.children import CONFIG_MAPS, Children, workloads_index
from kubetune_operator.render import training as render

OWNER = [{"uid": "u-1", "kind": "FineTuneJob", "name": "j", "apiVersion": "kubetune.io/v1alpha1"}]


def _pytorchjob(name, conditions=()):
    return {"kind": "PyTorchJob", "metadata": {"name": name, "namespace": "ns", "uid": f"w-{name}",
                                               "labels": {render.LABEL_JOB: "j"}, "ownerReferences": OWNER,
                                               "annotations": {"big": "x" * 1000}},
            "spec": {"runPolicy": {}}, "status": {"conditions": list(conditions)}}


def test_without_indexes_the_port_is_told_to_list():
    cache = Children()
    assert cache.config_maps("ns", "j") is None
    assert cache.workloads("PyTorchJob", "ns", "j") is None


def test_views_keep_what_a_pass_reads_and_nothing_else():
    view = children.workload_view("PyTorchJob", _pytorchjob("j", [{"type": "Running", "status": "True"}]))
    assert view.metadata == {"name": "j", "ownerReferences": [{"uid": "u-1"}]}
    assert view.status.phase == "Running" and view.status.uid == "w-j"
    assert children.metadata_view({"name": "c", "labels": {"a": "b"}}) == {"name": "c", "ownerReferences": []}


def test_a_created_child_counts_until_the_watch_brings_it():
    cache = Children()
    config_maps, workloads = {}, {}
    cache.attach({CONFIG_MAPS: config_maps, workloads_index("PyTorchJob"): workloads, "other": object()})
    assert cache.config_maps("ns", "j") == [] and cache.workloads("PyTorchJob", "ns", "j") == []
    cache.created("ns", "j", {"kind": "ConfigMap", "metadata": {"name": "j-config", "ownerReferences": OWNER}})
    cache.created("ns", "j", _pytorchjob("j"))
    assert [c["metadata"]["name"] for c in cache.config_maps("ns", "j")] == ["j-config"]
    assert [w.metadata["name"] for w in cache.workloads("PyTorchJob", "ns", "j")] == ["j"]
    assert len(cache) == 2
    # the watch delivers the PyTorchJob, now Running: the index's view wins, the remembered one goes
    workloads[("ns", "j")] = [children.workload_view(
        "PyTorchJob", _pytorchjob("j", [{"type": "Running", "status": "True"}]))]
    assert [w.status.phase for w in cache.workloads("PyTorchJob", "ns", "j")] == ["Running"]
    assert len(cache) == 1
    cache.forget("ns", "j")
    assert len(cache) == 0 and cache.config_maps("ns", "j") == []


def test_a_restarted_operator_brings_new_indexes():
    cache = Children()
    first, second = {("ns", "j"): [{"metadata": {"name": "old"}}]}, {}
    cache.attach({CONFIG_MAPS: first})
    cache.attach({CONFIG_MAPS: second})
    assert cache.config_maps("ns", "j") == []


def test_the_operator_caches_are_bounded():
    from kubetune.bounded import BoundedDict

    cache = BoundedDict(maxsize=3)
    for i in range(5):
        cache[i] = i
    cache[2] = "again"  # refreshed: now the newest
    cache[5] = 5
    assert list(cache) == [4, 2, 5] and cache[2] == "again"
