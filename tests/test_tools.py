"""Tool calls below the channels (forge_cli.inference.tools and the shared request parse): bad
tools refused by name, the grammar real llama.cpp takes and holds the model to, the prompt
each kind of chat template gets, and calls read back the same from a stream as from a whole
reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge_cli.errors import UsageError
from forge_cli.inference import grammar
from forge_cli.inference.engine import Engine
from forge_cli.inference.requests import parse_messages, parse_sampling, parse_tools
from forge_cli.inference.tools import OPEN, CallReader, read_reply
from tests.gguf_model import write_tiny_llama

USER = [{"role": "user", "content": "weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["c", "f"]}}}}}
# Pydantic's shape: the argument's type lives in $defs (a name another tool also uses).
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "required": ["zone"], "properties": {"zone": {"$ref": "#/$defs/Item"}},
        "$defs": {"Item": {"type": "string", "maxLength": 6}}}}}
LIST = {"type": "function", "function": {
    "name": "list_items", "parameters": {
        "type": "object", "required": ["n"], "properties": {"n": {"$ref": "#/$defs/Item"}},
        "$defs": {"Item": {"type": "integer"}}}}}


def body(**extra: object) -> dict[str, object]:
    return {"messages": USER, "tools": [WEATHER, CLOCK], **extra}


# -- hostile input first: every bad tool is a UsageError naming what is wrong --------------------

BAD_TOOLS = [
    ({"tools": "get_weather"}, "'tools' must be an array"),
    ({"tools": []}, "tools must not be empty"),
    ({"tools": [WEATHER] * 65}, "at most 64"),
    ({"tools": [{"type": "function"}]}, 'tools[0] must be {"type": "function"'),
    ({"tools": [{"type": "code", "function": WEATHER["function"]}]}, "tools[0] must be"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name must be 1 to 64 letters"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
     "tools[0].function.name must be 1 to 64"),
    ({"tools": [{"type": "function", "function": {"name": 7}}]}, "found int"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name 'get_weather' is offered twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "d" * 5000}}]},
     "description must be a string of at most 4096"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "tools[0].function.parameters must be a JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f",
                                                  "parameters": {"type": "string"}}}]},
     "must describe an object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}}}]},
     "tools[0].function.parameters cannot be turned into a grammar"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]},
     "tools[1].function.parameters cannot be turned into a grammar"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200}
                                         for i in range(400)}}}}]},
     "tools[0].function.parameters is larger than 64 KiB"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "description": "\ud800"}}}}}]},
     "tools[0].function.parameters is not valid Unicode"),
    ({"tool_choice": "always"}, "tool_choice must be"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_news"}}},
     "tool_choice names the function 'get_news', which is not among the tools"),
    ({"tool_choice": {"type": "function"}}, "tool_choice must be"),
    ({"parallel_tool_calls": "yes"}, "'parallel_tool_calls' must be a boolean"),
    ({"tools": None, "tool_choice": "required"}, "the request offers no tools"),
    ({"response_format": {"type": "json_object"}}, "response_format and tools cannot be"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_TOOLS)
def test_a_bad_tool_is_refused_naming_what_is_wrong(extra, message):
    with pytest.raises(UsageError) as refused:
        parse_sampling(body(**extra), 4096)
    assert message in str(refused.value)


def test_a_huge_grammar_from_many_tools_is_refused_by_the_bound():
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 60}
                                             for i in range(40)}}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": wide}}
             for i in range(64)]
    with pytest.raises(UsageError, match="the tools' grammar is larger than 256 KiB"):
        parse_sampling({"messages": USER, "tools": tools}, 4096)


BAD_MESSAGES = [
    ([{"role": "tool", "content": "18 C"}], "needs 'tool_call_id'"),
    ([{"role": "tool", "content": "18 C", "tool_call_id": "call_1"}], "answers no call made"),
    ([{"role": "user", "content": "hi", "tool_calls": []}], "only an assistant message can"),
    ([{"role": "assistant", "content": None}], "messages[0].content must be a string"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "non-empty array"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                             "function": {"name": "f"}}]}],
     "arguments must be a string"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}],
     "arguments must be a string"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "tool_calls[0].id must be a string"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "no/slash", "arguments": "{}"}}]}],
     "tool_calls[0].function.name must be"),
    ([{"role": "robot", "content": "hi"}], "role must be one of system, user, assistant, tool"),
]


@pytest.mark.parametrize(("messages", "message"), BAD_MESSAGES)
def test_a_bad_tool_message_is_refused_naming_it(messages, message):
    with pytest.raises(UsageError) as refused:
        parse_messages({"messages": messages})
    assert message in str(refused.value)


def test_a_conversation_with_calls_and_results_parses_in_openais_shape():
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
    messages = parse_messages({"messages": [
        *USER, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]})
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert messages[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}
    assert parse_messages({"messages": messages}) == messages  # a forwarded request re-parses


# -- the grammar, against real llama.cpp ----------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_gguf: Path):
    with Engine(tiny_gguf, n_ctx=2048, slots=2) as running:
        yield running


def test_schemas_that_share_rule_names_live_in_one_grammar(engine):
    text = parse_sampling(body(tools=[WEATHER, CLOCK, LIST], tool_choice="required"),
                          1024).grammar
    assert text is not None
    engine.check_grammar(text)
    # Each tool's `Item` is its own: the string of get_time, the integer of list_items.
    assert "t1-zone ::= t1-Item" in text and "t2-n ::= t2-integer" in text


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("choice", ["required", "auto", "named", "single"])
def test_the_model_is_held_to_valid_calls(engine, choice, seed):
    """Random weights at temperature 1 write whatever the grammar lets through: every reply
    must read as prose free of `<tool_call>` and/or calls whose arguments fit their schema."""
    extra: dict[str, object] = {"tool_choice": "required" if choice == "single" else choice}
    if choice == "named":
        extra["tool_choice"] = {"type": "function", "function": {"name": "get_time"}}
    if choice == "single":
        extra["parallel_tool_calls"] = False
    request = body(tools=[WEATHER, CLOCK, LIST], max_tokens=200, temperature=1.0, seed=seed,
                   **extra)
    sampling, tools = parse_sampling(request, 1024), parse_tools(request)
    done = engine.chat(parse_messages(request), sampling, tools=tools).result()
    reply = read_reply(done.text)
    assert OPEN not in reply.text
    if choice != "auto":
        assert reply.calls and reply.text == ""
        assert done.text.startswith(OPEN)
    if choice == "named":
        assert {call.name for call in reply.calls} == {"get_time"}
    if choice == "single":
        assert len(reply.calls) == 1
    complete = reply.calls if done.finish_reason != "length" else reply.calls[:-1]
    for call in complete:
        arguments = json.loads(call.arguments)
        if call.name == "get_weather":
            assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")
            assert len(arguments["city"]) <= 12
        elif call.name == "get_time":
            assert isinstance(arguments["zone"], str) and len(arguments["zone"]) <= 6
        else:
            assert isinstance(arguments["n"], int)


# -- the prompt --------------------------------------------------------------------------------

HISTORY = [*USER,
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]


def test_a_template_without_tools_gets_the_preamble_and_blocks(engine):
    request = {"messages": HISTORY, "tools": [WEATHER], "tool_choice": "required"}
    prompt = engine.render(parse_messages(request), parse_tools(request))
    assert prompt.startswith("<s>system: You can call functions")
    assert '"name": "get_weather"' in prompt and "You must call at least one" in prompt
    assert ('assistant: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call>\nuser: <tool_response>\n18 C\n</tool_response>\nassistant:") in prompt


def test_tool_choice_none_shows_no_tools_but_keeps_the_history(engine):
    request = {"messages": HISTORY, "tools": [WEATHER], "tool_choice": "none"}
    prompt = engine.render(parse_messages(request), parse_tools(request))
    assert "You can call functions" not in prompt and "<tool_response>\n18 C" in prompt
    assert parse_sampling(request, 1024).grammar is None


# A template that speaks tools in the <tool_call> format (written here, in the Hermes manner).
NATIVE = (
    "{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}{{ nl }}"
    "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "{% if m.role == 'tool' %} ({{ m.tool_call_id }}){% endif %}{{ nl }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}").replace("{{ nl }}", "{{ '\\n' }}")


def test_a_template_that_speaks_tools_renders_them_itself(tmp_path: Path):
    path = write_tiny_llama(tmp_path / "native.gguf", chat_template=NATIVE)
    request = {"messages": HISTORY, "tools": [WEATHER, CLOCK]}
    with Engine(path, n_ctx=512, slots=1) as native:
        assert native.template.speaks_tools
        prompt = native.render(parse_messages(request), parse_tools(request))
    assert prompt == ("tools: get_weather get_time\nuser: weather in Paris?\n"
                      'assistant: <tool_call>get_weather {"city": "Paris"}</tool_call>\n'
                      "tool: 18 C (call_1)\nassistant:")


# -- reading the reply -------------------------------------------------------------------------

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
REPLIES = [
    *[(text, text, []) for text in ["Just prose, with a < and a <tool and <tool_call",
                                    "<tool_call> is how I call", '{"a": {"b": [1, 2]}}']],
    (CALL, "", [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    ("Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Lyon"), "Let me look.\n",
     [("get_weather", '{"city": "Paris", "unit": "c"}'),
      ("get_weather", '{"city": "Lyon", "unit": "c"}')]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', "",
     [("get_weather", '{"city": "Pa')]),  # cut by max_tokens
]


@pytest.mark.parametrize(("text", "prose", "calls"), REPLIES)
def test_calls_read_from_a_stream_in_any_pieces_match_the_whole_reply(text, prose, calls):
    whole = read_reply(text)
    assert whole.text == prose
    assert [(c.name, c.arguments) for c in whole.calls] == calls
    for size in (1, 2, 3, 7):
        reader = CallReader()
        told, arguments = "", {}
        events = []
        for start in range(0, len(text), size):
            events += reader.feed(text[start:start + size])
        events += reader.end()
        for event in events:
            if event[0] == "text":
                told += event[1]
            elif event[0] == "call":
                arguments[event[1].index] = ""
            else:
                arguments[event[1].index] += event[2]
        assert told == prose
        assert [(c.name, arguments[c.index]) for c in reader.calls] == calls


def test_grammar_rules_are_renamed_outside_literals_and_classes():
    schema = {"type": "object", "required": ["space"],
              "properties": {"space": {"type": "string", "pattern": "^[a-z]{2,3}$"}}}
    name, text = grammar.schema_rules(schema, "s", prefix="p-")
    assert name == "p-root"
    assert '"\\"space\\""' in text  # the property's literal is untouched
    assert all(line.startswith("p-") for line in text.splitlines())
