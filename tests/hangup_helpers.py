"""Clients that hang up: a raw P2P consumer and an agent streaming through a node, both over
aiohttp on loopback, that close the socket at a chosen point of the reply and say exactly what
they received before they did."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from forge_cli import identity
from forge_cli.ledger import entries
from forge_cli.mesh import protocol
from tests.mesh_helpers import entries_of
from tests.node_harness import NodeProcess

# Where a client hangs up: after N text pieces, on the piece that brings the count to
# max_tokens ("last"), once the terms came but before countersigning ("terms"), or never
# ("settle": it countersigns, an honest buyer).
HangUp = int | str


@dataclass
class Received:
    """What a client read before it hung up (or the sale ended)."""

    status: int
    text: str = ""
    tokens: int = 0  # the seller's running count on the last piece read
    pieces: int = 0
    terms: dict[str, Any] | None = None
    nonce: str = ""
    hung_up: bool = False
    error: Any = None
    events: list[dict[str, Any]] = field(default_factory=list)


def _stop_here(hang_up: HangUp, event: dict[str, Any], got: Received, max_tokens: int) -> bool:
    if isinstance(hang_up, int):
        return "text" in event and event["text"] != "" and got.pieces >= hang_up
    if hang_up == "last":
        return "text" in event and got.tokens >= max_tokens
    if hang_up == "terms":
        return "terms" in event
    return False


async def _read(response: aiohttp.ClientResponse, hang_up: HangUp, got: Received,
                max_tokens: int, *, chat_chunks: bool, act: Callable[[], Any] | None = None
                ) -> None:
    """Read SSE lines; close the connection (the hang-up) where `hang_up` says, or there
    call `act` once and read on."""
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        got.events.append(event)
        if "error" in event:
            got.error = event["error"]
        elif chat_chunks:  # an OpenAI chunk: count content pieces (one token per byte here)
            piece = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
            if piece:
                got.text += piece
                got.pieces += 1
                got.tokens = len(got.text)
            event = {"text": piece} if piece else event
        elif "text" in event:
            got.text += event["text"]
            got.pieces += 1 if event["text"] else 0
            got.tokens = event["tokens"]
        elif "terms" in event:
            got.terms = event
        if _stop_here(hang_up, event, got, max_tokens):
            if act is not None:
                act()
                act = None
                hang_up = "never"
                continue
            got.hung_up = True
            response.close()  # the socket closes here, unread bytes and all
            return


class P2PConsumer:
    """A stranger key buying from a seller with raw requests: quote, sign the intent, stream
    the chat and hang up where told; countersign only with hang_up="settle"."""

    def __init__(self, seller: NodeProcess, key: identity.Identity | None = None) -> None:
        self.seller = seller
        self.key = key or identity.Identity.generate()
        self.model = seller.request("GET", "/health")[2]["models"][0]

    def quote(self, max_tokens: int) -> tuple[int, Any]:
        status, _, quote = self.seller.request("POST", "/v1/forge/p2p/quote", body={
            "consumer": self.key.node_id, "model": self.model, "max_tokens": max_tokens})
        return status, quote

    def intent(self, max_tokens: int, content: str = "hi") -> dict[str, Any]:
        status, quote = self.quote(max_tokens)
        assert status == 200, quote
        request = json.dumps({"model": self.model, "max_tokens": max_tokens, "temperature": 0,
                              "messages": [{"role": "user", "content": content}]})
        intent = {"quote": quote["quote"], "quote_sig": quote["quote_sig"],
                  "nonce": secrets.token_hex(16),
                  "request_sha256": protocol.sha256_hex(request.encode()),
                  "ts": int(time.time() * 1000)}
        return {"intent": intent, "request": request,
                "consumer_sig": self.key.sign(protocol.intent_message(intent)).hex()}

    def buy(self, max_tokens: int, hang_up: HangUp, content: str = "hi") -> Received:
        return self.buy_body(self.intent(max_tokens, content), max_tokens, hang_up)

    def buy_body(self, body: dict[str, Any], max_tokens: int, hang_up: HangUp) -> Received:
        got = asyncio.run(self._buy(body, max_tokens, hang_up))
        got.nonce = body["intent"]["nonce"]
        if hang_up == "settle" and got.terms is not None:
            data = {"terms": got.terms["terms"], "provider_sig": got.terms["provider_sig"],
                    "consumer_sig": self.key.sign(
                        entries.trade_message(got.terms["terms"])).hex()}
            status, _, ack = self.seller.request("POST", "/v1/forge/p2p/settle", body=data)
            assert status == 200, ack
        return got

    def replay(self, body: dict[str, Any]) -> int:
        return self.seller.request("POST", "/v1/forge/p2p/chat", body=body)[0]

    async def _buy(self, body: dict[str, Any], max_tokens: int, hang_up: HangUp) -> Received:
        async with aiohttp.ClientSession() as session:
            response = await session.post(self.seller.url + "/v1/forge/p2p/chat", json=body)
            try:
                got = Received(response.status)
                if response.status != 200:
                    got.error = await response.json()
                    return got
                await _read(response, hang_up, got, max_tokens, chat_chunks=False)
                return got
            finally:
                response.release()


def stream_chat(node: NodeProcess, token: str, model: str, max_tokens: int,
                hang_up: HangUp, content: str = "hi", act: Callable[[], Any] | None = None
                ) -> Received:
    """An agent's streamed chat completion through `node`, hanging up where told (or, with
    `act`, calling it there and reading to the end)."""

    async def run() -> Received:
        async with aiohttp.ClientSession() as session:
            response = await session.post(node.url + "/v1/chat/completions", json={
                "model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": content}]},
                headers={"Authorization": f"Bearer {token}"})
            try:
                got = Received(response.status)
                if response.status != 200:
                    got.error = await response.json()
                    return got
                await _read(response, hang_up, got, max_tokens, chat_chunks=True, act=act)
                return got
            finally:
                response.release()

    return asyncio.run(run())


def outcome(home: Path, nonce: str) -> tuple[str, Any] | None:
    """The seller's record of the sale with this nonce: ("trade" | "unsettled", entry)."""
    for kind in ("trade", "unsettled"):
        for entry in entries_of(home, kind):
            if entry.data["terms"]["nonce"] == nonce:
                return kind, entry
    return None


def body_of(home: Path, body_hash: str) -> bytes | None:
    from forge_cli.ledger.store import Ledger

    ledger = Ledger.open_reader(home / "ledger.db")
    try:
        return ledger.body(body_hash)
    finally:
        ledger.close()
