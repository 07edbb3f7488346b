"""Trust over the trade graph (forge_cli.mesh.trust): EigenTrust that a sybil clique cannot climb,
the three collusion heuristics, and Reputation read off a real network view of real trades."""

from __future__ import annotations

import random
import time

import pytest

from forge_cli.identity import Identity
from forge_cli.mesh import trust
from forge_cli.mesh.network import NetworkView
from tests.gossip_helpers import make_trade

NOW = 1_750_000_000_000
HOUR = 3_600_000


def test_a_clique_that_trades_only_inside_itself_earns_nothing():
    honest = [("me", "a", 10), ("a", "b", 10), ("b", "c", 5)]
    sybils = [(f"s{i}", f"s{(i + 1) % 20}", 10_000) for i in range(20)] * 50
    scores = trust.eigentrust(honest + sybils, {"a": 1.0})
    assert all(scores[f"s{i}"] == 0.0 for i in range(20))
    assert sum(scores.values()) == pytest.approx(1.0)
    assert min(scores["a"], scores["b"], scores["c"]) > 0
    assert scores["me"] == 0.0  # it only bought: buying vouches for a seller, never for a buyer


def test_a_sybil_clique_that_traded_once_with_a_real_peer_earns_little():
    """One 1-CU purchase a real peer made from the clique carries in only that purchase's
    share of the peer's trust: the whole clique of 50, washing a million CU among itself,
    stays far below the real peers."""
    rng = random.Random(1)
    real = [f"r{i}" for i in range(10)]
    honest = [(rng.choice(real), rng.choice(real), rng.randint(5, 50)) for _ in range(300)]
    honest = [e for e in honest if e[0] != e[1]]
    sybils = [f"s{i}" for i in range(50)]
    wash = [(a, b, 1_000) for a in sybils for b in sybils if a != b]
    bridge = [("r3", "s0", 1)]
    scores = trust.eigentrust(honest + wash + bridge, {r: 1.0 for r in real[:3]})
    clique = sum(scores[s] for s in sybils)
    assert 0 < clique < 0.05
    assert max(scores[s] for s in sybils) < min(scores[r] for r in real) / 5


def test_sybils_that_buy_from_real_peers_earn_nothing_by_it():
    """Buying is no vouch for the buyer: a clique whose every member buys from real sellers
    (paying them real CU) and washes among itself still holds exactly 0."""
    rng = random.Random(2)
    real = [f"r{i}" for i in range(10)]
    honest = [(rng.choice(real), rng.choice(real), rng.randint(5, 50)) for _ in range(300)]
    sybils = [f"s{i}" for i in range(20)]
    wash = [(a, b, 1_000) for a in sybils for b in sybils if a != b]
    buys = [(s, rng.choice(real), 500) for s in sybils]
    scores = trust.eigentrust(honest + wash + buys, {r: 1.0 for r in real[:3]})
    assert all(scores[s] == 0.0 for s in sybils)
    assert min(scores[r] for r in real) > 0


@pytest.mark.parametrize("pretrusted", [{}, {"a": 0.0}, {"a": float("nan")}, {"zz": -3.0}])
def test_no_positive_pretrust_gives_everyone_zero(pretrusted):
    scores = trust.eigentrust([("a", "b", 5)], pretrusted)
    assert set(scores) >= {"a", "b"} and all(v == 0.0 for v in scores.values())


def test_self_trades_zero_cu_and_an_empty_graph_are_harmless():
    assert trust.eigentrust([], {}) == {}
    scores = trust.eigentrust([("a", "a", 100), ("a", "b", 0)], {"a": 1.0})
    assert scores["a"] == pytest.approx(1.0) and scores["b"] == 0.0


def test_eigentrust_over_200k_trades_takes_well_under_ten_seconds():
    rng = random.Random(2)
    keys = [f"k{i}" for i in range(5_000)]
    edges = [(rng.choice(keys), rng.choice(keys), rng.randint(1, 100)) for _ in range(200_000)]
    started = time.monotonic()
    scores = trust.eigentrust(edges, {k: 1.0 for k in keys[:20]})
    assert sum(scores.values()) == pytest.approx(1.0)
    assert time.monotonic() - started < 10  # a loose bound: O(edges × rounds), vectorised


# -- collusion ------------------------------------------------------------------------------

def spread(pairs, hours, cu=10):
    """Trades for each (consumer, provider) pair, one every `hours` hour(s) back from NOW."""
    return [(c, p, cu, NOW - h * HOUR - 1) for h in hours for c, p in pairs]


def test_fewer_than_ten_trades_are_never_judged():
    trades = spread([("a", "b")], range(9))
    found = trust.collusion(trades, "a", NOW)
    assert found.trades == 9 and found.penalty_bp == 0 and found.flags == []


def test_one_counterparty_is_a_tight_cluster():
    found = trust.collusion(spread([("a", "b")], range(12)), "a", NOW)
    assert found.tight_cluster and found.tight_cluster_share == 1.0
    assert found.penalty_bp == trust.MAX_PENALTY_BP


def test_every_hour_the_same_cu_is_uniform_volume_and_bursts_are_not():
    partners = [("a", f"p{i}") for i in range(24)]
    steady = [(c, p, 10, NOW - i * HOUR - 1) for i, (c, p) in enumerate(partners)]
    found = trust.collusion(steady, "a", NOW)
    assert found.volume_cv == 0.0 and found.volume_uniform and not found.tight_cluster
    bursty = [(c, p, 10, NOW - (i % 3) * HOUR - 1) for i, (c, p) in enumerate(partners)]
    found = trust.collusion(bursty, "a", NOW)
    assert not found.volume_uniform and found.penalty_bp == 0


def test_a_closed_ring_of_three_is_round_robin_but_the_trusted_mesh_is_not():
    ring = [("a", "b"), ("b", "c"), ("c", "a")]
    found = trust.collusion(spread(ring, range(0, 24, 5)), "a", NOW)
    assert found.round_robin_size == 3 and found.round_robin_closedness == 1.0
    assert found.round_robin
    # Holding a key this node trades with, the same shape is the mesh trading inside itself.
    mesh = trust.collusion(spread(ring, range(0, 24, 5)), "a", NOW, trusted={"c"})
    assert mesh.round_robin_size == 3 and not mesh.round_robin


def test_trades_outside_the_window_and_self_trades_do_not_count():
    old = [("a", "b", 10, NOW - 25 * HOUR)] * 30
    future = [("a", "b", 10, NOW + HOUR)] * 30
    selfish = [("a", "a", 10, NOW - 1)] * 30
    assert trust.collusion(old + future + selfish, "a", NOW).trades == 0


def test_collusion_to_json_is_plain_and_names_each_heuristic():
    found = trust.collusion(spread([("a", "b")], range(12)), "a", NOW).to_json()
    assert found["tight_cluster"]["fired"] and found["penalty_bp"] == 5_000
    assert set(found) >= {"volume_uniformity", "round_robin", "flags", "trades_in_window"}


def test_a_long_chain_does_not_overflow_the_stack():
    chain = [(f"k{i + 1}", f"k{i}", 1, NOW - 1) for i in range(50_000)]
    assert trust.collusion(chain, "k0", NOW).round_robin_size == 0


# -- Reputation over a real network view ---------------------------------------------------

def test_reputation_reads_the_view_and_ranks_wash_traders_last(tmp_path):
    me, a, b = Identity.generate(), Identity.generate(), Identity.generate()
    x, y = Identity.generate(), Identity.generate()
    view = NetworkView.open(tmp_path / "n.db")
    # a sold to me, b sold to a (and bought from me): both served someone trusted here.
    view.add_many([make_trade(a, me), make_trade(me, b), make_trade(b, a)], "peer")
    view.add_many([make_trade(x, y, tokens=500) for _ in range(15)], "peer")
    rep = trust.Reputation(view, me.node_id)
    rep.refresh()
    assert rep.trust_bp(x.node_id) == rep.trust_bp(y.node_id) == 0
    assert rep.trust_bp(a.node_id) > 0 and rep.trust_bp(b.node_id) > 0
    assert rep.collusion(x.node_id).tight_cluster
    ranked = rep.ranked()
    assert [k for k, _ in ranked[:2]] == sorted([a.node_id, b.node_id],
                                                  key=lambda k: -rep.effective_bp(k))
    assert {k for k, _ in ranked[2:]} == {x.node_id, y.node_id}
    assert me.node_id not in dict(ranked)
    view.close()


def test_local_reputation_is_lifted_by_graph_trust_and_never_by_wash_trades(tmp_path):
    me, a, x, y = (Identity.generate() for _ in range(4))
    view = NetworkView.open(tmp_path / "n.db")
    view.add_many([make_trade(a, me)] + [make_trade(x, y) for _ in range(3)], "peer")
    rep = trust.Reputation(view, me.node_id, local=lambda key: 5_000)
    rep.refresh()
    assert rep.trust_bp(x.node_id) == 5_000  # a newcomer's, whatever it traded
    assert rep.trust_bp(a.node_id) == 7_500  # the average pretrusted peer: 5000 × 1.5
    view.close()


def test_a_dispute_upheld_here_lowers_pretrust_and_audits_passed_raise_it(tmp_path):
    me, a, b = Identity.generate(), Identity.generate(), Identity.generate()
    view = NetworkView.open(tmp_path / "n.db")
    view.add_many([make_trade(a, me), make_trade(b, me)], "peer")
    rep = trust.Reputation(view, me.node_id, audits=lambda: {a.node_id: (3, 0),
                                                             b.node_id: (0, 2)})
    rep.refresh()
    assert rep.graph_bp(a.node_id) > rep.graph_bp(b.node_id) > 0
    view.close()
