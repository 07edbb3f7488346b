"""Gossip with real nodes on loopback: trades converge, a late joiner catches up, forged or
replayed trades are refused, and a peer whose log forks is flagged."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from forge_cli.identity import Identity
from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env
from tests.gossip_helpers import make_trade, sign
from tests.mesh_helpers import wait_for
from tests.node_harness import NodeProcess
from tests.test_mesh_discovery import node_id, peer

FAST = {"FORGE_MESH_INTERFACES": "127.0.0.1", "FORGE_MESH_PROBE_S": "1",
        "FORGE_MESH_EXPIRE_S": "5", "FORGE_MESH_GOSSIP_S": "1"}
STATIC = {**FAST, "FORGE_MESH_MDNS": "false"}
GOSSIP = "/v1/forge/gossip/trades"


@pytest.fixture
def nodes(tmp_path: Path, tiny_gguf: Path) -> Iterator[Callable[..., NodeProcess]]:
    with ExitStack() as stack:
        def start(name: str, *extra: str, env: dict[str, str] | None = None) -> NodeProcess:
            return stack.enter_context(NodeProcess(tmp_path / name, tiny_gguf, "--mesh", *extra,
                                                   env=env or FAST, log=tmp_path / f"{name}.log"))
        yield start


def network(node: NodeProcess) -> dict[str, Any]:
    status, _, body = node.request("GET", "/v1/forge/network", token=node.operator_token)
    assert status == 200, body
    return body


def push(node: NodeProcess, trades: list[Any]) -> dict[str, Any]:
    status, _, body = node.request("POST", GOSSIP, {"from": "test", "trades": trades})
    assert status == 200, body
    return body


def converged(group: list[NodeProcess], count: int) -> bool:
    views = [network(n) for n in group]
    return all(v["trades"] == count and v["root"] == views[0]["root"] for v in views)


def test_trades_converge_on_three_nodes_and_a_late_joiner_catches_up(nodes):
    a, b, c = (nodes(name) for name in "abc")
    for node in (a, b, c):
        others = [o for o in (a, b, c) if o is not node]
        wait_for(f"{node.url} finding its peers",
                 lambda node=node, others=others: all(peer(node, o) for o in others))
    provider, consumer, third = Identity.generate(), Identity.generate(), Identity.generate()
    assert push(a, [make_trade(provider, consumer, tokens=i + 1) for i in range(6)])["accepted"] == 6
    assert push(c, [make_trade(consumer, third), make_trade(third, provider)])["accepted"] == 2

    # A local purchase on b: b's own ledger records a dual-signed trade, which its view holds.
    alice = b.agent("alice")
    status, _, reply = b.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, token=alice["token"])
    assert status == 200 and reply["x_forge"]["trade_seq"] is not None, reply
    assert network(b)["own_trades"] == 1

    wait_for("three views agreeing on 9 trades", lambda: converged([a, b, c], 9))
    view = network(a)
    assert view["foreign_trades"] == 9 and view["own_trades"] == 0
    assert view["ledger_trades"] == 0 and view["accounts"] == 5 and view["flagged_peers"] == []

    d = nodes("d")
    wait_for("the late joiner catching up", lambda: converged([a, b, c, d], 9))
    assert network(d)["root"] == view["root"]


def test_trades_travel_several_hops_and_each_is_stored_once(nodes):
    # A chain without mDNS: a knows only b, b knows only c, c knows no one.
    c = nodes("c", env=STATIC)
    b = nodes("b", "--peer", c.url, env=STATIC)
    a = nodes("a", "--peer", b.url, env=STATIC)
    wait_for("the chain of static peers", lambda: peer(a, b) and peer(b, c))
    provider, consumer = Identity.generate(), Identity.generate()
    pushed = [make_trade(provider, consumer, tokens=i + 1) for i in range(3)]
    assert push(a, pushed)["accepted"] == 3  # a pushes to b, b pushes on to c
    assert push(c, [make_trade(consumer, provider)])["accepted"] == 1  # b and then a pull it
    wait_for("four trades on every hop", lambda: converged([a, b, c], 4))
    # Pushing the same trades again anywhere is a no-op everywhere.
    assert push(b, pushed) == {"accepted": 0, "duplicate": 3, "rejected": 0, "rejections": []}
    assert all(network(n)["trades"] == 4 for n in (a, b, c))


def buy(node: NodeProcess, model: str) -> dict[str, Any]:
    token = node.agent("buyer")["token"]
    status, _, body = node.request("POST", "/v1/chat/completions", token=token, body={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200 and body["x_forge"]["served_by"], body
    return body


def test_p2p_trades_between_a_b_and_b_c_reach_every_view(nodes, tmp_path, tiny_gguf):
    # Each node serves its own copy of the model; asked for a model it lacks, a node buys it
    # from its peer (a dual-signed P2P trade in both ledgers) and sells it on locally.
    models = {}
    for name in "bc":
        models[name] = tmp_path / f"{name}-model.gguf"
        shutil.copy(tiny_gguf, models[name])
    a = nodes("a", env=STATIC)
    b = NodeProcess(tmp_path / "b", models["b"], "--mesh", "--peer", a.url, env=STATIC,
                    log=tmp_path / "b.log")
    c = NodeProcess(tmp_path / "c", models["c"], "--mesh", "--peer", b.url, env=STATIC,
                    log=tmp_path / "c.log")
    with b, c:
        wait_for("the chain of static peers", lambda: peer(b, a) and peer(c, b))
        buy(b, tiny_gguf.name)        # b buys from a: trade a–b, and b sells to its agent
        buy(c, models["b"].name)      # c buys from b: trade b–c, and c sells to its agent
        wait_for("every view holding the four trades", lambda: converged([a, b, c], 4))
        views = [network(n) for n in (a, b, c)]
        assert [v["own_trades"] for v in views] == [1, 3, 2]
        assert [v["ledger_trades"] for v in views] == [1, 3, 2]


def test_forged_altered_and_replayed_trades_are_rejected_with_nothing_added(nodes):
    node = nodes("a", env=STATIC)
    provider, consumer, forger = Identity.generate(), Identity.generate(), Identity.generate()
    good = make_trade(provider, consumer, tokens=10, nonce="nonce-0001")
    assert push(node, [good]) == {"accepted": 1, "duplicate": 0, "rejected": 0, "rejections": []}
    before = network(node)

    forged = sign(make_trade(provider, consumer)["terms"], forger, consumer)
    altered = json.loads(json.dumps(make_trade(provider, consumer, tokens=10)))
    altered["terms"].update(completion_tokens=500)  # cu no longer matches the tokens
    resigned = dict(altered["terms"], cu=500)
    altered_both = {**altered, "terms": resigned}  # cu fixed, but the signatures break
    replayed = make_trade(provider, consumer, tokens=99, nonce="nonce-0001")
    answer = push(node, [forged, altered, altered_both, replayed, good])
    assert (answer["accepted"], answer["duplicate"], answer["rejected"]) == (0, 1, 4)
    reasons = [r["reason"] for r in answer["rejections"]]
    assert "provider signature over the trade terms does not verify" in reasons[0]
    assert "terms.cu is 10 but 500 tokens" in reasons[1]
    assert "signature over the trade terms does not verify" in reasons[2]
    assert "replayed nonce" in reasons[3] and "nonce-0001" in reasons[3]
    after = network(node)
    assert (after["trades"], after["root"]) == (before["trades"], before["root"]) == (1, before["root"])

    # Bounded batches, malformed bodies, and the pull page.
    status, _, body = node.request("POST", GOSSIP, {"trades": [good] * 501})
    assert status == 413 and "at most 500 trades" in body["error"]["message"]
    status, _, body = node.request("POST", GOSSIP, {"trades": "many"})
    assert status == 400 and "'trades' must be an array" in body["error"]["message"]
    status, _, page = node.request("GET", f"{GOSSIP}?since=0&limit=10")
    assert status == 200 and page["count"] == 1 and page["next"] == 1 and page["trades"] == [good]
    status, _, body = node.request("GET", f"{GOSSIP}?limit=100000")
    assert status == 400
    status, _, body = node.request("GET", "/v1/forge/network")
    assert status == 401  # the view is read with a token; only the peer-to-peer routes are open


class FakePeer:
    """A real aiohttp server on 127.0.0.1 that answers like a node, serving the checkpoints of
    whichever of its real ledgers is current: switching ledgers is what a forking log does."""

    def __init__(self, key: Identity, ledgers: list[Ledger]) -> None:
        self.key, self.ledgers, self.current = key, ledgers, 0
        self.checkpoints_served = 0
        self.served: list[dict[str, Any]] = []  # trades its gossip pull route hands out
        self.switch_after: int | None = None  # serve ledger 1 once this many were served
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/forge/ledger/checkpoint", self.checkpoint)
        app.router.add_get("/v1/forge/ledger/consistency", self.consistency)
        app.router.add_get(GOSSIP, self.trades)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    @property
    def ledger(self) -> Ledger:
        return self.ledgers[self.current]

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node_id": self.key.node_id, "models": []})

    async def checkpoint(self, request: web.Request) -> web.Response:
        if not self.ledgers:  # a peer that answers /health but fails every gossip call
            return web.json_response({"error": {"message": "boom"}}, status=500)
        note = self.ledger.checkpoint()
        self.checkpoints_served += 1
        size = self.ledger.size
        answer = {"size": size, "root": self.ledger.root().hex(), "note": note}
        if self.switch_after is not None and self.checkpoints_served >= self.switch_after:
            self.current, self.switch_after = 1, None
        return web.json_response(answer)

    async def consistency(self, request: web.Request) -> web.Response:
        old, new = int(request.query["old"]), int(request.query["new"])
        proof = self.ledger.consistency_proof(old, new)
        return web.json_response({"old_size": old, "new_size": new,
                                  "proof": [p.hex() for p in proof]})

    async def trades(self, request: web.Request) -> web.Response:
        if not self.ledgers:
            return web.Response(text="not json", status=200)
        since = int(request.query.get("since", "0"))
        page = self.served[since:]
        return web.json_response({"count": len(self.served), "next": len(self.served),
                                  "trades": page})

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def notes(ledger: Ledger, *texts: str) -> Ledger:
    for text in texts:
        ledger.append("note", {"text": text})
    return ledger


@pytest.fixture
def forked_peers(tmp_path: Path) -> Iterator[tuple[FakePeer, FakePeer]]:
    key = Identity.generate()
    # Diverging: two ledgers under one key that disagree from the first entry on.
    diverging = FakePeer(key, [notes(Ledger.open_writer(tmp_path / "l1.db", key), *"abcde"),
                               notes(Ledger.open_writer(tmp_path / "l2.db", key), *"vwxyz12")])
    # Truncated: a ledger of 6 entries, then its first 4 (a copy taken before the tail).
    other = Identity.generate()
    short = notes(Ledger.open_writer(tmp_path / "t.db", other), *"abcd")
    short.close()
    shutil.copy(tmp_path / "t.db", tmp_path / "t-short.db")
    truncated = FakePeer(other, [notes(Ledger.open_writer(tmp_path / "t.db", other), "e", "f"),
                                 Ledger.open_writer(tmp_path / "t-short.db", other)])
    diverging.switch_after = truncated.switch_after = 1
    yield diverging, truncated
    for fake in (diverging, truncated):
        fake.close()
        for ledger in fake.ledgers:
            ledger.close()


def flag_of(node: NodeProcess, url: str) -> str | None:
    found = next((p for p in node_peers(node) if p["url"] == url), None)
    return found["flag_reason"] if found and found["flagged"] else None


def node_peers(node: NodeProcess) -> list[dict[str, Any]]:
    return node.request("GET", "/v1/forge/peers", token=node.operator_token)[2]["peers"]


def test_a_peer_whose_log_forks_is_flagged_and_stays_flagged(nodes, forked_peers, tmp_path):
    diverging, truncated = forked_peers
    broken = FakePeer(Identity.generate(), [])
    node = nodes("a", "--peer", diverging.url, "--peer", truncated.url, "--peer", broken.url,
                 env=STATIC)
    reason = wait_for("the diverging log flagged", lambda: flag_of(node, diverging.url))
    assert reason == "log fork: checkpoint 7 is not consistent with checkpoint 5 seen earlier"
    reason = wait_for("the truncated log flagged", lambda: flag_of(node, truncated.url))
    assert reason.startswith("log fork: checkpoint 4 is smaller than checkpoint 6 seen earlier")
    assert "PEER FLAGGED" in (tmp_path / "a.log").read_text()
    # A peer whose gossip calls fail is retried, not flagged, and holds up no one.
    log = wait_for("the broken peer's failures logged", lambda: (
        text := (tmp_path / "a.log").read_text()).count(f"with {broken.url} failed") >= 4 and text)
    assert f"gossip checkpoint check with {broken.url} failed" in log
    assert f"gossip pull with {broken.url} failed" in log
    assert flag_of(node, broken.url) is None
    broken.close()
    flagged = {p["node_id"]: p["flag_reason"] for p in network(node)["flagged_peers"]}
    assert flagged[diverging.key.node_id].startswith("log fork: checkpoint 7")
    # A flagged peer is no provider, and `forge peers` says why.
    done = subprocess.run([sys.executable, "-m", "forge_cli", "peers"], capture_output=True,
                          text=True, cwd=REPO, env=forge_env(node.home), timeout=60)
    assert done.returncode == 0 and "FLAGGED: log fork: checkpoint 7" in done.stdout
    providers = node.request("GET", "/v1/forge/providers", token=node.operator_token)[2]
    assert all(p.get("url") not in (diverging.url, truncated.url) for p in providers["providers"])

    # The flag is persisted: after a restart, even while the peer serves a clean log again.
    diverging.current = 0
    first_id = node_id(node)
    node.stop()
    again = nodes("a", "--peer", diverging.url, env=STATIC)
    assert wait_for("the restarted node flagging from memory",
                    lambda: flag_of(again, diverging.url)).startswith("log fork: checkpoint 7")
    assert node_id(again) == first_id


def test_a_peer_that_serves_a_forged_trade_is_flagged(nodes, tmp_path):
    key = Identity.generate()
    honest = FakePeer(key, [notes(Ledger.open_writer(tmp_path / "p.db", key), "a")])
    provider, consumer, forger = Identity.generate(), Identity.generate(), Identity.generate()
    good = make_trade(provider, consumer)
    forged = sign(make_trade(provider, consumer)["terms"], forger, consumer)
    honest.served = [good, forged]
    try:
        node = nodes("a", "--peer", honest.url, env=STATIC)
        reason = wait_for("the peer flagged", lambda: flag_of(node, honest.url))
        assert reason.startswith("served 1 forged or malformed trade(s): forged trade: provider "
                                 "signature"), reason
        view = network(node)
        assert view["trades"] == 1 and view["foreign_trades"] == 1  # the good one, only
    finally:
        honest.close()
        honest.ledgers[0].close()


@pytest.mark.parametrize(("round_s", "batch", "message"), [
    (0, 200, "mesh.gossip_s must be at least 1 second, found 0"),
    (10, 0, "mesh.gossip_batch must be between 1 and 500, found 0"),
    (10, 501, "mesh.gossip_batch must be between 1 and 500, found 501")])
def test_gossip_settings_out_of_range_are_config_errors(tmp_path, round_s, batch, message):
    from forge_cli.errors import ConfigError
    from forge_cli.mesh.gossip import Gossip
    from forge_cli.mesh.network import NetworkView

    with pytest.raises(ConfigError, match=message):
        Gossip(NetworkView.open(tmp_path / "n.db"), mesh=None, round_s=round_s, batch=batch)
