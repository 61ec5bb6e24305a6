"""Tokenisation, loss masks and batching: what turns validated records into training rows.

Loss only on what the model must produce, EOS always trained on, masks from lengths (never from pad
ids); causal LM rows packed padding-free, classification length-grouped. Details: docs/trainer.md.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | None = None  # causal LM: per token, IGNORE where not trained on
    label: int | None = None  # sequence classification: class id
    truncated: bool = False
    line: int = 0


@dataclass
class TokenStats:
    examples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    truncated_lines: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"examples": self.examples, "tokens": self.tokens, "trainableTokens": self.trainable_tokens,
                "truncated": self.truncated, "truncatedLines": self.truncated_lines[:20]}


def choose_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token that is not its EOS when one exists, and say what was done.

    With our length-based masks EOS would still be trained on even if it doubled as padding, but a
    distinct pad keeps the saved tokenizer safe for anyone who collates with it later.
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return f"pad token {tokenizer.pad_token!r} (the tokenizer's own)"
    if tokenizer.unk_token is not None and tokenizer.unk_token != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return f"pad token set to the unknown token {tokenizer.unk_token!r} (no distinct pad token; EOS stays trained)"
    # No spare special token: padding positions are masked by length, never by id, so reusing EOS's
    # id for padding cannot remove real EOS tokens from the loss. Say so instead of hiding it.
    tokenizer.pad_token = eos
    return (f"pad token is the EOS token {eos!r} for padding positions only; labels are masked by length, so "
            "EOS is still trained on")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; causal LM training needs one to learn where to stop")
    return [tokenizer.eos_token_id]


def _chat_turns(tokenizer, messages: list[dict]) -> list[tuple[list[int], bool]]:
    """(tokens, trainable) per turn. Uses the model's chat template when it has one: each turn's tokens
    are what the template adds when that turn is appended, so masks line up with what serving sees."""
    if getattr(tokenizer, "chat_template", None):
        pieces, previous = [], []
        for index in range(len(messages)):
            ids = tokenizer.apply_chat_template(messages[: index + 1], tokenize=True)
            if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            ids = list(ids)
            shared = 0
            while shared < min(len(ids), len(previous)) and ids[shared] == previous[shared]:
                shared += 1
            pieces.append((ids[shared:], messages[index]["role"] == "assistant"))
            previous = ids
        return pieces
    pieces = [(_bos(tokenizer), False)]
    for message in messages:
        trainable = message["role"] == "assistant"
        header = _encode(tokenizer, f"{message['role']}: ")
        body = _encode(tokenizer, message["content"]) + (_eos(tokenizer) if trainable else _encode(tokenizer, "\n"))
        pieces.append((header, False))
        pieces.append((body, trainable))
    return pieces


def tokenize(records, fmt: str, tokenizer, max_length: int, label_ids: dict[str, int] | None = None):
    """Records (from `data.load_dataset`) -> Examples, plus counts of tokens and truncation."""
    examples, stats = [], TokenStats()
    for record in records:
        fields = record.fields
        if fmt == "text-label":
            ids = tokenizer(fields["text"], truncation=False)["input_ids"]
            truncated = len(ids) > max_length
            if truncated:  # keep the closing special token ([SEP]) a classifier expects
                ids = ids[: max_length - 1] + ids[-1:]
            example = Example(input_ids=ids, label=label_ids[fields["label"]], truncated=truncated, line=record.line)
            stats.trainable_tokens += 1
        else:
            if fmt == "prompt-completion":
                pieces = [(_bos(tokenizer) + _encode(tokenizer, fields["prompt"]), False),
                          (_encode(tokenizer, fields["completion"]) + _eos(tokenizer), True)]
            elif fmt == "chat":
                pieces = _chat_turns(tokenizer, fields["messages"])
            elif fmt == "text":
                pieces = [(_bos(tokenizer) + _encode(tokenizer, fields["text"]) + _eos(tokenizer), True)]
            else:
                raise ValueError(f"unknown dataset format {fmt!r}")
            ids, labels = [], []
            for tokens, trainable in pieces:
                ids.extend(tokens)
                labels.extend(tokens if trainable else [IGNORE] * len(tokens))
            truncated = len(ids) > max_length
            ids, labels = ids[:max_length], labels[:max_length]
            example = Example(input_ids=ids, labels=labels, truncated=truncated, line=record.line)
            stats.trainable_tokens += sum(1 for label in labels if label != IGNORE)
        stats.examples += 1
        stats.tokens += len(example.input_ids)
        if example.truncated:
            stats.truncated += 1
            stats.truncated_lines.append(record.line)
        examples.append(example)
    return examples, stats


# --- batching ----------------------------------------------------------------------------------------


def batch_order(lengths: list[int], batch_size: int, seed: int, group_by_length: bool) -> list[list[int]]:
    """Indices of each micro-batch for one epoch, shuffled with `seed`.

    Length grouping sorts within mega-batches of 50 batches, so a batch holds similar lengths (little
    padding) while the order across batches stays random.
    """
    indices = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(indices)
    if group_by_length:
        mega = batch_size * 50
        indices = [i for start in range(0, len(indices), mega)
                   for i in sorted(indices[start:start + mega], key=lambda i: -lengths[i])]
    batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    tensors: dict  # keyword arguments of the model's forward
    real_tokens: int  # non-padding tokens
    total_tokens: int  # including padding


def packed_batch(examples: list[Example], torch) -> Batch:
    """One padding-free row: sequences concatenated, position ids restarting per sequence."""
    ids, positions, labels = [], [], []
    for example in examples:
        ids.extend(example.input_ids)
        positions.extend(range(len(example.input_ids)))
        labels.extend([IGNORE, *example.labels[1:]])  # the first token is not predicted from the previous sequence
    tensors = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
    }
    return Batch(tensors, len(ids), len(ids))


def padded_batch(examples: list[Example], pad_id: int, torch) -> Batch:
    """Dynamic padding to the longest sequence of the batch, with an attention mask."""
    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    tensors = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
    real = sum(len(e.input_ids) for e in examples)
    if examples[0].label is not None:
        tensors["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        labels = [e.labels + [IGNORE] * (width - len(e.labels)) for e in examples]
        tensors["labels"] = torch.tensor(labels, dtype=torch.long)
    return Batch(tensors, real, width * len(examples))


def make_batch(examples: list[Example], *, pack: bool, pad_id: int, torch) -> Batch:
    if pack and examples[0].labels is not None:
        return packed_batch(examples, torch)
    return padded_batch(examples, pad_id, torch)
