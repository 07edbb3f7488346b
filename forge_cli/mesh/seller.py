"""The provider's side of a peer-to-peer trade (see `forge_cli.mesh.protocol`).

A peer consumer is a remote account (its node id). The provider judges it by its own ledger:
a free-tier grant of 1000 CU the first time (at most `STRANGERS` accounts living on the free
tier at once, against Sybil floods), plus what it earned and minus what it spent in trades
this node recorded; and by the same safety gates as a local account. Served terms wait for
the consumer's countersignature; terms not countersigned within `settle_ms` become an
`unsettled` entry: no CU moves, the nonce is spent, the consumer's reputation drops.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from forge_cli.economy.credit import account_reputation
from forge_cli.errors import (
    BadIntent,
    ForgeError,
    InsufficientCU,
    KillSwitchActive,
    Replay,
    SpendDenied,
    UnknownModel,
)
from forge_cli.ledger import entries, views
from forge_cli.mesh import protocol

log = logging.getLogger("forge.mesh")

FREE_TIER_CU = 1000
PEER_GRANT_REASON = "free tier (peer)"
STRANGERS = 50


class TooManyStrangers(SpendDenied):
    """Already `STRANGERS` peer accounts live on this node's free tier."""

    http_status = 429
    gate = "rate_limit"


@dataclass
class Sale:
    """An admitted request: checked intent, parsed request, reservation once opened."""

    intent: dict[str, Any]
    request: bytes
    body: dict[str, Any]
    model: Any  # LoadedModel
    reservation: Any = None

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
    reserved_cu: int  # held against the consumer's balance until settled or expired


class Sales:
    """Quotes, admission, terms and settlement for one node (its event loop's side)."""

    def __init__(self, node: Any, *, settle_ms: int = 30_000) -> None:
        self.node = node
        self.settle_ms = settle_ms
        self.open: set[tuple[str, str]] = set()  # nonces admitted and not yet settled/expired
        self.pending: dict[tuple[str, str], Pending] = {}
        self._strangers: set[str] | None = None

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
        reputation = account_reputation(self.node.reader, consumer)
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
        intent, consumer_sig, request = body.get("intent"), body.get("consumer_sig"), \
            body.get("request")
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
            parsed = json.loads(request)
        except ValueError as exc:
            raise BadIntent(f"request is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict) or parsed.get("max_tokens") != quote["max_tokens"]:
            raise BadIntent("request.max_tokens must equal the quote's max_tokens")
        key = (quote["consumer"], intent["nonce"])
        if key in self.open or key in self.pending:
            raise Replay(f"nonce {intent['nonce']!r} is already in use by this consumer")
        seen = self.node.reader.row(views.TRADE_NONCES, key)
        if seen is not None:
            raise Replay(f"nonce {intent['nonce']!r} of this consumer was already used at seq "
                         f"{seen[0]} (replay)")
        return Sale(intent, raw, parsed, model)

    async def open_sale(self, sale: Sale) -> None:
        """Balance as this node sees the consumer, and every safety gate; then reserve."""
        if self.node.safety_killed():
            raise KillSwitchActive("kill switch: this node is not trading", gate="kill_switch")
        await self._check_network_balance(sale)
        self.open.add(sale.key)
        try:
            sale.reservation = await self.node.reserve(
                sale.quote["consumer"], f"peer {sale.quote['consumer'][:12]}", sale.model,
                sale.quote["max_tokens"], price=sale.quote["price_ucu_per_token"],
                grant=self._grant_stranger)
        except BaseException:
            self.open.discard(sale.key)
            raise

    async def _check_network_balance(self, sale: Sale) -> None:
        """DESIGN §7: the consumer as this node's network view sees it — the free tier plus
        what it earned, minus what it spent, over every verified trade — must cover the quote.

        This can only lower what this node extends (its own ledger must also cover the trade,
        or conservation would break), so trades two colluding keys sign to each other earn
        nothing here; they only make a spender poorer."""
        network = getattr(self.node, "network", None)
        if network is None:
            return
        consumer = sale.quote["consumer"]
        seen = FREE_TIER_CU + await asyncio.to_thread(network.balance, consumer)
        available = seen - self.node.reserved.get(consumer, 0)
        if available < sale.quote["max_cu"]:
            raise InsufficientCU(
                f"balance: {max(0, available):,} CU available to {consumer[:12]}… as this node's "
                f"network view sees it (1000 CU free tier + earned − spent over "
                f"{network.count():,} verified trades) is below the quote of "
                f"{sale.quote['max_cu']:,} CU")

    def _grant_stranger(self, account: str) -> None:
        """The free tier for a new peer account, unless too many strangers live on it."""
        ledger = self.node.ledger
        if ledger.has_account(account):
            return
        if self._strangers is None:
            self._strangers = {e.data["account"] for e in ledger.iter_newest("grant")
                               if e.data.get("reason") == PEER_GRANT_REASON}
        living = [a for a in self._strangers
                  if (ledger.row(views.TRADE_TOTALS, (a,)) or (0, 0, 0))[1] == 0]
        if len(living) >= STRANGERS:
            raise TooManyStrangers(f"this node already carries {len(living)} peer accounts on "
                                   "its free tier; new peers are refused until some earn CU",
                                   gate="rate_limit")
        ledger.append("grant", {"account": account, "cu": FREE_TIER_CU,
                                "reason": PEER_GRANT_REASON})
        self._strangers.add(account)

    # -- terms and settlement ----------------------------------------------------------------

    def terms(self, sale: Sale, completion: Any, response: bytes) -> dict[str, Any]:
        """Sign the terms for what was produced and hold them for the countersignature."""
        quote = sale.quote
        tokens = completion.completion_tokens if completion is not None else 0
        terms = {
            "provider": self.node.node_id, "consumer": quote["consumer"], "model": quote["model"],
            "model_sha256": quote["model_sha256"],
            "prompt_tokens": completion.prompt_tokens if completion is not None else 0,
            "completion_tokens": tokens, "price_ucu_per_token": quote["price_ucu_per_token"],
            "cu": entries.trade_cost(tokens, quote["price_ucu_per_token"]),
            "request_sha256": sale.intent["request_sha256"], "response_sha256": protocol.sha256_hex(response),
            "nonce": sale.intent["nonce"], "ts": self.node.clock(),
        }
        data = {"terms": terms,
                "provider_sig": self.node.signer.sign(entries.trade_message(terms)).hex()}
        self.pending[sale.key] = Pending(data, sale.request, response,
                                         self.node.clock() + self.settle_ms,
                                         sale.reservation.max_cu)
        self.node.done_generating()  # its CU stays held until settled or expired
        return data

    async def abandon(self, sale: Sale) -> None:
        """Nothing was served (an error, the kill switch): release and forget the nonce."""
        self.open.discard(sale.key)
        if sale.reservation is not None:
            self.node.release(sale.reservation.account, sale.reservation.max_cu)
            self.node.done_generating()

    async def settle(self, body: dict[str, Any]) -> entries.Entry:
        """The consumer's countersignature: check it against the held terms and record."""
        terms, consumer_sig = body.get("terms"), body.get("consumer_sig")
        if not isinstance(terms, dict) or not isinstance(terms.get("consumer"), str) or \
                not isinstance(terms.get("nonce"), str):
            raise BadIntent("settle needs the terms, provider_sig and consumer_sig")
        key = (terms["consumer"], terms["nonce"])
        pending = self.pending.get(key)
        if pending is None:
            seen = self.node.reader.row(views.TRADE_NONCES, key)
            if seen is not None:
                raise Replay(f"these terms were already recorded at seq {seen[0]}")
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
                return await self.node.on_ledger(self._append_trade, data, pending)
            return await self.node.on_ledger(self.node.ledger.append, "unsettled", data)
        finally:
            self.open.discard(key)
            self.node.release(key[0], pending.reserved_cu)

    def _append_trade(self, data: dict[str, Any], pending: Pending) -> entries.Entry:
        entry = self.node.ledger.append("trade", data, bodies=[pending.request, pending.response])
        self.node.safety.record_spend(data["terms"]["consumer"], data["terms"]["cu"])
        return entry

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


__all__ = ["Sale", "Sales", "TooManyStrangers"]
