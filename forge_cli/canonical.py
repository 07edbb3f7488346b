"""The one canonical JSON encoding for everything forge hashes or signs.

UTF-8, keys sorted, no insignificant whitespace, integers only (|n| < 2**63), strings in NFC.
Anything else (floats, NaN, bytes, tuples, non-string keys) is an error, never coerced, so two
honest encoders always produce the same bytes for the same value.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from forge_cli.errors import CanonicalError

__all__ = ["CanonicalError", "INT_LIMIT", "check", "decode", "dumps_checked_parts", "encode"]

INT_LIMIT = 2**63
# One encoder, reused: json.dumps with options builds a new one per call (~3 µs each).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)


def _problem(value: Any, path: str) -> str | None:
    """Why `value` has no canonical encoding (with where), or None; the slow, precise walk."""
    kind = type(value)
    if kind is str:
        if not value.isascii() and not unicodedata.is_normalized("NFC", value):
            return f"{path}: string is not in Unicode NFC form"
    elif kind is int:
        if not -INT_LIMIT < value < INT_LIMIT:
            return f"{path}: integer {value} is outside the signed 64-bit range"
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return f"{path}: object key {key!r} is not a string"
            problem = _problem(key, path) or _problem(item, f"{path}.{key}")
            if problem:
                return problem
    elif kind is list:
        for i, item in enumerate(value):
            problem = _problem(item, f"{path}[{i}]")
            if problem:
                return problem
    elif kind is float:
        return f"{path}: floats are not allowed ({value!r}); use integer units"
    elif value is not None and kind is not bool:
        return f"{path}: {kind.__name__} has no canonical JSON encoding"
    return None


def _valid(value: Any) -> bool:
    """Fast walk without building paths: True when every leaf has a canonical encoding."""
    stack = [value]
    pop, push = stack.pop, stack.append
    while stack:
        item = pop()
        kind = type(item)
        if kind is str:
            if not item.isascii() and not unicodedata.is_normalized("NFC", item):
                return False
        elif kind is dict:
            for key, sub in item.items():
                if type(key) is not str or not (key.isascii()
                                                or unicodedata.is_normalized("NFC", key)):
                    return False
                push(sub)
        elif kind is int:
            if not -INT_LIMIT < item < INT_LIMIT:
                return False
        elif kind is list:
            stack.extend(item)
        elif item is not None and kind is not bool:
            return False
    return True


def _check(value: Any, path: str) -> None:
    if not _valid(value):
        raise CanonicalError(_problem(value, path) or f"{path}: no canonical encoding")


def encode(value: Any) -> bytes:
    """Canonical bytes of a JSON value.

    >>> encode({"b": 1, "a": [True, None, "é"]})
    b'{"a":[true,null,"\\xc3\\xa9"],"b":1}'
    """
    _check(value, "$")
    return _ENCODER.encode(value).encode()


def check(value: Any) -> None:
    """CanonicalError unless `value` has a canonical encoding."""
    _check(value, "$")


def dumps_checked_parts(value: Any) -> bytes:
    """Canonical bytes of a value whose parts were already checked with `check`.

    For hot paths that assemble an envelope of known-good fields around checked data.
    """
    return _ENCODER.encode(value).encode()


def _no_float(text: str) -> Any:
    raise CanonicalError(f"floats are not allowed ({text}); use integer units")


def decode(data: bytes) -> Any:
    """Parse canonical bytes, rejecting floats, NaN and any non-canonical spelling."""
    try:
        value = json.loads(data, parse_float=_no_float, parse_constant=_no_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CanonicalError(f"not valid JSON: {exc}") from exc
    if encode(value) != data:
        raise CanonicalError("JSON is valid but not in canonical form")
    return value
