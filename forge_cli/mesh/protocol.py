"""The peer-to-peer trade, as messages: quote → intent → streamed reply → terms → countersign.

1. The consumer asks the provider for a **quote**: price per token for this consumer (the
   market price × (2 − reputation) anti-Sybil surcharge), the most tokens and CU, an expiry.
   The provider signs it (`forge-quote-v1\\n` + canonical JSON).
2. The consumer sends the request with its **intent**: the signed quote, a fresh nonce and the
   SHA-256 of the exact request bytes, signed by the consumer (`forge-intent-v1\\n` + canonical
   JSON). The intent caps what the consumer will pay at the quote's `max_cu`.
3. The provider streams the reply (each piece with the running token count), then the trade
   **terms** (DESIGN §4) signed with the trade domain, committing to the run (the sampling it
   used and the hash of the token ids, which it sends beside them: `forge_cli.mesh.audit`).
4. The consumer checks the terms against the quote and what it received (see `terms_problem`)
   and only then **countersigns**; both ledgers append the same dual-signed trade.

Everything here is pure: building, signing and checking messages. The node's routes
(`forge_cli.node.routes_p2p`) and the buyer (`forge_cli.mesh.buyer`) move them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from forge_cli import canonical, identity
from forge_cli.ledger import entries
from forge_cli.trade.offers import MODES, rank  # noqa: F401  (their home is trade/offers)
from forge_cli.wire import is_hex as is_hex  # the mesh's checks name it here too

QUOTE_DOMAIN = b"forge-quote-v1\n"
INTENT_DOMAIN = b"forge-intent-v1\n"
QUOTE_TTL_MS = 30_000
BP = 10_000

QUOTE_KEYS = {"provider", "consumer", "model", "model_sha256", "price_ucu_per_token",
              "base_price_ucu_per_token", "consumer_reputation", "max_tokens", "max_cu",
              "expires_ms"}
INTENT_KEYS = {"quote", "quote_sig", "nonce", "request_sha256", "ts"}


def p2p_price(base_ucu: int, reputation_bp: int) -> int:
    """The price a peer pays: base × (2 − reputation), rounded up (5000 bp → ×1.5)."""
    reputation_bp = max(0, min(BP, reputation_bp))
    return -(-base_ucu * (2 * BP - reputation_bp) // BP)


def quote_message(quote: dict[str, Any]) -> bytes:
    return QUOTE_DOMAIN + canonical.encode(quote)


def intent_message(intent: dict[str, Any]) -> bytes:
    return INTENT_DOMAIN + canonical.encode(intent)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _exact(obj: Any, keys: set[str], what: str) -> str | None:
    if not isinstance(obj, dict):
        return f"{what} is not an object"
    missing, extra = keys - obj.keys(), obj.keys() - keys
    if missing:
        return f"{what} lacks {', '.join(sorted(missing))}"
    if extra:
        return f"{what} has unknown fields {', '.join(sorted(extra))}"
    return None


def quote_problem(quote: Any) -> str | None:
    """Why a quote is malformed, or None."""
    reason = _exact(quote, QUOTE_KEYS, "quote")
    if reason:
        return reason
    for key in ("provider", "consumer", "model_sha256"):
        if not is_hex(quote[key], 64):
            return f"quote.{key} is not 64 hex digits"
    for key in ("price_ucu_per_token", "base_price_ucu_per_token", "consumer_reputation",
                "max_tokens", "max_cu", "expires_ms"):
        if type(quote[key]) is not int or quote[key] < 0:
            return f"quote.{key} must be a non-negative integer"
    if not isinstance(quote["model"], str) or not quote["model"]:
        return "quote.model is empty"
    if quote["max_cu"] != entries.trade_cost(quote["max_tokens"], quote["price_ucu_per_token"]):
        return "quote.max_cu is not max_tokens at the quoted price"
    return None


def intent_problem(intent: Any, consumer_sig: Any) -> str | None:
    """Why an intent is malformed or not signed by its consumer, or None."""
    reason = _exact(intent, INTENT_KEYS, "intent") or quote_problem(intent.get("quote"))
    if reason:
        return reason
    if not isinstance(intent["nonce"], str) or not 8 <= len(intent["nonce"]) <= 128:
        return "intent.nonce must be a string of 8 to 128 characters"
    if not is_hex(intent["request_sha256"], 64):
        return "intent.request_sha256 is not a sha256 hex digest"
    if type(intent["ts"]) is not int or intent["ts"] < 0:
        return "intent.ts must be a non-negative integer"
    for key, sig in (("quote_sig", intent["quote_sig"]), ("consumer_sig", consumer_sig)):
        if not is_hex(sig, 128):
            return f"{key} is not a 64-byte hex signature"
    if not identity.verify_hex(intent["quote"]["consumer"], intent_message(intent), consumer_sig):
        return "the consumer's signature over the intent does not verify"
    return None


def terms_problem(terms: Any, provider_sig: Any, *, quote: dict[str, Any], nonce: str,
                  request_sha256: str, response: bytes, streamed_tokens: int,
                  tokens: bytes) -> str | None:
    """Why a consumer must not countersign these terms, or None when they are what was bought.

    The terms must be well formed and signed by the quoting provider, name this consumer,
    the quoted model and price, this request's nonce and hash, the hash of the reply as
    received, the token count the stream reported, and cost no more than the quote allows;
    they must commit to the run (sampling, and the hash of `tokens`, the ids body the
    provider sent, one id per billed token), so that the purchase can be audited.
    """
    reason = entries.check_terms(terms)
    if reason:
        return f"malformed terms: {reason}"
    if not is_hex(provider_sig, 128) or not identity.verify_hex(
            quote["provider"], entries.trade_message(terms), provider_sig):
        return "the provider's signature over the terms does not verify"
    expected = {"provider": quote["provider"], "consumer": quote["consumer"],
                "model": quote["model"], "model_sha256": quote["model_sha256"],
                "price_ucu_per_token": quote["price_ucu_per_token"], "nonce": nonce,
                "request_sha256": request_sha256, "response_sha256": sha256_hex(response),
                "completion_tokens": streamed_tokens}
    for key, want in expected.items():
        if terms[key] != want:
            return f"terms.{key} is {terms[key]!r}, expected {want!r}"
    if terms["completion_tokens"] > quote["max_tokens"]:
        return (f"terms bill {terms['completion_tokens']} tokens; the quote allows at most "
                f"{quote['max_tokens']}")
    if terms["cu"] > quote["max_cu"]:
        return f"terms charge {terms['cu']} CU, above the quoted maximum of {quote['max_cu']} CU"
    if not entries.TRADE_RUN <= terms.keys():
        return "the terms do not commit to the run (sampling and tokens_sha256): not auditable"
    if terms["sampling"]["max_tokens"] != quote["max_tokens"]:
        return (f"terms.sampling.max_tokens is {terms['sampling']['max_tokens']}, the quote's "
                f"max_tokens is {quote['max_tokens']}")
    if entries.body_hash(tokens) != terms["tokens_sha256"]:
        return "the token ids sent do not hash to terms.tokens_sha256"
    return None
