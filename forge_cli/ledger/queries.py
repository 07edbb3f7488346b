"""Named reads over a ledger's tables, for economy/, node/ and mesh/.

Every SQL read that code outside `ledger/` needs lives here under a name that says what it
answers, so the schema has one owner and callers never hold the ledger's connection.
Each function takes a `Ledger` (writer or reader) and reads what it has committed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from forge_cli import canonical
from forge_cli.ledger import views
from forge_cli.ledger.store import Ledger


def view_rows(ledger: Ledger, view: views.View) -> dict[views.Row, views.Row]:
    """Every row of a materialised view, key → value.

    >>> view_rows(book, views.POLICIES)  # {('*',): (cap, hourly, lifetime, approve, seq)}
    """
    return views.table_rows(ledger.conn, view)


def recent_trade_spends(ledger: Ledger, since_ms: int,
                        batch: int = 1024) -> list[tuple[int, str, int]]:
    """(ts, consumer, cu) of every trade after `since_ms`, oldest first.

    Reads back from the tail a batch at a time and stops at the first batch that is wholly
    older, since entry times follow seq.
    """
    found: list[tuple[int, str, int]] = []
    end = ledger.size
    while end > 0:
        start = max(0, end - batch)
        rows = ledger.conn.execute(
            "SELECT ts, kind, entry FROM entries WHERE seq >= ? AND seq < ? ORDER BY seq DESC",
            (start, end)).fetchall()
        for ts, kind, raw in rows:
            if kind == "trade" and ts > since_ms:
                terms = canonical.decode(raw)["data"]["terms"]
                found.append((ts, terms["consumer"], terms["cu"]))
        if not rows or max(ts for ts, _, _ in rows) <= since_ms:
            break
        end = start
    return sorted(found)


def approvals(ledger: Ledger, statuses: tuple[str, ...],
              account: str | None = None) -> list[dict[str, Any]]:
    """Approval requests now in one of `statuses` (of `account`, or all), in seq order."""
    sql = (f"SELECT id, account, cu, status, expires_ms, seq FROM approvals WHERE status IN "
           f"({', '.join('?' * len(statuses))})")
    args: list[Any] = list(statuses)
    if account is not None:
        sql += " AND account = ?"
        args.append(account)
    rows = ledger.conn.execute(sql + " ORDER BY seq", args).fetchall()
    return [dict(zip(("id", "account", "cu", "status", "expires_ms", "seq"), row)) for row in rows]


def heartbeat_hours(ledger: Ledger, account: str, after_hour: int, upto_hour: int) -> int:
    """Hours in (after_hour, upto_hour] in which `account` recorded a heartbeat."""
    return int(ledger.conn.execute(
        "SELECT count(*) FROM heartbeats WHERE account = ? AND hour > ? AND hour <= ?",
        (account, after_hour, upto_hour)).fetchone()[0])


def open_loan_count(ledger: Ledger) -> int:
    return int(ledger.conn.execute("SELECT count(*) FROM loans WHERE status = 'open'").fetchone()[0])


def loans(ledger: Ledger, account: str | None = None) -> list[tuple[Any, ...]]:
    """Rows of the loans view (loan_id, then its value columns) of `account` or all, by id."""
    sql = f"SELECT {', '.join(views.LOANS.key + views.LOANS.value)} FROM loans"
    args: tuple[Any, ...] = ()
    if account is not None:
        sql, args = sql + " WHERE account = ?", (account,)
    return ledger.conn.execute(sql + " ORDER BY loan_id", args).fetchall()


def overdue_loans(ledger: Ledger, now_ms: int) -> list[tuple[int, str, int]]:
    """(loan_id, account, collateral) of every open loan due before `now_ms`."""
    return ledger.conn.execute(
        "SELECT loan_id, account, collateral FROM loans WHERE status = 'open' AND due_ms < ? "
        "ORDER BY loan_id", (now_ms,)).fetchall()


def loans_closed_since(ledger: Ledger, since_ms: int) -> tuple[int, int]:
    """(closed, of which defaulted) among loans closed after `since_ms`."""
    closed, defaulted = ledger.conn.execute(
        "SELECT count(*), coalesce(sum(status = 'defaulted'), 0) FROM loans "
        "WHERE status != 'open' AND closed_ms > ?", (since_ms,)).fetchone()
    return closed, defaulted


def loans_started_since(ledger: Ledger, since_ms: int) -> int:
    return int(ledger.conn.execute("SELECT count(*) FROM loans WHERE start_ms > ?",
                               (since_ms,)).fetchone()[0])


def trade_count(ledger: Ledger) -> int:
    """Trades in the ledger: one nonce row each (a view, so no scan), less the nonces spent
    by `unsettled` terms, which are not trades."""
    nonces = ledger.conn.execute("SELECT count(*) FROM trade_nonces").fetchone()[0]
    unsettled = ledger.conn.execute("SELECT coalesce(sum(count), 0) FROM unsettled").fetchone()[0]
    return int(nonces - unsettled)


def trade_volume(ledger: Ledger) -> int:
    """CU earned by every provider over all trades."""
    return int(ledger.conn.execute("SELECT coalesce(sum(earned), 0) FROM trade_totals").fetchone()[0])


def trades_from(ledger: Ledger, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(seq, trade data) of every trade entry at seq ≥ `start`, in seq order."""
    for entry in ledger.iter_entries(start, kind="trade"):
        yield entry.seq, entry.data


def dispute_auditors(ledger: Ledger, provider: str) -> int:
    """Distinct auditors whose disputes against `provider` this ledger upheld."""
    return int(ledger.conn.execute(
        "SELECT count(DISTINCT auditor) FROM audits WHERE provider = ? AND verdict = 'upheld'",
        (provider,)).fetchone()[0])


def upheld_auditors(ledger: Ledger, provider: str) -> list[str]:
    """The distinct auditors whose disputes against `provider` this ledger upheld."""
    return [row[0] for row in ledger.conn.execute(
        "SELECT DISTINCT auditor FROM audits WHERE provider = ? AND verdict = 'upheld' "
        "ORDER BY auditor", (provider,))]


def audit_records(ledger: Ledger) -> dict[str, tuple[int, int, int]]:
    """account → (audits passed, disputes upheld against it, disputes it forged)."""
    return {key[0]: value for key, value in view_rows(ledger, views.AUDIT_RECORD).items()}


def audit_entries(ledger: Ledger, account: str | None = None) -> Iterator[Any]:
    """Every `audit` and `dispute` entry in seq order; with `account`, those about it (as
    provider or auditor)."""
    found = [*ledger.iter_entries(0, kind="audit"), *ledger.iter_entries(0, kind="dispute")]
    for entry in sorted(found, key=lambda e: e.seq):
        if account is not None:
            if entry.kind == "audit":
                parties = {entry.data["provider"], entry.actor}
            else:
                claim = entry.data["claim"]
                parties = {claim["trade"]["terms"]["provider"], claim["auditor"]}
            if account not in parties:
                continue
        yield entry
