"""`POST /v1/embeddings` of the CPU engine (`--embedding-model`): the all-MiniLM-L6-v2 sentence embeddings
the drift diagnostics use, in OpenAI's shape, and the operator's client for it
(`kubetune_operator.clients.embeddings`). A real engine process serves them next to its base model."""

from __future__ import annotations

import base64
import math
import struct

import pytest

from kubetune.api import serving
from kubetune.runtimes import cpu
from kubetune_agent import plan
from kubetune_operator.clients.embeddings import EmbeddingClient, EmbeddingError
from tests.trainer.test_minilm_clinc import minilm_dir

from .conftest import EngineProcess, free_port
from .test_engine import assert_error

NAME = "all-MiniLM-L6-v2"
PATH = "/v1/embeddings"
ENGINE_API = cpu.RUNTIME.api
FLIGHT = "How do I book a flight to Paris?"
TICKET = "I need to reserve a plane ticket to Paris"
WEATHER = "what will the weather be like tomorrow"
# sentence-transformers 6.2 `SentenceTransformer(minilm_dir()).encode([text], normalize_embeddings=True)[0][:6]`
EXPECTED = {FLIGHT: [0.149195, -0.028568, -0.024599, -0.006396, -0.0473, 0.003987],
            "what is my account balance": [0.008232, 0.002952, -0.084092, -0.001772, -0.035843, -0.068436]}


@pytest.fixture(scope="module")
def embedding_engine(tmp_path_factory):
    engine = EngineProcess(minilm_dir(), tmp_path_factory.mktemp("engine-embeddings-logs"),
                           "--embedding-model", str(minilm_dir()), served_name="minilm").start()
    yield engine
    engine.stop()


def embed(engine: EngineProcess, texts, **fields) -> dict:
    reply = engine.post(PATH, {"model": NAME, "input": texts, **fields})
    assert reply.status == 200, reply.text
    return reply.json


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_unit_vectors_of_384_dimensions_in_openai_shape(embedding_engine):
    texts = [FLIGHT, "hi", "what is my account balance", ""]
    body = embed(embedding_engine, texts)
    assert body["object"] == "list" and body["model"] == NAME
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(4)]
    for item in body["data"]:
        assert len(item["embedding"]) == 384
        assert math.sqrt(sum(x * x for x in item["embedding"])) == pytest.approx(1.0, abs=1e-5)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 4 * 2  # [CLS] and [SEP] at least, per input
    # the sentence-transformers recipe (mean pooling over the mask, L2 normalisation), whatever the batch
    for text, expected in EXPECTED.items():
        vector = body["data"][texts.index(text)]["embedding"]
        assert vector[:6] == pytest.approx(expected, abs=2e-5)
        assert embed(embedding_engine, text)["data"][0]["embedding"] == pytest.approx(vector, abs=1e-5)


def test_similar_sentences_are_closer_than_unrelated_ones(embedding_engine):
    flight, ticket, weather = (d["embedding"] for d in embed(embedding_engine, [FLIGHT, TICKET, WEATHER])["data"])
    assert cosine(flight, ticket) > 0.6
    assert cosine(flight, ticket) > cosine(flight, weather) + 0.4
    assert cosine(ticket, weather) < 0.3


def test_base64_encoding_is_little_endian_float32(embedding_engine):
    floats = embed(embedding_engine, [WEATHER])["data"][0]["embedding"]
    encoded = embed(embedding_engine, [WEATHER], encoding_format="base64")["data"][0]["embedding"]
    decoded = struct.unpack("<384f", base64.b64decode(encoded))
    assert list(decoded) == pytest.approx(floats, abs=1e-6)


def test_the_embedding_model_is_listed_without_counting_as_an_adapter(embedding_engine):
    models = embedding_engine.get(ENGINE_API.models).json
    entry = next(m for m in models["data"] if m["id"] == NAME)
    assert entry["parent"] is None and entry["root"] == str(minilm_dir())
    assert plan.lora_names(models) == set()
    # the base model is served as before
    reply = embedding_engine.post(serving.ENGINE_CLASSIFY, {"model": "minilm", "input": "hello"})
    assert reply.status == 200, reply.text


@pytest.mark.parametrize(("body", "fragment"), [
    ({"model": NAME}, "input must be a string or a non-empty list of strings"),
    ({"model": NAME, "input": []}, "input must be"),
    ({"model": NAME, "input": [101, 2023, 102]}, "not token ids"),
    ({"model": NAME, "input": ["ok", 5]}, "input must be"),
    ({"model": NAME, "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": NAME, "input": "x", "dimensions": 128}, "384 dimensions"),
    ({"model": NAME, "input": ["x"] * 2049}, "at most 2048"),
])
def test_bad_input_is_refused_with_400(embedding_engine, body, fragment):
    assert_error(embedding_engine.post(PATH, body), 400, "BadRequestError", fragment)


def test_unknown_model_and_engine_without_embedding_model_answer_404(embedding_engine, minilm_engine):
    assert_error(embedding_engine.post(PATH, {"model": "text-embedding-3-small", "input": "x"}), 404, "NotFoundError",
                 "`text-embedding-3-small` does not exist")
    assert_error(minilm_engine.post(PATH, {"model": NAME, "input": "x"}), 404, "NotFoundError", "--embedding-model")
    assert NAME not in minilm_engine.model_ids()


def test_the_operators_client_batches_and_keeps_the_order(embedding_engine, minilm_engine):
    texts = [f"request number {i} about {'flights' if i % 2 else 'the weather'}" for i in range(70)]
    client = EmbeddingClient(embedding_engine.url, NAME, batch=32)
    vectors = client.embed(texts)
    assert len(vectors) == 70 and all(len(v) == 384 for v in vectors)
    direct = embed(embedding_engine, texts[40:43])["data"]
    assert vectors[40:43] == [pytest.approx(d["embedding"], abs=1e-5) for d in direct]
    assert EmbeddingClient(embedding_engine.url + PATH, NAME).embed([]) == []
    with pytest.raises(EmbeddingError, match="HTTP 404: The model `nope` does not exist"):
        EmbeddingClient(embedding_engine.url, "nope").embed(["x"])
    with pytest.raises(EmbeddingError, match="HTTP 404: This engine serves no embedding model"):
        EmbeddingClient(minilm_engine.url, NAME).embed(["x"])
    with pytest.raises(EmbeddingError, match=r"ConnectionRefused|URLError"):
        EmbeddingClient(f"http://127.0.0.1:{free_port()}", NAME, timeout=5).embed(["x"])
