"""The vhost-vdpa IOTLB model (harness.models.vhost_vdpa) against the numbers seen
in a guest (Linux 6.12, vdpa_sim PA mode) and against a naive oracle written from
the kernel's rules with plain lists, over random message sequences; every mutant
(harness.models.vhost_vdpa_mutants) must be caught by the oracle."""

from __future__ import annotations

import errno as E
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from harness.models.vhost_vdpa import (
    F_DESC_ASID,
    F_IOTLB_ASID,
    F_IOTLB_BATCH,
    F_IOTLB_MSG_V2,
    IOTLB_BATCH_BEGIN,
    IOTLB_BATCH_END,
    IOTLB_INVALIDATE,
    IOTLB_MISS,
    IOTLB_UPDATE,
    VDPASIM_BACKEND_FEATURES,
    Mm,
    VhostVdpa,
    user_memory,
)
from harness.models.vhost_vdpa_mutants import MUTANTS

P = 4096
B = 0x7D00_0000_0000
RUNS = (1, 2, 1, 3, 1, 4, 2, 1, 5, 1, 2, 8, 1, 3, 1, 1, 6, 2, 1, 4)  # the layout used in the guest
NPAGES = sum(RUNS)
RO_FROM = NPAGES - 4
U64 = 1 << 64


def phys() -> list[int]:
    out: list[int] = []
    for k, run in enumerate(RUNS):
        out += [0x1000_0000 + k * 0x10_0000 + i * P for i in range(run)]
    return out


def device(cls: type[VhostVdpa] = VhostVdpa, memlock: int | None = 2048, asid: bool = False) -> VhostVdpa:
    dev = cls(user_memory(B, phys(), readonly=range(RO_FROM, NPAGES)), mm=Mm(memlock_pages=memlock), owner=True)
    if asid:
        assert dev.set_backend_features(F_IOTLB_MSG_V2 | F_IOTLB_BATCH | F_IOTLB_ASID) == 0
    return dev


def upd(dev: VhostVdpa, iova: int, size: int, uaddr: int = B, perm: int = 3, asid: int = 0) -> int:
    return dev.write(IOTLB_UPDATE, iova, size, uaddr, perm, asid).errno


def inv(dev: VhostVdpa, iova: int, size: int, asid: int = 0) -> int:
    return dev.write(IOTLB_INVALIDATE, iova, size, asid=asid).errno


# ---------------------------------------------------------------------- what the guest showed


def test_update_maps_one_entry_per_contiguous_run_and_pins_per_page() -> None:
    dev = device()
    assert upd(dev, 0x10000, 4 * P) == 0  # pages 0 | 1-2 | 3: three maps, 4 pages pinned
    assert dev.mm.pinned_vm == 4
    assert [(s, last) for s, last, _, _ in dev.maps(0)] == [(0x10000, 0x10FFF), (0x11000, 0x12FFF), (0x13000, 0x13FFF)]
    assert upd(dev, 0x13000, P) == E.EFAULT  # EEXIST, seen as EFAULT
    assert dev.write(IOTLB_UPDATE, 0x13000, P, B, 3).cause == E.EEXIST
    assert upd(dev, 0x14000, P) == 0 and dev.mm.pinned_vm == 5  # adjacent is fine
    assert inv(dev, 0x12000, 1) == 0 and dev.mm.pinned_vm == 3  # the whole 2-page map goes
    assert [dev.covered(0, 0x10000 + i * P, P) for i in range(6)] == [True, False, False, True, True, False]


def test_invalidate_size_zero_wraps() -> None:
    dev = device()
    upd(dev, 0x10000, 4 * P)
    upd(dev, 0x14000, P)
    assert inv(dev, 0x14000, 0) == 0 and dev.mm.pinned_vm == 5  # last = 0x13fff: no map holds both ends
    assert inv(dev, 0x11001, 0) == 0 and dev.mm.pinned_vm == 3  # the map holding 0x11000 and 0x11001
    assert inv(dev, 0, 0) == 0 and dev.mm.pinned_vm == 0 and dev.maps(0) == []  # everything


def test_whole_region_twice_then_one_page_invalidated() -> None:
    dev = device()
    assert upd(dev, 0, 46 * P) == 0 and upd(dev, 0x1000000, 46 * P) == 0
    assert dev.mm.pinned_vm == 92
    assert inv(dev, 0x1000000 + 11 * P, P) == 0 and dev.mm.pinned_vm == 88  # run of pages 8-11


def test_permissions_and_readonly_memory() -> None:
    dev = device()
    ro = B + 47 * P
    assert upd(dev, 0x40000, P, ro, 3) == E.EFAULT and upd(dev, 0x40000, P, ro, 2) == E.EFAULT
    assert upd(dev, 0x40000, P, ro, 1) == 0 and upd(dev, 0x41000, P, ro, 0) == 0
    assert upd(dev, 0x42000, P, ro, 4) == 0 and upd(dev, 0x43000, P, ro, 6) == E.EFAULT
    assert upd(dev, 0x50000, 3 * P, B + 45 * P, 1) == 0 and upd(dev, 0x60000, 3 * P, B + 45 * P, 3) == E.EFAULT
    assert upd(dev, 0x70000, 3 * P, B + 49 * P, 1) == E.EFAULT  # runs past the region
    assert dev.mm.pinned_vm == 6


def test_ranges_sizes_and_unaligned_arguments() -> None:
    dev = device()
    assert dev.write(IOTLB_UPDATE, 0x1000, 0, B, 1).errno == E.EINVAL  # size 0: before the handler
    assert upd(dev, U64 - P, 2 * P) == E.EFAULT  # wraps
    assert upd(dev, U64 - P, P) == 0  # the last page is fine
    assert upd(dev, 0x100800, P) == 0 and dev.mm.pinned_vm == 3  # 2 pages from 0x100000
    assert [dev.covered(0, 0xFF000 + i * P, P) for i in range(4)] == [False, True, True, False]
    assert upd(dev, 0x200000, P, B + 0x800) == 0 and dev.mm.pinned_vm == 4
    assert upd(dev, 0x300000, P + 1) == 0 and dev.mm.pinned_vm == 6
    assert upd(dev, 0x2FF000, P + 1) == E.EFAULT  # overlaps 0x300000
    assert inv(dev, 0x301000, U64 - 0x800) == 0 and dev.mm.pinned_vm == 6  # wrapped: holds both ends? none


def test_asids_batches_and_address_space_creation() -> None:
    dev = device(asid=True)
    assert inv(dev, 0, 0, asid=1) == E.EFAULT  # no address space 1 yet
    assert dev.write(IOTLB_BATCH_BEGIN, asid=0).errno == 0
    assert upd(dev, 0xA0000, P, asid=1) == E.EFAULT  # batch of asid 0 under way ...
    assert dev.write(IOTLB_BATCH_END, asid=0).errno == 0
    assert inv(dev, 0, P, asid=1) == 0  # ... but address space 1 was made all the same
    assert upd(dev, 0x40000, P, asid=2) == E.EFAULT and dev.write(IOTLB_BATCH_BEGIN, asid=2).errno == E.EFAULT
    assert dev.write(IOTLB_BATCH_END, asid=0).errno == 0  # outside a batch: fine
    assert dev.write(IOTLB_BATCH_BEGIN, asid=1).errno == 0 and dev.write(IOTLB_BATCH_BEGIN, asid=1).errno == 0
    assert dev.write(IOTLB_BATCH_BEGIN, asid=0).errno == E.EFAULT and inv(dev, 0, 0, asid=0) == E.EFAULT
    assert dev.write(IOTLB_BATCH_END, asid=1).errno == 0
    assert dev.write(IOTLB_MISS, asid=0).errno == E.EFAULT


def test_asid_ignored_without_the_feature_and_features() -> None:
    dev = device()
    assert upd(dev, 0x80000, P, asid=1) == 0 and dev.maps(0) and 1 not in dev.ases
    assert dev.get_backend_features() == VDPASIM_BACKEND_FEATURES == 0x17E
    assert dev.set_backend_features(0x7) == E.EOPNOTSUPP  # bit 0 is no feature
    assert dev.set_backend_features(F_DESC_ASID | F_IOTLB_MSG_V2) == E.EINVAL
    assert dev.set_backend_features(F_DESC_ASID | F_IOTLB_ASID) == E.EOPNOTSUPP
    assert dev.set_backend_features(VDPASIM_BACKEND_FEATURES) == 0


def test_memlock_owner_short_writes_and_close() -> None:
    dev = device(memlock=16)
    assert upd(dev, 0, 9 * P) == 0
    assert upd(dev, 0x100000, 8 * P) == E.EFAULT  # 9 + 8 > 16
    assert dev.write(IOTLB_UPDATE, 0x100000, 8 * P, B, 3).cause == E.ENOMEM
    assert upd(dev, 0x100000, 7 * P) == 0 and dev.mm.pinned_vm == 16
    assert dev.write(IOTLB_BATCH_END, length=40).errno == 0 and dev.write(IOTLB_BATCH_END, length=39).errno == E.EINVAL
    dev.close()
    assert dev.mm.pinned_vm == 0 and dev.ases == {}
    fresh = VhostVdpa(dev.memory)
    assert fresh.write(IOTLB_UPDATE, 0, P, B, 3).cause == E.EPERM
    assert fresh.set_owner() == 0 and fresh.set_owner() == E.EBUSY


# ---------------------------------------------------------------------- the naive oracle


@dataclass
class Oracle:
    """The kernel's rules with lists: maps are [start, last, perm] per asid."""

    memlock: int
    asid_feature: bool = False
    ases: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    pinned: int = 0
    in_batch: bool = False
    batch_asid: int = 0

    def page_ok(self, va: int, write: bool) -> bool:
        i = (va - B) // P
        return va % P == 0 and 0 <= i < NPAGES and not (write and i >= RO_FROM)

    def write(self, t: int, iova: int, size: int, uaddr: int, perm: int, asid: int) -> int:
        if not self.asid_feature:
            asid = 0
        if t == IOTLB_UPDATE and size == 0:
            return E.EINVAL
        if t in (IOTLB_UPDATE, IOTLB_BATCH_BEGIN) and asid not in self.ases:
            if asid >= 2:
                return E.EFAULT
            self.ases[asid] = []
        if asid not in self.ases or (self.in_batch and self.batch_asid != asid):
            return E.EFAULT
        maps = self.ases[asid]
        if t == IOTLB_INVALIDATE:
            last = (iova + size - 1) % U64
            keep = [(s, la) for s, la in maps if not (s <= last and la >= iova)]
            self.pinned -= sum((la - s + 1) // P for s, la in maps if (s, la) not in keep)
            self.ases[asid] = keep
            return 0
        if t == IOTLB_BATCH_BEGIN:
            self.in_batch, self.batch_asid = True, asid
            return 0
        if t == IOTLB_BATCH_END:
            self.in_batch = False
            return 0
        if t != IOTLB_UPDATE:
            return E.EFAULT
        if iova + size > U64 or any(s <= iova + size - 1 and la >= iova for s, la in maps):
            return E.EFAULT
        first, end = iova - iova % P, -(-(iova + size) // P) * P
        n = (end - first) // P
        if n + self.pinned > self.memlock:
            return E.EFAULT
        pages = [uaddr - uaddr % P + i * P for i in range(n)]
        if not all(self.page_ok(va, bool(perm & 2)) for va in pages):
            return E.EFAULT
        ph = phys()
        start = first
        for i in range(n):  # a new map wherever the next page is not physically next
            if i == n - 1 or ph[(pages[i + 1] - B) // P] != ph[(pages[i] - B) // P] + P:
                maps.append((start, first + (i + 1) * P - 1))
                start = first + (i + 1) * P
        self.pinned += n
        return 0


_iova = st.one_of(st.integers(0, 40).map(lambda i: i * P), st.integers(0, 40).map(lambda i: i * P + 0x800),
                  st.integers(1, 3).map(lambda i: U64 - i * P), st.just(1))
_size = st.one_of(st.integers(1, 12).map(lambda i: i * P), st.integers(1, 50).map(lambda i: i * P),
                  st.just(0), st.integers(1, 3).map(lambda i: i * P + 1), st.just(U64 - 1))
_uaddr = st.one_of(st.integers(0, NPAGES - 1).map(lambda i: B + i * P), st.just(B + 0x800), st.just(B - P),
                   st.integers(RO_FROM - 2, NPAGES - 1).map(lambda i: B + i * P))
_msg = st.tuples(st.sampled_from((2, 2, 2, 2, 3, 3, 3, 5, 6, 1)), _iova, _size, _uaddr,
                 st.sampled_from((1, 2, 3, 0, 4)), st.sampled_from((0, 0, 0, 1, 2)))
_sequence = st.tuples(st.booleans(), st.lists(_msg, min_size=1, max_size=30))


def run_both(cls: type[VhostVdpa], asid_feature: bool, msgs: list[tuple[int, int, int, int, int, int]]) -> str | None:
    """The first difference between model ``cls`` and the oracle, or None."""
    dev = device(cls, memlock=16, asid=asid_feature)
    oracle = Oracle(memlock=16, asid_feature=asid_feature)
    for i, (t, iova, size, uaddr, perm, asid) in enumerate(msgs):
        got = dev.write(t, iova, size, uaddr, perm, asid).errno
        want = oracle.write(t, iova, size, uaddr, perm, asid)
        maps = {a: sorted((s, la) for s, la, _, _ in dev.maps(a)) for a in dev.ases}
        if got != want or dev.mm.pinned_vm != oracle.pinned or maps != {a: sorted(m) for a, m in oracle.ases.items()}:
            return f"step {i}: errno {got} vs {want}, pinned {dev.mm.pinned_vm} vs {oracle.pinned}"
    dev.close()
    return None if dev.mm.pinned_vm == 0 else "pins left after close"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_sequence)
def test_model_agrees_with_the_naive_oracle(seq: tuple[bool, list[tuple[int, int, int, int, int, int]]]) -> None:
    assert run_both(VhostVdpa, seq[0], seq[1]) is None


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_every_mutant_is_caught_by_the_oracle(name: str) -> None:
    found: list[str] = []

    @settings(max_examples=1000, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(_sequence)
    def probe(seq: tuple[bool, list[tuple[int, int, int, int, int, int]]]) -> None:
        diff = run_both(MUTANTS[name].cls, seq[0], seq[1])
        if diff is not None:
            found.append(diff)
            raise AssertionError(diff)

    with pytest.raises(AssertionError):
        probe()
    assert found, f"mutant {name} was not caught"
