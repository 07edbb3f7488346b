#!/usr/bin/env python3
"""The node against its physical limits, measured in the same run.

    python bench/node_bench.py [--json] [--tokens 128] [--runs 5] [--requests 4000]

1. Streaming tokens/s and time to first token through a real `forge node` (HTTP, SSE) vs the
   forge engine called directly in this process, same model (gemma3:270m from the PyPI
   package), prompt, greedy sampling and token count.
2. `GET /v1/forge/balance` requests/s and p99 latency under a bounded loopback load
   (`--requests` in all, `--concurrency` at once) against the node's single event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Write a long story about a lighthouse keeper who trades compute for bread."


def direct(path: Path, tokens: int, runs: int) -> tuple[float, float]:
    """Median tokens/s and TTFT (ms) of the engine in this process."""
    from forge_cli.inference.engine import Engine, Sampling

    speeds, ttfts = [], []
    with Engine(path, name="bench") as engine:
        sampling = Sampling(max_tokens=tokens, temperature=0.0, seed=1)
        engine.chat([{"role": "user", "content": "warm up"}], Sampling(max_tokens=4)).result()
        for _ in range(runs):
            started = time.perf_counter()
            stream = engine.chat([{"role": "user", "content": PROMPT}], sampling)
            first = None
            for _piece in stream:
                first = first or time.perf_counter()
            done = time.perf_counter()
            result = stream.completion
            speeds.append((result.completion_tokens - 1) / (done - first))
            ttfts.append((first - started) * 1000)
    return statistics.median(speeds), statistics.median(ttfts)


def start_node(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "forge_cli", "node", "-m", "gemma3:270m",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=REPO, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("forge node listening on "):
            return proc, line.split()[-1]
    raise SystemExit(f"node did not start (exit {proc.wait()})")


def through_node(url: str, token: str, tokens: int, runs: int) -> tuple[float, float]:
    """Median tokens/s and TTFT (ms) of streamed chat completions over HTTP."""
    host, port = url.removeprefix("http://").split(":")
    speeds, ttfts = [], []
    body = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
                       "temperature": 0, "seed": 1, "stream": True})
    for run in range(runs + 1):
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        first = last = None
        usage = None
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
            usage = chunk.get("usage") or usage
        conn.close()
        if run == 0:
            continue  # the first request also pays for the free-tier grant: a warm-up
        speeds.append((usage["completion_tokens"] - 1) / (last - first))
        ttfts.append((first - started) * 1000)
    return statistics.median(speeds), statistics.median(ttfts)


async def balance_load(url: str, token: str, requests: int, concurrency: int
                       ) -> tuple[float, float]:
    import aiohttp

    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                async with session.get(url + "/v1/forge/balance") as response:
                    await response.read()
                    assert response.status == 200
                latencies.append(time.perf_counter() - started)

        for _ in range(50):  # warm the connections
            async with session.get(url + "/v1/forge/balance") as response:
                await response.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return requests / elapsed, latencies[int(len(latencies) * 0.99) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from scratch import scratch_dir  # bench/scratch.py: removed however the run ends

    home = scratch_dir("forge-node-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_HOME=str(home), PYTHONPATH=str(REPO))
    os.environ["FORGE_HOME"] = str(home)
    from forge_cli.inference import catalog

    _, path = catalog.find_model_file("gemma3:270m")
    direct_tps, direct_ttft = direct(path, args.tokens, args.runs)
    proc, url = start_node(home, env)
    try:
        made = subprocess.run([sys.executable, "-m", "forge_cli", "wallet", "agent", "create",
                               "bench", "--json"], capture_output=True, text=True, env=env,
                              cwd=REPO, check=True)
        token = json.loads(made.stdout)["token"]
        node_tps, node_ttft = through_node(url, token, args.tokens, args.runs)
        rps, p99 = asyncio.run(balance_load(url, token, args.requests, args.concurrency))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    out = {
        "direct_tokens_per_s": direct_tps, "node_tokens_per_s": node_tps,
        "tokens_ratio": node_tps / direct_tps, "direct_ttft_ms": direct_ttft,
        "node_ttft_ms": node_ttft, "ttft_overhead_ms": node_ttft - direct_ttft,
        "balance_rps": rps, "balance_p99_ms": p99, "tokens": args.tokens, "runs": args.runs,
        "requests": args.requests, "concurrency": args.concurrency,
    }
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return
    print(f"gemma3:270m, {args.tokens} tokens, median of {args.runs} runs, greedy")
    print(f"tokens/s  node {node_tps:7.1f}   direct engine {direct_tps:7.1f}   ratio "
          f"{out['tokens_ratio']:.3f} (target >= 0.95)")
    print(f"TTFT      node {node_ttft:7.1f} ms direct engine {direct_ttft:7.1f} ms overhead "
          f"{out['ttft_overhead_ms']:.1f} ms (target < 15 ms)")
    print(f"balance   {rps:,.0f} requests/s, p99 {p99:.2f} ms ({args.requests} requests, "
          f"{args.concurrency} at once; target >= 3,000/s)")


if __name__ == "__main__":
    main()
