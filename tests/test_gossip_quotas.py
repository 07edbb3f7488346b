"""Hole 6: gossip takes bounded input. A real node on loopback, pushed to from several loopback
addresses (127.0.0.2, .3, …: Linux routes all of 127/8 to `lo`), each its own source."""

from __future__ import annotations

import http.client
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forge_cli.identity import Identity
from forge_cli.mesh.network import MAX_ACCOUNT_TOTAL, NetworkView
from tests.gossip_helpers import make_trade
from tests.node_harness import NodeProcess

GOSSIP = "/v1/forge/gossip/trades"
QUOTAS = {"FORGE_MESH_INTERFACES": "127.0.0.1", "FORGE_MESH_MDNS": "false",
          "FORGE_MESH_GOSSIP_SOURCE_QUOTA": "50", "FORGE_MESH_GOSSIP_MAX_TRADES": "120"}


@pytest.fixture
def node(tmp_path: Path, tiny_gguf: Path) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path / "n", tiny_gguf, "--mesh", env=QUOTAS,
                     log=tmp_path / "n.log") as running:
        yield running


def push_from(node: NodeProcess, address: str, trades: list[Any], sender: str = "a" * 64
              ) -> tuple[int, dict[str, Any]]:
    """POST a gossip batch from `address` (a loopback address of this machine)."""
    host, port = node.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(address, 0))
    try:
        conn.request("POST", GOSSIP, json.dumps({"from": sender, "trades": trades}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def batch(count: int) -> list[dict[str, Any]]:
    provider, consumer = Identity.generate(), Identity.generate()
    return [make_trade(provider, consumer, tokens=i + 1) for i in range(count)]


def network(node: NodeProcess) -> dict[str, Any]:
    status, _, body = node.request("GET", "/v1/forge/network", token=node.operator_token)
    assert status == 200, body
    return body


def refused_metric(node: NodeProcess, reason: str) -> float:
    status, _, text = node.request("GET", "/metrics")
    assert status == 200, text
    for line in text.splitlines():
        if line.startswith(f'forge_gossip_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_one_source_and_all_sources_together_are_held_to_their_quotas(node):
    status, first = push_from(node, "127.0.0.2", batch(30))
    assert status == 200 and first["accepted"] == 30, first
    # The source's quota (50) takes 20 more; the other 10 are refused, saying why.
    status, second = push_from(node, "127.0.0.2", batch(30))
    assert status == 200 and (second["accepted"], second["rejected"]) == (20, 10), second
    assert all("quota" in r["reason"] for r in second["rejections"]), second["rejections"]
    # With nothing left, the whole batch is refused with 429 and the JSON envelope.
    status, third = push_from(node, "127.0.0.2", batch(5))
    assert status == 429 and third["error"]["code"] == "GossipQuota", third
    assert "127.0.0.2" in third["error"]["message"]
    # Claiming another sender changes nothing: `from` is trusted for nothing.
    status, lying = push_from(node, "127.0.0.2", batch(5), sender="b" * 64)
    assert status == 429, lying

    # Another address has a quota of its own ...
    status, other = push_from(node, "127.0.0.3", batch(40))
    assert status == 200 and other["accepted"] == 40, other
    # Past the most foreign trades the view keeps (120 = 50 + 40 + 30), a new trade evicts
    # the lowest-trust one (here every key is a stranger: the oldest) instead of being
    # refused, so a flood cannot lock new trades out (tests/test_trust_flood.py).
    status, fourth = push_from(node, "127.0.0.4", batch(45))
    assert status == 200 and (fourth["accepted"], fourth["rejected"]) == (45, 0), fourth
    status, more = push_from(node, "127.0.0.5", batch(1))
    assert status == 200 and more["accepted"] == 1, more

    view = network(node)
    assert view["foreign_trades"] == 120 and view["trades"] == 120 and view["evicted"] == 16
    assert refused_metric(node, "source_quota") == 10 + 5 + 5
    assert refused_metric(node, "total_quota") == 0

    # The node's own trades are never refused: a purchase still lands in its view.
    alice = node.agent("alice")
    status, _, reply = node.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, token=alice["token"])
    assert status == 200 and reply["x_forge"]["trade_seq"] is not None, reply
    assert network(node)["own_trades"] == 1


def test_amounts_beyond_2_to_the_53_are_refused_before_anything_is_stored(node):
    provider, consumer = Identity.generate(), Identity.generate()
    huge = make_trade(provider, consumer, tokens=2**63 - 1, price=1_000_000)  # cu = 2^63 − 1
    over = make_trade(provider, consumer, tokens=2**53 + 1, price=1_000_000)
    pricey = make_trade(provider, consumer, tokens=1, price=2**60)
    edge = make_trade(provider, consumer, tokens=2**53, price=1_000_000)  # cu = 2^53: allowed
    status, answer = push_from(node, "127.0.0.2", [huge, over, pricey, edge])
    assert status == 200, answer
    assert (answer["accepted"], answer["rejected"]) == (1, 3), answer
    assert all("2^53" in r["reason"] for r in answer["rejections"]), answer["rejections"]
    assert refused_metric(node, "invalid") == 3
    view = network(node)
    assert view["trades"] == 1
    with sqlite3.connect(f"file:{node.home / 'network.db'}?mode=ro", uri=True) as db:
        stored = db.execute("SELECT typeof(cu), cu FROM trades").fetchall()
        totals = db.execute("SELECT typeof(earned), earned FROM accounts WHERE account = ?",
                            (provider.node_id,)).fetchall()
    assert stored == [("integer", 2**53)] and totals == [("integer", 2**53)]


def test_from_names_no_one_the_node_trusts(node):
    status, answer = push_from(node, "127.0.0.2", batch(2), sender="ledger")
    assert status == 200 and answer["accepted"] == 2, answer
    view = network(node)
    assert (view["own_trades"], view["foreign_trades"]) == (0, 2)


def test_account_totals_stay_exact_integers(tmp_path: Path):
    view = NetworkView.open(tmp_path / "network.db")
    provider = Identity.generate()
    per_trade = 2**53
    room = MAX_ACCOUNT_TOTAL // per_trade
    trades = [make_trade(provider, Identity.generate(), tokens=per_trade) for _ in range(room + 2)]
    outcomes = view.add_many(trades, "a" * 64)
    assert outcomes[:room] == ["accepted"] * room
    assert all("total" in str(o) for o in outcomes[room:]), outcomes[room:]
    assert view.balance(provider.node_id) == room * per_trade
    assert isinstance(view.balance(provider.node_id), int)
    view.close()
