"""The ledger's Merkle tree: RFC 9162 §2.1 hashes, inclusion and consistency proofs, verifiers.

Proofs are built from a `node(level, index)` lookup so the store needs O(log n) work per proof
and per append (`CompactRange`); the list-based functions are thin wrappers for small callers.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeLookup = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 ‖ data), the RFC 6962 leaf hash.

    >>> leaf_hash(b"").hex()[:8]
    '6e340b9c'
    """
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 ‖ left ‖ right), the hash of an interior node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly less than n (n >= 2): where MTH splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


def _fold_peaks(peaks: Sequence[bytes]) -> bytes:
    # The left part of every RFC split is the largest perfect subtree, so MTH of a range is
    # its binary-decomposition peaks folded from the right.
    if not peaks:
        return EMPTY_ROOT
    acc = peaks[-1]
    for peak in reversed(peaks[:-1]):
        acc = node_hash(peak, acc)
    return acc


def peak_positions(size: int) -> list[tuple[int, int]]:
    """(level, index) of the perfect subtrees that make up a tree of `size` leaves, left to right.

    >>> peak_positions(6)
    [(2, 0), (1, 2)]
    """
    if size < 0:
        raise ValueError(f"tree size must be >= 0, got {size}")
    positions = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            positions.append((level, start >> level))
            start += 1 << level
    return positions


def subtree_root(start: int, end: int, node: NodeLookup) -> bytes:
    """MTH(D[start:end]) from perfect-subtree hashes; SHA-256(b"") when the range is empty.

    `start` must be a multiple of the largest power of two not above `end - start`, as every
    subtree in the RFC recursion is; otherwise the range does not split into stored nodes.
    """
    size = end - start
    if start < 0 or size < 0:
        raise ValueError(f"subtree range [{start}, {end}) is not a range of leaves")
    if size == 0:
        return EMPTY_ROOT
    top = size.bit_length() - 1
    if start % (1 << top):
        raise ValueError(
            f"subtree [{start}, {end}) starts at {start}, which is not a multiple of {1 << top}"
        )
    return _fold_peaks(
        [node(level, (start >> level) + index) for level, index in peak_positions(size)]
    )


def inclusion_path(index: int, size: int, node: NodeLookup) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 §2.1.3.1, bottom-up, from perfect-subtree hashes."""
    index, size = operator.index(index), operator.index(size)
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of {size} leaves")
    siblings = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            siblings.append(subtree_root(start + k, end, node))
            end = start + k
        else:
            siblings.append(subtree_root(start, start + k, node))
            start += k
    siblings.reverse()
    return siblings


def consistency_path(old_size: int, new_size: int, node: NodeLookup) -> list[bytes]:
    """PROOF(old_size, D[0:new_size]) of RFC 9162 §2.1.4.1, bottom-up; empty when old_size is 0
    or equal to new_size."""
    old_size, new_size = operator.index(old_size), operator.index(new_size)
    if not 0 <= old_size <= new_size:
        raise ValueError(
            f"consistency needs 0 <= old size <= new size, got old {old_size} and new {new_size}"
        )
    if old_size in (0, new_size):
        return []
    nodes = []
    start, end, m, whole_old_tree = 0, new_size, old_size, True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            nodes.append(subtree_root(start + k, end, node))
            end = start + k
        else:
            nodes.append(subtree_root(start, start + k, node))
            start, m, whole_old_tree = start + k, m - k, False
    if not whole_old_tree:
        # The verifier knows the old root but not this smaller piece of the old tree.
        nodes.append(subtree_root(start, end, node))
    nodes.reverse()
    return nodes


class CompactRange:
    """The peaks of a growing tree: appends and the root cost O(log n), no leaf list needed.

    >>> cr = CompactRange()
    >>> cr.append(leaf_hash(b"a")), [level for level, _, _ in cr.append(leaf_hash(b"b"))]
    ([], [1])
    """

    def __init__(self, size: int = 0, peaks: Sequence[bytes] = ()) -> None:
        expected = len(peak_positions(size))
        if len(peaks) != expected:
            raise ValueError(
                f"a tree of {size} leaves has {expected} peaks, got {len(peaks)} peak hashes"
            )
        for peak in peaks:
            _require_hash(peak, "peak")
        self.size = size
        self.peaks = list(peaks)

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; return (level, index, hash) of each perfect subtree of level >= 1
        that it completes, lowest first, so the store can persist them."""
        _require_hash(leaf_hash, "leaf hash")
        completed = []
        acc, index, level = leaf_hash, self.size, 0
        while index & 1:
            acc = node_hash(self.peaks.pop(), acc)
            index >>= 1
            level += 1
            completed.append((level, index, acc))
        self.peaks.append(acc)
        self.size += 1
        return completed

    def append_subtree(self, level: int, subtree_root: bytes) -> list[tuple[int, int, bytes]]:
        """Add 2^level leaves at once by the root of their perfect subtree (see
        `subtree_levels`); the tree's size must be a multiple of 2^level. Returns what
        `append` of each leaf would have returned for the nodes above `level`, lowest first.

        >>> one, two = CompactRange(), CompactRange()
        >>> leaves = [leaf_hash(bytes([i])) for i in range(4)]
        >>> _ = [one.append(leaf) for leaf in leaves]
        >>> _ = two.append_subtree(2, subtree_levels(leaves)[-1][0])
        >>> one.root() == two.root() and two.size == 4
        True
        """
        _require_hash(subtree_root, "subtree root")
        if level < 0 or self.size % (1 << level):
            raise ValueError(f"a subtree of 2^{level} leaves cannot start at leaf {self.size}")
        self.size += 1 << level
        completed = []
        acc, index = subtree_root, (self.size - 1) >> level
        while index & 1:
            acc = node_hash(self.peaks.pop(), acc)
            index >>= 1
            level += 1
            completed.append((level, index, acc))
        self.peaks.append(acc)
        return completed

    def root(self) -> bytes:
        """MTH of every leaf appended so far; SHA-256(b"") when empty."""
        return _fold_peaks(self.peaks)

    def __repr__(self) -> str:
        return f"CompactRange(size={self.size}, peaks={len(self.peaks)})"


def _require_hash(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        found = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise ValueError(f"{what} must be {HASH_SIZE} bytes, got {found}")


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every perfect-subtree hash of the tree over `leaves`, levels[level][index]."""
    levels = [[leaf_hash(data) for data in leaves]]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
    return levels


def subtree_levels(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """Every node of the perfect subtree over `leaf_hashes` (2^k of them), levels[level][i]:
    levels[0] the leaf hashes themselves, levels[k] the subtree's root alone.

    >>> [len(level) for level in subtree_levels([leaf_hash(b"a")] * 4)]
    [4, 2, 1]
    """
    count = len(leaf_hashes)
    if count == 0 or count & (count - 1):
        raise ValueError(f"a perfect subtree has a power of two leaves, got {count}")
    levels = [list(leaf_hashes)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below), 2)])
    return levels


def _lookup(levels: list[list[bytes]]) -> NodeLookup:
    return lambda level, index: levels[level][index]


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over the leaf *data* (each item is hashed as a leaf first)."""
    tree = CompactRange()
    for data in leaves:
        tree.append(leaf_hash(data))
    return tree.root()


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path proving leaf `index` is in the tree over `leaves`."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is outside a tree of {len(leaves)} leaves")
    return inclusion_path(index, len(leaves), _lookup(_levels(leaves)))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """The proof that the tree over `leaves[:old_size]` is a prefix of the tree over `leaves`."""
    if not 0 <= old_size <= len(leaves):
        raise ValueError(
            f"old size {old_size} is outside 0..{len(leaves)}, the size of the new tree"
        )
    return consistency_path(old_size, len(leaves), _lookup(_levels(leaves)))


# Verifiers take input from peers and files: anything malformed is a failed proof, not an error.


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _hash_list(proof: object) -> list[bytes] | None:
    if isinstance(proof, (str, bytes, bytearray, memoryview)) or not isinstance(proof, Sequence):
        return None
    try:
        items = list(proof)
    except Exception:  # a caller's Sequence may be anything; verifiers must not raise
        return None
    return items if all(_is_hash(item) for item in items) else None


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does `proof` show `leaf_hash` at `index` in the tree with `root`?"""
    path = _hash_list(proof)
    if path is None or not (_is_count(index) and _is_count(size)) or index >= size:
        return False
    if not (_is_hash(leaf_hash) and _is_hash(root)):
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: does `proof` show the tree (old_size, old_root) is a prefix of
    (new_size, new_root)? Equal sizes need equal roots and an empty proof; every tree extends
    the empty one (old_size 0), with an empty proof."""
    path = _hash_list(proof)
    if path is None or not (_is_count(old_size) and _is_count(new_size)):
        return False
    if old_size > new_size or not (_is_hash(old_root) and _is_hash(new_root)):
        return False
    if old_size == new_size:
        return not path and old_root == new_root
    if old_size == 0:
        return not path
    if not path:
        return False
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
