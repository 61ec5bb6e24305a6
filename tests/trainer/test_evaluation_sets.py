"""spec.evaluation: named held-out sets scored after training for the new adapter and a reference adapter.

The real MiniLM on CLINC150: a reference adapter learns 6 intents; the candidate learns the same intents
plus `oos` (out of scope). On a set of in-scope and oos utterances the reference, which cannot predict
`oos`, must score clearly below the candidate, both measured on the same examples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from kubetune.api import jobconfig, storage_layout
from kubetune.clients.storage import ObjectStore
from kubetune_trainer import evalsets
from kubetune_trainer.modeling import BadInput
from tests.conftest import shared_file

from .conftest import (
    WORDS,
    adapter_dir,
    job_spec,
    lm_corpus,
    make_config,
    manifest_of,
    run_in_process,
    run_pods,
    write_jsonl,
)
from .test_entrypoint import progress_of, run_main
from .test_minilm_clinc import clinc_subset, minilm_dir, minilm_spec

INTENTS = 6
PER_INTENT = 20
EPOCHS = 3
OOS_TRAIN = 60  # oos utterances are diverse: more of them than of one intent


def _clinc() -> dict:
    return json.loads(shared_file("datasets", "clinc150", "data_full.json").read_text())


def _per_intent(rows: list, intents: list[str], count: int) -> list[dict]:
    seen = dict.fromkeys(intents, 0)
    out = []
    for text, intent in rows:
        if intent in seen and seen[intent] < count:
            seen[intent] += 1
            out.append({"text": text, "label": intent})
    return out


def _spec(train: Path, validation: Path, out: Path, **extra) -> dict:
    """minilm_spec, CPU-lean: no baseline and one evaluation at the end (what these tests look at)."""
    spec = minilm_spec(train, validation, f"file://{out}", epochs=EPOCHS)
    spec["training"]["evalSteps"] = 10_000  # capped to the last step
    spec["baseline"] = {"enabled": False}
    spec.update(extra)
    return spec


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A MiniLM LoRA classifier of 6 intents, published once for the module: (config, manifest, paths)."""
    tmp = tmp_path_factory.mktemp("reference")
    train, _, intents = clinc_subset(tmp, intents=INTENTS, per_intent=PER_INTENT)
    validation = write_jsonl(tmp / "original.jsonl", _per_intent(_clinc()["val"], intents, 10))
    config = make_config(_spec(train, validation, tmp / "out"), name="reference")
    manifest = run_in_process(config, tmp / "work")
    assert manifest["labels"] == intents
    return config, manifest, {"train": train, "original": validation, "intents": intents, "tmp": tmp}


def _candidate_data(tmp: Path, intents: list[str]) -> tuple[Path, Path, Path]:
    """The reference's intents plus oos: training data, its own validation, and the "new" set (in-scope test
    utterances and unseen oos ones, half and half)."""
    data = _clinc()
    oos = [{"text": t, "label": "oos"} for t, _ in data["oos_train"][:OOS_TRAIN]]
    train = write_jsonl(tmp / "train.jsonl", _per_intent(data["train"], intents, PER_INTENT) + oos)
    validation = write_jsonl(tmp / "val.jsonl", _per_intent(data["val"], intents, 5)
                             + [{"text": t, "label": "oos"} for t, _ in data["oos_val"][:10]])
    new = write_jsonl(tmp / "new.jsonl", _per_intent(data["test"], intents, 5)
                      + [{"text": t, "label": "oos"} for t, _ in data["oos_test"][:30]])
    return train, validation, new


def test_candidate_and_reference_are_scored_on_every_set(reference, tmp_path):
    ref_config, ref_manifest, paths = reference
    train, validation, new = _candidate_data(tmp_path, paths["intents"])
    evaluation = {"sets": [{"name": "original", "uri": f"file://{paths['original']}"},
                           {"name": "new", "uri": f"file://{new}"}],
                  "reference": {"manifestUri": ref_config.storage.manifest_uri}}
    config = make_config(_spec(train, validation, tmp_path / "out", evaluation=evaluation), name="candidate")
    manifest = run_in_process(config, tmp_path / "work")
    assert manifest == manifest_of(config)
    assert manifest["labels"] == sorted([*paths["intents"], "oos"])
    assert manifest["evaluationReference"] == {"manifestUri": ref_config.storage.manifest_uri,
                                               "digest": ref_manifest["digest"]}
    evaluations = manifest["evaluations"]
    assert set(evaluations) == {"original", "new"}
    keys = {"accuracy", "macro_f1", "eval_loss", "unknownLabels"}
    for name, result in evaluations.items():
        assert set(result["candidate"]) == keys and set(result["reference"]) == keys, name
        assert result["digest"].startswith("sha256:")
    original, new_set = evaluations["original"], evaluations["new"]
    assert original["uri"] == f"file://{paths['original']}" and original["examples"] == 60
    # The same 60 examples for both, all known to both: nothing left out of either loss.
    assert original["candidate"]["unknownLabels"] == original["reference"]["unknownLabels"] == 0
    assert original["reference"]["accuracy"] >= 0.6, original  # the reference learned its own intents
    # The reference's published validation metrics were measured on the same file: the same numbers again.
    assert original["reference"]["accuracy"] == pytest.approx(ref_manifest["metrics"]["accuracy"])
    assert original["reference"]["eval_loss"] == pytest.approx(ref_manifest["metrics"]["eval_loss"], rel=1e-4)
    assert new_set["examples"] == 60
    assert new_set["candidate"]["unknownLabels"] == 0
    assert new_set["reference"]["unknownLabels"] == 30  # the oos half: wrong for the reference, not in its loss
    assert new_set["reference"]["accuracy"] <= 0.5
    assert new_set["candidate"]["accuracy"] >= new_set["reference"]["accuracy"] + 0.2, new_set
    # What the candidate's own validation measured is untouched by the extra sets.
    assert manifest["metrics"]["accuracy"] > 0.5


def test_a_bad_line_in_a_set_fails_with_its_name_and_line_and_publishes_nothing(reference, tmp_path):
    _, _, paths = reference
    good = paths["original"].read_text().splitlines()
    bad = write_jsonl(tmp_path / "bad.jsonl", [*good[:6], '{"text": "where is my order", "label": ', *good[6:]])
    evaluation = {"sets": [{"name": "original", "uri": f"file://{paths['original']}"},
                           {"name": "holdout-b", "uri": f"file://{bad}"}]}
    config = make_config(_spec(paths["train"], paths["original"], tmp_path / "out", evaluation=evaluation),
                         name="bad-set")
    assert run_main(config, tmp_path) == jobconfig.EXIT_BAD_INPUT
    message = progress_of(config)["failure"]["message"]
    assert "evaluation set 'holdout-b'" in message and "line 7" in message and "invalid_json" in message
    assert manifest_of(config) is None
    assert not [u for u in ObjectStore().list(config.storage.job_prefix) if not u.endswith("progress.json")]


def test_a_reference_of_another_base_model_is_refused_before_training(reference, tmp_path):
    ref_config, _, paths = reference
    other = tmp_path / "other-minilm"
    other.mkdir()
    for path in minilm_dir().iterdir():  # the same files, but another base model as far as uris go
        (other / path.name).symlink_to(path)
    evaluation = {"sets": [{"name": "original", "uri": f"file://{paths['original']}"}],
                  "reference": {"manifestUri": ref_config.storage.manifest_uri}}
    spec = _spec(paths["train"], paths["original"], tmp_path / "out", evaluation=evaluation)
    spec["baseModel"] = {"uri": f"file://{other}"}
    config = make_config(spec, name="other-base")
    with pytest.raises(BadInput, match="same base model") as caught:
        run_in_process(config, tmp_path / "work")
    assert str(minilm_dir()) in str(caught.value) and str(other) in str(caught.value)
    assert manifest_of(config) is None
    assert not (tmp_path / "work" / "reference").exists()  # nothing downloaded either


def test_a_tampered_reference_is_refused(reference, tmp_path):
    ref_config, ref_manifest, paths = reference
    source = Path(storage_layout.split_uri(ref_config.storage.job_prefix)[2])
    copy = tmp_path / "copied-job"
    shutil.copytree(source, copy)
    weights = copy / ref_manifest["adapterPath"] / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-2] ^= 0xFF  # same size: only the sha256 can tell
    weights.write_bytes(bytes(blob))
    evaluation = {"sets": [{"name": "original", "uri": f"file://{paths['original']}"}],
                  "reference": {"manifestUri": f"file://{copy}/manifest.json"}}
    config = make_config(_spec(paths["train"], paths["original"], tmp_path / "out", evaluation=evaluation),
                         name="tampered")
    with pytest.raises(BadInput, match=r"adapter_model\.safetensors does not match its sha256"):
        run_in_process(config, tmp_path / "work")
    assert manifest_of(config) is None


def test_causal_lm_sets_with_a_reference_report_loss_and_perplexity(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(48))
    holdout = write_jsonl(tmp_path / "holdout.jsonl", lm_corpus(12, seed=7))
    ref = make_config(job_spec(tiny_llama, data, tmp_path / "ref", training__maxSteps=2), name="lm-ref")
    run_in_process(ref, tmp_path / "work-ref")
    evaluation = {"sets": [{"name": "holdout", "uri": f"file://{holdout}"}],
                  "reference": {"manifestUri": ref.storage.manifest_uri}}
    config = make_config(job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=20, evaluation=evaluation),
                         name="lm-candidate")
    manifest = run_in_process(config, tmp_path / "work")
    result = manifest["evaluations"]["holdout"]
    assert result["examples"] == 12
    assert set(result["candidate"]) == set(result["reference"]) == {"eval_loss", "perplexity"}
    assert result["candidate"]["eval_loss"] < result["reference"]["eval_loss"]  # 20 steps beat 2


def _kind(word: str) -> str:
    return "greek" if WORDS.index(word) < 24 else "colour" if WORDS.index(word) < 30 else "number"


def test_zero3_two_processes_score_a_classification_candidate_and_reference(tiny_llama, tmp_path):
    """torchrun x2 under ZeRO-3: every rank scores both models (each forward is a collective); rank 0
    publishes. LoRA r16 on a 64-wide model puts the adapter above ZeRO's persistence threshold (partitioned,
    so saving gathers on every rank), and the classification head rides along as a peft modules_to_save."""
    rows = [{"text": f"{r['prompt']} {r['completion']}", "label": _kind(r["prompt"].split()[0])} for r in lm_corpus(64)]
    train, validation = write_jsonl(tmp_path / "train.jsonl", rows[:48]), write_jsonl(tmp_path / "val.jsonl", rows[48:])
    lora = {"type": "LoRA", "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}}

    def spec(out: str, **overrides) -> dict:
        return job_spec(tiny_llama, train, tmp_path / out, task="SequenceClassification", method=lora,
                        dataset={"uri": f"file://{train}", "validationUri": f"file://{validation}",
                                 # kept: the set "original" is the validation file, scored whole
                                 "format": "text-label", "leakage": "Warn"},
                        baseline={"enabled": False}, **overrides)

    ref = make_config(spec("ref", training__maxSteps=4), name="z3-ref")
    ref_manifest = run_in_process(ref, tmp_path / "work-ref")
    evaluation = {"sets": [{"name": "original", "uri": f"file://{validation}"}],
                  "reference": {"manifestUri": ref.storage.manifest_uri}}
    config = make_config(spec("out", training__maxSteps=4, training__perDeviceBatchSize=4, evaluation=evaluation,
                              distributed={"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2,
                                           "deepspeed": {"enabled": True, "zeroStage": 3}}), name="z3")
    result = run_pods(config, tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    manifest = manifest_of(config)
    original = manifest["evaluations"]["original"]
    assert original["examples"] == 16 and set(original) >= {"candidate", "reference"}
    assert original["candidate"]["accuracy"] == pytest.approx(manifest["metrics"]["accuracy"])
    # The reference, loaded partitioned and scored by both ranks, gives its own published numbers back.
    assert original["reference"]["accuracy"] == pytest.approx(ref_manifest["metrics"]["accuracy"])
    assert original["reference"]["eval_loss"] == pytest.approx(ref_manifest["metrics"]["eval_loss"], rel=1e-4)
    with safe_open(str(adapter_dir(config, manifest) / "adapter_model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    assert any(".score." in n for n in names) and any("lora_A" in n for n in names), names


def test_the_baseline_stage_ignores_the_sets(tiny_llama, tmp_path):
    """Only training scores the sets (the data stage checks them before any GPU: test_data_stage.py)."""
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(20))
    missing = {"sets": [{"name": "never-read", "uri": f"file://{tmp_path}/missing.jsonl"}]}
    config = make_config(job_spec(tiny_llama, data, tmp_path / "out", evaluation=missing), name="base-stage",
                         stage=jobconfig.Stage(kind=jobconfig.STAGE_BASELINE))
    result = run_in_process(config, tmp_path / "work")
    assert result["kind"] == "baseline" and "evaluations" not in result


# --- the pure parts -----------------------------------------------------------------------------------------


def _words(piece: str) -> int:
    return len(piece.split()) + 2


def test_parse_set_is_strict_and_names_the_set_and_line():
    raw = b'{"text": "hi", "label": "a"}\n{"text": "", "label": "a"}\n{"text": "yo", "label": "new"}\n'
    with pytest.raises(BadInput, match=r"evaluation set 'drift' \(file:///s.jsonl\): 1 invalid line\(s\), the "
                                       r"first at line 2 \(empty_field"):
        evalsets.parse_set(raw, "drift", "file:///s.jsonl", "text-label", count_tokens=_words, max_tokens=16)
    ok = evalsets.parse_set(raw.replace(b'""', b'"x"'), "drift", "u", "text-label", count_tokens=_words,
                            max_tokens=16)
    assert [r.fields["label"] for r in ok] == ["a", "a", "new"]  # an unknown label is not an error here
    too_long = b'{"prompt": "' + b"w " * 30 + b'", "completion": "c"}\n'
    with pytest.raises(BadInput, match="line 1 \\(too_long"):
        evalsets.parse_set(too_long, "long", "u", "prompt-completion", count_tokens=_words, max_tokens=16)
    with pytest.raises(BadInput, match="is empty"):
        evalsets.parse_set(b"\n", "empty", "u", "text", count_tokens=_words, max_tokens=16)
    with pytest.raises(BadInput, match="does not exist"):
        evalsets.parse_set(None, "gone", "u", "text", count_tokens=_words, max_tokens=16)


def test_classification_scores_compare_label_names_across_label_lists():
    gold = ["a", "b", "oos", "oos"]
    candidate = evalsets.classification_scores(["a", "b", "oos", "a"], gold, 0.5, ["a", "b", "oos"])
    reference = evalsets.classification_scores(["a", "b", "a", "b"], gold, 0.4, ["a", "b"])
    assert candidate["accuracy"] == 0.75 and candidate["unknownLabels"] == 0
    assert reference["accuracy"] == 0.5 and reference["unknownLabels"] == 2
    assert reference["macro_f1"] < candidate["macro_f1"]
    assert evalsets.label_ids(["a", "b"], gold) == {"a": 0, "b": 1, "oos": -100}


def test_check_reference_refuses_another_base_model_task_or_labels():
    spec = {"baseModel": {"uri": "s3://models/llama-3-8b", "revision": "main"}, "task": "SequenceClassification"}
    document = {"baseModel": {"uri": "s3://models/llama-3-8b/", "revision": "main"},
                "task": "SequenceClassification", "labels": ["a", "b"]}
    assert evalsets.check_reference(document, spec, "s3://b/ref/manifest.json") == ["a", "b"]
    with pytest.raises(BadInput, match="trained on base model 's3://models/mistral-7b', this job fine-tunes "
                                       "'s3://models/llama-3-8b'"):
        evalsets.check_reference({**document, "baseModel": {"uri": "s3://models/mistral-7b"}}, spec, "u")
    with pytest.raises(BadInput, match="revision 'v2'"):
        evalsets.check_reference({**document, "baseModel": {"uri": "s3://models/llama-3-8b", "revision": "v2"}},
                                 spec, "u")
    with pytest.raises(BadInput, match="CausalLM adapter"):
        evalsets.check_reference({**document, "task": "CausalLM"}, spec, "u")
    with pytest.raises(BadInput, match="no valid labels"):
        evalsets.check_reference({**document, "labels": None}, spec, "u")
    with pytest.raises(BadInput, match=r"must name a published adapter's manifest\.json"):
        evalsets.reference_prefix("s3://b/ref/adapter/")
    assert evalsets.reference_prefix("s3://b/ns/job/uid/manifest.json") == "s3://b/ns/job/uid/"
