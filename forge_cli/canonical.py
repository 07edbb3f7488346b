"""The one canonical JSON encoding for everything forge hashes or signs.

UTF-8, keys sorted, no insignificant whitespace, integers only (|n| < 2**63), strings in NFC.
Anything else (floats, NaN, bytes, tuples, non-string keys) is an error, never coerced, so two
honest encoders always produce the same bytes for the same value.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from forge_cli.errors import UsageError

INT_LIMIT = 2**63


class CanonicalError(UsageError):
    """A value that has no canonical encoding (float, NaN, bytes, non-NFC text, …)."""


def _check(value: Any, path: str) -> None:
    kind = type(value)
    if kind is str:
        if not value.isascii() and not unicodedata.is_normalized("NFC", value):
            raise CanonicalError(f"{path}: string is not in Unicode NFC form")
    elif kind is int:
        if not -INT_LIMIT < value < INT_LIMIT:
            raise CanonicalError(f"{path}: integer {value} is outside the signed 64-bit range")
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise CanonicalError(f"{path}: object key {key!r} is not a string")
            _check(key, path)
            _check(item, f"{path}.{key}")
    elif kind is list:
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
    elif value is None or kind is bool:
        pass
    elif kind is float:
        raise CanonicalError(f"{path}: floats are not allowed ({value!r}); use integer units")
    else:
        raise CanonicalError(f"{path}: {kind.__name__} has no canonical JSON encoding")


def encode(value: Any) -> bytes:
    """Canonical bytes of a JSON value.

    >>> encode({"b": 1, "a": [True, None, "é"]})
    b'{"a":[true,null,"\\xc3\\xa9"],"b":1}'
    """
    _check(value, "$")
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


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
