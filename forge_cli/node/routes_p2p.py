"""Peer-to-peer selling: quote, chat (SSE) and settle. Public routes: peers hold no tokens here;
every request is authenticated by the Ed25519 signatures it carries (`forge_cli.mesh.protocol`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from forge_cli.errors import ForgeError, KillSwitchActive, ModelError
from forge_cli.inference.requests import parse_messages, parse_sampling, parse_tools
from forge_cli.mesh.audit import commit_sampling
from forge_cli.node.throttle import Sender
from forge_cli.node.web import NODE, REJECTS, STREAMING, Route, error_body, read_json, sse

if TYPE_CHECKING:
    from forge_cli.root.node import Node


def _sender(request: web.Request) -> Sender:
    """Refusals on these public routes count against the client's address (checked before
    the body is read); a peer's key is added once its signature is checked."""
    address = request.remote or "?"
    return Sender(request.app[REJECTS], f"address:{address}", address)


async def quote(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    with _sender(request):
        return web.json_response(node.sales.quote(await read_json(request)))


async def chat(request: web.Request) -> web.StreamResponse:
    """Serve a sale: every check before the reservation, the reply as SSE pieces with the
    running token count, then the signed terms (which hold the reservation until the
    consumer countersigns). An error once the stream began is an SSE error event; a
    consumer that hangs up after tokens reached it is recorded as unsettled for them."""
    with _sender(request) as sender:
        return await _sell(request, sender)


async def _sell(request: web.Request, sender: Sender) -> web.StreamResponse:
    node: Node = request.app[NODE]
    sales = node.sales  # made at start-up (forge_cli.node.app)
    sale = sales.admit(await read_json(request))
    consumer = sale.quote["consumer"]  # its signature checked: its refusals count against it
    sender.add(f"peer:{consumer}", f"peer {consumer[:12]}…")
    messages = parse_messages(sale.body)
    tools = parse_tools(sale.body)  # shown in the prompt as the auditor will render it
    engine = sale.model.engine
    # The terms commit to the sampling run (ppm-exact, with its seed) and the ids produced.
    sampling, sale.sampling = commit_sampling(parse_sampling(sale.body, engine.n_ctx))
    engine.check_prompt_bytes(sum(len(m["content"].encode()) for m in messages),
                              "the conversation")
    if sampling.grammar is not None:  # the buyer's error: refused before anything is reserved
        engine.check_grammar(sampling.grammar)
    session = await sales.open_sale(sale)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    terms_sent = False
    try:
        async with session:
            # Started before the stream begins: a refused prompt is an HTTP error.
            pump = await node.pump(
                lambda: engine.chat(messages, sampling, tools=tools, block=False))
            request[STREAMING] = response
            await response.prepare(request)
            async for piece in session.run(pump):
                await response.write(sse({"text": piece, "tokens": pump.tokens}))
            if session.killed:
                raise KillSwitchActive("kill switch: activated while this reply was "
                                       "generating; nothing is charged")
            completion = await session.finish()
            if completion is None:  # the engine's stream always ends in one
                raise ModelError("the engine ended the reply without a completion")
            # The running count ends at the total: tokens held back (a stop sequence, an
            # unfinished character) are billed, so the consumer is told of them first.
            await response.write(sse({"text": "", "tokens": completion.completion_tokens}))
            session.told(completion.completion_tokens)
            await session.settle()
            if sale.data is None:  # settle() signed the terms into it
                raise ModelError("the sale settled without signed terms")
            await response.write(sse({**sale.data, "tokens": sale.ids}))
            terms_sent = True
    except ForgeError as exc:  # the consumer hears why, and pays nothing
        if not response.prepared:
            raise
        await response.write(sse({"error": error_body(exc)}))
    finally:
        await sales.end(sale, terms_sent=terms_sent)
        node.observe(session.completion)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def settle(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    with _sender(request):
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
