"""Hostile peers against real nodes on loopback: malformed, huge and non-finite answers to the
/health probe and to gossip, peer strings that are terminal escapes or markup, and the live
event feed's connection cap.

Each hostile peer is a small aiohttp server on 127.0.0.1, registered the way discovery really
registers peers: a zeroconf advertisement on 127.0.0.1, or `--peer URL`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from forge_cli.identity import Identity
from tests.conftest import REPO, forge_env
from tests.mesh_helpers import wait_for, worker
from tests.node_harness import NodeProcess
from tests.test_mesh_discovery import FAST, peer, peers_of

STATIC = {**FAST, "FORGE_MESH_MDNS": "false"}
GOSSIP = "/v1/forge/gossip/trades"
CHUNK = b"x" * (1 << 20)
MB = 1 << 20


class HostilePeer:
    """A loopback server answering like a node with whatever it is told: `answers` maps a path
    to the bytes it sends (200, application/json), or to an int N, a JSON object padded to N
    bytes and streamed (the server never holds it). `hits` counts the requests per path."""

    def __init__(self, answers: dict[str, bytes | int]) -> None:
        self.answers = answers
        self.hits: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.port = int(self.url.rsplit(":", 1)[1])

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        answer = self.answers.get(request.path)
        if answer is None:
            return web.json_response({"error": {"message": "no"}}, status=503)
        if isinstance(answer, bytes):
            return web.Response(body=answer, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        head = b'{"node_id": "' + HOSTILE_ID.encode() + b'", "pad": "'
        try:
            await response.write(head)
            for _ in range(answer // len(CHUNK)):
                await response.write(CHUNK)
            await response.write(b'"}')
        except (ConnectionError, RuntimeError):
            pass  # the node stopped reading: what a cap does
        return response

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


HOSTILE_ID = Identity.generate().node_id


def health(**fields: Any) -> bytes:
    return json.dumps({"status": "ok", "node_id": Identity.generate().node_id, **fields}).encode()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def hostile(stack: ExitStack) -> Callable[..., HostilePeer]:
    def start(answers: dict[str, bytes | int]) -> HostilePeer:
        server = HostilePeer(answers)
        stack.callback(server.close)
        return server
    return start


@pytest.fixture
def nodes(tmp_path: Path, tiny_gguf: Path, stack: ExitStack) -> Callable[..., NodeProcess]:
    def start(name: str, *extra: str, env: dict[str, str] | None = None) -> NodeProcess:
        return stack.enter_context(NodeProcess(tmp_path / name, tiny_gguf, "--mesh", *extra,
                                               env=env or FAST, log=tmp_path / f"{name}.log"))
    return start


def advertise(stack: ExitStack, server: HostilePeer, name: str, **txt: str) -> None:
    """Announce `server` on mDNS (127.0.0.1 only) as a forge node, as any LAN host can."""
    from zeroconf import ServiceInfo, Zeroconf

    zc = Zeroconf(interfaces=["127.0.0.1"])
    info = ServiceInfo("_forge._tcp.local.", f"{name}._forge._tcp.local.", port=server.port,
                       parsed_addresses=["127.0.0.1"], server=f"{name}.local.",
                       properties={"id": Identity.generate().node_id, "proto": "1",
                                   "port": str(server.port), "models": "0", **txt})
    zc.register_service(info)
    stack.callback(zc.close)
    stack.callback(zc.unregister_service, info)


def log_of(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text(errors="replace")


def test_a_malformed_peer_stops_neither_discovery_nor_expiry(nodes, hostile, stack, tmp_path):
    a = nodes("a")
    c = nodes("c")
    wait_for("a finding c", lambda: peer(a, c))
    # Three LAN hosts advertise themselves on mDNS and answer /health with what kills a probe
    # round that trusts it: a number where a list goes, and non-finite numbers.
    offer = health(offers=[{"model": "m", "sha256": "ab", "params": "N",
                            "price_ucu_per_token": 1}])
    bad = [hostile({"/health": health(models=5)}),
           hostile({"/health": offer.replace(b'"N"', b"1e400")}),
           hostile({"/health": offer.replace(b'"N"', b"Infinity")})]
    for i, server in enumerate(bad):
        advertise(stack, server, f"hostile-{i}")
    # And TXT records no forge node writes: a port that is no number, 10^240 models.
    advertise(stack, bad[0], "hostile-txt", port="http", models="9" * 240, m0="a b")
    wait_for("a probing every hostile peer twice",
             lambda: all(s.hits.get("/health", 0) >= 2 for s in bad))
    b = nodes("b")
    c.stop(signal.SIGKILL)  # no goodbye: only its silence on /health can drop it
    wait_for("a finding b, which came after the hostile peers", lambda: peer(a, b))
    wait_for("a dropping c, which died after them", lambda: peer(a, c) is None)
    assert not {s.url for s in bad} & {p["url"] for p in peers_of(a)}
    log = log_of(tmp_path, "a")
    for server in bad:  # one line each, naming the peer
        assert re.search(f"peer {server.url}: .*; leaving it out of the peer table", log)
    assert "Traceback" not in log


def vm_kb(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def test_a_huge_health_answer_is_cut_at_the_cap(nodes, hostile, tmp_path):
    server = hostile({})  # answers 503 until it turns hostile
    a = nodes("a", "--peer", server.url, env=STATIC)
    wait_for("a probing the peer", lambda: server.hits.get("/health", 0) >= 2)
    before = vm_kb(a.proc.pid, "VmHWM")
    server.answers["/health"] = 200 * MB
    seen = server.hits["/health"]
    wait_for("three huge answers", lambda: server.hits["/health"] >= seen + 3, timeout=40)
    grown = (vm_kb(a.proc.pid, "VmHWM") - before) // 1024
    print(f"\npeak RSS growth of the node from one hostile 200 MB /health: {grown} MiB")
    assert grown < 40, f"the node's peak RSS grew by {grown} MiB"
    assert a.request("GET", "/health")[0] == 200
    assert "answered more than 65,536 bytes" in log_of(tmp_path, "a")


def gossiping(nodes: Callable[..., NodeProcess], server: HostilePeer) -> NodeProcess:
    """A node whose one (static) peer is `server`, which it trusts enough to pull from."""
    env = {**STATIC, "FORGE_MESH_GOSSIP_S": "1"}
    return nodes("a", "--peer", server.url, env=env)


def test_a_huge_gossip_page_is_cut_at_the_cap(nodes, hostile, tmp_path):
    server = hostile({"/health": json.dumps({"status": "ok", "node_id": HOSTILE_ID}).encode()})
    a = gossiping(nodes, server)
    wait_for("a pulling from the peer", lambda: server.hits.get(GOSSIP, 0) >= 2)
    before = vm_kb(a.proc.pid, "VmHWM")
    server.answers[GOSSIP] = 300 * MB
    seen = server.hits[GOSSIP]
    wait_for("three huge pages", lambda: server.hits[GOSSIP] >= seen + 3, timeout=60)
    grown = (vm_kb(a.proc.pid, "VmHWM") - before) // 1024
    print(f"\npeak RSS growth of the node from one hostile 300 MB gossip page: {grown} MiB")
    assert grown < 60, f"the node's peak RSS grew by {grown} MiB"
    log = log_of(tmp_path, "a")
    assert f"gossip pull with {server.url} failed (BadResponse" in log
    assert "answered more than 1,048,576 bytes" in log


def test_a_gossip_page_counting_infinity_logs_one_line_not_a_traceback(nodes, hostile,
                                                                       tmp_path):
    pages = [b'{"count": Infinity, "next": 1, "trades": []}',
             b'{"count": 1e400, "next": 1, "trades": []}',
             b'{"count": 1, "next": -1e400, "trades": []}']
    servers = [hostile({"/health": health(), GOSSIP: page}) for page in pages]
    env = {**STATIC, "FORGE_MESH_GOSSIP_S": "1"}
    a = nodes("a", *(arg for s in servers for arg in ("--peer", s.url)), env=env)
    wait_for("three pulls from each peer", lambda: all(s.hits.get(GOSSIP, 0) >= 3
                                                       for s in servers))
    log = log_of(tmp_path, "a")
    for server in servers:
        assert f"gossip pull with {server.url} failed (BadResponse" in log
    assert "Traceback" not in log and "OverflowError" not in log
    assert a.request("GET", "/health")[0] == 200


ESCAPES = "tiny\x1b]0;PWNED\x07"  # an OSC sequence: retitles the terminal
C1 = "csi\x9b31m"  # the 8-bit CSI, which json.dumps(ensure_ascii=False) leaves raw
MARKUP = "[link=https://evil.example]free CU[/link]"
NAMES = [ESCAPES, C1, MARKUP, "[/]"]


def marked_peer(hostile: Callable[..., HostilePeer]) -> HostilePeer:
    offers = [{"model": name, "sha256": "ab" * 32, "params": 1, "price_ucu_per_token": 7}
              for name in NAMES]
    return hostile({"/health": health(offers=offers)})


def test_forge_peers_shows_peer_strings_escaped_never_obeyed(nodes, hostile, tmp_path):
    marked = marked_peer(hostile)
    markup_id = hostile({"/health": json.dumps({"status": "ok", "node_id": "[/]\x1b[2J",
                                                "models": ["m"]}).encode()})
    a = nodes("a", "--peer", marked.url, "--peer", markup_id.url, env=STATIC)
    wait_for("a listing the peer", lambda: peer(a, marked))
    wait_for("a probing the other", lambda: markup_id.hits.get("/health", 0) >= 2)
    run = [sys.executable, "-m", "forge_cli", "peers"]
    for args in ([], ["--json"]):
        done = subprocess.run([*run, *args], capture_output=True, cwd=REPO,
                              env=forge_env(a.home), timeout=60)
        assert done.returncode == 0, done.stderr
        shown = done.stdout.decode("utf-8")
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", shown), repr(shown)
        if args:
            listed = {p["url"]: p for p in json.loads(shown)}
            assert [m["name"] for m in listed[marked.url]["models"]] == NAMES
        else:
            assert "tiny\\x1b]0;PWNED\\x07" in shown and "csi\\x9b31m" in shown
            assert MARKUP in shown
    assert peer(a, markup_id) is None  # a node id that is no node key is no peer


async def test_forge_tui_shows_a_hostile_peer_without_crashing(nodes, hostile):
    from tui.app import ForgeApp
    from tui.widgets.peers import PeersPanel

    marked = marked_peer(hostile)
    a = nodes("a", "--peer", marked.url, env=STATIC)
    await asyncio.to_thread(wait_for, "a listing the peer", lambda: peer(a, marked))
    app = ForgeApp(a.url, a.operator_token, poll_s=1)
    async with app.run_test(size=(200, 40)) as pilot:
        app.action_tab("peers")
        deadline = time.monotonic() + 30
        while not any(p["url"] == marked.url for p in app.snapshot.peers or []):
            assert time.monotonic() < deadline, "the peer never reached the dashboard"
            await pilot.pause(0.1)
        await pilot.pause(0.2)
        table = app.query_one(PeersPanel).query_one("DataTable")
        row = [str(cell) for cell in table.get_row_at(0)]
        assert row[1] == ", ".join(["tiny\\x1b]0;PWNED\\x07", "csi\\x9b31m", MARKUP, "[/]"])
        assert app.is_running
    assert app.return_code in (0, None)


def open_feed(url: str, token: str) -> tuple[socket.socket, int, bytes]:
    """A raw GET /v1/forge/events held open: (socket, HTTP status, what arrived first)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"GET /v1/forge/events HTTP/1.1\r\nHost: {host}\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())
    first = b""
    while b"\r\n\r\n" not in first or (b" 200 " in first[:16] and b"event: hello" not in first):
        chunk = sock.recv(65536)
        if not chunk:
            break
        first += chunk
    return sock, int(first.split(b" ", 2)[1]), first


def test_the_event_feed_refuses_subscribers_past_its_cap(tmp_path, tiny_gguf, stack):
    from forge_cli.node.events import MAX_SUBSCRIBERS

    node = stack.enter_context(NodeProcess(tmp_path / "n", tiny_gguf))
    fds = len(os.listdir(f"/proc/{node.proc.pid}/fd"))
    held = []
    for _ in range(MAX_SUBSCRIBERS):
        sock, status, _ = open_feed(node.url, node.operator_token)
        stack.callback(sock.close)
        assert status == 200
        held.append(sock)
    refused = []
    for _ in range(20):
        sock, status, first = open_feed(node.url, node.operator_token)
        refused.append((status, first))
        sock.close()
    assert {status for status, _ in refused} == {429}
    body = json.loads(refused[0][1].split(b"\r\n\r\n", 1)[1].decode())
    assert body["error"]["code"] == "FeedFull" and body["error"]["type"] == "rate_limit_error"
    assert f"the most it holds at once ({MAX_SUBSCRIBERS})" in body["error"]["message"]
    # A subscriber that leaves frees its place.
    held.pop().close()
    status = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sock, status, _ = open_feed(node.url, node.operator_token)
        if status == 200:
            break
        sock.close()
        time.sleep(0.2)
    stack.callback(sock.close)
    assert status == 200
    # Descriptors: the subscribers held, and nothing for the refused ones once they left.
    wait_for("the refused connections released", lambda: len(os.listdir(
        f"/proc/{node.proc.pid}/fd")) <= fds + MAX_SUBSCRIBERS + 4)


def test_forge_worker_names_a_hostile_peers_models_escaped(hostile, tmp_path):
    marked = marked_peer(hostile)
    done = worker(tmp_path / "w", "--peer", marked.url, "-m", "absent", "--wait", "3", "hi",
                  env={"FORGE_MESH_MDNS": "false"})
    assert done.returncode == 1, done.stderr
    said = done.stderr
    assert f"peers seen: {marked.url} (" in said  # the NoProvider message lists its models
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", said), repr(said)
    assert "tiny\\x1b]0;PWNED\\x07" in said and "csi\\x9b31m" in said


def test_a_served_page_stops_before_the_cap_a_puller_reads_with(tmp_path):
    from forge_cli.mesh.network import NetworkView
    from tests.gossip_helpers import make_trade

    view = NetworkView.open(tmp_path / "network.db")
    provider, consumer = Identity.generate(), Identity.generate()
    for _ in range(5):
        view.add(make_trade(provider, consumer), source="test")
    every, after = view.since(0, 500)
    assert len(every) == 5 and after == 5
    size = len(every[0]) + 1
    two, after = view.since(0, 500, max_bytes=2 * size + size // 2)
    assert two == every[:2] and after == 2  # the next page starts where this one stopped
    one, after = view.since(0, 500, max_bytes=1)
    assert one == every[:1] and after == 1  # never an empty page while trades remain
    view.close()
