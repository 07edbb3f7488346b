"""Live trades, newest first; Enter opens a trade's signatures and inclusion proof."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.message import Message
from textual.widgets import DataTable, Static

from forge_cli import display
from tui.state import Snapshot
from tui.widgets.panel import Panel, clock, short


class TradesPanel(Panel):
    DEFAULT_CSS = """
    TradesPanel DataTable { height: 1fr; }
    """

    class Selected(Message):
        """The user asked for a trade's detail."""

        def __init__(self, trade: dict[str, Any]) -> None:
            super().__init__()
            self.trade = trade

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._trades: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        yield Static(classes="notice")
        yield Static("no trades yet", id="trades-empty")
        table: DataTable = DataTable(id="trades-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("time", "seq", "provider", "consumer", "model", "tokens", "CU")
        yield table

    def show(self, snapshot: Snapshot) -> None:
        self.show_connection(snapshot)
        table = self.query_one(DataTable)
        keys = [str(t["seq"]) for t in snapshot.trades]
        if keys == list(self._trades):
            return
        cursor = table.cursor_row
        table.clear()
        self._trades = {}
        for trade in snapshot.trades:  # the node lists them newest first
            key = str(trade["seq"])
            self._trades[key] = trade
            table.add_row(clock(trade["ts"]), key, short(trade["provider"]), short(trade["consumer"]),
                          display.text(trade["model"]),
                          f"{trade['prompt_tokens']}+{trade['completion_tokens']}",
                          str(trade["cu"]), key=key)
        self.query_one("#trades-empty", Static).display = not snapshot.trades
        if snapshot.trades:
            table.move_cursor(row=min(cursor, len(snapshot.trades) - 1))

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self._trades.values())

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        trade = self._trades.get(str(event.row_key.value))
        if trade is not None:
            self.post_message(self.Selected(trade))
