"""Gossip routes between nodes: push a batch of trades, pull trades since a cursor.

Both are public: peers do not hold each other's tokens, and every trade authenticates itself
by its two signatures, which are verified before anything is stored.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.errors import MeshNotRunning
from forge_cli.mesh.gossip import MAX_BATCH, PAGE_TRADE_BYTES, Gossip, encode_page
from forge_cli.node.web import (
    NODE,
    Route,
    bad_request,
    error_response,
    field,
    int_query,
    read_json,
)

if TYPE_CHECKING:
    from forge_cli.root.node import Node


def _gossip(node: Node) -> Gossip:
    if node.gossip is None:
        raise MeshNotRunning("gossip runs only on a node in the mesh",
                             hint="start it with `forge node --mesh` or `forge seed`")
    return node.gossip


async def receive(request: web.Request) -> web.Response:
    gossip = _gossip(request.app[NODE])
    body = await read_json(request)
    trades: list[Any] = field(body, "trades", list, required=True)
    source = field(body, "from", str, default="")
    if len(trades) > MAX_BATCH:
        return error_response(413, f"a gossip batch holds at most {MAX_BATCH} trades, found "
                              f"{len(trades)}; send smaller batches", "request_too_large",
                              "batch_too_large")
    if len(source) > 64:
        raise bad_request("'from' must be the sender's node id (64 hex digits)")
    return web.json_response(await gossip.receive(trades, source or "unknown",
                                                  request.remote or "unknown"))


async def since(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    _gossip(node)
    cursor = int_query(request, "since", 0, 0, 2**62)
    limit = int_query(request, "limit", MAX_BATCH, 1, MAX_BATCH)
    trades, after = await asyncio.to_thread(node.network.since, cursor, limit, PAGE_TRADE_BYTES)
    count = await asyncio.to_thread(node.network.count)
    return web.Response(body=encode_page(trades, after, count, node.node_id),
                        content_type="application/json")


ROUTES = [
    Route("POST", "/v1/forge/gossip/trades", receive,
          "Push dual-signed trades ({from, trades}); each is verified (public)", public=True),
    Route("GET", "/v1/forge/gossip/trades", since,
          "Trades in arrival order after ?since=N (?limit), for catch-up (public)", public=True),
]
