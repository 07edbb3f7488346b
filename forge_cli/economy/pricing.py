"""Prices: the tier base by model size × a market factor, all in integers (µCU, ppm).

A price is µCU per completion token; a cost is `ceil(tokens × price / 10⁶)` CU, the same
formula the ledger checks on every trade (`entries.trade_cost`).
"""

from __future__ import annotations

from typing import Any

from forge_cli.errors import UsageError
from forge_cli.ledger.entries import UCU_PER_CU, trade_cost

PPM = 1_000_000

# (parameters below, µCU per completion token); the last tier has no upper bound.
TIERS: tuple[tuple[str, int | None, int], ...] = (
    ("small", 3_000_000_000, 1 * UCU_PER_CU),
    ("medium", 14_000_000_000, 3 * UCU_PER_CU),
    ("large", 70_000_000_000, 8 * UCU_PER_CU),
    ("frontier", None, 20 * UCU_PER_CU),
)

DEMAND_RANGE_PPM = (500_000, 3_000_000)
SUPPLY_RANGE_PPM = (500_000, 2_000_000)


def tier_of(params: int) -> tuple[str, int]:
    """(tier name, µCU per token) for a model with `params` parameters."""
    if type(params) is not int or params < 0:
        raise UsageError(f"parameter count must be a non-negative integer, found {params!r}")
    for name, below, price in TIERS:
        if below is None or params < below:
            return name, price
    raise AssertionError("unreachable: the last tier has no bound")


def tier_price_ucu(params: int) -> int:
    """µCU per completion token before the market factor.

    >>> tier_price_ucu(270_000_000), tier_price_ucu(7_000_000_000)
    (1000000, 3000000)
    """
    return tier_of(params)[1]


def cost_cu(completion_tokens: int, price_ucu: int) -> int:
    """CU for `completion_tokens` at `price_ucu` µCU per token, rounded up (as trades are).

    >>> cost_cu(40, 1_500_000)
    60
    """
    return trade_cost(completion_tokens, price_ucu)


def _clamp(value: int, bounds: tuple[int, int]) -> int:
    return max(bounds[0], min(bounds[1], value))


class Market:
    """The market factor: an integer EMA of the demand ratio over the supply ratio.

    Each `observe` turns raw counts into ratios in ppm and moves the factor towards their
    quotient by `alpha_ppm` (300 000 = α 0.3):

        demand ratio = demand × 10⁶ // capacity, clamped to 0.5–3.0 (500 000–3 000 000 ppm)
                       demand = requests queued + running, capacity = requests the engine
                       runs at once (default 1); an idle node (demand 0) gives 0.5
        supply ratio = max(1, supply) × 10⁶, clamped to 0.5–2.0 (500 000–2 000 000 ppm)
                       supply = providers of the model seen, this node included; as a count
                       of at least 1 it never reaches the 0.5 floor, which is kept as DESIGN
                       states it
        target       = demand ratio × 10⁶ // supply ratio           (0.25–6.0 in principle)
        factor      += round(alpha × (target − factor) / 10⁶), at least 1 ppm while it
                       differs from the target, so it reaches the target exactly (starts at 1.0)

    The price is `tier × factor // 10⁶`, never below 1 µCU.
    """

    def __init__(self, alpha_ppm: int = 300_000) -> None:
        if type(alpha_ppm) is not int or not 0 < alpha_ppm <= PPM:
            raise UsageError(f"alpha_ppm must be an integer in 1..{PPM}, found {alpha_ppm!r}")
        self.alpha_ppm = alpha_ppm
        self.factor_ppm = PPM
        self.demand = 0
        self.supply = 1
        self.capacity = 1
        self.demand_ratio_ppm = PPM
        self.supply_ratio_ppm = PPM
        self.target_ppm = PPM
        self.observations = 0

    def observe(self, *, demand: int, supply: int, capacity: int = 1) -> None:
        """Fold one reading of the real signals into the factor."""
        for name, value, least in (("demand", demand, 0), ("supply", supply, 0),
                                   ("capacity", capacity, 1)):
            if type(value) is not int or value < least:
                raise UsageError(f"market {name} must be an integer ≥ {least}, found {value!r}")
        self.demand, self.supply, self.capacity = demand, supply, capacity
        self.demand_ratio_ppm = _clamp(demand * PPM // capacity, DEMAND_RANGE_PPM)
        self.supply_ratio_ppm = _clamp(max(1, supply) * PPM, SUPPLY_RANGE_PPM)
        self.target_ppm = self.demand_ratio_ppm * PPM // self.supply_ratio_ppm
        delta = self.target_ppm - self.factor_ppm
        step = (self.alpha_ppm * delta + PPM // 2) // PPM
        if step == 0 and delta:  # rounding alone would stop a ppm short of the target
            step = 1 if delta > 0 else -1
        self.factor_ppm += step
        self.observations += 1

    def price_ucu(self, params: int) -> int:
        """µCU per completion token for a model of `params` parameters, right now."""
        return max(1, tier_price_ucu(params) * self.factor_ppm // PPM)

    def snapshot(self, params: int | None = None) -> dict[str, Any]:
        """Every input of the price, for `GET /v1/forge/pricing`; with `params`, that model's
        tier, price and the cost of 100 and 1000 completion tokens."""
        out: dict[str, Any] = {
            "unit": "µCU per completion token (1 CU = 1,000,000 µCU); cost = ceil(tokens × price)",
            "tiers": [{"tier": name, "params_below": below, "price_ucu": price}
                      for name, below, price in TIERS],
            "alpha_ppm": self.alpha_ppm,
            "demand": self.demand,
            "capacity": self.capacity,
            "supply": self.supply,
            "demand_ratio_ppm": self.demand_ratio_ppm,
            "supply_ratio_ppm": self.supply_ratio_ppm,
            "demand_range_ppm": list(DEMAND_RANGE_PPM),
            "supply_range_ppm": list(SUPPLY_RANGE_PPM),
            "target_ppm": self.target_ppm,
            "factor_ppm": self.factor_ppm,
            "observations": self.observations,
        }
        if params is not None:
            price = self.price_ucu(params)
            tier, base = tier_of(params)
            out.update(params=params, tier=tier, tier_price_ucu=base, price_ucu=price,
                       estimate_cu={"100": cost_cu(100, price), "1000": cost_cu(1000, price)})
        return out
