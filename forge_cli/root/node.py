"""The node's state and economic rules without HTTP: models and their markets, the wallet,
safety, lending, and the local trade a purchase settles as.

Every write to the ledger (and every safety decision, which may write one) runs on one
dedicated thread, so the writer connection is never used from two threads at once; reads
that the API serves at volume (balances) use a separate read-only connection. `build_node`
(forge_cli.root.build) is the one place that makes a Node and wires its parts.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from forge_cli import identity
from forge_cli.errors import ForgeError, SelfTrade, UnknownModel
from forge_cli.ledger import entries, views
from forge_cli.trade.session import Partial, Pump, Settle, Settled, TradeSession

if TYPE_CHECKING:
    from forge_cli.economy.accounts import Accounts, Resolved
    from forge_cli.economy.lending import Lending
    from forge_cli.economy.pricing import Market
    from forge_cli.economy.safety import Safety
    from forge_cli.inference.engine import Engine
    from forge_cli.ledger.store import Ledger
    from forge_cli.mesh.audit import Auditor
    from forge_cli.mesh.buyer import Buyer
    from forge_cli.mesh.discovery import Mesh
    from forge_cli.mesh.gossip import Gossip
    from forge_cli.mesh.network import NetworkView
    from forge_cli.mesh.seller import Sales
    from forge_cli.mesh.trust import Reputation
    from forge_cli.node.events import EventBus
    from forge_cli.rpc.split import SplitEngine
    from forge_cli.trade.seams import Offer
    from forge_cli.trade.session import Completion
    from forge_cli.trade.wallet import Wallet

T = TypeVar("T")


@dataclass
class LoadedModel:
    name: str
    engine: Engine | SplitEngine
    sha256: str
    params: int
    path: Path | None

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "forge",
                "sha256": self.sha256, "params": self.params, "engine": self.engine.describe()}


class Node:
    """What a node is and does; the routes (forge_cli.node) are a thin HTTP skin over it."""

    def __init__(self, *, home: Path, ledger: Ledger, reader: Ledger, signer: identity.Identity,
                 models: list[LoadedModel], accounts: Accounts, operator_token: str,
                 safety: Safety,
                 clock: Callable[[], int], ledger_thread: ThreadPoolExecutor,
                 settle_ms: int = 30_000, max_unsettled: int = 3,
                 audit_every: int = 20, rechecks_per_minute: int = 2,
                 recheck_queue: int = 8, trust_s: int = 10) -> None:
        from forge_cli.node.metrics import Metrics

        self.home = home
        self.signer = signer
        self.node_id = signer.node_id
        self.models = {m.name: m for m in models}
        self.clock = clock
        self.started_ms = clock()
        self.ledger = ledger
        self.reader = reader
        self._ledger_thread = ledger_thread
        self._pumps = ThreadPoolExecutor(32, thread_name_prefix="forge-pump")
        self.accounts = accounts
        self.operator_token = operator_token
        self.safety = safety
        # The node is the ledger's only writer, so it knows the kill switch without asking:
        # the flag is read on every streamed piece.
        self.killed = bool(safety.kill_state()["active"])
        self.metrics = Metrics()
        self.in_flight = 0
        self.last_reply: dict[str, Any] | None = None  # the newest generation's size and speed
        self.settle_ms = settle_ms  # how long a peer consumer has to countersign
        self.max_unsettled = max_unsettled  # sales a peer may leave uncountersigned here
        # Wired by build_node; `start` attaches events and sales once the event loop runs.
        self.wallet: Wallet = None  # type: ignore[assignment]  # build_node sets it next
        self.lending: Lending = None  # type: ignore[assignment]  # build_node sets it next
        self.markets: dict[str, Market] = {}
        self.network: NetworkView = None  # type: ignore[assignment]  # build_node sets it next
        self.mesh: Mesh | None = None  # with `forge node --mesh`
        self.gossip: Gossip | None = None  # with `forge node --mesh`
        self.sales: Sales = None  # type: ignore[assignment]  # start() sets it: what peers buy here
        self.buyer: Buyer | None = None  # what this node buys from peers
        self.auditor = self._auditor(audit_every, rechecks_per_minute, recheck_queue)
        self.events: EventBus | None = None  # attached once the event loop runs
        self._trust: Reputation | None = None  # `trust()` makes it on first use
        self._trust_mark: tuple[int, int, float] = (-1, -1, 0.0)  # view, ledger, monotonic
        self._trust_lock = threading.Lock()
        self._trust_busy = False
        self.trust_s = trust_s  # trust over the network view is recomputed at most this often

    # -- plumbing ----------------------------------------------------------------------------

    async def on_ledger(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the ledger thread (all writes and safety decisions go there)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._ledger_thread, lambda: fn(*args, **kwargs))

    async def append(self, kind: str, data: dict[str, Any], *, parent: int | None = None,
                     bodies: tuple[bytes, ...] | list[bytes] = ()) -> entries.Entry:
        """Append one entry on the ledger thread."""
        return await self.on_ledger(self.ledger.append, kind, data, parent=parent,
                                    bodies=list(bodies))

    def appended(self, entry: entries.Entry) -> None:
        """A ledger listener: metrics and the event feed see every new entry."""
        self.metrics.ledger_size.set(self.ledger.size)
        if self.events is not None:
            self.events.publish("entry", entry.to_json())

    async def start(self) -> None:
        """Attach what needs the running event loop: the event feed and the P2P sales desk."""
        from forge_cli.mesh.seller import Sales
        from forge_cli.node.events import EventBus

        self.events = EventBus(asyncio.get_running_loop())
        self.sales = Sales(self, settle_ms=self.settle_ms, max_unsettled=self.max_unsettled)

    async def stop(self) -> None:
        """Leave the mesh, put served terms still waiting on the record, close sessions."""
        if self.gossip is not None:
            await self.gossip.stop()
        if self.mesh is not None:
            await self.mesh.stop()  # withdraw the advertisement before the API goes away
        if self.sales is not None:  # served terms still waiting: on the record, not lost
            await self.sales.expire(everything=True)
        await self.auditor.stop()
        if self.buyer is not None:
            await self.buyer.session.close()
        if self.events is not None:
            self.events.close()

    def _auditor(self, every: int, rechecks_per_minute: int, recheck_queue: int) -> Auditor:
        """Audits of this node's purchases, and disputes from peers (forge_cli.mesh.audit)."""
        from forge_cli.mesh.audit import Auditor

        return Auditor(self.signer, every=every, engines=self.engine_for,
                       append=self.append,
                       disputes_against=self.dispute_weight,
                       flag=self.flag_peer, peers=self._dispute_peers,
                       send=self._send_dispute, clock=self.clock, bench=DisputeBench(self),
                       rechecks_per_minute=rechecks_per_minute, recheck_queue=recheck_queue,
                       counted=lambda outcome: self.metrics.rechecks.labels(outcome).inc())

    def engine_for(self, model_sha256: str) -> Engine | SplitEngine | None:
        """This node's engine for the GGUF of that SHA-256, or None."""
        return next((m.engine for m in self.models.values() if m.sha256 == model_sha256), None)

    async def flag_peer(self, node_id: str, reason: str) -> None:
        """Take a peer off this node's mesh for good, as a forked log does."""
        if self.network is not None:
            await asyncio.to_thread(self.network.flag, node_id, reason)
        if self.mesh is not None:
            self.mesh.flag_peer(node_id, reason)

    def _dispute_peers(self) -> list[str]:
        if self.mesh is None:
            return []
        return [p.url for p in self.mesh.trusted_peers() if p.node_id != self.node_id]

    async def _send_dispute(self, url: str, payload: dict[str, Any]) -> Any:
        from forge_cli.client import AsyncClient

        session = self.peer_buyer().session
        return await AsyncClient(url, timeout=60, session=session).post(
            "/v1/forge/audit/dispute", payload)

    def peer_buyer(self) -> Buyer:
        """The node's buyer on the mesh: its own account in its wallet, one HTTP session."""
        if self.buyer is None:
            import aiohttp

            from forge_cli.mesh.buyer import Buyer

            self.buyer = Buyer(self.wallet, self.signer,
                               aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)),
                               clock=self.clock, killed=self.safety_killed)
            self.buyer.auditor = self.auditor
        return self.buyer

    def close(self) -> None:
        for model in self.models.values():
            model.engine.close()
        self._pumps.shutdown(wait=False, cancel_futures=True)
        self._ledger_thread.shutdown(wait=True)
        self.reader.close()
        self.ledger.close()
        if self.network is not None:
            self.network.close()

    # -- reads -------------------------------------------------------------------------------

    def balance(self, account: str) -> int:
        return self.wallet.balance(account)

    def reputation(self, account: str) -> int:
        """What this node's own ledger says of `account` (economy.credit), in bp."""
        from forge_cli.economy.credit import account_reputation

        return account_reputation(self.reader, account)

    def effective_reputation(self, account: str) -> int:
        """What prices and seller choice use: the ledger's reputation lifted by trust over the
        trade graph, less the collusion penalty (forge_cli.mesh.trust), in bp."""
        return self.trust().effective_bp(account)

    def trust(self, *, fresh: bool = False) -> Reputation:
        """This node's Reputation over its network view. Computed on first use; after that a
        read starts a recomputation in the background when the view or the ledger changed
        and the last one is `trust_s` seconds old, so no read waits on a large view. `fresh`
        recomputes now if either changed (a flag decision must see the trades just made)."""
        from forge_cli.ledger import queries
        from forge_cli.mesh.trust import Reputation

        with self._trust_lock:
            if self._trust is None:
                self._trust = Reputation(
                    self.network, self.node_id, local=self.reputation, clock=self.clock,
                    audits=lambda: {k: (passed, upheld) for k, (passed, upheld, _)
                                    in queries.audit_records(self.reader).items()})
            rep = self._trust
            view, size, at = self._trust_mark
            changed = (self.network.count(), self.reader.size) != (view, size)
            if rep.refreshed_ms is not None and not (changed and fresh):
                if changed and not self._trust_busy and \
                        time.monotonic() - at >= self.trust_s:
                    self._trust_busy = True
                    threading.Thread(target=self._refresh_trust, daemon=True,
                                     name="forge-trust").start()
                return rep
        self._refresh_trust()
        return rep

    def trust_rank(self, key: str) -> int:
        """A key's graph trust here for gossip's eviction order (the last computation, not
        waited for: a batch asks this for each of its trades' parties)."""
        rep = self._trust if self._trust is not None and self._trust.refreshed_ms is not None \
            else self.trust()
        return rep.graph_bp(key)

    def _refresh_trust(self) -> None:
        mark = (self.network.count(), self.reader.size, time.monotonic())
        try:
            assert self._trust is not None
            self._trust.refresh()
            self._trust_mark = mark
            peers = [] if self.mesh is None else [p.node_id for p in self.mesh.trusted_peers()
                                                  if p.node_id]
            self.metrics.show_trust(self._trust, peers)
            if self.gossip is not None:  # trades that arrived before their parties were trusted
                self.network.rerank(self._trust.graph_bp)
        finally:
            self._trust_busy = False

    def dispute_weight(self, provider: str) -> tuple[int, int]:
        """(weight, threshold): the trust here of the distinct auditors whose disputes against
        `provider` this node upheld, against what flags it (mesh.trust flag_weight)."""
        from forge_cli.ledger import queries

        rep = self.trust(fresh=True)
        return rep.flag_weight(queries.upheld_auditors(self.reader, provider))

    def nonce_seq(self, consumer: str, nonce: str) -> int | None:
        """The seq that used this consumer's nonce, if any (trade or unsettled)."""
        row = self.reader.row(views.TRADE_NONCES, (consumer, nonce))
        return None if row is None else row[0]

    def unsettled_count(self, consumer: str) -> int:
        row = self.reader.row(views.UNSETTLED, (consumer,))
        return 0 if row is None else row[0]

    def entry_body(self, seq: int, field: str) -> bytes | None:
        """The body that entry `seq` names in `data[field]` (None when redacted or missing)."""
        return self.reader.body(self.reader.entry(seq).data[field])

    def approval_status(self, approval_id: str) -> str | None:
        row = self.reader.row(views.APPROVALS, (approval_id,))
        return None if row is None else row[2]

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

    def price(self, model: Offer) -> int:
        """The current price (reading it changes nothing)."""
        return self.markets[model.name].price_ucu(model.params)

    def offers(self) -> list[dict[str, Any]]:
        """What this node sells, as /health and the mesh advertise it."""
        return [{"model": m.name, "sha256": m.sha256[:16], "params": m.params,
                 "price_ucu_per_token": self.price(m)} for m in self.models.values()]

    def supply(self, model: Offer) -> int:
        """Providers of this model: this node, plus trusted mesh peers offering the same GGUF
        (matched by its sha256 prefix, as they advertise it)."""
        if self.mesh is None:
            return 1
        prefix = model.sha256[:16]
        return 1 + sum(1 for peer in self.mesh.trusted_peers()
                       if any(o.sha256 and prefix.startswith(o.sha256) for o in peer.offers))

    def quote(self, model: Offer) -> int:
        """The price for a request arriving now: demand (queued + running) moves the market.
        Only a request that passed validation is quoted, so a rejected one moves nothing."""
        market = self.markets.get(model.name)
        if market is None:  # a peer's model: its price is the peer's quote
            raise UnknownModel(f"model {model.name!r} is not priced here")
        market.observe(demand=self.in_flight + 1, supply=self.supply(model))
        price = market.price_ucu(model.params)
        self.metrics.price.labels(model.name).set(price)
        return price

    # -- the trade ---------------------------------------------------------------------------

    def generating(self, delta: int) -> None:
        """A session started (+1) or stopped (−1) generating: the demand the market sees."""
        self.in_flight += delta
        self.metrics.queue_depth.set(self.in_flight)
        if delta < 0 and self.events is not None:  # a request ended: what watchers show moved
            self.events.publish("activity", {"in_flight": self.in_flight,
                                             "last_reply": self.last_reply})

    def session(self, *, account: str, label: str, model: Offer, max_tokens: int, request: bytes,
                settle: Settle | None = None, price: int | None = None, peer: bool = False,
                charge: bool = True, partial: Partial = "produced",
                hint: str | None = None) -> TradeSession:
        """A trade session on this node; it settles as a local trade unless told otherwise."""
        return TradeSession(self, account=account, label=label, model=model,
                            max_tokens=max_tokens, request=request,
                            settle=settle or self.local_trade, price=price, peer=peer,
                            charge=charge, partial=partial, hint=hint)

    def buyer_session(self, who: Resolved, *, model: Offer, max_tokens: int, request: bytes,
                      price: int | None = None, settle: Settle | None = None,
                      hint: str | None = None) -> TradeSession:
        """A purchase by a local account (an agent's token), refused for the operator."""
        if who.is_operator:
            raise SelfTrade(
                "the operator token is this node's own account: buying from yourself is a "
                "self-trade and is refused",
                hint="create a consumer account with `forge wallet agent create NAME` and use "
                "its token")
        return self.session(account=who.account_hex, label=who.name, model=model,
                            max_tokens=max_tokens, request=request, price=price,
                            settle=settle, hint=hint)

    async def local_trade(self, session: TradeSession, completion: Completion | None
                          ) -> Settled:
        """Sign (as provider, and with the consumer's key from the keystore) and record the
        trade for the tokens produced; nothing is recorded for none."""
        assert session.price is not None
        tokens = completion.completion_tokens if completion is not None else 0
        if tokens == 0:
            return Settled(0, session.price, 0, None)
        entry = await self.on_ledger(self._record_trade, session, completion)
        settled = Settled(entry.data["terms"]["cu"], session.price, 0, entry.seq)
        self.counted(settled, session.model.name, completion)
        return settled

    async def embeddings_trade(self, session: TradeSession, completion: Completion | None
                               ) -> Settled:
        """Record an embeddings trade (`entries.SERVICES`): the input tokens billed at the
        session's price, the vectors' float32 bytes as its response; nothing for no vectors.
        The completion is the engine's `Embeddings`."""
        from forge_cli.inference.jobs import Embeddings

        assert session.price is not None
        if completion is None or not completion.prompt_tokens:
            return Settled(0, session.price, 0, None)
        if not isinstance(completion, Embeddings):
            raise TypeError(f"an embeddings trade settles Embeddings, not {completion!r}")
        entry = await self.on_ledger(self._record_trade, session, completion,
                                     service="embeddings", response=completion.body)
        settled = Settled(entry.data["terms"]["cu"], session.price, 0, entry.seq)
        self.counted(settled, session.model.name, completion)
        return settled

    def _record_trade(self, session: TradeSession, completion: Completion, *,
                      service: str | None = None, response: bytes | None = None
                      ) -> entries.Entry:
        consumer = self.accounts.signer_for(session.account)
        if consumer is None:
            raise ForgeError(f"no key for account {session.account[:16]}… in the keystore")
        price = session.price
        if price is None:  # a session prices itself when it opens; a trade before that is a bug
            raise ForgeError("a trade was recorded for a session that never opened")
        response = session.response if response is None else response
        terms = {
            "provider": self.node_id, "consumer": session.account, "model": session.model.name,
            "model_sha256": session.model.sha256, "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens, "price_ucu_per_token": price,
            "request_sha256": hashlib.sha256(session.request).hexdigest(),
            "response_sha256": hashlib.sha256(response).hexdigest(),
            "nonce": secrets.token_hex(16), "ts": self.clock(),
            **({entries.TRADE_SERVICE: service} if service is not None else {}),
        }
        terms["cu"] = entries.trade_cost(entries.billed_tokens(terms), price)
        message = entries.trade_message(terms)
        data = {"terms": terms, "provider_sig": self.signer.sign(message).hex(),
                "consumer_sig": consumer.sign(message).hex()}
        return self.wallet.record_trade(data, [session.request, response], hold=session.hold)

    def counted(self, settled: Settled, model: str, completion: Completion | None) -> None:
        """Metrics for a trade this node recorded."""
        self.metrics.trades.labels(model).inc()
        self.metrics.cu_earned.inc(settled.cu)
        self.metrics.cu_spent.inc(settled.cu)
        if completion is not None:
            self.metrics.tokens.labels("prompt").inc(completion.prompt_tokens)
            self.metrics.tokens.labels("completion").inc(completion.completion_tokens)

    def observe(self, completion: Completion | None) -> None:
        """Timing metrics of a generation that produced something."""
        if completion is not None and completion.completion_tokens:
            self.metrics.ttft.observe(completion.time_to_first_token_s)
            self.metrics.generation.observe(completion.generation_s)
            self.last_reply = {"completion_tokens": completion.completion_tokens,
                               "tokens_per_s": round(completion.tokens_per_s, 1), "ts": self.clock()}

    def activity(self) -> dict[str, Any]:
        """What the node is doing now (GET /v1/forge/activity): requests generating and waiting,
        where each model's layers run, and the size and speed of the newest reply."""
        return {"uptime_ms": self.clock() - self.started_ms, "in_flight": self.in_flight,
                "queued": sum(m.engine.queued for m in self.models.values()),
                "models": [{"model": m.name, **m.engine.placement()} for m in self.models.values()],
                "last_reply": self.last_reply}

    # -- generation and safety ---------------------------------------------------------------

    async def pump(self, start: Callable[[], Any]) -> Pump:
        """Start a generation on a pump thread and carry its pieces into the event loop.

        `start` (say `lambda: engine.chat(messages, sampling, block=False)`) renders and
        tokenizes the prompt, which takes time in proportion to its length: never on the event
        loop, and never on the engine's scheduler thread. Its refusals (a prompt too long, a
        full queue) are raised here, before any piece."""
        stream = await asyncio.get_running_loop().run_in_executor(self._pumps, start)
        return Pump(stream, self._pumps)

    async def offload(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a pump thread and return what it returns: work that takes time in
        proportion to a request's size (tokenizing, embedding) never runs on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pumps, fn)

    def safety_killed(self) -> bool:
        """The kill switch, read without touching the ledger (checked on every streamed piece)."""
        return self.killed

    def breaker_open(self) -> bool:
        return self.safety.breaker_is_open()

    async def set_kill_switch(self, active: bool, reason: str) -> dict[str, Any]:
        """Turn the kill switch on or off (a ledger entry), tell watchers; the safety status."""
        await self.on_ledger(self.safety.kill if active else self.safety.resume, reason)
        self.killed = active
        self.metrics.kill_switch.set(1 if active else 0)
        self.publish_safety()
        return await self.on_ledger(self.safety.status, None)

    def publish_safety(self) -> None:
        if self.events is not None:
            self.events.publish("safety", {"kill_switch": self.safety_killed(),
                                           "breaker_open": self.breaker_open()})


class DisputeBench:
    """What this node's ledger, network view and open sessions say about a peer's dispute
    (forge_cli.mesh.audit.Bench)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def standing(self, auditor: str) -> tuple[int, int, str | None]:
        node = self._node
        provided = (node.reader.row(views.TRADE_TOTALS, (auditor,)) or (0, 0, 0))[2]
        flag = node.network.peer(auditor).flag if node.network is not None else None
        return provided, node.reputation(auditor), flag

    def trust(self, auditor: str) -> int:
        return self._node.trust().graph_bp(auditor)

    def holds(self, trade_id: str) -> bool:
        network = self._node.network  # it follows the ledger: this node's own trades are in it
        return network is not None and network.contains(trade_id)

    def audited(self, trade_id: str, auditor: str) -> int | None:
        row = self._node.reader.row(views.AUDITS, (trade_id, auditor))
        return None if row is None else row[2]

    def paying(self) -> bool:
        return self._node.in_flight > 0


def ms_now() -> int:
    return time.time_ns() // 1_000_000


__all__ = ["LoadedModel", "Node", "ms_now"]
