#!/usr/bin/env python3
"""Ledger throughput against the physical limits measured in the same run.

    python bench/ledger_bench.py -n 100000 [--json] [--durable 1000]

Limits: raw SQLite commits/s (WAL, synchronous=FULL, one row per commit, same disk) and raw
PyNaCl Ed25519 verifies/s on one core and on every core (threads). Every forge figure is
printed next to its limit; `verify` is held to cores x the one-core raw rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nacl.signing import SigningKey  # noqa: E402

from forge_cli import parallel  # noqa: E402
from forge_cli.identity import Identity  # noqa: E402
from forge_cli.ledger import verify as verifier  # noqa: E402
from forge_cli.ledger.store import Draft, Ledger  # noqa: E402


def raw_sqlite_commits_per_s(folder: Path, count: int) -> float:
    conn = sqlite3.connect(folder / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    payload = os.urandom(300)
    start = time.perf_counter()
    for i in range(count):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, payload))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


def cpu_s() -> float:
    """CPU seconds used by this process and its finished children (verify's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def raw_nacl_verifies_per_s(count: int, threads: int = 1) -> tuple[float, float]:
    """Bare PyNaCl verifies of one 32-byte message (a leaf hash), on `threads` threads:
    verifies/s, and CPU microseconds per verify (hardly moved by other load)."""
    key = SigningKey.generate()
    message = os.urandom(32)
    signature = key.sign(message).signature
    verify_key = key.verify_key
    per_thread = max(1, count // threads)

    def loop() -> None:
        for _ in range(per_thread):
            verify_key.verify(message, signature)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    start, cpu = time.perf_counter(), cpu_s()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done = per_thread * threads
    return done / (time.perf_counter() - start), (cpu_s() - cpu) / done * 1e6


def timed_verify(reader: Ledger, n: int, **kwargs: object) -> tuple[float, float]:
    """Entries/s and CPU microseconds per entry (every process) of one verify."""
    start, cpu = time.perf_counter(), cpu_s()
    report = verifier.verify(reader, **kwargs)  # type: ignore[arg-type]
    rate = n / (time.perf_counter() - start)
    assert report.ok, report.findings[:3]
    return rate, (cpu_s() - cpu) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="ledger size (entries)")
    parser.add_argument("--durable", type=int, default=1000,
                        help="how many durable single appends (and raw commits) to time")
    parser.add_argument("--callers", type=int, default=8,
                        help="concurrent callers for the group-commit durable figure")
    parser.add_argument("--batch", type=int, default=1000, help="entries per batched append")
    parser.add_argument("--raw", type=int, default=20_000,
                        help="raw PyNaCl verifies per core for each limit measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="forge-bench-", dir=args.dir))
    me, peer = Identity.generate(), Identity.generate()
    out: dict[str, float | int] = {"n": args.n}

    out["sqlite_commits_per_s"] = raw_sqlite_commits_per_s(folder, args.durable)

    db = folder / "ledger.db"
    book = Ledger.open_writer(db, me)
    book.append("grant", {"account": me.node_id, "cu": 10**15})
    remaining = args.n - 1 - args.durable
    start = time.perf_counter()
    done = 0
    while done < remaining:
        step = min(args.batch, remaining - done)
        book.append_many([Draft("transfer", {"from": me.node_id, "to": peer.node_id, "cu": 1})
                          for _ in range(step)])
        done += step
    out["batched_appends_per_s"] = remaining / (time.perf_counter() - start)

    # Durable appends: each call returns only after its own commit (fsync) is done. One caller
    # in a loop pays a commit per entry; callers arriving together share one (group commit),
    # which is what a node serving many requests does.
    half = args.durable // 2
    start = time.perf_counter()
    for _ in range(half):
        book.append("transfer", {"from": me.node_id, "to": peer.node_id, "cu": 1})
    out["durable_appends_1_caller_per_s"] = half / (time.perf_counter() - start)
    callers = args.callers
    per_caller = (args.durable - half) // callers

    def caller() -> None:
        for _ in range(per_caller):
            book.append("transfer", {"from": me.node_id, "to": peer.node_id, "cu": 1})

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["durable_appends_per_s"] = per_caller * callers / (time.perf_counter() - start)
    out["durable_callers"] = callers
    for _ in range(args.durable - half - per_caller * callers):
        book.append("note", {"text": "pad to n"})

    start = time.perf_counter()
    book.checkpoint()
    out["checkpoint_ms"] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    book.root()
    out["root_ms"] = (time.perf_counter() - start) * 1000
    assert book.size == args.n, (book.size, args.n)
    book.close()

    start = time.perf_counter()
    reader = Ledger.open_reader(db)
    reader.root()
    out["reopen_s"] = time.perf_counter() - start

    # The limits are measured beside verify, not minutes earlier: on a machine others share,
    # only figures taken together make a fair ratio.
    cores = parallel.cores()
    out["cores"] = cores
    raws_one: list[float] = []
    raws_all: list[float] = []
    raws_cpu: list[float] = []
    for key, kwargs in (("verify_entries_per_s", {}),
                        ("deep_verify_entries_per_s", {"deep": True}),
                        ("verify_1_worker_entries_per_s", {"workers": 1})):
        rate, cpu = raw_nacl_verifies_per_s(args.raw)
        raws_one.append(rate)
        raws_cpu.append(cpu)
        raws_all.append(raw_nacl_verifies_per_s(args.raw * cores, cores)[0])
        out[key], out[key.replace("entries_per_s", "cpu_us_per_entry")] = timed_verify(
            reader, args.n, **kwargs)
    rate, cpu = raw_nacl_verifies_per_s(args.raw)
    raws_one.append(rate)
    raws_cpu.append(cpu)
    out["nacl_verifies_per_s"] = sum(raws_one) / len(raws_one)
    out["nacl_verifies_all_cores_per_s"] = sum(raws_all) / len(raws_all)
    out["nacl_cpu_us_per_verify"] = sum(raws_cpu) / len(raws_cpu)
    reader.close()

    out["durable_vs_sqlite"] = out["durable_appends_per_s"] / out["sqlite_commits_per_s"]
    out["durable_1_caller_vs_sqlite"] = (out["durable_appends_1_caller_per_s"]
                                         / out["sqlite_commits_per_s"])
    one_core_limit = cores * out["nacl_verifies_per_s"]
    out["verify_vs_cores_x_nacl"] = out["verify_entries_per_s"] / one_core_limit
    out["verify_vs_nacl_all_cores"] = (out["verify_entries_per_s"]
                                       / out["nacl_verifies_all_cores_per_s"])
    out["deep_verify_vs_cores_x_nacl"] = out["deep_verify_entries_per_s"] / one_core_limit
    out["verify_1_worker_vs_nacl"] = (out["verify_1_worker_entries_per_s"]
                                      / out["nacl_verifies_per_s"])
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return
    print(f"ledger of {args.n:,} entries in {folder}  ({out['cores']} cores)")
    print(f"raw SQLite WAL FULL commits {out['sqlite_commits_per_s']:,.0f}/s (one row per commit)")
    print(f"durable appends   {out['durable_appends_per_s']:>10,.0f}/s   {callers} concurrent callers "
          f"(group commit)   ratio {out['durable_vs_sqlite']:.2f}x (target >= 0.8)")
    print(f"durable appends   {out['durable_appends_1_caller_per_s']:>10,.0f}/s   1 caller, a commit "
          f"per entry   ratio {out['durable_1_caller_vs_sqlite']:.2f}x")
    print(f"batched appends   {out['batched_appends_per_s']:>10,.0f}/s   (target >= 15,000/s, "
          f"batches of {args.batch})")
    print(f"raw PyNaCl verifies {out['nacl_verifies_per_s']:,.0f}/s on one core, "
          f"{out['nacl_verifies_all_cores_per_s']:,.0f}/s on {cores} threads "
          f"({out['nacl_verifies_all_cores_per_s'] / out['nacl_verifies_per_s']:.2f}x one core)")
    print(f"verify            {out['verify_entries_per_s']:>10,.0f}/s   ratio "
          f"{out['verify_vs_cores_x_nacl']:.2f}x of {cores} cores x one-core raw (target >= 0.7), "
          f"{out['verify_vs_nacl_all_cores']:.2f}x of the all-core raw")
    print(f"verify --deep     {out['deep_verify_entries_per_s']:>10,.0f}/s   ratio "
          f"{out['deep_verify_vs_cores_x_nacl']:.2f}x of {cores} cores x one-core raw")
    print(f"verify, 1 worker  {out['verify_1_worker_entries_per_s']:>10,.0f}/s   ratio "
          f"{out['verify_1_worker_vs_nacl']:.2f}x of one-core raw (the sequential path)")
    raw_cpu = out["nacl_cpu_us_per_verify"]
    print(f"CPU per entry     verify {out['verify_cpu_us_per_entry']:.1f} us, --deep "
          f"{out['deep_verify_cpu_us_per_entry']:.1f} us, 1 worker "
          f"{out['verify_1_worker_cpu_us_per_entry']:.1f} us, against {raw_cpu:.1f} us per raw "
          f"verify: CPU efficiency {raw_cpu / out['verify_cpu_us_per_entry']:.2f} (what the "
          "first ratio reaches when no other load takes the cores)")
    print(f"checkpoint        {out['checkpoint_ms']:>10.2f} ms (sign + store; root alone "
          f"{out['root_ms']:.3f} ms; target < 5 ms)")
    print(f"reopen            {out['reopen_s']:>10.4f} s  (target < 0.5 s)")


if __name__ == "__main__":
    main()
