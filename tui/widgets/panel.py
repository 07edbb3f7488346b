"""The base of every tab: a notice line (connection trouble, empty states) above the content."""

from __future__ import annotations

import time
from typing import Any

from textual.containers import Vertical
from textual.widgets import Static

from forge_cli import display
from tui.state import Snapshot


def short(account: str | None, n: int = 8) -> str:
    """The first `n` characters of an account, escaped for markup (a cell or a Static)."""
    return display.markup(str(account or "?")[:n])


def clock(ts_ms: int) -> str:
    """UTC wall-clock time of a ledger timestamp (UTC so recorded snapshots render the same anywhere)."""
    return time.strftime("%H:%M:%S", time.gmtime(ts_ms / 1000))


def bar(used: int, total: int, width: int = 20) -> str:
    if total <= 0:
        return "░" * width
    filled = min(width, round(width * used / total))
    return "█" * filled + "░" * (width - filled)


def balance_text(balance: dict[str, Any]) -> str:
    """`63 CU`, or `0 CU (+1000 CU free tier on first purchase)` while the grant is waiting."""
    text = f"{balance.get('balance', '-')} CU"
    pending = balance.get("free_tier_pending")
    if isinstance(pending, int) and pending > 0:
        text += f" (+{pending} CU free tier on first purchase)"
    return text


class Panel(Vertical):
    DEFAULT_CSS = """
    Panel { height: 1fr; }
    Panel > .notice { color: $warning; height: auto; display: none; }
    Panel > .notice.shown { display: block; }
    """

    def show(self, snapshot: Snapshot) -> None:
        """Show `snapshot`; each panel draws its own part of it."""
        raise NotImplementedError

    def notice(self) -> Static:
        return self.query_one(".notice", Static)

    def show_connection(self, snapshot: Snapshot) -> bool:
        """Show the connection notice when offline; True when the data can be trusted as live."""
        box = self.notice()
        if snapshot.online:
            box.remove_class("shown")
            return True
        # The message quotes the node, and the node may quote what a peer or stranger sent.
        box.update(display.text(f"{snapshot.connection}: {snapshot.message}" if snapshot.message
                                else snapshot.connection))
        box.add_class("shown")
        return False
