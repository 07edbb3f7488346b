"""One trade: its terms, both signatures, and its inclusion proof against the node's root."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from forge_cli import display
from tui.widgets.panel import clock


def render_trade(trade: dict[str, Any], proof: dict[str, Any] | None, proof_ok: bool | None) -> str:
    """The trade as markup; every field a seller or buyer chose is escaped."""
    trade = {key: display.markup(value) if isinstance(value, str) else value
             for key, value in trade.items()}
    lines = [f"[b]trade seq {trade['seq']}[/b]  at {clock(trade['ts'])} UTC",
             f"hash      {trade.get('hash', '?')}",
             f"provider  {trade['provider']}", f"consumer  {trade['consumer']}",
             f"model     {trade['model']} ({trade.get('model_sha256', '?')[:16]}…)",
             f"tokens    {trade['prompt_tokens']} prompt + {trade['completion_tokens']} completion",
             f"price     {trade['price_ucu_per_token']:,} µCU/token   cost {trade['cu']} CU",
             f"nonce     {trade.get('nonce', '?')}",
             "", "[b]signatures[/b]",
             f"provider  {trade.get('provider_sig', '?')}",
             f"consumer  {trade.get('consumer_sig', '?')}",
             "", "[b]inclusion proof[/b]"]
    if proof is None:
        lines.append("fetching…" if proof_ok is None else "not available")
    else:
        verdict = "[green]verifies ✓[/]" if proof_ok else "[red]does NOT verify[/]"
        lines += [f"leaf {proof['leaf_hash']}", f"tree size {proof['size']}  root {proof['root']}  {verdict}"]
        lines += [f"  {i}: {h}" for i, h in enumerate(proof["proof"])]
    lines += ["", "escape closes"]
    return "\n".join(lines)


class TradeDetailScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    TradeDetailScreen { align: center middle; }
    TradeDetailScreen > VerticalScroll { width: 100%; max-width: 150; height: 95%;
                                         border: thick $accent; background: $surface; padding: 0 1; }
    """
    BINDINGS = [("escape", "dismiss", "Close"), ("q", "dismiss", "Close")]

    def __init__(self, trade: dict[str, Any], proof: dict[str, Any] | None = None,
                 proof_ok: bool | None = None) -> None:
        super().__init__()
        self.trade = trade
        self.proof, self.proof_ok = proof, proof_ok

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(render_trade(self.trade, self.proof, self.proof_ok), id="trade-detail")

    def show_proof(self, proof: dict[str, Any] | None, ok: bool) -> None:
        self.proof, self.proof_ok = proof, ok
        self.query_one("#trade-detail", Static).update(render_trade(self.trade, proof, ok))
