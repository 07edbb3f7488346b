"""Materialised views: folds over the entries, kept in SQLite tables as caches.

Each view is a table of (key → value) rows. `apply` is the one fold used both when appending
(the rows live in SQLite, updated in the entry's transaction) and when replaying (the rows
live in dicts), so `verify --deep` can rebuild every table from the entries and compare.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from forge_cli.errors import EntryRejected
from forge_cli.ledger.entries import POLICY_LIMITS

Row = tuple[Any, ...]


@dataclass(frozen=True)
class View:
    table: str
    key: tuple[str, ...]
    value: tuple[str, ...]
    types: tuple[str, ...]  # SQL types, key columns first

    def ddl(self) -> str:
        cols = ", ".join(
            f"{name} {kind} NOT NULL" for name, kind in zip(self.key + self.value, self.types)
        )
        return (f"CREATE TABLE IF NOT EXISTS {self.table} ({cols}, "
                f"PRIMARY KEY ({', '.join(self.key)})) WITHOUT ROWID")


ACCOUNTS = View("accounts", ("account",), ("balance",), ("TEXT", "INTEGER"))
SUPPLY = View("supply", ("name",), ("cu",), ("TEXT", "INTEGER"))  # 'granted', 'burned'
TRADE_NONCES = View("trade_nonces", ("consumer", "nonce"), ("seq",), ("TEXT", "TEXT", "INTEGER"))
REDACTIONS = View("redactions", ("body",), ("seq",), ("TEXT", "INTEGER"))
BODY_REFS = View("body_refs", ("body",), ("seq",), ("TEXT", "INTEGER"))  # first seq naming it
# Lifetime trade totals per account, so budgets and /balance need no scan.
# CU spent as consumer, earned as provider, and the number of trades provided (reputation).
TRADE_TOTALS = View("trade_totals", ("account",), ("spent", "earned", "provided"),
                    ("TEXT", "INTEGER", "INTEGER", "INTEGER"))
# One row, name 'global': the latest `kill` entry.
KILL_SWITCH = View("kill_switch", ("name",), ("active", "reason", "seq"),
                   ("TEXT", "INTEGER", "TEXT", "INTEGER"))
# The latest `policy` entry per account ('*' is every account without its own).
POLICIES = View("policies", ("account",), (*POLICY_LIMITS, "seq"), ("TEXT",) + ("INTEGER",) * 5)
# Each approval's current state; seq is the entry that put it there.
APPROVALS = View("approvals", ("id",), ("account", "cu", "status", "expires_ms", "seq"),
                 ("TEXT", "TEXT", "INTEGER", "TEXT", "INTEGER", "INTEGER"))
VIEWS: tuple[View, ...] = (ACCOUNTS, SUPPLY, TRADE_NONCES, REDACTIONS, BODY_REFS, TRADE_TOTALS,
                           KILL_SWITCH, POLICIES, APPROVALS)
KILL_KEY = ("global",)

# Which status an approval may move to from which (anything else is rejected by the fold).
APPROVAL_MOVES = {"approved": "requested", "denied": "requested", "expired": "requested",
                  "used": "approved"}


class State(Protocol):
    def get(self, view: View, key: Row) -> Row | None: ...
    def put(self, view: View, key: Row, value: Row | None) -> None: ...


def _balance(state: State, account: str) -> int:
    row = state.get(ACCOUNTS, (account,))
    return row[0] if row else 0


def _credit(state: State, account: str, cu: int) -> None:
    state.put(ACCOUNTS, (account,), (_balance(state, account) + cu,))


def _debit(state: State, account: str, cu: int, seq: int, why: str) -> None:
    balance = _balance(state, account)
    if balance < cu:
        raise EntryRejected(
            f"seq {seq}: {why}: balance of {account[:16]}… is {balance} CU, below {cu} CU"
        )
    state.put(ACCOUNTS, (account,), (balance - cu,))


def _add_supply(state: State, name: str, cu: int) -> None:
    row = state.get(SUPPLY, (name,))
    state.put(SUPPLY, (name,), ((row[0] if row else 0) + cu,))


def _add_totals(state: State, account: str, spent: int, earned: int, provided: int) -> None:
    row = state.get(TRADE_TOTALS, (account,)) or (0, 0, 0)
    state.put(TRADE_TOTALS, (account,), (row[0] + spent, row[1] + earned, row[2] + provided))


def _approval(state: State, data: dict[str, Any], seq: int, ts: int) -> None:
    key, status = (data["id"],), data["status"]
    row = state.get(APPROVALS, key)
    if status == "requested":
        if row is not None:
            raise EntryRejected(f"seq {seq}: approval {data['id']!r} was already requested at "
                                f"seq {row[4]}")
        state.put(APPROVALS, key, (data["account"], data["cu"], status, data["expires_ms"], seq))
        return
    if row is None:
        raise EntryRejected(f"seq {seq}: approval {data['id']!r} was never requested")
    account, cu, current, expires_ms, at = row
    if (account, cu) != (data["account"], data["cu"]):
        raise EntryRejected(f"seq {seq}: approval {data['id']!r} is for {cu} CU by {account[:16]}…, "
                            f"not {data['cu']} CU by {data['account'][:16]}…")
    if current != APPROVAL_MOVES[status]:
        raise EntryRejected(f"seq {seq}: approval {data['id']!r} is {current} (seq {at}); only a "
                            f"{APPROVAL_MOVES[status]} approval can become {status}")
    if status == "approved" and ts > expires_ms:
        raise EntryRejected(f"seq {seq}: approval {data['id']!r} expired at {expires_ms} ms, "
                            f"before this approval at {ts} ms")
    if status == "expired" and ts < expires_ms:
        raise EntryRejected(f"seq {seq}: approval {data['id']!r} does not expire until "
                            f"{expires_ms} ms (entry ts {ts} ms)")
    state.put(APPROVALS, key, (account, cu, status, expires_ms, seq))


def apply(state: State, fields: dict[str, Any]) -> None:
    """Fold one (already well-formed) entry into the views; EntryRejected breaks a rule."""
    kind, data, seq = fields["kind"], fields["data"], fields["seq"]
    for body in fields["bodies"]:
        redacted = state.get(REDACTIONS, (body,))
        if redacted is not None:
            raise EntryRejected(f"seq {seq}: body {body[:16]}… was redacted at seq {redacted[0]} "
                                "and cannot be stored again")
        if state.get(BODY_REFS, (body,)) is None:
            state.put(BODY_REFS, (body,), (seq,))
    if kind == "grant":
        _credit(state, data["account"], data["cu"])
        _add_supply(state, "granted", data["cu"])
    elif kind == "burn":
        _debit(state, data["account"], data["cu"], seq, "burn")
        _add_supply(state, "burned", data["cu"])
    elif kind == "transfer":
        _debit(state, data["from"], data["cu"], seq, "transfer")
        _credit(state, data["to"], data["cu"])
    elif kind == "trade":
        terms = data["terms"]
        key = (terms["consumer"], terms["nonce"])
        seen = state.get(TRADE_NONCES, key)
        if seen is not None:
            raise EntryRejected(
                f"seq {seq}: trade nonce {terms['nonce']!r} of consumer "
                f"{terms['consumer'][:16]}… was already used at seq {seen[0]} (replay)"
            )
        state.put(TRADE_NONCES, key, (seq,))
        _debit(state, terms["consumer"], terms["cu"], seq, "trade")
        _credit(state, terms["provider"], terms["cu"])
        if terms["cu"]:
            _add_totals(state, terms["consumer"], terms["cu"], 0, 0)
            _add_totals(state, terms["provider"], 0, terms["cu"], 1)
    elif kind == "redact":
        body = data["body"]
        done = state.get(REDACTIONS, (body,))
        if done is not None:
            raise EntryRejected(f"seq {seq}: body {body[:16]}… was already redacted at seq {done[0]}")
        first = state.get(BODY_REFS, (body,))
        if first is None or first[0] >= seq:
            raise EntryRejected(f"seq {seq}: no entry before it references body {body[:16]}…")
        state.put(REDACTIONS, (body,), (seq,))
    elif kind == "kill":
        state.put(KILL_SWITCH, KILL_KEY, (int(data["active"]), data["reason"], seq))
    elif kind == "policy":
        state.put(POLICIES, (data["account"],), (*(data[k] for k in POLICY_LIMITS), seq))
    elif kind == "approval":
        _approval(state, data, seq, fields["ts"])


class MemoryState:
    """Views held in dicts: what replay and deep verify rebuild from the entries alone."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[Row, Row]] = {view.table: {} for view in VIEWS}

    def get(self, view: View, key: Row) -> Row | None:
        return self.tables[view.table].get(key)

    def put(self, view: View, key: Row, value: Row | None) -> None:
        if value is None:
            self.tables[view.table].pop(key, None)
        else:
            self.tables[view.table][key] = value

    def apply(self, fields: dict[str, Any]) -> None:
        apply(self, fields)

    def balances(self) -> dict[str, int]:
        return {key[0]: value[0] for key, value in self.tables[ACCOUNTS.table].items()}

    def supply(self) -> dict[str, int]:
        rows = self.tables[SUPPLY.table]
        return {name: rows.get((name,), (0,))[0] for name in ("granted", "burned")}


_ABSENT = object()


class SqliteState:
    """Views held in the ledger's tables, written back once per append transaction.

    Reads go through a cache of the rows this transaction touched, so a batch that moves CU
    between the same accounts a thousand times writes each row once.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._pending: dict[tuple[str, Row], Row | None] = {}
        self._journal: list[tuple[tuple[str, Row], Any]] = []  # (key, pending value before)
        self._sql = {view.table: self._statements(view) for view in VIEWS}

    @staticmethod
    def _statements(view: View) -> tuple[str, str, str]:
        where = " AND ".join(f"{k} = ?" for k in view.key)
        marks = ", ".join("?" * (len(view.key) + len(view.value)))
        return (f"SELECT {', '.join(view.value)} FROM {view.table} WHERE {where}",
                f"INSERT OR REPLACE INTO {view.table} VALUES ({marks})",
                f"DELETE FROM {view.table} WHERE {where}")

    def get(self, view: View, key: Row) -> Row | None:
        try:
            return self._pending[(view.table, key)]
        except KeyError:
            return self.conn.execute(self._sql[view.table][0], key).fetchone()

    def put(self, view: View, key: Row, value: Row | None) -> None:
        slot = (view.table, key)
        self._journal.append((slot, self._pending.get(slot, _ABSENT)))
        self._pending[slot] = value

    def mark(self) -> int:
        return len(self._journal)

    def undo(self, mark: int) -> None:
        """Forget the puts made since `mark` (one rejected entry in a group commit)."""
        while len(self._journal) > mark:
            slot, before = self._journal.pop()
            if before is _ABSENT:
                del self._pending[slot]
            else:
                self._pending[slot] = before

    def flush(self) -> None:
        """Write the pending rows (inside the caller's transaction)."""
        for (table, key), value in self._pending.items():
            _, replace, delete = self._sql[table]
            if value is None:
                self.conn.execute(delete, key)
            else:
                self.conn.execute(replace, key + value)
        self.discard()

    def discard(self) -> None:
        self._pending.clear()
        self._journal.clear()


def table_rows(conn: sqlite3.Connection, view: View) -> dict[Row, Row]:
    n = len(view.key)
    return {
        tuple(row[:n]): tuple(row[n:])
        for row in conn.execute(f"SELECT {', '.join(view.key + view.value)} FROM {view.table}")
    }


def diff(view: View, stored: dict[Row, Row], rebuilt: dict[Row, Row]) -> Iterable[str]:
    """Human-readable differences between a stored view and its replayed rebuild."""
    for key in sorted(set(stored) | set(rebuilt), key=repr):
        have, want = stored.get(key), rebuilt.get(key)
        if have != want:
            yield f"{view.table} row {key!r}: stored {have!r}, replay gives {want!r}"
