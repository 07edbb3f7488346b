"""`forge safety`: the kill switch, spending policies and approvals, from the shell.

With no node running these write to the ledger directly. A running node holds the ledger's
writer lock: the commands then go through its API (the URL it wrote to FORGE_HOME/node.url,
or --node / FORGE_NODE), authenticated with the operator token.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from forge_cli import config
from forge_cli.cli.output import print_json
from forge_cli.config import INT_MAX
from forge_cli.errors import LedgerLocked

app = typer.Typer(
    help="Safety controls on every spend: kill switch, per-account policies, approvals. "
    "Gates, in order: kill switch, per-request cap, circuit breaker, hourly budget, "
    "lifetime budget, approval.",
    no_args_is_help=True,
)
policy_app = typer.Typer(help="Per-account spending limits (recorded in the ledger).",
                         no_args_is_help=True)
app.add_typer(policy_app, name="policy")

LedgerOpt = typer.Option(None, "--ledger", help="Ledger file (default: FORGE_HOME/ledger.db).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")


@contextlib.contextmanager
def _safety(path: Path | None) -> Iterator[Any]:
    from forge_cli import identity
    from forge_cli.economy.safety import Policy, Safety
    from forge_cli.ledger.store import Ledger

    signer = identity.load_or_create()
    ledger_path = config.ledger_path(path)
    url = os.environ.get("FORGE_NODE")
    if url:
        yield _NodeSafety(url)
        return
    try:
        book = Ledger.open_writer(ledger_path, signer, synchronous=config.get("ledger.synchronous"))
    except LedgerLocked as exc:
        from forge_cli.client import announced_node_url

        running = announced_node_url()
        if running is None:
            raise LedgerLocked(
                f"ledger {ledger_path} is held by another process, and no running node "
                "announced its URL in FORGE_HOME/node.url",
                hint="set FORGE_NODE=http://HOST:PORT to reach the node that holds it",
            ) from exc
        yield _NodeSafety(running)
        return
    with book:
        yield Safety(book, defaults=Policy.from_config(),
                     approval_ttl_ms=config.get("safety.approval_ttl_s") * 1000)


class _NodeSafety:
    """The same calls as `Safety`, made on a running node's API with the operator token."""

    def __init__(self, url: str) -> None:
        from forge_cli.client import Client, default_token

        self.client = Client(url, default_token())

    def status(self, account: str | None = None) -> dict[str, Any]:
        return self.client.get("/v1/forge/safety" + (f"?account={account}" if account else ""))

    def kill(self, reason: str) -> dict[str, Any]:
        return self.client.post("/v1/forge/kill", {"activate": True, "reason": reason})[
            "kill_switch"]

    def resume(self, reason: str = "") -> dict[str, Any]:
        return self.client.post("/v1/forge/kill", {"activate": False, "reason": reason})[
            "kill_switch"]

    def set_policy(self, account: str, **limits: int | None) -> Any:
        from forge_cli.economy.safety import Policy
        from forge_cli.ledger.entries import POLICY_LIMITS

        body = {"account": account, **{k: v for k, v in limits.items() if v is not None}}
        policy = self.client.post("/v1/forge/policy", body)["policy"]
        return Policy(**{name: policy[name] for name in POLICY_LIMITS})

    def approve(self, approval_id: str) -> dict[str, Any]:
        return self.client.post("/v1/forge/approve", {"id": approval_id})

    def deny(self, approval_id: str) -> dict[str, Any]:
        return self.client.post("/v1/forge/approve", {"id": approval_id, "deny": True})

    def pending(self) -> list[dict[str, Any]]:
        return self.client.get("/v1/forge/approvals")["pending"]


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _show_kill(state: dict[str, Any]) -> None:
    if state["active"]:
        typer.echo(f"kill switch  ON since seq {state['seq']}: {state['reason']}")
    else:
        typer.echo("kill switch  off" + (f" (since seq {state['seq']})" if state["seq"] is not None
                                         else ""))


@app.command()
def status(
    account: str | None = typer.Option(None, "--account", help="Also show this account's "
                                       "policy and spending (64 hex digits)."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """Kill switch, breaker, effective policy, spending and pending approvals."""
    with _safety(ledger) as safety:
        info = safety.status(account)
    if as_json:
        print_json(info)
        return
    _show_kill(info["kill_switch"])
    breaker = info["breaker"]
    typer.echo(f"breaker      {breaker['state']}" +
               (f" ({breaker['reason']}; closes {_when(breaker['closes_ms'])})"
                if breaker["state"] == "open" else ""))
    policy = info["policy"]
    typer.echo(f"policy       ({policy['source']}) cap {policy['per_request_cap_cu']:,} CU, "
               f"hourly {policy['hourly_budget_cu']:,} CU, lifetime "
               f"{policy['lifetime_budget_cu']:,} CU, approval above "
               f"{policy['approval_threshold_cu']:,} CU")
    if account is not None:
        typer.echo(f"spent        {info['spent_last_hour_cu']:,} CU in the last hour, "
                   f"{info['spent_lifetime_cu']:,} CU in all")
    typer.echo(f"pending      {len(info['pending'])} approval(s)")
    for approval in info["pending"]:
        typer.echo(f"  {approval['id']}  {approval['cu']:,} CU  {approval['account'][:16]}…  "
                   f"expires {_when(approval['expires_ms'])}")


@app.command()
def kill(
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the ledger)."),
    ledger: Path | None = LedgerOpt,
) -> None:
    """Stop every spend until `forge safety resume`."""
    with _safety(ledger) as safety:
        state = safety.kill(reason)
    _show_kill(state)


@app.command()
def resume(
    reason: str = typer.Option("", "--reason", help="Why (recorded in the ledger)."),
    ledger: Path | None = LedgerOpt,
) -> None:
    """Lift the kill switch."""
    with _safety(ledger) as safety:
        state = safety.resume(reason)
    _show_kill(state)


@policy_app.command("set")
def policy_set(
    account: str = typer.Option("*", "--account", help="64 hex digits, or '*' for every "
                                "account without its own policy."),
    cap: int | None = typer.Option(None, "--cap", min=1, max=INT_MAX,
                                   help="Largest single spend, CU."),
    hourly: int | None = typer.Option(None, "--hourly", min=1, max=INT_MAX,
                                      help="Budget per hour, CU."),
    lifetime: int | None = typer.Option(None, "--lifetime", min=1, max=INT_MAX,
                                        help="Budget for all time, CU."),
    approval: int | None = typer.Option(None, "--approval", min=1, max=INT_MAX,
                                        help="Spends above this need a person's approval, CU."),
    ledger: Path | None = LedgerOpt,
) -> None:
    """Set limits for an account (limits not given keep their current value)."""
    with _safety(ledger) as safety:
        policy = safety.set_policy(account, per_request_cap_cu=cap, hourly_budget_cu=hourly,
                                   lifetime_budget_cu=lifetime, approval_threshold_cu=approval)
    typer.echo(f"policy for {account}: cap {policy.per_request_cap_cu:,} CU, hourly "
               f"{policy.hourly_budget_cu:,} CU, lifetime {policy.lifetime_budget_cu:,} CU, "
               f"approval above {policy.approval_threshold_cu:,} CU")


@app.command()
def approve(approval_id: str = typer.Argument(..., metavar="ID"),
            ledger: Path | None = LedgerOpt) -> None:
    """Approve a pending spend: the agent's retry then passes once."""
    with _safety(ledger) as safety:
        _decided("approved", safety.approve(approval_id))


@app.command()
def deny(approval_id: str = typer.Argument(..., metavar="ID"),
         ledger: Path | None = LedgerOpt) -> None:
    """Deny a pending spend."""
    with _safety(ledger) as safety:
        _decided("denied", safety.deny(approval_id))


def _decided(verb: str, approval: dict[str, Any]) -> None:
    typer.echo(f"{verb} {approval['id']}: {approval['cu']:,} CU for {approval['account'][:16]}… "
               f"(seq {approval['seq']})")


@app.command()
def pending(as_json: bool = JsonOpt, ledger: Path | None = LedgerOpt) -> None:
    """Spends waiting for a person's approval."""
    with _safety(ledger) as safety:
        rows = safety.pending()
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no approvals pending")
    for row in rows:
        typer.echo(f"{row['id']}  {row['cu']:,} CU  {row['account']}  expires {_when(row['expires_ms'])}")
