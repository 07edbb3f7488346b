"""The one JSON parser for everything that arrives from outside: request bodies, peers' answers,
gossip pages, dispute evidence, RPC handshakes.

`parse` refuses what the rest of forge cannot walk safely: text over a size cap, nesting deeper
than MAX_DEPTH (the parser, the canonical encoder and the SSE writer all recurse), and the
non-finite numbers Python's json accepts (`NaN`, `Infinity`, and `1e400`, a float that
overflows) that no peer may send. It raises `BadJSON` (errors.py: a 400 where a route lets it
through): each caller turns that into its own answer (a BadResponse for a peer), so the limits
live here once.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, TypeGuard

from forge_cli.errors import BadJSON, BodyTooLarge, UsageError

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["MAX_DEPTH", "MAX_PEER_BYTES", "BadJSON", "depth", "finite_int", "is_hex", "parse",
           "read_object"]

MAX_DEPTH = 64  # arrays and objects nested; forge's own messages use fewer than 10
MAX_PEER_BYTES = 4 * 1024 * 1024  # one peer answer read into memory (health, quote, page)


def _refuse_constant(name: str) -> Any:
    raise BadJSON(f"JSON holds {name}, which is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON(f"JSON holds {text[:40]}, which is not a finite number")
    return value


def parse(raw: bytes | str, *, limit: int | None = None, what: str = "JSON") -> Any:
    """`raw` as a JSON value, or BadJSON naming what is wrong (`what` names the text).

    >>> parse(b'{"a": [1, 2]}')
    {'a': [1, 2]}
    """
    if limit is not None and len(raw) > limit:
        raise BadJSON(f"{what} is {len(raw):,} bytes, more than the limit of {limit:,}")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadJSON(f"{what} is not valid JSON: {exc}") from None
    text = raw.encode() if isinstance(raw, str) else raw
    # Fast path: with no more brackets than MAX_DEPTH the value cannot nest deeper, and nothing
    # needs walking (every chat request).
    if text.count(b"[") + text.count(b"{") > MAX_DEPTH and depth(value) > MAX_DEPTH:
        raise BadJSON(f"{what} is nested more than {MAX_DEPTH} levels deep")
    return value


def depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value, walked without recursion
    (it stops counting once past MAX_DEPTH)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((sub, level + 1) for sub in item if isinstance(sub, (dict, list)))
    return deepest


def finite_int(value: Any, *, low: int = 0, high: int = 2**53) -> int | None:
    """`value` if it is an integer (not a bool) within [low, high], else None: how a peer's
    counts and amounts are read."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def is_hex(value: Any, length: int) -> TypeGuard[str]:
    """`value` is exactly `length` lowercase hex digits (keys, signatures, hashes)."""
    return (isinstance(value, str) and len(value) == length
            and all(c in "0123456789abcdef" for c in value))


async def read_object(request: web.Request, limit: int) -> dict[str, Any]:
    """An HTTP request's body as a JSON object: BodyTooLarge (413) past the server's
    client_max_size (`limit`, named in the message), UsageError (400) for anything `parse`
    refuses or a body that is not an object. Every route of every server reads its body here."""
    from aiohttp import web

    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # a refusal of what the sender sent: it counts
        raise BodyTooLarge(f"request body is larger than {limit:,} bytes") from None
    try:
        body = parse(raw, what="body")
    except BadJSON as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(body, dict):
        raise UsageError(f"body must be a JSON object, found {type(body).__name__}")
    return body
