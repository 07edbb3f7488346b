"""The head's end of a tunnel to one layer peer.

ggml's RPC client in the head's engine child connects to a loopback port here; each
connection is carried to the peer over a WebSocket opened with a signed handshake (see
`terms`). Only the engine child may use the port: ggml dials TCP (host:port, no Unix socket,
no way to send a secret first), so each connection is checked against the kernel's socket
table — the connecting socket must be one of the child's own descriptors — and any other
local process is turned away before a handshake is signed for it. When the peer's side ends
first, the tunnel records which peer was lost (or that the peer closed it for idleness)
before it closes the loopback connection, so the failure ggml then hits is told by name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from forge_cli import wire
from forge_cli.errors import TunnelRefused
from forge_cli.rpc import terms
from forge_cli.rpc.peer import (
    CHUNK,
    CLOSE_CUT,
    CLOSE_IDLE,
    HANDSHAKE_TIMEOUT_S,
    MAX_HANDSHAKE_BYTES,
    Traffic,
    relay,
)

log = logging.getLogger("forge.rpc")


def socket_owned_by(pid: int, local: tuple[str, int], remote: tuple[str, int]) -> bool:
    """Whether the TCP socket at `remote` connected to our `local` (both on 127.0.0.1) is one of
    process `pid`'s descriptors: its inode from /proc/net/tcp, found among /proc/PID/fd.
    False wherever /proc cannot say (not Linux, another user's process)."""
    def hexed(address: tuple[str, int]) -> str:
        octets = address[0].split(".")
        if len(octets) != 4:
            return ""
        return "".join(f"{int(o):02X}" for o in reversed(octets)) + f":{address[1]:04X}"

    theirs, ours = hexed(remote), hexed(local)
    inode = ""
    try:
        with open("/proc/net/tcp", encoding="ascii") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 9 and fields[1] == theirs and fields[2] == ours:
                    inode = fields[9]
                    break
        if not inode or inode == "0":
            return False
        target = f"socket:[{inode}]"
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


class HeadTunnel:
    """One peer's loopback port on the head; `endpoint` is what ggml registers.

    `child` names the one process allowed to connect (the engine child's pid, read when a
    connection comes); `top_up(tokens)` pays the peer ahead for tokens and returns whether it
    was paid; `on_lost` is told once when the peer is lost, `on_idle` when the peer closed
    the tunnel because it carried nothing."""

    def __init__(self, url: str, peer_id: str, signer: Any, agreed: dict[str, Any],
                 session: Any, on_lost: Callable[[], None] = lambda: None, *,
                 child: Callable[[], int | None] = lambda: None,
                 top_up: Callable[[int], Awaitable[bool]] | None = None,
                 on_idle: Callable[[HeadTunnel], None] = lambda tunnel: None) -> None:
        self.url = url.rstrip("/")
        self.peer_id = peer_id
        self.signer = signer
        self.agreed = agreed
        self.session = session  # aiohttp.ClientSession on the tunnel's event loop
        self.on_lost = on_lost  # told once, when the peer is lost
        self.on_idle = on_idle
        self.child = child
        self.top_up = top_up
        self.traffic = Traffic()
        self.lost: str | None = None
        self.refusal: TunnelRefused | None = None  # the peer refused the handshake
        self.idle = False
        self.foreign = 0  # connections from processes other than the engine child, refused
        self.paid_tokens = 0  # what the peer counts as paid under these terms (kept in step)
        self.endpoint = ""
        self.last_up = self.last_down = 0.0  # monotonic time of the last bytes each way
        self._server: asyncio.AbstractServer | None = None
        self._closing = False
        self._paying = asyncio.Lock()

    @property
    def short(self) -> str:
        return f"{self.peer_id[:12]}… at {self.url}"

    @property
    def carried(self) -> int:
        return self.traffic.up + self.traffic.down

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        self.endpoint = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.endpoint

    async def open(self) -> Any:
        """An admitted WebSocket to the peer, or TunnelRefused naming why."""
        ws = await self.session.ws_connect(f"{self.url}/v1/forge/rpc/tunnel",
                                           max_msg_size=4 * CHUNK, heartbeat=None)
        try:
            hello = await self._receive(ws)
            await ws.send_json(terms.handshake(self.signer, self.agreed,
                                               str(hello.get("challenge"))))
            answer = await self._receive(ws)
        except BaseException:
            await ws.close()
            raise
        if not answer.get("ok"):
            await ws.close()
            said = str(answer.get("error") or "no reason given").removeprefix("tunnel refused: ")
            raise TunnelRefused(f"layer peer {self.short} refused the tunnel: {said}")
        return ws

    async def _receive(self, ws: Any) -> dict[str, Any]:
        text = await ws.receive_str(timeout=HANDSHAKE_TIMEOUT_S)
        try:
            said = wire.parse(text, limit=MAX_HANDSHAKE_BYTES, what="the peer's handshake")
        except wire.BadJSON as exc:
            raise TunnelRefused(f"layer peer {self.short} sent a bad handshake: {exc}") from None
        if not isinstance(said, dict):
            raise TunnelRefused(f"layer peer {self.short} sent a handshake that is not an object")
        return said

    def _from_child(self, writer: asyncio.StreamWriter) -> bool:
        pid = self.child()
        local, remote = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
        return pid is not None and isinstance(local, tuple) and isinstance(remote, tuple) and \
            socket_owned_by(pid, local[:2], remote[:2])

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._from_child(writer):
            # Another local process: it would run layers on the peer at this head's expense,
            # under this head's key. It gets nothing, and the engine's tunnel is unaffected.
            self.foreign += 1
            log.warning("refused a connection to the tunnel port of layer peer %s from %s: it "
                        "is not this head's engine process", self.short,
                        writer.get_extra_info("peername"))
            writer.close()
            return
        try:
            ws = await self.open()
        except TunnelRefused as exc:  # said plainly by whoever sees the engine fail to load
            self.refusal = exc
            self._mark(exc.message, quiet=True)
            writer.close()
            return
        except Exception as exc:  # unreachable, or a broken handshake
            self._mark(f"layer peer {self.short} could not be reached through its tunnel: {exc}")
            writer.close()
            return
        self.traffic.tunnels += 1
        self.traffic.open += 1
        try:
            await relay(ws, reader, writer, from_ws=self._down, from_tcp=self._up,
                        on_ws_lost=self._ws_lost, before_ws=self._pay_ahead)
        finally:
            self.traffic.open -= 1
            await ws.close()

    async def _pay_ahead(self, n: int) -> None:
        """Before `n` more bytes go up: pay the peer ahead when what it will carry would come
        within half a credit of what is paid for (the peer cuts the tunnel past it)."""
        if self.top_up is None:
            return
        async with self._paying:
            tokens = terms.top_up_tokens(self.agreed["terms"], needed=self.carried + n,
                                         paid_tokens=self.paid_tokens)
            if tokens:
                await self.top_up(tokens)  # on failure the bytes go on: the peer decides

    def _ws_lost(self, code: int | None, reason: str) -> None:
        if code == CLOSE_IDLE and not self._closing:
            self.idle = True
            log.info("layer peer %s closed its idle tunnel", self.short)
            self.on_idle(self)
            return
        if code == CLOSE_CUT:
            self._mark(f"layer peer {self.short} cut its tunnel: {reason or 'unpaid'} "
                       f"({self.carried:,} B carried, {self.paid_tokens:,} tokens paid)")
            return
        self._mark(f"layer peer {self.short} closed its tunnel mid-generation")

    def _up(self, n: int) -> None:
        self.traffic.up += n
        self.last_up = time.monotonic()

    def _down(self, n: int) -> None:
        self.traffic.down += n
        self.last_down = time.monotonic()

    def waiting_s(self) -> float:
        """How long the head has waited for this peer's answer (0 when it is not waiting)."""
        return time.monotonic() - self.last_up if self.last_up > self.last_down else 0.0

    def _mark(self, why: str, *, quiet: bool = False) -> None:
        if not self._closing and self.lost is None:
            self.lost = why
            log.log(logging.INFO if quiet else logging.WARNING, "%s", why)
            self.on_lost()

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()


__all__ = ["HeadTunnel", "socket_owned_by"]
