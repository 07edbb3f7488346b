"""Every lending route on a real node: the pool, interest to the exact CU, the lender's gain,
each denial reason, and defaults (of loans made, with past timestamps, before the node started)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from forge_cli import identity
from forge_cli.ledger import entries
from forge_cli.ledger.store import Ledger
from tests.node_harness import NodeProcess

HOUR = entries.HOUR_MS
# Lending spends pass the safety gates too; raise the cap and approval threshold above the
# amounts used here (the defaults, 5,000 and 2,000 CU, would refuse a 10,000 CU deposit).
LIMITS = {"FORGE_SAFETY_PER_REQUEST_CAP_CU": "100000",
          "FORGE_SAFETY_APPROVAL_THRESHOLD_CU": "50000"}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_agents(run_forge, *names: str) -> dict[str, dict[str, str]]:
    out = {}
    for name in names:
        done = run_forge("wallet", "agent", "create", name, "--json")
        assert done.returncode == 0, done.stderr
        out[name] = json.loads(done.stdout)
    return out


def denied(result, gate: str, status: int = 403) -> dict:
    code, _, body = result
    assert code == status, body
    assert body["error"]["gate"] == gate, body
    return body


def post(node: NodeProcess, path: str, who: dict, **body: object):
    return node.request("POST", path, body=body, token=who["token"])


def get(node: NodeProcess, path: str, who: dict):
    status, _, body = node.request("GET", path, token=who["token"])
    assert status == 200, body
    return body


@pytest.fixture
def funded(forge_home: Path, run_forge, tiny_gguf: Path):
    """alice (10,000 CU) lends, bob (2,000 CU) borrows; the grants are made before the node."""
    people = make_agents(run_forge, "alice", "bob", "erin")
    with Ledger.open_writer(forge_home / "ledger.db", identity.load_or_create()) as book:
        book.append("grant", {"account": people["alice"]["account"], "cu": 10_000})
        book.append("grant", {"account": people["bob"]["account"], "cu": 2_000})
    with NodeProcess(forge_home, tiny_gguf, env=LIMITS) as node:
        yield node, people


def test_lend_borrow_repay_pays_exact_interest_and_the_lender_gains_it(funded):
    node, p = funded
    alice, bob = p["alice"], p["bob"]
    status, _, out = post(node, "/v1/forge/lend", alice, amount=10_000)
    assert status == 200 and out["shares"] == 10_000
    status, _, loan = post(node, "/v1/forge/borrow", bob, amount=2_000, term_hours=24,
                           collateral=700)
    assert status == 200, loan
    # a new account's credit: 0.3·0 + 0.4·5000 + 0.2·0 + 0.1·0 = 2000 bp → 0.1 % + 0.8 · 0.5 % = 5000 ppm
    assert loan["rate_ppm"] == 5000 and loan["principal"] == 2000 and loan["status"] == "open"
    assert loan["due_ms"] - loan["start_ms"] == 24 * HOUR
    assert get(node, "/v1/forge/balance", bob)["escrow"] == 700
    assert get(node, "/v1/forge/loans", bob)["loans"][0]["loan_id"] == loan["loan_id"]
    status, _, paid = post(node, "/v1/forge/repay", bob, loan_id=loan["loan_id"])
    assert status == 200, paid
    # repaid within the first hour: one hour of interest, ceil(2000 × 5000 / 1e6) = 10 CU
    assert paid["interest"] == 10 and paid["paid"] == 2010 and paid["status"] == "repaid"
    balance = get(node, "/v1/forge/balance", bob)
    assert balance["balance"] == 2000 - 10 and balance["escrow"] == 0
    mine = get(node, "/v1/forge/pool", alice)
    assert mine["cash"] == 10_010 and mine["lent"] == 0
    assert mine["lender"]["value"] == 10_010 and mine["lender"]["gain"] == 10
    status, _, out = post(node, "/v1/forge/withdraw", alice, shares=10_000)
    assert status == 200 and out["cu"] == 10_010
    assert get(node, "/v1/forge/balance", alice)["balance"] == 10_010
    credit = get(node, "/v1/forge/credit", bob)
    assert set(credit["components"]) == {"volume", "repayment", "uptime", "age"}
    assert credit["inputs"]["repaid"] == 1 and credit["components"]["repayment"] == 6666


def test_each_borrow_rule_refuses_with_its_gate(funded):
    node, p = funded
    alice, bob = p["alice"], p["bob"]
    assert post(node, "/v1/forge/lend", alice, amount=1_000)[0] == 200
    denied(post(node, "/v1/forge/borrow", bob, amount=100, term_hours=169, collateral=100), "term")
    denied(post(node, "/v1/forge/borrow", bob, amount=100, term_hours=1, collateral=33),
           "collateral_ratio")
    denied(post(node, "/v1/forge/borrow", bob, amount=201, term_hours=1, collateral=100),
           "pool_share")
    for _ in range(3):
        assert post(node, "/v1/forge/borrow", bob, amount=200, term_hours=1, collateral=100)[0] == 200
    denied(post(node, "/v1/forge/borrow", bob, amount=200, term_hours=1, collateral=100), "reserve")
    denied(post(node, "/v1/forge/withdraw", alice, amount=1_000), "liquidity")
    for _ in range(7):
        assert post(node, "/v1/forge/borrow", bob, amount=10, term_hours=1, collateral=10)[0] == 200
    denied(post(node, "/v1/forge/borrow", bob, amount=10, term_hours=1, collateral=10),
           "rate_limit", 429)
    status, headers, _ = post(node, "/v1/forge/borrow", p["erin"], amount=10,
                                term_hours=1, collateral=10)
    assert status == 429  # the limit is the pool's, not one borrower's
    assert int(headers["Retry-After"]) >= 1


def test_safety_gates_apply_to_lending_spends(forge_home, run_forge, tiny_gguf):
    people = make_agents(run_forge, "alice")
    with NodeProcess(forge_home, tiny_gguf) as node:  # default cap 5,000, approval above 2,000
        status, _, body = post(node, "/v1/forge/lend", people["alice"], amount=600)
        assert status == 200, body  # funded by the free tier on first use
        assert node.request("POST", "/v1/forge/policy", token=node.operator_token,
                            body={"per_request_cap_cu": 100})[0] == 200
        denied(post(node, "/v1/forge/lend", people["alice"], amount=300), "per_request_cap")


def test_kill_switch_stops_every_lending_operation(funded):
    node, p = funded
    alice, bob = p["alice"], p["bob"]
    assert post(node, "/v1/forge/lend", alice, amount=1_000)[0] == 200
    status, _, loan = post(node, "/v1/forge/borrow", bob, amount=100, term_hours=1, collateral=50)
    assert status == 200
    assert node.request("POST", "/v1/forge/kill", token=node.operator_token,
                        body={"activate": True, "reason": "drill"})[0] == 200
    for path, who, body in (("/v1/forge/lend", alice, {"amount": 10}),
                            ("/v1/forge/withdraw", alice, {"shares": 10}),
                            ("/v1/forge/borrow", bob, {"amount": 10, "term_hours": 1,
                                                       "collateral": 10}),
                            ("/v1/forge/repay", bob, {"loan_id": loan["loan_id"]})):
        denied(post(node, path, who, **body), "kill_switch", 423)


def test_bad_lending_requests_are_400s(funded):
    node, p = funded
    bob = p["bob"]
    assert post(node, "/v1/forge/lend", bob, amount=-5)[0] == 400
    assert post(node, "/v1/forge/lend", bob, amount="5")[0] == 400
    assert post(node, "/v1/forge/withdraw", bob, shares=1, amount=1)[0] == 400
    assert post(node, "/v1/forge/withdraw", bob, shares=1)[0] == 400  # holds no shares
    assert post(node, "/v1/forge/borrow", bob, amount=10)[0] == 400
    assert post(node, "/v1/forge/repay", bob, loan_id=99_999)[0] == 400
    assert node.request("GET", "/v1/forge/pool")[0] == 401


@pytest.fixture
def with_history(forge_home: Path, run_forge, tiny_gguf: Path):
    """carol defaulted 3 hours ago; dave's loan fell due 30 minutes ago and is still open."""
    people = make_agents(run_forge, "lender", "carol", "dave", "erin")
    t = now_ms()
    ids = {name: who["account"] for name, who in people.items()}
    rate = entries.rate_ppm(2000)
    with Ledger.open_writer(forge_home / "ledger.db", identity.load_or_create()) as book:
        for name in ids:
            book.append("grant", {"account": ids[name], "cu": 5_000}, ts=t - 10 * HOUR)
        book.append("deposit", {"account": ids["lender"], "cu": 5_000, "shares": 5_000},
                    ts=t - 10 * HOUR)
        carol = book.append("borrow", {"account": ids["carol"], "principal": 300, "collateral": 100,
                                       "term_hours": 1, "credit_bp": 2000, "rate_ppm": rate},
                            ts=t - 5 * HOUR)
        book.append("default", {"loan_id": carol.seq, "account": ids["carol"], "burn": 10},
                    ts=t - 3 * HOUR)
        dave = book.append("borrow", {"account": ids["dave"], "principal": 400, "collateral": 200,
                                      "term_hours": 2, "credit_bp": 2000, "rate_ppm": rate},
                           ts=t - 2 * HOUR - 30 * 60_000)
    with NodeProcess(forge_home, tiny_gguf, env=LIMITS) as node:
        yield node, people, dave.seq


def test_a_defaulted_borrower_is_refused_for_credit_then_an_overdue_loan_defaults(with_history):
    node, p, dave_loan = with_history
    carol = p["carol"]
    assert get(node, "/v1/forge/balance", carol)["reputation"] == 3000
    credit = get(node, "/v1/forge/credit", carol)  # this read also defaults dave's loan
    assert credit["components"]["repayment"] == 3333 and credit["credit_bp"] < 2000
    # dave's overdue loan defaulted on that read: collateral 200 to the pool less a 20 CU burn
    loans = get(node, "/v1/forge/loans", p["dave"])["loans"]
    assert loans[0]["loan_id"] == dave_loan and loans[0]["status"] == "defaulted"
    pool = get(node, "/v1/forge/pool", p["lender"])
    assert pool["cash"] == 5000 - 300 + 90 - 400 + 180 and pool["lent"] == 0
    assert pool["lender"]["gain"] == -430
    assert get(node, "/v1/forge/balance", p["dave"])["reputation"] == 3000
    # one of the loans closed in the last hour defaulted: no new loans for anyone
    denied(post(node, "/v1/forge/borrow", p["erin"], amount=10, term_hours=1, collateral=10),
           "default_halt")
    denied(post(node, "/v1/forge/borrow", carol, amount=10, term_hours=1, collateral=10),
           "default_halt")


def test_forge_loan_cli_goes_through_the_running_node(funded, run_forge):
    node, p = funded
    as_alice = {"FORGE_TOKEN": p["alice"]["token"]}
    as_bob = {"FORGE_TOKEN": p["bob"]["token"]}

    def forge(*args: str, env: dict[str, str]):
        done = run_forge("loan", *args, "--json", env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert forge("lend", "5000", env=as_alice)["shares"] == 5000
    loan = forge("borrow", "1000", "--term", "12", "--collateral", "400", env=as_bob)
    assert forge("list", env=as_bob)["loans"][0]["loan_id"] == loan["loan_id"]
    assert forge("credit", env=as_bob)["credit_bp"] == 2000
    assert forge("repay", str(loan["loan_id"]), env=as_bob)["interest"] == 5
    assert forge("pool", env=as_alice)["lender"]["gain"] == 5
    assert forge("withdraw", "--amount", "5005", env=as_alice)["cu"] == 5005
    refused = run_forge("loan", "borrow", "10", "--term", "200", "--collateral", "10", env=as_bob)
    assert refused.returncode == 1 and "term" in refused.stderr
    text = run_forge("loan", "pool", env=as_alice)
    assert text.returncode == 0 and "shares" in text.stdout
