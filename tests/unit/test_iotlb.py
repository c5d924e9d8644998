"""Tests of the vhost IOTLB reference model (harness.models.iotlb).

Two layers:

* example tests, one (or a few) per documented rule, each naming the rule;
* property tests that apply random operation sequences to the model and to
  ``NaiveIOTLB`` -- a deliberately naive restatement of the same rules (a
  list of tuples in insertion order, linear scans, no cleverness) -- and
  compare them after every step.
"""

from __future__ import annotations

import enum
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.models.iotlb import (
    U64_MAX,
    VHOST_MAP_RO,
    VHOST_MAP_RW,
    VHOST_MAP_WO,
    IOTLB,
    InvalidRange,
    IOTLBError,
    IOTLBMap,
    IOTLBMiss,
    IOTLBPermissionFault,
)

HALF = 2**63
RO, WO, RW = VHOST_MAP_RO, VHOST_MAP_WO, VHOST_MAP_RW


def fields(m: IOTLBMap) -> tuple[int, int, int, int]:
    return (m.start, m.last, m.addr, m.perm)


def contents(t: IOTLB) -> list[tuple[int, int, int, int]]:
    return [fields(m) for m in t]


# ---------------------------------------------------------------------------
# The naive oracle
# ---------------------------------------------------------------------------

# An entry is (start, last, addr, perm, opaque); the tests make opaque unique
# per add_range call, so (start, opaque) identifies an entry.
Entry = tuple[int, int, int, int, Any]


def overlaps(e: Entry, start: int, last: int) -> bool:
    return e[0] <= last and start <= e[1]


@dataclass
class NaiveIOTLB:
    """The IOTLB rules, restated as plainly as possible."""

    limit: int = 0
    retire: bool = False
    entries: list[Entry] = field(default_factory=list)  # insertion order, oldest first

    def add_range(self, start: int, last: int, addr: int, perm: int, opaque: Any = None) -> None:
        assert start <= last
        if start == 0 and last == U64_MAX:
            pieces = [(0, HALF - 1, addr), (HALF, U64_MAX, (addr + HALF) % 2**64)]
        else:
            pieces = [(start, last, addr)]
        for s, l, a in pieces:
            if self.limit != 0 and self.retire and len(self.entries) == self.limit:
                self.entries.pop(0)
            self.entries.append((s, l, a, perm, opaque))

    def ordered(self) -> list[Entry]:
        # sorted() is stable: equal starts keep insertion order.
        return sorted(self.entries, key=lambda e: e[0])

    def walk(self, start: int, last: int) -> list[Entry]:
        return [e for e in self.ordered() if overlaps(e, start, last)]

    def next_after(self, entry: Entry, start: int, last: int) -> Entry | None:
        order = self.ordered()
        i = order.index(entry)
        for e in order[i + 1 :]:
            if overlaps(e, start, last):
                return e
        return None

    def del_range(self, start: int, last: int) -> list[Entry]:
        removed = self.walk(start, last)
        self.entries = [e for e in self.entries if not overlaps(e, start, last)]
        return removed

    def reset(self) -> None:
        self.entries = []

    def translate(self, iova: int, access: int) -> tuple[str, Any]:
        hits = self.walk(iova, iova)
        if not hits:
            return ("miss", None)
        e = hits[0]
        if e[3] & access != access:
            return ("fault", e)
        return ("ok", (e[2] + iova - e[0]) % 2**64)

    def contents(self) -> list[tuple[int, int, int, int]]:
        return [e[:4] for e in self.ordered()]


def entry(m: IOTLBMap | None) -> Entry | None:
    return None if m is None else (m.start, m.last, m.addr, m.perm, m.opaque)


def model_translate(t: IOTLB, iova: int, access: int) -> tuple[str, Any]:
    try:
        return ("ok", t.translate(iova, access))
    except IOTLBMiss as exc:
        assert (exc.iova, exc.access) == (iova, access)
        return ("miss", None)
    except IOTLBPermissionFault as exc:
        assert (exc.iova, exc.access) == (iova, access)
        return ("fault", entry(exc.map))


def model_walk(t: IOTLB, start: int, last: int) -> list[IOTLBMap]:
    out = []
    m = t.first(start, last)
    while m is not None:
        out.append(m)
        m = t.next(m, start, last)
    return out


# ---------------------------------------------------------------------------
# Constants, types, hierarchy
# ---------------------------------------------------------------------------


def test_constants() -> None:
    assert (VHOST_MAP_RO, VHOST_MAP_WO, VHOST_MAP_RW) == (1, 2, 3)
    assert U64_MAX == 0xFFFF_FFFF_FFFF_FFFF


def test_exception_hierarchy() -> None:
    assert issubclass(InvalidRange, IOTLBError)
    assert issubclass(InvalidRange, ValueError)
    assert issubclass(IOTLBMiss, IOTLBError)
    assert issubclass(IOTLBPermissionFault, IOTLBError)
    assert not issubclass(IOTLBMiss, ValueError)


def test_empty_iotlb() -> None:
    t = IOTLB()
    assert len(t) == 0
    assert list(t) == []
    assert t.limit == 0 and t.retire is False
    assert t.first(0, U64_MAX) is None
    assert t.del_range(0, U64_MAX) == []
    assert "nmaps=0" in repr(t)


def test_map_fields_size_and_repr() -> None:
    t = IOTLB()
    t.add_range(0x1000, 0x1FFF, 0x7F00_0000_0000, RW, opaque="ctx")
    (m,) = list(t)
    assert (m.start, m.last, m.size, m.addr, m.perm, m.opaque) == (
        0x1000,
        0x1FFF,
        0x1000,
        0x7F00_0000_0000,
        RW,
        "ctx",
    )
    r = repr(m)
    assert "start=0x1000" in r and "last=0x1fff" in r and "addr=0x7f0000000000" in r
    assert "perm=RW" in r and "'ctx'" in r


def test_map_is_read_only() -> None:
    t = IOTLB()
    t.add_range(0, 9, 0, RO)
    m = t.first(0, 0)
    assert m is not None
    with pytest.raises(AttributeError):
        m.start = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del m.addr  # type: ignore[misc]
    with pytest.raises(AttributeError):
        m.extra = 1  # type: ignore[attr-defined]
    assert m.start == 0


# ---------------------------------------------------------------------------
# add_range: the [0, U64_MAX] split
# ---------------------------------------------------------------------------


def test_full_range_is_split_in_two() -> None:
    t = IOTLB()
    t.add_range(0, U64_MAX, 0x1000, RW, opaque="all")
    lo, hi = list(t)
    assert len(t) == 2
    assert fields(lo) == (0, HALF - 1, 0x1000, RW)
    assert fields(hi) == (HALF, U64_MAX, 0x1000 + HALF, RW)
    assert lo.size == hi.size == HALF
    assert lo.opaque == hi.opaque == "all"
    # The whole space translates continuously.
    assert t.translate(0) == 0x1000
    assert t.translate(HALF - 1) == 0x1000 + HALF - 1
    assert t.translate(HALF) == 0x1000 + HALF
    assert t.translate(U64_MAX) == 0xFFF  # wraps mod 2**64


def test_full_range_split_addr_wraps() -> None:
    t = IOTLB()
    t.add_range(0, U64_MAX, U64_MAX - 1, RO)
    lo, hi = list(t)
    assert lo.addr == U64_MAX - 1
    assert hi.addr == (U64_MAX - 1 + HALF) % 2**64 == HALF - 2
    assert t.translate(HALF) == HALF - 2
    assert t.translate(1) == U64_MAX
    assert t.translate(2) == 0  # the lower half's target wraps too


@pytest.mark.parametrize(
    ("start", "last"),
    [(0, U64_MAX - 1), (1, U64_MAX), (HALF, U64_MAX), (0, HALF - 1), (0, HALF)],
)
def test_other_large_ranges_are_not_split(start: int, last: int) -> None:
    t = IOTLB()
    t.add_range(start, last, 0, RW)
    assert contents(t) == [(start, last, 0, RW)]
    (m,) = list(t)
    assert m.size == last - start + 1


def test_full_range_split_applies_retire_to_each_half() -> None:
    # limit=1: the lower half is inserted, then evicted to make room for the upper half.
    t = IOTLB(limit=1, retire=True)
    t.add_range(0, 10, 0, RO)
    t.add_range(0, U64_MAX, 0, RW)
    assert contents(t) == [(HALF, U64_MAX, HALF, RW)]

    # limit=3 with two older maps: only the oldest goes (for the upper half).
    t = IOTLB(limit=3, retire=True)
    t.add_range(100, 199, 0, RO, "a")
    t.add_range(200, 299, 0, RO, "b")
    t.add_range(0, U64_MAX, 0, RW, "all")
    assert [m.opaque for m in t] == ["all", "b", "all"]


# ---------------------------------------------------------------------------
# add_range: limit and retire
# ---------------------------------------------------------------------------


def test_retire_evicts_oldest_inserted_not_lowest() -> None:
    t = IOTLB(limit=3, retire=True)
    t.add_range(0x300, 0x3FF, 0, RO, "first-inserted")
    t.add_range(0x100, 0x1FF, 0, RO, "second")
    t.add_range(0x200, 0x2FF, 0, RO, "third")
    assert len(t) == 3
    t.add_range(0x500, 0x5FF, 0, RO, "fourth")
    assert len(t) == 3
    assert [m.opaque for m in t] == ["second", "third", "fourth"]


def test_retire_skips_maps_already_removed() -> None:
    t = IOTLB(limit=3, retire=True)
    for i in range(3):
        t.add_range(i * 10, i * 10 + 9, 0, RO, i)
    t.del_range(0, 0)  # removes map 0 (the oldest)
    t.add_range(100, 109, 0, RO, 3)  # len was 2: no eviction
    assert [m.opaque for m in t] == [1, 2, 3]
    t.add_range(200, 209, 0, RO, 4)  # len == limit: evicts 1, the oldest still present
    assert [m.opaque for m in t] == [2, 3, 4]


def test_retire_evicts_even_an_unrelated_map() -> None:
    # Eviction is by age only, whatever the new range is.
    t = IOTLB(limit=2, retire=True)
    t.add_range(0, 9, 0, RO, "old")
    t.add_range(0, 9, 0, RO, "dup")
    t.add_range(0, 9, 0, RO, "new")
    assert [m.opaque for m in t] == ["dup", "new"]


def test_limit_without_retire_neither_evicts_nor_refuses() -> None:
    t = IOTLB(limit=2, retire=False)
    for i in range(5):
        t.add_range(i * 10, i * 10 + 9, 0, RO, i)
    assert len(t) == 5
    assert t.limit == 2
    assert [m.opaque for m in t] == [0, 1, 2, 3, 4]


def test_retire_without_limit_never_evicts() -> None:
    t = IOTLB(limit=0, retire=True)
    for i in range(50):
        t.add_range(i, i, 0, RO)
    assert len(t) == 50


def test_limit_and_retire_are_read_only() -> None:
    t = IOTLB(limit=4, retire=True)
    assert (t.limit, t.retire) == (4, True)
    with pytest.raises(AttributeError):
        t.limit = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        t.retire = False  # type: ignore[misc]


def test_int_subclasses_are_accepted_bools_are_not() -> None:
    class Perm(enum.IntEnum):
        RW = 3

    t = IOTLB()
    t.add_range(0, 9, 0x100, Perm.RW)
    assert t.translate(5, Perm.RW) == 0x105
    with pytest.raises(InvalidRange, match="start"):
        t.add_range(False, 9, 0, RW)


def test_limit_must_be_u32() -> None:
    with pytest.raises(InvalidRange, match="limit"):
        IOTLB(limit=-1)
    with pytest.raises(InvalidRange, match="limit"):
        IOTLB(limit=2**32)
    IOTLB(limit=2**32 - 1)


# ---------------------------------------------------------------------------
# add_range: overlap
# ---------------------------------------------------------------------------


def test_overlapping_and_identical_maps_are_allowed_and_distinct() -> None:
    t = IOTLB()
    t.add_range(0, 0xFFF, 0x1000, RW)
    t.add_range(0, 0xFFF, 0x1000, RW)
    t.add_range(0x800, 0x17FF, 0x9000, RO)
    assert len(t) == 3
    a, b, c = list(t)
    assert fields(a) == fields(b)
    assert a is not b and a != b  # identity semantics, like kernel pointers
    assert len({a, b, c}) == 3
    assert a in t and b in t


def test_perm_is_stored_as_given() -> None:
    t = IOTLB()
    t.add_range(0, 9, 0, 0)
    t.add_range(10, 19, 0, 0xFFFF_FFFF)
    t.add_range(20, 29, 0, 4)
    assert [m.perm for m in t] == [0, 0xFFFF_FFFF, 4]


# ---------------------------------------------------------------------------
# del_range
# ---------------------------------------------------------------------------


def test_del_range_removes_whole_maps_never_splits() -> None:
    t = IOTLB()
    t.add_range(0x1000, 0x1FFF, 0xA000, RW)
    t.add_range(0x2000, 0x2FFF, 0xB000, RW)
    removed = t.del_range(0x1800, 0x1800)  # one byte in the middle of the first map
    assert [fields(m) for m in removed] == [(0x1000, 0x1FFF, 0xA000, RW)]
    assert contents(t) == [(0x2000, 0x2FFF, 0xB000, RW)]
    with pytest.raises(IOTLBMiss):
        t.translate(0x1000)  # nothing of the first map remains


def test_del_range_overlap_boundaries() -> None:
    t = IOTLB()
    t.add_range(10, 19, 0, RO, "a")
    t.add_range(20, 29, 0, RO, "b")
    t.add_range(30, 39, 0, RO, "c")
    assert t.del_range(0, 9) == []  # touches nothing
    assert t.del_range(40, U64_MAX) == []
    removed = t.del_range(19, 30)  # last byte of a .. first byte of c
    assert [m.opaque for m in removed] == ["a", "b", "c"]
    assert len(t) == 0


def test_del_range_returns_by_ascending_start_ties_in_insertion_order() -> None:
    t = IOTLB()
    t.add_range(50, 59, 0, RO, "late")
    t.add_range(5, 100, 0, RO, "x1")
    t.add_range(5, 6, 0, RO, "x2")
    t.add_range(0, 55, 0, RO, "early")
    removed = t.del_range(55, 55)
    assert [m.opaque for m in removed] == ["early", "x1", "late"]
    assert [m.opaque for m in t] == ["x2"]


def test_del_range_inverted_range_follows_interval_tree_predicate() -> None:
    # del_range(start=9, last=6): a map matches when map.start <= 6 and 9 <= map.last,
    # i.e. exactly the maps containing both 6 and 9.
    t = IOTLB()
    t.add_range(0, 10, 0, RO, "spans-both")
    t.add_range(5, 6, 0, RO, "covers-6-only")
    t.add_range(8, 20, 0, RO, "covers-9-only")
    t.add_range(7, 8, 0, RO, "between")
    assert [m.opaque for m in model_walk(t, 9, 6)] == ["spans-both"]
    removed = t.del_range(9, 6)
    assert [m.opaque for m in removed] == ["spans-both"]
    assert [m.opaque for m in t] == ["covers-6-only", "between", "covers-9-only"]
    # An inverted range nothing spans removes nothing.
    assert t.del_range(20, 5) == []


def test_del_range_of_everything_and_reset() -> None:
    t = IOTLB()
    t.add_range(0, U64_MAX, 0, RW)
    t.add_range(5, 5, 0, RW)
    assert len(t.del_range(0, U64_MAX)) == 3
    assert len(t) == 0
    t.add_range(1, 2, 3, RO)
    t.add_range(4, 5, 6, WO)
    t.reset()
    assert len(t) == 0 and list(t) == []
    t.add_range(1, 2, 3, RO)
    assert contents(t) == [(1, 2, 3, RO)]


# ---------------------------------------------------------------------------
# first / next / iteration
# ---------------------------------------------------------------------------


def test_iteration_order_ascending_start_ties_in_insertion_order() -> None:
    t = IOTLB()
    t.add_range(5, 9, 0, RO, "B")
    t.add_range(5, 100, 0, RO, "A")  # same start, inserted later: after B
    t.add_range(1, 2, 0, RO, "C")
    t.add_range(5, 5, 0, RO, "D")
    assert [m.opaque for m in t] == ["C", "B", "A", "D"]
    assert [m.opaque for m in model_walk(t, 5, 5)] == ["B", "A", "D"]
    assert [m.opaque for m in model_walk(t, 0, U64_MAX)] == ["C", "B", "A", "D"]
    assert [m.opaque for m in model_walk(t, 50, 60)] == ["A"]
    assert model_walk(t, 3, 4) == []


def test_first_is_lowest_start_even_if_it_ends_first() -> None:
    t = IOTLB()
    t.add_range(10, 1000, 0, RO, "long")
    t.add_range(0, 15, 0, RO, "short")
    m = t.first(12, 12)
    assert m is not None and m.opaque == "short"


def test_next_from_a_map_outside_the_range() -> None:
    t = IOTLB()
    t.add_range(0, 1, 0, RO, "a")
    t.add_range(2, 3, 0, RO, "b")
    t.add_range(4, 5, 0, RO, "c")
    a = t.first(0, 0)
    assert a is not None
    nxt = t.next(a, 4, 5)
    assert nxt is not None and nxt.opaque == "c"
    c = nxt
    assert t.next(c, 0, 1) is None  # nothing after c overlaps [0, 1]


def test_next_on_removed_or_foreign_map_raises() -> None:
    t = IOTLB(limit=1, retire=True)
    t.add_range(0, 9, 0, RO)
    m = t.first(0, 0)
    assert m is not None
    t.del_range(0, 0)
    with pytest.raises(IOTLBError, match="not a map of this IOTLB"):
        t.next(m, 0, U64_MAX)
    assert m not in t

    t.add_range(0, 9, 0, RO)
    evicted = t.first(0, 0)
    assert evicted is not None
    t.add_range(20, 29, 0, RO)  # retire evicts it
    with pytest.raises(IOTLBError):
        t.next(evicted, 0, U64_MAX)

    other = IOTLB()
    other.add_range(0, 9, 0, RO)
    foreign = other.first(0, 0)
    assert foreign is not None
    with pytest.raises(IOTLBError):
        t.next(foreign, 0, U64_MAX)

    live = t.first(0, U64_MAX)
    assert live is not None
    t.reset()
    with pytest.raises(IOTLBError):
        t.next(live, 0, U64_MAX)


def test_iteration_detects_modification() -> None:
    t = IOTLB()
    for i in range(4):
        t.add_range(i, i, 0, RO)
    it = iter(t)
    next(it)
    t.add_range(10, 10, 0, RO)
    with pytest.raises(RuntimeError):
        list(it)


def test_removing_a_two_child_node_refreshes_its_max_last() -> None:
    # The root [50, 1000] has two children; removing it moves its successor
    # [60, 61] up, and the subtree maximum must drop from 1000 to 91.
    t = IOTLB()
    for start, last in [(50, 1000), (25, 30), (75, 80), (60, 61), (90, 91), (10, 11), (30, 31)]:
        t.add_range(start, last, 0, RW)
    assert t._root is not None and t._root.map.start == 50
    assert [m.start for m in t.del_range(500, 500)] == [50]
    t._check_invariants()
    assert t.first(500, 500) is None
    assert t.del_range(92, U64_MAX) == []
    assert [(m.start, m.last) for m in t] == [
        (10, 11), (25, 30), (30, 31), (60, 61), (75, 80), (90, 91)
    ]


def test_tree_stays_balanced_on_sorted_inserts() -> None:
    t = IOTLB()
    n = 2000
    for i in range(n):
        t.add_range(i * 4096, i * 4096 + 4095, i, RW)
    t._check_invariants()
    assert t._root is not None
    assert t._root.height <= 1.45 * math.log2(n + 2)
    for i in range(0, n, 2):
        t.del_range(i * 4096, i * 4096)
    t._check_invariants()
    assert len(t) == n // 2


# ---------------------------------------------------------------------------
# translate
# ---------------------------------------------------------------------------


def test_translate_ok_with_offset() -> None:
    t = IOTLB()
    t.add_range(0x1000, 0x1FFF, 0x7F00_0000_0000, RW)
    assert t.translate(0x1000) == 0x7F00_0000_0000
    assert t.translate(0x1ABC, WO) == 0x7F00_0000_0ABC
    assert t.translate(0x1FFF, RW) == 0x7F00_0000_0FFF


def test_translate_result_wraps_mod_2_64() -> None:
    t = IOTLB()
    t.add_range(0x1000, 0x1FFF, U64_MAX - 0xF, RO)
    assert t.translate(0x100F) == U64_MAX
    assert t.translate(0x1010) == 0


def test_translate_miss() -> None:
    t = IOTLB()
    t.add_range(0x1000, 0x1FFF, 0, RW)
    with pytest.raises(IOTLBMiss) as info:
        t.translate(0x2000, WO)
    assert (info.value.iova, info.value.access) == (0x2000, WO)
    assert "0x2000" in str(info.value) and "WO" in str(info.value)
    with pytest.raises(IOTLBMiss):
        t.translate(0xFFF)
    with pytest.raises(IOTLBMiss):
        IOTLB().translate(U64_MAX)


def test_translate_permission_fault() -> None:
    t = IOTLB()
    t.add_range(0x1000, 0x1FFF, 0xA000, RO)
    with pytest.raises(IOTLBPermissionFault) as info:
        t.translate(0x1800, WO)
    exc = info.value
    assert (exc.iova, exc.access) == (0x1800, WO)
    assert exc.map is t.first(0x1800, 0x1800)
    text = str(exc)
    assert "0x1800" in text and "0x1000" in text and "WO" in text


def test_translate_rw_access_needs_both_bits() -> None:
    t = IOTLB()
    t.add_range(0, 9, 0, RO)
    t.add_range(10, 19, 0, WO)
    t.add_range(20, 29, 0, RW)
    t.add_range(30, 39, 0, 0)
    t.add_range(40, 49, 0, 0xFFFF_FFFF)
    assert t.translate(0, RO) == 0
    with pytest.raises(IOTLBPermissionFault):
        t.translate(0, RW)
    with pytest.raises(IOTLBPermissionFault):
        t.translate(10, RW)
    assert t.translate(25, RW) == 5
    for access in (RO, WO, RW):
        with pytest.raises(IOTLBPermissionFault):
            t.translate(30, access)  # perm 0: present but unusable
        assert t.translate(40, access) == 0


def test_translate_uses_first_covering_map_only() -> None:
    # The lowest-start map decides, even if a later one would allow the access.
    t = IOTLB()
    t.add_range(0, 100, 0x10000, RO, "outer")
    t.add_range(50, 60, 0x20000, RW, "inner")
    with pytest.raises(IOTLBPermissionFault) as info:
        t.translate(55, WO)
    assert info.value.map.opaque == "outer"
    assert t.translate(55, RO) == 0x10000 + 55
    # Equal starts: the oldest decides.
    t2 = IOTLB()
    t2.add_range(0, 9, 0x100, RO)
    t2.add_range(0, 9, 0x200, RW)
    assert t2.translate(3, RO) == 0x103
    with pytest.raises(IOTLBPermissionFault):
        t2.translate(3, WO)


@pytest.mark.parametrize("access", [0, 4, -1, 2**64, True, 1.0, "RO", None])
def test_translate_access_must_be_1_2_or_3(access: Any) -> None:
    t = IOTLB()
    t.add_range(0, 9, 0, RW)
    with pytest.raises(InvalidRange, match="access") as info:
        t.translate(0, access)
    assert isinstance(info.value, ValueError)
    assert info.value.argument == "access"


# ---------------------------------------------------------------------------
# Argument checking (u64 bounds, messages)
# ---------------------------------------------------------------------------


def test_u64_extremes_accepted() -> None:
    t = IOTLB()
    t.add_range(U64_MAX, U64_MAX, U64_MAX, RW)
    t.add_range(0, 0, 0, RW)
    assert t.translate(U64_MAX) == U64_MAX
    assert t.translate(0) == 0
    assert [m.size for m in t] == [1, 1]


def test_last_below_start_raises_and_changes_nothing() -> None:
    t = IOTLB()
    with pytest.raises(InvalidRange) as info:
        t.add_range(0x2000, 0x1FFF, 0, RW)
    exc = info.value
    assert exc.argument == "last" and exc.value == 0x1FFF
    assert "last" in str(exc) and "0x1fff" in str(exc) and "0x2000" in str(exc)
    assert len(t) == 0


@pytest.mark.parametrize(
    ("kwargs", "argument", "value"),
    [
        ({"start": -1}, "start", -1),
        ({"last": 2**64}, "last", 2**64),
        ({"addr": 2**64}, "addr", 2**64),
        ({"addr": -5}, "addr", -5),
        ({"perm": 2**32}, "perm", 2**32),
        ({"perm": -1}, "perm", -1),
        ({"start": 1.0}, "start", 1.0),
        ({"last": "0x10"}, "last", "0x10"),
        ({"addr": None}, "addr", None),
        ({"perm": True}, "perm", True),
    ],
)
def test_add_range_argument_domains(kwargs: dict[str, Any], argument: str, value: Any) -> None:
    args: dict[str, Any] = {"start": 0, "last": 0x10, "addr": 0, "perm": RW}
    args.update(kwargs)
    t = IOTLB(limit=1, retire=True)
    t.add_range(100, 200, 0, RO)
    with pytest.raises(InvalidRange) as info:
        t.add_range(**args)
    exc = info.value
    assert exc.argument == argument
    assert exc.value == value
    assert argument in str(exc)
    if isinstance(value, int) and not isinstance(value, bool):
        assert hex(value) in str(exc)
    assert len(t) == 1  # nothing was evicted or inserted


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.del_range(-1, 5),
        lambda t: t.del_range(0, 2**64),
        lambda t: t.first(2**64, 0),
        lambda t: t.first(0, -1),
        lambda t: t.next(t.first(0, 0), 0, 2**64),
        lambda t: t.translate(2**64),
        lambda t: t.translate(-1),
    ],
)
def test_query_arguments_must_be_u64(call: Any) -> None:
    t = IOTLB()
    t.add_range(0, 9, 0, RW)
    with pytest.raises(InvalidRange):
        call(t)
    assert len(t) == 1


def test_exceptions_pickle_round_trip() -> None:
    t = IOTLB()
    t.add_range(0, 9, 0, RO)
    for exc in (
        InvalidRange("last", 3, "is below start=0x5"),
        IOTLBMiss(0x1234, WO),
    ):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc)


# ---------------------------------------------------------------------------
# Property tests against the naive oracle
# ---------------------------------------------------------------------------

SMALL = st.integers(0, 40)
EXTREME = st.sampled_from([0, 1, HALF - 1, HALF, HALF + 1, U64_MAX - 1, U64_MAX])
ADDRESS = st.one_of(SMALL, SMALL, SMALL, EXTREME)
TARGET = st.one_of(st.integers(0, 2**16), st.sampled_from([U64_MAX, U64_MAX - 3, HALF, HALF - 1]))
PERM = st.one_of(st.integers(0, 3), st.sampled_from([4, 5, 0xFFFF_FFFF]))
ACCESS = st.sampled_from([RO, WO, RW])
RANGE = st.tuples(ADDRESS, ADDRESS).map(sorted).map(tuple)
ANY_RANGE = st.one_of(RANGE, st.tuples(ADDRESS, ADDRESS))  # may be inverted

OPS = st.one_of(
    st.tuples(st.just("add"), RANGE, TARGET, PERM),
    st.tuples(st.just("add"), RANGE, TARGET, PERM),
    st.tuples(st.just("add_all"), TARGET, PERM),
    st.tuples(st.just("del"), ANY_RANGE),
    st.tuples(st.just("walk"), ANY_RANGE),
    st.tuples(st.just("next_from"), st.integers(0, 50), ANY_RANGE),
    st.tuples(st.just("translate"), ADDRESS, ACCESS),
    st.tuples(st.just("reset")),
)


def apply_and_compare(t: IOTLB, naive: NaiveIOTLB, op: tuple[Any, ...], tag: int) -> None:
    kind = op[0]
    if kind == "add":
        (start, last), addr, perm = op[1], op[2], op[3]
        t.add_range(start, last, addr, perm, tag)
        naive.add_range(start, last, addr, perm, tag)
    elif kind == "add_all":
        t.add_range(0, U64_MAX, op[1], op[2], tag)
        naive.add_range(0, U64_MAX, op[1], op[2], tag)
    elif kind == "del":
        start, last = op[1]
        assert [entry(m) for m in t.del_range(start, last)] == naive.del_range(start, last)
    elif kind == "walk":
        start, last = op[1]
        assert entry(t.first(start, last)) == next(iter(naive.walk(start, last)), None)
        assert [entry(m) for m in model_walk(t, start, last)] == naive.walk(start, last)
    elif kind == "next_from":
        maps = list(t)
        if maps:
            m = maps[op[1] % len(maps)]
            start, last = op[2]
            expected = naive.next_after(entry(m), start, last)  # type: ignore[arg-type]
            assert entry(t.next(m, start, last)) == expected
    elif kind == "translate":
        iova, access = op[1], op[2]
        assert model_translate(t, iova, access) == naive.translate(iova, access)
    elif kind == "reset":
        t.reset()
        naive.reset()
    else:  # pragma: no cover
        raise AssertionError(kind)
    assert len(t) == len(naive.entries)
    assert contents(t) == naive.contents()
    # Identity-precise: the same entries in the same (start, insertion) order.
    assert [entry(m) for m in t] == naive.ordered()
    t._check_invariants()


CONFIGS = st.sampled_from(
    [(0, False), (0, True), (2, False), (1, True), (2, True), (3, True), (5, True)]
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=CONFIGS, ops=st.lists(OPS, max_size=50))
def test_random_op_sequences_match_naive_oracle(
    config: tuple[int, bool], ops: list[tuple[Any, ...]]
) -> None:
    limit, retire = config
    t = IOTLB(limit=limit, retire=retire)
    naive = NaiveIOTLB(limit=limit, retire=retire)
    for tag, op in enumerate(ops):
        apply_and_compare(t, naive, op, tag)


@settings(max_examples=100, deadline=None)
@given(
    ranges=st.lists(st.tuples(RANGE, TARGET, PERM), min_size=1, max_size=30),
    probes=st.lists(st.tuples(ADDRESS, ACCESS), min_size=1, max_size=30),
)
def test_translate_matches_naive_oracle(
    ranges: list[tuple[tuple[int, int], int, int]], probes: list[tuple[int, int]]
) -> None:
    t = IOTLB()
    naive = NaiveIOTLB()
    for tag, ((start, last), addr, perm) in enumerate(ranges):
        t.add_range(start, last, addr, perm, tag)
        naive.add_range(start, last, addr, perm, tag)
    for iova, access in probes:
        assert model_translate(t, iova, access) == naive.translate(iova, access)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200),
    seed=st.integers(0, 2**32 - 1),
    deletions=st.lists(st.tuples(st.integers(0, 800), st.integers(0, 60)), max_size=20),
)
def test_many_maps_random_inserts_and_deletes(
    n: int, seed: int, deletions: list[tuple[int, int]]
) -> None:
    # Bigger trees than the op-sequence test, so rotations at depth get exercised.
    import random

    rng = random.Random(seed)
    t = IOTLB()
    naive = NaiveIOTLB()
    for tag in range(n):
        start = rng.randrange(0, 800)
        # Mostly short maps, some long ones: a long map deep in the tree is
        # the one whose removal must refresh max_last above its successor.
        last = start + (rng.randrange(0, 30) if rng.random() < 0.9 else rng.randrange(0, 2000))
        t.add_range(start, last, tag, RW, tag)
        naive.add_range(start, last, tag, RW, tag)
    t._check_invariants()
    for start, width in deletions:
        assert [entry(m) for m in t.del_range(start, start + width)] == naive.del_range(
            start, start + width
        )
        t._check_invariants()
        assert [entry(m) for m in t] == naive.ordered()
