"""Prices: tier by model size, the integer market EMA, and costs that match the ledger's."""

from __future__ import annotations

import pytest

from forge_cli.economy.pricing import Market, cost_cu, tier_price_ucu
from forge_cli.errors import UsageError
from forge_cli.ledger import entries


@pytest.mark.parametrize(("params", "price"), [
    (0, 1_000_000), (270_000_000, 1_000_000), (2_999_999_999, 1_000_000),
    (3_000_000_000, 3_000_000), (13_999_999_999, 3_000_000),
    (14_000_000_000, 8_000_000), (69_999_999_999, 8_000_000),
    (70_000_000_000, 20_000_000), (405_000_000_000, 20_000_000),
])
def test_tier_price_follows_parameter_count_at_the_boundaries(params, price):
    assert tier_price_ucu(params) == price


def test_negative_or_fractional_parameter_count_is_a_usage_error():
    for bad in (-1, 1.5, "7b"):
        with pytest.raises(UsageError):
            tier_price_ucu(bad)  # type: ignore[arg-type]


def test_cost_rounds_up_like_the_ledger_does():
    assert cost_cu(40, 1_000_000) == 40
    assert cost_cu(1, 1) == 1
    assert cost_cu(3, 333_333) == 1
    assert cost_cu(0, 8_000_000) == 0
    for tokens, price in ((7, 1_234_567), (1000, 999_999), (13, 20_000_000)):
        assert cost_cu(tokens, price) == entries.trade_cost(tokens, price)


def test_market_starts_neutral():
    market = Market()
    assert market.factor_ppm == 1_000_000
    assert market.price_ucu(7_000_000_000) == 3_000_000


def test_market_moves_by_alpha_towards_demand_over_supply():
    market = Market()
    market.observe(demand=3, supply=1)  # target 3.0
    assert market.factor_ppm == 1_000_000 + 300_000 * 2
    market.observe(demand=3, supply=1)
    assert market.factor_ppm == 1_600_000 + 420_000
    assert market.price_ucu(1_000_000_000) == 2_020_000


def test_market_converges_to_the_clamped_bounds():
    market = Market()
    for _ in range(100):
        market.observe(demand=50, supply=1)  # demand clamps at 3.0
    assert market.factor_ppm == 3_000_000
    assert market.demand_ratio_ppm == 3_000_000
    for _ in range(100):
        market.observe(demand=0, supply=9)  # demand floor 0.5, supply cap 2.0
    assert market.supply_ratio_ppm == 2_000_000
    assert market.factor_ppm == 250_000
    assert market.price_ucu(100) == 250_000


def test_capacity_spreads_demand_over_parallel_slots():
    market = Market(alpha_ppm=1_000_000)  # α 1: the factor is the last target
    market.observe(demand=2, supply=1, capacity=4)
    assert market.demand_ratio_ppm == 500_000 and market.factor_ppm == 500_000


def test_price_never_falls_below_one_micro_cu():
    market = Market(alpha_ppm=1_000_000)
    market.factor_ppm = 0
    assert market.price_ucu(0) == 1


def test_snapshot_shows_every_input_and_estimates():
    market = Market()
    market.observe(demand=2, supply=3)
    snap = market.snapshot(7_000_000_000)
    assert snap["demand"] == 2 and snap["supply"] == 3
    assert snap["demand_ratio_ppm"] == 2_000_000 and snap["supply_ratio_ppm"] == 2_000_000
    assert snap["alpha_ppm"] == 300_000 and snap["factor_ppm"] == market.factor_ppm
    assert snap["tier"] == "medium" and snap["tier_price_ucu"] == 3_000_000
    assert snap["price_ucu"] == market.price_ucu(7_000_000_000)
    assert snap["estimate_cu"] == {"100": cost_cu(100, snap["price_ucu"]),
                                   "1000": cost_cu(1000, snap["price_ucu"])}
    assert all(type(v) is int for v in snap.values() if not isinstance(v, (str, list, dict)))


def test_market_rejects_bad_signals():
    market = Market()
    for kwargs in ({"demand": -1, "supply": 1}, {"demand": 1, "supply": 1, "capacity": 0},
                   {"demand": 1.5, "supply": 1}):
        with pytest.raises(UsageError):
            market.observe(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Market(alpha_ppm=0)
