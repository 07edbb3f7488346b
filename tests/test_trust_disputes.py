"""Flags need standing (issue 22): a node built by build_node and served on 127.0.0.1 (tiny
GGUF) takes peers' disputes against one seller. Two fresh keys, and two keys that each sold the
node one cheap reply (standing by the old rule of keys), change nothing about the seller's
flag or price; two auditors the node trusts (it bought much from each) lower its price with
each dispute and flag it together."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forge_cli.identity import Identity
from forge_cli.ledger import entries
from forge_cli.mesh import audit
from tests import dispute_helpers
from tests.audit_nodes import InProcessNode
from tests.gossip_helpers import make_trade

WORDS = 20


@pytest.fixture
def judge(tmp_path: Path, tiny_gguf: Path) -> Iterator[InProcessNode]:
    from forge_cli.inference.engine import Engine
    from forge_cli.root.node import LoadedModel

    saved = {k: v for k, v in os.environ.items() if k.startswith("FORGE_")}
    for name in saved:
        del os.environ[name]
    os.environ["FORGE_AUDIT_RECHECKS_PER_MINUTE"] = "1000"
    engine = Engine(tiny_gguf, name="tiny", n_ctx=256, slots=1)
    node = InProcessNode(tmp_path / "judge", LoadedModel("tiny", engine, engine.sha256,
                                                         100_000, tiny_gguf))
    try:
        yield node
    finally:
        node.close()
        for name in [k for k in os.environ if k.startswith("FORGE_")]:
            del os.environ[name]
        os.environ.update(saved)


def dispute(sha: str, seller: Identity, auditor: Identity) -> dict[str, Any]:
    """`auditor`'s dispute of a reply it bought from `seller` (printable bytes the tiny model
    would not produce greedily: the re-check upholds it)."""
    request = json.dumps({"model": "tiny", "max_tokens": 64, "temperature": 0, "messages": [
        {"role": "user", "content": " ".join(["mat"] * WORDS)}]}).encode()
    reply = b"qzqzqzqz"
    tokens = audit.tokens_body(list(reply))
    terms = {"provider": seller.node_id, "consumer": auditor.node_id, "model": "tiny",
             "model_sha256": sha, "prompt_tokens": dispute_helpers.rendered_length(WORDS),
             "completion_tokens": len(reply), "price_ucu_per_token": 1_000_000,
             "cu": len(reply), "request_sha256": entries.body_hash(request),
             "response_sha256": entries.body_hash(reply), "nonce": secrets.token_hex(8),
             "ts": 1, "sampling": dispute_helpers.SAMPLING,
             "tokens_sha256": entries.body_hash(tokens)}
    trade = dispute_helpers.signed_trade(terms, seller, auditor)
    signed = audit.sign_dispute(trade, audit.Verdict(False, "model: fabricated", 8, []),
                                auditor, 1)
    return dispute_helpers.payload(signed, [request, reply, tokens])


def standing_of(judge: InProcessNode, seller: str) -> tuple[str | None, int, int]:
    """(flag, quoted reputation, quoted price) of `seller` buying from the judge."""
    quote = judge.node.sales.quote({"consumer": seller, "model": "tiny", "max_tokens": 5})
    return (judge.node.network.flags().get(seller), quote["quote"]["consumer_reputation"],
            quote["quote"]["price_ucu_per_token"])


def test_disputes_flag_a_seller_only_with_the_trust_of_their_auditors(judge):
    me: Identity = judge.node.signer
    sha = judge.node.models["tiny"].sha256
    trusted = [Identity.generate(), Identity.generate()]
    cheap = [Identity.generate(), Identity.generate()]
    fresh = [Identity.generate(), Identity.generate()]
    seller = Identity.generate()
    judge.run(judge.node.append("grant", {"account": me.node_id, "cu": 100_000}))
    for peer in trusted:  # the judge bought much from each
        for n in range(12):
            judge.run(judge.node.append("trade", make_trade(peer, me, tokens=50 + n)))
    for peer in cheap:  # one cheap reply each: provided 1, reputation 5100
        judge.run(judge.node.append("trade", make_trade(peer, me, tokens=1)))
    before = standing_of(judge, seller.node_id)
    assert before[0] is None

    for auditor in fresh:
        status, body = judge.post("/v1/forge/audit/dispute", dispute(sha, seller, auditor))
        assert status == 403 and "provided no trade" in body["error"]["message"], body
    for auditor in cheap:
        status, body = judge.post("/v1/forge/audit/dispute", dispute(sha, seller, auditor))
        assert status == 403 and "trust" in body["error"]["message"], body
    assert standing_of(judge, seller.node_id) == before

    status, body = judge.post("/v1/forge/audit/dispute", dispute(sha, seller, trusted[0]))
    assert status == 200 and body["outcome"] == audit.UPHELD, body
    flag, reputation, price = standing_of(judge, seller.node_id)
    assert flag is None and reputation < before[1] and price > before[2]  # one is not enough
    status, body = judge.post("/v1/forge/audit/dispute", dispute(sha, seller, trusted[1]))
    assert status == 200 and body["outcome"] == audit.UPHELD, body
    flag, _, _ = standing_of(judge, seller.node_id)
    assert flag is not None and "bp of trust" in flag
