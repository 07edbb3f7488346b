"""Real dual-signed trades made with real keys, for tests of the network view and gossip."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from forge_cli.identity import Identity
from forge_cli.ledger import entries

MODEL_SHA = hashlib.sha256(b"tiny model").hexdigest()


def make_trade(provider: Identity, consumer: Identity, *, tokens: int = 10,
               price: int = 1_000_000, nonce: str | None = None, ts: int = 1_700_000_000_000
               ) -> dict[str, Any]:
    """Terms signed by both parties, exactly as both ledgers would record them."""
    terms = {
        "provider": provider.node_id, "consumer": consumer.node_id, "model": "tiny-llama.gguf",
        "model_sha256": MODEL_SHA, "prompt_tokens": 5, "completion_tokens": tokens,
        "price_ucu_per_token": price, "cu": entries.trade_cost(tokens, price),
        "request_sha256": hashlib.sha256(secrets.token_bytes(8)).hexdigest(),
        "response_sha256": hashlib.sha256(secrets.token_bytes(8)).hexdigest(),
        "nonce": nonce or secrets.token_hex(16), "ts": ts,
    }
    return sign(terms, provider, consumer)


def sign(terms: dict[str, Any], provider: Identity, consumer: Identity) -> dict[str, Any]:
    message = entries.trade_message(terms)
    return {"terms": terms, "provider_sig": provider.sign(message).hex(),
            "consumer_sig": consumer.sign(message).hex()}
