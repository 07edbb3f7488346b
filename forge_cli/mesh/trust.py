"""Trust over the gossiped trade graph: EigenTrust seeded by this node's own trades and audits,
and the original Forge's three collusion heuristics, so that wash trading buys nothing.

`eigentrust` and `collusion` are pure functions over plain tuples; `Reputation` reads them off a
NetworkView (forge_cli.mesh.network) and answers in integer basis points.

Trust (Kamvar, Schlosser and Garcia-Molina 2003, as a personalised PageRank): a dual-signed
trade is the consumer's word that the provider served it, so trust flows from consumer to
provider, weighted by the trade's CU. It never flows back: a key that only buys, or that buys
from honest sellers to look like a customer, earns nothing by it; trust is earned by serving
keys that hold trust. Each round a key passes its trust to the providers it bought from in
proportion to the CU it paid each, and a share `alpha` of all trust returns to the pretrusted
keys: the providers this node bought from (by CU), raised by the audits they passed here and
halved by each dispute upheld against them. A node that has bought nothing has no first-hand
evidence of anyone's service, so it gives graph trust to no one and judges by its own ledger
(it takes no dispute either: standing needs a sale to it, mesh.audit). A key reached by no
purchase from a pretrusted key earns exactly 0, however much it trades: a clique of sybils
that only trades inside itself stays at 0 until someone this node trusts buys from it, and
then earns only the share that purchase carries in.

A dispute flags its provider when its upheld auditors' trust here, each counted up to a
typical trusted key's (the lower quartile of the keys that hold any), sums to FLAG_TYPICAL
typical keys: at least two auditors of ordinary standing, never one alone however trusted,
never keys that hold none, and a threshold that follows the mesh's size, so auditors far from
this node in a large mesh count as much as keys there ordinarily do.

Collusion (window 24 h, at least MIN_TRADES trades involving the key):
- tight cluster: one counterparty's share of its trades s > 0.2; score (s − 0.2) / 0.8;
- volume uniformity: the coefficient of variation of its CU per hour cv < 0.5; score
  (0.5 − cv) / 0.5 (a bot trading the same CU every hour; a person is burstier);
- round-robin: its strongly connected component over provider → consumer edges has ≥ 3 keys,
  none of them a key this node trusts first-hand (`trusted`: a ring closed off from the keys
  it trades with, not the mesh itself, which in health is one component trading mostly
  inside itself), and closedness c (edges between members / edges from members) > 0.8;
  score (c − 0.8) / 0.2.
The penalty is 5000 bp × the largest score, and it takes that share of a key's trust
(effective = trust − trust × penalty / 10,000): a key's collusion can halve its standing but
never push an honest key reached by trust down to 0, where the keys nobody trusts sit.
`Reputation` leaves this node's own trades out of the heuristics: it signed them, so they are
evidence it holds, not a pattern to suspect.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

BP = 10_000
ALPHA = 0.15  # the share of trust that returns to the pretrusted keys each round
ROUNDS = 60  # at most; iteration stops once a round moves less than TOLERANCE in all
TOLERANCE = 1e-12
WINDOW_MS = 24 * 3_600_000
HOUR_MS = 3_600_000
MIN_TRADES = 10  # a key with fewer trades in the window is not judged
TIGHT_SHARE = 0.2
UNIFORM_CV = 0.5
ROUND_ROBIN_SIZE = 3
ROUND_ROBIN_CLOSEDNESS = 0.8
MAX_PENALTY_BP = 5_000  # the penalty at a score of 1
AUDIT_CU = 10  # the pretrust one audit passed here adds, in CU of trade
# How far graph trust lifts the reputation this node's own ledger gives a peer: at a graph
# trust of 10,000 bp (an average pretrusted peer's), by half of itself.
LIFT = 2
FLAG_TYPICAL = 1.5  # the flag threshold, in units of a typical trusted key's trust


def eigentrust(edges: Iterable[tuple[str, str, int]], pretrusted: Mapping[str, float], *,
               alpha: float = ALPHA, rounds: int = ROUNDS) -> dict[str, float]:
    """Trust per key over `edges` (consumer, provider, cu), each trade the consumer's vouch
    for the provider by its CU, seeded by `pretrusted` (key → weight ≥ 0, normalised here).
    The values sum to 1 over the keys reachable from a pretrusted key and are exactly 0 for
    every other key; all are 0 when no weight is positive. O(edges × rounds), vectorised.

    Example::

        eigentrust([("a", "b", 5), ("x", "y", 1000)], {"a": 1.0})
        # {"a": 0.5…, "b": 0.4…, "x": 0.0, "y": 0.0}   (b served a; y's buyer x holds none)
    """
    import numpy as np

    index: dict[str, int] = {}
    src: list[int] = []
    dst: list[int] = []
    weight: list[float] = []
    for consumer, provider, cu in edges:
        a = index.setdefault(consumer, len(index))
        b = index.setdefault(provider, len(index))
        if a != b and cu > 0:
            src.append(a)
            dst.append(b)
            weight.append(float(cu))
    for key in pretrusted:
        index.setdefault(key, len(index))
    n = len(index)
    seed = np.zeros(n)
    for key, w in pretrusted.items():
        if w > 0 and math.isfinite(w):
            seed[index[key]] += w
    if n == 0 or seed.sum() <= 0:
        return dict.fromkeys(index, 0.0)
    seed /= seed.sum()
    # Consumer → provider only: the buyer vouches for the service, never the seller for a buyer.
    s = np.array(src, dtype=np.int64)
    d = np.array(dst, dtype=np.int64)
    w_arr = np.array(weight, dtype=np.float64)
    out = np.bincount(s, weights=w_arr, minlength=n)
    share = w_arr / out[s] if len(s) else w_arr
    dangling = out == 0
    trust = seed.copy()
    for _ in range(max(1, rounds)):
        flow = np.bincount(d, weights=share * trust[s], minlength=n).astype(np.float64)
        flow += trust[dangling].sum() * seed  # a key that traded with no one passes it home
        new = (1.0 - alpha) * flow + alpha * seed
        moved = float(np.abs(new - trust).sum())
        trust = new
        if moved < TOLERANCE:
            break
    return {key: float(trust[i]) for key, i in index.items()}


@dataclass(frozen=True)
class Collusion:
    """The three heuristics for one key over the 24 h window: each value, whether it fired,
    and the penalty in basis points (0 with fewer than MIN_TRADES trades)."""

    node: str
    trades: int = 0
    counterparties: int = 0
    tight_cluster_share: float = 0.0
    tight_cluster: bool = False
    volume_cv: float | None = None
    volume_uniform: bool = False
    round_robin_size: int = 0
    round_robin_closedness: float = 0.0
    round_robin: bool = False
    penalty_bp: int = 0

    @property
    def flags(self) -> list[str]:
        return [name for name, fired in (("tight_cluster", self.tight_cluster),
                                         ("volume_uniform", self.volume_uniform),
                                         ("round_robin", self.round_robin)) if fired]

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node, "trades_in_window": self.trades,
                "counterparties": self.counterparties,
                "tight_cluster": {"share": round(self.tight_cluster_share, 6),
                                  "threshold": TIGHT_SHARE, "fired": self.tight_cluster},
                "volume_uniformity": {"cv": None if self.volume_cv is None
                                      else round(self.volume_cv, 6),
                                      "threshold": UNIFORM_CV, "fired": self.volume_uniform},
                "round_robin": {"size": self.round_robin_size,
                                "closedness": round(self.round_robin_closedness, 6),
                                "threshold": ROUND_ROBIN_CLOSEDNESS,
                                "min_size": ROUND_ROBIN_SIZE, "fired": self.round_robin},
                "penalty_bp": self.penalty_bp, "flags": self.flags}


Trade = tuple[str, str, int, int]  # (consumer, provider, cu, ts_ms)


def collusion(trades: Sequence[Trade], node: str, now_ms: int,
              trusted: Collection[str] = ()) -> Collusion:
    """The heuristics for `node` over the trades (consumer, provider, cu, ts_ms) of the 24 h
    window ending at `now_ms` (older and later trades are ignored); a component holding a
    `trusted` key is no ring."""
    return collusion_all(trades, now_ms, only={node}, trusted=trusted).get(node,
                                                                            Collusion(node))


def collusion_all(trades: Sequence[Trade], now_ms: int, only: set[str] | None = None,
                  trusted: Collection[str] = ()) -> dict[str, Collusion]:
    """`collusion` for every key in the window (or those in `only`), the components found
    once for all: O(trades)."""
    window = [t for t in trades if now_ms - WINDOW_MS < t[3] <= now_ms and t[0] != t[1]]
    involved: dict[str, list[Trade]] = defaultdict(list)
    for t in window:
        involved[t[0]].append(t)
        involved[t[1]].append(t)
    keys = [k for k in involved if only is None or k in only]
    judged = [k for k in keys if len(involved[k]) >= MIN_TRADES]
    components = _round_robin(window, set(trusted)) if judged else {}
    out = {k: Collusion(k, len(involved[k]), _counterparties(k, involved[k]))
           for k in keys}
    for key in judged:
        mine = involved[key]
        counts = Counter(t[1] if t[0] == key else t[0] for t in mine)
        share = max(counts.values()) / len(mine)
        hourly = [0] * (WINDOW_MS // HOUR_MS)
        for t in mine:
            hourly[min(len(hourly) - 1, (now_ms - t[3]) // HOUR_MS)] += t[2]
        mean = sum(hourly) / len(hourly)
        cv = (math.sqrt(sum((h - mean) ** 2 for h in hourly) / len(hourly)) / mean
              if mean > 0 else None)
        size, closedness = components.get(key, (1, 0.0))
        scores = [(share - TIGHT_SHARE) / (1 - TIGHT_SHARE) if share > TIGHT_SHARE else 0.0,
                  (UNIFORM_CV - cv) / UNIFORM_CV if cv is not None and cv < UNIFORM_CV else 0.0,
                  (closedness - ROUND_ROBIN_CLOSEDNESS) / (1 - ROUND_ROBIN_CLOSEDNESS)
                  if size >= ROUND_ROBIN_SIZE and closedness > ROUND_ROBIN_CLOSEDNESS else 0.0]
        out[key] = Collusion(key, len(mine), len(counts), share, scores[0] > 0, cv,
                             scores[1] > 0, size, closedness, scores[2] > 0,
                             round(MAX_PENALTY_BP * min(1.0, max(scores))))
    return out


def _counterparties(key: str, trades: list[Trade]) -> int:
    return len({t[1] if t[0] == key else t[0] for t in trades})


def _round_robin(window: Sequence[Trade], trusted: set[str]) -> dict[str, tuple[int, float]]:
    """key → (size of its strongly connected component over provider → consumer edges,
    closedness: distinct edges between members / distinct edges from members); closedness
    0 for a component that holds a trusted key."""
    graph: dict[str, set[str]] = defaultdict(set)
    for consumer, provider, _, _ in window:
        graph[provider].add(consumer)
        graph.setdefault(consumer, set())
    component = _tarjan(graph)
    members: dict[int, list[str]] = defaultdict(list)
    for key, c in component.items():
        members[c].append(key)
    out: dict[str, tuple[int, float]] = {}
    for c, keys in members.items():
        edges = sum(len(graph[k]) for k in keys)
        inside = sum(1 for k in keys for m in graph[k] if component[m] == c)
        closedness = inside / edges if edges and trusted.isdisjoint(keys) else 0.0
        for k in keys:
            out[k] = (len(keys), closedness)
    return out


def _tarjan(graph: Mapping[str, set[str]]) -> dict[str, int]:
    """Tarjan's strongly connected components, iterative (a long chain would overflow
    Python's stack): key → component number."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    component: dict[str, int] = {}
    counter = components = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, Any]] = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            key, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[key] = min(low[key], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[key])
            if low[key] == index[key]:
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component[member] = components
                    if member == key:
                        break
                components += 1
    return component


class TradeGraph(Protocol):
    """What `Reputation` reads of a network view (forge_cli.mesh.network.NetworkView)."""

    def trade_edges(self) -> list[tuple[str, str, int, int, bool]]:
        """(consumer, provider, cu, ts_ms, own) of every trade held."""
        ...


class Reputation:
    """This node's trust in every key of its network view, and the collusion penalty of each.

    Example::

        rep = Reputation(view, node_id)
        rep.refresh()                       # recompute from the view
        rep.trust_bp(peer), rep.effective_bp(peer), rep.collusion(peer).to_json()
        rep.ranked()[:5]                    # [(key, effective_bp), …], best first

    trust_bp is graph trust scaled so that the average pretrusted peer holds 10,000 bp
    (capped there): a key reached only through others earns what their trades carry in.
    With `local` (key → the reputation this node's own ledger gives it, economy.credit), a
    node's own evidence comes first: trust_bp = local × (1 + graph / (LIFT × 10,000)),
    capped at 10,000, so graph trust lifts a peer's standing and wash trades (graph trust 0)
    leave it where a newcomer's is. effective_bp = trust_bp less the collusion penalty's share
    of it (penalty_bp / 10,000: at most half).
    `audits` (key → (audits passed, disputes upheld) here) shapes the pretrust.
    """

    def __init__(self, view: TradeGraph, me: str, *,
                 local: Callable[[str], int] | None = None,
                 audits: Callable[[], Mapping[str, tuple[int, int]]] | None = None,
                 clock: Callable[[], int] | None = None) -> None:
        import time

        self.view = view
        self.me = me
        self.local = local
        self.audits = audits
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
        self._graph: dict[str, int] = {}
        self._typical = 0
        self._collusion: dict[str, Collusion] = {}
        self.refreshed_ms: int | None = None
        self.trades = 0

    def refresh(self) -> None:
        """Recompute trust and collusion from the view (O(trades × rounds))."""
        rows = self.view.trade_edges()
        now = self.clock()
        # Seeded by this node's purchases only: a buyer that paid this node gave it CU, not
        # evidence of any service, and a node that has bought nothing trusts no one's graph
        # (it judges by its ledger).
        seeds: dict[str, float] = defaultdict(float)
        for consumer, provider, cu, _, _ in rows:
            if consumer == self.me != provider:
                seeds[provider] += max(1, cu)
        for key, (passed, disputed) in (self.audits() if self.audits else {}).items():
            if key != self.me:
                seeds[key] = (seeds.get(key, 0.0) + AUDIT_CU * passed) * 0.5 ** disputed
        trust = eigentrust(((c, p, cu) for c, p, cu, _, _ in rows), seeds)
        pretrusted = [trust[k] for k, w in seeds.items() if w > 0 and k in trust]
        mean = sum(pretrusted) / len(pretrusted) if pretrusted else 0.0
        # A key the graph reaches at all holds at least 1 bp: below every key it reaches not.
        graph = {k: (min(BP, max(1, round(BP * t / mean))) if t > 0 else 0) if mean > 0 else 0
                 for k, t in trust.items() if k != self.me}
        held = sorted(v for v in graph.values() if v > 0)
        self._typical = held[len(held) // 4] if held else 0  # the lower quartile
        foreign = [(c, p, cu, ts) for c, p, cu, ts, own in rows
                   if not own and self.me not in (c, p)]
        self._graph, self._collusion = graph, collusion_all(foreign, now, trusted=set(seeds))
        self.refreshed_ms, self.trades = now, len(rows)

    def graph_bp(self, node: str) -> int:
        """What the trade graph alone says: 0 for a key nobody this node trusts traded with
        (this node itself: 10,000)."""
        return BP if node == self.me else self._graph.get(node, 0)

    def flag_weight(self, auditors: Iterable[str]) -> tuple[int, int]:
        """(weight, threshold) of upheld disputes from `auditors` against one provider: their
        graph trust, each counted up to a typical key's (the lower quartile of the keys
        holding any), against FLAG_TYPICAL typical keys (the provider is flagged once
        weight ≥ threshold; never with no trusted key in the view)."""
        typical = self._typical
        weight = sum(min(self.graph_bp(a), typical) for a in set(auditors))
        return weight, max(1, math.ceil(FLAG_TYPICAL * typical))

    def trust_bp(self, node: str) -> int:
        graph = self.graph_bp(node)
        if self.local is None:
            return graph
        local = self.local(node)
        return max(0, min(BP, local + local * graph // (LIFT * BP)))

    def collusion(self, node: str) -> Collusion:
        return self._collusion.get(node, Collusion(node))

    def effective_bp(self, node: str) -> int:
        trust = self.trust_bp(node)
        return max(0, trust - trust * self.collusion(node).penalty_bp // BP)

    def known(self) -> set[str]:
        """Every key with a trade in the view when it was last read."""
        return set(self._graph) | set(self._collusion)

    def keys(self) -> list[str]:
        return sorted(self.known() - {self.me})

    def ranked(self) -> list[tuple[str, int]]:
        """Every key of the view but this node, by effective_bp, best first (ties by key)."""
        scored = [(k, self.effective_bp(k)) for k in self.keys()]
        return sorted(scored, key=lambda kv: (-kv[1], kv[0]))


__all__ = ["ALPHA", "BP", "Collusion", "FLAG_TYPICAL", "MAX_PENALTY_BP", "MIN_TRADES", "ROUNDS", "Reputation",
           "TradeGraph", "WINDOW_MS", "collusion", "collusion_all", "eigentrust"]
