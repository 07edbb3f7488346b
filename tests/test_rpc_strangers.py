"""Strangers against the RPC layer (issue 19: findings 3, 4 and 8, and the nested handshake):
real `forge rpc serve` peers and `forge node --split` heads on 127.0.0.1.

- A head that never pays gets no more tunnel bytes than the credit its terms state; a head
  that pays gets all it asks, its bytes paid ahead in top-ups (finding 3).
- Another local process on a head's loopback tunnel port gets nothing (finding 4).
- A stranger holding a tunnel idle, or asking for 1,000 terms, does not lock real heads out,
  and a head that is refused says so in one line (finding 8).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import test_rpc
from tests.node_harness import NodeProcess
from tests.test_rpc import (
    MESSAGES,
    chat,
    listening,
    needs_rpc,
    split_of,
    start_peers,
    trades,
    verify_deep,
    wait_for,
)

unsplit = test_rpc.unsplit  # the fixture: the unsplit model's greedy reply

# The tiny model's load through one peer carries 74.6 kB, but now and then 45 to 111 kB more
# (120, 153 and 186 kB counted at a cut during the load, in 33 kB steps); this holds any of
# those and then a few dozen tokens.
CREDIT_KIB = 256


def agree(url: str, head: str, layers: int = 1) -> dict[str, Any]:
    import urllib.request

    from forge_cli import wire

    request = urllib.request.Request(
        f"{url}/v1/forge/rpc/terms", method="POST", headers={"Content-Type": "application/json"},
        data=wire_body({"head": head, "model_sha256": "ab" * 32, "layers": layers}))
    with urllib.request.urlopen(request, timeout=10) as response:
        return wire.parse(response.read())


def wire_body(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()


class Holder(threading.Thread):
    """A stranger's key that completes the tunnel handshake and then sends nothing."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        from forge_cli import identity

        self.url = url
        self.key = identity.Identity.generate()
        self.admitted = threading.Event()
        self.release = threading.Event()
        self.answer: Any = None
        self.answer_peer = ""  # the peer's node id, as its challenge says
        self.close_code: int | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._hold())
        except Exception as exc:  # refused terms (an HTTP error) or a dropped tunnel
            self.answer = {"refused": str(exc)}
        finally:
            self.admitted.set()

    async def _hold(self) -> None:
        import aiohttp

        from forge_cli.rpc import terms

        agreed = agree(self.url, self.key.node_id)
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{self.url}/v1/forge/rpc/tunnel") as ws:
            hello = await ws.receive_json(timeout=10)
            self.answer_peer = hello["peer"]
            await ws.send_json(terms.handshake(self.key, agreed, hello["challenge"]))
            self.answer = await ws.receive_json(timeout=10)
            self.admitted.set()
            deadline = time.monotonic() + 120
            while not self.release.is_set() and time.monotonic() < deadline:
                try:
                    msg = await ws.receive(timeout=0.2)
                except TimeoutError:
                    continue
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING):
                    break
            self.close_code = ws.close_code


# -- finding 3: a layer peer sells, it does not give ---------------------------------------------

@needs_rpc
def test_a_head_that_never_pays_gets_only_the_stated_credit(tiny_gguf, tmp_path):
    from forge_cli import identity
    from forge_cli.errors import PeerLost
    from forge_cli.inference.engine import Sampling
    from forge_cli.rpc.split import SplitEngine

    (peer,) = start_peers(tmp_path, 1, env={"FORGE_RPC_CREDIT_KIB": str(CREDIT_KIB)})
    try:
        # A fresh key, no node behind it: its engine pays no one.
        stranger = SplitEngine(tiny_gguf, name="tiny", urls=[peer.url],
                               signer=identity.Identity.generate(), n_ctx=512, slots=1)
        try:
            stream = stranger.chat(MESSAGES, Sampling(temperature=0, max_tokens=200, seed=7))
            with pytest.raises(PeerLost, match="cut its tunnel"):
                stream.result()
            got = stream.tokens
        finally:
            stranger.close()
        health = peer.health()
        assert health["credit_bytes"] == CREDIT_KIB * 1024  # what it states it gives away
        (used,) = health["agreements"]
        assert used["paid_tokens"] == 0 and used["allowance"] == CREDIT_KIB * 1024
        assert used["carried"] <= CREDIT_KIB * 1024  # the bound held, to the byte
        assert health["traffic"]["cut"] == 1
        assert got < 100  # ~2.6 kB a token: the credit left after the load buys a few dozen
        assert trades(tmp_path / "peer0") == []  # and it was given, not sold: nothing more

        # New keys from the same address run on credit a few times (4 agreements unpaid in
        # all, the stranger's engine's included), then must pay or wait.
        answers = []
        for _ in range(4):
            holder = Holder(peer.url)
            holder.start()
            holder.admitted.wait(20)
            holder.release.set()
            holder.join(20)
            answers.append(holder.answer)
        assert answers[:3] == [{"ok": True}] * 3
        assert "402" in answers[3]["refused"]
        from forge_cli.errors import InsufficientCU

        status, _, body = peer.request("POST", "/v1/forge/rpc/terms", {
            "head": identity.Identity.generate().node_id, "model_sha256": "ab" * 32,
            "layers": 1})
        assert status == InsufficientCU.http_status, body
        assert "paid nothing" in body["error"]["message"]
    finally:
        peer.stop()


@needs_rpc
def test_a_paying_head_gets_all_it_asks_and_pays_for_its_bytes(tiny_gguf, unsplit, tmp_path):
    # Each paid token buys 1 KiB here (1 layer), less than a token's ~2.6 kB: the head must
    # pay ahead.
    peers = start_peers(tmp_path, 1, env={"FORGE_RPC_CREDIT_KIB": str(CREDIT_KIB),
                                          "FORGE_RPC_LAYER_TOKEN_KIB": "1"})
    head = None
    try:
        head = NodeProcess(tmp_path / "head", tiny_gguf, "--split", peers[0].url,
                           log=tmp_path / "head.log")
        buyer = head.agent("buyer")
        status, body = chat(head, buyer["token"])
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == unsplit
        status, body = chat(head, buyer["token"], max_tokens=200)
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 200
        assert split_of(head)["peers"][0]["lost"] is None
        sold = wait_for("the layer trade for the 200 tokens", lambda: [
            t["terms"] for t in trades(tmp_path / "peer0")] if any(
                t["terms"]["completion_tokens"] - t["terms"]["prompt_tokens"] == 200
                for t in trades(tmp_path / "peer0"))
            else None)
        health = peers[0].health()
        assert health["traffic"]["cut"] == 0
        (used,) = health["agreements"]
        assert used["carried"] > CREDIT_KIB * 1024  # far past the credit, every byte paid for
        assert used["carried"] <= used["allowance"]
        assert sum(t["completion_tokens"] for t in sold) == used["paid_tokens"]
        assert any(t["prompt_tokens"] == 0 and t["completion_tokens"] > 0 for t in sold)  # ahead
    finally:
        if head is not None:
            head.stop()
        for peer in peers:
            peer.stop()
    for home in ("head", "peer0"):
        done = verify_deep(tmp_path / home)
        assert done.returncode == 0, (home, done.stdout, done.stderr)


# -- finding 4: the head's loopback tunnel ports -------------------------------------------------

@needs_rpc
def test_only_the_heads_engine_may_use_its_tunnel_ports(tiny_gguf, tmp_path):
    peers = start_peers(tmp_path, 1)
    head = None
    try:
        head = NodeProcess(tmp_path / "head", tiny_gguf, "--split", peers[0].url,
                           log=tmp_path / "head.log")
        buyer = head.agent("buyer")
        status, body = chat(head, buyer["token"])
        assert status == 200, body
        http_port = int(head.url.rsplit(":", 1)[1])
        ports = [port for address, port in listening(head.proc.pid)
                 if address == "127.0.0.1" and port != http_port]
        assert ports, "the head listens on a loopback port per peer"
        before = peers[0].health()["traffic"]["tunnels"]
        for port in ports:  # another local process, ggml's first bytes or not
            with socket.create_connection(("127.0.0.1", port), timeout=10) as intruder:
                intruder.sendall(b"\x0e" + bytes(8))
                intruder.settimeout(10)
                try:
                    answer: bytes | None = intruder.recv(64)
                except ConnectionResetError:
                    answer = b""
                except TimeoutError:  # held open, its bytes on their way to the peer
                    answer = None
                assert answer == b""  # closed on it: nothing crossed to the peer
        time.sleep(0.5)
        assert peers[0].health()["traffic"]["tunnels"] == before  # no tunnel opened for it
        status, body = chat(head, buyer["token"])  # and the head serves on, undisturbed
        assert status == 200, body
        assert split_of(head)["peers"][0]["lost"] is None
        assert split_of(head)["loads"] == 1
    finally:
        if head is not None:
            head.stop()
        for peer in peers:
            peer.stop()


# -- finding 8: a stranger cannot hold the layer peer ----------------------------------------------

@needs_rpc
def test_a_refused_head_says_why_in_one_line(tiny_gguf, tmp_path, run_forge):
    (peer,) = start_peers(tmp_path, 1)
    holder = Holder(peer.url)
    try:
        holder.start()
        assert holder.admitted.wait(10) and holder.answer == {"ok": True}
        done = run_forge("node", "-m", str(tiny_gguf), "--split", peer.url, "--port", "0",
                         timeout=120)
        from forge_cli.errors import TunnelRefused, exit_code_for

        assert done.returncode == exit_code_for(TunnelRefused("")) == 1
        assert "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"forge: error: the split engine for {tiny_gguf.name} could not load: layer peer "
            f"{holder.answer_peer[:12]}… at {peer.url} refused the tunnel: this peer is serving "
            "another head; try again when it is done"]
    finally:
        holder.release.set()
        peer.stop()


@needs_rpc
def test_idle_strangers_and_floods_of_terms_do_not_lock_real_heads_out(tiny_gguf, unsplit,
                                                                       tmp_path):
    from forge_cli import identity

    (peer,) = start_peers(tmp_path, 1, env={"FORGE_RPC_IDLE_S": "2"})
    holder = Holder(peer.url)
    head = None
    try:
        holder.start()
        assert holder.admitted.wait(10) and holder.answer == {"ok": True}
        started = time.monotonic()
        for _ in range(1000):  # unauthenticated, each for a fresh key
            assert agree(peer.url, identity.Identity.generate().node_id)["terms"]
        flood_s = time.monotonic() - started
        holder.join(30)
        from forge_cli.rpc.peer import CLOSE_IDLE

        assert holder.close_code == CLOSE_IDLE  # the idle stranger was let go
        assert peer.health()["traffic"]["idle_closed"] == 1

        head = NodeProcess(tmp_path / "head", tiny_gguf, "--split", peer.url,
                           log=tmp_path / "head.log")
        buyer = head.agent("buyer")
        status, body = chat(head, buyer["token"])
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == unsplit

        # The real head's own tunnel idles too: the peer closes it, the head sleeps, and the
        # next request wakes it (no 429, no peer marked lost).
        wait_for("the head's idle tunnel closed",
                 lambda: peer.health()["traffic"]["idle_closed"] >= 2)
        status, body = chat(head, buyer["token"])
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == unsplit
        assert split_of(head)["peers"][0]["lost"] is None

        # A peer that goes away while the head sleeps is found gone when it wakes, and the
        # head serves on without it.
        wait_for("the head asleep again", lambda: peer.health()["traffic"]["idle_closed"] >= 3)
        peer.proc.kill()
        peer.proc.wait(10)
        status, body = chat(head, buyer["token"])
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == unsplit
        assert "is unreachable" in split_of(head)["peers"][0]["lost"]
        print(f"1000 terms requests took {flood_s:.2f} s")
    finally:
        holder.release.set()
        if head is not None:
            head.stop()
        peer.stop()


# -- the handshake is parsed, not trusted --------------------------------------------------------

@needs_rpc
def test_deeply_nested_json_in_the_rpc_handshake_is_refused_plainly(tmp_path):
    import aiohttp

    (peer,) = start_peers(tmp_path, 1)

    async def send_nested() -> Any:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{peer.url}/v1/forge/rpc/tunnel") as ws:
            await ws.receive_json(timeout=10)
            await ws.send_str("[" * 20_000 + "]" * 20_000)  # under the size cap
            return await ws.receive_json(timeout=10)

    try:
        answer = asyncio.run(send_nested())
        assert "nested more than" in answer["error"]
        nested = "[" * 50_000 + "]" * 50_000
        status, _, body = peer.request("POST", "/v1/forge/rpc/settle", {
            "trade": {}, "consumer_sig": "00", "request": nested, "response": ""})
        assert status == 422, body
        assert peer.health()["status"] == "ok"
    finally:
        peer.stop()
    assert "Traceback" not in Path(tmp_path / "peer0.log").read_text()


def test_per_address_limits_count_an_ipv6_host_by_its_64():
    from forge_cli.rpc.peer import source_of

    assert source_of("10.0.0.7") == "10.0.0.7"
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff:2") == "2001:db8::/64"
    assert source_of("::ffff:10.0.0.7") == "10.0.0.7"


def test_a_top_up_keeps_a_full_credit_ahead_of_the_bytes():
    from forge_cli import identity
    from forge_cli.rpc import terms

    peer, head = identity.Identity.generate(), identity.Identity.generate()
    agreed = terms.offer(peer, head=head.node_id, model_sha256="cd" * 32, layers=2, rate=20_000,
                         now_ms=0, ttl_ms=60_000, credit_bytes=1000, bytes_per_layer_token=50)
    stated = agreed["terms"]  # 2 layers × 50 B: a paid token buys 100 B
    assert terms.terms_problem(agreed) is None and stated["credit_bytes"] == 1000
    assert terms.bytes_per_token(stated) == 100
    assert terms.allowance(stated, 0) == 1000 and terms.allowance(stated, 3) == 1300
    assert terms.top_up_tokens(stated, needed=500, paid_tokens=0) == 0  # half a credit spare
    # 501 bytes would leave less than half a credit: buy back to a full one (1501 B → 6 tokens)
    assert terms.top_up_tokens(stated, needed=501, paid_tokens=0) == 6
    assert terms.top_up_tokens(stated, needed=501, paid_tokens=6) == 0
    free = terms.offer(peer, head=head.node_id, model_sha256="cd" * 32, layers=2, rate=0,
                       now_ms=0, ttl_ms=60_000)["terms"]
    assert terms.allowance(free, 0) is None  # rate 0: the peer gives, nothing is cut
    assert terms.top_up_tokens(free, needed=10**12, paid_tokens=0) == 0
    # A generation pays for every token the layers ran: the prompt's 4 and the 10 generated.
    request = terms.agreement_body(agreed)
    record = terms.metering_body(prompt_tokens=4, completion_tokens=10, response=b"x" * 10)
    trade = terms.layer_trade(agreed, model="tiny", prompt_tokens=4, completion_tokens=10,
                              request=request, response=record, now_ms=1)
    assert (trade["prompt_tokens"], trade["completion_tokens"]) == (4, 14)
    assert trade["cu"] == 1 and terms.layer_trade_problem(trade, agreed, request=request,
                                                          response=record) is None
