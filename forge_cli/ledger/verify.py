"""Verification of a ledger file, from the entries alone.

`verify` checks every entry (seq continuity, prev links, hashes, actor and trade signatures,
kind rules, parent < seq) and every signed checkpoint against the recomputed Merkle root.
`deep` also re-hashes every body and rebuilds every other table by replay, comparing row by
row. It never stops at the first problem: every finding is collected.

Entries are checked a span at a time (`check_span`), spans on worker processes, one per
core; this process folds their results in seq order, so the report is the same for any
number of workers. The fold is kept small, because it is the one part that does not spread
over cores: a whole span joins the Merkle tree as one subtree root, and `--deep` receives
each span's parsed entries in one marshal blob rather than parsing them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import marshal
import sqlite3
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

from forge_cli import canonical, parallel
from forge_cli.errors import EntryRejected, ForgeError, UsageError
from forge_cli.ledger import entries, merkle, note, views, witness
from forge_cli.ledger.store import TABLES, Ledger

log = logging.getLogger("forge.ledger")

# Entries per unit of work: large enough that handing one to a process costs little beside
# checking it, small enough that every core gets many. A power of two, so that a whole span
# is one perfect subtree of the Merkle tree.
SPAN = 2048
# A ledger of fewer spans is checked in this process (threads for its signatures): starting
# worker processes would cost more than they save.
PARALLEL_FROM = 4
# With worker processes, spans are halved (down to MIN_SPAN) until each worker gets this many:
# the pool hands spans out as workers come free, so a last round of a few large spans would
# leave most cores idle (49 spans of 2048 on 16 cores: four rounds for 3.06 rounds of work).
SPANS_PER_WORKER = 8
MIN_SPAN = 512


def span_size(size: int, workers: int) -> int:
    """Entries per span for a ledger of `size` entries checked by `workers` processes."""
    span = SPAN
    while span > MIN_SPAN and size < span * SPANS_PER_WORKER * workers:
        span //= 2
    return span

# (public key, message, signature, seq, what is signed)
SigCheck = tuple[bytes, bytes, bytes, int, str]


@dataclass(frozen=True)
class Finding:
    seq: int | None
    table: str
    reason: str

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else f"table {self.table}"
        return f"{where}: {self.reason}"


@dataclass
class Report:
    size: int = 0
    root: str = ""
    deep: bool = False
    signatures: int = 0
    checkpoints: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["valid"] = self.ok
        return data


def bad_signatures(batch: list[SigCheck], *, threads: int = 1) -> list[tuple[int, str]]:
    """(seq, what) of every check in `batch` whose signature does not verify, in batch order
    (on `threads` threads; see `parallel.verify_all`)."""
    valid = parallel.verify_all([check[:3] for check in batch], workers=threads)
    return [(seq, what) for (_, _, _, seq, what), ok in zip(batch, valid, strict=True) if not ok]


def body_matches(body_hash: str, data: bytes) -> bool:
    """True if a stored body hashes to the name entries know it by."""
    return hashlib.sha256(data).hexdigest() == body_hash


def signature_problem(what: str) -> str:
    return f"{what} signature does not verify"


_DECODER = json.JSONDecoder()


def parse_entry(raw: bytes) -> Any:
    """`json.loads(raw)`, ValueError if `raw` is not JSON.

    Stored entries are UTF-8 with nothing around the value, which one decoder call reads;
    anything else (a byte-order mark, whitespace, UTF-16, an encoded surrogate) goes to
    `json.loads` itself, so both accept and refuse exactly the same bytes.
    """
    try:
        text = raw.decode()
        value, end = _DECODER.raw_decode(text)
        if end == len(text):
            return value
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        pass
    return json.loads(raw)


@dataclass(slots=True)
class EntryCheck:
    """What `check_entry` found: the leaf hash, the fields (None if unreadable), the problems
    found so far, and the signatures still to check (see `bad_signatures`)."""

    leaf: bytes
    fields: dict[str, Any] | None
    problems: list[str]
    signatures: list[SigCheck]


def check_entry(raw: bytes, sig: bytes, seq: int, prev: bytes, *, strict: bool) -> EntryCheck:
    """The one per-entry rule check, used by verify and by import.

    Checks that `raw` is a well-formed entry at `seq` following the entry hashed `prev`, and
    lists the actor and trade signatures to verify (batched by the caller, so verify can
    spread them over cores). `strict` also requires the canonical byte form.
    """
    leaf = hashlib.sha256(b"\x00" + raw).digest()
    try:
        fields = parse_entry(raw)
    except ValueError:
        return EntryCheck(leaf, None, ["entry is not JSON"], [])
    problem = entries.check_envelope(fields)
    if problem:
        return EntryCheck(leaf, None, [problem], [])
    problems: list[str] = []
    if strict:
        try:
            if canonical.encode(fields) != raw:
                problems.append("entry bytes are not in canonical form")
        except UsageError as exc:
            problems.append(f"entry has no canonical form: {exc}")
    if fields["seq"] != seq:
        problems.append(f"entry says seq {fields['seq']} but belongs at {seq}")
    if fields["prev"] != prev.hex():
        problems.append("prev does not match the hash of the entry before it")
    checks: list[SigCheck] = [(bytes.fromhex(fields["actor"]), leaf, sig, seq, "actor")]
    if fields["kind"] == "trade":
        data = fields["data"]
        message = entries.trade_message(data["terms"])
        for party in ("provider", "consumer"):
            checks.append((bytes.fromhex(data["terms"][party]), message,
                           bytes.fromhex(data[f"{party}_sig"]), seq, f"trade {party}"))
    elif fields["kind"] == "dispute":
        checks.extend((bytes.fromhex(signer), message, bytes.fromhex(sig), seq, whose)
                      for signer, message, sig, whose in
                      entries.dispute_signatures(fields["data"]))
    return EntryCheck(leaf, fields, problems, checks)


@dataclass
class Span:
    """What `check_span` found in one seq range, for the verifier to fold in seq order."""

    seqs: list[int] = field(default_factory=list)  # the rows present, in order
    leaves: bytes = b""  # their leaf hashes, 32 bytes each
    problems: list[tuple[int, str]] = field(default_factory=list)  # (seq, reason), row order
    bad_signatures: list[tuple[int, str]] = field(default_factory=list)  # (seq, what)
    signatures: int = 0
    # When every seq in the span is present and there are 2^height of them: the root of
    # their perfect subtree; deep also keeps every node under it, a level's hashes joined
    # (nodes[0] is level 1)
    subtree: bytes | None = None
    height: int = 0
    nodes: list[bytes] = field(default_factory=list)
    # deep: marshal of each row's fields (None where unreadable); marshal reads them back
    # several times faster than JSON, and this process reads every entry of the ledger
    fields: bytes = b""

    def leaf(self, i: int) -> bytes:
        return self.leaves[32 * i:32 * i + 32]

    def parsed(self) -> list[dict[str, Any] | None]:
        # Only ever our own worker's output: marshal is not for bytes from outside.
        parsed: list[dict[str, Any] | None] = marshal.loads(self.fields)
        return parsed


def check_span(book: Ledger, start: int, end: int, *, deep: bool, threads: int = 1) -> Span:
    """Every check of the entries with seq in [start, end) that needs nothing outside them.

    The one link out, the first row's `prev`, is the leaf of the row before `start`, read
    here from the file: spans need not wait for each other, so any process can check any.
    """
    before = book.conn.execute(
        "SELECT entry FROM entries WHERE seq >= 0 AND seq < ? ORDER BY seq DESC LIMIT 1",
        (start,)).fetchone()
    prev = bytes.fromhex(entries.GENESIS_PREV) if before is None else merkle.leaf_hash(before[0])
    span = Span()
    problems, seqs = span.problems, span.seqs
    checks: list[SigCheck] = []
    leaves: list[bytes] = []
    parsed: list[dict[str, Any] | None] = []
    for rows in book.iter_rows(start, end, batch=max(1, end - start)):
        for seq, stored_hash, raw, sig, kind, ts in rows:
            check = check_entry(raw, sig, seq, prev, strict=deep)
            fields, leaf = check.fields, check.leaf
            if leaf != stored_hash:
                problems.append((seq, "stored hash does not match the entry bytes (edited entry)"))
            if check.problems:
                problems.extend((seq, problem) for problem in check.problems)
            if fields is not None:
                if fields["kind"] != kind or fields["ts"] != ts:
                    problems.append((seq, "kind/ts columns do not match the entry"))
                checks += check.signatures
            seqs.append(seq)
            leaves.append(leaf)
            parsed.append(fields)
            prev = leaf
    span.leaves = b"".join(leaves)
    count = len(leaves)
    if count == end - start and count and not count & (count - 1):
        levels = merkle.subtree_levels(leaves)
        span.subtree, span.height = levels[-1][0], len(levels) - 1
        if deep:
            span.nodes = [b"".join(level) for level in levels[1:]]
    if deep:
        span.fields = marshal.dumps(parsed)
    span.signatures = len(checks)
    span.bad_signatures = bad_signatures(checks, threads=threads)
    return span


# The ledger a worker process checks spans of (opened once per worker, by `_open_worker`).
_worker_book: Ledger | None = None


def _open_worker(path: str) -> None:
    global _worker_book
    _worker_book = Ledger.open_reader(path)


def _check_span_in_worker(start: int, end: int, deep: bool) -> Span:
    assert _worker_book is not None, "the pool's initializer opens the ledger"
    return check_span(_worker_book, start, end, deep=deep)


class _Verifier:
    def __init__(self, ledger: Ledger, deep: bool, saved: note.Checkpoint | None,
                 workers: int) -> None:
        self.ledger = ledger
        self.deep = deep
        self.saved = saved
        self.workers = workers
        self.report = Report(deep=deep)
        self.range = merkle.CompactRange()
        self.roots: dict[int, bytes] = {0: merkle.CompactRange().root()}
        self.wanted_roots = {row[0] for row in ledger.checkpoints()}
        if saved is not None:
            self.wanted_roots.add(saved.size)
        self.expected = 0
        self.state = views.MemoryState()
        # deep: levels[level] joins the hashes of nodes (level, 0), (level, 1), ... that the
        # entries make: the fold adds a level's nodes in index order, none skipped
        self.levels: list[bytearray] = [bytearray()]

    def find(self, seq: int | None, table: str, reason: str) -> None:
        self.report.findings.append(Finding(seq, table, reason))

    def run(self) -> Report:
        try:
            self._entries()
            self._checkpoints()
            if self.saved is not None:
                self._saved_checkpoint(self.saved)
            if self.deep:
                self._deep_tables()
        except sqlite3.DatabaseError as exc:
            self.find(None, "file", f"SQLite cannot read the file: {exc}")
        # Stable: one seq's findings keep the order they were found in.
        self.report.findings.sort(key=lambda f: (f.seq is None, f.seq or 0, f.table))
        return self.report

    # -- entries -------------------------------------------------------------------------------

    def _entries(self) -> None:
        self.ledger.refresh()
        for span in self._spans(self.ledger.size):
            self._fold(span)
        self.report.size = self.expected
        self.report.root = self.range.root().hex()

    def _spans(self, end: int) -> Iterator[Span]:
        """Every span's result, in seq order: from worker processes when the ledger is large
        enough to pay for them, a few spans ahead of the fold; from this process otherwise,
        or when the processes cannot start or die."""
        bounds = [(start, min(start + SPAN, end)) for start in range(0, end, SPAN)]
        pool = None
        if self.workers > 1 and len(bounds) >= PARALLEL_FROM:
            try:
                pool = parallel.process_pool(min(self.workers, len(bounds)), _open_worker,
                                             (str(self.ledger.path),))
            except (OSError, ImportError) as exc:
                log.info("verify: no worker processes (%s); checking in this process", exc)
        if pool is None:
            for start, stop in bounds:
                yield check_span(self.ledger, start, stop, deep=self.deep, threads=self.workers)
            return
        step = span_size(end, self.workers)
        bounds = [(start, min(start + step, end)) for start in range(0, end, step)]
        try:
            yield from self._spans_on(pool, bounds)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _spans_on(self, pool: ProcessPoolExecutor, bounds: list[tuple[int, int]]) -> Iterator[Span]:
        # A bounded window: a deep fold slower than the workers must not hold every
        # entry's fields in memory at once.
        ahead = 2 * self.workers
        pending: deque[Future[Span]] = deque()
        todo = iter(bounds)
        broken = False
        for start, stop in bounds:
            while not broken and len(pending) < ahead:
                nxt = next(todo, None)
                if nxt is None:
                    break
                try:
                    pending.append(pool.submit(_check_span_in_worker, *nxt, self.deep))
                except BrokenProcessPool:
                    broken = True
            future = pending.popleft() if pending else None
            try:
                if future is None:
                    raise BrokenProcessPool("no worker left")
                yield future.result()
            except BrokenProcessPool as exc:
                if not broken:
                    log.info("verify: worker processes failed (%s); checking in this process",
                             exc)
                broken = True
                pending.clear()
                yield check_span(self.ledger, start, stop, deep=self.deep, threads=self.workers)

    def _fold(self, span: Span) -> None:
        """Add a span's results in seq order: per entry, its problems, then what replay
        finds (deep), then its bad signatures, as one sequential pass would find them."""
        for seq, reason in span.problems:
            self.find(seq, "entries", reason)
        if self.deep:
            for seq, fields in zip(span.seqs, span.parsed(), strict=True):
                if fields is not None:
                    self._deep_entry(seq, fields)
        if not self._fold_subtree(span):
            self._fold_leaves(span)
        for seq, what in span.bad_signatures:
            self.find(seq, "entries", signature_problem(what))
        self.report.signatures += span.signatures

    def _fold_subtree(self, span: Span) -> bool:
        """Add a whole span to the tree as one subtree, where that is what adding its leaves
        one by one would do: no seq missing before or in it, and no checkpoint's size inside
        it (whose root needs the leaves). False if it must go leaf by leaf."""
        if span.subtree is None or not span.seqs:
            return False
        start, count = span.seqs[0], len(span.seqs)
        if self.expected != start or self.range.size != start or any(
                start < size < start + count for size in self.wanted_roots):
            return False
        completed = self.range.append_subtree(span.height, span.subtree)
        if self.deep:
            for level, joined in enumerate(span.nodes, 1):
                self._keep(level, joined)
            for level, _, node in completed:
                self._keep(level, node)
        if self.range.size in self.wanted_roots:
            self.roots[self.range.size] = self.range.root()
        self.expected = start + count
        return True

    def _fold_leaves(self, span: Span) -> None:
        for i, seq in enumerate(span.seqs):
            expected = self.expected
            if seq != expected:
                self.find(expected, "entries",
                          f"entries {expected}..{seq - 1} are missing (deleted or reordered)"
                          if seq > expected else f"seq {seq} is out of order")
            for level, _, node in self.range.append(span.leaf(i)):
                if self.deep:
                    self._keep(level, node)
            if self.range.size in self.wanted_roots:
                self.roots[self.range.size] = self.range.root()
            self.expected = seq + 1

    def _keep(self, level: int, hashes: bytes) -> None:
        while len(self.levels) <= level:
            self.levels.append(bytearray())
        self.levels[level] += hashes

    def _deep_entry(self, seq: int, fields: dict[str, Any]) -> None:
        try:
            self.state.apply(fields)
        except EntryRejected as exc:
            self.find(seq, "entries", f"breaks a ledger rule on replay: {exc}")

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoints(self) -> None:
        for size, root, text, vkey in self.ledger.checkpoints():
            self.report.checkpoints += 1
            where = f"checkpoint at size {size}"
            try:
                cp = note.open_checkpoint(text, note.Verifier.parse(vkey))
            except ForgeError as exc:
                self.find(None, "checkpoints", f"{where}: {exc}")
                continue
            if cp.size != size or cp.root != root:
                self.find(None, "checkpoints", f"{where}: size/root columns differ from the note")
            if size > self.report.size:
                self.find(self.report.size, "entries",
                          f"{where} is signed but the ledger has only {self.report.size} entries "
                          "(truncated)")
            elif self.roots.get(size) != cp.root:
                self.find(None, "checkpoints",
                          f"{where}: signed root differs from the entries' Merkle root")

    def _saved_checkpoint(self, cp: note.Checkpoint) -> None:
        size = self.report.size
        if cp.size > size:
            self.find(size, "entries", f"the saved checkpoint has {cp.size} entries but the "
                                       f"ledger has {size} (truncated)")
        elif self.roots.get(cp.size) != cp.root:
            self.find(None, "entries", f"the first {cp.size} entries no longer hash to the saved "
                                       "checkpoint's root (history rewritten)")

    # -- deep ----------------------------------------------------------------------------------

    def _deep_tables(self) -> None:
        conn = self.ledger.conn
        names = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        for name in sorted(names - set(TABLES)):
            self.find(None, name, "table is not part of a forge ledger")
        self._deep_merkle(conn)
        self._deep_bodies(conn)
        for view in views.VIEWS:
            for problem in views.diff(view, views.table_rows(conn, view),
                                      self.state.tables[view.table]):
                self.find(None, view.table, problem)
        self._conservation()
        self._deep_witnessed(conn)
        for table, problem in witness.deep_findings(self.ledger):
            self.find(None, table, problem)

    def _conservation(self) -> None:
        """Σ balances + Σ escrow + pool cash = Σ grants − Σ burns, and nothing negative.

        Checked on the final state; only when it fails is the ledger replayed once more,
        checking after every entry, to name the first entry that breaks it.
        """
        if _conserved(self.state) is None:
            return
        state = views.MemoryState()
        try:
            for entry in self.ledger.iter_entries():
                try:
                    state.apply(entry.fields)
                except (EntryRejected, KeyError, TypeError):
                    continue  # already reported as a broken rule
                problem = _conserved(state)
                if problem:
                    self.find(entry.seq, "accounts", f"CU is not conserved after this "
                              f"{entry.kind} entry: {problem}")
                    return
        except ForgeError:
            pass  # an unreadable entry, already reported
        self.find(None, "accounts", f"CU is not conserved: {_conserved(self.state)}")

    def _deep_merkle(self, conn: sqlite3.Connection) -> None:
        """Every stored node against the nodes the entries make, a level at a time: a level
        that matches as a whole costs one comparison; one that does not is gone through
        node by node. Findings come in (level, index) order."""
        levels = {row[0] for row in conn.execute("SELECT DISTINCT level FROM merkle_nodes")}
        levels.update(level for level, joined in enumerate(self.levels) if joined)
        problems: list[tuple[Any, Any, str]] = []
        for level in levels:
            rows = conn.execute("SELECT idx, hash FROM merkle_nodes WHERE level = ? ORDER BY idx",
                                (level,)).fetchall()
            made = (self.levels[level] if type(level) is int and 0 < level < len(self.levels)
                    else b"")
            count = len(made) // 32
            if (len(rows) == count and [idx for idx, _ in rows] == list(range(count))
                    and all(type(h) is bytes for _, h in rows)
                    and b"".join([h for _, h in rows]) == made):
                continue
            stored = dict(rows)
            ours = {i: bytes(made[32 * i:32 * i + 32]) for i in range(count)}
            for idx in set(stored) | set(ours):
                if stored.get(idx) != ours.get(idx):
                    problems.append((level, idx, "missing" if idx not in stored else (
                        "unexpected" if idx not in ours else "wrong")))
        for level, idx, kind in sorted(problems, key=_node_order):
            self.find(None, "merkle_nodes", f"node (level {level}, index {idx}) is {kind}")

    def _deep_bodies(self, conn: sqlite3.Connection) -> None:
        redacted = self.state.tables[views.REDACTIONS.table]
        refs = {key[0]: value[0] for key, value in self.state.tables[views.BODY_REFS.table].items()}
        present = set()
        for body_hash, data in conn.execute("SELECT hash, data FROM bodies"):
            present.add(body_hash)
            if body_hash not in refs:
                self.find(None, "bodies", f"body {body_hash[:16]}… is referenced by no entry")
            elif not body_matches(body_hash, data):
                self.find(refs[body_hash], "bodies",
                          f"body {body_hash[:16]}… does not hash to its name (edited)")
            if (body_hash,) in redacted:
                self.find(redacted[(body_hash,)][0], "bodies",
                          f"body {body_hash[:16]}… is still stored after its redaction")
        for body_hash, seq in refs.items():
            if body_hash not in present and (body_hash,) not in redacted:
                self.find(seq, "bodies", f"body {body_hash[:16]}… is missing (not redacted)")

    def _deep_witnessed(self, conn: sqlite3.Connection) -> None:
        for origin, size, root, text, log_vkey, witness_vkey in conn.execute(
                "SELECT origin, size, root, note, log_vkey, witness_vkey FROM witnessed"):
            try:
                cp = note.open_checkpoint(text, note.Verifier.parse(log_vkey))
                note.verify_cosignature(text, note.Verifier.parse(witness_vkey))
            except ForgeError as exc:
                self.find(None, "witnessed", f"log {origin}: {exc}")
                continue
            if (cp.origin, cp.size, cp.root) != (origin, size, root):
                self.find(None, "witnessed", f"log {origin}: columns differ from the cosigned note")


def _node_order(problem: tuple[Any, Any, str]) -> tuple[Any, ...]:
    """(level, index) order; a level or index an edit made text (SQLite keeps what it is
    given) sorts after every number instead of failing the comparison."""
    level, idx, _ = problem
    if all(type(v) in (int, float) for v in (level, idx)):
        return (0, level, idx)
    return (1, repr(level), repr(idx))


def _conserved(state: views.MemoryState) -> str | None:
    """Why `state` breaks conservation, or None."""
    for view in (views.ACCOUNTS, views.ESCROW, views.POOL, views.LENDERS):
        for key, value in state.tables[view.table].items():
            if any(isinstance(v, int) and v < 0 for v in value):
                return f"{view.table} row {key[0][:16]}… is negative {value!r}"
    supply = state.supply()
    held, minted = state.held(), supply["granted"] - supply["burned"]
    if held != minted:
        return (f"balances + escrow + pool hold {held} CU but grants − burns are {minted} CU "
                f"(off by {held - minted})")
    return None


def open_saved_checkpoint(note_text: str, vkey: str | None = None) -> note.Checkpoint:
    """Parse and check a checkpoint saved earlier (`forge ledger checkpoint > cp.txt`).

    The verifier key defaults to the one the origin names (forge.local/<node id>).
    """
    if vkey is None:
        origin = note.Checkpoint.parse_body(note.SignedNote.parse(note_text).text).origin
        try:
            public_key = bytes.fromhex(origin.rsplit("/", 1)[-1])
        except ValueError:
            public_key = b""
        if len(public_key) != 32:
            raise UsageError(f"checkpoint origin {origin!r} names no forge node; pass --key VKEY")
        return note.open_checkpoint(note_text, note.Verifier(origin, public_key))
    return note.open_checkpoint(note_text, note.Verifier.parse(vkey))


def verify(ledger: Ledger, *, deep: bool = False,
           saved: note.Checkpoint | None = None, workers: int | None = None) -> Report:
    """Check the whole ledger; the report lists every finding (empty means valid).

    `saved` is a checkpoint kept outside the ledger: the ledger must still extend it, which
    is what catches a truncated tail when the stored checkpoints were removed too.
    `workers` (default: every core) only changes the speed; `workers=1` checks everything
    in this process, one entry after another.
    """
    workers = parallel.cores() if workers is None else workers
    if workers < 1:
        raise UsageError(f"workers must be at least 1, found {workers}")
    return _Verifier(ledger, deep, saved, workers).run()
