"""`forge rpc serve`: a layer peer — this machine's memory and cores lent to a head.

ggml's RPC server runs inside this process, bound to 127.0.0.1 only (it has no
authentication), with its tensor cache under FORGE_HOME so a head reloading the same model
does not resend its weights. Heads reach it only through the tunnel on the public port: a
WebSocket admitted after a signed handshake over terms this peer issued (see `terms`). The
head pays for the layers served in dual-signed trades that this peer's ledger holds too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from forge_cli.errors import (
    BadIntent,
    EngineBusy,
    EntryRejected,
    Replay,
    RpcUnavailable,
    TunnelRefused,
)
from forge_cli.ledger import entries
from forge_cli.rpc import ggml, terms

if TYPE_CHECKING:
    from forge_cli.trade.node import Node

log = logging.getLogger("forge.rpc")
PEER: web.AppKey[LayerPeer] = web.AppKey("layer_peer", object)  # type: ignore[arg-type]
HANDSHAKE_TIMEOUT_S = 10
CHUNK = 1 << 20  # bytes per tunnel message
SETTLE_GRACE_MS = 600_000  # work done under terms may be paid this long after they expire
MAX_ISSUED = 1000  # terms held at once (anyone may ask for terms: the memory is bounded)


def available_mb() -> int:
    """Memory this machine can give without swapping (MemAvailable), in MiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // (1 << 20)


@dataclass
class Traffic:
    """What crossed tunnels, in bytes (head → peer is `up`)."""

    tunnels: int = 0
    refused: int = 0
    up: int = 0
    down: int = 0
    last_refusal: str = ""
    open: int = 0

    def add_up(self, n: int) -> None:
        self.up += n

    def add_down(self, n: int) -> None:
        self.down += n

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LayerPeer:
    """The peer's state: its node (ledger, wallet, key), the ggml server, the terms issued."""

    node: Node  # a node without models: its key, ledger, wallet and mesh
    rate: int  # µCU per layer per generated token
    memory_mb: int  # 0: what the machine has available
    threads: int
    terms_ms: int
    cache_dir: Path
    endpoint: str = ""  # the ggml server, 127.0.0.1:PORT
    issued: dict[str, dict[str, Any]] = field(default_factory=dict)  # nonce → signed terms
    traffic: Traffic = field(default_factory=Traffic)
    serving: dict[str, int] = field(default_factory=dict)  # head → its open tunnels

    @property
    def node_id(self) -> str:
        return self.node.node_id

    def free_mb(self) -> int:
        free = available_mb()
        return min(free, self.memory_mb) if self.memory_mb else free

    # -- the ggml server -----------------------------------------------------------------------

    def start_ggml(self, attempts: int = 5) -> str:
        """Start ggml's RPC server on a free loopback port; its endpoint."""
        ggml.require_rpc()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            port = _free_loopback_port()
            endpoint = f"127.0.0.1:{port}"
            thread = threading.Thread(target=ggml.serve, name="forge-ggml-rpc", daemon=True,
                                      args=(endpoint, str(self.cache_dir), self.threads))
            thread.start()
            deadline = time.monotonic() + 30
            while thread.is_alive() and time.monotonic() < deadline:
                if _listening(port):
                    self.endpoint = endpoint
                    return endpoint
                time.sleep(0.05)
            # It returned (the port was taken in between) or never listened: try another.
        raise RpcUnavailable("ggml's RPC server did not start on 127.0.0.1")

    # -- terms ---------------------------------------------------------------------------------

    def offer(self, body: Any) -> dict[str, Any]:
        reason = terms.request_problem(body)
        if reason:
            raise BadIntent(f"terms refused: {reason}")
        if body["head"] == self.node_id:
            raise BadIntent("terms refused: a node cannot lend layers to itself")
        now = self.node.clock()
        self._forget(now)
        if len(self.issued) >= MAX_ISSUED:
            raise EngineBusy(f"this layer peer holds {MAX_ISSUED} terms not yet expired; ask "
                             "again later")
        agreed = terms.offer(self.node.signer, head=body["head"],
                             model_sha256=body["model_sha256"], layers=body["layers"],
                             rate=self.rate, now_ms=now, ttl_ms=self.terms_ms)
        self.issued[agreed["terms"]["nonce"]] = agreed
        return agreed

    def _forget(self, now: int) -> None:
        for nonce, agreed in list(self.issued.items()):
            if agreed["terms"]["expires_ms"] + SETTLE_GRACE_MS < now:
                del self.issued[nonce]

    def admit(self, answer: Any, challenge: str) -> dict[str, Any]:
        """The terms a tunnel runs under, or TunnelRefused."""
        reason = terms.handshake_problem(answer, peer=self.node_id, challenge=challenge,
                                         now_ms=self.node.clock())
        if reason is None:
            issued = self.issued.get(answer["terms"]["nonce"])
            if issued is None or issued["terms"] != answer["terms"]:
                reason = "these terms were not issued by this peer"
            elif any(head != answer["terms"]["head"] for head in self.serving):
                # ggml serves one connection at a time: another head would wait unseen.
                reason = "this peer is serving another head; try again when it is done"
        if reason:
            self.traffic.refused += 1
            self.traffic.last_refusal = reason
            raise TunnelRefused(f"tunnel refused: {reason}")
        return answer

    # -- settlement ----------------------------------------------------------------------------

    async def settle(self, body: Any) -> dict[str, Any]:
        """Sign and record the head's payment for layers served; the peer's signature back."""
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str)
                                                 for k in ("request", "response", "consumer_sig")):
            raise BadIntent("settle needs trade, consumer_sig, request and response")
        trade, request, response = body.get("trade"), body["request"].encode(), \
            body["response"].encode()
        try:
            nonce = json.loads(request)["terms"]["nonce"]
        except (ValueError, KeyError, TypeError):
            raise BadIntent("the request body is not an agreement of this peer") from None
        agreed = self.issued.get(nonce) if isinstance(nonce, str) else None
        if agreed is None:
            raise BadIntent("no terms of this peer match the agreement paid under")
        reason = terms.layer_trade_problem(trade, agreed, request=request, response=response) \
            if isinstance(trade, dict) else "trade is not an object"
        if reason is None and not _verify(trade["consumer"], entries.trade_message(trade),
                                          body["consumer_sig"]):
            reason = "the head's signature over the trade does not verify"
        if reason:
            raise BadIntent(f"layer trade refused: {reason}")
        seen = self.node.nonce_seq(trade["consumer"], trade["nonce"])
        if seen is not None:
            raise Replay(f"this trade was already recorded at seq {seen}")
        data = {"terms": trade, "provider_sig": self.node.signer.sign(
                    entries.trade_message(trade)).hex(), "consumer_sig": body["consumer_sig"]}

        async def signed() -> tuple[dict[str, Any], list[bytes]]:
            return data, [request, response]

        try:
            entry = await self.node.wallet.pay(trade["consumer"], trade["cu"], signed, peer=True,
                                               what=f"a layer trade of {trade['cu']:,} CU")
        except EntryRejected as exc:
            raise BadIntent(f"layer trade refused by the ledger: {exc}") from None
        return {"trade_seq": entry.seq, "provider_sig": data["provider_sig"]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "role": "layer-peer", "node_id": self.node_id,
                "free_mb": self.free_mb(), "threads": self.threads,
                "rate_ucu_per_layer_token": self.rate,
                "rpc": "ggml-rpc on 127.0.0.1, reachable only through the tunnel",
                "traffic": self.traffic.as_dict()}


def _verify(node_id: str, message: bytes, sig: Any) -> bool:
    from forge_cli import identity
    from forge_cli.mesh.protocol import is_hex

    return is_hex(sig, 128) and identity.verify_hex(node_id, message, sig)


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# -- the web skin ------------------------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    return web.json_response(request.app[PEER].health())


async def offer_terms(request: web.Request) -> web.Response:
    from forge_cli.node.web import read_json

    return web.json_response(request.app[PEER].offer(await read_json(request)))


async def settle(request: web.Request) -> web.Response:
    from forge_cli.node.web import read_json

    return web.json_response(await request.app[PEER].settle(await read_json(request)))


async def tunnel(request: web.Request) -> web.WebSocketResponse:
    """The authenticated relay: challenge, signed answer, then bytes both ways to ggml."""
    peer = request.app[PEER]
    ws = web.WebSocketResponse(max_msg_size=4 * CHUNK, heartbeat=None)
    await ws.prepare(request)
    challenge = secrets.token_hex(16)
    await ws.send_json({"challenge": challenge, "peer": peer.node_id})
    try:
        msg = await ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        answer = json.loads(msg.data) if msg.type == WSMsgType.TEXT else None
        peer.admit(answer, challenge)
    except (TimeoutError, TunnelRefused, ValueError) as exc:
        reason = str(exc) if isinstance(exc, TunnelRefused) else "no valid handshake came"
        if not isinstance(exc, TunnelRefused):
            peer.traffic.refused += 1
            peer.traffic.last_refusal = reason
        log.warning("refused a tunnel from %s: %s", request.remote, reason)
        await ws.send_json({"error": reason})
        await ws.close(code=4403, message=b"refused")
        return ws
    head = answer["terms"]["head"]  # counted at once: no other head is admitted meanwhile
    peer.serving[head] = peer.serving.get(head, 0) + 1
    peer.traffic.tunnels += 1
    peer.traffic.open += 1
    try:
        host, port = peer.endpoint.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        await ws.send_json({"ok": True})
        await relay(ws, reader, writer, from_ws=peer.traffic.add_up,
                    from_tcp=peer.traffic.add_down)
    finally:
        peer.traffic.open -= 1
        peer.serving[head] -= 1
        if not peer.serving[head]:
            del peer.serving[head]
    return ws


async def relay(ws: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                from_ws: Callable[[int], None], from_tcp: Callable[[int], None],
                on_ws_lost: Callable[[], None] | None = None) -> None:
    """Carry bytes between a WebSocket and a TCP stream until either side ends, counting each
    direction. `on_ws_lost` runs when the WebSocket ends first (the far side went away), before
    the TCP side is closed: the head records which peer it lost before ggml notices."""

    async def ws_to_tcp() -> None:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                break
            from_ws(len(msg.data))
            writer.write(msg.data)
            await writer.drain()
        if on_ws_lost is not None:
            on_ws_lost()

    async def tcp_to_ws() -> None:
        while data := await reader.read(CHUNK):
            from_tcp(len(data))
            await ws.send_bytes(data)

    tasks = [asyncio.ensure_future(ws_to_tcp()), asyncio.ensure_future(tcp_to_ws())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        await ws.close()


def make_app(peer: LayerPeer) -> web.Application:
    from forge_cli.node.web import NODE, errors_middleware

    app = web.Application(middlewares=[errors_middleware])
    app[PEER] = peer
    app[NODE] = peer.node
    app.router.add_get("/health", health)
    app.router.add_post("/v1/forge/rpc/terms", offer_terms)
    app.router.add_post("/v1/forge/rpc/settle", settle)
    app.router.add_get("/v1/forge/rpc/tunnel", tunnel)

    async def stop(app: web.Application) -> None:
        await peer.node.stop()  # withdraws the mesh advertisement

    app.on_shutdown.append(stop)
    return app


__all__ = ["LayerPeer", "Traffic", "available_mb", "make_app", "relay"]
