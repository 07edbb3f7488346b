"""The node's aiohttp application: routes, middlewares, start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.errors import UsageError
from forge_cli.node import (
    routes_agent,
    routes_audit,
    routes_economy,
    routes_embeddings,
    routes_gossip,
    routes_ledger,
    routes_lending,
    routes_mesh,
    routes_ollama,
    routes_openai,
    routes_p2p,
    routes_safety,
    routes_system,
    routes_tiles,
    routes_witness,
)
from forge_cli.node.throttle import AUTH_FAILURES_PER_MINUTE, REJECTS_PER_MINUTE, Throttle

if TYPE_CHECKING:
    from forge_cli.root.node import Node
from forge_cli.node.web import (
    MAX_BODY,
    NODE,
    OPENAPI,
    REJECTS,
    Route,
    auth_middleware,
    errors_middleware,
    openapi,
)

ROUTES: list[Route] = [*routes_openai.ROUTES, *routes_embeddings.ROUTES, *routes_ollama.ROUTES,
                       *routes_economy.ROUTES, *routes_lending.ROUTES, *routes_ledger.ROUTES,
                       *routes_safety.ROUTES, *routes_mesh.ROUTES, *routes_p2p.ROUTES,
                       *routes_gossip.ROUTES, *routes_system.ROUTES,
                       *routes_agent.ROUTES, *routes_audit.ROUTES, *routes_witness.ROUTES,
                       *routes_tiles.ROUTES]
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TIMERS: web.AppKey[list[asyncio.Task[None]]] = web.AppKey("timers")


def make_app(node: Node) -> web.Application:
    """The node's web application (tests run it on loopback with aiohttp's test server)."""
    public = {route.template for route in ROUTES if route.public}
    auth = auth_middleware(Throttle(AUTH_FAILURES_PER_MINUTE), public)
    app = web.Application(middlewares=[routes_ollama.ollama_errors, errors_middleware, auth],
                          client_max_size=MAX_BODY)
    app[NODE] = node
    app[REJECTS] = Throttle(REJECTS_PER_MINUTE)
    app[OPENAPI] = openapi(ROUTES)
    app[routes_audit.REFUSALS] = routes_audit.refusals()
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)

    async def start(app: web.Application) -> None:
        await node.start()
        app[TIMERS] = [asyncio.create_task(routes_lending.sweeper(node)),
                       asyncio.create_task(routes_lending.heartbeats(node)),
                       asyncio.create_task(routes_p2p.expiry_sweeper(node))]
        if node.mesh is not None:  # a node on the mesh pulls the disputes its peers upheld
            app[TIMERS].append(asyncio.create_task(routes_audit.puller(node)))

    async def stop(app: web.Application) -> None:
        for task in app.get(TIMERS, []):
            task.cancel()
        await node.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


def check_bind(host: str, token_file: Path) -> None:
    """A node reachable from other machines must have a token that was set up on purpose."""
    if host not in LOOPBACK and not token_file.exists():
        raise UsageError(
            f"refusing to listen on {host} without an API token configured: anyone on the "
            "network could spend from this node",
            hint=f"create one first with `forge wallet token` (it is written to {token_file}), "
            "or bind to 127.0.0.1")


def serve(node: Node, host: str, port: int, *, announce: Any = None,
          app: web.Application | None = None, ollama_port: int | None = None) -> None:
    """Run until SIGINT/SIGTERM; in-flight requests finish or are cancelled cleanly. `app`
    serves another skin over the node (a layer peer's); the node's own API without it.
    `ollama_port` serves the same API on a second port too, for apps that only know Ollama's
    (announced after the first, as `site, second`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = app or make_app(node)

    async def main() -> None:
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        second = None
        if ollama_port is not None:
            second = web.TCPSite(runner, host, ollama_port)
            await second.start()
        if node.mesh is not None:
            await node.mesh.start(runner.addresses[0][1])
        if node.gossip is not None:
            await node.gossip.start()
        if announce is not None:
            announce(site, *([second] if second is not None else []))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logging.getLogger("forge.node").info("shutting down: finishing in-flight requests")
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        node.close()
