"""What the dashboard shows, as plain data: one `Snapshot` per poll, fed to every panel.

Keeping it plain is what makes the panels testable with recorded data (snapshot tests) and
the live app a thin loop: fetch → Snapshot → `panel.show(snapshot)`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from forge_cli.client import AsyncClient

PRICE_HISTORY = 120
MINUTES = 10  # the Overview's per-minute charts reach back this far
MINUTE_MS = 60_000


@dataclass
class Snapshot:
    connection: str = "connecting"          # "connected", "disconnected, retrying", "token refused"
    message: str = ""                        # why, when not connected
    now_ms: int = 0                          # the clock the panels use for "ago" and "due in"
    health: dict[str, Any] = field(default_factory=dict)
    balance: dict[str, Any] = field(default_factory=dict)
    pricing: list[dict[str, Any]] = field(default_factory=list)
    trades: list[dict[str, Any]] = field(default_factory=list)
    network: dict[str, Any] = field(default_factory=dict)
    safety: dict[str, Any] = field(default_factory=dict)
    budgets: list[dict[str, Any]] = field(default_factory=list)  # per policy account: spent vs budget
    pending: list[dict[str, Any]] = field(default_factory=list)
    peers: list[dict[str, Any]] | None = None  # None: the node has no /peers route (no mesh)
    pool: dict[str, Any] | None = None          # None: no lending pool on this node
    loans: list[dict[str, Any]] | None = None
    verified: str = ""                          # "verified ✓" or "verify failed: …"
    activity: dict[str, Any] | None = None      # GET /v1/forge/activity; None: an older node
    price_history: list[int] = field(default_factory=list)   # µCU/token, oldest first
    price_times: list[int] = field(default_factory=list)     # when each price was polled, ms
    demand_history: list[int] = field(default_factory=list)  # ppm

    @property
    def online(self) -> bool:
        return self.connection == "connected"

    @property
    def node_id(self) -> str:
        return str(self.network.get("node_id") or self.health.get("node_id") or "")

    def minutes(self, count: int = MINUTES) -> list[Minute]:
        """This node's trades in each of the last `count` minutes, oldest first (the last one
        ends now); counted from the ledger's trades, so a restarted dashboard has its past."""
        buckets = [Minute(self.now_ms - (count - i) * MINUTE_MS) for i in range(count)]
        me = self.node_id
        for trade in self.trades:
            # a trade recorded while this poll ran is newer than its clock: it counts as now
            age = max(0, self.now_ms - int(trade.get("ts", 0)))
            if age >= count * MINUTE_MS:
                continue
            bucket = buckets[count - 1 - age // MINUTE_MS]
            cu = int(trade.get("cu", 0))
            if trade.get("provider") == me:
                bucket.trades += 1
                bucket.tokens += int(trade.get("completion_tokens", 0))
                bucket.earned += cu
            if trade.get("consumer") == me:
                bucket.spent += cu
        return buckets

    def sale_prices(self) -> list[tuple[int, int]]:
        """(ts ms, µCU/token) of this node's sales, oldest first."""
        me = self.node_id
        return sorted((int(t["ts"]), int(t["price_ucu_per_token"])) for t in self.trades
                      if t.get("provider") == me and "ts" in t and "price_ucu_per_token" in t)


@dataclass
class Minute:
    """One minute of this node's trades: what it sold (tokens, CU earned) and bought (spent)."""

    start_ms: int
    trades: int = 0
    tokens: int = 0
    earned: int = 0
    spent: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / 60


async def fetch(client: AsyncClient, previous: Snapshot, now_ms: int) -> Snapshot:
    """One poll of every route the panels need (raises NodeUnreachable, TokenRefused or
    another ForgeError); a route the node lacks (404) shows as None."""
    paths = ("/health", "/v1/forge/balance", "/v1/forge/pricing", "/v1/forge/trades?limit=200",
             "/v1/forge/network", "/v1/forge/safety", "/v1/forge/approvals", "/v1/forge/peers",
             "/v1/forge/pool", "/v1/forge/loans?all=1", "/v1/forge/activity")
    (health, balance, pricing, trades, network, safety, pending, peers, pool, loans,
     activity) = await asyncio.gather(
        *(client.get_optional(path) for path in paths))
    safety = safety or {}
    budgets = []
    for policy in safety.get("policies", []):
        status = await client.get_optional(f"/v1/forge/safety?account={policy['account']}") or {}
        budgets.append({"account": policy["account"],
                        "spent_last_hour_cu": status.get("spent_last_hour_cu", 0),
                        "hourly_budget_cu": policy.get("hourly_budget_cu", 0),
                        "spent_lifetime_cu": status.get("spent_lifetime_cu", 0),
                        "lifetime_budget_cu": policy.get("lifetime_budget_cu", 0)})
    models = (pricing or {}).get("models", [])
    prices, demand = list(previous.price_history), list(previous.demand_history)
    times = list(previous.price_times)
    if models:
        prices.append(int(models[0]["price_ucu_per_token"]))
        times.append(now_ms)
        demand.append(int(models[0].get("market", {}).get("demand_ratio_ppm", 0)))
    return Snapshot(
        connection="connected", now_ms=now_ms, health=health or {}, balance=balance or {},
        pricing=models, trades=(trades or {}).get("trades", []), network=network or {}, safety=safety,
        budgets=budgets, pending=(pending or {}).get("pending", []),
        peers=_listing(peers, "peers"), pool=pool, loans=_listing(loans, "loans"),
        activity=activity, verified=previous.verified, price_history=prices[-PRICE_HISTORY:],
        price_times=times[-PRICE_HISTORY:],
        demand_history=demand[-PRICE_HISTORY:],
    )


def _listing(payload: Any, key: str) -> list[dict[str, Any]] | None:
    if payload is None:
        return None
    if isinstance(payload, list):
        return payload
    return list(payload.get(key, []))


async def verify(client: AsyncClient, network: dict[str, Any]) -> str:
    """Check the node's signed checkpoint and the newest entry's inclusion proof against it."""
    from forge_cli.errors import ForgeError
    from forge_cli.ledger import merkle, note

    try:
        verifier = note.Verifier.parse(network["vkey"])
        if verifier.public_key.hex() != network["node_id"]:
            return "verify failed: the checkpoint key is not the node's"
        checkpoint = note.open_checkpoint(network["checkpoint"], verifier)
        if checkpoint.root.hex() != network["merkle_root"] or checkpoint.size != network["ledger_size"]:
            return "verify failed: the checkpoint does not match the root the node reports"
        if checkpoint.size == 0:
            return "verified ✓"
        seq = checkpoint.size - 1
        proof = await client.get_optional(f"/v1/forge/ledger/proof/{seq}?size={checkpoint.size}")
        ok = proof is not None and merkle.verify_inclusion(
            bytes.fromhex(proof["leaf_hash"]), seq, checkpoint.size,
            [bytes.fromhex(h) for h in proof["proof"]], checkpoint.root)
        return "verified ✓" if ok else f"verify failed: entry {seq} is not in the signed tree"
    except (ForgeError, KeyError, ValueError, TypeError) as exc:
        return f"verify failed: {exc}"
