"""One model across machines: `forge rpc serve` layer peers and a `forge node --split` head,
all real processes on loopback (and, where the machine allows it, across network namespaces).

The tiny GGUF has 2 layers and an output layer: split three ways, the head keeps the output
layer and each peer runs one block. Greedy decoding must give the unsplit model's text; the
head pays each peer in dual-signed trades both ledgers hold; a peer killed mid-generation
fails the request by its name, and the buyer pays only for what it received.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess


def _rpc_built() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_rpc())
    except Exception:
        return False


needs_rpc = pytest.mark.skipif(not _rpc_built(),
                               reason="this llama-cpp-python was built without GGML_RPC")

GREEDY = {"temperature": 0, "max_tokens": 24, "seed": 7}
MESSAGES = [{"role": "user", "content": "split me"}]


class PeerProcess(NodeProcess):
    """A real `forge rpc serve` on an ephemeral port."""

    ANNOUNCE = "forge rpc serve listening on "

    def command(self, model: Path | None) -> list[str]:
        return ["rpc", "serve", "--port", "0"]

    def _wait_for_url(self) -> str:
        url = super()._wait_for_url()
        assert self.proc.stdout is not None
        self.lines += [self.proc.stdout.readline() for _ in range(7)]  # the rest of the banner
        return url

    @property
    def ggml_port(self) -> int:
        line = next(line for line in self.lines if line.strip().startswith("ggml rpc"))
        return int(line.split()[2].rsplit(":", 1)[1])

    def health(self) -> dict[str, Any]:
        status, _, body = self.request("GET", "/health")
        assert status == 200, body
        return body


def start_peers(root: Path, n: int, *extra: str, prefix: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> list[PeerProcess]:
    """`n` layer peers, started side by side (each with its own FORGE_HOME)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n) as pool:
        starting = [pool.submit(PeerProcess, root / f"peer{i}", None, *extra, prefix=prefix,
                                env=env, log=root / f"peer{i}.log") for i in range(n)]
    peers = [f.result() for f in starting if f.exception() is None]
    if len(peers) < n:
        for peer in peers:
            peer.stop()
        raise next(f.exception() for f in starting if f.exception() is not None)  # type: ignore[misc]
    return peers


@contextmanager
def split_cluster(root: Path, model: Path, *peer_args: str, prefix: tuple[str, ...] = (),
                  split: str | None = None, stall_s: int = 60
                  ) -> Iterator[tuple[list[PeerProcess], NodeProcess]]:
    """Two layer peers and a head splitting `model` with them (`split`: --split's value, the
    peers' URLs without it); every process is stopped on the way out."""
    peers = start_peers(root, 2, *peer_args, prefix=prefix)
    head = None
    try:
        head = NodeProcess(root / "head", model, "--split",
                           split or ",".join(p.url for p in peers), log=root / "head.log",
                           env={"FORGE_RPC_STALL_S": str(stall_s), "FORGE_RPC_DISCOVER_S": "20"})
        yield peers, head
    finally:
        if head is not None:
            head.stop()
        for peer in peers:
            peer.stop()


def verified(root: Path) -> None:
    """`forge ledger verify --deep` exits 0 for the head and both peers."""
    for home in ("head", "peer0", "peer1"):
        done = verify_deep(root / home)
        assert done.returncode == 0, (home, done.stdout, done.stderr)


def stream_until(head: NodeProcess, token: str, pieces: int, then: Any) -> tuple[str, Any]:
    """Stream a long greedy reply, call `then()` after `pieces` pieces; (text, the error)."""
    from forge_cli.client import Client
    from forge_cli.errors import ForgeError

    received: list[str] = []
    with pytest.raises(ForgeError) as failure:
        for chunk in Client(head.url, token, timeout=60).stream_chat(
                {"messages": MESSAGES, "temperature": 0, "max_tokens": 900}):
            delta = chunk["choices"][0].get("delta", {}).get("content") \
                if chunk.get("choices") else None
            if delta:
                received.append(delta)
            if len(received) == pieces:
                then()
    return "".join(received), failure.value


def chat(head: NodeProcess, token: str, **extra: Any) -> tuple[int, Any]:
    status, _, body = head.request("POST", "/v1/chat/completions",
                                   {"messages": MESSAGES, **GREEDY, **extra}, token=token)
    return status, body


def split_of(head: NodeProcess) -> dict[str, Any]:
    status, _, body = head.request("GET", "/v1/models", token=head.operator_token)
    assert status == 200, body
    return body["data"][0]["engine"]["split"]


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def trades(home: Path) -> list[dict[str, Any]]:
    """Every trade's data in a ledger (read while its writer may still run)."""
    from forge_cli.ledger.store import Ledger

    ledger = Ledger.open_reader(home / "ledger.db")
    try:
        return [e.fields["data"] for e in ledger.iter_entries() if e.kind == "trade"]
    finally:
        ledger.close()


def verify_deep(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep"],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(home),
                          timeout=120)


def node_id(home: Path) -> str:
    from forge_cli import identity

    found = identity.load_existing(home / "node.key")
    assert found is not None
    return found.node_id


@pytest.fixture(scope="module")
def unsplit(tiny_gguf: Path) -> str:
    """The unsplit model's greedy reply, from the engine in this process."""
    from forge_cli.inference.engine import Engine, Sampling

    with Engine(tiny_gguf, n_ctx=512, slots=1, n_gpu_layers=0) as engine:
        return engine.chat(MESSAGES, Sampling(temperature=0, max_tokens=24, seed=7)).result().text


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PeerProcess]]:
    found = start_peers(tmp_path_factory.mktemp("rpc"), 2, env={"FORGE_RPC_TERMS_S": "3"})
    yield found
    for peer in found:
        peer.stop()


# -- plans and terms (no processes) -------------------------------------------------------------

def test_layers_are_planned_by_free_memory_as_llama_cpp_assigns_them():
    from forge_cli.errors import ModelError, UsageError
    from forge_cli.rpc.split import plan_layers

    even = plan_layers(2, 8000, [8000, 8000])
    assert (even.n_gpu_layers, even.head, even.peers) == (2, [0], [[1], [2]])
    even.check({0: "CPU", 1: "RPC0", 2: "RPC1"})  # what llama.cpp logs for this plan
    with pytest.raises(ModelError, match="not as planned"):
        even.check({0: "CPU", 1: "RPC0", 2: "CPU"})
    uneven = plan_layers(30, 8000, [8000, 16000])
    assert uneven.head == [0, 1, 2, 3, 4, 5, 6, 7]
    assert (uneven.peers[0][0], uneven.peers[1][-1]) == (8, 30)  # the last peer has the output
    assert (len(uneven.peers[0]), len(uneven.peers[1])) == (8, 15)  # 1 : 2 by memory
    assert plan_layers(2, 100, [8000, 10]).peers == [[1], [2]]  # every peer gets a layer
    with pytest.raises(UsageError, match="too few"):
        plan_layers(2, 8000, [1, 1, 1])


def test_a_layer_trade_must_pay_the_agreed_price_over_the_agreement():
    from forge_cli import identity
    from forge_cli.rpc import terms

    peer, head = identity.Identity.generate(), identity.Identity.generate()
    agreed = terms.offer(peer, head=head.node_id, model_sha256="cd" * 32, layers=3, rate=20_000,
                         now_ms=1_000, ttl_ms=60_000)
    assert terms.terms_problem(agreed) is None
    request = terms.agreement_body(agreed)
    record = terms.metering_body(prompt_tokens=4, completion_tokens=10, response=b"0123456789")
    trade = terms.layer_trade(agreed, model="tiny", prompt_tokens=4, completion_tokens=10,
                              request=request, response=record, now_ms=2_000)
    assert (trade["provider"], trade["consumer"]) == (peer.node_id, head.node_id)
    assert (trade["price_ucu_per_token"], trade["cu"]) == (60_000, 1)  # 3 layers × 20 000 µCU
    assert terms.layer_trade_problem(trade, agreed, request=request, response=record) is None
    cheap = {**trade, "price_ucu_per_token": 1, "cu": 1}
    assert "price_ucu_per_token" in terms.layer_trade_problem(cheap, agreed, request=request,
                                                              response=record)
    assert terms.handshake_problem(terms.handshake(head, agreed, "c1"), peer=peer.node_id,
                                   challenge="c2", now_ms=2_000) is not None  # replayed


def test_the_dashboard_says_which_peer_runs_how_many_layers():
    from tui.widgets.overview import placement

    split = {"head": {"layers": [0]}, "peers": [{"peer": "ab" * 32, "layers": [1]},
                                                {"peer": "cd" * 32, "layers": [2], "lost": "x"}]}
    activity = {"models": [{"model": "tiny", "device": "CPU+RPC", "layers": 2, "gpu_layers": 2,
                            "split": split}]}
    assert placement("tiny", activity) == \
        "tiny: 1 layers here, peers abababab… 1, cdcdcdcd… 1 lost"


def test_split_refuses_what_is_not_a_list_of_peer_urls(run_forge, tiny_gguf):
    for bad in ("ftp://a", ",", "peer0"):
        done = run_forge("node", "-m", str(tiny_gguf), "--split", bad)
        assert done.returncode == 2, done.stderr
        assert "--split takes auto or URL[,URL…] of layer peers" in done.stderr
        assert "Traceback" not in done.stderr


# -- the tunnel and the binding ------------------------------------------------------------------

def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            if width == 8:
                address = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                address = "::1" if addr == "0" * 24 + "01000000" else addr
            found.append((address, int(port, 16)))
    return found


@needs_rpc
def test_ggml_server_listens_on_loopback_only(peers):
    for peer in peers:
        tunnel_port = int(peer.url.rsplit(":", 1)[1])
        sockets = listening(peer.proc.pid)
        assert ("127.0.0.1", peer.ggml_port) in sockets
        # Whatever else it listens on, only the tunnel could be reached from another machine.
        assert all(address in ("127.0.0.1", "::1") for address, port in sockets
                   if port != tunnel_port), sockets


async def _handshake(url: str, answer: Any) -> dict[str, Any]:
    """Open the tunnel with `answer(challenge)`; the peer's reply to it."""
    import aiohttp

    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"{url}/v1/forge/rpc/tunnel") as ws:
        hello = await ws.receive_json(timeout=10)
        await ws.send_json(answer(hello["challenge"]))
        return await ws.receive_json(timeout=10)


@needs_rpc
async def _while_open(url: str, head: Any, other: Any) -> str:
    """Hold a tunnel open for `head`; what the peer answers `other` meanwhile."""
    import aiohttp

    from forge_cli.rpc import terms

    async def agree(who: Any) -> dict[str, Any]:
        async with session.post(f"{url}/v1/forge/rpc/terms", json={
                "head": who.node_id, "model_sha256": "ab" * 32, "layers": 1}) as response:
            return await response.json()

    async with aiohttp.ClientSession() as session:
        mine, theirs = await agree(head), await agree(other)
        async with session.ws_connect(f"{url}/v1/forge/rpc/tunnel") as ws:
            hello = await ws.receive_json(timeout=10)
            await ws.send_json(terms.handshake(head, mine, hello["challenge"]))
            assert await ws.receive_json(timeout=10) == {"ok": True}
            async with session.ws_connect(f"{url}/v1/forge/rpc/tunnel") as second:
                hello = await second.receive_json(timeout=10)
                await second.send_json(terms.handshake(other, theirs, hello["challenge"]))
                return (await second.receive_json(timeout=10)).get("error")


def test_tunnel_refuses_a_wrong_key_and_expired_terms(peers, tmp_path):
    from forge_cli import identity
    from forge_cli.rpc import terms

    head, stranger = (identity.Identity.generate() for _ in range(2))
    peer = peers[0]

    def agree() -> dict[str, Any]:  # terms live 3 s on these peers (FORGE_RPC_TERMS_S=3)
        status, _, agreed = peer.request("POST", "/v1/forge/rpc/terms", {
            "head": head.node_id, "model_sha256": "ab" * 32, "layers": 1})
        assert status == 200, agreed
        return agreed

    def answer(signer: Any, agreed: dict[str, Any]) -> dict[str, Any]:
        return asyncio.run(_handshake(peer.url, lambda c: terms.handshake(signer, agreed, c)))

    first = agree()
    assert terms.terms_problem(first) is None and first["terms"]["peer"] == peer.health()["node_id"]
    refused = peer.health()["traffic"]["refused"]
    assert "wrong key" in answer(stranger, agree())["error"]
    live = agree()
    forged = {**live, "terms": {**live["terms"], "rate_ucu_per_layer_token": 0}}
    assert "signature over the terms does not verify" in answer(head, forged)["error"]
    assert answer(head, agree()) == {"ok": True}
    assert asyncio.run(_while_open(peer.url, head, stranger)) == \
        "tunnel refused: this peer is serving another head; try again when it is done"

    time.sleep(max(0.0, first["terms"]["expires_ms"] / 1000 - time.time()) + 0.2)
    assert "expired" in answer(head, first)["error"]
    assert peer.health()["traffic"]["refused"] == refused + 4
    status, _, body = peer.request("POST", "/v1/forge/rpc/terms", {"head": "x", "layers": 1})
    assert status == 422 and "head" in body["error"]["message"]


# -- split on one machine -----------------------------------------------------------------------

@needs_rpc
def test_split_across_two_peers_matches_unsplit_and_pays_each_peer(tiny_gguf, unsplit, tmp_path):
    with split_cluster(tmp_path, tiny_gguf) as (peers_, head):
        buyer = head.agent("buyer")
        status, body = chat(head, buyer["token"])
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == unsplit

        split = split_of(head)
        ids = [p.health()["node_id"] for p in peers_]
        assert [p["peer"] for p in split["peers"]] == ids
        layers = [split["head"]["layers"], *(p["layers"] for p in split["peers"])]
        assert all(layers) and sorted(sum(layers, [])) == [0, 1, 2]  # 2 blocks + output
        for peer, described in zip(peers_, split["peers"], strict=True):
            assert described["tunnel_bytes_up"] > 0 and described["lost"] is None
            assert peer.health()["traffic"]["up"] > 0  # weights and activations came through

        wait_for("both layer trades", lambda: all(p["trades"] == 1 for p in split_of(head)["peers"]))
        tokens = body["usage"]["completion_tokens"]

        shown = subprocess.run(
            [sys.executable, "-m", "forge_cli", "chat", "--node", head.url, "--token",
             buyer["token"], "-v", "-n", "4", "--temperature", "0", "split me"],
            capture_output=True, text=True, cwd=REPO, env=forge_env(tmp_path / "buyer"),
            timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert split["head"]["layers"] == [0] and [p["layers"] for p in split["peers"]] == \
            [[1], [2]]  # as llama.cpp reported placing them (layer 2 is the output layer)
        assert "layers: head runs layers 0\n" in shown.stderr
        assert f"{ids[0][:12]}… at {peers_[0].url} runs layers 1 " in shown.stderr
        assert f"{ids[1][:12]}… at {peers_[1].url} runs layers output " in shown.stderr
        wait_for("the layer trades of forge chat",
                 lambda: all(p["trades"] == 2 for p in split_of(head)["peers"]))

    head_id = node_id(tmp_path / "head")
    head_trades = trades(tmp_path / "head")
    sold = [t["terms"] for t in head_trades if t["terms"]["provider"] == head_id]
    assert [(t["consumer"], t["completion_tokens"]) for t in sold] == \
        [(buyer["account"], tokens), (buyer["account"], 4)]
    from forge_cli.ledger.entries import trade_id

    for i, peer_id in enumerate(ids):
        bought = [t for t in head_trades if t["terms"]["consumer"] == head_id
                  and t["terms"]["provider"] == peer_id]
        # Every token the peer's layers ran is paid: the prompt's, then those generated.
        assert all(t["terms"]["prompt_tokens"] > 0 for t in bought)
        assert [t["terms"]["completion_tokens"] - t["terms"]["prompt_tokens"]
                for t in bought] == [tokens, 4]
        assert all(t["terms"]["price_ucu_per_token"] == len(split["peers"][i]["layers"]) * 20_000
                   for t in bought)
        in_peer = trades(tmp_path / f"peer{i}")  # the same dual-signed trades, in both ledgers
        assert [trade_id(t) for t in in_peer] == [trade_id(t) for t in bought]
    verified(tmp_path)


# -- a peer killed mid-generation ---------------------------------------------------------------

@needs_rpc
def test_peer_killed_mid_generation_fails_by_name_and_buyer_pays_what_it_got(tiny_gguf, unsplit,
                                                                             tmp_path):
    from forge_cli.ledger.entries import trade_cost

    with split_cluster(tmp_path, tiny_gguf) as ((victim, survivor), head):
        buyer = head.agent("buyer")
        victim_id = victim.health()["node_id"]
        text, error = stream_until(head, buyer["token"], 5,
                                   lambda: os.kill(victim.proc.pid, signal.SIGKILL))
        assert type(error).__name__ == "PeerLost"
        assert victim_id[:12] in str(error) and victim.url in str(error)
        assert 5 <= len(text) < 900

        # The buyer's trade is for the tokens it received (one byte token each), no more.
        head_id = node_id(tmp_path / "head")
        sold = wait_for("the buyer's partial trade", lambda: [
            t for t in trades(tmp_path / "head") if t["terms"]["provider"] == head_id])
        assert len(sold) == 1
        assert sold[0]["terms"]["completion_tokens"] == len(text.encode())
        assert sold[0]["terms"]["cu"] == trade_cost(len(text.encode()),
                                                    sold[0]["terms"]["price_ucu_per_token"])

        # The head reloads on the peer left, and serves again.
        after = wait_for("the reload without the lost peer",
                         lambda: (s := split_of(head))["loads"] == 2 and s)
        lost = {p["peer"]: p for p in after["peers"]}
        assert "closed its tunnel" in lost[victim_id]["lost"]
        assert lost[survivor.health()["node_id"]]["lost"] is None
        status, body = chat(head, buyer["token"])
        assert status == 200, body
        wait_for("the survivor's layer trades",
                 lambda: [p for p in split_of(head)["peers"] if p["lost"] is None][0]["trades"] == 2)

        # The last peer dies between requests: the head reloads at once and runs it all.
        os.kill(survivor.proc.pid, signal.SIGKILL)
        alone = wait_for("the reload on the head alone", lambda: (s := split_of(head))["loads"] == 3
                         and s)
        assert alone["head"]["layers"] == [0, 1, 2] and all(p["lost"] for p in alone["peers"])
        status, third = chat(head, buyer["token"])
        assert status == 200, third
        assert third["choices"][0]["message"]["content"] == unsplit

    paid = [t["terms"] for t in trades(tmp_path / "head") if t["terms"]["consumer"] == head_id]
    assert victim_id not in {t["provider"] for t in paid}
    assert sorted(t["completion_tokens"] - t["prompt_tokens"] for t in paid) == sorted(
        [len(text.encode()), body["usage"]["completion_tokens"]])
    verified(tmp_path)


@needs_rpc
def test_a_stalled_peer_is_named_and_the_head_goes_on_without_it(tiny_gguf, tmp_path):
    with split_cluster(tmp_path, tiny_gguf, stall_s=2) as ((_, stalled), head):
        buyer = head.agent("buyer")
        stalled_id = stalled.health()["node_id"]
        try:
            text, error = stream_until(head, buyer["token"], 5,
                                       lambda: os.kill(stalled.proc.pid, signal.SIGSTOP))
            assert type(error).__name__ == "PeerLost"
            assert f"{stalled_id[:12]}… at {stalled.url} stalled" in str(error)
            assert len(text) >= 5
            wait_for("the reload without the stalled peer", lambda: split_of(head)["loads"] == 2)
            status, body = chat(head, buyer["token"])
            assert status == 200, body
        finally:
            os.kill(stalled.proc.pid, signal.SIGCONT)


@needs_rpc
def test_split_auto_finds_the_layer_peers_on_the_mesh(tiny_gguf, unsplit, tmp_path):
    with split_cluster(tmp_path, tiny_gguf, "--mesh", split="auto") as (peers_, head):
        assert all("mDNS _forge._tcp.local. on 127.0.0.1" in "".join(p.lines) for p in peers_)
        assert {p["url"] for p in split_of(head)["peers"]} == {p.url for p in peers_}
        status, body = chat(head, head.agent("buyer")["token"])
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == unsplit


# -- split across network namespaces --------------------------------------------------------------

def _netns_unavailable() -> str | None:
    if sys.platform != "linux" or shutil.which("ip") is None:
        return "needs Linux with iproute2 (`ip`)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"forge-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this machine does not permit `ip netns add`: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture
def namespace() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (its name, its address)."""
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    ns, host_if, ns_if = f"forge-rpc-{os.getpid()}", f"fr{os.getpid() % 10**6}a", \
        f"fr{os.getpid() % 10**6}b"
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    steps = [["ip", "netns", "add", ns],
             ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
             ["ip", "link", "set", ns_if, "netns", ns],
             ["ip", "addr", "add", f"{net}.1/24", "dev", host_if],
             ["ip", "link", "set", host_if, "up"],
             ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", ns_if],
             ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
             ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True)
        yield ns, f"{net}.2"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@needs_rpc
def test_split_across_network_namespaces(tiny_gguf, unsplit, namespace, tmp_path):
    ns, address = namespace
    with split_cluster(tmp_path, tiny_gguf, "--host", address,
                       prefix=("ip", "netns", "exec", ns)) as (peers_, head):
        assert all(p.url.startswith(f"http://{address}:") for p in peers_)
        status, body = chat(head, head.agent("buyer")["token"])
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == unsplit
        assert all(p["tunnel_bytes_up"] > 0 for p in split_of(head)["peers"])
        wait_for("both layer trades", lambda: all(p["trades"] == 1 for p in split_of(head)["peers"]))
    verified(tmp_path)
