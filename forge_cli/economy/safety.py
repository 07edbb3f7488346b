"""The safety gates every spend passes, in DESIGN order, and the controls that set them.

    kill switch → per-request cap → circuit breaker → hourly budget → lifetime budget → approval

Kill switch, policies and approvals are ledger entries (`kill`, `policy`, `approval`), so they
survive restarts and are audited like trades; the breaker and the hourly window live in
memory (the window is rebuilt from the last hour of trades when a Safety is made).

Defaults (config keys `safety.*`; a `policy` entry for an account or for '*' replaces them):
per-request cap 5,000 CU, hourly budget 20,000 CU, lifetime budget 200,000 CU, approval above
2,000 CU (below the cap, so every gate can fire), approval requests lapse after 15 minutes.
The breaker is one per account: it opens after 5 consecutive failed requests of that account or
more than 30 of its spends in a minute, and closes again 5 minutes after it opened. A node-wide
breaker opens on 5 consecutive failures only when they came from at least two accounts (the
node's own fault), so no single account can lock out the others. If a gate cannot decide (an
unexpected error inside it), the spend is denied and the denial names that gate.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from forge_cli.errors import (
    ApprovalRequired,
    BreakerOpen,
    BudgetExceeded,
    KillSwitchActive,
    SpendCapExceeded,
    SpendDenied,
    UsageError,
)
from forge_cli.ledger import queries, views
from forge_cli.ledger.entries import POLICY_LIMITS
from forge_cli.ledger.store import Ledger

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
GATES = ("kill_switch", "per_request_cap", "circuit_breaker", "hourly_budget", "lifetime_budget",
         "approval")
_ACCOUNT = re.compile(r"[0-9a-f]{64}")


def ms_clock() -> int:
    """Wall-clock unix milliseconds (the default clock; tests inject their own)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Policy:
    """Spending limits of an account, in CU; field names match the `policy` entry's."""

    per_request_cap_cu: int = 5_000
    hourly_budget_cu: int = 20_000
    lifetime_budget_cu: int = 200_000
    approval_threshold_cu: int = 2_000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value <= 0:
                raise UsageError(f"{f.name} must be a positive integer of CU, found {value!r}")

    @classmethod
    def from_config(cls) -> Policy:
        """The defaults as config.toml and FORGE_SAFETY_* set them."""
        from forge_cli import config

        values = config.load()
        return cls(**{name: values[f"safety.{name}"] for name in POLICY_LIMITS})

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class BreakerRules:
    max_consecutive_errors: int = 5
    max_spends_per_minute: int = 30
    reset_after_ms: int = 5 * MINUTE_MS

    @classmethod
    def from_config(cls) -> BreakerRules:
        from forge_cli import config

        values = config.load()
        return cls(values["safety.breaker_errors"], values["safety.breaker_spends_per_minute"],
                   values["safety.breaker_reset_s"] * 1000)


def _cu(n: int) -> str:
    return f"{n:,} CU"


def _short(account: str) -> str:
    return account if account == "*" else account[:16] + "…"


class Breaker:
    """One breaker's state: consecutive failures, spends in the last minute, when it opened."""

    def __init__(self) -> None:
        self.errors = 0
        self.minute: deque[int] = deque()  # ts of every spend in the last minute
        self.tripped_at: int | None = None
        self.reason = ""

    def spends(self, now: int) -> int:
        while self.minute and self.minute[0] <= now - MINUTE_MS:
            self.minute.popleft()
        return len(self.minute)

    def trip(self, now: int, reason: str) -> None:
        if self.tripped_at is None:
            self.tripped_at, self.reason = now, reason

    def is_open(self, now: int, rules: BreakerRules) -> bool:
        if self.tripped_at is not None and now >= self.tripped_at + rules.reset_after_ms:
            self.tripped_at, self.reason, self.errors = None, "", 0
            self.minute.clear()
        return self.tripped_at is not None

    def quiet(self) -> bool:
        return self.tripped_at is None and not self.errors and not self.minute

    def describe(self, now: int, rules: BreakerRules) -> dict[str, Any]:
        open_ = self.is_open(now, rules)
        return {"state": "open" if open_ else "closed", "reason": self.reason,
                "opened_ms": self.tripped_at,
                "closes_ms": None if self.tripped_at is None
                else self.tripped_at + rules.reset_after_ms,
                "consecutive_errors": self.errors, "spends_last_minute": self.spends(now)}


class Safety:
    """The gates over one open writer Ledger; thread-safe (one lock around every decision).

    The node calls `check(account, cu)` with the quoted maximum before any spend, then
    `record_spend` for what was actually spent and `record_outcome` for every request.
    """

    def __init__(self, ledger: Ledger, *, clock: Callable[[], int] = ms_clock,
                 defaults: Policy = Policy(), breaker: BreakerRules = BreakerRules(),
                 approval_ttl_ms: int = 15 * MINUTE_MS) -> None:
        self.ledger = ledger
        self.clock = clock
        self.defaults = defaults
        self.rules = breaker
        self.approval_ttl_ms = approval_ttl_ms
        self._lock = threading.RLock()
        self._hour: dict[str, deque[tuple[int, int]]] = {}  # account → (ts, cu), oldest first
        self._hour_sum: dict[str, int] = {}
        self._breakers: dict[str, Breaker] = {}  # per account
        self._node = Breaker()  # the node's own faults: failures from two accounts or more
        self._node_failing: set[str] = set()  # accounts in the node's current failure run
        self._load_recent_trades()

    # -- the hourly window -----------------------------------------------------------------

    def _load_recent_trades(self, batch: int = 1024) -> None:
        """Seed the windows with the trades of the last hour, reading back from the tail."""
        for ts, account, cu in queries.recent_trade_spends(self.ledger, self.clock() - HOUR_MS,
                                                           batch):
            self._add_spend(account, cu, ts)

    def _add_spend(self, account: str, cu: int, ts: int) -> None:
        self._hour.setdefault(account, deque()).append((ts, cu))
        self._hour_sum[account] = self._hour_sum.get(account, 0) + cu
        self._breaker(account).minute.append(ts)

    def _spent_last_hour(self, account: str, now: int) -> int:
        window = self._hour.get(account)
        if not window:
            return 0
        while window and window[0][0] <= now - HOUR_MS:
            self._hour_sum[account] -= window.popleft()[1]
        if not window:
            del self._hour[account], self._hour_sum[account]
            return 0
        return self._hour_sum[account]

    def _breaker(self, account: str) -> Breaker:
        found = self._breakers.get(account)
        if found is None:
            found = self._breakers[account] = Breaker()
            if len(self._breakers) > 100_000:  # bounded memory: forget closed, quiet breakers
                for key in [k for k, b in self._breakers.items() if b.quiet()][:50_000]:
                    del self._breakers[key]
        return found

    # -- the breakers ----------------------------------------------------------------------

    def breaker_is_open(self, account: str | None = None) -> bool:
        """The node-wide breaker, or with `account` that account's (or the node's)."""
        with self._lock:
            now = self.clock()
            if self._node.is_open(now, self.rules):
                return True
            found = self._breakers.get(account) if account is not None else None
            return found is not None and found.is_open(now, self.rules)

    def record_spend(self, account: str, cu: int) -> None:
        """Count a spend that happened (the trade's CU) in the hourly window and its breaker."""
        with self._lock:
            now = self.clock()
            self._add_spend(account, cu, now)
            breaker = self._breaker(account)
            count = breaker.spends(now)
            if count > self.rules.max_spends_per_minute:
                breaker.trip(now, f"{count} spends in the last minute by account "
                                  f"{_short(account)} (more than "
                                  f"{self.rules.max_spends_per_minute})")

    def record_outcome(self, account: str, ok: bool) -> None:
        """Tell the breakers how one of `account`'s requests ended: consecutive failures open
        the account's breaker, and the node's when they came from two accounts or more."""
        with self._lock:
            now = self.clock()
            limit = self.rules.max_consecutive_errors
            breaker = self._breaker(account)
            breaker.errors = 0 if ok else breaker.errors + 1
            if breaker.errors >= limit:
                breaker.trip(now, f"{breaker.errors} consecutive failed requests of account "
                                  f"{_short(account)}")
            if ok:
                self._node.errors = 0
                self._node_failing.clear()
                return
            self._node.errors += 1
            self._node_failing.add(account)
            if self._node.errors >= limit and len(self._node_failing) >= 2:
                self._node.trip(now, f"{self._node.errors} consecutive failed requests from "
                                     f"{len(self._node_failing)} accounts")

    # -- policies --------------------------------------------------------------------------

    def _policy_row(self, key: str) -> Policy | None:
        row = self.ledger.row(views.POLICIES, (key,))
        return None if row is None else Policy(*row[:len(POLICY_LIMITS)])

    def policy_for(self, account: str) -> tuple[Policy, str]:
        """The effective policy and where it comes from: 'account', '*' or 'defaults'."""
        if account != "*":
            policy = self._policy_row(account)
            if policy is not None:
                return policy, "account"
        policy = self._policy_row("*")
        return (policy, "*") if policy is not None else (self.defaults, "defaults")

    def set_policy(self, account: str, **limits: int) -> Policy:
        """Append a `policy` entry for an account or '*'; limits not given keep their value."""
        if account != "*" and not _ACCOUNT.fullmatch(account or ""):
            raise UsageError(f"policy account must be 64 hex digits or '*', found {account!r}")
        unknown = set(limits) - set(POLICY_LIMITS)
        if unknown:
            raise UsageError(f"unknown policy limits {sorted(unknown)}; known: "
                             f"{', '.join(POLICY_LIMITS)}")
        with self._lock:
            base = self._policy_row(account) or self.policy_for(account)[0]
            policy = replace(base, **{k: v for k, v in limits.items() if v is not None})
            self.ledger.append("policy", {"account": account, **policy.to_json()}, ts=self.clock())
        return policy

    # -- kill switch -----------------------------------------------------------------------

    def kill_state(self) -> dict[str, Any]:
        row = self.ledger.row(views.KILL_SWITCH, views.KILL_KEY)
        if row is None:
            return {"active": False, "reason": "", "seq": None}
        return {"active": bool(row[0]), "reason": row[1], "seq": row[2]}

    def kill(self, reason: str) -> dict[str, Any]:
        """Stop every spend until `resume`; recorded in the ledger with the reason."""
        if not isinstance(reason, str) or not reason.strip():
            raise UsageError("the kill switch needs a reason (it is recorded in the ledger)")
        with self._lock:
            self.ledger.append("kill", {"active": True, "reason": reason.strip()}, ts=self.clock())
            return self.kill_state()

    def resume(self, reason: str = "") -> dict[str, Any]:
        """Lift the kill switch (a no-op, with nothing recorded, when it is off)."""
        with self._lock:
            if self.kill_state()["active"]:
                self.ledger.append("kill", {"active": False, "reason": reason.strip()},
                                   ts=self.clock())
            return self.kill_state()

    # -- approvals -------------------------------------------------------------------------

    def _approvals(self, account: str | None, statuses: tuple[str, ...]) -> list[dict[str, Any]]:
        return queries.approvals(self.ledger, statuses, account)

    def _move(self, approval: dict[str, Any], status: str, now: int) -> int:
        """Append the approval's next status; returns the entry's seq."""
        return self.ledger.append("approval", {"id": approval["id"], "account": approval["account"],
                                        "cu": approval["cu"], "status": status}, ts=now).seq

    def expire_lapsed(self, account: str | None = None) -> int:
        """Record `expired` for every request whose time ran out; returns how many."""
        with self._lock:
            now = self.clock()
            lapsed = [a for a in self._approvals(account, ("requested",)) if a["expires_ms"] < now]
            for approval in lapsed:
                self._move(approval, "expired", now)
            return len(lapsed)

    def _decide(self, approval_id: str, status: str) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            row = self.ledger.row(views.APPROVALS, (approval_id,))
            if row is None:
                raise UsageError(f"no approval {approval_id!r}", hint="see `forge safety pending`")
            approval = dict(zip(("account", "cu", "status", "expires_ms", "seq"), row),
                            id=approval_id)
            if approval["status"] != "requested":
                raise UsageError(f"approval {approval_id} is already {approval['status']} "
                                 f"(seq {approval['seq']}); only a requested one can be {status}")
            if approval["expires_ms"] < now:
                self._move(approval, "expired", now)
                raise UsageError(f"approval {approval_id} expired "
                                 f"{(now - approval['expires_ms']) // 1000} s ago; the spend "
                                 "must be requested again")
            approval.update(status=status, seq=self._move(approval, status, now))
            return approval

    def approve(self, approval_id: str) -> dict[str, Any]:
        """Approve a requested spend: the same account's next spend of up to that CU passes once."""
        return self._decide(approval_id, "approved")

    def deny(self, approval_id: str) -> dict[str, Any]:
        return self._decide(approval_id, "denied")

    def pending(self) -> list[dict[str, Any]]:
        """Requests waiting for a person (lapsed ones are left out)."""
        with self._lock:
            now = self.clock()
            return [a for a in self._approvals(None, ("requested",)) if a["expires_ms"] >= now]

    # -- the gates -------------------------------------------------------------------------

    def check(self, account: str, cu: int) -> None:
        """Pass, or raise the SpendDenied of the first gate that refuses a spend of `cu` CU.

        The approval gate writes to the ledger: a new request (then ApprovalRequired), or the
        use of an approval granted earlier (then the spend passes).
        """
        if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
            raise UsageError(f"account must be 64 hex digits, found {account!r}")
        if type(cu) is not int or cu < 0:
            raise UsageError(f"a spend must be a non-negative integer of CU, found {cu!r}")
        with self._lock:
            now = self.clock()
            policy: list[Policy] = []

            def limits() -> Policy:
                if not policy:
                    policy.append(self.policy_for(account)[0])
                return policy[0]

            gates: tuple[tuple[str, Callable[[], None]], ...] = (
                ("kill_switch", self._gate_kill),
                ("per_request_cap", lambda: self._gate_cap(account, cu, limits())),
                ("circuit_breaker", lambda: self._gate_breaker(account, now)),
                ("hourly_budget", lambda: self._gate_hourly(account, cu, now, limits())),
                ("lifetime_budget", lambda: self._gate_lifetime(account, cu, limits())),
                ("approval", lambda: self._gate_approval(account, cu, now, limits())),
            )
            for name, gate in gates:
                try:
                    gate()
                except SpendDenied:
                    raise
                except Exception as exc:  # fail-safe: a gate that cannot decide denies
                    raise SpendDenied(
                        f"{name.replace('_', ' ')}: could not decide ({type(exc).__name__}: {exc}); "
                        "the spend is denied to be safe", gate=name) from exc

    def _gate_kill(self) -> None:
        state = self.kill_state()
        if state["active"]:
            raise KillSwitchActive(
                f"kill switch: on since seq {state['seq']} ({state['reason']}); no spend of any "
                "kind is allowed", hint="lift it with `forge safety resume`")

    @staticmethod
    def _gate_cap(account: str, cu: int, policy: Policy) -> None:
        if cu > policy.per_request_cap_cu:
            raise SpendCapExceeded(
                f"per-request cap: {_cu(cu)} quoted exceeds the cap of "
                f"{_cu(policy.per_request_cap_cu)} for account {_short(account)}",
                hint="ask for fewer tokens, or raise it with `forge safety policy set --cap N`")

    def _gate_breaker(self, account: str, now: int) -> None:
        for breaker in (self._node, self._breakers.get(account)):
            if breaker is not None and breaker.is_open(now, self.rules):
                assert breaker.tripped_at is not None
                wait_s = -(-(breaker.tripped_at + self.rules.reset_after_ms - now) // 1000)
                raise BreakerOpen(f"circuit breaker: open after {breaker.reason}; it closes by "
                                  f"itself in {wait_s} s")

    def _gate_hourly(self, account: str, cu: int, now: int, policy: Policy) -> None:
        spent = self._spent_last_hour(account, now)
        if spent + cu > policy.hourly_budget_cu:
            raise BudgetExceeded(
                f"hourly budget: {_cu(spent)} spent in the last hour + {_cu(cu)} quoted exceeds "
                f"{_cu(policy.hourly_budget_cu)}", gate="hourly_budget")

    def spent_lifetime(self, account: str) -> int:
        row = self.ledger.row(views.TRADE_TOTALS, (account,))
        return 0 if row is None else row[0]

    def _gate_lifetime(self, account: str, cu: int, policy: Policy) -> None:
        spent = self.spent_lifetime(account)
        if spent + cu > policy.lifetime_budget_cu:
            raise BudgetExceeded(
                f"lifetime budget: {_cu(spent)} spent + {_cu(cu)} quoted exceeds "
                f"{_cu(policy.lifetime_budget_cu)}", gate="lifetime_budget")

    def _gate_approval(self, account: str, cu: int, now: int, policy: Policy) -> None:
        if cu <= policy.approval_threshold_cu:
            return
        self.expire_lapsed(account)
        live = self._approvals(account, ("requested", "approved"))
        granted = sorted((a for a in live if a["status"] == "approved" and a["cu"] >= cu),
                         key=lambda a: (a["cu"], a["seq"]))
        if granted:
            self._move(granted[0], "used", now)
            return
        waiting = next((a for a in live if a["status"] == "requested" and a["cu"] == cu), None)
        if waiting is None:
            waiting = {"id": "apr_" + secrets.token_hex(6), "account": account, "cu": cu,
                       "expires_ms": now + self.approval_ttl_ms}
            self.ledger.append("approval", {**waiting, "status": "requested"}, ts=now)
        left_s = max(0, (waiting["expires_ms"] - now) // 1000)
        raise ApprovalRequired(
            f"approval: {_cu(cu)} quoted is above the approval threshold of "
            f"{_cu(policy.approval_threshold_cu)}; approval {waiting['id']} waits for a person "
            f"({left_s} s left)", approval_id=waiting["id"],
            hint=f"`forge safety approve {waiting['id']}`, then send the request again")

    # -- status ----------------------------------------------------------------------------

    def status(self, account: str | None = None) -> dict[str, Any]:
        """Everything the gates decide from, for `GET /v1/forge/safety` and `forge safety status`."""
        with self._lock:
            now = self.clock()
            policy, source = self.policy_for(account or "*")
            out: dict[str, Any] = {
                "gates": list(GATES),
                "kill_switch": self.kill_state(),
                "breaker": {**self._node.describe(now, self.rules), "scope": "node",
                            "open_accounts": sum(1 for b in self._breakers.values()
                                                 if b.is_open(now, self.rules)),
                            **asdict(self.rules)},
                "policy": {**policy.to_json(), "source": source},
                "defaults": self.defaults.to_json(),
                "policies": [
                    {"account": key[0], **dict(zip(POLICY_LIMITS, value)), "seq": value[-1]}
                    for key, value in sorted(queries.view_rows(self.ledger, views.POLICIES).items())
                ],
                "approval_ttl_ms": self.approval_ttl_ms,
                "pending": self.pending(),
            }
            if account is not None:
                out.update(account=account, spent_last_hour_cu=self._spent_last_hour(account, now),
                           spent_lifetime_cu=self.spent_lifetime(account),
                           account_breaker={**self._breaker(account).describe(now, self.rules),
                                            "scope": "account"})
            return out
