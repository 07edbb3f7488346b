"""Hostile buyers against one node, as a hypothesis state machine: concurrent purchases
(streaming and not, cancelled mid-stream, malformed) alongside lend, withdraw, borrow and
repay from the same accounts. After every step: no available balance is negative, no
reservation outlives its request, every delivered token is paid by exactly one trade, and CU
is conserved.

The node is real (build_node, the aiohttp app on 127.0.0.1, llama.cpp on the tiny GGUF); it
runs in this process on its own thread so the checks can see its wallet directly.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from forge_cli.ledger import views
from forge_cli.ledger.store import Ledger
from forge_cli.trade.session import request_bytes
from tests.app_thread import AppThread

ACCOUNTS = 3
SETTLE_WAIT_S = 30


class Server:
    """A node built by build_node, served on 127.0.0.1 from a thread of this process."""

    def __init__(self, home: Path, model: Path) -> None:
        from forge_cli import config
        from forge_cli.node.app import make_app
        from forge_cli.root.build import build_node

        self.node = build_node(config.load(), models=[str(model)],
                               ledger_path=home / "ledger.db")
        self.ledger_path = home / "ledger.db"
        self.served = AppThread(lambda: make_app(self.node))
        self.port = self.served.port

    def close(self) -> None:
        self.served.close()
        self.node.close()

    def call(self, method: str, path: str, token: str, body: Any = None,
             raw: bytes | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                                else None)
            conn.request(method, path, body=data, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read().decode()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("state") / "home"
    saved = {k: v for k, v in os.environ.items() if k.startswith("FORGE_")}
    for name in saved:
        del os.environ[name]
    # Many purchases a minute from one account are the point here, not the breaker.
    os.environ.update(FORGE_HOME=str(home), FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE="100000")
    running = Server(home, tiny_gguf)
    try:
        yield running
    finally:
        running.close()
        for name in [k for k in os.environ if k.startswith("FORGE_")]:
            del os.environ[name]
        os.environ.update(saved)


class Purchase:
    """One request on a thread of its own: what was sent, and what came back."""

    def __init__(self, server: Server, token: str, account: str, n: int, *, stream: bool,
                 max_tokens: int, cut_after: int | None) -> None:
        self.account = account
        self.body = {"messages": [{"role": "user", "content": f"story {n} {time.time_ns()}"}],
                     "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        self.request_sha256 = hashlib.sha256(request_bytes(self.body)).hexdigest()
        self.status: int | None = None
        self.tokens: int | None = None  # completion tokens the buyer was told of
        self.pieces = 0  # content pieces the buyer received
        self.cut = False
        self.thread = threading.Thread(target=self._run, args=(server, token, cut_after))
        self.thread.start()

    def _run(self, server: Server, token: str, cut_after: int | None) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(self.body).encode(),
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json"})
            response = conn.getresponse()
            self.status = response.status
            if not self.body["stream"] or response.status != 200:
                reply = json.loads(response.read())
                if response.status == 200:
                    self.tokens = reply["usage"]["completion_tokens"]
                    self.pieces = 1 if reply["choices"][0]["message"]["content"] else 0
                return
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[5:])
                assert "HTTP/1.1" not in line.decode()
                delta = event.get("choices", [{}])[0].get("delta", {})
                if delta.get("content"):
                    self.pieces += 1
                if "usage" in event:
                    self.tokens = event["usage"]["completion_tokens"]
                if cut_after is not None and self.pieces >= cut_after and self.tokens is None:
                    self.cut = True
                    return  # the buyer hangs up mid-stream
        finally:
            conn.close()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


MALFORMED = [
    b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":40,"stream":"yes"}',
    b'{"messages":[{"role":"user","content":"\\ud800"}],"max_tokens":40}',
    b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}',
    b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":40,"temperature":"hot"}',
    b'{"messages":"hi","max_tokens":40}',
    b'{"messages":[{"role":"user","content":"hi"}]',
]


class HostileBuyers(RuleBasedStateMachine):
    server: Server  # set by the test

    def __init__(self) -> None:
        super().__init__()
        node = self.server.node
        self.node = node
        self.accounts: list[tuple[str, str]] = []  # (account, token)
        for _ in range(ACCOUNTS):
            signer, token = node.accounts.create(f"buyer-{os.urandom(4).hex()}")
            self.accounts.append((signer.node_id, token))
        self.purchases: list[Purchase] = []
        self.loans: list[tuple[int, str]] = []  # (loan_id, token)
        self.reader = Ledger.open_reader(self.server.ledger_path)
        self.state = views.MemoryState()
        self.applied = 0
        self.count = 0

    def teardown(self) -> None:
        for purchase in self.purchases:
            purchase.thread.join(120)
        self.settled()
        self.reader.close()

    # -- rules ---------------------------------------------------------------------------

    @rule(who=st.integers(0, ACCOUNTS - 1), stream=st.booleans(),
          max_tokens=st.integers(1, 120),
          cut_after=st.one_of(st.none(), st.integers(1, 8)))
    def purchase(self, who: int, stream: bool, max_tokens: int, cut_after: int | None) -> None:
        account, token = self.accounts[who]
        self.count += 1
        self.purchases.append(Purchase(self.server, token, account, self.count, stream=stream,
                                       max_tokens=max_tokens,
                                       cut_after=cut_after if stream else None))

    @rule(who=st.integers(0, ACCOUNTS - 1), raw=st.sampled_from(MALFORMED))
    def malformed(self, who: int, raw: bytes) -> None:
        status, body = self.server.call("POST", "/v1/chat/completions", self.accounts[who][1],
                                        raw=raw)
        assert status == 400, body

    @rule(who=st.integers(0, ACCOUNTS - 1), amount=st.integers(1, 1200))
    def lend(self, who: int, amount: int) -> None:
        status, body = self.server.call("POST", "/v1/forge/lend", self.accounts[who][1],
                                        {"amount": amount})
        assert status in (200, 400, 402, 403), body

    @rule(who=st.integers(0, ACCOUNTS - 1), amount=st.integers(1, 600))
    def withdraw(self, who: int, amount: int) -> None:
        status, body = self.server.call("POST", "/v1/forge/withdraw", self.accounts[who][1],
                                        {"amount": amount})
        assert status in (200, 400, 402, 403), body

    @rule(who=st.integers(0, ACCOUNTS - 1), amount=st.integers(1, 200),
          collateral=st.integers(1, 900))
    def borrow(self, who: int, amount: int, collateral: int) -> None:
        token = self.accounts[who][1]
        status, body = self.server.call("POST", "/v1/forge/borrow", token, {
            "amount": amount, "term_hours": 1, "collateral": collateral})
        assert status in (200, 400, 402, 403, 429), body
        if status == 200:
            self.loans.append((body["loan_id"], token))

    @rule(pick=st.integers(0, 50))
    def repay(self, pick: int) -> None:
        if not self.loans:
            return
        loan_id, token = self.loans[pick % len(self.loans)]
        status, body = self.server.call("POST", "/v1/forge/repay", token, {"loan_id": loan_id})
        assert status in (200, 400, 402, 403), body

    @rule()
    def wait_for_purchases(self) -> None:
        for purchase in self.purchases:
            purchase.thread.join(120)
        self.settled()

    # -- invariants ----------------------------------------------------------------------

    def settled(self) -> None:
        """Once no buyer is talking to the node, every session ends and nothing stays held."""
        deadline = time.monotonic() + SETTLE_WAIT_S
        while self.node.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.node.in_flight == 0, "a session outlived its request"
        assert self.node.wallet.holds() == {}, "a reservation outlived its request"
        self.paid_exactly_once()

    def paid_exactly_once(self) -> None:
        self.reader.refresh()
        trades: dict[str, list[dict[str, Any]]] = {}
        for entry in self.reader.iter_entries():
            if entry.kind == "trade":
                terms = entry.data["terms"]
                trades.setdefault(terms["request_sha256"], []).append(terms)
        for purchase in self.purchases:
            if not purchase.done:
                continue
            found = trades.get(purchase.request_sha256, [])
            if purchase.status != 200:
                assert not found, "a refused request was charged"
                continue
            if purchase.cut:  # paid for what was produced, at least what was delivered
                if purchase.pieces:
                    assert len(found) == 1 and found[0]["completion_tokens"] >= 1
                continue
            if not purchase.tokens:
                assert not found
                continue
            assert len(found) == 1, f"{len(found)} trades for one delivered reply"
            assert found[0]["completion_tokens"] == purchase.tokens
            assert found[0]["consumer"] == purchase.account

    @invariant()
    def available_is_never_negative(self) -> None:
        for account, _ in self.accounts:
            assert self.node.wallet.available(account) >= 0

    @invariant()
    def conserved(self) -> None:
        self.reader.refresh()
        for entry in self.reader.iter_entries(self.applied):
            self.state.apply(entry.fields)
            self.applied = entry.seq + 1
        supply = self.state.supply()
        assert self.state.held() == supply["granted"] - supply["burned"]
        assert min(self.state.balances().values(), default=0) >= 0

    @invariant()
    def finished_purchases_are_paid_once(self) -> None:
        if all(p.done for p in self.purchases):
            self.settled()


def test_hostile_buyers_cannot_overdraw_leak_or_get_tokens_free(server: Server) -> None:
    HostileBuyers.server = server
    run = HostileBuyers.TestCase
    run.settings = settings(max_examples=25, stateful_step_count=20, deadline=None,
                            suppress_health_check=list(HealthCheck))
    run().runTest()
