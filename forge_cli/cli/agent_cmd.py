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
                         "before every call against each call's maximum cost [default: "
                         "agents.budget_cu, 4,000].")
CallsOpt = typer.Option(None, "--max-calls", min=1, max=INT_MAX, help="Most paid calls (planner, tasks, "
                        "synthesizer) the run may start.")
SecondsOpt = typer.Option(None, "--max-seconds", min=1, max=86_400, help="Most seconds the run "
                          "may take, checked before every call [default: agents.max_seconds].")
RosterOpt = typer.Option(None, "--roster", help="TOML file of agent lanes ([[agent]] tables) "
                         "[default: agents.roster, else the built-in roster].")
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
    if status in ("answered", "planned"):
        return
    if status == "stopped":
        stop = summary["stop"]
        raise SpendDenied(f"run {run} stopped at seq {stop['seq']}: {stop['reason']}",
                          gate=stop["gate"], hint=_change(summary))
    if status in ("rejected", "failed", "refused"):
        error = summary["error"]
        raise CheckFailed(f"run {run} {status} at seq {error['seq']}: {error['reason']}")
    raise CheckFailed(f"run {run} has no outcome yet (status {status})")


def _change(summary: dict[str, Any]) -> str:
    """What to change so the run gets further: raise the limit it hit, or ask for less."""
    run, gate = summary["run"], summary["stop"]["gate"]
    n = summary.get("max_tokens") or 256
    resume = f"`forge agent resume {run}` re-runs only what did not pass, reusing the rest"
    if gate == "budget":
        more = (summary["budget_cu"] or 0) * 2
        return (f"raise the budget ({resume} --budget {more}) or ask less of each call "
                f"(-n {max(1, n // 2)}: each call holds at most -n tokens × the price)")
    if gate == "max_calls":
        return f"raise the call limit ({resume} --max-calls {(summary['max_calls'] or 1) * 2})"
    if gate == "max_seconds":
        return (f"raise the seconds budget ({resume} --max-seconds "
                f"{(summary['max_seconds'] or 1) * 2}) or lower -n")
    return resume


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
    max_seconds: int | None = SecondsOpt,
    roster: Path | None = RosterOpt,
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
    why and what to change; `forge agent resume RUN` then re-runs only the tasks that did not
    pass. With the defaults on the embedded smollm2:135m a run costs at most about 1,700 CU
    (the default budget is 4,000 CU).
    """
    body: dict[str, Any] = {"request": _request(request), "concurrency": concurrency,
                            "approval_wait_s": wait_approval, "mode": mode}
    if plan is not None:
        try:
            body["plan"] = plan.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read plan file {plan}: {exc}") from exc
    for key, value in (("budget_cu", budget), ("max_calls", max_calls), ("model", model),
                       ("account", account), ("max_tokens", max_tokens),
                       ("max_seconds", max_seconds), ("roster", _read_roster(roster))):
        if value is not None:
            body[key] = value
    _finish(_client(node, token).post("/v1/forge/agent/runs", body), as_json)


def _request(words: list[str]) -> str:
    text = " ".join(words)
    if text == "-":
        text = sys.stdin.read()
    return text


def _read_roster(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read roster {path}: {exc}") from exc
    from forge_cli.agents.roster import parse

    parse(text, str(path))  # a bad roster is a usage error here, before the node is asked
    return text


@app.command()
def plan(
    request: list[str] = typer.Argument(..., help="What the agent should do."),
    model: str | None = typer.Option(None, "--model", "-m", help="The coordinator's model."),
    account: str | None = typer.Option(None, "--account", help="Agent account that pays (the "
                                       "operator may name any; default: the token's own)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", min=1, max=TOKENS_MAX,
                                          help="Most tokens of the coordinator's reply "
                                          "[default: 256]."),
    budget: int | None = BudgetOpt,
    roster: Path | None = RosterOpt,
    as_json: bool = JsonOpt,
    node: str | None = NodeOpt,
    token: str | None = TokenOpt,
) -> None:
    """Show the plan the coordinator makes of REQUEST, routed to lanes, without running it.

    It is paid (the coordinator runs, and a classifier for a task no keyword decides) and
    witnessed like a run that ends after its routes:

        forge agent plan --account bob --json "compare SQLite and LMDB, then summarise"
    """
    body: dict[str, Any] = {"request": _request(request), "plan_only": True}
    for key, value in (("budget_cu", budget), ("model", model), ("account", account),
                       ("max_tokens", max_tokens), ("roster", _read_roster(roster))):
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
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", min=1, max=TOKENS_MAX,
                                          help="Most tokens per call [default: the old run's]."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model of the new run "
                                     "[default: the old run's]."),
    max_seconds: int | None = SecondsOpt,
    roster: Path | None = RosterOpt,
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
    for key, value in (("budget_cu", budget), ("max_calls", max_calls), ("model", model),
                       ("max_tokens", max_tokens), ("max_seconds", max_seconds),
                       ("roster", _read_roster(roster))):
        if value is not None:
            body[key] = value
    _finish(_client(node, token).post(f"/v1/forge/agent/runs/{run_id}/resume", body), as_json)


@app.command()
def show(
    run_id: str = typer.Argument(..., metavar="RUN", help="The run (ag_…)."),
    as_json: bool = JsonOpt,
    ledger: Path | None = typer.Option(None, "--ledger",
                                       help="Ledger file (default: FORGE_HOME/ledger.db)."),
) -> None:
    """Summarise RUN from the ledger alone (works offline, also while the node runs).

    Tasks with their lane, model, CU spent, trades and verdicts; the routes; how the run ended;
    the answer and its intent coverage. A body or entry of the run that does not match its
    hash is printed as TAMPERED and the command exits 1.

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
    if summary["integrity"]:
        raise CheckFailed(f"run {run_id}: {len(summary['integrity'])} of its bodies or entries do "
                          f"not match their hashes: {summary['integrity'][0]}",
                          hint="`forge ledger verify --deep` checks the whole ledger")


def _ledger_book(ledger: Path | None) -> Any:
    from forge_cli.ledger.store import Ledger

    return Ledger.open_reader(config.ledger_path(ledger))


LedgerOpt = typer.Option(None, "--ledger", help="Ledger file (default: FORGE_HOME/ledger.db).")


@app.command("list")
def list_runs(
    limit: int = typer.Option(20, "--limit", min=1, max=1000, help="Most runs to show."),
    as_json: bool = typer.Option(False, "--json", help="The runs as JSON on stdout."),
    ledger: Path | None = LedgerOpt,
) -> None:
    """List agent runs, newest first, from the ledger alone: status, tasks passed, CU, calls,
    seconds and intent coverage.

        forge agent list --json | jq '.[0].run'
    """
    from forge_cli.agents.record import describe_runs, runs

    with _ledger_book(ledger) as book:
        rows = runs(book, limit)
    if as_json:
        print_json(rows)
    else:
        sys.stdout.write(describe_runs(rows) + "\n")


@app.command()
def compare(
    run_a: str = typer.Argument(..., metavar="RUN", help="The first run (ag_…)."),
    run_b: str = typer.Argument(..., metavar="RUN", help="The second run (ag_…)."),
    as_json: bool = typer.Option(False, "--json", help="Both runs and b − a as JSON."),
    ledger: Path | None = LedgerOpt,
) -> None:
    """Compare two runs side by side: tasks, verdicts, CU, calls, seconds and coverage.

        forge agent compare ag_3f2a9c1b0d4e ag_91c0de5a7b21
    """
    from forge_cli.agents.record import compare as compare_runs
    from forge_cli.agents.record import describe_compare

    with _ledger_book(ledger) as book:
        both = compare_runs(book, run_a, run_b)
    if as_json:
        print_json(both)
    else:
        sys.stdout.write(describe_compare(both) + "\n")


@app.command()
def route(
    text: list[str] = typer.Argument(..., help="The text to route."),
    roster: Path | None = RosterOpt,
    as_json: bool = typer.Option(False, "--json", help="The decision as JSON."),
) -> None:
    """Show which lane the lexical router picks for TEXT (nothing runs; no node needed).

    A lane wins when its keyword score reaches agents.route_threshold_pm and leads the next by
    agents.route_margin_pm; otherwise a run asks the classifier model.

        forge agent route "build the database schema and the api endpoint"
    """
    from forge_cli.agents import roster as rosters

    settings = config.load()
    lanes = rosters.parse(_read_roster(roster) or "", str(roster)) if roster else \
        rosters.load(settings["agents.roster"] or None)
    decision = rosters.route(" ".join(text), lanes,
                             threshold_pm=settings["agents.route_threshold_pm"],
                             margin_pm=settings["agents.route_margin_pm"])
    if as_json:
        print_json({**decision.to_json(), "roster": lanes.source,
                    "needs_classifier": decision.lane is None})
        return
    verdict = (f"→ {decision.lane} (score {decision.confidence_pm / 1000:.2f})"
               if decision.lane else "undecided: a run asks the classifier model")
    sys.stdout.write(verdict + "\n")
    for name, score in decision.candidates:
        sys.stdout.write(f"  {name:<20} {score / 1000:.2f}\n")
