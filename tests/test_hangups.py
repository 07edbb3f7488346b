"""Buyers that hang up (issue 19, findings 1 and 2): a P2P or forwarded sale whose buyer
closes the socket once tokens reached it ends in a recorded outcome, for exactly the tokens
delivered, and the forwarding node charges its own consumer for what it received.

Real nodes on loopback over the tiny GGUF (one token per byte of printable ASCII, no EOS, so
a long `max_tokens` is still generating when the client leaves)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from forge_cli.economy.credit import UNSETTLED_PENALTY_BP
from forge_cli.ledger import entries
from forge_cli.mesh.audit import ids_of
from tests.conftest import REPO, forge_env
from tests.hangup_helpers import P2PConsumer, body_of, outcome, stream_chat
from tests.mesh_helpers import MESH_ENV, entries_of, wait_for
from tests.node_harness import NodeProcess

# Terms not countersigned expire in 2 s; a stranger may leave many of them (the hang-ups are
# the point here, not the exposure limit, which tests/test_trade_holes.py pins).
SELLER_ENV = {**MESH_ENV, "FORGE_MESH_MDNS": "false", "FORGE_MESH_SETTLE_S": "2",
              "FORGE_MESH_MAX_UNSETTLED": "50"}
LONG = 500  # still generating when a client that read 20 pieces hangs up


def verify_deep(home: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep"],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(home),
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def delivered(home: Path, entry: entries.Entry) -> tuple[str, list[int]]:
    """The reply text and token ids an unsettled entry keeps as its evidence."""
    terms = entry.data["terms"]
    text = body_of(home, terms["response_sha256"])
    ids = ids_of(body_of(home, terms["tokens_sha256"]) or b"")
    assert text is not None and ids is not None
    return text.decode(), ids


def test_a_p2p_buyer_that_hangs_up_mid_stream_is_unsettled_for_the_tokens_delivered(
        tmp_path, tiny_gguf):
    # Found: a stranger that closed the socket after 47 of 48 tokens, 4 times, left the seller
    # with nothing on the record but its free-tier grant (no trade, no unsettled entry).
    home = tmp_path / "a"
    with NodeProcess(home, tiny_gguf, env=SELLER_ENV, log=tmp_path / "a.log") as a:
        stranger = P2PConsumer(a)
        start = stranger.quote(LONG)[1]["quote"]["consumer_reputation"]
        for round_ in range(4):
            got = stranger.buy(LONG, 20)
            assert got.status == 200 and got.hung_up and got.pieces == 20, got.error
            kind, entry = wait_for(f"round {round_} on the seller's record",
                                   lambda got=got: outcome(home, got.nonce))
            assert kind == "unsettled"
            terms = entry.data["terms"]
            assert terms["consumer"] == stranger.key.node_id
            assert "hung up" in entry.data["reason"]
            # Exactly what reached the socket: every token the client read, and the sale was
            # cut short there, not billed to max_tokens.
            assert got.tokens <= terms["completion_tokens"] < LONG
            text, ids = delivered(home, entry)
            assert text.startswith(got.text) and len(text) == len(ids) == \
                terms["completion_tokens"]  # one token per byte (tests/gguf_model.py)
            assert hashlib.sha256(text.encode()).hexdigest() == terms["response_sha256"]
            assert terms["cu"] == entries.trade_cost(terms["completion_tokens"],
                                                     terms["price_ucu_per_token"])
            assert entries.KINDS["unsettled"](entry.data) is None
        # The reputation cost as for any unsettled terms, and no CU moved.
        after = stranger.quote(LONG)[1]["quote"]["consumer_reputation"]
        assert after == start - 4 * UNSETTLED_PENALTY_BP
        assert not entries_of(home, "trade")
        # The nonce is spent: the same intent again is a replay.
        body = stranger.intent(8)
        got = stranger.buy_body(body, 8, 3)
        assert got.hung_up and wait_for("the short sale", lambda: outcome(home, got.nonce))
        assert stranger.replay(body) == 409
    verify_deep(home)


def test_a_p2p_buyer_that_hangs_up_after_the_last_piece_is_unsettled_for_all_of_it(
        tmp_path, tiny_gguf):
    # Found: closing after the last piece, before the terms, only 1 sale of 5 became unsettled.
    home = tmp_path / "a"
    with NodeProcess(home, tiny_gguf, env=SELLER_ENV, log=tmp_path / "a.log") as a:
        stranger = P2PConsumer(a)
        for round_ in range(5):
            got = stranger.buy(48, "last")
            assert got.status == 200 and got.hung_up and got.tokens == 48, got.error
            kind, entry = wait_for(f"round {round_} on the seller's record",
                                   lambda got=got: outcome(home, got.nonce))
            terms = entry.data["terms"]
            assert kind == "unsettled" and terms["completion_tokens"] == 48
            assert terms["response_sha256"] == hashlib.sha256(got.text.encode()).hexdigest()
        assert not entries_of(home, "trade")
        assert len(entries_of(home, "unsettled")) == 5
    verify_deep(home)


@contextmanager
def forwarding_pair(tmp_path: Path, tiny_gguf: Path) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """Seller a, and node b that serves another file and forwards a's model to it."""
    with NodeProcess(tmp_path / "a", tiny_gguf, "--mesh", env=SELLER_ENV,
                     log=tmp_path / "a.log") as a:
        other = tmp_path / "other.gguf"
        shutil.copy(tiny_gguf, other)
        with NodeProcess(tmp_path / "b", other, "--mesh", "--peer", a.url,
                         env={**MESH_ENV, "FORGE_MESH_MDNS": "false"},
                         log=tmp_path / "b.log") as b:
            wait_for("b sees a", lambda: any(p["url"] == a.url for p in b.request(
                "GET", "/v1/forge/peers", token=b.operator_token)[2]["peers"]))
            yield a, b


def test_a_forwarded_stream_that_hangs_up_charges_the_consumer_for_what_the_node_received(
        tmp_path, tiny_gguf):
    # Found: an agent hung up on a forwarded model after 20 pieces; its balance stayed 1000,
    # spent 0, and the seller recorded nothing.
    with forwarding_pair(tmp_path, tiny_gguf) as (a, b):
        b_id = b.request("GET", "/health")[2]["node_id"]
        alice = b.agent("alice")
        got = stream_chat(b, alice["token"], tiny_gguf.name, LONG, 20)
        assert got.status == 200 and got.hung_up and got.pieces == 20, got.error

        def charged() -> entries.Entry | None:
            return next((e for e in entries_of(tmp_path / "b", "trade")
                         if e.data["terms"]["consumer"] == alice["account"]), None)

        local = wait_for("b charges alice", charged).data["terms"]
        # b finished its purchase from a as an honest buyer (a trade on both ledgers, its
        # standing at a untouched) and charged alice for every token it received for her.
        upstream = [e.data for e in entries_of(tmp_path / "a", "trade")
                    if e.data["terms"]["consumer"] == b_id]
        assert len(upstream) == 1 and upstream[0] in [
            e.data for e in entries_of(tmp_path / "b", "trade")]
        assert not [e for e in entries_of(tmp_path / "a", "unsettled")
                    if e.data["terms"]["consumer"] == b_id]
        bought = upstream[0]["terms"]
        assert got.tokens <= local["completion_tokens"] == bought["completion_tokens"] == LONG
        assert local["cu"] == bought["cu"] == entries.trade_cost(
            LONG, local["price_ucu_per_token"])
        balance = b.request("GET", "/v1/forge/balance", token=alice["token"])[2]
        assert balance["balance"] == 1000 - local["cu"] and balance["spent"] == local["cu"]
    for home in (tmp_path / "a", tmp_path / "b"):
        verify_deep(home)


def test_the_forwarding_nodes_kill_switch_stops_its_purchase_on_the_next_piece(
        tmp_path, tiny_gguf):
    # The buyer's session reads the kill switch on every piece, as a seller's does: turned on
    # mid-stream, the node buys no further, pays nothing and charges nothing (the peer
    # records what it delivered as unsettled). A purchase that ran on to its end would be a
    # spend after the kill switch.
    with forwarding_pair(tmp_path, tiny_gguf) as (a, b):
        b_id = b.request("GET", "/health")[2]["node_id"]
        alice = b.agent("alice")

        def kill() -> None:
            status, _, body = b.request("POST", "/v1/forge/kill", token=b.operator_token,
                                        body={"activate": True, "reason": "test"})
            assert status == 200, body

        got = stream_chat(b, alice["token"], tiny_gguf.name, 640, 10, act=kill)
        assert got.status == 200 and got.error and got.error["gate"] == "kill_switch", got
        upstream = wait_for("a's record of b's purchase", lambda: [
            e for e in entries_of(tmp_path / "a", "unsettled")
            if e.data["terms"]["consumer"] == b_id])
        assert len(upstream) == 1 and upstream[0].data["terms"]["completion_tokens"] < 640
        assert not entries_of(tmp_path / "b", "trade")
        assert not entries_of(tmp_path / "a", "trade")
    for home in (tmp_path / "a", tmp_path / "b"):
        verify_deep(home)
