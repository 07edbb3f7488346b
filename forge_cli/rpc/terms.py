"""What a head and a layer peer agree, as signed messages (pure: build, sign, check).

1. The head asks a peer for **terms**: which head (its node id), which model (its sha256), how
   many layers, the rate in µCU per layer per token, the tunnel bytes the peer carries on
   credit (`credit_bytes`) and the bytes each paid layer-token buys
   (`bytes_per_layer_token`), an expiry and a nonce. The peer signs them
   (`forge-rpc-terms-v2\\n` + canonical JSON) and remembers them.
2. The head opens the **tunnel** (a WebSocket). The peer sends a fresh challenge; the head
   answers with the signed terms and its own signature over the terms and the challenge
   (`forge-rpc-tunnel-v2\\n`). The peer admits it only when both signatures verify, the terms
   are its own and unexpired, and the head is the one they name.
3. After each generation the head **pays** each peer `layers × rate` µCU for every token its
   layers ran, the prompt's and the generated ones (the trade's `completion_tokens`; its
   `prompt_tokens` says how many of them were the prompt's), in a trade
   (DESIGN §4 terms, provider = peer, consumer = head), signed by both and kept in both
   ledgers. The trade's request body is the agreement; its response body is the metering
   record (token counts and the hash of the reply, never the text: a peer sees no prompt).
   Every paid token also buys `layers × bytes_per_layer_token` tunnel bytes (so a byte costs
   the same whatever layers the terms name): the peer carries at most `credit_bytes + paid
   tokens × layers × bytes_per_layer_token` under one agreement, and a head whose bytes
   outrun its tokens (the weights, above all) pays ahead for more, in a **top-up**: a layer
   trade for tokens not run yet (its metering record counts them, over an empty reply).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from forge_cli import canonical, identity
from forge_cli.ledger import entries
from forge_cli.wire import is_hex

TERMS_DOMAIN = b"forge-rpc-terms-v2\n"
TUNNEL_DOMAIN = b"forge-rpc-tunnel-v2\n"
TERMS_KEYS = {"peer", "head", "model_sha256", "layers", "rate_ucu_per_layer_token",
              "credit_bytes", "bytes_per_layer_token", "expires_ms", "nonce"}
MAX_LAYERS = 4096


def terms_message(terms: dict[str, Any]) -> bytes:
    return TERMS_DOMAIN + canonical.encode(terms)


def tunnel_message(terms: dict[str, Any], challenge: str) -> bytes:
    return TUNNEL_DOMAIN + canonical.encode({"terms": terms, "challenge": challenge})


def offer(signer: identity.Identity, *, head: str, model_sha256: str, layers: int, rate: int,
          now_ms: int, ttl_ms: int, credit_bytes: int = 64 << 20,
          bytes_per_layer_token: int = 1 << 20) -> dict[str, Any]:
    """The peer's signed terms for `head`: {"terms", "peer_sig"}."""
    terms = {"peer": signer.node_id, "head": head, "model_sha256": model_sha256,
             "layers": layers, "rate_ucu_per_layer_token": rate, "credit_bytes": credit_bytes,
             "bytes_per_layer_token": bytes_per_layer_token, "expires_ms": now_ms + ttl_ms,
             "nonce": secrets.token_hex(16)}
    return {"terms": terms, "peer_sig": signer.sign(terms_message(terms)).hex()}


def request_problem(body: Any) -> str | None:
    """Why a head's request for terms is malformed, or None."""
    if not isinstance(body, dict):
        return "the request is not a JSON object"
    if not is_hex(body.get("head"), 64):
        return "head must be the head's node id (64 hex digits)"
    if not is_hex(body.get("model_sha256"), 64):
        return "model_sha256 must be the model's sha256 (64 hex digits)"
    layers = body.get("layers")
    if type(layers) is not int or not 1 <= layers <= MAX_LAYERS:
        return f"layers must be an integer from 1 to {MAX_LAYERS}"
    return None


def terms_problem(agreed: Any) -> str | None:
    """Why signed terms are malformed or not signed by the peer they name, or None."""
    if not isinstance(agreed, dict) or not isinstance(agreed.get("terms"), dict):
        return "the terms are not an object"
    terms = agreed["terms"]
    if set(terms) != TERMS_KEYS:
        return f"the terms must have exactly the fields {', '.join(sorted(TERMS_KEYS))}"
    for key in ("peer", "head", "model_sha256"):
        if not is_hex(terms[key], 64):
            return f"terms.{key} is not 64 hex digits"
    for key in ("layers", "rate_ucu_per_layer_token", "credit_bytes", "bytes_per_layer_token",
                "expires_ms"):
        if type(terms[key]) is not int or not 0 <= terms[key] <= entries.MAX_AMOUNT:
            return f"terms.{key} must be a non-negative integer"
    if not isinstance(terms["nonce"], str) or not 8 <= len(terms["nonce"]) <= 128:
        return "terms.nonce must be a string of 8 to 128 characters"
    if not is_hex(agreed.get("peer_sig"), 128) or not identity.verify_hex(
            terms["peer"], terms_message(terms), agreed["peer_sig"]):
        return "the peer's signature over the terms does not verify"
    return None


def handshake(signer: identity.Identity, agreed: dict[str, Any], challenge: str) -> dict[str, Any]:
    """The head's answer to a tunnel challenge."""
    return {**agreed, "head_sig": signer.sign(tunnel_message(agreed["terms"], challenge)).hex()}


def handshake_problem(answer: Any, *, peer: str, challenge: str, now_ms: int) -> str | None:
    """Why a tunnel must not be opened for this answer, or None: the terms must be this peer's,
    signed by it and unexpired, and the challenge signed by the head they name."""
    reason = terms_problem(answer)
    if reason:
        return reason
    terms = answer["terms"]
    if terms["peer"] != peer:
        return "the terms were agreed with another peer"
    if terms["expires_ms"] < now_ms:
        return "the terms expired; ask for new ones"
    if not is_hex(answer.get("head_sig"), 128) or not identity.verify_hex(
            terms["head"], tunnel_message(terms, challenge), answer["head_sig"]):
        return "the handshake is not signed by the head the terms name (wrong key)"
    return None


def price(terms: dict[str, Any]) -> int:
    """µCU per token the peer's layers run: its layers at the agreed rate."""
    return terms["layers"] * terms["rate_ucu_per_layer_token"]


def allowance(terms: dict[str, Any], paid_tokens: int) -> int | None:
    """Tunnel bytes the peer carries under `terms` once `paid_tokens` tokens are paid for (None:
    no bound, the peer gives its layers away at rate 0)."""
    if price(terms) == 0:
        return None
    return terms["credit_bytes"] + paid_tokens * bytes_per_token(terms)


def bytes_per_token(terms: dict[str, Any]) -> int:
    """Tunnel bytes one paid token buys under `terms`."""
    return terms["layers"] * terms["bytes_per_layer_token"]


def top_up_tokens(terms: dict[str, Any], *, needed: int, paid_tokens: int) -> int:
    """Tokens to pay for so that the allowance covers `needed` bytes with a full credit to
    spare again (0 when it already does with half of it): a head pays ahead in blocks, not
    per chunk, and never falls below half its credit."""
    bound = allowance(terms, paid_tokens)
    if bound is None or bound - needed >= terms["credit_bytes"] // 2:
        return 0
    short = needed + terms["credit_bytes"] - bound
    return -(-short // max(1, bytes_per_token(terms)))


def agreement_body(agreed: dict[str, Any]) -> bytes:
    """A layer trade's request body: the signed terms it is paid under."""
    return canonical.encode({"terms": agreed["terms"], "peer_sig": agreed["peer_sig"]})


def metering_body(*, prompt_tokens: int, completion_tokens: int, response: bytes) -> bytes:
    """A layer trade's response body: what was generated, counted, without the text (a
    top-up counts the tokens bought as completion tokens, over an empty reply)."""
    return canonical.encode({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "reply_sha256": hashlib.sha256(response).hexdigest()})


def layer_trade(agreed: dict[str, Any], *, model: str, prompt_tokens: int,
                completion_tokens: int, request: bytes, response: bytes, now_ms: int
                ) -> dict[str, Any]:
    """The trade terms (DESIGN §4) that pay a peer for its layers over one generation: every
    token they ran is priced, `prompt_tokens` of the prompt's and `completion_tokens`
    generated, so the trade's `completion_tokens` is their sum."""
    terms = agreed["terms"]
    rate = price(terms)
    ran = prompt_tokens + completion_tokens
    return {"provider": terms["peer"], "consumer": terms["head"], "model": model,
            "model_sha256": terms["model_sha256"], "prompt_tokens": prompt_tokens,
            "completion_tokens": ran, "price_ucu_per_token": rate,
            "cu": entries.trade_cost(ran, rate),
            "request_sha256": hashlib.sha256(request).hexdigest(),
            "response_sha256": hashlib.sha256(response).hexdigest(),
            "nonce": secrets.token_hex(16), "ts": now_ms}


def layer_trade_problem(trade: dict[str, Any], agreed: dict[str, Any], *, request: bytes,
                        response: bytes) -> str | None:
    """Why a peer must not sign this layer trade, or None: it must pay these terms' price,
    from the head they name, to this peer, over the agreement and metering record sent."""
    reason = entries.check_terms(trade)
    if reason:
        return f"malformed trade terms: {reason}"
    if entries.TRADE_SERVICE in trade:  # it would bill the prompt alone, not the layers run
        return "a layer trade pays for the tokens its layers ran, not for a service"
    terms = agreed["terms"]
    expected = {"provider": terms["peer"], "consumer": terms["head"],
                "model_sha256": terms["model_sha256"], "price_ucu_per_token": price(terms),
                "request_sha256": hashlib.sha256(request).hexdigest(),
                "response_sha256": hashlib.sha256(response).hexdigest()}
    for key, want in expected.items():
        if trade[key] != want:
            return f"trade.{key} is {trade[key]!r}, expected {want!r}"
    if request != agreement_body(agreed):
        return "the trade's request body is not the agreement it is paid under"
    return None


__all__ = ["agreement_body", "allowance", "bytes_per_token", "handshake", "handshake_problem", "layer_trade",
           "layer_trade_problem", "metering_body", "offer", "price", "request_problem",
           "terms_problem", "top_up_tokens"]
