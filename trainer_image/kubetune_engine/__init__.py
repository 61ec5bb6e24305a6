"""The CPU serving engine: transformers + peft behind vLLM's OpenAI-compatible HTTP API.

`python -m kubetune_engine DIR --port PORT` serves a base model and LoRA adapters loaded at
run time (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) with the paths and shapes of vLLM's
server (`kubetune.api.serving`), so the kubetune agent drives it exactly as it drives vLLM. It is what
`kubetune local` and the tests run: greedy decoding only, one model call at a time, CPU.

`models`: the torch side (bases, adapters, generation); `server`: the HTTP shell; `vllm_api`: vLLM's answers.
"""

__version__ = "0.1.0"
