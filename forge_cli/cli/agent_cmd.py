"""`forge agent`: budgeted multi-step runs on a node, every step witnessed in its ledger."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from forge_cli import config
from forge_cli.cli.output import print_json
from forge_cli.config import INT_MAX, TOKENS_MAX
from forge_cli.errors import CheckFailed, SpendDenied, UsageError

app = typer.Typer(
    help="Budgeted agent runs: a plan (a DAG of tasks) runs in waves of paid calls on the node, "
    "each result is checked, one answer is written, and every step is a ledger entry. "
    "Exit codes: 0 answered, 1 stopped (budget, call limit, safety gate) or plan rejected or a "
    "task failed, 2 usage or no node.",
    no_args_is_help=True,
)
JsonOpt = typer.Option(False, "--json", help="The run's summary as JSON on stdout.")
NodeOpt = typer.Option(None, "--node", help="Node URL (default: FORGE_NODE or FORGE_HOME/node.url).")
TokenOpt = typer.Option(None, "--token", help="API token (default: FORGE_TOKEN or the operator's).")
BudgetOpt = typer.Option(None, "--budget", min=1, max=INT_MAX, help="Most CU the run may spend, checked "
                         "before every call against each call's maximum cost.")
CallsOpt = typer.Option(None, "--max-calls", min=1, max=INT_MAX, help="Most paid calls (planner, tasks, "
                        "synthesizer) the run may start.")
WaitOpt = typer.Option(0, "--wait-approval", min=0, max=3600, help="Seconds to wait for a person "
                       "(`forge safety approve ID`) when a call needs approval; 0 stops the run.")
RUN_TIMEOUT_S = 3600


def _client(node: str | None, token: str | None) -> Any:
    from forge_cli.client import running_node

    client = running_node(node, token, "agent runs spend on a node")
    client.timeout = RUN_TIMEOUT_S
    return client


def _finish(summary: dict[str, Any], as_json: bool) -> None:
    """Print the run and exit by its outcome: 0 answered, 1 anything else."""
    from forge_cli.agents.record import describe

    if as_json:
        print_json(summary)
    else:
        typer.echo(describe(summary))
    status, run = summary["status"], summary["run"]
    if status == "answered":
        return
    if status == "stopped":
        stop = summary["stop"]
        raise SpendDenied(f"run {run} stopped at seq {stop['seq']}: {stop['reason']}",
                          gate=stop["gate"], hint=f"`forge agent resume {run}` re-runs only what "
                          "did not pass, reusing the rest")
    if status in ("rejected", "failed"):
        error = summary["error"]
        raise CheckFailed(f"run {run} {status} at seq {error['seq']}: {error['reason']}")
    raise CheckFailed(f"run {run} has no outcome yet (status {status})")


@app.command()
def run(
    request: list[str] = typer.Argument(..., help="What the agent should do."),
    plan: Path | None = typer.Option(None, "--plan", help="A plan JSON file to use instead of "
                                     "asking the coordinator model: {\"tasks\": [{\"id\", "
                                     "\"prompt\", \"deps\"?, \"model\"?, \"max_tokens\"?, "
                                     "\"expect\"?}]}. It is checked and recorded the same way."),
    budget: int | None = BudgetOpt,
    max_calls: int | None = CallsOpt,
    model: str | None = typer.Option(None, "--model", "-m", help="Model for the coordinator, the "
                                     "tasks (unless a task names one) and the synthesizer."),
    account: str | None = typer.Option(None, "--account", help="Agent account that pays (the "
                                       "operator may name any; default: the token's own)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", min=1, max=TOKENS_MAX,
                                          help="Most tokens per call [default: 256]."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, max=16,
                                    help="Tasks of one wave running at once."),
    mode: str = typer.Option("balanced", "--mode", help="How a task naming a model only mesh "
                             "peers offer picks the peer: cost, quality or balanced."),
    wait_approval: int = WaitOpt,
    as_json: bool = JsonOpt,
    node: str | None = NodeOpt,
    token: str | None = TokenOpt,
) -> None:
    """Run REQUEST as a budgeted agent on the node; print the run and its answer.

    Examples:

        forge agent run --account bob --budget 500 "compare SQLite and LMDB"

        forge agent run --account bob --plan plan.json --max-calls 6 "summarise the notes"

    A run that stops (budget, --max-calls, kill switch or another safety gate) exits 1 and says
    why; `forge agent resume RUN` then re-runs only the tasks that did not pass.
    """
    body: dict[str, Any] = {"request": " ".join(request), "concurrency": concurrency,
                            "approval_wait_s": wait_approval, "mode": mode}
    if plan is not None:
        try:
            body["plan"] = plan.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read plan file {plan}: {exc}") from exc
    for key, value in (("budget_cu", budget), ("max_calls", max_calls), ("model", model),
                       ("account", account), ("max_tokens", max_tokens)):
        if value is not None:
            body[key] = value
    _finish(_client(node, token).post("/v1/forge/agent/runs", body), as_json)


@app.command()
def resume(
    run_id: str = typer.Argument(..., metavar="RUN", help="The run to resume (ag_…)."),
    budget: int | None = typer.Option(None, "--budget", min=1, max=INT_MAX,
                                      help="Budget of the new run [default: the old run's]."),
    max_calls: int | None = typer.Option(None, "--max-calls", min=1, max=INT_MAX,
                                         help="Call limit of the new run [default: the old run's]."),
    wait_approval: int = WaitOpt,
    as_json: bool = JsonOpt,
    node: str | None = NodeOpt,
    token: str | None = TokenOpt,
) -> None:
    """Resume RUN as a new run: reuse its witnessed results that passed, re-run only the rest.

    The new run's request entry has the old run's last entry as its parent, so
    `forge ledger causal` leads from one to the other. Example:

        forge agent resume ag_3f2a9c1b0d4e --budget 800
    """
    body: dict[str, Any] = {"approval_wait_s": wait_approval}
    if budget is not None:
        body["budget_cu"] = budget
    if max_calls is not None:
        body["max_calls"] = max_calls
    _finish(_client(node, token).post(f"/v1/forge/agent/runs/{run_id}/resume", body), as_json)


@app.command()
def show(
    run_id: str = typer.Argument(..., metavar="RUN", help="The run (ag_…)."),
    as_json: bool = JsonOpt,
    ledger: Path | None = typer.Option(None, "--ledger",
                                       help="Ledger file (default: FORGE_HOME/ledger.db)."),
) -> None:
    """Summarise RUN from the ledger alone (works offline, also while the node runs).

    Tasks with their model, CU spent, trades and verdicts; how the run ended; the answer.

        forge agent show ag_3f2a9c1b0d4e --json | jq .spent_cu
    """
    from forge_cli.agents.record import describe, summarize
    from forge_cli.ledger.store import Ledger

    with Ledger.open_reader(config.ledger_path(ledger)) as book:
        summary = summarize(book, run_id)
    if as_json:
        print_json(summary)
    else:
        sys.stdout.write(describe(summary) + "\n")
