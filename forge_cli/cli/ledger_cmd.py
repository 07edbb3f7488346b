"""`forge ledger`: the record, for people and shell scripts."""

from __future__ import annotations

import typer

app = typer.Typer(help="Verify, inspect, prove and move the ledger.", no_args_is_help=True)
