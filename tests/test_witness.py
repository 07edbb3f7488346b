"""Witnesses (c2sp.org/tlog-witness) between real nodes on 127.0.0.1: add-checkpoint answers as
the spec says, a node's peers cosign its checkpoints, a forked log is refused with 409, the
evidence travels by gossip and a third node flags the forked node; and the Bitcoin anchor."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from forge_cli import identity
from forge_cli.errors import ProofFailed, UsageError
from forge_cli.identity import Identity
from forge_cli.ledger import anchor, note, witness
from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env
from tests.mesh_helpers import wait_for
from tests.node_harness import NodeProcess
from tests.test_ledger_tiles import run_verifier
from tests.test_mesh_gossip import STATIC, FakePeer, flag_of, node_peers, notes

ADD = "/ledger/witness/add-checkpoint"
EVIDENCE = "/v1/forge/witness/evidence"


@pytest.fixture
def nodes(tmp_path: Path, tiny_gguf: Path) -> Iterator[Callable[..., NodeProcess]]:
    with ExitStack() as stack:
        def start(name: str, *extra: str) -> NodeProcess:
            return stack.enter_context(NodeProcess(tmp_path / name, tiny_gguf, "--mesh", *extra,
                                                   env=STATIC, log=tmp_path / f"{name}.log"))
        yield start


def forge(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge_cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=forge_env(home), timeout=120)


def submission(old: int, proof: list[bytes], note_text: str) -> bytes:
    lines = "".join(base64.b64encode(p).decode() + "\n" for p in proof)
    return f"old {old}\n{lines}\n{note_text}".encode()


def post(node: NodeProcess, body: bytes) -> tuple[int, dict[str, str], Any]:
    return node.request("POST", ADD, raw=body, headers={"Content-Type": "text/plain"})


def code(answer: Any) -> str | None:
    return answer["error"]["code"] if isinstance(answer, dict) else None


# -- add-checkpoint over HTTP --------------------------------------------------------------------

def test_add_checkpoint_answers_each_case_as_tlog_witness_says(nodes, tmp_path):
    key = Identity.generate()
    log = notes(Ledger.open_writer(tmp_path / "log.db", key), "a", "b", "c")
    fork = notes(Ledger.open_writer(tmp_path / "fork.db", key), "x", "y", "z")
    fake = FakePeer(key, [log])
    try:
        w = nodes("w", "--peer", fake.url)
        wait_for("the log found as a mesh peer",
                 lambda: any(p["node_id"] == key.node_id for p in node_peers(w)))
        first = log.checkpoint()
        # Hostile or malformed bodies: 400 with the envelope, nothing witnessed.
        for body in (b"", b"old 01\n\n" + first.encode(), b"new 0\n\n" + first.encode(),
                     b"\xff\xfe", b"old 0\nnot-base64!\n\n" + first.encode(),
                     submission(0, [b"\x00" * 32] * 64, first), b"old 4\n\n" + first.encode(),
                     b"old 0\n\n" + b"x" * 20_000, b"old 0\n\nforge.local/x\n3\n"):
            status, _, answer = post(w, body)
            assert status in (400, 413) and "error" in answer, (body[:30], status, answer)
        # A log the node does not witness: 404; a signature by another key: 403.
        stranger = notes(Ledger.open_writer(tmp_path / "s.db", Identity.generate()), "a")
        status, _, answer = post(w, submission(0, [], stranger.checkpoint()))
        assert status == 404 and code(answer) == "unknown_log"
        cp = note.Checkpoint.parse_body(note.SignedNote.parse(first).text)
        forged = note.sign_checkpoint(cp, Identity.generate())  # its origin, another key
        status, _, answer = post(w, submission(0, [], forged))
        assert status == 403 and code(answer) == "bad_signature"
        # First sight: old 0, no proof; the answer is W's cosignature line, which verifies.
        status, head, lines = post(w, submission(0, [], first))
        assert status == 200, lines
        w_key = witness.witness_verifier(w_id := wait_for("w's id", lambda: _id(w)))
        assert note.verify_cosignature(first + lines, w_key) > 0
        # A stale old size: 409 text/x.tlog.size naming the size held.
        notes(log, "d", "e")
        second = log.checkpoint()
        status, head, answer = post(w, submission(0, [], second))
        assert status == 409 and head["Content-Type"] == "text/x.tlog.size"
        assert str(answer).strip() == "3"
        # A bad proof: 422; the right one: 200.
        proof = log.consistency_proof(3, 5)
        status, _, answer = post(w, submission(3, [bytes(32)] * len(proof), second))
        assert status == 422 and code(answer) == "bad_proof"
        status, _, lines = post(w, submission(3, proof, second))
        assert status == 200 and note.verify_cosignature(second + lines, w_key) > 0
        # Two checkpoints of size 5 with different roots: 409, evidence kept, the log flagged.
        notes(fork, "w", "v")
        status, _, answer = post(w, submission(5, [], fork.checkpoint()))
        assert status == 409 and code(answer) == "split_view"
        held = w.request("GET", EVIDENCE)[2]["evidence"]
        assert [(e["origin"], e["size"]) for e in held] == [(note.origin_for(key.node_id), 5)]
        assert witness.check_evidence(held[0]).size == 5  # both notes verify, anyone can check
        assert flag_of(w, fake.url).startswith("split view")
        assert w_id != key.node_id
    finally:
        fake.close()
        for book in (log, fork):
            book.close()


def _id(node: NodeProcess) -> str | None:
    status, _, body = node.request("GET", "/health")
    return body.get("node_id") if status == 200 else None


# -- a forked node, its witness and a third node --------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_forked_log_is_refused_by_its_witness_and_a_third_node_flags_it(nodes, tmp_path):
    # F's two histories under one key, of one size: what a node that forks its log shows.
    f_home = tmp_path / "f"
    key = Identity.generate()
    identity.write_new_key(f_home / "node.key", key)
    notes(Ledger.open_writer(f_home / "ledger.db", key), "a", "b", "c").close()
    notes(Ledger.open_writer(tmp_path / "fork.db", key), "x", "y", "z").close()
    port = free_port()
    f_url = f"http://127.0.0.1:{port}"
    w = nodes("w", "--peer", f_url)
    f = nodes("f", "--port", str(port), "--peer", w.url)
    w_id = wait_for("w's id", lambda: _id(w))

    # F's peers cosign its checkpoints; `forge ledger checkpoint` prints them (from a reader
    # while the node holds the ledger) and `verify --witnesses` counts them.
    def cosigned() -> dict[str, Any] | None:
        done = forge(f_home, "ledger", "checkpoint", "--json")  # none until f signs one
        out = json.loads(done.stdout) if done.returncode == 0 else {}
        return out if out.get("cosignatures") else None

    shown = wait_for("w's cosignature kept by f", cosigned)
    assert shown["cosignatures"][0]["witness"] == witness.witness_verifier(w_id).vkey()
    w_key = witness.witness_verifier(w_id)
    assert note.verify_cosignature(shown["note"], w_key) > 0
    # F serves that checkpoint over HTTP with W's cosignature, and an independent C2SP verifier
    # (tlog-scales, not forge's code) checks F's signature, the tiles and W's cosignature.
    f_vkey = note.Verifier(note.origin_for(key.node_id), key.public_key).vkey()
    wait_for("f serving w's cosignature", lambda: w_key.vkey().split("+")[0] in str(
        f.request("GET", "/ledger/checkpoint")[2]))
    checked, result = run_verifier(f"{f.url}/ledger", f_vkey, "--cosigner", w_key.vkey())
    assert checked == 0 and result["cosignatures"] == 1, result
    size_a = shown["size"]
    (tmp_path / "cp.txt").write_text(forge(f_home, "ledger", "checkpoint").stdout)
    (tmp_path / "keys.txt").write_text(f"# w\n{w_key.vkey()}\n")
    ok = forge(f_home, "ledger", "verify", "--checkpoint", str(tmp_path / "cp.txt"),
               "--witnesses", "1", "--witness-keys", str(tmp_path / "keys.txt"))
    assert ok.returncode == 0 and "cosigned by 1 known witnesses" in ok.stdout, ok.stderr
    short = forge(f_home, "ledger", "verify", "--checkpoint", str(tmp_path / "cp.txt"),
                  "--witnesses", "2", "--witness-keys", str(tmp_path / "keys.txt"))
    assert short.returncode == 1 and "2 are required" in short.stderr
    peers = wait_for("w known to f's gossip", lambda: (
        done := forge(f_home, "ledger", "verify", "--checkpoint", str(tmp_path / "cp.txt"),
                      "--witnesses", "1")).returncode == 0 and done)
    assert "cosigned by 1 known witnesses" in peers.stdout
    table = {p["node_id"]: p for p in node_peers(f)}
    assert table[w_id]["witness"]["cosigned"] >= 1

    # F forks: the same key, the same size, another history.
    f.stop()
    for suffix in ("", "-wal", "-shm"):
        (f_home / f"ledger.db{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "fork.db", f_home / "ledger.db")
    f = nodes("f", "--port", str(port), "--peer", w.url)
    forked = f.request("GET", "/v1/forge/ledger/checkpoint")[2]
    assert forked["size"] == size_a and forked["note"] != shown["note"]
    # Its witness refuses the other history with 409 (F asks by itself, and so do we).
    wait_for("f told 409 by its witness", lambda: "refused our checkpoint of size "
             f"{size_a}: 409 split view" in (tmp_path / "f.log").read_text())
    status, _, answer = post(w, submission(size_a, [], forked["note"]))
    assert status == 409 and code(answer) == "split_view"
    assert wait_for("w flags f", lambda: flag_of(w, f_url))

    # A third node that never saw F's first history learns of the split view from W, checks
    # both signatures, and flags F.
    t = nodes("t", "--peer", w.url, "--peer", f_url)
    reason = wait_for("t flags f", lambda: flag_of(t, f_url))
    # (from W, or from F itself: F took W's evidence in as evidence against its own log)
    assert reason.startswith(f"split view: two checkpoints of size {size_a}")
    assert any(f"(gossip from {who})" in reason for who in (w_id, key.node_id))
    held = t.request("GET", EVIDENCE)[2]["evidence"]
    assert [e["origin"] for e in held] == [note.origin_for(key.node_id)]
    listed = forge(t.home, "peers")
    assert listed.returncode == 0 and "FORK EVIDENCE: 1" in listed.stdout


# -- evidence and submissions, hostile --------------------------------------------------------------

def test_evidence_is_believed_only_when_the_log_signed_both_checkpoints(tmp_path):
    key, other = Identity.generate(), Identity.generate()
    with Ledger.open_writer(tmp_path / "a.db", key) as a, \
            Ledger.open_writer(tmp_path / "b.db", key) as b, \
            Ledger.open_writer(tmp_path / "c.db", other) as c:
        one, two = notes(a, "1", "2").checkpoint(), notes(b, "x", "y").checkpoint()
        origin = note.origin_for(key.node_id)
        assert witness.check_evidence({"origin": origin, "notes": [one, two]}).size == 2
        body = note.Checkpoint.parse_body(note.SignedNote.parse(two).text)
        by_other = note.sign_checkpoint(body, other)  # the right origin, someone else's key
        notes(a, "3")
        bad = [
            ({"origin": origin, "notes": [one, one]}, ProofFailed),  # one root: no split
            ({"origin": origin, "notes": [one, a.checkpoint()]}, ProofFailed),  # two sizes
            ({"origin": origin, "notes": [one, by_other]}, ProofFailed),
            ({"origin": note.origin_for(other.node_id), "notes": [one, two]}, ProofFailed),
            ({"origin": "example.com/log", "notes": [one, two]}, UsageError),
            ({"origin": origin, "notes": [one, "x" * 5000]}, UsageError),
            ({"origin": origin, "notes": [one]}, UsageError),
            ([one, two], UsageError),
        ]
        for item, error in bad:
            with pytest.raises(error):
                witness.check_evidence(item)
        del c


def test_a_witness_cosigns_only_the_size_it_holds_and_records_a_split_view(tmp_path):
    log_key = Identity.generate()
    log = note.Verifier(note.origin_for(log_key.node_id), log_key.public_key)
    with Ledger.open_writer(tmp_path / "w.db", Identity.generate()) as w, \
            Ledger.open_writer(tmp_path / "l.db", log_key) as book, \
            Ledger.open_writer(tmp_path / "f.db", log_key) as fork:
        def submit(old: int, proof: list[bytes], text: str) -> witness.Answer:
            sub = witness.parse_submission(submission(old, proof, text))
            witness.open_submission(sub, log)
            return witness.add_checkpoint(w, sub, log, now_s=1_700_000_000)

        first = notes(book, "a").checkpoint()
        assert submit(0, [bytes(32)], first).outcome == "bad_proof"  # old 0: no proof
        answer = submit(0, [], first)
        assert answer.outcome == "cosigned" and answer.lines.startswith("\u2014 forge.local/")
        assert submit(0, [], first).outcome == "old_size"
        assert submit(1, [], first).outcome == "cosigned"  # the same checkpoint again
        split = submit(0, [], notes(fork, "z").checkpoint())  # same size: any old line
        assert split.outcome == "split_view" and split.evidence is not None
        assert witness.evidence(w)[0].size == 1
        with pytest.raises(ProofFailed):
            witness.open_submission(witness.parse_submission(submission(
                0, [], note.sign_checkpoint(note.Checkpoint(log.name, 1, bytes(32)),
                                            Identity.generate()))), log)


# -- the anchor --------------------------------------------------------------------------------------

# The original Forge's layout: "FRGE" ‖ 0x01 ‖ network (0 main, 1 test, 2 signet, 3 regtest) ‖
# 0x0000 ‖ root, in an OP_RETURN script of one 40-byte push (6a28). Written out by hand.
VECTOR_ROOT = "00112233445566778899aabbccddeeff" * 2
VECTOR_PAYLOAD = "46524745" "01" "01" "0000" + VECTOR_ROOT
VECTOR_SCRIPT = "6a28" + VECTOR_PAYLOAD


def test_anchor_payload_matches_the_original_forge_test_vector_and_round_trips():
    made = anchor.anchor(bytes.fromhex(VECTOR_ROOT), "testnet")
    assert made.payload().hex() == VECTOR_PAYLOAD and len(made.payload()) == 40
    assert made.script().hex() == VECTOR_SCRIPT
    assert anchor.parse(VECTOR_PAYLOAD) == made == anchor.parse(VECTOR_SCRIPT)
    assert anchor.anchor(bytes(32), "bitcoin").payload()[5] == 0
    assert [anchor.anchor(bytes(32), n).payload()[5] for n in ("signet", "regtest")] == [2, 3]
    for bad, why in (("zz", "hex"), ("4652", "40 bytes"), ("00" * 40, "FRGE"),
                     (VECTOR_PAYLOAD[:8] + "02" + VECTOR_PAYLOAD[10:], "version"),
                     (VECTOR_PAYLOAD[:10] + "07" + VECTOR_PAYLOAD[12:], "network"),
                     (VECTOR_PAYLOAD[:12] + "0100" + VECTOR_PAYLOAD[16:], "zero")):
        with pytest.raises(UsageError, match=why):
            anchor.parse(bad)
    with pytest.raises(UsageError, match="unknown network"):
        anchor.anchor(bytes(32), "litecoin")


def test_anchor_cli_commits_to_the_newest_checkpoint_and_verify_checks_the_ledger(
        run_forge, forge_home, tmp_path):
    key = identity.load_or_create(forge_home / "node.key")
    with Ledger.open_writer(forge_home / "ledger.db", key) as book:
        notes(book, "a", "b")
        saved = book.checkpoint()
        notes(book, "c")
        root = book.root(2)
    made = run_forge("ledger", "anchor", "--json", "--network", "regtest")
    assert made.returncode == 0, made.stderr
    out = json.loads(made.stdout)
    assert out["payload_hex"] == "4652474501030000" + root.hex() and out["size"] == 2
    assert out["script_hex"] == "6a28" + out["payload_hex"] and out["checkpoint"] == saved
    ok = run_forge("ledger", "anchor", "verify", out["payload_hex"])
    assert ok.returncode == 0 and "anchor valid: regtest" in ok.stdout, ok.stderr
    (tmp_path / "cp.txt").write_text(saved)
    ok = run_forge("ledger", "anchor", "verify", out["script_hex"], "--checkpoint",
                   str(tmp_path / "cp.txt"))
    assert ok.returncode == 0, ok.stderr
    other = anchor.anchor(bytes(32)).payload().hex()
    refused = run_forge("ledger", "anchor", "verify", other)
    assert refused.returncode == 1 and "no signed checkpoint" in refused.stderr
    refused = run_forge("ledger", "anchor", "verify", other, "--checkpoint",
                        str(tmp_path / "cp.txt"))
    assert refused.returncode == 1 and "commits to root" in refused.stderr
    malformed = run_forge("ledger", "anchor", "verify", "46524745")
    assert malformed.returncode == 2 and "40 bytes" in malformed.stderr
    assert "Traceback" not in malformed.stderr + refused.stderr
