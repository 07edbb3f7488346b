"""The lending pool: size, utilisation, active loans with due times, defaults."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from tui.state import Snapshot
from tui.widgets.panel import Panel, bar, short

NO_POOL = "no lending pool on this node"


class LoansPanel(Panel):
    DEFAULT_CSS = """
    LoansPanel #pool { height: auto; margin: 0 1; }
    LoansPanel DataTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Static(classes="notice")
        yield Static(NO_POOL, id="pool")
        table: DataTable = DataTable(id="loans-table", cursor_type="row")
        table.add_columns("loan", "borrower", "principal", "collateral", "due", "status")
        yield table

    def show(self, snapshot: Snapshot) -> None:
        self.show_connection(snapshot)
        table = self.query_one(DataTable)
        table.clear()
        pool = snapshot.pool
        if pool is None:
            self.query_one("#pool", Static).update(NO_POOL)
            table.display = False
            return
        size = int(pool.get("value", 0))  # cash + lent (forge_cli.economy.lending.pool)
        lent = int(pool.get("lent", 0))
        loans = snapshot.loans or []
        defaults = sum(1 for loan in loans if loan.get("status") == "defaulted")
        self.query_one("#pool", Static).update(
            f"pool {size:,} CU  lent {lent:,} CU  utilisation {bar(lent, size)} "
            f"{(100 * lent // size) if size else 0}%  active "
            f"{sum(1 for loan in loans if loan.get('status') == 'open')}  defaults {defaults}")
        table.display = True
        for loan in loans:
            due = loan.get("due_ms")
            left = "-" if due is None else _due(int(due) - snapshot.now_ms)
            if loan.get("status") != "open":
                left = "-"
            table.add_row(f"#{loan.get('loan_id', '?')}", short(loan.get("account")),
                          str(loan.get("principal", "?")), str(loan.get("collateral", "?")),
                          left, str(loan.get("status", "?")))


def _due(ms: int) -> str:
    if ms < 0:
        return f"overdue {-ms // 3_600_000}h{(-ms // 60_000) % 60:02d}m"
    return f"in {ms // 3_600_000}h{(ms // 60_000) % 60:02d}m"
