"""Peer-to-peer selling: quote, chat (SSE) and settle. Public routes: peers hold no tokens here;
every request is authenticated by the Ed25519 signatures it carries (`forge_cli.mesh.protocol`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from forge_cli.errors import EngineBusy, ForgeError
from forge_cli.node.routes_openai import _messages, _observe, _sampling
from forge_cli.node.service import Node
from forge_cli.node.web import NODE, Route, read_json


async def quote(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    return web.json_response(node.sales.quote(await read_json(request)))


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def chat(request: web.Request) -> web.StreamResponse:
    node: Node = request.app[NODE]
    sales = node.sales  # made at start-up (forge_cli.node.app)
    sale = sales.admit(await read_json(request))
    messages = _messages(sale.body)
    sampling = _sampling(sale.body, sale.model.engine.n_ctx)
    await sales.open_sale(sale)
    served = False
    try:
        pump = node.pump(sale.model.engine.chat(messages, sampling, block=False))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        pieces: list[str] = []
        error: dict[str, Any] | None = None
        try:
            async for piece in pump:
                if node.safety_killed():
                    break
                pieces.append(piece)
                await response.write(_event({"text": piece, "tokens": pump.tokens}))
        except ForgeError as exc:  # the engine failed: the consumer hears why, pays nothing
            error = {"message": str(exc), "type": "engine_error", "code": type(exc).__name__}
            if not isinstance(exc, EngineBusy):
                await node.on_ledger(node.safety.record_outcome, False)
        finally:
            completion = await pump.close()
        if error is None and node.safety_killed():
            error = {"message": "kill switch: activated while this reply was generating; "
                     "nothing is charged", "type": "kill_switch", "code": "KillSwitchActive"}
        if error is not None:
            await response.write(_event({"error": error}))
        else:
            # The running count ends at the total: tokens held back (a stop sequence, an
            # unfinished character) are billed, so the consumer is told of them first.
            await response.write(_event({"text": "", "tokens": completion.completion_tokens}))
            data = sales.terms(sale, completion, "".join(pieces).encode())
            served = True
            await response.write(_event(data))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        _observe(node, completion)
        return response
    finally:
        if not served:
            await sales.abandon(sale)


async def settle(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    entry = await node.sales.settle(await read_json(request))
    from forge_cli.ledger import entries

    terms = entry.data["terms"]
    node.metrics.trades.labels(terms["model"]).inc()
    node.metrics.cu_earned.inc(terms["cu"])
    return web.json_response({"trade_seq": entry.seq, "trade_id": entries.trade_id(entry.data),
                              "cu": terms["cu"]})


async def expiry_sweeper(node: Node, every_s: float = 1.0) -> None:
    """Turn terms whose countersignature never came into `unsettled` entries."""
    while True:
        await asyncio.sleep(every_s)
        if node.sales is not None and node.sales.pending:
            await node.sales.expire()


ROUTES = [
    Route("POST", "/v1/forge/p2p/quote", quote,
          "A signed quote for a peer consumer (no token: peers authenticate by signature)",
          public=True),
    Route("POST", "/v1/forge/p2p/chat", chat,
          "Serve a peer's signed intent: the reply streams (SSE), then provider-signed terms",
          public=True),
    Route("POST", "/v1/forge/p2p/settle", settle,
          "The consumer's countersignature: both ledgers record the dual-signed trade",
          public=True),
]
