"""Issue 22's wash-trade flood against a real `forge node --mesh` on loopback: 10,000 trades
among 50 sybil keys, pushed from 50 loopback addresses (127.0.0.2…: Linux routes all of 127/8
to `lo`, so each is a source of its own) into a view capped at 5,000 foreign trades.

The node's ledger is written before it starts, with real signatures: purchases it made from
eight real peers (its pretrust). Four more real peers trade only with those eight, by gossip.
Afterwards a real peer's new trade is still accepted, the top five by effective reputation
are the five they were, and every wash key ranks below every real peer.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forge_cli.identity import KEY_FILE, Identity, write_new_key
from forge_cli.ledger.store import Ledger
from tests.gossip_helpers import make_trade
from tests.node_harness import NodeProcess

GOSSIP = "/v1/forge/gossip/trades"
CAP = 5_000
SYBILS, WASH = 50, 10_000
ENV = {"FORGE_MESH_INTERFACES": "127.0.0.1", "FORGE_MESH_MDNS": "false",
       "FORGE_MESH_GOSSIP_MAX_TRADES": str(CAP), "FORGE_MESH_TRUST_S": "1"}


@pytest.fixture
def world(tmp_path: Path, tiny_gguf: Path) -> Iterator[dict[str, Any]]:
    home = tmp_path / "hub"
    home.mkdir()
    hub = Identity.generate()
    write_new_key(home / KEY_FILE, hub)
    direct = [Identity.generate() for _ in range(8)]  # peers the hub bought from
    further = [Identity.generate() for _ in range(4)]  # they trade only with `direct`
    with Ledger.open_writer(home / "ledger.db", hub) as book:
        book.append("grant", {"account": hub.node_id, "cu": 1_000_000})
        for i, peer in enumerate(direct):  # more purchases from the first: a clear order
            for n in range(12 - i):
                book.append("trade", make_trade(peer, hub, tokens=5 + n))
    with NodeProcess(home, tiny_gguf, "--mesh", env=ENV, log=tmp_path / "hub.log") as node:
        yield {"node": node, "hub": hub, "direct": direct, "further": further}


def push_from(node: NodeProcess, address: str, trades: list[Any]) -> tuple[int, dict[str, Any]]:
    host, port = node.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120, source_address=(address, 0))
    try:
        conn.request("POST", GOSSIP, json.dumps({"from": "a" * 64, "trades": trades}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def standing(node: NodeProcess, key: str, after_ms: int) -> dict[str, Any]:
    """The node's trust record of `key`, computed from a view read after `after_ms` (the
    node recomputes in the background at most every mesh.trust_s, 1 s here; bounded wait)."""
    deadline = time.monotonic() + 90
    while True:
        status, _, body = node.request("GET", f"/v1/forge/collusion/{key}",
                                       token=node.operator_token)
        assert status == 200, body
        if body["computed_ms"] >= after_ms or time.monotonic() > deadline:
            assert body["computed_ms"] >= after_ms, "trust was not recomputed within 90 s"
            return body
        time.sleep(0.5)


def ranking(node: NodeProcess, keys: list[str]) -> list[tuple[str, int]]:
    after = time.time_ns() // 1_000_000
    scored = [(k, standing(node, k, after)["effective_bp"]) for k in keys]
    return sorted(scored, key=lambda kv: (-kv[1], kv[0]))


def test_a_wash_trade_flood_neither_crowds_out_real_trades_nor_buys_reputation(world):
    node, direct, further = world["node"], world["direct"], world["further"]
    # Real peers trade with each other, and the four further ones with the eight.
    real = [make_trade(direct[i % 8], direct[(i + 3) % 8], tokens=10 + i) for i in range(16)]
    real += [make_trade(f, direct[j], tokens=20) for j, f in enumerate(further)]
    real += [make_trade(direct[(j + 4) % 8], f, tokens=15) for j, f in enumerate(further)]
    status, answer = push_from(node, "127.0.0.70", real)
    assert status == 200 and answer["accepted"] == len(real), answer
    real_keys = [p.node_id for p in direct + further]
    before = ranking(node, real_keys)

    # The flood: 50 sybils in a ring, each selling to the next three, 200 trades from each
    # of 50 addresses.
    sybils = [Identity.generate() for _ in range(SYBILS)]
    wash = [make_trade(sybils[i % SYBILS], sybils[(i + 1 + (i // SYBILS) % 3) % SYBILS],
                       tokens=1_000) for i in range(WASH)]
    per = WASH // SYBILS
    for n in range(SYBILS):
        status, answer = push_from(node, f"127.0.1.{n + 1}", wash[n * per:(n + 1) * per])
        assert status == 200 and answer["accepted"] == per, answer  # junk evicts junk
    status, _, view = node.request("GET", "/v1/forge/network", token=node.operator_token)
    assert view["foreign_trades"] == CAP, view
    # The flood moved no real peer: the top five are the five they were, in their order.
    flooded = ranking(node, real_keys)
    assert [k for k, _ in flooded[:5]] == [k for k, _ in before[:5]], (before, flooded)

    # A real peer's new trade is taken, and none of the real trades was evicted for junk.
    fresh = make_trade(direct[0], further[1], tokens=7)
    status, answer = push_from(node, "127.0.0.71", [fresh])
    assert status == 200 and answer["accepted"] == 1, answer
    status, answer = push_from(node, "127.0.0.72", real)
    assert status == 200 and answer["duplicate"] == len(real), answer

    after = ranking(node, real_keys)
    # (the new real trade may reorder close peers: it is new evidence, as it should be)
    assert {k for k, _ in after[:5]} == {k for k, _ in before[:5]}
    worst_real = min(bp for _, bp in after)
    washers = [standing(node, s.node_id, 0) for s in sybils]
    assert all(w["effective_bp"] < worst_real for w in washers), (worst_real, washers[:2])
    assert all(w["graph_bp"] == 0 and w["round_robin"]["fired"] for w in washers)


@pytest.mark.parametrize("key,status", [("zz" * 32, 400), ("AB" * 32, 400), ("ab" * 31, 400),
                                        ("ab" * 33, 400), ("%00" * 3, 400),
                                        ("ab" * 32, 404)])
def test_the_collusion_route_refuses_malformed_ids_and_unknown_keys(world, key, status):
    node = world["node"]
    got, _, body = node.request("GET", f"/v1/forge/collusion/{key}", token=node.operator_token)
    assert got == status and body["error"]["message"], body


def test_the_collusion_route_answers_for_a_pretrusted_peer(world):
    node, peer = world["node"], world["direct"][0]
    status, _, body = node.request("GET", f"/v1/forge/collusion/{peer.node_id}",
                                   token=node.operator_token)
    assert status == 200 and body["graph_bp"] > 0 and body["trust_bp"] > 5_000, body
    status, _, text = node.request("GET", "/metrics")
    assert f'forge_trust_bp{{node_id="{peer.node_id}"}}' in text
