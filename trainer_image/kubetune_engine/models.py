"""The torch side of the CPU engine: base models, LoRA adapters, greedy generation, classification.

Not thread-safe: the server makes every call from one worker thread at a time. How bases, adapters,
their internal names and the CPU cache of adapter weights are kept: docs/serving-runtimes.md.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .pooling import ARCHITECTURE, use_pooling
from .pooling import MODES as POOLING_MODES
from .vllm_api import (
    FIDELITIES,
    VLLM,
    EngineError,
    adapter_not_found,
    adapter_rank,
    already_loaded,
    bad_request,
    cpu_loras_error,
    model_not_found,
    no_adapter_found,
    peft_refusals,
)

log = logging.getLogger(__name__)

CAUSAL_LM = "causal-lm"
CLASSIFICATION = "classification"
TASKS = ("auto", CAUSAL_LM, CLASSIFICATION)
LABELS_FILE = "labels.json"  # written by kubetune_trainer next to a classification adapter's head
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


def quiet_libraries() -> None:
    """No progress bars or load reports from transformers in the engine's JSON log."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def detect_task(model_dir: Path) -> str:
    """`architectures` naming a causal LM (`LlamaForCausalLM`) -> causal-lm; anything else (a bare
    encoder, a `...ForSequenceClassification`) is served for classification."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{model_dir}: cannot read config.json: {exc}") from exc
    architectures = config.get("architectures") or []
    return CAUSAL_LM if any("ForCausalLM" in a for a in architectures) else CLASSIFICATION


# --- records ---------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One base model in memory and the adapters attached to it."""

    key: tuple  # (task, the adapters' label list or None for the base's own head, the head's pooling)
    task: str
    labels: tuple[str, ...] | None  # classification: class names in id order
    raw: torch.nn.Module  # the transformers model (peft injects its layers into it in place)
    peft: object | None = None  # the PeftModel wrapping `raw`, once an adapter was attached
    adapters: set[str] = field(default_factory=set)  # internal adapter names


@dataclass(frozen=True)
class Adapter:
    name: str  # served name
    internal: str  # peft adapter name
    path: str
    task: str
    rank: int
    labels: tuple[str, ...] | None
    instance: tuple  # Instance.key
    created: int


@dataclass
class Generation:
    prompt_tokens: int
    text: str
    finish_reason: str  # "length" | "stop"
    completion_tokens: int  # generated tokens, the end-of-sequence token included
    tokens: list[str]  # the text's pieces (the end-of-sequence token is not part of the text)
    token_ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[str, float]]]  # per token, the `top_n` most likely as (piece, logprob); [] without
    # the last token is the end-of-sequence that stopped it: in tokens and logprobs as vLLM returns it
    # (its output token ids end with it), but not in the text
    ends_with_eos: bool = False


@dataclass
class Classification:
    label: str
    probs: list[float]
    prompt_tokens: int


# --- the host --------------------------------------------------------------------------------------


class ModelHost:
    """The base model, its instances and the registered adapters, of which at most `max_cpu_loras`
    hold their weights in memory (vLLM's LRU cache: the least recently used is evicted, and reloaded
    from its lora_path when next asked for). `max_loras`, the adapters of one batch in vLLM, is met
    by construction: each request is served alone, with one adapter."""

    def __init__(self, model_dir: Path, *, served_name: str, task: str = "auto", max_loras: int = 4,
                 max_cpu_loras: int | None = None, max_lora_rank: int = 64, max_model_len: int | None = None,
                 fidelity: str = VLLM):
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
        if fidelity not in FIDELITIES:
            raise ValueError(f"fidelity {fidelity!r} is not one of {', '.join(FIDELITIES)}")
        if error := cpu_loras_error(max_loras, max_cpu_loras):
            raise ValueError(error)
        self.fidelity = fidelity
        self.max_cpu_loras = max_cpu_loras or max_loras
        self.resident: OrderedDict[str, None] = OrderedDict()  # adapters with weights in memory, LRU first
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.requested_task = task
        self.task = task  # resolved by load_base
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self.tokenizer = None
        self.instances: dict[tuple, Instance] = {}
        self.adapters: dict[str, Adapter] = {}
        self._registry = threading.Lock()  # guards `adapters` against `listing()` from the event loop
        self._next_internal = 0
        self.cancelled = threading.Event()  # set by the server when the request being served was abandoned

    # --- base ------------------------------------------------------------------------------------

    def load_base(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"--model {self.model_dir}: no config.json there")
        self.task = detect_task(self.model_dir) if self.requested_task == "auto" else self.requested_task
        config = AutoConfig.from_pretrained(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
        limits = [n for n in limits if isinstance(n, int) and n > 0]
        if self.max_model_len is None:
            tokenizer_max = getattr(self.tokenizer, "model_max_length", None)
            self.max_model_len = limits[0] if limits else (
                tokenizer_max if isinstance(tokenizer_max, int) and tokenizer_max < 1_000_000 else 2048)
        elif limits:
            self.max_model_len = min(self.max_model_len, limits[0])
        self.default_key = (self.task, None, None)
        self._instance(*self.default_key)
        log.info("base model loaded", extra={"model": str(self.model_dir), "task": self.task,
                                             "max_model_len": self.max_model_len,
                                             "labels": list(self.default.labels or [])})

    @property
    def default(self) -> Instance:
        return self.instances[self.default_key]

    def _instance(self, task: str, labels: tuple[str, ...] | None, pooling: str | None) -> Instance:
        """The instance for (task, labels, pooling), created on first use; `labels=None`: the base's own
        head (pooling as its config's `kubetune_pooling` says, when a merged kubetune model has one)."""
        key = (task, labels, pooling)
        if key in self.instances:
            return self.instances[key]
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        torch.manual_seed(0)  # a fresh classification head is the same in every run
        if task == CAUSAL_LM:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        elif labels is None:
            model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, dtype=torch.float32)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                self.model_dir, dtype=torch.float32, num_labels=len(labels),
                id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
        model.eval()
        if task == CLASSIFICATION:
            use_pooling(model, pooling if labels is not None else getattr(model.config, "kubetune_pooling", None))
            if model.config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
                model.config.pad_token_id = self.tokenizer.pad_token_id
            labels = tuple(str(model.config.id2label[i]) for i in range(model.config.num_labels))
        instance = Instance(key, task, labels, model)
        self.instances[key] = instance
        log.info("model instance created", extra={"task": task, "labels": list(labels or [])})
        return instance

    # --- adapters --------------------------------------------------------------------------------

    def listing(self) -> list[Adapter]:
        with self._registry:
            return list(self.adapters.values())

    def load_adapter(self, name: str, path: str) -> Adapter:
        """Register an adapter (any number: vLLM refuses none for count) and bring its weights into
        the CPU cache, evicting the least recently used when it is full."""
        if name in self.adapters:
            raise already_loaded(name)
        if name == self.served_name:
            raise bad_request(f"The lora adapter name '{name}' is the base model's served name.")
        directory = Path(path)
        if not (directory / ADAPTER_CONFIG).is_file():
            raise no_adapter_found(name, path)
        adapter_config = self._adapter_config(name, directory)
        labels, pooling = self._head(name, directory)
        task = CLASSIFICATION if labels is not None or adapter_config.get("task_type") == "SEQ_CLS" else CAUSAL_LM
        if self.requested_task != "auto" and task != self.task:
            raise bad_request(f"Loading lora {name} failed: it is a {task} adapter and this engine serves "
                              f"{self.task} (--task {self.requested_task}).")
        internal = f"a{self._next_internal}"
        self._next_internal += 1
        adapter = Adapter(name, internal, path, task, adapter_rank(adapter_config), labels, (task, labels, pooling),
                          int(time.time()))
        self._make_resident(adapter)
        with self._registry:
            self.adapters[name] = adapter
        log.info("adapter loaded", extra={"lora_name": name, "lora_path": path, "task": task, "rank": adapter.rank,
                                          "internal": internal})
        return adapter

    def unload_adapter(self, name: str) -> None:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise adapter_not_found(name)
        with self._registry:
            del self.adapters[name]
        if name in self.resident:
            del self.resident[name]
            self._detach(self.instances[adapter.instance], adapter.internal)
        log.info("adapter unloaded", extra={"lora_name": name, "internal": adapter.internal})

    def _make_resident(self, adapter: Adapter) -> None:
        """The adapter's weights in memory, most recently used; the least recently used other adapters
        are evicted first when the cache holds `max_cpu_loras`."""
        if adapter.name in self.resident:
            self.resident.move_to_end(adapter.name)
            return
        while len(self.resident) >= self.max_cpu_loras:
            evicted = self.adapters[next(iter(self.resident))]
            del self.resident[evicted.name]
            self._detach(self.instances[evicted.instance], evicted.internal)
            log.info("adapter evicted from the CPU cache", extra={"lora_name": evicted.name,
                                                                  "resident": len(self.resident)})
        try:
            instance = self._instance(*adapter.instance)
        except Exception as exc:
            raise bad_request(f"Loading lora {adapter.name} failed: the base model {self.model_dir} cannot be "
                              f"loaded for {adapter.task}: {type(exc).__name__}: {exc}") from exc
        try:
            self._attach(instance, adapter.internal, Path(adapter.path))
        except Exception as exc:
            log.warning("adapter refused", extra={"lora_name": adapter.name, "lora_path": adapter.path,
                                                  "error": f"{type(exc).__name__}: {exc}"})
            self._detach(instance, adapter.internal)
            reloading = " (reloaded after its eviction from the CPU cache)" if adapter.name in self.adapters else ""
            raise bad_request(f"Loading lora {adapter.name} failed{reloading}: the adapter is corrupt or does not "
                              f"match the base model {self.model_dir}: {type(exc).__name__}: {exc}") from exc
        self.resident[adapter.name] = None
        log.info("adapter in the CPU cache", extra={"lora_name": adapter.name, "resident": len(self.resident),
                                                    "max_cpu_loras": self.max_cpu_loras})

    def _adapter_config(self, name: str, directory: Path) -> dict:
        """adapter_config.json, refused as vLLM's PEFTHelper refuses it, then as peft would."""
        config_path = directory / ADAPTER_CONFIG
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise bad_request(f"Loading lora {name} failed: {config_path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise bad_request(f"Loading lora {name} failed: {config_path} is not a JSON object")
        refusals = peft_refusals(config, max_lora_rank=self.max_lora_rank, fidelity=self.fidelity)
        if refusals:
            raise bad_request(" ".join(refusals))
        if config.get("peft_type") != "LORA":
            raise bad_request(f"Loading lora {name} failed: {config_path} is not a LoRA adapter config "
                              f"(peft_type {config.get('peft_type')!r})")
        if not any((directory / weights).is_file() for weights in ADAPTER_WEIGHTS):
            raise bad_request(f"Loading lora {name} failed: {directory} has no {' or '.join(ADAPTER_WEIGHTS)}")
        return config

    @staticmethod
    def _head(name: str, directory: Path) -> tuple[tuple[str, ...] | None, str | None]:
        """A classification adapter's class names and pooling (labels.json); (None, None) for a causal one."""
        path = directory / LABELS_FILE
        if not path.exists():
            return None, None
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise bad_request(f"Loading lora {name} failed: {path} is not valid JSON: {exc}") from exc
        labels = document.get("labels") if isinstance(document, dict) else None
        if not isinstance(labels, list) or len(labels) < 1 or not all(isinstance(x, str) for x in labels) \
                or len(set(labels)) != len(labels):
            raise bad_request(f"Loading lora {name} failed: {path} must be {{\"labels\": [distinct names]}}")
        pooling = document.get("pooling")
        if pooling not in (None, ARCHITECTURE, *POOLING_MODES):
            raise bad_request(f"Loading lora {name} failed: {path}: pooling {pooling!r} is not one of "
                              f"{', '.join((ARCHITECTURE, *POOLING_MODES))}")
        return tuple(labels), pooling

    def _attach(self, instance: Instance, internal: str, directory: Path) -> None:
        from peft import PeftConfig, PeftModelForCausalLM, PeftModelForSequenceClassification

        instance.adapters.add(internal)
        if instance.peft is None:
            # Wrap first, load the weights second: a failed load then leaves a wrapper `_detach` can
            # clean up, never a base model with half-injected layers and no handle on them.
            config = PeftConfig.from_pretrained(str(directory))
            config.inference_mode = True
            cls = PeftModelForCausalLM if instance.task == CAUSAL_LM else PeftModelForSequenceClassification
            instance.peft = cls(instance.raw, config, adapter_name=internal)
        instance.peft.load_adapter(str(directory), adapter_name=internal, is_trainable=False)
        instance.peft.eval()

    def _detach(self, instance: Instance, internal: str) -> None:
        """Remove an adapter (loaded or half-loaded) from its instance; free the instance when it is an
        extra one (another label list) and nothing uses it any more."""
        instance.adapters.discard(internal)
        peft = instance.peft
        try:
            if peft is not None and internal in peft.peft_config:
                peft.delete_adapter(internal)
            elif peft is None and _has_peft_layers(instance.raw):
                raise RuntimeError("the base model holds peft layers but no PeftModel wraps it")
        except Exception:
            log.exception("could not remove the adapter cleanly: reloading its base model",
                          extra={"internal": internal})
            self._rebuild(instance)
            return
        if not instance.adapters and instance.key != self.default_key:
            del self.instances[instance.key]
            log.info("model instance released", extra={"task": instance.task, "labels": list(instance.labels or [])})

    def _rebuild(self, instance: Instance) -> None:
        """Last resort after peft failed to clean up: a fresh base, the instance's adapters reloaded."""
        del self.instances[instance.key]
        keep = [a for a in self.listing() if a.instance == instance.key and a.internal in instance.adapters]
        if not keep and instance.key != self.default_key:
            return
        fresh = self._instance(*instance.key)
        for adapter in keep:
            self._attach(fresh, adapter.internal, Path(adapter.path))

    # --- requests --------------------------------------------------------------------------------

    def resolve(self, model: object) -> tuple[Instance, Adapter | None]:
        """The instance and adapter behind a request's `model` (absent: the base, as vLLM does); an
        adapter evicted from the CPU cache is reloaded from its lora_path first."""
        if model is None or model == self.served_name:
            return self.default, None
        adapter = self.adapters.get(model) if isinstance(model, str) else None
        if adapter is None:
            raise model_not_found(model)
        self._make_resident(adapter)
        return self.instances[adapter.instance], adapter

    @contextlib.contextmanager
    def _active(self, instance: Instance, adapter: Adapter | None) -> Iterator[torch.nn.Module]:
        peft = instance.peft
        with torch.inference_mode():
            if adapter is not None:
                peft.set_adapter(adapter.internal)
                yield instance.raw
            elif peft is not None and peft.peft_config:
                if peft.active_adapter not in peft.peft_config:  # peft may still name a deleted adapter
                    peft.set_adapter(next(iter(peft.peft_config)))
                with peft.disable_adapter():
                    yield instance.raw
            else:
                yield instance.raw  # no adapters (left): injected layers without adapters are the base

    def encode(self, text: str, *, special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    def render_chat(self, messages: list[dict]) -> str:
        """The tokenizer's chat template with the generation prompt; else one `role: content` line each."""
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # a template that raises (roles out of order, ...) is the request's fault
                raise bad_request(f"the chat template refused the messages: {type(exc).__name__}: {exc}") from exc
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise bad_request("The prompt is empty.")
        if prompt_tokens + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
                f"completion). Please reduce the length of the prompt or completion.")

    def _stop_ids(self, instance: Instance) -> set[int]:
        ids: set[int] = set()
        sources = [self.tokenizer.eos_token_id, instance.raw.config.eos_token_id,
                   getattr(getattr(instance.raw, "generation_config", None), "eos_token_id", None)]
        for value in sources:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def generate(self, instance: Instance, adapter: Adapter | None, prompt_ids: list[int], *, max_tokens: int,
                 top_n: int | None = None, stop: list[str] | None = None, ignore_eos: bool = False) -> Generation:
        """Greedy decoding with a KV cache; the log-probability of every chosen token (and the top
        `top_n` alternatives) comes from the same log-softmax that chose it."""
        if instance.task != CAUSAL_LM:
            raise bad_request(f"The model `{adapter.name if adapter else self.served_name}` is a classification "
                              "model: it does not support text generation (use /classify).")
        self.check_length(len(prompt_ids), max_tokens)
        stop_ids = set() if ignore_eos else self._stop_ids(instance)
        out_ids: list[int] = []
        logprobs: list[float] = []
        top_ids: list[list[tuple[int, float]]] = []
        finish, generated, cut_text = "length", 0, None
        cache_arg = _cache_argument(instance.raw)
        with self._active(instance, adapter) as model:
            input_ids = torch.tensor([prompt_ids], dtype=torch.long)
            past = None
            for _ in range(max_tokens):
                if self.cancelled.is_set():
                    raise EngineError(499, "CancelledError", "The request was cancelled.")
                output = model(input_ids=input_ids, use_cache=True, **({cache_arg: past} if past is not None else {}))
                past = getattr(output, cache_arg)
                scores = torch.log_softmax(output.logits[0, -1].float(), dim=-1)
                token = int(torch.argmax(scores))
                generated += 1
                out_ids.append(token)
                logprobs.append(_finite(float(scores[token])))
                if top_n:
                    values, indices = torch.topk(scores, min(top_n, scores.numel()))
                    top_ids.append([(int(i), _finite(float(v))) for v, i in zip(values, indices, strict=True)])
                if token in stop_ids:
                    finish = "stop"
                    break
                if stop:
                    text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
                    if cut >= 0:
                        cut_text, finish = text[:cut], "stop"
                        break
                input_ids = torch.tensor([[token]], dtype=torch.long)
        ends_with_eos = bool(out_ids) and out_ids[-1] in stop_ids
        text_ids = out_ids[:-1] if ends_with_eos else out_ids
        text = cut_text if cut_text is not None else self.tokenizer.decode(text_ids, skip_special_tokens=True)
        pieces = [self._piece(out_ids[:i], token) for i, token in enumerate(out_ids)]
        top = [[(self._piece(out_ids[:i], alt), value) for alt, value in row] for i, row in enumerate(top_ids)]
        return Generation(len(prompt_ids), text, finish, generated, pieces, out_ids, logprobs, top, ends_with_eos)

    def _piece(self, before: list[int], token: int) -> str:
        """A token's share of the decoded text after `before` (a leading space included), so that the
        pieces of a generation join into its text."""
        previous = self.tokenizer.decode(before, skip_special_tokens=True)
        current = self.tokenizer.decode([*before, token], skip_special_tokens=True)
        if current.startswith(previous) and current != previous:
            return current[len(previous):]
        return self.tokenizer.decode([token])

    def classify(self, instance: Instance, adapter: Adapter | None, texts: list[str]) -> list[Classification]:
        if instance.task != CLASSIFICATION:
            raise bad_request(f"The model `{adapter.name if adapter else self.served_name}` is a causal language "
                              "model: it does not support classification (use /v1/completions).")
        encoded = [self.encode(text, special_tokens=True) for text in texts]
        for ids in encoded:
            self.check_length(len(ids), 0)
        results = []
        with self._active(instance, adapter) as model:
            for ids in encoded:  # one input per forward: exact, no padding to get wrong, and CPU-sized
                logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float()
                probs = torch.softmax(logits, dim=-1).tolist()
                best = max(range(len(probs)), key=probs.__getitem__)
                results.append(Classification(instance.labels[best], probs, len(ids)))
        return results


def _cache_argument(model: torch.nn.Module) -> str:
    """transformers 5.x calls the KV cache `cache` (argument and output); 4.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _has_peft_layers(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


def _finite(value: float) -> float:
    """JSON has no -inf: a log-probability that underflowed is reported as -9999.0 (as vLLM does)."""
    return value if math.isfinite(value) else -9999.0
