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
  id).  Maps no DMA-API event claims stay *unattributed*: they explain a
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
from harness.trace.events import (
    DmarEnable,
    DmarTranslate,
    Event,
    MalformedEvent,
    TranslatePassthrough,
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

_DIR_PROT: Final = {"TO_DEVICE": IOMMU_READ, "FROM_DEVICE": IOMMU_WRITE,
                    "BIDIRECTIONAL": IOMMU_READ | IOMMU_WRITE}
_LOOKAHEAD: Final = 256  # guest events searched for the DMA-API event that reports an IOMMU call
_PAGE: Final = 4096
_FAMILIES: Final = ("iommu", "dma", "intel_iommu")


@dataclass
class GuestIntentCounts:
    translations_checked: int = 0
    """``vtd_dmar_translate`` events judged against the guest's mappings."""
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
        self._pt_pending: dict[int, int] = {}  # sid -> iova of a vtd_translate_pt awaiting its translate
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
        elif kind is TranslatePassthrough:
            assert isinstance(event, TranslatePassthrough)
            self._pt_pending[event.sid] = event.iova & ~(_PAGE - 1)
        elif kind is DmarEnable:
            assert isinstance(event, DmarEnable)
            self._dmar_enabled = event.enable
        elif kind is MalformedEvent:
            assert isinstance(event, MalformedEvent)
            self._malformed_vtd += event.is_vtd
        else:
            domain = getattr(event, "domain", None)
            sid = getattr(event, "sid", None)
            if isinstance(domain, int) and isinstance(sid, int):  # vtd_iotlb_page_update/hit
                self._state.did_of_sid[sid] = domain

    def feed_all(self, events: Iterable[Event]) -> None:
        for e in events:
            self.feed(e)

    def _on_translate(self, e: DmarTranslate) -> None:
        sid, iova, gpa, mask = e.sid, e.iova, e.gpa, e.mask
        pt = self._pt_pending.pop(sid, None)
        if (pt is not None and pt & ~mask == iova) or self._dmar_enabled is False:
            self.counts.passthrough += 1
            return
        c = self.counts
        if not self._guest:
            return  # no guest stream: nothing to judge against (the report says so)
        c.translations_checked += 1
        h = e.lineno
        low = self._sync.lower(h)
        state = self._state
        state.advance(low)
        request = self._window.current
        need = 0
        if request is not None:
            need = IOMMU_READ if request.to_dev else IOMMU_WRITE
            c.directions_checked += 1
        m = state.translate(sid, iova)
        if m is not None and m.paddr + (iova - m.iova) == gpa:
            self._check_perm(e, m.prot, need, m.origin)
            return
        high = self._sync.upper(h, len(self._guest))
        for op in state.maps_between(sid, iova, low, high):
            if op.paddr + (iova - op.iova) == gpa:
                c.allowed_by_window += 1
                self._check_perm(e, op.prot, need, op.event)
                return
        # A range unmapped but whose invalidation had not reached the vIOMMU yet:
        # QEMU's IOTLB may still serve it -- unless the guest has mapped the iova again.
        for d in state.dead_for(sid):
            if d.iova <= iova <= d.last and (d.flushed is None or d.flushed > low) \
                    and d.paddr + (iova - d.iova) == gpa:
                if m is None:
                    c.allowed_unflushed += 1
                    self._check_perm(e, d.prot, need, d.unmap)
                else:
                    self._log.diverge(
                        STALE_AFTER_REMAP, e,
                        f"sid {sid:#06x} iova {iova:#x} -> gpa {gpa:#x}: the guest unmapped this page and "
                        f"mapped the iova again to {m.paddr + (iova - m.iova):#x} without an IOTLB invalidation "
                        "in between; the device used the old page",
                        related=[("guest unmapped", _guest_line(d.unmap)), ("guest mapped again", _guest_line(m.origin))],
                        sid=sid, iova=iova, expected=m.paddr + (iova - m.iova), observed=gpa)
                return
        self._diverge_translation(e, m, low, high)

    def _check_perm(self, e: DmarTranslate, prot: int, need: int, origin: object) -> None:
        if need and (prot & need) != need:
            what = "read" if need == IOMMU_READ else "write"
            related = [("guest mapped", _guest_line(origin))] if origin is not None else []
            self._log.diverge(
                GUEST_PERMISSION, e,
                f"sid {e.sid:#06x} iova {e.iova:#x}: the device used this page to {what} guest memory "
                f"(block request at line {self._window.current.lineno if self._window.current else '?'}) "
                f"but the guest mapped it {_prot_name(prot)}",
                related=related, sid=e.sid, iova=e.iova, observed=e.gpa)

    def _diverge_translation(self, e: DmarTranslate, m: Mapping | None, low: int, high: int) -> None:
        sid, iova, gpa = e.sid, e.iova, e.gpa
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
            inconclusive.append(f"{self._malformed_vtd} vtd_* lines of QEMU's trace could not be parsed")
        if not c.translations_checked:
            inconclusive.append("no DMA translation was checked against the guest's mappings")
        warnings: list[str] = []
        if c.unattributed_maps or c.unattributed_unmaps:
            warnings.append(f"{c.unattributed_maps} guest maps and {c.unattributed_unmaps} unmaps had no "
                            "DMA-API event naming their device; they were applied to every device")
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
