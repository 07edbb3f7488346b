"""Embeddings sold over HTTP: `embed()` checks the inputs, runs the trade (quote → reserve →
embed → settle through a TradeSession, billed per input token) and the engine call, for any
dialect; `POST /v1/embeddings` writes it in OpenAI's shape.

Everything that can refuse a request (its fields, each input's type, size and token count)
is checked before the session reserves anything.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from forge_cli.errors import KillSwitchActive, UsageError
from forge_cli.inference.requests import bad_request, field, valid_text
from forge_cli.node.throttle import Sender
from forge_cli.node.web import NODE, REJECTS, TRADE_LOG, WHO, Route, read_json
from forge_cli.trade.session import request_bytes

if TYPE_CHECKING:
    from forge_cli.economy.accounts import Resolved as Who

# OpenAI's own bound on the inputs of one request.
MAX_INPUTS = 2048
ENCODINGS = ("float", "base64")


@dataclass
class Embedded:
    """A settled embedding purchase: one vector per input, in order."""

    model: str
    vectors: list[list[float]]
    prompt_tokens: int
    x_forge: dict[str, Any]


def checked_inputs(inputs: Any) -> list[str]:
    """`inputs` if it is a list of 1 to MAX_INPUTS non-empty strings of valid Unicode text;
    else a 400 naming the first that is not."""
    if not isinstance(inputs, list):
        raise bad_request(f"'input' must be a string or an array of strings, found "
                          f"{type(inputs).__name__}")
    if not inputs:
        raise bad_request("'input' is an empty array: there is nothing to embed")
    if len(inputs) > MAX_INPUTS:
        raise bad_request(f"'input' holds {len(inputs):,} items; at most {MAX_INPUTS:,} are "
                          "embedded in one request")
    for i, item in enumerate(inputs):
        if isinstance(item, int | list) and not isinstance(item, bool):
            raise bad_request(f"input[{i}] is a token array; this node embeds text only: send "
                              "strings")
        if not isinstance(item, str):
            raise bad_request(f"input[{i}] must be a string, found {type(item).__name__}")
        if not item:
            raise bad_request(f"input[{i}] is an empty string: there is nothing to embed")
        valid_text(item, f"input[{i}]")
    return inputs


async def embed(request: web.Request, who: Who, inputs: list[str], model: str | None
                ) -> Embedded:
    """Sell embeddings of `inputs` to `who` with `model` (None: the node's only model).

    The inputs are checked and tokenized first (off the event loop); then the session quotes
    the model's price, reserves exactly what the input tokens cost, the engine embeds them,
    and the trade is recorded as an embeddings trade (`entries.SERVICES`). A request refused
    anywhere before the trade reserves nothing."""
    node = request.app[NODE]
    texts = checked_inputs(inputs)
    served = node.model(model)
    from forge_cli.inference.engine import Engine

    engine = served.engine
    if not isinstance(engine, Engine):
        raise UsageError(f"{served.name} runs split across machines here; it makes no "
                         "embeddings", hint="ask a node that runs the whole model")
    tokens = await node.offload(lambda: engine.embedding_tokens(texts))
    total = sum(len(t) for t in tokens)
    session = node.buyer_session(
        who, model=served, max_tokens=total,
        request=request_bytes({"input": texts, "model": served.name}),
        settle=node.embeddings_trade, hint="send fewer or shorter inputs, or fund the account")
    try:
        async with session:
            done = await node.offload(lambda: engine.embed_tokens(tokens, block=False))
            session.completion = done
            if node.safety_killed():  # it came on while they were embedded: nothing is sold
                session.killed = True
                raise KillSwitchActive("kill switch: activated while these inputs were "
                                       "embedded; nothing is charged", gate="kill_switch")
            settled = await session.settle()
    finally:
        paid = session.settled is not None and session.settled.trade_seq is not None
        request[TRADE_LOG] = {"model": served.name,
                              "cu": session.settled.cu if session.settled else 0,
                              "tokens": total if paid else 0}
    return Embedded(served.name, done.vectors, done.prompt_tokens, settled.x_forge())


def encoded(vector: list[float], encoding: str) -> list[float] | str:
    """A vector as OpenAI sends it: numbers, or base64 of its little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings; refused requests count toward the account's throttle."""
    who = request[WHO]
    with Sender(request.app[REJECTS], f"account:{who.account_hex}", f"account {who.name}"):
        body = await read_json(request)
        model = field(body, "model", str, default=None)
        inputs = body.get("input")
        if inputs is None:
            raise bad_request("missing required field 'input'")
        encoding = field(body, "encoding_format", str, default="float")
        if encoding not in ENCODINGS:
            raise bad_request(f"'encoding_format' must be 'float' or 'base64', found "
                              f"{encoding[:40]!r}")
        if body.get("dimensions") is not None:
            raise bad_request("'dimensions' is not supported by this node: its vectors have "
                              "the model's own size; leave it out")
        field(body, "user", str)
        sold = await embed(request, who, [inputs] if isinstance(inputs, str) else inputs, model)
    return web.json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encoded(v, encoding)}
                 for i, v in enumerate(sold.vectors)],
        "model": sold.model,
        "usage": {"prompt_tokens": sold.prompt_tokens, "total_tokens": sold.prompt_tokens},
        "x_forge": sold.x_forge,
    })


ROUTES = [
    Route("POST", "/v1/embeddings", embeddings,
          "Embeddings (OpenAI-compatible; float or base64); every call is a trade billed per "
          "input token"),
]

__all__ = ["MAX_INPUTS", "ROUTES", "Embedded", "checked_inputs", "embed"]
