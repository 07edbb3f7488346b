"""Any change to any table of a real ledger file is caught by verify, with the right place."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from forge_cli.identity import Identity
from forge_cli.ledger.store import TABLES
from tests.ledger_factory import build_full_ledger


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("template") / "ledger.db"
    info = build_full_ledger(path, Identity.generate())
    return path, info


@pytest.fixture
def ledger_copy(template: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict]:
    source, info = template
    target = tmp_path / "ledger.db"
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)  # a consistent copy, WAL included
    return target, info


def mutated(value: object) -> object:
    if isinstance(value, bytes):
        return bytes([value[0] ^ 0x01]) + value[1:]
    if isinstance(value, int):
        return value + 1000
    assert isinstance(value, str) and value
    i = len(value) // 2
    if value[i] == "\n":
        i += 1
    return value[:i] + ("0" if value[i] != "0" else "1") + value[i + 1:]


def columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def all_cells(db: Path) -> list[tuple[str, str]]:
    return [(table, column) for table in TABLES for column in columns(db, table)]


def verify(run_forge, db: Path, *args: str) -> tuple[int, dict]:
    result = run_forge("ledger", "verify", "--json", "--ledger", str(db), *args)
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


def test_untouched_ledger_is_valid_plain_and_deep(ledger_copy, run_forge):
    db, info = ledger_copy
    for args in ((), ("--deep",)):
        code, report = verify(run_forge, db, *args)
        assert code == 0, report["findings"]
        assert report["valid"] and report["size"] == info["size"]
        assert report["checkpoints"] == 2
        # one actor signature per entry plus two per trade and three per dispute
        assert report["signatures"] == info["size"] + 4 + 3


@pytest.fixture(scope="module")
def cells(template) -> list[tuple[str, str]]:
    return all_cells(template[0])


def test_every_table_has_rows_to_tamper_with(template):
    db, _ = template
    with sqlite3.connect(db) as conn:
        for table in TABLES:
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0, table


TABLE_COLUMNS = [
    ("entries", c) for c in ("seq", "hash", "entry", "sig", "kind", "ts")
] + [
    ("bodies", "hash"), ("bodies", "data"),
    ("merkle_nodes", "level"), ("merkle_nodes", "idx"), ("merkle_nodes", "hash"),
    ("checkpoints", "size"), ("checkpoints", "root"), ("checkpoints", "note"),
    ("checkpoints", "vkey"),
    ("witnessed", "origin"), ("witnessed", "size"), ("witnessed", "root"),
    ("witnessed", "note"), ("witnessed", "log_vkey"), ("witnessed", "witness_vkey"),
    ("cosignatures", "size"), ("cosignatures", "witness_vkey"), ("cosignatures", "line"),
    ("cosignatures", "ts"),
    ("fork_evidence", "origin"), ("fork_evidence", "size"), ("fork_evidence", "note_a"),
    ("fork_evidence", "note_b"),
    ("accounts", "account"), ("accounts", "balance"), ("supply", "name"), ("supply", "cu"),
    ("trade_nonces", "consumer"), ("trade_nonces", "nonce"), ("trade_nonces", "seq"),
    ("redactions", "body"), ("redactions", "seq"), ("body_refs", "body"), ("body_refs", "seq"),
    ("trade_totals", "account"), ("trade_totals", "spent"), ("trade_totals", "earned"),
    ("trade_totals", "provided"),
    ("kill_switch", "name"), ("kill_switch", "active"), ("kill_switch", "reason"),
    ("kill_switch", "seq"),
    ("policies", "account"), ("policies", "per_request_cap_cu"), ("policies", "hourly_budget_cu"),
    ("policies", "lifetime_budget_cu"), ("policies", "approval_threshold_cu"), ("policies", "seq"),
    ("approvals", "id"), ("approvals", "account"), ("approvals", "cu"), ("approvals", "status"),
    ("approvals", "expires_ms"), ("approvals", "seq"),
    ("pool", "name"), ("pool", "cash"), ("pool", "lent"), ("pool", "shares"),
    ("lenders", "account"), ("lenders", "shares"), ("lenders", "deposited"),
    ("lenders", "withdrawn"),
    *(("loans", c) for c in ("loan_id", "account", "principal", "collateral", "rate_ppm",
                             "start_ms", "due_ms", "status", "interest", "closed_ms")),
    ("escrow", "account"), ("escrow", "cu"),
    ("loan_history", "account"), ("loan_history", "borrowed"), ("loan_history", "repaid"),
    ("loan_history", "defaulted"),
    ("heartbeats", "account"), ("heartbeats", "hour"), ("heartbeats", "seq"),
    ("first_seen", "account"), ("first_seen", "ts"),
    ("unsettled", "account"), ("unsettled", "count"), ("unsettled", "seq"),
    ("audit_record", "account"), ("audit_record", "passed"), ("audit_record", "disputed"),
    ("audit_record", "forged"),
    *(("audits", c) for c in ("trade_id", "auditor", "provider", "verdict", "seq")),
]


def test_the_tamper_matrix_covers_every_column_of_every_table(cells):
    assert sorted(cells) == sorted(TABLE_COLUMNS)


@pytest.mark.parametrize(("table", "column"), TABLE_COLUMNS)
def test_changing_any_value_is_caught_by_deep_verify(ledger_copy, run_forge, table, column):
    db, info = ledger_copy
    target_seq = info["trade_seq"]
    with sqlite3.connect(db) as conn:
        if table == "entries":
            rowid = target_seq
            where = "seq = ?"
        else:
            rowid = conn.execute(f"SELECT rowid FROM {table} LIMIT 1").fetchone()[0] if \
                table in ("checkpoints", "witnessed") else None
            where = "rowid = ?" if rowid is not None else None
        if where is None:  # WITHOUT ROWID tables: pick the first row by its primary key
            row = conn.execute(f"SELECT {column}, * FROM {table} LIMIT 1").fetchone()
            old = row[0]
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?", (mutated(old), old))
        else:
            old = conn.execute(f"SELECT {column} FROM {table} WHERE {where}", (rowid,)).fetchone()[0]
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (mutated(old), rowid))
        assert conn.total_changes >= 1

    code, report = verify(run_forge, db, "--deep")
    assert code == 1
    assert not report["valid"]
    tables = {f["table"] for f in report["findings"]}
    if table in ("entries",):
        assert table in tables
        assert min(f["seq"] for f in report["findings"] if f["seq"] is not None) == target_seq
        plain_code, plain = verify(run_forge, db)
        assert plain_code == 1, "entries and signatures are caught without --deep"
    elif table == "bodies":
        assert "bodies" in tables
    else:
        assert table in tables, report["findings"]


def test_first_bad_seq_and_reason_go_to_stderr(ledger_copy, run_forge):
    db, info = ledger_copy
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE entries SET sig = zeroblob(64) WHERE seq = 4")
    result = run_forge("ledger", "verify", "--ledger", str(db))
    assert result.returncode == 1
    assert "seq 4" in result.stderr and "signature does not verify" in result.stderr
    assert "Traceback" not in result.stderr


def test_deleted_entry_is_caught(ledger_copy, run_forge):
    db, _ = ledger_copy
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM entries WHERE seq = 6")
    code, report = verify(run_forge, db)
    assert code == 1
    assert report["findings"][0]["seq"] == 6
    assert "missing" in report["findings"][0]["reason"]


def test_reordered_entries_are_caught(ledger_copy, run_forge):
    db, _ = ledger_copy
    with sqlite3.connect(db) as conn:
        rows = {seq: row for seq, *row in conn.execute(
            "SELECT seq, hash, entry, sig, kind, ts FROM entries WHERE seq IN (8, 9)")}
        for seq, other in ((8, 9), (9, 8)):
            conn.execute("UPDATE entries SET hash=?, entry=?, sig=?, kind=?, ts=? WHERE seq=?",
                         (*rows[other], seq))
    code, report = verify(run_forge, db)
    assert code == 1
    assert {f["seq"] for f in report["findings"]} >= {8, 9}


def test_truncated_tail_is_caught_by_stored_checkpoint(ledger_copy, run_forge):
    db, info = ledger_copy
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM entries WHERE seq >= ?", (info["size"] - 3,))
    code, report = verify(run_forge, db)
    assert code == 1
    assert any("truncated" in f["reason"] for f in report["findings"])


def test_truncated_tail_with_checkpoints_removed_is_caught_against_a_saved_one(
        ledger_copy, run_forge, tmp_path):
    db, info = ledger_copy
    with sqlite3.connect(db) as conn:
        saved_note = conn.execute("SELECT note FROM checkpoints ORDER BY size DESC").fetchone()[0]
    saved = tmp_path / "cp.txt"
    saved.write_text(saved_note)
    code, _ = verify(run_forge, db, "--checkpoint", str(saved))
    assert code == 0
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM entries WHERE seq >= ?", (info["size"] - 2,))
        conn.execute("DELETE FROM checkpoints WHERE size > ?", (info["size"] - 2,))
        conn.execute("DELETE FROM merkle_nodes")  # hide the evidence in the cache as well
    # Without the saved checkpoint the shortened ledger is self-consistent...
    code, report = verify(run_forge, db)
    assert code == 0, report["findings"]
    # ...and against the checkpoint saved outside it, the truncation shows.
    code, report = verify(run_forge, db, "--checkpoint", str(saved))
    assert code == 1
    assert report["findings"][0]["seq"] == info["size"] - 2
    assert "truncated" in report["findings"][0]["reason"]


def test_saved_checkpoint_that_does_not_verify_exits_1(ledger_copy, run_forge, tmp_path):
    db, _ = ledger_copy
    with sqlite3.connect(db) as conn:
        text = conn.execute("SELECT note FROM checkpoints ORDER BY size DESC").fetchone()[0]
    forged = tmp_path / "forged.txt"
    lines = text.split("\n")
    lines[1] = "3"  # claim a smaller tree under the original signature
    forged.write_text("\n".join(lines))
    result = run_forge("ledger", "verify", "--ledger", str(db), "--checkpoint", str(forged))
    assert result.returncode == 1
    assert "does not verify" in result.stderr


def test_a_file_that_is_not_sqlite_is_an_error_not_a_traceback(run_forge, tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    result = run_forge("ledger", "verify", "--ledger", str(junk))
    assert result.returncode == 2
    assert "forge: error:" in result.stderr and "Traceback" not in result.stderr


def test_missing_ledger_is_exit_2(run_forge, tmp_path):
    result = run_forge("ledger", "verify", "--ledger", str(tmp_path / "nope.db"))
    assert result.returncode == 2
    assert "no ledger at" in result.stderr


def test_a_validly_signed_entry_that_breaks_a_rule_is_named_by_deep_verify(tmp_path, run_forge):
    """A buggy writer: it signs and chains an overspending transfer without applying its rule.

    The chain and every signature are sound, so plain verify passes; the replay in
    --deep names the entry that spends CU its account never had.
    """
    from forge_cli.ledger import merkle
    from forge_cli.ledger.store import Draft, Ledger

    me = Identity.generate()
    db = tmp_path / "buggy.db"
    with Ledger.open_writer(db, me) as book:
        book.append("grant", {"account": me.node_id, "cu": 10})
        fields, raw, leaf, bodies = book._build(
            Draft("transfer", {"from": me.node_id, "to": "ab" * 32, "cu": 50}),
            me.node_id, book.size, book.head)
        rng = merkle.CompactRange(book.size, list(book._range.peaks))
        with book._transaction():  # the bug: views.apply is skipped
            written = book._insert(rng, [(fields, raw, leaf, me.sign(leaf), bodies)])
        book._advance(rng, written)
        book.append("note", {"text": "written after the bad one"})
    plain, _ = verify(run_forge, db)
    assert plain == 0
    code, report = verify(run_forge, db, "--deep")
    assert code == 1
    named = [f for f in report["findings"] if f["seq"] is not None]
    assert named[0]["seq"] == 1
    assert "breaks a ledger rule" in named[0]["reason"] and "balance" in named[0]["reason"]
