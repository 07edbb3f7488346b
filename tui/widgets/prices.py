"""Price and demand over time (one sample per poll, on a UTC time axis), and each model's
current quote."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static

from tui.state import Snapshot
from tui.widgets.chart import Series, TimeChart, clock_ticks
from tui.widgets.panel import Panel


class PricesPanel(Panel):
    DEFAULT_CSS = """
    PricesPanel #quotes { height: auto; margin: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static(classes="notice")
        yield Static("no prices yet", id="quotes")
        with Horizontal(id="price-charts"):
            yield TimeChart("price CU/token, UTC", id="price-chart")
            yield TimeChart("demand ratio, UTC", from_zero=True, id="demand-chart")

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
        prices, demand, times = snapshot.price_history, snapshot.demand_history, snapshot.price_times
        if prices:
            lines.append(f"price, µCU/token: now {prices[-1]:,}, low {min(prices):,}, high {max(prices):,}")
        if demand:
            lines.append(f"demand ratio: now {demand[-1] / 1e6:.2f}, high {max(demand) / 1e6:.2f}")
        self.query_one("#quotes", Static).update("\n".join(lines) or "no models served")
        if len(times) != len(prices) or not prices:  # samples from before times were kept
            times = [snapshot.now_ms] * len(prices)
        xs = [(t - snapshot.now_ms) / 1000 for t in times]
        ticks = clock_ticks(times[0], snapshot.now_ms) if times else []
        self.query_one("#price-chart", TimeChart).draw(
            [Series("price", xs, [p / 1e6 for p in prices], "yellow")], ticks)
        self.query_one("#demand-chart", TimeChart).draw(
            [Series("demand", xs[-len(demand):] if demand else [], [d / 1e6 for d in demand], "cyan")],
            ticks)
