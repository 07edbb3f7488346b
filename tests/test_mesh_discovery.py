"""Mesh discovery with real nodes: zeroconf bound to 127.0.0.1 only, /health probes, expiry,
static peers, duplicate node ids, and `forge peers`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, forge_env
from tests.mesh_helpers import wait_for
from tests.node_harness import NodeProcess

DISCOVERY_WAIT_S = 20
# Short probe and expiry so a vanished peer leaves the table within seconds.
FAST = {"FORGE_MESH_INTERFACES": "127.0.0.1", "FORGE_MESH_PROBE_S": "1", "FORGE_MESH_EXPIRE_S": "2"}


def peers_of(node: NodeProcess) -> list[dict[str, Any]]:
    status, _, body = node.request("GET", "/v1/forge/peers", token=node.operator_token)
    assert status == 200, body
    return body["peers"]


def node_id(node: NodeProcess) -> str:
    return node.request("GET", "/health")[2]["node_id"]


def peer(node: NodeProcess, other: NodeProcess) -> dict[str, Any] | None:
    return next((p for p in peers_of(node) if p["url"] == other.url), None)


@pytest.fixture
def nodes(tmp_path: Path, tiny_gguf: Path) -> Iterator[Callable[..., NodeProcess]]:
    with ExitStack() as stack:
        def start(name: str, *extra: str, env: dict[str, str] | None = None,
                  home: Path | None = None) -> NodeProcess:
            return stack.enter_context(NodeProcess(home or tmp_path / name, tiny_gguf, *extra,
                                                   env={**FAST, **(env or {})},
                                                   log=tmp_path / f"{name}.log"))
        yield start


def test_three_nodes_discover_each_other_and_drop_stopped_ones(nodes, tmp_path):
    a, b, c = (nodes(name, "--mesh") for name in "abc")
    for node in (a, b, c):
        others = [o for o in (a, b, c) if o is not node]
        wait_for(f"{node.url} finding its two peers",
                 lambda node=node, others=others: all(peer(node, o) for o in others))

    seen = peer(a, b)
    assert seen["node_id"] == node_id(b)
    assert seen["source"] == "mdns" and seen["flagged"] is False
    assert [m["name"] for m in seen["models"]] == ["tiny-llama.gguf"]
    assert len(seen["models"][0]["sha256"]) == 16
    probe_ms = seen["latency_ms"]  # present and sane; its size is the bench's business
    assert seen["price_ucu_per_token"] > 0 and probe_ms >= 0
    assert seen["reputation"] is not None and seen["last_seen_ms"] > 0

    status, _, body = a.request("GET", "/v1/forge/providers", token=a.operator_token)
    assert status == 200
    remote = {p["node_id"] for p in body["providers"] if not p["local"]}
    assert {node_id(b), node_id(c)} <= remote
    assert [p["node_id"] for p in body["providers"] if p["local"]] == [node_id(a)]

    # Killed without a goodbye: the others notice only because /health stops answering.
    c.stop(signal.SIGKILL)
    for node in (a, b):
        wait_for(f"{node.url} dropping the killed peer", lambda node=node: peer(node, c) is None)
    # Stopped cleanly: it withdraws its advertisement and leaves the table.
    b.stop()
    wait_for("a dropping the stopped peer", lambda: peer(a, b) is None)


def mesh_banner_line(node: NodeProcess) -> str:
    """The `mesh` line of the start-up banner (the lines after "listening on" are bounded)."""
    assert node.proc.stdout is not None
    for _ in range(6):
        line = node.proc.stdout.readline()
        if line.strip().startswith("mesh "):
            return line
    pytest.fail("the banner has no mesh line")


def test_node_prints_the_interfaces_its_mesh_uses(nodes):
    line = mesh_banner_line(nodes("a", "--mesh"))
    assert "_forge._tcp.local. on 127.0.0.1" in line


def test_static_peer_is_probed_with_mdns_off(nodes):
    off = {"FORGE_MESH_MDNS": "false"}
    a = nodes("a", "--mesh", env=off)
    b = nodes("b", "--mesh", "--peer", a.url, env=off)
    seen = wait_for("b probing its static peer", lambda: peer(b, a))
    assert seen["source"] == "static" and seen["node_id"] == node_id(a)
    assert seen["models"][0]["name"] == "tiny-llama.gguf" and seen["price_ucu_per_token"] > 0
    # Without mDNS, a has no way to learn of b: its table stays empty.
    assert peers_of(a) == []


def test_copied_forge_home_is_flagged_as_a_duplicate_node_id(nodes, tmp_path):
    a = nodes("a", "--mesh")
    copy = tmp_path / "copy"
    shutil.copytree(a.home, copy, ignore=shutil.ignore_patterns("ledger.db*", "node.url"))
    twin = nodes("copy", "--mesh", home=copy)
    assert node_id(twin) == node_id(a)
    flagged = wait_for("a flagging its twin", lambda: (p := peer(a, twin)) and p["flagged"] and p)
    assert "duplicate node id" in flagged["flag_reason"]
    log = (tmp_path / "a.log").read_text()
    assert "DUPLICATE NODE ID" in log
    # A twin is not offered as a provider: its trades could not be told apart from ours.
    body = a.request("GET", "/v1/forge/providers", token=a.operator_token)[2]
    assert all(p.get("url") != twin.url for p in body["providers"])


def test_forge_peers_lists_the_running_nodes_peers(nodes):
    a, b = nodes("a", "--mesh"), nodes("b", "--mesh")
    wait_for("a finding b", lambda: peer(a, b))
    run = [sys.executable, "-m", "forge_cli", "peers"]
    done = subprocess.run([*run, "--json"], capture_output=True, text=True, cwd=REPO,
                          env=forge_env(a.home), timeout=60)
    assert done.returncode == 0, done.stderr
    listed = {p["url"]: p for p in json.loads(done.stdout)}
    assert listed[b.url]["node_id"] == node_id(b)
    text = subprocess.run(run, capture_output=True, text=True, cwd=REPO, env=forge_env(a.home),
                          timeout=60)
    assert text.returncode == 0 and b.url in text.stdout and node_id(b)[:16] in text.stdout


def test_peers_is_404_when_the_node_runs_without_mesh(nodes):
    a = nodes("a")
    status, _, body = a.request("GET", "/v1/forge/peers", token=a.operator_token)
    assert status == 404
    assert body["error"]["message"].startswith("mesh is not running on this node")
    done = subprocess.run([sys.executable, "-m", "forge_cli", "peers"], capture_output=True,
                          text=True, cwd=REPO, env=forge_env(a.home), timeout=60)
    assert done.returncode == 2 and "mesh is not running on this node" in done.stderr
    assert "off" in mesh_banner_line(a)
