"""Witness routes: cosign mesh peers' checkpoints (c2sp.org/tlog-witness add-checkpoint), and
serve the split-view evidence this node holds so its peers can check it and flag the log.

Both are public: a checkpoint and a piece of evidence authenticate themselves by the log's
signatures, which are verified before anything is written or believed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from forge_cli import display
from forge_cli.errors import ProofFailed
from forge_cli.ledger import witness
from forge_cli.node.web import NODE, Route, error_response

if TYPE_CHECKING:
    from forge_cli.root.node import Node

SIZE_TYPE = "text/x.tlog.size"


def _witnessed_logs(node: Node) -> set[str]:
    """The node ids whose logs this node witnesses: its mesh peers (flagged ones too, so a
    second split view is still caught), never itself."""
    if node.mesh is None:
        return set()
    return {p.node_id for p in node.mesh.peers() if p.node_id and p.node_id != node.node_id}


async def add_checkpoint(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    sub = witness.parse_submission(await request.read())  # UsageError: 400
    origin = sub.checkpoint.origin
    log = witness.log_verifier(origin)
    if log is None or log.public_key.hex() not in _witnessed_logs(node):
        return error_response(404, f"this node witnesses the logs of its mesh peers; "
                              f"{display.plain(origin)[:100]} is not one of them",
                              "not_found_error", "unknown_log")
    node_id = log.public_key.hex()
    try:
        witness.open_submission(sub, log)
    except ProofFailed as exc:
        return error_response(403, str(exc), "permission_denied", "bad_signature")
    answer = await node.on_ledger(witness.add_checkpoint, node.ledger, sub, log)
    if answer.outcome == "cosigned":
        return web.Response(body=answer.lines.encode(), content_type="text/plain")
    if answer.outcome == "old_size":
        return web.Response(status=409, body=f"{answer.size}\n".encode(), content_type=SIZE_TYPE)
    if answer.outcome == "split_view":
        await node.flag_peer(node_id, answer.detail)
        return error_response(409, answer.detail, "conflict_error", "split_view")
    if answer.outcome == "bad_proof":
        return error_response(422, answer.detail, "invalid_request_error", "bad_proof")
    return error_response(403, answer.detail, "permission_denied", answer.outcome)


async def evidence(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    return web.json_response({"evidence": [e.to_json() for e in witness.evidence(node.reader)]})


ROUTES = [
    Route("POST", "/ledger/witness/add-checkpoint", add_checkpoint,
          "Cosign a mesh peer's checkpoint (c2sp.org/tlog-witness; public)", public=True),
    Route("GET", "/v1/forge/witness/evidence", evidence,
          "Split views on record: two checkpoints of one size a log signed (public)",
          public=True),
]
