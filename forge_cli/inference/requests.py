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


ROLES = ("system", "user", "assistant")


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
                    seed=seed, stop=tuple(stop), grammar=response_grammar(body))


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


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages: roles checked, content-parts joined, text valid Unicode."""
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise bad_request("messages must not be empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                              f"found {role!r}")
        if isinstance(content, list):  # the content-parts form: text parts only
            try:
                content = "".join(p["text"] for p in content if p.get("type") == "text")
            except (TypeError, KeyError, AttributeError):
                raise bad_request(f"messages[{i}].content parts must be text parts") from None
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": valid_text(content, f"messages[{i}].content")})
    return out


def valid_text(value: str, where: str) -> str:
    """`value` if it is valid Unicode text (a lone surrogate such as "\\ud800" is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{where} is not valid Unicode text: {exc.reason} at position "
                          f"{exc.start}") from None
    return value
