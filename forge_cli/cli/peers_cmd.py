"""`forge peers`: the mesh's peer table, as the running node sees it.

Every cell is a peer's own words (its node id, model names) or quotes them (a flag reason), so
each goes through `display.plain`: an escape sequence in a model name is shown, not obeyed.
"""

from __future__ import annotations

import time
from typing import Any

import typer

from forge_cli import display
from forge_cli.cli.output import print_json


def _ago(ms: int | None, now_ms: int) -> str:
    return "-" if ms is None else f"{max(0, now_ms - ms) // 1000}s ago"


def _row(peer: dict[str, Any], now_ms: int) -> list[str]:
    models = ", ".join(f"{m['name']} ({m['sha256'][:8]})" if m.get("sha256") else m["name"]
                       for m in peer["models"])
    price = peer["price_ucu_per_token"]
    latency = peer["latency_ms"]
    cells = [(peer["node_id"] or "?")[:16], peer["url"], models or "-",
             "-" if price is None else f"{price:,}",
             "-" if peer["reputation"] is None else str(peer["reputation"]),
             _ago(peer["last_seen_ms"], now_ms), "-" if latency is None else f"{latency} ms",
             str((peer.get("witness") or {}).get("cosigned") or "-"),
             peer["source"] + ("  FLAGGED: " + peer["flag_reason"] if peer["flagged"] else "")
             + (f"  FORK EVIDENCE: {peer['fork_evidence']}" if peer.get("fork_evidence") else "")]
    return [display.plain(cell) for cell in cells]


def peers(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
    node: str | None = typer.Option(None, "--node",
                                    help="Node URL (default: FORGE_NODE or FORGE_HOME/node.url)."),
    token: str | None = typer.Option(None, "--token",
                                     help="API token (default: FORGE_TOKEN or the operator's)."),
) -> None:
    """Peers the running node found on the mesh (it must run with --mesh or be a seed).

    Shows id, url, models, price (µCU/token), reputation (basis points), last seen, latency,
    how many of this node's checkpoints it cosigned as a witness, and any split view of its
    log on record (FORK EVIDENCE), for each peer that answered its /health probe.
    """
    from forge_cli.client import running_node

    table = running_node(node, token, "`forge peers` asks the node that runs the mesh").get(
        "/v1/forge/peers")["peers"]
    if as_json:
        print_json(table)
        return
    if not table:
        typer.echo("no peers yet (the mesh is running)")
        return
    header = ["node id", "url", "models", "µCU/tok", "rep bp", "last seen", "latency", "cosigned",
              "source"]
    now_ms = time.time_ns() // 1_000_000
    rows = [header, *(_row(p, now_ms) for p in table)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
