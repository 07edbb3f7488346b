"""The ledger as a C2SP tlog-tiles log under /ledger/: the checkpoint, hash tiles and entry
bundles, public like the log itself (redacted bodies are never in an entry)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from forge_cli.errors import NotFound, UsageError
from forge_cli.ledger import tiles, witness
from forge_cli.node.web import NODE, Route, bad_request, forge_error_response

if TYPE_CHECKING:
    from forge_cli.root.node import Node

# tlog-tiles: the checkpoint is mutable (cache a few seconds at most); a tile never changes.
CHECKPOINT_CACHE = "public, max-age=2"
FULL_TILE_CACHE = "public, max-age=31536000, immutable"
# A partial tile's bytes never change either, but the spec lets a log drop it once the full
# tile exists, so it is not promised forever.
PARTIAL_TILE_CACHE = "public, max-age=86400"


async def checkpoint(request: web.Request) -> web.Response:
    """The latest checkpoint as a signed note (signing one if the tree grew since), with the
    cosignatures its peers gave for that size (tlog-cosignature/v1 lines) appended."""
    node: Node = request.app[NODE]
    text = await node.on_ledger(node.ledger.checkpoint)
    text = await node.on_ledger(witness.with_cosignatures, node.ledger, text)
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": CHECKPOINT_CACHE})


async def tile(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    try:
        ref = tiles.parse_path(request.match_info["path"])
    except UsageError as exc:
        raise bad_request(str(exc)) from None
    data = tiles.read(node.reader, ref)
    if data is None:
        what = "tile" if ref.full else "partial tile (no checkpoint names its size)"
        response = forge_error_response(NotFound(f"no {what} {ref.path()} in this log"))
        response.headers["Cache-Control"] = "no-store"  # it may exist soon
        return response
    response = web.Response(body=data, content_type="application/octet-stream",
                            headers={"Cache-Control": FULL_TILE_CACHE if ref.full
                                     else PARTIAL_TILE_CACHE})
    if ref.entries:
        response.enable_compression()  # the spec asks for it; only if the client accepts one
    return response


ROUTES = [
    Route("GET", "/ledger/checkpoint", checkpoint,
          "C2SP tlog-tiles checkpoint (signed note)", public=True),
    Route("GET", "/ledger/tile/{path:.+}", tile,
          "C2SP tlog-tiles hash tile <L>/<N>[.p/<W>] or entry bundle entries/<N>[.p/<W>]",
          public=True),
]
