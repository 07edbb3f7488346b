"""Prometheus metrics of one node, in a registry of its own (so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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

    def render(self) -> bytes:
        return generate_latest(self.registry)
