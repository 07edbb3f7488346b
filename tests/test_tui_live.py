"""`forge tui` against a real node on loopback (Pilot): trades, kill switch, approvals, reconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.node_harness import NodeProcess
from tui.app import ForgeApp
from tui.widgets.node_header import NodeHeader
from tui.widgets.overview import OverviewPanel
from tui.widgets.safety import SafetyPanel
from tui.widgets.trades import TradesPanel

WAIT_S = 30
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def wait_for(pilot, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.05)


@pytest.fixture
def node(forge_home, tiny_gguf):
    with NodeProcess(forge_home, tiny_gguf) as running:
        yield running


def header_text(app: ForgeApp) -> str:
    return str(app.query_one(NodeHeader).render())


async def test_trades_appear_in_the_table_newest_first(node):
    agent = node.agent("alice")
    app = ForgeApp(node.url, node.operator_token, poll_s=5)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.snapshot.online, "the first poll")
        panel = app.query_one(TradesPanel)
        assert panel.rows == []
        for _ in range(3):
            status, _, body = await asyncio.to_thread(node.request, "POST", "/v1/chat/completions",
                                                      CHAT, agent["token"])
            assert status == 200, body
        # poll_s is 5 s: the SSE feed, not the poller, brings them in
        await wait_for(pilot, lambda: len(panel.rows) == 3, "three trades in the table")
        assert [t["seq"] for t in panel.rows] == sorted((t["seq"] for t in panel.rows), reverse=True)
        assert all(t["consumer"] == agent["account"] for t in panel.rows)
        await wait_for(pilot, lambda: "verified ✓" in header_text(app), "verified ✓ in the header")
        # Enter on the newest trade, straight after switching to the tab (no Tab to focus the
        # table first): its signatures and a verifying inclusion proof
        await pilot.press("2")
        await pilot.press("enter")
        await wait_for(pilot, lambda: getattr(app.screen, "proof_ok", None) is True, "the inclusion proof")
        detail = str(app.screen.query_one("#trade-detail").render())
        assert panel.rows[0]["provider_sig"][:32] in detail and "verifies ✓" in detail
        await pilot.press("escape")


def glance(app: ForgeApp) -> str:
    return str(app.query_one("#glance-node").render())


def glance_safety(app: ForgeApp) -> str:
    return str(app.query_one("#glance-safety").render())


async def test_a_purchase_moves_the_overview(node):
    """The Overview opens first; one purchase moves tokens/s, CU earned and the trade count,
    brought in by the SSE feed (the poller alone would wait 30 s)."""
    agent = node.agent("carol")
    app = ForgeApp(node.url, node.operator_token, poll_s=30)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.snapshot.online, "the first poll")
        assert app.query_one("TabbedContent").active == "overview"
        before = glance(app)
        assert "tok/s 0.00 last min, no reply yet" in before, before
        assert "earned 0, spent 0" in before and "trades 0" in before, before
        assert "requests 0 in flight, 0 queued" in before, before
        status, _, body = await asyncio.to_thread(
            node.request, "POST", "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}, agent["token"])
        assert status == 200, body
        cu, tokens = body["x_forge"]["cu_cost"], body["usage"]["completion_tokens"]
        assert cu > 0 and tokens > 0
        await wait_for(pilot, lambda: "trades 1" in glance(app), "the trade count to move")
        # The request ends after its trade is recorded: its `activity` event brings the reply.
        await wait_for(pilot, lambda: "last reply" in glance(app), "the finished request")
        after = glance(app)
        assert f"tok/s {tokens / 60:.2f} last min" in after and "tok/s 0.00" not in after, after
        assert f"earned {cu}, spent 0" in after, after
        assert "last reply" in after and "no reply yet" not in after, after
        # the node reports where the model's layers run, and the panel says so
        _, _, activity = await asyncio.to_thread(node.request, "GET", "/v1/forge/activity", None,
                                                 node.operator_token)
        placement = activity["models"][0]
        assert placement["device"] in ("CPU", "GPU", "GPU+CPU") and placement["layers"] > 0
        assert placement["model"] in after and placement["device"].split("+")[0] in after, after
        assert activity["in_flight"] == 0 and activity["last_reply"]["completion_tokens"] == tokens
        overview = app.query_one(OverviewPanel)
        assert overview.query_one("#price-chart").border_title == "price CU/token, UTC"


async def test_kill_switch_round_trips_through_the_confirmation(node):
    app = ForgeApp(node.url, node.operator_token, poll_s=5)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.snapshot.online, "the first poll")
        await pilot.press("k")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", "the confirmation")
        await pilot.press("n")  # cancelling changes nothing
        await wait_for(pilot, lambda: type(app.screen).__name__ != "ConfirmScreen", "the modal to close")
        assert node.request("GET", "/v1/forge/safety", token=node.operator_token)[2]["kill_switch"][
            "active"] is False
        await pilot.press("k")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", "the confirmation")
        await pilot.press("y")
        safety = app.query_one(SafetyPanel)
        await wait_for(pilot, lambda: safety.kill_active, "the panel to show the switch on")
        _, _, status = await asyncio.to_thread(node.request, "GET", "/v1/forge/safety", None,
                                               node.operator_token)
        assert status["kill_switch"]["active"] is True and status["kill_switch"]["reason"]
        await pilot.press("k", "y")
        await wait_for(pilot, lambda: not safety.kill_active, "the panel to show the switch off")
        _, _, status = await asyncio.to_thread(node.request, "GET", "/v1/forge/safety", None,
                                               node.operator_token)
        assert status["kill_switch"]["active"] is False


async def test_a_approves_the_selected_pending_spend(node):
    agent = node.agent("bob")
    status, _, _ = node.request("POST", "/v1/forge/policy", token=node.operator_token, body={
        "account": agent["account"], "approval_threshold_cu": 1, "per_request_cap_cu": 500})
    assert status == 200
    app = ForgeApp(node.url, node.operator_token, poll_s=5)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.snapshot.online, "the first poll")
        status, _, body = await asyncio.to_thread(
            node.request, "POST", "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}, agent["token"])
        assert status == 202, body
        approval = body["error"]["approval_id"]
        app.action_tab("safety")
        safety = app.query_one(SafetyPanel)
        await wait_for(pilot, lambda: safety.selected_approval == approval, "the pending approval")
        await pilot.press("a")
        await wait_for(pilot, lambda: safety.selected_approval is None, "the approval to leave the table")
        _, _, pending = await asyncio.to_thread(node.request, "GET", "/v1/forge/approvals", None,
                                                node.operator_token)
        assert all(p["id"] != approval or p["status"] == "approved" for p in pending["pending"])
        # the approved spend now goes through
        status, _, body = await asyncio.to_thread(
            node.request, "POST", "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}, agent["token"])
        assert status == 200, body


async def test_disconnect_shows_retrying_and_recovers_when_the_node_returns(forge_home, tiny_gguf):
    first = NodeProcess(forge_home, tiny_gguf)
    port = first.url.rsplit(":", 1)[1]
    second = None
    try:
        app = ForgeApp(first.url, first.operator_token, poll_s=0.3)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.snapshot.online, "the first poll")
            await asyncio.to_thread(first.stop)
            await wait_for(pilot, lambda: app.snapshot.connection == "disconnected, retrying",
                           "disconnected, retrying")
            assert "disconnected, retrying" in header_text(app)
            notice = app.query_one(TradesPanel).notice()
            shown = str(notice.render())
            assert "disconnected, retrying" in shown and notice.has_class("shown")
            # one line of its own, not the transport's text
            assert f"no node answers at {first.url}" in shown
            assert "Cannot connect" not in shown and "Errno" not in shown
            # what was "off" a moment ago is not known while disconnected
            switches = str(app.query_one(SafetyPanel).query_one("#switches").render())
            assert "kill switch unknown " in switches and "breaker unknown " in switches
            assert "kill switch unknown · breaker unknown" in glance_safety(app)
            second = await asyncio.to_thread(NodeProcess, forge_home, tiny_gguf, "--port", port)
            await wait_for(pilot, lambda: app.snapshot.online, "the reconnect")
            assert not app.query_one(TradesPanel).notice().has_class("shown")
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_wrong_token_is_a_clear_message_not_a_crash(node):
    app = ForgeApp(node.url, "not-a-token", poll_s=0.5)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.snapshot.connection == "token refused", "token refused")
        text = header_text(app)
        assert "token refused" in text and "FORGE_TOKEN" in text
        await pilot.press("k", "y")  # an action with a bad token is a notification, not a crash
        await pilot.pause(0.3)
        assert app.is_running
