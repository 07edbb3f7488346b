"""Import of another ledger's entries (an export of the same log, extended): checked, then
appended in one transaction, or not at all.

Each entry is checked by verify's own per-entry checker (`verify.check_entry`), so import and
verify cannot disagree on what a valid entry is; only the checks that belong to import live
here: overlap with entries already held (a fork), the bodies carried alongside, and the roots
the file claims.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forge_cli.errors import EntryRejected
from forge_cli.ledger import verify
from forge_cli.ledger.store import Ledger

# (entry bytes, actor signature, bodies by hash)
Record = tuple[bytes, bytes, dict[str, bytes]]


def import_records(ledger: Ledger, records: Sequence[Record], *,
                   expect_roots: dict[int, bytes] | None = None) -> int:
    """Append another ledger's entries (raw bytes, signature, bodies); returns how many.

    Records this ledger already holds must be identical (else it is a fork). The rest are
    checked as verify checks them (seq, prev, hash, actor and trade signatures, kind rules,
    canonical form), their bodies against the entries, and `expect_roots` {size: root}; then
    written in one transaction, or none.
    """
    ledger.require_writer()
    prev, seq = ledger.head, ledger.size
    wanted = dict(expect_roots or {})
    probe = ledger.compact_range()
    checked: list[tuple[dict[str, Any], bytes, bytes, bytes, dict[str, bytes]]] = []
    for raw, sig, body_map in records:
        if not checked and _already_held(ledger, raw):
            continue
        check = verify.check_entry(raw, sig, seq, prev, strict=True)
        problems = list(check.problems)
        problems += [verify.signature_problem(what)
                     for _, what in verify.bad_signatures(check.signatures)]
        fields = check.fields
        if fields is not None:
            problems += [f"body {body_hash[:16]}… does not match the entry's body hashes"
                         for body_hash, body in body_map.items()
                         if body_hash not in fields["bodies"]
                         or not verify.body_matches(body_hash, body)]
        if problems or fields is None:
            raise EntryRejected(f"entry {seq}: {problems[0]}; nothing was imported")
        checked.append((fields, raw, check.leaf, sig, body_map))
        probe.append(check.leaf)
        prev, seq = check.leaf, seq + 1
        if seq in wanted and wanted.pop(seq) != probe.root():
            raise EntryRejected(f"the first {seq} entries do not hash to the root the file "
                                "claims; nothing was imported")
    redacted = {f["data"]["body"] for f, *_ in checked if f["kind"] == "redact"}
    for fields, _, _, _, body_map in checked:
        for body in fields["bodies"]:
            if body not in body_map and body not in redacted and ledger.redacted_at(body) is None:
                raise EntryRejected(f"entry {fields['seq']}: body {body[:16]}… is neither in the "
                                    "file nor redacted; nothing was imported")
    for size, root in wanted.items():
        if size > seq or ledger.root(size) != root:
            raise EntryRejected(f"the file claims a root for size {size} that its entries "
                                "do not have; nothing was imported")
    return len(ledger.commit_signed(checked))


def _already_held(ledger: Ledger, raw: bytes) -> bool:
    """True if `raw` is an entry this ledger holds; EntryRejected if it holds another there."""
    check = verify.check_entry(raw, b"", -1, b"", strict=False)
    at = check.fields["seq"] if check.fields is not None else None
    if at is None or not 0 <= at < ledger.size:
        return False
    if ledger.node(0, at) != check.leaf:
        raise EntryRejected(f"entry {at} differs from this ledger's entry {at} "
                            "(a fork); nothing was imported")
    return True
