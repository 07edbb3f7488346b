"""`forge wallet`: this node's identity and balance."""

from __future__ import annotations

from pathlib import Path

import typer

from forge_cli import config, identity
from forge_cli.cli.output import print_json


def wallet(
    as_json: bool = typer.Option(False, "--json", help="One JSON object."),
    ledger: Path | None = typer.Option(None, "--ledger", help="Ledger file to read."),
) -> None:
    """Show the node id (hex Ed25519 public key) and its balance in CU."""
    from forge_cli.ledger.store import Ledger

    me = identity.load_or_create()
    path = config.ledger_path(ledger)
    balance = 0
    if path.exists():
        with Ledger.open_reader(path) as reader:
            balance = reader.balance(me.node_id)
    info = {"node_id": me.node_id, "balance_cu": balance, "key_file": str(config.home() / identity.KEY_FILE)}
    if as_json:
        print_json(info)
        return
    typer.echo(f"node id  {me.node_id}")
    typer.echo(f"balance  {balance} CU")
    typer.echo(f"key      {info['key_file']}")
