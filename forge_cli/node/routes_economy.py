"""Economy read routes: balance, pricing, trades, network, providers, route."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

from forge_cli.economy.credit import account_reputation
from forge_cli.errors import StorageError, UsageError
from forge_cli.ledger import entries, queries, views
from forge_cli.mesh.protocol import MODES, rank
from forge_cli.node import routes_mesh
from forge_cli.node.web import NODE, Route, account_query, bad_request, int_query

if TYPE_CHECKING:
    from forge_cli.root.node import Node


async def balance(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    account = account_query(request)
    current, reserved = node.wallet.books(account)
    spent, earned, _ = node.reader.row(views.TRADE_TOTALS, (account,)) or (0, 0, 0)
    escrow = (node.reader.row(views.ESCROW, (account,)) or (0,))[0]
    return web.json_response({
        "account": account, "balance": current, "reserved": reserved,
        "available": current - reserved, "earned": earned, "spent": spent, "escrow": escrow,
        "reputation": account_reputation(node.reader, account),
        "free_tier_pending": node.wallet.free_tier_pending(account),
    })


async def pricing(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    out = []
    for model in node.models.values():
        price = node.price(model)
        out.append({
            "model": model.name, "params": model.params, "price_ucu_per_token": price,
            "cu_per_token": price / 1_000_000, "market": node.markets[model.name].snapshot(model.params),
            "estimate_cu": {"100": entries.trade_cost(100, price),
                            "1000": entries.trade_cost(1000, price)},
            "prompt_tokens": "free: only completion tokens are charged",
            "formula": "cu = ceil(completion_tokens × price_ucu_per_token / 1e6)",
            "embeddings": {"price_ucu_per_input_token": price,
                           "formula": "cu = ceil(input_tokens × price_ucu_per_token / 1e6)"},
        })
    return web.json_response({"models": out})


async def trades(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    limit = int_query(request, "limit", 50, 1, 1000)
    account = request.query.get("account")
    found: list[dict[str, Any]] = []
    for entry in node.reader.iter_newest("trade"):  # walks back only as far as it must
        terms = entry.data["terms"]
        if account and account not in (terms["provider"], terms["consumer"]):
            continue
        found.append({"seq": entry.seq, "hash": entry.hash.hex(), **terms,
                      "provider_sig": entry.data["provider_sig"],
                      "consumer_sig": entry.data["consumer_sig"]})
        if len(found) == limit:
            break
    return web.json_response({"trades": found, "count": queries.trade_count(node.reader)})


async def network(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    count = queries.trade_count(node.reader)
    view = await asyncio.to_thread(node.network.summary)
    volume = queries.trade_volume(node.reader)
    note = await node.on_ledger(node.ledger.checkpoint)  # reused while the size is the same
    latest = node.ledger.latest_checkpoint()
    if latest is None:  # checkpoint() just wrote one
        raise StorageError("the ledger holds no checkpoint after writing one")
    size, root, _, vkey = latest
    # `trades` and `root` are the network view's (every verified trade, ours and gossiped);
    # `merkle_root` and `ledger_trades` are this node's own ledger.
    return web.json_response({
        "node_id": node.node_id, "ledger_size": size, "merkle_root": root.hex(),
        "ledger_trades": count, "trade_volume_cu": volume, "checkpoint": note, "vkey": vkey,
        **view,
    })


def _providers(node: Node) -> list[dict[str, Any]]:
    """This node's models, then (with --mesh) every model an unflagged peer offers."""
    local = [{"node_id": node.node_id, "model": m.name, "model_sha256": m.sha256,
              "params": m.params, "price_ucu_per_token": node.price(m), "local": True,
              "reputation": account_reputation(node.reader, node.node_id)}
             for m in node.models.values()]
    if node.mesh is None:
        return local
    remote = [{"node_id": peer["node_id"], "model": offer["name"], "model_sha256": offer["sha256"],
               "params": offer["params"], "price_ucu_per_token": offer["price_ucu_per_token"],
               "local": False, "reputation": peer["reputation"], "url": peer["url"]}
              for peer in routes_mesh.peer_table(node) if not peer["flagged"]
              for offer in peer["models"] if offer["price_ucu_per_token"] > 0]
    return local + remote


async def providers(request: web.Request) -> web.Response:
    return web.json_response({"providers": _providers(request.app[NODE])})


async def route(request: web.Request) -> web.Response:
    node: Node = request.app[NODE]
    model = request.query.get("model")
    mode = request.query.get("mode", "balanced")
    if mode not in MODES:
        raise bad_request(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
    max_cu = int_query(request, "max_cu", 2**62, 0, 2**62)
    candidates = [p for p in _providers(node) if model in (None, p["model"])]
    if model is not None and not candidates:
        raise UsageError(f"no provider serves model {model!r}")
    affordable = [p for p in candidates if entries.trade_cost(1, p["price_ucu_per_token"]) <= max_cu]
    ranked = rank(affordable, mode)
    return web.json_response({"mode": mode, "max_cu": max_cu, "choice": ranked[0] if ranked else None,
                              "candidates": ranked})


ROUTES = [
    Route("GET", "/v1/forge/balance", balance, "Caller's balance, reserved and available CU"),
    Route("GET", "/v1/forge/pricing", pricing, "Prices, their market inputs, and estimates"),
    Route("GET", "/v1/forge/trades", trades, "Recent trades (?limit, ?account)"),
    Route("GET", "/v1/forge/network", network, "Totals, Merkle root and latest checkpoint"),
    Route("GET", "/v1/forge/providers", providers, "Providers known to this node"),
    Route("GET", "/v1/forge/route", route, "Best provider for ?model&max_cu&mode"),
]
