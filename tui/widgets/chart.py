"""A chart over time, drawn by plotext (textual-plotext): lines or bars, labelled ticks on the
time axis, a title in its border. Panels hand it plain numbers; it never reads a clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from textual.app import RenderResult
from textual_plotext import PlotextPlot

from tui.widgets.panel import clock

MINUTE_MS = 60_000


@dataclass(frozen=True)
class Series:
    label: str                 # shown in the legend when a chart has more than one series
    x: Sequence[float]
    y: Sequence[float]
    color: str = "cyan"


def clock_ticks(start_ms: int, now_ms: int) -> list[tuple[float, str]]:
    """Ticks for an axis of seconds before `now_ms`, labelled with UTC wall-clock times: whole
    minutes (HH:MM) when the span holds a few, else seven even steps (HH:MM:SS)."""
    span = now_ms - start_ms
    if span <= 0:
        return [(0.0, clock(now_ms))]
    if span >= 2 * MINUTE_MS:
        first = -(-start_ms // MINUTE_MS) * MINUTE_MS
        return [((ts - now_ms) / 1000, clock(ts)[:5]) for ts in range(first, now_ms + 1, MINUTE_MS)]
    return [(-(span - span * i / 6) / 1000, clock(start_ms + span * i // 6)) for i in range(7)]


class TimeChart(PlotextPlot):
    DEFAULT_CSS = """
    TimeChart { border: round $panel-lighten-2; border-title-color: $text; padding: 0; }
    """

    def __init__(self, title: str, *, bars: bool = False, from_zero: bool = False,
                 **kwargs: object) -> None:
        """`from_zero`: the y axis starts at 0 (counts and rates), else it fits the data (prices)."""
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.border_title = title
        self.bars = bars
        self.from_zero = from_zero
        self._ticks: list[tuple[float, str]] = []
        self._top = 0.0

    def draw(self, series: Sequence[Series], ticks: Sequence[tuple[float, str]],
             title: str | None = None) -> None:
        """Replace what the chart shows; `ticks` label the time axis (position, text)."""
        if title is not None:
            self.border_title = title
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        for one in series:
            label = one.label if len(series) > 1 else None
            if not one.x:
                continue
            if self.bars:
                plt.bar(list(one.x), list(one.y), color=one.color, label=label, width=0.6)
            else:
                plt.plot(list(one.x), list(one.y), color=one.color, label=label, marker="braille")
        self._top = 0.0
        if self.from_zero:
            self._top = float(max((max(one.y, default=0) for one in series), default=0)) or 1.0
            plt.ylim(0, self._top)
        self._ticks = list(ticks)
        self.refresh()

    def render(self) -> RenderResult:
        # Ticks and y steps are chosen for the size the chart has now, so labels never collide.
        width, height = self.content_size
        if self._ticks:
            longest = max(len(label) for _, label in self._ticks)
            fit = max(2, width // (longest + 4))
            step = -(-len(self._ticks) // fit)  # every step-th tick, counted back from the newest
            chosen = self._ticks[::-1][::step][::-1]
            self.plt.xticks([t[0] for t in chosen], [t[1] for t in chosen])
        steps = max(2, min(5, height // 5))
        if self.from_zero:  # round labels: 0, 21, 42 rather than plotext's 0.0, 23.1, 46.2
            values = [self._top * i / (steps - 1) for i in range(steps)]
            self.plt.yticks(values, [_label(v, self._top) for v in values])
        else:
            self.plt.yfrequency(steps)
        return super().render()


def _label(value: float, top: float) -> str:
    if top >= 10:
        return f"{value:,.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"
