"""The holes a hostile buyer found in the trade core, each pinned against a real node.

Lending that ignored reservations, reservations that leaked on bad input, peer strangers
served again and again without countersigning, and a stranger cap that never freed up.
(One account tripping the breaker for everyone is pinned in test_node_safety.py.)
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from forge_cli import identity
from forge_cli.ledger import entries
from forge_cli.mesh import protocol
from tests.conftest import REPO, forge_env
from tests.mesh_helpers import entries_of, wait_for
from tests.node_harness import NodeProcess

CHAT = "/v1/chat/completions"


@pytest.fixture
def node(tmp_path: Path, tiny_gguf: Path):
    with NodeProcess(tmp_path / "home", tiny_gguf, log=tmp_path / "node.log") as running:
        yield running


def ask(node: NodeProcess, token: str, max_tokens: int = 4, **extra: Any):
    return node.request("POST", CHAT, token=token, body={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
        "temperature": 0, **extra})


def balance(node: NodeProcess, token: str) -> dict[str, Any]:
    status, _, body = node.request("GET", "/v1/forge/balance", token=token)
    assert status == 200, body
    return body


def verify_deep(home: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep"],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(home),
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- 1. lending ignored reservations ---------------------------------------------------------


def test_lending_cannot_take_cu_that_a_running_stream_holds(node, tmp_path):
    bob = node.agent("bob")
    assert ask(node, bob["token"], max_tokens=1)[0] == 200  # the free tier arrives
    whole = balance(node, bob["token"])["balance"]
    request = urllib.request.Request(node.url + CHAT, method="POST", data=json.dumps({
        "messages": [{"role": "user", "content": "a long story"}], "max_tokens": 900,
        "temperature": 0, "stream": True}).encode(), headers={
        "Authorization": f"Bearer {bob['token']}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        lines = [response.readline()]  # generation is under way and holds up to 900 CU
        held = balance(node, bob["token"])
        assert held["reserved"] > 0 and held["available"] == held["balance"] - held["reserved"]
        status, _, body = node.request("POST", "/v1/forge/lend", token=bob["token"],
                                       body={"amount": whole})
        assert status == 402, body
        assert body["error"]["gate"] == "balance" and "held by requests in flight" in \
            body["error"]["message"]
        lines.extend(response)
    raw = b"".join(lines)
    assert b"HTTP/1.1" not in raw  # never a second response inside the stream
    events = [json.loads(line[5:]) for line in lines if line.startswith(b"data: {")]
    x_forge = events[-1]["x_forge"]  # the stream settled and was paid
    assert x_forge["trade_seq"] is not None and x_forge["cu_cost"] > 0
    after = balance(node, bob["token"])
    assert after["reserved"] == 0 and after["balance"] == whole - x_forge["cu_cost"]
    # What is left may be lent now that nothing holds it.
    status, _, body = node.request("POST", "/v1/forge/lend", token=bob["token"],
                                   body={"amount": after["balance"]})
    assert status == 200, body
    assert "Traceback" not in (tmp_path / "node.log").read_text()
    verify_deep(node.home)


# -- 2. reservations leaked on bad input, and moved the market --------------------------------


def _price(node: NodeProcess, token: str) -> int:
    status, _, body = node.request("GET", "/v1/forge/pricing", token=token)
    assert status == 200, body
    return body["models"][0]["price_ucu_per_token"]


@pytest.mark.parametrize(("path", "raw", "words"), [
    (CHAT, b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":50,"stream":"yes"}',
     "'stream' must be a boolean"),
    (CHAT, b'{"messages":[{"role":"user","content":"\\ud800"}],"max_tokens":50}',
     "messages[0].content is not valid Unicode"),
    ("/v1/completions", b'{"prompt":"a\\udfffb","max_tokens":50}', "prompt is not valid Unicode"),
    (CHAT, b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":50,'
           b'"stop":["\\ud800"]}', "not valid Unicode"),
])
def test_rejected_requests_hold_nothing_and_do_not_move_the_market(node, path, raw, words):
    bob = node.agent("bob")
    assert ask(node, bob["token"], max_tokens=1)[0] == 200
    price = _price(node, bob["token"])
    for _ in range(25):
        status, _, body = node.request("POST", path, token=bob["token"], raw=raw)
        assert status == 400, body
        assert words in body["error"]["message"]
    after = balance(node, bob["token"])
    assert after["reserved"] == 0 and after["available"] == after["balance"]
    assert _price(node, bob["token"]) == price
    metrics = node.request("GET", "/metrics")[2]
    assert "forge_queue_depth 0.0" in metrics
    assert ask(node, bob["token"], max_tokens=1)[0] == 200


# -- 4 and 5. peer strangers ---------------------------------------------------------------------


class Stranger:
    """A raw P2P consumer: quotes, signs intents and reads the reply, and countersigns only
    when told to (a hostile one never does)."""

    def __init__(self, provider: NodeProcess) -> None:
        self.provider = provider
        self.key = identity.Identity.generate()

    def buy(self, *, countersign: bool, max_tokens: int = 4) -> tuple[int, dict[str, Any]]:
        model = self.provider.request("GET", "/health")[2]["models"][0]
        status, _, quote = self.provider.request("POST", "/v1/forge/p2p/quote", body={
            "consumer": self.key.node_id, "model": model, "max_tokens": max_tokens})
        assert status == 200, quote
        request = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0,
                              "messages": [{"role": "user", "content": "hi"}]})
        intent = {"quote": quote["quote"], "quote_sig": quote["quote_sig"],
                  "nonce": secrets.token_hex(16),
                  "request_sha256": protocol.sha256_hex(request.encode()),
                  "ts": int(time.time() * 1000)}
        body = {"intent": intent, "consumer_sig": self.key.sign(
            protocol.intent_message(intent)).hex(), "request": request}
        status, _, reply = self.provider.request("POST", "/v1/forge/p2p/chat", body=body)
        if status != 200:
            return status, reply
        events = [json.loads(line[5:]) for line in reply.splitlines()
                  if line.startswith("data: {")]
        final = events[-1]
        assert "terms" in final, events
        if countersign:
            terms = final["terms"]
            data = {**final, "consumer_sig": self.key.sign(entries.trade_message(terms)).hex()}
            status, _, ack = self.provider.request("POST", "/v1/forge/p2p/settle", body=data)
            assert status == 200, ack
        return 200, final


def test_a_stranger_that_never_countersigns_is_refused_after_a_small_exposure(tmp_path,
                                                                            tiny_gguf):
    # Found: a P2P stranger that never countersigned was served for free 6 times of 6.
    with NodeProcess(tmp_path / "a", tiny_gguf, env={"FORGE_MESH_SETTLE_S": "1"},
                     log=tmp_path / "a.log") as a:
        stranger = Stranger(a)
        outcomes = [stranger.buy(countersign=False) for _ in range(6)]
        served = [o for o in outcomes if o[0] == 200]
        assert len(served) == 3, outcomes
        for status, body in outcomes[3:]:
            assert status == 403, body
            assert body["error"]["gate"] == "exposure"
            assert "never countersigned" in body["error"]["message"] or \
                "waiting for its countersignature" in body["error"]["message"]
        # The served terms become unsettled debt; still refused once they are on the record.
        wait_for("unsettled", lambda: len(entries_of(tmp_path / "a", "unsettled")) == 3 or None)
        status, body = stranger.buy(countersign=False)
        assert status == 403 and "3 sale(s) it never countersigned" in body["error"]["message"]
        # An honest peer is not affected.
        assert Stranger(a).buy(countersign=True)[0] == 200
    verify_deep(tmp_path / "a")


def test_stranger_slots_free_up_when_strangers_pay_or_their_grant_idles(tmp_path, tiny_gguf):
    # Found: after 50 strangers took free-tier grants, every later new peer got 429 forever.
    env = {"FORGE_MESH_STRANGERS": "2", "FORGE_MESH_STRANGER_IDLE_S": "2",
           "FORGE_MESH_SETTLE_S": "1"}
    with NodeProcess(tmp_path / "a", tiny_gguf, env=env, log=tmp_path / "a.log") as a:
        payer = Stranger(a)
        assert payer.buy(countersign=True)[0] == 200  # paid: no longer free-tier-only
        idle = [Stranger(a), Stranger(a)]
        for s in idle:
            assert s.buy(countersign=False)[0] == 200  # granted, never paid
        late = Stranger(a)
        status, body = late.buy(countersign=True)
        assert status == 429 and body["error"]["gate"] == "rate_limit", body
        assert "2 peer accounts on its free tier" in body["error"]["message"]
        wait_for("unsettled", lambda: len(entries_of(tmp_path / "a", "unsettled")) == 2 or None)
        time.sleep(2.5)  # past the idle window of the two unpaid grants
        status, body = late.buy(countersign=True)
        assert status == 200, body
        burns = entries_of(tmp_path / "a", "burn")
        returned = {e.data["account"] for e in burns
                    if e.data.get("reason") == "idle free tier returned"}
        assert returned == {s.key.node_id for s in idle}
        assert all(e.data["cu"] == 1000 for e in burns)
    verify_deep(tmp_path / "a")  # the grant came back out of supply: conservation holds
