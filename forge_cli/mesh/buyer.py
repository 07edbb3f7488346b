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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forge_cli import identity
from forge_cli.client import AsyncClient
from forge_cli.errors import (
    BadResponse,
    ForgeError,
    InsufficientCU,
    KillSwitchActive,
    NodeUnreachable,
    ProviderFailed,
    TermsRejected,
    UnknownModel,
)
from forge_cli.ledger import entries
from forge_cli.mesh import protocol
from forge_cli.mesh.audit import grammar_problem, tokens_body
from forge_cli.trade.offers import Seller, choose, offered  # noqa: F401  (their home)
from forge_cli.trade.session import RemoteCompletion, RemoteOffer, Settled, TradeSession

if TYPE_CHECKING:
    from forge_cli.mesh.audit import Auditor
    from forge_cli.trade.seams import Offer
    from forge_cli.trade.wallet import Wallet

log = logging.getLogger("forge.mesh")

CONNECT_TIMEOUT_S = 60  # each JSON call to a provider, and connecting for its stream
READ_TIMEOUT_S = 120  # the longest wait for the provider's next piece


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


class Reply:
    """The provider's streamed reply as a session Source: text pieces (the final one may be
    empty, carrying the total count), the running token count, and the signed terms once
    they come. `close()` stops reading, which closes the connection: a seller then records
    the tokens it delivered as unsettled."""

    def __init__(self, events: AsyncIterator[Any], seller: Seller, started: float) -> None:
        self.events = events
        self.seller = seller
        self.started = started
        self.tokens = 0
        self.final: dict[str, Any] | None = None
        self.first: float | None = None
        self.last = 0.0
        self.terms_at = 0.0

    def __aiter__(self) -> Reply:
        return self

    async def __anext__(self) -> str:
        seller = self.seller
        while True:
            try:
                event = await self.events.__anext__()
            except (NodeUnreachable, BadResponse) as exc:
                raise ProviderFailed(f"provider {seller.short()} failed mid-stream after "
                                     f"{self.tokens} tokens ({exc}); nothing was recorded or "
                                     "paid") from None
            except ForgeError as exc:
                said = "refused" if getattr(exc, "status", None) is not None else "stopped"
                raise ProviderFailed(f"provider {seller.short()} {said}: {_said(exc)}") from None
            data = event.data
            if not isinstance(data, dict):
                raise ProviderFailed(f"provider {seller.short()} sent an event that is not an "
                                     "object; nothing was recorded or paid")
            if "text" in data:
                text, count = data["text"], data.get("tokens", self.tokens)
                if not isinstance(text, str) or type(count) is not int or count < self.tokens:
                    raise ProviderFailed(f"provider {seller.short()} sent a piece without text "
                                         "or a running token count that does not grow; "
                                         "nothing was recorded or paid")
                self.last = time.perf_counter() - self.started
                if self.first is None:
                    self.first = self.last
                self.tokens = count
                return text
            if "terms" in data:
                self.final = data
                self.terms_at = time.perf_counter()

    async def close(self) -> RemoteCompletion | None:
        if isinstance(self.events, AsyncGenerator):  # closing it closes the connection
            await self.events.aclose()
        if self.tokens == 0 and self.final is None:
            return None
        terms = self.final.get("terms") if self.final is not None else None
        prompt = terms.get("prompt_tokens") if isinstance(terms, dict) else None
        return RemoteCompletion(prompt if type(prompt) is int else 0, self.tokens, "stop",
                                self.first or 0.0, max(0.0, self.last - (self.first or 0.0)))


class Buyer:
    """Buys inference from sellers with `signer`'s account, spending through `wallet` (the
    node's or the worker's Wallet); one aiohttp session for all.

    Each purchase is a TradeSession (the Buyer is its Desk): reserved at the quote, the kill
    switch read on every piece, settled by countersigning the seller's terms for what was
    received, and told to the breaker in the one meaning of "failed"."""

    def __init__(self, wallet: Wallet, signer: identity.Identity, session: Any,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000, *,
                 killed: Callable[[], bool]) -> None:
        self.wallet = wallet
        self.safety = wallet.safety
        self.signer = signer
        self.account = signer.node_id
        self.session = session
        self.clock = clock
        self.killed = killed
        self.auditor: Auditor | None = None  # set by a node that audits its purchases

    # -- the Desk a purchase's TradeSession runs on ----------------------------------------------

    def quote(self, model: Offer) -> int:
        raise UnknownModel(f"model {model.name!r} is priced by its seller's quote, not here")

    def safety_killed(self) -> bool:
        return self.killed()

    def generating(self, delta: int) -> None:
        """A purchase generates nothing here (a forwarding node counts its consumer's session)."""

    def _client(self, seller: Seller) -> AsyncClient:
        return AsyncClient(seller.url, timeout=CONNECT_TIMEOUT_S, session=self.session)

    async def _post(self, seller: Seller, path: str, body: dict[str, Any]) -> Any:
        try:
            return await self._client(seller).post(path, body)
        except (NodeUnreachable, BadResponse) as exc:
            raise ProviderFailed(f"provider {seller.short()} is unreachable: {exc}") from None
        except ForgeError as exc:
            raise ProviderFailed(f"provider {seller.short()} refused: {_said(exc)}") from None

    async def quote_from(self, seller: Seller, model: str, max_tokens: int) -> dict[str, Any]:
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
                  on_piece: Callable[[str, int], Any] | None = None, max_cu: int | None = None,
                  signed_quote: dict[str, Any] | None = None) -> Purchase:
        """Buy one chat completion. `payload` holds model, messages and sampling fields
        (OpenAI names); `on_piece` sees the reply as it streams, each piece with the running
        token count (the last may be empty, carrying the total); `signed_quote` is one
        already obtained with `quote_from` (a new one is asked for without it).

        Stopped once tokens came (the kill switch, or cancelled as the node stops), it still
        ends in a recorded outcome: the trade countersigned if the terms had arrived, else
        the connection closes and the seller records the tokens it delivered as unsettled."""
        started = time.perf_counter()
        model, max_tokens = payload["model"], int(payload.get("max_tokens") or 256)
        wanted = _grammar_sha256(payload)  # the buyer's own request: a bad one stops here
        if signed_quote is None:
            signed_quote = await self.quote_from(seller, model, max_tokens)
        quote = signed_quote["quote"]
        if max_cu is not None and quote["max_cu"] > max_cu:
            raise InsufficientCU(f"provider {seller.short()} quotes up to {quote['max_cu']} CU, "
                                 f"above the limit of {max_cu} CU")
        # The payload's own key order, not sorted: a JSON schema in response_format lists its
        # properties in the order the reply's keys must take (the bytes are hashed as sent).
        request = json.dumps({**payload, "max_tokens": quote["max_tokens"]},
                             separators=(",", ":"), ensure_ascii=False)
        intent = {**signed_quote, "nonce": secrets.token_hex(16),
                  "request_sha256": protocol.sha256_hex(request.encode()), "ts": self.clock()}
        deal = _Deal(self, seller, quote, intent, request.encode(), wanted)
        trade = TradeSession(
            self, account=self.account, label=f"provider {seller.short()}",
            model=RemoteOffer(quote["model"], quote["model_sha256"], seller.params),
            max_tokens=quote["max_tokens"], request=request.encode(), settle=deal.countersign,
            price=quote["price_ucu_per_token"],
            what=f"the quote of {quote['max_cu']:,} CU from provider {seller.short()}",
            hint="ask for fewer tokens (-n), or earn CU by selling with `forge seed`")
        body = {"intent": intent, "request": request,
                "consumer_sig": self.signer.sign(protocol.intent_message(intent)).hex()}
        async with trade:
            # Signed terms end a sale; a stream that ends without them is told apart below.
            deal.reply = Reply(self._client(seller).stream(
                "/v1/forge/p2p/chat", body, until_done=False, read_timeout=READ_TIMEOUT_S),
                seller, started)
            async for piece in trade.run(deal.reply):
                if on_piece is not None:
                    on_piece(piece, deal.reply.tokens)
            if trade.killed:
                raise KillSwitchActive(
                    f"kill switch: activated while buying from {seller.short()}; the purchase "
                    "stops and nothing is countersigned", gate="kill_switch")
            if deal.reply.final is None:
                raise ProviderFailed(f"provider {seller.short()} stopped after "
                                     f"{deal.reply.tokens} tokens without signed terms; "
                                     "nothing was recorded or paid")
            settled = await trade.settle()
        assert deal.data is not None and deal.entry is not None
        done = time.perf_counter()
        reply = deal.reply
        purchase = Purchase(seller, trade.text, deal.data["terms"], deal.data, deal.entry.seq,
                            deal.ack.get("trade_seq"), settled.balance,
                            reply.first if reply.first is not None else 0.0, done - started,
                            reply.last, done - reply.terms_at)
        if self.auditor is not None and self.auditor.due(quote["model_sha256"]):
            try:
                purchase.audit = await self.auditor.audit_purchase(
                    deal.data, request.encode(), trade.text.encode(), deal.ids_body)
            except ForgeError as exc:  # the purchase stands; only its audit is lost
                log.warning("could not audit the purchase from %s: %s", seller.short(), exc)
        return purchase


@dataclass
class _Deal:
    """One purchase's state between the stream and the countersignature."""

    buyer: Buyer
    seller: Seller
    quote: dict[str, Any]
    intent: dict[str, Any]
    request: bytes
    grammar_sha256: str | None  # of the grammar the request derives; the terms must name it
    reply: Reply | None = None
    data: dict[str, Any] | None = None  # the dual-signed trade, once countersigned
    entry: entries.Entry | None = None
    ack: dict[str, Any] = field(default_factory=dict)
    ids_body: bytes = b""

    async def countersign(self, session: TradeSession, completion: Any) -> Settled:
        """The session's settlement: countersign the terms if they came and match the quote
        and what was received, tell the seller, record; otherwise nothing is paid."""
        price = self.quote["price_ucu_per_token"]
        reply = self.reply
        final = reply.final if reply is not None else None
        if completion is None or reply is None or final is None:
            return Settled(0, price, 0, None)
        seller = self.seller
        terms, provider_sig = final.get("terms"), final.get("provider_sig")
        ids = final.get("tokens")
        self.ids_body = (tokens_body(ids) if isinstance(ids, list) and
                         all(type(t) is int for t in ids) else b"")
        reason = protocol.terms_problem(terms, provider_sig, quote=self.quote,
                                        nonce=self.intent["nonce"],
                                        request_sha256=self.intent["request_sha256"],
                                        response=session.text.encode(),
                                        streamed_tokens=reply.tokens, tokens=self.ids_body)
        if reason is None and isinstance(terms, dict):
            problem = grammar_problem(self.grammar_sha256, terms["sampling"].get("grammar_sha256"))
            reason = f"grammar: {problem}" if problem else None
        if reason or not isinstance(terms, dict):
            raise TermsRejected(f"refused to countersign the terms of provider "
                                f"{seller.short()}: {reason}; nothing was recorded or paid")
        buyer = self.buyer
        data = {"terms": terms, "provider_sig": provider_sig,
                "consumer_sig": buyer.signer.sign(entries.trade_message(terms)).hex()}
        self.ack = await buyer._post(seller, "/v1/forge/p2p/settle", data)
        self.entry = await buyer.wallet.run(
            buyer.wallet.record_trade, data, [self.request, session.text.encode(), self.ids_body],
            hold=session.hold)
        self.data = data
        return Settled(terms["cu"], price, 0, self.entry.seq)


def _grammar_sha256(payload: dict[str, Any]) -> str | None:
    """The SHA-256 of the grammar a seller derives from this request (its response_format),
    as the auditor will; None for free text."""
    from forge_cli.inference import grammar
    from forge_cli.inference.requests import parse_sampling

    return grammar.digest(parse_sampling(payload, entries.MAX_AMOUNT).grammar)


def _said(exc: ForgeError) -> str:
    """What the provider said, without the client's "node: "."""
    envelope = getattr(exc, "envelope", None)
    return str(envelope.get("message") or exc) if isinstance(envelope, dict) else str(exc)
