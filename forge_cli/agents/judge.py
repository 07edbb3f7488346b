"""Judging results: deterministic checks first (empty, cut at max_tokens, a repetition loop,
`expect`), then a model judge whose reply is decoded under the `{ok, score, reason}` schema;
and the answer's intent coverage (the share of the request's salient terms it covers).

Every verdict names the check that decided it. Numbers are integers (permille, 0–10 scores):
what is recorded in the ledger holds no floats.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

LOOP_NGRAM = 8  # an n-gram of this many tokens seen LOOP_COUNT times is a loop
LOOP_COUNT = 3
INTENT_THRESHOLD_PM = 500
JUDGE_CHARS = 1500  # of a result shown to the model judge
JUDGE_SYSTEM = ("You check a worker's result against its task. Reply with JSON: ok is true when "
                "the result does the task, score is from 0 (useless) to 10 (complete), reason "
                "is a few words.")
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "score": {"enum": list(range(11))},
                   "reason": {"type": "string"}},
    "required": ["ok", "score", "reason"], "additionalProperties": False}
# Common English words that say nothing about what a request is about.
STOPWORDS = frozenset("""
a about above after again all also an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has
have having he her here hers him his how if in into is it its itself just me more most my no nor
not now of off on once only or other our out over own same she should so some such than that the
their them then there these they this those through to too under until up very was we were what
when where which while who whom why will with would you your""".split())
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")
_TERM = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    check: str  # which check decided: empty, truncated, repetition, expect, model, deterministic
    reason: str
    score: int | None = None  # the model judge's 0–10, when it judged


def deterministic(text: str, finish_reason: str, tokens: int, max_tokens: int,
                  expect: str | None) -> Verdict | None:
    """A failing verdict from the cheap checks, or None when they all pass.

    >>> deterministic("1. Oops: 1. Oops: 1. Oops: 1. Oops: 1. Oops:", "stop", 20, 64, None).check
    'repetition'
    """
    if not text.strip():
        return Verdict(False, "empty", f"empty result after {tokens} tokens")
    if finish_reason == "length":
        return Verdict(False, "truncated", f"cut at max_tokens: {tokens} of {max_tokens} tokens "
                       "used and the result did not end")
    loop = repetition(text)
    if loop is not None:
        return Verdict(False, "repetition", loop)
    if expect is not None and expect not in text:
        return Verdict(False, "expect", f"result does not contain {expect!r}")
    return None


def repetition(text: str) -> str | None:
    """Why `text` is a loop of one n-gram, or None: the same short n-gram back to back
    (3 times for n ≥ 3, 4 for pairs, 6 for one token), or one 8-gram LOOP_COUNT times anywhere."""
    tokens = [t.lower() for t in _TOKEN.findall(text)]
    for n in range(1, 13):
        needed = {1: 6, 2: 4}.get(n, 3)
        for i in range(0, len(tokens) - n * needed + 1):
            gram = tokens[i:i + n]
            if all(tokens[i + k * n:i + (k + 1) * n] == gram for k in range(1, needed)):
                return f"repetition loop: {' '.join(gram)!r} {needed} times in a row"
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(tokens) - LOOP_NGRAM + 1):
        gram_t = tuple(tokens[i:i + LOOP_NGRAM])
        counts[gram_t] = counts.get(gram_t, 0) + 1
        if counts[gram_t] >= LOOP_COUNT:
            return f"repetition loop: {' '.join(gram_t)!r} {LOOP_COUNT} times"
    return None


def judge_messages(task_prompt: str, text: str) -> list[dict[str, str]]:
    shown = text[:JUDGE_CHARS] + (" [… cut for the judge]" if len(text) > JUDGE_CHARS else "")
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Task: {task_prompt}\n\nResult:\n{shown}"}]


def read_judgment(reply: str) -> Verdict:
    """The model judge's verdict from its reply (decoded under VERDICT_SCHEMA; a reply cut
    inside `reason` still gives `ok` and `score`). An unreadable reply passes nothing."""
    try:
        value = json.loads(reply)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("ok"), bool):
        score = value.get("score")
        return Verdict(value["ok"], "model", str(value.get("reason", ""))[:300],
                       score if type(score) is int else None)
    ok = re.search(r'"ok"\s*:\s*(true|false)', reply)
    score_m = re.search(r'"score"\s*:\s*(\d+)', reply)
    if ok is None:
        return Verdict(False, "model", f"the judge's reply is not a verdict: {reply[:120]!r}")
    return Verdict(ok.group(1) == "true", "model", "(the judge's reason was cut)",
                   int(score_m.group(1)) if score_m else None)


# -- intent coverage -------------------------------------------------------------------------


def terms(text: str) -> set[str]:
    """Salient terms: words of two or more letters or digits, lower-cased, not stopwords."""
    return {t for t in (w.lower() for w in _TERM.findall(text))
            if len(t) >= 2 and t not in STOPWORDS}


def _forms(term: str) -> set[str]:
    forms = {term}
    if len(term) > 3 and term.endswith("s"):
        forms.add(term[:-1])
    else:
        forms.add(term + "s")
    return forms


def coverage(request: str, answer: str) -> dict[str, Any]:
    """`{method, coverage_pm, flagged, missing}`: the share of the request's salient terms the
    answer uses (a plural and its singular count as one), flagged under 50 %.

    >>> coverage("list three risks", "Three risk factors")["missing"]
    []
    """
    wanted = sorted(terms(request))
    have = terms(answer)
    missing = [t for t in wanted if not _forms(t) & have]
    share = 1000 if not wanted else (len(wanted) - len(missing)) * 1000 // len(wanted)
    return {"method": "lexical_coverage", "coverage_pm": share,
            "flagged": share < INTENT_THRESHOLD_PM, "terms": len(wanted), "missing": missing}
