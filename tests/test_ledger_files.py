"""Losing the ledger's -wal under a running node loses nothing it acknowledged.

Against a real node: buy, delete `ledger.db-wal` (or `-shm`), and the node must notice before
it acknowledges another write: spends are refused with a 503 that names the problem, the
verify route neither fails with an I/O error nor damages the files, and after SIGTERM the
ledger still verifies and holds every trade acknowledged before.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess

CHAT = "/v1/chat/completions"


def buy(node: NodeProcess, token: str) -> tuple[int, Any]:
    status, _, body = node.request("POST", CHAT, token=token, body={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0})
    return status, body


def verify_deep(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep"],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(home),
                          timeout=120)


def acknowledged_trades(node: NodeProcess, token: str, count: int) -> list[int]:
    seqs = []
    for _ in range(count):
        status, body = buy(node, token)
        assert status == 200, body
        seqs.append(body["x_forge"]["trade_seq"])
    return seqs


def assert_refused_for_changed_files(status: int, body: Any, lost: str) -> None:
    assert status == 503, body
    assert body["error"]["code"] == "LedgerFilesChanged", body
    assert "ledger files changed" in body["error"]["message"] and lost in body["error"]["message"]


@pytest.mark.parametrize("lost", ["ledger.db-wal", "ledger.db-shm"])
def test_deleting_a_ledger_file_refuses_spends_and_keeps_every_acknowledged_trade(
        tmp_path, tiny_gguf, lost):
    home = tmp_path / "home"
    with NodeProcess(home, tiny_gguf, log=tmp_path / "node.log") as node:
        bob = node.agent("bob")
        before = acknowledged_trades(node, bob["token"], 5)
        (home / lost).unlink()
        # Five more tries, as the buyer who found the hole made: none may be acknowledged.
        for _ in range(5):
            status, body = buy(node, bob["token"])
            assert_refused_for_changed_files(status, body, lost)
        status, _, body = node.request("GET", "/v1/forge/ledger/verify", token=node.operator_token)
        assert_refused_for_changed_files(status, body, lost)
        assert node.stop() == 0
    done = verify_deep(home)
    assert done.returncode == 0, done.stdout + done.stderr
    with Ledger.open_reader(home / "ledger.db") as book:
        assert book.size > max(before)
        assert [book.entry(seq).kind for seq in before] == ["trade"] * len(before)
    with NodeProcess(home, tiny_gguf, log=tmp_path / "again.log") as node:
        status, body = buy(node, bob["token"])  # a restart clears the refusal
        assert status == 200, body
        assert body["x_forge"]["trade_seq"] > max(before)


def test_verify_route_on_a_lost_wal_neither_fails_nor_damages_the_ledger(tmp_path, tiny_gguf):
    """The read comes first here: a reader that recreated the -wal would take the trades
    with it when the writer closed."""
    home = tmp_path / "home"
    with NodeProcess(home, tiny_gguf, log=tmp_path / "node.log") as node:
        bob = node.agent("bob")
        before = acknowledged_trades(node, bob["token"], 3)
        (home / "ledger.db-wal").unlink()
        status, _, body = node.request("GET", "/v1/forge/ledger/verify", token=node.operator_token)
        assert_refused_for_changed_files(status, body, "ledger.db-wal")
        status, body = buy(node, bob["token"])
        assert_refused_for_changed_files(status, body, "ledger.db-wal")
        assert node.stop() == 0
    done = verify_deep(home)
    assert done.returncode == 0, done.stdout + done.stderr
    with Ledger.open_reader(home / "ledger.db") as book:
        assert [book.entry(seq).kind for seq in before] == ["trade"] * len(before)


def test_an_untouched_ledger_passes_the_file_check_and_verifies_while_running(tmp_path, tiny_gguf):
    home = tmp_path / "home"
    with NodeProcess(home, tiny_gguf, log=tmp_path / "node.log") as node:
        bob = node.agent("bob")
        acknowledged_trades(node, bob["token"], 2)
        for _ in range(2):  # a reader of its own each time, and the writer carries on after
            status, _, body = node.request("GET", "/v1/forge/ledger/verify",
                                           token=node.operator_token)
            assert status == 200 and body["valid"], body
            acknowledged_trades(node, bob["token"], 1)
