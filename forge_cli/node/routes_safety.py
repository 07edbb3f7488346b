"""Safety routes: status, kill switch, policies, approvals (operator-only writes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from forge_cli.errors import Forbidden
from forge_cli.node.web import NODE, WHO, Route, bad_request, field, read_json

if TYPE_CHECKING:
    from forge_cli.root.node import Node

POLICY_FIELDS = ("per_request_cap_cu", "hourly_budget_cu", "lifetime_budget_cu",
                 "approval_threshold_cu")


def _operator(request: web.Request) -> None:
    if not request[WHO].is_operator:
        raise Forbidden("only the node operator may change safety settings")


async def status(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    who = request[WHO]
    account = request.query.get("account") if who.is_operator else who.account_hex
    return web.json_response(await node.on_ledger(node.safety.status, account))


async def kill(request: web.Request) -> web.Response:
    _operator(request)
    node: Node = request.app[NODE]
    body = await read_json(request)
    activate = field(body, "activate", bool, default=True)
    reason = field(body, "reason", str, default="")
    if activate and not reason.strip():
        raise bad_request("activating the kill switch needs a reason")
    return web.json_response(await node.set_kill_switch(activate, reason))


async def policy(request: web.Request) -> web.Response:
    _operator(request)
    node: Node = request.app[NODE]
    body = await read_json(request)
    account = field(body, "account", str, default="*")
    values = {}
    for name in POLICY_FIELDS:
        value = field(body, name, int, default=None)
        if value is not None:
            if value <= 0:
                raise bad_request(f"{name} must be a positive integer, found {value}")
            values[name] = value
    if not values:
        raise bad_request(f"give at least one of {', '.join(POLICY_FIELDS)}")
    await node.on_ledger(node.safety.set_policy, account, **values)
    node.publish_safety()
    return web.json_response(await node.on_ledger(node.safety.status, None if account == "*"
                                                  else account))


async def approve(request: web.Request) -> web.Response:
    _operator(request)
    node: Node = request.app[NODE]
    body = await read_json(request)
    approval_id = field(body, "id", str, required=True)
    deny = field(body, "deny", bool, default=False)
    decide = node.safety.deny if deny else node.safety.approve
    approval = await node.on_ledger(decide, approval_id)
    node.publish_safety()
    return web.json_response(approval)


async def pending(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    return web.json_response({"pending": await node.on_ledger(node.safety.pending)})


ROUTES = [
    Route("GET", "/v1/forge/safety", status, "Kill switch, breaker, policy, budgets, approvals"),
    Route("POST", "/v1/forge/kill", kill, "Kill switch on/off {activate, reason} (operator)"),
    Route("POST", "/v1/forge/policy", policy, "Set a spending policy (operator)"),
    Route("POST", "/v1/forge/approve", approve, "Approve or deny a pending spend (operator)"),
    Route("GET", "/v1/forge/approvals", pending, "Pending approvals"),
]
