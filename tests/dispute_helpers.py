"""Disputes as a hostile sender makes them: a trade between two fresh keys that no node ever
held, billed for a request of many words and a reply of printable bytes (one token each in
tests/gguf_model.py), disputed by a third fresh key; or a dispute about a real trade from a
real auditor. Each comes as the payload `POST /v1/forge/audit/dispute` takes."""

from __future__ import annotations

import json
import secrets
from typing import Any

from forge_cli import identity
from forge_cli.ledger import entries
from forge_cli.mesh import audit

SAMPLING = {"temperature_ppm": 0, "top_p_ppm": 1_000_000, "top_k": 0, "min_p_ppm": 0,
            "repeat_penalty_ppm": 1_000_000, "seed": 1, "max_tokens": 64}


def payload(dispute: dict[str, Any], bodies: list[bytes]) -> dict[str, Any]:
    return {"dispute": dispute, "bodies": {entries.body_hash(b): b.hex() for b in bodies}}


def signed_trade(terms: dict[str, Any], provider: identity.Identity,
                 consumer: identity.Identity) -> dict[str, Any]:
    message = entries.trade_message(terms)
    return {"terms": terms, "provider_sig": provider.sign(message).hex(),
            "consumer_sig": consumer.sign(message).hex()}


def fabricated(model_sha256: str, *, prompt_tokens: int, words: int = 400,
               reply: bytes = b"abcdefgh", tokens: bytes | None = None,
               request: bytes | None = None, billed: int | None = None,
               auditor: identity.Identity | None = None) -> dict[str, Any]:
    """A dispute whose three parties are fresh keys, about a trade no node held.

    `prompt_tokens` is what the terms bill: the request's rendered length makes the audit run
    its full prefill. `tokens` overrides the tokens body (one that nests deep, say),
    `request` the request body, and `billed` the tokens billed (other than the ids committed:
    a count the check refuses without a prefill). With `auditor`, that key disputes a trade
    it bought itself (it is the consumer) from a fresh provider key."""
    provider = identity.Identity.generate()
    consumer = auditor or identity.Identity.generate()
    auditor = auditor or identity.Identity.generate()
    request = request if request is not None else json.dumps(
        {"model": "tiny", "max_tokens": 64, "temperature": 0,
         "messages": [{"role": "user", "content": " ".join(["mat"] * words)}]}).encode()
    ids = list(reply)
    tokens = tokens if tokens is not None else audit.tokens_body(ids)
    count = len(ids) if billed is None else billed
    terms = {"provider": provider.node_id, "consumer": consumer.node_id, "model": "tiny",
             "model_sha256": model_sha256, "prompt_tokens": prompt_tokens,
             "completion_tokens": count, "price_ucu_per_token": 1_000_000, "cu": count,
             "request_sha256": entries.body_hash(request),
             "response_sha256": entries.body_hash(reply), "nonce": secrets.token_hex(8),
             "ts": 1, "sampling": SAMPLING, "tokens_sha256": entries.body_hash(tokens)}
    trade = signed_trade(terms, provider, consumer)
    verdict = audit.Verdict(False, "model: fabricated", len(ids), [])
    dispute = audit.sign_dispute(trade, verdict, auditor, 1)
    return payload(dispute, [request, reply, tokens])


def rendered_length(words: int) -> int:
    """Tokens the tiny GGUF's template renders `fabricated`'s request to: one per byte of
    `<s>user: mat mat …\\nassistant:` (tests/gguf_model.py), the BOS one token."""
    return 1 + len("user: ") + len(" ".join(["mat"] * words)) + len("\nassistant:")
