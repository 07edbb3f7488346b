#!/usr/bin/env python3
"""The mesh at N nodes, simulated: forge's own gossip, network view, dispute and reputation code
run for N nodes as objects in one process, over an in-memory transport with latency and loss.

    python bench/mesh_sim.py [--nodes 100,300,1000] [--degree 8] [--history 2]
                             [--sybils 0.1,0.3] [--observers 12] [--loss 0.02]
                             [--latency-ms 40] [--seed 1] [--json] [--verify-every-copy]

Real: every node is a `Gossip` (forge_cli/mesh/gossip.py: rounds, push and pull, cursors,
per-source quotas, checkpoint checks, the parsing of every answer) over its own `NetworkView`
(an in-memory SQLite network.db: every trade parsed, verified and inserted as on a node), and
trades, checkpoints and disputes are signed with real Ed25519 keys. Disputes are checked with
mesh/audit.py (`evidence`, `check_dispute`) and weighed with `mesh/trust.py`'s `Reputation`.
What a peer answers goes through the client's own parser (`client.answer`).

Simulated, and why:
- The network: a call is routed to the peer object by URL, its bytes counted, delayed by a
  drawn latency (scaled down by --time-scale so a run is fast) and lost with --loss on the way
  there or back (the caller sees NodeUnreachable, as over TCP). Draws are seeded per
  (round, caller, callee, path), so a run repeats whatever order the tasks ran in.
- The peer side of each route is the route's few lines over the same objects (parse the body,
  `gossip.receive`, `view.since` + `encode_page`), not aiohttp.
- A round is one gossip tick at every node (the clock advances `mesh.gossip_s`), run
  concurrently; the node's wake-on-arrival push, which makes a real push cascade within a
  round, is off, so rounds counted here are an upper bound.
- Dispute relay: each node forwards a dispute it has not seen (by id) to its peers, at most
  RELAY_PER_SOURCE a round from one address; the node's own relay route (helper `audits`) is
  not in this branch, so this is the sim's.
- A signature's verdict is a pure function of (key, message, signature), so the process
  verifies each distinct one once (libsodium) and remembers the verdict: N nodes checking one
  trade cost one verify, not N. --verify-every-copy turns that off (slow at N = 1,000).
- Re-checks of disputes need the model: the sim takes the worst case, every dispute re-checks
  as upheld (a mis-evaluation every time), so only standing keeps a seller unflagged.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import hashlib
import json
import logging
import math
import os
import random
import resource
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forge_cli import client, identity, wire  # noqa: E402
from forge_cli.errors import BadResponse, ForgeError, NodeUnreachable, NotFound  # noqa: E402
from forge_cli.identity import Identity  # noqa: E402
from forge_cli.ledger import entries, merkle, note  # noqa: E402
from forge_cli.mesh import audit  # noqa: E402
from forge_cli.mesh.gossip import (  # noqa: E402
    MAX_BATCH,
    PAGE_TRADE_BYTES,
    Gossip,
    encode_page,
)
from forge_cli.mesh.network import NetworkView  # noqa: E402
from forge_cli.node.web import error_body  # noqa: E402

ROUND_S = 10  # mesh.gossip_s
BATCH = 200  # mesh.gossip_batch
RELAY_PATH = "/v1/forge/audit/relay"
RELAY_PER_SOURCE = 64  # disputes taken from one address a round; the rest wait for next round
REQUEST_MAX_BYTES = 1024 * 1024  # the node's request cap
HEADER_BYTES = 200  # an HTTP request or answer's line and headers, counted with each body
SAMPLING = {"temperature_ppm": 0, "top_p_ppm": 1_000_000, "top_k": 0, "min_p_ppm": 0,
            "repeat_penalty_ppm": 1_000_000, "seed": 1, "max_tokens": 64}
MODEL_SHA = hashlib.sha256(b"the simulated mesh's model").hexdigest()


# -- the network --------------------------------------------------------------------------------

class Clock:
    """Virtual seconds: gossip's pull interval and quota windows read this, not the wall."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Net:
    """Routes calls between node objects by URL, with seeded latency and loss, counting bytes
    each node sends (its requests and the answers it serves)."""

    def __init__(self, seed: int, *, loss: float, latency_ms: float, time_scale: float) -> None:
        self.seed = seed
        self.loss = loss
        self.latency_ms = latency_ms
        self.time_scale = time_scale
        self.nodes: dict[str, SimNode] = {}
        self.sent: collections.Counter[str] = collections.Counter()
        self.round = 0
        self.calls = 0
        self.lost = 0
        self._seq: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def _draw(self, sender: str, url: str, path: str) -> random.Random:
        key = (sender, url, path.partition("?")[0])
        self._seq[key] += 1
        text = f"{self.seed}:{self.round}:{sender}:{url}:{path}:{self._seq[key]}"
        return random.Random(hashlib.sha256(text.encode()).digest())

    async def exchange(self, sender: SimNode, url: str, method: str, path: str,
                       body: bytes | None) -> tuple[int, bytes]:
        self.calls += 1
        draw = self._draw(sender.url, url, path)
        self.sent[sender.url] += HEADER_BYTES + len(path) + len(body or b"")
        if draw.random() < self.loss:
            self.lost += 1
            raise NodeUnreachable(f"no forge node answers at {url}: the simulated network "
                                  "lost the request")
        await asyncio.sleep(draw.expovariate(1 / self.latency_ms) / 1000 * self.time_scale)
        status, raw = await self.nodes[url].serve(method, path, body, sender.host)
        self.sent[url] += HEADER_BYTES + len(raw)
        if draw.random() < self.loss:
            self.lost += 1
            raise NodeUnreachable(f"no forge node answers at {url}: the simulated network "
                                  "lost the answer")
        await asyncio.sleep(draw.expovariate(1 / self.latency_ms) / 1000 * self.time_scale)
        return status, raw


class SimClient:
    """gossip.PeerClient over `Net`: the answer read up to `max_bytes` and parsed by the
    client's own `answer` (errors become the ForgeError their envelope names)."""

    def __init__(self, net: Net, sender: SimNode, url: str, max_bytes: int) -> None:
        self.net, self.sender, self.url, self.max_bytes = net, sender, url, max_bytes

    async def call(self, method: str, path: str, body: Any = None, *,
                   encoded: bytes | None = None) -> Any:
        data = encoded if encoded is not None else \
            json.dumps(body).encode() if body is not None else None
        status, raw = await self.net.exchange(self.sender, self.url, method, path, data)
        if len(raw) > self.max_bytes:
            raise BadResponse(f"{self.url}{path} answered more than {self.max_bytes:,} bytes")
        return client.answer(status, "", raw, self.url + path)

    async def get(self, path: str) -> Any:
        return await self.call("GET", path)


@dataclass
class SimPeer:
    url: str
    node_id: str


@dataclass
class SimMesh:
    """What gossip asks of the mesh: this node's id, its peers, and the flags on them."""

    node_id: str
    peers: list[SimPeer] = field(default_factory=list)
    flags: dict[str, str] = field(default_factory=dict)

    def trusted_peers(self) -> list[SimPeer]:
        return [p for p in self.peers if p.node_id not in self.flags]

    def flag_peer(self, node_id: str, reason: str) -> None:
        self.flags[node_id] = reason

    def flag_of(self, peer: SimPeer) -> str | None:
        return self.flags.get(peer.node_id)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


class SimNode:
    """One node: a key, a network view, its gossip, the disputes it holds, and the server side
    of the routes its peers call."""

    def __init__(self, net: Net, index: int, key: Identity, clock: Clock, *,
                 sybil: bool = False) -> None:
        self.net = net
        self.key = key
        self.node_id = key.node_id
        self.sybil = sybil
        self.host = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"
        self.url = f"http://{self.host}:8337"
        self.view = NetworkView.open(":memory:")
        self.mesh = SimMesh(self.node_id)
        self.gossip = Gossip(self.view, self.mesh, round_s=ROUND_S, batch=BATCH, clock=clock,
                             connect=lambda peer, max_bytes: SimClient(net, self, peer.url,
                                                                      max_bytes))
        self.checkpoint = note.sign_checkpoint(
            note.Checkpoint(note.origin_for(self.node_id), 0, merkle.EMPTY_ROOT), key)
        # Disputes held: id → (payload, the URL it came from); in arrival order.
        self.disputes: dict[str, tuple[dict[str, Any], str]] = {}
        self.dispute_order: list[str] = []
        self.relayed: dict[str, int] = {}  # peer URL → how far into dispute_order it was sent
        self.relay_taken: collections.Counter[tuple[int, str]] = collections.Counter()
        net.nodes[self.url] = self

    # -- the peer side of the routes ------------------------------------------------------

    async def serve(self, method: str, path: str, body: bytes | None,
                    remote: str) -> tuple[int, bytes]:
        route, _, query = path.partition("?")
        try:
            if method == "POST" and route == "/v1/forge/gossip/trades":
                return 200, _json(await self._receive(body or b"", remote))
            if method == "GET" and route == "/v1/forge/gossip/trades":
                args = urllib.parse.parse_qs(query)
                cursor = int(args.get("since", ["0"])[0])
                limit = min(MAX_BATCH, max(1, int(args.get("limit", [str(MAX_BATCH)])[0])))
                trades, after = self.view.since(cursor, limit, PAGE_TRADE_BYTES)
                return 200, encode_page(trades, after, self.view.count(), self.node_id)
            if method == "GET" and route == "/v1/forge/ledger/checkpoint":
                return 200, _json({"note": self.checkpoint})
            if method == "POST" and route == RELAY_PATH:
                return 200, _json(self.take_disputes(body or b"", remote))
            raise NotFound(f"no route {method} {route}")
        except ForgeError as exc:
            return getattr(exc, "http_status", 400), _json({"error": error_body(exc)})

    async def _receive(self, body: bytes, remote: str) -> dict[str, Any]:
        payload = wire.parse(body, limit=REQUEST_MAX_BYTES, what="the request body")
        if not isinstance(payload, dict) or not isinstance(payload.get("trades"), list):
            raise BadResponse("a gossip push is {from, trades}")
        trades = payload["trades"]
        if len(trades) > MAX_BATCH:
            raise BadResponse(f"a gossip batch holds at most {MAX_BATCH} trades")
        sender = payload.get("from") if isinstance(payload.get("from"), str) else "unknown"
        return await self.gossip.receive(trades, sender[:64], remote)

    # -- disputes -------------------------------------------------------------------------

    def hold_dispute(self, payload: dict[str, Any], came_from: str) -> bool:
        """Keep a dispute this node has not seen, if its evidence and three signatures check
        (mesh/audit.py); False for a repeat."""
        data, bodies = audit.evidence(payload)
        if not isinstance(data, dict) or not isinstance(data.get("claim"), dict):
            audit.check_dispute(data, bodies)  # raises, naming what is malformed
        dispute_id = audit.dispute_id(data)
        if dispute_id in self.disputes:
            return False
        audit.check_dispute(data, bodies)
        self.disputes[dispute_id] = (payload, came_from)
        self.dispute_order.append(dispute_id)
        return True

    def take_disputes(self, body: bytes, remote: str) -> dict[str, int]:
        payload = wire.parse(body, limit=REQUEST_MAX_BYTES, what="the request body")
        items = payload.get("disputes") if isinstance(payload, dict) else None
        sender = payload.get("from") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not isinstance(sender, str):
            raise BadResponse("a dispute relay is {from, disputes}")
        key = (self.net.round, remote)
        room = max(0, RELAY_PER_SOURCE - self.relay_taken[key])
        new = refused = 0
        for item in items[:room]:
            try:
                new += self.hold_dispute(item, sender)
            except ForgeError:
                refused += 1
        self.relay_taken[key] += min(room, len(items))
        return {"new": new, "refused": refused, "deferred": max(0, len(items) - room)}

    async def relay(self) -> None:
        """Send each peer the disputes it was not sent yet (never back to where one came
        from); what a lost or deferred call did not deliver is sent again next round."""
        for peer in self.mesh.trusted_peers():
            start = self.relayed.get(peer.url, 0)
            ids = self.dispute_order[start:start + RELAY_PER_SOURCE]
            if not ids:
                continue
            batch = [self.disputes[i][0] for i in ids if self.disputes[i][1] != peer.node_id]
            try:
                answer = await SimClient(self.net, self, peer.url, 256 * 1024).call(
                    "POST", RELAY_PATH, {"from": self.node_id, "disputes": batch}) \
                    if batch else {"deferred": 0}
            except ForgeError:
                continue
            self.relayed[peer.url] = start + len(ids) - int(answer.get("deferred", 0))

    def close(self) -> None:
        self.gossip._verifier.shutdown(wait=True)
        self.view.close()


# -- trades and disputes ----------------------------------------------------------------------

@dataclass
class Trade:
    data: dict[str, Any]
    bodies: list[bytes]  # request, response, tokens: what a dispute of it carries

    @property
    def id(self) -> str:
        return entries.trade_id(self.data)


def make_trade(provider: Identity, consumer: Identity, nonce: str, ts: int,
               tokens: int = 16) -> Trade:
    """Terms signed by both parties, committing to a run (so the trade can be disputed)."""
    request = _json({"model": "sim", "messages": [{"role": "user", "content": nonce}]})
    ids = list(range(1, tokens + 1))
    response = bytes(range(97, 97 + tokens))
    tokens_body = audit.tokens_body(ids)
    terms = {"provider": provider.node_id, "consumer": consumer.node_id, "model": "sim",
             "model_sha256": MODEL_SHA, "prompt_tokens": 8, "completion_tokens": tokens,
             "price_ucu_per_token": 1_000_000, "cu": entries.trade_cost(tokens, 1_000_000),
             "request_sha256": entries.body_hash(request),
             "response_sha256": entries.body_hash(response), "nonce": nonce, "ts": ts,
             "sampling": SAMPLING, "tokens_sha256": entries.body_hash(tokens_body)}
    message = entries.trade_message(terms)
    data = {"terms": terms, "provider_sig": provider.sign(message).hex(),
            "consumer_sig": consumer.sign(message).hex()}
    return Trade(data, [request, response, tokens_body])


def make_dispute(trade: Trade, auditor: Identity, ts: int) -> dict[str, Any]:
    """The payload a node sends its peers: the auditor's signed dispute and its evidence."""
    verdict = audit.Verdict(False, "model: 16 of 16 tokens are outside what the committed "
                                   "model and sampling could draw", 16, [])
    data = audit.sign_dispute(trade.data, verdict, auditor, ts)
    return {"dispute": data, "bodies": {entries.body_hash(b): b.hex() for b in trade.bodies}}


def remember_verdicts() -> Callable[[], None]:
    """Make `identity.verify` remember each distinct signature's verdict (module docstring);
    returns the function that undoes it."""
    real = identity.verify
    known: dict[tuple[bytes, bytes, bytes], bool] = {}

    def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
        key = (public_key, message, signature)
        verdict = known.get(key)
        if verdict is None:
            verdict = known[key] = real(public_key, message, signature)
        return verdict

    identity.verify = verify  # type: ignore[assignment]
    return lambda: setattr(identity, "verify", real)


# -- a mesh -----------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class Mesh:
    """N nodes on a random graph where each node has about `degree` peers (both ways)."""

    def __init__(self, n: int, *, degree: int, seed: int, loss: float, latency_ms: float,
                 time_scale: float, sybils: int = 0) -> None:
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.net = Net(seed, loss=loss, latency_ms=latency_ms, time_scale=time_scale)
        keys = [Identity.from_seed(hashlib.sha256(f"{seed}:key:{i}".encode()).digest())
                for i in range(n)]
        self.nodes = [SimNode(self.net, i, keys[i], self.clock, sybil=i >= n - sybils)
                      for i in range(n)]
        self.by_id = {node.node_id: node for node in self.nodes}
        links: set[tuple[int, int]] = set()
        order = list(range(n))
        for _ in range(max(1, degree // 2)):  # a union of random rings: connected, degree ~k
            self.rng.shuffle(order)
            for a, b in zip(order, order[1:] + order[:1], strict=True):
                if a != b:
                    links.add((min(a, b), max(a, b)))
        for a, b in sorted(links):
            self.nodes[a].mesh.peers.append(SimPeer(self.nodes[b].url, self.nodes[b].node_id))
            self.nodes[b].mesh.peers.append(SimPeer(self.nodes[a].url, self.nodes[a].node_id))
        self.nonces = 0

    def trade(self, provider: SimNode, consumer: SimNode) -> Trade:
        """A new trade, recorded in both parties' views as their ledgers would feed them."""
        self.nonces += 1
        made = make_trade(provider.key, consumer.key, f"n{self.nonces:08d}",
                          1_700_000_000_000 + self.nonces * 1000)
        for seq, party in enumerate((provider, consumer)):
            party.view.add_own(made.data, seq)
        return made

    def load_history(self, trades: Sequence[Trade]) -> None:
        """Every view holds `trades` (through `add_many`, as gossip adds them) and every
        peer's cursors stand past them: the state gossip converges to, without the rounds."""
        raw = [t.data for t in trades]
        for node in self.nodes:
            for start in range(0, len(raw), MAX_BATCH):
                node.view.add_many(raw[start:start + MAX_BATCH], "history")
            count = node.view.count()
            for peer in node.mesh.peers:
                node.view.set_cursor(peer.node_id, count)
                node.view.set_pushed(peer.node_id, count)

    async def round(self) -> None:
        """One gossip tick at every node, and one dispute relay, all at once."""
        jobs: list[Any] = []
        for node in self.nodes:
            jobs.extend(node.gossip.round())
            jobs.append(asyncio.ensure_future(node.relay()))
        await asyncio.gather(*jobs)
        self.net.round += 1
        self.clock.now += ROUND_S

    async def rounds_until(self, done: Callable[[], bool], limit: int) -> int | None:
        """Rounds run until `done()` holds (None if it did not within `limit`)."""
        for count in range(1, limit + 1):
            await self.round()
            if done():
                return count
        return None

    def trade_hops(self, trade_id: str) -> int | None:
        """Depth of the tree a trade spread along: each node's view records the peer it came
        from first (its `source`; a party's own ledger is hop 0). None while a node lacks it."""
        came_from: dict[str, str] = {}
        for node in self.nodes:
            with node.view.lock:
                row = node.view.conn.execute("SELECT source FROM trades WHERE id = ?",
                                             (bytes.fromhex(trade_id),)).fetchone()
            if row is None:
                return None
            came_from[node.node_id] = row[0]
        return _depth(came_from)

    def dispute_hops(self, dispute_id: str) -> int | None:
        """The same for a dispute (its auditor's node is hop 0)."""
        came_from = {}
        for node in self.nodes:
            held = node.disputes.get(dispute_id)
            if held is None:
                return None
            came_from[node.node_id] = held[1]
        return _depth(came_from)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _depth(came_from: dict[str, str]) -> int:
    hops: dict[str, int] = {}

    def hop(node: str) -> int:
        if node not in hops:
            source = came_from.get(node)
            hops[node] = 0 if source is None or source == node or source not in came_from \
                else hop(source) + 1
        return hops[node]

    return max(hop(node) for node in came_from)


# -- the measurements -------------------------------------------------------------------------

async def spread(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds and hops for a new trade, and for a new dispute, to reach every node; bytes
    per node per round; memory per node."""
    gc.collect()
    before = rss_bytes()
    mesh = Mesh(n, degree=args.degree, seed=args.seed, loss=args.loss,
                latency_ms=args.latency_ms, time_scale=args.time_scale)
    rng = mesh.rng
    nodes = mesh.nodes
    history = [make_trade(rng.choice(nodes).key, rng.choice(nodes).key, f"h{i:08d}",
                          1_699_000_000_000 + i) for i in range(args.history)]
    started = time.perf_counter()
    mesh.load_history(history)
    loaded_s = time.perf_counter() - started
    await mesh.round()  # the first round checks every checkpoint: not part of spreading
    rounds, hops, per_round = [], [], []
    for _ in range(args.probes):
        provider, consumer = rng.sample(nodes, 2)
        made = mesh.trade(provider, consumer)
        sent_before = sum(mesh.net.sent.values())
        took = await mesh.rounds_until(lambda t=made: all(nd.view.contains(t.id) for nd in nodes),
                                       args.max_rounds)
        rounds.append(took)
        hops.append(mesh.trade_hops(made.id))
        if took:
            per_round.append((sum(mesh.net.sent.values()) - sent_before) / n / took)
    idle_before = sum(mesh.net.sent.values())
    await mesh.round()
    idle = (sum(mesh.net.sent.values()) - idle_before) / n
    auditor, seller = rng.sample(nodes, 2)
    payload = make_dispute(mesh.trade(seller, auditor), auditor.key, 1_800_000_000_000)
    auditor.hold_dispute(payload, auditor.node_id)
    dispute_id = auditor.dispute_order[-1]
    dispute_rounds = await mesh.rounds_until(
        lambda: all(dispute_id in nd.disputes for nd in nodes), args.max_rounds)
    gc.collect()
    memory = (rss_bytes() - before) / n
    result = {"nodes": n, "degree": round(statistics.mean(len(nd.mesh.peers) for nd in nodes), 1),
              "view_trades": nodes[0].view.count(), "history_load_s": round(loaded_s, 1),
              "trade_rounds": rounds, "trade_hops": hops, "dispute_rounds": dispute_rounds,
              "dispute_hops": mesh.dispute_hops(dispute_id), "log2_n": round(math.log2(n), 2),
              "bytes_per_node_round": round(statistics.mean(per_round)) if per_round else None,
              "idle_bytes_per_node_round": round(idle),
              "memory_per_node_bytes": round(memory), "calls": mesh.net.calls,
              "lost": mesh.net.lost}
    mesh.close()
    return result


async def sybils(n: int, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    """Honest nodes against a fraction of colluding sybils that wash-trade among themselves
    and each dispute an honest seller falsely; what honest observers make of them.

    Honest nodes each sell `args.sales` times to random honest buyers. Each sybil sells
    `args.footholds` times to honest buyers (someone honest traded with the clique), buys once
    from an honest seller and disputes that purchase, and sells `args.wash` times to other sybils.
    Two honest auditors dispute one honest-graph seller (the control: disputes from auditors
    with standing should flag). Every dispute re-checks as upheld (the worst case)."""
    count = round(n * fraction)
    mesh = Mesh(n, degree=args.degree, seed=args.seed + 1, loss=args.loss,
                latency_ms=args.latency_ms, time_scale=args.time_scale, sybils=count)
    rng = mesh.rng
    honest = [nd for nd in mesh.nodes if not nd.sybil]
    bad = [nd for nd in mesh.nodes if nd.sybil]
    made: list[tuple[SimNode, SimNode, Trade]] = []

    def trade(provider: SimNode, consumer: SimNode) -> Trade:
        mesh.nonces += 1
        t = make_trade(provider.key, consumer.key, f"s{mesh.nonces:08d}",
                       1_700_000_000_000 + mesh.nonces * 1000)
        made.append((provider, consumer, t))
        return t

    def other(pool: list[SimNode], than: SimNode) -> SimNode:
        while (picked := rng.choice(pool)) is than:
            pass
        return picked

    for seller in honest:
        for _ in range(args.sales):
            trade(seller, other(honest, seller))
    cheater = rng.choice(honest)
    controls = [(h, trade(cheater, h)) for h in rng.sample([h for h in honest
                                                             if h is not cheater], 2)]
    false_disputes = []
    for sybil in bad:
        for _ in range(args.footholds):
            trade(sybil, rng.choice(honest))
        victim = rng.choice(honest)
        false_disputes.append((sybil, victim, trade(victim, sybil)))
        for _ in range(args.wash):
            trade(sybil, other(bad, sybil))
    # Observers have bought something: a node that never bought has no first-hand evidence of
    # anyone's service, so its graph gives no one trust (mesh/trust.py) and it judges by its
    # ledger, which the sim does not model.
    buyers = {id(c) for _, c, _ in made}
    judges = [h for h in honest if id(h) in buyers]
    observers = judges if args.observers == 0 else rng.sample(judges,
                                                              min(args.observers, len(judges)))
    gossiped = n <= args.gossip_trades_up_to
    spread_rounds = None
    if gossiped:  # each party's ledger feeds its view; gossip spreads the trades from there
        for provider, consumer, t in made:
            provider.view.add_own(t.data, 0)
            consumer.view.add_own(t.data, 0)
        ids = [t.id for _, _, t in made]
        spread_rounds = await mesh.rounds_until(
            lambda: all(nd.view.contains(i) for nd in observers for i in ids), args.max_rounds)
    else:  # the state gossip reaches (`spread` shows it does), in the observers' views only
        for nd in observers:
            theirs = [t.data for p, c, t in made if nd in (p, c)]
            for t in theirs:
                nd.view.add_own(t, 0)
            rest = [t.data for p, c, t in made if nd not in (p, c)]
            for start in range(0, len(rest), MAX_BATCH):
                nd.view.add_many(rest[start:start + MAX_BATCH], "history")
            for peer in nd.mesh.peers:  # nothing to push or pull: the others measure nothing
                nd.view.set_pushed(peer.node_id, nd.view.count())
                mesh.by_id[peer.node_id].view.set_cursor(nd.node_id, nd.view.count())
    for sybil, _victim, t in false_disputes:
        sybil.hold_dispute(make_dispute(t, sybil.key, 1_800_000_000_000), sybil.node_id)
    for auditor, t in controls:
        auditor.hold_dispute(make_dispute(t, auditor.key, 1_800_000_000_000), auditor.node_id)
    wanted = len(false_disputes) + len(controls)
    dispute_rounds = await mesh.rounds_until(
        lambda: all(len(nd.disputes) == wanted for nd in observers), args.max_rounds)
    from forge_cli.mesh.trust import Reputation

    worst_gap: int | None = None
    sybil_top = honest_floor = None
    trust_gap = None
    flagged_honest: set[str] = set()
    cheater_flagged = 0
    for observer in observers:
        rep = Reputation(observer.view, observer.node_id)
        rep.refresh()
        others = [h.node_id for h in honest if h is not observer]
        floor = min(rep.effective_bp(k) for k in others)
        top = max(rep.effective_bp(s.node_id) for s in bad)
        gap = floor - top
        if worst_gap is None or gap < worst_gap:
            worst_gap, sybil_top, honest_floor = gap, top, floor
        tgap = min(rep.trust_bp(k) for k in others) - max(rep.trust_bp(s.node_id) for s in bad)
        trust_gap = tgap if trust_gap is None else min(trust_gap, tgap)
        against = collections.defaultdict(set)
        for payload, _ in observer.disputes.values():
            claim = payload["dispute"]["claim"]
            against[claim["trade"]["terms"]["provider"]].add(claim["auditor"])
        for provider, auditors in against.items():
            if flags(rep, auditors):
                if provider == cheater.node_id:
                    cheater_flagged += 1
                elif provider in mesh.by_id and not mesh.by_id[provider].sybil:
                    flagged_honest.add(provider)
    result = {"nodes": n, "sybils": count, "trades": len(made),
              "trades_gossiped": gossiped, "trade_spread_rounds": spread_rounds,
              "false_disputes": len(false_disputes), "dispute_rounds": dispute_rounds,
              "observers": len(observers), "sybil_max_effective_bp": sybil_top,
              "honest_min_effective_bp": honest_floor,
              "sybils_below_every_honest": worst_gap is not None and worst_gap > 0,
              "trust_gap_bp": trust_gap, "honest_sellers_flagged": len(flagged_honest),
              "cheater_flagged_at": cheater_flagged}
    mesh.close()
    return result


def flags(rep: Any, auditors: set[str]) -> bool:
    """Whether upheld disputes from `auditors` flag their provider at a node with `rep`: the
    node's rule (root/node.py `dispute_weight`, mesh/audit.py `Auditor.record`): their graph
    trust here, each up to a typical trusted key's, against the threshold trust sets."""
    weight, threshold = rep.flag_weight(auditors)
    return weight >= threshold


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="100,300,1000",
                        help="node counts to simulate, comma-separated")
    parser.add_argument("--degree", type=int, default=8, help="peers per node, about")
    parser.add_argument("--history", type=int, default=200,
                        help="trades every view holds before the spread is measured")
    parser.add_argument("--probes", type=int, default=3,
                        help="new trades timed one after another")
    parser.add_argument("--max-rounds", type=int, default=40)
    parser.add_argument("--sybils", default="0.1,0.3",
                        help="fractions of colluding sybil nodes, comma-separated")
    parser.add_argument("--observers", type=int, default=12,
                        help="honest nodes whose reputation view is checked (0: all)")
    parser.add_argument("--sales", type=int, default=3, help="trades each honest node sells")
    parser.add_argument("--footholds", type=int, default=0,
                        help="sales each sybil makes to honest buyers")
    parser.add_argument("--wash", type=int, default=20,
                        help="wash trades each sybil sells to other sybils")
    parser.add_argument("--gossip-trades-up-to", type=int, default=50,
                        help="largest N whose sybil-run trades spread by gossip (larger N "
                             "loads them into the observers' views directly)")
    parser.add_argument("--loss", type=float, default=0.02, help="chance a message is lost")
    parser.add_argument("--latency-ms", type=float, default=40, help="mean one-way latency")
    parser.add_argument("--time-scale", type=float, default=0.001,
                        help="real seconds slept per simulated second of latency")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--verify-every-copy", action="store_true",
                        help="verify each signature at every node (slow)")
    args = parser.parse_args(argv)
    try:
        args.node_counts = [int(x) for x in args.nodes.split(",")]
        args.sybil_fractions = [float(x) for x in args.sybils.split(",") if x]
    except ValueError:
        parser.error(f"--nodes takes counts like 100,300 and --sybils fractions like 0.1,0.3; "
                     f"found {args.nodes!r} and {args.sybils!r}")
    if any(n < 10 for n in args.node_counts):
        parser.error("--nodes: each count must be at least 10")
    if not all(0 < f < 0.5 for f in args.sybil_fractions):
        parser.error("--sybils: each fraction must be above 0 and below 0.5")
    if not 0 <= args.loss < 0.5:
        parser.error("--loss must be from 0 to below 0.5")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for n in args.node_counts:
        load_before = _load()
        started = time.perf_counter()
        result = await spread(n, args)
        print(f"N={n}: spread done in {time.perf_counter() - started:.0f} s", file=sys.stderr,
              flush=True)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        result["load_before"], result["load_after"] = load_before, _load()
        result["sybil_runs"] = []
        for fraction in args.sybil_fractions:
            started = time.perf_counter()
            attacked = await sybils(n, fraction, args)
            attacked["wall_s"] = round(time.perf_counter() - started, 1)
            attacked["load_after"] = _load()
            result["sybil_runs"].append(attacked)
        runs.append(result)
    return {"cores": os.cpu_count(), "runs": runs}


def table(report: dict[str, Any]) -> str:
    """The runs as a Markdown table, the machine's load beside each."""
    lines = ["| N | hops: trade / dispute | log2 N | rounds: trade / dispute | bytes/node/round "
             "(spreading, idle) | memory/node | sybils: max sybil / min honest effective bp, "
             "honest flagged, cheater flagged at | wall s | load 1/5 min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        attacks = "; ".join(
            f"{a['sybils']} ({a['sybils'] / a['nodes']:.0%}): {a['sybil_max_effective_bp']} / "
            f"{a['honest_min_effective_bp']}, {a['honest_sellers_flagged']}, "
            f"{a['cheater_flagged_at']}/{a['observers']}" for a in r["sybil_runs"])
        wall = r["wall_s"] + sum(a["wall_s"] for a in r["sybil_runs"])
        lines.append(
            f"| {r['nodes']} | {max(h or 0 for h in r['trade_hops'])} / {r['dispute_hops']} | "
            f"{r['log2_n']} | {max(x or 0 for x in r['trade_rounds'])} / {r['dispute_rounds']} | "
            f"{r['bytes_per_node_round'] / 1000:.1f} kB, {r['idle_bytes_per_node_round'] / 1000:.1f}"
            f" kB | {r['memory_per_node_bytes'] / 1e6:.2f} MB | {attacks} | {wall:.0f} | "
            f"{r['load_after']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("forge").setLevel(logging.CRITICAL)  # lost calls are counted, not logged
    undo = (lambda: None) if args.verify_every_copy else remember_verdicts()
    try:
        report = asyncio.run(main_async(args))
    finally:
        undo()
    print(json.dumps(report) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
