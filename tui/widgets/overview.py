"""The Overview tab: the node at a glance (models and where they run, throughput, requests,
earnings, safety, peers, ledger) above charts of tokens/s, CU and price over time."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static

from forge_cli import display
from tui.state import MINUTES, Minute, Snapshot
from tui.widgets.chart import Series, TimeChart, clock_ticks
from tui.widgets.panel import Panel, balance_text


def placement(model: str, activity: dict[str, Any] | None) -> str:
    """Where a model's layers run, as the node reports it; CPU when it reports nothing
    (markup: the model name and layer peers' ids are escaped)."""
    return display.markup(_placement(model, activity))


def _placement(model: str, activity: dict[str, Any] | None) -> str:
    found = next((m for m in (activity or {}).get("models", []) if m.get("model") == model), None)
    if found is None:
        return f"{model}: layers on CPU"
    layers, on_gpu = int(found.get("layers", 0)), int(found.get("gpu_layers", 0))
    device = found.get("device", "CPU")
    split = found.get("split")
    if isinstance(split, dict):  # split across machines: which peer runs which layers
        peers = [f"{str(p.get('peer', '?'))[:8]}… {len(p.get('layers', []))}"
                 + (" lost" if p.get("lost") else "") for p in split.get("peers", [])]
        return (f"{model}: {len(split.get('head', {}).get('layers', []))} layers here, "
                f"peers {', '.join(peers) or 'none'}")
    if device == "GPU":
        return f"{model}: {layers or 'all'} layers on GPU"
    if device == "GPU+CPU":
        return f"{model}: {on_gpu} layers GPU, {layers - on_gpu} CPU"
    return f"{model}: {layers or 'all'} layers on CPU"


class OverviewPanel(Panel):
    DEFAULT_CSS = """
    OverviewPanel .glance { padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static(classes="notice")
        with Horizontal(id="glance"):
            yield Static("", id="glance-node", classes="glance")
            yield Static("", id="glance-safety", classes="glance")
        with Horizontal(id="charts"):
            yield TimeChart(f"tokens/s, {MINUTES} min", bars=True, from_zero=True, id="tps-chart")
            yield TimeChart("CU per minute", from_zero=True, id="cu-chart")
            yield TimeChart("price CU/token", id="price-chart")

    def show(self, snapshot: Snapshot) -> None:
        self.show_connection(snapshot)
        minutes = snapshot.minutes()
        activity = snapshot.activity
        last = minutes[-1]
        models = [m["model"] for m in snapshot.pricing] or list(snapshot.health.get("models", []))
        reply = (activity or {}).get("last_reply")
        speed = (f"{reply['tokens_per_s']:.1f} last reply" if reply else
                 "no reply yet" if activity is not None else "last reply -")
        requests = ("requests: not reported" if activity is None else
                    f"requests {activity.get('in_flight', 0)} in flight, {activity.get('queued', 0)} queued")
        trades = snapshot.network.get("ledger_trades", snapshot.network.get("trades", len(snapshot.trades)))
        node_lines = [
            *(placement(m, activity) for m in models or ["no model"]),
            f"tok/s {last.tokens_per_s:.2f} last min, {speed}",
            requests,
            f"CU last minute: earned {last.earned:,}, spent {last.spent:,}",
            f"balance {balance_text(snapshot.balance)} · trades {trades}",
        ]
        self.query_one("#glance-node", Static).update("\n".join(node_lines))
        self.query_one("#glance-safety", Static).update("\n".join(self._safety_lines(snapshot)))
        self._charts(snapshot, minutes)

    @staticmethod
    def _safety_lines(snapshot: Snapshot) -> list[str]:
        kill = snapshot.safety.get("kill_switch", {})
        breaker = snapshot.safety.get("breaker", {}).get("state", "?")
        kill_text = "[b red]ON[/]" if kill.get("active") else "[green]off[/]"
        breaker_text = f"[b red]{breaker}[/]" if breaker == "open" else breaker
        if not snapshot.online:  # the last known state may have changed since: say so
            kill_text = breaker_text = "[yellow]unknown[/]"
        pending = sum(1 for p in snapshot.pending if p.get("status", "requested") == "requested")
        if snapshot.peers is None:
            peers = "peers: no mesh"
        else:
            flagged = sum(1 for p in snapshot.peers if p.get("flagged"))
            peers = f"peers {len(snapshot.peers)}" + (f", {flagged} flagged" if flagged else "")
        ledger = snapshot.network.get("ledger_size", snapshot.health.get("ledger_size", "-"))
        return [f"kill switch {kill_text} · breaker {breaker_text}",
                f"pending approvals {pending}" + (" (tab 5)" if pending else ""),
                peers,
                f"ledger {ledger} entries · {snapshot.verified or 'not verified yet'}"]

    def _charts(self, snapshot: Snapshot, minutes: list[Minute]) -> None:
        xs = [i - (MINUTES - 1) for i in range(MINUTES)]  # minutes before now; 0 is this one
        minute_ticks = [(x, f"{x}m" if x else "now") for x in xs]
        self.query_one("#tps-chart", TimeChart).draw(
            [Series("tokens/s", xs, [m.tokens_per_s for m in minutes])], minute_ticks)
        self.query_one("#cu-chart", TimeChart).draw(
            [Series("earned", xs, [m.earned for m in minutes], "green"),
             Series("spent", xs, [m.spent for m in minutes], "red")], minute_ticks)
        points = snapshot.sale_prices()
        chart = self.query_one("#price-chart", TimeChart)
        if not points:
            chart.draw([], [], title="price: no sales yet")
            return
        if snapshot.pricing:  # the line runs on to the quote a request arriving now would get
            points.append((snapshot.now_ms, int(snapshot.pricing[0]["price_ucu_per_token"])))
        chart.draw([Series("price", [(ts - snapshot.now_ms) / 1000 for ts, _ in points],
                           [price / 1e6 for _, price in points], "yellow")],
                   clock_ticks(points[0][0], snapshot.now_ms), title="price CU/token, UTC")
