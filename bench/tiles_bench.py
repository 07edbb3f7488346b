#!/usr/bin/env python3
"""Serving the ledger as C2SP tlog-tiles: a real `forge node` against `python -m http.server`
serving the same tree exported by `forge ledger tiles export`, in the same run.

    python bench/tiles_bench.py                      # quick: 10,000 entries, 3 rounds
    python bench/tiles_bench.py -n 100000 --rounds 5 # the issue's figure

Each round, `--readers` (64) concurrent readers each read the whole log (checkpoint, every
hash tile at every level, every entry bundle) from one server, then from the other (the
order alternates by round). Reported per server: MB/s (all readers' bytes over the round's
wall time) and p99 request latency, as medians over rounds, with the load average before and
after (the client shares the machine with both servers: read the numbers with the load).
Requests ask for `Accept-Encoding: identity` so both serve the same bytes.
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from forge_cli import identity  # noqa: E402
from forge_cli.ledger import tiles  # noqa: E402
from forge_cli.ledger.store import Draft, Ledger  # noqa: E402

BATCH = 5_000


def build(home: Path, size: int) -> list[str]:
    """A node home whose ledger holds `size` notes and a checkpoint of them; the tile paths."""
    me = identity.load_or_create(home / "node.key")
    with Ledger.open_writer(home / "ledger.db", me, synchronous="normal") as book:
        for start in range(0, size, BATCH):
            book.append_many([Draft("note", {"text": f"bench entry {i} " + "x" * 200})
                              for i in range(start, min(size, start + BATCH))])
        book.checkpoint()
    return ["checkpoint", *(t.path() for t in tiles.tiles_for_size(size))]


class Static:
    """`python -m http.server` serving `directory` on an ephemeral loopback port."""

    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
             "--directory", str(directory)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        watchdog = threading.Timer(60, self.proc.kill)
        watchdog.start()
        try:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
        finally:
            watchdog.cancel()
        if "port" not in line:
            raise SystemExit(f"http.server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{line.split('port')[1].split()[0]}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def read_whole_log(session: aiohttp.ClientSession, base: str, paths: list[str],
                         latencies: list[float]) -> int:
    got = 0
    for path in paths:
        started = time.perf_counter()
        async with session.get(f"{base}/{path}", headers={"Accept-Encoding": "identity"}) as r:
            body = await r.read()
            if r.status != 200:
                raise SystemExit(f"{base}/{path}: HTTP {r.status}")
        latencies.append(time.perf_counter() - started)
        got += len(body)
    return got


async def one_round(base: str, paths: list[str], readers: int) -> dict[str, float]:
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=1800)
    connector = aiohttp.TCPConnector(limit=readers)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                     auto_decompress=False) as session:
        started = time.perf_counter()
        sizes = await asyncio.gather(*(read_whole_log(session, base, paths, latencies)
                                       for _ in range(readers)))
        wall = time.perf_counter() - started
    if len(set(sizes)) != 1:
        raise SystemExit(f"readers of {base} got different byte counts: {sorted(set(sizes))}")
    latencies.sort()
    return {"mb_per_s": sum(sizes) / wall / 1e6, "wall_s": wall, "bytes_per_reader": sizes[0],
            "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
            "p50_ms": latencies[len(latencies) // 2] * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--entries", type=int, default=10_000)
    parser.add_argument("--readers", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.entries < 1 or args.readers < 1 or args.rounds < 1:
        parser.error("--entries, --readers and --rounds must be at least 1")
    from tests.gguf_model import write_tiny_llama
    from tests.node_harness import NodeProcess

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tiles-bench-") as tmp:
        work = Path(tmp)
        (work / "home").mkdir()
        t0 = time.perf_counter()
        paths = build(work / "home", args.entries)
        built_s = time.perf_counter() - t0
        with Ledger.open_reader(work / "home" / "ledger.db") as book:
            t0 = time.perf_counter()
            export = tiles.export(book, work / "site")
            export_s = time.perf_counter() - t0
        model = write_tiny_llama(work / "tiny.gguf")
        static = Static(work / "site")
        results: dict[str, list[dict[str, float]]] = {"node": [], "http.server": []}
        try:
            with NodeProcess(work / "home", model) as node:
                bases = {"node": node.url + "/ledger", "http.server": static.url}
                for round_no in range(args.rounds):
                    order = ["node", "http.server"]
                    if round_no % 2:
                        order.reverse()
                    for name in order:
                        results[name].append(asyncio.run(one_round(bases[name], paths,
                                                                   args.readers)))
        finally:
            static.close()
    load_after = os.getloadavg()
    summary = {
        "entries": args.entries, "readers": args.readers, "rounds": args.rounds,
        "requests_per_reader": len(paths), "bytes_per_reader": export.bytes,
        "build_s": round(built_s, 2), "export_s": round(export_s, 2),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after], "cores": os.cpu_count(),
        **{name: {key: round(statistics.median(r[key] for r in rounds), 2)
                  for key in ("mb_per_s", "p99_ms", "p50_ms", "wall_s")}
           for name, rounds in results.items()},
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.entries:,} entries, {len(paths)} requests and {export.bytes:,} bytes per "
          f"reader, {args.readers} readers, {args.rounds} interleaved rounds (medians); "
          f"{os.cpu_count()} cores, load {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    for name in ("node", "http.server"):
        r = summary[name]
        print(f"  {name:12} {r['mb_per_s']:8.1f} MB/s   p99 {r['p99_ms']:8.1f} ms   "
              f"p50 {r['p50_ms']:7.1f} ms   round {r['wall_s']:.1f} s")
    ratio = summary["node"]["mb_per_s"] / summary["http.server"]["mb_per_s"]
    print(f"  node / http.server throughput: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
