"""What vLLM v0.11.0 answers and refuses, so the CPU engine answers alike (pure: no torch, no HTTP).

Imitated from vLLM's source: `entrypoints/openai/protocol.py` (ErrorResponse/ErrorInfo), `serving_models.py`
(load/unload checks), `lora/peft_helper.py` (PEFTHelper.from_dict, validate_legal), `lora/worker_manager.py`
("No adapter found" -> 404), `config/lora.py` (LoRAConfig). Remaining differences: docs/serving-runtimes.md.
"""

from __future__ import annotations

VLLM = "vllm"  # refuse what vLLM refuses (the default)
KUBETUNE = "kubetune"  # the kubetune-cpu runtime: also serves classification adapters (modules_to_save)
FIDELITIES = (VLLM, KUBETUNE)
MESSAGE_LIMIT = 2000
# PEFTHelper's dataclass fields without a default: from_dict refuses a config missing any of them
REQUIRED_CONFIG_FIELDS = ("lora_alpha", "r", "target_modules")


class EngineError(Exception):
    """A request the engine refuses: becomes vLLM's error body with this status and type."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param = status, kind, message[:MESSAGE_LIMIT], param


def error_body(status: int, kind: str, message: str, param: str | None = None) -> dict:
    """vLLM's ErrorResponse since 0.10.1: the OpenAI shape, `code` being the HTTP status."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def bad_request(message: str) -> EngineError:
    return EngineError(400, "BadRequestError", message)


def invalid_input(message: str) -> EngineError:
    """serving_models' own checks (names missing, a duplicate name) answer 400 of this type."""
    return EngineError(400, "InvalidUserInput", message)


def not_found(message: str) -> EngineError:
    return EngineError(404, "NotFoundError", message)


def model_not_found(name: object) -> EngineError:
    return not_found(f"The model `{name}` does not exist.")


def names_missing() -> EngineError:
    return invalid_input("Both 'lora_name' and 'lora_path' must be provided.")


def already_loaded(name: str) -> EngineError:
    return invalid_input(f"The lora adapter '{name}' has already been loaded.")


def unload_name_missing() -> EngineError:
    return invalid_input("either 'lora_name' and 'lora_int_id' needs to be provided.")


def adapter_not_found(name: str) -> EngineError:
    return not_found(f"The lora adapter '{name}' cannot be found.")


def no_adapter_found(name: str, path: str) -> EngineError:
    """The worker's FileNotFoundError (no directory, no adapter_config.json); serving_models answers
    404 NotFoundError for any load error containing "No adapter found"."""
    return not_found(f"Loading lora {name} failed: No adapter found for {path}")


def adapter_rank(config: dict) -> int | None:
    """The largest of r and rank_pattern's ranks; None when one is not a positive integer."""
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r"), *(pattern.values() if isinstance(pattern, dict) else [None])]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        return None
    return max(ranks)


def peft_refusals(config: dict, *, max_lora_rank: int, fidelity: str) -> list[str]:
    """PEFTHelper's refusals of an adapter_config.json, in its order and words (validate_legal joins
    them with a space). The rank is the largest of r and rank_pattern (vLLM checks r only). The
    kubetune fidelity serves modules_to_save (a classification head): the one rule it does not apply."""
    missing = [name for name in REQUIRED_CONFIG_FIELDS if name not in config]
    if missing:
        return ["Missing required configuration fields: {" + ", ".join(repr(name) for name in missing) + "}"]
    rank = adapter_rank(config)
    if rank is None:
        return ["The adapter's ranks (r, rank_pattern) must be positive integers."]
    refusals = []
    if config.get("modules_to_save") and fidelity == VLLM:
        refusals.append("vLLM only supports modules_to_save being None.")
    if config.get("use_dora"):
        refusals.append("vLLM does not yet support DoRA.")
    if rank > max_lora_rank:
        refusals.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":  # vLLM: unless --enable-lora-bias, which the CPU engine lacks
        refusals.append("Adapter bias cannot be used without bias_enabled.")
    return refusals


def cpu_loras_error(max_loras: int, max_cpu_loras: int | None) -> str | None:
    """LoRAConfig's check: the CPU cache holds at least one batch's adapters."""
    if max_cpu_loras is not None and max_cpu_loras < max_loras:
        return f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras})"
    return None
