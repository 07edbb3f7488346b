"""Witnessing: cosigning another log's checkpoint once it is shown to extend the last one this
ledger saw from that log, which is what makes a rewritten or truncated history detectable.

What was witnessed is kept in the ledger file's `witnessed` table (one row per log origin).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from forge_cli.errors import ProofFailed, UsageError
from forge_cli.ledger import merkle, note
from forge_cli.ledger.store import Ledger


def witness(ledger: Ledger, note_text: str, log_vkey: str, proof: Iterable[bytes] = ()) -> str:
    """Cosign another log's checkpoint if it is consistent with the last one we saw.

    The first checkpoint seen from a log is trusted on first use; later ones need a
    consistency proof from the stored size. Returns the note with our cosignature.
    """
    signer = ledger.require_writer()
    verifier = note.Verifier.parse(log_vkey)
    cp = note.open_checkpoint(note_text, verifier)
    last = ledger.conn.execute(
        "SELECT size, root, log_vkey FROM witnessed WHERE origin = ?", (cp.origin,)
    ).fetchone()
    if last is not None:
        old_size, old_root, old_vkey = last
        if old_vkey != log_vkey:
            raise UsageError(f"log {cp.origin} was witnessed under another key {old_vkey}")
        if cp.size < old_size:
            raise ProofFailed(f"{cp.origin} shrank from {old_size} to {cp.size} entries")
        if not merkle.verify_consistency(old_size, cp.size, old_root, cp.root, list(proof)):
            raise ProofFailed(f"{cp.origin} at size {cp.size} is not consistent with the "
                              f"size {old_size} checkpoint seen before (fork or rewrite)")
    name = note.origin_for(signer.node_id) + "/witness"
    cosigned = note.cosign(note_text, name, signer, int(time.time()))
    witness_vkey = note.Verifier(name, signer.public_key, note.COSIGNATURE_V1).vkey()
    ledger.execute_write("INSERT OR REPLACE INTO witnessed VALUES (?, ?, ?, ?, ?, ?)",
                          (cp.origin, cp.size, cp.root, cosigned, log_vkey, witness_vkey))
    return cosigned
