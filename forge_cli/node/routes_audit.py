"""Audit routes: a peer's dispute (re-checked here before it counts), an audit of a trade this
node holds, its record, and the upheld disputes peers pull (`puller` pulls theirs).

The dispute route is public: peers hold no tokens here, and a dispute authenticates itself by
its auditor's signature and the two signatures of the trade it disputes. What it may cost is
the auditor's (forge_cli.mesh.audit.Auditor.receive); what a sender without standing may cost
is bounded here too: REFUSALS_PER_MINUTE refused disputes per address, then a 429 that reads
no body.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from forge_cli.errors import Forbidden, ForgeError, NotFound, RecheckBusy
from forge_cli.ledger import queries
from forge_cli.node.throttle import Throttle
from forge_cli.node.web import (
    NODE,
    WHO,
    Route,
    bad_request,
    error_response,
    field,
    read_json,
)

if TYPE_CHECKING:
    from forge_cli.root.node import Node

log = logging.getLogger("forge.audit")

REFUSALS_PER_MINUTE = 20  # refused disputes one address may send a minute
REFUSALS: web.AppKey[Throttle] = web.AppKey("dispute_refusals", Throttle)


def refusals() -> Throttle:
    """The per-address count of refused disputes (one per application)."""
    return Throttle(REFUSALS_PER_MINUTE)


async def dispute(request: web.Request) -> web.Response:
    """{dispute, bodies}: re-checked with this node's copy of the model and recorded (202
    while its re-check still waits for an idle engine)."""
    node: Node = request.app[NODE]
    throttle = request.app[REFUSALS]
    address = request.remote or "?"
    wait = throttle.blocked_for(address)
    if wait:
        node.metrics.disputes_refused.labels("throttled").inc()
        return error_response(429, f"{REFUSALS_PER_MINUTE} disputes from {address} were refused "
                              f"in the last minute; retry in {wait} s", "rate_limit_error",
                              "disputes_throttled", {"Retry-After": str(wait)})
    try:
        outcome = await node.auditor.receive(await read_json(request))
    except ForgeError as exc:
        node.metrics.disputes_refused.labels(type(exc).__name__).inc()
        if not isinstance(exc, RecheckBusy):  # a quota refusal is counted by its quota
            throttle.failed(address)
        raise
    return web.json_response(outcome, status=202 if outcome["outcome"] == "queued" else 200)


async def audit_trade(request: web.Request) -> web.Response:
    """{seq}: audit the trade at that seq of this node's ledger (operator only); the outcome
    is recorded like a purchase's audit, and a dispute goes to the peers."""
    node: Node = request.app[NODE]
    if not request[WHO].is_operator:
        raise Forbidden("only the node operator may order an audit")
    seq = field(await read_json(request), "seq", int, required=True)
    if not 0 <= seq < node.ledger.size:
        raise NotFound(f"no entry {seq}; the ledger holds {node.ledger.size}")
    entry = node.reader.entry(seq)
    if entry.kind != "trade":
        raise bad_request(f"entry {seq} is a {entry.kind} entry, not a trade")
    done = await node.auditor.audit_held(entry.data, node.reader.body)
    claim = done.data.get("claim", {})
    return web.json_response({"seq": done.seq, "kind": done.kind,
                              "verdict": done.data.get("verdict", "passed"),
                              "reason": claim.get("reason", ""),
                              "failing_positions": [f["pos"] for f in claim.get("failures", [])]})


async def audits(request: web.Request) -> web.Response:
    """Per peer: audits passed, disputes upheld against it, disputes it forged."""
    node: Node = request.app[NODE]
    rows = queries.audit_records(node.reader)
    return web.json_response({"peers": [
        {"node_id": account, "passed": passed, "disputed": disputed, "forged": forged}
        for account, (passed, disputed, forged) in sorted(rows.items())]})


async def disputes(request: web.Request) -> web.Response:
    """?after=SEQ: the upheld disputes of this node's ledger after SEQ, relayed by this node,
    for a peer that pulls them (a late joiner)."""
    node: Node = request.app[NODE]
    raw = request.query.get("after", "-1")
    if not raw.lstrip("-").isdecimal() or len(raw) > 20 or not -1 <= int(raw) < 2**63:
        raise bad_request(f"after must be a ledger seq (an integer from -1), found {raw[:40]!r}")
    page = await asyncio.to_thread(_page, node, int(raw))
    return web.json_response(page)


def _page(node: Node, after: int) -> dict[str, object]:
    from forge_cli.mesh import audit

    node.reader.refresh()
    return audit.disputes_page(node.reader, node.signer, after)


async def puller(node: Node, every_s: float = 10.0) -> None:
    """Pull the disputes each trusted peer upheld, every `every_s` (a node that joins late
    learns of them); per-peer cursors live for the process."""
    from forge_cli.client import AsyncClient
    from forge_cli.errors import ForgeError
    from forge_cli.mesh import audit

    cursors: dict[str, int] = {}
    while True:
        await asyncio.sleep(every_s)
        if node.mesh is None:
            return
        for peer in node.mesh.trusted_peers():
            if peer.node_id is None or peer.node_id == node.node_id:
                continue
            client = AsyncClient(peer.url, timeout=60, session=node.peer_buyer().session,
                                 max_bytes=audit.PULL_PAGE_MAX_BYTES)
            try:
                cursors[peer.node_id] = await node.auditor.pull(
                    peer.url, client.get, cursors.get(peer.node_id, -1))
            except ForgeError as exc:
                log.info("could not pull disputes from %s: %s", peer.url, exc)


ROUTES = [
    Route("POST", "/v1/forge/audit/dispute", dispute,
          "A peer's audit dispute with its bodies: re-checked here, recorded as upheld or forged",
          public=True),
    Route("POST", "/v1/forge/audit/trade", audit_trade,
          "Audit a trade of this node's ledger (operator): recorded as audit or dispute"),
    Route("GET", "/v1/forge/audit/disputes", disputes,
          "Upheld disputes of this node's ledger after ?after=SEQ, relayed by this node (peers "
          "pull them)", public=True),
    Route("GET", "/v1/forge/audits", audits,
          "Audit record per peer: audits passed, disputes upheld against it, disputes it forged"),
]
