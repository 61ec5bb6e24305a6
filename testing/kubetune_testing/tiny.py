"""Tiny randomly initialised Llama models with a real tokenizer, built offline.

For mechanics (tests, CPU smoke runs of the benchmarks): the weights are random, the tokenizer is a
word-level one trained on the given texts, with BOS/EOS/UNK/PAD and a chat template, so every data
format and method runs exactly as on a real model.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
)


def make_tokenizer(texts: list[str], *, pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"] + (["<pad>"] if pad else [])
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if pad else None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
                 kv_heads: int | None = None, max_positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2)


def make_tiny_llama(directory: Path, texts: list[str], *, seed: int = 0, layers: int = 2, hidden: int = 64,
                    pad_token: bool = True) -> Path:
    """Save a random tiny Llama + tokenizer to `directory` (a `file://` base model)."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer(texts, pad=pad_token)
    torch.manual_seed(seed)
    config = llama_config(len(tokenizer), hidden=hidden, layers=layers)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
