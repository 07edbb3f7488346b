"""Agent routes: start a run, resume one, read one back (the orchestrator is forge_cli.agents)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.agents import record
from forge_cli.agents import run as runs
from forge_cli.economy.accounts import Resolved
from forge_cli.errors import Forbidden, NotFound, UsageError
from forge_cli.node.web import NODE, WHO, Route, bad_request, field, read_json

if TYPE_CHECKING:
    from forge_cli.root.node import Node

_RUN = re.compile(r"ag_[0-9a-f]{12}")
MAX_REQUEST = 4000


def _bounded(body: dict[str, Any], name: str, low: int, high: int, default: int | None) -> Any:
    value = field(body, name, int, default=default)
    if value is not None and not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}, found {value}")
    return value


def _limits(node: Node, body: dict[str, Any], base: dict[str, Any] | None = None) -> runs.Limits:
    base = base or {}
    n_ctx = min(m.engine.n_ctx for m in node.models.values())
    return runs.Limits(
        budget_cu=_bounded(body, "budget_cu", 1, 2**53, base.get("budget_cu")),
        max_calls=_bounded(body, "max_calls", 1, 10_000, base.get("max_calls")),
        max_tokens=_bounded(body, "max_tokens", 1, n_ctx, base.get("max_tokens") or min(256, n_ctx)),
        concurrency=_bounded(body, "concurrency", 1, 16, 4),
        approval_wait_s=_bounded(body, "approval_wait_s", 0, 3600, 0),
        mode=_mode(body))


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
    who = _acting(node, request[WHO], field(body, "account", str, default=None))
    limits = _limits(node, body)
    run = await runs.execute(node, who, text, model_name=model, limits=limits, plan_source=plan)
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
    limits = _limits(node, body, base=state)
    model = field(body, "model", str, default=state["model"])
    run = await runs.execute(node, who, state["request"] or "", model_name=model, limits=limits,
                             resume=state)
    return web.json_response(_summary(node, run))


async def show(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    return web.json_response(_summary(node, _run_id(request)))


ROUTES = [
    Route("POST", "/v1/forge/agent/runs", start,
          "Run an agent request {request, plan?, model?, account?, budget_cu?, max_calls?, "
          "max_tokens?, concurrency?, approval_wait_s?, mode?}; returns the run summary"),
    Route("POST", "/v1/forge/agent/runs/{run}/resume", resume,
          "Resume a run: reuse its passed results, re-run the rest (a new run)"),
    Route("GET", "/v1/forge/agent/runs/{run}", show, "A run's summary, from the ledger"),
]
