"""The network view on its own: real SQLite files, real keys, real signatures."""

from __future__ import annotations

import random

import pytest

from forge_cli.errors import TradeRejected
from forge_cli.identity import Identity
from forge_cli.ledger import merkle
from forge_cli.ledger.store import Ledger
from forge_cli.mesh.network import NetworkView
from tests.gossip_helpers import make_trade, sign


@pytest.fixture
def keys() -> tuple[Identity, Identity, Identity]:
    return Identity.generate(), Identity.generate(), Identity.generate()


def test_views_that_saw_the_same_trades_in_any_order_agree_on_the_root(tmp_path, keys):
    a, b, c = keys
    trades = [make_trade(a, b, tokens=i + 1) for i in range(7)] + [make_trade(b, c)]
    first, second = NetworkView.open(tmp_path / "1.db"), NetworkView.open(tmp_path / "2.db")
    assert first.add_many(trades, "peer") == ["accepted"] * 8
    shuffled = trades[:]
    random.Random(4).shuffle(shuffled)
    for trade in shuffled:
        second.add(trade, "other")
    assert first.count() == second.count() == 8
    assert first.root() == second.root() != merkle.root([])


def test_root_is_the_merkle_root_of_canonical_trades_sorted_by_trade_id(tmp_path, keys):
    import hashlib

    from forge_cli import canonical

    a, b, _ = keys
    trades = [make_trade(a, b, tokens=i + 1) for i in range(5)]
    view = NetworkView.open(tmp_path / "n.db")
    view.add_many(trades, "peer")
    raws = sorted((canonical.encode(t) for t in trades), key=lambda r: hashlib.sha256(r).digest())
    assert view.root() == merkle.root(raws)


def test_a_duplicate_is_reported_and_changes_nothing(tmp_path, keys):
    a, b, _ = keys
    trade = make_trade(a, b)
    view = NetworkView.open(tmp_path / "n.db")
    assert view.add(trade, "peer") == "accepted"
    root = view.root()
    assert view.add(trade, "another-peer") == "duplicate"
    assert view.count() == 1 and view.root() == root


def test_balance_is_earned_minus_spent_over_the_view(tmp_path, keys):
    a, b, c = keys
    view = NetworkView.open(tmp_path / "n.db")
    view.add_many([make_trade(a, b, tokens=10), make_trade(b, c, tokens=4),
                   make_trade(a, c, tokens=1)], "peer")
    assert (view.balance(a.node_id), view.balance(b.node_id), view.balance(c.node_id)) == (11, -6, -5)
    assert view.balance("f" * 64) == 0 and view.accounts() == 3


@pytest.mark.parametrize("case", ["forged provider", "forged consumer", "altered tokens",
                                  "cu off by one", "extra key", "float", "self trade"])
def test_malformed_or_forged_trades_are_rejected_and_nothing_is_added(tmp_path, keys, case):
    a, b, c = keys
    view = NetworkView.open(tmp_path / "n.db")
    view.add(make_trade(a, b), "peer")
    root = view.root()
    trade = make_trade(a, b, tokens=10)
    terms = dict(trade["terms"])
    if case == "forged provider":
        trade = {**sign(terms, c, b)}  # signed by c claiming to be a
        expected = "provider signature"
    elif case == "forged consumer":
        trade = {**sign(terms, a, c)}
        expected = "consumer signature"
    elif case == "altered tokens":  # tokens and cu changed together: the signatures break
        terms.update(completion_tokens=1000, cu=1000)
        trade = {**trade, "terms": terms}
        expected = "signature over the trade terms does not verify"
    elif case == "cu off by one":
        terms["cu"] += 1
        trade = sign(terms, a, b)  # validly signed, but the arithmetic is wrong
        expected = "terms.cu is 11 but 10 tokens"
    elif case == "extra key":
        trade = {**trade, "memo": "hi"}
        expected = "unexpected keys ['memo']"
    elif case == "float":
        terms["ts"] = 1.5
        trade = {**trade, "terms": terms}
        expected = "terms.ts must be a non-negative integer"
    else:
        terms["consumer"] = a.node_id
        trade = sign(terms, a, a)
        expected = "provider and consumer are the same account"
    with pytest.raises(TradeRejected, match=expected.replace("[", r"\[").replace("]", r"\]")):
        view.add(trade, "peer")
    assert view.count() == 1 and view.root() == root


def test_a_replayed_nonce_in_a_different_trade_is_rejected(tmp_path, keys):
    a, b, _ = keys
    view = NetworkView.open(tmp_path / "n.db")
    view.add(make_trade(a, b, nonce="nonce-0001"), "peer")
    root = view.root()
    with pytest.raises(TradeRejected, match="replayed nonce: consumer .* nonce 'nonce-0001'"):
        view.add(make_trade(a, b, tokens=99, nonce="nonce-0001"), "peer")
    assert view.count() == 1 and view.root() == root


def test_a_batch_reports_each_outcome_in_order(tmp_path, keys):
    a, b, c = keys
    good = make_trade(a, b)
    forged = sign(make_trade(a, b)["terms"], c, b)
    view = NetworkView.open(tmp_path / "n.db")
    outcomes = view.add_many([good, forged, good, "not a trade"], "peer")
    assert outcomes[0] == "accepted" and outcomes[2] == "duplicate"
    assert isinstance(outcomes[1], TradeRejected) and "provider signature" in str(outcomes[1])
    assert isinstance(outcomes[3], TradeRejected) and "found str" in str(outcomes[3])


def test_since_pages_in_arrival_order_and_skips_what_a_peer_sent(tmp_path, keys):
    a, b, _ = keys
    view = NetworkView.open(tmp_path / "n.db")
    mine = [make_trade(a, b) for _ in range(3)]
    theirs = [make_trade(b, a) for _ in range(2)]
    view.add_many(mine[:2], "ledger")
    view.add_many(theirs, "peer-x")
    view.add(mine[2], "ledger")
    page, after = view.since(0, 3)
    assert after == 3 and len(page) == 3
    rest, end = view.since(after, 100)
    assert end == 5 and len(rest) == 2 and view.since(end, 10) == ([], 5)
    pending, after = view.pending_for(0, "peer-x", 100)
    assert after == 5 and len(pending) == 3  # what peer-x sent is not pushed back to it


def test_own_ledger_trades_are_backfilled_then_followed(tmp_path, keys):
    a, b, _ = keys
    ledger = Ledger.open_writer(tmp_path / "ledger.db", a)
    ledger.append("grant", {"account": b.node_id, "cu": 1000})
    ledger.append("trade", make_trade(a, b))
    view = NetworkView.open(tmp_path / "n.db")
    view.follow(ledger)
    assert view.count() == 1
    ledger.append("note", {"text": "not a trade"})
    ledger.append("trade", make_trade(a, b, tokens=3))
    assert view.count() == 2 and view.summary()["own_trades"] == 2
    ledger.close()
    view.close()
    # Reopened: only what the ledger gained since is read again.
    ledger = Ledger.open_writer(tmp_path / "ledger.db", a)
    ledger.append("trade", make_trade(a, b, tokens=4))
    view = NetworkView.open(tmp_path / "n.db")
    assert view.backfill(ledger) == 1 and view.count() == 3
    ledger.close()


def test_peer_state_and_flags_survive_reopening(tmp_path):
    view = NetworkView.open(tmp_path / "n.db")
    view.set_cursor("p1", 42)
    view.save_checkpoint("p1", 9, b"\x01" * 32, "note")
    view.flag("p2", "log fork: checkpoint 3 is smaller than checkpoint 9 seen earlier")
    view.close()
    view = NetworkView.open(tmp_path / "n.db")
    state = view.peer("p1")
    assert (state.cursor, state.cp_size, state.cp_root, state.flag) == (42, 9, b"\x01" * 32, None)
    assert view.flags() == {"p2": "log fork: checkpoint 3 is smaller than checkpoint 9 seen earlier"}
    assert view.summary()["flagged_peers"][0]["node_id"] == "p2"


def test_a_large_batch_verified_on_every_core_keeps_each_outcome_in_place(tmp_path, keys):
    provider, consumer, forger = keys
    batch = [make_trade(provider, consumer) for _ in range(101)]
    forged_provider, forged_consumer = (3, 77, 100), (0, 50)  # spread over every part
    for i in forged_provider:
        batch[i] = sign(batch[i]["terms"], forger, consumer)
    for i in forged_consumer:
        batch[i] = sign(batch[i]["terms"], provider, forger)
    view = NetworkView.open(tmp_path / "view.db")
    outcomes = view.add_many(batch, "peer")
    assert view.count() == 96
    view.close()
    for i, outcome in enumerate(outcomes):
        if i in forged_provider + forged_consumer:
            assert isinstance(outcome, TradeRejected) and outcome.forged
            party = "provider" if i in forged_provider else "consumer"
            assert f"{party} signature" in str(outcome)
        else:
            assert outcome == "accepted"
