"""Judge every DMA translation QEMU's vIOMMU made against what the guest
kernel says it mapped.

The oracle is the guest kernel's own trace (tracefs, collected by the guest
agent; :mod:`harness.trace.guest`), not QEMU: QEMU's page walks may be wrong,
and a guest that changes a mapping without invalidating it is invisible to a
model filled from those walks.

Evidence and model
==================

* ``iommu:map`` / ``iommu:unmap`` (drivers/iommu/iommu.c ``__iommu_map`` /
  ``__iommu_unmap``, traced on success): what the IOMMU page tables hold.
  They do not name the domain, so each is attributed to the device of the
  DMA-API event that reports it (``dma:dma_map_*``, ``dma_alloc*``,
  ``dma_unmap_*``, ``dma_free*``, kernel/dma/mapping.c, traced right after
  the IOMMU call returns), whose ``dir`` also gives the permission the
  mapping grants (iommu-dma's ``dma_info_to_prot``: TO_DEVICE -> read,
  FROM_DEVICE -> write, BIDIRECTIONAL -> both).  One
  :class:`~harness.models.iommu_domain.IommuDomain` per device (PCI source
  id).  Linux 7.2's NVMe maps data through the DMA IOVA API
  (``dma_iova_link``: ``iommu:map``, no DMA-API event); those maps are
  credited to the controller of the same task's ``nvme:nvme_setup_cmd``
  (harness/checks/guest_attribution.py says exactly when).  Maps no rule
  claims stay *unattributed*: they explain a
  translation of any device, and are counted as a warning.  A map followed
  by ``iommu:attach_device_to_domain`` events before any DMA-API event is a
  firmware-requested direct mapping (drivers/iommu/iommu.c
  ``iommu_create_device_direct_mappings``, made before the group's devices
  are attached): it belongs to each device attached.
* ``intel_iommu:qi_submit`` of ``iotlb_inv`` descriptors: an unmapped range
  is *dead* for the device only once an invalidation covering it (same
  domain id, or domain/global granularity) was submitted after the unmap;
  until then QEMU may still translate it from its IOTLB (that is allowed,
  to the old address).
* The two logs are ordered by :mod:`harness.checks.sync`: for a QEMU event
  at host line ``h`` the guest has done everything up to ``lower(h)`` and
  nothing from ``upper(h)`` on.

The rule, for each ``vtd_dmar_translate`` of source id ``sid``, page ``iova``
to ``gpa`` (pass-through translations excepted), with the guest replayed up
to ``lower(h)``: the translation is allowed if the guest's domain of ``sid``
maps ``iova`` to ``gpa`` now, or an unmapped-but-not-yet-invalidated mapping
did, or the guest mapped ``iova`` to ``gpa`` somewhere in ``(lower(h),
upper(h))``.  Otherwise:

* ``use-after-unmap``: the guest had mapped ``iova`` and unmapped it, and an
  invalidation covering it reached the vIOMMU before this translation (the
  divergence names the guest's unmap and the invalidation pair);
* ``guest-wrong-translation``: the guest maps ``iova`` to another address;
* ``translation-without-guest-mapping``: the guest never mapped ``iova``
  for this device up to ``upper(h)``;
* ``stale-after-remap``: the device used the page of a mapping the guest
  unmapped without invalidating it, after the guest had mapped the iova again
  elsewhere (a guest that reuses an iova before flushing the IOTLB: what a
  lost flush in the guest kernel looks like).

Inside a block DMA request (:mod:`harness.checks.dma_window`) the access
direction is known and the guest's permission must allow it
(``guest-permission``).  A guest invalidation QEMU never logged is
``invalidation-not-processed``.

virtio-iommu
============

Under virtio-iommu (drivers/iommu/virtio-iommu.c) the same rule judges every
``virtio_iommu_translate_out`` (sid, iova -> gpa), with these differences:

* the access direction of every translation is known (the ``flag`` of the
  ``virtio_iommu_translate`` before it: 1 read, 2 write), so every one is
  checked against the guest's permission, not only those of block requests;
* there is no IOTLB to invalidate: an UNMAP request is synchronous, so a
  range the guest unmapped is *dead* for the device once QEMU removed it for
  the UNMAP request that carries the guest's ``iommu:unmap``
  (``virtio_iommu_unmap_done`` after the ``virtio_iommu_unmap`` paired with
  it by :mod:`harness.checks.virtio_iommu_sync`); until then QEMU may still
  translate it;
* the logs are ordered by :class:`~harness.checks.virtio_iommu_sync.VirtioIommuSync`
  (the driver's MAP/UNMAP requests and the NVMe commands);
* ``unmap-not-processed``: a guest unmap whose UNMAP request QEMU never
  received although a later request of the guest reached it.

Inconclusive when the guest log is missing, lost events (ring buffer
overrun), has unparseable lines of a family this check reads (iommu, dma,
intel_iommu), or no translation was checked.

Pure code: events in, a :class:`~harness.checks.verdict.CheckReport` out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from harness.checks.dma_window import BlockDmaWindow
from harness.checks.guest_state import GuestState, lost_events
from harness.checks.sync import INVALIDATION, SyncPair, SyncPairs, host_sync_keys
from harness.checks.verdict import CheckReport, DivergenceLog, TraceLine
from harness.models.iommu_domain import IOMMU_READ, IOMMU_WRITE, Mapping
from harness.checks.virtio_iommu_sync import VirtioIommuSync
from harness.trace.events import (
    DmarEnable,
    DmarTranslate,
    Event,
    MalformedEvent,
    TranslatePassthrough,
    VirtioIommuTranslate,
    VirtioIommuTranslateOut,
    VirtioIommuUnmap,
    VirtioIommuUnmapDone,
    u32,
)
from harness.trace.guest import (
    GuestEvent,
    GuestMalformedEvent,
)

__all__ = [
    "CHECKER",
    "USE_AFTER_UNMAP",
    "GUEST_WRONG_TRANSLATION",
    "TRANSLATION_WITHOUT_GUEST_MAPPING",
    "GUEST_PERMISSION",
    "INVALIDATION_NOT_PROCESSED",
    "STALE_AFTER_REMAP",
    "UNMAP_NOT_PROCESSED",
    "GuestIntentCounts",
    "GuestIntentChecker",
    "check_guest_intent",
]

CHECKER: Final = "guest-intent"
TITLE: Final = "device DMA against the guest kernel's own mappings (tracefs)"
USE_AFTER_UNMAP: Final = "use-after-unmap"
GUEST_WRONG_TRANSLATION: Final = "guest-wrong-translation"
TRANSLATION_WITHOUT_GUEST_MAPPING: Final = "translation-without-guest-mapping"
GUEST_PERMISSION: Final = "guest-permission"
INVALIDATION_NOT_PROCESSED: Final = "invalidation-not-processed"
STALE_AFTER_REMAP: Final = "stale-after-remap"
UNMAP_NOT_PROCESSED: Final = "unmap-not-processed"

_DIR_PROT: Final = {"TO_DEVICE": IOMMU_READ, "FROM_DEVICE": IOMMU_WRITE,
                    "BIDIRECTIONAL": IOMMU_READ | IOMMU_WRITE}
_LOOKAHEAD: Final = 256  # guest events searched for the DMA-API event that reports an IOMMU call
_PAGE: Final = 4096
_FAMILIES: Final = ("iommu", "dma", "intel_iommu")
_ACCESS_PROT: Final = (0, IOMMU_READ, IOMMU_WRITE, IOMMU_READ | IOMMU_WRITE)
"""QEMU's IOMMUAccessFlags (virtio_iommu_translate ``flag``) as the guest permission the access needs."""


@dataclass
class GuestIntentCounts:
    translations_checked: int = 0
    """``vtd_dmar_translate`` / ``virtio_iommu_translate_out`` events judged against the guest's mappings."""
    translations_by_sid: str = ""
    """``sid=count`` of the checked translations, per device (PCI source id)."""
    passthrough: int = 0
    """Pass-through translations (no guest domain to judge them against)."""
    directions_checked: int = 0
    """Translations inside a block DMA request whose direction was checked against the guest's permission."""
    allowed_by_window: int = 0
    """Translations explained only by a guest map in their ordering window (not by the state at lower(h))."""
    allowed_unflushed: int = 0
    """Translations of an unmapped range whose invalidation had not reached the vIOMMU yet."""
    guest_events: int = 0
    guest_maps: int = 0
    guest_unmaps: int = 0
    guest_invalidations: int = 0
    unattributed_maps: int = 0
    unattributed_unmaps: int = 0
    devices: int = 0
    sync_pairs: int = 0
    invalidation_pairs: int = 0
    nvme_pairs: int = 0
    host_only_invalidations: int = 0
    viommu_map_pairs: int = 0
    """virtio-iommu: guest ``iommu:map`` events paired with the MAP request QEMU received."""
    viommu_unmap_pairs: int = 0
    """virtio-iommu: guest ``iommu:unmap`` events paired with the UNMAP request QEMU received."""
    viommu_unmaps_done: int = 0
    """virtio-iommu: guest unmapped ranges QEMU removed whole (``virtio_iommu_unmap_done``): dead from there on."""
    guest_lost_events: int = 0
    guest_malformed_lines: int = 0


class GuestIntentChecker:
    """Replays the guest's mappings beside QEMU's translations.

    ``guest``: the guest's events (a list: positions are its indexes).
    ``sync``: the pairs ordering the two logs.  ``lost``: events the guest's
    ring buffer lost (from the agent's collect).  Feed QEMU's events in order
    with :meth:`feed`, then :meth:`finish`.
    """

    def __init__(self, guest: Sequence[GuestEvent], sync: SyncPairs, *, lost: int = 0,
                 max_divergences: int = 20, context: int = 8) -> None:
        self._guest = guest
        self._sync = sync
        self.counts = GuestIntentCounts(guest_events=len(guest), guest_lost_events=lost + lost_events(guest))
        self._log = DivergenceLog(max_divergences=max_divergences, context=context)
        self._window = BlockDmaWindow()
        self._state = state = GuestState(guest)
        self.counts.unattributed_maps, self.counts.unattributed_unmaps = state.unattributed_maps, state.unattributed_unmaps
        self.counts.guest_maps, self.counts.guest_unmaps = state.maps, state.unmaps
        self.counts.guest_invalidations = len(state.invalidations)
        self.counts.guest_malformed_lines = sum(1 for e in guest if isinstance(e, GuestMalformedEvent))
        self._malformed_families = sorted({e.family for e in guest if isinstance(e, GuestMalformedEvent)
                                           and e.family in _FAMILIES})
        self.counts.sync_pairs = sync.counts.pairs
        self.counts.invalidation_pairs = sync.counts.invalidation_pairs
        self.counts.nvme_pairs = sync.counts.nvme_pairs
        self.counts.host_only_invalidations = sync.counts.host_unpaired_invalidations
        if isinstance(sync, VirtioIommuSync):
            self.counts.viommu_map_pairs, self.counts.viommu_unmap_pairs = sync.map_pairs, sync.unmap_pairs
        self._pt_pending: dict[int, int] = {}  # sid -> iova of a vtd_translate_pt awaiting its translate
        self._vi_access: dict[int, int] = {}  # sid -> access flag of the virtio_iommu_translate awaiting its outcome
        self._vi_unmap: int | None = None  # guest position of the unmap the current UNMAP request carries
        self._vi_removed: list[tuple[int, int]] = []  # what QEMU removed for it so far
        self._by_sid: dict[int, int] = {}
        self._dmar_enabled: bool | None = None
        self._malformed_vtd = 0
        self._report: CheckReport | None = None

    # ---- QEMU's events -----------------------------------------------------

    def feed(self, event: Event) -> None:
        self._log.seen(event)
        self._window.feed(event)
        kind = type(event)
        if kind is DmarTranslate:
            assert isinstance(event, DmarTranslate)
            self._on_translate(event)
        elif kind is VirtioIommuTranslate:
            assert isinstance(event, VirtioIommuTranslate)
            self._vi_access[u32(event.rid)] = event.flag
        elif kind is VirtioIommuTranslateOut:
            assert isinstance(event, VirtioIommuTranslateOut)
            sid = u32(event.sid)
            flag = self._vi_access.pop(sid, 0)
            if self._guest:
                self.counts.directions_checked += bool(flag)
                self._judge(event, sid, event.addr, event.gpa, _ACCESS_PROT[flag & 3])
        elif kind is VirtioIommuUnmap:
            sync = self._sync
            self._vi_unmap = sync.unmap_origin.get(event.lineno) if isinstance(sync, VirtioIommuSync) else None
            self._vi_removed = []
        elif kind is VirtioIommuUnmapDone:
            assert isinstance(event, VirtioIommuUnmapDone)
            self._on_unmap_done(event)
        elif kind is TranslatePassthrough:
            assert isinstance(event, TranslatePassthrough)
            self._pt_pending[event.sid] = event.iova & ~(_PAGE - 1)
        elif kind is DmarEnable:
            assert isinstance(event, DmarEnable)
            self._dmar_enabled = event.enable
        elif kind is MalformedEvent:
            assert isinstance(event, MalformedEvent)
            self._malformed_vtd += event.is_vtd or event.trace_name.startswith("virtio_iommu")
        else:
            domain = getattr(event, "domain", None)
            dev = getattr(event, "sid", None)
            if isinstance(domain, int) and isinstance(dev, int):  # vtd_iotlb_page_update/hit
                self._state.did_of_sid[dev] = domain

    def feed_all(self, events: Iterable[Event]) -> None:
        for e in events:
            self.feed(e)

    def _on_translate(self, e: DmarTranslate) -> None:
        sid, iova, gpa, mask = e.sid, e.iova, e.gpa, e.mask
        pt = self._pt_pending.pop(sid, None)
        if (pt is not None and pt & ~mask == iova) or self._dmar_enabled is False:
            self.counts.passthrough += 1
            return
        if not self._guest:
            return  # no guest stream: nothing to judge against (the report says so)
        request = self._window.current
        need = 0
        if request is not None:
            need = IOMMU_READ if request.to_dev else IOMMU_WRITE
            self.counts.directions_checked += 1
        self._judge(e, sid, iova, gpa, need)

    def _on_unmap_done(self, e: VirtioIommuUnmapDone) -> None:
        """QEMU removed ``[virt_start, virt_end]`` for the UNMAP request just seen:
        the guest's ranges it carried are dead from here on."""
        pos = self._vi_unmap
        if pos is None or not self._guest:
            return
        self._state.advance(max(self._sync.lower(e.lineno), pos))
        self._vi_removed.append((e.virt_start, e.virt_end))
        self.counts.viommu_unmaps_done += self._state.flush_unmap(pos, self._vi_removed)

    def _judge(self, e: DmarTranslate | VirtioIommuTranslateOut, sid: int, iova: int, gpa: int, need: int) -> None:
        """The rule of the module docstring for a translation of ``sid``: ``iova`` ->
        ``gpa`` at host line ``e.lineno``; ``need``: the permission the access
        needs (IOMMU_READ/IOMMU_WRITE bits, 0: unknown)."""
        c = self.counts
        c.translations_checked += 1
        self._by_sid[sid] = self._by_sid.get(sid, 0) + 1
        h = e.lineno
        low = self._sync.lower(h)
        state = self._state
        state.advance(low)
        m = state.translate(sid, iova)
        if m is not None and m.paddr + (iova - m.iova) == gpa:
            self._check_perm(e, sid, iova, gpa, m.prot, need, m.origin)
            return
        high = self._sync.upper(h, len(self._guest))
        for op in state.maps_between(sid, iova, low, high):
            if op.paddr + (iova - op.iova) == gpa:
                c.allowed_by_window += 1
                self._check_perm(e, sid, iova, gpa, op.prot, need, op.event)
                return
        # A range unmapped but whose invalidation had not reached the vIOMMU yet:
        # QEMU's IOTLB may still serve it -- unless the guest has mapped the iova again.
        for d in state.dead_for(sid):
            if d.iova <= iova <= d.last and (d.flushed is None or d.flushed > low) \
                    and d.paddr + (iova - d.iova) == gpa:
                if m is None:
                    c.allowed_unflushed += 1
                    self._check_perm(e, sid, iova, gpa, d.prot, need, d.unmap)
                else:
                    self._log.diverge(
                        STALE_AFTER_REMAP, e,
                        f"sid {sid:#06x} iova {iova:#x} -> gpa {gpa:#x}: the guest unmapped this page and "
                        f"mapped the iova again to {m.paddr + (iova - m.iova):#x} without an IOTLB invalidation "
                        "in between; the device used the old page",
                        related=[("guest unmapped", _guest_line(d.unmap)), ("guest mapped again", _guest_line(m.origin))],
                        sid=sid, iova=iova, expected=m.paddr + (iova - m.iova), observed=gpa)
                return
        self._diverge_translation(e, sid, iova, gpa, m, low, high)

    def _check_perm(self, e: DmarTranslate | VirtioIommuTranslateOut, sid: int, iova: int, gpa: int, prot: int,
                    need: int, origin: object) -> None:
        if need and (prot & need) != need:
            what = {IOMMU_READ: "read", IOMMU_WRITE: "write"}.get(need, "read and write")
            how = (f"block request at line {self._window.current.lineno if self._window.current else '?'}"
                   if isinstance(e, DmarTranslate) else "the access flag of virtio_iommu_translate")
            related = [("guest mapped", _guest_line(origin))] if origin is not None else []
            self._log.diverge(
                GUEST_PERMISSION, e,
                f"sid {sid:#06x} iova {iova:#x}: the device used this page to {what} guest memory "
                f"({how}) but the guest mapped it {_prot_name(prot)}",
                related=related, sid=sid, iova=iova, observed=gpa)

    def _diverge_translation(self, e: DmarTranslate | VirtioIommuTranslateOut, sid: int, iova: int, gpa: int,
                             m: Mapping | None, low: int, high: int) -> None:
        where = f"sid {sid:#06x} iova {iova:#x} -> gpa {gpa:#x}"
        pair = self._last_pair(e.lineno)
        ordered = ([("ordered after", TraceLine(pair.host, f"(host side of a {pair.kind} pair)", "host")),
                    ("guest side", _guest_line(self._guest[pair.origin]))] if pair is not None else [])
        if m is not None:
            expected = m.paddr + (iova - m.iova)
            self._log.diverge(
                GUEST_WRONG_TRANSLATION, e,
                f"{where}: the guest kernel maps this iova to {expected:#x} "
                f"(guest position {low} and no map to {gpa:#x} before the guest's position {high})",
                related=[("guest mapped", _guest_line(m.origin)), *ordered],
                sid=sid, iova=iova, expected=expected, observed=gpa)
            return
        dead = next((d for d in self._state.dead_for(sid) if d.iova <= iova <= d.last), None)
        if dead is not None and dead.flushed is not None:
            self._log.diverge(
                USE_AFTER_UNMAP, e,
                f"{where}: the guest unmapped this iova and its invalidation reached the vIOMMU "
                "before this translation; the device must not use it",
                related=[("guest unmapped", _guest_line(dead.unmap)),
                         ("guest invalidated", _guest_line(self._guest[dead.flushed])), *ordered],
                sid=sid, iova=iova, expected=None, observed=gpa)
            return
        self._log.diverge(
            TRANSLATION_WITHOUT_GUEST_MAPPING, e,
            f"{where}: the guest kernel has not mapped this iova for this device "
            f"(checked up to guest position {high})",
            related=ordered, sid=sid, iova=iova, observed=gpa)

    def _last_pair(self, host: int) -> SyncPair | None:
        best: SyncPair | None = None
        for p in self._sync.pairs:
            if p.guest_first and p.host <= host and (best is None or p.host > best.host):
                best = p
        return best

    # ---- the end -------------------------------------------------------------

    def finish(self) -> CheckReport:
        if self._report is not None:
            return self._report
        c = self.counts
        c.devices = self._state.devices
        c.translations_by_sid = " ".join(f"{sid:#06x}={n}" for sid, n in sorted(self._by_sid.items()))
        sync = self._sync
        if isinstance(sync, VirtioIommuSync):
            # An unmap QEMU never received keeps the device's access to the page; in
            # strict mode the request is sent before the DMA-API unmap returns, so one
            # the guest logged before a later request QEMU did receive was lost.
            last = sync.last_guest_first()
            for pos in sync.guest_unpaired_unmaps:
                if pos < last:
                    self._log.diverge(
                        UNMAP_NOT_PROCESSED, _guest_line(self._guest[pos]),
                        "the guest unmapped this range but QEMU never received its UNMAP request "
                        "(later requests did reach it)", related=[])
        for pos, key in self._sync.unpaired_guest:
            if key[0] == INVALIDATION:
                self._log.diverge(
                    INVALIDATION_NOT_PROCESSED, _guest_line(self._guest[pos]),
                    f"the guest submitted an IOTLB invalidation {key[1]} that the vIOMMU never logged",
                    related=[])
        inconclusive: list[str] = []
        if not c.guest_events:
            inconclusive.append("the guest kernel's event log is empty or missing")
        if c.guest_lost_events:
            inconclusive.append(f"the guest's trace ring buffer lost {c.guest_lost_events} events")
        if self._malformed_families:
            inconclusive.append("unparseable guest trace lines of " + ", ".join(self._malformed_families))
        if self._malformed_vtd:
            inconclusive.append(f"{self._malformed_vtd} vtd_*/virtio_iommu_* lines of QEMU's trace could not be parsed")
        if not c.translations_checked:
            inconclusive.append("no DMA translation was checked against the guest's mappings")
        warnings: list[str] = []
        if c.unattributed_maps or c.unattributed_unmaps:
            warnings.append(f"{c.unattributed_maps} guest maps and {c.unattributed_unmaps} unmaps had no "
                            "DMA-API event or NVMe command naming their device; they were applied to every device")
        if c.host_only_invalidations:
            warnings.append(f"{c.host_only_invalidations} QEMU invalidations have no guest qi_submit "
                            "(register-based invalidations at boot are not traced by the guest)")
        self._report = self._log.report(CHECKER, c, warnings=warnings, inconclusive=inconclusive, title=TITLE)
        return self._report


def _guest_line(event: object) -> TraceLine:
    if isinstance(event, GuestEvent):
        return TraceLine(event.lineno, event.raw, "guest")
    return TraceLine(0, repr(event), "guest")


def _prot_name(prot: int) -> str:
    return ("--", "r-", "-w", "rw")[prot & 3]


def check_guest_intent(guest: Sequence[GuestEvent], host: Callable[[], Iterable[Event]], *, lost: int = 0,
                       nvme: bool = True, **options: int) -> CheckReport:
    """Run the check: ``host`` returns a fresh iterator over QEMU's events
    each time it is called (it is read twice: once for the sync pairs, once
    to judge)."""
    sync = SyncPairs.build(guest, host_sync_keys(host(), nvme=nvme),
                           nvme=nvme)
    checker = GuestIntentChecker(guest, sync, lost=lost, **options)
    checker.feed_all(host())
    return checker.finish()
