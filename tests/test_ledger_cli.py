"""`forge ledger` subcommands on real ledger files, as shell scripts use them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from forge_cli.errors import EntryRejected, ProofFailed
from forge_cli.identity import Identity, load_or_create
from forge_cli.ledger import merkle, note
from forge_cli.ledger.store import Draft, Ledger
from forge_cli.ledger.witness import witness
from tests.ledger_factory import build_full_ledger, signed_trade


@pytest.fixture
def full(forge_home: Path):
    """The user's own ledger (FORGE_HOME/ledger.db) with every kind of entry."""
    owner = load_or_create(forge_home / "node.key") if forge_home.mkdir(parents=True) is None else None
    info = build_full_ledger(forge_home / "ledger.db", owner)
    return forge_home / "ledger.db", info


def js(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_root_prove_and_consistency_agree_with_the_merkle_module(full, run_forge):
    db, info = full
    with Ledger.open_reader(db) as book:
        leaves = [e.raw for e in book.iter_entries()]
    root = js(run_forge("ledger", "root", "--json"))
    assert root["size"] == info["size"]
    assert root["root"] == merkle.root(leaves).hex()
    proof = js(run_forge("ledger", "prove", "3", "--size", "9", "--json"))
    assert proof["proof"] == [p.hex() for p in merkle.inclusion_proof(leaves[:9], 3)]
    assert merkle.verify_inclusion(bytes.fromhex(proof["leaf_hash"]), 3, 9,
                                   [bytes.fromhex(p) for p in proof["proof"]],
                                   merkle.root(leaves[:9]))
    cons = js(run_forge("ledger", "consistency", "5", str(info["size"]), "--json"))
    assert cons["proof"] == [p.hex() for p in merkle.consistency_proof(leaves, 5)]
    bad = run_forge("ledger", "prove", "99")
    assert bad.returncode == 2 and "not in a tree" in bad.stderr


def test_show_get_and_kind_filter(full, run_forge):
    db, info = full
    trades = js(run_forge("ledger", "show", "--kind", "trade", "--json"))
    assert [t["entry"]["kind"] for t in trades] == ["trade", "trade"]
    last3 = js(run_forge("ledger", "show", "--limit", "3", "--json"))
    assert [e["entry"]["seq"] for e in last3] == [info["size"] - 3, info["size"] - 2, info["size"] - 1]
    text = run_forge("ledger", "show", "--limit", "100").stdout
    assert "grant" in text and "trade" in text
    entry = js(run_forge("ledger", "get", str(info["trade_seq"]), "--json"))
    statuses = sorted(entry["body_status"].values())
    assert statuses[0] == "8 bytes" and statuses[1].startswith("redacted at seq")
    missing = run_forge("ledger", "get", "999")
    assert missing.returncode == 2 and "no entry 999" in missing.stderr


def test_replay_until_gives_the_state_at_that_point(full, run_forge):
    _, info = full
    owner, consumer = info["owner"].node_id, info["consumer"].node_id
    early = js(run_forge("ledger", "replay", "--until", "1", "--json"))
    assert early["balances"] == {owner: 1000, consumer: 500}
    assert early["supply"] == {"granted": 1500, "burned": 0}
    final = js(run_forge("ledger", "replay", "--json"))
    # burns: 5 CU, and 3 CU (10 %) of a defaulted loan's 30 CU collateral
    assert final["supply"] == {"granted": 1500, "burned": 8}
    assert final["escrow"] == 20 and final["pool"] == {"cash": 291, "lent": 60, "shares": 400}
    assert sum(final["balances"].values()) + final["escrow"] + final["pool"]["cash"] == 1492
    # trades 43; loan 1: +100 −101 (1 CU interest); loan 2 defaults: +90 −30; loan 3: +60 −20
    assert final["balances"][consumer] == 500 - 40 - 3 + 100 - 101 + 90 - 30 + 60 - 20
    assert final["trades"] == 2 and final["redacted_bodies"] == 1
    out_of_range = run_forge("ledger", "replay", "--until", "500")
    assert out_of_range.returncode == 2


def test_causal_walks_parents_and_children(full, run_forge):
    _, info = full
    out = js(run_forge("ledger", "causal", str(info["trade_seq"]), "--json"))
    assert out["ancestors"] == []
    assert len(out["children"]) == 1  # the redaction names the trade as its parent
    child = js(run_forge("ledger", "causal", str(out["children"][0]), "--json"))
    assert child["ancestors"] == [info["trade_seq"]]


def test_checkpoint_command_prints_a_note_that_verifies(full, run_forge, tmp_path):
    _, info = full
    result = run_forge("ledger", "checkpoint")
    assert result.returncode == 0
    cp = note.open_checkpoint(result.stdout, note.Verifier(
        note.origin_for(info["owner"].node_id), info["owner"].public_key))
    assert cp.size == info["size"]
    saved = tmp_path / "cp.txt"
    saved.write_text(result.stdout)
    assert run_forge("ledger", "verify", "--checkpoint", str(saved)).returncode == 0


def test_export_then_import_into_an_empty_ledger_reproduces_it(full, run_forge, tmp_path):
    db, info = full
    exported = run_forge("ledger", "export")
    assert exported.returncode == 0
    dump = tmp_path / "dump.jsonl"
    dump.write_text(exported.stdout)
    lines = exported.stdout.splitlines()
    assert json.loads(lines[0])["size"] == info["size"]
    assert "checkpoint" in json.loads(lines[-1])
    copy = tmp_path / "copy.db"
    imported = run_forge("ledger", "import", str(dump), "--ledger", str(copy))
    assert imported.returncode == 0, imported.stderr
    assert f"imported {info['size']} entries" in imported.stdout
    assert js(run_forge("ledger", "root", "--json", "--ledger", str(copy))) == \
        js(run_forge("ledger", "root", "--json"))
    assert run_forge("ledger", "verify", "--deep", "--ledger", str(copy)).returncode == 0
    again = run_forge("ledger", "import", str(dump), "--ledger", str(copy))
    assert again.returncode == 0 and "nothing to import" in again.stdout


def _tamper_line(text: str, index: int, change) -> str:
    lines = text.splitlines()
    item = json.loads(lines[index])
    change(item)
    lines[index] = json.dumps(item)
    return "\n".join(lines) + "\n"


def _set_cu(item):
    item["entry"]["data"]["cu"] = 999


def _swap_body(item):
    key = next(iter(item["bodies"]))
    item["bodies"][key] = base64.b64encode(b"forged").decode()


@pytest.mark.parametrize("tamper", [
    lambda t: _tamper_line(t, 3, _set_cu),                     # an amount changed
    lambda t: _tamper_line(t, 6, lambda i: i.update(sig="00" * 64)),  # a signature replaced
    lambda t: _tamper_line(t, 4, _swap_body),                  # a body replaced
    lambda t: "\n".join(t.splitlines()[:-3] + t.splitlines()[-2:]) + "\n",  # an entry dropped
    lambda t: "\n".join(t.splitlines()[:-2]) + "\n",           # tail cut, header still says more
    lambda t: _tamper_line(t, 0, lambda i: i.update(root="00" * 32)),  # header root forged
    lambda t: t.replace('"format"', '"fmt"', 1),               # not an export
    lambda t: t[: len(t) // 2],                                # file cut mid-line
], ids=["amount", "signature", "body", "dropped", "truncated", "root", "header", "torn"])
def test_import_of_a_tampered_export_writes_nothing(full, run_forge, tmp_path, tamper):
    exported = run_forge("ledger", "export").stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tamper(exported))
    target = tmp_path / "target.db"
    with Ledger.open_writer(target, Identity.generate()) as book:
        book.append("note", {"text": "pre-existing"})
    result = run_forge("ledger", "import", str(bad), "--ledger", str(Path(tmp_path / "fresh.db")))
    assert result.returncode == 1, result.stderr
    assert "nothing was imported" in result.stderr and "Traceback" not in result.stderr
    fresh = tmp_path / "fresh.db"
    if fresh.exists():
        with Ledger.open_reader(fresh) as book:
            assert book.size == 0
    # A ledger that does not share the export's history is a fork: refused, untouched.
    forked = run_forge("ledger", "import", str(bad), "--ledger", str(target))
    assert forked.returncode == 1
    with Ledger.open_reader(target) as book:
        assert book.size == 1


def test_witness_cosigns_consistent_checkpoints_and_refuses_a_fork(tmp_path):
    log_owner, witness_owner = Identity.generate(), Identity.generate()
    vkey = note.Verifier(note.origin_for(log_owner.node_id), log_owner.public_key).vkey()
    with Ledger.open_writer(tmp_path / "log.db", log_owner) as log, \
            Ledger.open_writer(tmp_path / "witness.db", witness_owner) as witness_book:
        log.append_many([Draft("note", {"text": str(i)}) for i in range(6)])
        cosigned = witness(witness_book, log.checkpoint(), vkey)
        name = note.origin_for(witness_owner.node_id) + "/witness"
        wverifier = note.Verifier(name, witness_owner.public_key, note.COSIGNATURE_V1)
        assert note.verify_cosignature(cosigned, wverifier) > 0
        assert note.open_checkpoint(cosigned, note.Verifier.parse(vkey)).size == 6
        log.append_many([Draft("note", {"text": str(i)}) for i in range(6, 10)])
        second = log.checkpoint()
        with pytest.raises(ProofFailed):
            witness(witness_book, second, vkey, [])  # no proof: refuses to vouch
        witness(witness_book, second, vkey, log.consistency_proof(6, 10))
        # A forked log: same key, different history of the same length and longer.
        with Ledger.open_writer(tmp_path / "fork.db", log_owner) as fork:
            fork.append_many([Draft("note", {"text": f"x{i}"}) for i in range(12)])
            forged = fork.checkpoint()
            with pytest.raises(ProofFailed, match="not consistent"):
                witness(witness_book, forged, vkey, fork.consistency_proof(10, 12))


def test_trade_rules_replay_and_forged_signature_are_rejected(tmp_path):
    provider, consumer = Identity.generate(), Identity.generate()
    with Ledger.open_writer(tmp_path / "l.db", provider) as book:
        book.append("grant", {"account": consumer.node_id, "cu": 100})
        trade = signed_trade(provider, consumer, tokens=30, nonce="nonce-0001")
        book.append("trade", trade)
        with pytest.raises(EntryRejected, match="replay"):
            book.append("trade", trade)
        forged = signed_trade(provider, consumer, nonce="nonce-0002")
        forged["terms"]["cu"] = forged["terms"]["cu"]  # unchanged terms, swapped signature:
        forged["consumer_sig"] = forged["provider_sig"]
        with pytest.raises(EntryRejected, match="consumer signature"):
            book.append("trade", forged)
        wrong_cost = signed_trade(provider, consumer, nonce="nonce-0003")
        wrong_cost["terms"]["cu"] += 1
        with pytest.raises(EntryRejected, match="cost"):
            book.append("trade", wrong_cost)
        broke = signed_trade(provider, consumer, tokens=100, nonce="nonce-0004")
        with pytest.raises(EntryRejected, match="balance"):
            book.append("trade", broke)
        assert book.balance(consumer.node_id) == 70 and book.balance(provider.node_id) == 30
        assert book.size == 2


def test_redaction_removes_the_body_and_verify_tells_redacted_from_missing(tmp_path, run_forge):
    me = Identity.generate()
    db = tmp_path / "l.db"
    with Ledger.open_writer(db, me) as book:
        e = book.append("note", {"text": "secret"}, bodies=[b"my secret prompt"])
        body = e.fields["bodies"][0]
        book.append("redact", {"body": body}, parent=e.seq)
        assert book.body(body) is None and book.redacted_at(body) == 1
        with pytest.raises(EntryRejected, match="already redacted"):
            book.append("redact", {"body": body})
        with pytest.raises(EntryRejected, match="cannot be stored again"):
            book.append("note", {"text": "again"}, bodies=[b"my secret prompt"])
        with pytest.raises(EntryRejected, match="no entry before it"):
            book.append("redact", {"body": "00" * 32})
        other = book.append("note", {"text": "kept"}, bodies=[b"kept body"])
    assert run_forge("ledger", "verify", "--deep", "--ledger", str(db)).returncode == 0
    import sqlite3
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM bodies WHERE hash = ?", (other.fields["bodies"][0],))
    result = run_forge("ledger", "verify", "--deep", "--json", "--ledger", str(db))
    findings = json.loads(result.stdout)["findings"]
    assert result.returncode == 1
    assert [(f["seq"], "missing (not redacted)" in f["reason"]) for f in findings] == [(2, True)]


def test_cosign_command_witnesses_another_nodes_log(run_forge, tmp_path):
    other = Identity.generate()
    theirs = tmp_path / "theirs.db"
    with Ledger.open_writer(theirs, other) as log:
        log.append_many([Draft("note", {"text": str(i)}) for i in range(4)])
        first = tmp_path / "first.txt"
        first.write_text(log.checkpoint())
        log.append_many([Draft("note", {"text": str(i)}) for i in range(4, 7)])
        second = tmp_path / "second.txt"
        second.write_text(log.checkpoint())
        vkey = log.latest_checkpoint()[3]
    proof = tmp_path / "proof.json"
    made = run_forge("ledger", "consistency", "4", "7", "--json", "--ledger", str(theirs))
    assert made.returncode == 0, made.stderr
    proof.write_text(made.stdout)
    mine = tmp_path / "mine.db"
    first_cosigned = run_forge("ledger", "cosign", str(first), "--key", vkey, "--ledger", str(mine))
    assert first_cosigned.returncode == 0, first_cosigned.stderr
    assert first_cosigned.stdout.count("\u2014 ") == 2  # the log's signature and ours
    refused = run_forge("ledger", "cosign", str(second), "--key", vkey, "--ledger", str(mine))
    assert refused.returncode == 1 and "not consistent" in refused.stderr
    accepted = run_forge("ledger", "cosign", str(second), "--key", vkey, "--proof", str(proof),
                         "--ledger", str(mine))
    assert accepted.returncode == 0, accepted.stderr
    rolled_back = run_forge("ledger", "cosign", str(first), "--key", vkey, "--ledger", str(mine))
    assert rolled_back.returncode == 1 and "shrank" in rolled_back.stderr
    assert run_forge("ledger", "verify", "--deep", "--ledger", str(mine)).returncode == 0
