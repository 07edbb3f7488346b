"""Builds real ledger files with every kind of entry and every table populated."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from forge_cli.identity import Identity
from forge_cli.ledger import entries
from forge_cli.ledger.store import Draft, Ledger
from forge_cli.ledger.witness import witness

SAMPLING = {"temperature_ppm": 0, "top_p_ppm": 950_000, "top_k": 40, "min_p_ppm": 50_000,
            "repeat_penalty_ppm": 1_000_000, "seed": 7, "max_tokens": 64}


def signed_trade(provider: Identity, consumer: Identity, *, tokens: int = 40,
                 price: int = 1_000_000, nonce: str | None = None,
                 run: bool = False) -> dict[str, Any]:
    """A dual-signed trade; with `run`, its terms commit to sampling and token ids."""
    terms = {
        "provider": provider.node_id, "consumer": consumer.node_id, "model": "tiny:test",
        "model_sha256": "ab" * 32, "prompt_tokens": 7, "completion_tokens": tokens,
        "price_ucu_per_token": price, "cu": entries.trade_cost(tokens, price),
        "request_sha256": "cd" * 32, "response_sha256": "ef" * 32,
        "nonce": nonce or secrets.token_hex(8), "ts": 1_700_000_000_000,
    }
    if run:
        terms.update(sampling=SAMPLING, tokens_sha256="12" * 32)
    message = entries.trade_message(terms)
    return {"terms": terms, "provider_sig": provider.sign(message).hex(),
            "consumer_sig": consumer.sign(message).hex()}


def build_full_ledger(path: Path, owner: Identity) -> dict[str, Any]:
    """A ledger whose every table holds rows: grants, transfer, trades, bodies, a redaction,
    kill switch, policy, approval, Merkle nodes, two checkpoints and a witnessed foreign log."""
    consumer, stranger = Identity.generate(), Identity.generate()
    foreign_owner = Identity.generate()
    with Ledger.open_writer(path.with_name("foreign.db"), foreign_owner) as foreign:
        foreign.append_many([Draft("note", {"text": f"f{i}"}) for i in range(5)])
        first_note = foreign.checkpoint()
        foreign.append_many([Draft("note", {"text": f"g{i}"}) for i in range(4)])
        second_note = foreign.checkpoint()
        proof = foreign.consistency_proof(5, 9)
    with Ledger.open_writer(path.with_name("foreign-fork.db"), foreign_owner) as fork:
        fork.append_many([Draft("note", {"text": f"x{i}"}) for i in range(5)])
        forked_note = fork.checkpoint()  # size 5 again, another root: a split view
        from forge_cli.ledger import note
        foreign_vkey = note.Verifier(note.origin_for(foreign_owner.node_id),
                                     foreign_owner.public_key).vkey()
    with Ledger.open_writer(path, owner) as book:
        book.append("grant", {"account": owner.node_id, "cu": 1000, "reason": "free tier"})
        book.append("grant", {"account": consumer.node_id, "cu": 500})
        book.append("transfer", {"from": owner.node_id, "to": stranger.node_id, "cu": 25}, parent=0)
        trade = book.append("trade", signed_trade(owner, consumer), bodies=[b"prompt 1", b"output 1"])
        book.append("trade", signed_trade(owner, consumer, tokens=3))
        served = signed_trade(owner, stranger, tokens=2)  # never countersigned
        book.append("unsettled", {"terms": served["terms"], "provider_sig": served["provider_sig"],
                                  "reason": "not countersigned within 30 s"})
        book.append("note", {"text": "checkpoint soon"})
        # Audits: a pass, and a dispute (three more signatures: auditor, provider, consumer).
        audited = signed_trade(stranger, consumer, tokens=5, run=True)
        book.append("audit", {"trade_id": entries.trade_id(audited), "provider": stranger.node_id,
                              "model_sha256": "ab" * 32, "positions": 5})
        disputed = signed_trade(stranger, consumer, tokens=5, run=True)
        claim = {"trade": disputed, "auditor": owner.node_id, "reason": "model: 1 of 5 tokens",
                 "failures": [{"pos": 2, "token": 65, "token_mlogit": -4000,
                               "bound_mlogit": 9500, "top": [[66, 10000], [67, 9800]]}],
                 "positions": 5, "ts": 1_700_000_000_000}
        book.append("dispute", {"claim": claim, "verdict": "upheld", "auditor_sig":
                                owner.sign(entries.dispute_message(claim)).hex()})
        book.checkpoint()
        book.append("redact", {"body": trade.fields["bodies"][0], "reason": "user asked"},
                    parent=trade.seq)
        book.append("burn", {"account": stranger.node_id, "cu": 5})
        book.append_many([Draft("note", {"text": f"n{i}"}, bodies=[f"b{i}".encode()])
                          for i in range(8)])
        book.append("kill", {"active": True, "reason": "drill"})
        book.append("kill", {"active": False, "reason": "drill over"})
        book.append("policy", {"account": "*", "per_request_cap_cu": 500, "hourly_budget_cu": 2000,
                               "lifetime_budget_cu": 10_000, "approval_threshold_cu": 200})
        far = 4_000_000_000_000
        book.append("approval", {"id": "apr-1", "account": consumer.node_id, "cu": 300,
                                 "status": "requested", "expires_ms": far})
        book.append("approval", {"id": "apr-1", "account": consumer.node_id, "cu": 300,
                                 "status": "approved"})
        # Lending: a deposit, a loan repaid after 2 hours, a loan that defaults, a withdrawal.
        t0, hour = 1_800_000_000_000, entries.HOUR_MS
        book.append("heartbeat", {"account": owner.node_id}, ts=t0)
        book.append("deposit", {"account": owner.node_id, "cu": 500, "shares": 500}, ts=t0)
        rate = entries.rate_ppm(2000)
        loan = book.append("borrow", {"account": consumer.node_id, "principal": 100,
                                      "collateral": 50, "term_hours": 5, "credit_bp": 2000,
                                      "rate_ppm": rate}, ts=t0)
        book.append("repay", {"loan_id": loan.seq, "account": consumer.node_id,
                              "interest": entries.interest_cu(100, rate, t0, t0 + 2 * hour)},
                    parent=loan.seq, ts=t0 + 2 * hour)
        bad = book.append("borrow", {"account": consumer.node_id, "principal": 90,
                                     "collateral": 30, "term_hours": 1, "credit_bp": 2000,
                                     "rate_ppm": rate}, ts=t0 + 2 * hour)
        book.append("default", {"loan_id": bad.seq, "account": consumer.node_id,
                                "burn": entries.default_burn(30)}, parent=bad.seq,
                    ts=t0 + 4 * hour)
        book.append("borrow", {"account": consumer.node_id, "principal": 60, "collateral": 20,
                               "term_hours": 168, "credit_bp": 2000, "rate_ppm": rate},
                    ts=t0 + 4 * hour)  # left open: escrow holds its collateral
        book.append("withdraw", {"account": owner.node_id, "shares": 100, "cu": 87},
                    ts=t0 + 5 * hour)
        book.checkpoint()
        witness(book, first_note, foreign_vkey)
        witness(book, second_note, foreign_vkey, proof)
        from forge_cli.ledger import witness as witnesses

        witnesses.record_evidence(book, witnesses.check_evidence(
            {"origin": note.origin_for(foreign_owner.node_id),
             "notes": [first_note, forked_note]}), "test")
        ours = book.latest_checkpoint()[2]
        line = note.cosignature(ours, witnesses.witness_name(stranger.node_id), stranger,
                                1_800_000_000).line()
        witnesses.keep_cosignatures(book, ours, line,
                                    witnesses.witness_verifier(stranger.node_id))
        size = book.size
    return {"size": size, "owner": owner, "consumer": consumer, "stranger": stranger,
            "trade_seq": trade.seq}
