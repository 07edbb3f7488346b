"""A seeded soak of random hang-ups over the P2P and forwarding paths (issue 19): after it,
`forge ledger verify --deep` exits 0 in every ledger, and every token a client received is in
a trade or an `unsettled` entry (counted per sale, by nonce where the client holds one).

Bounded in rounds and in time; FORGE_SOAK_SEED and FORGE_SOAK_ROUNDS replay or widen it."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from forge_cli.ledger import entries
from tests.hangup_helpers import P2PConsumer, outcome, stream_chat
from tests.mesh_helpers import MESH_ENV, entries_of, wait_for
from tests.node_harness import NodeProcess
from tests.test_hangups import SELLER_ENV, verify_deep

SEED = int(os.environ.get("FORGE_SOAK_SEED", "19"))
ROUNDS = int(os.environ.get("FORGE_SOAK_ROUNDS", "14"))
BUDGET_S = 150  # no new round starts after this


def _hang_up(rng: random.Random, max_tokens: int) -> int | str:
    return rng.choice([rng.randint(1, max_tokens), rng.randint(1, 3), "last", "terms",
                       "settle"])


def test_random_hang_ups_leave_every_delivered_token_on_a_record(tmp_path: Path, tiny_gguf):
    rng = random.Random(SEED)
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a = NodeProcess(a_home, tiny_gguf, "--mesh", env=SELLER_ENV, log=tmp_path / "a.log")
    received = recorded = 0
    log: list[str] = []
    with a:
        other = tmp_path / "other.gguf"
        shutil.copy(tiny_gguf, other)
        with NodeProcess(b_home, other, "--mesh", "--peer", a.url,
                         env={**MESH_ENV, "FORGE_MESH_MDNS": "false"},
                         log=tmp_path / "b.log") as b:
            wait_for("b sees a", lambda: any(p["url"] == a.url for p in b.request(
                "GET", "/v1/forge/peers", token=b.operator_token)[2]["peers"]))
            b_id = b.request("GET", "/health")[2]["node_id"]
            deadline = time.monotonic() + BUDGET_S
            for round_ in range(ROUNDS):
                if time.monotonic() > deadline:
                    break
                where = f"seed {SEED} round {round_}"
                if rng.random() < 0.5:  # a stranger buys from a directly
                    max_tokens = rng.randint(4, 300)
                    hang_up = _hang_up(rng, max_tokens)
                    got = P2PConsumer(a).buy(max_tokens, hang_up)
                    log.append(f"{where}: p2p {max_tokens} {hang_up!r} → {got.tokens}")
                    assert got.status == 200, (where, got.error)
                    kind, entry = wait_for(f"{where}: a's record of the sale",
                                           lambda got=got: outcome(a_home, got.nonce))
                    terms = entry.data["terms"]
                    assert kind == ("trade" if hang_up == "settle" else "unsettled"), where
                    if isinstance(hang_up, int) and got.tokens < max_tokens:
                        assert got.tokens <= terms["completion_tokens"], (where, terms)
                    else:  # it read the whole reply: exactly that is on the record
                        assert terms["completion_tokens"] == got.tokens == max_tokens, where
                    received += got.tokens
                    recorded += terms["completion_tokens"]
                else:  # an agent on b streams a's model, which b buys from a
                    max_tokens = rng.randint(4, 40)
                    hang_up = rng.choice([rng.randint(1, max_tokens), "last", "settle"])
                    alice = b.agent(f"agent{round_}")
                    before = len(_records_of(a_home, b_id))
                    got = stream_chat(b, alice["token"], tiny_gguf.name, max_tokens, hang_up)
                    log.append(f"{where}: forward {max_tokens} {hang_up!r} → {got.tokens}")
                    assert got.status == 200, (where, got.error)
                    local = wait_for(f"{where}: b charges its agent", lambda alice=alice: next(
                        (e for e in entries_of(b_home, "trade")
                         if e.data["terms"]["consumer"] == alice["account"]), None))
                    upstream = wait_for(f"{where}: a's record of b's purchase",
                                        lambda before=before: _records_of(a_home, b_id)[before:])
                    # b ends its purchase as an honest buyer, whatever its consumer did.
                    assert len(upstream) == 1 and upstream[0].kind == "trade", where
                    charged = local.data["terms"]["completion_tokens"]
                    bought = upstream[0].data["terms"]["completion_tokens"]
                    assert got.tokens <= charged == bought, (where, got.tokens, charged, bought)
                    received += got.tokens
                    recorded += charged
            # Terms still waiting expire into the record; then nothing is left pending.
            time.sleep(2.5)
    assert len(log) >= 6, log
    assert received <= recorded, (received, recorded)
    # Each nonce is on a's record once, as a trade or as unsettled terms, never both.
    nonces = [e.data["terms"]["nonce"] for k in ("trade", "unsettled")
              for e in entries_of(a_home, k)]
    assert len(nonces) == len(set(nonces))
    for home in (a_home, b_home):
        verify_deep(home)


def _records_of(home: Path, consumer: str) -> list[entries.Entry]:
    """Trades and unsettled terms of `consumer` in `home`'s ledger, in seq order."""
    found = [e for kind in ("trade", "unsettled") for e in entries_of(home, kind)
             if e.data["terms"]["consumer"] == consumer]
    return sorted(found, key=lambda e: e.seq)
