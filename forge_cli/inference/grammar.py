"""Grammars that constrain decoding: llama.cpp's GBNF, from a JSON schema through llama-cpp-python's
own converter (never a converter of ours), or the plain-JSON-object grammar it ships.

A grammar is text; a request's grammar rides in its `Sampling` and the scheduler adds llama.cpp's
grammar sampler to that sequence's chain, so a constrained sequence steps in the same batch as
free ones. Its SHA-256 (`digest`) is what a sale commits to, so an auditor can apply the same
grammar before its checks.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from forge_cli.errors import UsageError

# A schema is data a stranger sends: its JSON is bounded before the converter sees it, and so
# is the grammar the converter makes of it (nested schemas can grow one).
MAX_SCHEMA_BYTES = 64 * 1024
MAX_GRAMMAR_BYTES = 256 * 1024
MAX_SCHEMA_DEPTH = 32


def json_object() -> str:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`, Ollama's
    `format: "json"`)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def from_schema(schema: Any, where: str = "the JSON schema") -> str:
    """The GBNF grammar of a JSON schema, by llama-cpp-python's converter. A schema it cannot
    take, or one past the size and depth bounds, is a UsageError (a 400) naming `where`."""
    if not isinstance(schema, dict):
        raise UsageError(f"{where} must be a JSON object, found {type(schema).__name__}")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise UsageError(f"{where} nests deeper than {MAX_SCHEMA_DEPTH} levels")
    text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") in one of its strings
        raise UsageError(f"{where} is not valid Unicode text: {exc.reason}") from None
    if size > MAX_SCHEMA_BYTES:
        raise UsageError(f"{where} is larger than {MAX_SCHEMA_BYTES // 1024} KiB")
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(text)
    except RecursionError:
        raise UsageError(f"{where} cannot be turned into a grammar: it refers to itself too "
                         "deeply") from None
    except Exception as exc:  # the converter's own words: AssertionError, ValueError, KeyError
        detail = str(exc) or type(exc).__name__
        raise UsageError(f"{where} cannot be turned into a grammar: {detail[:300]}") from None
    check_size(str(grammar), f"the grammar {where} makes")
    return str(grammar)


def check_size(grammar: str, what: str) -> None:
    """A UsageError when `grammar` is past the bound (what a stranger's schemas may cost)."""
    if len(grammar.encode("utf-8")) > MAX_GRAMMAR_BYTES:
        raise UsageError(f"{what} is larger than {MAX_GRAMMAR_BYTES // 1024} KiB")


# Where a GBNF rule body refers to a rule: a name outside literals, classes and repetitions.
_PARTS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{[0-9, ]*\}|[a-zA-Z0-9-]+|.',
                    re.S)


def schema_rules(schema: Any, where: str, *, prefix: str) -> tuple[str, str]:
    """The rules of a JSON schema's grammar (from_schema), each renamed to begin with
    `prefix`, so that the grammars of several schemas live in one: (the name its root rule
    now has, the rules' text)."""
    text = from_schema(schema, where)
    rules = dict(line.split(" ::= ", 1) for line in text.splitlines() if " ::= " in line)

    def rename(body: str) -> str:
        return "".join(prefix + part if part in rules else part
                       for part in _PARTS.findall(body))

    return prefix + "root", "\n".join(f"{prefix}{name} ::= {rename(body)}"
                                       for name, body in rules.items())


def digest(grammar: str | None) -> str | None:
    """The SHA-256 (hex) a sale commits to for its grammar; None when it has none."""
    if grammar is None:
        return None
    return hashlib.sha256(grammar.encode("utf-8")).hexdigest()


def _depth(value: Any, level: int = 0) -> int:
    """How deep containers nest in `value` (stops counting past the bound)."""
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


__all__ = ["MAX_GRAMMAR_BYTES", "MAX_SCHEMA_BYTES", "check_size", "digest", "from_schema",
           "json_object", "schema_rules"]
