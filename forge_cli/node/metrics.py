"""Prometheus metrics of one node, in a registry of its own (so tests can run several)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TRUST_LABELS = 64  # keys shown per trust gauge: the mesh's peers first, then the best ranked


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.cu_earned = Counter("forge_cu_earned", "CU earned by this node as provider", registry=r)
        self.cu_spent = Counter("forge_cu_spent", "CU spent by consumers on this node", registry=r)
        self.trades = Counter("forge_trades", "Dual-signed trades recorded", ["model"], registry=r)
        self.tokens = Counter("forge_tokens", "Tokens processed", ["kind"], registry=r)
        self.requests = Counter("forge_requests", "API requests", ["route", "status"], registry=r)
        self.denied = Counter("forge_spends_denied", "Spends denied, by gate", ["gate"], registry=r)
        self.price = Gauge("forge_price_ucu_per_token", "Current price", ["model"], registry=r)
        self.queue_depth = Gauge("forge_queue_depth", "Requests queued or running", registry=r)
        self.kill_switch = Gauge("forge_kill_switch", "1 while the kill switch is on", registry=r)
        self.breaker_open = Gauge("forge_breaker_open",
                                  "1 while the node-wide circuit breaker is open", registry=r)
        self.breakers_open = Gauge("forge_account_breakers_open",
                                   "Accounts whose own circuit breaker is open", registry=r)
        self.gossip_refused = Counter("forge_gossip_refused",
                                      "Gossiped trades refused: source_quota, total_quota, invalid",
                                      ["reason"], registry=r)
        self.rechecks = Counter("forge_dispute_rechecks",
                                "Peers' disputes re-checked here (upheld, forged), re-checks "
                                "that yielded to paying work, and ones dropped unrun (expired)",
                                ["outcome"], registry=r)
        self.disputes_refused = Counter("forge_disputes_refused",
                                        "Peers' disputes refused before any re-check, by error",
                                        ["error"], registry=r)
        self.ledger_size = Gauge("forge_ledger_entries", "Entries in the ledger", registry=r)
        self.ttft = Histogram("forge_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.generation = Histogram("forge_generation_seconds", "Generation time per request",
                                    buckets=LATENCY_BUCKETS, registry=r)

        self.trust_keys = Gauge("forge_trust_keys", "Keys in the network view's trade graph, "
                                "and those nobody trusted here traded with (untrusted)",
                                ["kind"], registry=r)
        self.trust = {name: Gauge(f"forge_{name}", text, ["node_id"], registry=r)
                      for name, text in (
                          ("trust_bp", "Trust here over the trade graph, bp"),
                          ("effective_reputation_bp", "Trust less the collusion penalty, bp"),
                          ("collusion_penalty_bp", "Collusion penalty over the last 24 h, bp"),
                          ("collusion_tight_cluster_share", "One counterparty's share of its "
                           "trades in 24 h (fires above 0.2)"),
                          ("collusion_volume_cv", "Coefficient of variation of its hourly CU "
                           "in 24 h (fires below 0.5)"),
                          ("collusion_round_robin_closedness", "Closedness of its strongly "
                           "connected component (fires above 0.8 with 3 or more keys)"))}

    def show_trust(self, rep: Any, peers: list[str]) -> None:
        """Trust gauges for at most TRUST_LABELS keys (a Prometheus label per key of a large
        view would be unbounded): `peers` first, then the best by effective reputation."""
        keys = list(dict.fromkeys([*peers, *(k for k, _ in rep.ranked())]))[:TRUST_LABELS]
        known = rep.known()
        self.trust_keys.labels("all").set(len(known))
        self.trust_keys.labels("untrusted").set(sum(1 for k in known if rep.graph_bp(k) == 0))
        for gauge in self.trust.values():
            gauge.clear()
        for key in keys:
            found = rep.collusion(key)
            values = {"trust_bp": rep.trust_bp(key), "effective_reputation_bp":
                      rep.effective_bp(key), "collusion_penalty_bp": found.penalty_bp,
                      "collusion_tight_cluster_share": found.tight_cluster_share,
                      "collusion_volume_cv": found.volume_cv or 0.0,
                      "collusion_round_robin_closedness": found.round_robin_closedness}
            for name, value in values.items():
                self.trust[name].labels(key).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
