"""Ledger entries: their canonical form, hash, signature and the rules of each kind.

An entry is `{"v","seq","ts","kind","actor","parent","data","bodies","prev"}` encoded with
`forge_cli.canonical`; its hash is SHA-256(0x00 ‖ bytes) (the RFC 6962 leaf hash), which is
both the chain link and the Merkle leaf. The actor signs the hash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, cast

from forge_cli import canonical, identity
from forge_cli.errors import EntryRejected

VERSION = 1
GENESIS_PREV = "0" * 64
TRADE_DOMAIN = b"forge-trade-v1\n"
DISPUTE_DOMAIN = b"forge-dispute-v1\n"
UCU_PER_CU = 1_000_000
# Every amount, count and time in an entry or trade is at most 2^53: exact in SQLite, in JSON
# readers that use doubles, and far from 2^63 when summed.
MAX_AMOUNT = 2**53
# An entry's bytes are the leaf the tree hashes, and C2SP tlog-tiles entry bundles carry each
# leaf after a big-endian uint16 length: no entry may be longer (bodies are stored apart).
MAX_LEAF_BYTES = 65_535

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
ENTRY_FIELDS = frozenset({"v", "seq", "ts", "kind", "actor", "parent", "data", "bodies", "prev"})


def leaf_hash(entry_bytes: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry_bytes).digest()


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One decoded entry with its stored bytes, hash and actor signature."""

    raw: bytes
    hash: bytes
    sig: bytes
    fields: dict[str, Any]

    @property
    def seq(self) -> int:
        return cast("int", self.fields["seq"])

    @property
    def kind(self) -> str:
        return cast("str", self.fields["kind"])

    @property
    def data(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.fields["data"])

    @property
    def actor(self) -> str:
        return cast("str", self.fields["actor"])

    def to_json(self) -> dict[str, Any]:
        return {"entry": self.fields, "hash": self.hash.hex(), "sig": self.sig.hex()}


def build(
    *, seq: int, ts: int, kind: str, actor: str, parent: int | None, data: dict[str, Any],
    bodies: list[str], prev: str,
) -> tuple[dict[str, Any], bytes, bytes]:
    """The entry fields, their canonical bytes and leaf hash (unsigned)."""
    fields = {"v": VERSION, "seq": seq, "ts": ts, "kind": kind, "actor": actor,
              "parent": parent, "data": data, "bodies": bodies, "prev": prev}
    # Only `data` comes from outside; the envelope is ints and hex strings built here.
    canonical.check(data)
    if not (type(seq) is type(ts) is int and isinstance(kind, str) and kind.isascii()):
        raise canonical.CanonicalError("entry envelope has a seq, ts or kind of the wrong type")
    raw = canonical.dumps_checked_parts(fields)
    check_leaf_size(seq, raw)
    return fields, raw, leaf_hash(raw)


def check_leaf_size(seq: int, raw: bytes) -> None:
    """EntryRejected if the entry is too long to be a leaf of an entry bundle."""
    if len(raw) > MAX_LEAF_BYTES:
        raise EntryRejected(
            f"entry {seq} would be {len(raw):,} bytes; a ledger entry is at most "
            f"{MAX_LEAF_BYTES:,} bytes (C2SP tlog-tiles entry bundles carry a 16-bit length); "
            "put large content in a body, which is stored outside the entry")


def check_envelope(fields: Any) -> str | None:
    """Why the entry's outer shape is wrong, or None if it is well-formed."""
    if not isinstance(fields, dict) or set(fields) != ENTRY_FIELDS:
        return "entry fields are not exactly v, seq, ts, kind, actor, parent, data, bodies, prev"
    if fields["v"] != VERSION:
        return f"unsupported entry version {fields['v']!r}"
    seq, parent = fields["seq"], fields["parent"]
    if type(seq) is not int or seq < 0:
        return "seq is not a non-negative integer"
    if type(fields["ts"]) is not int or fields["ts"] < 0:
        return "ts is not a non-negative integer (unix milliseconds)"
    if parent is not None and (type(parent) is not int or not 0 <= parent < seq):
        return f"parent {parent!r} is not an earlier seq"
    if not isinstance(fields["actor"], str) or not _HEX64.fullmatch(fields["actor"]):
        return "actor is not a 64-digit hex public key"
    if not isinstance(fields["prev"], str) or not _HEX64.fullmatch(fields["prev"]):
        return "prev is not a 64-digit hex hash"
    bodies = fields["bodies"]
    if not isinstance(bodies, list) or not all(
        isinstance(b, str) and _HEX64.fullmatch(b) for b in bodies
    ):
        return "bodies is not a list of sha256 hex digests"
    if len(set(bodies)) != len(bodies):
        return "bodies lists the same hash twice"
    if not isinstance(fields["data"], dict):
        return "data is not an object"
    rule = KINDS.get(fields["kind"])
    if rule is None:
        return f"unknown entry kind {fields['kind']!r}"
    return rule(fields["data"])


# -- kinds -------------------------------------------------------------------------------------

def _account(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        return f"data.{key} is not an account (64-digit hex public key)"
    return None


def _positive(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if type(value) is not int or value <= 0:
        return f"data.{key} must be a positive integer, found {value!r}"
    if value > MAX_AMOUNT:
        return f"data.{key} is {value}, above 2^53 (the largest amount forge stores)"
    return None


def _exact_keys(data: dict[str, Any], required: AbstractSet[str],
                optional: AbstractSet[str] = frozenset()) -> str | None:
    missing = required - set(data)
    extra = set(data) - required - optional
    if missing or extra:
        return f"data has missing keys {sorted(missing)} / unexpected keys {sorted(extra)}"
    return None


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)


def _mint(data: dict[str, Any]) -> str | None:  # grant and burn
    return _first(_exact_keys(data, {"account", "cu"}, {"reason"}), _account(data, "account"),
                  _positive(data, "cu"),
                  None if isinstance(data.get("reason", ""), str) else "data.reason is not text")


def _transfer(data: dict[str, Any]) -> str | None:
    return _first(
        _exact_keys(data, {"from", "to", "cu"}, {"memo"}), _account(data, "from"),
        _account(data, "to"), _positive(data, "cu"),
        "a transfer to oneself moves nothing" if data.get("from") == data.get("to") else None,
    )


TRADE_TERMS = {
    "provider", "consumer", "model", "model_sha256", "prompt_tokens", "completion_tokens",
    "price_ucu_per_token", "cu", "request_sha256", "response_sha256", "nonce", "ts",
}


# What a provider commits to about the run itself (optional in terms, both or neither): the
# sampling it used, as integers (probabilities and temperature in ppm), and the SHA-256 of the
# token ids it produced (the ids travel as a body: `forge_cli.mesh.audit.tokens_body`).
TRADE_RUN = frozenset({"sampling", "tokens_sha256"})
SAMPLING_KEYS = frozenset({"temperature_ppm", "top_p_ppm", "top_k", "min_p_ppm",
                           "repeat_penalty_ppm", "seed", "max_tokens"})
_SAMPLING_LIMITS = {"temperature_ppm": 2_000_000, "top_p_ppm": 1_000_000, "top_k": 1_000_000,
                    "min_p_ppm": 1_000_000, "repeat_penalty_ppm": 10_000_000, "seed": 2**32 - 1,
                    "max_tokens": 1_000_000}


# The SHA-256 of the grammar (GBNF) that constrained the reply: present only when one did, so
# terms of free replies are what they always were.
SAMPLING_GRAMMAR = "grammar_sha256"


def check_sampling(sampling: Any) -> str | None:
    """Why committed sampling parameters are malformed, or None."""
    if not isinstance(sampling, dict):
        return "terms.sampling is not an object"
    missing = SAMPLING_KEYS - set(sampling)
    extra = set(sampling) - SAMPLING_KEYS - {SAMPLING_GRAMMAR}
    if missing or extra:
        return (f"terms.sampling has missing keys {sorted(missing)} / unexpected keys "
                f"{sorted(extra)}")
    for key, high in _SAMPLING_LIMITS.items():
        value = sampling[key]
        if type(value) is not int or not 0 <= value <= high:
            return f"terms.sampling.{key} must be an integer from 0 to {high}, found {value!r}"
    if SAMPLING_GRAMMAR in sampling:
        value = sampling[SAMPLING_GRAMMAR]
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            return (f"terms.sampling.{SAMPLING_GRAMMAR} must be a sha256 hex digest (64 "
                    f"lowercase hex digits), found {str(value)[:80]!r}")
    return None


# What a trade sold when it was not a generation (optional in terms; absent: a generation).
# "embeddings": vectors of the input text; the input is what is billed (`billed_tokens`), no
# token is generated and nothing is sampled, so the terms commit to no run.
TRADE_SERVICE = "service"
SERVICES = frozenset({"embeddings"})


def trade_cost(completion_tokens: int, price_ucu_per_token: int) -> int:
    """cu = ceil(completion_tokens × price), price in µCU per token."""
    return -(-completion_tokens * price_ucu_per_token // UCU_PER_CU)


def billed_tokens(terms: dict[str, Any]) -> int:
    """The tokens a trade's cu pays for: those generated, or an embedding's input tokens."""
    if terms.get(TRADE_SERVICE) == "embeddings":
        return cast(int, terms["prompt_tokens"])
    return cast(int, terms["completion_tokens"])


def trade_message(terms: dict[str, Any]) -> bytes:
    """What provider and consumer sign: the domain prefix and the canonical terms."""
    return TRADE_DOMAIN + canonical.encode(terms)


def check_terms(terms: Any) -> str | None:
    if not isinstance(terms, dict):
        return "data.terms is not an object"
    reason = _first(_exact_keys(terms, TRADE_TERMS, TRADE_RUN | {TRADE_SERVICE}),
                    _account(terms, "provider"), _account(terms, "consumer"))
    if reason:
        return reason
    if TRADE_SERVICE in terms:
        service = terms[TRADE_SERVICE]
        if not isinstance(service, str) or service not in SERVICES:
            return (f"terms.service is {str(service)[:40]!r}; a trade sells "
                    f"{' or '.join(sorted(SERVICES))} (or, without it, a generation)")
        if terms["completion_tokens"] != 0 or TRADE_RUN & set(terms):
            return "an embeddings trade generates no tokens and commits to no sampled run"
    if TRADE_RUN & set(terms):
        if not TRADE_RUN <= set(terms):
            return "terms commit to the run with both sampling and tokens_sha256, or neither"
        reason = check_sampling(terms["sampling"])
        if reason:
            return reason
        if not isinstance(terms["tokens_sha256"], str) or \
                not _HEX64.fullmatch(terms["tokens_sha256"]):
            return "terms.tokens_sha256 is not a sha256 hex digest"
    for key in ("model_sha256", "request_sha256", "response_sha256"):
        if not isinstance(terms[key], str) or not _HEX64.fullmatch(terms[key]):
            return f"terms.{key} is not a sha256 hex digest"
    for key in ("prompt_tokens", "completion_tokens", "price_ucu_per_token", "cu", "ts"):
        if type(terms[key]) is not int or terms[key] < 0:
            return f"terms.{key} must be a non-negative integer"
        if terms[key] > MAX_AMOUNT:
            return f"terms.{key} is {terms[key]}, above 2^53 (the largest amount forge stores)"
    if not isinstance(terms["model"], str) or not terms["model"]:
        return "terms.model is empty"
    if not isinstance(terms["nonce"], str) or not 8 <= len(terms["nonce"]) <= 128:
        return "terms.nonce must be a string of 8 to 128 characters"
    if terms["provider"] == terms["consumer"]:
        return "provider and consumer are the same account"
    billed = billed_tokens(terms)
    expected = trade_cost(billed, terms["price_ucu_per_token"])
    if terms["cu"] != expected:
        return (f"terms.cu is {terms['cu']} but {billed} tokens at "
                f"{terms['price_ucu_per_token']} µCU/token cost {expected} CU")
    return None


def _trade(data: dict[str, Any]) -> str | None:
    reason = _first(_exact_keys(data, {"terms", "provider_sig", "consumer_sig"}),
                    check_terms(data.get("terms")))
    if reason:
        return reason
    for key in ("provider_sig", "consumer_sig"):
        if not isinstance(data[key], str) or not _HEX128.fullmatch(data[key]):
            return f"data.{key} is not a 64-byte hex signature"
    return None


def trade_id(data: dict[str, Any]) -> str:
    """A dual-signed trade's identity across nodes: SHA-256 of its canonical `data`
    (terms and both signatures). Both parties' ledgers and every network view agree on it."""
    return hashlib.sha256(canonical.encode(data)).hexdigest()


def trade_signature_problem(data: dict[str, Any]) -> str | None:
    """Why a (well-formed) trade's two signatures fail, or None when both verify."""
    message = trade_message(data["terms"])
    for party in ("provider", "consumer"):
        if not identity.verify_hex(data["terms"][party], message, data[f"{party}_sig"]):
            return f"{party} signature over the trade terms does not verify"
    return None


def _redact(data: dict[str, Any]) -> str | None:
    body = data.get("body")
    return _first(_exact_keys(data, {"body"}, {"reason"}),
                  None if isinstance(body, str) and _HEX64.fullmatch(body)
                  else "data.body is not a sha256 hex digest")


def _note(data: dict[str, Any]) -> str | None:
    return _first(_exact_keys(data, {"text"}),
                  None if isinstance(data.get("text"), str) else "data.text is not text")


def _text(data: dict[str, Any], key: str, limit: int = 1000) -> str | None:
    value = data.get(key)
    if not isinstance(value, str) or len(value) > limit:
        return f"data.{key} must be text of at most {limit} characters"
    return None


def _kill(data: dict[str, Any]) -> str | None:
    return _first(_exact_keys(data, {"active", "reason"}),
                  None if type(data.get("active")) is bool else "data.active must be true or false",
                  _text(data, "reason"))


POLICY_LIMITS = ("per_request_cap_cu", "hourly_budget_cu", "lifetime_budget_cu",
                 "approval_threshold_cu")


def _policy(data: dict[str, Any]) -> str | None:
    reason = _exact_keys(data, {"account", *POLICY_LIMITS})
    if reason is None and data["account"] != "*":
        reason = _account(data, "account")
        if reason:
            reason = "data.account must be an account (64-digit hex public key) or '*'"
    return _first(reason, *(_positive(data, key) for key in POLICY_LIMITS))


APPROVAL_STATUSES = ("requested", "approved", "denied", "expired", "used")
_APPROVAL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _approval(data: dict[str, Any]) -> str | None:
    status = data.get("status")
    # A request says when it lapses; a decision about it carries no deadline of its own.
    required = {"id", "account", "cu", "status"} | ({"expires_ms"} if status == "requested" else set())
    reason = _first(
        _exact_keys(data, required), _account(data, "account"), _positive(data, "cu"),
        None if status in APPROVAL_STATUSES else
        f"data.status must be one of {', '.join(APPROVAL_STATUSES)}, found {status!r}",
        None if isinstance(data.get("id"), str) and _APPROVAL_ID.fullmatch(data["id"])
        else "data.id must be 1 to 64 letters, digits, '_' or '-'",
    )
    if reason is None and "expires_ms" in data:
        reason = _positive(data, "expires_ms")
    return reason


# -- lending (DESIGN §4): the rules every entry of these kinds obeys on its own; the rules that
# need the pool's state (shares, interest, due dates) are checked by the fold in `views`.

HOUR_MS = 3_600_000
PPM = 1_000_000
MAX_TERM_HOURS = 168
MAX_LEVERAGE = 3  # principal ≤ 3 × collateral
BASE_RATE_PPM = 1_000  # 0.1 % per hour
CREDIT_RATE_PPM = 5_000  # + (1 − credit) × 0.5 % per hour
DEFAULT_BURN_PPM = 100_000  # 10 % of the collateral of a defaulted loan is burned


def rate_ppm(credit_bp: int) -> int:
    """Hourly interest in ppm for a credit score in basis points, rounded up (pool's favour).

    >>> rate_ppm(10_000), rate_ppm(2_000), rate_ppm(0)
    (1000, 5000, 6000)
    """
    return BASE_RATE_PPM + -(-(10_000 - credit_bp) * CREDIT_RATE_PPM // 10_000)


def loan_hours(start_ms: int, end_ms: int) -> int:
    """Hours of interest owed: every started hour counts, and at least one."""
    return max(1, -(-(end_ms - start_ms) // HOUR_MS))


def interest_cu(principal: int, rate: int, start_ms: int, end_ms: int) -> int:
    """Simple interest in CU, rounded up in the pool's favour: ceil(p × rate × hours / 1e6)."""
    return -(-principal * rate * loan_hours(start_ms, end_ms) // PPM)


def default_burn(collateral: int) -> int:
    """CU burned when a loan defaults: 10 % of the collateral, rounded up."""
    return -(-collateral * DEFAULT_BURN_PPM // PPM)


def _nonneg(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if type(value) is not int or value < 0:
        return f"data.{key} must be a non-negative integer, found {value!r}"
    if value > MAX_AMOUNT:
        return f"data.{key} is {value}, above 2^53 (the largest amount forge stores)"
    return None


def _deposit(data: dict[str, Any]) -> str | None:
    return _first(_exact_keys(data, {"account", "cu", "shares"}), _account(data, "account"),
                  _positive(data, "cu"), _positive(data, "shares"))


def _withdraw(data: dict[str, Any]) -> str | None:
    return _first(_exact_keys(data, {"account", "cu", "shares"}), _account(data, "account"),
                  _nonneg(data, "cu"), _positive(data, "shares"))


def _borrow(data: dict[str, Any]) -> str | None:
    reason = _first(
        _exact_keys(data, {"account", "principal", "collateral", "term_hours", "credit_bp",
                           "rate_ppm"}),
        _account(data, "account"), _positive(data, "principal"), _positive(data, "collateral"),
        _positive(data, "term_hours"), _nonneg(data, "credit_bp"), _positive(data, "rate_ppm"))
    if reason:
        return reason
    if data["term_hours"] > MAX_TERM_HOURS:
        return f"data.term_hours {data['term_hours']} is above {MAX_TERM_HOURS}"
    if data["credit_bp"] > 10_000:
        return f"data.credit_bp {data['credit_bp']} is above 10000"
    if data["principal"] > MAX_LEVERAGE * data["collateral"]:
        return (f"data.principal {data['principal']} is more than {MAX_LEVERAGE} × collateral "
                f"{data['collateral']}")
    if data["rate_ppm"] != rate_ppm(data["credit_bp"]):
        return (f"data.rate_ppm is {data['rate_ppm']} but credit {data['credit_bp']} bp gives "
                f"{rate_ppm(data['credit_bp'])}")
    return None


def _repay(data: dict[str, Any]) -> str | None:
    return _first(_exact_keys(data, {"loan_id", "account", "interest"}),
                  _nonneg(data, "loan_id"), _account(data, "account"), _nonneg(data, "interest"))


def _default(data: dict[str, Any]) -> str | None:
    return _first(_exact_keys(data, {"loan_id", "account", "burn"}),
                  _nonneg(data, "loan_id"), _account(data, "account"), _nonneg(data, "burn"))


def _heartbeat(data: dict[str, Any]) -> str | None:
    return _first(_exact_keys(data, {"account"}), _account(data, "account"))


def _unsettled(data: dict[str, Any]) -> str | None:
    """Terms a provider signed and served that the consumer never countersigned: no CU moves."""
    reason = _first(_exact_keys(data, {"terms", "provider_sig", "reason"}),
                    check_terms(data.get("terms")), _text(data, "reason"))
    if reason:
        return reason
    if not isinstance(data["provider_sig"], str) or not _HEX128.fullmatch(data["provider_sig"]):
        return "data.provider_sig is not a 64-byte hex signature"
    if not identity.verify_hex(data["terms"]["provider"], trade_message(data["terms"]),
                               data["provider_sig"]):
        return "provider signature over the trade terms does not verify"
    return None


# -- agent runs (issue #8): one kind, one `step` per entry; `parent` is the causal parent ----

AGENT_STEPS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # step: (keys besides run and step, of which these may be null)
    "request": (frozenset({"account", "request_sha256", "budget_cu", "max_calls", "resumes",
                           "model", "max_tokens"}),
                frozenset({"budget_cu", "max_calls", "resumes"})),
    "plan": (frozenset({"planner", "model", "trade", "cu", "plan_sha256", "tasks", "waves"}),
             frozenset({"model", "trade"})),
    "task": (frozenset({"task", "wave", "attempt", "model", "deps", "inputs", "max_cu", "reuse"}),
             frozenset({"model", "max_cu", "reuse"})),
    "result": (frozenset({"task", "model", "trade", "cu", "completion_tokens", "result_sha256"}),
               frozenset({"trade"})),
    "verdict": (frozenset({"task", "ok", "check", "reason"}), frozenset()),
    "answer": (frozenset({"model", "trade", "cu", "answer_sha256", "inputs"}), frozenset({"trade"})),
    "stop": (frozenset({"gate", "reason", "spent_cu", "calls", "in_flight"}), frozenset()),
    "error": (frozenset({"stage", "reason", "body_sha256", "trade", "cu"}),
              frozenset({"body_sha256", "trade"})),
    # issue 21: routing to roster lanes, the answer's intent coverage, its verification
    "route": (frozenset({"task", "lane", "method", "category", "executor", "confidence_pm",
                         "candidates", "threshold_pm", "margin_pm", "trade", "cu"}),
              frozenset({"trade"})),
    "intent": (frozenset({"method", "coverage_pm", "flagged", "terms", "missing", "judgment"}),
               frozenset({"judgment"})),
    "verification": (frozenset({"ok", "source", "detail", "seconds_ms"}), frozenset()),
}
# Keys a step may carry since issue 21 (entries written before it lack them); null allowed.
AGENT_OPTIONAL: dict[str, frozenset[str]] = {
    "request": frozenset({"max_seconds", "roster", "roster_sha256", "plan_only"}),
    "plan": frozenset({"edges"}),
    "task": frozenset({"lane", "tier", "executor"}),
    "result": frozenset({"finish_reason", "executor_model", "seconds_ms", "prompt_tokens",
                         "external_cost", "call_ok", "detail", "external_trade_sha256"}),
    "verdict": frozenset({"score", "trade", "cu"}),
    "answer": frozenset({"finish_reason", "failed", "seconds_ms"}),
    "stop": frozenset({"seconds_ms"}),
    "error": frozenset({"planner"}),
}
_AGENT_BOOLS = ("ok", "flagged", "call_ok", "plan_only")
_AGENT_JSON = ("candidates", "edges", "missing", "failed", "external_cost", "judgment")
MAX_AGENT_JSON = 16 * 1024
_RUN_ID = re.compile(r"ag_[0-9a-f]{12}")
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_AGENT_INTS = ("budget_cu", "max_calls", "max_tokens", "tasks", "waves", "wave", "attempt", "cu", "max_cu",
               "completion_tokens", "spent_cu", "calls", "in_flight", "trade", "reuse",
               "max_seconds", "confidence_pm", "threshold_pm", "margin_pm", "seconds_ms",
               "prompt_tokens", "score", "coverage_pm", "terms")


def _agent(data: dict[str, Any]) -> str | None:
    step = data.get("step")
    if step not in AGENT_STEPS:
        return f"data.step must be one of {', '.join(AGENT_STEPS)}, found {step!r}"
    keys, nullable = AGENT_STEPS[step]
    optional = AGENT_OPTIONAL.get(step, frozenset())
    reason = _exact_keys(data, {"run", "step", *keys}, optional)
    if reason:
        return reason
    if not isinstance(data["run"], str) or not _RUN_ID.fullmatch(data["run"]):
        return "data.run must be 'ag_' and 12 hex digits"
    for key in [*keys, *(k for k in optional if k in data)]:
        value = data[key]
        if value is None:
            if key not in nullable and key not in optional:
                return f"data.{key} must not be null in a {step} step"
        elif key in _AGENT_INTS:
            if type(value) is not int or value < 0:
                return f"data.{key} must be a non-negative integer, found {value!r}"
        elif key.endswith("_sha256"):
            if not isinstance(value, str) or not _HEX64.fullmatch(value):
                return f"data.{key} is not a sha256 hex digest"
        elif key == "account":
            reason = _account(data, "account")
        elif key == "resumes":
            if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
                return "data.resumes must be a run id ('ag_' and 12 hex digits)"
        elif key == "task":
            if not isinstance(value, str) or not _TASK_ID.fullmatch(value):
                return "data.task must be 1 to 32 letters, digits, '_' or '-'"
        elif key == "deps":
            if not isinstance(value, list) or not all(
                    isinstance(d, str) and _TASK_ID.fullmatch(d) for d in value):
                return "data.deps must be a list of task ids"
        elif key == "inputs":
            if not isinstance(value, list) or not all(type(s) is int and s >= 0 for s in value):
                return "data.inputs must be a list of entry seqs"
        elif key == "ok":
            if type(value) is not bool:
                return "data.ok must be true or false"
        elif key == "planner":
            if value not in ("file", "model", "coordinator", "resume"):
                return f"data.planner must be file, coordinator or resume, found {value!r}"
        elif key in _AGENT_BOOLS:
            if type(value) is not bool:
                return f"data.{key} must be true or false"
        elif key in _AGENT_JSON:
            reason = _agent_json(key, value)
        else:  # model, check, gate, stage, reason, lane, method, …: short text
            reason = _text(data, key)
        if reason:
            return reason
    return None


def _agent_json(key: str, value: Any) -> str | None:
    """A structured value of an agent step (candidates, edges, missing terms, a judgment):
    a list or an object of integers, text, booleans and nulls, bounded in size."""
    if not isinstance(value, (list, dict)):
        return f"data.{key} must be a list or an object"
    stack: list[Any] = [value]
    size = 0
    while stack:
        item = stack.pop()
        size += 1
        if isinstance(item, dict):
            stack.extend(item.values())
            size += sum(len(k) for k in item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            size += len(item)
        elif item is not None and not isinstance(item, (bool, int)):
            return f"data.{key} holds a {type(item).__name__}; only integers, text and booleans"
        if size > MAX_AGENT_JSON:
            return f"data.{key} is larger than {MAX_AGENT_JSON // 1024} KiB"
    return None


# -- audits (proof of useful work): a pass, or a dispute carrying its evidence ----------------

AUDIT_VERDICTS = ("upheld", "forged")
MAX_FAILURES = 16  # failing positions a dispute carries (the first ones)
MAX_TOP = 8  # the auditor's best tokens listed at each
FAILURE_KEYS = frozenset({"pos", "token", "token_mlogit", "bound_mlogit", "top"})


def _audit(data: dict[str, Any]) -> str | None:
    """A passed audit of a trade by the entry's actor: it counts for the provider."""
    return _first(_exact_keys(data, {"trade_id", "provider", "model_sha256", "positions"}),
                  _account(data, "provider"), _nonneg(data, "positions"),
                  *(None if isinstance(data.get(k), str) and _HEX64.fullmatch(data[k])
                    else f"data.{k} is not a sha256 hex digest"
                    for k in ("trade_id", "model_sha256")))


def _failure(item: Any) -> str | None:
    if not isinstance(item, dict) or set(item) != FAILURE_KEYS:
        return f"each failure has exactly {', '.join(sorted(FAILURE_KEYS))}"
    for key in ("pos", "token"):
        if type(item[key]) is not int or not 0 <= item[key] <= MAX_AMOUNT:
            return f"failure.{key} must be a non-negative integer"
    for key in ("token_mlogit", "bound_mlogit"):
        if type(item[key]) is not int or abs(item[key]) > MAX_AMOUNT:
            return f"failure.{key} must be an integer (milli-logits)"
    top = item["top"]
    if not isinstance(top, list) or len(top) > MAX_TOP or not all(
            isinstance(t, list) and len(t) == 2 and all(type(v) is int for v in t) for t in top):
        return f"failure.top must list at most {MAX_TOP} [token, milli-logit] pairs"
    return None


def dispute_message(claim: dict[str, Any]) -> bytes:
    """What an auditor signs: the domain prefix and the canonical claim."""
    return DISPUTE_DOMAIN + canonical.encode(claim)


def _dispute(data: dict[str, Any]) -> str | None:
    """An auditor's signed claim that a trade's reply is not what its terms commit to, and the
    verdict of the node that recorded it: `upheld` (it re-checked, or it is the auditor) or
    `forged` (the evidence did not re-check: it counts against the auditor)."""
    reason = _first(_exact_keys(data, {"claim", "auditor_sig", "verdict"}),
                    None if data.get("verdict") in AUDIT_VERDICTS
                    else f"data.verdict must be one of {', '.join(AUDIT_VERDICTS)}")
    if reason:
        return reason
    claim = data["claim"]
    if not isinstance(claim, dict):
        return "data.claim is not an object"
    reason = _first(_exact_keys(claim, {"trade", "auditor", "reason", "failures", "positions",
                                        "ts"}),
                    _account(claim, "auditor"), _text(claim, "reason"),
                    _nonneg(claim, "positions"), _nonneg(claim, "ts"))
    if reason:
        return f"claim: {reason}"
    trade = claim["trade"]
    reason = _trade(trade) if isinstance(trade, dict) else "data.claim.trade is not an object"
    if reason:
        return f"claim.trade: {reason}"
    if not TRADE_RUN <= set(trade["terms"]):
        return "claim.trade: the terms commit to no run (sampling and tokens), nothing to audit"
    if claim["auditor"] == trade["terms"]["provider"]:
        return "claim: a provider cannot dispute its own trade"
    failures = claim["failures"]
    if not isinstance(failures, list) or len(failures) > MAX_FAILURES:
        return f"claim.failures must be a list of at most {MAX_FAILURES}"
    reason = next((r for r in map(_failure, failures) if r), None)
    if reason:
        return f"claim: {reason}"
    if not isinstance(data["auditor_sig"], str) or not _HEX128.fullmatch(data["auditor_sig"]):
        return "data.auditor_sig is not a 64-byte hex signature"
    return None


def dispute_signatures(data: dict[str, Any]) -> list[tuple[str, bytes, str, str]]:
    """The signatures a (well-formed) dispute carries: (signer, message, signature, whose)."""
    claim = data["claim"]
    terms = claim["trade"]["terms"]
    message = trade_message(terms)
    return [(claim["auditor"], dispute_message(claim), data["auditor_sig"], "dispute auditor"),
            (terms["provider"], message, claim["trade"]["provider_sig"], "disputed trade provider"),
            (terms["consumer"], message, claim["trade"]["consumer_sig"], "disputed trade consumer")]


def dispute_signature_problem(data: dict[str, Any]) -> str | None:
    """Why a (well-formed) dispute's signatures fail, or None when all three verify."""
    for signer, message, sig, whose in dispute_signatures(data):
        if not identity.verify_hex(signer, message, sig):
            return f"{whose} signature does not verify"
    return None


KINDS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "grant": _mint,
    "burn": _mint,
    "transfer": _transfer,
    "trade": _trade,
    "redact": _redact,
    "note": _note,
    "kill": _kill,
    "policy": _policy,
    "approval": _approval,
    "deposit": _deposit,
    "withdraw": _withdraw,
    "borrow": _borrow,
    "repay": _repay,
    "default": _default,
    "heartbeat": _heartbeat,
    "unsettled": _unsettled,
    "agent": _agent,
    "audit": _audit,
    "dispute": _dispute,
}


def check_draft(kind: str, data: dict[str, Any]) -> None:
    """EntryRejected unless `data` is valid for `kind` (used before anything is signed)."""
    rule = KINDS.get(kind)
    if rule is None:
        raise EntryRejected(f"unknown entry kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    reason = rule(data) if isinstance(data, dict) else "data is not an object"
    if reason:
        raise EntryRejected(f"{kind}: {reason}")
    if kind in ("trade", "dispute"):
        reason = (trade_signature_problem if kind == "trade" else dispute_signature_problem)(data)
        if reason:
            raise EntryRejected(f"{kind}: {reason}")
