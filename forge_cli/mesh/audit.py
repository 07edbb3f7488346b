"""Audits of purchases (proof of useful work): what a provider commits to about a run, the check
of a reply against the auditor's own copy of the model, and the disputes that follow.

A provider's terms commit to the sampling it used (integers: ppm and a seed, and the SHA-256 of
the grammar that constrained the reply, if one did) and the SHA-256 of the token ids it produced
(the ids travel as a body; a grammar's schema travels in the request, which the auditor
re-parses as the seller did). An auditor holding the same GGUF teacher-forces prompt + ids
through its engine in one prefill (`Engine.score`, a scoring job in the same slots as
generation) and checks at every position that the provider's token is one the committed
sampler could have drawn, within `MARGIN` logits of float noise between machines:

- temperature 0 (greedy): the token's logit is within MARGIN of the best logit;
- otherwise: within MARGIN of the top_k-th best logit (top_k ≤ 0 with min_p ≤ 0: AUDIT_TOP_K),
  and, when min_p > 0, at least max + ln(min_p) − MARGIN (llama.cpp's min-p keeps exactly the
  tokens above max + ln(min_p), before temperature). top_p is not checked (a looser bound never
  accuses an honest provider); the repeat penalty is applied to the auditor's logits first.

A constrained reply is checked under its grammar first, as the seller's sampler chain applied
it: the grammar the request derives must be the one the terms name (else a "grammar:"
failure), the provider's token must be one the grammar allows at each position (llama.cpp's
own grammar sampler, stepped along the ids), and the bounds above are taken over the allowed
tokens only (the grammar sets the others to -inf before any sampler ranks them). The reply
may end with the grammar unfinished: max_tokens or a stop string cut it.

It also checks that the counts match the ids (billed tokens, CU, max_tokens), that the prompt
has the billed length, and that the reply delivered is the text of the committed ids. A pass is
an `audit` entry; a failure a signed `dispute` carrying its evidence, which any node holding the
model re-checks (`recheck`) before it counts.

A peer's dispute costs the disputer, not the node (`Auditor.receive`): its evidence is capped
(MAX_EVIDENCE), it is considered only from an auditor with standing here (`standing_problem`)
about a trade this node holds or the auditor's own purchase, a repeat is refused before any
model work, and the re-check waits in a bounded queue (`RecheckQueue`) that runs one at a time,
only while no paying session is open, withdrawn the moment one opens.

Disputes are relayed: a node that re-checked a peer's dispute and upheld it signs a relay
(`sign_relay`) and sends it on to its peers, and serves its upheld disputes, relayed, to
peers that pull them (a late joiner). A relayed dispute is weighed on the standing of the
node that relayed it (its signature names it: no one can relay in another's name), counted
against that relayer's hourly quota (`RelayQuota`), refused as a replay when its id was seen
here (`dispute_id`), and re-checked before it counts, like any other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from forge_cli import identity, wire
from forge_cli.errors import (
    DisputeRejected,
    ForgeError,
    ModelError,
    NoStanding,
    RecheckBusy,
    Replay,
    UsageError,
)
from forge_cli.inference import grammar as grammars
from forge_cli.ledger import entries

log = logging.getLogger("forge.audit")

PPM = 1_000_000
# Logits of float noise between a seller's run (one token a step, in batches of any shape) and the
# auditor's prefill (hundreds a step), CPUs and builds. An honest greedy smollm2:135m reply's
# chosen token trailed the prefill's best by up to 0.553 here (24 replies batched 4 at a time:
# 0 to 0.291); 0.5 disputed honest sellers, so the bound is about twice the worst seen.
MARGIN = 1.0
AUDIT_TOP_K = 100  # the rank bound of sampling that commits to neither top_k nor min_p
DEFAULT_EVERY = 20
UPHELD, FORGED = entries.AUDIT_VERDICTS
# Disputes upheld here flag a provider once their distinct auditors' trust here reaches the
# threshold `disputes_against` gives with it (forge_cli.mesh.trust Reputation.flag_weight: each
# auditor counted up to a typical trusted key's trust, 1.5 typical keys needed): two auditors
# of standing, never one alone, never keys nobody here trusts, however many (they hold 0).
# A peer's dispute carries its three bodies, hex-encoded, inside the node's 1 MiB request cap;
# together they may hold this many bytes (a chat request of ~90k words), no more.
MAX_EVIDENCE = 384 * 1024
# The reputation (basis points, economy.credit) an auditor needs here: a newcomer's. One
# dispute upheld against it or forged by it, or one sale it left unsettled, costs it standing
# until the trades it provides earn it back.
STANDING_REPUTATION = 5_000
# And the trust over the trade graph it needs (mesh.trust, graph bp): a tenth of an average
# peer's. A key that sold this node one small trade among many larger ones has less, so a
# few cheap sales cannot buy sybils a say.
STANDING_TRUST_BP = 1_000
DEFAULT_RECHECKS_PER_MINUTE = 2  # per auditor
DEFAULT_RECHECK_QUEUE = 8  # re-checks waiting at once, all auditors together
RECHECK_WAIT_S = 30  # a poster waits this long for its verdict, then hears "queued" (202)
RECHECK_EXPIRE_S = 600  # a re-check that waited this long for an idle engine is dropped
IDLE_POLL_S = 0.02  # how often a running re-check looks for a paying session to yield to
RELAYS_PER_HOUR = 60  # relayed disputes one relayer may have considered here an hour
RELAY_SOURCES = 10_000  # relayers whose hourly counts are kept at once
SEEN_DISPUTES = 10_000  # dispute ids remembered here, newest kept
RELAY_DOMAIN = b"forge-dispute-relay/1\n"
RELAY_TASKS = 16  # relays being sent at once; past this a new one is dropped (logged)
# A grammar is asked about this many of the best tokens at each position (and the provider's):
# the best allowed one is among them unless none is, when the whole vocabulary is asked.
GRAMMAR_CANDIDATES = 512


# -- the commitment --------------------------------------------------------------------------

def commit_sampling(sampling: Any) -> tuple[Any, dict[str, Any]]:
    """The sampling a sale runs with, and its committed form: floats rounded to ppm (the run
    uses exactly the committed values), a seed drawn when none was asked for, and the SHA-256
    of its grammar when it has one (absent otherwise)."""
    from forge_cli.inference.engine import Sampling

    seed = sampling.seed if sampling.seed is not None else secrets.randbits(32)
    commit = {"temperature_ppm": round(sampling.temperature * PPM),
              "top_p_ppm": round(sampling.top_p * PPM), "top_k": max(0, sampling.top_k),
              "min_p_ppm": round(sampling.min_p * PPM),
              "repeat_penalty_ppm": round(sampling.repeat_penalty * PPM),
              "seed": seed, "max_tokens": sampling.max_tokens}
    if sampling.grammar is not None:
        commit["grammar_sha256"] = grammars.digest(sampling.grammar)
    exact = Sampling(max_tokens=sampling.max_tokens, temperature=commit["temperature_ppm"] / PPM,
                     top_p=commit["top_p_ppm"] / PPM, top_k=commit["top_k"],
                     min_p=commit["min_p_ppm"] / PPM,
                     repeat_penalty=commit["repeat_penalty_ppm"] / PPM, seed=seed,
                     stop=sampling.stop, grammar=sampling.grammar)
    return exact, commit


def tokens_body(ids: list[int]) -> bytes:
    """The stored body of a reply's token ids (a JSON list, no spaces); terms hold its hash."""
    return json.dumps(ids, separators=(",", ":")).encode()


def ids_of(body: bytes) -> list[int] | None:
    """The token ids of a tokens body, or None when it is not one (read by the one parser:
    a peer wrote it)."""
    try:
        ids = wire.parse(body, limit=MAX_EVIDENCE, what="the tokens body")
    except wire.BadJSON:
        return None
    if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
        return None
    return ids


def run_terms(commit: dict[str, Any], ids: list[int]) -> dict[str, Any]:
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


def position_check(prompt: list[int], ids: list[int], commit: dict[str, Any],
                   grammar: grammars.Matcher | None = None) -> Positions:
    """The check of each reply position, for `Engine.score`'s reduce (see `Positions`)."""
    return Positions(prompt, ids, commit, grammar)


class Positions:
    """The check of one reply position: called with i and the auditor's logits that score
    ids[i], None when the committed sampler could have drawn ids[i], else the evidence a
    dispute carries (milli-logits: integers, they are signed). It reads the row and keeps
    nothing of it, so the scheduler can run it on llama.cpp's own buffer.

    With a `grammar` (a Matcher of the committed grammar) it must see the positions in order,
    0, 1, 2, …: the grammar steps along the ids. `rejected` is then the first position whose
    token the grammar forbids (or None); the positions after it are not checked, since the
    grammar cannot step past a token it forbids.
    """

    def __init__(self, prompt: list[int], ids: list[int], commit: dict[str, Any],
                 grammar: grammars.Matcher | None = None) -> None:
        self.prompt = prompt
        self.ids = ids
        self.penalty = commit["repeat_penalty_ppm"] / PPM
        self.greedy = commit["temperature_ppm"] == 0
        self.top_k, self.min_p = commit["top_k"], commit["min_p_ppm"] / PPM
        if not self.greedy and self.top_k <= 0 and self.min_p <= 0:
            self.top_k = AUDIT_TOP_K
        self.grammar = grammar
        self.rejected: int | None = None
        self._next = 0
        # How many allowed tokens the best GRAMMAR_CANDIDATES must hold for the bounds over
        # them to be exact: the best one (greedy, min-p), or the k best when top-k is the
        # only bound. With fewer, the whole vocabulary is asked.
        self._needed = self.top_k if not self.greedy and self.min_p <= 0 else 1

    def __call__(self, i: int, row: Any) -> dict[str, Any] | None:
        import numpy as np

        from forge_cli.inference.batching import PENALTY_LAST_N

        if self.grammar is not None:
            if i != self._next:
                raise ValueError(f"scored position {i} came before position {self._next}: a "
                                 "grammar is checked along the reply in order")
            self._next += 1
            if self.rejected is not None:
                return None
        token = self.ids[i]
        if self.penalty != 1.0:  # llama.cpp's penalties over the last 64 tokens, prompt too
            penalty = self.penalty
            row = row.copy()
            seen = np.unique(np.array((self.prompt + self.ids[:i])[-PENALTY_LAST_N:],
                                      dtype=np.int64))
            hit = row[seen]
            row[seen] = np.where(hit <= 0, hit * penalty, hit / penalty)
        if self.grammar is not None:
            masked = self._masked(row, token)
            if masked is None:
                self.rejected = i
                return self._rejection(i, row, token)
            row = masked
        best = float(row.max())
        if self.greedy:
            bound = best - MARGIN
        else:
            bound = -math.inf
            if 0 < self.top_k < len(row):
                k = len(row) - self.top_k
                bound = float(np.partition(row, k)[k]) - MARGIN
            if self.min_p > 0:
                bound = max(bound, best + math.log(self.min_p) - MARGIN)
        if float(row[token]) >= bound:
            return None
        top = np.argsort(-row, kind="stable")[:entries.MAX_TOP]
        return {"pos": i, "token": token, "token_mlogit": _mlogit(row[token]),
                "bound_mlogit": _mlogit(bound),
                "top": [[int(t), _mlogit(row[t])] for t in top if np.isfinite(row[t])]}

    def _masked(self, row: Any, token: int) -> Any:
        """`row` with what the grammar forbids at -inf (as its sampler sets it), then the
        grammar stepped past `token`; None when it forbids `token`.

        Only the best GRAMMAR_CANDIDATES tokens and `token` are asked about. Every token
        outside them scores below each of them, so the best allowed token (and the k best,
        when that many are allowed among them) is exact; the bounds over a subset of the
        allowed tokens are never above the true ones, so they never accuse an honest
        provider."""
        import numpy as np

        assert self.grammar is not None
        n = len(row)
        if n > GRAMMAR_CANDIDATES:
            best = np.argpartition(row, n - GRAMMAR_CANDIDATES)[n - GRAMMAR_CANDIDATES:]
        else:
            best = np.arange(n)
        inside = bool((best == token).any())
        asked = best if inside else np.append(best, token)
        allowed = asked[self.grammar.allowed(asked)]
        if not (allowed == token).any():
            return None
        if int((allowed != token).sum()) + inside < self._needed and len(asked) < n:
            everything = np.arange(n)
            allowed = everything[self.grammar.allowed(everything)]
        masked = np.full(n, -np.inf, dtype=np.float32)
        masked[allowed] = row[allowed]
        self.grammar.accept(token)
        return masked

    def _rejection(self, i: int, row: Any, token: int) -> dict[str, Any]:
        """The evidence of a token the grammar forbids: its logit and the allowed tokens the
        auditor ranks best there (bound: the best of them)."""
        import numpy as np

        assert self.grammar is not None
        everything = np.arange(len(row))
        allowed = everything[self.grammar.allowed(everything)]
        top = allowed[np.argsort(-row[allowed], kind="stable")[:entries.MAX_TOP]]
        bound = row[top[0]] if len(top) else row.max()
        return {"pos": i, "token": token, "token_mlogit": _mlogit(row[token]),
                "bound_mlogit": _mlogit(bound), "top": [[int(t), _mlogit(row[t])] for t in top]}


def audit(engine: Any, terms: dict[str, Any], request: bytes, response: bytes,
          tokens: bytes, *, cancel: threading.Event | None = None) -> Verdict:
    """Audit one sale with `engine` (the same GGUF as terms.model_sha256): counts, grammar,
    prompt, text and every token against the model (under the grammar, if the request asks
    for one). Blocks for one prefill; call it off the loop. Setting `cancel` withdraws the
    prefill (ModelError) at the engine's next step."""
    from forge_cli.inference.requests import parse_messages, parse_sampling, parse_tools

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
        body = wire.parse(request, limit=MAX_EVIDENCE, what="the request sold")
        messages = parse_messages(body)
        tools = parse_tools(body)
        sampling = parse_sampling(body, entries.MAX_AMOUNT)
    except (ValueError, UnicodeDecodeError, ForgeError) as exc:
        raise DisputeRejected(f"the request sold is not a chat request this node can audit "
                              f"({exc})") from None
    reason = grammar_problem(grammars.digest(sampling.grammar),
                             terms["sampling"].get("grammar_sha256"))
    if reason:
        return Verdict(False, f"grammar: {reason}")
    prompt = engine.tokenize(engine.render(messages, tools))
    if len(prompt) != terms["prompt_tokens"]:
        return Verdict(False, f"prompt: terms bill {terms['prompt_tokens']} prompt tokens; the "
                              f"request renders to {len(prompt)}")
    text, read = engine.reply_text(ids, sampling.stop)
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
    with contextlib.ExitStack() as held:
        matcher = None
        if sampling.grammar is not None:
            try:
                matcher = held.enter_context(engine.grammar_matcher(sampling.grammar))
            except UsageError as exc:
                raise DisputeRejected(f"this node's llama.cpp cannot apply the request's "
                                      f"grammar ({exc}); it cannot audit the trade") from None
        check = position_check(prompt, ids, terms["sampling"], matcher)
        found = engine.score(prompt + ids, len(prompt), reduce=check, cancel=cancel)
    failures = [f for f in found if f is not None]
    if check.rejected is not None:
        return Verdict(False, f"grammar: token {ids[check.rejected]} at position "
                              f"{check.rejected} is not one the committed grammar allows there",
                       len(ids), failures[:entries.MAX_FAILURES])
    if failures:
        return Verdict(False, f"model: {len(failures)} of {len(ids)} tokens are outside what "
                              "the committed model and sampling could draw", len(ids),
                       failures[:entries.MAX_FAILURES])
    return Verdict(True, "", len(ids))


def grammar_problem(wanted: str | None, committed: Any) -> str | None:
    """Why the grammar the terms commit to (`committed`, their grammar_sha256) is not the one
    the request derives (`wanted`, its SHA-256), or None when both name the same or neither
    names one."""
    if wanted == committed:
        return None
    if wanted is None:
        return (f"the terms commit to a grammar (sha256 {str(committed)[:16]}…) that the "
                "request does not ask for")
    if committed is None:
        return (f"the request asks for a grammar (sha256 {wanted[:16]}…) and the terms "
                "commit to none: the reply was sold as free text")
    return (f"the terms commit to grammar {str(committed)[:16]}…, the request derives "
            f"{wanted[:16]}…")


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


def recheck(engine: Any, data: dict[str, Any], bodies: dict[str, bytes], *,
            cancel: threading.Event | None = None) -> str:
    """Re-run a (checked) dispute's audit here: UPHELD when the reply fails here too, FORGED
    when it passes (the evidence does not re-check: it counts against the auditor)."""
    terms = data["claim"]["trade"]["terms"]
    verdict = audit(engine, terms, bodies[terms["request_sha256"]],
                    bodies[terms["response_sha256"]], bodies[terms["tokens_sha256"]],
                    cancel=cancel)
    return FORGED if verdict.ok else UPHELD


def evidence(payload: Any) -> tuple[Any, dict[str, bytes]]:
    """(dispute, bodies) of a posted `{dispute, bodies: {sha256: hex}}`, their size checked
    against MAX_EVIDENCE before any is decoded; DisputeRejected when it is not one."""
    if not isinstance(payload, dict) or not isinstance(payload.get("bodies"), dict):
        raise DisputeRejected("a gossiped dispute is {dispute, bodies: {sha256: hex}}")
    raw = payload["bodies"]
    if len(raw) > 3 or not all(isinstance(b, str) for b in raw.values()):
        raise DisputeRejected("dispute bodies are at most three hex strings (request, response "
                              "and tokens) keyed by their sha256")
    size = sum(len(b) for b in raw.values()) // 2
    if size > MAX_EVIDENCE:
        raise DisputeRejected(f"the dispute's bodies hold {size:,} bytes, more than the "
                              f"{MAX_EVIDENCE:,} a dispute may carry")
    try:
        bodies = {h: bytes.fromhex(b) for h, b in raw.items()}
    except ValueError:
        raise DisputeRejected("dispute bodies must be hex") from None
    return payload.get("dispute"), bodies


def dispute_id(data: dict[str, Any]) -> str:
    """A dispute's id: the SHA-256 of what its auditor signed (one claim, one id, however
    many nodes relay it)."""
    return hashlib.sha256(entries.dispute_message(data["claim"])).hexdigest()


def relay_message(ident: str, relayer: str) -> bytes:
    """What a relayer signs: the domain, the dispute's id and its own node id."""
    return RELAY_DOMAIN + f"{ident} {relayer}".encode()


def sign_relay(data: dict[str, Any], bodies: dict[str, bytes],
               signer: identity.Identity) -> dict[str, Any]:
    """The payload that relays a dispute this node re-checked and upheld: the dispute, its
    bodies and `relay` ({by, sig}) naming this node."""
    return {"dispute": data, "bodies": {h: bodies[h].hex() for h in dispute_bodies(data)},
            "relay": {"by": signer.node_id,
                      "sig": signer.sign(relay_message(dispute_id(data),
                                                       signer.node_id)).hex()}}


def relayer_of(payload: dict[str, Any], data: dict[str, Any]) -> str | None:
    """The node that relayed a (checked) dispute, None for a dispute sent by its auditor;
    DisputeRejected when the relay is malformed or its signature does not verify."""
    relay = payload.get("relay")
    if relay is None:
        return None
    if not isinstance(relay, dict) or not isinstance(relay.get("by"), str) \
            or not isinstance(relay.get("sig"), str):
        raise DisputeRejected("a dispute's relay is {by: node id, sig: hex}")
    by = relay["by"]
    if not identity.verify_hex(by, relay_message(dispute_id(data), by), relay["sig"]):
        raise DisputeRejected("forged relay: its signature does not verify against the "
                              "relaying node's id")
    if by == data["claim"]["auditor"]:
        raise DisputeRejected("a dispute's auditor sends it itself, without a relay")
    return by


class RelayQuota:
    """Relayed disputes considered here per relayer (its verified node id) per hour: a relayer
    with standing cannot flood this node's re-check queue with other keys' disputes."""

    def __init__(self, per_hour: int = RELAYS_PER_HOUR,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_hour = per_hour
        self.clock = clock
        self._taken: dict[str, collections.deque[float]] = {}

    def take(self, relayer: str) -> None:
        """Count one of `relayer`'s relays, or RecheckBusy (429) when its hour is used."""
        now = self.clock()
        taken = self._taken.setdefault(relayer, collections.deque())
        while taken and now - taken[0] >= 3600:
            taken.popleft()
        if len(taken) >= self.per_hour:
            raise RecheckBusy(f"node {relayer[:16]}… relayed {len(taken)} disputes here in the "
                              f"last hour, its limit of {self.per_hour}",
                              retry_after_s=int(3600 - (now - taken[0])) + 1)
        taken.append(now)
        if len(self._taken) > RELAY_SOURCES:  # forget relayers idle for an hour
            for old in [r for r, t in self._taken.items() if not t or now - t[-1] >= 3600]:
                del self._taken[old]


class SeenDisputes:
    """The ids of disputes taken here (re-checked, waiting, or unchecked), newest
    SEEN_DISPUTES kept: a relayed dispute arriving again by another path is a replay."""

    def __init__(self, size: int = SEEN_DISPUTES) -> None:
        self.size = size
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __contains__(self, ident: object) -> bool:
        return ident in self._ids

    def add(self, ident: str) -> None:
        self._ids[ident] = None
        self._ids.move_to_end(ident)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def discard(self, ident: str) -> None:
        self._ids.pop(ident, None)


def standing_problem(auditor: str, *, provided: int, reputation: int,
                     flag: str | None, trust: int | None = None) -> str | None:
    """Why `auditor` holds no standing at this node, or None when it does.

    Standing is what this node's own ledger says of it: it provided at least one settled,
    paid trade here (this node chose to buy from it, which no stranger can make it do: a
    fresh key, or one living on the peer free tier, has provided nothing), its reputation
    here is at least STANDING_REPUTATION, its trust over the trade graph (`trust`, when
    given) at least STANDING_TRUST_BP, and this node has not flagged it.
    """
    who = f"auditor {auditor[:16]}…"
    if flag is not None:
        return f"{who} is flagged here ({flag[:200]})"
    if provided < 1:
        return (f"{who} has provided no trade to this node: disputes are taken only from "
                "peers this node has bought from")
    if reputation < STANDING_REPUTATION:
        return (f"{who} has reputation {reputation} here, below the {STANDING_REPUTATION} "
                "a dispute needs")
    if trust is not None and trust < STANDING_TRUST_BP:
        return (f"{who} has trust {trust} bp here over the trade graph, below the "
                f"{STANDING_TRUST_BP} bp a dispute needs")
    return None


# -- a node's auditor ------------------------------------------------------------------------

Append = Callable[..., Awaitable[entries.Entry]]


class Bench(Protocol):
    """What the auditor asks of its node before a peer's dispute may cost it anything."""

    def standing(self, auditor: str) -> tuple[int, int, str | None]:
        """What `standing_problem` weighs, from this node's ledger and flags: the paid trades
        `auditor` provided here, its reputation here, and why it is flagged (or None)."""

    def trust(self, auditor: str) -> int:
        """The auditor's trust here over the trade graph, in bp (mesh.trust graph_bp)."""

    def holds(self, trade_id: str) -> bool:
        """Whether this node holds the trade (its ledger, or its verified network view)."""

    def audited(self, trade_id: str, auditor: str) -> int | None:
        """The seq at which this node recorded `auditor`'s audit of the trade, if it did."""

    def paying(self) -> bool:
        """Whether a paying session is open here (re-checks wait for none)."""


class Unbound:
    """The bench of an auditor with no node behind it: it takes no peer's dispute."""

    def standing(self, auditor: str) -> tuple[int, int, str | None]:
        return 0, 0, "this auditor takes no disputes from peers"

    def trust(self, auditor: str) -> int:
        return 0

    def holds(self, trade_id: str) -> bool:
        return False

    def audited(self, trade_id: str, auditor: str) -> int | None:
        return None

    def paying(self) -> bool:
        return False


@dataclass
class _Waiting:
    key: tuple[str, str]  # (trade id, auditor): one re-check of each at a time
    run: Callable[[threading.Event], Awaitable[dict[str, Any]]]
    done: asyncio.Future[dict[str, Any]]
    since: float


class RecheckQueue:
    """Peers' re-checks at low priority: at most `size` waiting, `per_minute` taken from each
    auditor, run one at a time and only while `paying()` is false. A re-check still running
    when a paying session opens is withdrawn (its `cancel` is set: the engine drops its
    prefill at the next step) and runs again from the start once the node is idle, so paying
    work waits at most one prefill chunk for it. Excess is refused with RecheckBusy (429)."""

    def __init__(self, paying: Callable[[], bool], *, size: int = DEFAULT_RECHECK_QUEUE,
                 per_minute: int = DEFAULT_RECHECKS_PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic,
                 counted: Callable[[str], None] = lambda outcome: None) -> None:
        self.paying = paying
        self.size = size
        self.per_minute = per_minute
        self.clock = clock
        self.counted = counted  # "yielded" for each withdrawal, "expired" for each drop
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self._taken: dict[str, collections.deque[float]] = {}  # per auditor, last minute
        self._task: asyncio.Task[None] | None = None

    def submit(self, key: tuple[str, str],
               run: Callable[[threading.Event], Awaitable[dict[str, Any]]]
               ) -> asyncio.Future[dict[str, Any]]:
        """Queue `run` (given the cancel event it must pass to the engine) for `key`'s
        auditor: Replay while the same key waits, RecheckBusy over a limit."""
        trade_id, auditor = key
        if any(w.key == key for w in self.waiting):
            raise Replay(f"auditor {auditor[:16]}…'s dispute of trade {trade_id[:16]}… is "
                         "already waiting for its re-check here")
        now = self.clock()
        taken = self._taken.setdefault(auditor, collections.deque())
        while taken and now - taken[0] >= 60:
            taken.popleft()
        if len(taken) >= self.per_minute:
            raise RecheckBusy(f"auditor {auditor[:16]}… had {len(taken)} disputes re-checked "
                              f"here in the last minute, its limit of {self.per_minute}",
                              retry_after_s=int(60 - (now - taken[0])) + 1)
        if len(self.waiting) >= self.size:
            raise RecheckBusy(f"{len(self.waiting)} disputes are already waiting for a re-check "
                              "here (they run only while no paying work is)", retry_after_s=30)
        taken.append(now)
        if len(self._taken) > 10_000:  # forget auditors idle for a minute: bounded memory
            for old in [a for a, t in self._taken.items() if not t or now - t[-1] >= 60]:
                del self._taken[old]
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieve)  # a poster that stopped waiting never reads it
        self.waiting.append(_Waiting(key, run, done, now))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._work())
        return done

    async def _work(self) -> None:
        while self.waiting:
            item = self.waiting[0]
            if self.clock() - item.since > RECHECK_EXPIRE_S:
                self.waiting.popleft()
                self.counted("expired")
                item.done.set_exception(RecheckBusy(
                    f"the re-check waited {RECHECK_EXPIRE_S} s for a node without paying work; "
                    "it was dropped", retry_after_s=60))
                continue
            if self.paying():
                await asyncio.sleep(IDLE_POLL_S)
                continue
            cancel = threading.Event()
            job = asyncio.ensure_future(item.run(cancel))
            while not job.done():
                await asyncio.wait({job}, timeout=IDLE_POLL_S)
                if not job.done() and self.paying():
                    cancel.set()
            error = job.exception()
            if isinstance(error, ModelError) and cancel.is_set():
                self.counted("yielded")  # paying work came first: run again once idle
                continue
            self.waiting.popleft()
            if error is None:
                item.done.set_result(job.result())
            elif isinstance(error, ForgeError):
                item.done.set_exception(error)
            else:
                log.error("re-check of a dispute failed", exc_info=error)
                item.done.set_exception(ModelError(f"the re-check failed: {error}"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self.waiting:
            item.done.cancel()
        self.waiting.clear()


def _retrieve(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()


class Auditor:
    """Audits this node's purchases (one in `every`), records the outcome, sends disputes to
    the mesh, and takes disputes from peers (re-checked before they count).

    `engines(sha256)` is this node's engine for a model, or None; `append(kind, data,
    bodies=…)` records an entry; `disputes_against(provider)` is (weight, threshold): the
    trust here (bp) of the distinct auditors whose disputes against it this node upheld, and
    the weight that flags it; `flag(node_id, reason)` takes a peer off the mesh as a fork
    does; `peers()` the URLs disputes are sent to; `send(url, payload)` posts one.
    """

    def __init__(self, signer: identity.Identity, *, every: int,
                 engines: Callable[[str], Any], append: Append,
                 disputes_against: Callable[[str], tuple[int, int]],
                 flag: Callable[[str, str], Any] = lambda node_id, reason: None,
                 peers: Callable[[], list[str]] = list,
                 send: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None,
                 clock: Callable[[], int] | None = None, bench: Bench | None = None,
                 rechecks_per_minute: int = DEFAULT_RECHECKS_PER_MINUTE,
                 recheck_queue: int = DEFAULT_RECHECK_QUEUE,
                 counted: Callable[[str], None] = lambda outcome: None) -> None:
        self.signer = signer
        self.every = every
        self.engines = engines
        self.append = append
        self.disputes_against = disputes_against
        self.flag = flag
        self.peers = peers
        self.send = send
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.bench: Bench = bench or Unbound()
        # counted(outcome): "upheld" and "forged" for each re-check run here, "yielded" and
        # "expired" from the queue (the node's metrics)
        self.counted = counted
        self.rechecks = RecheckQueue(self.bench.paying, size=recheck_queue,
                                     per_minute=rechecks_per_minute, counted=counted)
        self.relays = RelayQuota()
        self.seen = SeenDisputes()
        self._relaying: set[asyncio.Task[None]] = set()

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
        """Append a dispute (its bodies stored with it); flag the provider once the distinct
        auditors whose disputes against it are upheld here hold the trust `disputes_against`
        asks."""
        entry = await self.append("dispute", data,
                                  bodies=[bodies[h] for h in dispute_bodies(data)])
        provider = data["claim"]["trade"]["terms"]["provider"]
        if data["verdict"] == UPHELD:
            weight, threshold = await asyncio.to_thread(self.disputes_against, provider)
            if weight >= threshold:
                await _maybe_await(self.flag(
                    provider, f"disputes from distinct auditors holding {weight} bp of trust "
                              f"here (≥ {threshold}): served replies its committed model "
                              "and sampling could not have produced"))
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
        then DisputeRejected). Without the model nothing is recorded ("unchecked").

        Before anything costs model time or disk it must be well-formed with its evidence
        under MAX_EVIDENCE and three signatures that verify, not already audited here
        (Replay), from an auditor with standing here, about a trade this node holds or the
        auditor's own purchase (NoStanding); then it waits its turn in `rechecks`. A poster
        hears the verdict, or "queued" when it is not done within RECHECK_WAIT_S."""
        data, bodies = evidence(payload)
        check_dispute(data, bodies)
        relayer = relayer_of(payload, data)
        claim = data["claim"]
        auditor, terms = claim["auditor"], claim["trade"]["terms"]
        if self.signer.node_id in (auditor, relayer):
            return {"outcome": "own"}
        ident = dispute_id(data)
        trade_id = entries.trade_id(claim["trade"])
        seen = self.bench.audited(trade_id, auditor)
        if seen is not None:
            raise Replay(f"auditor {auditor[:16]}… already audited trade {trade_id[:16]}… "
                         f"(recorded here at seq {seen}); nothing was re-checked")
        if ident in self.seen:
            raise Replay(f"auditor {auditor[:16]}… already audited trade {trade_id[:16]}…: "
                         f"its dispute {ident[:16]}… was already taken here by another path; "
                         "nothing was re-checked")
        # A relayed dispute stands on its relayer's standing: that node re-checked it.
        source = relayer or auditor
        provided, reputation, flag = self.bench.standing(source)
        problem = standing_problem(source, provided=provided, reputation=reputation, flag=flag)
        if problem is None:  # the graph trust costs a look at the view: asked last
            problem = standing_problem(source, provided=provided, reputation=reputation,
                                       flag=flag, trust=self.bench.trust(source))
        if problem is not None and relayer is not None:
            problem = f"relayed by {relayer[:16]}…, whose standing counts: " + \
                problem.replace(f"auditor {relayer[:16]}…", "it", 1)
        if problem is None and relayer is None and terms["consumer"] != auditor \
                and not self.bench.holds(trade_id):
            problem = (f"trade {trade_id[:16]}… is not held here, and its auditor is not its "
                       "consumer")
        if problem is not None:
            raise NoStanding(f"dispute not considered: {problem}")
        if relayer is not None:
            self.relays.take(relayer)
        engine = self.engines(terms["model_sha256"])
        if engine is None:
            self.seen.add(ident)  # nothing to re-check it with; a repeat is refused unread
            return {"outcome": "unchecked"}

        async def run(cancel: threading.Event) -> dict[str, Any]:
            verdict = await asyncio.to_thread(recheck, engine, data, bodies, cancel=cancel)
            entry = await self.record({**data, "verdict": verdict}, bodies)
            self.counted(verdict)
            if verdict == FORGED:
                raise DisputeRejected(
                    f"forged dispute: trade {trade_id[:16]}… passes its audit here; recorded "
                    f"at seq {entry.seq} against auditor {auditor[:16]}…")
            self.relay(data, bodies)
            return {"outcome": UPHELD, "seq": entry.seq}

        done = self.rechecks.submit((trade_id, auditor), run)
        self.seen.add(ident)
        done.add_done_callback(lambda f: self._forget_dropped(f, ident))
        try:
            return await asyncio.wait_for(asyncio.shield(done), RECHECK_WAIT_S)
        except TimeoutError:
            return {"outcome": "queued", "waiting": len(self.rechecks.waiting)}

    def _forget_dropped(self, done: asyncio.Future[Any], ident: str) -> None:
        """A re-check dropped unrun (the node stopped, it expired, the engine failed) may be
        sent again; one that ran (upheld, or forged: DisputeRejected) stays seen."""
        if done.cancelled() or not isinstance(done.exception(), (type(None), DisputeRejected)):
            self.seen.discard(ident)

    def relay(self, data: dict[str, Any], bodies: dict[str, bytes]) -> None:
        """Send a peer's dispute this node upheld on to its peers, signed as relayed by this
        node, in the background (at most RELAY_TASKS at once; a peer that has it refuses it
        as a replay before any work)."""
        if self.send is None:
            return
        if len(self._relaying) >= RELAY_TASKS:
            log.warning("not relaying dispute %s…: %d relays are still being sent",
                        dispute_id(data)[:16], len(self._relaying))
            return
        payload = sign_relay({**data, "verdict": UPHELD}, bodies, self.signer)
        task = asyncio.create_task(self._send_all(payload))
        self._relaying.add(task)
        task.add_done_callback(self._relaying.discard)

    async def _send_all(self, payload: dict[str, Any]) -> None:
        assert self.send is not None
        for url in self.peers():
            try:
                await self.send(url, payload)
            except ForgeError as exc:
                log.info("relayed dispute not taken by %s: %s", url, exc)

    async def pull(self, url: str, fetch: Callable[[str], Awaitable[Any]], after: int) -> int:
        """Take the disputes a peer serves after its ledger seq `after` (`fetch(path)` GETs
        one page of `disputes_page`), each as if posted here; returns the cursor to ask from
        next. A dispute over a quota stops the page: it is asked for again next time."""
        page = await fetch(f"{PULL_PATH}?after={after}")
        items = page.get("disputes") if isinstance(page, dict) else None
        if not isinstance(items, list) or len(items) > PULL_PAGE:
            raise DisputeRejected(f"{url} served a dispute page that is not "
                                  f"{{disputes: [at most {PULL_PAGE}], next: seq}}")
        cursor = after
        for item in items:
            seq = item.get("seq") if isinstance(item, dict) else None
            if type(seq) is not int or seq <= cursor:
                raise DisputeRejected(f"{url} served a dispute without a growing seq")
            try:
                await self.receive(item)
            except RecheckBusy as exc:
                log.info("pulled dispute from %s waits: %s", url, exc)
                return cursor
            except ForgeError as exc:  # a replay, no standing, a forgery: taken as a post is
                log.info("pulled dispute from %s not taken: %s", url, exc)
            cursor = seq
        last = page.get("next")
        return last if type(last) is int and last > cursor and not items else cursor

    async def stop(self) -> None:
        """Drop the re-checks still waiting (their posters may send them again)."""
        for task in list(self._relaying):
            task.cancel()
        await asyncio.gather(*self._relaying, return_exceptions=True)
        await self.rechecks.stop()


PULL_PATH = "/v1/forge/audit/disputes"
PULL_PAGE = 4  # disputes per pulled page (each carries up to MAX_EVIDENCE of bodies)
PULL_SCAN = 256  # dispute entries one page looks through (forged ones are not served)
PULL_PAGE_MAX_BYTES = PULL_PAGE * (2 * MAX_EVIDENCE + 64 * 1024)


def disputes_page(ledger: Any, signer: identity.Identity, after: int) -> dict[str, Any]:
    """The upheld disputes of `ledger` after seq `after`, at most PULL_PAGE, each relayed by
    `signer` (its own disputes go as they are: their auditor sends them), for `pull`."""
    items: list[dict[str, Any]] = []
    last = after
    for scanned, entry in enumerate(ledger.iter_entries(after + 1, kind="dispute")):
        if scanned >= PULL_SCAN:
            break
        last = entry.seq
        data = entry.data
        if data["verdict"] != UPHELD:
            continue
        bodies = {h: ledger.body(h) for h in dispute_bodies(data)}
        if any(b is None for b in bodies.values()):
            continue  # redacted here: nothing a peer could re-check
        if data["claim"]["auditor"] == signer.node_id:
            item = {"dispute": data, "bodies": {h: b.hex() for h, b in bodies.items()}}
        else:
            item = sign_relay(data, bodies, signer)
        items.append({**item, "seq": entry.seq})
        if len(items) >= PULL_PAGE:
            break
    return {"disputes": items, "next": last}


async def _maybe_await(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


__all__ = ["AUDIT_TOP_K", "Auditor", "Bench", "DEFAULT_EVERY", "FORGED", "GRAMMAR_CANDIDATES",
           "MARGIN", "MAX_EVIDENCE", "PULL_PAGE", "PULL_PATH", "Positions",
           "RELAYS_PER_HOUR", "RecheckQueue", "RelayQuota", "STANDING_REPUTATION",
           "STANDING_TRUST_BP", "SeenDisputes", "UPHELD", "Verdict", "audit", "check_dispute",
           "commit_sampling", "counts_problem", "dispute_id", "disputes_page", "evidence",
           "grammar_problem", "ids_of", "position_check", "recheck", "relay_message",
           "relayer_of", "run_terms", "sign_dispute", "sign_relay", "standing_problem",
           "tokens_body"]
