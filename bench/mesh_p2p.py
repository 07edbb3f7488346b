#!/usr/bin/env python3
"""Peer-to-peer purchases against local inference, measured in the same run.

    python bench/mesh_p2p.py [--json] [--tokens 128] [--runs 5]

Same model (gemma3:270m from the PyPI package), prompt, greedy sampling and token count:

1. Physical limit: llama-cpp-python's own streaming completion in this process, no forge.
2. Local: the forge engine in this process.
3. P2P: a `forge seed` subprocess on 127.0.0.1 sells to a Buyer in this process (quote,
   signed intent, SSE stream, terms check, countersignature, both ledgers appended).

Reports decode tokens/s (first to last piece) of each and the P2P ratios against both,
plus the settlement overhead per request: from the provider's signed terms arriving to the
trade durable in the consumer's ledger (verify, countersign, settle round trip with the
provider's append, the consumer's append), and the whole request's wall time beyond local.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Write a long story about a lighthouse keeper who trades compute for bread."


def model_path() -> Path:
    from forge_cli.inference import catalog

    return catalog.find_model_file("gemma3:270m")[1]


def decode_speed(stamps: list[float], tokens: int) -> float:
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return (tokens - 1) / span if span > 0 else 0.0


class Direct:
    """llama-cpp-python on its own, with the GGUF's chat template: the physical limit."""

    def __init__(self, path: Path, engine: object) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=engine.n_ctx,  # type: ignore[attr-defined]
                                   n_threads=engine.n_threads, verbose=False)  # type: ignore[attr-defined]
        t = engine.template  # type: ignore[attr-defined]
        self.llm.chat_handler = Jinja2ChatFormatter(
            template=t.source, bos_token=t.bos_token, eos_token=t.eos_token).to_chat_handler()

    def run(self, tokens: int) -> list[float]:
        stamps = []
        for chunk in self.llm.create_chat_completion(
                [{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0.0,
                stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
        return stamps


def run_local(engine: object, tokens: int) -> tuple[list[float], int, float]:
    from forge_cli.inference.engine import Sampling

    started = time.perf_counter()
    stream = engine.chat([{"role": "user", "content": PROMPT}],  # type: ignore[attr-defined]
                         Sampling(max_tokens=tokens, temperature=0.0, seed=1))
    stamps = []
    for _piece in stream:
        stamps.append(time.perf_counter())
    return stamps, stream.completion.completion_tokens, time.perf_counter() - started


def start_seed(home: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_HOME=str(home), PYTHONPATH=str(REPO), FORGE_MESH_MDNS="false")
    proc = subprocess.Popen([sys.executable, "-m", "forge_cli", "seed", "-m", "gemma3:270m",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=REPO, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("forge node listening on "):
            return proc, line.split()[-1]
    raise RuntimeError("the seed did not start")


async def measure(path: Path, url: str, home: Path, tokens: int, runs: int) -> dict[str, float]:
    """Each run measures direct, local and P2P back to back (CPU speed drifts between runs on
    a shared machine, less within one); the ratios are medians of per-run ratios."""
    from forge_cli import config
    from forge_cli.inference.engine import Engine
    from forge_cli.mesh.worker import Worker

    os.environ["FORGE_HOME"] = str(home)
    engine = Engine(path, name="bench")
    direct = Direct(path, engine)
    rows: dict[str, list[float]] = {k: [] for k in (
        "direct", "local", "p2p", "vs_local", "vs_direct", "settle_ms", "local_wall", "p2p_wall")}
    try:
        async with Worker(config.ledger_path(None), peers=[url], mdns=False) as w:
            sellers = await w.find(None, None, 30)
            payload = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
                       "temperature": 0.0, "seed": 1}
            await w.buy(sellers, {**payload, "max_tokens": 4})  # warm all three
            await asyncio.to_thread(direct.run, 4)
            await asyncio.to_thread(run_local, engine, 4)
            for _ in range(runs):
                local_stamps, n, local_wall = await asyncio.to_thread(run_local, engine, tokens)
                direct_speed = decode_speed(await asyncio.to_thread(direct.run, tokens), n)
                started = time.perf_counter()
                purchase = await w.buy(sellers, payload)
                p2p_wall = time.perf_counter() - started
                got = purchase.terms["completion_tokens"]
                p2p_speed = (got - 1) / (purchase.last_piece_s - purchase.first_piece_s)
                local_speed = decode_speed(local_stamps, n)
                rows["direct"].append(direct_speed)
                rows["local"].append(local_speed)
                rows["p2p"].append(p2p_speed)
                rows["vs_local"].append(p2p_speed / local_speed)
                rows["vs_direct"].append(p2p_speed / direct_speed)
                rows["settle_ms"].append(purchase.settle_s * 1000)
                rows["local_wall"].append(local_wall)
                rows["p2p_wall"].append(p2p_wall)
    finally:
        engine.close()
        direct.llm.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"tokens": tokens, "runs": runs, "raw_llama_tokens_per_s": med["direct"],
            "local_tokens_per_s": med["local"], "p2p_tokens_per_s": med["p2p"],
            "p2p_vs_local": med["vs_local"], "p2p_vs_raw_llama": med["vs_direct"],
            "settle_ms": med["settle_ms"], "settle_ms_max": max(rows["settle_ms"]),
            "local_wall_s": med["local_wall"], "p2p_wall_s": med["p2p_wall"],
            "p2p_request_overhead_ms": (med["p2p_wall"] - med["local_wall"]) * 1000}


def run(tokens: int, runs: int) -> dict[str, float]:
    path = model_path()
    with tempfile.TemporaryDirectory(prefix="forge-mesh-bench-") as tmp:
        proc, url = start_seed(Path(tmp) / "seed")
        try:
            return asyncio.run(measure(path, url, Path(tmp) / "worker", tokens, runs))
        finally:
            proc.terminate()
            proc.wait(60)


def report(r: dict[str, float]) -> None:
    print(f"P2P purchase vs local inference (gemma3:270m, {r['tokens']} tokens, greedy, "
          f"median of {r['runs']})")
    print(f"  llama-cpp-python direct  {r['raw_llama_tokens_per_s']:8.1f} tokens/s  (limit)")
    print(f"  forge engine, local      {r['local_tokens_per_s']:8.1f} tokens/s")
    print(f"  P2P via a forge seed     {r['p2p_tokens_per_s']:8.1f} tokens/s  "
          f"= {r['p2p_vs_local']:.3f}x local, {r['p2p_vs_raw_llama']:.3f}x limit (target >= 0.9x)")
    print(f"  settlement per request   {r['settle_ms']:8.2f} ms median, "
          f"{r['settle_ms_max']:.2f} ms max (terms in -> trade durable in both ledgers)")
    print(f"  whole request            {r['p2p_wall_s'] * 1000:8.1f} ms P2P vs "
          f"{r['local_wall_s'] * 1000:.1f} ms local (+{r['p2p_request_overhead_ms']:.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.tokens, args.runs)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        report(result)


if __name__ == "__main__":
    main()
