"""Sentence embeddings for the drift diagnostics, from an OpenAI-compatible `POST /v1/embeddings` (the
operator's `--embedding-url`: the CPU engine started with `--embedding-model`, vLLM serving an embedding
model, or any service with that API).

Synchronous (urllib): the controller calls it from a worker thread. Texts go in batches of `batch`; the
vectors come back in the order of the texts.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

PATH = "/v1/embeddings"
MESSAGE_LIMIT = 500


class EmbeddingError(RuntimeError):
    """The service could not be reached, refused the request, or answered something unusable."""


class EmbeddingClient:
    def __init__(self, url: str, model: str, timeout: float = 60, batch: int = 256):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"embedding url {url!r} must be http:// or https://")
        if batch < 1:
            raise ValueError("batch must be at least 1")
        url = url.rstrip("/")
        self.endpoint = url if url.endswith(PATH) else url + PATH  # the service's base URL or the endpoint itself
        self.model, self.timeout, self.batch = model, timeout, batch

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch):
            vectors.extend(self._post(list(texts[start:start + self.batch])))
        return vectors

    def _post(self, texts: list[str]) -> list[list[float]]:
        body = json.dumps({"model": self.model, "input": texts, "encoding_format": "float"}).encode()
        request = urllib.request.Request(self.endpoint, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        where = f"POST {self.endpoint} (model {self.model!r}, {len(texts)} texts)"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise EmbeddingError(f"{where}: HTTP {exc.code}: {_detail(exc.read())}") from exc
        except (OSError, urllib.error.URLError) as exc:  # refused, DNS, timeout
            raise EmbeddingError(f"{where}: {type(exc).__name__}: {exc}") from exc
        try:
            data = json.loads(raw)["data"]
            ordered = sorted(data, key=lambda item: item["index"])
            vectors = [[float(x) for x in item["embedding"]] for item in ordered]
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(f"{where}: not an embeddings answer: {raw[:200]!r}") from exc
        if [item["index"] for item in ordered] != list(range(len(texts))):
            raise EmbeddingError(f"{where}: {len(vectors)} embeddings for {len(texts)} texts")
        return vectors


def _detail(raw: bytes) -> str:
    """An error body's message (OpenAI's and vLLM >= 0.10.1's `{"error": {"message"}}`, older vLLM's flat
    `{"message"}` or FastAPI's `{"detail"}`), else its text."""
    text = raw.decode(errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        document = document["error"]
    if isinstance(document, dict):
        text = str(document.get("message") or document.get("detail") or text)
    return text[:MESSAGE_LIMIT]
