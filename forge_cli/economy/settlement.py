"""Settlement statements: what each account earned and spent in a window, provably.

A statement lists the window's trades, each with its full entry and an RFC 9162 inclusion
proof against a checkpoint signed by the node; per-account totals (earned, spent, net, trade
count) and a reference payout at `price_msat_per_cu`; and the node's Ed25519 signature over
the canonical JSON of everything else, with the domain prefix `forge-settlement-v1\\n`.
`check` verifies a statement with nothing but the file: signature, checkpoint, every proof,
every trade signature and every total, naming each amount that does not add up.
"""

from __future__ import annotations

from typing import Any

from forge_cli import canonical, identity
from forge_cli.errors import ForgeError
from forge_cli.ledger import entries, merkle, note
from forge_cli.ledger.store import Ledger

DOMAIN = b"forge-settlement-v1\n"
DEFAULT_PRICE_MSAT = 10


def _totals(trades: list[dict[str, Any]], price: int) -> list[dict[str, Any]]:
    acc: dict[str, dict[str, int]] = {}
    for trade in trades:
        terms = trade["entry"]["data"]["terms"]
        for side, key in (("provider", "earned"), ("consumer", "spent")):
            row = acc.setdefault(terms[side], {"earned": 0, "spent": 0, "trades": 0})
            row[key] += terms["cu"]
            row["trades"] += 1
    return [{"account": a, **r, "net": r["earned"] - r["spent"],
             "payout_msat": (r["earned"] - r["spent"]) * price} for a, r in sorted(acc.items())]


def build(ledger: Ledger, from_ms: int, to_ms: int, *, price_msat: int = DEFAULT_PRICE_MSAT,
          now_ms: int) -> dict[str, Any]:
    """A signed statement of the trades with from_ms ≤ ts < to_ms (writer ledger: it signs a
    checkpoint of the current tree)."""
    signer = ledger.signer
    assert signer is not None
    checkpoint = ledger.checkpoint()
    size = ledger.size
    trades: list[dict[str, Any]] = []
    for entry in ledger.iter_entries(0, size, kind="trade"):
        if from_ms <= entry.fields["ts"] < to_ms:
            trades.append({"seq": entry.seq, "entry": entry.fields, "sig": entry.sig.hex(),
                           "proof": [h.hex() for h in ledger.inclusion_proof(entry.seq, size)]})
    accounts = _totals(trades, price_msat)
    body = {
        "v": 1, "node": signer.node_id, "from_ms": from_ms, "to_ms": to_ms, "generated_ms": now_ms,
        "price_msat_per_cu": price_msat, "checkpoint": checkpoint, "tree_size": size,
        "accounts": accounts, "trades": trades,
        "totals": {"trades": len(trades), "cu": sum(t["entry"]["data"]["terms"]["cu"] for t in trades)},
    }
    return {**body, "signature": signer.sign(DOMAIN + canonical.encode(body)).hex()}


def check(doc: Any) -> list[str]:
    """Every problem with a statement (empty: it verifies). Needs no node and no ledger."""
    if not isinstance(doc, dict) or not {"node", "signature", "checkpoint", "trades", "accounts",
                                         "price_msat_per_cu", "totals"} <= set(doc):
        return ["not a forge settlement statement"]
    problems = []
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        message = DOMAIN + canonical.encode(body)
    except ForgeError as exc:
        return [f"statement has no canonical form: {exc}"]
    if not identity.verify_hex(str(doc["node"]), message, str(doc["signature"])):
        problems.append("the node's signature over the statement does not verify (edited)")
    try:
        pub = bytes.fromhex(doc["node"])
        cp = note.open_checkpoint(doc["checkpoint"], note.Verifier(note.origin_for(doc["node"]), pub))
    except (ForgeError, ValueError) as exc:
        return problems + [f"checkpoint: {exc}"]
    for i, trade in enumerate(doc["trades"]):
        try:
            leaf = entries.leaf_hash(canonical.encode(trade["entry"]))
            proof = [bytes.fromhex(h) for h in trade["proof"]]
            if trade["entry"]["seq"] != trade["seq"] or not merkle.verify_inclusion(
                    leaf, trade["seq"], cp.size, proof, cp.root):
                problems.append(f"trades[{i}] (seq {trade['seq']}): inclusion proof does not "
                                "verify against the signed checkpoint")
            if entries.trade_signature_problem(trade["entry"]["data"]):
                problems.append(f"trades[{i}] (seq {trade['seq']}): trade signatures do not verify")
        except (KeyError, TypeError, ValueError, ForgeError) as exc:
            problems.append(f"trades[{i}] is malformed: {exc!r}")
    if problems and any("malformed" in p for p in problems):
        return problems
    want = {row["account"]: row for row in _totals(doc["trades"], doc["price_msat_per_cu"])}
    have = {row.get("account"): row for row in doc["accounts"] if isinstance(row, dict)}
    for account in sorted(set(want) | set(have), key=str):
        w, h = want.get(account), have.get(account)
        if w is None or h is None:
            problems.append(f"account {str(account)[:16]}… is {'extra' if w is None else 'missing'}")
            continue
        for key in ("earned", "spent", "net", "trades", "payout_msat"):
            if h.get(key) != w[key]:
                problems.append(f"accounts[{str(account)[:16]}…].{key} is {h.get(key)!r} but the "
                                f"trades give {w[key]!r}")
    cu = sum(t["entry"]["data"]["terms"]["cu"] for t in doc["trades"])
    if doc["totals"] != {"trades": len(doc["trades"]), "cu": cu}:
        problems.append(f"totals are {doc['totals']!r} but the trades give "
                        f"{{'trades': {len(doc['trades'])}, 'cu': {cu}}}")
    return problems
