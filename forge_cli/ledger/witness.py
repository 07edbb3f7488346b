"""Witnessing: cosigning other logs' checkpoints once they are shown to extend the last one seen
(c2sp.org/tlog-witness), keeping the cosignatures peers give this log, and the evidence of a
split view: two checkpoints one log signed that cannot both be true.

Tables of the ledger file: `witnessed` (per log origin: the latest checkpoint cosigned),
`cosignatures` (peers' cosignatures on this ledger's checkpoints), `fork_evidence`.
"""

from __future__ import annotations

import base64
import binascii
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from forge_cli.errors import ProofFailed, UsageError
from forge_cli.ledger import merkle, note
from forge_cli.ledger.store import Ledger

MAX_PROOF_LINES = 63  # tlog-witness: a client sends at most this many
MAX_SUBMISSION_BYTES = 16 * 1024  # old line, 63 proof lines and a note of 16 signatures fit
MAX_EVIDENCE_NOTE = 4096  # one checkpoint note in gossiped evidence
_FORGE_ORIGIN = re.compile(r"forge\.local/([0-9a-f]{64})")
_WITNESS_NAME = re.compile(r"forge\.local/([0-9a-f]{64})/witness")


def witness(ledger: Ledger, note_text: str, log_vkey: str, proof: Iterable[bytes] = ()) -> str:
    """Cosign another log's checkpoint if it is consistent with the last one we saw.

    The first checkpoint seen from a log is trusted on first use; later ones need a
    consistency proof from the stored size. Returns the note with our cosignature.
    """
    signer = ledger.require_writer()
    verifier = note.Verifier.parse(log_vkey)
    cp = note.open_checkpoint(note_text, verifier)
    last = ledger.conn.execute(
        "SELECT size, root, log_vkey FROM witnessed WHERE origin = ?", (cp.origin,)
    ).fetchone()
    if last is not None:
        old_size, old_root, old_vkey = last
        if old_vkey != log_vkey:
            raise UsageError(f"log {cp.origin} was witnessed under another key {old_vkey}")
        if cp.size < old_size:
            raise ProofFailed(f"{cp.origin} shrank from {old_size} to {cp.size} entries")
        if not merkle.verify_consistency(old_size, cp.size, old_root, cp.root, list(proof)):
            raise ProofFailed(f"{cp.origin} at size {cp.size} is not consistent with the "
                              f"size {old_size} checkpoint seen before (fork or rewrite)")
    name = witness_name(signer.node_id)
    cosigned = note.cosign(note_text, name, signer, int(time.time()))
    witness_vkey = witness_verifier(signer.node_id).vkey()
    ledger.execute_write("INSERT OR REPLACE INTO witnessed VALUES (?, ?, ?, ?, ?, ?)",
                          (cp.origin, cp.size, cp.root, cosigned, log_vkey, witness_vkey))
    return cosigned


# -- keys ----------------------------------------------------------------------------------------

def witness_name(node_id: str) -> str:
    """The cosigner name a forge node witnesses under: its log origin + "/witness"."""
    return note.origin_for(node_id) + "/witness"


def witness_verifier(node_id: str) -> note.Verifier:
    """The cosignature/v1 key of the forge node `node_id` (its node key, type 0x04)."""
    return note.Verifier(witness_name(node_id), bytes.fromhex(node_id), note.COSIGNATURE_V1)


def log_verifier(origin: str) -> note.Verifier | None:
    """The key of a forge node's log from its origin (forge.local/<node id>), or None."""
    found = _FORGE_ORIGIN.fullmatch(origin)
    return None if found is None else note.Verifier(origin, bytes.fromhex(found[1]))


def node_of_witness(vkey_name: str) -> str | None:
    found = _WITNESS_NAME.fullmatch(vkey_name)
    return None if found is None else found[1]


# -- add-checkpoint (c2sp.org/tlog-witness) ------------------------------------------------------

@dataclass(frozen=True)
class Submission:
    """An add-checkpoint request body: the size the client thinks we hold, its proof from
    there, and the checkpoint note (signatures not yet checked)."""

    old: int
    proof: list[bytes]
    text: str  # the checkpoint note as sent
    checkpoint: note.Checkpoint


def parse_submission(body: bytes) -> Submission:
    """Read an add-checkpoint body; UsageError (400) naming what is malformed.

    Example body::

        old 20
        PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=

        forge.local/<node id>
        27
        <base64 root>

        — forge.local/<node id> <base64 key id ‖ signature>
    """
    if len(body) > MAX_SUBMISSION_BYTES:
        raise UsageError(f"an add-checkpoint body holds at most {MAX_SUBMISSION_BYTES} bytes, "
                         f"found {len(body)}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("an add-checkpoint body is UTF-8 text") from None
    head, sep, note_text = text.partition("\n\n")
    if not sep:
        raise UsageError("an add-checkpoint body is an `old N` line, proof lines, an empty "
                         "line and the checkpoint; no empty line found")
    lines = head.split("\n")
    old_text = lines[0].removeprefix("old ")
    if lines[0] == old_text or not old_text.isdigit() or (old_text != "0" and old_text[0] == "0"):
        raise UsageError(f"the first line must be `old N` with N in decimal without leading "
                         f"zeroes, found {lines[0][:40]!r}")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise UsageError(f"a consistency proof has at most {MAX_PROOF_LINES} lines, found "
                         f"{len(lines) - 1}")
    proof = []
    for line in lines[1:]:
        try:
            node = base64.b64decode(line, validate=True)
        except binascii.Error:
            node = b""
        if len(node) != 32:
            raise UsageError(f"a proof line must be one base64 SHA-256 hash, found {line[:60]!r}")
        proof.append(node)
    checkpoint = note.Checkpoint.parse_body(note.SignedNote.parse(note_text).text)
    old = int(old_text)
    if old > checkpoint.size:
        raise UsageError(f"old size {old} is larger than the checkpoint's size {checkpoint.size}")
    return Submission(old, proof, note_text, checkpoint)


@dataclass(frozen=True)
class Evidence:
    """Two checkpoints of one size with different roots, both signed by the log: a split view
    anyone can check with nothing but the log's key."""

    origin: str
    size: int
    note_a: str
    note_b: str

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "size": self.size, "notes": [self.note_a, self.note_b]}

    @property
    def node_id(self) -> str:
        return self.origin.removeprefix("forge.local/")


@dataclass(frozen=True)
class Answer:
    """What a witness answers an add-checkpoint: `outcome` is "cosigned" (200, `lines`),
    "old_size" (409 text/x.tlog.size, `size`), "split_view" (409, `evidence`),
    "bad_proof" (422) or "other_key" (403); `detail` says why in a sentence."""

    outcome: str
    detail: str
    lines: str = ""
    size: int = 0
    evidence: Evidence | None = None


def add_checkpoint(ledger: Ledger, sub: Submission, log: note.Verifier,
                   now_s: int | None = None) -> Answer:
    """Decide an add-checkpoint whose log signature was checked (`open_submission`), and
    persist the new state in the same call: run it on the one thread that writes the ledger,
    so that two requests cannot both pass the old-size check (the race tlog-witness warns of).
    """
    signer = ledger.require_writer()
    cp = sub.checkpoint
    row = ledger.conn.execute("SELECT size, root, note, log_vkey FROM witnessed "
                              "WHERE origin = ?", (cp.origin,)).fetchone()
    held, root = (row[0], bytes(row[1])) if row is not None else (0, b"")
    if row is not None and row[3] != log.vkey():
        return Answer("other_key", f"log {cp.origin} was witnessed here under another key "
                      f"{row[3]}")
    if row is not None and cp.size == held and cp.root != root:
        evidence = Evidence(cp.origin, held, row[2], _log_signed(sub.text, log))
        record_evidence(ledger, evidence, "witness")
        return Answer("split_view", f"split view: {cp.origin} signed two checkpoints of size "
                      f"{held} with different roots ({root.hex()[:16]}…, cosigned here, and "
                      f"{cp.root.hex()[:16]}…)", evidence=evidence)
    if sub.old != held:
        return Answer("old_size", f"the latest checkpoint of {cp.origin} cosigned here has "
                      f"size {held}, not {sub.old}", size=held)
    if held == 0 or cp.size == held:
        if sub.proof:
            return Answer("bad_proof", f"the proof from size {held} to {cp.size} must be empty")
    elif not merkle.verify_consistency(held, cp.size, root, cp.root, sub.proof):
        return Answer("bad_proof", f"the consistency proof from size {held} to {cp.size} does "
                      "not verify against the checkpoint cosigned here")
    sig = note.cosignature(sub.text, witness_name(signer.node_id), signer,
                           int(time.time()) if now_s is None else now_s)
    ledger.execute_write("INSERT OR REPLACE INTO witnessed VALUES (?, ?, ?, ?, ?, ?)",
                         (cp.origin, cp.size, cp.root, _log_signed(sub.text, log) + sig.line(),
                          log.vkey(), witness_verifier(signer.node_id).vkey()))
    return Answer("cosigned", f"cosigned {cp.origin} at size {cp.size}", lines=sig.line())


def _log_signed(note_text: str, log: note.Verifier) -> str:
    """The note with the log's own signature only (what evidence and `witnessed` keep)."""
    signed = note.SignedNote.parse(note_text)
    own = tuple(s for s in signed.signatures if s.name == log.name and s.key_id == log.key_id)
    return note.SignedNote(signed.text, own).render()


def open_submission(sub: Submission, log: note.Verifier) -> None:
    """ProofFailed (403) unless the log's own key signed the submitted checkpoint; signatures
    by other keys are ignored, as tlog-witness asks."""
    note.open_checkpoint(sub.text, log)


# -- split views --------------------------------------------------------------------------------

def check_evidence(data: Any) -> Evidence:
    """Evidence read from a peer, believed only once both notes verify under the key that the
    origin names, at one size, with different roots; UsageError or ProofFailed otherwise."""
    if not isinstance(data, dict):
        raise UsageError("fork evidence is an object {origin, size, notes}")
    origin, notes = data.get("origin"), data.get("notes")
    if not isinstance(origin, str) or not isinstance(notes, list) or len(notes) != 2 \
            or not all(isinstance(n, str) and len(n) <= MAX_EVIDENCE_NOTE for n in notes):
        raise UsageError("fork evidence holds an origin and two checkpoint notes of at most "
                         f"{MAX_EVIDENCE_NOTE} characters")
    log = log_verifier(origin)
    if log is None:
        raise UsageError(f"fork evidence names no forge log: {origin[:80]!r}")
    first, second = (note.open_checkpoint(n, log) for n in notes)
    if first.size != second.size or first.root == second.root:
        raise ProofFailed(f"the two checkpoints of {origin} (sizes {first.size} and "
                          f"{second.size}) are not a split view: one size, two roots")
    return Evidence(origin, first.size, _log_signed(notes[0], log), _log_signed(notes[1], log))


def record_evidence(ledger: Ledger, evidence: Evidence, source: str) -> bool:
    """Keep checked evidence (one per log and size); True if it was new here. Every column
    is checkable by `verify --deep`, so `source` is for the caller's log line only."""
    del source
    known = ledger.conn.execute("SELECT 1 FROM fork_evidence WHERE origin = ? AND size = ?",
                                (evidence.origin, evidence.size)).fetchone()
    if known:
        return False
    ledger.execute_write("INSERT OR IGNORE INTO fork_evidence VALUES (?, ?, ?, ?)",
                         (evidence.origin, evidence.size, evidence.note_a, evidence.note_b))
    return True


def evidence(ledger: Ledger, limit: int = 100) -> list[Evidence]:
    """The fork evidence kept here, newest first (at most `limit`)."""
    return [Evidence(*row) for row in _rows(
        ledger, "SELECT origin, size, note_a, note_b FROM fork_evidence "
        "ORDER BY rowid DESC LIMIT ?", (limit,))]


def evidence_counts(ledger: Ledger) -> dict[str, int]:
    """node id → how many split views of its log are on record here."""
    counts: dict[str, int] = {}
    for (origin,) in _rows(ledger, "SELECT origin FROM fork_evidence", ()):
        counts[origin.removeprefix("forge.local/")] = counts.get(
            origin.removeprefix("forge.local/"), 0) + 1
    return counts


# -- cosignatures on this ledger's checkpoints ----------------------------------------------------

def keep_cosignatures(ledger: Ledger, note_text: str, answer: str,
                      witness: note.Verifier) -> int:
    """Verify `witness`'s cosignature among the signature lines a witness answered, and keep it
    with the checkpoint; returns its timestamp. ProofFailed if no line by that key verifies."""
    cp = note.Checkpoint.parse_body(note.SignedNote.parse(note_text).text)
    if not answer.endswith("\n") or len(answer) > MAX_EVIDENCE_NOTE:
        raise ProofFailed(f"witness {witness.name} answered no signature lines")
    joined = note.SignedNote.parse(note_text).text + "\n" + answer
    ts = note.verify_cosignature(joined, witness)
    line = next(sig.line() for sig in note.SignedNote.parse(joined).signatures
                if sig.name == witness.name and sig.key_id == witness.key_id)
    ledger.execute_write("INSERT OR REPLACE INTO cosignatures VALUES (?, ?, ?, ?)",
                         (cp.size, witness.vkey(), line, ts))
    return ts


def cosignatures(ledger: Ledger, size: int) -> list[tuple[str, str, int]]:
    """(witness vkey, signature line, timestamp) of each cosignature kept for `size`."""
    return [(vkey, line, ts) for vkey, line, ts in _rows(
        ledger, "SELECT witness_vkey, line, ts FROM cosignatures WHERE size = ? "
        "ORDER BY witness_vkey", (size,))]


def cosigned_size(ledger: Ledger, witness: note.Verifier) -> int | None:
    """The largest size of this ledger `witness` cosigned, as far as this ledger knows."""
    rows = _rows(ledger, "SELECT max(size) FROM cosignatures WHERE witness_vkey = ?",
                 (witness.vkey(),))
    return rows[0][0] if rows else None


def witness_counts(ledger: Ledger) -> dict[str, tuple[int, int]]:
    """node id → (checkpoints of ours it cosigned, the largest size it cosigned)."""
    out: dict[str, tuple[int, int]] = {}
    for vkey, count, largest in _rows(ledger, "SELECT witness_vkey, count(*), max(size) "
                                      "FROM cosignatures GROUP BY witness_vkey", ()):
        node_id = node_of_witness(vkey.split("+", 1)[0])
        if node_id is not None:
            out[node_id] = (count, largest)
    return out


def with_cosignatures(ledger: Ledger, note_text: str) -> str:
    """The checkpoint note with every cosignature kept for its size appended."""
    signed = note.SignedNote.parse(note_text)
    cp = note.Checkpoint.parse_body(signed.text)
    lines = [line for _, line, _ in cosignatures(ledger, cp.size)
             if line not in {sig.line() for sig in signed.signatures}]
    return note_text + "".join(lines[:note.MAX_SIGNATURES - len(signed.signatures)])


def cosigners(note_text: str, witnesses: Sequence[note.Verifier]) -> list[note.Verifier]:
    """The distinct witness keys in `witnesses` whose cosignature on the note verifies."""
    found, seen = [], set()
    for verifier in witnesses:
        if verifier.vkey() in seen:
            continue
        seen.add(verifier.vkey())
        try:
            note.verify_cosignature(note_text, verifier)
        except ProofFailed:
            continue
        found.append(verifier)
    return found


def deep_findings(ledger: Ledger) -> list[tuple[str, str]]:
    """(table, problem) for each kept cosignature or piece of evidence that does not verify
    (`verify --deep`): every column of both tables is covered by a signature or a check."""
    found = []
    notes = {size: text for size, _, text, _ in ledger.checkpoints()}
    for size, vkey, line, ts in _rows(ledger, "SELECT size, witness_vkey, line, ts "
                                      "FROM cosignatures", ()):
        where = f"cosignature by {vkey.split('+', 1)[0][:80]} on size {size}"
        try:
            key = note.Verifier.parse(vkey)
            if size not in notes:
                raise ProofFailed("no checkpoint of that size is stored")
            joined = note.SignedNote.parse(notes[size]).text + "\n" + line
            if note.verify_cosignature(joined, key) != ts:
                raise ProofFailed(f"its time column {ts} differs from the signed time")
        except (UsageError, ProofFailed) as exc:
            found.append(("cosignatures", f"{where}: {exc}"))
    for origin, size, note_a, note_b in _rows(ledger, "SELECT origin, size, note_a, note_b "
                                              "FROM fork_evidence", ()):
        try:
            if check_evidence({"origin": origin, "notes": [note_a, note_b]}).size != size:
                raise ProofFailed(f"its size column {size} differs from the notes")
        except (UsageError, ProofFailed) as exc:
            found.append(("fork_evidence", f"evidence against {origin[:80]}: {exc}"))
    return found


def _rows(ledger: Ledger, sql: str, args: Sequence[Any]) -> list[Any]:
    """Rows of a witness table; none from a ledger written before that table existed."""
    try:
        return ledger.conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
