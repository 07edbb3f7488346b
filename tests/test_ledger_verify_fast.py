"""The short cuts that make verify fast decide exactly what the slow paths decide.

Signatures go straight to libsodium's detached check instead of PyNaCl's wrapper; entries
are read by one decoder call instead of `json.loads`; a whole span joins the Merkle tree as
one subtree root. Each is held here to its slow twin, hostile inputs first.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forge_cli import identity, parallel
from forge_cli.identity import Identity
from forge_cli.ledger import merkle
from forge_cli.ledger import verify as verifier
from forge_cli.ledger.store import Ledger

SIGNER = Identity.generate()
MESSAGE = b"\x00" * 31 + b"\x01"
GOOD = SIGNER.sign(MESSAGE)


def flipped(data: bytes, at: int = 0, bits: int = 1) -> bytes:
    return data[:at] + bytes([data[at] ^ bits]) + data[at + 1:]


HOSTILE_CHECKS = [
    (SIGNER.public_key, MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, flipped(GOOD)),
    (SIGNER.public_key, MESSAGE, flipped(GOOD, 63, 0xE0)),  # S not reduced
    (SIGNER.public_key, flipped(MESSAGE), GOOD),
    (SIGNER.public_key, b"", GOOD),
    (SIGNER.public_key, b"", SIGNER.sign(b"")),
    (flipped(SIGNER.public_key), MESSAGE, GOOD),
    (bytes(32), MESSAGE, GOOD),  # a small-order key
    (bytes([1]) + bytes(31), MESSAGE, bytes(64)),  # the identity point and a zero signature
    (SIGNER.public_key[:31], MESSAGE, GOOD),  # libsodium would read past these ends
    (SIGNER.public_key + b"\x00", MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, GOOD[:63]),
    (SIGNER.public_key, MESSAGE, GOOD + b"\x00"),
    (b"", MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, b""),
    (SIGNER.public_key.hex(), MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, GOOD.hex()),
    (SIGNER.public_key, MESSAGE.hex(), GOOD),
    (SIGNER.public_key, 32, GOOD),  # bytes(32) would be 32 zero bytes: must not be
    (SIGNER.public_key, None, GOOD),
    (None, MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, None),
    (SIGNER.public_key, bytearray(MESSAGE), GOOD),
    (SIGNER.public_key, memoryview(MESSAGE), GOOD),
    (bytearray(SIGNER.public_key), MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, bytearray(GOOD)),
]


def test_verify_calls_libsodium_directly_here():
    """PyNaCl's bundled libsodium exports the detached check: verify must not pay for the
    wrapper's copies where the call is there to make."""
    assert identity.verify_detached is not None


@pytest.mark.parametrize("index", range(len(HOSTILE_CHECKS)))
def test_the_direct_check_agrees_with_pynacl_on_every_input(index):
    public_key, message, signature = HOSTILE_CHECKS[index]
    slow = identity.verify_with_pynacl(public_key, message, signature)  # type: ignore[arg-type]
    assert identity.verify(public_key, message, signature) is slow  # type: ignore[arg-type]
    assert identity.verify_many([(public_key, message, signature)]) == [slow]  # type: ignore[list-item]


def test_only_the_good_signatures_verify_in_a_mixed_batch_on_every_core():
    expected = [identity.verify_with_pynacl(*check) for check in HOSTILE_CHECKS]  # type: ignore[arg-type]
    assert [i for i, ok in enumerate(expected) if ok] == [0, 5, 22, 23]
    many = HOSTILE_CHECKS * 4  # past parallel.SPLIT_AT, so threads share the batch
    assert len(many) >= parallel.SPLIT_AT
    assert parallel.verify_all(many, workers=3) == expected * 4  # type: ignore[arg-type]
    assert identity.verify_many(HOSTILE_CHECKS) == expected  # type: ignore[arg-type]


ENTRY = (b'{"actor":"' + b"a" * 64 + b'","bodies":[],"data":{"text":"hi"},"kind":"note",'
         b'"parent":null,"prev":"' + b"0" * 64 + b'","seq":0,"ts":1,"v":1}')
HOSTILE_ENTRIES = [
    ENTRY,
    b"\xef\xbb\xbf" + ENTRY,  # UTF-8 byte-order mark: json.loads accepts it
    b" " + ENTRY + b"\n",  # whitespace around the value
    ENTRY.decode().encode("utf-16"),
    ENTRY.decode().encode("utf-32-le"),
    ENTRY + b"x",  # extra data
    ENTRY + ENTRY,
    ENTRY.replace(b'"hi"', b'"\xed\xa0\x80"'),  # an encoded lone surrogate
    ENTRY.replace(b'"hi"', b'"\\ud800"'),  # an escaped one
    ENTRY.replace(b'"hi"', b"NaN"),
    ENTRY.replace(b'"hi"', b"-Infinity"),
    ENTRY.replace(b'"hi"', b"1e400"),
    ENTRY.replace(b'"hi"', b'"\x01"'),  # a control character inside a string
    ENTRY.replace(b'"seq":0', b'"seq":0,"seq":7'),  # a duplicate key: the last wins
    b"\xff\xfe",
    b"",
    b"   ",
    b"[1,2]",
    b"1 2",
    b'"text"',
    b"{" * 50 + b"}" * 50,
]


def outcome(parse, raw: bytes) -> str:
    try:
        return repr(parse(raw))
    except ValueError as exc:
        return f"ValueError {type(exc).__name__}"


@pytest.mark.parametrize("index", range(len(HOSTILE_ENTRIES)))
def test_an_entry_is_parsed_exactly_as_json_loads_parses_it(index):
    raw = HOSTILE_ENTRIES[index]
    assert outcome(verifier.parse_entry, raw) == outcome(json.loads, raw)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=40),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                 max_leaves=8).map(lambda value: json.dumps(value).encode()),
    st.tuples(st.text(" \t\r\n", max_size=2), st.sampled_from(["utf-8", "utf-16", "utf-8-sig"]))
      .map(lambda pad_codec: (pad_codec[0] + '{"a": [1, "\\u00e9"]}' + pad_codec[0])
           .encode(pad_codec[1])),
))
def test_any_bytes_parse_as_json_loads_parses_them(raw):
    assert outcome(verifier.parse_entry, raw) == outcome(json.loads, raw)


LEAVES = [merkle.leaf_hash(bytes([i])) for i in range(40)]


@pytest.mark.parametrize("height", range(5))
def test_a_subtree_added_whole_builds_the_tree_its_leaves_build_one_by_one(height):
    width = 1 << height
    for start in range(0, len(LEAVES) - width + 1, width):
        one, whole = merkle.CompactRange(), merkle.CompactRange()
        for leaf in LEAVES[:start]:
            one.append(leaf)
            whole.append(leaf)
        by_leaf = [node for leaf in LEAVES[start:start + width] for node in one.append(leaf)]
        levels = merkle.subtree_levels(LEAVES[start:start + width])
        completed = whole.append_subtree(height, levels[-1][0])
        assert (whole.size, whole.peaks, whole.root()) == (one.size, one.peaks, one.root())
        assert completed == [node for node in by_leaf if node[0] > height]
        inside = {(level, (start >> level) + i): node
                  for level, row in enumerate(levels) if level for i, node in enumerate(row)}
        assert inside == {(level, idx): node for level, idx, node in by_leaf
                          if level <= height}


def test_a_subtree_that_does_not_start_on_its_own_boundary_is_refused():
    tree = merkle.CompactRange()
    tree.append(LEAVES[0])
    with pytest.raises(ValueError, match="cannot start at leaf 1"):
        tree.append_subtree(1, LEAVES[1])
    assert tree.size == 1 and tree.peaks == [LEAVES[0]]
    with pytest.raises(ValueError, match="power of two"):
        merkle.subtree_levels(LEAVES[:3])
    with pytest.raises(ValueError, match="power of two"):
        merkle.subtree_levels([])
    with pytest.raises(ValueError, match="32 bytes"):
        merkle.CompactRange().append_subtree(0, b"short")



@pytest.mark.parametrize("workers", [2, 3, 16, 64])
@pytest.mark.parametrize("size", [5_000, 100_000, 1_000_000])
def test_spans_shrink_until_every_worker_gets_several_and_stay_whole_subtrees(size, workers):
    span = verifier.span_size(size, workers)
    assert span & (span - 1) == 0 and verifier.MIN_SPAN <= span <= verifier.SPAN
    assert span == verifier.MIN_SPAN or -(-size // span) >= verifier.SPANS_PER_WORKER * workers
    assert span == verifier.SPAN or size < 2 * span * verifier.SPANS_PER_WORKER * workers


def test_merkle_nodes_edited_into_other_types_are_findings_not_a_crash(tmp_path):
    owner, peer = Identity.generate(), Identity.generate()
    db = tmp_path / "ledger.db"
    with Ledger.open_writer(db, owner) as book:
        book.append("grant", {"account": owner.node_id, "cu": 100})
        for _ in range(7):
            book.append("transfer", {"from": owner.node_id, "to": peer.node_id, "cu": 1})
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE merkle_nodes SET hash = 'text' WHERE level = 1 AND idx = 1")
        conn.execute("UPDATE merkle_nodes SET level = 'two' WHERE level = 2 AND idx = 1")
        conn.execute("UPDATE merkle_nodes SET idx = 0.5 WHERE level = 1 AND idx = 3")
    with Ledger.open_reader(db) as book:
        found = [str(f) for f in verifier.verify(book, deep=True, workers=1).findings]
    assert found == [
        "table merkle_nodes: node (level 1, index 0.5) is unexpected",
        "table merkle_nodes: node (level 1, index 1) is wrong",
        "table merkle_nodes: node (level 1, index 3) is missing",
        "table merkle_nodes: node (level 2, index 1) is missing",
        "table merkle_nodes: node (level two, index 1) is unexpected",
    ]
