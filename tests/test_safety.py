"""Safety gates on a real ledger file with real keys and an injected clock (no sleeping)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from forge_cli import errors
from forge_cli.economy.safety import GATES, HOUR_MS, MINUTE_MS, Policy, Safety
from forge_cli.errors import (
    ApprovalRequired,
    BreakerOpen,
    BudgetExceeded,
    EntryRejected,
    KillSwitchActive,
    SpendCapExceeded,
    SpendDenied,
    UsageError,
)
from forge_cli.identity import Identity, load_or_create
from forge_cli.ledger import views
from forge_cli.ledger.store import Ledger
from forge_cli.ledger.verify import verify
from tests.ledger_factory import signed_trade

T0 = 1_800_000_000_000
LOOSE = Policy(per_request_cap_cu=10_000, hourly_budget_cu=100_000, lifetime_budget_cu=1_000_000,
               approval_threshold_cu=5_000)


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class World:
    """A node's ledger, an agent with CU, and a clock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.node = Identity.generate()
        self.agent = Identity.generate()
        self.clock = Clock()
        self.book = Ledger.open_writer(path, self.node)
        self.book.append("grant", {"account": self.agent.node_id, "cu": 1_000_000}, ts=self.clock())

    @property
    def account(self) -> str:
        return self.agent.node_id

    def safety(self, defaults: Policy = LOOSE, **kwargs) -> Safety:
        return Safety(self.book, clock=self.clock, defaults=defaults, **kwargs)

    def trade(self, cu: int) -> None:
        """A real dual-signed trade of `cu` CU (1 CU per token), stamped with the clock."""
        self.book.append("trade", signed_trade(self.node, self.agent, tokens=cu), ts=self.clock())

    def spend(self, safety: Safety, cu: int) -> None:
        safety.check(self.account, cu)
        self.trade(cu)
        safety.record_spend(self.account, cu)
        safety.record_outcome(self.account, True)

    def reopen(self) -> None:
        self.book.close()
        self.book = Ledger.open_writer(self.path, self.node)


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path / "ledger.db")
    yield w
    report = verify(w.book, deep=True)
    w.book.close()
    assert report.ok, report.findings  # every test's ledger still verifies deeply


# -- errors ---------------------------------------------------------------------------------


def test_each_denial_has_its_gate_status_and_exit_code():
    table = [
        (errors.InsufficientCU("x"), "balance", 402),
        (errors.KillSwitchActive("x"), "kill_switch", 423),
        (errors.SpendCapExceeded("x"), "per_request_cap", 403),
        (errors.BreakerOpen("x"), "circuit_breaker", 403),
        (errors.BudgetExceeded("x", gate="lifetime_budget"), "lifetime_budget", 403),
        (errors.ApprovalRequired("x", approval_id="apr_1"), "approval", 202),
    ]
    for exc, gate, status in table:
        assert isinstance(exc, SpendDenied)
        assert (exc.gate, exc.http_status, exc.exit_code) == (gate, status, 1)
    assert errors.ApprovalRequired("x", approval_id="apr_1").approval_id == "apr_1"
    assert errors.SelfTrade("x").http_status == 403 and isinstance(errors.SelfTrade("x"), UsageError)
    assert errors.ForgeError("x").http_status == 400 and errors.UsageError("x").http_status == 400
    assert errors.StorageError("x").http_status == 500 and errors.LedgerError("x").http_status == 500
    assert errors.ModelError("x").http_status == 503 and errors.EngineBusy("x").http_status == 429


# -- one test per gate ----------------------------------------------------------------------


def test_kill_switch_denies_every_spend_with_423_until_resumed(world):
    safety = world.safety()
    safety.kill("runaway agent")
    for cu in (0, 1, 9_999):
        with pytest.raises(KillSwitchActive) as denied:
            safety.check(world.account, cu)
    assert denied.value.gate == "kill_switch" and denied.value.http_status == 423
    assert "kill switch" in str(denied.value) and "runaway agent" in str(denied.value)
    safety.resume("fixed")
    safety.check(world.account, 1)


def test_per_request_cap_denies_a_spend_above_it(world):
    safety = world.safety(Policy(per_request_cap_cu=500, hourly_budget_cu=10_000,
                                 lifetime_budget_cu=100_000, approval_threshold_cu=400))
    safety.check(world.account, 400)
    with pytest.raises(SpendCapExceeded) as denied:
        safety.check(world.account, 501)
    assert denied.value.gate == "per_request_cap" and denied.value.http_status == 403
    assert str(denied.value).startswith("per-request cap: 501 CU quoted exceeds the cap of 500 CU")


def test_breaker_opens_on_five_consecutive_errors_and_closes_after_five_minutes(world):
    safety = world.safety()
    for _ in range(4):
        safety.record_outcome(world.account, False)
    safety.check(world.account, 1)  # four is not enough
    safety.record_outcome(world.account, True)  # a success resets the run
    for _ in range(4):
        safety.record_outcome(world.account, False)
    safety.check(world.account, 1)
    safety.record_outcome(world.account, False)
    with pytest.raises(BreakerOpen) as denied:
        safety.check(world.account, 1)
    assert denied.value.gate == "circuit_breaker" and "5 consecutive failed requests" in str(denied.value)
    assert safety.status(world.account)["account_breaker"]["state"] == "open"
    assert safety.status()["breaker"]["state"] == "closed"  # one account is not the node
    world.clock.advance(5 * MINUTE_MS - 1)
    with pytest.raises(BreakerOpen):
        safety.check(world.account, 1)
    world.clock.advance(1)
    safety.check(world.account, 1)
    assert safety.status(world.account)["account_breaker"]["state"] == "closed"


def test_one_accounts_failures_and_spends_never_lock_out_another(world):
    safety = world.safety()
    other = "b" * 64
    for _ in range(10):
        safety.record_outcome(world.account, False)
    for _ in range(40):
        safety.record_spend(world.account, 1)
    with pytest.raises(BreakerOpen):
        safety.check(world.account, 1)
    safety.check(other, 1)  # the other account's breaker and the node's stay closed
    assert safety.status()["breaker"]["state"] == "closed"
    assert not safety.breaker_is_open() and safety.breaker_is_open(world.account)


def test_the_node_breaker_opens_on_consecutive_failures_from_two_accounts(world):
    safety = world.safety()
    accounts = [world.account, "b" * 64]
    for i in range(5):
        safety.record_outcome(accounts[i % 2], False)
    with pytest.raises(BreakerOpen) as denied:
        safety.check("c" * 64, 1)  # a third account: the node itself is failing
    assert "from 2 accounts" in str(denied.value)
    assert safety.status()["breaker"]["state"] == "open"


def test_breaker_opens_on_31_spends_in_a_minute(world):
    safety = world.safety()
    for _ in range(30):
        world.spend(safety, 1)
        world.clock.advance(1_000)
    safety.check(world.account, 1)  # 30 spends in a minute is the limit, not over it
    world.trade(1)
    safety.record_spend(world.account, 1)
    with pytest.raises(BreakerOpen) as denied:
        safety.check(world.account, 1)
    assert "31 spends in the last minute" in str(denied.value)
    world.clock.advance(5 * MINUTE_MS)
    safety.check(world.account, 1)


def test_spends_spread_over_more_than_a_minute_do_not_trip_the_breaker(world):
    safety = world.safety()
    for _ in range(60):
        world.spend(safety, 1)
        world.clock.advance(2_001)  # 30 per minute at most
    safety.check(world.account, 1)


def test_hourly_budget_counts_the_last_hour_and_slides_with_the_clock(world):
    safety = world.safety(Policy(per_request_cap_cu=5_000, hourly_budget_cu=5_000,
                                 lifetime_budget_cu=1_000_000, approval_threshold_cu=5_000))
    world.spend(safety, 3_000)
    world.clock.advance(30 * MINUTE_MS)
    world.spend(safety, 1_200)
    with pytest.raises(BudgetExceeded) as denied:
        safety.check(world.account, 900)
    assert denied.value.gate == "hourly_budget" and denied.value.http_status == 403
    assert str(denied.value) == ("hourly budget: 4,200 CU spent in the last hour + 900 CU quoted "
                                 "exceeds 5,000 CU")
    safety.check(world.account, 800)  # exactly at the budget is allowed
    world.clock.advance(30 * MINUTE_MS)  # the 3,000 CU spend is now an hour old
    safety.check(world.account, 3_800)
    assert safety.status(world.account)["spent_last_hour_cu"] == 1_200


def test_hourly_window_is_rebuilt_from_the_ledger_on_restart(world):
    safety = world.safety()
    world.spend(safety, 2_000)  # will be older than an hour
    world.clock.advance(HOUR_MS - MINUTE_MS)
    world.spend(safety, 4_000)
    world.clock.advance(2 * MINUTE_MS)
    world.reopen()
    again = world.safety(Policy(per_request_cap_cu=5_000, hourly_budget_cu=5_000,
                                lifetime_budget_cu=1_000_000, approval_threshold_cu=5_000))
    assert again.status(world.account)["spent_last_hour_cu"] == 4_000
    with pytest.raises(BudgetExceeded):
        again.check(world.account, 1_001)
    again.check(world.account, 1_000)


def test_lifetime_budget_uses_every_trade_ever(world):
    safety = world.safety(Policy(per_request_cap_cu=5_000, hourly_budget_cu=5_000,
                                 lifetime_budget_cu=6_000, approval_threshold_cu=5_000))
    for _ in range(3):
        world.spend(safety, 1_800)
        world.clock.advance(2 * HOUR_MS)
    with pytest.raises(BudgetExceeded) as denied:
        safety.check(world.account, 601)
    assert denied.value.gate == "lifetime_budget"
    assert str(denied.value) == "lifetime budget: 5,400 CU spent + 601 CU quoted exceeds 6,000 CU"
    assert world.book.row(views.TRADE_TOTALS, (world.account,)) == (5_400, 0, 0)
    safety.check(world.account, 600)


def test_approval_request_then_approve_then_the_retry_passes_once(world):
    safety = world.safety(Policy(per_request_cap_cu=1_000, hourly_budget_cu=100_000,
                                 lifetime_budget_cu=1_000_000, approval_threshold_cu=100))
    safety.check(world.account, 100)  # at the threshold: no approval needed
    with pytest.raises(ApprovalRequired) as asked:
        safety.check(world.account, 300)
    first = asked.value
    assert first.gate == "approval" and first.http_status == 202 and first.approval_id
    assert first.approval_id in str(first) and "300 CU" in str(first) and "100 CU" in str(first)
    assert [a["id"] for a in safety.pending()] == [first.approval_id]
    with pytest.raises(ApprovalRequired) as again:  # asking again does not make a second request
        safety.check(world.account, 300)
    assert again.value.approval_id == first.approval_id
    approved = safety.approve(first.approval_id)
    assert approved["status"] == "approved" and safety.pending() == []
    safety.check(world.account, 250)  # up to the approved amount, once
    with pytest.raises(ApprovalRequired) as next_one:
        safety.check(world.account, 300)
    assert next_one.value.approval_id != first.approval_id
    statuses = [e.data["status"] for e in world.book.iter_entries(kind="approval")
                if e.data["id"] == first.approval_id]
    assert statuses == ["requested", "approved", "used"]


def test_approving_twice_or_a_denied_request_is_refused(world):
    safety = world.safety(Policy(per_request_cap_cu=1_000, hourly_budget_cu=100_000,
                                 lifetime_budget_cu=1_000_000, approval_threshold_cu=100))
    with pytest.raises(ApprovalRequired) as asked:
        safety.check(world.account, 200)
    approval_id = asked.value.approval_id
    safety.approve(approval_id)
    with pytest.raises(UsageError, match="already approved"):
        safety.approve(approval_id)
    with pytest.raises(EntryRejected, match="only a requested approval can become approved"):
        world.book.append("approval", {"id": approval_id, "account": world.account, "cu": 200,
                                       "status": "approved"}, ts=world.clock())
    with pytest.raises(ApprovalRequired) as other:
        safety.check(world.account, 900)  # above what was approved: a new request
    safety.deny(other.value.approval_id)
    with pytest.raises(UsageError, match="already denied"):
        safety.approve(other.value.approval_id)
    with pytest.raises(ApprovalRequired) as retry:
        safety.check(world.account, 900)  # denied is not approved
    assert retry.value.approval_id != other.value.approval_id


def test_an_approval_request_expires(world):
    safety = world.safety(Policy(per_request_cap_cu=1_000, hourly_budget_cu=100_000,
                                 lifetime_budget_cu=1_000_000, approval_threshold_cu=100),
                          approval_ttl_ms=10 * MINUTE_MS)
    with pytest.raises(ApprovalRequired) as asked:
        safety.check(world.account, 200)
    world.clock.advance(10 * MINUTE_MS + 1)
    assert safety.pending() == []
    with pytest.raises(UsageError, match="expired"):
        safety.approve(asked.value.approval_id)
    assert world.book.row(views.APPROVALS, (asked.value.approval_id,))[2] == "expired"
    with pytest.raises(ApprovalRequired) as fresh:
        safety.check(world.account, 200)
    assert fresh.value.approval_id != asked.value.approval_id


def test_the_fold_enforces_approval_transitions_and_times(world):
    acct, now = world.account, world.clock()
    book = world.book
    request = {"id": "apr-x", "account": acct, "cu": 10}
    with pytest.raises(EntryRejected, match="never requested"):
        book.append("approval", {**request, "status": "approved"}, ts=now)
    book.append("approval", {**request, "status": "requested", "expires_ms": now + 1000}, ts=now)
    with pytest.raises(EntryRejected, match="already requested"):
        book.append("approval", {**request, "status": "requested", "expires_ms": now + 5}, ts=now)
    with pytest.raises(EntryRejected, match="not 11 CU"):
        book.append("approval", {**request, "cu": 11, "status": "approved"}, ts=now)
    with pytest.raises(EntryRejected, match="does not expire until"):
        book.append("approval", {**request, "status": "expired"}, ts=now + 999)
    with pytest.raises(EntryRejected, match="expired at"):
        book.append("approval", {**request, "status": "approved"}, ts=now + 1001)
    with pytest.raises(EntryRejected, match="only a approved approval can become used"):
        book.append("approval", {**request, "status": "used"}, ts=now)
    book.append("approval", {**request, "status": "denied"}, ts=now + 10)


@pytest.mark.parametrize(("kind", "data", "reason"), [
    ("kill", {"active": 1, "reason": ""}, "true or false"),
    ("kill", {"active": True}, "missing keys"),
    ("policy", {"account": "nobody", "per_request_cap_cu": 1, "hourly_budget_cu": 1,
                "lifetime_budget_cu": 1, "approval_threshold_cu": 1}, "or '*'"),
    ("policy", {"account": "*", "per_request_cap_cu": 0, "hourly_budget_cu": 1,
                "lifetime_budget_cu": 1, "approval_threshold_cu": 1}, "positive integer"),
    ("policy", {"account": "*", "per_request_cap_cu": 1}, "missing keys"),
    ("approval", {"id": "a", "account": "ab" * 32, "cu": 1, "status": "maybe"}, "status must be"),
    ("approval", {"id": "a b", "account": "ab" * 32, "cu": 1, "status": "denied"}, "data.id"),
    ("approval", {"id": "a", "account": "ab" * 32, "cu": 1, "status": "requested"}, "missing keys"),
    ("approval", {"id": "a", "account": "ab" * 32, "cu": 1, "status": "approved",
                  "expires_ms": 5}, "unexpected keys"),
])
def test_safety_entries_are_checked_strictly(world, kind, data, reason):
    with pytest.raises(EntryRejected, match=reason):
        world.book.append(kind, data)


# -- order, persistence, fail-safe ----------------------------------------------------------


def test_gates_fire_in_design_order_when_several_would(world):
    safety = world.safety()
    for _ in range(3):  # 2,700 CU lifetime, 900 CU of it in the last hour
        world.spend(safety, 900)
        world.clock.advance(30 * MINUTE_MS)
    safety.set_policy("*", per_request_cap_cu=1_000, hourly_budget_cu=2_000,
                      lifetime_budget_cu=3_000, approval_threshold_cu=100)
    safety.kill("everything at once")
    for _ in range(5):
        safety.record_outcome(world.account, False)
    acct, seen = world.account, []
    big = 1_500  # over the cap, the hourly and lifetime budgets, and the approval threshold
    lift = [
        lambda: safety.resume(),
        lambda: safety.set_policy("*", per_request_cap_cu=10_000),
        lambda: world.clock.advance(5 * MINUTE_MS),
        lambda: safety.set_policy("*", hourly_budget_cu=100_000),
        lambda: safety.set_policy("*", lifetime_budget_cu=100_000),
    ]
    for step in [*lift, None]:
        with pytest.raises(SpendDenied) as denied:
            safety.check(acct, big)
        seen.append(denied.value.gate)
        if step is not None:
            step()
    assert seen == list(GATES)


def test_kill_switch_policy_and_approvals_survive_a_restart(world):
    safety = world.safety()
    safety.kill("maintenance")
    safety.set_policy(world.account, per_request_cap_cu=50, approval_threshold_cu=20)
    safety.set_policy("*", hourly_budget_cu=7_000)
    world.reopen()
    again = world.safety()
    status = again.status(world.account)
    assert status["kill_switch"]["active"] and status["kill_switch"]["reason"] == "maintenance"
    assert isinstance(status["kill_switch"]["seq"], int)
    assert status["policy"]["per_request_cap_cu"] == 50 and status["policy"]["source"] == "account"
    assert status["policy"]["hourly_budget_cu"] == LOOSE.hourly_budget_cu  # its own row, from LOOSE
    assert again.policy_for("ab" * 32) == (Policy(10_000, 7_000, 1_000_000, 5_000), "*")
    with pytest.raises(KillSwitchActive):
        again.check(world.account, 1)
    again.resume("done")
    with pytest.raises(ApprovalRequired) as asked:
        again.check(world.account, 30)
    world.reopen()
    third = world.safety()
    assert [a["id"] for a in third.pending()] == [asked.value.approval_id]
    third.approve(asked.value.approval_id)
    world.reopen()
    world.safety().check(world.account, 30)


def test_a_gate_that_cannot_decide_denies(world, tmp_path):
    safety = world.safety()
    with sqlite3.connect(world.path) as other:  # the kill switch's table vanishes under it
        other.execute("DROP TABLE kill_switch")
    with pytest.raises(SpendDenied) as denied:
        safety.check(world.account, 1)
    assert type(denied.value) is SpendDenied and denied.value.gate == "kill_switch"
    assert "could not decide" in str(denied.value)
    with sqlite3.connect(world.path) as other:
        other.execute(views.KILL_SWITCH.ddl())


def test_status_reports_everything_the_gates_use(world):
    safety = world.safety()
    world.spend(safety, 40)
    safety.record_outcome(world.account, False)
    safety.kill("look")
    status = safety.status(world.account)
    assert status["gates"] == list(GATES)
    assert status["kill_switch"]["active"] and status["kill_switch"]["reason"] == "look"
    assert status["breaker"]["state"] == "closed" and status["breaker"]["consecutive_errors"] == 1
    assert status["account_breaker"]["consecutive_errors"] == 1
    assert status["account_breaker"]["spends_last_minute"] == 1
    assert status["policy"] == {**LOOSE.to_json(), "source": "defaults"}
    assert status["spent_last_hour_cu"] == 40 and status["spent_lifetime_cu"] == 40
    assert status["pending"] == []
    json.dumps(status)  # the node serves it as JSON


def test_defaults_make_every_gate_reachable():
    d = Policy()
    assert d.approval_threshold_cu < d.per_request_cap_cu <= d.hourly_budget_cu < d.lifetime_budget_cu
    assert Policy.from_config() == d  # config.toml defaults match the class


def test_new_view_tables_are_rebuilt_by_replay_on_open(world):
    world.spend(world.safety(), 70)
    world.safety().set_policy("*", per_request_cap_cu=77)
    world.book.close()
    with sqlite3.connect(world.path) as conn:
        conn.execute("DROP TABLE trade_totals")
        conn.execute("DROP TABLE policies")
    world.book = Ledger.open_writer(world.path, world.node)
    assert world.book.row(views.TRADE_TOTALS, (world.account,)) == (70, 0, 0)
    assert world.book.row(views.POLICIES, ("*",))[0] == 77


# -- the CLI --------------------------------------------------------------------------------


def test_cli_kill_status_resume_and_policy(run_forge, forge_home):
    killed = run_forge("safety", "kill", "--reason", "demo drill")
    assert killed.returncode == 0, killed.stderr
    status = json.loads(run_forge("safety", "status", "--json").stdout)
    assert status["kill_switch"]["active"] and status["kill_switch"]["reason"] == "demo drill"
    assert "ON" in run_forge("safety", "status").stdout
    assert run_forge("safety", "resume").returncode == 0
    assert not json.loads(run_forge("safety", "status", "--json").stdout)["kill_switch"]["active"]
    assert run_forge("safety", "policy", "set", "--cap", "100", "--approval", "10").returncode == 0
    status = json.loads(run_forge("safety", "status", "--json").stdout)
    assert status["policy"]["per_request_cap_cu"] == 100 and status["policy"]["source"] == "*"
    assert status["policy"]["hourly_budget_cu"] == Policy().hourly_budget_cu
    bad = run_forge("safety", "policy", "set", "--cap", "0")
    assert bad.returncode == 2 and "--cap" in bad.stderr and "1<=x" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert json.loads(run_forge("ledger", "verify", "--deep", "--json").stdout)["valid"]


def test_cli_pending_approve_and_deny(run_forge, forge_home):
    node = load_or_create(forge_home / "node.key") if forge_home.mkdir(parents=True) is None else None
    agent = Identity.generate()
    with Ledger.open_writer(forge_home / "ledger.db", node) as book:
        safety = Safety(book, defaults=Policy(approval_threshold_cu=10))
        ids = []
        for cu in (20, 30):
            with pytest.raises(ApprovalRequired) as asked:
                safety.check(agent.node_id, cu)
            ids.append(asked.value.approval_id)
    listed = json.loads(run_forge("safety", "pending", "--json").stdout)
    assert [(a["id"], a["cu"]) for a in listed] == [(ids[0], 20), (ids[1], 30)]
    assert ids[0] in run_forge("safety", "pending").stdout
    assert run_forge("safety", "approve", ids[0]).returncode == 0
    assert run_forge("safety", "deny", ids[1]).returncode == 0
    again = run_forge("safety", "approve", ids[0])
    assert again.returncode == 2 and "already approved" in again.stderr
    assert run_forge("safety", "pending").stdout.strip() == "no approvals pending"


def test_cli_says_who_holds_the_ledger_when_no_node_url_is_known(run_forge, forge_home):
    node = load_or_create(forge_home / "node.key") if forge_home.mkdir(parents=True) is None else None
    with Ledger.open_writer(forge_home / "ledger.db", node):  # a writer that announced no URL
        result = run_forge("safety", "kill", "--reason", "x")
    assert result.returncode == 2
    assert "held by another process" in result.stderr and "FORGE_NODE" in result.stderr
    assert "Traceback" not in result.stderr
