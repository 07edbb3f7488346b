"""SVG snapshots of every panel at 80×24 and 160×48, from recorded data (no live node, fixed clock)."""

from __future__ import annotations

import pytest

from tests.tui_data import LOANS, NODE, NOW_MS, PEERS, POOL, recorded
from tui.app import TABS, ForgeApp
from tui.screens.trade_detail import TradeDetailScreen

SIZES = [(80, 24), (160, 48)]


def app_for(snapshot) -> ForgeApp:
    return ForgeApp("http://127.0.0.1:9", "recorded", live=False, snapshot=snapshot, clock=lambda: NOW_MS)


def on_tab(name: str):
    async def run_before(pilot) -> None:
        pilot.app.action_tab(name)
        await pilot.pause()
    return run_before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tab", TABS)
def test_panel_with_recorded_data(snap_compare, tab, size):
    assert snap_compare(app_for(recorded()), terminal_size=size, run_before=on_tab(tab))


@pytest.mark.parametrize("tab", ["loans", "peers"])
def test_loans_and_peers_fill_in_when_the_node_has_them(snap_compare, tab):
    snapshot = recorded(pool=POOL, loans=LOANS, peers=PEERS)
    assert snap_compare(app_for(snapshot), terminal_size=(80, 24), run_before=on_tab(tab))


def test_overview_before_the_first_purchase(snap_compare):
    """A fresh node: no sales, the free tier waiting, a model split between GPU and CPU, the
    kill switch on and the breaker open, an empty mesh."""
    snapshot = recorded(
        trades=[], price_history=[], demand_history=[], price_times=[], pending=[], peers=[],
        balance={"account": NODE, "balance": 0, "reserved": 0, "available": 0, "reputation": 5000,
                 "free_tier_pending": 1000},
        network={**recorded().network, "ledger_size": 3, "ledger_trades": 0, "trades": 0},
        activity={"uptime_ms": 9_000, "in_flight": 0, "queued": 0, "last_reply": None,
                  "models": [{"model": "tiny.gguf", "device": "GPU+CPU", "layers": 30, "gpu_layers": 12}]},
        safety={**recorded().safety, "kill_switch": {"active": True, "reason": "drill", "seq": 2},
                "breaker": {**recorded().safety["breaker"], "state": "open"}})
    assert snap_compare(app_for(snapshot), terminal_size=(80, 24))


def test_overview_of_a_node_that_reports_no_activity(snap_compare):
    """An older node without GET /v1/forge/activity: layers read as CPU, requests as unknown."""
    assert snap_compare(app_for(recorded(activity=None, peers=PEERS)), terminal_size=(80, 24))


def test_kill_switch_active_and_disconnected(snap_compare):
    """Disconnected: the switches are unknown, with the kill switch last seen active."""
    snapshot = recorded(connection="disconnected, retrying",
                        message="no node answers at http://127.0.0.1:3001 (ClientConnectorError)",
                        safety={**recorded().safety,
                                "kill_switch": {"active": True, "reason": "from forge tui", "seq": 17}})
    assert snap_compare(app_for(snapshot), terminal_size=(80, 24), run_before=on_tab("safety"))


def test_help_screen(snap_compare):
    async def run_before(pilot) -> None:
        await pilot.press("question_mark")
    assert snap_compare(app_for(recorded()), terminal_size=(80, 24), run_before=run_before)


def test_trade_detail_with_its_proof(snap_compare):
    snapshot = recorded()
    trade = snapshot.trades[0]
    proof = {"seq": trade["seq"], "size": 17, "leaf_hash": trade["hash"], "root": "c560918c19bfc60d" * 4,
             "proof": ["d1b38519cce7a0b8" * 4, "aab77ca396f89378" * 4]}

    async def run_before(pilot) -> None:
        await pilot.app.push_screen(TradeDetailScreen(trade, proof, True))
    assert snap_compare(app_for(snapshot), terminal_size=(160, 48), run_before=run_before)
