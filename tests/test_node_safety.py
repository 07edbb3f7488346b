"""Every safety gate fires on a real node, in order, and the kill switch survives a restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess

CHAT = "/v1/chat/completions"


def ask(node: NodeProcess, token: str, max_tokens: int = 4, **extra: object):
    return node.request("POST", CHAT, token=token, body={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
        "temperature": 0, **extra})


def denied(result, status: int, gate: str) -> None:
    code, _, body = result
    assert code == status, body
    assert body["error"]["gate"] == gate
    assert gate.split("_")[0] in body["error"]["message"].replace(" ", "_")


@pytest.fixture
def node(tmp_path: Path, tiny_gguf: Path):
    with NodeProcess(tmp_path / "home", tiny_gguf,
                     env={"FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE": "1000"}) as running:
        yield running


def set_policy(node: NodeProcess, **limits: object) -> None:
    status, _, body = node.request("POST", "/v1/forge/policy", token=node.operator_token,
                                   body=limits)
    assert status == 200, body


def test_kill_switch_refuses_every_spend_and_resume_lifts_it(node):
    bob = node.agent("bob")
    assert ask(node, bob["token"])[0] == 200
    status, _, body = node.request("POST", "/v1/forge/kill", token=node.operator_token,
                                   body={"activate": True, "reason": "drill"})
    assert status == 200 and body["kill_switch"]["active"] is True
    denied(ask(node, bob["token"]), 423, "kill_switch")
    denied(ask(node, bob["token"], stream=True), 423, "kill_switch")  # a stream that starts after
    consumer_try = node.request("POST", "/v1/forge/kill", token=bob["token"],
                                body={"activate": False})
    assert consumer_try[0] == 403
    status, _, _ = node.request("POST", "/v1/forge/kill", token=node.operator_token,
                                body={"activate": False, "reason": "drill over"})
    assert status == 200
    assert ask(node, bob["token"])[0] == 200


def test_kill_switch_during_a_stream_stops_it_and_charges_nothing(node):
    bob = node.agent("bob")
    assert ask(node, bob["token"])[0] == 200  # funded by the free tier
    before = node.request("GET", "/v1/forge/balance", token=bob["token"])[2]["balance"]
    request = urllib.request.Request(node.url + CHAT, method="POST", data=json.dumps({
        "messages": [{"role": "user", "content": "a long story"}], "max_tokens": 900,
        "temperature": 0, "stream": True}).encode(), headers={
        "Authorization": f"Bearer {bob['token']}", "Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        events.append(response.readline())  # the first chunk: generation is under way
        status, _, _ = node.request("POST", "/v1/forge/kill", token=node.operator_token,
                                    body={"activate": True, "reason": "mid-stream"})
        assert status == 200
        events.extend(line for line in response if line.strip())
    data = [json.loads(line[5:]) for line in events if line.startswith(b"data: {")]
    assert data[-1]["error"]["gate"] == "kill_switch"
    assert not any("x_forge" in d for d in data)
    assert events[-1].strip() == b"data: [DONE]"
    after = node.request("GET", "/v1/forge/balance", token=bob["token"])[2]["balance"]
    assert after == before


def test_kill_switch_survives_a_restart(tmp_path: Path, tiny_gguf: Path):
    home = tmp_path / "home"
    with NodeProcess(home, tiny_gguf) as first:
        token = first.agent("bob")["token"]
        first.request("POST", "/v1/forge/kill", token=first.operator_token,
                      body={"activate": True, "reason": "before restart"})
    with NodeProcess(home, tiny_gguf) as second:
        denied(ask(second, token), 423, "kill_switch")
        status, _, body = second.request("GET", "/v1/forge/safety", token=second.operator_token)
        assert body["kill_switch"]["reason"] == "before restart"


def test_per_request_cap(node):
    bob = node.agent("bob")
    set_policy(node, account=bob["account"], per_request_cap_cu=3, approval_threshold_cu=2)
    denied(ask(node, bob["token"], max_tokens=50), 403, "per_request_cap")


def test_circuit_breaker_opens_above_the_spend_rate(tmp_path: Path, tiny_gguf: Path):
    with NodeProcess(tmp_path / "home", tiny_gguf,
                     env={"FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE": "3"}) as running:
        bob = running.agent("bob")
        for _ in range(4):
            assert ask(running, bob["token"], max_tokens=2)[0] == 200
        denied(ask(running, bob["token"], max_tokens=2), 403, "circuit_breaker")
        status, _, body = running.request("GET", "/metrics")
        assert "forge_account_breakers_open 1.0" in body
        assert "forge_breaker_open 0.0" in body  # bob's own breaker, not the node's


def test_one_account_cannot_trip_the_breaker_for_everyone(tmp_path: Path, tiny_gguf: Path):
    # Found: 31 one-token purchases by one agent tripped the node-wide breaker, and every
    # account got 403 for 5 minutes.
    with NodeProcess(tmp_path / "home", tiny_gguf) as running:
        bob, alice = running.agent("bob"), running.agent("alice")
        for _ in range(30):
            assert ask(running, bob["token"], max_tokens=1)[0] == 200
        assert ask(running, bob["token"], max_tokens=1)[0] == 200  # the 31st spend trips it
        denied(ask(running, bob["token"], max_tokens=1), 403, "circuit_breaker")
        assert ask(running, alice["token"], max_tokens=1)[0] == 200
        status = running.request("GET", "/v1/forge/safety", token=running.operator_token)[2]
        assert status["breaker"]["state"] == "closed" and status["breaker"]["open_accounts"] == 1
        mine = running.request("GET", "/v1/forge/safety", token=bob["token"])[2]
        assert mine["account_breaker"]["state"] == "open"


def test_hourly_budget(node):
    bob = node.agent("bob")
    set_policy(node, account=bob["account"], hourly_budget_cu=6, approval_threshold_cu=100,
               per_request_cap_cu=200)
    spent = 0
    result = ask(node, bob["token"], max_tokens=4)
    while result[0] == 200 and spent < 100:
        spent += result[2]["x_forge"]["cu_cost"]
        result = ask(node, bob["token"], max_tokens=4)
    denied(result, 403, "hourly_budget")
    assert spent <= 6


def test_lifetime_budget(node):
    bob = node.agent("bob")
    set_policy(node, account=bob["account"], lifetime_budget_cu=5, hourly_budget_cu=1000,
               approval_threshold_cu=100, per_request_cap_cu=200)
    result = ask(node, bob["token"], max_tokens=4)
    rounds = 0
    while result[0] == 200 and rounds < 50:
        rounds += 1
        result = ask(node, bob["token"], max_tokens=4)
    denied(result, 403, "lifetime_budget")


def test_approval_above_threshold_then_approved_retry_passes(node):
    bob = node.agent("bob")
    set_policy(node, account=bob["account"], approval_threshold_cu=3, per_request_cap_cu=500)
    status, _, body = ask(node, bob["token"], max_tokens=20)
    assert status == 202 and body["error"]["gate"] == "approval"
    approval = body["error"]["approval_id"]
    pending = node.request("GET", "/v1/forge/approvals", token=node.operator_token)[2]
    assert approval in {p["id"] for p in pending["pending"]}
    done = subprocess.run([sys.executable, "-m", "forge_cli", "safety", "approve", approval],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(node.home),
                          timeout=60)
    assert done.returncode == 0, done.stderr
    status, _, body = ask(node, bob["token"], max_tokens=20)
    assert status == 200, body
    status, _, body = ask(node, bob["token"], max_tokens=20)
    assert status == 202  # an approval is good for one spend


def test_gates_apply_in_design_order(node):
    bob = node.agent("bob")
    # Cap, hourly and approval would all refuse this request: the cap speaks first.
    set_policy(node, account=bob["account"], per_request_cap_cu=2, hourly_budget_cu=1,
               approval_threshold_cu=1)
    denied(ask(node, bob["token"], max_tokens=30), 403, "per_request_cap")
    node.request("POST", "/v1/forge/kill", token=node.operator_token,
                 body={"activate": True, "reason": "order"})
    denied(ask(node, bob["token"], max_tokens=30), 423, "kill_switch")


def test_sigkill_mid_workload_loses_no_acknowledged_trade(tmp_path: Path, tiny_gguf: Path):
    home = tmp_path / "home"
    env = {"FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE": "100000"}
    running = NodeProcess(home, tiny_gguf, env=env)
    agents = [running.agent(f"a{i}") for i in range(2)]
    acknowledged: list[tuple[int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def work(agent: dict[str, str]) -> None:
        for _ in range(200):
            if stop.is_set():
                return
            try:
                status, _, body = ask(running, agent["token"], max_tokens=3)
            except OSError:
                return  # the node was killed under us
            if status == 200:
                with lock:
                    acknowledged.append((body["x_forge"]["trade_seq"], agent["account"]))

    threads = [threading.Thread(target=work, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    while True:
        with lock:
            if len(acknowledged) >= 30:
                break
        threads[0].join(timeout=0.05)
    running.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    verify = subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep",
                             "--ledger", str(home / "ledger.db")], capture_output=True,
                            text=True, cwd=REPO, env=forge_env(home), timeout=120)
    assert verify.returncode == 0, verify.stderr
    with Ledger.open_reader(home / "ledger.db") as book:
        for seq, account in acknowledged:
            entry = book.entry(seq)
            assert entry.kind == "trade" and entry.data["terms"]["consumer"] == account
    with NodeProcess(home, tiny_gguf, env=env) as again:  # and it serves again
        assert ask(again, agents[0]["token"])[0] == 200


def _stream_request(node: NodeProcess, token: str, max_tokens: int) -> urllib.request.Request:
    return urllib.request.Request(node.url + CHAT, method="POST", data=json.dumps({
        "messages": [{"role": "user", "content": "go on"}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True}).encode(), headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})


def test_full_queue_is_429_with_retry_after(tmp_path: Path, tiny_gguf: Path):
    # One slot and one place in the queue: the third request at once is refused.
    with NodeProcess(tmp_path / "home", tiny_gguf,
                     env={"FORGE_NODE_QUEUE": "1", "FORGE_ENGINE_SLOTS": "1"}) as running:
        agents = [running.agent(f"q{i}") for i in range(4)]
        for agent in agents:  # fund them first: the free tier arrives with the first buy
            assert ask(running, agent["token"], max_tokens=1)[0] == 200
        outcomes: list[int] = []
        headers: list[dict[str, str]] = []

        def long_one(agent: dict[str, str]) -> None:
            status, head, _ = ask(running, agent["token"], max_tokens=500)
            outcomes.append(status)
            headers.append(head)

        threads = [threading.Thread(target=long_one, args=(a,)) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert 429 in outcomes and 200 in outcomes, outcomes
        busy = headers[outcomes.index(429)]
        assert int(busy["Retry-After"]) >= 1
        status = running.request("GET", "/v1/forge/safety", token=running.operator_token)[2]
        assert status["breaker"]["consecutive_errors"] == 0  # busy is not a failure of ours


def test_client_that_disconnects_mid_stream_pays_only_for_tokens_produced(node):
    bob = node.agent("bob")
    assert ask(node, bob["token"], max_tokens=1)[0] == 200
    before = node.request("GET", "/v1/forge/balance", token=bob["token"])[2]["balance"]
    with urllib.request.urlopen(_stream_request(node, bob["token"], 900), timeout=60) as response:
        for _ in range(3):
            response.readline()
    # Gone: the node notices, cancels the generation and settles what was produced.
    trade = None
    for _ in range(200):
        trades = node.request("GET", f"/v1/forge/trades?account={bob['account']}",
                              token=bob["token"])[2]["trades"]
        if len(trades) == 2:
            trade = trades[0]
            break
        threading.Event().wait(0.05)
    assert trade is not None, "the cut-off stream was settled as a trade"
    assert 1 <= trade["completion_tokens"] < 900
    after = node.request("GET", "/v1/forge/balance", token=bob["token"])[2]["balance"]
    assert before - after == trade["cu"]


def test_sigterm_lets_the_node_stop_cleanly_mid_stream(tmp_path: Path, tiny_gguf: Path):
    home = tmp_path / "home"
    running = NodeProcess(home, tiny_gguf)
    bob = running.agent("bob")
    assert ask(running, bob["token"], max_tokens=1)[0] == 200
    with urllib.request.urlopen(_stream_request(running, bob["token"], 900), timeout=60) as response:
        response.readline()
        code = running.stop(signal.SIGTERM)
        rest = response.read()  # the stream ends (finished or cut), the node does not hang
    assert code == 0
    assert rest is not None
    verify = subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep",
                             "--ledger", str(home / "ledger.db")], capture_output=True,
                            text=True, cwd=REPO, env=forge_env(home), timeout=120)
    assert verify.returncode == 0, verify.stderr
