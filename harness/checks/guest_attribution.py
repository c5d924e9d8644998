"""Which device each of the guest kernel's IOMMU changes belongs to.

``iommu:map`` / ``iommu:unmap`` (drivers/iommu/iommu.c ``__iommu_map`` /
``__iommu_unmap``) name no domain and no device.  :func:`resolve_ops` credits
each to a device (PCI source id) from the guest's own trace, by two rules
tried in this order; used by :class:`harness.checks.guest_state.GuestState`.

1. DMA API (``via="dma-api"``): the device of the DMA-API event of the same
   task that reports the IOMMU call right after it (``dma:dma_map_*``,
   ``dma_alloc*``, ``dma_unmap_*``, ``dma_free*``, kernel/dma/mapping.c;
   ``dma_unmap_sg`` is logged right *before* its unmaps), whose ``dir`` also
   gives the permission (iommu-dma's ``dma_info_to_prot``: TO_DEVICE -> read,
   FROM_DEVICE -> write, BIDIRECTIONAL -> both).
2. Direct mapping (``via="direct-mapping"``): a map followed by
   ``iommu:attach_device_to_domain`` events before any DMA-API event is a
   firmware-requested direct mapping (drivers/iommu/iommu.c
   ``iommu_create_device_direct_mappings``, made before the group's devices
   are attached): it belongs to each device attached.

Anything else is *unattributed* (device None, ``via=""``) and counted: never
a guess.

Pure code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from harness.models.iommu_domain import IOMMU_READ, IOMMU_WRITE
from harness.trace.guest import (
    GuestAttachDevice,
    GuestDmaMap,
    GuestDmaUnmap,
    GuestEvent,
    GuestIommuMap,
    GuestIommuUnmap,
    GuestQiSubmit,
)

__all__ = ["GuestOp", "resolve_ops", "VIA_DMA_API", "VIA_DIRECT_MAPPING"]

VIA_DMA_API: Final = "dma-api"
VIA_DIRECT_MAPPING: Final = "direct-mapping"

_DIR_PROT: Final = {"TO_DEVICE": IOMMU_READ, "FROM_DEVICE": IOMMU_WRITE,
                    "BIDIRECTIONAL": IOMMU_READ | IOMMU_WRITE}
_LOOKAHEAD: Final = 256  # guest events searched for the event that reports an IOMMU call
_PAGE: Final = 4096


@dataclass(frozen=True, slots=True)
class GuestOp:
    """A guest IOMMU change with its device resolved.

    ``pos``: index of ``event`` in the guest's event list; ``map``: a map (else
    an unmap); ``sid``: PCI source id, None when unattributed; ``iova``, ``size``
    (bytes), ``paddr`` (guest-physical, 0 for unmaps); ``prot``: IOMMU_READ /
    IOMMU_WRITE bits (0 for unmaps); ``via``: the rule that named the device
    (``VIA_*``, "" when unattributed)."""

    pos: int
    map: bool
    sid: int | None
    iova: int
    size: int
    paddr: int
    prot: int
    event: GuestEvent
    via: str = ""


def _overlaps(segments: Iterable[tuple[int, int]], start: int, last: int) -> bool:
    for addr, size in segments:
        lo = addr & ~(_PAGE - 1)
        hi = (addr + max(size, 1) - 1) | (_PAGE - 1)
        if lo <= last and start <= hi:
            return True
    return False


def _same_task(event: GuestEvent, later: GuestEvent) -> bool:
    """Whether ``later`` may report the IOMMU call ``event``: the DMA-API event that
    reports an ``iommu_map``/``iommu_unmap`` is logged in the same call chain, so by
    the same task (two controllers probing at once on two kworkers interleave their
    events, often at the same iova in their own domains). Lines without a header
    (pid -1) are not filtered."""
    return event.pid < 0 or later.pid < 0 or later.pid == event.pid


def _unmap_sg_before(guest: Sequence[GuestEvent], pos: int) -> int | None:
    """The device of the ``dma_unmap_sg`` that announced the ``iommu:unmap`` at
    ``pos``: unlike the other DMA-API unmap events, ``dma_unmap_sg_attrs`` logs its
    event *before* unmapping (kernel/dma/mapping.c), so it is the same task's most
    recent DMA-API unmap event, with no IOMMU change of that task in between."""
    event = guest[pos]
    for earlier in reversed(guest[max(0, pos - _LOOKAHEAD):pos]):
        if not _same_task(event, earlier):
            continue
        if isinstance(earlier, (GuestIommuMap, GuestIommuUnmap)):
            return None
        if isinstance(earlier, GuestDmaUnmap):
            return earlier.sid if earlier.NAME == "dma_unmap_sg" else None
    return None


def resolve_ops(guest: Sequence[GuestEvent]) -> tuple[list[GuestOp], int, int]:
    """Attribute each ``iommu:map``/``unmap`` of ``guest`` to a device (module docstring).

    Returns the ops in guest order (one per device for a direct mapping; none
    for an unmap that removed nothing) and the numbers of unattributed maps and
    unmaps.  Never raises on any event sequence.
    """
    ops: list[GuestOp] = []
    n = len(guest)
    for pos, event in enumerate(guest):
        if isinstance(event, GuestIommuMap):
            last = event.iova + event.size - 1
            sids: list[int | None] = []
            prot = IOMMU_READ | IOMMU_WRITE
            via = VIA_DMA_API
            for later in guest[pos + 1:min(n, pos + 1 + _LOOKAHEAD)]:
                if not _same_task(event, later):
                    continue
                if isinstance(later, GuestDmaMap) and _overlaps(later.segments, event.iova, last):
                    sids = [later.sid]
                    prot = _DIR_PROT.get(later.dir, prot)
                    break
                if isinstance(later, GuestAttachDevice):
                    # A firmware-requested direct mapping (iommu_create_device_direct_mappings)
                    # is made just before the group's devices are attached to the domain.
                    sids.append(later.sid)
                    via = VIA_DIRECT_MAPPING
                elif sids and not isinstance(later, GuestQiSubmit):
                    break
            if not sids:
                sids = [None]
            ops.extend(GuestOp(pos, True, sid, event.iova, event.size, event.paddr, prot, event,
                               via if sid is not None else "") for sid in sids)
        elif isinstance(event, GuestIommuUnmap):
            if not event.unmapped_size:
                continue
            last = event.iova + event.unmapped_size - 1
            sid = _unmap_sg_before(guest, pos)
            for later in guest[pos + 1:min(n, pos + 1 + _LOOKAHEAD)] if sid is None else ():
                if not _same_task(event, later):
                    continue
                if isinstance(later, GuestDmaUnmap) and (
                        not later.segments or _overlaps(later.segments, event.iova, last)):
                    sid = later.sid
                    break
            ops.append(GuestOp(pos, False, sid, event.iova, event.unmapped_size, 0, 0, event,
                               VIA_DMA_API if sid is not None else ""))
    lost_maps = sum(1 for op in ops if op.map and op.sid is None)
    lost_unmaps = sum(1 for op in ops if not op.map and op.sid is None)
    return ops, lost_maps, lost_unmaps
