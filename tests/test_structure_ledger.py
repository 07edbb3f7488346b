"""The ledger layer's structure: one owner for its SQL, its entry rules and its files.

- only `forge_cli/ledger/` runs SQL on a ledger's connection (everyone else uses `queries`);
- the signing helper is `ledger/signing.py` (`signworker` is gone);
- import checks entries with verify's one per-entry checker, never with rules of its own.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

SOURCES = [p for folder in ("forge_cli", "tui", "bench") for p in (REPO / folder).rglob("*.py")]
LEDGER = REPO / "forge_cli" / "ledger"
# A ledger's connection reached by name: `ledger.conn`, `self.ledger.conn`, `reader.conn`,
# `node.reader.conn`, `book.conn`. mesh/network.py's own `self.conn` is network.db.
LEDGER_CONN = re.compile(r"\b(ledger|reader|book|_ledger|_reader)\.conn\b")


def _outside_ledger() -> list[Path]:
    return [p for p in SOURCES if LEDGER not in p.parents]


def test_no_sql_on_the_ledgers_connection_outside_the_ledger_package():
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}"
             for p in _outside_ledger()
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if LEDGER_CONN.search(line)]
    assert not found, "use a named query in forge_cli/ledger/queries.py:\n" + "\n".join(found)


def test_nothing_outside_the_ledger_package_calls_table_rows_on_a_connection():
    found = [str(p.relative_to(REPO)) for p in _outside_ledger()
             if "table_rows(" in p.read_text(encoding="utf-8")]
    assert not found, found


def test_the_pattern_catches_what_it_is_meant_to():
    """A structure check that cannot fail is no check."""
    assert LEDGER_CONN.search('rows = self.ledger.conn.execute("SELECT 1")')
    assert LEDGER_CONN.search("node.reader.conn.execute(sql)")
    assert not LEDGER_CONN.search('self.conn.execute("SELECT value FROM meta")')


def test_the_signing_helper_is_ledger_signing_and_signworker_is_gone():
    assert not (LEDGER / "signworker.py").exists()
    assert (LEDGER / "signing.py").exists()
    mentions = [str(p.relative_to(REPO)) for p in [*SOURCES, *(REPO / "tests").rglob("*.py")]
                if p != Path(__file__) and "signworker" in p.read_text(encoding="utf-8")]
    assert not mentions, mentions


def _calls(tree: ast.AST) -> set[str]:
    """Dotted names of everything called in `tree` (`verify.check_entry`, `hashlib.sha256`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            names.add(".".join(reversed(parts)))
    return names


def test_import_checks_entries_with_verifys_one_checker():
    tree = ast.parse((LEDGER / "importer.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"hashlib", "nacl", "nacl.signing", "nacl.bindings", "forge_cli.identity",
                           "forge_cli.canonical", "json"}, imported
    calls = _calls(tree)
    assert "verify.check_entry" in calls and "verify.bad_signatures" in calls, calls
    own_rules = {c for c in calls if re.search(
        r"leaf_hash|body_hash|sha256|verify_hex|crypto_sign|trade_signature|check_envelope|"
        r"decode|loads", c)}
    assert not own_rules, f"importer re-implements entry rules: {own_rules}"


def test_store_no_longer_holds_import_or_witnessing():
    tree = ast.parse((LEDGER / "store.py").read_text(encoding="utf-8"))
    methods = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not methods & {"import_records", "witness"}, methods
    classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    assert classes == {"Draft", "Ledger"}, classes
