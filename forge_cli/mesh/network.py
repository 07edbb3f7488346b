"""The network view: every dual-signed trade this node has verified, its own and its peers'.

Kept in its own SQLite file (FORGE_HOME/network.db, WAL, synchronous=NORMAL): it is a cache
that the node's own ledger and its peers' gossip can always rebuild, so a power cut that
loses its tail costs a re-pull, never money. It also keeps what gossip remembers per peer:
the pull cursor, the last verified checkpoint, and a fork flag.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge_cli import canonical, parallel
from forge_cli.errors import StorageError, TradeRejected
from forge_cli.ledger import entries, merkle, queries

log = logging.getLogger("forge.network")

OWN = "ledger"  # the `source` of trades read from this node's own ledger
# An account's earned or spent total never passes 2^62, so SQLite keeps it an exact integer
# (a sum past 2^63 would silently turn into a REAL); a trade that would pass it is refused.
MAX_ACCOUNT_TOTAL = 2**62

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS trades (
        seq INTEGER PRIMARY KEY,          -- arrival order here, from 1: what pulls page by
        id BLOB NOT NULL UNIQUE,          -- entries.trade_id: sha256 of the canonical data
        leaf BLOB NOT NULL,               -- RFC 9162 leaf hash of the canonical data
        data BLOB NOT NULL,               -- canonical {terms, provider_sig, consumer_sig}
        provider TEXT NOT NULL, consumer TEXT NOT NULL, nonce TEXT NOT NULL,
        cu INTEGER NOT NULL, source TEXT NOT NULL, ts INTEGER NOT NULL,
        own INTEGER NOT NULL DEFAULT 0,   -- 1: also in this node's ledger (whoever told us first)
        rank INTEGER NOT NULL DEFAULT 0,  -- its parties' best trust here (bp): what eviction keeps
        UNIQUE (consumer, nonce))""",
    "CREATE INDEX IF NOT EXISTS trades_by_id ON trades (id, leaf)",
    """CREATE TABLE IF NOT EXISTS accounts (account TEXT PRIMARY KEY,
        earned INTEGER NOT NULL DEFAULT 0, spent INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS peers (node_id TEXT PRIMARY KEY,
        cursor INTEGER NOT NULL DEFAULT 0,  -- how far we pulled from its view
        pushed INTEGER NOT NULL DEFAULT 0,  -- how far into ours it was pushed
        cp_size INTEGER, cp_root BLOB, cp_note TEXT,
        flag TEXT, flagged_ms INTEGER) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
]

ACCEPTED, DUPLICATE = "accepted", "duplicate"


@dataclass(frozen=True)
class Checked:
    """A trade that passed every check that needs no database: shape, encoding, signatures."""

    id: bytes
    raw: bytes
    data: dict[str, Any]

    @property
    def terms(self) -> dict[str, Any]:
        return self.data["terms"]


def check_trade(data: Any) -> Checked:
    """A trade's identity and canonical bytes if it is well-formed and both signatures verify;
    TradeRejected naming the first problem otherwise."""
    item = parse_trade(data)
    verify_trade(item)
    return item


def parse_trade(data: Any) -> Checked:
    """A well-formed trade's identity and canonical bytes, signatures not yet checked."""
    if not isinstance(data, dict):
        raise TradeRejected(f"a trade is an object {{terms, provider_sig, consumer_sig}}, "
                            f"found {type(data).__name__}")
    reason = entries.KINDS["trade"](data)
    if reason:
        raise TradeRejected(f"malformed trade: {reason}")
    try:
        raw = canonical.encode(data)
    except canonical.CanonicalError as exc:
        raise TradeRejected(f"malformed trade: {exc}") from None
    return Checked(hashlib.sha256(raw).digest(), raw, data)


PARTIES = ("provider", "consumer")


def verify_trade(item: Checked) -> None:
    """TradeRejected unless both parties' signatures over the terms verify."""
    problem = _verify_all([item])[0]
    if problem is not None:
        raise problem


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except (ValueError, TypeError):
        return b""  # never verifies


def _verify_all(items: Sequence[Checked]) -> list[TradeRejected | None]:
    """verify_trade for each item, outcomes at their index: None, or why it was refused.
    The signatures of the whole batch are checked together, on every core."""
    checks: list[tuple[bytes, bytes, bytes]] = []
    for item in items:
        # entries.trade_message, minus a second canonical check of terms `parse_trade` checked.
        message = entries.TRADE_DOMAIN + canonical.dumps_checked_parts(item.terms)
        checks.extend((_hex(item.terms[party]), message, _hex(item.data[f"{party}_sig"]))
                      for party in PARTIES)
    valid = parallel.verify_all(checks)
    out: list[TradeRejected | None] = []
    for i in range(len(items)):
        bad = [party for j, party in enumerate(PARTIES) if not valid[len(PARTIES) * i + j]]
        out.append(TradeRejected(
            f"forged trade: {bad[0]} signature over the trade terms does not verify")
            if bad else None)
    return out


@dataclass
class PeerState:
    node_id: str
    cursor: int = 0
    pushed: int = 0
    cp_size: int | None = None
    cp_root: bytes | None = None
    cp_note: str | None = None
    flag: str | None = None
    flagged_ms: int | None = None


class NetworkView:
    """The set of verified dual-signed trades, with an order-independent Merkle root.

    Example::

        view = NetworkView.open(home / "network.db")
        view.add(trade_data, source=peer_node_id)   # "accepted" or "duplicate", or raises
        view.count(), view.root().hex(), view.balance(account)

    The root is `merkle.root` over the canonical bytes of every trade, taken in order of
    trade id (sha256 of those bytes): two honest nodes that verified the same set of trades
    compute the same root, whatever order the trades reached them in.

    Thread-safe: one connection behind a lock. Signatures are verified before the lock is
    taken, so verifying threads do not wait for each other.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.lock = threading.Lock()
        self._root: bytes | None = None  # cached until the next trade arrives
        # Trades here that are not (yet known to be) in this node's own ledger.
        self._foreign: int = conn.execute("SELECT count(*) FROM trades WHERE own = 0").fetchone()[0]
        # Called (outside the lock) with each batch of newly accepted trades' arrival seqs.
        self.listeners: list[Callable[[list[int]], None]] = []
        self._evicted = False  # a trade was evicted in the transaction under way
        self.evictions = 0  # foreign trades evicted since this view was opened

    @classmethod
    def open(cls, path: str | Path) -> NetworkView:
        path = Path(path)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            for ddl in SCHEMA:
                conn.execute(ddl)
            if "rank" not in {row[1] for row in conn.execute("PRAGMA table_info(trades)")}:
                conn.execute("ALTER TABLE trades ADD COLUMN rank INTEGER NOT NULL DEFAULT 0")
            conn.execute("CREATE INDEX IF NOT EXISTS trades_by_rank ON trades (own, rank, seq)")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the network view {path}: {exc}") from exc
        return cls(path, conn)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # -- adding trades -----------------------------------------------------------------------

    def add(self, data: Any, source: str) -> str:
        """Verify one trade and add it: "accepted", or "duplicate" when this exact trade is
        already here; TradeRejected (HTTP 422) naming why it is not acceptable."""
        outcome = self.add_many([data], source)[0]
        if isinstance(outcome, TradeRejected):
            raise outcome
        return outcome

    def add_many(self, batch: Sequence[Any], source: str, *, room: int | None = None,
                 full: str = "", cap: int | None = None,
                 rank: Callable[[str], int] | None = None) -> list[str | TradeRejected]:
        """Verify and add a batch in one transaction; one outcome per trade, in order.

        `source` is what the sender says it is, kept only so its trades are not pushed back
        to it. With `room`, at most that many new trades are taken; the others are refused
        unverified, with `full` as the reason (TradeRejected with `quota` set).

        With `cap`, the view keeps at most that many foreign trades: a new one past it evicts
        the foreign trade of the lowest rank (the oldest among equals) whose rank is at most
        its own, or is refused (TradeRejected with `quota` set) when every one ranks higher.
        A trade's rank is the best `rank(key)` of its two parties (trust here, in bp), so a
        trade between keys nobody here trusts (rank 0) never evicts one a trusted key made,
        and this node's own trades are never evicted.
        """
        outcomes: list[str | TradeRejected] = []
        parsed: list[tuple[int, Checked]] = []
        for i, data in enumerate(batch):
            try:
                parsed.append((i, parse_trade(data)))
                outcomes.append(ACCEPTED)
            except TradeRejected as exc:
                outcomes.append(exc)
        # A trade already here is the same bytes we verified once: skip its signatures (a
        # peer pushing history we pulled costs a lookup, not two verifies).
        known = self._known([item.id for _, item in parsed])
        fresh = [(i, item) for i, item in parsed if item.id not in known]
        for i, item in parsed:
            if item.id in known:
                outcomes[i] = DUPLICATE
        if room is not None and len(fresh) > room:
            for i, _ in fresh[room:]:
                outcomes[i] = TradeRejected(full or "over quota", forged=False, quota=True)
            fresh = fresh[:room]
        checked: list[tuple[int, Checked]] = []
        for (i, item), problem in zip(fresh, _verify_all([item for _, item in fresh]),
                                      strict=True):
            if problem is None:
                checked.append((i, item))
            else:
                outcomes[i] = problem
        if checked:
            ranks = {i: max(rank(item.terms["consumer"]), rank(item.terms["provider"]))
                     for i, item in checked} if rank is not None else {}
            for i, outcome in self._insert(checked, source, cap=cap, ranks=ranks):
                outcomes[i] = outcome
        return outcomes

    def _known(self, ids: list[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        with self.lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                found.update(bytes(row[0]) for row in self.conn.execute(
                    f"SELECT id FROM trades WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def add_own(self, data: dict[str, Any], ledger_seq: int) -> str:
        """A trade from this node's own ledger, which verified it before appending: recorded
        without verifying again, and the ledger position remembered for the next backfill."""
        raw = canonical.encode(data)
        item = Checked(hashlib.sha256(raw).digest(), raw, data)
        (_, outcome), = self._insert([(0, item)], OWN, own=True, ledger_next=ledger_seq + 1)
        if isinstance(outcome, TradeRejected):
            raise outcome
        return outcome

    def _insert(self, items: Iterable[tuple[int, Checked]], source: str, *, own: bool = False,
                ledger_next: int | None = None, cap: int | None = None,
                ranks: dict[int, int] | None = None
                ) -> list[tuple[int, str | TradeRejected]]:
        results: list[tuple[int, str | TradeRejected]] = []
        new: list[int] = []
        now = time.time_ns() // 1_000_000
        with self.lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for i, item in items:
                    terms = item.terms
                    too_large = self._past_total(item)
                    if too_large:
                        results.append((i, too_large))
                        continue
                    rank = (ranks or {}).get(i, 0)
                    if not own and cap is not None and self._foreign >= cap and \
                            not self._evict(rank):
                        results.append((i, TradeRejected(
                            f"the network view holds its {cap} foreign trades "
                            "(mesh.gossip_max_trades), each made by a key trusted here more "
                            "than this trade's parties", forged=False, quota=True)))
                        continue
                    try:
                        cur = conn.execute(
                            "INSERT INTO trades (id, leaf, data, provider, consumer, nonce, cu, "
                            "source, ts, own, rank) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (item.id, merkle.leaf_hash(item.raw), item.raw, terms["provider"],
                             terms["consumer"], terms["nonce"], terms["cu"], source, now,
                             int(own), rank))
                    except sqlite3.IntegrityError:  # the trade, or its (consumer, nonce), is here
                        outcome = self._conflict(item)
                        if outcome == DUPLICATE and own:  # a peer told us first
                            self._foreign -= conn.execute(
                                "UPDATE trades SET own = 1 WHERE id = ? AND own = 0",
                                (item.id,)).rowcount
                        results.append((i, outcome))
                        continue
                    new.append(cur.lastrowid or 0)  # an INSERT's row id: never 0 or None
                    self._foreign += not own
                    for account, column in ((terms["provider"], "earned"),
                                            (terms["consumer"], "spent")):
                        conn.execute(f"INSERT INTO accounts (account, {column}) VALUES (?, ?) "
                                     f"ON CONFLICT (account) DO UPDATE SET "
                                     f"{column} = {column} + excluded.{column}",
                                     (account, terms["cu"]))
                    results.append((i, ACCEPTED))
                if ledger_next is not None:
                    self._set_meta("ledger_next", ledger_next)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                self._foreign = conn.execute(
                    "SELECT count(*) FROM trades WHERE own = 0").fetchone()[0]
                raise
            if new or self._evicted:
                self._root = None
                self._evicted = False
        if new:
            for listener in self.listeners:
                listener(new)
        return results

    def _evict(self, rank: int) -> bool:
        """Delete the foreign trade of the lowest rank, at most `rank` (the oldest among
        equals), taking its CU off its parties' totals; False when every one ranks higher.
        Called inside _insert's transaction."""
        row = self.conn.execute(
            "SELECT seq, consumer, provider, cu FROM trades WHERE own = 0 AND rank <= ? "
            "ORDER BY rank, seq LIMIT 1", (rank,)).fetchone()
        if row is None:
            return False
        seq, consumer, provider, cu = row
        self.conn.execute("DELETE FROM trades WHERE seq = ?", (seq,))
        for account, column in ((provider, "earned"), (consumer, "spent")):
            self.conn.execute(f"UPDATE accounts SET {column} = {column} - ? WHERE account = ?",
                              (cu, account))
            self.conn.execute("DELETE FROM accounts WHERE account = ? AND earned = 0 AND "
                              "spent = 0", (account,))
        self._foreign -= 1
        self._evicted = True
        self.evictions += 1
        return True

    def rerank(self, rank: Callable[[str], int]) -> int:
        """Raise the rank of foreign trades at rank 0 whose parties are trusted now (trust
        grows after a trade arrives); returns how many changed. O(rank-0 trades)."""
        with self.lock:
            rows = self.conn.execute("SELECT seq, consumer, provider FROM trades "
                                     "WHERE own = 0 AND rank = 0").fetchall()
        raised = [(r, seq) for seq, c, p in rows if (r := max(rank(c), rank(p))) > 0]
        if raised:
            with self.lock:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.executemany("UPDATE trades SET rank = ? WHERE seq = ?", raised)
                self.conn.execute("COMMIT")
        return len(raised)

    def _past_total(self, item: Checked) -> TradeRejected | None:
        """Why adding this (new) trade would take an account's total past MAX_ACCOUNT_TOTAL."""
        terms = item.terms
        if self.conn.execute("SELECT 1 FROM trades WHERE id = ?", (item.id,)).fetchone():
            return None  # already here: the insert finds it a duplicate
        for account, column in ((terms["provider"], "earned"), (terms["consumer"], "spent")):
            row = self.conn.execute(f"SELECT {column} FROM accounts WHERE account = ?",
                                    (account,)).fetchone()
            if (row[0] if row else 0) + terms["cu"] > MAX_ACCOUNT_TOTAL:
                return TradeRejected(f"account {account[:16]}… would have {column} more than "
                                     f"2^62 CU in total; the trade is refused", forged=False)
        return None

    def _conflict(self, item: Checked) -> str | TradeRejected:
        if self.conn.execute("SELECT 1 FROM trades WHERE id = ?", (item.id,)).fetchone():
            return DUPLICATE
        consumer, nonce = item.terms["consumer"], item.terms["nonce"]
        (clash,) = self.conn.execute("SELECT id FROM trades WHERE consumer = ? AND nonce = ?",
                                     (consumer, nonce)).fetchone()
        return TradeRejected(f"replayed nonce: consumer {consumer[:16]}… already used nonce "
                             f"{nonce!r} in trade {bytes(clash).hex()[:16]}…", forged=False)

    def _set_meta(self, key: str, value: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def follow(self, ledger: Any) -> None:
        """Take in `ledger`'s trades: those appended since the last run now, then each new one
        as the ledger commits it (a listener on the ledger's writer thread)."""
        self.backfill(ledger)

        def on_append(entry: Any) -> None:
            if entry.kind != "trade":
                return
            try:
                self.add_own(entry.data, entry.seq)
            except TradeRejected as exc:  # our ledger accepted it: the view must not lose it
                log.error("trade at ledger seq %d conflicts with the network view: %s",
                          entry.seq, exc)

        ledger.listeners.append(on_append)

    def backfill(self, ledger: Any) -> int:
        """Add the trades of `ledger` (a forge Ledger) appended since the last backfill;
        returns how many were new here."""
        with self.lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'ledger_next'").fetchone()
        start = row[0] if row else 0
        added = 0
        for seq, data in queries.trades_from(ledger, start):
            added += self.add_own(data, seq) == ACCEPTED
        with self.lock:
            self._set_meta("ledger_next", max(start, ledger.size))
        return added

    # -- reading ---------------------------------------------------------------------------

    def count(self) -> int:
        with self.lock:
            return self.conn.execute("SELECT coalesce(max(seq), 0) FROM trades").fetchone()[0]

    def root(self) -> bytes:
        """MTH of the trades' canonical bytes in trade-id order (cached until the next add)."""
        with self.lock:
            if self._root is None:
                peaks = merkle.CompactRange()
                for (leaf,) in self.conn.execute("SELECT leaf FROM trades ORDER BY id"):
                    peaks.append(bytes(leaf))
                self._root = peaks.root()
            return self._root

    def since(self, cursor: int, limit: int, max_bytes: int | None = None
              ) -> tuple[list[bytes], int]:
        """Up to `limit` trades' canonical bytes in arrival order after the first `cursor`
        (0: from the start), and the cursor to ask for next. With `max_bytes`, the trades stop
        before their bytes (and a comma each) pass it, the first excepted: a page served to a
        peer fits the cap it reads pages with."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT seq, data FROM trades WHERE seq > ? ORDER BY seq LIMIT ?",
                (cursor, limit)).fetchall()
        if max_bytes is not None:
            size = 0
            for i, (_, data) in enumerate(rows):
                size += len(data) + 1
                if size > max_bytes and i:
                    rows = rows[:i]
                    break
        return [bytes(data) for _, data in rows], (rows[-1][0] if rows else cursor)

    def pending_for(self, cursor: int, peer: str, limit: int) -> tuple[list[bytes], int]:
        """What to push to `peer` from position `cursor`: trades it did not send us."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT seq, data, source FROM trades WHERE seq > ? ORDER BY seq LIMIT ?",
                (cursor, limit)).fetchall()
        return ([bytes(data) for _, data, source in rows if source != peer],
                rows[-1][0] if rows else cursor)

    def trade_edges(self) -> list[tuple[str, str, int, int, bool]]:
        """(consumer, provider, cu, ts, own) of every trade here, for trust (mesh.trust):
        ts is when this node verified it (the parties' signed ts is only their word)."""
        with self.lock:
            return [(c, p, cu, ts, bool(own)) for c, p, cu, ts, own in self.conn.execute(
                "SELECT consumer, provider, cu, ts, own FROM trades")]

    def contains(self, trade_id: str) -> bool:
        with self.lock:
            return self.conn.execute("SELECT 1 FROM trades WHERE id = ?",
                                     (bytes.fromhex(trade_id),)).fetchone() is not None

    def balance(self, account: str) -> int:
        """What `account` earned minus what it spent over every trade in the view (DESIGN §7
        remote balances; the free-tier allowance is the caller's to add)."""
        with self.lock:
            row = self.conn.execute("SELECT earned - spent FROM accounts WHERE account = ?",
                                    (account,)).fetchone()
        return row[0] if row else 0

    def foreign(self) -> int:
        """Trades here that are not in this node's own ledger (what gossip quotas bound)."""
        with self.lock:
            return self._foreign

    def accounts(self) -> int:
        with self.lock:
            return self.conn.execute("SELECT count(*) FROM accounts").fetchone()[0]

    def summary(self) -> dict[str, Any]:
        """Count, root and what gossip knows, for GET /v1/forge/network."""
        root = self.root().hex()
        with self.lock:
            own = self.conn.execute("SELECT count(*) FROM trades WHERE own = 1").fetchone()[0]
            # Held now: eviction leaves gaps in seq, so max(seq) (the pull cursor's count)
            # can be larger.
            total = self.conn.execute("SELECT count(*) FROM trades").fetchone()[0]
            flagged = [{"node_id": node_id, "flag_reason": flag, "flagged_ms": at}
                       for node_id, flag, at in self.conn.execute(
                           "SELECT node_id, flag, flagged_ms FROM peers WHERE flag IS NOT NULL "
                           "ORDER BY node_id")]
            accounts = self.conn.execute("SELECT count(*) FROM accounts").fetchone()[0]
        return {"trades": total, "root": root, "own_trades": own, "foreign_trades": total - own,
                "accounts": accounts, "flagged_peers": flagged, "evicted": self.evictions}

    # -- per-peer gossip state -------------------------------------------------------------

    def peer(self, node_id: str) -> PeerState:
        with self.lock:
            row = self.conn.execute(
                "SELECT cursor, pushed, cp_size, cp_root, cp_note, flag, flagged_ms FROM peers "
                "WHERE node_id = ?", (node_id,)).fetchone()
        if row is None:
            return PeerState(node_id)
        cursor, pushed, size, root, text, flag, at = row
        return PeerState(node_id, cursor, pushed, size,
                         bytes(root) if root is not None else None, text, flag, at)

    def set_cursor(self, node_id: str, cursor: int) -> None:
        """Remember how far this node has pulled from `node_id`'s network view."""
        self._upsert(node_id, "cursor = ?", cursor)

    def set_pushed(self, node_id: str, pushed: int) -> None:
        """Remember how far into this view `node_id` has been pushed."""
        self._upsert(node_id, "pushed = ?", pushed)

    def save_checkpoint(self, node_id: str, size: int, root: bytes, note_text: str) -> None:
        """Remember the last verified checkpoint of `node_id`'s ledger."""
        self._upsert(node_id, "cp_size = ?, cp_root = ?, cp_note = ?", size, root, note_text)

    def flag(self, node_id: str, reason: str) -> None:
        """Mark `node_id` untrusted for good (its log forked)."""
        self._upsert(node_id, "flag = ?, flagged_ms = ?", reason, time.time_ns() // 1_000_000)

    def _upsert(self, node_id: str, assignments: str, *values: Any) -> None:
        with self.lock:
            self.conn.execute("INSERT OR IGNORE INTO peers (node_id) VALUES (?)", (node_id,))
            self.conn.execute(f"UPDATE peers SET {assignments} WHERE node_id = ?",
                              (*values, node_id))

    def flags(self) -> dict[str, str]:
        """node id → why that peer is flagged, for every flagged peer."""
        with self.lock:
            return dict(self.conn.execute(
                "SELECT node_id, flag FROM peers WHERE flag IS NOT NULL").fetchall())
