"""Health, metrics, the OpenAPI description and the live event stream."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from aiohttp import web

from forge_cli import errors
from forge_cli.node.web import NODE, OPENAPI, Route

if TYPE_CHECKING:
    from forge_cli.root.node import Node

KEEPALIVE_S = 15
GONE_CHECK_S = 1.0  # how often a quiet feed checks that its subscriber is still there
WRITE_TIMEOUT_S = 30  # a subscriber whose socket takes no more for this long is dropped


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
    await asyncio.to_thread(node.trust)  # the trust gauges: computed on first use, then kept
    return web.Response(body=node.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def activity(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].activity())


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def events(request: web.Request) -> web.StreamResponse:
    """SSE: `entry` for every new ledger entry, `safety` for safety changes. At most
    events.MAX_SUBSCRIBERS at once (429 past it); a subscriber that stops reading is dropped
    once a write waits WRITE_TIMEOUT_S."""
    node: Node = request.app[NODE]
    if node.events is None:  # attached by Node.start, before the app serves a request
        raise errors.ModelError("the node's event feed is not running yet; try again shortly")
    with node.events.subscribe() as feed:  # FeedFull before a byte of the stream is sent
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        hello = {"node_id": node.node_id, "ledger_size": node.ledger.size,
                 "root": node.ledger.root().hex()}

        async def write(data: bytes) -> None:
            await asyncio.wait_for(response.write(data), WRITE_TIMEOUT_S)

        try:
            await write(f"event: hello\ndata: {json.dumps(hello)}\n\n".encode())
            quiet = 0.0
            while True:
                try:
                    message = await asyncio.wait_for(feed.get(), GONE_CHECK_S)
                except TimeoutError:
                    # The handler is not cancelled when the subscriber hangs up: notice it
                    # here, so its place is free within seconds, not at the next keepalive.
                    if request.transport is None or request.transport.is_closing():
                        break
                    quiet += GONE_CHECK_S
                    if quiet >= KEEPALIVE_S:
                        await write(b": keepalive\n\n")
                        quiet = 0.0
                    continue
                quiet = 0.0
                if message is None:
                    await write(b"event: dropped\ndata: {\"reason\": \"too slow\"}\n\n")
                    break
                payload = json.dumps(message["data"], ensure_ascii=False)
                await write(f"event: {message['event']}\ndata: {payload}\n\n".encode())
        except (ConnectionResetError, TimeoutError, asyncio.CancelledError):
            pass  # gone, or not reading: its place is freed for another
    return response


ROUTES = [
    Route("GET", "/health", health, "Liveness (no auth)", public=True),
    Route("GET", "/metrics", metrics, "Prometheus metrics (no auth)", public=True),
    Route("GET", "/openapi.json", openapi_json, "This API, described (no auth)", public=True),
    Route("GET", "/v1/forge/events", events, "SSE feed of ledger entries and safety changes"),
    Route("GET", "/v1/forge/activity", activity,
          "Requests in flight and queued, where each model's layers run, the newest reply's speed"),
]
