"""The head's end of a tunnel to one layer peer.

ggml's RPC client in the head's engine child connects to a loopback port here; each
connection is carried to the peer over a WebSocket opened with a signed handshake (see
`terms`). When the peer's side ends first, the tunnel records which peer was lost before it
closes the loopback connection, so the failure ggml then hits is told by name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from forge_cli.errors import TunnelRefused
from forge_cli.rpc import terms
from forge_cli.rpc.peer import CHUNK, HANDSHAKE_TIMEOUT_S, Traffic, relay

log = logging.getLogger("forge.rpc")


class HeadTunnel:
    """One peer's loopback port on the head; `endpoint` is what ggml registers."""

    def __init__(self, url: str, peer_id: str, signer: Any, agreed: dict[str, Any],
                 session: Any, on_lost: Callable[[], None] = lambda: None) -> None:
        self.url = url.rstrip("/")
        self.peer_id = peer_id
        self.signer = signer
        self.agreed = agreed
        self.session = session  # aiohttp.ClientSession on the tunnel's event loop
        self.on_lost = on_lost  # told once, when the peer is lost
        self.traffic = Traffic()
        self.lost: str | None = None
        self.endpoint = ""
        self.last_up = self.last_down = 0.0  # monotonic time of the last bytes each way
        self._server: asyncio.AbstractServer | None = None
        self._closing = False

    @property
    def short(self) -> str:
        return f"{self.peer_id[:12]}… at {self.url}"

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        self.endpoint = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.endpoint

    async def open(self) -> Any:
        """An admitted WebSocket to the peer, or TunnelRefused naming why."""
        ws = await self.session.ws_connect(f"{self.url}/v1/forge/rpc/tunnel",
                                           max_msg_size=4 * CHUNK, heartbeat=None)
        try:
            hello = await ws.receive_json(timeout=HANDSHAKE_TIMEOUT_S)
            await ws.send_json(terms.handshake(self.signer, self.agreed, str(hello["challenge"])))
            answer = await ws.receive_json(timeout=HANDSHAKE_TIMEOUT_S)
        except BaseException:
            await ws.close()
            raise
        if not answer.get("ok"):
            await ws.close()
            raise TunnelRefused(f"layer peer {self.short} refused the tunnel: "
                                f"{answer.get('error', 'no reason given')}")
        return ws

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ws = await self.open()
        except Exception as exc:  # unreachable, refused, or a broken handshake
            self._mark(f"layer peer {self.short} could not be reached through its tunnel: {exc}")
            writer.close()
            return
        self.traffic.tunnels += 1
        self.traffic.open += 1
        try:
            await relay(ws, reader, writer, from_ws=self._down, from_tcp=self._up,
                        on_ws_lost=lambda: self._mark(
                            f"layer peer {self.short} closed its tunnel mid-generation"))
        finally:
            self.traffic.open -= 1

    def _up(self, n: int) -> None:
        self.traffic.up += n
        self.last_up = time.monotonic()

    def _down(self, n: int) -> None:
        self.traffic.down += n
        self.last_down = time.monotonic()

    def waiting_s(self) -> float:
        """How long the head has waited for this peer's answer (0 when it is not waiting)."""
        return time.monotonic() - self.last_up if self.last_up > self.last_down else 0.0

    def _mark(self, why: str) -> None:
        if not self._closing and self.lost is None:
            self.lost = why
            log.warning("%s", why)
            self.on_lost()

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()


__all__ = ["HeadTunnel"]
