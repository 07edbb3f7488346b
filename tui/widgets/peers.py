"""Peers on the mesh: id, models, price, reputation, trust over the trade graph (effective: trust
less the collusion penalty, with the heuristics that fired), audit record, last seen, latency,
flagged peers, and how many of our checkpoints each cosigned as a witness."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from forge_cli import display
from tui.state import Snapshot
from tui.widgets.panel import Panel

NO_MESH = "no peers: the mesh is not running"


class PeersPanel(Panel):
    DEFAULT_CSS = """
    PeersPanel #peers-state { height: auto; margin: 0 1; }
    PeersPanel DataTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Static(classes="notice")
        yield Static(NO_MESH, id="peers-state")
        table: DataTable = DataTable(id="peers-table", cursor_type="row")
        table.add_columns("peer", "models", "price µCU/tok", "rep bp", "trust bp",
                          "collusion", "audits", "last seen",
                          "latency", "flag", "cosigned")
        yield table

    def show(self, snapshot: Snapshot) -> None:
        self.show_connection(snapshot)
        table = self.query_one(DataTable)
        table.clear()
        state = self.query_one("#peers-state", Static)
        if snapshot.peers is None:
            state.update(NO_MESH)
            table.display = False
            return
        count = len(snapshot.peers)
        state.update(f"{count} peers" if count else "the mesh is running; no peers seen")
        table.display = True
        for peer in snapshot.peers:
            seen = peer.get("last_seen_ms")
            ago = "-" if seen is None else f"{max(0, snapshot.now_ms - int(seen)) // 1000}s ago"
            models = peer.get("models", [])
            names = ", ".join(m if isinstance(m, str) else str(m.get("name", "?")) for m in models)
            latency = peer.get("latency_ms")
            # A peer picks its node id and model names: cells hold Text, never markup.
            cells = [str(peer.get("node_id") or "?")[:8], names,
                     _or_dash(peer.get("price_ucu_per_token")), _or_dash(peer.get("reputation")),
                     _or_dash(peer.get("effective_bp")), _collusion(peer), _audits(peer), ago,
                     "-" if latency is None else f"{latency} ms", _flag(peer),
                     _or_dash((peer.get("witness") or {}).get("cosigned") or None)]
            table.add_row(*map(display.text, cells))


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _collusion(peer: dict) -> str:
    """The collusion heuristics that fired for a peer (24 h window), with the penalty."""
    record = peer.get("collusion") or {}
    flags = [str(f).replace("_", " ") for f in record.get("flags") or []]
    return f"{', '.join(flags)} (-{record.get('penalty_bp', 0)})" if flags else "-"


def _audits(peer: dict) -> str:
    """Audits of its sales passed, disputes upheld against it, disputes it forged."""
    record = peer.get("audits") or {}
    passed, disputed, forged = (int(record.get(k) or 0) for k in ("passed", "disputed", "forged"))
    if not passed and not disputed and not forged:
        return "-"
    parts = [f"{passed} ok"] + [f"{n} {what}" for n, what in ((disputed, "disputed"),
                                                              (forged, "forged")) if n]
    return ", ".join(parts)


def _flag(peer: dict) -> str:
    """A short word for why a peer is flagged (duplicate node id, disputes, a forked log, a
    split view on record)."""
    if peer.get("fork_evidence"):
        return "SPLIT VIEW"
    if not peer.get("flagged"):
        return ""
    reason = str(peer.get("flag_reason") or "")
    if reason.startswith("duplicate"):
        return "DUPLICATE ID"
    return "DISPUTED" if reason.startswith("disputes") else "FLAGGED"
