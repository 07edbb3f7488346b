"""`forge audit list` and `forge audit show PEER`: the ledger's audit record, for people and
for scripts, from a real ledger file holding an audit and a dispute."""

from __future__ import annotations

import json
from pathlib import Path

from forge_cli.identity import Identity
from tests.ledger_factory import build_full_ledger


def test_list_and_show_summarise_audits_and_disputes_from_the_ledger(run_forge, tmp_path: Path):
    owner = Identity.generate()
    db = tmp_path / "ledger.db"
    info = build_full_ledger(db, owner)
    provider, auditor = info["stranger"].node_id, owner.node_id

    result = run_forge("audit", "list", "--json", "--ledger", str(db))
    assert result.returncode == 0, result.stderr
    rows = {r["node_id"]: r for r in json.loads(result.stdout)}
    assert rows[provider]["audits_passed"] == 1 and rows[provider]["disputes_against"] == 1
    assert rows[provider]["disputes_forged"] == 0
    # 5000 − 2500 for the dispute + 20 for the audit − 500 for terms it left unsigned
    assert rows[provider]["reputation"] == 2_020

    result = run_forge("audit", "show", provider[:10], "--json", "--ledger", str(db))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["node_id"] == provider
    assert [(e["kind"], e["verdict"], e["role"]) for e in shown["entries"]] == [
        ("audit", "passed", "provider"), ("dispute", "upheld", "provider")]
    assert shown["entries"][1]["auditor"] == auditor
    assert shown["entries"][1]["failing_positions"] == [2]

    text = run_forge("audit", "show", provider, "--ledger", str(db))
    assert text.returncode == 0 and "disputes against it 1" in text.stdout
    assert "upheld" in text.stdout and "model: 1 of 5 tokens" in text.stdout
    listing = run_forge("audit", "list", "--ledger", str(db))
    assert listing.returncode == 0 and provider[:16] in listing.stdout


def test_show_refuses_a_bad_or_unknown_peer_with_exit_2(run_forge, tmp_path: Path):
    db = tmp_path / "ledger.db"
    build_full_ledger(db, Identity.generate())
    for peer, expected in (("xyz", "hex digits"), ("0" * 64, "no audit record")):
        result = run_forge("audit", "show", peer, "--ledger", str(db))
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr
