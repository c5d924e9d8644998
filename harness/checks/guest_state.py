"""The guest kernel's IOMMU state, replayed from its own trace up to any position.

Built from the guest's events (:mod:`harness.trace.guest`); used by
:mod:`harness.checks.guest_intent` to ask, for a position of the guest's log,
what each device's domain maps, which unmapped ranges are not yet invalidated,
and which maps the guest made between two positions.

Each ``iommu:map`` / ``iommu:unmap`` is credited to its device by
:func:`harness.checks.guest_attribution.resolve_ops` (the DMA-API event that
reports it, a firmware direct mapping, or the NVMe command whose data the DMA
IOVA API maps); what none of those names is *unattributed* (device None),
counted, and explains a translation of any device.

Pure code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from harness.checks.guest_attribution import GuestOp, resolve_ops
from harness.models.iommu_domain import IommuDomain, Mapping
from harness.trace.guest import GuestEvent, GuestHeader, GuestLostEvents, GuestQiSubmit

__all__ = ["GuestOp", "DeadMapping", "GuestState", "resolve_ops", "lost_events"]

_PAGE: Final = 4096


def _covered(spans: Sequence[tuple[int, int]], first: int, last: int) -> bool:
    """Whether sorted ``(first, last)`` ``spans`` cover ``[first, last]`` with no hole."""
    at = first
    for lo, hi in spans:
        if lo > at:
            break
        at = max(at, hi + 1)
        if at > last:
            return True
    return at > last


@dataclass(frozen=True, slots=True)
class DeadMapping:
    """A mapping the guest unmapped: ``unmap`` is the guest event; ``flushed``
    the guest position of the invalidation that covered it (None: not yet)."""

    iova: int
    last: int
    paddr: int
    prot: int
    unmap: GuestEvent
    flushed: int | None


def lost_events(guest: Sequence[GuestEvent]) -> int:
    """Events the guest's ring buffer says it lost: ``[LOST N EVENTS]`` lines, and
    an ``entries-in-buffer/entries-written`` header whose counts differ."""
    lost = 0
    for e in guest:
        if isinstance(e, GuestLostEvents):
            lost += e.count
        elif isinstance(e, GuestHeader):
            kept, written = e.entries_in_buffer, e.entries_written
            if kept is not None and written is not None and written > kept:
                lost += written - kept
    return lost


class GuestState:
    """The guest's IOMMU state at a position of its log, moved forward with
    :meth:`advance` (positions only grow).

    ``domains``: device source id (None: unattributed) -> its domain model;
    ``dead``: per device, the ranges it unmapped, each with the position of
    the invalidation that covered it (None: not yet; under virtio-iommu the
    position of the unmap itself, once QEMU removed the range:
    :meth:`flush_unmap`); ``did_of_sid``: VT-d
    domain ids of devices (filled in by the caller) so that page and domain
    invalidations only flush their own domain.
    """

    def __init__(self, guest: Sequence[GuestEvent]) -> None:
        self._guest = guest
        self.ops, self.unattributed_maps, self.unattributed_unmaps = resolve_ops(guest)
        self.invalidations = [(pos, e) for pos, e in enumerate(guest)
                              if isinstance(e, GuestQiSubmit) and e.desc_type == "iotlb_inv"]
        self.maps = sum(1 for op in self.ops if op.map)
        self.unmaps = len(self.ops) - self.maps
        self.domains: dict[int | None, IommuDomain] = {}
        self.dead: dict[int | None, list[DeadMapping]] = {}
        self.did_of_sid: dict[int, int] = {}
        self._maps_by_page: dict[int, list[GuestOp]] = {}
        for op in self.ops:
            if op.map:
                for page in range(op.iova // _PAGE, (op.iova + op.size - 1) // _PAGE + 1):
                    self._maps_by_page.setdefault(page, []).append(op)
        self._applied = 0
        self._inv_applied = 0
        self._at = -1

    @property
    def devices(self) -> int:
        return sum(1 for sid in self.domains if sid is not None)

    def translate(self, sid: int, iova: int) -> Mapping | None:
        """The mapping of ``iova`` in the domain of ``sid``, else in the unattributed maps."""
        for key in (sid, None):
            domain = self.domains.get(key)
            m = domain.translate(iova) if domain is not None else None
            if m is not None:
                return m
        return None

    def dead_for(self, sid: int) -> Iterator[DeadMapping]:
        """Unmapped ranges of ``sid`` (and unattributed ones), newest first."""
        yield from reversed(self.dead.get(sid, ()))
        yield from reversed(self.dead.get(None, ()))

    def maps_between(self, sid: int, iova: int, low: int, high: int) -> Iterator[GuestOp]:
        """Guest maps of ``iova`` for ``sid`` (or unattributed) at positions in (low, high)."""
        for op in self._maps_by_page.get(iova // _PAGE, ()):
            if low < op.pos < high and op.sid in (sid, None) and op.iova <= iova <= op.iova + op.size - 1:
                yield op

    def domain(self, sid: int | None) -> IommuDomain:
        d = self.domains.get(sid)
        if d is None:
            d = self.domains[sid] = IommuDomain()
        return d

    def advance(self, to: int) -> None:
        """Apply guest maps, unmaps and invalidations at positions <= ``to``."""
        if to <= self._at:
            return
        ops, invs = self.ops, self.invalidations
        while True:
            next_op = ops[self._applied].pos if self._applied < len(ops) else None
            next_inv = invs[self._inv_applied][0] if self._inv_applied < len(invs) else None
            candidates = [p for p in (next_op, next_inv) if p is not None and p <= to]
            if not candidates:
                break
            if next_op is not None and next_op == min(candidates):
                self._apply(ops[self._applied])
                self._applied += 1
            else:
                self._flush(*invs[self._inv_applied])
                self._inv_applied += 1
        self._at = to

    def _apply(self, op: GuestOp) -> None:
        domain = self.domain(op.sid)
        if op.map:
            try:
                domain.map(op.iova, op.paddr, op.size, op.prot, origin=op.event)
            except OSError:
                pass  # a map over a live one: the guest's own log is inconsistent; the translation rule still holds
            return
        end = op.iova + op.size - 1
        removed: list[tuple[int, int, int, int]] = []
        addr = op.iova
        while addr <= end:  # what unmap will remove: it stops at the first hole
            m = domain.translate(addr)
            if m is None:
                break
            removed.append((m.iova, m.last, m.paddr, m.prot))
            addr = m.last + 1
        domain.unmap(op.iova, op.size)
        dead = self.dead.setdefault(op.sid, [])
        for iova, last, paddr, prot in removed:
            lo, hi = max(iova, op.iova), min(last, op.iova + op.size - 1)
            dead.append(DeadMapping(lo, hi, paddr + (lo - iova), prot, op.event, None))
        if len(dead) > 4096:  # bound memory: forget the oldest flushed ones
            self.dead[op.sid] = [d for d in dead if d.flushed is None] + [d for d in dead if d.flushed][-1024:]

    def flush_unmap(self, pos: int, removed: Sequence[tuple[int, int]]) -> int:
        """Mark dead the ranges the guest's unmap at position ``pos`` removed that
        lie wholly inside the union of ``removed`` (``(first, last)`` byte ranges
        the vIOMMU removed for it): a vIOMMU without an IOTLB to invalidate
        (virtio-iommu) stops translating them once its UNMAP request removed
        them (QEMU's ``virtio_iommu_unmap_done``, one per mapping, and one guest
        range can span several).  Call after :meth:`advance` past ``pos``.
        Returns how many ranges were marked."""
        event = self._guest[pos] if 0 <= pos < len(self._guest) else None
        spans = sorted(removed)
        marked = 0
        for dead in self.dead.values():
            for i, d in enumerate(dead):
                if d.flushed is None and d.unmap is event and _covered(spans, d.iova, d.last):
                    dead[i] = DeadMapping(d.iova, d.last, d.paddr, d.prot, d.unmap, pos)
                    marked += 1
        return marked

    def _flush(self, pos: int, inv: GuestQiSubmit) -> None:
        gran = inv.granularity
        for sid, dead in self.dead.items():
            did = self.did_of_sid.get(sid) if sid is not None else None
            if gran == "page" and did is not None and did != inv.did:
                continue
            if gran == "domain" and did is not None and did != inv.did:
                continue
            if gran == "page":
                start = inv.addr & ~((_PAGE << inv.am) - 1)
                last = start + (_PAGE << inv.am) - 1
            else:
                start, last = 0, (1 << 64) - 1
            for i, d in enumerate(dead):
                if d.flushed is None and start <= d.iova and d.last <= last:
                    dead[i] = DeadMapping(d.iova, d.last, d.paddr, d.prot, d.unmap, pos)
