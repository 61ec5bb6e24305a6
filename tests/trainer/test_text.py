"""Tokenisation, loss masks and padding-free packing on a real (tiny) model and tokenizer."""

from __future__ import annotations

import torch

from kubetune_testing.tiny import make_tokenizer
from kubetune_trainer import text
from kubetune_trainer.data import Record


def _record(line: int, **fields) -> Record:
    return Record(line=line, source="train", fields=fields)


def tokenizer(pad: bool = True):
    return make_tokenizer(["the cat sat on the mat", "hello there how are you", "system user assistant"], pad=pad)


def test_prompt_tokens_are_masked_and_eos_is_trained():
    tok = tokenizer()
    examples, stats = text.tokenize([_record(1, prompt="the cat", completion="sat on the mat")],
                                    "prompt-completion", tok, 64)
    example = examples[0]
    assert example.input_ids[0] == tok.bos_token_id and example.input_ids[-1] == tok.eos_token_id
    assert example.labels[-1] == tok.eos_token_id  # EOS carries a label: the model learns to stop
    prompt_length = 1 + 2  # BOS + "the cat"
    assert example.labels[:prompt_length] == [text.IGNORE] * prompt_length
    assert example.labels[prompt_length:] == example.input_ids[prompt_length:]
    assert stats.trainable_tokens == 5  # "sat on the mat" + EOS


def test_chat_trains_only_assistant_turns():
    tok = tokenizer()
    messages = [{"role": "system", "content": "hello"}, {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "hello there"}]
    example = text.tokenize([_record(1, messages=messages)], "chat", tok, 64)[0][0]
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != text.IGNORE]
    assert tok.decode(trained) == "<|assistant|> hello there </s>" or tok.decode(trained).endswith("hello there </s>")
    assert "how" not in tok.decode(trained)


def test_truncation_is_counted():
    tok = tokenizer()
    records = [_record(1, text="the cat sat on the mat " * 5), _record(2, text="hello")]
    examples, stats = text.tokenize(records, "text", tok, 8)
    assert stats.truncated == 1 and stats.truncated_lines == [1]
    assert len(examples[0].input_ids) == 8 and examples[0].truncated


def test_pad_token_is_never_silently_eos():
    tok = tokenizer(pad=False)
    note = text.choose_pad_token(tok)
    assert tok.pad_token == "<unk>" and "unknown token" in note
    assert tok.pad_token_id != tok.eos_token_id


def test_packing_has_no_cross_contamination(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    a = text.Example(input_ids=[1, 5, 6, 7, 8, 2], labels=[-100, 5, 6, 7, 8, 2])
    b = text.Example(input_ids=[1, 9, 10, 11, 2], labels=[-100, 9, 10, 11, 2])
    batch = text.packed_batch([a, b], torch)
    assert batch.total_tokens == batch.real_tokens == 11  # no padding at all
    assert batch.tensors["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    assert batch.tensors["labels"][0, 6].item() == text.IGNORE  # b's first token is not predicted from a
    with torch.no_grad():
        packed = model(input_ids=batch.tensors["input_ids"], position_ids=batch.tensors["position_ids"],
                       use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a.input_ids]), use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits[0]
    assert torch.allclose(packed[:6], alone_a, atol=1e-5)
    assert torch.allclose(packed[6:], alone_b, atol=1e-5)


def test_dynamic_padding_pads_to_the_longest_in_the_batch_only():
    short = text.Example(input_ids=[1, 2, 3], label=0)
    long = text.Example(input_ids=[1, 2, 3, 4, 5], label=1)
    batch = text.padded_batch([short, long], 0, torch)
    assert batch.tensors["input_ids"].shape == (2, 5)
    assert batch.real_tokens == 8 and batch.total_tokens == 10
    assert batch.tensors["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_length_grouping_keeps_similar_lengths_together():
    lengths = [3, 50, 4, 48, 5, 47, 6, 49] * 4
    batches = text.batch_order(lengths, 4, seed=1, group_by_length=True)
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spreads) <= 5
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_reference_prompts_are_the_users_part_of_each_format():
    from kubetune_trainer import answers

    tok = tokenizer()
    bos, say = tok.bos_token_id, lambda s: tok(s, add_special_tokens=False)["input_ids"]
    pair = {"prompt": "the cat", "completion": "sat on the mat"}
    assert answers.prompt_ids(pair, "prompt-completion", tok, 64) == [bos, *say("the cat")]
    chat = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "how are"},
                         {"role": "user", "content": "you"}, {"role": "assistant", "content": "the mat"}]}
    rendered = tok.apply_chat_template(chat["messages"][:3], tokenize=False, add_generation_prompt=True)
    assert answers.prompt_ids(chat, "chat", tok, 64) == say(rendered)  # every turn before the last reply
    assert answers.prompt_ids({"text": "the cat sat on the mat"}, "text", tok, 64) == [bos, *say("the cat sat")]
    assert answers.prompt_ids(pair, "prompt-completion", tok, 2) == [bos, *say("the")]
    tok.chat_template = None  # no template: turns as training renders them, then the assistant's header
    assert answers.prompt_ids(chat, "chat", tok, 64)[-len(say("assistant: ")):] == say("assistant: ")
    assert answers.spread(list(range(10)), 4) == [0, 3, 6, 9] and answers.spread([1, 2], 4) == [1, 2]
