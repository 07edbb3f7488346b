"""Price and demand over time (one sample per poll), and each model's current quote."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Label, Sparkline, Static

from tui.state import Snapshot
from tui.widgets.panel import Panel


class PricesPanel(Panel):
    DEFAULT_CSS = """
    PricesPanel Sparkline { height: 1fr; min-height: 2; margin: 0 1; }
    PricesPanel #price-spark > .sparkline--max-color { color: $success; }
    PricesPanel Label { margin: 0 1; color: $text-muted; }
    PricesPanel #quotes { height: auto; margin: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static(classes="notice")
        yield Static("no prices yet", id="quotes")
        yield Label("price, µCU per token", id="price-label")
        yield Sparkline([], id="price-spark")
        yield Label("demand (queued + running ÷ capacity), ppm", id="demand-label")
        yield Sparkline([], id="demand-spark")

    def show(self, snapshot: Snapshot) -> None:
        self.show_connection(snapshot)
        lines = []
        for model in snapshot.pricing:
            market = model.get("market", {})
            lines.append(
                f"{model['model']}: {model['price_ucu_per_token']:,} µCU/token "
                f"(tier {market.get('tier', '?')}, factor {market.get('factor_ppm', 0) / 1e6:.3f}, "
                f"demand {market.get('demand', '?')}/{market.get('capacity', '?')}, "
                f"supply {market.get('supply', '?')})")
        self.query_one("#quotes", Static).update("\n".join(lines) or "no models served")
        prices, demand = snapshot.price_history, snapshot.demand_history
        self.query_one("#price-spark", Sparkline).data = prices
        self.query_one("#demand-spark", Sparkline).data = demand
        if prices:
            self.query_one("#price-label", Label).update(
                f"price, µCU per token: now {prices[-1]:,}, low {min(prices):,}, high {max(prices):,}")
        if demand:
            self.query_one("#demand-label", Label).update(
                f"demand ratio, ppm: now {demand[-1]:,}, high {max(demand):,}")
