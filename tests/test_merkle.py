"""Pins forge's Merkle tree to RFC 9162 §2.1 and to the published transparency-dev vectors.

Proof verifiers are checked against a naive recursive reference written from the RFC's
PATH/PROOF definitions, so mutated sizes are judged by the RFC, not by what seems plausible.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_cli.ledger.merkle import (
    CompactRange,
    consistency_path,
    consistency_proof,
    inclusion_path,
    inclusion_proof,
    leaf_hash,
    node_hash,
    peak_positions,
    root,
    subtree_root,
    verify_consistency,
    verify_inclusion,
)

# Published values: RFC 6962 hasher tests and the reference tree of
# transparency-dev/merkle (rfc6962/rfc6962_test.go, proof/verify_test.go).
EMPTY_ROOT_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
EMPTY_LEAF_HEX = "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
LEAF_L123456_HEX = "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
NODE_N123_N456_HEX = "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"

REFERENCE_LEAVES = [
    bytes.fromhex(x)
    for x in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
REFERENCE_ROOTS = {  # tree size -> root
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
# (0-based leaf index, tree size, audit path); the Go source numbers leaves from 1.
REFERENCE_INCLUSION = [
    (0, 1, []),
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
REFERENCE_CONSISTENCY = [  # (old size, new size, proof)
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]

MAX_SIZE = 64
FAST = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=100, deadline=None)

leaf_data = st.binary(max_size=12)
hash32 = st.binary(min_size=32, max_size=32)


def split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def flip_bit(value: bytes, bit: int) -> bytes:
    bit %= len(value) * 8
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --- Naive reference verifiers, written top-down from the RFC 9162 recursive definitions ------


def replay_path(m: int, n: int, leaf: bytes, proof: list[bytes]) -> bytes | None:
    """The root implied by reading `proof` as PATH(m, D[n]); None if it has the wrong shape."""
    if n == 1:
        return leaf if not proof else None
    if not proof:
        return None
    k = split(n)
    *below, sibling = proof
    if m < k:
        sub = replay_path(m, k, leaf, below)
        return None if sub is None else node_hash(sub, sibling)
    sub = replay_path(m - k, n - k, leaf, below)
    return None if sub is None else node_hash(sibling, sub)


def reference_verify_inclusion(
    leaf: bytes, index: int, size: int, proof: list[bytes], expected_root: bytes
) -> bool:
    if not 0 <= index < size:
        return False
    return replay_path(index, size, leaf, list(proof)) == expected_root


def replay_subproof(
    m: int, n: int, whole: bool, proof: list[bytes], old_root: bytes
) -> tuple[bytes, bytes] | None:
    """(old subtree hash, new subtree hash) implied by reading `proof` as SUBPROOF(m, D[n], b)."""
    if m == n:
        if whole:
            return (old_root, old_root) if not proof else None
        return (proof[0], proof[0]) if len(proof) == 1 else None
    if not proof:
        return None
    k = split(n)
    *below, last = proof
    if m <= k:
        sub = replay_subproof(m, k, whole, below, old_root)
        return None if sub is None else (sub[0], node_hash(sub[1], last))
    sub = replay_subproof(m - k, n - k, False, below, old_root)
    return None if sub is None else (node_hash(last, sub[0]), node_hash(last, sub[1]))


def reference_verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> bool:
    if not 0 <= old <= new:
        return False
    if old == new:
        return not proof and old_root == new_root
    if old == 0:
        return not proof
    return replay_subproof(old, new, True, list(proof), old_root) == (old_root, new_root)


# --- Known vectors ---------------------------------------------------------------------------


def test_empty_tree_root_is_sha256_of_nothing():
    assert root([]).hex() == EMPTY_ROOT_HEX
    assert CompactRange().root().hex() == EMPTY_ROOT_HEX
    assert subtree_root(0, 0, lambda level, index: b"unused").hex() == EMPTY_ROOT_HEX


def test_leaf_and_node_hashes_match_rfc6962_vectors():
    assert leaf_hash(b"").hex() == EMPTY_LEAF_HEX
    assert leaf_hash(b"L123456").hex().startswith("395aa064")
    assert leaf_hash(b"L123456").hex().endswith("4d56")
    assert leaf_hash(b"L123456").hex() == LEAF_L123456_HEX
    assert node_hash(b"N123", b"N456").hex().startswith("aa217fe8")
    assert node_hash(b"N123", b"N456").hex().endswith("6bbb")
    assert node_hash(b"N123", b"N456").hex() == NODE_N123_N456_HEX


def test_leaf_and_node_hashes_are_domain_separated():
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert leaf_hash(a + b) != node_hash(a, b)
    assert node_hash(a, b) != node_hash(b, a)
    assert leaf_hash(b"") != root([])


@pytest.mark.parametrize("size", sorted(REFERENCE_ROOTS))
def test_reference_tree_roots_match_published_values(size):
    assert root(REFERENCE_LEAVES[:size]).hex() == REFERENCE_ROOTS[size]


@pytest.mark.parametrize(("index", "size", "path"), REFERENCE_INCLUSION)
def test_reference_inclusion_proofs_match_published_values(index, size, path):
    proof = inclusion_proof(REFERENCE_LEAVES[:size], index)
    assert [p.hex() for p in proof] == path
    tree_root = bytes.fromhex(REFERENCE_ROOTS[size])
    assert verify_inclusion(leaf_hash(REFERENCE_LEAVES[index]), index, size, proof, tree_root)


@pytest.mark.parametrize(("old", "new", "path"), REFERENCE_CONSISTENCY)
def test_reference_consistency_proofs_match_published_values(old, new, path):
    proof = consistency_proof(REFERENCE_LEAVES[:new], old)
    assert [p.hex() for p in proof] == path
    old_root, new_root = bytes.fromhex(REFERENCE_ROOTS[old]), bytes.fromhex(REFERENCE_ROOTS[new])
    assert verify_consistency(old, new, old_root, new_root, proof)


def test_rfc_verifier_accepts_a_path_of_the_same_shape_for_another_size():
    # Why the wrong-size tests compare with the reference instead of asserting False: the path
    # for leaf 0 of 5 has the same shape (left, left, left) as for leaf 0 of 6, so both read it
    # to the same root. The RFC algorithm accepts this by design.
    proof = inclusion_proof(REFERENCE_LEAVES[:5], 0)
    tree_root = bytes.fromhex(REFERENCE_ROOTS[5])
    assert verify_inclusion(leaf_hash(REFERENCE_LEAVES[0]), 0, 6, proof, tree_root)
    assert reference_verify_inclusion(leaf_hash(REFERENCE_LEAVES[0]), 0, 6, proof, tree_root)


def test_peak_positions_follow_the_binary_decomposition_of_the_size():
    assert peak_positions(0) == []
    assert peak_positions(1) == [(0, 0)]
    assert peak_positions(6) == [(2, 0), (1, 2)]
    assert peak_positions(7) == [(2, 0), (1, 2), (0, 6)]
    assert peak_positions(8) == [(3, 0)]
    assert peak_positions(13) == [(3, 0), (2, 2), (0, 12)]


# --- Every proof up to 64 leaves verifies ----------------------------------------------------


@FAST
@given(st.lists(leaf_data, min_size=MAX_SIZE, max_size=MAX_SIZE))
def test_inclusion_proofs_verify_for_every_index_and_size_up_to_64(data):
    hashes = [leaf_hash(d) for d in data]
    for size in range(1, MAX_SIZE + 1):
        tree_root = root(data[:size])
        for index in range(size):
            proof = inclusion_proof(data[:size], index)
            assert verify_inclusion(hashes[index], index, size, proof, tree_root), (index, size)
            assert reference_verify_inclusion(hashes[index], index, size, proof, tree_root)


@FAST
@given(st.lists(leaf_data, min_size=MAX_SIZE, max_size=MAX_SIZE))
def test_consistency_proofs_verify_for_every_pair_up_to_64(data):
    roots = [root(data[:size]) for size in range(MAX_SIZE + 1)]
    for new in range(MAX_SIZE + 1):
        for old in range(new + 1):
            proof = consistency_proof(data[:new], old)
            assert verify_consistency(old, new, roots[old], roots[new], proof), (old, new)
            assert reference_verify_consistency(old, new, roots[old], roots[new], proof)


# --- Mutated proofs fail ---------------------------------------------------------------------


@SOME
@given(st.data())
def test_mutated_inclusion_proof_fails(data):
    size = data.draw(st.integers(1, MAX_SIZE), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    leaves = data.draw(st.lists(leaf_data, min_size=size, max_size=size), label="leaves")
    junk = data.draw(hash32, label="junk")
    bit = data.draw(st.integers(0, 255), label="bit")
    proof = inclusion_proof(leaves, index)
    tree_root, leaf = root(leaves), leaf_hash(leaves[index])
    assert verify_inclusion(leaf, index, size, proof, tree_root)

    bad_proofs = [proof + [junk], proof + [tree_root], [junk] + proof, [leaf] + proof]
    bad_proofs += [proof[:i] + [flip_bit(p, bit)] + proof[i + 1 :] for i, p in enumerate(proof)]
    bad_proofs += [proof[:i] + proof[i + 1 :] for i in range(len(proof))]
    for bad in bad_proofs:
        assert not verify_inclusion(leaf, index, size, bad, tree_root), bad
    assert not verify_inclusion(leaf, index, size, proof, flip_bit(tree_root, bit))
    assert not verify_inclusion(leaf, index, size, proof, junk)
    assert not verify_inclusion(flip_bit(leaf, bit), index, size, proof, tree_root)
    # The raw data hash is not the leaf hash: the 0x00 prefix is what a verifier checks.
    assert not verify_inclusion(
        hashlib.sha256(leaves[index]).digest(), index, size, proof, tree_root
    )
    if size > 1:
        assert not verify_inclusion(tree_root, index, size, proof, leaf)


@SOME
@given(st.data())
def test_mutated_consistency_proof_fails(data):
    new = data.draw(st.integers(1, MAX_SIZE), label="new")
    old = data.draw(st.integers(1, new), label="old")
    leaves = data.draw(st.lists(leaf_data, min_size=new, max_size=new), label="leaves")
    junk = data.draw(hash32, label="junk")
    bit = data.draw(st.integers(0, 255), label="bit")
    proof = consistency_proof(leaves, old)
    old_root, new_root = root(leaves[:old]), root(leaves)
    assert verify_consistency(old, new, old_root, new_root, proof)

    bad_proofs = [proof + [junk], proof + [old_root], proof + [new_root], [junk] + proof]
    bad_proofs += [[old_root] + proof, [new_root] + proof]
    bad_proofs += [proof[:i] + [flip_bit(p, bit)] + proof[i + 1 :] for i, p in enumerate(proof)]
    bad_proofs += [proof[:i] + proof[i + 1 :] for i in range(len(proof))]
    if proof:
        bad_proofs += [[], [proof[0]] + proof]
    for bad in bad_proofs:
        assert not verify_consistency(old, new, old_root, new_root, bad), bad
    assert not verify_consistency(old, new, flip_bit(old_root, bit), new_root, proof)
    assert not verify_consistency(old, new, old_root, flip_bit(new_root, bit), proof)
    assert not verify_consistency(old, new, junk, new_root, proof)
    if old_root != new_root:
        assert not verify_consistency(old, new, new_root, old_root, proof)


def test_consistency_with_the_empty_tree_needs_an_empty_proof():
    leaves = [b"a", b"b", b"c"]
    assert consistency_proof(leaves, 0) == []
    assert verify_consistency(0, 3, root([]), root(leaves), [])
    assert not verify_consistency(0, 3, root([]), root(leaves), [root([])])
    assert verify_consistency(0, 0, root([]), root([]), [])
    assert not verify_consistency(0, 0, root([]), root(leaves), [])


def test_consistency_of_equal_sizes_needs_equal_roots_and_an_empty_proof():
    leaves = [b"a", b"b", b"c"]
    assert consistency_proof(leaves, 3) == []
    assert verify_consistency(3, 3, root(leaves), root(leaves), [])
    assert not verify_consistency(3, 3, root(leaves), root(leaves[:2]), [])
    assert not verify_consistency(3, 3, root(leaves), root(leaves), [root(leaves)])


# --- Wrong index or size: the library agrees with the RFC's recursive definitions -------------


def test_inclusion_verifier_agrees_with_reference_for_every_claimed_index_and_size():
    leaves = [b"leaf %d" % i for i in range(24)]
    hashes = [leaf_hash(d) for d in leaves]
    accepted_elsewhere = 0
    for size in range(1, 14):
        tree_root = root(leaves[:size])
        for index in range(size):
            proof = inclusion_proof(leaves[:size], index)
            for claimed_size in range(-1, 2 * size + 3):
                for claimed_index in range(-1, claimed_size + 2):
                    got = verify_inclusion(
                        hashes[index], claimed_index, claimed_size, proof, tree_root
                    )
                    want = reference_verify_inclusion(
                        hashes[index], claimed_index, claimed_size, proof, tree_root
                    )
                    assert got == want, (index, size, claimed_index, claimed_size)
                    accepted_elsewhere += got and (claimed_index, claimed_size) != (index, size)
    assert accepted_elsewhere > 0  # the comparison did meet the RFC's same-shape acceptances


@SOME
@given(st.data())
def test_inclusion_verifier_agrees_with_reference_for_mutated_index_and_size(data):
    size = data.draw(st.integers(1, 200), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    leaves = [b"%d" % i for i in range(size)]
    proof = inclusion_proof(leaves, index)
    tree_root, leaf = root(leaves), leaf_hash(leaves[index])
    mutants = [
        (index - 1, size),
        (index + 1, size),
        (index ^ 1, size),
        (index ^ 2, size),
        (index, size - 1),
        (index, size + 1),
        (index, size * 2),
        (index, size // 2),
        (data.draw(st.integers(-2, 400)), data.draw(st.integers(-2, 400))),
    ]
    for claimed_index, claimed_size in mutants:
        got = verify_inclusion(leaf, claimed_index, claimed_size, proof, tree_root)
        want = reference_verify_inclusion(leaf, claimed_index, claimed_size, proof, tree_root)
        assert got == want, (claimed_index, claimed_size)


def test_consistency_verifier_agrees_with_reference_for_every_claimed_pair_of_sizes():
    leaves = [b"leaf %d" % i for i in range(16)]
    roots = [root(leaves[:size]) for size in range(17)]
    for new in range(14):
        for old in range(new + 1):
            proof = consistency_proof(leaves[:new], old)
            for claimed_new in range(-1, 2 * new + 3):
                for claimed_old in range(-1, claimed_new + 2):
                    args = (claimed_old, claimed_new, roots[old], roots[new], proof)
                    assert verify_consistency(*args) == reference_verify_consistency(*args), (
                        old,
                        new,
                        claimed_old,
                        claimed_new,
                    )


@SOME
@given(st.data())
def test_consistency_verifier_agrees_with_reference_for_mutated_sizes(data):
    new = data.draw(st.integers(1, 200), label="new")
    old = data.draw(st.integers(1, new), label="old")
    leaves = [b"%d" % i for i in range(new)]
    proof = consistency_proof(leaves, old)
    old_root, new_root = root(leaves[:old]), root(leaves)
    mutants = [
        (old - 1, new),
        (old + 1, new),
        (old ^ 2, new),
        (old, new - 1),
        (old, new + 1),
        (old, new * 2),
        (old, new // 2),
        (data.draw(st.integers(-2, 400)), data.draw(st.integers(-2, 400))),
    ]
    for claimed_old, claimed_new in mutants:
        args = (claimed_old, claimed_new, old_root, new_root, proof)
        assert verify_consistency(*args) == reference_verify_consistency(*args), args[:2]


# --- Compact range and node-lookup proofs ----------------------------------------------------

COMPACT_SIZE = 300
COMPACT_LEAVES = [b"entry %d" % i for i in range(COMPACT_SIZE)]


def build_store(leaves: list[bytes]) -> dict[tuple[int, int], bytes]:
    """The (level, index) -> hash table a ledger store would keep: leaves plus emitted nodes."""
    tree, store = CompactRange(), {}
    for i, data in enumerate(leaves):
        store[(0, i)] = leaf_hash(data)
        for level, index, digest in tree.append(store[(0, i)]):
            store[(level, index)] = digest
    return store


def bounded_lookup(store, size, calls=None):
    """node() for a tree of `size` leaves that refuses nodes the tree does not have yet."""

    def node(level: int, index: int) -> bytes:
        assert (index + 1) << level <= size, f"node ({level}, {index}) is beyond {size} leaves"
        if calls is not None:
            calls.append((level, index))
        return store[(level, index)]

    return node


def test_compact_range_root_matches_list_root_for_every_size_to_300():
    tree = CompactRange()
    for size in range(COMPACT_SIZE + 1):
        assert tree.size == size
        assert tree.root() == root(COMPACT_LEAVES[:size]), size
        if size < COMPACT_SIZE:
            tree.append(leaf_hash(COMPACT_LEAVES[size]))


def test_compact_range_emits_each_completed_subtree_lowest_first():
    tree = CompactRange()
    seen = set()
    for i, data in enumerate(COMPACT_LEAVES):
        emitted = tree.append(leaf_hash(data))
        completed_levels = len(bin(i)) - len(bin(i).rstrip("1"))  # trailing one bits of i
        assert [level for level, _, _ in emitted] == list(range(1, completed_levels + 1))
        for level, index, digest in emitted:
            start, end = index << level, (index + 1) << level
            assert end == i + 1
            assert digest == root(COMPACT_LEAVES[start:end]), (level, index)
            seen.add((level, index))
    assert seen == {
        (level, index)
        for level in range(1, COMPACT_SIZE.bit_length())
        for index in range(COMPACT_SIZE >> level)
    }


def test_compact_range_rebuilt_from_stored_peaks_continues_the_same_tree():
    store = build_store(COMPACT_LEAVES)
    for size in range(COMPACT_SIZE - 20):
        peaks = [store[position] for position in peak_positions(size)]
        tree = CompactRange(size, peaks)
        assert tree.root() == root(COMPACT_LEAVES[:size])
        for i in range(size, size + 20):
            for level, index, digest in tree.append(store[(0, i)]):
                assert store[(level, index)] == digest
        assert tree.root() == root(COMPACT_LEAVES[: size + 20]), size


def test_compact_range_rejects_peaks_that_do_not_fit_its_size():
    digest = leaf_hash(b"x")
    with pytest.raises(ValueError, match="3 peaks"):
        CompactRange(7, [digest, digest])
    with pytest.raises(ValueError):
        CompactRange(0, [digest])
    with pytest.raises(ValueError, match="32 bytes"):
        CompactRange(1, [b"short"])
    with pytest.raises(ValueError, match="32 bytes"):
        CompactRange().append(b"short")


def test_subtree_root_over_stored_nodes_equals_list_root():
    store = build_store(COMPACT_LEAVES)
    node = bounded_lookup(store, COMPACT_SIZE)
    for size in range(1, COMPACT_SIZE + 1):
        assert subtree_root(0, size, node) == root(COMPACT_LEAVES[:size])
    assert subtree_root(256, 300, node) == root(COMPACT_LEAVES[256:300])
    assert subtree_root(64, 100, node) == root(COMPACT_LEAVES[64:100])


def test_subtree_root_rejects_ranges_that_do_not_split_into_stored_nodes():
    node = bounded_lookup(build_store(COMPACT_LEAVES[:16]), 16)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        subtree_root(1, 3, node)
    with pytest.raises(ValueError):
        subtree_root(5, 4, node)


def test_node_lookup_inclusion_paths_equal_list_proofs_in_logarithmic_lookups():
    store = build_store(COMPACT_LEAVES)
    for size in range(1, COMPACT_SIZE + 1):
        indices = range(size) if size <= 40 else {0, size // 3, size // 2, size - 1}
        for index in indices:
            calls = []
            path = inclusion_path(index, size, bounded_lookup(store, size, calls))
            assert path == inclusion_proof(COMPACT_LEAVES[:size], index), (index, size)
            assert len(calls) <= 2 * size.bit_length(), (index, size, len(calls))


def test_node_lookup_consistency_paths_equal_list_proofs_in_logarithmic_lookups():
    store = build_store(COMPACT_LEAVES)
    for new in range(COMPACT_SIZE + 1):
        olds = range(new + 1) if new <= 40 else {1, 32, new // 2, new - 1}
        for old in olds:
            calls = []
            path = consistency_path(old, new, bounded_lookup(store, new, calls))
            assert path == consistency_proof(COMPACT_LEAVES[:new], old), (old, new)
            assert len(calls) <= 2 * new.bit_length() + 1, (old, new, len(calls))


def test_list_functions_handle_100k_leaves():
    # Guards against exponential recomputation: this would not finish if levels were rebuilt.
    leaves = [b"%d" % i for i in range(100_000)]
    old_size = 65_537
    tree = CompactRange()
    for i, data in enumerate(leaves):
        if i == old_size:
            old_root = tree.root()
        tree.append(leaf_hash(data))
    tree_root = root(leaves)
    assert tree_root == tree.root()
    proof = inclusion_proof(leaves, 77_777)
    assert verify_inclusion(leaf_hash(leaves[77_777]), 77_777, 100_000, proof, tree_root)
    proof = consistency_proof(leaves, old_size)
    assert verify_consistency(old_size, 100_000, old_root, tree_root, proof)


# --- Out-of-range arguments ------------------------------------------------------------------


def test_proof_builders_reject_out_of_range_arguments():
    leaves = [b"a", b"b", b"c"]
    for index in (-1, 3, 10):
        with pytest.raises(ValueError, match="outside a tree of 3 leaves"):
            inclusion_proof(leaves, index)
    with pytest.raises(ValueError):
        inclusion_proof([], 0)
    for old in (-1, 4):
        with pytest.raises(ValueError, match="old size"):
            consistency_proof(leaves, old)
    node = bounded_lookup(build_store(leaves), 3)
    with pytest.raises(ValueError):
        inclusion_path(3, 3, node)
    with pytest.raises(ValueError):
        consistency_path(3, 2, node)
    with pytest.raises(ValueError):
        peak_positions(-1)


# --- Verifiers never raise on garbage --------------------------------------------------------

garbage = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    hash32,
    st.builds(bytearray, hash32),
    st.lists(st.integers(), max_size=3),
)
garbage_int = st.one_of(st.integers(), st.integers(-3, 70), garbage)
garbage_proof = st.one_of(
    garbage,
    st.lists(st.one_of(hash32, garbage), max_size=8),
    st.tuples(hash32, garbage),
    st.lists(hash32, max_size=70),
)


@settings(max_examples=200, deadline=None)
@given(garbage, garbage_int, garbage_int, garbage_proof, garbage)
def test_verify_inclusion_returns_a_bool_for_any_input(leaf, index, size, proof, tree_root):
    assert verify_inclusion(leaf, index, size, proof, tree_root) in (True, False)


@settings(max_examples=200, deadline=None)
@given(garbage_int, garbage_int, garbage, garbage, garbage_proof)
def test_verify_consistency_returns_a_bool_for_any_input(old, new, old_root, new_root, proof):
    assert verify_consistency(old, new, old_root, new_root, proof) in (True, False)


LEAVES_5 = [b"a", b"b", b"c", b"d", b"e"]
GOOD_LEAF = leaf_hash(b"b")
GOOD_PROOF = inclusion_proof(LEAVES_5, 1)
GOOD_ROOT = root(LEAVES_5)


@pytest.mark.parametrize(
    ("leaf", "index", "size", "proof", "tree_root"),
    [
        pytest.param(GOOD_LEAF, -1, 5, GOOD_PROOF, GOOD_ROOT, id="negative-index"),
        pytest.param(GOOD_LEAF, 1, -5, GOOD_PROOF, GOOD_ROOT, id="negative-size"),
        pytest.param(GOOD_LEAF, 5, 5, GOOD_PROOF, GOOD_ROOT, id="index-equals-size"),
        pytest.param(GOOD_LEAF, 0, 0, [], root([]), id="empty-tree"),
        pytest.param(GOOD_LEAF, True, 5, GOOD_PROOF, GOOD_ROOT, id="bool-index"),
        pytest.param(GOOD_LEAF, 1.0, 5, GOOD_PROOF, GOOD_ROOT, id="float-index"),
        pytest.param(GOOD_LEAF, 1, "5", GOOD_PROOF, GOOD_ROOT, id="str-size"),
        pytest.param(GOOD_LEAF[:31], 1, 5, GOOD_PROOF, GOOD_ROOT, id="short-leaf"),
        pytest.param(GOOD_LEAF + b"\0", 1, 5, GOOD_PROOF, GOOD_ROOT, id="long-leaf"),
        pytest.param(GOOD_LEAF.hex(), 1, 5, GOOD_PROOF, GOOD_ROOT, id="hex-leaf"),
        pytest.param(GOOD_LEAF, 1, 5, GOOD_PROOF, GOOD_ROOT.hex(), id="hex-root"),
        pytest.param(GOOD_LEAF, 1, 5, GOOD_PROOF, None, id="no-root"),
        pytest.param(GOOD_LEAF, 1, 5, None, GOOD_ROOT, id="no-proof"),
        pytest.param(GOOD_LEAF, 1, 5, b"".join(GOOD_PROOF), GOOD_ROOT, id="joined-proof"),
        pytest.param(GOOD_LEAF, 1, 5, iter(GOOD_PROOF), GOOD_ROOT, id="iterator-proof"),
        pytest.param(GOOD_LEAF, 1, 5, [*GOOD_PROOF[:2], None], GOOD_ROOT, id="none-item"),
        pytest.param(GOOD_LEAF, 1, 5, [p.hex() for p in GOOD_PROOF], GOOD_ROOT, id="hex-items"),
        pytest.param(
            GOOD_LEAF, 1, 5, [*GOOD_PROOF[:2], GOOD_PROOF[2][:16]], GOOD_ROOT, id="short-item"
        ),
        pytest.param(GOOD_LEAF, 2**200, 2**201, GOOD_PROOF, GOOD_ROOT, id="huge-numbers"),
    ],
)
def test_verify_inclusion_rejects_malformed_input(leaf, index, size, proof, tree_root):
    assert verify_inclusion(GOOD_LEAF, 1, 5, GOOD_PROOF, GOOD_ROOT)
    assert verify_inclusion(leaf, index, size, proof, tree_root) is False


OLD_ROOT = root(LEAVES_5[:3])
GOOD_CONSISTENCY = consistency_proof(LEAVES_5, 3)


@pytest.mark.parametrize(
    ("old", "new", "old_root", "new_root", "proof"),
    [
        pytest.param(-1, 5, OLD_ROOT, GOOD_ROOT, GOOD_CONSISTENCY, id="negative-old"),
        pytest.param(3, -5, OLD_ROOT, GOOD_ROOT, GOOD_CONSISTENCY, id="negative-new"),
        pytest.param(6, 5, OLD_ROOT, GOOD_ROOT, GOOD_CONSISTENCY, id="old-after-new"),
        pytest.param(5, 3, GOOD_ROOT, OLD_ROOT, [], id="time-travel"),
        pytest.param(3.0, 5, OLD_ROOT, GOOD_ROOT, GOOD_CONSISTENCY, id="float-old"),
        pytest.param(3, None, OLD_ROOT, GOOD_ROOT, GOOD_CONSISTENCY, id="no-new"),
        pytest.param(3, 5, OLD_ROOT[:31], GOOD_ROOT, GOOD_CONSISTENCY, id="short-old-root"),
        pytest.param(3, 5, OLD_ROOT, GOOD_ROOT + b"\0", GOOD_CONSISTENCY, id="long-new-root"),
        pytest.param(3, 5, OLD_ROOT, bytearray(GOOD_ROOT), GOOD_CONSISTENCY, id="bytearray"),
        pytest.param(3, 5, OLD_ROOT, GOOD_ROOT, None, id="no-proof"),
        pytest.param(3, 5, OLD_ROOT, GOOD_ROOT, "proof", id="str-proof"),
        pytest.param(3, 5, OLD_ROOT, GOOD_ROOT, [*GOOD_CONSISTENCY, 7], id="int-item"),
        pytest.param(0, 5, b"", GOOD_ROOT, [], id="empty-old-root-bytes"),
        pytest.param(0, 0, None, None, [], id="empty-trees-without-roots"),
        pytest.param(2**70, 2**71, OLD_ROOT, GOOD_ROOT, GOOD_CONSISTENCY, id="huge-numbers"),
    ],
)
def test_verify_consistency_rejects_malformed_input(old, new, old_root, new_root, proof):
    assert verify_consistency(3, 5, OLD_ROOT, GOOD_ROOT, GOOD_CONSISTENCY)
    assert verify_consistency(old, new, old_root, new_root, proof) is False
