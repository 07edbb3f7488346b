#!/usr/bin/env python3
"""One model split across two loopback layer peers, against the same model unsplit.

    python bench/rpc_bench.py [--model smollm2:135m] [--tokens 64] [--runs 3]
                              [--peer-threads 1] [--json]

1. The unsplit engine in this process: load time, and greedy decode tokens/s.
2. Two `forge rpc serve` peers (their own FORGE_HOMEs, loopback) and a SplitEngine head in this
   process: load time with the peers' tensor caches cold, decode tokens/s (each of --runs
   rounds decodes unsplit then split; tokens/s and the ratio are medians over rounds), the bytes that
   crossed the tunnels per generated token (head → peers and back): over whole requests
   (prompt included), and per extra token (a 2-token request against a --tokens one) — the
   ratio split / unsplit is the price of the split on this machine. On one machine the peers
   share its cores with the head: --peer-threads (1) keeps them from starving each other.
3. The same head loaded again over the same peers: load time with the caches warm. ggml caches
   only tensors above 10 MiB, so a small model's layers load the same either way; the cache
   size printed says whether anything was cached.

No ledger is written (the head is not attached to a node, so nothing is metered). Every
process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Run {i}: write a long story about a lighthouse keeper and the sea."
START_TIMEOUT_S = 120


def start_peer(home: Path, threads: int) -> tuple[subprocess.Popen[str], str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_HOME=str(home), PYTHONPATH=str(REPO))
    # --rate 0: the bench's head pays no one, and a peer that charges carries only its credit
    # for a head that does not pay; speed and traffic are what is measured here.
    proc = subprocess.Popen([sys.executable, "-m", "forge_cli", "rpc", "serve", "--port", "0",
                             "--threads", str(threads), "--rate", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=REPO, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"forge rpc serve exited with {proc.wait()} before listening")
        if line.startswith("forge rpc serve listening on "):
            return proc, line.split()[-1]
    proc.kill()
    raise SystemExit("forge rpc serve did not start in time")


def decode(engine: Any, tokens: int, i: int) -> Any:
    """One greedy chat completion of `tokens` tokens (a fresh prompt per `i`)."""
    from forge_cli.inference.engine import Sampling

    return engine.chat([{"role": "user", "content": PROMPT.format(i=i)}],
                       Sampling(temperature=0, max_tokens=tokens, seed=1)).result()


def traffic(engine: Any) -> tuple[int, int]:
    peers = engine.split()["peers"]
    return (sum(p["tunnel_bytes_up"] for p in peers), sum(p["tunnel_bytes_down"] for p in peers))


def cache_bytes(homes: list[Path]) -> int:
    return sum(f.stat().st_size for home in homes for f in (home / "rpc-cache").rglob("*")
               if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peer-threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.tokens < 3 or args.runs < 1 or args.peer_threads < 1:
        parser.error("--tokens must be at least 3, --runs and --peer-threads at least 1")

    from forge_cli import identity
    from forge_cli.inference import catalog
    from forge_cli.inference.engine import Engine
    from forge_cli.rpc.split import SplitEngine

    _, path = catalog.find_model_file(args.model)
    started = time.perf_counter()
    unsplit = Engine(path, n_ctx=1024, slots=1)
    result: dict[str, Any] = {"model": args.model, "tokens": args.tokens, "runs": args.runs,
                              "peer_threads": args.peer_threads,
                              "unsplit_load_s": round(time.perf_counter() - started, 3)}
    with tempfile.TemporaryDirectory(prefix="forge-rpc-bench-") as tmp:
        homes = [Path(tmp) / f"peer{i}" for i in range(2)]
        peers = [start_peer(home, args.peer_threads) for home in homes]
        head = identity.Identity.generate()
        try:
            split = SplitEngine(path, name=args.model, urls=[url for _, url in peers],
                                signer=head, n_ctx=1024, slots=1)
            try:
                result["load_cold_s"] = round(split.load_s, 3)
                result["layers"] = {"head": split.plan.head if split.plan else [],
                                    "peers": [p["layers"] for p in split.split()["peers"]]}
                # Each round runs both, one after the other, so a ratio compares numbers
                # taken under the same load (the machine may be shared).
                rounds, produced, before = [], 0, traffic(split)
                for i in range(args.runs):
                    alone, shared = decode(unsplit, args.tokens, i), decode(split, args.tokens, i)
                    rounds.append((alone.tokens_per_s, shared.tokens_per_s))
                    produced += shared.completion_tokens
                after = traffic(split)
                short = decode(split, 2, args.runs)
                mid = traffic(split)
                long = decode(split, args.tokens, args.runs + 1)
                end = traffic(split)
            finally:
                split.close()
            extra = long.completion_tokens - short.completion_tokens
            result.update(
                unsplit_tokens_per_s=round(statistics.median(u for u, _ in rounds), 2),
                split_tokens_per_s=round(statistics.median(s for _, s in rounds), 2),
                split_over_unsplit=round(statistics.median(s / u for u, s in rounds if u), 3),
                tunnel_bytes_per_token_up=round((after[0] - before[0]) / produced),
                tunnel_bytes_per_token_down=round((after[1] - before[1]) / produced),
                tunnel_bytes_per_extra_token_up=round(
                    ((end[0] - mid[0]) - (mid[0] - after[0])) / extra),
                tunnel_bytes_per_extra_token_down=round(
                    ((end[1] - mid[1]) - (mid[1] - after[1])) / extra),
                cache_bytes_after_cold=cache_bytes(homes))
            warm = SplitEngine(path, name=args.model, urls=[url for _, url in peers],
                               signer=head, n_ctx=1024, slots=1)
            result["load_warm_s"] = round(warm.load_s, 3)
            warm.close()
        finally:
            unsplit.close()
            for proc, _ in peers:
                proc.terminate()
                proc.wait(timeout=60)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    print(f"model {args.model}: layers head {result['layers']['head']}, "
          f"peers {result['layers']['peers']}")
    print(f"decode  unsplit {result['unsplit_tokens_per_s']} tok/s · split over 2 loopback peers "
          f"{result['split_tokens_per_s']} tok/s · ratio {result['split_over_unsplit']} "
          f"(median of {args.runs} rounds)")
    print(f"tunnel  {result['tunnel_bytes_per_token_up']:,} B/token head→peers, "
          f"{result['tunnel_bytes_per_token_down']:,} B/token back (whole requests); per extra "
          f"token {result['tunnel_bytes_per_extra_token_up']:,} B up, "
          f"{result['tunnel_bytes_per_extra_token_down']:,} B back")
    print(f"load    unsplit {result['unsplit_load_s']} s · split cold cache "
          f"{result['load_cold_s']} s · warm cache {result['load_warm_s']} s "
          f"({result['cache_bytes_after_cold']:,} bytes cached by the peers)")


if __name__ == "__main__":
    main()
