"""RFC 6962 / RFC 9162 Merkle tree hashing and proofs over SHA-256. Pure functions, no I/O.

Hashing (RFC 6962 section 2.1, RFC 9162 section 2.1.1):

    MTH({})      = SHA-256()                              the empty tree
    leaf hash    = SHA-256(0x00 || entry)
    node hash    = SHA-256(0x01 || left || right)
    MTH(D[n])    = node(MTH(D[0:k]), MTH(D[k:n]))  with k the largest power of two < n

Storage keeps the hash of every *complete* subtree, named by a ``NodeID`` ``(level, index)``:
the subtree of ``2**level`` leaves covering ``[index << level, (index + 1) << level)``; level 0
holds the leaf hashes. Any subtree RFC 6962 ever hashes (a left child, or a subtree running
to the right edge of the tree) is either complete or a right-edge subtree whose hash folds
from a handful of complete ones. The ``*_plan`` functions therefore say *which* complete
nodes each proof element needs, so a store fetches O(log n) rows in one query and calls
``fold_range`` on each group; ``inclusion_proof``/``consistency_proof`` do the same over an
in-memory list, for tests and small trees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dicomledger.common.errors import LedgerFormatError

NodeID = tuple[int, int]

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
MAX_TREE_SIZE = 2**63 - 1  # sizes and indices are stored as SQLite (signed 64-bit) integers


class ProofError(LedgerFormatError, ValueError):
    """A Merkle proof does not verify; the message says exactly what failed."""


def _sha256(*parts: bytes) -> bytes:
    # hashlib (OpenSSL's SHA-256) is 3x cheaper per call than cryptography's Hash object,
    # which matters when verify rehashes millions of nodes.
    return hashlib.sha256(b"".join(parts)).digest()


EMPTY_ROOT = _sha256()  # MTH({}) = SHA-256() (RFC 6962 section 2.1)


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 section 2.1: MTH({d(0)}) = SHA-256(0x00 || d(0))."""
    return _sha256(LEAF_PREFIX, data)


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 section 2.1: SHA-256(0x01 || MTH(left) || MTH(right))."""
    return _sha256(NODE_PREFIX, left, right)


def _split(n: int) -> int:
    """k, the largest power of two smaller than n (n > 1), as in RFC 6962 section 2.1."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= MAX_TREE_SIZE:
        raise ValueError(f"{name} {value} out of range 0..2**63-1")


def root_of_leaf_hashes(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves (RFC 6962 section 2.1), in O(n) time, O(log n) memory.

    Keeps the stack of complete subtrees (the "frontier"), merging equal-sized neighbours
    as leaves arrive, then folds the frontier from the right, which is exactly how RFC 6962
    splits at the largest power of two.
    """
    stack: list[tuple[int, bytes]] = []  # (level, hash), levels strictly decreasing
    for h in leaf_hashes:
        level = 0
        while stack and stack[-1][0] == level:
            h = node_hash(stack.pop()[1], h)
            level += 1
        stack.append((level, h))
    return fold_range([h for _, h in stack])


def range_nodes(start: int, end: int) -> list[NodeID]:
    """Complete subtrees covering leaves ``[start, end)``, left to right (a compact range).

    For an RFC 6962 subtree -- ``start`` a multiple of the smallest power of two >= ``end -
    start``, which is every range a proof or a root needs (``[0, n)``, and the right-edge
    subtrees ``[k, n)`` of RFC 6962's recursion) -- this is the binary expansion of the
    range's length: largest node first, and ``fold_range`` of their hashes is
    ``MTH(D[start:end])``. Other ranges get the usual compact range (sizes rising, then
    falling); their fold is not an RFC 6962 hash.
    """
    _check_size("start", start)
    _check_size("end", end)
    if start > end:
        raise ValueError(f"range start {start} > end {end}")
    nodes: list[NodeID] = []
    while start < end:
        level = (end - start).bit_length() - 1  # the largest block that fits...
        if start:
            level = min(level, (start & -start).bit_length() - 1)  # ...and is aligned at start
        nodes.append((level, start >> level))
        start += 1 << level
    return nodes


def fold_range(hashes: Sequence[bytes]) -> bytes:
    """Hash of the subtree whose ``range_nodes`` hashes are given, folded from the right.

    ``fold_range([a, b, c]) = node_hash(a, node_hash(b, c))``; one hash folds to itself; the
    empty sequence folds to MTH({}) = SHA-256(), so ``fold_range`` of ``root_plan(0)`` is the
    empty tree's root.
    """
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def root_plan(size: int) -> list[NodeID]:
    """Complete nodes whose ``fold_range`` is MTH(D[0:size]); equals ``range_nodes(0, size)``."""
    return range_nodes(0, size)


def _inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges of the RFC 9162 section 2.1.3.1 PATH(index, D[size]) elements, leaf to root."""
    _check_size("index", index)
    _check_size("size", size)
    if index >= size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    out: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:  # PATH(m, D[0:k]) : MTH(D[k:n])
            out.append((lo + k, hi))
            hi = lo + k
        else:  # PATH(m - k, D[k:n]) : MTH(D[0:k])
            out.append((lo, lo + k))
            lo += k
    out.reverse()
    return out


def _consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """Leaf ranges of the RFC 9162 section 2.1.4.1 PROOF(old, D[new]) elements, in proof order.

    Empty when ``old_size`` is 0 or equal to ``new_size``: no proof is needed then
    (C2SP tlog-witness: "the empty tree is consistent with any tree").
    """
    _check_size("old size", old_size)
    _check_size("new size", new_size)
    if old_size > new_size:
        raise ValueError(f"old size {old_size} > new size {new_size}")
    if old_size in (0, new_size):
        return []
    # SUBPROOF(m, D[lo:hi], b): walk down, collecting the sibling subtree at every split.
    siblings: list[tuple[int, int]] = []
    lo, hi, m, b = 0, new_size, old_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:  # SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
            siblings.append((lo + k, hi))
            hi = lo + k
        else:  # SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
            siblings.append((lo, lo + k))
            lo, m, b = lo + k, m - k, False
    head = [] if b else [(lo, hi)]  # m == n: [] if b else [MTH(D[m])]
    return head + siblings[::-1]


def inclusion_proof_plan(index: int, size: int) -> list[list[NodeID]]:
    """For each element of the inclusion proof (RFC 9162 section 2.1.3.1, leaf-to-root order),
    the complete nodes whose ``fold_range`` gives it."""
    return [range_nodes(a, b) for a, b in _inclusion_ranges(index, size)]


def consistency_proof_plan(old_size: int, new_size: int) -> list[list[NodeID]]:
    """For each element of the consistency proof (RFC 9162 section 2.1.4.1, in proof order),
    the complete nodes whose ``fold_range`` gives it. Empty if ``old_size`` is 0 or equals
    ``new_size``."""
    return [range_nodes(a, b) for a, b in _consistency_ranges(old_size, new_size)]


def nodes_added_by_append(size_before: int) -> list[NodeID]:
    """Complete nodes of level >= 1 that leaf number ``size_before`` completes, bottom-up.

    Leaf ``s`` completes node ``(l, s >> l)`` exactly when the low ``l`` bits of ``s`` are
    all ones, so there are as many as ``s`` has trailing one bits. Each one's children are
    ``(l - 1, 2 * (s >> l))`` and ``(l - 1, 2 * (s >> l) + 1)``, the latter being the node
    completed just before it (or the new leaf).
    """
    _check_size("size", size_before)
    if size_before == MAX_TREE_SIZE:
        raise ValueError("tree is full")
    out: list[NodeID] = []
    level = 1
    while (size_before >> (level - 1)) & 1:
        out.append((level, size_before >> level))
        level += 1
    return out


@dataclass
class Frontier:
    """The right edge of a growing tree: for each level, the newest complete node.

    Enough to append leaves and to compute the root without reading anything else; the
    nodes appending creates are returned so storage can keep them for later proofs.
    """

    size: int = 0
    newest: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # level -> (index, hash)

    def copy(self) -> Frontier:
        return Frontier(self.size, dict(self.newest))

    def append(self, leaf: bytes) -> list[tuple[NodeID, bytes]]:
        """Add leaf number ``size``; returns every node it completes, the leaf first."""
        index = self.size
        created: list[tuple[NodeID, bytes]] = [((0, index), leaf)]
        # Bottom-up: each new node's left child is the previous newest node one level
        # down, its right child the node completed just now.
        previous = self.newest.get(0)
        self.newest[0] = (index, leaf)
        h = leaf
        for level, idx in nodes_added_by_append(index):
            assert previous is not None and previous[0] == 2 * idx
            h = node_hash(previous[1], h)
            created.append(((level, idx), h))
            previous = self.newest.get(level)
            self.newest[level] = (idx, h)
        self.size += 1
        return created

    def root(self) -> bytes:
        """MTH of the first ``size`` leaves: the complete nodes of root_plan(size) are
        exactly the newest nodes at the levels of size's set bits."""
        if self.size == 0:
            return EMPTY_ROOT
        return fold_range([self.newest[level][1] for level, _ in root_plan(self.size)])

    @classmethod
    def needed_nodes(cls, size: int) -> list[NodeID]:
        """The stored nodes a frontier of a tree of ``size`` leaves is made of."""
        return [(level, (size >> level) - 1) for level in range(size.bit_length())]

    @classmethod
    def from_nodes(cls, size: int, nodes: Mapping[NodeID, bytes]) -> Frontier:
        return cls(
            size, {level: (idx, nodes[(level, idx)]) for level, idx in cls.needed_nodes(size)}
        )


def _check_hash(what: str, h: bytes) -> None:
    if not isinstance(h, bytes | bytearray) or len(h) != HASH_SIZE:
        got = f"{len(h)} bytes" if isinstance(h, bytes | bytearray) else type(h).__name__
        raise ProofError(f"{what} is {got}, not a {HASH_SIZE}-byte SHA-256 hash")


def _short(h: bytes) -> str:
    return bytes(h).hex()[:16]


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 section 2.1.3.2: check that ``leaf_hash`` is leaf ``index`` of the tree of
    ``size`` leaves whose root is ``root``. Raises ``ProofError`` naming what failed."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ProofError(f"leaf index {index!r} is not a non-negative integer")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
        raise ProofError(f"tree size {size!r} is not an integer in 0..2**63-1")
    if index >= size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    _check_hash("leaf hash", leaf_hash)
    _check_hash("root hash", root)
    for i, p in enumerate(proof):
        _check_hash(f"proof hash {i}", p)
    expected = len(_inclusion_ranges(index, size))
    if len(proof) != expected:
        raise ProofError(
            f"inclusion proof has {len(proof)} hashes, a proof for leaf {index} "
            f"of a tree of size {size} has {expected}"
        )
    fn, sn, r = index, size - 1, bytes(leaf_hash)
    for p in proof:
        if sn == 0:  # unreachable after the length check; kept as in the RFC
            raise ProofError("inclusion proof is too long")
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
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    if r != root:
        raise ProofError(
            f"inclusion proof for leaf {index} of size {size} leads to root {_short(r)}..., "
            f"not {_short(root)}..."
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 section 2.1.4.2: check that the tree of ``new_size`` leaves with root
    ``new_root`` extends the one of ``old_size`` leaves with root ``old_root``.

    Edge cases (outside the RFC algorithm, which needs 0 < old < new): equal sizes need an
    empty proof and equal roots; ``old_size`` 0 needs an empty proof and ``old_root`` equal
    to the empty tree's root, as C2SP tlog-witness specifies. Raises ``ProofError``.
    """
    for name, value in (("old size", old_size), ("new size", new_size)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TREE_SIZE:
            raise ProofError(f"{name} {value!r} is not an integer in 0..2**63-1")
    if old_size > new_size:
        raise ProofError(f"old size {old_size} is larger than new size {new_size}")
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    for i, p in enumerate(proof):
        _check_hash(f"proof hash {i}", p)
    if old_size == 0:
        if proof:
            raise ProofError(
                f"consistency proof from size 0 must be empty, has {len(proof)} hashes"
            )
        if old_root != EMPTY_ROOT:
            raise ProofError(f"old root {_short(old_root)}... is not the empty tree's root")
        return
    if old_size == new_size:
        if proof:
            raise ProofError(
                f"consistency proof between equal sizes must be empty, has {len(proof)} hashes"
            )
        if old_root != new_root:
            raise ProofError(
                f"different roots {_short(old_root)}... and {_short(new_root)}... "
                f"for the same size {old_size}"
            )
        return
    expected = len(_consistency_ranges(old_size, new_size))
    if len(proof) != expected:
        raise ProofError(
            f"consistency proof has {len(proof)} hashes, a proof from size {old_size} "
            f"to {new_size} has {expected}"
        )
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two: prepend first_hash
        path.insert(0, bytes(old_root))
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:  # unreachable after the length check; kept as in the RFC
            raise ProofError("consistency proof is too long")
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
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != old_root:
        raise ProofError(
            f"consistency proof from size {old_size} leads to old root {_short(fr)}..., "
            f"not {_short(old_root)}..."
        )
    if sr != new_root:
        raise ProofError(
            f"consistency proof to size {new_size} leads to new root {_short(sr)}..., "
            f"not {_short(new_root)}..."
        )


class _Nodes:
    """All complete-node hashes of an in-memory tree, for the simple proof builders."""

    def __init__(self, leaf_hashes: Sequence[bytes], size: int) -> None:
        if len(leaf_hashes) < size:
            raise ValueError(f"need {size} leaf hashes, got {len(leaf_hashes)}")
        self.levels: list[list[bytes]] = [list(leaf_hashes[:size])]
        while len(self.levels[-1]) > 1:
            row = self.levels[-1]
            self.levels.append([node_hash(row[i], row[i + 1]) for i in range(0, len(row) - 1, 2)])

    def fold(self, plan: Sequence[NodeID]) -> bytes:
        return fold_range([self.levels[level][index] for level, index in plan])


def inclusion_proof(index: int, size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[size]) (RFC 9162 section 2.1.3.1) from the first ``size`` leaf hashes."""
    plans = inclusion_proof_plan(index, size)
    nodes = _Nodes(leaf_hashes, size)
    return [nodes.fold(plan) for plan in plans]


def consistency_proof(old_size: int, new_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(old_size, D[new_size]) (RFC 9162 section 2.1.4.1) from the first ``new_size``
    leaf hashes; empty if ``old_size`` is 0 or equals ``new_size``."""
    plans = consistency_proof_plan(old_size, new_size)
    nodes = _Nodes(leaf_hashes, new_size)
    return [nodes.fold(plan) for plan in plans]
