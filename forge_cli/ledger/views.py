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
from forge_cli.ledger import entries as _kinds
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
# Lending. One row, name 'pool': CU held by the pool (cash), principal lent out and not yet
# repaid or defaulted (lent), and the shares in issue. The pool's value is cash + lent.
POOL = View("pool", ("name",), ("cash", "lent", "shares"), ("TEXT", "INTEGER", "INTEGER", "INTEGER"))
# Per lender: shares held, and CU put in and taken out over all time (their gain is
# withdrawn + value of shares − deposited).
LENDERS = View("lenders", ("account",), ("shares", "deposited", "withdrawn"),
               ("TEXT", "INTEGER", "INTEGER", "INTEGER"))
# Every loan, keyed by the seq of its `borrow` entry. closed_ms is 0 while open.
LOANS = View("loans", ("loan_id",),
             ("account", "principal", "collateral", "rate_ppm", "start_ms", "due_ms", "status",
              "interest", "closed_ms"),
             ("INTEGER", "TEXT", "INTEGER", "INTEGER", "INTEGER", "INTEGER", "INTEGER", "TEXT",
              "INTEGER", "INTEGER"))
# Collateral held in escrow per borrower (CU that is neither a balance nor the pool's).
ESCROW = View("escrow", ("account",), ("cu",), ("TEXT", "INTEGER"))
# Per borrower: loans taken, repaid and defaulted (credit history and reputation).
LOAN_HISTORY = View("loan_history", ("account",), ("borrowed", "repaid", "defaulted"),
                    ("TEXT", "INTEGER", "INTEGER", "INTEGER"))
# The hours (unix ms // 3,600,000) in which an account's node wrote a heartbeat (uptime).
HEARTBEATS = View("heartbeats", ("account", "hour"), ("seq",), ("TEXT", "INTEGER", "INTEGER"))
# When CU first reached an account (credit age).
FIRST_SEEN = View("first_seen", ("account",), ("ts",), ("TEXT", "INTEGER"))
# Per consumer: peer-to-peer terms it was served and never countersigned (its standing).
UNSETTLED = View("unsettled", ("account",), ("count", "seq"), ("TEXT", "INTEGER", "INTEGER"))
# Per account: audits of its sales passed and disputes upheld against it (as provider), and
# disputes it wrote that did not re-check (as auditor): its standing.
AUDIT_RECORD = View("audit_record", ("account",), ("passed", "disputed", "forged"),
                    ("TEXT", "INTEGER", "INTEGER", "INTEGER"))
# Every audit outcome recorded, once per (trade, auditor): the provider audited and the verdict
# ('passed', or for a dispute what this node found: 'upheld' or 'forged').
AUDITS = View("audits", ("trade_id", "auditor"), ("provider", "verdict", "seq"),
              ("TEXT", "TEXT", "TEXT", "TEXT", "INTEGER"))
VIEWS: tuple[View, ...] = (ACCOUNTS, SUPPLY, TRADE_NONCES, REDACTIONS, BODY_REFS, TRADE_TOTALS,
                           KILL_SWITCH, POLICIES, APPROVALS, POOL, LENDERS, LOANS, ESCROW,
                           LOAN_HISTORY, HEARTBEATS, FIRST_SEEN, UNSETTLED, AUDIT_RECORD,
                           AUDITS)
KILL_KEY = ("global",)
POOL_KEY = ("pool",)

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


def _seen(state: State, account: str, ts: int) -> None:
    if state.get(FIRST_SEEN, (account,)) is None:
        state.put(FIRST_SEEN, (account,), (ts,))


def _add(state: State, view: View, key: Row, *deltas: int) -> None:
    row = state.get(view, key) or (0,) * len(deltas)
    state.put(view, key, tuple(a + b for a, b in zip(row, deltas)))


def pool_row(state: State) -> tuple[int, int, int]:
    """(cash, lent, shares) of the pool."""
    row = state.get(POOL, POOL_KEY)
    return (row[0], row[1], row[2]) if row else (0, 0, 0)


def shares_for_deposit(cu: int, cash: int, lent: int, shares: int) -> int:
    """Shares minted for `cu`: 1:1 into an empty pool, else floor(cu × shares / value)."""
    value = cash + lent
    return cu if shares == 0 else cu * shares // value if value > 0 else 0


def cu_for_shares(redeemed: int, cash: int, lent: int, shares: int) -> int:
    """CU paid for redeeming shares: floor(redeemed × value / shares) (the pool keeps dust)."""
    return redeemed * (cash + lent) // shares if shares else 0


def _lending(state: State, kind: str, data: dict[str, Any], seq: int, ts: int) -> None:
    cash, lent, shares = pool_row(state)
    if kind == "deposit":
        want = shares_for_deposit(data["cu"], cash, lent, shares)
        if data["shares"] != want or want == 0:
            raise EntryRejected(f"seq {seq}: deposit of {data['cu']} CU mints {want} shares at the "
                                f"pool's value {cash + lent} CU / {shares} shares, not {data['shares']}")
        _debit(state, data["account"], data["cu"], seq, "deposit")
        state.put(POOL, POOL_KEY, (cash + data["cu"], lent, shares + want))
        _add(state, LENDERS, (data["account"],), want, data["cu"], 0)
    elif kind == "withdraw":
        held = (state.get(LENDERS, (data["account"],)) or (0, 0, 0))[0]
        if data["shares"] > held:
            raise EntryRejected(f"seq {seq}: withdraw of {data['shares']} shares by "
                                f"{data['account'][:16]}…, who holds {held}")
        want = cu_for_shares(data["shares"], cash, lent, shares)
        if data["cu"] != want:
            raise EntryRejected(f"seq {seq}: {data['shares']} shares redeem {want} CU, not {data['cu']}")
        if want > cash:
            raise EntryRejected(f"seq {seq}: withdraw of {want} CU but the pool holds {cash} CU")
        state.put(POOL, POOL_KEY, (cash - want, lent, shares - data["shares"]))
        _add(state, LENDERS, (data["account"],), -data["shares"], 0, want)
        _credit(state, data["account"], want)
    elif kind == "borrow":
        account, principal, collateral = data["account"], data["principal"], data["collateral"]
        if principal > cash:
            raise EntryRejected(f"seq {seq}: borrow of {principal} CU but the pool holds {cash} CU")
        _debit(state, account, collateral, seq, "borrow (collateral)")
        _add(state, ESCROW, (account,), collateral)
        state.put(POOL, POOL_KEY, (cash - principal, lent + principal, shares))
        _credit(state, account, principal)
        due = ts + data["term_hours"] * _kinds.HOUR_MS
        state.put(LOANS, (seq,), (account, principal, collateral, data["rate_ppm"], ts, due,
                                  "open", 0, 0))
        _add(state, LOAN_HISTORY, (account,), 1, 0, 0)
    else:  # repay, default
        loan = state.get(LOANS, (data["loan_id"],))
        if loan is None or loan[6] != "open" or loan[0] != data["account"]:
            what = "no such loan" if loan is None else (
                f"it is {loan[6]}" if loan[6] != "open" else f"it is {loan[0][:16]}…'s")
            raise EntryRejected(f"seq {seq}: {kind} of loan {data['loan_id']} by "
                                f"{data['account'][:16]}…: {what}")
        account, principal, collateral, rate, start, due = loan[:6]
        if kind == "repay":
            if ts > due:
                raise EntryRejected(f"seq {seq}: loan {data['loan_id']} was due at {due} ms; "
                                    f"at {ts} ms it can only default")
            interest = _kinds.interest_cu(principal, rate, start, ts)
            if data["interest"] != interest:
                raise EntryRejected(f"seq {seq}: loan {data['loan_id']} owes {interest} CU of "
                                    f"interest at {ts} ms, not {data['interest']}")
            _add(state, ESCROW, (account,), -collateral)
            _credit(state, account, collateral)
            _debit(state, account, principal + interest, seq, "repay")
            state.put(POOL, POOL_KEY, (cash + principal + interest, lent - principal, shares))
            state.put(LOANS, (data["loan_id"],), (*loan[:6], "repaid", interest, ts))
            _add(state, LOAN_HISTORY, (account,), 0, 1, 0)
        else:
            if ts <= due:
                raise EntryRejected(f"seq {seq}: loan {data['loan_id']} is not due until {due} ms "
                                    f"(entry ts {ts} ms)")
            burn = _kinds.default_burn(collateral)
            if data["burn"] != burn:
                raise EntryRejected(f"seq {seq}: default of loan {data['loan_id']} burns {burn} CU "
                                    f"of its {collateral} CU collateral, not {data['burn']}")
            _add(state, ESCROW, (account,), -collateral)
            state.put(POOL, POOL_KEY, (cash + collateral - burn, lent - principal, shares))
            _add_supply(state, "burned", burn)
            state.put(LOANS, (data["loan_id"],), (*loan[:6], "defaulted", 0, ts))
            _add(state, LOAN_HISTORY, (account,), 0, 0, 1)


LENDING_KINDS = frozenset({"deposit", "withdraw", "borrow", "repay", "default"})


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
    ts = fields["ts"]
    if kind in LENDING_KINDS:
        _lending(state, kind, data, seq, ts)
    elif kind == "heartbeat":
        state.put(HEARTBEATS, (data["account"], ts // _kinds.HOUR_MS), (seq,))
    elif kind == "grant":
        _seen(state, data["account"], ts)
        _credit(state, data["account"], data["cu"])
        _add_supply(state, "granted", data["cu"])
    elif kind == "burn":
        _debit(state, data["account"], data["cu"], seq, "burn")
        _add_supply(state, "burned", data["cu"])
    elif kind == "transfer":
        _debit(state, data["from"], data["cu"], seq, "transfer")
        _seen(state, data["to"], ts)
        _credit(state, data["to"], data["cu"])
    elif kind in ("trade", "unsettled"):
        terms = data["terms"]
        key = (terms["consumer"], terms["nonce"])
        seen = state.get(TRADE_NONCES, key)
        if seen is not None:
            raise EntryRejected(
                f"seq {seq}: trade nonce {terms['nonce']!r} of consumer "
                f"{terms['consumer'][:16]}… was already used at seq {seen[0]} (replay)"
            )
        state.put(TRADE_NONCES, key, (seq,))
        if kind == "unsettled":  # the nonce is spent; no CU moves; the consumer's standing drops
            row = state.get(UNSETTLED, (terms["consumer"],))
            state.put(UNSETTLED, (terms["consumer"],), ((row[0] if row else 0) + 1, seq))
            return
        _debit(state, terms["consumer"], terms["cu"], seq, "trade")
        _seen(state, terms["provider"], ts)
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
    elif kind in ("audit", "dispute"):
        _audited(state, fields)


def _audited(state: State, fields: dict[str, Any]) -> None:
    """An audit's outcome: once per trade and auditor, counted in the parties' records."""
    data, seq = fields["data"], fields["seq"]
    if fields["kind"] == "audit":
        key, provider, verdict = (data["trade_id"], fields["actor"]), data["provider"], "passed"
    else:
        claim = data["claim"]
        key = (_kinds.trade_id(claim["trade"]), claim["auditor"])
        provider, verdict = claim["trade"]["terms"]["provider"], data["verdict"]
    seen = state.get(AUDITS, key)
    if seen is not None:
        raise EntryRejected(f"seq {seq}: auditor {key[1][:16]}… already audited trade "
                            f"{key[0][:16]}… at seq {seen[2]} ({seen[1]})")
    state.put(AUDITS, key, (provider, verdict, seq))
    if verdict == "passed":
        _add(state, AUDIT_RECORD, (provider,), 1, 0, 0)
    elif verdict == "upheld":
        _add(state, AUDIT_RECORD, (provider,), 0, 1, 0)
    else:
        _add(state, AUDIT_RECORD, (key[1],), 0, 0, 1)


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

    def held(self) -> int:
        """Σ balances + Σ escrow + pool cash: what conservation says grants − burns must be."""
        return int(sum(v[0] for v in self.tables[ACCOUNTS.table].values())
                   + sum(v[0] for v in self.tables[ESCROW.table].values())
                   + pool_row(self)[0])


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
            row: Row | None = self.conn.execute(self._sql[view.table][0], key).fetchone()
            return row

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
