"""A causal LM's drift reference: its own greedy answers to holdout prompts, scored as serving scores them.

Every position of an answer is scored by `kubetune.api.answer_scores` from the full softmax's top
logprobs, the numbers the agent reads from the engine's logprobs on sampled traffic, so the reference
and the traffic are measured alike. docs/drift.md says why and how prompts are taken from each format.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kubetune.api import answer_scores

from . import text

if TYPE_CHECKING:
    from .train import TrainingRun

log = logging.getLogger(__name__)

MAX_PROMPTS = 256  # holdout prompts answered (evenly spread over the holdout): enough for a KS reference


@dataclass
class Answers:
    confidences: list[float]  # per answered prompt: mean top-1 probability over its positions
    entropies: list[float]  # per answered prompt: mean renormalised top-K entropy over its positions
    decoding: dict  # how the answers were generated (recorded in the drift profile)


def prompt_ids(fields: dict, fmt: str, tokenizer, limit: int) -> list[int]:
    """The user's part of one dataset line, as token ids the model answers (at most `limit`).

    prompt-completion: BOS + the prompt, as training renders it. chat: every message before the last
    assistant reply, rendered with the chat template and its generation prompt (as vLLM's chat endpoint
    renders a request), else as training renders turns without a template, plus the assistant header.
    text: there is no user part; BOS + the first half of the text's tokens stands in for one."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if fmt == "prompt-completion":
        ids = bos + _encode(tokenizer, fields["prompt"])
    elif fmt == "chat":
        messages = list(fields["messages"])
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        user = messages[:replies[-1]] if replies else messages
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = [t for piece, _ in text._chat_turns(tokenizer, user) for t in piece]
            ids += _encode(tokenizer, "assistant: ")
    elif fmt == "text":
        words = _encode(tokenizer, fields["text"])
        ids = bos + words[:max(1, len(words) // 2)]
    else:
        raise ValueError(f"dataset format {fmt!r} has no prompts to answer")
    return ids[:limit]


def spread(items: list, limit: int) -> list:
    """At most `limit` items, evenly spaced over the list (first and last kept), in order."""
    if len(items) <= limit:
        return list(items)
    if limit == 1:
        return [items[0]]
    return [items[round(k * (len(items) - 1) / (limit - 1))] for k in range(limit)]


def stop_ids(tokenizer, model) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model config's (as the serving engines stop)."""
    found: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "config", None), "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, int))
    return found


@torch.no_grad()
def greedy_positions(model, prompts: list[list[int]], *, pad_id: int, stops: set[int], max_tokens: int,
                     batch_size: int, device: torch.device, autocast_dtype=None, synced: bool = False,
                     on_batch=None) -> list[list[list[float]]]:
    """Per prompt, per generated position up to and including the stop token that ended it: the top
    `TOP_LOGPROBS` logprobs of the full softmax. The stop token counts as vLLM counts it: its output
    token ids, hence its logprobs, end with the EOS that finished the request (vllm/v1/engine/
    detokenizer.py appends every new token id; the text alone leaves it out). Greedy (argmax) decoding
    with no logits processors, up to `max_tokens` tokens; prompts left-padded in batches. `synced`
    (ZeRO-3): every rank must call this with the same prompts."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_tokens, pad_token_id=pad_id,
                              eos_token_id=sorted(stops) or None, output_logits=True, return_dict_in_generate=True)
    found: list[list[list[float]]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced)
        generated = out.sequences[:, width:]
        steps = min(len(out.logits), generated.shape[1])
        tops = [torch.topk(out.logits[s].float().log_softmax(-1), answer_scores.TOP_LOGPROBS, dim=-1).values.tolist()
                for s in range(steps)]
        tokens = generated.tolist()
        for row in range(len(chunk)):
            positions = []
            for step in range(steps):
                positions.append(tops[step][row])
                if tokens[row][step] in stops:
                    break
            found.append(positions)
        if on_batch is not None:
            on_batch(len(found), len(prompts))
    return found


def measure(run: TrainingRun) -> Answers | None:
    """The candidate's greedy answers to (up to `MAX_PROMPTS`) holdout prompts, scored; None where this
    rank does not take part or there is nothing to answer. Under ZeRO-3 every rank generates (each
    forward is a collective); otherwise rank 0 alone does."""
    runner, spec = run.runner, run.spec
    zero3 = runner.deepspeed is not None and spec["distributed"]["deepspeed"]["zeroStage"] == 3
    if spec["task"] == "SequenceClassification" or not run.loaded.validation or not (zero3 or run.dist.is_main):
        return None
    fmt, limit = spec["dataset"]["format"], spec["training"]["maxSeqLength"]
    prompts = [prompt_ids(r.fields, fmt, run.tokenizer, limit) for r in spread(run.loaded.validation, MAX_PROMPTS)]
    prompts = [p for p in prompts if p]
    if not prompts:
        return None
    max_tokens = answer_scores.REFERENCE_MAX_TOKENS
    log.info("answering holdout prompts for the drift reference", extra={"prompts": len(prompts),
                                                                         "maxTokens": max_tokens})
    run.progress.update(stage="evaluating", force=True, evaluationSet="drift reference answers")

    def progress(done: int, total: int) -> None:
        log.info("drift reference answers", extra={"answered": done, "prompts": total})

    runner.train(False)
    try:
        autocast = runner.autocast_dtype if runner.deepspeed is None else None
        answers = greedy_positions(runner.module, prompts, pad_id=run.pad_id,
                                   stops=stop_ids(run.tokenizer, runner.module), max_tokens=max_tokens,
                                   batch_size=run.schedule.per_device_batch, device=run.dist.device,
                                   autocast_dtype=autocast, synced=zero3, on_batch=progress)
    finally:
        runner.train(True)
    scored = [s for s in (answer_scores.answer_score(a) for a in answers) if s is not None]
    decoding = {"method": "greedy", "maxTokens": max_tokens, "topLogprobs": answer_scores.TOP_LOGPROBS,
                "stopTokenScored": True, "prompts": len(prompts), "answered": len(scored)}
    return Answers([c for c, _ in scored], [e for _, e in scored], decoding)


def _encode(tokenizer, value: str) -> list[int]:
    return tokenizer(value, add_special_tokens=False)["input_ids"]
