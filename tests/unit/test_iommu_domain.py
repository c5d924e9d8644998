"""Tests of the IOMMU domain reference model (harness.models.iommu_domain).

* example tests, one (or a few) per rule of ``__iommu_map`` / ``__iommu_unmap``;
* property tests that apply random map/unmap sequences to the model and to
  ``NaiveDomain`` -- a dict page -> (physical page, prot, origin), page-by-page
  loops, nothing clever -- and compare them after every step.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.models.iommu_domain import (
    IOMMU_CACHE,
    IOMMU_READ,
    IOMMU_WRITE,
    U64_LIMIT,
    DomainError,
    IommuDomain,
    Mapping,
)

PG = 4096
R, W, RW = IOMMU_READ, IOMMU_WRITE, IOMMU_READ | IOMMU_WRITE


def spans(d: IommuDomain) -> list[tuple[int, int, int, int]]:
    return [(m.iova, m.last, m.paddr, m.prot) for m in d.mappings()]


# ---------------------------------------------------------------------------
# map
# ---------------------------------------------------------------------------


def test_map_then_translate_every_byte_of_the_range() -> None:
    d = IommuDomain()
    d.map(0x10000, 0x7000, 2 * PG, RW, origin="ev1")
    assert spans(d) == [(0x10000, 0x11FFF, 0x7000, RW)]
    m = d.translate(0x11ABC)
    assert m is not None
    assert (m.iova, m.last, m.paddr, m.prot, m.origin) == (0x10000, 0x11FFF, 0x7000, RW, "ev1")
    assert m.phys(0x11ABC) == 0x8ABC
    assert m.size == 2 * PG and 0x10000 in m and 0x12000 not in m
    assert d.translate(0xFFFF) is None and d.translate(0x12000) is None
    assert len(d) == 1 and d.mapped_bytes == 2 * PG


def test_phys_outside_the_mapping_raises() -> None:
    m = Mapping(0x1000, 0x1FFF, 0x5000, R)
    with pytest.raises(ValueError):
        m.phys(0x2000)


@pytest.mark.parametrize(
    "iova, paddr, size",
    [(0x1001, 0, PG), (0, 0x800, PG), (0, 0, PG + 1), (0x10, 0x20, 0x30)],
    ids=["iova", "paddr", "size", "all"],
)
def test_unaligned_map_is_einval_and_changes_nothing(iova: int, paddr: int, size: int) -> None:
    d = IommuDomain()
    with pytest.raises(DomainError) as exc:
        d.map(iova, paddr, size, RW)
    assert exc.value.errno == errno.EINVAL
    assert isinstance(exc.value, OSError)
    assert len(d) == 0 and d.mapped_bytes == 0


def test_alignment_follows_min_pagesz() -> None:
    d = IommuDomain(min_pagesz=0x10000)
    with pytest.raises(DomainError) as exc:
        d.map(0x1000, 0, 0x10000, RW)
    assert exc.value.errno == errno.EINVAL
    d.map(0x10000, 0x20000, 0x10000, RW)
    assert d.unmap(0x10000, 0x1000) == 0  # a 4 KiB unmap is unaligned here
    assert d.unmap(0x10000, 0x10000) == 0x10000


@pytest.mark.parametrize("bad", [0, 3, -4096, 4097])
def test_min_pagesz_must_be_a_power_of_two(bad: int) -> None:
    with pytest.raises(ValueError):
        IommuDomain(min_pagesz=bad)


def test_size_zero_maps_nothing_and_succeeds_like_iommu_map() -> None:
    # __iommu_map: IS_ALIGNED(iova | paddr | 0) holds, the while (size) loop is
    # skipped, ret stays 0 and trace_map() records size=0.
    d = IommuDomain()
    d.map(0x1000, 0x2000, 0, RW)
    assert len(d) == 0 and d.mapped_bytes == 0


def test_size_zero_unaligned_is_still_einval() -> None:
    with pytest.raises(DomainError) as exc:
        IommuDomain().map(0x1001, 0, 0, RW)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("prot", [0, IOMMU_CACHE, -1])
def test_prot_without_read_or_write_is_einval(prot: int) -> None:
    with pytest.raises(DomainError) as exc:
        IommuDomain().map(0, 0, PG, prot)
    assert exc.value.errno == errno.EINVAL


def test_prot_keeps_other_bits() -> None:
    d = IommuDomain()
    d.map(0, 0, PG, R | IOMMU_CACHE)
    m = d.translate(0)
    assert m is not None and m.prot == R | IOMMU_CACHE


@pytest.mark.parametrize(
    "iova, paddr, size",
    [(-PG, 0, PG), (U64_LIMIT, 0, PG), (U64_LIMIT - PG, 0, 2 * PG), (0, U64_LIMIT - PG, 2 * PG)],
    ids=["negative", "beyond", "wraps", "paddr-wraps"],
)
def test_ranges_outside_64_bits_are_einval(iova: int, paddr: int, size: int) -> None:
    with pytest.raises(DomainError) as exc:
        IommuDomain().map(iova, paddr, size, RW)
    assert exc.value.errno == errno.EINVAL


def test_the_last_page_of_the_address_space_can_be_mapped() -> None:
    d = IommuDomain()
    d.map(U64_LIMIT - PG, 0, PG, RW)
    assert d.translate(U64_LIMIT - 1) is not None
    assert d.unmap(U64_LIMIT - PG, 2 * PG) == PG  # the space ends there: a hole


def test_non_int_arguments_are_type_errors() -> None:
    d = IommuDomain()
    with pytest.raises(TypeError):
        d.map(0.0, 0, PG, RW)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        d.map(0, 0, PG, "rw")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "iova, size",
    [(0x10000, PG), (0xF000, 2 * PG), (0x13000, 2 * PG), (0xE000, 8 * PG), (0x11000, PG)],
    ids=["same", "overlaps-start", "overlaps-end", "covers", "inside"],
)
def test_double_map_is_eexist_and_all_or_nothing(iova: int, size: int) -> None:
    d = IommuDomain()
    d.map(0x10000, 0x50000, 4 * PG, R, origin="first")
    before = spans(d)
    with pytest.raises(DomainError) as exc:
        d.map(iova, 0x90000, size, RW, origin="second")
    assert exc.value.errno == errno.EEXIST
    assert spans(d) == before and d.mapped_bytes == 4 * PG
    assert d.translate(0xE000) is None and d.translate(0x14000) is None


def test_adjacent_maps_are_allowed_and_not_merged() -> None:
    d = IommuDomain()
    d.map(0x1000, 0x1000, PG, RW)
    d.map(0x2000, 0x2000, PG, RW)
    d.map(0x0, 0x0, PG, RW)
    assert spans(d) == [(0, 0xFFF, 0, RW), (0x1000, 0x1FFF, 0x1000, RW), (0x2000, 0x2FFF, 0x2000, RW)]
    assert len(d) == 3


def test_a_gigabyte_is_one_entry() -> None:
    d = IommuDomain()
    d.map(1 << 30, 0, 1 << 30, RW)
    assert len(d) == 1 and d.mapped_bytes == 1 << 30
    assert d.unmap((1 << 30) + (1 << 29), PG) == PG  # a split leaves two entries
    assert len(d) == 2


# ---------------------------------------------------------------------------
# unmap
# ---------------------------------------------------------------------------


def test_unmap_whole_mapping() -> None:
    d = IommuDomain()
    d.map(0x10000, 0x50000, 4 * PG, RW)
    assert d.unmap(0x10000, 4 * PG) == 4 * PG
    assert len(d) == 0 and d.mapped_bytes == 0


@pytest.mark.parametrize("iova, size", [(0x10001, PG), (0x10000, PG - 1), (0x10000, 0)])
def test_unaligned_or_empty_unmap_returns_zero_and_changes_nothing(iova: int, size: int) -> None:
    d = IommuDomain()
    d.map(0x10000, 0x50000, 4 * PG, RW)
    assert d.unmap(iova, size) == 0
    assert spans(d) == [(0x10000, 0x13FFF, 0x50000, RW)]


def test_unmap_of_a_hole_returns_zero() -> None:
    d = IommuDomain()
    d.map(0x10000, 0x50000, PG, RW)
    assert d.unmap(0x8000, 0x10000) == 0  # starts in a hole: nothing, not even later pages
    assert d.mapped_bytes == PG


def test_unmap_stops_at_the_first_hole() -> None:
    d = IommuDomain()
    d.map(0x10000, 0x50000, 2 * PG, RW)
    d.map(0x12000, 0x70000, PG, RW)  # contiguous: crossed
    d.map(0x14000, 0x90000, PG, RW)  # after a hole at 0x13000: kept
    assert d.unmap(0x10000, 8 * PG) == 3 * PG
    assert spans(d) == [(0x14000, 0x14FFF, 0x90000, RW)]


def test_unmap_the_middle_splits_the_mapping() -> None:
    d = IommuDomain()
    d.map(0x10000, 0x50000, 8 * PG, RW, origin="ev")
    assert d.unmap(0x12000, 2 * PG) == 2 * PG
    assert spans(d) == [(0x10000, 0x11FFF, 0x50000, RW), (0x14000, 0x17FFF, 0x54000, RW)]
    assert all(m.origin == "ev" for m in d.mappings())
    assert d.mapped_bytes == 6 * PG
    assert d.translate(0x12000) is None
    m = d.translate(0x15123)
    assert m is not None and m.phys(0x15123) == 0x55123


def test_unmap_the_head_or_tail_keeps_the_rest() -> None:
    d = IommuDomain()
    d.map(0x10000, 0x50000, 4 * PG, R)
    assert d.unmap(0x10000, PG) == PG
    assert d.unmap(0x13000, 4 * PG) == PG  # tail, then a hole
    assert spans(d) == [(0x11000, 0x12FFF, 0x51000, R)]


def test_unmap_across_two_mappings_splits_the_second() -> None:
    d = IommuDomain()
    d.map(0x10000, 0x50000, 2 * PG, RW)
    d.map(0x12000, 0x80000, 4 * PG, W)
    assert d.unmap(0x11000, 3 * PG) == 3 * PG
    assert spans(d) == [(0x10000, 0x10FFF, 0x50000, RW), (0x14000, 0x15FFF, 0x82000, W)]


def test_remap_after_unmap() -> None:
    d = IommuDomain()
    d.map(0x10000, 0x50000, 4 * PG, RW)
    d.unmap(0x11000, PG)
    d.map(0x11000, 0x99000, PG, R, origin="again")
    m = d.translate(0x11000)
    assert m is not None and (m.paddr, m.prot, m.origin) == (0x99000, R, "again")


def test_overlapping_returns_whole_mappings() -> None:
    d = IommuDomain()
    d.map(0x10000, 0, 2 * PG, RW)
    d.map(0x13000, 0, PG, RW)
    d.map(0x20000, 0, PG, RW)
    assert [m.iova for m in d.overlapping(0x11000, 3 * PG)] == [0x10000, 0x13000]
    assert d.overlapping(0x12000, PG) == []
    assert d.overlapping(0x11000, 0) == []


# ---------------------------------------------------------------------------
# Property tests against a naive oracle
# ---------------------------------------------------------------------------


@dataclass
class NaiveDomain:
    """The same rules, restated page by page over a dict."""

    pg: int
    pages: dict[int, tuple[int, int, object]] = field(default_factory=dict)
    """iova page number -> (physical page number, prot, origin)."""

    def map(self, iova: int, paddr: int, size: int, prot: int, origin: object) -> int:
        """0 or the errno."""
        if iova % self.pg or paddr % self.pg or size % self.pg:
            return errno.EINVAL
        if iova + size > U64_LIMIT or paddr + size > U64_LIMIT:
            return errno.EINVAL
        if not prot & RW:
            return errno.EINVAL
        n = size // self.pg
        first = iova // self.pg
        if any(first + k in self.pages for k in range(n)):
            return errno.EEXIST
        for k in range(n):
            self.pages[first + k] = (paddr // self.pg + k, prot, origin)
        return 0

    def unmap(self, iova: int, size: int) -> int:
        if iova % self.pg or size % self.pg:
            return 0
        done = 0
        page = iova // self.pg
        while done < size and page in self.pages:
            del self.pages[page]
            page += 1
            done += self.pg
        return done


def expand(d: IommuDomain) -> dict[int, tuple[int, int, object]]:
    pg = d.min_pagesz
    out: dict[int, tuple[int, int, object]] = {}
    for m in d.mappings():
        for k in range(m.size // pg):
            out[m.iova // pg + k] = (m.paddr // pg + k, m.prot, m.origin)
    return out


def check_invariants(d: IommuDomain) -> None:
    maps = d.mappings()
    assert all(m.iova <= m.last for m in maps)
    assert all(a.last < b.iova for a, b in zip(maps, maps[1:])), "sorted, non-overlapping"
    assert len(d) == len(maps)
    assert d.mapped_bytes == sum(m.size for m in maps)


PAGES = 32  # a small IOVA space so that maps collide and unmaps meet holes


def op_strategy(pg: int) -> st.SearchStrategy[tuple[object, ...]]:
    page = st.integers(0, PAGES)
    jitter = st.sampled_from([0] * 14 + [1, pg // 2])  # mostly aligned
    addr = st.builds(lambda p, j: p * pg + j, page, jitter)
    prot = st.sampled_from([R, W, RW, RW, RW, 0, R | IOMMU_CACHE])
    return st.one_of(
        st.tuples(st.just("map"), addr, addr,
                  st.builds(lambda n, j: n * pg + j, st.integers(0, 6), jitter), prot),
        st.tuples(st.just("unmap"), addr,
                  st.builds(lambda n, j: n * pg + j, st.integers(0, 24), jitter)),
        st.tuples(st.just("translate"), st.integers(0, (PAGES + 25) * pg)),
    )


def run_against_oracle(pg: int, ops: list[tuple[object, ...]]) -> None:
    model, naive = IommuDomain(min_pagesz=pg), NaiveDomain(pg)
    for n, op in enumerate(ops):
        if op[0] == "map":
            iova, paddr, size, prot = op[1:]
            assert isinstance(iova, int) and isinstance(paddr, int)
            assert isinstance(size, int) and isinstance(prot, int)
            want = naive.map(iova, paddr, size, prot, origin=n)
            got: int | None = 0
            try:
                model.map(iova, paddr, size, prot, origin=n)
            except DomainError as exc:
                got = exc.errno
            assert got == want, op
        elif op[0] == "unmap":
            iova, size = op[1:]
            assert isinstance(iova, int) and isinstance(size, int)
            assert model.unmap(iova, size) == naive.unmap(iova, size), op
        else:
            (iova,) = op[1:]
            assert isinstance(iova, int)
            m = model.translate(iova)
            entry = naive.pages.get(iova // pg)
            if entry is None:
                assert m is None, op
            else:
                assert m is not None, op
                assert (m.phys(iova), m.prot, m.origin) == (entry[0] * pg + iova % pg, entry[1], entry[2])
        assert expand(model) == naive.pages, op
        check_invariants(model)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_strategy(PG), max_size=60))
def test_model_matches_naive_oracle(ops: list[tuple[object, ...]]) -> None:
    run_against_oracle(PG, ops)


@settings(max_examples=60, deadline=None)
@given(st.lists(op_strategy(0x10000), max_size=40))
def test_model_matches_naive_oracle_64k_pages(ops: list[tuple[object, ...]]) -> None:
    run_against_oracle(0x10000, ops)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, PAGES), st.integers(1, 8)), max_size=30),
       st.lists(st.tuples(st.integers(0, PAGES), st.integers(1, 16)), max_size=30))
def test_fill_then_punch_holes(maps: list[tuple[int, int]], unmaps: list[tuple[int, int]]) -> None:
    """Many maps first (most fail on collisions), then unmaps that split them."""
    ops: list[tuple[object, ...]] = [("map", p * PG, (p + 100) * PG, n * PG, RW) for p, n in maps]
    ops += [("unmap", p * PG, n * PG) for p, n in unmaps]
    run_against_oracle(PG, ops)
