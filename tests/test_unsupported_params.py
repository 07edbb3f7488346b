"""Parameters the node would ignore are refused with a 400 naming them (issue 19, low finding):
a client asking for 3 choices or for log-probabilities must not silently get one plain choice.
The defaults that clients send are accepted, and the official `openai` client keeps working."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.node_harness import NodeProcess

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    with NodeProcess(tmp_path_factory.mktemp("params-home"), tiny_gguf) as running:
        running.asker = running.agent("asker")["token"]  # 11 refusals: under its throttle
        yield running


@pytest.mark.parametrize(("path", "extra"), [
    (CHAT, {"n": 2}),
    (CHAT, {"n": True}),
    (CHAT, {"logprobs": True}),
    (CHAT, {"top_logprobs": 3}),
    (CHAT, {"logit_bias": {"42": 5}}),
    (CHAT, {"frequency_penalty": 0.5}),
    (CHAT, {"presence_penalty": -1}),
    ("/v1/completions", {"best_of": 3}),
    ("/v1/completions", {"logprobs": 0}),
    ("/v1/completions", {"echo": True}),
    ("/v1/completions", {"suffix": "the end"}),
])
def test_an_ignored_parameter_is_refused_by_name(node, path, extra):
    token = node.asker
    body = {"messages": HI} if path == CHAT else {"prompt": "hi"}
    status, _, answer = node.request("POST", path, token=token,
                                     body={**body, "max_tokens": 2, **extra})
    assert status == 400, answer
    name = next(iter(extra))
    assert answer["error"]["type"] == "invalid_request_error"
    assert f"'{name}' is not supported" in answer["error"]["message"], answer
    status, _, balance = node.request("GET", "/v1/forge/balance", token=token)
    assert balance["reserved"] == 0 and balance["balance"] == 0  # not even the free tier


def test_the_defaults_clients_send_are_accepted(node):
    token = node.agent("defaults")["token"]
    status, _, answer = node.request("POST", CHAT, token=token, body={
        "messages": HI, "max_tokens": 2, "temperature": 0, "n": 1, "logprobs": False,
        "top_logprobs": 0, "logit_bias": {}, "frequency_penalty": 0, "presence_penalty": 0.0,
        "user": "someone", "stream_options": None, "store": False, "metadata": {}})
    assert status == 200, answer
    status, _, answer = node.request("POST", "/v1/completions", token=token, body={
        "prompt": "hi", "max_tokens": 2, "best_of": 1, "echo": False, "logprobs": None,
        "suffix": None})
    assert status == 200, answer


def test_the_openai_client_works_and_hears_the_refusal(node):
    client = openai.OpenAI(base_url=node.url + "/v1", api_key=node.agent("sdk")["token"],
                           max_retries=0, timeout=120)
    done = client.chat.completions.create(model="", messages=HI, max_tokens=3, temperature=0,
                                          n=1, frequency_penalty=0, presence_penalty=0,
                                          user="me")
    assert done.choices[0].message.content is not None and len(done.choices) == 1
    stream = client.chat.completions.create(model="", messages=HI, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True})
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in stream)
    with pytest.raises(openai.BadRequestError, match="'n' is not supported"):
        client.chat.completions.create(model="", messages=HI, max_tokens=3, n=2)
