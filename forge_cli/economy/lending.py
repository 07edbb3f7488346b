"""The lending pool (DESIGN §4): deposits for shares, collateralised loans, repayment, default.

Every operation is one ledger entry (`deposit`, `withdraw`, `borrow`, `repay`, `default`) and
the pool, shares, loans and escrow are views folded from them, so nothing here holds state
but the clock. The fold (`ledger.views`) enforces what keeps CU conserved; this module adds
the pool's policy, each refusal a `LendingDenied` naming its gate:

    credit ≥ 2000 bp · principal ≤ 3 × collateral · term ≤ 168 h · principal ≤ 20 % of the
    pool's value · ≥ 30 % of the value left in cash · ≤ 10 new loans a minute · no new loans
    while > 10 % of the loans closed in the last hour defaulted · withdrawals ≤ cash

Integer arithmetic, rounded in the pool's favour: interest = ceil(principal × rate_ppm ×
hours / 1e6) with every started hour counted (at least one); rate_ppm = 1000 + ceil((10000 −
credit_bp) / 2); shares minted = floor(cu × shares / value); CU redeemed = floor(shares ×
value / shares_total); default burn = ceil(collateral / 10). Value = cash + principal lent.

Every write first passes the safety gates as a zero-CU spend (kill switch, breaker), and the
CU leaving the caller's balance (deposit, collateral, repayment) then passes them in full.
Overdue loans are defaulted by `sweep`, which the node runs on a timer and before every
lending request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forge_cli.economy import credit as credit_score
from forge_cli.errors import LendingDenied, UsageError
from forge_cli.ledger import entries, queries, views
from forge_cli.ledger.entries import HOUR_MS
from forge_cli.ledger.store import Draft, Ledger

if TYPE_CHECKING:
    from forge_cli.trade.wallet import Wallet

MINUTE_MS = 60_000
LOAN_FIELDS = ("loan_id", "account", "principal", "collateral", "rate_ppm", "start_ms", "due_ms",
               "status", "interest", "closed_ms")


@dataclass(frozen=True)
class Rules:
    min_credit_bp: int = 2_000
    max_pool_share_pct: int = 20
    min_reserve_pct: int = 30
    max_loans_per_minute: int = 10
    max_default_pct: int = 10


def _cu(n: int) -> str:
    return f"{n:,} CU"


class Lending:
    """The pool over one open writer Ledger. Not thread-safe: the node calls it on its ledger
    thread only. `safety` is an `economy.safety.Safety` (or None in pure ledger tests)."""

    def __init__(self, ledger: Ledger, safety: Any, *, clock: Callable[[], int],
                 wallet: Wallet, host: str | None = None, rules: Rules = Rules()) -> None:
        self.ledger = ledger
        self.safety = safety
        self.wallet = wallet  # CU held by purchases in flight is not there to lend
        self.clock = clock
        self.host = host
        self.rules = rules

    # -- reading ---------------------------------------------------------------------------

    def _pool_row(self) -> tuple[int, int, int]:
        row = self.ledger.row(views.POOL, views.POOL_KEY)
        return (row[0], row[1], row[2]) if row else (0, 0, 0)

    def pool(self, account: str | None = None) -> dict[str, Any]:
        cash, lent, shares = self._pool_row()
        out: dict[str, Any] = {"cash": cash, "lent": lent, "value": cash + lent, "shares": shares,
                               "reserve_pct": self.rules.min_reserve_pct,
                               "max_loan_pct": self.rules.max_pool_share_pct}
        out["open_loans"] = queries.open_loan_count(self.ledger)
        if account is not None:
            held, deposited, withdrawn = self.ledger.row(views.LENDERS, (account,)) or (0, 0, 0)
            worth = views.cu_for_shares(held, cash, lent, shares)
            out["lender"] = {"account": account, "shares": held, "value": worth,
                             "deposited": deposited, "withdrawn": withdrawn,
                             "gain": withdrawn + worth - deposited}
        return out

    def loan(self, loan_id: int) -> dict[str, Any]:
        row = self.ledger.row(views.LOANS, (loan_id,))
        if row is None:
            raise UsageError(f"no loan {loan_id}", hint="see `forge loan list`")
        return self._loan(loan_id, row)

    def _loan(self, loan_id: int, row: tuple[Any, ...]) -> dict[str, Any]:
        loan = dict(zip(LOAN_FIELDS, (loan_id, *row)))
        if loan["status"] == "open":
            now = self.clock()
            loan["owed_now"] = loan["principal"] + entries.interest_cu(
                loan["principal"], loan["rate_ppm"], loan["start_ms"], now)
        return loan

    def loans(self, account: str | None = None) -> list[dict[str, Any]]:
        rows = queries.loans(self.ledger, account)
        return [self._loan(row[0], row[1:]) for row in rows]

    def credit(self, account: str) -> dict[str, Any]:
        info = credit_score.credit(self.ledger, account, self.clock(), self.host)
        info["rate_ppm"] = entries.rate_ppm(info["credit_bp"])
        info["min_credit_bp"] = self.rules.min_credit_bp
        return info

    # -- default ---------------------------------------------------------------------------

    def sweep(self) -> list[int]:
        """Default every open loan past its due time; returns their loan ids."""
        now = self.clock()
        rows = queries.overdue_loans(self.ledger, now)
        if not rows:
            return []
        self.ledger.append_many([
            Draft("default", {"loan_id": loan_id, "account": account,
                              "burn": entries.default_burn(collateral)}, parent=loan_id, ts=now)
            for loan_id, account, collateral in rows])
        return [row[0] for row in rows]

    def heartbeat(self, account: str) -> int:
        return self.ledger.append("heartbeat", {"account": account}, ts=self.clock()).seq

    # -- writing ---------------------------------------------------------------------------

    def _gate(self, account: str, cu: int) -> None:
        if self.safety is not None:
            self.safety.check(account, cu)

    def _funds(self, account: str, cu: int, what: str) -> None:
        self.wallet.check_available(account, cu, f"the {_cu(cu)} {what}")

    @staticmethod
    def _amount(value: Any, name: str) -> int:
        if type(value) is not int or value <= 0:
            raise UsageError(f"{name} must be a positive integer, found {value!r}")
        return value

    def deposit(self, account: str, cu: int) -> dict[str, Any]:
        """Put `cu` into the pool for shares at the pool's current value."""
        cu = self._amount(cu, "amount")
        self.sweep()
        self._gate(account, 0)
        self._funds(account, cu, "deposit")
        cash, lent, shares = self._pool_row()
        minted = views.shares_for_deposit(cu, cash, lent, shares)
        if minted == 0:
            raise UsageError(f"a deposit of {_cu(cu)} buys no whole share at the pool's value of "
                             f"{_cu(cash + lent)} for {shares:,} shares")
        self._gate(account, cu)
        entry = self.ledger.append("deposit", {"account": account, "cu": cu, "shares": minted},
                                   ts=self.clock())
        return {"seq": entry.seq, "cu": cu, "shares": minted, "pool": self.pool(account)}

    def withdraw(self, account: str, *, shares: int | None = None,
                 amount: int | None = None) -> dict[str, Any]:
        """Redeem `shares`, or as many shares as it takes to get at least `amount` CU."""
        if (shares is None) == (amount is None):
            raise UsageError("give exactly one of shares or amount")
        self.sweep()
        self._gate(account, 0)
        held = (self.ledger.row(views.LENDERS, (account,)) or (0,))[0]
        cash, lent, total = self._pool_row()
        if amount is not None:
            amount = self._amount(amount, "amount")
            value = cash + lent
            shares = -(-amount * total // value) if value else held + 1
        shares = self._amount(shares, "shares")
        if shares > held:
            raise UsageError(f"{account[:16]}… holds {held:,} shares, fewer than the {shares:,} "
                             "asked for")
        cu = views.cu_for_shares(shares, cash, lent, total)
        if cu > cash:
            raise LendingDenied(
                f"liquidity: {shares:,} shares are worth {_cu(cu)} but the pool holds "
                f"{_cu(cash)} in cash ({_cu(lent)} is lent out)", gate="liquidity",
                hint="withdraw less, or wait for loans to be repaid")
        entry = self.ledger.append("withdraw", {"account": account, "cu": cu, "shares": shares},
                                   ts=self.clock())
        return {"seq": entry.seq, "cu": cu, "shares": shares, "pool": self.pool(account)}

    def borrow(self, account: str, principal: int, term_hours: int,
               collateral: int) -> dict[str, Any]:
        """Borrow from the pool against collateral put into escrow; returns the loan."""
        principal = self._amount(principal, "amount")
        term_hours = self._amount(term_hours, "term_hours")
        collateral = self._amount(collateral, "collateral")
        self.sweep()
        self._gate(account, 0)
        now = self.clock()
        r = self.rules
        closed, defaulted = queries.loans_closed_since(self.ledger, now - HOUR_MS)
        if defaulted * 100 > r.max_default_pct * closed:
            raise LendingDenied(
                f"default halt: {defaulted} of the {closed} loans closed in the last hour "
                f"defaulted (more than {r.max_default_pct} %); lending is halted",
                gate="default_halt", hint="new loans resume once the last hour looks better")
        recent = queries.loans_started_since(self.ledger, now - MINUTE_MS)
        if recent >= r.max_loans_per_minute:
            raise LendingDenied(f"rate limit: {recent} loans were made in the last minute (at "
                                f"most {r.max_loans_per_minute})", gate="rate_limit",
                                hint="retry in a minute")
        score = self.credit(account)["credit_bp"]
        if score < r.min_credit_bp:
            raise LendingDenied(f"credit: score {score} bp is below the {r.min_credit_bp} bp a "
                                "loan needs", gate="credit", hint="see `forge loan credit`")
        if term_hours > entries.MAX_TERM_HOURS:
            raise LendingDenied(f"term: {term_hours} h is longer than the "
                                f"{entries.MAX_TERM_HOURS} h limit", gate="term")
        if principal > entries.MAX_LEVERAGE * collateral:
            raise LendingDenied(
                f"collateral ratio: {_cu(principal)} is more than {entries.MAX_LEVERAGE} × the "
                f"{_cu(collateral)} collateral", gate="collateral_ratio",
                hint=f"post at least {_cu(-(-principal // entries.MAX_LEVERAGE))} of collateral")
        cash, lent, _ = self._pool_row()
        value = cash + lent
        if principal * 100 > r.max_pool_share_pct * value:
            raise LendingDenied(
                f"pool share: {_cu(principal)} is more than {r.max_pool_share_pct} % of the pool's "
                f"value of {_cu(value)}", gate="pool_share")
        if (cash - principal) * 100 < r.min_reserve_pct * value:
            raise LendingDenied(
                f"reserve: lending {_cu(principal)} would leave {_cu(cash - principal)} in cash, "
                f"below {r.min_reserve_pct} % of the pool's value of {_cu(value)}", gate="reserve")
        self._funds(account, collateral, "collateral")
        self._gate(account, collateral)
        entry = self.ledger.append("borrow", {
            "account": account, "principal": principal, "collateral": collateral,
            "term_hours": term_hours, "credit_bp": score, "rate_ppm": entries.rate_ppm(score),
        }, ts=now)
        return self.loan(entry.seq)

    def repay(self, account: str, loan_id: int) -> dict[str, Any]:
        """Pay back principal + interest; the collateral comes back out of escrow."""
        if type(loan_id) is not int or loan_id < 0:
            raise UsageError(f"loan_id must be a non-negative integer, found {loan_id!r}")
        self.sweep()
        self._gate(account, 0)
        loan = self.loan(loan_id)
        if loan["account"] != account:
            raise UsageError(f"loan {loan_id} is not yours")
        if loan["status"] != "open":
            raise UsageError(f"loan {loan_id} is already {loan['status']}")
        now = self.clock()
        interest = entries.interest_cu(loan["principal"], loan["rate_ppm"], loan["start_ms"], now)
        owed = loan["principal"] + interest
        # The collateral comes back in the same entry, so it counts towards paying.
        self._funds(account, owed - loan["collateral"], "still owed after the collateral returns")
        self._gate(account, owed)
        entry = self.ledger.append("repay", {"account": account, "loan_id": loan_id,
                                             "interest": interest}, parent=loan_id, ts=now)
        return {**self.loan(loan_id), "seq": entry.seq, "paid": owed}
