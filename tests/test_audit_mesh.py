"""Audits between real nodes: a buyer at `audit.every = 1` audits every purchase over the real
P2P protocol, records `audit` entries for an honest seller and signed `dispute` entries for
cheats — a seller that serves another GGUF than the one it quotes, one that inflates its token
count, one that pads its replies; the disputes travel to a third node, re-check there and,
with a second auditor's, flag the seller; a forged dispute is refused and counts against its
author.

The nodes are built by build_node and run in this process, each served by aiohttp on
127.0.0.1 from its own thread (tests/app_thread.py). The model cheat's engine is loaded from a
second random-weight tiny GGUF while its offer names the first one's SHA-256; the inflater and
the padder run the real engine and doctor what it produced before the sale commits to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forge_cli.ledger import entries, queries
from forge_cli.mesh import audit
from tests import dispute_helpers
from tests.audit_nodes import MAX_TOKENS, InProcessNode

HONEST_BUYS = 20
CHEAT_BUYS = 50
SHORT_BY = 3  # tokens the inflater bills and the padder pads on top of what it generated


class DoctoredEngine:
    """A real engine whose replies a cheating seller changes after generating them: it
    generates SHORT_BY tokens fewer than asked, then `inflate` bills SHORT_BY tokens it never
    produced, or `pad` appends SHORT_BY filler tokens (streamed, billed and committed)."""

    def __init__(self, engine: Any, cheat: str) -> None:
        self._engine = engine
        self.cheat = cheat
        self.rng = random.Random(cheat)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def chat(self, messages: Any, sampling: Any, *, tools: Any = None,
             block: bool = True) -> Any:
        fewer = dataclasses.replace(sampling, max_tokens=max(1, sampling.max_tokens - SHORT_BY))
        done = self._engine.chat(messages, fewer, tools=tools, block=block).result()
        pieces = [done.text]
        if self.cheat == "pad":
            pad = [self.rng.randrange(0x20, 0x7F) for _ in range(SHORT_BY)]
            pieces.append(bytes(pad).decode())
            done = dataclasses.replace(done, token_ids=done.token_ids + pad,
                                       completion_tokens=done.completion_tokens + SHORT_BY,
                                       text="".join(pieces))
        else:
            done = dataclasses.replace(done, completion_tokens=done.completion_tokens + SHORT_BY)
        return DoctoredStream(pieces, done)


class DoctoredStream:
    """What the engine's Stream offers a seller's pump: pieces, a running count, the end."""

    def __init__(self, pieces: list[str], completion: Any) -> None:
        self._pieces = iter(pieces)
        self.completion = None
        self._done = completion
        self.tokens = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        piece = next(self._pieces, None)
        if piece is None:
            self.completion = self._done
            raise StopIteration
        self.tokens = self._done.completion_tokens
        return piece

    def cancel(self) -> None:
        """Nothing to stop: the reply was generated before the first piece."""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path
         ) -> Iterator[dict[str, InProcessNode]]:
    from forge_cli.inference.engine import Engine
    from forge_cli.root.node import LoadedModel
    from tests.gguf_model import write_tiny_llama

    root = tmp_path_factory.mktemp("audit-mesh")
    other = write_tiny_llama(root / "other.gguf", seed=4321)
    saved = {k: v for k, v in os.environ.items() if k.startswith("FORGE_")}
    for name in saved:
        del os.environ[name]
    # Every purchase audited; many purchases (and disputes) a minute are the point here, not
    # the breaker or the per-auditor re-check quota.
    os.environ.update(FORGE_AUDIT_EVERY="1", FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE="100000",
                      FORGE_AUDIT_RECHECKS_PER_MINUTE="10000")
    nodes: dict[str, InProcessNode] = {}

    def model(path: Path, sha256: str | None = None) -> LoadedModel:
        engine = Engine(path, name="tiny", n_ctx=256, slots=1)
        return LoadedModel("tiny", engine, sha256 or engine.sha256, 100_000, path)

    try:
        honest_sha = model(tiny_gguf).sha256
        for name in ("honest", "buyer", "second", "third"):
            nodes[name] = InProcessNode(root / name, model(tiny_gguf))
        # The cheat quotes the honest model's SHA-256 and runs the other GGUF.
        nodes["cheat"] = InProcessNode(root / "cheat", model(other, honest_sha))
        for cheat in ("inflate", "pad"):
            doctored = model(tiny_gguf)
            doctored.engine = DoctoredEngine(doctored.engine, cheat)
            nodes[cheat] = InProcessNode(root / cheat, doctored)
        buyer = nodes["buyer"]  # enough CU for every purchase here
        buyer.run(buyer.node.append("grant", {"account": buyer.id, "cu": 10_000}))
        third, second = nodes["third"], nodes["second"]
        for funded in (third, second):  # selling to the third node ends second's free tier
            funded.run(funded.node.append("grant", {"account": funded.id, "cu": 10_000}))
        for auditor in ("buyer", "second"):  # their disputes go to the third node,
            nodes[auditor].node.auditor.peers = lambda: [third.url]
            # where they hold standing: the third node bought a reply from each.
            third.buy(nodes[auditor], 0, 0.0, audit=False)
        yield nodes
    finally:
        for running in nodes.values():
            running.close()
        for name in [k for k in os.environ if k.startswith("FORGE_")]:
            del os.environ[name]
        os.environ.update(saved)


def test_every_purchase_from_an_honest_seller_passes_its_audit(mesh):
    buyer, honest = mesh["buyer"], mesh["honest"]
    before = buyer.reputation(honest.id)
    for n in range(HONEST_BUYS):
        purchase = buyer.buy(honest, n, [0.0, 0.9][n % 2])
        assert purchase.audit is not None and purchase.audit.kind == "audit", purchase.audit
        assert purchase.audit.data["positions"] == purchase.terms["completion_tokens"] > 0
    assert buyer.record(honest.id) == (HONEST_BUYS, 0, 0)
    # +100 per trade provided, +20 per audit passed
    assert buyer.reputation(honest.id) == before + HONEST_BUYS * (100 + 20)


def test_a_cheating_seller_is_disputed_and_the_dispute_rechecks_at_a_third_node(mesh):
    buyer, cheat, third = mesh["buyer"], mesh["cheat"], mesh["third"]
    for n in range(CHEAT_BUYS):
        purchase = buyer.buy(cheat, 100 + n, [0.0, 0.9][n % 2])
        assert purchase.audit is not None and purchase.audit.kind == "dispute"
        claim = purchase.audit.data["claim"]
        assert claim["reason"].startswith("model:") and claim["failures"]
        assert claim["trade"] == purchase.trade
    # The buyer's own record, and the third node's after re-checking each dispute it was sent.
    assert buyer.record(cheat.id) == (0, CHEAT_BUYS, 0)
    assert third.record(cheat.id) == (0, CHEAT_BUYS, 0)
    assert third.reputation(cheat.id) == max(0, 5_000 - 2_500 * CHEAT_BUYS)
    # Its standing sets what it pays the third node: base × (2 − reputation), now × 2.
    quote = third.node.sales.quote({"consumer": cheat.id, "model": "tiny", "max_tokens": 5})
    assert quote["quote"]["consumer_reputation"] == 0
    assert quote["quote"]["price_ucu_per_token"] == 2 * quote["quote"]["base_price_ucu_per_token"]
    # One auditor is not enough to flag: the third node still trusts the cheat's node id.
    assert cheat.id not in third.node.network.flags()
    from forge_cli.ledger.verify import verify

    third.node.reader.refresh()
    report = verify(third.node.reader, deep=True, workers=1)
    assert report.ok and report.size == third.node.reader.size >= CHEAT_BUYS, report.findings


def test_a_second_auditor_flags_the_cheat_like_a_forked_peer(mesh):
    """Both disputes reach the third node by gossip; it re-checks each and flags the cheat."""
    cheat, second, third = mesh["cheat"], mesh["second"], mesh["third"]
    purchase = second.buy(cheat, 200, 0.0)
    assert purchase.audit is not None and purchase.audit.kind == "dispute"
    assert queries.dispute_auditors(third.node.reader, cheat.id) == 2
    assert "distinct auditors" in third.node.network.flags()[cheat.id]
    assert third.record(cheat.id) == (0, CHEAT_BUYS + 1, 0)
    # The second auditor alone has one auditor's word: it lowers the cheat, it does not flag.
    assert cheat.id not in second.node.network.flags()
    honest = mesh["honest"]
    assert honest.id not in third.node.network.flags()


@pytest.mark.parametrize("cheat", ["inflate", "pad"])
def test_a_seller_inflating_or_padding_is_disputed_on_every_purchase(mesh, cheat):
    buyer, seller, third = mesh["buyer"], mesh[cheat], mesh["third"]
    for n in range(CHEAT_BUYS):
        purchase = buyer.buy(seller, 300 + n, [0.0, 0.9][n % 2])
        assert purchase.terms["completion_tokens"] == MAX_TOKENS
        assert purchase.audit is not None and purchase.audit.kind == "dispute", n
        reason = purchase.audit.data["claim"]["reason"]
        assert reason.startswith("counts:" if cheat == "inflate" else "model:"), reason
    assert buyer.record(seller.id) == (0, CHEAT_BUYS, 0)
    assert third.record(seller.id) == (0, CHEAT_BUYS, 0)  # each re-checked there


def test_a_forged_dispute_is_rejected_and_counts_against_its_author(mesh):
    buyer, honest, third = mesh["buyer"], mesh["honest"], mesh["third"]
    trade_entry = next(e for e in buyer.node.reader.iter_entries(0, kind="trade")
                       if e.data["terms"]["provider"] == honest.id)
    terms = trade_entry.data["terms"]
    bodies = {h: buyer.node.reader.body(h) for h in
              (terms["request_sha256"], terms["response_sha256"], terms["tokens_sha256"])}
    lie = audit.Verdict(False, "model: 3 of 10 tokens are outside the committed top-k", 10,
                        [{"pos": 0, "token": 65, "token_mlogit": -9000, "bound_mlogit": 1000,
                          "top": [[66, 12000]]}])
    data = audit.sign_dispute(trade_entry.data, lie, buyer.node.signer, 1)
    payload = {"dispute": data, "bodies": {h: b.hex() for h, b in bodies.items()}}
    reputation = third.reputation(buyer.id)
    status, body = third.post("/v1/forge/audit/dispute", payload)
    assert status == 422 and "forged dispute" in body["error"]["message"], body
    assert third.record(buyer.id)[2] == 1
    assert third.reputation(buyer.id) == max(0, reputation - 2_500)
    assert honest.id not in third.node.network.flags()
    assert third.record(honest.id)[1] == 0
    # The same claim again is refused: one dispute per trade and auditor.
    status, body = third.post("/v1/forge/audit/dispute", payload)
    assert status in (409, 422), body


def test_a_dispute_with_a_bad_signature_or_missing_bodies_is_refused_unrecorded(mesh):
    buyer, cheat, third = mesh["buyer"], mesh["cheat"], mesh["third"]
    dispute = next(e for e in buyer.node.reader.iter_entries(0, kind="dispute"))
    bodies = {h: buyer.node.reader.body(h).hex() for h in audit.dispute_bodies(dispute.data)}
    third.node.reader.refresh()
    size = third.node.reader.size
    tampered = {**dispute.data, "claim": {**dispute.data["claim"], "positions": 1}}
    for payload, expected in (
            ({"dispute": tampered, "bodies": bodies}, "auditor signature does not verify"),
            ({"dispute": dispute.data, "bodies": {}}, "lacks body"),
            ({"dispute": {"claim": 1}, "bodies": {}}, "malformed dispute"),
            ({"bodies": []}, "{dispute, bodies")):
        status, body = third.post("/v1/forge/audit/dispute", payload)
        assert status == 422 and expected in body["error"]["message"], body
    third.node.reader.refresh()
    assert third.node.reader.size == size
    assert entries.trade_id(dispute.data["claim"]["trade"])  # the evidence names its trade
    assert cheat.id in third.node.network.flags()


def test_a_node_audits_a_trade_it_holds_on_request(mesh, run_forge):
    """`POST /v1/forge/audit/trade` and `forge audit run SEQ`: an honest trade passes once; a
    padded one is disputed (exit 1) and its dispute goes to the peers."""
    second, honest, pad, third = mesh["second"], mesh["honest"], mesh["pad"], mesh["third"]
    token = second.node.operator_token
    fair = second.buy(honest, 400, 0.0, audit=False)
    assert fair.audit is None
    status, body = second.post("/v1/forge/audit/trade", {"seq": fair.trade_seq}, token)
    assert status == 200 and body["kind"] == "audit" and body["verdict"] == "passed", body
    status, body = second.post("/v1/forge/audit/trade", {"seq": fair.trade_seq}, token)
    assert status == 409 and "already audited" in body["error"]["message"], body
    for seq, expected in ((0, 400), (10**6, 404)):
        status, body = second.post("/v1/forge/audit/trade", {"seq": seq}, token)
        assert status == expected, body
    status, body = second.post("/v1/forge/audit/trade", {"seq": fair.trade_seq})
    assert status == 401, body

    padded = second.buy(pad, 401, 0.0, audit=False)
    before = third.record(pad.id)
    done = run_forge("audit", "run", str(padded.trade_seq), "--json", "--node", second.url,
                     "--token", token)
    assert done.returncode == 1, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["kind"] == "dispute" and verdict["reason"].startswith("model:")
    assert verdict["failing_positions"] == list(range(MAX_TOKENS - SHORT_BY, MAX_TOKENS))
    assert third.record(pad.id)[1] == before[1] + 1  # re-checked at the third node


# -- disputes cost the disputer (issue 19) ---------------------------------------------------
# These run last: the refusals they provoke count toward the third node's per-address
# throttle (everything here posts from 127.0.0.1).

def rechecks_run(node: InProcessNode) -> float:
    """Re-checks of peers' disputes the node ran (upheld or forged), from its metrics."""
    return sum(node.node.metrics.rechecks.labels(outcome)._value.get()
               for outcome in (audit.UPHELD, audit.FORGED))


def ledger_size(node: InProcessNode) -> int:
    node.node.reader.refresh()
    return node.node.reader.size


def test_deeply_nested_evidence_from_an_auditor_with_standing_is_never_a_500(mesh):
    """Second holds standing at the third node (the buyer lost its own by forging a dispute)
    and disputes a purchase of its own whose request or tokens body nests 100,000 deep:
    parsed by the one parser, answered 422 or 200."""
    second, third = mesh["second"], mesh["third"]
    sha = second.node.models["tiny"].sha256
    deep = b"[" * 100_000 + b"]" * 100_000
    size = ledger_size(third)
    status, body = third.post("/v1/forge/audit/dispute", dispute_helpers.fabricated(
        sha, prompt_tokens=20, request=deep, auditor=second.node.signer))
    assert status == 422 and "nested more than" in body["error"]["message"], body
    assert ledger_size(third) == size  # refused: nothing recorded
    # A provider that committed to a tokens body that is no list of ids fails the count check.
    ran = rechecks_run(third)
    status, body = third.post("/v1/forge/audit/dispute", dispute_helpers.fabricated(
        sha, prompt_tokens=20, tokens=deep, auditor=second.node.signer))
    assert status == 200 and body["outcome"] == audit.UPHELD, body
    assert rechecks_run(third) == ran + 1  # the counter the other tests read does count


def test_a_dispute_without_standing_or_about_an_unheld_trade_costs_no_model_work(mesh):
    buyer, second, honest, third = mesh["buyer"], mesh["second"], mesh["honest"], mesh["third"]
    ran, size = rechecks_run(third), ledger_size(third)
    purchase = next(e for e in buyer.node.reader.iter_entries(0, kind="dispute"))
    trade = purchase.data["claim"]["trade"]  # the buyer's purchase from the cheat
    bodies = [buyer.node.reader.body(h) for h in audit.dispute_bodies(purchase.data)]
    verdict = audit.Verdict(False, "model: padded", 10, [])
    # The honest node sold the third node nothing: no standing there.
    as_honest = audit.sign_dispute(trade, verdict, honest.node.signer, 2)
    status, body = third.post("/v1/forge/audit/dispute",
                              dispute_helpers.payload(as_honest, bodies))
    assert status == 403 and "has provided no trade to this node" in body["error"]["message"]
    # Second has standing, but the trade is the buyer's purchase, and not held here.
    as_second = audit.sign_dispute(trade, verdict, second.node.signer, 2)
    status, body = third.post("/v1/forge/audit/dispute",
                              dispute_helpers.payload(as_second, bodies))
    assert status == 403 and "is not held here" in body["error"]["message"], body
    assert rechecks_run(third) == ran and ledger_size(third) == size


def test_an_auditor_over_its_per_minute_quota_is_refused_unrecorded(mesh):
    second, third = mesh["second"], mesh["third"]
    sha = second.node.models["tiny"].sha256
    queue = third.node.auditor.rechecks
    saved, queue.per_minute = queue.per_minute, 1
    try:  # the first may be re-checked (unless second had one this minute); never the second
        for _ in range(2):
            ran, size = rechecks_run(third), ledger_size(third)
            status, body = third.post("/v1/forge/audit/dispute", dispute_helpers.fabricated(
                sha, prompt_tokens=20, auditor=second.node.signer))
    finally:
        queue.per_minute = saved
    assert status == 429 and body["error"]["code"] == "RecheckBusy", body
    assert "its limit of 1" in body["error"]["message"]
    assert rechecks_run(third) == ran and ledger_size(third) == size


def test_a_replayed_dispute_is_refused_before_any_model_work(mesh):
    """Issue 19: one dispute replayed 100 times got 99 × 409, each after a full re-check."""
    buyer, third = mesh["buyer"], mesh["third"]
    dispute = next(e for e in buyer.node.reader.iter_entries(0, kind="dispute"))
    payload = dispute_helpers.payload(
        dispute.data, [buyer.node.reader.body(h) for h in audit.dispute_bodies(dispute.data)])
    ran, size = rechecks_run(third), ledger_size(third)
    answers = []
    for _ in range(100):
        status, body = third.post("/v1/forge/audit/dispute", payload)
        answers.append(status)
        if status == 409:
            assert body["error"]["type"] == "conflict_error", body
            assert "already audited" in body["error"]["message"], body
    assert 409 in answers and set(answers) <= {409, 429}, answers
    # Once the address used its refusals for the minute, it is refused unread (429).
    assert answers[answers.index(429):] == [429] * (100 - answers.index(429))
    assert rechecks_run(third) == ran and ledger_size(third) == size
