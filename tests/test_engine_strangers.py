"""Over-long prompts cannot hold the engine (issue 19, finding 5), pinned against a real node.

An agent with a valid token, or a P2P stranger with a fresh key and no token, sends prompts far
longer than any context from two threads while a paying chat runs. The paying chat must finish
within 10x the time it took alone (measured in the same test); the attackers are refused by
size before any tokenizing, and once they pass the rejection limit, with 429 and Retry-After.
"""

from __future__ import annotations

import json
import secrets
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forge_cli import identity
from forge_cli.errors import PromptTooLong, UsageError
from forge_cli.inference.engine import Sampling
from forge_cli.mesh import protocol
from forge_cli.node.throttle import REJECTS_PER_MINUTE, Throttle
from tests.conftest import hold_one_lane
from tests.node_harness import NodeProcess

CHAT = "/v1/chat/completions"
LONG = "word " * 200_000  # 1 MB: within the body limit, far beyond any context
ATTACK_S = 15  # the attack stops by itself after this, so the old code fails instead of hanging
ATTACKERS = 2


@pytest.fixture
def node(tmp_path: Path, tiny_gguf: Path):
    # One decode thread: the event loop and the attackers' own process have the other core
    # of a small machine, so the paying chat's time measures the scheduler, not how llama.cpp's
    # thread team copes with a machine the test itself oversubscribes.
    with NodeProcess(tmp_path / "home", tiny_gguf, "--threads", "1",
                     log=tmp_path / "node.log") as running:
        yield running


def paying_chat(node: NodeProcess, token: str) -> float:
    """Seconds one ordinary paid chat takes; it must succeed and be charged. Its prompt is
    long enough (prompt tokens cost no CU) that the time is more than the HTTP round trip."""
    started = time.perf_counter()
    status, _, body = node.request("POST", CHAT, token=token, body={
        "messages": [{"role": "user", "content": "tell me a story. " * 150}], "max_tokens": 100,
        "temperature": 0})
    took = time.perf_counter() - started
    assert status == 200, body
    assert body["usage"]["completion_tokens"] > 0 and body["x_forge"]["cu_cost"] > 0
    return took


LONG_REQUEST = json.dumps({"max_tokens": 1, "messages": [{"role": "user", "content": LONG}]})
LONG_BODY = LONG_REQUEST.encode()  # encoded once: the attackers spend little of the machine


def http_attack(node: NodeProcess, token: str) -> tuple[int, dict[str, str], Any]:
    return node.request("POST", CHAT, token=token, raw=LONG_BODY)


class Stranger:
    """A P2P consumer with a fresh key and no token: a quote, then a signed intent; once quotes
    are refused it posts its last 1 MB intent again all the same (the worst it can do)."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.key = identity.Identity.generate()
        self.model = node.request("GET", "/health")[2]["models"][0]
        request = json.dumps({"model": self.model, **json.loads(LONG_REQUEST)})
        self.request_sha256 = protocol.sha256_hex(request.encode())
        self.request = json.dumps(request).encode() + b"}"  # the JSON string, and the body's end
        self.last = b""

    def attack(self) -> tuple[int, dict[str, str], Any]:
        status, headers, quote = self.node.request("POST", "/v1/forge/p2p/quote", body={
            "consumer": self.key.node_id, "model": self.model, "max_tokens": 1})
        if status != 200:
            if not self.last:
                return status, headers, quote
            return self.node.request("POST", "/v1/forge/p2p/chat", raw=self.last)
        intent = {"quote": quote["quote"], "quote_sig": quote["quote_sig"],
                  "nonce": secrets.token_hex(16), "request_sha256": self.request_sha256,
                  "ts": int(time.time() * 1000)}
        head = json.dumps({"intent": intent, "consumer_sig": self.key.sign(
            protocol.intent_message(intent)).hex()})
        self.last = head[:-1].encode() + b', "request": ' + self.request
        return self.node.request("POST", "/v1/forge/p2p/chat", raw=self.last)


def under_attack(node: NodeProcess, payer: str,
                 attacker: Callable[[], Callable[[], Any]]) -> tuple[float, list[Any]]:
    """Run an `attacker()` on each of ATTACKERS threads until a paying chat has finished (or
    ATTACK_S passed); the paying chat's time, and every answer the attackers got."""
    stop = threading.Event()
    answers: list[Any] = []
    deadline = time.monotonic() + ATTACK_S

    def hammer() -> None:
        attack = attacker()
        while not stop.is_set() and time.monotonic() < deadline:
            answers.append(attack())

    threads = [threading.Thread(target=hammer) for _ in range(ATTACKERS)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # the attack is under way before the paying chat starts
        took = paying_chat(node, payer)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    return took, answers


def check_refusals(answers: list[Any]) -> None:
    """Refused by size (naming the limit) before any work, then throttled with Retry-After;
    never served, never a 5xx."""
    statuses = Counter(status for status, _, _ in answers)
    assert set(statuses) <= {413, 429}, statuses
    too_long = [body for status, _, body in answers if status == 413]
    assert too_long, statuses
    assert "bytes" in too_long[0]["error"]["message"], too_long[0]
    throttled = [(headers, body) for status, headers, body in answers if status == 429]
    assert throttled, statuses
    headers, body = throttled[-1]
    assert int(headers["Retry-After"]) >= 1 and body["error"]["type"] == "rate_limit_error"


def test_over_long_prompts_from_an_agent_do_not_stall_a_paying_chat(node, tmp_path):
    payer, mallory = node.agent("payer")["token"], node.agent("mallory")["token"]
    paying_chat(node, payer)  # warm up (free tier, first decode)
    baseline = statistics.median(paying_chat(node, payer) for _ in range(3))
    took, answers = under_attack(node, payer, lambda: lambda: http_attack(node, mallory))
    assert took <= 10 * baseline, (took, baseline, Counter(a[0] for a in answers))
    check_refusals(answers)
    status, _, body = node.request("GET", "/v1/forge/balance", token=mallory)
    assert status == 200 and body["reserved"] == 0
    assert "Traceback" not in (tmp_path / "node.log").read_text()


def test_over_long_prompts_from_a_p2p_stranger_do_not_stall_a_paying_chat(node, tmp_path):
    payer = node.agent("payer")["token"]
    paying_chat(node, payer)
    baseline = statistics.median(paying_chat(node, payer) for _ in range(3))
    took, answers = under_attack(node, payer, lambda: Stranger(node).attack)
    assert took <= 10 * baseline, (took, baseline, Counter(a[0] for a in answers))
    check_refusals(answers)
    assert "Traceback" not in (tmp_path / "node.log").read_text()


# -- the engine itself (in this process, real llama.cpp on the tiny GGUF) ---------------------


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path):
    from forge_cli.inference.engine import Engine

    with Engine(tiny_gguf, name="tiny", n_ctx=512, slots=2, lanes=1, n_threads=1) as eng:
        yield eng


GREEDY = Sampling(max_tokens=64, temperature=0.0)


def test_the_byte_bound_is_what_the_longest_token_allows(engine):
    # The tiny vocabulary's longest piece is "</s>" (4 bytes): 511 tokens hold at most 2044.
    assert engine.token_bytes == 4
    assert engine.max_prompt_bytes == (engine.n_ctx - 1) * 4
    assert engine.describe()["max_prompt_bytes"] == engine.max_prompt_bytes
    # At the bound a prompt is still tokenized (it may fit: one token per byte here does not).
    with pytest.raises(UsageError, match="the prompt is 2044 tokens"):
        engine.generate("x" * engine.max_prompt_bytes, GREEDY, add_bos=False)
    with pytest.raises(PromptTooLong, match="2,045 bytes.*no text of more than 2,044 bytes"):
        engine.generate("x" * (engine.max_prompt_bytes + 1), GREEDY)


def test_prompts_are_refused_in_the_callers_thread_while_the_scheduler_is_busy(engine):
    # Found: prompts were tokenized (and refused) on the scheduler thread, one at a time.
    holder, release = hold_one_lane(engine)
    try:
        # The scheduler is held all along: only the caller's thread can refuse these.
        with pytest.raises(PromptTooLong):
            engine.chat([{"role": "user", "content": LONG}], GREEDY)
        with pytest.raises(UsageError, match="tokens; the context of tiny holds 512"):
            engine.chat([{"role": "user", "content": "y" * 1000}], GREEDY)
        assert engine.queued == 0  # neither reached the queue
    finally:
        release.set()
        holder.join(timeout=30)


def test_live_sequences_step_while_queued_work_keeps_arriving(engine):
    # Found: the scheduler took queued items for as long as there were any before stepping, so
    # a steady stream of them (refused prompts then; calls, cancelled requests now) starved
    # every admitted sequence.
    engine.generate("warm up", GREEDY).result()
    started = time.perf_counter()
    assert engine.generate("once upon a time", GREEDY).result().completion_tokens == 64
    baseline = time.perf_counter() - started
    stop = threading.Event()
    deadline = time.monotonic() + ATTACK_S

    def flood() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            engine.call(lambda: time.sleep(0.002))

    threads = [threading.Thread(target=flood) for _ in range(4)]  # the queue is never empty
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        started = time.perf_counter()
        done = engine.generate("once upon a time", GREEDY).result()
        took = time.perf_counter() - started
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert done.completion_tokens == 64
    # Between two steps the scheduler takes at most one item per free slot (here one slot is
    # free, and each item holds it 2 ms): 64 steps may wait 64 of them beside the decoding.
    assert took <= 10 * (baseline + 64 * 0.002), (took, baseline)


# -- the throttle --------------------------------------------------------------------------


def test_refusals_throttle_their_sender_before_its_body_is_read(node):
    mallory, bob = node.agent("mallory")["token"], node.agent("bob")["token"]
    for _ in range(REJECTS_PER_MINUTE):
        status, _, body = node.request("POST", CHAT, token=mallory, body={"messages": []})
        assert status == 400, body
    # Not even parsed now: a body that is not JSON gets the 429, not a 400.
    status, headers, body = node.request("POST", CHAT, token=mallory, raw=b"{not json")
    assert status == 429, body
    assert body["error"]["code"] == "Throttled" and "in the last minute" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 61
    # Another account is not affected.
    status, _, body = node.request("POST", CHAT, token=bob, body={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200, body


def test_a_throttle_forgets_refusals_older_than_its_window():
    now = [0.0]
    throttle = Throttle(3, clock=lambda: now[0], max_keys=4)
    for _ in range(3):
        assert throttle.blocked_for("a") == 0
        throttle.failed("a")
    assert throttle.blocked_for("a") == 61 and throttle.blocked_for("b") == 0
    now[0] = 30.0
    assert throttle.blocked_for("a") == 31
    now[0] = 60.0
    assert throttle.blocked_for("a") == 0 and "a" not in throttle.failures
    for key in range(10):  # bounded memory: the oldest senders are forgotten
        throttle.failed(f"k{key}")
    assert len(throttle.failures) <= 4


def test_bodies_over_the_size_limit_count_toward_the_throttle(node):
    mallory = node.agent("mallory")["token"]
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    statuses = [node.request("POST", CHAT, token=mallory, raw=huge)[0]
                for _ in range(REJECTS_PER_MINUTE + 1)]
    assert statuses == [413] * REJECTS_PER_MINUTE + [429], statuses
