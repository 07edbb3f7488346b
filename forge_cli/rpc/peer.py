"""`forge rpc serve`: a layer peer — this machine's memory and cores lent to a head.

ggml's RPC server runs inside this process, bound to 127.0.0.1 only (it has no
authentication), with its tensor cache under FORGE_HOME so a head reloading the same model
does not resend its weights. Heads reach it only through the tunnel on the public port: a
WebSocket admitted after a signed handshake over terms this peer issued (see `terms`). The
head pays for the layers served in dual-signed trades that this peer's ledger holds too.

What a head that never pays gets is bounded per agreement: the peer counts every tunnel byte
and cuts the tunnel before the bytes carried pass `credit_bytes` plus what the head's trades
have bought. Terms are bounded per source address and in total (unused ones make way for new
ones), and a tunnel that carries nothing for `idle_s` is closed, so no one holds the peer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from forge_cli import wire
from forge_cli.errors import (
    BadIntent,
    EngineBusy,
    EntryRejected,
    InsufficientCU,
    Replay,
    RpcUnavailable,
    TunnelRefused,
    TunnelUnpaid,
)
from forge_cli.ledger import entries
from forge_cli.rpc import ggml, terms

if TYPE_CHECKING:
    from forge_cli.root.node import Node

log = logging.getLogger("forge.rpc")
PEER: web.AppKey[LayerPeer] = web.AppKey("layer_peer", object)  # type: ignore[arg-type]
HANDSHAKE_TIMEOUT_S = 10
MAX_BODY = 1024 * 1024  # a terms request or a layer trade to settle (both well under 16 kB)
CHUNK = 1 << 20  # bytes per tunnel message
SETTLE_GRACE_MS = 600_000  # work done under terms may be paid this long after they expire
MAX_ISSUED = 1000  # terms held at once (anyone may ask for terms: the memory is bounded)
MAX_PER_SOURCE = 8  # unused terms one address holds at once
MAX_UNPAID_PER_SOURCE = 4  # agreements one address has opened tunnels under and not paid
MAX_HANDSHAKE_BYTES = 64 * 1024  # the signed answer to a challenge is under 2 kB
COMPUTE_GRACE = 10  # ggml may compute for idle_s × this before its tunnel counts as idle
CLOSE_IDLE = 4408  # WebSocket close codes the head reads: idle (reconnect), cut (not paid)
CLOSE_CUT = 4402
CUT_REASON = b"its tunnel bytes passed what the head paid for"  # at most 123 bytes


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
    cut: int = 0  # tunnels cut because the head's bytes passed what it paid for
    idle_closed: int = 0

    def add_up(self, n: int) -> None:
        self.up += n

    def add_down(self, n: int) -> None:
        self.down += n

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Agreement:
    """Terms this peer issued, and what has happened under them: the source that asked, the
    tunnel bytes carried and the tokens paid for."""

    agreed: dict[str, Any]
    source: str
    carried: int = 0
    paid_tokens: int = 0
    used: bool = False  # a tunnel opened under it: kept past expiry for settlement

    @property
    def terms(self) -> dict[str, Any]:
        return self.agreed["terms"]

    def allowance(self) -> int | None:
        return terms.allowance(self.terms, self.paid_tokens)

    def carry(self, n: int) -> None:
        """Count `n` more tunnel bytes, or TunnelUnpaid (before they go on) past the bound."""
        bound = self.allowance()
        if bound is not None and self.carried + n > bound:
            raise TunnelUnpaid(
                f"the head's tunnel bytes would pass what it paid for: {self.carried:,} B "
                f"carried + {n:,} B > {bound:,} B ({self.terms['credit_bytes']:,} B credit + "
                f"{self.paid_tokens:,} paid tokens × {terms.bytes_per_token(self.terms):,} B)")
        self.carried += n


@dataclass
class LayerPeer:
    """The peer's state: its node (ledger, wallet, key), the ggml server, the terms issued."""

    node: Node  # a node without models: its key, ledger, wallet and mesh
    rate: int  # µCU per layer per generated token
    memory_mb: int  # 0: what the machine has available
    threads: int
    terms_ms: int
    cache_dir: Path
    credit_bytes: int = 64 << 20
    bytes_per_layer_token: int = 1 << 20
    idle_s: int = 60
    endpoint: str = ""  # the ggml server, 127.0.0.1:PORT
    issued: dict[str, Agreement] = field(default_factory=dict)  # nonce → what it agreed
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

    def offer(self, body: Any, source: str = "") -> dict[str, Any]:
        reason = terms.request_problem(body)
        if reason:
            raise BadIntent(f"terms refused: {reason}")
        if body["head"] == self.node_id:
            raise BadIntent("terms refused: a node cannot lend layers to itself")
        now = self.node.clock()
        self._forget(now)
        owing = sum(1 for held in self.issued.values()
                    if held.source == source and held.used and not held.paid_tokens)
        if owing >= MAX_UNPAID_PER_SOURCE:
            # Credit is per agreement; this bounds how many agreements one address may run
            # on credit alone until they expire (rpc.terms_s plus the settlement grace).
            raise InsufficientCU(f"terms refused: {owing} agreements opened from {source} have "
                                 "paid nothing; pay under them or wait until they expire")
        unused = [nonce for nonce, held in self.issued.items() if not held.used]
        mine = [nonce for nonce in unused if self.issued[nonce].source == source]
        # Terms cost nothing to ask for, so none are kept for long at others' expense: an
        # address holds a few unused ones (its oldest make way), and when the table is full
        # the oldest unused terms anywhere do. A head asks for terms just before it opens its
        # tunnel, so what a flood evicts is only ever terms nobody is using.
        if len(mine) >= MAX_PER_SOURCE:
            del self.issued[mine[0]]
        elif len(self.issued) >= MAX_ISSUED:
            # Full of used agreements: the oldest whose head is not being served goes, and with
            # it the chance to be paid under it (its head got at most its credit).
            idle = [nonce for nonce, held in self.issued.items()
                    if held.terms["head"] not in self.serving]
            if not (unused or idle):
                raise EngineBusy(f"this layer peer serves {MAX_ISSUED} agreements at once; ask "
                                 "again later")
            del self.issued[(unused or idle)[0]]
        agreed = terms.offer(self.node.signer, head=body["head"],
                             model_sha256=body["model_sha256"], layers=body["layers"],
                             rate=self.rate, now_ms=now, ttl_ms=self.terms_ms,
                             credit_bytes=self.credit_bytes,
                             bytes_per_layer_token=self.bytes_per_layer_token)
        self.issued[agreed["terms"]["nonce"]] = Agreement(agreed, source)
        return agreed

    def _forget(self, now: int) -> None:
        """Drop expired terms: unused ones at once, used ones once they can no longer be paid."""
        for nonce, held in list(self.issued.items()):
            expires = held.terms["expires_ms"]
            if expires + (SETTLE_GRACE_MS if held.used else 0) < now:
                del self.issued[nonce]

    def admit(self, answer: Any, challenge: str) -> Agreement:
        """The agreement a tunnel runs under, or TunnelRefused."""
        reason = terms.handshake_problem(answer, peer=self.node_id, challenge=challenge,
                                         now_ms=self.node.clock())
        held = None
        if reason is None:
            held = self.issued.get(answer["terms"]["nonce"])
            if held is None or held.terms != answer["terms"]:
                reason = "these terms were not issued by this peer"
            elif any(head != answer["terms"]["head"] for head in self.serving):
                # ggml serves one connection at a time: another head would wait unseen.
                reason = "this peer is serving another head; try again when it is done"
        if reason or held is None:
            self.refuse(reason or "no terms")
            raise TunnelRefused(f"tunnel refused: {reason}")
        held.used = True
        return held

    def refuse(self, reason: str) -> None:
        self.traffic.refused += 1
        self.traffic.last_refusal = reason

    # -- settlement ----------------------------------------------------------------------------

    async def settle(self, body: Any) -> dict[str, Any]:
        """Sign and record the head's payment for layers served; the peer's signature back."""
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str)
                                                 for k in ("request", "response", "consumer_sig")):
            raise BadIntent("settle needs trade, consumer_sig, request and response")
        trade: Any = body.get("trade")  # shape-checked by layer_trade_problem before use
        request, response = body["request"].encode(), body["response"].encode()
        try:
            nonce = wire.parse(request, what="the agreement")["terms"]["nonce"]
        except (wire.BadJSON, KeyError, TypeError):
            raise BadIntent("the request body is not an agreement of this peer") from None
        held = self.issued.get(nonce) if isinstance(nonce, str) else None
        if held is None:
            raise BadIntent("no terms of this peer match the agreement paid under")
        agreed = held.agreed
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
        held.paid_tokens += trade["completion_tokens"]  # recorded: the bytes it buys may flow
        return {"trade_seq": entry.seq, "provider_sig": data["provider_sig"],
                "paid_tokens": held.paid_tokens}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "role": "layer-peer", "node_id": self.node_id,
                "free_mb": self.free_mb(), "threads": self.threads,
                "rate_ucu_per_layer_token": self.rate, "credit_bytes": self.credit_bytes,
                "bytes_per_layer_token": self.bytes_per_layer_token, "idle_s": self.idle_s,
                "rpc": "ggml-rpc on 127.0.0.1, reachable only through the tunnel",
                "traffic": self.traffic.as_dict(), "agreements": agreements(self)}


def _verify(node_id: str, message: bytes, sig: Any) -> bool:
    from forge_cli import identity
    from forge_cli.wire import is_hex

    return is_hex(sig, 128) and identity.verify_hex(node_id, message, sig)


def agreements(peer: LayerPeer) -> list[dict[str, Any]]:
    """What the latest 16 agreements that opened a tunnel carried and were paid (/health)."""
    return [{"head": held.terms["head"], "carried": held.carried,
             "paid_tokens": held.paid_tokens, "allowance": held.allowance()}
            for held in peer.issued.values() if held.used][-16:]


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
    return web.json_response(request.app[PEER].offer(await wire.read_object(request, MAX_BODY),
                                                     source=source_of(request.remote)))


def source_of(remote: str | None) -> str:
    """The source the per-address limits count: the IPv4 address, or the IPv6 /64 (one host
    commonly holds a whole /64)."""
    import ipaddress

    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or ""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


async def settle(request: web.Request) -> web.Response:
    return web.json_response(await request.app[PEER].settle(
        await wire.read_object(request, MAX_BODY)))


async def tunnel(request: web.Request) -> web.WebSocketResponse:
    """The authenticated relay: challenge, signed answer, then bytes both ways to ggml, each
    counted against the agreement (cut past what the head paid for), until either side ends
    or the tunnel carries nothing for `idle_s`."""
    peer = request.app[PEER]
    ws = web.WebSocketResponse(max_msg_size=4 * CHUNK, heartbeat=None)
    await ws.prepare(request)
    challenge = secrets.token_hex(16)
    await ws.send_json({"challenge": challenge, "peer": peer.node_id})
    try:
        msg = await ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        if msg.type != WSMsgType.TEXT:
            raise ValueError("no valid handshake came")
        held = peer.admit(wire.parse(msg.data, limit=MAX_HANDSHAKE_BYTES, what="the handshake"),
                          challenge)
    except (TimeoutError, TunnelRefused, wire.BadJSON, ValueError) as exc:
        reason = str(exc) if isinstance(exc, (TunnelRefused, wire.BadJSON)) \
            else "no valid handshake came"
        if not isinstance(exc, TunnelRefused):
            peer.refuse(reason)
        log.warning("refused a tunnel from %s: %s", request.remote, reason)
        await ws.send_json({"error": reason})
        await ws.close(code=4403, message=b"refused")
        return ws
    head = held.terms["head"]  # counted at once: no other head is admitted meanwhile
    peer.serving[head] = peer.serving.get(head, 0) + 1
    peer.traffic.tunnels += 1
    peer.traffic.open += 1
    clock = _Activity()

    def up(n: int) -> None:
        held.carry(n)
        peer.traffic.add_up(n)
        clock.up()

    def down(n: int) -> None:
        held.carry(n)
        peer.traffic.add_down(n)
        clock.down()

    async def close_when_idle() -> None:
        while True:
            await asyncio.sleep(min(1.0, peer.idle_s / 4))
            if clock.idle_s() > peer.idle_s:
                peer.traffic.idle_closed += 1
                log.info("closed an idle tunnel of head %s… after %d s", head[:12], peer.idle_s)
                await ws.close(code=CLOSE_IDLE, message=b"idle")
                return

    watchdog = asyncio.ensure_future(close_when_idle())
    try:
        host, port = peer.endpoint.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        await ws.send_json({"ok": True})
        ended = await relay(ws, reader, writer, from_ws=up, from_tcp=down)
        if isinstance(ended, TunnelUnpaid):
            peer.traffic.cut += 1
            peer.traffic.last_refusal = str(ended)
            log.warning("cut the tunnel of head %s…: %s", head[:12], ended)
            await ws.close(code=CLOSE_CUT, message=CUT_REASON)
        else:
            await ws.close()
    finally:
        watchdog.cancel()
        peer.traffic.open -= 1
        peer.serving[head] -= 1
        if not peer.serving[head]:
            del peer.serving[head]
    return ws


class _Activity:
    """When a tunnel last carried bytes, and which way: it idles while the head owes the next
    word (ggml answered, or nothing came yet); while ggml may be computing (the head spoke
    last) it idles 10 times slower, so a long graph is not cut but a head that sends a few
    bytes and stops does not hold the peer for ever."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.computing = False

    def up(self) -> None:
        self.last, self.computing = time.monotonic(), True

    def down(self) -> None:
        self.last, self.computing = time.monotonic(), False

    def idle_s(self) -> float:
        quiet = time.monotonic() - self.last
        return quiet / COMPUTE_GRACE if self.computing else quiet


async def relay(ws: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                from_ws: Callable[[int], None], from_tcp: Callable[[int], None],
                on_ws_lost: Callable[[int | None, str], None] | None = None,
                before_ws: Callable[[int], Awaitable[None]] | None = None) -> BaseException | None:
    """Carry bytes between a WebSocket and a TCP stream until either side ends, counting each
    direction before the bytes go on (a counter that raises stops the relay there: its
    exception is returned). `before_ws` is awaited before TCP bytes go to the WebSocket (the
    head pays ahead there). `on_ws_lost(close code, reason)` runs when the WebSocket ends
    first (the far side went away), before the TCP side is closed: the head records which
    peer it lost, and why, before ggml notices."""

    async def ws_to_tcp() -> None:
        while True:
            msg = await ws.receive()
            if msg.type != WSMsgType.BINARY:
                break
            from_ws(len(msg.data))
            writer.write(msg.data)
            await writer.drain()
        if on_ws_lost is not None:
            reason = msg.extra if msg.type == WSMsgType.CLOSE and isinstance(msg.extra, str) \
                else ""
            on_ws_lost(ws.close_code, reason)

    async def tcp_to_ws() -> None:
        while data := await reader.read(CHUNK):
            if before_ws is not None:
                await before_ws(len(data))
            from_tcp(len(data))
            await ws.send_bytes(data)

    tasks = [asyncio.ensure_future(ws_to_tcp()), asyncio.ensure_future(tcp_to_ws())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        failed = [task.exception() for task in done if not task.cancelled()]
        return next((exc for exc in failed if isinstance(exc, Exception)), None)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()


def make_app(peer: LayerPeer, middlewares: Iterable[Any] = ()) -> web.Application:
    """The layer peer's routes. Its errors' envelope comes with `middlewares` from whoever
    serves it (the composition root gives it the node's, `forge_cli.root.rpc`)."""
    app = web.Application(middlewares=list(middlewares), client_max_size=MAX_BODY)
    app[PEER] = peer
    app.router.add_get("/health", health)
    app.router.add_post("/v1/forge/rpc/terms", offer_terms)
    app.router.add_post("/v1/forge/rpc/settle", settle)
    app.router.add_get("/v1/forge/rpc/tunnel", tunnel)

    async def stop(app: web.Application) -> None:
        await peer.node.stop()  # withdraws the mesh advertisement

    app.on_shutdown.append(stop)
    return app


__all__ = ["Agreement", "LayerPeer", "Traffic", "agreements", "available_mb",
           "make_app", "relay", "source_of"]
