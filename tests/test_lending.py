"""The lending pool on a real ledger file with an injected clock: interest, default, shares."""

from __future__ import annotations

import pytest

from forge_cli.errors import KillSwitchActive, LendingDenied, UsageError
from forge_cli.ledger import entries, verify, views
from forge_cli.ledger.store import Ledger
from tests.lending_helpers import Clock, fund, open_pool


@pytest.fixture
def pool(tmp_path):
    clock = Clock()
    ledger, lending, owner = open_pool(tmp_path / "ledger.db", clock)
    yield ledger, lending, clock
    ledger.close()


def conserved(ledger: Ledger) -> None:
    report = verify.verify(ledger, deep=True)
    assert report.ok, [str(f) for f in report.findings]


def test_rate_and_interest_are_integers_rounded_for_the_pool():
    assert entries.rate_ppm(10_000) == 1_000 and entries.rate_ppm(2_000) == 5_000
    assert entries.rate_ppm(2_001) == 5_000  # (10000 − 2001) / 2 = 3999.5 rounds up
    # 1000 CU at 5000 ppm/h for 3 started hours: 15 CU exactly; 1 ms into the 4th hour: 20.
    h = entries.HOUR_MS
    assert entries.interest_cu(1000, 5000, 0, 3 * h) == 15
    assert entries.interest_cu(1000, 5000, 0, 3 * h + 1) == 20
    assert entries.interest_cu(1000, 5000, 0, 0) == 5  # at least one hour
    assert entries.interest_cu(7, 5000, 0, h) == 1  # 0.035 CU rounds up to 1
    assert entries.default_burn(100) == 10 and entries.default_burn(101) == 11


def test_borrow_then_repay_after_three_hours_pays_exact_interest_and_lender_gains(pool):
    ledger, lending, clock = pool
    lender, borrower = fund(ledger, clock, 5000), fund(ledger, clock, 1000)
    lending.deposit(lender, 5000)
    loan = lending.borrow(borrower, 1000, 24, 400)
    assert loan["rate_ppm"] == 5000 and loan["status"] == "open"  # new account: credit 2000 bp
    assert ledger.balance(borrower) == 1000 - 400 + 1000
    assert ledger.row(views.ESCROW, (borrower,)) == (400,)
    clock.advance(hours=3)
    done = lending.repay(borrower, loan["loan_id"])
    assert done["interest"] == 15 and done["paid"] == 1015 and done["status"] == "repaid"
    assert ledger.balance(borrower) == 1000 - 15
    assert ledger.row(views.ESCROW, (borrower,)) == (0,)
    info = lending.pool(lender)
    assert info["cash"] == 5015 and info["lent"] == 0 and info["lender"]["gain"] == 15
    out = lending.withdraw(lender, shares=info["lender"]["shares"])
    assert out["cu"] == 5015 and ledger.balance(lender) == 5015
    conserved(ledger)


def test_overdue_loan_defaults_on_sweep_burning_ten_percent_of_collateral(pool):
    ledger, lending, clock = pool
    lender, borrower = fund(ledger, clock, 5000), fund(ledger, clock, 1000)
    lending.deposit(lender, 5000)
    loan = lending.borrow(borrower, 900, 2, 300)
    clock.advance(hours=2)
    assert lending.sweep() == []  # due, not yet past due
    clock.advance(ms=1)
    assert lending.sweep() == [loan["loan_id"]]
    assert lending.loan(loan["loan_id"])["status"] == "defaulted"
    assert ledger.row(views.SUPPLY, ("burned",)) == (30,)
    cash, lent, _ = ledger.row(views.POOL, views.POOL_KEY)
    assert (cash, lent) == (5000 - 900 + 270, 0)
    assert ledger.balance(borrower) == 1000 - 300 + 900  # keeps the principal, loses collateral
    info = lending.credit(borrower)
    assert info["inputs"]["defaulted"] == 1 and info["reputation"] == 3000
    assert info["components"]["repayment"] == 3333
    with pytest.raises(UsageError, match="defaulted"):
        lending.repay(borrower, loan["loan_id"])
    conserved(ledger)


def test_credit_gate_refuses_a_borrower_with_a_default(pool):
    ledger, lending, clock = pool
    lender, borrower = fund(ledger, clock, 5000), fund(ledger, clock, 1000)
    lending.deposit(lender, 5000)
    lending.borrow(borrower, 300, 1, 100)
    clock.advance(hours=2)
    lending.sweep()
    clock.advance(hours=2)  # leave the default-halt window
    with pytest.raises(LendingDenied) as err:
        lending.borrow(borrower, 100, 1, 100)
    assert err.value.gate == "credit"


def test_every_borrow_rule_has_its_own_gate(pool):
    ledger, lending, clock = pool
    lender, b = fund(ledger, clock, 1000), fund(ledger, clock, 5000)
    lending.deposit(lender, 1000)

    def gate(*args):
        with pytest.raises(LendingDenied) as err:
            lending.borrow(b, *args)
        return err.value.gate

    assert gate(100, 169, 100) == "term"
    assert gate(100, 1, 33) == "collateral_ratio"
    assert gate(201, 1, 100) == "pool_share"
    for _ in range(3):
        lending.borrow(b, 200, 1, 100)
    assert gate(200, 1, 100) == "reserve"  # 400 cash − 200 < 30 % of 1000
    for _ in range(7):
        lending.borrow(b, 10, 1, 10)
    assert gate(10, 1, 10) == "rate_limit"
    clock.advance(minutes=1)
    lending.borrow(b, 10, 1, 10)


def test_default_halt_and_kill_switch(pool):
    ledger, lending, clock = pool
    lender, b = fund(ledger, clock, 5000), fund(ledger, clock, 5000)
    lending.deposit(lender, 5000)
    lending.borrow(b, 100, 1, 100)
    clock.advance(hours=1, ms=1)
    other = fund(ledger, clock, 1000)
    with pytest.raises(LendingDenied) as err:
        lending.borrow(other, 100, 1, 100)  # the sweep defaults b's loan first
    assert err.value.gate == "default_halt"
    lending.safety.kill("drill")
    for call in (lambda: lending.deposit(lender, 10), lambda: lending.withdraw(lender, shares=1),
                 lambda: lending.borrow(other, 10, 1, 10), lambda: lending.repay(other, 0)):
        with pytest.raises(KillSwitchActive):
            call()


def test_withdraw_beyond_cash_is_a_liquidity_denial(pool):
    ledger, lending, clock = pool
    lender, b = fund(ledger, clock, 1000), fund(ledger, clock, 1000)
    lending.deposit(lender, 1000)
    lending.borrow(b, 200, 1, 100)
    with pytest.raises(LendingDenied) as err:
        lending.withdraw(lender, amount=1000)
    assert err.value.gate == "liquidity"
    out = lending.withdraw(lender, amount=800)
    assert out["cu"] == 800
