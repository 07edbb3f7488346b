"""Recorded node data for the TUI's snapshot tests: fixed ids, times and prices, no live node."""

from __future__ import annotations

from tui.state import Snapshot

NOW_MS = 1_795_000_000_000  # 2026-11-18 UTC, fixed
NODE = "4061" + "21cce202e04da114b33725c76feeacb4f67d05283f3f52730905a8b817"[:60]
ALICE = "8ea8785c68eee77f0b8625df94972b1c51b87a3bb8f20d3b554f6263c0e2b209"
BOB = "b6b268c4623b4dcfcb2cced40e28e386bcc9d3821f0042e8cd17d6c03b7a1c02"


def _trade(seq: int, consumer: str, tokens: int, price: int) -> dict:
    cu = -(-tokens * price // 1_000_000)
    return {"seq": seq, "hash": f"{seq:02d}" * 32, "provider": NODE, "consumer": consumer,
            "model": "tiny.gguf", "model_sha256": "3214f026b6396a09" * 4, "prompt_tokens": 20,
            "completion_tokens": tokens, "price_ucu_per_token": price, "cu": cu, "nonce": f"{seq:032x}",
            "request_sha256": "aa" * 32, "response_sha256": "bb" * 32, "ts": NOW_MS - (20 - seq) * 7_000,
            "provider_sig": "0e" * 64, "consumer_sig": "c4" * 64}


def recorded(**overrides) -> Snapshot:
    prices = [850_000, 671_500, 620_050, 708_825, 646_178, 752_324, 826_627, 928_639, 1_049_047,
              884_333, 769_033, 688_323, 631_826]
    demand = [500_000, 500_000, 500_000, 1_000_000, 500_000, 1_000_000, 1_000_000, 1_500_000,
              1_500_000, 500_000, 500_000, 500_000, 500_000]
    trades = [_trade(s, ALICE if s % 2 else BOB, 3 + s % 5, prices[s % len(prices)])
              for s in range(12, 0, -1)]
    snapshot = Snapshot(
        connection="connected", now_ms=NOW_MS,
        health={"status": "ok", "node_id": NODE, "models": ["tiny.gguf"], "ledger_size": 17},
        balance={"account": NODE, "balance": 63, "reserved": 0, "available": 63, "earned": 63, "spent": 0,
                 "reputation": 6200},
        pricing=[{"model": "tiny.gguf", "params": 107200, "price_ucu_per_token": 631_826,
                  "market": {"tier": "small", "factor_ppm": 631_826, "demand": 0, "capacity": 1,
                             "supply": 1, "demand_ratio_ppm": 500_000}}],
        trades=trades,
        network={"node_id": NODE, "ledger_size": 17, "merkle_root": "c560918c19bfc60d" * 4, "trades": 12,
                 "trade_volume_cu": 40},
        safety={"kill_switch": {"active": False, "reason": "", "seq": None},
                "breaker": {"state": "closed", "consecutive_errors": 0, "spends_last_minute": 4,
                            "max_consecutive_errors": 5, "max_spends_per_minute": 30},
                "policy": {"per_request_cap_cu": 5000, "hourly_budget_cu": 20000,
                           "lifetime_budget_cu": 200000, "approval_threshold_cu": 2000},
                "policies": [{"account": BOB}]},
        budgets=[{"account": ALICE, "spent_last_hour_cu": 14_000, "hourly_budget_cu": 20_000,
                  "spent_lifetime_cu": 30_000, "lifetime_budget_cu": 200_000},
                 {"account": BOB, "spent_last_hour_cu": 12, "hourly_budget_cu": 100,
                  "spent_lifetime_cu": 12, "lifetime_budget_cu": 1000}],
        pending=[{"id": "apr_c94d505dd867", "account": BOB, "cu": 14, "status": "requested",
                  "expires_ms": NOW_MS + 900_000, "seq": 16}],
        verified="verified ✓", price_history=prices, demand_history=demand,
        price_times=[NOW_MS - (len(prices) - 1 - i) * 2_000 for i in range(len(prices))],
        activity={"uptime_ms": 3_725_000, "in_flight": 1, "queued": 2,
                  "models": [{"model": "tiny.gguf", "device": "CPU", "layers": 2, "gpu_layers": 0}],
                  "last_reply": {"completion_tokens": 7, "tokens_per_s": 85.3, "ts": NOW_MS - 7_000}},
    )
    for key, value in overrides.items():
        setattr(snapshot, key, value)
    return snapshot


# The shapes of GET /v1/forge/pool and /v1/forge/loans (forge_cli.economy.lending).
POOL = {"cash": 37_500, "lent": 12_500, "value": 50_000, "shares": 50_000, "reserve_pct": 30,
        "max_loan_pct": 20, "open_loans": 1}
LOANS = [
    {"loan_id": 17, "account": ALICE, "principal": 2_000, "collateral": 1_000, "rate_ppm": 5_000,
     "start_ms": NOW_MS - 3_600_000, "due_ms": NOW_MS + 5 * 3_600_000 + 30 * 60_000,
     "status": "open", "interest": 0, "closed_ms": None, "owed_now": 2_010},
    {"loan_id": 9, "account": BOB, "principal": 500, "collateral": 300, "rate_ppm": 5_000,
     "start_ms": NOW_MS - 30 * 3_600_000, "due_ms": NOW_MS - 2 * 3_600_000,
     "status": "defaulted", "interest": 0, "closed_ms": NOW_MS - 2 * 3_600_000},
]
PEERS = [  # the shape of GET /v1/forge/peers
    {"node_id": ALICE, "url": "http://192.168.1.20:3001",
     "models": [{"name": "tiny.gguf", "sha256": "5f3a9c0e1b2d4f60", "params": 4_352,
                 "price_ucu_per_token": 900_000},
                {"name": "qwen2.5:0.5b", "sha256": "0c1d2e3f40516273", "params": 494_032_768,
                 "price_ucu_per_token": 1_400_000}],
     "price_ucu_per_token": 900_000, "reputation": 5300, "last_seen_ms": NOW_MS - 4_000,
     "latency_ms": 3, "flagged": False, "flag_reason": None, "source": "mdns",
     "audits": {"passed": 12, "disputed": 0, "forged": 0},
     "witness": {"cosigned": 7, "largest_size": 412}, "fork_evidence": 0,
     "trust_bp": 6120, "effective_bp": 6120, "collusion": {"flags": [], "penalty_bp": 0}},
    {"node_id": BOB, "url": "http://10.0.0.7:3001",
     "models": [{"name": "smollm2:135m", "sha256": "9e8d7c6b5a493827", "params": 134_515_008,
                 "price_ucu_per_token": 1_000_000}],
     "price_ucu_per_token": 1_000_000, "reputation": 3000, "last_seen_ms": NOW_MS - 95_000,
     "latency_ms": 41, "flagged": True,
     "flag_reason": "duplicate node id: this peer uses our node key (a copied FORGE_HOME?)",
     "source": "static", "audits": {"passed": 3, "disputed": 1, "forged": 0},
     "trust_bp": 2400, "effective_bp": 0,
     "collusion": {"flags": ["tight_cluster", "round_robin"], "penalty_bp": 5000}},
]
