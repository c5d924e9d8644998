"""Deliberately wrong variants of the vhost-vdpa IOTLB model
(:mod:`harness.models.vhost_vdpa`).

Each mutant is a subclass of :class:`VhostVdpa` overriding one method to break
one kernel rule. The unit tests run every mutant against the naive oracle of
``tests/unit/test_vhost_vdpa_model.py`` and require that each one is caught; the
differential test (``difftest vhost-vdpa --model-mutant NAME``) must diverge from
the kernel with each of them.

``MUTANTS`` maps a name (all start with ``vdpa-``, so they can share a registry
with the vhost-net mutants) to a :class:`Mutant` (``name``, one-line
``description``, ``cls``: the subclass, built like :class:`VhostVdpa`).
"""

from __future__ import annotations

import errno as E
from dataclasses import dataclass

from harness.models.iotlb import IOTLB, IOTLBMap
from harness.models.vhost_vdpa import (
    IOTLB_BATCH_BEGIN,
    IOTLB_UPDATE,
    PAGE_SIZE,
    VHOST_ACCESS_RW,
    VhostVdpa,
)

__all__ = ["Mutant", "MUTANTS"]


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    cls: type[VhostVdpa]


class _OverlapAllowed(VhostVdpa):
    def overlaps(self, iotlb: IOTLB, iova: int, size: int) -> bool:
        return False  # no EEXIST: overlapping maps coexist, as in vhost-net's IOTLB


class _NoUnpin(VhostVdpa):
    def unpin(self, m: IOTLBMap) -> None:
        pass  # INVALIDATE (and close) leave pinned_vm as it was


class _InvalidateSplit(VhostVdpa):
    def invalidate(self, iotlb: IOTLB, iova: int, size: int) -> list[IOTLBMap]:
        # Trims maps to the parts outside the range instead of removing them whole.
        last = (iova + size - 1) % (1 << 64)
        removed = iotlb.del_range(iova, last)
        for m in removed:
            self.unpin(m)
            lo, hi = iova & ~(PAGE_SIZE - 1), last | (PAGE_SIZE - 1)
            if iova <= last and m.start < lo:
                self.map(iotlb, m.start, lo - m.start, m.addr, m.perm)
            if iova <= last and hi < m.last:
                self.map(iotlb, hi + 1, m.last - hi, m.addr + (hi + 1 - m.start), m.perm)
        return removed


class _OneMapPerUpdate(VhostVdpa):
    def chunks(self, phys: list[int]) -> list[tuple[int, int]]:
        return [(0, len(phys))]  # ignores physical contiguity: one map for the whole UPDATE


class _MapPerPage(VhostVdpa):
    def chunks(self, phys: list[int]) -> list[tuple[int, int]]:
        return [(i, 1) for i in range(len(phys))]  # never joins contiguous pages


class _NoMemlock(VhostVdpa):
    def update(self, iotlb: IOTLB, iova: int, size: int, uaddr: int, perm: int) -> int:
        limit, self.mm.memlock_pages = self.mm.memlock_pages, None  # RLIMIT_MEMLOCK not checked
        try:
            return super().update(iotlb, iova, size, uaddr, perm)
        finally:
            self.mm.memlock_pages = limit


class _WriteOnlyWithRw(VhostVdpa):
    def pin(self, uaddr: int, npages: int, write: bool) -> list[int] | None:
        return super().pin(uaddr, npages, False)  # FOLL_WRITE never asked: read-only memory pins for WO/RW


class _Size0InvalidatesNothing(VhostVdpa):
    def invalidate(self, iotlb: IOTLB, iova: int, size: int) -> list[IOTLBMap]:
        if size == 0:
            return []  # no wrap of iova + size - 1
        return super().invalidate(iotlb, iova, size)


class _NpagesFromSize(VhostVdpa):
    def npages(self, iova: int, size: int) -> int:
        return super().npages(0, size)  # forgets the iova's offset in its page


class _AsOnlyOnSuccess(VhostVdpa):
    def handle(self, asid: int, type: int, iova: int, size: int, uaddr: int, perm: int) -> int:
        existed = asid in self.ases
        err = super().handle(asid, type, iova, size, uaddr, perm)
        if err and not existed and type in (IOTLB_UPDATE, IOTLB_BATCH_BEGIN):
            self.ases.pop(asid, None)  # a failed UPDATE leaves no address space behind
        return err


class _BatchIgnoresAsid(VhostVdpa):
    def batch_blocks(self, asid: int) -> bool:
        return False  # during a batch, messages of another asid go through


class _PermZeroRefused(VhostVdpa):
    def update(self, iotlb: IOTLB, iova: int, size: int, uaddr: int, perm: int) -> int:
        if not perm & VHOST_ACCESS_RW:
            return E.EINVAL  # perm 0 (no access bit) refused
        return super().update(iotlb, iova, size, uaddr, perm)


def _entry(name: str, description: str, cls: type[VhostVdpa]) -> tuple[str, Mutant]:
    return name, Mutant(name, description, cls)


MUTANTS: dict[str, Mutant] = dict([
    _entry("vdpa-overlap-allowed", "an UPDATE intersecting a map is accepted (no EEXIST)", _OverlapAllowed),
    _entry("vdpa-no-unpin", "removing a map does not lower pinned_vm (VmPin)", _NoUnpin),
    _entry("vdpa-invalidate-split", "INVALIDATE trims maps to what lies outside the range instead of "
           "removing them whole", _InvalidateSplit),
    _entry("vdpa-one-map-per-update", "an UPDATE makes one map whatever the physical layout", _OneMapPerUpdate),
    _entry("vdpa-map-per-page", "an UPDATE makes one map per page (contiguous pages not joined)", _MapPerPage),
    _entry("vdpa-no-memlock", "RLIMIT_MEMLOCK is not checked", _NoMemlock),
    _entry("vdpa-write-ignored", "pages are pinned without FOLL_WRITE even for WO/RW", _WriteOnlyWithRw),
    _entry("vdpa-size0-noop", "INVALIDATE of size 0 removes nothing (no wrap of iova + size - 1)",
           _Size0InvalidatesNothing),
    _entry("vdpa-npages-from-size", "npages ignores the iova's offset in its page", _NpagesFromSize),
    _entry("vdpa-as-on-success", "a failed UPDATE or BATCH_BEGIN creates no address space", _AsOnlyOnSuccess),
    _entry("vdpa-batch-any-asid", "during a batch, messages of another asid are accepted", _BatchIgnoresAsid),
    _entry("vdpa-perm0-refused", "an UPDATE with no access bit in perm is refused", _PermZeroRefused),
])
"""Every mutant by name."""
