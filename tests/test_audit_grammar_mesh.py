"""Constrained purchases between real nodes at `audit.every = 1` (issue 20): over a hundred
purchases with a response_format from an honest seller all pass their audit, with no dispute,
and both ledgers verify deeply; a seller that generates free text while its terms name the
grammar is disputed on every purchase; one whose terms name no grammar is refused its
countersignature; bad constraints are refused by the seller before anything is reserved.

The nodes are built by build_node and served from threads of this process
(tests/audit_nodes.py) on the tiny GGUF; the liars run the real engine and the real sale path,
doctored at one point each.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forge_cli.errors import ForgeError, TermsRejected
from forge_cli.mesh.buyer import Seller
from tests.audit_nodes import InProcessNode
from tests.constraint_cases import AS_OBJECT, AS_SCHEMA, HOSTILE, deep, matches_schema

CONSTRAINED_BUYS = 100
LIES = 10


class FreeEngine:
    """A real engine whose seller drops the grammar from every request it generates (its
    terms still name the grammar the request derives: the sale path commits it)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def chat(self, messages: Any, sampling: Any, *, tools: Any = None,
             block: bool = True) -> Any:
        return self._engine.chat(messages, dataclasses.replace(sampling, grammar=None),
                                 tools=tools, block=block)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path
         ) -> Iterator[dict[str, InProcessNode]]:
    from forge_cli.inference.engine import Engine
    from forge_cli.root.node import LoadedModel

    root = tmp_path_factory.mktemp("grammar-mesh")
    saved = {k: v for k, v in os.environ.items() if k.startswith("FORGE_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(FORGE_AUDIT_EVERY="1", FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE="100000")
    nodes: dict[str, InProcessNode] = {}

    def model() -> LoadedModel:
        engine = Engine(tiny_gguf, name="tiny", n_ctx=512, slots=2)
        return LoadedModel("tiny", engine, engine.sha256, 100_000, tiny_gguf)

    try:
        for name in ("buyer", "honest", "uncommitted"):
            nodes[name] = InProcessNode(root / name, model())
        free = model()
        free.engine = FreeEngine(free.engine)
        nodes["free"] = InProcessNode(root / "free", free)
        sales = nodes["uncommitted"].node.sales
        serve = sales._serve_terms

        async def uncommitted(sale: Any, session: Any, completion: Any) -> Any:
            sale.sampling.pop("grammar_sha256", None)  # sold as free text
            return await serve(sale, session, completion)

        sales._serve_terms = uncommitted
        buyer = nodes["buyer"]
        buyer.run(buyer.node.append("grant", {"account": buyer.id, "cu": 100_000}))
        # Sellers that ask 0.01 CU a token: a hundred purchases fit within the buyer's free
        # tier as each seller's network view sees it (its grant here is the buyer's own).
        for seller in ("honest", "uncommitted", "free"):
            nodes[seller].node.quote = lambda model: 10_000
        yield nodes
    finally:
        for running in nodes.values():
            running.close()
        for name in [k for k in os.environ if k.startswith("FORGE_")]:
            del os.environ[name]
        os.environ.update(saved)


def constrained(n: int) -> dict[str, Any]:
    """The request fields of constrained purchase n: a schema or any JSON object, greedy or
    sampled; every fourth long enough to finish its JSON, the others cut by max_tokens."""
    return {"response_format": AS_SCHEMA if n % 2 else AS_OBJECT,
            "max_tokens": 56 if n % 4 == 1 else 12, "seed": n}


def test_a_hundred_constrained_purchases_pass_their_audits_without_a_dispute(mesh, run_forge):
    buyer, honest = mesh["buyer"], mesh["honest"]
    finished = 0
    for n in range(CONSTRAINED_BUYS):
        purchase = buyer.buy(honest, n, [0.0, 0.9][n // 2 % 2], **constrained(n))
        assert purchase.terms["sampling"].get("grammar_sha256"), purchase.terms
        assert purchase.audit is not None and purchase.audit.kind == "audit", (
            n, purchase.text, purchase.audit.data)
        assert purchase.audit.data["positions"] == purchase.terms["completion_tokens"] > 0
        assert purchase.text.startswith("{")
        if n % 4 == 1:  # finished: JSON with the schema's keys, in the schema's order
            assert matches_schema(purchase.text), purchase.text
            finished += 1
    assert finished == CONSTRAINED_BUYS // 4
    assert buyer.record(honest.id) == (CONSTRAINED_BUYS, 0, 0)
    for node in (buyer, honest):
        done = run_forge("ledger", "verify", "--deep", "--ledger", str(node.home / "ledger.db"))
        assert done.returncode == 0, done.stdout + done.stderr


def test_a_seller_ignoring_the_committed_grammar_is_disputed_on_every_purchase(mesh):
    buyer, free = mesh["buyer"], mesh["free"]
    for n in range(LIES):
        purchase = buyer.buy(free, 500 + n, [0.0, 0.9][n % 2], **constrained(n))
        assert not purchase.text.startswith("{")
        assert purchase.audit is not None and purchase.audit.kind == "dispute", n
        claim = purchase.audit.data["claim"]
        assert claim["reason"].startswith("grammar: token"), claim["reason"]
        assert claim["failures"][0]["pos"] == 0
    assert buyer.record(free.id) == (0, LIES, 0)


def test_terms_naming_no_grammar_for_a_constrained_request_are_not_countersigned(mesh):
    buyer, seller = mesh["buyer"], mesh["uncommitted"]
    before = buyer.record(seller.id)
    with pytest.raises(TermsRejected, match="grammar: the request asks for a grammar"):
        buyer.buy(seller, 700, 0.0, **constrained(1))
    assert buyer.record(seller.id) == before
    # A free purchase from the same seller is what it always was.
    purchase = buyer.buy(seller, 701, 0.0)
    assert purchase.audit is not None and purchase.audit.kind == "audit"


@pytest.mark.parametrize(("fmt", "expected"), [case[1:] for case in HOSTILE],
                         ids=[case[0] for case in HOSTILE])
def test_a_bad_constraint_is_refused_by_the_seller_before_anything_is_reserved(
        mesh, fmt, expected):
    """Sent as the buyer signed it, straight to the seller's P2P route (a buyer's own check
    would stop it first): refused naming the problem, nothing held or recorded either side."""
    buyer, honest = mesh["buyer"], mesh["honest"]
    honest.node.reader.refresh()
    size = honest.node.reader.size
    answer, body = post_intent(buyer, honest, {
        "model": "tiny", "max_tokens": 8, "response_format": fmt,
        "messages": [{"role": "user", "content": "hi"}]})
    assert answer == (422 if "64 levels" in expected else 400), body
    assert expected in body["error"]["message"], body
    sales = honest.node.sales
    assert not sales.open and not sales.pending
    assert honest.node.wallet.held(buyer.id) == 0
    honest.node.reader.refresh()
    assert honest.node.reader.size == size


def post_intent(buyer: InProcessNode, seller: InProcessNode,
                payload: dict[str, Any]) -> tuple[int, Any]:
    """A signed quote and intent for `payload`, posted to the seller's chat route as is."""
    import secrets

    from forge_cli.mesh import protocol

    async def quote() -> dict[str, Any]:
        return await buyer.node.peer_buyer().quote_from(
            Seller(seller.id, seller.url, "tiny"), "tiny", payload["max_tokens"])

    signed = buyer.run(quote())
    request = json.dumps(payload, separators=(",", ":"))
    intent = {**signed, "nonce": secrets.token_hex(16),
              "request_sha256": protocol.sha256_hex(request.encode()),
              "ts": buyer.node.clock()}
    return seller.post("/v1/forge/p2p/chat", {
        "intent": intent, "request": request,
        "consumer_sig": buyer.node.signer.sign(protocol.intent_message(intent)).hex()})


def test_the_buyer_refuses_its_own_bad_constraint_before_asking_for_a_quote(mesh):
    buyer, honest = mesh["buyer"], mesh["honest"]
    with pytest.raises(ForgeError, match="nests deeper than"):
        buyer.buy(honest, 800, 0.0, response_format=deep(40))
    assert buyer.node.wallet.held(buyer.id) == 0
