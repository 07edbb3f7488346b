"""Agent routes: start a run, resume one, read one back, list and compare runs, route text
(the orchestrator is forge_cli.agents). The agents.* config keys are read per run."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli import config
from forge_cli.agents import record
from forge_cli.agents import roster as rosters
from forge_cli.agents import run as runs
from forge_cli.economy.accounts import Resolved
from forge_cli.errors import Forbidden, NotFound, UsageError
from forge_cli.node.web import NODE, WHO, Route, bad_request, field, int_query, read_json

if TYPE_CHECKING:
    from forge_cli.root.node import Node

_RUN = re.compile(r"ag_[0-9a-f]{12}")
MAX_REQUEST = 4000
MAX_ROSTER = 64 * 1024


def _bounded(body: dict[str, Any], name: str, low: int, high: int, default: int | None) -> Any:
    value = field(body, name, int, default=default)
    if value is not None and not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}, found {value}")
    return value


def _limits(node: Node, body: dict[str, Any], base: dict[str, Any] | None = None
            ) -> runs.Limits:
    """The run's limits: the body's, else the old run's (resume), else the agents.* config."""
    base = base or {}
    settings = config.load()
    n_ctx = min(m.engine.n_ctx for m in node.models.values())
    budget = base.get("budget_cu") if base else (settings["agents.budget_cu"] or None)
    seconds = base.get("max_seconds") if base else (settings["agents.max_seconds"] or None)
    return runs.Limits(
        budget_cu=_bounded(body, "budget_cu", 1, 2**53, budget),
        max_calls=_bounded(body, "max_calls", 1, 10_000, base.get("max_calls")),
        max_tokens=_bounded(body, "max_tokens", 1, n_ctx, base.get("max_tokens") or min(256, n_ctx)),
        concurrency=_bounded(body, "concurrency", 1, 16, 4),
        approval_wait_s=_bounded(body, "approval_wait_s", 0, 3600, 0),
        mode=_mode(body),
        max_seconds=_bounded(body, "max_seconds", 1, 86_400, seconds))


def _roster(body: dict[str, Any], who: Any, settings: dict[str, Any]) -> rosters.Roster:
    """The body's roster (TOML text), else agents.roster, else the built-in one. A roster that
    runs anything outside forge's engine (a command, another API with this node's keys) is the
    operator's to give: an agent's token may send only forge lanes."""
    text = field(body, "roster", str, default=None)
    if text is None:
        return rosters.load(settings["agents.roster"] or None)
    if len(text.encode()) > MAX_ROSTER:
        raise bad_request(f"roster is larger than {MAX_ROSTER // 1024} KiB")
    roster = rosters.parse(text, "the request's roster")
    if roster.external and not who.is_operator:
        lanes = [lane.name for lane in roster.lanes if lane.executor != "forge"]
        raise Forbidden(f"only the operator may send a roster whose lanes run outside forge's "
                        f"engine ({', '.join(lanes)}); an agent's token may send forge lanes, "
                        "or the operator sets agents.roster")
    return roster


def _team(body: dict[str, Any], who: Any) -> runs.Team:
    settings = config.load()
    return runs.Team(
        roster=_roster(body, who, settings),
        threshold_pm=settings["agents.route_threshold_pm"],
        margin_pm=settings["agents.route_margin_pm"],
        tiers={tier: tuple(settings[f"agents.tier_{tier}"]) for tier in rosters.TIERS},
        judge=settings["agents.judge"], intent_judge=settings["agents.intent_judge"],
        verifier=tuple(settings["agents.verifier"]),
        categories=tuple(settings["agents.categories"]))


def _mode(body: dict[str, Any]) -> str:
    from forge_cli.mesh.protocol import MODES

    mode = body.get("mode", "balanced")
    if mode not in MODES:
        raise bad_request(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
    return mode


def _acting(node: Node, who: Any, name: str | None) -> Any:
    """The account a run spends from: the caller's own, or (for the operator) a named agent's."""
    if name is None or name == who.name:
        return who
    if not who.is_operator:
        raise Forbidden(f"only the operator may run as another account "
                        f"({name!r}); this token is {who.name!r}'s")
    record_ = next((a for a in node.accounts.list() if a["name"] == name and not a["revoked"]),
                   None)
    if record_ is None:
        raise UsageError(f"no live agent account named {name!r}",
                         hint="`forge wallet agent create NAME` makes one")
    return Resolved(name, record_["account"], node.accounts.signer_for(record_["account"]), False)


def _run_id(request: web.Request) -> str:
    run = request.match_info["run"]
    if not _RUN.fullmatch(run):
        raise bad_request(f"run id must be 'ag_' and 12 hex digits, found {run!r}")
    return run


def _summary(node: Node, run: str) -> dict[str, Any]:
    node.reader.refresh()
    try:
        return record.summarize(node.reader, run)
    except UsageError as exc:  # no such run
        raise NotFound(exc.message) from None


async def start(request: web.Request) -> web.Response:
    """Run an agent request to its end and answer with the run's summary (any outcome)."""
    node: Node = request.app[NODE]
    body = await read_json(request)
    text = field(body, "request", str, required=True)
    if not text.strip() or len(text) > MAX_REQUEST:
        raise bad_request(f"request must be non-empty text of at most {MAX_REQUEST} characters")
    plan = field(body, "plan", (str, dict, list), default=None)
    model = field(body, "model", str, default=None)
    team = _team(body, request[WHO])
    who = _acting(node, request[WHO], field(body, "account", str, default=None))
    limits = _limits(node, body)
    plan_only = field(body, "plan_only", bool, default=False)
    run = await runs.execute(node, who, text, model_name=model, limits=limits, team=team,
                             plan_source=plan, plan_only=plan_only)
    return web.json_response(_summary(node, run))


async def resume(request: web.Request) -> web.Response:
    """Re-run what an earlier run did not finish, reusing its results that passed."""
    node: Node = request.app[NODE]
    old = _run_id(request)
    body = await read_json(request)
    _summary(node, old)  # 404 for a run that does not exist
    state = runs.resumable(node.reader, old)
    caller = request[WHO]
    if caller.is_operator:
        name = next((a["name"] for a in node.accounts.list()
                     if a["account"] == state["account"] and not a["revoked"]), None)
        if name is None:
            raise UsageError(f"run {old}'s account {state['account'][:16]}… is no live agent here")
        who = _acting(node, caller, name)
    elif caller.account_hex != state["account"]:
        raise Forbidden(f"run {old} belongs to another account")
    else:
        who = caller
    team = _team(body, caller)
    limits = _limits(node, body, base=state)
    model = field(body, "model", str, default=state["model"])
    run = await runs.execute(node, who, state["request"] or "", model_name=model, limits=limits,
                             team=team, resume=state)
    return web.json_response(_summary(node, run))


async def show(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    return web.json_response(_summary(node, _run_id(request)))


async def listing(request: web.Request) -> web.Response:
    """The newest runs (the caller's own; the operator sees every account's)."""
    node: Node = request.app[NODE]
    limit = int_query(request, "limit", 50, 1, 1000)
    node.reader.refresh()
    who = request[WHO]
    rows = record.runs(node.reader, limit if who.is_operator else 1000)
    if not who.is_operator:
        rows = [r for r in rows if r["account"] == who.account_hex][:limit]
    return web.json_response({"runs": rows})


async def compare(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    ids = [request.query.get("a", ""), request.query.get("b", "")]
    for run in ids:
        if not _RUN.fullmatch(run):
            raise bad_request(f"a and b must be run ids ('ag_' and 12 hex digits), found {run!r}")
        _summary(node, run)  # 404 for a run that does not exist
    return web.json_response(record.compare(node.reader, ids[0], ids[1]))


async def route(request: web.Request) -> web.Response:
    """The lexical router's decision for a text (nothing is run or paid)."""
    body = await read_json(request)
    text = field(body, "text", str, required=True)
    if not text.strip() or len(text) > MAX_REQUEST:
        raise bad_request(f"text must be non-empty text of at most {MAX_REQUEST} characters")
    settings = config.load()
    roster = _roster(body, request[WHO], settings)
    decision = rosters.route(text, roster, threshold_pm=settings["agents.route_threshold_pm"],
                             margin_pm=settings["agents.route_margin_pm"])
    return web.json_response({**decision.to_json(), "roster": roster.source,
                              "needs_classifier": decision.lane is None})


ROUTES = [
    Route("POST", "/v1/forge/agent/runs", start,
          "Run an agent request {request, plan?, roster?, model?, account?, budget_cu?, "
          "max_calls?, max_seconds?, max_tokens?, concurrency?, approval_wait_s?, mode?, "
          "plan_only?}; returns the run summary"),
    Route("GET", "/v1/forge/agent/runs", listing, "Agent runs, newest first (?limit=)"),
    Route("GET", "/v1/forge/agent/compare", compare,
          "Two runs side by side (?a=RUN&b=RUN): counts, CU, calls, seconds, verdicts, coverage"),
    Route("POST", "/v1/forge/agent/route", route,
          "Route {text, roster?} to a lane by keywords; nothing is run"),
    Route("POST", "/v1/forge/agent/runs/{run}/resume", resume,
          "Resume a run: reuse its passed results, re-run the rest (a new run)"),
    Route("GET", "/v1/forge/agent/runs/{run}", show, "A run's summary, from the ledger"),
]
