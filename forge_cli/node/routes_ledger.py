"""Ledger routes: checkpoints, entries, inclusion and consistency proofs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from forge_cli.errors import NotFound, StorageError
from forge_cli.node.web import NODE, Route, bad_request, int_query

if TYPE_CHECKING:
    from forge_cli.root.node import Node


async def checkpoint(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    text = await node.on_ledger(node.ledger.checkpoint)
    latest = node.ledger.latest_checkpoint()
    if latest is None:  # checkpoint() just wrote one
        raise StorageError("the ledger holds no checkpoint after writing one")
    return web.json_response({"size": latest[0], "root": latest[1].hex(), "note": text,
                              "vkey": latest[3]})


async def verify(request: web.Request) -> web.Response:
    """The whole ledger checked on a reader of its own, off the ledger thread (?deep=1),
    once the writer has confirmed its files are the ones it opened (503 if not)."""
    import asyncio

    from forge_cli.ledger import verify as verifier
    from forge_cli.ledger.store import Ledger

    node: Node = request.app[NODE]
    deep = request.query.get("deep", "0")
    if deep not in ("0", "1"):
        raise bad_request(f"query parameter deep must be 0 or 1, found {deep!r}")

    def check() -> dict:
        with Ledger.open_reader(node.ledger.path) as book:
            return verifier.verify(book, deep=deep == "1").to_json()

    # Ask the writer first: a reader opened on files that were deleted under the node would
    # verify the wrong thing (the reader itself is read-only and cannot harm them).
    await node.on_ledger(node.ledger.check_files)
    return web.json_response(await asyncio.get_running_loop().run_in_executor(None, check))


async def entries_(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    size = node.ledger.size
    start = int_query(request, "start", max(0, size - 50), 0, max(size, 0))
    limit = int_query(request, "limit", 50, 1, 1000)
    out = [e.to_json() for e in node.reader.iter_entries(start, min(size, start + limit))]
    return web.json_response({"size": size, "entries": out})


def _seq(request: web.Request) -> int:
    raw = request.match_info["seq"]
    if not raw.isdigit():
        raise bad_request(f"seq must be a non-negative integer, found {raw!r}")
    return int(raw)


async def entry(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    seq = _seq(request)
    if seq >= node.ledger.size:
        raise NotFound(f"no entry {seq}")
    return web.json_response(node.reader.entry(seq).to_json())


async def proof(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    seq = _seq(request)
    if seq >= node.ledger.size:
        raise NotFound(f"no entry {seq}; the ledger holds {node.ledger.size}")
    size = int_query(request, "size", node.ledger.size, 1, node.ledger.size)
    if seq >= size:
        raise NotFound(f"no entry {seq} in a tree of size {size}")
    nodes = await node.on_ledger(node.ledger.inclusion_proof, seq, size)
    root = await node.on_ledger(node.ledger.root, size)
    return web.json_response({"seq": seq, "size": size, "leaf_hash": node.reader.entry(seq).hash.hex(),
                              "root": root.hex(), "proof": [n.hex() for n in nodes]})


async def consistency(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    new = int_query(request, "new", node.ledger.size, 0, node.ledger.size)
    old = int_query(request, "old", 0, 0, new)
    nodes = await node.on_ledger(node.ledger.consistency_proof, old, new)
    old_root = await node.on_ledger(node.ledger.root, old)
    new_root = await node.on_ledger(node.ledger.root, new)
    return web.json_response({"old_size": old, "new_size": new, "old_root": old_root.hex(),
                              "new_root": new_root.hex(), "proof": [n.hex() for n in nodes]})


ROUTES = [
    # Public: peers check each other's logs for forks, and these reveal only hashes.
    Route("GET", "/v1/forge/ledger/checkpoint", checkpoint, "Sign and return a checkpoint",
          public=True),
    Route("GET", "/v1/forge/ledger/verify", verify, "Verify the whole ledger (?deep=1)"),
    Route("GET", "/v1/forge/ledger/entries", entries_, "Entries (?start, ?limit)"),
    Route("GET", "/v1/forge/ledger/entry/{seq}", entry, "One entry"),
    Route("GET", "/v1/forge/ledger/proof/{seq}", proof, "Inclusion proof (?size)"),
    Route("GET", "/v1/forge/ledger/consistency", consistency, "Consistency proof (?old, ?new)",
          public=True),
]
