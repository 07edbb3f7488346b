"""Lending routes: the pool, loans and credit; and the node's timers (overdue loans, heartbeat).

Every route first defaults the loans that are past due (on the ledger thread, like every
lending call), so what it answers is never stale; a timer does the same between requests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli import config
from forge_cli.node.web import (
    NODE,
    WHO,
    Route,
    account_query,
    bad_request,
    field,
    int_query,
    read_json,
)

if TYPE_CHECKING:
    from forge_cli.root.node import Node

log = logging.getLogger("forge.node")


async def _sweep(node: Node) -> None:
    await node.on_ledger(node.lending.sweep)


async def sweeper(node: Node) -> None:
    """Default overdue loans every `lending.sweep_s` seconds."""
    every = config.get("lending.sweep_s")
    while True:
        await asyncio.sleep(every)
        try:
            await _sweep(node)
        except Exception:  # keep the timer alive; the next request retries
            log.exception("overdue-loan sweep failed")


async def heartbeats(node: Node) -> None:
    """A `heartbeat` entry every `lending.heartbeat_s` seconds (the uptime part of credit)."""
    every = config.get("lending.heartbeat_s")
    while True:
        await asyncio.sleep(every)
        try:
            await node.on_ledger(node.lending.heartbeat, node.node_id)
        except Exception:
            log.exception("heartbeat failed")


def _int(body: dict[str, Any], name: str, *, required: bool = True) -> int | None:
    value = field(body, name, int, required=required)
    if value is not None and value <= 0 and name != "loan_id":
        raise bad_request(f"{name!r} must be a positive integer of CU, found {value}")
    if value is not None and value < 0:
        raise bad_request(f"{name!r} must not be negative, found {value}")
    return value


async def _caller(node: Node, request: web.Request) -> str:
    """The caller's account, given the free tier on first use (as a first inference would)."""
    who = request[WHO]
    if not who.is_operator:
        await node.on_ledger(node.wallet.free_tier, who.account_hex)
    return who.account_hex


async def lend(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    body = await read_json(request)
    amount = _int(body, "amount")
    await _caller(node, request)
    out = await node.on_ledger(node.lending.deposit, request[WHO].account_hex, amount)
    return web.json_response(out)


async def withdraw(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    body = await read_json(request)
    shares, amount = _int(body, "shares", required=False), _int(body, "amount", required=False)
    if (shares is None) == (amount is None):
        raise bad_request("give exactly one of 'shares' or 'amount'")
    out = await node.on_ledger(node.lending.withdraw, request[WHO].account_hex, shares=shares,
                               amount=amount)
    return web.json_response(out)


async def borrow(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    body = await read_json(request)
    amount, term, collateral = _int(body, "amount"), _int(body, "term_hours"), _int(body, "collateral")
    await _caller(node, request)
    loan = await node.on_ledger(node.lending.borrow, request[WHO].account_hex, amount, term,
                                collateral)
    return web.json_response(loan)


async def repay(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    body = await read_json(request)
    loan_id = _int(body, "loan_id")
    out = await node.on_ledger(node.lending.repay, request[WHO].account_hex, loan_id)
    return web.json_response(out)


async def pool(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    await _sweep(node)
    account = account_query(request)
    return web.json_response(await node.on_ledger(node.lending.pool, account))


async def loans(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    await _sweep(node)
    who = request[WHO]
    account = None if who.is_operator and request.query.get("all") else account_query(request)
    found = await node.on_ledger(node.lending.loans, account)
    return web.json_response({"loans": found, "count": len(found)})


async def credit(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    await _sweep(node)
    account = account_query(request)
    return web.json_response(await node.on_ledger(node.lending.credit, account))


async def settlement(request: web.Request) -> web.Response:
    """A signed statement of ?hours=24 back from now, or of ?from=&to= (unix ms)."""
    from forge_cli.economy import settlement as stmt

    node: Node = request.app[NODE]
    now = node.clock()
    price = int_query(request, "price", stmt.DEFAULT_PRICE_MSAT, 0, 10**9)
    if "from" in request.query or "to" in request.query:
        start = int_query(request, "from", 0, 0, 2**62)
        end = int_query(request, "to", now + 1, 0, 2**62)
    else:
        start, end = now - int_query(request, "hours", 24, 1, 24 * 3660) * 3_600_000, now + 1
    if start >= end:
        raise bad_request(f"from {start} must be before to {end}")
    doc = await node.on_ledger(stmt.build, node.ledger, start, end, price_msat=price, now_ms=now)
    return web.json_response(doc)


ROUTES = [
    Route("POST", "/v1/forge/lend", lend, "Deposit {amount} CU into the pool for shares"),
    Route("POST", "/v1/forge/withdraw", withdraw, "Redeem {shares} or {amount} CU from the pool"),
    Route("POST", "/v1/forge/borrow", borrow, "Borrow {amount, term_hours, collateral}"),
    Route("POST", "/v1/forge/repay", repay, "Repay {loan_id}: principal + interest"),
    Route("GET", "/v1/forge/pool", pool, "Pool cash, lent, shares, and the caller's stake"),
    Route("GET", "/v1/forge/loans", loans, "The caller's loans (?account, or ?all=1 for the operator)"),
    Route("GET", "/v1/forge/credit", credit, "Credit score and each of its components"),
    Route("GET", "/v1/forge/settlement", settlement,
          "Signed settlement statement (?hours=24 or ?from&to ms, ?price msat/CU)"),
]
