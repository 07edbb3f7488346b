"""Peer-to-peer trades between real nodes on loopback: `forge worker` buys from `forge seed`,
a node forwards a model it lacks, and every way the protocol can be cheated is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from forge_cli import identity
from forge_cli.ledger import entries
from tests.conftest import REPO, forge_env
from tests.mesh_helpers import MESH_ENV, WAIT_S, TamperingProxy, entries_of, wait_for, worker
from tests.node_harness import NodeProcess


def health(node: NodeProcess) -> dict[str, Any]:
    return node.request("GET", "/health")[2]


def verify_deep(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep"],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(home),
                          timeout=120)


@pytest.fixture
def nodes(tmp_path: Path, tiny_gguf: Path) -> Iterator[Callable[..., NodeProcess]]:
    with ExitStack() as stack:
        def start(name: str, *extra: str, model: Path = tiny_gguf,
                  env: dict[str, str] | None = None) -> NodeProcess:
            return stack.enter_context(NodeProcess(
                tmp_path / name, model, "--mesh", *extra, env={**MESH_ENV, **(env or {})},
                log=tmp_path / f"{name}.log"))
        yield start


def seller_and_forwarder(nodes, tmp_path: Path, tiny_gguf: Path, *, mdns: bool = False  # noqa: ANN001
                         ) -> tuple[NodeProcess, NodeProcess, Path]:
    """Node a sells the tiny model; node b serves a copy under another name and knows a as a
    static peer, so b forwards requests for a's model to a."""
    a = nodes("a", env=None if mdns else {"FORGE_MESH_MDNS": "false"})
    other = tmp_path / "other.gguf"
    shutil.copy(tiny_gguf, other)
    b = nodes("b", "--peer", a.url, model=other, env={"FORGE_MESH_MDNS": "false"})
    wait_for("b sees a", lambda: any(p["url"] == a.url for p in
                                     b.request("GET", "/v1/forge/peers",
                                               token=b.operator_token)[2]["peers"]))
    return a, b, other


def test_worker_finds_a_seed_over_mdns_and_both_ledgers_hold_the_same_trade(nodes, tmp_path):
    a = nodes("a")
    b = nodes("b")
    a_id, b_id = health(a)["node_id"], health(b)["node_id"]
    home = tmp_path / "w"
    # Real zeroconf on 127.0.0.1: no --peer; --seed picks node a out of the two sellers.
    done = worker(home, "--seed", a_id[:16], "-n", "8", "-t", "0", "--wait", str(WAIT_S),
                  "--json", "hello")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["provider"] == a_id and out["url"] == a.url
    mine, theirs = entries_of(home, "trade"), entries_of(tmp_path / "a", "trade")
    assert len(mine) == 1 and len(theirs) == 1
    assert mine[0].data == theirs[0].data  # the same dual-signed trade, byte for byte
    assert entries.trade_signature_problem(mine[0].data) is None
    terms = mine[0].data["terms"]
    assert terms["consumer"] == identity.load_or_create(home / "node.key").node_id
    assert terms["completion_tokens"] == 8 and out["cu"] == terms["cu"] > 0
    # Balances moved on both sides: the worker paid from its free tier, the seed earned.
    assert out["balance"] == 1000 - terms["cu"]
    assert not entries_of(tmp_path / "b", "trade")
    for h in (home, tmp_path / "a", tmp_path / "b"):
        check = verify_deep(h)
        assert check.returncode == 0, check.stdout + check.stderr
    assert b_id != a_id


def test_a_node_forwards_a_model_it_lacks_to_a_peer_and_says_who_served(nodes, tmp_path,
                                                                        tiny_gguf):
    a, b, other = seller_and_forwarder(nodes, tmp_path, tiny_gguf, mdns=True)
    token = b.agent("alice")["token"]
    status, _, body = b.request("POST", "/v1/chat/completions", token=token, body={
        "model": tiny_gguf.name, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6, "temperature": 0})
    assert status == 200, body
    served = body["x_forge"]["served_by"]
    assert served["node_id"] == health(a)["node_id"] and served["url"] == a.url
    # b bought from a (peer-to-peer) and sold to alice at the same CU: three trades, two ledgers.
    p2p = [e.data for e in entries_of(tmp_path / "a", "trade")]
    b_trades = [e.data for e in entries_of(tmp_path / "b", "trade")]
    assert len(p2p) == 1 and p2p[0] in b_trades and len(b_trades) == 2
    local = next(t for t in b_trades if t != p2p[0])["terms"]
    assert local["provider"] == health(b)["node_id"] and local["cu"] == p2p[0]["terms"]["cu"]
    assert body["x_forge"]["cu_cost"] == local["cu"] == served["peer_cu"]
    # b's market counts a as a second provider of the same GGUF once b quotes its own copy.
    status, _, _ = b.request("POST", "/v1/chat/completions", token=token, body={
        "model": other.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200
    market = b.request("GET", "/v1/forge/pricing", token=token)[2]["models"][0]["market"]
    assert market["supply"] == 2
    # A model no one has: a clear 503, nothing recorded.
    status, _, body = b.request("POST", "/v1/chat/completions", token=token, body={
        "model": "nobody-has-this", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 503 and "no peer on the mesh offers it" in body["error"]["message"]
    assert len(entries_of(tmp_path / "b", "trade")) == 3


def test_provider_killed_mid_stream_records_nothing_on_either_side(nodes, tmp_path):
    a = nodes("a", env={"FORGE_MESH_MDNS": "false"})
    home = tmp_path / "w"

    def kill() -> None:
        a.proc.kill()  # SIGKILL: no goodbye, no terms
        a.proc.wait(30)

    with TamperingProxy(a.url, after_first_piece=kill) as proxy:
        done = worker(home, "--peer", proxy.url, "-n", "200", "--wait", str(WAIT_S), "hi",
                      env={"FORGE_MESH_MDNS": "false"})
    assert a.proc.poll() is not None
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed mid-stream" in done.stderr or "without signed terms" in done.stderr
    assert "nothing was recorded or paid" in done.stderr and "Traceback" not in done.stderr
    assert not entries_of(home, "trade") and not entries_of(tmp_path / "a", "trade")
    check = verify_deep(tmp_path / "a")
    assert check.returncode == 0, check.stdout + check.stderr


def _forge_signature(event: dict[str, Any]) -> dict[str, Any]:
    stranger = identity.Identity.generate()
    return {**event, "provider_sig": stranger.sign(entries.trade_message(event["terms"])).hex()}


def test_forged_or_altered_terms_are_never_countersigned_and_the_seed_records_unsettled(
        nodes, tmp_path):
    a = nodes("a", env={"FORGE_MESH_MDNS": "false", "FORGE_MESH_SETTLE_S": "1"})
    a_key = identity.load_or_create(tmp_path / "a" / "node.key")

    def inflate(event: dict[str, Any]) -> dict[str, Any]:
        # One more token billed than streamed, re-signed with the provider's real key.
        terms = dict(event["terms"])
        terms["completion_tokens"] += 1
        terms["cu"] = entries.trade_cost(terms["completion_tokens"], terms["price_ucu_per_token"])
        return {"terms": terms, "provider_sig": a_key.sign(entries.trade_message(terms)).hex()}

    home = tmp_path / "w"
    cases = [(_forge_signature, "signature over the terms does not verify"),
             (inflate, "terms.completion_tokens is")]
    for edit, reason in cases:
        with TamperingProxy(a.url, edit) as proxy:
            done = worker(home, "--peer", proxy.url, "-n", "5", "--wait", str(WAIT_S), "hi",
                          env={"FORGE_MESH_MDNS": "false"})
        assert done.returncode == 1, done.stdout + done.stderr
        assert "refused to countersign" in done.stderr and reason in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert not entries_of(home, "trade") and not entries_of(tmp_path / "a", "trade")
    # The seed waited for countersignatures that never came: two unsettled entries, no CU
    # moved, and the consumer's standing (its quoted reputation) dropped.
    unsettled = wait_for("unsettled entries", lambda: len(entries_of(tmp_path / "a",
                                                                     "unsettled")) == 2 or None)
    assert unsettled
    me = identity.load_or_create(home / "node.key").node_id
    status, _, quote = a.request("POST", "/v1/forge/p2p/quote",
                                 body={"consumer": me, "model": health(a)["models"][0],
                                       "max_tokens": 4})
    assert status == 200, quote
    assert quote["quote"]["consumer_reputation"] == 4000
    # A stranger pays base × (2 − reputation): ×1.6 at 4000 bp, as the quote says.
    assert quote["quote"]["price_ucu_per_token"] == \
        -(-quote["quote"]["base_price_ucu_per_token"] * 16 // 10)
    check = verify_deep(tmp_path / "a")
    assert check.returncode == 0, check.stdout + check.stderr


def test_replayed_intent_and_settlement_are_rejected(nodes, tmp_path):
    a = nodes("a", env={"FORGE_MESH_MDNS": "false"})
    home = tmp_path / "w"
    with TamperingProxy(a.url) as proxy:
        done = worker(home, "--peer", proxy.url, "-n", "4", "--wait", str(WAIT_S), "hi",
                      env={"FORGE_MESH_MDNS": "false"})
        assert done.returncode == 0, done.stderr
        chat_body, settle_body = proxy.chat_bodies[0], proxy.settle_bodies[0]
    before = entries_of(tmp_path / "a", "trade")
    for path, raw in (("/v1/forge/p2p/chat", chat_body), ("/v1/forge/p2p/settle", settle_body)):
        status, _, body = a.request("POST", path, raw=raw)
        assert status == 409, (path, body)
        assert "already used" in body["error"]["message"] or \
            "already recorded" in body["error"]["message"]
    # A forged intent (someone else's signature) and an unsigned settle are refused too.
    intent_body = json.loads(chat_body)
    intent_body["intent"]["nonce"] = "f" * 32
    status, _, body = a.request("POST", "/v1/forge/p2p/chat", body=intent_body)
    assert status == 422 and "consumer's signature" in body["error"]["message"]
    assert entries_of(tmp_path / "a", "trade") == before


def test_p2p_routes_need_no_token_but_ledger_reads_still_do(nodes):
    a = nodes("a", env={"FORGE_MESH_MDNS": "false"})
    status, _, body = a.request("POST", "/v1/forge/p2p/quote", body={"consumer": "zz"})
    assert status == 422 and "consumer" in body["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(a.url + "/v1/forge/balance", timeout=30)
    assert info.value.code == 401


def test_the_workers_own_kill_switch_stops_a_p2p_spend_before_any_quote_is_paid(nodes, tmp_path):
    a = nodes("a", env={"FORGE_MESH_MDNS": "false"})
    home = tmp_path / "w"
    killed = subprocess.run([sys.executable, "-m", "forge_cli", "safety", "kill", "--reason",
                             "drill"], capture_output=True, text=True, cwd=REPO,
                            env=forge_env(home), timeout=60)
    assert killed.returncode == 0, killed.stderr
    done = worker(home, "--peer", a.url, "-n", "4", "--wait", str(WAIT_S), "hi",
                  env={"FORGE_MESH_MDNS": "false"})
    assert done.returncode == 1 and "kill switch" in done.stderr, done.stderr
    assert not entries_of(home, "trade") and not entries_of(tmp_path / "a", "trade")


def test_an_agent_task_naming_a_peers_model_is_bought_from_that_peer(nodes, tmp_path, tiny_gguf):
    a, b, other = seller_and_forwarder(nodes, tmp_path, tiny_gguf)
    b.agent("ann")
    plan = {"tasks": [{"id": "far", "prompt": "say something", "model": tiny_gguf.name,
                       "max_tokens": 5},
                      {"id": "near", "prompt": "sum it up", "deps": ["far"], "max_tokens": 5}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run(
        [sys.executable, "-m", "forge_cli", "agent", "run", "--account", "ann", "--plan",
         str(tmp_path / "plan.json"), "--max-tokens", "5", "--mode", "cost", "--json", "go"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env=forge_env(tmp_path / "b", FORGE_NODE=b.url))
    # The tiny model never ends a reply, so the judge fails each 5-token result as cut at
    # max_tokens and the run ends failed: what is bought, and from whom, is the point here.
    assert done.returncode == 1 and "cut at max_tokens" in done.stderr, done.stderr
    run = json.loads(done.stdout)["run"]
    steps = [e for e in entries_of(tmp_path / "b", "agent") if e.data["run"] == run]
    far = next(e for e in steps if e.data["step"] == "result" and e.data["task"] == "far")
    assert far.data["model"] == tiny_gguf.name
    # Every turn of the far task was a peer-to-peer purchase: a's ledger holds each, bought by
    # b's node, and b's holds the same trades.
    p2p = [e.data for e in entries_of(tmp_path / "a", "trade")]
    assert p2p and all(t["terms"]["consumer"] == health(b)["node_id"] for t in p2p)
    assert all(t in [e.data for e in entries_of(tmp_path / "b", "trade")] for t in p2p)
    assert far.data["cu"] == p2p[0]["terms"]["cu"]  # ann paid b what b paid a


def test_a_seller_judges_a_stranger_by_its_network_view_of_what_it_spent_elsewhere(nodes,
                                                                                   tmp_path):
    a = nodes("a", env={"FORGE_MESH_MDNS": "false"})
    home = tmp_path / "w"
    me = identity.load_or_create(home / "node.key")  # the worker's key, made before it runs
    elsewhere = identity.Identity.generate()
    terms = {"provider": elsewhere.node_id, "consumer": me.node_id, "model": "m",
             "model_sha256": "ab" * 32, "prompt_tokens": 3, "completion_tokens": 990,
             "price_ucu_per_token": 1_000_000, "cu": 990, "request_sha256": "cd" * 32,
             "response_sha256": "ef" * 32, "nonce": "spent-elsewhere-1", "ts": 1}
    message = entries.trade_message(terms)
    spent = {"terms": terms, "provider_sig": elsewhere.sign(message).hex(),
             "consumer_sig": me.sign(message).hex()}
    status, _, body = a.request("POST", "/v1/forge/gossip/trades",
                                body={"from": "test", "trades": [spent]})
    assert status == 200 and body["accepted"] == 1, body
    done = worker(home, "--peer", a.url, "-n", "16", "--wait", str(WAIT_S), "hi",
                  env={"FORGE_MESH_MDNS": "false"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "network view sees it" in done.stderr and "10 CU available" in done.stderr
    # Refused before anything was granted or traded in the seller's ledger.
    assert not entries_of(tmp_path / "a", "trade")
    assert not [e for e in entries_of(tmp_path / "a", "grant")
                if e.data["account"] == me.node_id]


def test_worker_repl_keeps_the_conversation_and_pays_per_turn(nodes, tmp_path):
    from tests.test_chat_cli import Terminal

    a = nodes("a", env={"FORGE_MESH_MDNS": "false"})
    home = tmp_path / "w"
    term = Terminal(home, "--peer", a.url, "-n", "4", "-t", "0", "--wait", str(WAIT_S),
                    env={**MESH_ENV, "FORGE_MESH_MDNS": "false"}, command="worker")
    term.read_until(b">>> ")
    term.type("first question\n")
    assert b"4 tokens" in term.read_until(b"trade seq 1]")
    term.read_until(b">>> ")
    term.type("second\n")
    term.read_until(b"trade seq 2]")
    term.read_until(b">>> ")
    term.type("/exit\n")
    assert term.finish() == 0
    first, second = (e.data["terms"] for e in entries_of(tmp_path / "a", "trade"))
    assert second["prompt_tokens"] > first["prompt_tokens"] + len("second")  # history was sent
    assert [e.data for e in entries_of(home, "trade")] == \
        [e.data for e in entries_of(tmp_path / "a", "trade")]
