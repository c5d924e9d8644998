"""Ordering the guest kernel's events against QEMU's under virtio-iommu.

The pairs of :mod:`harness.checks.sync` (NVMe submissions and completions)
plus the driver's own requests, which the guest logs before QEMU sees them:

========================  ====================================  ==============================  =========
pair kind                  guest event                            QEMU event                      order
========================  ====================================  ==============================  =========
``viommu-map``             ``iommu:map`` iova, size, paddr        ``virtio_iommu_map`` whose      guest first
                           (drivers/iommu/iommu.c ``__iommu_map``) ``virt_end`` is iova+size-1
                                                                  and phys end paddr+size-1
``viommu-unmap``           ``iommu:unmap`` iova, unmapped_size    ``virtio_iommu_unmap`` whose    guest first
                           (``__iommu_unmap``)                    ``virt_end`` is
                                                                  iova+unmapped_size-1
========================  ====================================  ==============================  =========

Why guest first: drivers/iommu/virtio-iommu.c ``viommu_map_pages`` and
``viommu_unmap_pages`` only queue their request (``viommu_add_req``); the
queue is sent by ``viommu_iotlb_sync_map`` / ``viommu_iotlb_sync``, which
``iommu_map`` and the DMA-API unmap call after ``__iommu_map`` /
``__iommu_unmap`` logged their event.  One ``iommu:map`` can be several
MAP requests (one per ``map_pages`` call: ``__iommu_map`` splits the range
by page size), so the pair is keyed by the range's *last* byte, which only
the last request has; likewise for unmaps.  A request another context sent
early (its own sync flushing the shared queue) can reach QEMU before the
guest logged it; the pair then claims only that the guest had done what it
logged up to the event, whose own effect QEMU has by then applied.

NVMe events count only once the driver has attached an endpoint
(``virtio_iommu_attach``): the firmware's NVMe commands come before.

Pure code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from harness.checks.sync import SyncCounts, SyncPair, SyncPairs, SyncKey, guest_sync_key, host_sync_key
from harness.trace.events import Event, VirtioIommuAttach, VirtioIommuMap, VirtioIommuUnmap
from harness.trace.guest import GuestEvent, GuestIommuMap, GuestIommuUnmap

__all__ = ["VIOMMU_MAP", "VIOMMU_UNMAP", "ViommuSyncPair", "VirtioIommuSync", "guest_viommu_key",
           "host_viommu_key"]

VIOMMU_MAP: Final = "viommu-map"
VIOMMU_UNMAP: Final = "viommu-unmap"


@dataclass(frozen=True, slots=True)
class ViommuSyncPair(SyncPair):
    """A pair of a guest IOMMU change and the request QEMU received for it: guest first."""

    @property
    def guest_first(self) -> bool:
        return True


def guest_viommu_key(event: GuestEvent) -> SyncKey | None:
    """The request pair key of a guest ``iommu:map`` / ``iommu:unmap``, or None."""
    if isinstance(event, GuestIommuMap) and event.size:
        return VIOMMU_MAP, (event.iova + event.size - 1, event.paddr + event.size - 1)
    if isinstance(event, GuestIommuUnmap) and event.unmapped_size:
        return VIOMMU_UNMAP, (event.iova + event.unmapped_size - 1,)
    return None


def host_viommu_key(event: Event) -> SyncKey | None:
    """The request pair key of a QEMU ``virtio_iommu_map`` / ``virtio_iommu_unmap``, or None."""
    kind = type(event)
    if kind is VirtioIommuMap:
        assert isinstance(event, VirtioIommuMap)
        return VIOMMU_MAP, (event.virt_end, event.phys_start + (event.virt_end - event.virt_start))
    if kind is VirtioIommuUnmap:
        assert isinstance(event, VirtioIommuUnmap)
        return VIOMMU_UNMAP, (event.virt_end,)
    return None


@dataclass
class VirtioIommuSync(SyncPairs):
    """:class:`~harness.checks.sync.SyncPairs` with the request pairs above.

    ``unmap_origin``: host line of a ``virtio_iommu_unmap`` -> guest position of
    the ``iommu:unmap`` it carries.  ``map_pairs`` / ``unmap_pairs``: pairs of
    each kind; ``guest_unpaired_unmaps``: guest positions of unmaps QEMU never
    received (all of them, in order).
    """

    unmap_origin: dict[int, int] = field(default_factory=dict)
    map_pairs: int = 0
    unmap_pairs: int = 0
    host_unpaired_requests: int = 0
    guest_unpaired_maps: int = 0
    guest_unpaired_unmaps: list[int] = field(default_factory=list)

    @classmethod
    def build_viommu(cls, guest: Sequence[GuestEvent], host: Iterable[Event], *, nvme: bool = True) -> VirtioIommuSync:
        """Pairs of ``guest`` (positions are its indexes) and QEMU's ``host`` events (in trace order)."""
        nvme_keys: list[tuple[int, SyncKey]] = []
        request_keys: list[tuple[int, SyncKey]] = []
        attached = False
        for e in host:
            if type(e) is VirtioIommuAttach:
                attached = True
                continue
            key = host_viommu_key(e)
            if key is not None:
                request_keys.append((e.lineno, key))
                continue
            key = host_sync_key(e, nvme=nvme and attached)
            if key is not None:
                nvme_keys.append((e.lineno, key))
        base = SyncPairs.build(guest, nvme_keys, nvme=nvme)
        queues: dict[SyncKey, list[int]] = {}
        for pos, event in enumerate(guest):
            key = guest_viommu_key(event)
            if key is not None:
                queues.setdefault(key, []).append(pos)
        heads: dict[SyncKey, int] = {}
        pairs: list[SyncPair] = list(base.pairs)
        unmap_origin: dict[int, int] = {}
        host_unpaired = 0
        for lineno, key in request_keys:
            queue = queues.get(key)
            head = heads.get(key, 0)
            if queue is None or head >= len(queue):
                host_unpaired += 1  # one of several requests of one guest change, or no guest event
                continue
            heads[key] = head + 1
            pos = queue[head]
            pairs.append(ViommuSyncPair(key[0], key[1], pos, lineno, pos))
            if key[0] == VIOMMU_UNMAP:
                unmap_origin[lineno] = pos
        counts = SyncCounts(**{f: getattr(base.counts, f) for f in SyncCounts.__dataclass_fields__})
        counts.pairs = len(pairs)
        counts.host_unpaired += host_unpaired
        unpaired_maps = 0
        unpaired_unmaps: list[int] = []
        for key, queue in queues.items():
            rest = queue[heads.get(key, 0):]
            if key[0] == VIOMMU_MAP:
                unpaired_maps += len(rest)
            else:
                unpaired_unmaps.extend(rest)
        counts.guest_unpaired += unpaired_maps + len(unpaired_unmaps)
        unpaired_unmaps.sort()
        self = cls(pairs, counts, list(base.unpaired_guest), unmap_origin=unmap_origin,
                   map_pairs=sum(1 for p in pairs if p.kind == VIOMMU_MAP), unmap_pairs=len(unmap_origin),
                   host_unpaired_requests=host_unpaired, guest_unpaired_maps=unpaired_maps,
                   guest_unpaired_unmaps=unpaired_unmaps)
        self._index()
        return self

    def last_guest_first(self) -> int:
        """The largest guest position of any guest-first pair (-1: none)."""
        return max((p.guest for p in self.pairs if p.guest_first), default=-1)
