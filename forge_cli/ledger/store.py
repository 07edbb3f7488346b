"""The ledger file: SQLite in WAL mode, one writer (flock), any number of readers.

Appending an entry writes, in one transaction: the entry row, its bodies, the Merkle nodes it
completes, and the view rows it changes. The Merkle root is kept incrementally (a compact
range of O(log n) peaks), so neither appends nor reopening read the whole ledger.
The writer checks around every commit that its files on disk are still the ones it opened:
a deleted -wal would otherwise take every acknowledged entry with it. Signing lives in
`signing`, import in `importer`, witnessing in `witness`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge_cli import canonical, identity
from forge_cli.errors import (
    EntryRejected,
    LedgerError,
    LedgerFilesChanged,
    LedgerLocked,
    UsageError,
)
from forge_cli.ledger import entries, merkle, note, views
from forge_cli.ledger.entries import Entry
from forge_cli.ledger.signing import LeafSigner, SignWorker

APPLICATION_ID = 0x46524745  # "FRGE" in the SQLite header
SCHEMA_VERSION = 1
PARALLEL_SIGN_MIN = 512  # batches this large are signed on a helper process
CORES = os.cpu_count() or 1

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS entries (
        seq INTEGER PRIMARY KEY, hash BLOB NOT NULL, entry BLOB NOT NULL, sig BLOB NOT NULL,
        kind TEXT NOT NULL, ts INTEGER NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS bodies (hash TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID",
    """CREATE TABLE IF NOT EXISTS merkle_nodes (level INTEGER NOT NULL, idx INTEGER NOT NULL,
        hash BLOB NOT NULL, PRIMARY KEY (level, idx)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, root BLOB NOT NULL,
        note TEXT NOT NULL, vkey TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS witnessed (origin TEXT PRIMARY KEY, size INTEGER NOT NULL,
        root BLOB NOT NULL, note TEXT NOT NULL, log_vkey TEXT NOT NULL,
        witness_vkey TEXT NOT NULL)""",
    # Cosignatures peers returned on this ledger's checkpoints (ledger.witness), each verified.
    """CREATE TABLE IF NOT EXISTS cosignatures (size INTEGER NOT NULL, witness_vkey TEXT NOT NULL,
        line TEXT NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY (size, witness_vkey))""",
    # Two checkpoints of one log that cannot both be true (a split view), both signed by it.
    """CREATE TABLE IF NOT EXISTS fork_evidence (origin TEXT NOT NULL, size INTEGER NOT NULL,
        note_a TEXT NOT NULL, note_b TEXT NOT NULL, PRIMARY KEY (origin, size))""",
    *(view.ddl() for view in views.VIEWS),
]
TABLES = ("entries", "bodies", "merkle_nodes", "checkpoints", "witnessed", "cosignatures",
          "fork_evidence", *(view.table for view in views.VIEWS))


@dataclass
class Draft:
    """An entry to append: kind, data, optional causal parent and bodies."""

    kind: str
    data: dict[str, Any]
    parent: int | None = None
    bodies: Sequence[bytes] = field(default_factory=tuple)
    ts: int | None = None


FILE_SUFFIXES = ("", "-wal", "-shm")  # the database and SQLite's WAL and shared-memory index
FileIds = dict[str, tuple[int, int] | None]


def file_ids(path: Path) -> FileIds:
    """(st_dev, st_ino) of the database file and its -wal and -shm (None where absent)."""
    ids: FileIds = {}
    for suffix in FILE_SUFFIXES:
        try:
            st = os.stat(f"{path}{suffix}")
        except FileNotFoundError:
            ids[suffix] = None
        else:
            ids[suffix] = (st.st_dev, st.st_ino)
    return ids


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LedgerError(f"cannot create lock file {lock_path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerLocked(
            f"ledger {path} is locked by another writer (a running forge node?); "
            "only one process may write at a time",
            hint="stop the other writer, or use read-only commands (verify, show, root)",
        ) from None
    return fd


class Ledger:
    """A ledger file opened for reading, or for writing by the one writer."""

    def __init__(self, path: Path, conn: sqlite3.Connection, *, signer: identity.Identity | None,
                 lock_fd: int | None) -> None:
        self.path = path
        self.conn = conn
        self.signer = signer
        self._lock_fd = lock_fd
        self._state = views.SqliteState(conn)
        self._queue_lock = threading.Lock()
        self._queue: list[tuple[Draft, Future[Entry]]] = []
        self._leading = False
        self._sign_pool: SignWorker | None = None
        self._files: FileIds | None = None  # the writer's files as opened (None: a reader)
        self._files_changed: str | None = None  # once they change, every write is refused
        # Called with every entry once it is committed (the node's live feed listens here).
        self.listeners: list[Callable[[Entry], None]] = []
        self._load_tip()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open_writer(cls, path: str | os.PathLike[str], signer: identity.Identity, *,
                    synchronous: str = "full") -> Ledger:
        """Open (creating if needed) for appending; LedgerLocked if another writer holds it."""
        path = Path(path)
        if synchronous not in ("full", "normal"):
            raise UsageError(f"synchronous must be full or normal, found {synchronous!r}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create {path.parent}: {exc.strerror}") from exc
        fd = _lock(path)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            cls._check_header(conn, path, creating=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            conn.execute("BEGIN IMMEDIATE")
            existing = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            for ddl in SCHEMA:
                conn.execute(ddl)
            if "entries" in existing:
                cls._backfill(conn, [v for v in views.VIEWS if v.table not in existing])
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
            book = cls(path, conn, signer=signer, lock_fd=fd)
            book._files = file_ids(path)
            return book
        except sqlite3.DatabaseError as exc:
            os.close(fd)
            raise LedgerError(f"cannot open ledger {path}: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _backfill(conn: sqlite3.Connection, new: list[views.View]) -> None:
        """Fill view tables added by a newer forge by replaying the entries already stored."""
        if not new:
            return
        state = views.MemoryState()
        try:
            for (raw,) in conn.execute("SELECT entry FROM entries ORDER BY seq"):
                state.apply(canonical.decode(raw))
        except (UsageError, EntryRejected) as exc:
            raise LedgerError(f"cannot build the new tables {', '.join(v.table for v in new)} "
                              f"by replay: {exc}", hint="run `forge ledger verify --deep`") from exc
        for view in new:
            marks = ", ".join("?" * (len(view.key) + len(view.value)))
            conn.executemany(f"INSERT INTO {view.table} VALUES ({marks})",
                             [key + value for key, value in state.tables[view.table].items()])

    @classmethod
    def open_reader(cls, path: str | os.PathLike[str]) -> Ledger:
        """Open read-only; works while a writer is appending."""
        path = Path(path)
        if not path.exists():
            raise LedgerError(f"no ledger at {path} (nothing has been recorded there yet)")
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
            # A reader never writes, so it can never be the one that checkpoints or recreates
            # the writer's -wal (mode=ro, and query_only as a second lock on the door).
            conn.execute("PRAGMA query_only=1")
            cls._check_header(conn, path, creating=False)
            return cls(path, conn, signer=None, lock_fd=None)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"cannot read ledger {path}: {exc}") from exc

    @staticmethod
    def _check_header(conn: sqlite3.Connection, path: Path, *, creating: bool) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        empty = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        if creating and empty:
            return
        if app_id != APPLICATION_ID:
            raise LedgerError(f"{path} is not a forge ledger (SQLite application id {app_id:#x})")
        if version != SCHEMA_VERSION:
            raise LedgerError(f"{path} has ledger schema {version}; this forge reads {SCHEMA_VERSION}")

    def check_files(self) -> None:
        """LedgerFilesChanged unless the writer's files on disk are still the ones it opened.

        Cheap (three stat calls): run before and after every commit, and before a spend
        starts. On the first mismatch the committed entries, which SQLite still reaches
        through its open descriptors, are saved (see `_rescue`); from then on every write
        is refused, so nothing is acknowledged that a restart would lose.
        """
        if self._files is None:
            return
        if self._files_changed is None:
            now = file_ids(self.path)
            changed = [suffix for suffix, was in self._files.items()
                       if was is not None and now[suffix] != was]
            for suffix, was in self._files.items():
                if was is None and now[suffix] is not None:
                    self._files[suffix] = now[suffix]  # created since opening: adopt it
            if not changed:
                return
            names = ", ".join(f"{self.path}{suffix}" for suffix in changed)
            self._files_changed = (
                f"ledger files changed under the running node: {names} was deleted or replaced "
                f"after the node opened it; {self._rescue(changed)}. Every write is refused "
                "until the node restarts")
        raise LedgerFilesChanged(self._files_changed,
                                 hint="restart the node; do not delete or move ledger.db-wal, "
                                      "ledger.db-shm or ledger.db while a node runs")

    def _rescue(self, changed: list[str]) -> str:
        """Save what this connection has committed; says where it went."""
        try:
            if "" not in changed:  # the database file is ours: copy the WAL's pages into it
                busy, log, done = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy and log in (done, -1, 0):
                    return f"every committed entry was copied back into {self.path}"
            target = self.path.with_name(self.path.name + ".rescued")
            copy = sqlite3.connect(target)
            try:
                self.conn.backup(copy)
            finally:
                copy.close()
            return f"every committed entry was saved to {target}"
        except (sqlite3.Error, OSError) as exc:
            return f"saving the committed entries failed ({exc})"

    def _pool(self) -> SignWorker | None:
        """The signing process for large batches (started on first use, kept until close)."""
        if CORES == 1 or self.signer is None:
            return None
        if self._sign_pool is None:
            self._sign_pool = SignWorker(self.signer)
        return self._sign_pool

    def close(self) -> None:
        if self._sign_pool is not None:
            self._sign_pool.close()
            self._sign_pool = None
        self.conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Catch up with what the writer committed since this reader opened (cheap)."""
        if self._lock_fd is None:
            self._load_tip()

    def _load_tip(self) -> None:
        row = self.conn.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        self.size = 0 if row is None else row[0] + 1
        self.head = bytes.fromhex(entries.GENESIS_PREV) if row is None else row[1]
        self._range_cache: merkle.CompactRange | None = None

    @property
    def _range(self) -> merkle.CompactRange:
        # Loaded on first use, so that verify can open a damaged file and report on it.
        if self._range_cache is None:
            peaks = [self.node(level, idx) for level, idx in merkle.peak_positions(self.size)]
            self._range_cache = merkle.CompactRange(self.size, peaks)
        return self._range_cache

    @_range.setter
    def _range(self, value: merkle.CompactRange) -> None:
        self._range_cache = value

    # -- reading -----------------------------------------------------------------------------

    def node(self, level: int, idx: int) -> bytes:
        """Hash of the perfect subtree at (level, idx); level 0 are the entry hashes."""
        if level == 0:
            row = self.conn.execute("SELECT hash FROM entries WHERE seq = ?", (idx,)).fetchone()
        else:
            row = self.conn.execute(
                "SELECT hash FROM merkle_nodes WHERE level = ? AND idx = ?", (level, idx)
            ).fetchone()
        if row is None:
            raise LedgerError(f"Merkle node ({level}, {idx}) is missing from {self.path}; "
                              "run `forge ledger verify --deep`")
        return bytes(row[0])

    def root(self, size: int | None = None) -> bytes:
        """Merkle root of the first `size` entries (default: all), RFC 9162 MTH."""
        if size is None or size == self.size:
            return self._range.root()
        self._check_size(size)
        return merkle.subtree_root(0, size, self.node)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise UsageError(f"tree size {size} is outside 0..{self.size}")

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        size = self.size if size is None else size
        self._check_size(size)
        if not 0 <= seq < size:
            raise UsageError(f"seq {seq} is not in a tree of size {size}")
        return merkle.inclusion_path(seq, size, self.node)

    def consistency_proof(self, old: int, new: int | None = None) -> list[bytes]:
        new = self.size if new is None else new
        self._check_size(new)
        if not 0 <= old <= new:
            raise UsageError(f"old size {old} must be between 0 and new size {new}")
        return merkle.consistency_path(old, new, self.node)

    def _entry(self, row: tuple[Any, ...]) -> Entry:
        seq, hash_, raw, sig = row[:4]
        try:
            fields = canonical.decode(raw)
        except UsageError as exc:
            raise LedgerError(f"entry {seq} is unreadable: {exc}") from None
        return Entry(raw=raw, hash=hash_, sig=sig, fields=fields)

    def entry(self, seq: int) -> Entry:
        row = self.conn.execute(
            "SELECT seq, hash, entry, sig FROM entries WHERE seq = ?", (seq,)
        ).fetchone()
        if row is None:
            raise UsageError(f"no entry {seq}; the ledger holds seq 0..{self.size - 1}"
                             if self.size else f"no entry {seq}; the ledger is empty")
        return self._entry(row)

    def iter_rows(self, start: int = 0, end: int | None = None,
                  batch: int = 2048) -> Iterator[list[tuple[Any, ...]]]:
        """Raw rows (seq, hash, entry, sig, kind, ts) in seq order, a batch at a time."""
        if end is None:
            self.refresh()
            end = self.size
        pos = start
        while pos < end:
            rows = self.conn.execute(
                "SELECT seq, hash, entry, sig, kind, ts FROM entries WHERE seq >= ? AND seq < ? "
                "ORDER BY seq", (pos, min(pos + batch, end))
            ).fetchall()
            if not rows:
                return
            yield rows
            pos += batch

    def iter_entries(self, start: int = 0, end: int | None = None,
                     kind: str | None = None) -> Iterator[Entry]:
        if kind is None:
            for rows in self.iter_rows(start, end):
                yield from (self._entry(row) for row in rows)
            return
        if end is None:
            self.refresh()
            end = self.size
        for row in self.conn.execute(
            "SELECT seq, hash, entry, sig FROM entries WHERE kind = ? AND seq >= ? AND seq < ? "
            "ORDER BY seq", (kind, start, end)
        ):
            yield self._entry(row)

    def iter_newest(self, kind: str) -> Iterator[Entry]:
        """Entries of one kind, newest first (stop early: this walks back from the tail)."""
        cursor = self.conn.execute(
            "SELECT seq, hash, entry, sig FROM entries WHERE kind = ? ORDER BY seq DESC", (kind,))
        for row in cursor:
            yield self._entry(row)

    def body(self, body_hash: str) -> bytes | None:
        row = self.conn.execute("SELECT data FROM bodies WHERE hash = ?", (body_hash,)).fetchone()
        return None if row is None else row[0]

    def redacted_at(self, body_hash: str) -> int | None:
        row = self._state.get(views.REDACTIONS, (body_hash,))
        return None if row is None else row[0]

    def balance(self, account: str) -> int:
        row = self._state.get(views.ACCOUNTS, (account,))
        return 0 if row is None else row[0]

    def has_account(self, account: str) -> bool:
        """True once any CU has reached `account` (its row stays, at 0, when spent down)."""
        return self._state.get(views.ACCOUNTS, (account,)) is not None

    def row(self, view: views.View, key: views.Row) -> views.Row | None:
        """One row of a materialised view (its value columns), or None."""
        return self._state.get(view, key)

    def balances(self) -> dict[str, int]:
        return {key[0]: value[0] for key, value in views.table_rows(self.conn, views.ACCOUNTS).items()}

    def checkpoints(self) -> list[tuple[int, bytes, str, str]]:
        """(size, root, note, vkey) of every stored checkpoint, oldest first."""
        return self.conn.execute(
            "SELECT size, root, note, vkey FROM checkpoints ORDER BY size"
        ).fetchall()

    def latest_checkpoint(self) -> tuple[int, bytes, str, str] | None:
        row: tuple[int, bytes, str, str] | None = self.conn.execute(
            "SELECT size, root, note, vkey FROM checkpoints ORDER BY size DESC LIMIT 1"
        ).fetchone()
        return row

    def children(self, seq: int) -> list[int]:
        """Seqs whose parent is `seq` (a scan: causal queries are rare)."""
        return [e.seq for e in self.iter_entries(seq + 1) if e.fields["parent"] == seq]

    # -- writing -----------------------------------------------------------------------------

    def require_writer(self) -> identity.Identity:
        """The signing identity; LedgerError if this ledger was opened read-only."""
        if self.signer is None or self._lock_fd is None:
            raise LedgerError("this ledger was opened read-only")
        return self.signer

    def compact_range(self) -> merkle.CompactRange:
        """A copy of the tree's compact range, to probe roots of entries not yet appended."""
        return merkle.CompactRange(self._range.size, list(self._range.peaks))

    def append(self, kind: str, data: dict[str, Any], *, parent: int | None = None,
               bodies: Sequence[bytes] = (), ts: int | None = None) -> Entry:
        """Append one entry durably and return it.

        Safe to call from many threads: calls that arrive while a commit is in flight are
        written together in the next one (group commit), and each returns only once its own
        entry is durable. A rejected entry raises EntryRejected for its caller alone.
        """
        future: Future[Entry] = Future()
        with self._queue_lock:
            self._queue.append((Draft(kind, data, parent, bodies, ts), future))
            lead, self._leading = not self._leading, True
        if lead:
            self._lead()
        return future.result()

    def _lead(self) -> None:
        batch: list[tuple[Draft, Future[Entry]]] = []
        try:
            while True:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                    if not batch:
                        self._leading = False
                        return
                results: list[Entry | Exception]
                try:
                    results = [*self._write([draft for draft, _ in batch], atomic=False)]
                except Exception as exc:  # I/O error: every caller in this commit hears of it
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results):
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        except BaseException as exc:  # interrupted: nobody may be left waiting
            with self._queue_lock:
                waiting, self._queue, self._leading = batch + self._queue, [], False
            for _, future in waiting:
                if not future.done():
                    future.set_exception(LedgerError(f"append interrupted: {exc!r}"))
            raise

    def append_many(self, drafts: Sequence[Draft]) -> list[Entry]:
        """Append entries in one transaction: all of them are written, or none."""
        return self._write(drafts, atomic=True)  # type: ignore[return-value]

    def _build(self, draft: Draft, actor: str, seq: int,
               prev: bytes) -> tuple[dict[str, Any], bytes, bytes, dict[str, bytes]]:
        entries.check_draft(draft.kind, draft.data)
        if draft.parent is not None and not 0 <= draft.parent < seq:
            raise EntryRejected(f"parent {draft.parent} is not an earlier seq than {seq}")
        body_map = {entries.body_hash(b): bytes(b) for b in draft.bodies}
        fields, raw, leaf = entries.build(
            seq=seq, ts=now_ms() if draft.ts is None else draft.ts, kind=draft.kind,
            actor=actor, parent=draft.parent, data=draft.data, bodies=list(body_map),
            prev=prev.hex(),
        )
        return fields, raw, leaf, body_map

    def _write(self, drafts: Sequence[Draft], *, atomic: bool) -> list[Entry | EntryRejected]:
        """Build, check, sign and commit drafts in one transaction.

        atomic: the first rejected draft aborts all; otherwise it is left out and reported in
        its place in the result list.
        """
        signer = self.require_writer()
        rng = self.compact_range()
        prev, seq = self.head, self.size
        built: list[tuple[dict[str, Any], bytes, bytes, dict[str, bytes]]] = []
        results: list[int | EntryRejected] = []
        signing = LeafSigner(signer, self._pool() if len(drafts) >= PARALLEL_SIGN_MIN else None)
        with self._transaction():
            for draft in drafts:
                mark = self._state.mark()
                try:
                    record = self._build(draft, signer.node_id, seq, prev)
                    views.apply(self._state, record[0])
                except EntryRejected as exc:
                    if atomic:
                        raise
                    self._state.undo(mark)
                    results.append(exc)
                    continue
                signing.add(record[2])
                results.append(len(built))
                built.append(record)
                prev, seq = record[2], seq + 1
            sigs = signing.signatures()
            written = self._insert(rng, [(fields, raw, leaf, sig, body_map) for
                                         (fields, raw, leaf, body_map), sig in zip(built, sigs)])
        self._advance(rng, written)
        return [written[r] if isinstance(r, int) else r for r in results]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.check_files()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._state.flush()
            self.conn.execute("COMMIT")
        except BaseException:
            self._state.discard()
            self.conn.execute("ROLLBACK")
            raise
        self.check_files()  # committed to the files we opened, or nobody hears "done"

    def _insert(self, rng: merkle.CompactRange, records: Sequence[
            tuple[dict[str, Any], bytes, bytes, bytes, dict[str, bytes]]]) -> list[Entry]:
        """Insert signed records whose views are already applied (inside a transaction)."""
        rows, nodes, redacted, out = [], [], [], []
        bodies: list[tuple[str, bytes]] = []
        for fields, raw, leaf, sig, body_map in records:
            rows.append((fields["seq"], leaf, raw, sig, fields["kind"], fields["ts"]))
            bodies.extend(body_map.items())
            if fields["kind"] == "redact":
                redacted.append((fields["data"]["body"],))
            nodes.extend(rng.append(leaf))
            out.append(Entry(raw=raw, hash=leaf, sig=sig, fields=fields))
        conn = self.conn
        conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows)
        if bodies:
            conn.executemany("INSERT OR IGNORE INTO bodies VALUES (?, ?)", bodies)
        if redacted:
            conn.executemany("DELETE FROM bodies WHERE hash = ?", redacted)
        if nodes:
            conn.executemany("INSERT INTO merkle_nodes VALUES (?, ?, ?)", nodes)
        return out

    def _advance(self, rng: merkle.CompactRange, written: list[Entry]) -> None:
        if written:
            self._range = rng
            self.size = written[-1].seq + 1
            self.head = written[-1].hash
            for listener in self.listeners:
                for entry in written:
                    listener(entry)

    def commit_signed(self, records: Sequence[
            tuple[dict[str, Any], bytes, bytes, bytes, dict[str, bytes]]]) -> list[Entry]:
        """Append records already built, signed and checked elsewhere (import), in one
        transaction: (fields, entry bytes, leaf hash, signature, bodies by hash)."""
        for fields, raw, *_ in records:
            entries.check_leaf_size(fields["seq"], raw)
        rng = self.compact_range()
        with self._transaction():
            for fields, *_ in records:
                views.apply(self._state, fields)
            written = self._insert(rng, records)
        self._advance(rng, written)
        return written

    def checkpoint(self) -> str:
        """Sign and store a checkpoint of the current tree (reuses one of the same size)."""
        signer = self.require_writer()
        latest = self.latest_checkpoint()
        if latest is not None and latest[0] == self.size:
            return latest[2]
        cp = note.Checkpoint(note.origin_for(signer.node_id), self.size, self.root())
        text = note.sign_checkpoint(cp, signer)
        vkey = note.Verifier(cp.origin, signer.public_key).vkey()
        self.execute_write("INSERT INTO checkpoints VALUES (?, ?, ?, ?)",
                           (cp.size, cp.root, text, vkey))
        return text

    def execute_write(self, sql: str, args: Sequence[Any] = ()) -> None:
        """One write statement outside the entry chain (checkpoints, witnessed notes), in its
        own transaction with the same file checks as an append."""
        self.require_writer()
        with self._transaction():
            self.conn.execute(sql, args)
