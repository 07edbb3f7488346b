"""Audits of purchases (proof of useful work): what a provider commits to about a run, the check
of a reply against the auditor's own copy of the model, and the disputes that follow.

A provider's terms commit to the sampling it used (integers: ppm and a seed) and the SHA-256 of
the token ids it produced (the ids travel as a body). An auditor holding the same GGUF
teacher-forces prompt + ids through its engine in one prefill (`Engine.score`, a scoring job in
the same slots as generation) and checks at every position that the provider's token is one the
committed sampler could have drawn, within `MARGIN` logits of float noise between machines:

- temperature 0 (greedy): the token's logit is within MARGIN of the best logit;
- otherwise: within MARGIN of the top_k-th best logit (top_k ≤ 0 with min_p ≤ 0: AUDIT_TOP_K),
  and, when min_p > 0, at least max + ln(min_p) − MARGIN (llama.cpp's min-p keeps exactly the
  tokens above max + ln(min_p), before temperature). top_p is not checked (a looser bound never
  accuses an honest provider); the repeat penalty is applied to the auditor's logits first.

It also checks that the counts match the ids (billed tokens, CU, max_tokens), that the prompt
has the billed length, and that the reply delivered is the text of the committed ids. A pass is
an `audit` entry; a failure a signed `dispute` carrying its evidence, which any node holding the
model re-checks (`recheck`) before it counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from forge_cli import identity
from forge_cli.errors import DisputeRejected, ForgeError
from forge_cli.ledger import entries

log = logging.getLogger("forge.audit")

PPM = 1_000_000
MARGIN = 0.5  # logits: float noise between CPUs, builds and batch shapes
AUDIT_TOP_K = 100  # the rank bound of sampling that commits to neither top_k nor min_p
DEFAULT_EVERY = 20
UPHELD, FORGED = entries.AUDIT_VERDICTS
FLAG_AUDITORS = 2  # disputes upheld from this many distinct auditors flag a provider


# -- the commitment --------------------------------------------------------------------------

def commit_sampling(sampling: Any) -> tuple[Any, dict[str, int]]:
    """The sampling a sale runs with, and its committed integer form: floats rounded to ppm
    (the run uses exactly the committed values) and a seed drawn when none was asked for."""
    from forge_cli.inference.engine import Sampling

    seed = sampling.seed if sampling.seed is not None else secrets.randbits(32)
    commit = {"temperature_ppm": round(sampling.temperature * PPM),
              "top_p_ppm": round(sampling.top_p * PPM), "top_k": max(0, sampling.top_k),
              "min_p_ppm": round(sampling.min_p * PPM),
              "repeat_penalty_ppm": round(sampling.repeat_penalty * PPM),
              "seed": seed, "max_tokens": sampling.max_tokens}
    exact = Sampling(max_tokens=sampling.max_tokens, temperature=commit["temperature_ppm"] / PPM,
                     top_p=commit["top_p_ppm"] / PPM, top_k=commit["top_k"],
                     min_p=commit["min_p_ppm"] / PPM,
                     repeat_penalty=commit["repeat_penalty_ppm"] / PPM, seed=seed,
                     stop=sampling.stop)
    return exact, commit


def tokens_body(ids: list[int]) -> bytes:
    """The stored body of a reply's token ids (a JSON list, no spaces); terms hold its hash."""
    return json.dumps(ids, separators=(",", ":")).encode()


def ids_of(body: bytes) -> list[int] | None:
    """The token ids of a tokens body, or None when it is not one."""
    try:
        ids = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
        return None
    return ids


def run_terms(commit: dict[str, int], ids: list[int]) -> dict[str, Any]:
    """The terms fields that commit a sale to its run: the sampling and the ids' hash."""
    return {"sampling": commit, "tokens_sha256": entries.body_hash(tokens_body(ids))}


def counts_problem(terms: dict[str, Any], tokens: bytes) -> str | None:
    """Why the committed ids do not match what the terms bill, or None (no model needed)."""
    ids = ids_of(tokens)
    if ids is None:
        return "the tokens body is not a list of token ids"
    if entries.body_hash(tokens) != terms["tokens_sha256"]:
        return "the tokens body does not hash to terms.tokens_sha256"
    if len(ids) != terms["completion_tokens"]:
        return (f"terms bill {terms['completion_tokens']} tokens but commit to {len(ids)} "
                "token ids")
    if len(ids) > terms["sampling"]["max_tokens"]:
        return f"{len(ids)} tokens, above the committed max_tokens {terms['sampling']['max_tokens']}"
    return None


# -- the check -------------------------------------------------------------------------------

@dataclass
class Verdict:
    """What an audit found: `ok`, or why not and the failing positions with the auditor's
    logits there (milli-logits, integers: they are signed)."""

    ok: bool
    reason: str = ""
    positions: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


def _mlogit(x: float) -> int:
    return round(float(x) * 1000)


def position_check(prompt: list[int], ids: list[int],
                   commit: dict[str, int]) -> Callable[[int, Any], dict[str, Any] | None]:
    """The check of one reply position: given i and the auditor's logits that score ids[i],
    None when the committed sampler could have drawn ids[i], else the evidence a dispute
    carries (milli-logits: integers, they are signed). It reads the row and keeps nothing of
    it, so the scheduler can run it on llama.cpp's own buffer."""
    import numpy as np

    from forge_cli.inference.batching import PENALTY_LAST_N

    penalty = commit["repeat_penalty_ppm"] / PPM
    greedy = commit["temperature_ppm"] == 0
    top_k, min_p = commit["top_k"], commit["min_p_ppm"] / PPM
    if not greedy and top_k <= 0 and min_p <= 0:
        top_k = AUDIT_TOP_K

    def check(i: int, row: Any) -> dict[str, Any] | None:
        token = ids[i]
        if penalty != 1.0:  # llama.cpp's penalties over the last 64 tokens, prompt included
            row = row.copy()
            seen = np.unique(np.array((prompt + ids[:i])[-PENALTY_LAST_N:], dtype=np.int64))
            hit = row[seen]
            row[seen] = np.where(hit <= 0, hit * penalty, hit / penalty)
        best = float(row.max())
        if greedy:
            bound = best - MARGIN
        else:
            bound = -math.inf
            if 0 < top_k < len(row):
                bound = float(np.partition(row, len(row) - top_k)[len(row) - top_k]) - MARGIN
            if min_p > 0:
                bound = max(bound, best + math.log(min_p) - MARGIN)
        if float(row[token]) >= bound:
            return None
        top = np.argsort(-row, kind="stable")[:entries.MAX_TOP]
        return {"pos": i, "token": token, "token_mlogit": _mlogit(row[token]),
                "bound_mlogit": _mlogit(bound),
                "top": [[int(t), _mlogit(row[t])] for t in top]}

    return check


def audit(engine: Any, terms: dict[str, Any], request: bytes, response: bytes,
          tokens: bytes) -> Verdict:
    """Audit one sale with `engine` (the same GGUF as terms.model_sha256): counts, prompt,
    text and every token against the model. Blocks for one prefill; call it off the loop."""
    from forge_cli.node.routes_openai import parse_messages, parse_sampling

    if engine.sha256 != terms["model_sha256"]:
        raise DisputeRejected(f"this node's {engine.name} is not the model the trade names "
                              f"({terms['model_sha256'][:16]}…); it cannot audit the trade")
    reason = counts_problem(terms, tokens)
    if reason:
        return Verdict(False, f"counts: {reason}")
    ids = ids_of(tokens) or []
    if any(t >= engine.n_vocab for t in ids):
        return Verdict(False, f"counts: a token id is outside the vocabulary of {engine.n_vocab}")
    try:  # the consumer wrote the request: what is wrong with it is never the seller's lie
        body = json.loads(request)
        messages = parse_messages(body)
        stops = parse_sampling(body, entries.MAX_AMOUNT).stop
    except (ValueError, UnicodeDecodeError, ForgeError) as exc:
        raise DisputeRejected(f"the request sold is not a chat request this node can audit "
                              f"({exc})") from None
    prompt = engine.tokenize(engine.render(messages))
    if len(prompt) != terms["prompt_tokens"]:
        return Verdict(False, f"prompt: terms bill {terms['prompt_tokens']} prompt tokens; the "
                              f"request renders to {len(prompt)}")
    text, read = engine.reply_text(ids, stops)
    if read < len(ids):
        return Verdict(False, f"text: {len(ids) - read} token(s) follow the stop string that "
                              "ends the reply (padding)")
    if text.encode() != response:
        return Verdict(False, "text: the reply delivered is not the text of the committed tokens")
    if len(prompt) + len(ids) > engine.n_ctx:  # a seller may well have a larger context
        raise DisputeRejected(f"prompt and reply are {len(prompt) + len(ids)} tokens, more than "
                              f"this node's context of {engine.n_ctx}; it cannot audit them")
    if not ids:
        return Verdict(True)
    found = engine.score(prompt + ids, len(prompt),
                         reduce=position_check(prompt, ids, terms["sampling"]))
    failures = [f for f in found if f is not None]
    if failures:
        return Verdict(False, f"model: {len(failures)} of {len(ids)} tokens are outside what "
                              "the committed model and sampling could draw", len(ids),
                       failures[:entries.MAX_FAILURES])
    return Verdict(True, "", len(ids))


# -- disputes --------------------------------------------------------------------------------

def sign_dispute(trade: dict[str, Any], verdict: Verdict, signer: identity.Identity,
                 ts: int) -> dict[str, Any]:
    """The `dispute` entry data for a failed audit: the claim, signed by the auditor."""
    claim = {"trade": trade, "auditor": signer.node_id, "reason": verdict.reason[:1000],
             "failures": verdict.failures[:entries.MAX_FAILURES], "positions": verdict.positions,
             "ts": ts}
    return {"claim": claim, "auditor_sig": signer.sign(entries.dispute_message(claim)).hex(),
            "verdict": UPHELD}


def dispute_bodies(data: dict[str, Any]) -> list[str]:
    """The body hashes a dispute needs to be re-checked: request, response, tokens."""
    terms = data["claim"]["trade"]["terms"]
    return [terms["request_sha256"], terms["response_sha256"], terms["tokens_sha256"]]


def check_dispute(data: Any, bodies: dict[str, bytes]) -> None:
    """DisputeRejected unless `data` is a well-formed dispute whose three signatures verify
    and whose bodies are all here and match."""
    reason = entries.KINDS["dispute"](data) if isinstance(data, dict) else "not an object"
    if reason:
        raise DisputeRejected(f"malformed dispute: {reason}")
    reason = entries.dispute_signature_problem(data)
    if reason:
        raise DisputeRejected(f"forged dispute: {reason}")
    for digest in dispute_bodies(data):
        body = bodies.get(digest)
        if body is None or entries.body_hash(body) != digest:
            raise DisputeRejected(f"the dispute lacks body {digest[:16]}… (request, response "
                                  "and tokens must travel with it)")


def recheck(engine: Any, data: dict[str, Any], bodies: dict[str, bytes]) -> str:
    """Re-run a (checked) dispute's audit here: UPHELD when the reply fails here too, FORGED
    when it passes (the evidence does not re-check: it counts against the auditor)."""
    terms = data["claim"]["trade"]["terms"]
    verdict = audit(engine, terms, bodies[terms["request_sha256"]],
                    bodies[terms["response_sha256"]], bodies[terms["tokens_sha256"]])
    return FORGED if verdict.ok else UPHELD


# -- a node's auditor ------------------------------------------------------------------------

Append = Callable[..., Awaitable[entries.Entry]]


class Auditor:
    """Audits this node's purchases (one in `every`), records the outcome, sends disputes to
    the mesh, and takes disputes from peers (re-checked before they count).

    `engines(sha256)` is this node's engine for a model, or None; `append(kind, data,
    bodies=…)` records an entry; `disputes_against(provider)` the distinct auditors whose
    disputes against it this node upheld; `flag(node_id, reason)` takes a peer off the mesh
    as a fork does; `peers()` the URLs disputes are sent to; `send(url, payload)` posts one.
    """

    def __init__(self, signer: identity.Identity, *, every: int,
                 engines: Callable[[str], Any], append: Append,
                 disputes_against: Callable[[str], int],
                 flag: Callable[[str, str], Any] = lambda node_id, reason: None,
                 peers: Callable[[], list[str]] = list,
                 send: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None,
                 clock: Callable[[], int] | None = None) -> None:
        import time

        self.signer = signer
        self.every = every
        self.engines = engines
        self.append = append
        self.disputes_against = disputes_against
        self.flag = flag
        self.peers = peers
        self.send = send
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)

    def due(self, model_sha256: str) -> bool:
        """Whether to audit a purchase of this model: this node holds it, and the draw (one
        in `every`, unpredictable to the seller) says so."""
        return self.engines(model_sha256) is not None and secrets.randbelow(self.every) == 0

    async def audit_purchase(self, trade: dict[str, Any], request: bytes, response: bytes,
                             tokens: bytes) -> entries.Entry:
        """Audit a purchase this node holds the model of; record `audit` or `dispute`."""
        terms = trade["terms"]
        engine = self.engines(terms["model_sha256"])
        verdict = await asyncio.to_thread(audit, engine, terms, request, response, tokens)
        if verdict.ok:
            return await self.append("audit", {
                "trade_id": entries.trade_id(trade), "provider": terms["provider"],
                "model_sha256": terms["model_sha256"], "positions": verdict.positions})
        log.warning("audit of provider %s… failed: %s", terms["provider"][:12], verdict.reason)
        data = sign_dispute(trade, verdict, self.signer, self.clock())
        bodies = {terms["request_sha256"]: request, terms["response_sha256"]: response,
                  terms["tokens_sha256"]: tokens}
        entry = await self.record(data, bodies)
        await self.broadcast(data, bodies)
        return entry

    async def audit_held(self, trade: dict[str, Any],
                         body: Callable[[str], bytes | None]) -> entries.Entry:
        """Audit a trade this node holds (any trade it can read: its bodies from `body`)."""
        terms = trade["terms"]
        if not entries.TRADE_RUN <= terms.keys():
            raise DisputeRejected("the trade's terms commit to no run (sampling and token ids): "
                                  "there is nothing to audit")
        if terms["provider"] == self.signer.node_id:
            raise DisputeRejected("this node sold that reply: a seller does not audit itself")
        if self.engines(terms["model_sha256"]) is None:
            raise DisputeRejected(f"this node does not hold the model the trade names "
                                  f"({terms['model'][:64]}, {terms['model_sha256'][:16]}…)")
        held = {}
        for digest in (terms["request_sha256"], terms["response_sha256"],
                       terms["tokens_sha256"]):
            found = body(digest)
            if found is None:
                raise DisputeRejected(f"body {digest[:16]}… of the trade is not here "
                                      "(redacted, or never stored)")
            held[digest] = found
        return await self.audit_purchase(trade, held[terms["request_sha256"]],
                                         held[terms["response_sha256"]],
                                         held[terms["tokens_sha256"]])

    async def record(self, data: dict[str, Any], bodies: dict[str, bytes]) -> entries.Entry:
        """Append a dispute (its bodies stored with it); flag the provider once disputes from
        FLAG_AUDITORS distinct auditors are upheld here."""
        entry = await self.append("dispute", data,
                                  bodies=[bodies[h] for h in dispute_bodies(data)])
        provider = data["claim"]["trade"]["terms"]["provider"]
        if data["verdict"] == UPHELD:
            auditors = await asyncio.to_thread(self.disputes_against, provider)
            if auditors >= FLAG_AUDITORS:
                await _maybe_await(self.flag(
                    provider, f"disputes from {auditors} distinct auditors: served replies its "
                              "committed model and sampling could not have produced"))
        return entry

    async def broadcast(self, data: dict[str, Any], bodies: dict[str, bytes]) -> None:
        """Send a dispute and its bodies to every peer (best effort: a peer that is down
        misses it)."""
        if self.send is None:
            return
        payload = {"dispute": data, "bodies": {h: bodies[h].hex() for h in dispute_bodies(data)}}
        for url in self.peers():
            try:
                await self.send(url, payload)
            except ForgeError as exc:
                log.info("dispute not taken by %s: %s", url, exc)

    async def receive(self, payload: Any) -> dict[str, Any]:
        """A dispute from a peer: checked, re-run here when this node holds the model, and
        recorded as upheld (it counts against the provider) or forged (against its author,
        then DisputeRejected). Without the model nothing is recorded ("unchecked")."""
        if not isinstance(payload, dict) or not isinstance(payload.get("bodies"), dict):
            raise DisputeRejected("a gossiped dispute is {dispute, bodies: {sha256: hex}}")
        try:
            bodies = {h: bytes.fromhex(b) for h, b in payload["bodies"].items()
                      if isinstance(b, str)}
        except ValueError:
            raise DisputeRejected("dispute bodies must be hex") from None
        data = payload.get("dispute")
        check_dispute(data, bodies)
        claim = data["claim"]
        if claim["auditor"] == self.signer.node_id:
            return {"outcome": "own"}
        engine = self.engines(claim["trade"]["terms"]["model_sha256"])
        if engine is None:
            return {"outcome": "unchecked"}
        verdict = await asyncio.to_thread(recheck, engine, data, bodies)
        entry = await self.record({**data, "verdict": verdict}, bodies)
        if verdict == FORGED:
            raise DisputeRejected(
                f"forged dispute: trade {entries.trade_id(claim['trade'])[:16]}… passes its "
                f"audit here; recorded at seq {entry.seq} against auditor "
                f"{claim['auditor'][:16]}…")
        return {"outcome": UPHELD, "seq": entry.seq}


async def _maybe_await(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


__all__ = ["AUDIT_TOP_K", "Auditor", "DEFAULT_EVERY", "FORGED", "MARGIN", "UPHELD", "Verdict",
           "audit", "check_dispute", "commit_sampling", "counts_problem",
           "ids_of", "position_check", "recheck", "run_terms", "sign_dispute", "tokens_body"]
