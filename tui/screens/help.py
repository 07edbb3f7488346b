"""The `?` screen: every key binding and what the panels show."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """[b]forge tui[/b]: what one node is doing, live.

  1-6          switch tab (overview, trades, prices, loans, safety, peers)
  enter        on a trade: its signatures and inclusion proof
  k            toggle the kill switch (asks first)
  a / d        approve / deny the selected pending spend (safety tab)
  r            refresh now
  ?            this help        q  quit

The header says "verified ✓" when the node's signed checkpoint verifies against its key
and the newest entry's inclusion proof verifies against that checkpoint.
When the node goes away, every panel says "disconnected, retrying" until it is back.

Press escape or ? to close."""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 90; max-width: 98%; height: auto; max-height: 98%;
                            border: thick $accent; background: $surface; padding: 0 1; }
    """
    BINDINGS = [("escape", "dismiss", "Close"), ("question_mark", "dismiss", "Close"),
                ("q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(HELP)
