"""`forge audit`: audits of purchases and the disputes they raised, read from the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from forge_cli import config, display
from forge_cli.cli.output import print_json
from forge_cli.config import INT_MAX
from forge_cli.errors import NotFound, UsageError

app = typer.Typer(
    help="Audits of purchases (proof of useful work): each peer's record of audits passed, "
    "disputes upheld against it and disputes it forged, from this node's ledger.",
    no_args_is_help=True,
)
LedgerOpt = typer.Option(None, "--ledger", help="Ledger file (default: FORGE_HOME/ledger.db).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")


def _record(account: str, row: tuple[int, int, int], reputation: int) -> dict[str, Any]:
    passed, disputed, forged = row
    return {"node_id": account, "audits_passed": passed, "disputes_against": disputed,
            "disputes_forged": forged, "reputation": reputation}


def _entry(entry: Any, peer: str) -> dict[str, Any]:
    """One audit or dispute entry as `show` lists it, from `peer`'s side."""
    from forge_cli.ledger import entries

    data = entry.data
    if entry.kind == "audit":
        return {"seq": entry.seq, "kind": "audit", "ts": entry.fields["ts"],
                "role": "provider" if data["provider"] == peer else "auditor",
                "provider": data["provider"], "auditor": entry.actor,
                "trade_id": data["trade_id"], "positions": data["positions"],
                "verdict": "passed", "reason": ""}
    claim = data["claim"]
    provider = claim["trade"]["terms"]["provider"]
    return {"seq": entry.seq, "kind": "dispute", "ts": entry.fields["ts"],
            "role": "provider" if provider == peer else "auditor", "provider": provider,
            "auditor": claim["auditor"], "trade_id": entries.trade_id(claim["trade"]),
            "positions": claim["positions"], "verdict": data["verdict"],
            "reason": claim["reason"], "failing_positions": [f["pos"] for f in claim["failures"]]}


@app.command("list")
def list_(as_json: bool = JsonOpt, ledger: Path | None = LedgerOpt) -> None:
    """Every peer with an audit record here: audits passed, disputes upheld against it,
    disputes it wrote that did not re-check, and the reputation they leave it."""
    from forge_cli.economy.credit import account_reputation
    from forge_cli.ledger import queries
    from forge_cli.ledger.store import Ledger

    with Ledger.open_reader(config.ledger_path(ledger)) as book:
        rows = [_record(account, row, account_reputation(book, account))
                for account, row in sorted(queries.audit_records(book).items())]
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no audits recorded yet (a node audits one purchase in audit.every)")
        return
    typer.echo(f"{'node id':<18}{'passed':>8}{'disputed':>10}{'forged':>8}{'rep bp':>8}")
    for r in rows:
        typer.echo(f"{r['node_id'][:16]:<18}{r['audits_passed']:>8}{r['disputes_against']:>10}"
                   f"{r['disputes_forged']:>8}{r['reputation']:>8}")


@app.command()
def run(seq: int = typer.Argument(..., min=0, max=INT_MAX,
                                  help="Seq of a trade in the node's (or worker's) ledger."),
        as_json: bool = JsonOpt,
        node: str | None = typer.Option(
            None, "--node", help="Node URL (default: FORGE_NODE or FORGE_HOME/node.url)."),
        token: str | None = typer.Option(
            None, "--token", help="API token (default: FORGE_TOKEN or the operator's)."),
        offline: bool = typer.Option(
            False, "--offline", help="Audit the ledger directly, with no node (the default "
            "when none runs on this FORGE_HOME)."),
        model: str | None = typer.Option(
            None, "--model", "-m", help="Offline: the GGUF to audit with, a name or path "
            "(default: the model the trade names, found on this disk)."),
        peer: list[str] = typer.Option(
            [], "--peer", help="Offline: send a dispute to this node URL too (repeat for "
            "several; adds to mesh.peers)."),
        ledger: Path | None = LedgerOpt) -> None:
    """Audit one trade with a local copy of its model: recorded as an `audit` entry, or a
    `dispute` sent to peers. Exit 1 when the audit fails.

    With a node running (or --node) the node audits; otherwise (a worker's ledger, or
    --offline) this command does, with the GGUF on this disk: exit 2 when it is absent.
    """
    from forge_cli.client import node_url, running_node

    if offline or (node is None and token is None and node_url(None) is None):
        import asyncio

        from forge_cli.mesh.worker import audit_offline

        entry = asyncio.run(audit_offline(
            config.ledger_path(ledger), seq, model=model,
            peers=[*config.get("mesh.peers"), *peer]))
        claim = entry.data.get("claim", {})
        done = {"seq": entry.seq, "kind": entry.kind,
                "verdict": entry.data.get("verdict", "passed"),
                "positions": entry.data.get("positions", claim.get("positions", 0)),
                "reason": claim.get("reason", ""),
                "failing_positions": [f["pos"] for f in claim.get("failures", [])]}
    else:
        done = running_node(node, token, "`forge audit run` audits with the node's model").post(
            "/v1/forge/audit/trade", {"seq": seq})
    if as_json:
        print_json(done)
    elif done["kind"] == "audit":
        typer.echo(f"trade {seq}: audit passed (seq {done['seq']})")
    else:
        typer.echo(f"trade {seq}: DISPUTED (seq {done['seq']}): {display.plain(done['reason'])}; failing "
                   f"positions {', '.join(map(str, done['failing_positions'])) or '-'}")
    if done["kind"] != "audit":
        raise typer.Exit(1)


@app.command()
def show(peer: str = typer.Argument(..., help="The peer's node id, or a prefix of it."),
         as_json: bool = JsonOpt, ledger: Path | None = LedgerOpt) -> None:
    """One peer's audit record and every audit and dispute that names it (as the provider
    audited or as the auditor)."""
    from forge_cli.economy.credit import account_reputation
    from forge_cli.ledger import queries
    from forge_cli.ledger.store import Ledger

    prefix = peer.lower()
    if not prefix or any(c not in "0123456789abcdef" for c in prefix) or len(prefix) > 64:
        raise UsageError(f"PEER must be a node id or a prefix of one (hex digits), found {peer!r}")
    with Ledger.open_reader(config.ledger_path(ledger)) as book:
        records = queries.audit_records(book)
        found = sorted(a for a in records if a.startswith(prefix))
        if not found:
            raise NotFound(f"no audit record names a peer {prefix[:16]}…; `forge audit list` "
                           "shows the peers that have one")
        if len(found) > 1:
            raise UsageError(f"{prefix!r} is a prefix of {len(found)} peers' node ids: "
                             f"{', '.join(a[:16] for a in found)}; give more digits")
        account = found[0]
        record = _record(account, records[account], account_reputation(book, account))
        record["entries"] = [_entry(e, account) for e in queries.audit_entries(book, account)]
    if as_json:
        print_json(record)
        return
    typer.echo(f"peer {account}\n  audits passed {record['audits_passed']}, disputes against "
               f"it {record['disputes_against']}, disputes it forged "
               f"{record['disputes_forged']}, reputation {record['reputation']} bp")
    for e in record["entries"]:
        what = f"{e['verdict']:<7} as {e['role']:<8} trade {e['trade_id'][:12]}…"
        other = e["auditor"] if e["role"] == "provider" else e["provider"]
        typer.echo(f"  seq {e['seq']:<6} {e['kind']:<8} {what} "
                   f"{'by' if e['role'] == 'provider' else 'of'} {other[:12]}…"
                   + (f"  {display.plain(e['reason'])}" if e["reason"] else ""))  # a disputer's words
