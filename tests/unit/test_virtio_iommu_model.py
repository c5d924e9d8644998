"""The virtio-iommu model (harness/models/virtio_iommu.py) against QEMU 7.2's
rules (hw/virtio/virtio-iommu.c) and against a naive oracle: a list of
mappings per domain scanned linearly, the requests written the plainest way."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.models.virtio_iommu import (
    ATTACH_F_BYPASS,
    FAULT_R_DOMAIN,
    FAULT_R_MAPPING,
    FAULT_R_UNKNOWN,
    MAP_F_READ,
    MAP_F_WRITE,
    RESV_MEM_T_MSI,
    RESV_MEM_T_RESERVED,
    S_INVAL,
    S_NOENT,
    S_OK,
    S_RANGE,
    VirtioIommuModel,
    granule,
)

PAGE = 4096
RW = MAP_F_READ | MAP_F_WRITE


# ---- examples of QEMU's rules ------------------------------------------------


def attached(domain: int = 1, endpoint: int = 16) -> VirtioIommuModel:
    m = VirtioIommuModel(bypass=False)
    assert m.attach(domain, endpoint) == S_OK
    return m


def test_map_translates_with_offset_and_permission() -> None:
    m = attached()
    assert m.map(1, 0x10000, 0x11FFF, 0x80000, MAP_F_READ) == S_OK
    t = m.translate(16, 0x10234, MAP_F_READ)
    assert (t.kind, t.gpa) == ("mapped", 0x80234)
    assert m.translate(16, 0x11FFF, 1).gpa == 0x81FFF
    write = m.translate(16, 0x10000, 2)
    assert (write.kind, write.reason) == ("fault", FAULT_R_MAPPING)
    assert m.translate(16, 0x12000, 1).kind == "fault"


def test_map_overlapping_a_mapping_is_refused() -> None:
    m = attached()
    assert m.map(1, 0x10000, 0x13FFF, 0x80000, RW) == S_OK
    assert m.map(1, 0x13000, 0x14FFF, 0x90000, RW) == S_INVAL
    assert m.map(1, 0x0F000, 0x10FFF, 0x90000, RW) == S_INVAL
    assert m.map(1, 0x14000, 0x14FFF, 0x90000, RW) == S_OK
    assert m.map(2, 0x20000, 0x20FFF, 0, RW) == S_NOENT
    assert m.map(1, 0x30000, 0x30FFF, 0, 8) == S_INVAL  # unknown flag


def test_unmap_removes_only_whole_mappings_and_qemu_keeps_what_it_removed_before_a_split() -> None:
    m = attached()
    for i in range(3):
        assert m.map(1, 0x10000 + i * 0x2000, 0x11FFF + i * 0x2000, 0x80000 + i * 0x2000, RW) == S_OK
    # [0x10000, 0x12FFF] covers the first mapping whole and splits the second one.
    status, removed = m.unmap(1, 0x10000, 0x12FFF)
    assert status == S_RANGE
    assert [r.virt_start for r in removed] == [0x10000]
    assert m.translate(16, 0x10000, 1).kind == "fault"
    assert m.translate(16, 0x12000, 1).kind == "mapped"
    # An unmap of a range with nothing in it succeeds.
    assert m.unmap(1, 0x40000, 0x40FFF) == (S_OK, [])
    assert m.unmap(9, 0, 0xFFF)[0] == S_NOENT


def test_unmap_as_the_spec_asks_removes_nothing_when_it_would_split() -> None:
    m = attached()
    assert m.map(1, 0x10000, 0x11FFF, 0x80000, RW) == S_OK
    assert m.map(1, 0x12000, 0x13FFF, 0x90000, RW) == S_OK
    assert m.spec_problems_unmap(1, 0x10000, 0x12FFF) == ["would split the mapping 0x12000-0x13fff"]
    assert m.unmap_spec(1, 0x10000, 0x12FFF) == (S_RANGE, [])
    assert m.translate(16, 0x10000, 1).kind == "mapped"
    status, removed = m.unmap_spec(1, 0x10000, 0x13FFF)
    assert status == S_OK and len(removed) == 2


def test_spec_problems_of_a_map_name_misalignment_and_overlap() -> None:
    m = attached()
    assert m.spec_problems_map(1, 0x1000, 0x1FFF, 0x5000, RW) == []
    problems = m.spec_problems_map(1, 0x1800, 0x1FFE, 0x5004, RW)
    assert any("virt_start" in p for p in problems)
    assert any("phys_start" in p for p in problems)
    assert any("virt_end + 1" in p for p in problems)
    assert m.map(1, 0x1000, 0x1FFF, 0x5000, RW) == S_OK
    assert m.spec_problems_map(1, 0x1000, 0x1FFF, 0x5000, RW) == ["overlaps the mapping 0x1000-0x1fff"]
    assert granule(0xFFFFFFFFFFFFF000) == 0x1000
    with pytest.raises(ValueError):
        granule(0)


def test_attach_moves_an_endpoint_and_frees_the_domain_it_left() -> None:
    m = attached(1, 16)
    assert m.map(1, 0x1000, 0x1FFF, 0x5000, RW) == S_OK
    assert m.attach(2, 16) == S_OK
    assert 1 not in m.domains  # QEMU frees a domain with no endpoint left, mappings and all
    assert m.attach(1, 16) == S_OK
    assert m.translate(16, 0x1000, 1).kind == "fault"


def test_detach_needs_the_right_domain() -> None:
    m = attached(1, 16)
    assert m.detach(2, 16) == S_INVAL
    assert m.detach(1, 99) == S_NOENT
    assert m.detach(1, 16) == S_OK
    t = m.translate(16, 0x1000, 1)
    assert (t.kind, t.reason) == ("fault", FAULT_R_DOMAIN)
    m.bypass = True
    assert m.translate(16, 0x1000, 1).kind == "bypass"


def test_bypass_domains_and_unknown_endpoints() -> None:
    m = VirtioIommuModel(bypass=False, known_endpoints={16, 24})
    assert m.attach(1, 99) == S_NOENT
    assert m.attach(1, 16, ATTACH_F_BYPASS) == S_OK
    assert m.attach(1, 24) == S_INVAL  # the domain exists in the other mode
    assert m.translate(16, 0x1234, 3).kind == "bypass"
    assert m.map(1, 0, 0xFFF, 0, RW) == S_INVAL
    assert m.attach(1, 16, 2) == S_INVAL  # unknown attach flag
    unknown = m.translate(99, 0, 1)
    assert (unknown.kind, unknown.reason) == ("fault", FAULT_R_UNKNOWN)


def test_reserved_regions_after_the_endpoint_lookup() -> None:
    m = attached()
    m.add_reserved(0xFEE00000, 0xFEEFFFFF, RESV_MEM_T_MSI)
    m.add_reserved(0x1000, 0x1FFF, RESV_MEM_T_RESERVED)
    assert m.map(1, 0x1000, 0x1FFF, 0x5000, RW) == S_OK
    assert m.translate(16, 0xFEE00004, 2).kind == "msi"
    assert m.translate(16, 0x1000, 1).kind == "fault"  # the reserved region wins over the mapping
    m.reset()
    assert m.domains == {} and m.endpoints == {}


# ---- the naive oracle --------------------------------------------------------


@dataclass
class NaiveDomain:
    bypass: bool
    eps: set[int] = field(default_factory=set)
    maps: list[tuple[int, int, int, int]] = field(default_factory=list)  # (start, end, phys, flags)


class Naive:
    """QEMU 7.2's requests written as plainly as possible (unmap in address order)."""

    def __init__(self, bypass: bool) -> None:
        self.bypass = bypass
        self.ep: dict[int, int | None] = {}
        self.dom: dict[int, NaiveDomain] = {}

    def _leave(self, e: int) -> None:
        d = self.ep.get(e)
        if d is not None:
            self.dom[d].eps.discard(e)
            if not self.dom[d].eps:
                del self.dom[d]
            self.ep[e] = None

    def attach(self, d: int, e: int, flags: int) -> int:
        if flags not in (0, 1):
            return S_INVAL
        self.ep.setdefault(e, None)
        self._leave(e)
        if d in self.dom and self.dom[d].bypass != bool(flags):
            return S_INVAL
        self.dom.setdefault(d, NaiveDomain(bool(flags))).eps.add(e)
        self.ep[e] = d
        return S_OK

    def detach(self, d: int, e: int) -> int:
        if e not in self.ep:
            return S_NOENT
        if self.ep[e] != d:
            return S_INVAL
        self._leave(e)
        return S_OK

    def map(self, d: int, s: int, end: int, p: int, f: int) -> int:
        if f & ~7:
            return S_INVAL
        if d not in self.dom:
            return S_NOENT
        if self.dom[d].bypass:
            return S_INVAL
        if any(not (end < a or b < s) for a, b, _, _ in self.dom[d].maps):
            return S_INVAL
        self.dom[d].maps.append((s, end, p, f))
        return S_OK

    def unmap(self, d: int, s: int, end: int) -> int:
        if d not in self.dom:
            return S_NOENT
        if self.dom[d].bypass:
            return S_INVAL
        for m in sorted(self.dom[d].maps):
            a, b = m[0], m[1]
            if end < a or b < s:
                continue
            if not (s <= a and b <= end):
                return S_RANGE
            self.dom[d].maps.remove(m)
        return S_OK

    def translate(self, e: int, addr: int, access: int) -> tuple[str, int | None]:
        if e not in self.ep or self.ep[e] is None:
            return ("bypass", addr) if self.bypass else ("fault", None)
        d = self.dom[self.ep[e]]  # type: ignore[index]
        if d.bypass:
            return "bypass", addr
        for a, b, p, f in d.maps:
            if a <= addr <= b:
                need = (1 if access & 1 else 0) | (2 if access & 2 else 0)
                return ("mapped", p + addr - a) if f & need == need else ("fault", None)
        return "fault", None


DOMAINS = st.integers(0, 2)
ENDPOINTS = st.integers(0, 2)
PAGES = st.integers(0, 15)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, tuple[int, ...]]:
    kind = draw(st.sampled_from(["attach", "attach", "detach", "map", "map", "map", "unmap", "unmap"]))
    if kind == "attach":
        return kind, (draw(DOMAINS), draw(ENDPOINTS), draw(st.sampled_from([0, 0, 0, 1, 2])))
    if kind == "detach":
        return kind, (draw(DOMAINS), draw(ENDPOINTS))
    first = draw(PAGES)
    last = draw(st.integers(first, min(first + 4, 15)))
    if kind == "map":
        return kind, (draw(DOMAINS), first * PAGE, last * PAGE + PAGE - 1, draw(st.integers(0, 63)) * PAGE,
                      draw(st.sampled_from([1, 2, 3, 3, 8])))
    return kind, (draw(DOMAINS), first * PAGE, last * PAGE + PAGE - 1)


@settings(max_examples=300, deadline=None)
@given(bypass=st.booleans(), ops=st.lists(requests(), max_size=40))
def test_model_matches_the_naive_oracle(bypass: bool, ops: list[tuple[str, tuple[int, ...]]]) -> None:
    model = VirtioIommuModel(bypass=bypass)
    naive = Naive(bypass)
    for kind, args in ops:
        if kind == "unmap":
            got = model.unmap(*args)[0]
        else:
            got = getattr(model, kind)(*args)
        assert got == getattr(naive, kind)(*args), (kind, args)
        for ep in range(3):
            for page in range(16):
                for access in (1, 2):
                    t = model.translate(ep, page * PAGE + 8, access)
                    kind_, gpa = naive.translate(ep, page * PAGE + 8, access)
                    assert t.kind == kind_ and (t.gpa if kind_ != "fault" else None) == gpa, (ep, page, access)
