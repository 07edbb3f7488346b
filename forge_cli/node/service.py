"""What a node does, without HTTP: load models, quote, reserve, generate, settle trades.

Every write to the ledger (and every safety decision, which may write one) runs on one
dedicated thread, so the writer connection is never used from two threads at once; reads
that the API serves at volume (balances) use a separate read-only connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from forge_cli import identity
from forge_cli.errors import EngineBusy, ForgeError, InsufficientCU, SelfTrade, UnknownModel
from forge_cli.ledger import entries
from forge_cli.ledger.store import Ledger

T = TypeVar("T")
FREE_TIER_CU = 1000


@dataclass
class LoadedModel:
    name: str
    engine: Any  # forge_cli.inference.engine.Engine
    sha256: str
    params: int
    path: Path

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "forge",
                "sha256": self.sha256, "params": self.params}


@dataclass
class Reservation:
    """CU held for one request between the quote and the trade."""

    account: str
    name: str
    model: LoadedModel
    price_ucu: int
    max_cu: int
    started: float = field(default_factory=time.perf_counter)
    remote: Any = None  # (seller, signed quote) when a mesh peer generates it


@dataclass
class Settled:
    cu: int
    price_ucu: int
    balance: int
    trade_seq: int | None  # None: nothing was produced, so nothing was traded

    def x_forge(self) -> dict[str, Any]:
        return {"cu_cost": self.cu, "price_ucu_per_token": self.price_ucu,
                "balance": self.balance, "trade_seq": self.trade_seq}


class Node:
    """The node's state and its economic rules; the routes are a thin HTTP skin over it."""

    def __init__(self, *, home: Path, ledger_path: Path, signer: identity.Identity,
                 models: list[LoadedModel], clock: Callable[[], int] | None = None) -> None:
        from forge_cli import config
        from forge_cli.economy.accounts import Accounts, operator_token
        from forge_cli.economy.pricing import Market
        from forge_cli.economy.safety import BreakerRules, Policy, Safety
        from forge_cli.node.metrics import Metrics

        self.home = home
        self.signer = signer
        self.node_id = signer.node_id
        self.models = {m.name: m for m in models}
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.started_ms = self.clock()
        self.ledger = Ledger.open_writer(ledger_path, signer)
        self.reader = Ledger.open_reader(ledger_path)
        self._ledger_thread = ThreadPoolExecutor(1, thread_name_prefix="forge-ledger")
        self._pumps = ThreadPoolExecutor(32, thread_name_prefix="forge-pump")
        self.accounts = Accounts(home)
        self.operator_token = operator_token(home)
        self.safety = Safety(self.ledger, clock=self.clock, defaults=Policy.from_config(),
                             breaker=BreakerRules.from_config(),
                             approval_ttl_ms=config.get("safety.approval_ttl_s") * 1000)
        # The node is the ledger's only writer, so it knows the kill switch without asking:
        # the flag is read on every streamed piece.
        self.killed = bool(self.safety.kill_state()["active"])
        from forge_cli.economy.lending import Lending

        self.lending = Lending(self.ledger, self.safety, clock=self.clock, host=self.node_id)
        self.markets = {name: Market() for name in self.models}
        self.metrics = Metrics()
        self.reserved: dict[str, int] = {}
        self._reserve_lock = threading.Lock()
        self.in_flight = 0
        self.events: Any = None  # EventBus, attached once the event loop runs
        self.mesh: Any = None  # forge_cli.mesh.discovery.Mesh, with `forge node --mesh`
        self.sales: Any = None  # forge_cli.mesh.seller.Sales: what peers buy from this node
        self.buyer: Any = None  # forge_cli.mesh.buyer.Buyer: what this node buys from peers
        self.gossip: Any = None  # forge_cli.mesh.gossip.Gossip, with `forge node --mesh`
        from forge_cli.mesh.network import NetworkView

        # Every verified dual-signed trade: ours (followed from the ledger) and gossiped ones.
        self.network = NetworkView.open(home / "network.db")
        self.network.follow(self.ledger)
        self.metrics.ledger_size.set(self.ledger.size)
        self.ledger.listeners.append(self._appended)

    # -- plumbing ----------------------------------------------------------------------------

    async def on_ledger(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the ledger thread (all writes and safety decisions go there)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._ledger_thread, lambda: fn(*args, **kwargs))

    def _appended(self, entry: entries.Entry) -> None:
        self.metrics.ledger_size.set(self.ledger.size)
        if self.events is not None:
            self.events.publish("entry", entry.to_json())

    def close(self) -> None:
        for model in self.models.values():
            model.engine.close()
        self._pumps.shutdown(wait=False, cancel_futures=True)
        self._ledger_thread.shutdown(wait=True)
        self.reader.close()
        self.ledger.close()
        self.network.close()

    # -- models and prices -------------------------------------------------------------------

    def model(self, name: str | None) -> LoadedModel:
        if name is None or name == "":
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise UnknownModel("this node serves several models; name one in `model`")
        found = self.models.get(name)
        if found is None:
            raise UnknownModel(f"model {name!r} is not served here; this node serves "
                               f"{', '.join(sorted(self.models))}")
        return found

    def price(self, model: LoadedModel) -> int:
        """The current price (reading it changes nothing)."""
        return self.markets[model.name].price_ucu(model.params)

    def offers(self) -> list[dict[str, Any]]:
        """What this node sells, as /health and the mesh advertise it."""
        return [{"model": m.name, "sha256": m.sha256[:16], "params": m.params,
                 "price_ucu_per_token": self.price(m)} for m in self.models.values()]

    def supply(self, model: LoadedModel) -> int:
        """Providers of this model: this node, plus trusted mesh peers offering the same GGUF
        (matched by its sha256 prefix, as they advertise it)."""
        if self.mesh is None:
            return 1
        prefix = model.sha256[:16]
        return 1 + sum(1 for peer in self.mesh.trusted_peers()
                       if any(o.sha256 and prefix.startswith(o.sha256) for o in peer.offers))

    def quote(self, model: LoadedModel) -> int:
        """The price for a request arriving now: demand (queued + running) moves the market."""
        market = self.markets[model.name]
        market.observe(demand=self.in_flight + 1, supply=self.supply(model))
        price = market.price_ucu(model.params)
        self.metrics.price.labels(model.name).set(price)
        return price

    # -- accounts ----------------------------------------------------------------------------

    def balance(self, account: str) -> int:
        return self.reader.balance(account)

    def available(self, account: str) -> int:
        return self.balance(account) - self.reserved.get(account, 0)

    def ensure_grant(self, account: str) -> None:
        """The free tier for a new account (on the ledger thread); the lending routes use it."""
        self._ensure_grant(account)

    def _ensure_grant(self, account: str) -> None:
        """A new account's free tier, once: a `grant` entry (on the ledger thread)."""
        if not self.ledger.has_account(account):
            self.ledger.append("grant", {"account": account, "cu": FREE_TIER_CU,
                                         "reason": "free tier"})

    # -- the trade ---------------------------------------------------------------------------

    async def open(self, who: Any, model: LoadedModel, max_tokens: int) -> Reservation:
        """Quote and reserve the most this request can cost, after every safety gate."""
        if who.is_operator:
            raise SelfTrade(
                "the operator token is this node's own account: buying from yourself is a "
                "self-trade and is refused",
                hint="create a consumer account with `forge wallet agent create NAME` and use "
                "its token")
        return await self.reserve(who.account_hex, who.name, model, max_tokens)

    async def reserve(self, account: str, name: str, model: LoadedModel, max_tokens: int,
                      price: int | None = None, grant: Callable[[str], None] | None = None
                      ) -> Reservation:
        """Reserve up to `max_tokens` at `price` (default: the quote now) for `account`."""
        if price is None:
            price = self.quote(model)
        max_cu = entries.trade_cost(max_tokens, price)
        await self.on_ledger(grant or self._ensure_grant, account)
        with self._reserve_lock:
            available = self.available(account)
            if available < max_cu:
                raise InsufficientCU(
                    f"balance: {available:,} CU available is below the quote of {max_cu:,} CU "
                    f"for up to {max_tokens} tokens at {price / 1e6:.2f} CU/token",
                    hint="lower max_tokens, or fund the account")
            self.reserved[account] = self.reserved.get(account, 0) + max_cu
        try:
            await self.on_ledger(self.safety.check, account, max_cu)
        except BaseException:
            self.release(account, max_cu)
            raise
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        return Reservation(account, name, model, price, max_cu)

    def done_generating(self) -> None:
        """One request opened by `reserve` stopped generating (its CU may still be held)."""
        self.in_flight -= 1
        self.metrics.queue_depth.set(self.in_flight)

    def release(self, account: str, cu: int) -> None:
        """Let go of CU held for `account` by `reserve`."""
        with self._reserve_lock:
            left = self.reserved.get(account, 0) - cu
            if left > 0:
                self.reserved[account] = left
            else:
                self.reserved.pop(account, None)

    async def settle(self, r: Reservation, completion: Any, request: bytes,
                     response: bytes, *, failed: bool = False) -> Settled:
        """Sign and record the trade for what was produced; release the reservation.

        Called once for every opened reservation, also when generation failed or the client
        went away: the consumer pays for the tokens produced, and only for those.
        """
        self.done_generating()
        try:
            tokens = completion.completion_tokens if completion is not None else 0
            if tokens == 0:
                self.release(r.account, r.max_cu)
                if failed:
                    await self.on_ledger(self.safety.record_outcome, False)
                return Settled(0, r.price_ucu, self.available(r.account), None)
            entry = await self.on_ledger(self._record_trade, r, completion, request, response)
        except BaseException:
            self.release(r.account, r.max_cu)
            await self.on_ledger(self.safety.record_outcome, False)
            raise
        self.release(r.account, r.max_cu)
        terms = entry.data["terms"]
        self.metrics.trades.labels(r.model.name).inc()
        self.metrics.cu_earned.inc(terms["cu"])
        self.metrics.cu_spent.inc(terms["cu"])
        self.metrics.tokens.labels("prompt").inc(terms["prompt_tokens"])
        self.metrics.tokens.labels("completion").inc(terms["completion_tokens"])
        return Settled(terms["cu"], r.price_ucu, self.available(r.account), entry.seq)

    def _record_trade(self, r: Reservation, completion: Any, request: bytes,
                      response: bytes) -> entries.Entry:
        consumer = self.accounts.signer_for(r.account)
        if consumer is None:
            raise ForgeError(f"no key for account {r.account[:16]}… in the keystore")
        tokens = completion.completion_tokens
        terms = {
            "provider": self.node_id, "consumer": r.account, "model": r.model.name,
            "model_sha256": r.model.sha256, "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": tokens, "price_ucu_per_token": r.price_ucu,
            "cu": entries.trade_cost(tokens, r.price_ucu),
            "request_sha256": hashlib.sha256(request).hexdigest(),
            "response_sha256": hashlib.sha256(response).hexdigest(),
            "nonce": secrets.token_hex(16), "ts": self.clock(),
        }
        message = entries.trade_message(terms)
        data = {"terms": terms, "provider_sig": self.signer.sign(message).hex(),
                "consumer_sig": consumer.sign(message).hex()}
        entry = self.ledger.append("trade", data, bodies=[request, response])
        self.safety.record_spend(r.account, terms["cu"])
        self.safety.record_outcome(True)
        return entry

    # -- generation --------------------------------------------------------------------------

    def pump(self, stream: Any) -> Pump:
        return Pump(stream, self._pumps)

    def safety_killed(self) -> bool:
        """The kill switch, read without touching the ledger (checked on every streamed piece)."""
        return self.killed

    def breaker_open(self) -> bool:
        return self.safety.breaker_is_open()

    def publish_safety(self) -> None:
        if self.events is not None:
            self.events.publish("safety", {"kill_switch": self.safety_killed(),
                                           "breaker_open": self.breaker_open()})


class Pieces:
    """An async iterator over ("text", (piece, tokens)), ("done", None) and ("error", exc)
    items put on `queue` by a producer; `tokens` is the count up to the last piece returned."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.tokens = 0

    def __aiter__(self) -> Pieces:
        return self

    async def __anext__(self) -> str:
        kind, value = await self.queue.get()
        if kind == "text":
            piece, self.tokens = value
            return piece
        if kind == "done":
            raise StopAsyncIteration
        raise value


class Pump(Pieces):
    """Text pieces of an engine Stream, carried from a worker thread into the event loop.

    `close()` cancels the generation if it is still running, waits for the engine to stop,
    and returns the Completion: what was produced, which is what the consumer pays for.
    """

    def __init__(self, stream: Any, pool: ThreadPoolExecutor) -> None:
        super().__init__()
        self.stream = stream
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                for piece in stream:
                    loop.call_soon_threadsafe(self.queue.put_nowait,
                                              ("text", (piece, stream.tokens)))
                loop.call_soon_threadsafe(self.queue.put_nowait, ("done", None))
            except BaseException as exc:  # handed over to the event loop, raised there
                loop.call_soon_threadsafe(self.queue.put_nowait, ("error", exc))

        self.thread = loop.run_in_executor(pool, run)

    async def close(self) -> Any:
        self.stream.cancel()
        try:
            await asyncio.shield(self.thread)
        except Exception:  # the error was already delivered through the queue
            pass
        return self.stream.completion


def request_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = ["EngineBusy", "LoadedModel", "Node", "Pieces", "Pump", "Reservation", "Settled", "request_bytes"]
