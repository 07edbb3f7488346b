"""Verify on every core reports exactly what one entry after another reports.

A real ledger of a little over four spans (so worker processes check it), tampered at
span edges and in between; its report from worker processes (forked from the command line,
spawned beside other threads) must equal the sequential one, finding for finding.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from forge_cli import parallel
from forge_cli.identity import Identity
from forge_cli.ledger import merkle
from forge_cli.ledger import verify as verifier
from forge_cli.ledger.store import Draft, Ledger
from tests.ledger_factory import signed_trade
from tests.test_ledger_tamper import mutated

SPAN = verifier.SPAN
SIZE = verifier.PARALLEL_FROM * SPAN + 300


def build_large_ledger(path: Path) -> None:
    """Grants, transfers, trades (three signatures each), notes with bodies, and checkpoints
    inside a span and at the end."""
    owner, consumer, peer = Identity.generate(), Identity.generate(), Identity.generate()
    with Ledger.open_writer(path, owner) as book:
        book.append("grant", {"account": owner.node_id, "cu": 10**12})
        book.append("grant", {"account": consumer.node_id, "cu": 10**12})
        for batch in range(SIZE):  # bounded: every batch adds up to 500 entries
            if book.size >= SIZE:
                break
            drafts = []
            for i in range(min(500, SIZE - book.size)):
                if i % 40 == 0:
                    drafts.append(Draft("trade", signed_trade(owner, consumer)))
                elif i % 9 == 0:
                    drafts.append(Draft("note", {"text": f"n{i}"}, bodies=[f"b{book.size + i}".encode()]))
                else:
                    drafts.append(Draft("transfer", {"from": owner.node_id, "to": peer.node_id,
                                                     "cu": 1 + i % 5}))
            book.append_many(drafts)
            if batch in (2, 8):  # near 1,500 and 4,500 entries
                book.checkpoint()
        book.checkpoint()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("large") / "ledger.db"
    build_large_ledger(path)
    return path


def copy_of(template: Path, target: Path) -> Path:
    with sqlite3.connect(template) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return target


def tamper(db: Path) -> int:
    """Damage entries at span edges and between them; returns the edited trade's seq."""
    with sqlite3.connect(db) as conn:
        def entry(seq: int) -> bytes:
            return conn.execute("SELECT entry FROM entries WHERE seq = ?", (seq,)).fetchone()[0]

        conn.execute("UPDATE entries SET sig = zeroblob(64) WHERE seq = 0")
        # The last entry of the first span: its successor, in the next span, links to it.
        conn.execute("UPDATE entries SET entry = ? WHERE seq = ?",
                     (entry(SPAN - 1).replace(b'"ts":', b'"ts":1'), SPAN - 1))
        old_hash = conn.execute("SELECT hash FROM entries WHERE seq = ?", (SPAN,)).fetchone()[0]
        conn.execute("UPDATE entries SET hash = ? WHERE seq = ?", (mutated(old_hash), SPAN))
        conn.execute("DELETE FROM entries WHERE seq = ?", (2 * SPAN,))
        # A trade near the third span's end: its consumer signature, inside valid JSON.
        trade = conn.execute("SELECT max(seq) FROM entries WHERE kind = 'trade' AND seq < ?",
                             (3 * SPAN,)).fetchone()[0]
        fields = json.loads(entry(trade))
        sig = fields["data"]["consumer_sig"]
        conn.execute("UPDATE entries SET entry = ? WHERE seq = ?",
                     (entry(trade).replace(sig.encode(), mutated(sig).encode()), trade))
        conn.execute("UPDATE entries SET kind = 'note' WHERE seq = ?", (3 * SPAN + 5,))
        conn.execute("UPDATE entries SET entry = ? WHERE seq = ?", (b"not json", 3 * SPAN + 9))
        conn.execute("UPDATE entries SET sig = zeroblob(64) WHERE seq = ?", (SIZE - 1,))
    return trade


def report(db: Path, *, deep: bool, workers: int) -> dict:
    with Ledger.open_reader(db) as book:
        return verifier.verify(book, deep=deep, workers=workers).to_json()


@pytest.fixture
def no_fallback(caplog: pytest.LogCaptureFixture):
    """Fails the test if verify fell back from worker processes to this process."""
    caplog.set_level(logging.INFO, logger="forge.ledger")
    yield
    fallbacks = [r.getMessage() for r in caplog.records if "in this process" in r.getMessage()]
    assert not fallbacks, fallbacks


def test_an_untouched_large_ledger_is_valid_on_every_core_and_on_one(template, no_fallback):
    for deep in (False, True):
        one = report(template, deep=deep, workers=1)
        assert one["valid"], one["findings"][:3]
        assert one["size"] == SIZE and one["checkpoints"] == 3
        assert report(template, deep=deep, workers=2) == one


@pytest.mark.parametrize("deep", [False, True], ids=["plain", "deep"])
def test_a_tampered_ledger_gives_the_same_findings_in_the_same_order_on_every_core(
        template, tmp_path, deep, no_fallback):
    db = copy_of(template, tmp_path / "ledger.db")
    trade = tamper(db)
    one = report(db, deep=deep, workers=1)
    found = [(f["seq"], f["reason"]) for f in one["findings"] if f["table"] == "entries"]
    assert found[0] == (0, "actor signature does not verify")
    expected = [
        (SPAN - 1, "stored hash does not match the entry bytes (edited entry)"),
        (SPAN - 1, "actor signature does not verify"),
        (SPAN, "stored hash does not match the entry bytes (edited entry)"),
        (SPAN, "prev does not match the hash of the entry before it"),
        (2 * SPAN, f"entries {2 * SPAN}..{2 * SPAN} are missing (deleted or reordered)"),
        (2 * SPAN + 1, "prev does not match the hash of the entry before it"),
        (trade, "trade consumer signature does not verify"),
        (trade + 1, "prev does not match the hash of the entry before it"),
        (3 * SPAN + 5, "kind/ts columns do not match the entry"),
        (3 * SPAN + 9, "entry is not JSON"),
        (3 * SPAN + 10, "prev does not match the hash of the entry before it"),
        (SIZE - 1, "actor signature does not verify"),
    ]
    assert all(item in found for item in expected), [e for e in expected if e not in found]
    seqs = [f["seq"] for f in one["findings"] if f["seq"] is not None]
    assert seqs == sorted(seqs)
    for workers in (2, 3):
        assert report(db, deep=deep, workers=workers) == one, workers


def test_worker_processes_spawned_beside_other_threads_report_the_same(
        template, tmp_path, no_fallback):
    """A node verifies with its threads running, where forking is unsafe: workers are spawned."""
    db = copy_of(template, tmp_path / "ledger.db")
    tamper(db)
    one = report(db, deep=False, workers=1)
    got: list[dict] = []
    thread = threading.Thread(target=lambda: got.append(report(db, deep=False, workers=2)))
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive() and got == [one]


def test_the_command_line_reports_the_sequential_findings(template, tmp_path, run_forge):
    db = copy_of(template, tmp_path / "ledger.db")
    tamper(db)
    result = run_forge("ledger", "verify", "--json", "--ledger", str(db), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert json.loads(result.stdout) == report(db, deep=False, workers=1)
    assert "ledger invalid: seq 0: actor signature does not verify" in result.stderr


def test_verify_all_keeps_each_outcome_at_its_index():
    signer, other = Identity.generate(), Identity.generate()
    checks = []
    for i in range(300):
        message = f"m{i}".encode()
        who = other if i % 37 == 0 else signer
        checks.append((signer.public_key, message, who.sign(message)))
    checks[-1] = (b"short key", b"m", bytes(64))
    one = parallel.verify_all(checks, workers=1)
    assert one == [i % 37 != 0 and i != 299 for i in range(300)]
    assert parallel.verify_all(checks, workers=4) == one


def test_zero_workers_is_a_usage_error(template):
    from forge_cli.errors import UsageError

    with Ledger.open_reader(template) as book, pytest.raises(UsageError, match="at least 1"):
        verifier.verify(book, workers=0)


def test_a_full_span_joins_the_tree_whole_and_deep_still_checks_every_node_in_it(
        template, tmp_path, no_fallback):
    """Span 1 holds no checkpoint and no gap, so it is folded as one subtree: a node stored
    wrong or missing inside it is still named, on one core and on several."""
    span = verifier.SPAN
    with Ledger.open_reader(template) as book:
        whole = verifier.check_span(book, span, 2 * span, deep=True)
        leaves = [whole.leaf(i) for i in range(span)]
        assert whole.subtree == merkle.subtree_levels(leaves)[-1][0]
        assert whole.height == span.bit_length() - 1 and len(whole.nodes) == whole.height
        assert verifier.check_span(book, 4 * span, SIZE, deep=False).subtree is None
    db = copy_of(template, tmp_path / "ledger.db")
    wrong, gone = (3, (span >> 3) + 5), (whole.height, 1)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE merkle_nodes SET hash = zeroblob(32) WHERE level = ? AND idx = ?",
                     wrong)
        conn.execute("DELETE FROM merkle_nodes WHERE level = ? AND idx = ?", gone)
    one = report(db, deep=True, workers=1)
    assert [f["reason"] for f in one["findings"]] == [
        f"node (level {wrong[0]}, index {wrong[1]}) is wrong",
        f"node (level {gone[0]}, index {gone[1]}) is missing"]
    assert report(db, deep=True, workers=2) == one
    assert report(db, deep=False, workers=2)["valid"]
