"""Ordering the guest kernel's events against QEMU's: sync pairs.

The guest's trace (tracefs) and QEMU's trace are two logs of one run, each in
its own order, with no shared clock.  Some happenings appear in both, and for
those the cause is known to come first:

========================  ==================================  =====================================  =========
pair kind                  guest event                          QEMU event                             order
========================  ==================================  =====================================  =========
``invalidation``           ``intel_iommu:qi_submit`` of an      ``vtd_inv_desc_iotlb_{pages,domain,    guest first
                           ``iotlb_inv`` descriptor (drivers/   global}`` (hw/i386/intel_iommu.c
                           iommu/intel/dmar.c qi_submit_sync)   vtd_process_iotlb_desc)
``nvme-submit``            ``nvme:nvme_setup_cmd`` qid, cmdid   ``pci_nvme_io_cmd`` / ``_admin_cmd``   guest first
                           (drivers/nvme/host/core.c)           sqid, cid (hw/nvme/ctrl.c)
``nvme-complete``          ``nvme:nvme_complete_rq`` qid,       ``pci_nvme_enqueue_req_completion``     QEMU first
                           cmdid                                cqid, cid
``dev-tlb-invalidation``   ``intel_iommu:qi_submit`` of a       ``vtd_inv_desc`` of type ``device``     guest first
                           ``dev_tlb_inv`` descriptor (qw0,     (low, high: the same quadwords)
                           qw1)
``virtio-blk-submit``      the last DMA-API map of a virtio-    ``virtio_blk_handle_{read,write}``     guest first
                           blk request (:mod:`harness.checks.   (source id of the element's
                           virtio_blk`): sid, direction, bytes  translations, direction, bytes)
``virtio-blk-complete``    the first unmap of one of the        ``virtio_blk_req_complete`` of that     QEMU first
                           request's iovas after it             request
========================  ==================================  =====================================  =========

A virtio-blk request is paired by (source id, direction, data bytes),
occurrence by occurrence: both sides see every read and write request of the
device in the order the driver queued them (one request queue; the guest
kicks after mapping, QEMU pops in ring order).  Requests without data or with
non-sector data (flush, discard, get-id) are left out on both sides: QEMU 7.2
traces only ``virtio_blk_handle_read``/``_write``.  The guest's side of a
submission is the request's last map (the driver kicks after it); of a
completion, the first unmap of one of its iovas (``detach_buf_split`` runs
only on elements QEMU has pushed to the used ring).

The guest side of an ``nvme-submit`` pair is moved past the command's own
data mappings (:func:`_doorbell`): the trace point precedes them, the
doorbell QEMU answers follows them.

The two sides of a kind are paired by key, occurrence by occurrence (the
n-th guest submission of (qid, cid) with the n-th QEMU one; the n-th guest
page invalidation of (did, addr, am) with the n-th QEMU one).

The rule
========

For a QEMU event at host position ``h``:

* ``lower(h)``, the guest position the guest had certainly reached when
  ``h`` happened: the largest guest position of a guest-first pair whose
  QEMU side is at or before ``h``.  (The guest event caused the QEMU event,
  which came no later than ``h``.)  Everything the guest did up to there --
  every map, every unmap, every invalidation -- is done.
* ``upper(h)``, a guest position the guest had certainly not passed when
  ``h`` happened: the smallest guest position of a QEMU-first pair whose
  QEMU side is at or after ``h``.  Nothing the guest did from there on can
  explain ``h``.

Limits (say them when a verdict is doubted): the rule is sound when each
side's log is in real-time order, which holds for QEMU's trace file and for
a guest with one vCPU (the harness's default); with several vCPUs the
guest's trace is merged by its trace clock, which is per-CPU-monotonic only.
NVMe pairs assume one NVMe controller (QEMU's events do not name the
controller); with more, :class:`SyncPairs` is built with ``nvme=False`` and
only invalidations order the logs.  QEMU's NVMe events count only once DMA
remapping is on (:func:`host_sync_keys`): the firmware's own NVMe commands
come before.  Events one side logged and the other did
not (register-based invalidations at boot, a lost guest event) stay
unpaired and are counted.

Pure code.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from harness.trace.events import (
    DmarEnable,
    Event,
    InvIotlbDomain,
    InvIotlbGlobal,
    InvIotlbPages,
    NvmeAdminCmd,
    NvmeEnqueueReqCompletion,
    NvmeIoCmd,
    VirtioBlkHandleRead,
    VirtioBlkHandleWrite,
    VirtioBlkReqComplete,
    VtdInvDesc,
)
from harness.checks.virtio_blk import VirtioElementTracker, guest_blk_requests
from harness.trace.guest import (
    GuestDmaMap,
    GuestEvent,
    GuestMarker,
    GuestNvmeCompleteRq,
    GuestNvmeSetupCmd,
    GuestQiSubmit,
)

__all__ = ["INVALIDATION", "NVME_SUBMIT", "NVME_COMPLETE", "DEV_TLB_INVALIDATION", "VIRTIO_BLK_SUBMIT",
           "VIRTIO_BLK_COMPLETE", "SyncPair", "SyncPairs", "guest_sync_key",
           "host_sync_key", "host_sync_keys"]

INVALIDATION: Final = "invalidation"
NVME_SUBMIT: Final = "nvme-submit"
NVME_COMPLETE: Final = "nvme-complete"
DEV_TLB_INVALIDATION: Final = "dev-tlb-invalidation"
VIRTIO_BLK_SUBMIT: Final = "virtio-blk-submit"
VIRTIO_BLK_COMPLETE: Final = "virtio-blk-complete"
GUEST_FIRST: Final = frozenset({INVALIDATION, NVME_SUBMIT, DEV_TLB_INVALIDATION, VIRTIO_BLK_SUBMIT})
NVME_KINDS: Final = frozenset({NVME_SUBMIT, NVME_COMPLETE})
VIRTIO_KINDS: Final = frozenset({VIRTIO_BLK_SUBMIT, VIRTIO_BLK_COMPLETE})

SyncKey = tuple[str, tuple[int, ...]]


def guest_sync_key(event: GuestEvent, *, nvme: bool = True) -> SyncKey | None:
    """The pair key of a guest event, or None if it is not a sync event."""
    if isinstance(event, GuestQiSubmit):
        if event.desc_type == "dev_tlb_inv":
            return DEV_TLB_INVALIDATION, (event.qw0, event.qw1)
        if event.desc_type != "iotlb_inv":
            return None
        gran = event.granularity
        if gran == "page":
            return INVALIDATION, (3, event.did, event.addr, event.am)
        if gran == "domain":
            return INVALIDATION, (2, event.did)
        if gran == "global":
            return INVALIDATION, (1,)
        return None
    if nvme and isinstance(event, GuestNvmeSetupCmd):
        return NVME_SUBMIT, (event.qid, event.cid)
    if nvme and isinstance(event, GuestNvmeCompleteRq):
        return NVME_COMPLETE, (event.qid, event.cid)
    return None


def host_sync_key(event: Event, *, nvme: bool = True) -> SyncKey | None:
    """The pair key of a QEMU event, or None if it is not a sync event."""
    kind = type(event)
    if kind is InvIotlbPages:
        assert isinstance(event, InvIotlbPages)
        return INVALIDATION, (3, event.domain, event.addr & ~0xFFF, event.am)
    if kind is InvIotlbDomain:
        assert isinstance(event, InvIotlbDomain)
        return INVALIDATION, (2, event.domain)
    if kind is InvIotlbGlobal:
        return INVALIDATION, (1,)
    if kind is VtdInvDesc:
        assert isinstance(event, VtdInvDesc)
        return (DEV_TLB_INVALIDATION, (event.low, event.high)) if event.is_device_tlb else None
    if nvme and kind is NvmeIoCmd:
        assert isinstance(event, NvmeIoCmd)
        return NVME_SUBMIT, (event.sqid, event.cid)
    if nvme and kind is NvmeAdminCmd:
        assert isinstance(event, NvmeAdminCmd)
        return NVME_SUBMIT, (event.sqid, event.cid)
    if nvme and kind is NvmeEnqueueReqCompletion:
        assert isinstance(event, NvmeEnqueueReqCompletion)
        return NVME_COMPLETE, (event.cqid, event.cid)
    return None


def host_sync_keys(events: Iterable[Event], *, nvme: bool = True,
                   virtio: bool = True) -> Iterator[tuple[int, SyncKey]]:
    """``(lineno, key)`` of QEMU's sync events, in trace order.

    With ``virtio``, virtio-blk read and write requests are keyed by their
    element's source id, direction and bytes (:mod:`harness.checks.virtio_blk`).

    NVMe events count only once the guest kernel has turned DMA remapping on
    (``vtd_dmar_enable enable 1``): before that the firmware (SeaBIOS has an
    NVMe driver) talks to the controller with command ids of its own, which
    the guest kernel's trace does not have and which would shift the pairing.
    """
    remapping = False
    elements = VirtioElementTracker() if virtio else None
    for e in events:
        if type(e) is DmarEnable:
            assert isinstance(e, DmarEnable)
            remapping = remapping or e.enable
            continue
        if elements is not None:
            req = elements.feed(e)
            if req is not None:
                if req.sid is not None and req.nbytes:
                    kind = VIRTIO_BLK_COMPLETE if type(e) is VirtioBlkReqComplete else VIRTIO_BLK_SUBMIT
                    yield e.lineno, (kind, (req.sid, int(req.write), req.nbytes))
                continue
        key = host_sync_key(e, nvme=nvme and remapping)
        if key is not None:
            yield e.lineno, key


def _doorbell(guest: Sequence[GuestEvent], pos: int) -> int:
    """Where the guest certainly was when it rang the doorbell of the command
    whose ``nvme:nvme_setup_cmd`` is at ``pos``.

    The trace point comes before the driver maps the command's data
    (drivers/nvme/host/pci.c ``nvme_prep_rq``: ``nvme_setup_cmd`` then
    ``nvme_map_data``), and the doorbell after it.  So the command's own DMA
    mappings -- the DMA-API map events of the device that the first one after
    ``pos`` names, up to the next NVMe event or marker -- are before the
    doorbell, and with them the guest position QEMU's fetch proves.
    """
    device: str | None = None
    best = pos
    for later in range(pos + 1, min(len(guest), pos + 64)):
        e = guest[later]
        if isinstance(e, (GuestNvmeSetupCmd, GuestNvmeCompleteRq, GuestMarker)):
            break
        if isinstance(e, GuestDmaMap):
            if device is None:
                device = e.device
            if e.device == device:
                best = later
    return best


@dataclass(frozen=True, slots=True)
class SyncPair:
    """One happening seen by both sides: ``guest`` and ``host`` are positions
    (indexes into the guest event list, host line numbers); ``origin`` is the
    index of the guest's own sync event (``guest`` may be later: see
    :func:`_doorbell`)."""

    kind: str
    key: tuple[int, ...]
    guest: int
    host: int
    origin: int

    @property
    def guest_first(self) -> bool:
        return self.kind in GUEST_FIRST


@dataclass
class SyncCounts:
    pairs: int = 0
    invalidation_pairs: int = 0
    nvme_pairs: int = 0
    guest_unpaired: int = 0
    """Guest sync events with no QEMU counterpart."""
    host_unpaired: int = 0
    """QEMU sync events with no guest counterpart (e.g. register-based invalidations at boot)."""
    guest_unpaired_invalidations: int = 0
    host_unpaired_invalidations: int = 0
    dev_tlb_invalidation_pairs: int = 0
    """Device-TLB invalidation descriptors paired (ATS)."""
    virtio_pairs: int = 0
    """virtio-blk submissions and completions paired."""
    guest_unpaired_dev_tlb_invalidations: int = 0


@dataclass
class SyncPairs:
    """The pairs of one run, and the ``lower``/``upper`` bounds of the rule above.

    Build with :meth:`build` from the guest's events (a sequence: positions
    are its indexes) and the QEMU events' sync keys in trace order.
    """

    pairs: list[SyncPair]
    counts: SyncCounts = field(default_factory=SyncCounts)
    unpaired_guest: list[tuple[int, SyncKey]] = field(default_factory=list)
    """Up to 64 guest sync events that QEMU never logged: (guest position, key)."""
    _lower_host: list[int] = field(default_factory=list, repr=False)
    _lower_guest: list[int] = field(default_factory=list, repr=False)
    _upper_host: list[int] = field(default_factory=list, repr=False)
    _upper_guest: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, guest: Sequence[GuestEvent], host: Iterable[tuple[int, SyncKey]], *,
              nvme: bool = True, virtio: bool = True) -> SyncPairs:
        """``host``: ``(lineno, key)`` of QEMU's sync events in trace order.
        ``virtio``: pair virtio-blk requests too (the guest side of a
        submission is ordered at the request's last map, its origin is the
        header's map)."""
        queues: dict[SyncKey, list[tuple[int, int]]] = {}  # key -> [(ordering position, event index)]
        guest_total = 0
        for pos, event in enumerate(guest):
            key = guest_sync_key(event, nvme=nvme)
            if key is not None:
                at = _doorbell(guest, pos) if key[0] == NVME_SUBMIT else pos
                queues.setdefault(key, []).append((at, pos))
                guest_total += 1
        if virtio:
            for req in guest_blk_requests(guest):
                vkey = (req.sid, int(req.write), req.nbytes)
                queues.setdefault((VIRTIO_BLK_SUBMIT, vkey), []).append((req.last_pos, req.header_pos))
                guest_total += 1
                if req.complete_pos is not None:
                    queues.setdefault((VIRTIO_BLK_COMPLETE, vkey), []).append((req.complete_pos, req.complete_pos))
                    guest_total += 1
        heads: dict[SyncKey, int] = {}
        pairs: list[SyncPair] = []
        counts = SyncCounts()
        for lineno, key in host:
            queue = queues.get(key)
            head = heads.get(key, 0)
            if queue is None or head >= len(queue):
                counts.host_unpaired += 1
                if key[0] == INVALIDATION:
                    counts.host_unpaired_invalidations += 1
                continue
            heads[key] = head + 1
            at, origin = queue[head]
            pairs.append(SyncPair(key[0], key[1], at, lineno, origin))
        counts.pairs = len(pairs)
        counts.invalidation_pairs = sum(1 for p in pairs if p.kind == INVALIDATION)
        counts.nvme_pairs = sum(1 for p in pairs if p.kind in NVME_KINDS)
        counts.dev_tlb_invalidation_pairs = sum(1 for p in pairs if p.kind == DEV_TLB_INVALIDATION)
        counts.virtio_pairs = sum(1 for p in pairs if p.kind in VIRTIO_KINDS)
        counts.guest_unpaired = guest_total - counts.pairs
        unpaired: list[tuple[int, SyncKey]] = []
        for key, queue in queues.items():
            rest = queue[heads.get(key, 0):]
            if key[0] == INVALIDATION:
                counts.guest_unpaired_invalidations += len(rest)
            elif key[0] == DEV_TLB_INVALIDATION:
                counts.guest_unpaired_dev_tlb_invalidations += len(rest)
            unpaired.extend((origin, key) for _, origin in rest)
        unpaired.sort()
        self = cls(pairs, counts, unpaired[:64])
        self._index()
        return self

    def _index(self) -> None:
        # lower(h): running max of guest positions of guest-first pairs, by host position.
        best = -1
        for p in sorted((p for p in self.pairs if p.guest_first), key=lambda p: p.host):
            best = max(best, p.guest)
            self._lower_host.append(p.host)
            self._lower_guest.append(best)
        # upper(h): suffix min of guest positions of QEMU-first pairs, by host position.
        later = sorted((p for p in self.pairs if not p.guest_first), key=lambda p: p.host)
        mins: list[int] = []
        low: int | None = None
        for p in reversed(later):
            low = p.guest if low is None else min(low, p.guest)
            mins.append(low)
        mins.reverse()
        self._upper_host = [p.host for p in later]
        self._upper_guest = mins

    def lower(self, host: int) -> int:
        """The guest position certainly reached at host line ``host`` (-1: none known)."""
        i = bisect.bisect_right(self._lower_host, host)
        return self._lower_guest[i - 1] if i else -1

    def upper(self, host: int, default: int) -> int:
        """The guest position certainly not yet passed at host line ``host``
        (``default``, e.g. the end of the guest log, when none is known)."""
        i = bisect.bisect_left(self._upper_host, host)
        return self._upper_guest[i] if i < len(self._upper_guest) else default

    def host_after_guest(self, guest: int) -> int | None:
        """The smallest host line known to come after guest position ``guest``
        (the QEMU side of the first guest-first pair past it), or None."""
        best: int | None = None
        for p in self.pairs:
            if p.guest_first and p.guest > guest and (best is None or p.host < best):
                best = p.host
        return best

    def host_before_guest(self, guest: int) -> int | None:
        """The largest host line known to come before guest position ``guest``
        (the QEMU side of the last QEMU-first pair before it), or None."""
        best: int | None = None
        for p in self.pairs:
            if not p.guest_first and p.guest < guest and (best is None or p.host > best):
                best = p.host
        return best
