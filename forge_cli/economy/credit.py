"""Reputation and credit score: folds over the ledger's views, nothing kept elsewhere.

Reputation (basis points 0..10000): 5000, +100 per dual-signed trade provided, −2000 per loan
default, −500 per peer-to-peer reply taken and never countersigned (`unsettled`), +20 per audit
of its sales passed, −2500 per dispute upheld against it, −2500 per dispute it wrote that did
not re-check (a forged dispute), clamped. A peer's P2P price is × (2 − reputation), so each
dispute also raises what the disputed peer pays here by 0.25 × the base price.
Credit score (basis points) = (3·volume + 4·repayment + 2·uptime + 1·age) / 10, rounded down,
every component in basis points and computed from the ledger:

- volume: CU earned + spent in trades (the `trade_totals` view), 10,000 bp at 10,000 CU or more;
- repayment: (repaid + 1) / (repaid + defaulted + 2) of the account's loans (`loan_history`),
  so an account that never borrowed starts at 5000 bp;
- uptime: share of the last 168 hours in which the node holding the account wrote a
  `heartbeat` entry (`heartbeats` view; a node heartbeats itself once an hour, and its agent
  accounts share its uptime);
- age: time since CU first reached the account (`first_seen`), 10,000 bp at 30 days or more.
"""

from __future__ import annotations

from typing import Any

from forge_cli.ledger import queries, views
from forge_cli.ledger.entries import HOUR_MS
from forge_cli.ledger.store import Ledger

BP = 10_000
VOLUME_FULL_CU = 10_000
UPTIME_WINDOW_H = 168
AGE_FULL_MS = 30 * 24 * HOUR_MS
WEIGHTS = {"volume": 3, "repayment": 4, "uptime": 2, "age": 1}  # tenths


UNSETTLED_PENALTY_BP = 500
AUDIT_PASS_BP = 20
DISPUTE_PENALTY_BP = 2_500  # per dispute upheld against a provider
FORGED_DISPUTE_PENALTY_BP = 2_500  # per dispute an auditor wrote that did not re-check


def reputation(provided: int, defaulted: int = 0, unsettled: int = 0, passed: int = 0,
               disputed: int = 0, forged: int = 0) -> int:
    """Basis points: 5000 to start, +100 per trade provided, −2000 per loan default,
    −500 per peer-to-peer reply taken and never countersigned, +20 per audit passed,
    −2500 per dispute upheld against it or forged by it; clamped to 0..10000."""
    return max(0, min(BP, 5_000 + 100 * provided - 2_000 * defaulted
                      - UNSETTLED_PENALTY_BP * unsettled + AUDIT_PASS_BP * passed
                      - DISPUTE_PENALTY_BP * disputed - FORGED_DISPUTE_PENALTY_BP * forged))


def account_reputation(ledger: Ledger, account: str) -> int:
    provided = (ledger.row(views.TRADE_TOTALS, (account,)) or (0, 0, 0))[2]
    defaulted = (ledger.row(views.LOAN_HISTORY, (account,)) or (0, 0, 0))[2]
    unsettled = (ledger.row(views.UNSETTLED, (account,)) or (0, 0))[0]
    passed, disputed, forged = ledger.row(views.AUDIT_RECORD, (account,)) or (0, 0, 0)
    return reputation(provided, defaulted, unsettled, passed, disputed, forged)


def credit(ledger: Ledger, account: str, now_ms: int, host: str | None = None) -> dict[str, Any]:
    """The credit score of `account` at `now_ms` and each component, all in basis points.

    `host` is the node holding the account's key (its heartbeats are the account's uptime);
    None means the account is its own node.
    """
    spent, earned, _ = ledger.row(views.TRADE_TOTALS, (account,)) or (0, 0, 0)
    borrowed, repaid, defaulted = ledger.row(views.LOAN_HISTORY, (account,)) or (0, 0, 0)
    first = ledger.row(views.FIRST_SEEN, (account,))
    hour = now_ms // HOUR_MS
    beats = queries.heartbeat_hours(ledger, host or account, hour - UPTIME_WINDOW_H, hour)
    age_ms = max(0, now_ms - first[0]) if first else 0
    parts = {
        "volume": min(BP, (spent + earned) * BP // VOLUME_FULL_CU),
        "repayment": (repaid + 1) * BP // (repaid + defaulted + 2),
        "uptime": beats * BP // UPTIME_WINDOW_H,
        "age": min(BP, age_ms * BP // AGE_FULL_MS),
    }
    score = sum(WEIGHTS[k] * v for k, v in parts.items()) // 10
    return {
        "account": account, "credit_bp": score, "components": parts, "weights": WEIGHTS,
        "inputs": {"trade_volume_cu": spent + earned, "loans": borrowed, "repaid": repaid,
                   "defaulted": defaulted, "heartbeat_hours": beats,
                   "uptime_window_hours": UPTIME_WINDOW_H, "age_ms": age_ms},
        "reputation": account_reputation(ledger, account),
    }
