"""Crashes lose nothing acknowledged; one writer at a time; readers run beside the writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from forge_cli.identity import Identity
from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env

APPENDER = r"""
import sys
from forge_cli.identity import load_or_create
from forge_cli.ledger.store import Ledger
me = load_or_create()
book = Ledger.open_writer(sys.argv[1], me)
book.append("grant", {"account": me.node_id, "cu": 10**12})
i = 0
while True:
    e = book.append("transfer", {"from": me.node_id, "to": "ab" * 32, "cu": 1},
                    bodies=[f"body {i}".encode()])
    print(e.seq, e.hash.hex(), flush=True)   # acknowledged: the commit has returned
    i += 1
"""


def test_sigkill_mid_append_loses_nothing_acknowledged(forge_home, run_forge, tmp_path):
    db = tmp_path / "ledger.db"
    child = subprocess.Popen([sys.executable, "-c", APPENDER, str(db)], stdout=subprocess.PIPE,
                             text=True, cwd=REPO, env=forge_env(forge_home))
    acked: dict[int, str] = {}
    deadline = time.monotonic() + 60
    assert child.stdout is not None
    while len(acked) < 150 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        seq, digest = line.split()
        acked[int(seq)] = digest
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert len(acked) >= 20, "the child should have appended for a while before the kill"

    with Ledger.open_reader(db) as book:
        assert book.size >= max(acked) + 1
        for seq, digest in acked.items():
            assert book.entry(seq).hash.hex() == digest
    result = run_forge("ledger", "verify", "--deep", "--ledger", str(db))
    assert result.returncode == 0, result.stderr
    # The killed writer's lock died with it: a new writer can take over and append.
    with Ledger.open_writer(db, Identity.generate()) as book:
        before = book.size
        book.append("note", {"text": "after the crash"})
        assert book.size == before + 1


def test_second_writer_fails_fast_with_exit_2(forge_home, run_forge, tmp_path):
    db = tmp_path / "ledger.db"
    with Ledger.open_writer(db, Identity.generate()) as book:
        book.append("note", {"text": "held"})
        result = run_forge("ledger", "checkpoint", "--ledger", str(db), timeout=30)
        assert result.returncode == 2
        assert "locked by another writer" in result.stderr
        assert "Traceback" not in result.stderr


def test_readers_work_while_a_writer_holds_the_lock(forge_home, run_forge, tmp_path):
    db = tmp_path / "ledger.db"
    with Ledger.open_writer(db, Identity.generate()) as book:
        for i in range(5):
            book.append("note", {"text": f"n{i}"})
        verify = run_forge("ledger", "verify", "--json", "--ledger", str(db))
        assert verify.returncode == 0
        assert json.loads(verify.stdout)["size"] == 5
        book.append("note", {"text": "while reading"})
        shown = run_forge("ledger", "show", "--json", "--ledger", str(db))
        assert shown.returncode == 0
        assert [e["entry"]["seq"] for e in json.loads(shown.stdout)] == list(range(6))
        with Ledger.open_reader(db) as reader:
            assert reader.size == 6
            assert reader.root() == book.root()


def test_a_rejected_append_writes_nothing(tmp_path):
    me = Identity.generate()
    with Ledger.open_writer(tmp_path / "l.db", me) as book:
        book.append("grant", {"account": me.node_id, "cu": 10})
        root, size = book.root(), book.size
        from forge_cli.errors import EntryRejected
        from forge_cli.ledger.store import Draft
        try:
            book.append_many([Draft("transfer", {"from": me.node_id, "to": "cd" * 32, "cu": 5}),
                              Draft("burn", {"account": me.node_id, "cu": 6})])
        except EntryRejected as exc:
            assert "balance" in str(exc)
        else:
            raise AssertionError("overspending batch was accepted")
        assert (book.size, book.root()) == (size, root)
        assert book.balance(me.node_id) == 10
    with Ledger.open_reader(tmp_path / "l.db") as reader:
        assert reader.size == size and reader.balance(me.node_id) == 10


def test_sigkill_file_is_not_left_half_written(tmp_path: Path):
    """The key file is written atomically: no partial key ever appears under its name."""
    from forge_cli.identity import load_or_create

    key = tmp_path / "node.key"
    first = load_or_create(key)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert load_or_create(key).node_id == first.node_id
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


def test_concurrent_appends_share_commits_and_reject_only_the_bad_one(tmp_path, run_forge):
    """Group commit: 8 threads append at once; each gets its own entry or its own error."""
    import threading

    from forge_cli.errors import EntryRejected

    me, peer = Identity.generate(), Identity.generate()
    db = tmp_path / "l.db"
    with Ledger.open_writer(db, me) as book:
        book.append("grant", {"account": me.node_id, "cu": 200})
        outcomes: list[tuple[int, object]] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            for i in range(25):
                cu = 1000 if (n, i) == (3, 7) else 1  # one overspend among 200 appends
                try:
                    result: object = book.append(
                        "transfer", {"from": me.node_id, "to": peer.node_id, "cu": cu})
                except EntryRejected as exc:
                    result = exc
                with lock:
                    outcomes.append((n, result))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        errors = [r for _, r in outcomes if isinstance(r, EntryRejected)]
        written = [r for _, r in outcomes if not isinstance(r, EntryRejected)]
        assert len(outcomes) == 200
        assert len(errors) == 1 and "balance" in str(errors[0])
        assert sorted(e.seq for e in written) == list(range(1, 200))
        assert book.balance(me.node_id) == 1 and book.balance(peer.node_id) == 199
    assert run_forge("ledger", "verify", "--deep", "--ledger", str(db)).returncode == 0


def test_large_batches_signed_by_the_helper_process_verify(tmp_path, run_forge):
    """Batches of 512+ entries are signed on a helper process; if it dies, inline takes over."""
    from forge_cli.ledger.store import Draft

    me = Identity.generate()
    db = tmp_path / "l.db"
    with Ledger.open_writer(db, me) as book:
        book.append_many([Draft("note", {"text": f"a{i}"}) for i in range(700)])
        worker = book._sign_pool
        assert worker is not None and worker.proc is not None, "a helper process signed"
        worker.proc.kill()  # the helper goes away between batches...
        worker.proc.wait()
        book.append_many([Draft("note", {"text": f"b{i}"}) for i in range(600)])
        assert book.size == 1300
    result = run_forge("ledger", "verify", "--json", "--ledger", str(db))
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["signatures"] == 1300
