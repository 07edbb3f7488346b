"""`forge wallet`: this node's identity and balance; `forge wallet agent`: agent accounts."""

from __future__ import annotations

import datetime
from pathlib import Path

import typer

from forge_cli import config
from forge_cli.cli.output import print_json

app = typer.Typer(
    help="This node's identity and balance; agent accounts and their API tokens.",
    invoke_without_command=True,
)
agent_app = typer.Typer(
    help="Agent accounts held by the node: each has its own key and one API token.",
    no_args_is_help=True,
)
app.add_typer(agent_app, name="agent")

JsonOpt = typer.Option(False, "--json", help="One JSON object.")


@app.callback()
def wallet(
    ctx: typer.Context,
    as_json: bool = JsonOpt,
    ledger: Path | None = typer.Option(None, "--ledger", help="Ledger file to read."),
) -> None:
    """Show the node id (hex Ed25519 public key) and its balance in CU (with the free tier
    its first purchase brings, until then)."""
    if ctx.invoked_subcommand is not None:
        return
    from forge_cli import identity
    from forge_cli.trade.wallet import FREE_TIER_CU, free_tier_pending

    me = identity.load_or_create()
    path = config.ledger_path(ledger)
    balance, pending = 0, FREE_TIER_CU
    if path.exists():
        from forge_cli.ledger.store import Ledger

        with Ledger.open_reader(path) as reader:
            balance = reader.balance(me.node_id)
            pending = free_tier_pending(reader, me.node_id)
    info = {"node_id": me.node_id, "balance_cu": balance, "free_tier_pending_cu": pending,
            "key_file": str(config.home() / identity.KEY_FILE)}
    if as_json:
        print_json(info)
        return
    typer.echo(f"node id  {me.node_id}")
    typer.echo(f"balance  {balance_text(balance, pending)}")
    typer.echo(f"key      {info['key_file']}")


def balance_text(balance: int, pending: int) -> str:
    """`0 CU (+1000 CU free tier on first purchase)`, or `250 CU` once the grant is made."""
    text = f"{balance} CU"
    return text + f" (+{pending} CU free tier on first purchase)" if pending else text


def _accounts():  # noqa: ANN202 - keeps the economy import out of `forge --help`
    from forge_cli.economy.accounts import Accounts

    return Accounts(config.home())


@agent_app.command("create")
def agent_create(
    name: str = typer.Argument(..., help="1 to 32 of a-z, 0-9, '_' or '-'."),
    as_json: bool = typer.Option(False, "--json", help='Print {"name", "account", "token"}.'),
) -> None:
    """Create an agent account with its own key and API token (the token is shown only now)."""
    agent, token = _accounts().create(name)
    if as_json:
        print_json({"name": name, "account": agent.node_id, "token": token})
        return
    typer.echo(f"agent    {name}")
    typer.echo(f"account  {agent.node_id}")
    typer.echo(f"token    {token}")
    typer.echo("This token is shown once; forge keeps only its hash. "
               "Use it as `Authorization: Bearer TOKEN` against the node.", err=True)


@agent_app.command("list")
def agent_list(as_json: bool = typer.Option(False, "--json", help="A JSON list.")) -> None:
    """List agent accounts (name, account, created, revoked); tokens are never shown."""
    rows = _accounts().list()
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no agent accounts; create one with `forge wallet agent create NAME`")
        return
    for row in rows:
        created = datetime.datetime.fromtimestamp(row["created_ms"] / 1000, datetime.UTC)
        state = "revoked" if row["revoked"] else "active"
        typer.echo(f"{row['name']:<20} {row['account']}  {created:%Y-%m-%d %H:%M}  {state}")


@agent_app.command("revoke")
def agent_revoke(name: str = typer.Argument(..., help="The agent's name.")) -> None:
    """Revoke an agent's token; its key and any CU it holds stay."""
    if _accounts().revoke(name):
        typer.echo(f"revoked the token of agent {name}")
    else:
        typer.echo(f"the token of agent {name} was already revoked")


@app.command("token")
def token(show: bool = typer.Option(False, "--show", help="Print the token itself (a secret).")
          ) -> None:
    """The operator token (FORGE_HOME/api_token, mode 0600): created if missing.

    A node bound to a non-loopback address refuses to start until this exists.
    """
    from forge_cli.economy.accounts import operator_token

    secret = operator_token(config.home())
    path = config.home() / "api_token"
    typer.echo(secret if show else str(path))
