"""The header: node id, model, balance, reputation, price, ledger size and root, verify state."""

from __future__ import annotations

from textual.widgets import Static

from forge_cli import display
from tui.state import Snapshot
from tui.widgets.panel import balance_text


class NodeHeader(Static):
    DEFAULT_CSS = """
    NodeHeader { height: auto; background: $panel; padding: 0 1; }
    NodeHeader.offline { background: $error 30%; }
    """

    def show(self, snapshot: Snapshot) -> None:
        self.set_class(not snapshot.online, "offline")
        net, bal = snapshot.network, snapshot.balance
        models = ", ".join(m["model"] for m in snapshot.pricing) or ", ".join(
            snapshot.health.get("models", [])) or "-"
        price = "-"
        if snapshot.pricing:
            price = f"{snapshot.pricing[0]['price_ucu_per_token'] / 1e6:.4f} CU/tok"
        state = snapshot.connection if not snapshot.message else f"{snapshot.connection}: {snapshot.message}"
        node = net.get("node_id", snapshot.health.get("node_id", "?"))[:12]
        state, models, node = display.markup(state), display.markup(models), display.markup(node)
        root = net.get("merkle_root", "")
        self.update(
            f"[b]forge[/b] node {node}  "
            f"model {models}  price {price}\n"
            f"balance {balance_text(bal)}  avail {bal.get('available', '-')}  "
            f"rep {bal.get('reputation', '-')} bp  ledger {net.get('ledger_size', '-')} "
            f"root {root[:12] or '-'}  {snapshot.verified}\n"
            f"{state}"
        )
