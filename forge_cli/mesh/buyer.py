"""The consumer's side of a peer-to-peer trade: quote, intent, stream, check, countersign, record.

`Buyer.buy` either returns a `Purchase` whose dual-signed trade is in the consumer's ledger
(and, acknowledged, in the provider's), or raises a `MeshError` with nothing recorded:
a provider that dies mid-stream, refuses, or sends terms that do not match the quote and
the reply as received is never paid.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forge_cli import identity
from forge_cli.client import AsyncClient
from forge_cli.errors import (
    BadResponse,
    ForgeError,
    InsufficientCU,
    NodeUnreachable,
    ProviderFailed,
    TermsRejected,
)
from forge_cli.ledger import entries
from forge_cli.mesh import protocol
from forge_cli.mesh.audit import tokens_body
from forge_cli.trade.session import failed

if TYPE_CHECKING:
    from forge_cli.mesh.audit import Auditor
    from forge_cli.trade.wallet import Hold, Wallet

log = logging.getLogger("forge.mesh")

CONNECT_TIMEOUT_S = 60  # each JSON call to a provider, and connecting for its stream
READ_TIMEOUT_S = 120  # the longest wait for the provider's next piece


@dataclass(frozen=True)
class Seller:
    """A peer that offers a model, as discovery or the route table found it."""

    node_id: str
    url: str
    model: str
    params: int = 0
    price_ucu_per_token: int = 0
    reputation: int | None = None

    def short(self) -> str:
        return f"{self.node_id[:12]}… at {self.url}"


def offered(mesh: Any, reputation: Callable[[str], int]) -> list[Seller]:
    """Every priced offer of every trusted peer (no flag, a node id no other peer shows, not
    our own), with the reputation this node gives the peer."""
    return [Seller(peer.node_id, peer.url, offer.model, offer.params, offer.price_ucu_per_token,
                   reputation(peer.node_id))
            for peer in mesh.trusted_peers() if peer.node_id != mesh.node_id
            for offer in peer.offers if offer.price_ucu_per_token > 0]


@dataclass
class Purchase:
    seller: Seller
    text: str
    terms: dict[str, Any]
    trade: dict[str, Any]  # {terms, provider_sig, consumer_sig}
    trade_seq: int  # in the consumer's ledger
    provider_trade_seq: int | None
    balance: int
    first_piece_s: float  # from the quote request to the first piece
    total_s: float  # from the quote request to the trade in the consumer's ledger
    last_piece_s: float = 0.0  # from the quote request to the last piece
    settle_s: float = 0.0  # from the provider's terms to the trade in the consumer's ledger
    audit: entries.Entry | None = None  # the `audit` or `dispute` entry, when audited

    @property
    def cu(self) -> int:
        return self.terms["cu"]


class Buyer:
    """Buys inference from sellers with `signer`'s account, spending through `wallet` (the
    node's or the worker's Wallet); one aiohttp session for all."""

    def __init__(self, wallet: Wallet, signer: identity.Identity, session: Any,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.wallet = wallet
        self.signer = signer
        self.account = signer.node_id
        self.session = session
        self.clock = clock
        self.auditor: Auditor | None = None  # set by a node that audits its purchases

    def _client(self, seller: Seller) -> AsyncClient:
        return AsyncClient(seller.url, timeout=CONNECT_TIMEOUT_S, session=self.session)

    async def _post(self, seller: Seller, path: str, body: dict[str, Any]) -> Any:
        try:
            return await self._client(seller).post(path, body)
        except (NodeUnreachable, BadResponse) as exc:
            raise ProviderFailed(f"provider {seller.short()} is unreachable: {exc}") from None
        except ForgeError as exc:
            raise ProviderFailed(f"provider {seller.short()} refused: {_said(exc)}") from None

    async def quote(self, seller: Seller, model: str, max_tokens: int) -> dict[str, Any]:
        """The seller's signed quote for this consumer, checked."""
        answer = await self._post(seller, "/v1/forge/p2p/quote", {
            "consumer": self.signer.node_id, "model": model, "max_tokens": max_tokens})
        quote, sig = answer.get("quote"), answer.get("quote_sig")
        reason = protocol.quote_problem(quote)
        if reason is None and not identity.verify_hex(seller.node_id, protocol.quote_message(quote),
                                                       str(sig)):
            reason = "its signature does not verify against the provider's node id"
        if reason is None:
            wanted = {"provider": seller.node_id, "consumer": self.signer.node_id,
                      "model": model, "max_tokens": max_tokens}
            reason = next((f"quote.{k} is {quote[k]!r}, asked for {v!r}"
                           for k, v in wanted.items() if quote[k] != v), None)
        if reason:
            raise TermsRejected(f"provider {seller.short()} sent a bad quote: {reason}")
        return {"quote": quote, "quote_sig": sig}

    async def buy(self, seller: Seller, payload: dict[str, Any],
                  on_piece: Callable[[str], Any] | None = None, max_cu: int | None = None,
                  signed_quote: dict[str, Any] | None = None) -> Purchase:
        """Buy one chat completion. `payload` holds model, messages and sampling fields
        (OpenAI names); `on_piece` sees the reply as it streams; `signed_quote` is one
        already obtained with `quote` (a new one is asked for without it)."""
        started = time.perf_counter()
        model, max_tokens = payload["model"], int(payload.get("max_tokens") or 256)
        if signed_quote is None:
            signed_quote = await self.quote(seller, model, max_tokens)
        quote = signed_quote["quote"]
        if max_cu is not None and quote["max_cu"] > max_cu:
            raise InsufficientCU(f"provider {seller.short()} quotes up to {quote['max_cu']} CU, "
                                 f"above the limit of {max_cu} CU")
        hold = await self.wallet.reserve(
            self.account, quote["max_cu"],
            what=f"the quote of {quote['max_cu']:,} CU from provider {seller.short()}",
            hint="ask for fewer tokens (-n), or earn CU by selling with `forge seed`")
        try:
            purchase = await self._buy(seller, payload, signed_quote, on_piece, started, hold)
        except BaseException as exc:
            if failed(exc):
                self.wallet.safety.record_outcome(self.account, False)
            raise
        finally:
            hold.release()
        self.wallet.safety.record_outcome(self.account, True)
        return purchase

    async def _buy(self, seller: Seller, payload: dict[str, Any], signed_quote: dict[str, Any],
                   on_piece: Callable[[str], Any] | None, started: float, hold: Hold
                   ) -> Purchase:
        quote = signed_quote["quote"]
        request = json.dumps({**payload, "max_tokens": quote["max_tokens"]}, sort_keys=True,
                             separators=(",", ":"), ensure_ascii=False)
        request_bytes = request.encode()
        intent = {**signed_quote, "nonce": secrets.token_hex(16),
                  "request_sha256": protocol.sha256_hex(request_bytes), "ts": self.clock()}
        consumer_sig = self.signer.sign(protocol.intent_message(intent)).hex()
        pieces: list[str] = []
        tokens = 0
        final: dict[str, Any] | None = None
        first = None
        last = terms_at = 0.0
        body = {"intent": intent, "consumer_sig": consumer_sig, "request": request}
        try:
            # Signed terms end a sale; a stream that ends without them is told apart below.
            async for event in self._client(seller).stream("/v1/forge/p2p/chat", body,
                                                           until_done=False,
                                                           read_timeout=READ_TIMEOUT_S):
                data = event.data
                if "text" in data:
                    last = time.perf_counter() - started
                    if first is None:
                        first = last
                    pieces.append(data["text"])
                    tokens = int(data.get("tokens", tokens))
                    if on_piece is not None and data["text"]:
                        on_piece(data["text"])
                elif "terms" in data:
                    final = data
                    terms_at = time.perf_counter()
        except (NodeUnreachable, BadResponse) as exc:
            raise ProviderFailed(f"provider {seller.short()} failed mid-stream after "
                                 f"{tokens} tokens ({exc}); nothing was recorded or paid") from None
        except ForgeError as exc:
            said = "refused" if getattr(exc, "status", None) is not None else "stopped"
            raise ProviderFailed(f"provider {seller.short()} {said}: {_said(exc)}") from None
        if final is None:
            raise ProviderFailed(f"provider {seller.short()} stopped after {tokens} tokens "
                                 "without signed terms; nothing was recorded or paid")
        text = "".join(pieces)
        terms, provider_sig = final["terms"], final.get("provider_sig")
        ids = final.get("tokens")
        ids_body = (tokens_body(ids) if isinstance(ids, list) and
                    all(type(t) is int for t in ids) else b"")
        reason = protocol.terms_problem(terms, provider_sig, quote=quote, nonce=intent["nonce"],
                                        request_sha256=intent["request_sha256"],
                                        response=text.encode(), streamed_tokens=tokens,
                                        tokens=ids_body)
        if reason:
            raise TermsRejected(f"refused to countersign the terms of provider "
                                f"{seller.short()}: {reason}; nothing was recorded or paid")
        data = {"terms": terms, "provider_sig": provider_sig,
                "consumer_sig": self.signer.sign(entries.trade_message(terms)).hex()}
        ack = await self._post(seller, "/v1/forge/p2p/settle", data)
        entry = await self.wallet.run(self.wallet.record_trade, data,
                                      [request_bytes, text.encode(), ids_body], hold=hold)
        seq, balance = entry.seq, self.wallet.balance(self.account)
        done = time.perf_counter()
        purchase = Purchase(seller, text, terms, data, seq, ack.get("trade_seq"), balance,
                            first if first is not None else 0.0, done - started, last,
                            done - terms_at)
        if self.auditor is not None and self.auditor.due(terms["model_sha256"]):
            try:
                purchase.audit = await self.auditor.audit_purchase(data, request_bytes,
                                                                   text.encode(), ids_body)
            except ForgeError as exc:  # the purchase stands; only its audit is lost
                log.warning("could not audit the purchase from %s: %s", seller.short(), exc)
        return purchase


def _said(exc: ForgeError) -> str:
    """What the provider said, without the client's "node: "."""
    envelope = getattr(exc, "envelope", None)
    return str(envelope.get("message") or exc) if isinstance(envelope, dict) else str(exc)


def choose(sellers: list[Seller], mode: str) -> list[Seller]:
    """Sellers best first for `mode` (see protocol.rank)."""
    ranked = protocol.rank([{"seller": s, "price_ucu_per_token": s.price_ucu_per_token,
                             "params": s.params, "reputation": s.reputation} for s in sellers],
                           mode)
    return [r["seller"] for r in ranked]
