"""Requests parsed: messages, sampling and the fields of a JSON body, each bad value a 400
(UsageError) naming what is wrong.

It sits below every channel that takes a request (the OpenAI routes, the P2P sale) and below
the auditor, which re-reads a sale's request exactly as the seller did.
"""

from __future__ import annotations

import json
from typing import Any

from forge_cli.errors import UsageError
from forge_cli.inference import grammar
from forge_cli.inference.jobs import Sampling
from forge_cli.inference.tools import MAX_DESCRIPTION, MAX_TOOLS, NAME, Tool, Tools


def bad_request(message: str) -> UsageError:
    """A 400 naming what is wrong with the request."""
    return UsageError(message)


def field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], *,
          default: Any = None, required: bool = False) -> Any:
    """body[name] if present and of the right JSON type (bool is not a number)."""
    if name not in body or body[name] is None:
        if required:
            raise bad_request(f"missing required field {name!r}")
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds:
        raise bad_request(f"{name!r} must be {_names(kinds)}, found a boolean")
    if not isinstance(value, kinds):
        raise bad_request(f"{name!r} must be {_names(kinds)}, found {type(value).__name__}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "an array", dict: "an object"}
    return " or ".join(words.get(k, k.__name__) for k in kinds)


ROLES = ("system", "user", "assistant", "tool")
MAX_CALL_ID = 256  # characters of a tool call's id (OpenAI's are 29)


# Parameters this node does not honour, and the values that ask for nothing it would ignore
# (the defaults; OpenAI's clients send none of them unless told to, other clients send these).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),
    "suffix": ("",), "logit_bias": ({},), "frequency_penalty": (0,), "presence_penalty": (0,),
}


def refuse_unsupported(body: dict[str, Any]) -> None:
    """A 400 for a parameter that would change the answer and that this node would ignore
    (n, logprobs, …): a client asking for 3 choices must not silently get 1. Absent, null or
    the default value is accepted."""
    for name, harmless in UNSUPPORTED.items():
        value = body.get(name)
        if value is None or any(_same(value, ok) for ok in harmless):
            continue
        shown = json.dumps(value)[:40]
        allowed = " or ".join(json.dumps(ok) for ok in harmless)
        raise bad_request(f"{name!r} is not supported by this node (found {shown}); leave it "
                          f"out or send {allowed}")


def _same(value: Any, ok: Any) -> bool:
    """JSON equality without Python's True == 1 (`"n": true` is not `"n": 1`)."""
    if isinstance(value, bool) or isinstance(ok, bool):
        return value is ok
    if isinstance(ok, int | float):
        return isinstance(value, int | float) and value == ok
    return bool(value == ok)


DEFAULT = Sampling()
# llama.cpp's top-k keeps at most the vocabulary; past any vocabulary a value means nothing.
MAX_TOP_K = 1 << 20


def parse_sampling(body: dict[str, Any], node_ctx: int) -> Sampling:
    """The sampling a request asks for, each value range-checked (max_tokens within the
    context, temperature 0–2, top_p in (0, 1], a 32-bit seed, up to 4 stop strings, top_k
    0–2**20, min_p 0–1, repeat_penalty 0.01–2); what is absent keeps `Sampling`'s default."""
    refuse_unsupported(body)
    max_tokens = field(body, "max_tokens", int, default=None)
    if max_tokens is None:
        max_tokens = field(body, "max_completion_tokens", int, default=256)
    if not 1 <= max_tokens <= node_ctx:
        raise bad_request(f"max_tokens must be between 1 and {node_ctx}, found {max_tokens}")
    temperature = field(body, "temperature", (int, float), default=0.7)
    if not 0 <= temperature <= 2:
        raise bad_request(f"temperature must be between 0 and 2, found {temperature}")
    top_p = field(body, "top_p", (int, float), default=0.95)
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], found {top_p}")
    seed = field(body, "seed", int, default=None)
    if seed is not None and not 0 <= seed < 2**32:
        raise bad_request(f"seed must be between 0 and 2**32 - 1, found {seed}")
    stop = field(body, "stop", (str, list), default=())
    if isinstance(stop, str):
        stop = (stop,)
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a non-empty string or a list of up to 4 of them")
    top_k = field(body, "top_k", int, default=DEFAULT.top_k)
    if not 0 <= top_k <= MAX_TOP_K:
        raise bad_request(f"top_k must be between 0 (off) and {MAX_TOP_K:,}, found {top_k}")
    min_p = field(body, "min_p", (int, float), default=DEFAULT.min_p)
    if not 0 <= min_p <= 1:
        raise bad_request(f"min_p must be between 0 and 1, found {min_p}")
    repeat_penalty = field(body, "repeat_penalty", (int, float), default=DEFAULT.repeat_penalty)
    if not 0.01 <= repeat_penalty <= 2:
        raise bad_request(f"repeat_penalty must be between 0.01 and 2 (1 is off), found "
                          f"{repeat_penalty}")
    return Sampling(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                    top_k=top_k, min_p=float(min_p), repeat_penalty=float(repeat_penalty),
                    seed=seed, stop=tuple(stop), grammar=reply_grammar(body))


def reply_grammar(body: dict[str, Any]) -> str | None:
    """The grammar the reply must match: the tools' (when the model may call one) or the
    response format's. Both at once is refused: a reply is either calls or that format."""
    tools = parse_tools(body)
    shape = response_grammar(body)
    if tools is None or not tools.active:
        return shape
    if shape is not None:
        raise bad_request("response_format and tools cannot be combined on this node: send "
                          "tool_choice 'none' to get the response format, or leave out "
                          "response_format to get tool calls")
    return tools.grammar()


def response_grammar(body: dict[str, Any]) -> str | None:
    """The grammar `response_format` asks for: none for `text` (or no field), any JSON object
    for `json_object`, the schema's grammar for `json_schema` (`{"name", "schema", "strict"}`;
    the grammar is always strict)."""
    fmt = field(body, "response_format", dict, default=None)
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar.json_object()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object holding "
                              "'name' and 'schema'")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request("response_format.json_schema.name must be a string")
        if "schema" not in spec:
            raise bad_request("response_format.json_schema.schema is missing")
        return grammar.from_schema(spec["schema"], "response_format.json_schema.schema")
    raise bad_request("response_format.type must be 'text', 'json_object' or 'json_schema', "
                      f"found {json.dumps(kind)[:40]}")


def role_of(message: Any, where: str) -> str:
    """A chat message's role, checked: the message is an object and its role one of ROLES."""
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, found "
                          f"{json.dumps(role)[:40]}")
    return str(role)


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages in OpenAI's shape: roles checked, content-parts joined, text valid
    Unicode; an assistant's `tool_calls` checked (its content may then be null) and each `tool`
    message answering a call made earlier in the conversation."""
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise bad_request("messages must not be empty")
    out: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # the ids of the calls made so far, and their functions
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role, content = role_of(message, where), message.get("content")
        if isinstance(content, list):  # the content-parts form: text parts only
            try:
                content = "".join(p["text"] for p in content if p.get("type") == "text")
            except (TypeError, KeyError, AttributeError):
                raise bad_request(f"{where}.content parts must be text parts") from None
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and role != "assistant":
            raise bad_request(f"{where} has tool_calls; only an assistant message can")
        if content is None and tool_calls is not None:
            content = ""
        if not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string"
                              + (" (or null beside tool_calls)" if role == "assistant" else ""))
        parsed: dict[str, Any] = {"role": role, "content": valid_text(content, f"{where}.content")}
        if tool_calls is not None:
            parsed["tool_calls"] = _tool_calls(tool_calls, where, calls)
        if role == "tool":
            parsed["tool_call_id"] = _answered(message.get("tool_call_id"), where, calls)
        out.append(parsed)
    return out


def _tool_calls(value: Any, where: str, calls: dict[str, str]) -> list[dict[str, Any]]:
    """An assistant message's calls, in OpenAI's shape, each id noted in `calls`."""
    if not isinstance(value, list) or not value:
        raise bad_request(f"{where}.tool_calls must be a non-empty array of calls")
    if len(value) > MAX_TOOLS:
        raise bad_request(f"{where}.tool_calls holds {len(value)} calls; at most {MAX_TOOLS}")
    out = []
    for j, call in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise bad_request(f"{at} must be {{\"id\", \"type\": \"function\", \"function\": "
                              "{\"name\", \"arguments\"}}")
        ident = call.get("id")
        if not isinstance(ident, str) or not 1 <= len(ident) <= MAX_CALL_ID:
            raise bad_request(f"{at}.id must be a string of 1 to {MAX_CALL_ID} characters")
        name = _function_name(function.get("name"), f"{at}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise bad_request(f"{at}.function.arguments must be a string (the arguments as "
                              "JSON text)")
        calls[ident] = name
        out.append({"id": valid_text(ident, f"{at}.id"), "type": "function",
                    "function": {"name": name,
                                 "arguments": valid_text(arguments, f"{at}.function.arguments")}})
    return out


def _answered(ident: Any, where: str, calls: dict[str, str]) -> str:
    """A tool message's `tool_call_id`: one of the calls made before it."""
    if not isinstance(ident, str) or not ident:
        raise bad_request(f"{where} has role 'tool' and needs 'tool_call_id', the id of the "
                          "call it answers")
    if ident not in calls:
        raise bad_request(f"{where}.tool_call_id {json.dumps(ident)[:80]} answers no call made "
                          "earlier in the conversation (an assistant message's tool_calls)")
    return ident


def _function_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = json.dumps(name)[:80] if isinstance(name, str) else type(name).__name__
        raise bad_request(f"{where} must be 1 to 64 letters, digits, '_' or '-', found {shown}")
    return name


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """The tools a request offers and its tool_choice and parallel_tool_calls, each checked
    (OpenAI's name rule, at most MAX_TOOLS, schemas that describe objects, a named choice
    that is one of the tools); None when it offers none. The schemas become a grammar in
    `Tools.grammar` (through reply_grammar), where a schema the converter cannot take is
    refused by its place."""
    offered = field(body, "tools", list, default=None)
    choice = field(body, "tool_choice", (str, dict), default=None)
    parallel = field(body, "parallel_tool_calls", bool, default=True)
    if offered is None:
        if choice is not None and choice not in ("none", "auto"):
            raise bad_request("tool_choice asks for a tool call, and the request offers no "
                              "tools")
        return None
    if not offered:
        raise bad_request("tools must not be empty (leave it out to offer none)")
    if len(offered) > MAX_TOOLS:
        raise bad_request(f"tools holds {len(offered)} functions; at most {MAX_TOOLS}")
    tools: list[Tool] = []
    for i, item in enumerate(offered):
        tools.append(_tool(item, f"tools[{i}]"))
        if tools[-1].name in (t.name for t in tools[:-1]):
            raise bad_request(f"tools[{i}].function.name {tools[-1].name!r} is offered twice")
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict):
            raise bad_request('tool_choice must be "none", "auto", "required" or {"type": '
                              '"function", "function": {"name": ...}}')
        named = _function_name(function.get("name"), "tool_choice.function.name")
        if named not in (t.name for t in tools):
            raise bad_request(f"tool_choice names the function {named!r}, which is not among "
                              f"the tools ({', '.join(t.name for t in tools)})")
        choice = "function"
    elif choice not in ("none", "auto", "required"):
        raise bad_request('tool_choice must be "none", "auto", "required" or a named function, '
                          f"found {json.dumps(choice)[:40]}")
    return Tools(tuple(tools), choice, named, parallel)


def _tool(item: Any, where: str) -> Tool:
    function = item.get("function") if isinstance(item, dict) else None
    if not isinstance(function, dict) or item.get("type") != "function":
        raise bad_request(f'{where} must be {{"type": "function", "function": {{"name", '
                          '"description", "parameters"}}')
    name = _function_name(function.get("name"), f"{where}.function.name")
    description = function.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise bad_request(f"{where}.function.description must be a string of at most "
                          f"{MAX_DESCRIPTION} characters")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}.function.parameters must be a JSON schema (an object), "
                          f"found {type(parameters).__name__}")
    if parameters.get("type", "object") != "object":
        raise bad_request(f"{where}.function.parameters must describe an object (type "
                          f"'object'), found type {json.dumps(parameters.get('type'))[:40]}")
    return Tool(name, valid_text(description, f"{where}.function.description"),
                {"type": "object", **parameters})


def valid_text(value: str, where: str) -> str:
    """`value` if it is valid Unicode text (a lone surrogate such as "\\ud800" is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{where} is not valid Unicode text: {exc.reason} at position "
                          f"{exc.start}") from None
    return value
