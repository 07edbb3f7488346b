"""Safety: kill switch, breaker, per-account budget bars, pending approvals (a approves, d denies)."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from forge_cli import display
from tui.state import Snapshot
from tui.widgets.panel import Panel, bar, clock, short


class SafetyPanel(Panel):
    DEFAULT_CSS = """
    SafetyPanel #switches { height: auto; margin: 0 1; }
    SafetyPanel #budgets { height: auto; margin: 0 1; }
    SafetyPanel #pending-title { margin: 1 1 0 1; text-style: bold; }
    SafetyPanel DataTable { height: 1fr; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pending: list[dict[str, Any]] = []
        self.kill_active = False

    def compose(self) -> ComposeResult:
        yield Static(classes="notice")
        yield Static("", id="switches")
        yield Static("", id="budgets")
        yield Static("pending approvals: none", id="pending-title")
        table: DataTable = DataTable(id="pending-table", cursor_type="row")
        table.add_columns("approval", "account", "CU", "expires")
        yield table

    def show(self, snapshot: Snapshot) -> None:
        live = self.show_connection(snapshot)
        safety = snapshot.safety
        kill = safety.get("kill_switch", {})
        breaker = safety.get("breaker", {})
        self.kill_active = bool(kill.get("active"))
        kill_text = (f"[b red]ACTIVE[/] ({display.markup(kill.get('reason') or 'no reason')})"
                     if self.kill_active else "[green]off[/]")
        breaker_state = display.markup(str(breaker.get("state", "?")))
        if not live:  # disconnected: the last known states may no longer hold
            kill_text = breaker_state = "[yellow]unknown[/]"
            if self.kill_active:
                kill_text += " (last seen [b red]ACTIVE[/])"
        policy = safety.get("policy", {})
        self.query_one("#switches", Static).update(
            f"kill switch {kill_text}   breaker {breaker_state} "
            f"(errors {breaker.get('consecutive_errors', 0)}/{breaker.get('max_consecutive_errors', '?')}, "
            f"spends/min {breaker.get('spends_last_minute', 0)}/"
            f"{breaker.get('max_spends_per_minute', '?')})\n"
            f"default policy: cap {policy.get('per_request_cap_cu', '?')} CU, hourly "
            f"{policy.get('hourly_budget_cu', '?')}, lifetime {policy.get('lifetime_budget_cu', '?')}, "
            f"approval above {policy.get('approval_threshold_cu', '?')}")
        lines = [f"{short(b['account'])} hour {bar(b['spent_last_hour_cu'], b['hourly_budget_cu'], 16)} "
                 f"{b['spent_last_hour_cu']}/{b['hourly_budget_cu']}  life "
                 f"{bar(b['spent_lifetime_cu'], b['lifetime_budget_cu'], 16)} "
                 f"{b['spent_lifetime_cu']}/{b['lifetime_budget_cu']} CU" for b in snapshot.budgets]
        self.query_one("#budgets", Static).update("\n".join(lines) or "no per-account policies")
        pending = [p for p in snapshot.pending if p.get("status", "requested") == "requested"]
        ids = [p["id"] for p in pending]
        self.query_one("#pending-title", Static).update(
            f"pending approvals: {len(pending)} (a approve, d deny)" if pending
            else "pending approvals: none")
        if ids == [p["id"] for p in self._pending]:
            return
        self._pending = pending
        table = self.query_one(DataTable)
        table.clear()
        for p in pending:
            table.add_row(p["id"], short(p["account"]), str(p["cu"]), clock(p["expires_ms"]), key=p["id"])

    @property
    def selected_approval(self) -> str | None:
        """The approval under the cursor (or the only one), None when there is none."""
        table = self.query_one(DataTable)
        if not self._pending:
            return None
        row = table.cursor_row if 0 <= table.cursor_row < len(self._pending) else 0
        return self._pending[row]["id"]
