"""Grammars that constrain decoding: llama.cpp's GBNF, from a JSON schema through llama-cpp-python's
own converter (never a converter of ours), or the plain-JSON-object grammar it ships.

A grammar is text; a request's grammar rides in its `Sampling` and the scheduler adds llama.cpp's
grammar sampler to that sequence's chain, so a constrained sequence steps in the same batch as
free ones. Its SHA-256 (`digest`) is what a sale commits to, so an auditor can apply the same
grammar before its checks: a `Matcher` steps llama.cpp's own grammar sampler along a reply's
tokens and says which tokens it allows at each.
"""

from __future__ import annotations

import ctypes
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


class Matcher:
    """llama.cpp's grammar sampler, stepped by hand along a reply: which of some tokens the
    grammar allows next (`allowed`), then the token taken (`accept`). An auditor applies the
    grammar a sale committed to exactly as the seller's sampler chain did.

    Whether the grammar allows a token depends on the grammar's state and that token alone,
    so asking about a few candidates gives the same answer for them as asking about the whole
    vocabulary, for a fraction of the cost. Made by `Engine.grammar_matcher`, which holds
    the vocabulary open while it lives.
    """

    def __init__(self, lib: Any, vocab: Any, n_vocab: int, text: str) -> None:
        import numpy as np

        self._lib = lib
        self._sampler = lib.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not self._sampler:
            raise UsageError("the grammar does not parse (llama.cpp refused it)")
        # llama_token_data {id, logit, p}: one buffer, reused for every question
        self._data = np.zeros(n_vocab, dtype=np.dtype(
            [("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
        self._pointer = self._data.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))

    def allowed(self, tokens: Any) -> Any:
        """A boolean array: which of `tokens` (token ids) the grammar allows next. An end of
        generation token is allowed only where the grammar may end."""
        n = len(tokens)
        data = self._data[:n]
        data["id"] = tokens
        data["logit"] = 0.0
        candidates = self._lib.llama_token_data_array(self._pointer, n, -1, False)
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(candidates))
        return data["logit"] == 0.0  # what the grammar forbids it sets to -inf

    def accept(self, token: int) -> None:
        """Advance past `token`, which `allowed` must have allowed (llama.cpp aborts the
        process on a token its grammar rejects, so this is never asked blindly)."""
        self._lib.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        if self._sampler:
            self._lib.llama_sampler_free(self._sampler)
            self._sampler = None


def _depth(value: Any, level: int = 0) -> int:
    """How deep containers nest in `value` (stops counting past the bound)."""
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


__all__ = ["MAX_GRAMMAR_BYTES", "MAX_SCHEMA_BYTES", "Matcher", "check_size", "digest",
           "from_schema", "json_object", "schema_rules"]
