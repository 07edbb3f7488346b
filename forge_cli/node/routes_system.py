"""Health, metrics, the OpenAPI description and the live event stream."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from forge_cli.node.web import NODE, OPENAPI, Route
from forge_cli.trade.node import Node

KEEPALIVE_S = 15


async def health(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    body = {"status": "ok", "node_id": node.node_id, "models": sorted(node.models),
            "ledger_size": node.ledger.size, "offers": node.offers()}
    if node.mesh is not None:
        # Lets a peer that was given our URL tell us apart from a copy of us (same node id).
        body["mesh_instance"] = node.mesh.name
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    node.metrics.kill_switch.set(1 if node.safety_killed() else 0)
    node.metrics.breaker_open.set(1 if node.breaker_open() else 0)
    node.metrics.breakers_open.set(node.safety.status()["breaker"]["open_accounts"])
    return web.Response(body=node.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def activity(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].activity())


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def events(request: web.Request) -> web.StreamResponse:
    """SSE: `entry` for every new ledger entry, `safety` for safety changes."""
    node: Node = request.app[NODE]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    hello = {"node_id": node.node_id, "ledger_size": node.ledger.size,
             "root": node.ledger.root().hex()}
    await response.write(f"event: hello\ndata: {json.dumps(hello)}\n\n".encode())
    feed = node.events.subscribe()
    try:
        while True:
            try:
                message = await asyncio.wait_for(feed.__anext__(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            except StopAsyncIteration:
                break
            if message is None:
                await response.write(b"event: dropped\ndata: {\"reason\": \"too slow\"}\n\n")
                break
            payload = json.dumps(message["data"], ensure_ascii=False)
            await response.write(f"event: {message['event']}\ndata: {payload}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        await feed.aclose()
    return response


ROUTES = [
    Route("GET", "/health", health, "Liveness (no auth)", public=True),
    Route("GET", "/metrics", metrics, "Prometheus metrics (no auth)", public=True),
    Route("GET", "/openapi.json", openapi_json, "This API, described (no auth)", public=True),
    Route("GET", "/v1/forge/events", events, "SSE feed of ledger entries and safety changes"),
    Route("GET", "/v1/forge/activity", activity,
          "Requests in flight and queued, where each model's layers run, the newest reply's speed"),
]
