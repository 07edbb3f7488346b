"""`forge tui`: a live dashboard of one node, fed by its SSE events with polling as a fallback.

Network work happens in async workers on the app's own loop, so every widget update happens
on the app's thread. Panels are plain views of a `Snapshot` (tui.state), which is also how
the snapshot tests feed them recorded data.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, TabbedContent, TabPane

from forge_cli import display
from forge_cli.client import AsyncClient
from forge_cli.errors import ForgeError, NodeUnreachable, TokenRefused
from tui.screens.confirm import ConfirmScreen
from tui.screens.help import HelpScreen
from tui.screens.trade_detail import TradeDetailScreen
from tui.state import Snapshot, fetch, verify
from tui.widgets.loans import LoansPanel
from tui.widgets.node_header import NodeHeader
from tui.widgets.overview import OverviewPanel
from tui.widgets.peers import PeersPanel
from tui.widgets.prices import PricesPanel
from tui.widgets.safety import SafetyPanel
from tui.widgets.trades import TradesPanel

TABS = ("overview", "trades", "prices", "loans", "safety", "peers")
VERIFY_EVERY = 5  # polls between two checkpoint verifications
RETRY_S = 1.0


class ForgeApp(App[None]):
    CSS_PATH = Path(__file__).with_name("forge.tcss")
    TITLE = "forge"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("k", "kill", "Kill switch"),
        Binding("a", "approve", "Approve"),
        Binding("d", "deny", "Deny"),
        Binding("r", "refresh", "Refresh"),
        *[Binding(str(i + 1), f"tab('{name}')", name.title(), show=False) for i, name in enumerate(TABS)],
    ]

    def __init__(self, url: str, token: str | None, poll_s: float = 2.0, *, live: bool = True,
                 snapshot: Snapshot | None = None, clock: Callable[[], int] | None = None) -> None:
        super().__init__()
        self.client = AsyncClient(url, token)
        self.poll_s = poll_s
        self.live = live
        self.snapshot = snapshot or Snapshot(message=f"connecting to {self.client.url}")
        self.clock = clock or (lambda: int(time.time() * 1000))
        self._wake = asyncio.Event()
        self._polls = 0

    def compose(self) -> ComposeResult:
        yield NodeHeader(id="header")
        with TabbedContent(initial="overview"):
            with TabPane("1 Overview", id="overview"):
                yield OverviewPanel(id="overview-panel")
            with TabPane("2 Trades", id="trades"):
                yield TradesPanel(id="trades-panel")
            with TabPane("3 Prices", id="prices"):
                yield PricesPanel(id="prices-panel")
            with TabPane("4 Loans", id="loans"):
                yield LoansPanel(id="loans-panel")
            with TabPane("5 Safety", id="safety"):
                yield SafetyPanel(id="safety-panel")
            with TabPane("6 Peers", id="peers"):
                yield PeersPanel(id="peers-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.apply(self.snapshot)
        if self.live:
            self.poll_loop()
            self.event_loop()

    async def action_quit(self) -> None:
        """Stop the network workers before the screens go, so none updates a screen that is
        being taken down."""
        self.workers.cancel_group(self, "poll")
        self.workers.cancel_group(self, "events")
        self.exit()

    async def on_unmount(self) -> None:
        self.workers.cancel_all()
        await self.client.close()

    # --- data ---------------------------------------------------------------------------------

    def apply(self, snapshot: Snapshot) -> None:
        """Show a snapshot in the header and every panel (whatever screen is on top)."""
        self.snapshot = snapshot
        if not self.screen_stack:  # the app is shutting down: its screens are gone
            return
        try:
            self.main.query_one(NodeHeader).show(snapshot)
            for panel in (OverviewPanel, TradesPanel, PricesPanel, LoansPanel, SafetyPanel, PeersPanel):
                self.main.query_one(panel).show(snapshot)
        except NoMatches:  # the app is shutting down
            pass

    @property
    def main(self) -> Screen:
        """The dashboard's own screen, also while a modal is on top of it."""
        return self.screen_stack[0] if self.screen_stack else self.screen

    def _offline(self, connection: str, message: str) -> None:
        old = self.snapshot
        self.apply(Snapshot(**{**old.__dict__, "connection": connection, "message": message,
                               "now_ms": self.clock()}))

    @work(exclusive=True, group="poll")
    async def poll_loop(self) -> None:
        while True:
            # Cleared before the fetch, not after: an event that lands while a fetch is under
            # way (which may have read the node just before it) must bring another fetch.
            self._wake.clear()
            try:
                snapshot = await fetch(self.client, self.snapshot, self.clock())
                if self._polls % VERIFY_EVERY == 0 or not self.snapshot.verified:
                    snapshot.verified = await verify(self.client, snapshot.network)
                self._polls += 1
                self.apply(snapshot)
            except NodeUnreachable:  # the transport's own words say nothing more to a person
                self._offline("disconnected, retrying",
                              f"no node answers at {self.client.url}; retrying every "
                              f"{self.poll_s:g} s")
            except TokenRefused as exc:
                self._offline("token refused", f"{exc} (pass --token, set FORGE_TOKEN, or use the "
                              "operator token in FORGE_HOME/api_token)")
            except ForgeError as exc:
                self._offline("node error", str(exc))
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass

    @work(exclusive=True, group="events")
    async def event_loop(self) -> None:
        """Wake the poller on every ledger entry, safety change or finished request; reconnect
        when the stream ends."""
        while True:
            try:
                async for event in self.client.stream("/v1/forge/events", until_done=False):
                    if event.name in ("entry", "safety", "activity", "hello"):
                        self._wake.set()
            except ForgeError:
                pass
            self._wake.set()
            await asyncio.sleep(RETRY_S)

    # --- actions ------------------------------------------------------------------------------

    def action_tab(self, name: str) -> None:
        self.main.query_one(TabbedContent).active = name

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        """A tab's table takes the focus, so Enter acts on its selected row at once."""
        if event.pane.id == "trades":
            self.main.query_one(TradesPanel).query_one(DataTable).focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_refresh(self) -> None:
        self._wake.set()

    def action_kill(self) -> None:
        active = self.main.query_one(SafetyPanel).kill_active
        question = ("Resume spending? The kill switch is ACTIVE; every spend is refused until it is off."
                    if active else "Activate the kill switch? Every spend on this node will be refused.")

        def decided(yes: bool | None) -> None:
            if yes:
                self._set_kill(not active)

        self.push_screen(ConfirmScreen(question), decided)

    @work(group="actions")
    async def _set_kill(self, activate: bool) -> None:
        body: dict[str, Any] = {"activate": activate,
                                "reason": "from forge tui" if activate else "resumed from forge tui"}
        await self._post("/v1/forge/kill", body, "kill switch " + ("on" if activate else "off"))

    def action_approve(self) -> None:
        self._decide(deny=False)

    def action_deny(self) -> None:
        self._decide(deny=True)

    def _decide(self, deny: bool) -> None:
        approval = self.main.query_one(SafetyPanel).selected_approval
        if approval is None:
            self.notify("no pending approval to decide", severity="warning")
            return
        self._post_decision(approval, deny)

    @work(group="actions")
    async def _post_decision(self, approval: str, deny: bool) -> None:
        await self._post("/v1/forge/approve", {"id": approval, "deny": deny},
                         f"{approval} {'denied' if deny else 'approved'}")

    async def _post(self, path: str, body: dict[str, Any], done: str) -> None:
        try:
            await self.client.post(path, body)
        except ForgeError as exc:
            self.notify(display.plain(exc, lines=True), severity="error", timeout=8, markup=False)
            return
        self.notify(done)
        self._wake.set()

    def on_trades_panel_selected(self, message: TradesPanel.Selected) -> None:
        screen = TradeDetailScreen(message.trade)
        self.push_screen(screen)
        if self.live:
            self._load_proof(screen, message.trade)

    @work(group="actions")
    async def _load_proof(self, screen: TradeDetailScreen, trade: dict[str, Any]) -> None:
        from forge_cli.ledger import merkle

        try:
            proof = await self.client.get_optional(f"/v1/forge/ledger/proof/{trade['seq']}")
        except ForgeError as exc:
            self.notify(display.plain(exc, lines=True), severity="error", markup=False)
            return
        ok = proof is not None and proof["leaf_hash"] == trade.get("hash") and merkle.verify_inclusion(
            bytes.fromhex(proof["leaf_hash"]), trade["seq"], proof["size"],
            [bytes.fromhex(h) for h in proof["proof"]], bytes.fromhex(proof["root"]))
        if screen.is_attached:
            screen.show_proof(proof, bool(ok))
