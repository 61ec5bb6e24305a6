"""A tiny causal LM that is confident in distribution: words follow a fixed cycle, and the model is taught
the cycle before any adapter is trained on it (a random tiny Llama guesses, whatever the adapter).

Prompts in the cycle's words are in distribution; prompts in `SHIFTED` words are not: the base saw them
followed only by random words, so it answers them unsure (a topic it knows nothing predictable about),
and the adapter's data never holds them. For the generative drift test and bench (docs/drift.md).
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

_CYCLE = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
          "upsilon phi chi psi omega red green blue yellow black white one two three four five six")
WORDS = tuple(_CYCLE.split())
SHIFTED = tuple(f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "po", "ru") for b in ("ba", "de", "fi", "go", "hu", "ja"))
FORMATS = ("prompt-completion", "chat")


@contextlib.contextmanager
def one_thread():
    """Two shared cores: torch's default thread pool oversubscribes them (a tiny step takes 10-100x longer)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pair(rng: random.Random) -> tuple[str, str]:
    """A prompt of 2-9 words of the cycle and its completion, the next 3-5 words."""
    start, k, c = rng.randrange(len(WORDS)), rng.randint(2, 9), rng.randint(3, 5)
    words = [WORDS[(start + i) % len(WORDS)] for i in range(k + c)]
    return " ".join(words[:k]), " ".join(words[k:])


def shifted(rng: random.Random) -> str:
    """A prompt of 2-9 words whose continuation the model never learnt (random in its training)."""
    return " ".join(rng.choice(SHIFTED) for _ in range(rng.randint(2, 9)))


def rows(fmt: str, count: int, seed: int) -> list[dict]:
    """Distinct dataset lines of `fmt` (a repeated one would be dropped from the holdout as leakage)."""
    rng, seen, found = random.Random(seed), set(), []
    while len(found) < count:
        prompt, completion = pair(rng)
        if (prompt, completion) in seen:
            continue
        seen.add((prompt, completion))
        found.append({"prompt": prompt, "completion": completion} if fmt == "prompt-completion" else
                     {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
    return found


def taught_llama(directory: Path, *, steps: int = 150, seed: int = 7) -> Path:
    """A tiny Llama taught the cycle in both renderings (BOS + plain text; the chat template), saved with a
    tokenizer that adds BOS as real Llama tokenizers do (a completion prompt then reads as in training)."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_testing.tiny import make_tiny_llama

    make_tiny_llama(directory, [" ".join(WORDS), " ".join(SHIFTED), "system user assistant"], seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", tokenizer.bos_token_id)])
    model = AutoModelForCausalLM.from_pretrained(directory)
    rng = random.Random(seed)

    def sequence() -> list[int]:
        prompt, completion = pair(rng)
        if rng.random() < 0.2:
            prompt, completion = shifted(rng), " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))
        if rng.random() < 0.5:
            return tokenizer(f"{prompt} {completion}")["input_ids"] + [tokenizer.eos_token_id]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with one_thread():
        for _ in range(steps):
            batch = [sequence() for _ in range(32)]
            width = max(len(s) for s in batch)
            ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in batch])
            labels = torch.tensor([s + [-100] * (width - len(s)) for s in batch])
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def request_body(model: str, prompt: str, *, chat: bool, max_tokens: int, top_logprobs: int) -> dict:
    """A completion or chat request for `prompt` that asks for the top logprobs drift scoring reads."""
    if chat:
        return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "logprobs": True, "top_logprobs": top_logprobs}
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "logprobs": top_logprobs}
