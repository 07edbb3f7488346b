"""The provider's side of a peer-to-peer trade (see `forge_cli.mesh.protocol`).

A peer consumer is a remote account (its node id). The provider judges it by its own ledger
through the node's Wallet: the peer free tier (at most `mesh.strangers` accounts living on it
at once, against Sybil floods), plus what it earned and minus what it spent in trades this node
recorded; by its network view; by the terms it left unsigned (at most `mesh.max_unsettled`
sales served and never countersigned, then it is refused); and by the same safety gates as a
local account. Each sale is a TradeSession. Served terms wait for the consumer's
countersignature, holding the reservation; terms not countersigned within `settle_ms` become an
`unsettled` entry: no CU moves, the nonce is spent, the consumer's reputation drops. A consumer
that hangs up once tokens reached it gets the same record at once, for exactly the tokens
delivered: terms it never received, it can never countersign.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from forge_cli import wire
from forge_cli.errors import (
    BadIntent,
    ForgeError,
    InsufficientCU,
    KillSwitchActive,
    Replay,
    UnknownModel,
    UnsettledExposure,
)
from forge_cli.ledger import entries
from forge_cli.mesh import audit, protocol
from forge_cli.trade.seams import Node
from forge_cli.trade.session import Settled, TradeSession
from forge_cli.trade.wallet import FREE_TIER_CU, Hold

log = logging.getLogger("forge.mesh")


@dataclass
class Sale:
    """An admitted request: checked intent, parsed request, reservation once opened."""

    intent: dict[str, Any]
    request: bytes
    body: dict[str, Any]
    model: Any  # LoadedModel
    session: TradeSession | None = None
    data: dict[str, Any] | None = None  # the signed terms, once served
    sampling: dict[str, int] | None = None  # the committed sampling (forge_cli.mesh.audit)
    ids: list[int] | None = None  # the token ids produced, once served

    @property
    def quote(self) -> dict[str, Any]:
        return self.intent["quote"]

    @property
    def key(self) -> tuple[str, str]:
        return self.quote["consumer"], self.intent["nonce"]


@dataclass
class Pending:
    data: dict[str, Any]  # {terms, provider_sig}
    request: bytes
    response: bytes
    deadline_ms: int
    hold: Hold | None  # the consumer's reservation, until settled or expired
    tokens: bytes | None = None  # the ids body the terms commit to


class Sales:
    """Quotes, admission, terms and settlement for one node (its event loop's side)."""

    def __init__(self, node: Node, *, settle_ms: int = 30_000, max_unsettled: int = 3) -> None:
        self.node = node
        self.settle_ms = settle_ms
        self.max_unsettled = max_unsettled
        self.open: set[tuple[str, str]] = set()  # nonces admitted and not yet settled/expired
        self.pending: dict[tuple[str, str], Pending] = {}

    # -- quote -------------------------------------------------------------------------------

    def quote(self, body: dict[str, Any]) -> dict[str, Any]:
        consumer, name, max_tokens = body.get("consumer"), body.get("model"), body.get("max_tokens")
        if not protocol.is_hex(consumer, 64):
            raise BadIntent("consumer must be the buyer's node id (64 hex digits)")
        if consumer == self.node.node_id:
            raise BadIntent("a node cannot buy from itself")
        if type(max_tokens) is not int or max_tokens < 1:
            raise BadIntent("max_tokens must be a positive integer")
        model = self.node.model(name if isinstance(name, str) else None)
        if max_tokens > model.engine.n_ctx:
            raise BadIntent(f"max_tokens must be at most {model.engine.n_ctx}")
        base = self.node.quote(model)
        # What this node's ledger says, lifted by trust over the trade graph, less the
        # collusion penalty (mesh.trust): wash trades buy a consumer nothing here.
        reputation = self.node.effective_reputation(consumer)
        price = protocol.p2p_price(base, reputation)
        quote = {"provider": self.node.node_id, "consumer": consumer, "model": model.name,
                 "model_sha256": model.sha256, "price_ucu_per_token": price,
                 "base_price_ucu_per_token": base, "consumer_reputation": reputation,
                 "max_tokens": max_tokens, "max_cu": entries.trade_cost(max_tokens, price),
                 "expires_ms": self.node.clock() + protocol.QUOTE_TTL_MS}
        return {"quote": quote,
                "quote_sig": self.node.signer.sign(protocol.quote_message(quote)).hex(),
                "surcharge": "peers pay the base price × (2 − reputation); "
                             f"{reputation} bp → ×{(20_000 - reputation) / 10_000:g}"}

    # -- admission ---------------------------------------------------------------------------

    def admit(self, body: dict[str, Any]) -> Sale:
        """Check an intent: our own unexpired quote, the consumer's signature, the request's
        hash, a fresh nonce. Raises BadIntent (422), Replay (409) or UnknownModel (404)."""
        # JSON from a stranger, shape-checked by intent_problem before it is indexed.
        intent: Any = body.get("intent")
        consumer_sig, request = body.get("consumer_sig"), body.get("request")
        reason = protocol.intent_problem(intent, consumer_sig)
        if reason:
            raise BadIntent(f"intent refused: {reason}")
        quote = intent["quote"]
        if quote["provider"] != self.node.node_id or not _verify(
                self.node.node_id, protocol.quote_message(quote), intent["quote_sig"]):
            raise BadIntent("intent refused: the quote was not signed by this node")
        if quote["expires_ms"] < self.node.clock():
            raise BadIntent("intent refused: the quote expired; ask for a new one")
        model = self.node.model(quote["model"])
        if model.sha256 != quote["model_sha256"]:
            raise UnknownModel(f"model {quote['model']!r} changed since the quote")
        if not isinstance(request, str):
            raise BadIntent("request must be the JSON request as a string (its bytes are hashed)")
        raw = request.encode()
        if protocol.sha256_hex(raw) != intent["request_sha256"]:
            raise BadIntent("intent refused: request_sha256 does not match the request sent")
        try:
            parsed = wire.parse(raw, what="request")
        except wire.BadJSON as exc:
            raise BadIntent(str(exc)) from None
        if not isinstance(parsed, dict) or parsed.get("max_tokens") != quote["max_tokens"]:
            raise BadIntent("request.max_tokens must equal the quote's max_tokens")
        key = (quote["consumer"], intent["nonce"])
        if key in self.open or key in self.pending:
            raise Replay(f"nonce {intent['nonce']!r} is already in use by this consumer")
        seen = self.node.nonce_seq(*key)
        if seen is not None:
            raise Replay(f"nonce {intent['nonce']!r} of this consumer was already used at seq "
                         f"{seen} (replay)")
        return Sale(intent, raw, parsed, model)

    async def open_sale(self, sale: Sale) -> TradeSession:
        """The consumer's exposure, its balance as this node sees it, every safety gate; then
        reserve at the quoted price (a session that settles as held terms)."""
        if self.node.safety_killed():
            raise KillSwitchActive("kill switch: this node is not trading", gate="kill_switch")
        consumer = sale.quote["consumer"]
        self._check_exposure(consumer)
        await self._check_network_balance(sale)
        self.open.add(sale.key)
        session = self.node.session(
            account=consumer, label=f"peer {consumer[:12]}", model=sale.model,
            max_tokens=sale.quote["max_tokens"], request=sale.request,
            settle=lambda s, completion: self._serve_terms(sale, s, completion),
            price=sale.quote["price_ucu_per_token"], peer=True, partial="hang-up")
        try:
            await session.open()
        except BaseException:
            self.open.discard(sale.key)
            raise
        sale.session = session
        return session

    def _check_exposure(self, consumer: str) -> None:
        """Terms a consumer never countersigned are debt against it here: past a small
        exposure (recorded unsettled + served and waiting + being served) it is refused."""
        unsettled = self.node.unsettled_count(consumer)
        waiting = sum(1 for key in self.pending if key[0] == consumer)
        serving = sum(1 for key in self.open if key[0] == consumer) - waiting
        if unsettled + waiting + serving >= self.max_unsettled:
            raise UnsettledExposure(
                f"exposure: consumer {consumer[:12]}… has {unsettled} sale(s) it never "
                f"countersigned at this node, {waiting} waiting for its countersignature and "
                f"{serving} being served; at most {self.max_unsettled} may be outstanding, so "
                "this node sells it nothing more", gate="exposure",
                hint="countersign the terms this node served (unsigned terms are debt here)")

    async def _check_network_balance(self, sale: Sale) -> None:
        """DESIGN §7: the consumer as this node's network view sees it — the free tier plus
        what it earned, minus what it spent, over every verified trade — must cover the quote.

        This can only lower what this node extends (its own ledger must also cover the trade,
        or conservation would break), so trades two colluding keys sign to each other earn
        nothing here; they only make a spender poorer."""
        network = self.node.network
        if network is None:
            return
        consumer = sale.quote["consumer"]
        available = self.node.wallet.available_seen(
            consumer, await asyncio.to_thread(network.balance, consumer))
        if available < sale.quote["max_cu"]:
            raise InsufficientCU(
                f"balance: {max(0, available):,} CU available to {consumer[:12]}… as this node's "
                f"network view sees it ({FREE_TIER_CU:,} CU free tier + earned − spent over "
                f"{network.count():,} verified trades, less what its requests here hold) is "
                f"below the quote of {sale.quote['max_cu']:,} CU")

    # -- terms and settlement ----------------------------------------------------------------

    async def _serve_terms(self, sale: Sale, session: TradeSession,
                           completion: Any) -> Settled:
        """The session's settlement: sign the terms for the tokens delivered (all of them,
        unless the consumer hung up) and hold them, and the consumer's reservation, for the
        countersignature."""
        quote = sale.quote
        tokens = session.delivered if completion is not None else 0
        sale.ids = list(completion.token_ids)[:tokens] if completion is not None else []
        response = session.delivered_text.encode()
        run = audit.run_terms(sale.sampling, sale.ids) if sale.sampling is not None else {}
        terms = {
            "provider": self.node.node_id, "consumer": quote["consumer"], "model": quote["model"],
            "model_sha256": quote["model_sha256"],
            "prompt_tokens": completion.prompt_tokens if completion is not None else 0,
            "completion_tokens": tokens, "price_ucu_per_token": quote["price_ucu_per_token"],
            "cu": entries.trade_cost(tokens, quote["price_ucu_per_token"]),
            "request_sha256": sale.intent["request_sha256"],
            "response_sha256": protocol.sha256_hex(response),
            "nonce": sale.intent["nonce"], "ts": self.node.clock(), **run,
        }
        sale.data = {"terms": terms,
                     "provider_sig": self.node.signer.sign(entries.trade_message(terms)).hex()}
        self.pending[sale.key] = Pending(sale.data, sale.request, response,
                                         self.node.clock() + self.settle_ms, session.keep_hold(),
                                         audit.tokens_body(sale.ids) if run else None)
        return Settled(terms["cu"], quote["price_ucu_per_token"], 0, None)

    async def end(self, sale: Sale, *, terms_sent: bool) -> None:
        """The sale's stream is over. Nothing served (an error, the kill switch): forget the
        nonce (the session released the reservation). Terms served but never sent (the
        consumer hung up first): `unsettled` now, since it cannot countersign what it never
        received; none if no token reached it. Terms sent wait for the countersignature."""
        pending = self.pending.get(sale.key)
        if pending is None:
            self.open.discard(sale.key)
            return
        if terms_sent:
            return
        del self.pending[sale.key]
        tokens = pending.data["terms"]["completion_tokens"]
        if tokens == 0:
            self.open.discard(sale.key)
            if pending.hold is not None:
                pending.hold.release()
            return
        log.warning("consumer %s… hung up after %d tokens of nonce %s: recorded as unsettled",
                    sale.key[0][:12], tokens, sale.key[1])
        try:
            await self._record(sale.key, "unsettled", {
                **pending.data, "reason": f"the consumer hung up after {tokens} tokens were "
                                          "delivered, before the terms reached it"}, pending)
        except ForgeError as exc:
            log.error("could not record unsettled terms for nonce %s: %s", sale.key[1], exc)

    async def settle(self, body: dict[str, Any]) -> entries.Entry:
        """The consumer's countersignature: check it against the held terms and record."""
        terms, consumer_sig = body.get("terms"), body.get("consumer_sig")
        if not isinstance(terms, dict) or not isinstance(terms.get("consumer"), str) or \
                not isinstance(terms.get("nonce"), str):
            raise BadIntent("settle needs the terms, provider_sig and consumer_sig")
        key = (terms["consumer"], terms["nonce"])
        pending = self.pending.get(key)
        if pending is None:
            seen = self.node.nonce_seq(*key)
            if seen is not None:
                raise Replay(f"these terms were already recorded at seq {seen}")
            raise BadIntent("no served terms wait for this countersignature (unknown nonce)")
        if terms != pending.data["terms"] or body.get("provider_sig") != pending.data["provider_sig"]:
            raise BadIntent("the terms countersigned are not the terms this node signed")
        data = {**pending.data, "consumer_sig": consumer_sig}
        reason = entries.KINDS["trade"](data) or entries.trade_signature_problem(data)
        if reason:
            raise BadIntent(f"countersignature refused: {reason}")
        del self.pending[key]
        return await self._record(key, "trade", data, pending)

    async def _record(self, key: tuple[str, str], kind: str, data: dict[str, Any],
                      pending: Pending) -> entries.Entry:
        """Append the trade (or the unsettled terms), then let go of the reserved CU."""
        try:
            if kind == "trade":
                bodies = [pending.request, pending.response]
                if pending.tokens is not None:
                    bodies.append(pending.tokens)
                return await self.node.on_ledger(self.node.wallet.record_trade, data, bodies,
                                                 hold=pending.hold)
            # What was delivered, kept: the seller's evidence of the tokens it was not paid for.
            return await self.node.append("unsettled", data, bodies=[
                pending.response, *([pending.tokens] if pending.tokens is not None else [])])
        finally:
            self.open.discard(key)
            if pending.hold is not None:
                pending.hold.release()

    async def expire(self, *, everything: bool = False) -> list[entries.Entry]:
        """Record terms whose countersignature did not come in time as `unsettled`."""
        now = self.node.clock()
        done = []
        for key, pending in list(self.pending.items()):
            if not everything and pending.deadline_ms > now:
                continue
            del self.pending[key]
            reason = ("the node stopped before the consumer countersigned" if everything
                      else f"not countersigned within {self.settle_ms // 1000} s")
            log.warning("consumer %s… never countersigned nonce %s: recorded as unsettled",
                        key[0][:12], key[1])
            try:
                done.append(await self._record(key, "unsettled", {**pending.data, "reason": reason},
                                               pending))
            except ForgeError as exc:
                log.error("could not record unsettled terms for nonce %s: %s", key[1], exc)
        return done


def _verify(node_id: str, message: bytes, sig: str) -> bool:
    from forge_cli import identity

    return identity.verify_hex(node_id, message, sig)


__all__ = ["Sale", "Sales"]
