"""Training settings left out of a spec are derived from the task, the method and the data (pure)."""

from __future__ import annotations

import pytest

from kubetune.api.training_defaults import resolve


def derive(training: dict, *, task="SequenceClassification", method="LoRA", examples=15_000, world=1):
    return resolve(training, task=task, method=method, train_examples=examples, world_size=world)


def test_a_classification_job_with_nothing_set_gets_every_setting_and_why():
    out, why = derive({"maxSeqLength": 64})
    assert out["learningRate"] == 2e-3 and out["headLearningRate"] == 1e-2
    assert out["perDeviceBatchSize"] == 32 and out["epochs"] == 2
    assert out["scheduler"]["warmupRatio"] == 0.1  # 2 x 468 steps: a short run
    assert set(why) == {"learningRate", "headLearningRate", "perDeviceBatchSize", "epochs", "scheduler.warmupRatio"}
    assert out["maxSeqLength"] == 64


def test_what_the_user_set_is_kept_and_not_reported_as_derived():
    training = {"learningRate": 1e-4, "headLearningRate": 3e-3, "perDeviceBatchSize": 8, "maxSteps": 50,
                "scheduler": {"type": "cosine", "warmupRatio": 0.0}}
    out, why = derive(training)
    assert out == {**training, "scheduler": {"type": "cosine", "warmupRatio": 0.0}}
    assert why == {}


@pytest.mark.parametrize(("examples", "epochs"), [(100, 10), (540, 10), (3_000, 10), (6_000, 5), (15_000, 2),
                                                  (60_000, 1), (1_000_000, 1)])
def test_small_classification_splits_get_more_passes_within_bounds(examples, epochs):
    assert derive({}, examples=examples)[0]["epochs"] == epochs


def test_causal_and_whole_model_rates_and_batches():
    causal, _ = derive({}, task="CausalLM", examples=2_000)
    assert causal["learningRate"] == 2e-4 and "headLearningRate" not in causal
    assert causal["perDeviceBatchSize"] == 8 and causal["epochs"] == 3
    assert derive({}, task="CausalLM", method="Full")[0]["learningRate"] == 2e-5
    assert derive({}, method="Full")[0]["learningRate"] == 5e-5


def test_an_effective_batch_gets_a_per_device_batch_that_divides_it():
    out, why = derive({"effectiveBatchSize": 48}, world=2)
    assert out["perDeviceBatchSize"] == 24 and "divisor" in why["perDeviceBatchSize"]
    assert derive({"effectiveBatchSize": 100}, world=1)[0]["perDeviceBatchSize"] == 25
    assert derive({"effectiveBatchSize": 7}, world=1)[0]["perDeviceBatchSize"] == 7


def test_long_runs_warm_up_for_a_smaller_share():
    out, why = derive({"epochs": 3}, examples=100_000)
    assert out["scheduler"]["warmupRatio"] == 0.06 and "> 1000" in why["scheduler.warmupRatio"]


def test_gradient_checkpointing_only_where_activations_fill_memory():
    from kubetune.api.training_defaults import gradient_checkpointing

    small = {"perDeviceBatchSize": 32, "maxSeqLength": 64}
    assert gradient_checkpointing(small, 22_000_000)[0] is False
    assert gradient_checkpointing(small, 7_000_000_000)[0] is True
    assert gradient_checkpointing({"perDeviceBatchSize": 8, "maxSeqLength": 2048}, 100_000_000)[0] is True
    assert gradient_checkpointing({**small, "gradientCheckpointing": True}, 1) == (True, None)


def test_packing_on_gpus_unless_the_user_says():
    from kubetune.api.training_defaults import packing

    assert packing({}, "cuda")[0] is True
    assert packing({}, "cpu") == (False, "accelerator cpu")
    assert packing({"packing": True}, "cpu") == (True, None)


def test_lora_dropout_only_where_the_run_repeats_its_examples_many_times():
    from kubetune.api.training_defaults import lora_dropout

    lora = {"type": "LoRA", "lora": {"rank": 8}}
    two_epochs = {"epochs": 2, "perDeviceBatchSize": 32}
    assert lora_dropout(lora, two_epochs, train_examples=15_000, world_size=1) == (
        0.0, "2.0 passes over the training examples (<= 2)")
    value, why = lora_dropout(lora, {"epochs": 10, "perDeviceBatchSize": 32}, train_examples=1_000, world_size=1)
    assert value == 0.05 and why.startswith("9.9 passes")
    # maxSteps counts too: 300 steps x 8 x 2 ranks over 1,000 examples
    assert lora_dropout(lora, {"maxSteps": 300, "perDeviceBatchSize": 8}, train_examples=1_000, world_size=2)[0] == 0.05
    assert lora_dropout({"type": "QLoRA", "lora": {"dropout": 0.1}}, two_epochs, train_examples=10,
                        world_size=1) == (0.1, None)
    assert lora_dropout({"type": "LoRA", "lora": {"dropout": 0}}, {"epochs": 10, "perDeviceBatchSize": 1},
                        train_examples=10, world_size=1) == (0.0, None)
    assert lora_dropout({"type": "Full"}, two_epochs, train_examples=10, world_size=1) == (None, None)
