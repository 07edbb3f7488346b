"""Settlement statements: produced by a node, verified offline by a fresh process, tampered
copies refused with the edited amount named."""

from __future__ import annotations

import json
from pathlib import Path

from tests.node_harness import NodeProcess


def test_statement_from_a_node_verifies_offline_and_tampering_is_named(
        forge_home: Path, run_forge, tiny_gguf: Path, tmp_path: Path):
    with NodeProcess(forge_home, tiny_gguf) as node:
        bob = node.agent("bob")
        for _ in range(2):
            status, _, body = node.request("POST", "/v1/chat/completions", token=bob["token"], body={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "temperature": 0})
            assert status == 200, body
        status, _, doc = node.request("GET", "/v1/forge/settlement?hours=1&price=7",
                                      token=node.operator_token)
        assert status == 200 and doc["totals"]["trades"] == 2
        statement = tmp_path / "statement.json"
        done = run_forge("settle", "--hours", "1", "--out", str(statement))
        assert done.returncode == 0, done.stderr
        csv_out = run_forge("settle", "--format", "csv")
        assert csv_out.stdout.splitlines()[0] == "account,earned,spent,net,trades,payout_msat"
    (forge_home / "node.url").unlink(missing_ok=True)

    doc = json.loads(statement.read_text())
    spent = sum(t["entry"]["data"]["terms"]["cu"] for t in doc["trades"])
    by_account = {row["account"]: row for row in doc["accounts"]}
    assert by_account[bob["account"]]["spent"] == spent and by_account[bob["account"]]["trades"] == 2
    assert by_account[doc["node"]]["net"] == spent
    assert by_account[doc["node"]]["payout_msat"] == spent * 10

    ok = run_forge("settle", "verify", str(statement))  # a fresh process, no node running
    assert ok.returncode == 0, ok.stderr

    edited = json.loads(statement.read_text())
    for row in edited["accounts"]:
        if row["account"] == doc["node"]:
            row["earned"] += 5
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(edited))
    result = run_forge("settle", "verify", str(bad))
    assert result.returncode == 1
    assert f"accounts[{doc['node'][:16]}…].earned is {spent + 5}" in result.stderr
    assert "signature" in result.stderr

    moved = json.loads(statement.read_text())
    moved["trades"][0]["entry"]["data"]["terms"]["cu"] += 1
    bad.write_text(json.dumps(moved))
    result = run_forge("settle", "verify", str(bad))
    assert result.returncode == 1 and "inclusion proof does not verify" in result.stderr

    bad.write_text("{not json")
    assert run_forge("settle", "verify", str(bad)).returncode == 2


def test_settle_works_offline_on_the_ledger_file(forge_home: Path, run_forge, tmp_path: Path):
    from forge_cli import identity
    from forge_cli.identity import Identity
    from forge_cli.ledger.store import Ledger
    from tests.ledger_factory import signed_trade

    consumer = Identity.generate()
    owner = identity.load_or_create()
    with Ledger.open_writer(forge_home / "ledger.db", owner) as book:
        book.append("grant", {"account": consumer.node_id, "cu": 100})
        book.append("trade", signed_trade(owner, consumer, tokens=30))
    out = tmp_path / "s.json"
    assert run_forge("settle", "--out", str(out)).returncode == 0
    doc = json.loads(out.read_text())
    assert doc["totals"] == {"trades": 1, "cu": 30}
    assert run_forge("settle", "verify", str(out)).returncode == 0


def test_settle_on_a_home_without_a_ledger_says_so_and_creates_nothing(forge_home: Path,
                                                                         run_forge):
    done = run_forge("settle")
    assert done.returncode == 2
    assert "no ledger at" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""
    assert not (forge_home / "ledger.db").exists()
    assert not (forge_home / "node.key").exists()
