"""The mesh as the node sees it: the peer table (404 when the node runs without `--mesh`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.economy.credit import account_reputation
from forge_cli.errors import MeshNotRunning
from forge_cli.ledger import queries, witness
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
    cosigned, forks = witness.witness_counts(node.reader), witness.evidence_counts(node.reader)
    for row in rows:
        passed, disputed, forged = records.get(row["node_id"] or "", (0, 0, 0))
        row["audits"] = {"passed": passed, "disputed": disputed, "forged": forged}
        count, largest = cosigned.get(row["node_id"] or "", (0, None))
        # As a witness: how many of our checkpoints it cosigned; as a log: split views of it.
        row["witness"] = {"cosigned": count, "largest_size": largest}
        row["fork_evidence"] = forks.get(row["node_id"] or "", 0)
    return rows


async def peers(request: web.Request) -> web.Response:
    return web.json_response({"peers": peer_table(request.app[NODE])})


ROUTES = [
    Route("GET", "/v1/forge/peers", peers, "Peers found on the mesh (404 without --mesh)"),
]
