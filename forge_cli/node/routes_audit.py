"""Audit routes: a peer's dispute (re-checked here before it counts), and this node's record.

The dispute route is public: peers hold no tokens here, and a dispute authenticates itself by
its auditor's signature and the two signatures of the trade it disputes.
"""

from __future__ import annotations

from aiohttp import web

from forge_cli.ledger import queries
from forge_cli.node.web import NODE, Route, read_json
from forge_cli.trade.node import Node


async def dispute(request: web.Request) -> web.Response:
    """{dispute, bodies}: re-checked with this node's copy of the model and recorded."""
    node: Node = request.app[NODE]
    return web.json_response(await node.auditor.receive(await read_json(request)))


async def audits(request: web.Request) -> web.Response:
    """Per peer: audits passed, disputes upheld against it, disputes it forged."""
    node: Node = request.app[NODE]
    rows = queries.audit_records(node.reader)
    return web.json_response({"peers": [
        {"node_id": account, "passed": passed, "disputed": disputed, "forged": forged}
        for account, (passed, disputed, forged) in sorted(rows.items())]})


ROUTES = [
    Route("POST", "/v1/forge/audit/dispute", dispute,
          "A peer's audit dispute with its bodies: re-checked here, recorded as upheld or forged",
          public=True),
    Route("GET", "/v1/forge/audits", audits,
          "Audit record per peer: audits passed, disputes upheld against it, disputes it forged"),
]
