"""Reference model of the vhost IOTLB (Linux ``drivers/vhost/iotlb.c``).

The vhost IOTLB maps ranges of one address space to another.  With a device
IOTLB (a vIOMMU in front of the device) the ranges are IO-virtual addresses
(IOVAs, what the guest programs into the device); for vhost's own memory table
they are guest-physical addresses.  The target ``addr`` is a user virtual
address of the VMM for vhost, and a host physical (or, for VA-based devices,
user virtual) address for vhost-vDPA.  This module calls the first space
"IOVA" throughout.

It is an *oracle*: it states what the kernel promises about that structure,
so the harness can replay observed IOTLB updates and invalidations into it
and judge the translations the kernel performed.  It is pure Python, has no
I/O and no clock, and is deterministic.

Sources of the semantics (Linux):

* ``drivers/vhost/iotlb.c``: ``vhost_iotlb_add_range_ctx`` (the
  ``[0, U64_MAX]`` split, the retire rule), ``vhost_iotlb_del_range`` (removes
  whole maps that overlap), ``vhost_iotlb_reset``, ``vhost_iotlb_itree_first``
  and ``vhost_iotlb_itree_next``.
* ``include/linux/vhost_iotlb.h``: the map fields, ``VHOST_MAP_*`` and
  ``VHOST_IOTLB_FLAG_RETIRE``.
* ``include/linux/interval_tree_generic.h``: the overlap predicate
  (``map.start <= last and start <= map.last``) and the iteration order (in
  order of the tree: ascending start; an equal start is inserted to the right,
  so ties come out in insertion order).
* ``drivers/vhost/vhost.c``: ``translate_desc`` and ``iotlb_access_ok`` (a
  lookup takes the first map overlapping the access; it misses when there is
  none or when that map starts above the address, and faults when the map's
  permission lacks the access).

All addresses and sizes are in bytes; ranges are closed: ``[start, last]``
includes both ends.  Every value the kernel holds in a ``u64`` must be an
``int`` in ``[0, U64_MAX]``.

Exception hierarchy::

    IOTLBError                      root of every error raised on purpose here
     +-- InvalidRange (ValueError)  bad argument: last < start, an address or
     |                              value outside u64 (or perm outside u32),
     |                              negative, not an int, or a bad access kind
     +-- IOTLBMiss                  translate(): no map covers the IOVA
     |                              (fields: iova, access)
     +-- IOTLBPermissionFault       translate(): the covering map does not
                                    allow the access (fields: iova, access, map)

``IOTLB.next`` raises a plain ``IOTLBError`` when handed a map that is no
longer in that IOTLB.

Complexity (n maps, k results): ``add_range``, ``first``, ``next`` and
``translate`` are O(log n); ``del_range`` is O((k + 1) log n), i.e. O(log n)
per removed map, like the kernel's repeated ``rb_erase``; ``reset`` and
``len`` are O(1); iterating the whole IOTLB is O(n).  The maps live in an AVL
tree keyed by ``(start, insertion sequence)`` and augmented with the largest
``last`` of each subtree, plus an insertion-ordered dictionary for the retire
rule.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Final, NoReturn

__all__ = [
    "U64_MAX",
    "U32_MAX",
    "VHOST_MAP_RO",
    "VHOST_MAP_WO",
    "VHOST_MAP_RW",
    "IOTLBError",
    "InvalidRange",
    "IOTLBMiss",
    "IOTLBPermissionFault",
    "IOTLBMap",
    "IOTLB",
]

U64_MAX: Final = 2**64 - 1
"""Largest ``u64``; ``[0, U64_MAX]`` is the whole IOVA space."""

U32_MAX: Final = 2**32 - 1
"""Largest ``u32`` (``perm`` and ``limit`` are 32-bit in the kernel)."""

VHOST_MAP_RO: Final = 1
"""Permission / access bit: the device may read (``include/linux/vhost_iotlb.h``)."""

VHOST_MAP_WO: Final = 2
"""Permission / access bit: the device may write."""

VHOST_MAP_RW: Final = 3
"""Both bits: read and write."""

_U63: Final = 2**63  # first byte of the upper half of the [0, U64_MAX] split

_PERM_NAMES: Final = {0: "NONE", VHOST_MAP_RO: "RO", VHOST_MAP_WO: "WO", VHOST_MAP_RW: "RW"}


def _hex(value: object) -> str:
    """Render ints in hex (ints that are not bools), anything else with repr()."""
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value)
    return repr(value)


def _perm_name(perm: int) -> str:
    name = _PERM_NAMES.get(perm)
    return name if name is not None else hex(perm)


# --------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------


class IOTLBError(Exception):
    """Root of the errors raised by this model."""


class InvalidRange(IOTLBError, ValueError):
    """An argument is out of its domain.

    Raised when ``last < start`` in ``add_range``; when an address, size or
    value is not an ``int`` (``bool`` is refused), is negative, or does not
    fit its kernel type (``u64`` for addresses, ``u32`` for ``perm`` and
    ``limit``); and when a translation ``access`` is not 1, 2 or 3.

    Fields: ``argument`` (the parameter's name), ``value`` (what was passed),
    ``reason`` (what is wrong with it).
    """

    def __init__(self, argument: str, value: object, reason: str) -> None:
        super().__init__(argument, value, reason)
        self.argument = argument
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid {self.argument}={_hex(self.value)}: {self.reason}"


class IOTLBMiss(IOTLBError):
    """No map covers ``iova`` (the kernel answers -EAGAIN/-EFAULT and, for a
    device IOTLB, queues a ``VHOST_IOTLB_MISS`` message to user space).

    Fields: ``iova`` (the IO-virtual byte address looked up) and ``access``
    (the ``VHOST_MAP_*`` bits requested).
    """

    def __init__(self, iova: int, access: int) -> None:
        super().__init__(iova, access)
        self.iova = iova
        self.access = access

    def __str__(self) -> str:
        return (
            f"IOTLB miss: no map covers iova {_hex(self.iova)} "
            f"(access {_perm_name(self.access)})"
        )


class IOTLBPermissionFault(IOTLBError):
    """The map covering ``iova`` does not grant ``access`` (the kernel's -EPERM).

    Fields: ``iova``, ``access`` (the ``VHOST_MAP_*`` bits requested) and
    ``map`` (the :class:`IOTLBMap` that was found).
    """

    def __init__(self, iova: int, access: int, map: IOTLBMap) -> None:
        super().__init__(iova, access, map)
        self.iova = iova
        self.access = access
        self.map = map

    def __str__(self) -> str:
        return (
            f"IOTLB permission fault: access {_perm_name(self.access)} at iova "
            f"{_hex(self.iova)} not allowed by {self.map!r}"
        )


# --------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------


def _bad(argument: str, value: object, limit: int) -> NoReturn:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRange(argument, value, f"must be an int, not {type(value).__name__}")
    if value < 0:
        raise InvalidRange(argument, value, "must not be negative")
    raise InvalidRange(argument, value, f"does not fit in [0, {hex(limit)}]")


# The public methods first test the common case inline (``type(x) is int``
# and in range) and call these only when that fails; they accept int
# subclasses other than bool (an IntEnum, say) and raise for everything else.


def _check_u64(argument: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64_MAX:
        _bad(argument, value, U64_MAX)


def _check_u32(argument: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U32_MAX:
        _bad(argument, value, U32_MAX)


def _check_access(access: object) -> None:
    if isinstance(access, int) and not isinstance(access, bool):
        if VHOST_MAP_RO <= access <= VHOST_MAP_RW:
            return
    raise InvalidRange(
        "access", access, "must be VHOST_MAP_RO (1), VHOST_MAP_WO (2) or VHOST_MAP_RW (3)"
    )


# --------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------


class IOTLBMap:
    """One IOTLB entry (``struct vhost_iotlb_map``): IOVAs ``[start, last]``
    map to ``[addr, addr + size - 1]`` (mod 2**64) with permission ``perm``.

    Attributes (read-only):

    * ``start``, ``last``: first and last IOVA covered (byte addresses).
    * ``size``: ``last - start + 1``, in bytes.
    * ``addr``: the address ``start`` translates to, a ``u64`` (user virtual
      for vhost, physical or user virtual for vhost-vDPA).
    * ``perm``: ``VHOST_MAP_*`` bits, stored as given (any ``u32``).
    * ``opaque``: any object attached by the caller (``add_range_ctx``'s
      ``opaque``); shared by both halves of a ``[0, U64_MAX]`` split.

    Maps are created by :meth:`IOTLB.add_range`; they compare by identity,
    like the kernel's map pointers: two maps with equal fields are distinct
    entries.
    """

    __slots__ = ("start", "last", "size", "addr", "perm", "opaque", "_seq")

    start: int
    last: int
    size: int
    addr: int
    perm: int
    opaque: object
    _seq: int

    def __init__(
        self, start: int, last: int, addr: int, perm: int, opaque: object = None, *, _seq: int = -1
    ) -> None:
        setter = object.__setattr__
        setter(self, "start", start)
        setter(self, "last", last)
        setter(self, "size", last - start + 1)
        setter(self, "addr", addr)
        setter(self, "perm", perm)
        setter(self, "opaque", opaque)
        setter(self, "_seq", _seq)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"IOTLBMap is read-only (cannot set {name!r})")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"IOTLBMap is read-only (cannot delete {name!r})")

    def __repr__(self) -> str:
        text = (
            f"IOTLBMap(start={self.start:#x}, last={self.last:#x}, size={self.size:#x}, "
            f"addr={self.addr:#x}, perm={_perm_name(self.perm)}"
        )
        if self.opaque is not None:
            text += f", opaque={self.opaque!r}"
        return text + ")"


# --------------------------------------------------------------------------
# The augmented AVL tree (internal)
# --------------------------------------------------------------------------


class _Node:
    """A tree node keyed by ``(start, seq)``; ``max_last`` is the largest
    ``last`` in the subtree rooted here (the kernel's ``__subtree_last``)."""

    __slots__ = ("start", "seq", "last", "map", "left", "right", "height", "max_last")

    def __init__(self, m: IOTLBMap) -> None:
        self.start: int = m.start
        self.seq: int = m._seq
        self.last: int = m.last
        self.map: IOTLBMap = m
        self.left: _Node | None = None
        self.right: _Node | None = None
        self.height: int = 1
        self.max_last: int = m.last


def _update(node: _Node) -> None:
    """Recompute ``height`` and ``max_last`` of ``node`` from its children."""
    left, right = node.left, node.right
    height = 0
    max_last = node.last
    if left is not None:
        height = left.height
        if left.max_last > max_last:
            max_last = left.max_last
    if right is not None:
        if right.height > height:
            height = right.height
        if right.max_last > max_last:
            max_last = right.max_last
    node.height = height + 1
    node.max_last = max_last


def _height(node: _Node | None) -> int:
    return 0 if node is None else node.height


def _rotate_left(node: _Node) -> _Node:
    pivot = node.right
    assert pivot is not None
    node.right = pivot.left
    pivot.left = node
    _update(node)
    _update(pivot)
    return pivot


def _rotate_right(node: _Node) -> _Node:
    pivot = node.left
    assert pivot is not None
    node.left = pivot.right
    pivot.right = node
    _update(node)
    _update(pivot)
    return pivot


def _rebalance(node: _Node) -> _Node:
    """Restore the AVL property at ``node`` (its subtrees are AVL trees whose
    heights differ by at most 2) and refresh its augmentation; return the new
    root of this subtree."""
    left, right = node.left, node.right
    left_height = 0 if left is None else left.height
    right_height = 0 if right is None else right.height
    if left_height > right_height + 1:
        assert left is not None
        if _height(left.left) < _height(left.right):
            node.left = _rotate_left(left)
        return _rotate_right(node)
    if right_height > left_height + 1:
        assert right is not None
        if _height(right.right) < _height(right.left):
            node.right = _rotate_right(right)
        return _rotate_left(node)
    # Balanced: _update(node), inlined because this is the hot path.
    node.height = (left_height if left_height > right_height else right_height) + 1
    max_last = node.last
    if left is not None and left.max_last > max_last:
        max_last = left.max_last
    if right is not None and right.max_last > max_last:
        max_last = right.max_last
    node.max_last = max_last
    return node


def _fix_path(path: list[tuple[_Node, bool]], child: _Node | None, dirty: int) -> _Node | None:
    """Relink ``child`` under the last node of ``path`` and rebalance upwards.

    ``path`` lists the (node, went_left) pairs from the root down to the
    parent of the changed subtree.  Stops early once a node comes out of
    rebalancing unchanged (same node, height and max_last), since nothing
    above it can change then -- but not before ``path[dirty]`` has been
    processed (a node whose own ``last`` changed).  Returns the new root of
    the whole tree, or None when stopping early (the root is unchanged).
    """
    while path:
        parent, went_left = path.pop()
        if went_left:
            parent.left = child
        else:
            parent.right = child
        height, max_last = parent.height, parent.max_last
        child = _rebalance(parent)
        if (
            child is parent
            and len(path) <= dirty
            and parent.height == height
            and parent.max_last == max_last
        ):
            return None
    return child


def _leftmost_reaching(node: _Node, start: int) -> _Node:
    """The leftmost node of the subtree whose ``last >= start``.

    Precondition: ``node.max_last >= start`` (so such a node exists).
    """
    while True:
        left = node.left
        if left is not None and left.max_last >= start:
            node = left
        elif node.last >= start:
            return node
        else:
            right = node.right
            assert right is not None and right.max_last >= start
            node = right


# --------------------------------------------------------------------------
# The IOTLB
# --------------------------------------------------------------------------


class IOTLB:
    """The set of IOVA maps of one vhost device (``struct vhost_iotlb``).

    ``limit`` (a ``u32``; 0 means unlimited) and ``retire`` mirror
    ``vhost_iotlb_alloc(limit, VHOST_IOTLB_FLAG_RETIRE)``: when both are set
    and the IOTLB holds ``limit`` maps, adding one first evicts the
    oldest-inserted map still present.  With a limit but no retire the limit
    is not enforced at all (the kernel inserts anyway).

    Maps may overlap (the kernel allows it).  ``len(iotlb)`` is the number of
    maps (``nmaps``); ``iter(iotlb)`` yields every map by ascending ``start``,
    ties in insertion order (an equal key goes to the right in the kernel's
    interval tree).  Modifying the IOTLB while iterating over it raises
    ``RuntimeError`` at the next step.
    """

    __slots__ = ("_limit", "_retire", "_root", "_live", "_next_seq", "_version")

    def __init__(self, limit: int = 0, retire: bool = False) -> None:
        """Raise :class:`InvalidRange` if ``limit`` is not a ``u32``."""
        if type(limit) is not int or not 0 <= limit <= U32_MAX:
            _check_u32("limit", limit)
        self._limit: int = limit
        self._retire: bool = bool(retire)
        self._root: _Node | None = None
        # Live maps by insertion sequence, oldest first (the kernel's
        # iotlb->list, used by the retire rule).
        self._live: OrderedDict[int, IOTLBMap] = OrderedDict()
        self._next_seq: int = 0
        self._version: int = 0

    @property
    def limit(self) -> int:
        """The maximum number of maps under retire; 0 for none (read-only)."""
        return self._limit

    @property
    def retire(self) -> bool:
        """Whether reaching ``limit`` evicts the oldest map (read-only)."""
        return self._retire

    # ---- container protocol -------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, item: object) -> bool:
        """True if ``item`` is one of this IOTLB's current maps (by identity)."""
        return isinstance(item, IOTLBMap) and self._live.get(item._seq) is item

    def __iter__(self) -> Iterator[IOTLBMap]:
        """Every map by ascending ``start``, ties in insertion order. O(n) in all."""
        version = self._version
        stack: list[_Node] = []
        node = self._root
        while stack or node is not None:
            while node is not None:
                stack.append(node)
                node = node.left
            node = stack.pop()
            yield node.map
            if self._version != version:
                raise RuntimeError("IOTLB changed during iteration")
            node = node.right

    def __repr__(self) -> str:
        return f"IOTLB(limit={self.limit}, retire={self.retire}, nmaps={len(self._live)})"

    # ---- updates ------------------------------------------------------------

    def add_range(self, start: int, last: int, addr: int, perm: int, opaque: object = None) -> None:
        """Map IOVAs ``[start, last]`` to ``addr`` with permission ``perm``.

        ``vhost_iotlb_add_range_ctx`` (drivers/vhost/iotlb.c).  ``start``,
        ``last`` (IO-virtual byte addresses, inclusive) and ``addr`` (the
        address ``start`` translates to) are ``u64``; ``perm`` is a ``u32``
        stored as given; ``opaque`` is any object, kept on the map.

        * ``last < start`` raises :class:`InvalidRange` (the kernel's -EFAULT),
          as does any argument outside its type.  Nothing is changed then.
        * ``[0, U64_MAX]`` (whose size would overflow a ``u64``) is stored as
          two maps: ``[0, 2**63 - 1]`` at ``addr`` and ``[2**63, U64_MAX]`` at
          ``(addr + 2**63) mod 2**64``, inserted in that order; each insertion
          applies the retire rule on its own (so with ``limit=1`` and retire
          only the upper half survives).
        * Retire: if ``limit`` is non-zero, ``len(self) == limit`` and
          ``retire`` is set, the oldest-inserted map still present is removed
          first.  Without retire nothing is evicted or refused.
        * Overlapping an existing map is allowed; both stay.

        O(log n).
        """
        if not (
            type(start) is int
            and type(last) is int
            and type(addr) is int
            and type(perm) is int
            and 0 <= start <= last <= U64_MAX
            and 0 <= addr <= U64_MAX
            and 0 <= perm <= U32_MAX
        ):
            _check_u64("start", start)
            _check_u64("last", last)
            _check_u64("addr", addr)
            _check_u32("perm", perm)
            if last < start:
                raise InvalidRange("last", last, f"is below start={start:#x}")
        if start == 0 and last == U64_MAX:
            self._insert(0, _U63 - 1, addr, perm, opaque)
            self._insert(_U63, U64_MAX, (addr + _U63) & U64_MAX, perm, opaque)
        else:
            self._insert(start, last, addr, perm, opaque)

    def del_range(self, start: int, last: int) -> list[IOTLBMap]:
        """Remove every map overlapping IOVAs ``[start, last]``; return them.

        ``vhost_iotlb_del_range`` (drivers/vhost/iotlb.c).  Maps are removed
        whole, never split or trimmed, and returned by ascending ``start``
        (ties in insertion order).  A map overlaps when
        ``map.start <= last and start <= map.last`` (the interval tree's
        predicate).  ``last < start`` is not an error, as in the kernel: by
        that predicate it removes exactly the maps that contain both
        ``last`` and ``start``.  Raises :class:`InvalidRange` if ``start`` or
        ``last`` is not a ``u64``.

        O((k + 1) log n) for k removed maps.
        """
        if not (
            type(start) is int
            and type(last) is int
            and 0 <= start <= U64_MAX
            and 0 <= last <= U64_MAX
        ):
            _check_u64("start", start)
            _check_u64("last", last)
        removed: list[IOTLBMap] = []
        while True:
            node = self._first_node(start, last)
            if node is None:
                return removed
            m = node.map
            self._remove(m)
            removed.append(m)

    def reset(self) -> None:
        """Remove every map (``vhost_iotlb_reset``, i.e. ``del_range(0, U64_MAX)``). O(1)."""
        self._root = None
        self._live.clear()
        self._version += 1

    # ---- queries ------------------------------------------------------------

    def first(self, start: int, last: int) -> IOTLBMap | None:
        """The first map overlapping IOVAs ``[start, last]``, or None.

        ``vhost_iotlb_itree_first`` (drivers/vhost/iotlb.c).  "First" is the
        lowest ``start``, ties broken by insertion order.  Overlap uses the
        same predicate as :meth:`del_range` (so an inverted range is allowed).
        Raises :class:`InvalidRange` if ``start`` or ``last`` is not a
        ``u64``.  O(log n).
        """
        if not (
            type(start) is int
            and type(last) is int
            and 0 <= start <= U64_MAX
            and 0 <= last <= U64_MAX
        ):
            _check_u64("start", start)
            _check_u64("last", last)
        node = self._first_node(start, last)
        return None if node is None else node.map

    def next(self, map: IOTLBMap, start: int, last: int) -> IOTLBMap | None:
        """The map after ``map`` overlapping IOVAs ``[start, last]``, or None.

        ``vhost_iotlb_itree_next`` (drivers/vhost/iotlb.c): the overlapping
        map that follows ``map`` in (start, insertion) order.  ``map`` itself
        need not overlap the range.  Walking ``first`` then ``next`` until
        None visits every overlapping map once.

        Raises :class:`IOTLBError` if ``map`` is not currently in this IOTLB
        (removed, evicted, or from another IOTLB; the kernel would be using
        freed memory), and :class:`InvalidRange` if ``start`` or ``last`` is
        not a ``u64``.  O(log n).
        """
        if not isinstance(map, IOTLBMap) or self._live.get(map._seq) is not map:
            raise IOTLBError(f"next(): {map!r} is not a map of this IOTLB (removed or foreign)")
        if not (
            type(start) is int
            and type(last) is int
            and 0 <= start <= U64_MAX
            and 0 <= last <= U64_MAX
        ):
            _check_u64("start", start)
            _check_u64("last", last)
        node = self._next_node(map.start, map._seq, start)
        if node is None or node.start > last:
            return None
        return node.map

    def translate(self, iova: int, access: int = VHOST_MAP_RO) -> int:
        """Translate the byte at IO-virtual address ``iova`` for ``access``.

        The one-byte case of ``translate_desc`` / ``iotlb_access_ok``
        (drivers/vhost/vhost.c).  The map used is ``first(iova, iova)``: among
        the maps covering ``iova``, the one with the lowest ``start`` (ties:
        oldest).  Returns ``(map.addr + iova - map.start) mod 2**64``, the
        address in the map's target space (see :class:`IOTLBMap`).

        * No map covers ``iova``: :class:`IOTLBMiss`.
        * ``map.perm & access != access``: :class:`IOTLBPermissionFault`.  For
          ``VHOST_MAP_RO`` or ``VHOST_MAP_WO`` this is the kernel's
          ``!(map->perm & access)``; ``VHOST_MAP_RW`` needs both bits (the
          kernel never asks for both at once).  Another map covering
          ``iova`` with more permission is not consulted, as in the kernel.
        * ``access`` not 1, 2 or 3, or ``iova`` not a ``u64``:
          :class:`InvalidRange`.

        O(log n).
        """
        if type(iova) is not int or not 0 <= iova <= U64_MAX:
            _check_u64("iova", iova)
        if type(access) is not int or not VHOST_MAP_RO <= access <= VHOST_MAP_RW:
            _check_access(access)
        node = self._first_node(iova, iova)
        if node is None:
            raise IOTLBMiss(iova, access)
        m = node.map
        if m.perm & access != access:
            raise IOTLBPermissionFault(iova, access, m)
        return (m.addr + iova - m.start) & U64_MAX

    # ---- internals ----------------------------------------------------------

    def _insert(self, start: int, last: int, addr: int, perm: int, opaque: object) -> None:
        if self._limit and self._retire and len(self._live) == self._limit:
            oldest = next(iter(self._live.values()))
            self._remove(oldest)
        seq = self._next_seq
        self._next_seq = seq + 1
        m = IOTLBMap(start, last, addr, perm, opaque, _seq=seq)
        self._live[seq] = m
        self._version += 1

        # Descend to a leaf position.  ``seq`` is larger than every key's seq,
        # so an equal start goes right, as in the kernel's interval tree.
        path: list[tuple[_Node, bool]] = []
        node = self._root
        while node is not None:
            go_left = start < node.start
            path.append((node, go_left))
            node = node.left if go_left else node.right
        new_root = _fix_path(path, _Node(m), len(path))
        if new_root is not None:
            self._root = new_root

    def _remove(self, m: IOTLBMap) -> None:
        del self._live[m._seq]
        self._version += 1
        start, seq = m.start, m._seq
        path: list[tuple[_Node, bool]] = []
        node = self._root
        while node is not None and node.map is not m:
            go_left = start < node.start or (start == node.start and seq < node.seq)
            path.append((node, go_left))
            node = node.left if go_left else node.right
        assert node is not None, "live map missing from the tree"
        # _fix_path may stop early only once it is above path[dirty]: with two
        # children, the node found takes over its in-order successor's payload
        # (its own ``last`` changes, so its max_last must be recomputed) and
        # the successor, which has no left child, is unlinked instead.
        dirty = len(path)
        if node.left is not None and node.right is not None:
            path.append((node, False))
            succ = node.right
            while succ.left is not None:
                path.append((succ, True))
                succ = succ.left
            node.start, node.seq, node.last, node.map = succ.start, succ.seq, succ.last, succ.map
            node = succ
        child = node.left if node.left is not None else node.right
        if not path:
            self._root = child
            return
        new_root = _fix_path(path, child, dirty)
        if new_root is not None:
            self._root = new_root

    def _first_node(self, start: int, last: int) -> _Node | None:
        """Leftmost node with ``node.start <= last and start <= node.last``.

        The leftmost node whose ``last`` reaches ``start`` is the only
        candidate: nodes before it miss ``start``, nodes after it start at or
        above it, so if it starts above ``last`` so do they.
        """
        root = self._root
        if root is None or root.max_last < start:
            return None
        node = _leftmost_reaching(root, start)
        return node if node.start <= last else None

    def _next_node(self, key_start: int, key_seq: int, start: int) -> _Node | None:
        """Leftmost node with key > ``(key_start, key_seq)`` and ``last >= start``.

        The nodes after the key are, in order: for each node where the search
        for the key turned left (deepest first), that node, then its right
        subtree.  The caller checks ``node.start <= last``.
        """
        turned_left: list[_Node] = []
        node = self._root
        while node is not None:
            if node.start > key_start or (node.start == key_start and node.seq > key_seq):
                turned_left.append(node)
                node = node.left
            else:
                node = node.right
        for candidate in reversed(turned_left):
            if candidate.last >= start:
                return candidate
            right = candidate.right
            if right is not None and right.max_last >= start:
                return _leftmost_reaching(right, start)
        return None

    def _check_invariants(self) -> None:
        """Verify the tree's structure (AVL balance, augmentation, key order,
        agreement with the retire list).  For tests; O(n)."""
        count = 0
        prev: tuple[int, int] | None = None

        def walk(node: _Node | None) -> tuple[int, int]:
            nonlocal count, prev
            if node is None:
                return 0, -1
            hl, ml = walk(node.left)
            key = (node.start, node.seq)
            assert prev is None or prev < key, f"keys out of order at {node.map!r}"
            prev = key
            count += 1
            assert self._live.get(node.seq) is node.map, f"tree holds a dead map {node.map!r}"
            assert node.start == node.map.start and node.last == node.map.last
            hr, mr = walk(node.right)
            assert abs(hl - hr) <= 1, "AVL balance violated"
            assert node.height == max(hl, hr) + 1, "stale height"
            assert node.max_last == max(node.last, ml, mr), "stale max_last"
            return node.height, node.max_last

        walk(self._root)
        assert count == len(self._live), "tree and retire list disagree"
        assert list(self._live) == sorted(self._live), "retire list out of insertion order"
