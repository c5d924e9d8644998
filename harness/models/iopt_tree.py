"""The ordered area tree of one IOAS, with the free gap before each area.

Stands for ``iopt->area_itree`` of ``struct io_pagetable`` (Linux 6.12,
``drivers/iommu/iommufd/io_pagetable.h``: the interval tree of
``struct iopt_area`` that ``iopt_area_iter_first``/``iopt_area_iter_next``
walk), plus what ``iopt_alloc_iova`` asks of it (``io_pagetable.c``: the holes
between areas, via ``interval_tree_span_iter``).  The kernel's areas never
overlap, so an ordered tree keyed by the first IOVA is enough.

The tree is a treap keyed by ``iova`` (bytes, IO-virtual) of items that have
``iova`` and ``last`` (inclusive) attributes, non-overlapping; in the pinning
model they are :class:`harness.models.pinning._Area`.  Each node also holds
``pgap``, the free bytes between the previous item (or IOVA 0) and its own, and
the subtree's largest ``pgap``, so that the first gap of a given size after a
given IOVA is found without visiting every item.  Priorities come from a fixed
seed: the shape varies, never a result.  The model uses :class:`_AreaTree`
(and reads :class:`_Node`'s ``start``, ``pgap`` and ``area`` while it searches
for a hole); everything else here is internal.

Complexity (n items): ``insert``, ``remove``, ``floor``, ``higher``,
``first_intersecting`` and ``first_gap_after`` O(log n) expected; ``hi`` O(1);
iteration O(n).  Pure Python, no I/O.  ``remove`` of an item not in the tree
raises ``AssertionError`` (a bug in the caller).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class _Span(Protocol):
    """What the tree needs of an item: its first and last IOVA (bytes, inclusive)."""

    iova: int
    last: int


_A = TypeVar("_A", bound=_Span)


class _Node(Generic[_A]):
    __slots__ = ("area", "start", "prio", "left", "right", "pgap", "maxgap", "hi")

    def __init__(self, area: _A, prio: int) -> None:
        self.area = area
        self.start = area.iova
        self.prio = prio
        self.left: _Node[_A] | None = None
        self.right: _Node[_A] | None = None
        self.pgap = 0  # free bytes between the previous area (or 0) and this one
        self.maxgap = 0  # largest pgap in the subtree
        self.hi = area.last  # last byte of the subtree's rightmost area


def _update(n: _Node[_A]) -> None:
    g = n.pgap
    left, right = n.left, n.right
    if left is not None and left.maxgap > g:
        g = left.maxgap
    if right is not None:
        if right.maxgap > g:
            g = right.maxgap
        n.hi = right.hi
    else:
        n.hi = n.area.last
    n.maxgap = g


def _split(t: _Node[_A] | None, key: int) -> tuple[_Node[_A] | None, _Node[_A] | None]:
    """(nodes with start < key, nodes with start >= key)."""
    if t is None:
        return None, None
    if t.start < key:
        a, b = _split(t.right, key)
        t.right = a
        _update(t)
        return t, b
    a, b = _split(t.left, key)
    t.left = b
    _update(t)
    return a, t


def _merge(a: _Node[_A] | None, b: _Node[_A] | None) -> _Node[_A] | None:
    if a is None:
        return b
    if b is None:
        return a
    if a.prio > b.prio:
        a.right = _merge(a.right, b)
        _update(a)
        return a
    b.left = _merge(a, b.left)
    _update(b)
    return b


def _set_leftmost_pgap(t: _Node[_A], prev_last: int) -> None:
    if t.left is None:
        t.pgap = t.start - prev_last - 1
    else:
        _set_leftmost_pgap(t.left, prev_last)
    _update(t)


class _AreaTree(Generic[_A]):
    """The areas of one IOAS (``iopt->area_itree``), non-overlapping, in a
    treap keyed by IOVA and augmented with the free gap before each area, so
    that the first gap of a given size is found in O(log n)."""

    __slots__ = ("root", "count", "_rng")

    def __init__(self) -> None:
        self.root: _Node[_A] | None = None
        self.count = 0
        self._rng = random.Random(0x10AD)  # tree shape only; results never depend on it

    def insert(self, area: _A) -> None:
        node = _Node(area, self._rng.getrandbits(32))
        left, right = _split(self.root, area.iova)
        node.pgap = area.iova - (left.hi if left is not None else -1) - 1
        _update(node)
        if right is not None:
            _set_leftmost_pgap(right, area.last)
        self.root = _merge(_merge(left, node), right)
        self.count += 1

    def remove(self, area: _A) -> None:
        left, rest = _split(self.root, area.iova)
        mid, right = _split(rest, area.iova + 1)
        if mid is None or mid.area is not area:
            raise AssertionError("area not in its tree")
        if right is not None:
            _set_leftmost_pgap(right, left.hi if left is not None else -1)
        self.root = _merge(left, right)
        self.count -= 1

    def floor(self, x: int) -> _A | None:
        """The area with the largest iova <= x."""
        n, best = self.root, None
        while n is not None:
            if n.start <= x:
                best = n
                n = n.right
            else:
                n = n.left
        return best.area if best is not None else None

    def higher(self, x: int) -> _Node[_A] | None:
        """The node with the smallest iova > x."""
        n, best = self.root, None
        while n is not None:
            if n.start > x:
                best = n
                n = n.left
            else:
                n = n.right
        return best

    def first_intersecting(self, first: int, last: int) -> _A | None:
        """``iopt_area_iter_first(iopt, first, last)``: lowest area meeting the range."""
        a = self.floor(first)
        if a is not None and a.last >= first:
            return a
        n = self.higher(first)
        if n is not None and n.start <= last:
            return n.area
        return None

    def first_gap_after(self, x: int, size: int) -> _Node[_A] | None:
        """The lowest node with iova > x whose preceding gap is >= size bytes."""
        return _first_gap(self.root, x, size)

    def hi(self) -> int:
        return self.root.hi if self.root is not None else -1

    def __iter__(self) -> Iterator[_A]:
        stack: list[_Node[_A]] = []
        n = self.root
        while stack or n is not None:
            while n is not None:
                stack.append(n)
                n = n.left
            n = stack.pop()
            yield n.area
            n = n.right


def _first_gap(n: _Node[_A] | None, x: int, size: int) -> _Node[_A] | None:
    if n is None or n.maxgap < size:
        return None
    if n.start > x:
        found = _first_gap(n.left, x, size)
        if found is not None:
            return found
        if n.pgap >= size:
            return n
    return _first_gap(n.right, x, size)
