"""`forge loan`: the lending pool from the shell, through a running node.

The node holds the ledger's writer lock and runs the overdue-loan timer, so these commands
always go through its API (FORGE_NODE, else the URL in FORGE_HOME/node.url), as the account
of FORGE_TOKEN or, by default, the operator's.
"""

from __future__ import annotations

from typing import Any

import typer

from forge_cli.cli.output import print_json
from forge_cli.config import INT_MAX
from forge_cli.errors import UsageError

app = typer.Typer(help="Lending pool: lend for shares, borrow against collateral, repay, "
                  "credit score. Rules: credit ≥ 0.2, principal ≤ 3 × collateral, term ≤ 168 h, "
                  "≤ 20 % of the pool, ≥ 30 % kept in reserve.", no_args_is_help=True)
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")
NodeOpt = typer.Option(None, "--node", help="Node URL (default: FORGE_NODE or FORGE_HOME/node.url).")
TokenOpt = typer.Option(None, "--token", help="API token (default: FORGE_TOKEN or the operator's).")


def _client(node: str | None, token: str | None) -> Any:
    from forge_cli.client import running_node

    return running_node(node, token, "lending goes through the node that holds the ledger")


def _show(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        print_json(data)
    else:
        typer.echo(text)


def _loan_line(loan: dict[str, Any]) -> str:
    owed = f", owes {loan['owed_now']:,} CU now" if "owed_now" in loan else ""
    return (f"loan {loan['loan_id']}  {loan['status']:<9} {loan['principal']:,} CU at "
            f"{loan['rate_ppm']} ppm/h, collateral {loan['collateral']:,} CU, interest "
            f"{loan['interest']:,} CU{owed}")


@app.command()
def lend(amount: int = typer.Argument(..., min=1, max=INT_MAX, help="CU to deposit."),
         as_json: bool = JsonOpt,
         node: str | None = NodeOpt, token: str | None = TokenOpt) -> None:
    """Deposit CU into the pool for shares at its current value."""
    out = _client(node, token).post("/v1/forge/lend", {"amount": amount})
    _show(out, as_json, f"deposited {out['cu']:,} CU for {out['shares']:,} shares (seq {out['seq']})")


@app.command()
def withdraw(shares: int | None = typer.Option(None, "--shares", min=1, max=INT_MAX,
                                                 help="Shares to redeem."),
             amount: int | None = typer.Option(None, "--amount", min=1, max=INT_MAX,
                                                 help="CU to take out."),
             as_json: bool = JsonOpt, node: str | None = NodeOpt,
             token: str | None = TokenOpt) -> None:
    """Redeem shares (or enough shares for an amount of CU) at the pool's value."""
    if (shares is None) == (amount is None):
        raise UsageError("give exactly one of --shares or --amount")
    body = {"shares": shares} if shares is not None else {"amount": amount}
    out = _client(node, token).post("/v1/forge/withdraw", body)
    _show(out, as_json, f"redeemed {out['shares']:,} shares for {out['cu']:,} CU (seq {out['seq']})")


@app.command()
def borrow(amount: int = typer.Argument(..., min=1, max=INT_MAX, help="Principal, CU."),
           term: int = typer.Option(..., "--term", min=1, max=1_000_000,
                                     help="Term in hours (the node lends for at most 168)."),
           collateral: int = typer.Option(..., "--collateral", min=0, max=INT_MAX,
                                         help="CU put in escrow."),
           as_json: bool = JsonOpt, node: str | None = NodeOpt,
           token: str | None = TokenOpt) -> None:
    """Borrow from the pool against collateral."""
    loan = _client(node, token).post("/v1/forge/borrow", {"amount": amount, "term_hours": term,
                                                          "collateral": collateral})
    _show(loan, as_json, _loan_line(loan))


@app.command()
def repay(loan_id: int = typer.Argument(..., min=0, max=INT_MAX, metavar="LOAN_ID"), as_json: bool = JsonOpt,
          node: str | None = NodeOpt, token: str | None = TokenOpt) -> None:
    """Repay a loan: principal + interest; the collateral comes back."""
    out = _client(node, token).post("/v1/forge/repay", {"loan_id": loan_id})
    _show(out, as_json, f"paid {out['paid']:,} CU ({out['interest']:,} CU interest); "
                        f"{out['collateral']:,} CU collateral released")


@app.command("list")
def list_(all_: bool = typer.Option(False, "--all", help="Every loan (operator)."),
          as_json: bool = JsonOpt, node: str | None = NodeOpt,
          token: str | None = TokenOpt) -> None:
    """Your loans (or all of them, for the operator)."""
    out = _client(node, token).get("/v1/forge/loans" + ("?all=1" if all_ else ""))
    _show(out, as_json, "\n".join(_loan_line(loan) for loan in out["loans"]) or "no loans")


@app.command()
def pool(as_json: bool = JsonOpt, node: str | None = NodeOpt, token: str | None = TokenOpt) -> None:
    """The pool's cash, lent principal, shares, and your stake."""
    out = _client(node, token).get("/v1/forge/pool")
    me = out.get("lender", {})
    _show(out, as_json, f"pool     {out['value']:,} CU ({out['cash']:,} cash + {out['lent']:,} lent), "
                        f"{out['shares']:,} shares, {out['open_loans']} open loans\n"
                        f"yours    {me.get('shares', 0):,} shares worth {me.get('value', 0):,} CU, "
                        f"gain {me.get('gain', 0):,} CU")


@app.command()
def credit(as_json: bool = JsonOpt, node: str | None = NodeOpt, token: str | None = TokenOpt) -> None:
    """Your credit score and each component (basis points)."""
    out = _client(node, token).get("/v1/forge/credit")
    parts = ", ".join(f"{k} {v}" for k, v in out["components"].items())
    _show(out, as_json, f"credit   {out['credit_bp']} bp (need {out['min_credit_bp']}), rate "
                        f"{out['rate_ppm']} ppm/h\nparts    {parts}\nreputation "
                        f"{out['reputation']} bp")
