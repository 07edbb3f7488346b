"""Audits at the engine level: an honest seller's replies always pass, and every cheat is
caught — a seller running another GGUF than the one it quotes, one that inflates its token
count, one that pads its replies.

Sales here run the seller's own path minus HTTP (parse the request as the P2P route does,
commit the sampling, generate with the real engine) on the tiny GGUF; the auditor is the real
`audit.audit` over a second Engine of the same file. The cheater's model is a second
random-weight tiny GGUF with the same tokenizer (tests/gguf_model.py, another seed).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forge_cli import identity
from forge_cli.errors import DisputeRejected, Replay
from forge_cli.ledger import entries
from forge_cli.mesh import audit
from forge_cli.trade.session import request_bytes

HONEST_SALES = 200
CHEATS = 50
MAX_TOKENS = 12
WORDS = "the cat sat on a mat while rain fell over old town roads and quiet fields".split()


@pytest.fixture(scope="module")
def engines(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """(seller's engine, auditor's engine of the same file, cheater's engine of another)."""
    from forge_cli.inference.engine import Engine
    from tests.gguf_model import write_tiny_llama

    other = write_tiny_llama(tmp_path_factory.mktemp("cheat") / "other.gguf", seed=4321)
    made = [Engine(tiny_gguf, n_ctx=512, slots=2), Engine(tiny_gguf, n_ctx=512, slots=2),
            Engine(other, n_ctx=512, slots=2)]
    try:
        yield made
    finally:
        for engine in made:
            engine.close()


PROVIDER, CONSUMER = identity.Identity.generate(), identity.Identity.generate()


def sell(engine: Any, n: int, temperature: float, *, quoted_sha256: str | None = None,
         repeat_penalty: float = 1.0, content: str | None = None) -> dict[str, Any]:
    """One sale as the P2P route makes it: terms, request, response and the tokens body."""
    from forge_cli.inference.engine import Sampling
    from forge_cli.inference.requests import parse_messages, parse_sampling

    rng = random.Random(n)
    body = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": temperature,
            "seed": n, "messages": [{"role": "user", "content": content or " ".join(
                rng.choice(WORDS) for _ in range(rng.randint(2, 9)))}]}
    parsed = parse_sampling(body, engine.n_ctx)
    if repeat_penalty != 1.0:  # not an API field: the engine's own knob, committed all the same
        parsed = Sampling(**{**parsed.__dict__, "repeat_penalty": repeat_penalty})
    sampling, commit = audit.commit_sampling(parsed)
    completion = engine.chat(parse_messages(body), sampling).result()
    return bill({"provider": PROVIDER.node_id, "consumer": CONSUMER.node_id, "model": "tiny",
                 "model_sha256": quoted_sha256 or engine.sha256,
                 "prompt_tokens": completion.prompt_tokens, "price_ucu_per_token": 1_000_000,
                 "request_sha256": entries.body_hash(request_bytes(body)),
                 "nonce": secrets.token_hex(8), "ts": 1, "sampling": commit},
                request_bytes(body), completion.text, completion.token_ids)


def bill(terms: dict[str, Any], request: bytes, text: str, ids: list[int]) -> dict[str, Any]:
    """Terms for a reply of `text` and token `ids` (count, CU and hashes follow them)."""
    tokens = audit.tokens_body(ids)
    terms = {**terms, "completion_tokens": len(ids),
             "cu": entries.trade_cost(len(ids), terms["price_ucu_per_token"]),
             "response_sha256": entries.body_hash(text.encode()),
             "tokens_sha256": entries.body_hash(tokens)}
    assert entries.check_terms(terms) is None
    return {"terms": terms, "request": request, "response": text.encode(), "tokens": tokens}


def run_audit(auditor: Any, sale: dict[str, Any]) -> audit.Verdict:
    return audit.audit(auditor, sale["terms"], sale["request"], sale["response"], sale["tokens"])


def test_honest_sales_at_temperature_zero_and_above_are_never_disputed(engines):
    seller, auditor, _ = engines
    temperatures = [0.0, 0.7, 1.0, 1.5]
    checked = disputed = 0
    reasons = []
    for n in range(HONEST_SALES):
        sale = sell(seller, n, temperatures[n % 4], repeat_penalty=1.3 if n % 10 == 9 else 1.0)
        verdict = run_audit(auditor, sale)
        checked += verdict.positions
        if not verdict.ok:
            disputed += 1
            reasons.append((n, verdict.reason))
    assert disputed == 0, reasons[:5]
    assert checked >= HONEST_SALES * MAX_TOKENS // 2  # the audits read real replies


def test_a_seller_serving_another_model_than_it_quotes_is_always_caught(engines):
    seller, auditor, cheat = engines
    for n in range(CHEATS):
        sale = sell(cheat, 1000 + n, [0.0, 0.7, 1.0][n % 3], quoted_sha256=seller.sha256)
        verdict = run_audit(auditor, sale)
        assert not verdict.ok and verdict.reason.startswith("model:"), (n, verdict)
        assert verdict.failures and all(f["token_mlogit"] < f["bound_mlogit"]
                                        for f in verdict.failures)


def test_a_seller_inflating_its_token_count_is_always_caught(engines):
    """Half bill tokens they never committed; half commit invisible end-of-text tokens."""
    seller, auditor, _ = engines
    eos = 258  # tests/gguf_model.py: a control token, no text
    for n in range(CHEATS):
        sale = sell(seller, 2000 + n, [0.0, 0.8][n % 2])
        ids = audit.ids_of(sale["tokens"])
        if n % 2:
            cheat = bill(sale["terms"], sale["request"], sale["response"].decode(),
                         ids + [eos] * (1 + n % 5))
        else:
            terms = {**sale["terms"], "completion_tokens": len(ids) + 1 + n % 5}
            terms["cu"] = entries.trade_cost(terms["completion_tokens"], 1_000_000)
            cheat = {**sale, "terms": terms}
        verdict = run_audit(auditor, cheat)
        assert not verdict.ok, (n, verdict)


def test_a_seller_padding_its_replies_is_always_caught(engines):
    """The padder generates half the reply and fills the rest of max_tokens with filler
    tokens, billed and committed like generated ones (text, counts and hashes agree)."""
    seller, auditor, _ = engines
    printable = [*range(0x20, 0x7F)]
    real = MAX_TOKENS // 2
    for n in range(CHEATS):
        rng = random.Random(n)
        sale = sell(seller, 3000 + n, [0.0, 0.8][n % 2])
        ids = audit.ids_of(sale["tokens"])[:real]
        pad = [rng.choice(printable) for _ in range(MAX_TOKENS - real)]
        text, _ = seller.reply_text(ids + pad)
        verdict = run_audit(auditor, bill(sale["terms"], sale["request"], text, ids + pad))
        assert not verdict.ok and verdict.reason.startswith("model:"), (n, verdict)
        assert all(f["pos"] >= real for f in verdict.failures)  # only the padding


def test_a_reply_that_is_not_the_text_of_its_tokens_is_caught(engines):
    seller, auditor, _ = engines
    sale = sell(seller, 7, 0.0)
    ids = audit.ids_of(sale["tokens"])
    cheat = bill(sale["terms"], sale["request"], sale["response"].decode() + " and more", ids)
    verdict = run_audit(auditor, cheat)
    assert not verdict.ok and verdict.reason.startswith("text:")


def test_an_audit_of_another_model_is_refused(engines):
    seller, _, cheat = engines
    sale = sell(seller, 8, 0.0)
    with pytest.raises(DisputeRejected, match="not the model the trade names"):
        run_audit(cheat, sale)


def test_scoring_shares_the_slots_and_agrees_with_greedy_generation(engines):
    """The scoring job's logits at each reply position rank the greedy token first, while
    generations run beside it in the same scheduler."""
    from forge_cli.inference.engine import Sampling

    seller, _, _ = engines
    prompt = seller.tokenize(seller.render([{"role": "user", "content": "a mat"}]))
    reply = seller.chat([{"role": "user", "content": "a mat"}],
                        Sampling(max_tokens=MAX_TOKENS, temperature=0)).result().token_ids
    beside = [seller.chat([{"role": "user", "content": f"rain {i}"}],
                          Sampling(max_tokens=30, temperature=0.7, seed=i)) for i in range(3)]
    rows = seller.score(prompt + reply, len(prompt))
    assert rows.shape == (len(reply), seller.n_vocab)
    assert [int(r.argmax()) for r in rows] == reply
    assert all(stream.result().completion_tokens > 0 for stream in beside)


def test_what_the_auditor_cannot_check_is_refused_never_disputed(engines, tiny_gguf):
    """A reply longer than the auditor's context, or a request it cannot parse, is the
    auditor's limit or the consumer's doing: no verdict against the seller."""
    from forge_cli.inference.engine import Engine

    seller, auditor, _ = engines
    sale = sell(seller, 9, 0.7, content="rain " * 60)  # 300 byte tokens: more than 256
    with Engine(tiny_gguf, n_ctx=256, slots=1) as small:
        with pytest.raises(DisputeRejected, match="cannot audit them"):
            run_audit(small, sale)
    garbled = {**sale, "request": b"not json"}
    garbled["terms"] = {**sale["terms"], "request_sha256": entries.body_hash(b"not json")}
    with pytest.raises(DisputeRejected, match="not a chat request"):
        run_audit(auditor, garbled)


def test_a_failing_score_reducer_fails_only_its_own_job(engines):
    from forge_cli.errors import ModelError
    from forge_cli.inference.engine import Sampling

    seller, _, _ = engines
    beside = seller.chat([{"role": "user", "content": "quiet fields"}],
                         Sampling(max_tokens=20, temperature=0))

    def broken(i: int, row: Any) -> None:
        raise ValueError("no")

    with pytest.raises(ModelError, match="scoring failed: no"):
        seller.score([1, 2, 3, 4], 2, reduce=broken)
    assert beside.result().completion_tokens == 20
    assert seller.score([1, 2, 3, 4], 2, reduce=lambda i, row: i) == [0, 1]


def test_a_peers_recheck_waits_for_paying_work_and_yields_to_it(engines):
    """RecheckQueue over a real engine: a re-check does not start while a paying session is
    open; one whose prefill is under way when a session opens is withdrawn at the engine's
    next step and runs again, from the start, once the node is idle."""
    import asyncio

    from forge_cli.errors import RecheckBusy
    from forge_cli.node.web import forge_error_response
    from tests.conftest import hold_one_lane

    _, auditor, _ = engines
    tokens = auditor.tokenize(auditor.render([{"role": "user", "content": "mat " * 60}]))
    paying = [True]
    outcomes: list[str] = []
    runs: list[int] = []

    async def scenario() -> None:
        queue = audit.RecheckQueue(lambda: paying[0], size=2, per_minute=2,
                                   counted=outcomes.append)

        async def run(cancel: Any) -> dict[str, Any]:
            runs.append(len(runs))
            if len(runs) == 1:  # a paying session opens as the first attempt starts
                paying[0] = True
            rows = await asyncio.to_thread(auditor.score, tokens, len(tokens) - 5,
                                           reduce=lambda i, row: i, cancel=cancel)
            return {"rows": rows}

        done = queue.submit(("trade", "auditor"), run)
        await asyncio.sleep(0.3)
        assert runs == [] and not done.done()  # paying work is open: it has not started
        holder, release = hold_one_lane(auditor)  # the engine is mid-step on paying work
        paying[0] = False
        while not runs:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the queue sees the session and withdraws the prefill
        release.set()
        holder.join()
        while outcomes != ["yielded"]:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert len(runs) == 1 and not done.done()  # waiting again while the session is open
        paying[0] = False
        assert await asyncio.wait_for(done, 30) == {"rows": [0, 1, 2, 3, 4]}
        assert len(runs) == 2 and outcomes == ["yielded"]
        # Limits: the same dispute waits once; an auditor has its quota per minute.
        paying[0] = True
        queue.submit(("trade", "auditor"), run)
        with pytest.raises(Replay, match="already waiting"):
            queue.submit(("trade", "auditor"), run)
        with pytest.raises(RecheckBusy, match="its limit of 2") as busy:
            queue.submit(("another", "auditor"), run)
        assert 1 <= busy.value.retry_after_s <= 61
        assert forge_error_response(busy.value).headers["Retry-After"] == \
            str(busy.value.retry_after_s)
        await queue.stop()

    asyncio.run(scenario())
