"""The classification head pools as the checkpoint was trained (MiniLM: mean pooling), the trainer and
the serving engine pool the same way, and padding never changes a prediction."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kubetune_engine import pooling as engine_pooling
from kubetune_trainer import pooling

from .test_minilm_clinc import minilm_dir


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_the_shipped_minilm_says_mean_pooling(tmp_path):
    assert pooling.checkpoint_pooling(minilm_dir()) == ("mean", "1_Pooling/config.json: pooling_mode_mean")
    assert pooling.checkpoint_pooling(tmp_path)[0] == pooling.ARCHITECTURE
    modules = [{"path": "pool", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert pooling.checkpoint_pooling(tmp_path)[0] == "cls"
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    mode, why = pooling.checkpoint_pooling(tmp_path)
    assert mode == pooling.ARCHITECTURE and "no single pooling" in why


@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
def test_padding_does_not_change_what_a_pooled_head_predicts(mode):
    model = tiny_bert()
    assert pooling.apply_pooling(model, mode)[0] == mode
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 6, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :3]).logits
    torch.testing.assert_close(batched[1:], alone)


def test_the_engine_pools_as_the_trainer_did():
    trained, served = tiny_bert(), tiny_bert()
    served.load_state_dict(trained.state_dict())
    pooling.apply_pooling(trained, "mean")
    engine_pooling.use_pooling(served, "mean")
    ids = torch.tensor([[2, 5, 7, 9, 3]])
    with torch.no_grad():
        architecture = tiny_bert()(input_ids=ids).logits
        torch.testing.assert_close(trained(input_ids=ids).logits, served(input_ids=ids).logits)
        assert not torch.allclose(trained(input_ids=ids).logits, architecture)


def test_a_model_without_a_pooler_keeps_its_own_head():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32, num_labels=2))
    mode, why = pooling.apply_pooling(model, "mean")
    assert mode == pooling.ARCHITECTURE and "no pooler" in why
    with pytest.raises(ValueError, match="no pooler"):
        engine_pooling.use_pooling(model, "mean")
