"""The mesh as the node sees it: the peer table (404 when the node runs without `--mesh`), and
each key's trust and collusion record over the network view (forge_cli.mesh.trust)."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.economy.credit import account_reputation
from forge_cli.errors import MeshNotRunning, NotFound, UsageError
from forge_cli.ledger import queries
from forge_cli.node.web import NODE, Route

if TYPE_CHECKING:
    from forge_cli.root.node import Node


def peer_table(node: Node) -> list[dict[str, Any]]:
    """The mesh's peers with the reputation and audit record this node's ledger gives each
    (raises when off)."""
    if node.mesh is None:
        raise MeshNotRunning("mesh is not running on this node",
                             hint="start it with `forge node --mesh` or `forge seed`")
    rows = node.mesh.table(lambda node_id: account_reputation(node.reader, node_id))
    records = queries.audit_records(node.reader)
    for row in rows:
        passed, disputed, forged = records.get(row["node_id"] or "", (0, 0, 0))
        row["audits"] = {"passed": passed, "disputed": disputed, "forged": forged}
    rep = node.trust()
    for row in rows:
        key = row["node_id"]
        row["trust_bp"] = rep.trust_bp(key) if key else None
        row["effective_bp"] = rep.effective_bp(key) if key else None
        row["collusion"] = rep.collusion(key).to_json() if key else None
    return rows


async def peers(request: web.Request) -> web.Response:
    return web.json_response({"peers": peer_table(request.app[NODE])})


_NODE_ID = re.compile(r"[0-9a-f]{64}")


async def collusion(request: web.Request) -> web.Response:
    """A key's trust here and its collusion record over the last 24 h of the network view:
    400 for anything but 64 lowercase hex digits, 404 for a key the view does not hold."""
    node: Node = request.app[NODE]
    key = request.match_info["node_id"]
    if not _NODE_ID.fullmatch(key):
        raise UsageError(f"a node id is 64 lowercase hex digits; found {len(key)} characters "
                         "that are not one")
    rep = await asyncio.to_thread(node.trust)
    if key != node.node_id and key not in rep.known():
        raise NotFound(f"node {key[:16]}… has no trade in this node's network view")
    return web.json_response({
        **rep.collusion(key).to_json(), "trust_bp": rep.trust_bp(key),
        "graph_bp": rep.graph_bp(key), "effective_bp": rep.effective_bp(key),
        "reputation": node.reputation(key), "computed_ms": rep.refreshed_ms})


ROUTES = [
    Route("GET", "/v1/forge/peers", peers, "Peers found on the mesh (404 without --mesh)"),
    Route("GET", "/v1/forge/collusion/{node_id}", collusion,
          "A key's trust and 24 h collusion heuristics (400 malformed, 404 unknown)"),
]
