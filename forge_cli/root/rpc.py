"""rpc wired to the other channels, here at the top so rpc imports none of them: a layer peer's
web app served with the node's error envelope and request metrics, and `--split auto`'s search
for layer peers on the mesh."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from forge_cli.rpc.peer import LayerPeer


def layer_peer_app(peer: LayerPeer) -> web.Application:
    """The web app `forge rpc serve` serves: the peer's routes, the node's middleware."""
    from forge_cli.node.web import NODE, errors_middleware
    from forge_cli.rpc.peer import make_app

    app = make_app(peer, middlewares=[errors_middleware])
    app[NODE] = peer.node  # errors_middleware counts the requests in the node's metrics
    return app


def find_lenders(node_id: str, settings: dict[str, Any]) -> list[str]:
    """URLs of the layer peers on the mesh (mDNS on mesh.interfaces, and mesh.peers), the most
    memory first: what `--split auto` splits with. Looks for up to rpc.discover_s seconds,
    and stops early once the peers found stay the same for 1.5 s."""
    from forge_cli.errors import NoProvider
    from forge_cli.mesh.discovery import Mesh

    async def look() -> list[tuple[int, str]]:
        mesh = Mesh(node_id, lambda: [], interfaces=settings["mesh.interfaces"],
                    static_peers=settings["mesh.peers"], mdns=settings["mesh.mdns"], probe_s=1,
                    expire_s=settings["mesh.expire_s"])
        await mesh.start(None)
        deadline = time.monotonic() + settings["rpc.discover_s"]
        found: list[tuple[int, str]] = []
        stable_since = time.monotonic()
        try:
            while time.monotonic() < deadline:
                await mesh.probe_all()
                now = sorted(((p.lends_mb or 0, p.url) for p in mesh.trusted_peers()
                              if p.lends_mb is not None), reverse=True)
                if [url for _, url in now] != [url for _, url in found]:
                    found, stable_since = now, time.monotonic()
                elif found and time.monotonic() - stable_since >= 1.5:
                    break
                await asyncio.sleep(0.25)
        finally:
            await mesh.stop()
        return found

    found = asyncio.run(look())
    if not found:
        raise NoProvider(f"no layer peer answered on the mesh within {settings['rpc.discover_s']} "
                         "s", hint="start some with `forge rpc serve --mesh`, or name them: "
                         "--split http://HOST:PORT[,URL…]")
    return [url for _, url in found][:16]  # GGML_RPC_MAX_SERVERS


__all__ = ["find_lenders", "layer_peer_app"]
