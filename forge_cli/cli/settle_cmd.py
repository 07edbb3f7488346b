"""`forge settle`: signed settlement statements, and their offline verification.

With a node running the statement comes from it (FORGE_NODE or FORGE_HOME/node.url); with
none, forge opens the ledger itself and signs with the node key. `forge settle verify FILE`
needs neither: exit 0 valid, 1 it does not verify (each problem named), 2 unreadable.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
import urllib.parse
from pathlib import Path

import typer

from forge_cli import config
from forge_cli.cli.output import print_json
from forge_cli.config import INT_MAX
from forge_cli.errors import CheckFailed, LedgerLocked, UsageError

app = typer.Typer(help="Signed settlement statements for a time window; `verify` checks one "
                  "offline.", invoke_without_command=True)


def _statement(hours: int, price: int) -> dict:
    from forge_cli import identity
    from forge_cli.client import node_url
    from forge_cli.economy import settlement
    from forge_cli.ledger.store import Ledger

    url = node_url()
    if url is None:
        path = config.ledger_path()
        if not path.exists():
            # A statement of nothing would create a ledger (and a node key) as a side effect.
            raise UsageError(f"no ledger at {path} (nothing has been recorded there yet)",
                             hint="start a node with `forge node`, or pass --ledger PATH")
        now = time.time_ns() // 1_000_000
        try:
            with Ledger.open_writer(config.ledger_path(), identity.load_or_create()) as book:
                return settlement.build(book, now - hours * 3_600_000, now + 1, price_msat=price,
                                        now_ms=now)
        except LedgerLocked as exc:
            raise LedgerLocked(str(exc), hint="set FORGE_NODE to the node holding it") from exc
    from forge_cli.client import Client, default_token

    query = urllib.parse.urlencode({"hours": hours, "price": price})
    return Client(url, default_token()).get(f"/v1/forge/settlement?{query}")


@app.callback()
def settle(
    ctx: typer.Context,
    hours: int = typer.Option(24, "--hours", min=1, max=100 * 365 * 24,
                              help="Window: this many hours back from now."),
    out: Path | None = typer.Option(None, "--out", help="Write the statement here (default stdout)."),
    fmt: str = typer.Option("json", "--format", help="json (the signed statement) or csv "
                            "(per-account totals)."),
    price: int = typer.Option(10, "--price", min=0, max=INT_MAX, help="Reference payout, msat per CU."),
) -> None:
    """Per-account earned, spent, net and trade count, with proofs, signed by the node."""
    if ctx.invoked_subcommand is not None:
        return
    if fmt not in ("json", "csv"):
        raise UsageError(f"--format must be json or csv, found {fmt!r}")
    doc = _statement(hours, price)
    if fmt == "json":
        text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        cols = ["account", "earned", "spent", "net", "trades", "payout_msat"]
        writer.writerow(cols)
        for row in doc["accounts"]:
            writer.writerow([row[c] for c in cols])
        text = buf.getvalue()
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"statement of {doc['totals']['trades']} trades written to {out}", err=True)


@app.command()
def verify(file: Path = typer.Argument(..., help="A statement from `forge settle`."),
           as_json: bool = typer.Option(False, "--json", help="Findings as JSON.")) -> None:
    """Check a statement offline: signature, checkpoint, every proof and every total."""
    from forge_cli.economy import settlement

    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file} is not JSON: {exc}") from exc
    problems = settlement.check(doc)
    if as_json:
        print_json({"valid": not problems, "problems": problems})
    if problems:
        for problem in problems:
            sys.stderr.write(f"forge: {problem}\n")
        raise CheckFailed(f"{file}: the statement does not verify ({len(problems)} problem(s))")
    if not as_json:
        typer.echo(f"valid: {len(doc['trades'])} trades, {len(doc['accounts'])} accounts, signed "
                   f"by {doc['node'][:16]}…")
