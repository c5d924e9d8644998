"""Replay QEMU's intel-iommu trace into IOTLB models and judge every DMA translation.

Pure code: no QEMU, no I/O except reading a trace file in
:func:`check_trace_file`.  The input is a stream of
:mod:`harness.trace.events` events (QEMU 7.2 ``log`` backend, see
:data:`harness.trace.TRACE_EVENTS`).

What is modelled
================

QEMU 7.2's emulated VT-d IOTLB (hw/i386/intel_iommu.c) is a hash table keyed
by (source id, PASID, level, gfn) whose entries carry the domain id they were
walked under; invalidations select entries by domain id.  The checker keeps
one :class:`harness.models.iotlb.IOTLB` per (sid, domain) -- IO-virtual byte
ranges ``[start, last]`` (4 KiB, 2 MiB or 1 GiB pages) to guest-physical byte
addresses, permission = the leaf SLPTE's R/W bits as ``VHOST_MAP_*`` bits,
``opaque`` = the ``vtd_iotlb_page_update`` event that added the map -- plus a
sid -> domain map learned from update/hit events.  The rules, with the QEMU
function each comes from:

* ``vtd_iotlb_page_update`` (``vtd_do_iommu_translate`` after a miss in
  ``vtd_lookup_iotlb``, then ``vtd_update_iotlb``): QEMU walked the page
  table.  If a model of that sid (any domain: QEMU's lookup ignores the
  domain) holds a live map covering ``iova``, QEMU's cache did not have an
  entry the model has: ``stale-entry`` when the walk's address/permission
  differ from the map (the guest changed a live mapping without
  invalidating it, or an invalidation is missing from the trace; the map's
  origin line is named), ``unexpected-miss`` when they agree (an
  invalidation the model did not see).  The walk then waits for its
  ``vtd_dmar_translate`` (same sid, matching page: the oldest such waiting
  walk or hit whose SLPTE gives the translated address, else the oldest;
  translates of one sid may come out of order when several threads
  translate), which gives the page size; the page
  ``[iova & ~mask, iova | mask]`` is removed from the model and re-added
  from the SLPTE.  A walk that never gets its translate is counted
  (``walks_without_translate``).  QEMU inserted the entry when it traced
  the walk, so an invalidation traced between the walk and its translate
  (another thread's) removed it already: such a walk's translate is judged
  against the walk but adds nothing to the model; so does a
  ``vtd_iotlb_reset`` for every walk but the one that triggered it (the
  update line right before it: ``vtd_update_iotlb`` inserts after
  resetting).  Likewise the translate of a hit whose entry was invalidated
  after the hit is judged against the hit's SLPTE.
* ``vtd_iotlb_page_hit`` (``vtd_lookup_iotlb`` hit): the model of
  (sid, entry's domain) must hold a live map covering ``iova`` with the same
  page address and permission: missing -> ``hit-after-invalidation`` (naming
  the last recorded invalidation or reset that covered it), different ->
  ``hit-mismatch``.
* ``vtd_dmar_translate`` (``vtd_iommu_translate``, every successful device
  translation; ``iova``/``gpa`` page-aligned): after ``vtd_translate_pt``
  for that sid, or while DMAR is disabled (``vtd_dmar_enable 0``), it must
  be the identity (``passthrough-mismatch``).  Otherwise the model of
  (sid, domain of the preceding hit/walk, else the sid's last known domain)
  must translate ``iova`` to ``gpa`` now: no map -> ``translation-without-entry``,
  another address -> ``wrong-translation``.
* ``vtd_inv_desc_iotlb_pages`` (``vtd_iotlb_page_invalidate`` /
  ``vtd_hash_remove_by_page``): in every model of the domain, remove every
  map overlapping ``[start, start + 4096 * 2**am - 1]`` with
  ``start = ((addr >> 12) & ~(2**am - 1)) << 12`` -- QEMU's "entry gfn in
  the range, or the address inside the entry's page" test is exactly overlap
  of two naturally aligned blocks.
* ``vtd_inv_desc_iotlb_domain`` (``vtd_iotlb_domain_invalidate``): drop the
  domain's models.  ``vtd_inv_desc_iotlb_global``
  (``vtd_iotlb_global_invalidate``) and ``vtd_iotlb_reset``
  (``vtd_update_iotlb``'s size-limit reset): drop all models.
* ``vtd_context_cache_reset`` not immediately preceded (among vtd events) by
  ``vtd_inv_desc_cc_global`` comes from ``vtd_reset_caches`` (root table
  pointer set, translation enable/disable, device reset): drop all models.
  Preceded by ``vtd_inv_desc_cc_global`` it is
  ``vtd_context_global_invalidate``'s generation wrap: context cache only.
* ``vtd_dmar_fault`` (``vtd_report_dmar_fault``): counted; if a model of the
  sid holds a live map covering ``addr`` that permits the access (``write``)
  -> ``fault-on-live-entry`` (QEMU only walks, hence only faults, on a miss).
* ``dma_blk_io`` / ``dma_blk_cb`` / ``dma_complete`` (system/dma-helpers.c,
  how hw/nvme moves PRP-described data): ``dma_blk_cb`` maps the request's
  scatter-gather list with ``dma_memory_map(dir)`` -- one translation a page
  -- before any other trace event, so every translation between a
  ``dma_blk_cb`` and the next non-``vtd_*`` event is a mapping in that
  request's direction, and the model's map must allow it: read for
  ``to_dev=1`` (a disk write: the device reads guest memory), write for
  ``to_dev=0`` -> ``dma-permission``.  (It is the only place the trace shows
  an access direction: ``vtd_dmar_translate`` does not, and QEMU's memory core
  checks the permission of a hit later, untraced.)  Other DMA the device
  does before the next trace event would be held to the same direction;
  with Linux guests those are coherent (read/write) queue pages.
* ``vtd_inv_desc`` of a device-TLB invalidation descriptor (type 3, sent
  by a guest that enabled ATS on the device, after the IOTLB invalidation of
  the same range): counted per device (``dev_tlb_invalidations``), never
  applied to the models.  QEMU 7.2's ``vtd_process_device_iotlb_desc`` only
  tells ``IOMMU_NOTIFIER_DEVIOTLB_UNMAP`` listeners (vhost's device IOTLB);
  its own IOTLB is not touched, so a hit after one is no divergence.
* QEMU 7.2's page invalidation keeps its address mask in a ``uint8_t``
  (``VTDIOTLBPageInvInfo.mask``, hw/i386/intel_iommu_internal.h; widened to
  64 bits upstream), so ``vtd_hash_remove_by_page`` also drops every entry of
  the domain whose frame number agrees with the invalidated one in the 8
  bits the mask keeps (an iova ``n`` MiB away, for ``am`` 0; every entry for
  ``am >= 8``).  With ``qemu_mask_quirk`` (default) such entries stay in the
  models (a QEMU with the fix keeps them, and hits them) but are marked: a
  later walk that agrees with one is not an ``unexpected-miss`` (QEMU 7.2
  dropped it); the marks are counted (``mask_quirk_drops``, and the walks
  they excused, ``mask_quirk_walks``) and warned about.  A walk that
  disagrees is still a ``stale-entry``.  A real invalidation of a marked
  entry, or a domain or global one, clears its mark.
* Newer QEMU's PASID-based invalidations (``vtd_inv_desc_iotlb_pasid_pages``,
  ``vtd_inv_desc_iotlb_pasid``; not emitted by 7.2) are applied to the whole
  domain: PASIDs are not modelled.

Memory is bounded regardless of trace length: the models hold at most what
QEMU's IOTLB holds (QEMU resets it at 1024 entries and traces that; a guard
drops everything past ``max_live_maps`` if such resets are not traced), plus
a ring of the last ``context`` events, ``history`` invalidations per domain
and at most ``max_divergences`` recorded divergences.

The guard (``model_overflow_resets``): when a walk brings the models past
``max_live_maps`` maps, all of them are dropped except that walk's page.
QEMU may still hold the dropped entries, so the checker cannot judge them
any more: a hit, or a translation, that finds no live map where a dropped
one was is counted in ``not_judged`` (and warned about), never a
divergence.  The dropped maps are kept aside as "ghosts" (at most
``max_live_maps + 1`` of them) only to recognise those; a ghost leaves when
an invalidation covers it (from then on its absence is judged as usual) or
when a walk re-adds its page.  Entries added after the guard fired are
judged as usual.  If the guard fires again while ghosts remain, they are
forgotten and every hit or translation that misses the models is not
judged until a global invalidation or reset (or, for one domain, a
domain invalidation) makes the models exact again, except where a page
invalidation recorded since (``history`` per domain) explains the miss.

Errors: :meth:`VtdChecker.feed` after :meth:`VtdChecker.finish` raises
``RuntimeError``; :func:`check_trace_file` raises ``OSError`` for the file.
Trace content never raises.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from harness.checks.dma_window import BlockDmaWindow
from harness.checks.verdict import CheckReport, DivergenceLog
from harness.models.iotlb import (
    IOTLB,
    VHOST_MAP_RO,
    VHOST_MAP_WO,
    IOTLBError,
    IOTLBMap,
    IOTLBMiss,
    IOTLBPermissionFault,
)
from harness.trace.events import (
    SLPTE_ADDR_MASK,
    ContextCacheReset,
    DmarEnable,
    DmarFault,
    DmarTranslate,
    Event,
    InvContextGlobal,
    InvIotlbDomain,
    InvIotlbGlobal,
    InvIotlbPages,
    InvIotlbPasid,
    InvIotlbPasidPages,
    IotlbPageHit,
    IotlbPageUpdate,
    IotlbReset,
    MalformedEvent,
    NvmeError,
    NvmeMapPrp,
    NvmeRead,
    NvmeWrite,
    TranslatePassthrough,
    UnknownEvent,
    VtdInvDesc,
    perm_name,
)
from harness.trace.parser import parse_file, parse_lines

__all__ = [
    "STALE_ENTRY",
    "UNEXPECTED_MISS",
    "HIT_AFTER_INVALIDATION",
    "HIT_MISMATCH",
    "PASSTHROUGH_MISMATCH",
    "TRANSLATION_WITHOUT_ENTRY",
    "WRONG_TRANSLATION",
    "FAULT_ON_LIVE_ENTRY",
    "DMA_PERMISSION",
    "DIVERGENCE_KINDS",
    "Counts",
    "CHECKER",
    "VtdChecker",
    "check_events",
    "check_lines",
    "check_trace_file",
]

STALE_ENTRY: Final = "stale-entry"
UNEXPECTED_MISS: Final = "unexpected-miss"
HIT_AFTER_INVALIDATION: Final = "hit-after-invalidation"
HIT_MISMATCH: Final = "hit-mismatch"
PASSTHROUGH_MISMATCH: Final = "passthrough-mismatch"
TRANSLATION_WITHOUT_ENTRY: Final = "translation-without-entry"
WRONG_TRANSLATION: Final = "wrong-translation"
FAULT_ON_LIVE_ENTRY: Final = "fault-on-live-entry"
DMA_PERMISSION: Final = "dma-permission"
DIVERGENCE_KINDS: Final = (
    STALE_ENTRY,
    UNEXPECTED_MISS,
    HIT_AFTER_INVALIDATION,
    HIT_MISMATCH,
    PASSTHROUGH_MISMATCH,
    TRANSLATION_WITHOUT_ENTRY,
    WRONG_TRANSLATION,
    FAULT_ON_LIVE_ENTRY,
    DMA_PERMISSION,
)
CHECKER: Final = "vtd-consistency"
TITLE: Final = "QEMU VT-d consistency (QEMU's IOTLB against its own walks and invalidations)"

_U64: Final = (1 << 64) - 1
_ALL: Final = (0, _U64)
_PAGE_SIZES: Final = (1 << 30, 1 << 21, 1 << 12)
_PENDING_MAX: Final = 4  # per-sid walks/hits/passthroughs awaiting their translate
_VOID_RANGES_MAX: Final = 16  # page invalidations remembered per waiting walk
_DEFAULT_MAX_LIVE_MAPS: Final = 16 * 1024  # 16 x QEMU's VTD_IOTLB_MAX_SIZE

_Pending = IotlbPageUpdate | IotlbPageHit | TranslatePassthrough


def _bdf(sid: int) -> str:
    return f"{sid >> 8:02x}:{(sid >> 3) & 0x1F:02x}.{sid & 7:x}"


def _sid_text(sid: int) -> str:
    return f"sid {sid:#06x} ({_bdf(sid)})"


def _origin(m: IOTLBMap) -> Event | None:
    """The ``vtd_iotlb_page_update`` event that added ``m`` (kept in its opaque)."""
    return m.opaque if isinstance(m.opaque, Event) else None


def _map_added(origin: Event | None) -> list[tuple[str, Event]]:
    """The line that explains a map: its walk, or the hit whose entry was invalidated
    before its translate (judged against that hit alone)."""
    if origin is None:
        return []
    return [("entry hit" if type(origin) is IotlbPageHit else "map added", origin)]


def _map_text(m: IOTLBMap) -> str:
    return f"[{m.start:#x}-{m.last:#x}] -> {m.addr:#x} {perm_name(m.perm)}"


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass
class Counts:
    """What the checker saw.  All are numbers of trace events unless noted."""

    events_total: int = 0
    translations: int = 0
    """``vtd_dmar_translate`` events checked (passthrough ones included)."""
    passthrough: int = 0
    """Translations checked as identity (``vtd_translate_pt`` or DMAR disabled)."""
    iotlb_updates: int = 0
    iotlb_hits: int = 0
    invalidations: int = 0
    """IOTLB invalidations: ``inv_pages + inv_domain + inv_global + inv_pasid``."""
    inv_pages: int = 0
    inv_domain: int = 0
    inv_global: int = 0
    inv_pasid: int = 0
    """PASID-based invalidations (newer QEMU only)."""
    resets: int = 0
    """Whole-IOTLB resets: ``vtd_iotlb_reset`` plus inferred ``vtd_reset_caches``."""
    context_invalidations: int = 0
    """``vtd_inv_desc_cc_global`` (context cache only; no IOTLB effect)."""
    faults: int = 0
    nvme_commands: int = 0
    """``pci_nvme_read`` + ``pci_nvme_write``."""
    nvme_reads: int = 0
    nvme_writes: int = 0
    nvme_prp_maps: int = 0
    nvme_errors: int = 0
    dma_requests: int = 0
    """Block DMA requests (``dma_blk_io``) whose direction is known."""
    dma_mappings_checked: int = 0
    """Translations made while a block request mapped its scatter-gather list,
    checked for the permission its direction needs."""
    walks_without_translate: int = 0
    unknown_lines: int = 0
    malformed_lines: int = 0
    model_overflow_resets: int = 0
    """Times the ``max_live_maps`` guard dropped all models (0 when resets are traced)."""
    not_judged: int = 0
    """Hits and translations the checker could not judge because the model's entry
    for them had been dropped by the ``max_live_maps`` guard (never divergences)."""
    dev_tlb_invalidations: int = 0
    """Device-TLB invalidation descriptors (``vtd_inv_desc`` type 3, ATS) QEMU processed."""
    dev_tlb_invalidations_by_sid: str = ""
    """``sid=count`` of the device-TLB invalidations, per device (PCI source id)."""
    translations_by_sid: str = ""
    """``sid=count`` of ``vtd_dmar_translate`` events checked, per device (PCI source id)."""
    mask_quirk_drops: int = 0
    """Cached entries a page invalidation of another iova may have dropped through QEMU
    7.2's 8-bit invalidation mask (see the module docstring)."""
    mask_quirk_walks: int = 0
    """Walks of such entries that agreed with them: not divergences."""


# --------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------


class VtdChecker:
    """Feed events in trace order with :meth:`feed`; get a
    :class:`~harness.checks.verdict.CheckReport` from :meth:`finish`.

    ``max_divergences``: how many divergences keep full detail (all are
    counted).  ``context``: events kept before and after each one.
    ``history``: invalidations remembered per domain to explain a
    ``hit-after-invalidation``.  ``max_live_maps``: guard on the total maps
    held by all models (see the module docstring).
    """

    def __init__(
        self,
        *,
        max_divergences: int = 20,
        context: int = 8,
        history: int = 32,
        max_live_maps: int = _DEFAULT_MAX_LIVE_MAPS,
        qemu_mask_quirk: bool = True,
    ) -> None:
        self.max_divergences = max_divergences
        self.context = context
        self.history = history
        self.max_live_maps = max_live_maps
        self.qemu_mask_quirk = qemu_mask_quirk
        self.counts = Counts()
        self._by_sid_translations: dict[int, int] = {}
        self._dev_tlb_by_sid: dict[int, int] = {}
        # Entries QEMU 7.2's 8-bit page-invalidation mask may have dropped: (sid, domain) -> maps.
        self._maybe: dict[tuple[int, int], IOTLB] = {}
        self._maybe_maps = 0
        self._models: dict[tuple[int, int], IOTLB] = {}
        self._by_domain: dict[int, dict[int, IOTLB]] = {}  # domain -> sid -> model
        self._by_sid: dict[int, dict[int, IOTLB]] = {}  # sid -> domain -> model
        self._live = 0
        # Maps dropped by the max_live_maps guard (see the module docstring).
        self._ghosts: dict[tuple[int, int], IOTLB] = {}
        self._ghost_maps = 0
        self._ghosts_lost = False  # ghosts overflowed: misses of the models are unjudged...
        self._lost_at = 0  # ...unless an invalidation after this line explains them
        self._synced_domains: set[int] = set()  # wholly invalidated since the ghosts were lost
        self._sid_domain: dict[int, int] = {}
        self._pending: dict[int, deque[_Pending]] = {}
        # id() of a waiting walk -> invalidated ranges since it was traced (None: all of it).
        self._voids: dict[int, list[tuple[int, int]] | None] = {}
        self._last_vtd: Event | None = None
        self._current: Event | None = None
        self._recent_inv: dict[int, deque[tuple[int, int, Event]]] = {}
        self._last_global: Event | None = None
        self._log = DivergenceLog(max_divergences=max_divergences, context=context)
        self._after_cc_global = False
        self._dmar_enabled: bool | None = None
        self._window = BlockDmaWindow()
        self._first_malformed: Event | None = None  # the first vtd_* line that did not parse
        self._malformed_vtd = 0
        self._verdict: CheckReport | None = None
        self._handlers: dict[type[Event], Callable[[Any], None]] = {
            IotlbPageUpdate: self._on_update,
            IotlbPageHit: self._on_hit,
            DmarTranslate: self._on_translate,
            TranslatePassthrough: self._on_passthrough,
            InvIotlbPages: self._on_inv_pages,
            InvIotlbPasidPages: self._on_inv_pages,
            InvIotlbDomain: self._on_inv_domain,
            InvIotlbPasid: self._on_inv_domain,
            InvIotlbGlobal: self._on_inv_global,
            IotlbReset: self._on_iotlb_reset,
            ContextCacheReset: self._on_cc_reset,
            InvContextGlobal: self._on_cc_global,
            DmarFault: self._on_fault,
            DmarEnable: self._on_dmar_enable,
            VtdInvDesc: self._on_inv_desc,
            NvmeRead: self._on_nvme_read,
            NvmeWrite: self._on_nvme_write,
            NvmeMapPrp: self._on_nvme_prp,
            NvmeError: self._on_nvme_error,
            UnknownEvent: self._on_unknown,
            MalformedEvent: self._on_malformed,
        }

    # ---- public -------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Consume the next event (trace order).  Raises ``RuntimeError`` after :meth:`finish`."""
        if self._verdict is not None:
            raise RuntimeError("VtdChecker.feed() after finish()")
        self.counts.events_total += 1
        self._current = event
        self._log.seen(event)
        self._window.feed(event)
        handler = self._handlers.get(type(event))
        if handler is not None:
            try:
                handler(event)
            except IOTLBError:
                # A value outside u64 (garbage in a line that matched its format).
                self._on_malformed(event)
        if event.IS_VTD:
            self._after_cc_global = type(event) is InvContextGlobal
            self._last_vtd = event

    def feed_all(self, events: Iterable[Event]) -> None:
        """:meth:`feed` every event of ``events``."""
        feed = self.feed
        for event in events:
            feed(event)

    def finish(self) -> CheckReport:
        """End of trace: count walks still waiting for their translate and
        return the :class:`~harness.checks.verdict.CheckReport` (the same
        object on later calls)."""
        if self._verdict is not None:
            return self._verdict
        c = self.counts
        for pend in self._pending.values():
            c.walks_without_translate += sum(1 for p in pend if type(p) is IotlbPageUpdate)
        self._pending.clear()
        self._voids.clear()
        c.dma_requests = self._window.requests
        c.translations_by_sid = " ".join(f"{sid:#06x}={n}" for sid, n in sorted(self._by_sid_translations.items()))
        c.dev_tlb_invalidations_by_sid = " ".join(f"{sid:#06x}={n}" for sid, n in sorted(self._dev_tlb_by_sid.items()))
        self._verdict = self._log.report(CHECKER, c, warnings=self._warnings(),
                                         inconclusive=self._inconclusive(), title=TITLE)
        return self._verdict

    # ---- models -------------------------------------------------------------

    def _model(self, sid: int, domain: int) -> IOTLB:
        model = self._models.get((sid, domain))
        if model is None:
            model = IOTLB()
            self._models[(sid, domain)] = model
            self._by_domain.setdefault(domain, {})[sid] = model
            self._by_sid.setdefault(sid, {})[domain] = model
        return model

    def _drop_all(self) -> None:
        self._maybe.clear()
        self._maybe_maps = 0
        self._models.clear()
        self._by_domain.clear()
        self._by_sid.clear()
        self._live = 0
        self._ghosts.clear()
        self._ghost_maps = 0
        self._ghosts_lost = False
        self._synced_domains.clear()

    def _guard_drop(self) -> None:
        """The ``max_live_maps`` guard: drop every model, keeping its maps as ghosts."""
        self.counts.model_overflow_resets += 1
        if self._ghosts_lost or self._ghost_maps:
            # Ghosts of an earlier firing remain: keep none (memory stays bounded).
            self._ghosts.clear()
            self._ghost_maps = 0
            self._ghosts_lost = True
            self._lost_at = self._log_line()
            self._synced_domains.clear()
        else:
            self._ghosts = self._models
            self._ghost_maps = self._live
        self._models = {}
        self._by_domain.clear()
        self._by_sid.clear()
        self._live = 0

    def _log_line(self) -> int:
        """Line number of the event being handled."""
        return self._current.lineno if self._current is not None else 0

    def _unghost(self, domain: int, start: int, last: int, sid: int | None = None) -> None:
        """Maps of ``domain`` (and ``sid`` if given) overlapping ``[start, last]``
        stop being ghosts: an invalidation removed them, or a walk re-added them."""
        if not self._ghosts:
            return
        for (g_sid, g_domain), ghost in self._ghosts.items():
            if g_domain == domain and (sid is None or g_sid == sid):
                self._ghost_maps -= len(ghost.del_range(start, last))

    def _unjudged(self, sid: int, domain: int, iova: int) -> bool:
        """Could the model's missing map for ``iova`` have been dropped by the guard?"""
        if self._ghosts_lost:
            if domain in self._synced_domains:
                return False
            dq = self._recent_inv.get(domain)
            return not dq or not any(
                start <= iova <= last and event.lineno > self._lost_at for start, last, event in dq
            )
        ghost = self._ghosts.get((sid, domain))
        return ghost is not None and ghost.first(iova, iova) is not None

    def _drop_domain(self, domain: int) -> None:
        for key in [k for k in self._maybe if k[1] == domain]:
            self._maybe_maps -= len(self._maybe.pop(key))
        if self._ghosts:
            for key in [k for k in self._ghosts if k[1] == domain]:
                self._ghost_maps -= len(self._ghosts.pop(key))
        if self._ghosts_lost:
            self._synced_domains.add(domain)
        models = self._by_domain.pop(domain, None)
        if not models:
            return
        for sid, model in models.items():
            self._live -= len(model)
            del self._models[(sid, domain)]
            per_sid = self._by_sid.get(sid)
            if per_sid is not None:
                per_sid.pop(domain, None)
                if not per_sid:
                    del self._by_sid[sid]

    def _record_inv(self, domain: int, start: int, last: int, event: Event) -> None:
        dq = self._recent_inv.get(domain)
        if dq is None:
            dq = self._recent_inv[domain] = deque(maxlen=max(self.history, 1))
        dq.append((start, last, event))

    def _who_removed(self, domain: int, iova: int) -> Event | None:
        """The most recent recorded invalidation/reset covering ``iova`` in ``domain``."""
        best: Event | None = None
        dq = self._recent_inv.get(domain)
        if dq:
            for start, last, event in reversed(dq):
                if start <= iova <= last:
                    best = event
                    break
        g = self._last_global
        if g is not None and (best is None or g.lineno > best.lineno):
            best = g
        return best

    # ---- divergences --------------------------------------------------------

    def _diverge(self, kind: str, event: Event, message: str, *,
                 related: Iterable[tuple[str, Event]] = (), **fields: Any) -> None:
        self._log.diverge(kind, event, message, related=related, **fields)

    def _warnings(self) -> list[str]:
        c = self.counts
        out: list[str] = []
        if c.malformed_lines > self._malformed_vtd:
            out.append(
                f"{c.malformed_lines - self._malformed_vtd} lines of known non-vtd events did not "
                "match the QEMU 7.2 format; they were not checked"
            )
        if c.walks_without_translate:
            out.append(
                f"{c.walks_without_translate} page walks (vtd_iotlb_page_update) never got "
                "their vtd_dmar_translate; their entries were not added to the model"
            )
        if c.model_overflow_resets:
            out.append(
                f"the models exceeded {self.max_live_maps} maps {c.model_overflow_resets} "
                "times and were dropped (is vtd_iotlb_reset traced?)"
            )
        if c.mask_quirk_walks:
            out.append(
                f"{c.mask_quirk_drops} cached entries may have been dropped by page invalidations of other "
                "iovas (QEMU 7.2 keeps the invalidation's address mask in 8 bits, VTDIOTLBPageInvInfo.mask); "
                f"{c.mask_quirk_walks} walks of them were not counted as unexpected misses"
            )
        if c.not_judged:
            out.append(
                f"{c.not_judged} hits/translations were not judged: their entries had been "
                f"dropped when the models exceeded {self.max_live_maps} maps"
            )
        return out

    def _inconclusive(self) -> list[str]:
        """Why this check could not judge: nothing checked, or vtd_* evidence unreadable."""
        c = self.counts
        out: list[str] = []
        if not c.events_total:
            out.append("the host trace is empty")
        elif not c.translations:
            out.append("no vtd_dmar_translate event: no DMA translation was checked")
        if self._malformed_vtd:
            first = self._first_malformed
            where = f" (first: line {first.lineno}: {first.raw[:200]})" if first is not None else ""
            out.append(f"{self._malformed_vtd} vtd_* lines could not be parsed{where}")
        return out

    # ---- handlers: VT-d ----------------------------------------------------

    @staticmethod
    def _walk_agrees(m: IOTLBMap, iova: int, slpte: int) -> bool:
        """Does a walk giving ``slpte`` for ``iova`` agree with the live map ``m``?

        The walk's page size is not known yet; it agrees if, for some page
        size not above the map's, the SLPTE's page is where ``m`` puts iova's page.
        """
        if (slpte & 3) != m.perm:
            return False
        gpa = slpte & SLPTE_ADDR_MASK
        offset = iova - m.start
        for size in _PAGE_SIZES:
            if size <= m.size and gpa == (m.addr + (offset & ~(size - 1))) & _U64:
                return True
        return False

    def _on_update(self, e: IotlbPageUpdate) -> None:
        self.counts.iotlb_updates += 1
        sid, iova = e.sid, e.iova
        self._sid_domain[sid] = e.domain
        quirk = False
        if self._maybe:  # a walk of an entry QEMU 7.2's 8-bit mask dropped: as it should
            maybe = self._maybe.get((sid, e.domain))
            if maybe is not None:
                dropped = maybe.del_range(iova, iova)
                self._maybe_maps -= len(dropped)
                quirk = bool(dropped)
        per_sid = self._by_sid.get(sid)
        if per_sid:
            for domain, model in per_sid.items():
                m = model.first(iova, iova)
                if m is None:
                    continue
                origin = _origin(m)
                related = _map_added(origin)
                added = f", added at line {origin.lineno}," if origin is not None else ""
                where = f"{_sid_text(sid)} domain {domain:#x} iova {iova:#x}"
                walk = f"gpa {e.gpa:#x} {perm_name(e.perm)} (domain {e.domain:#x})"
                if quirk and domain == e.domain and self._walk_agrees(m, iova, e.slpte):
                    self.counts.mask_quirk_walks += 1
                elif self._walk_agrees(m, iova, e.slpte):
                    self._diverge(
                        UNEXPECTED_MISS,
                        e,
                        f"{where}: QEMU walked the page table although the model still "
                        f"caches {_map_text(m)}{added} and the walk agrees ({walk}): an "
                        "invalidation the model did not see",
                        related=related,
                        sid=sid,
                        domain=domain,
                        iova=iova,
                        expected=(m.addr + iova - m.start) & _U64,
                    )
                else:
                    self._diverge(
                        STALE_ENTRY,
                        e,
                        f"{where}: page walk gives {walk} but the model holds the live "
                        f"map {_map_text(m)}{added} never invalidated: the guest changed "
                        "a live mapping without invalidating it, or an invalidation is "
                        "missing",
                        related=related,
                        sid=sid,
                        domain=domain,
                        iova=iova,
                        expected=(m.addr + iova - m.start) & _U64,
                        observed=e.gpa,
                    )
                break
        self._push_pending(sid, e)

    def _on_hit(self, e: IotlbPageHit) -> None:
        self.counts.iotlb_hits += 1
        sid, iova, domain = e.sid, e.iova, e.domain
        self._sid_domain[sid] = domain
        model = self._models.get((sid, domain))
        m = model.first(iova, iova) if model is not None else None
        where = f"{_sid_text(sid)} domain {domain:#x} iova {iova:#x}"
        if m is None:
            if self._pending_walk_matches(sid, e):
                pass
            elif self._unjudged(sid, domain, iova):
                self.counts.not_judged += 1
            else:
                remover = self._who_removed(domain, iova)
                related = [("invalidated by", remover)] if remover is not None else []
                why = (
                    f"; last invalidation/reset covering it: line {remover.lineno}"
                    if remover is not None
                    else "; no invalidation of it recorded (never walked in this trace?)"
                )
                self._diverge(
                    HIT_AFTER_INVALIDATION,
                    e,
                    f"{where}: QEMU's IOTLB hit (gpa {e.gpa:#x} {perm_name(e.perm)}) but the "
                    f"model holds no live entry{why}",
                    related=related,
                    sid=sid,
                    domain=domain,
                    iova=iova,
                    observed=e.gpa,
                )
        elif (e.slpte & 3) != m.perm or (e.gpa & ~(m.size - 1)) != m.addr:
            origin = _origin(m)
            self._diverge(
                HIT_MISMATCH,
                e,
                f"{where}: QEMU's IOTLB hit gives gpa {e.gpa:#x} {perm_name(e.perm)} but the "
                f"model's entry is {_map_text(m)}"
                + (f" (added at line {origin.lineno})" if origin is not None else ""),
                related=_map_added(origin),
                sid=sid,
                domain=domain,
                iova=iova,
                expected=m.addr,
                observed=e.gpa,
            )
        self._push_pending(sid, e)

    def _pending_walk_matches(self, sid: int, hit: IotlbPageHit) -> bool:
        """A hit on an entry whose walk is still waiting for its translate
        (another thread's translate not yet printed)."""
        pend = self._pending.get(sid)
        if not pend:
            return False
        return any(
            type(p) is IotlbPageUpdate and p.slpte == hit.slpte and p.domain == hit.domain
            and not self._is_void(p, hit.iova, hit.iova)
            for p in pend
        )

    def _void_walks(self, domain: int | None, start: int = 0, last: int = _U64,
                    keep: Event | None = None) -> None:
        """An invalidation (of ``domain``, None: all) removed the entries that waiting
        walks inserted and waiting hits used."""
        whole = start == 0 and last == _U64
        for pend in self._pending.values():
            for p in pend:
                if isinstance(p, TranslatePassthrough) or p is keep:
                    continue
                if domain is not None and p.domain != domain:
                    continue
                key = id(p)
                if whole:
                    self._voids[key] = None
                    continue
                ranges = self._voids.get(key, [])
                if ranges is None:
                    continue
                ranges.append((start, last))
                if len(ranges) > _VOID_RANGES_MAX:
                    ranges[:] = [(min(r[0] for r in ranges), max(r[1] for r in ranges))]
                self._voids[key] = ranges

    def _is_void(self, p: _Pending, start: int, last: int) -> bool:
        """Was the entry walk ``p`` inserted (page ``[start, last]``) invalidated since?"""
        if not self._voids or id(p) not in self._voids:
            return False
        ranges = self._voids[id(p)]
        return ranges is None or any(s <= last and start <= e for s, e in ranges)

    def _on_passthrough(self, e: TranslatePassthrough) -> None:
        self._push_pending(e.sid, e)

    def _push_pending(self, sid: int, e: _Pending) -> None:
        pend = self._pending.get(sid)
        if pend is None:
            pend = self._pending[sid] = deque()
        elif len(pend) >= _PENDING_MAX:
            old = pend.popleft()
            self._voids.pop(id(old), None)
            if type(old) is IotlbPageUpdate:
                self.counts.walks_without_translate += 1
        pend.append(e)

    def _take_pending(self, sid: int, iova: int, mask: int, gpa: int) -> _Pending | None:
        """The pending event of ``sid`` this translate (page ``iova``, ``mask``,
        to ``gpa``) answers: the oldest of that page whose SLPTE gives ``gpa``
        (the identity for a pass-through), else the oldest of that page.
        Others stay: another thread's translate may come first, so when two
        threads wait on one page with different SLPTEs (a hit from before an
        invalidation and the walk after it) the translates may come in either
        order, and the address tells which is which."""
        pend = self._pending.get(sid)
        if not pend:
            return None
        chosen: int | None = None
        for index, p in enumerate(pend):
            if (p.iova & ~mask) != iova:
                continue
            if chosen is None:
                chosen = index
            slpte = getattr(p, "slpte", None)
            target = iova if slpte is None else (slpte & SLPTE_ADDR_MASK) & ~mask
            if target == gpa:
                chosen = index
                break
        if chosen is None:
            return None
        p = pend[chosen]
        del pend[chosen]
        if not pend:
            del self._pending[sid]
        return p

    def _on_translate(self, e: DmarTranslate) -> None:
        c = self.counts
        c.translations += 1
        sid, iova, gpa, mask = e.sid, e.iova, e.gpa, e.mask
        self._by_sid_translations[sid] = self._by_sid_translations.get(sid, 0) + 1
        p = self._take_pending(sid, iova, mask, gpa)
        kind = type(p)
        if kind is TranslatePassthrough or (p is None and self._dmar_enabled is False):
            c.passthrough += 1
            if gpa != iova:
                why = "vtd_translate_pt" if p is not None else "DMAR disabled"
                self._diverge(
                    PASSTHROUGH_MISMATCH,
                    e,
                    f"{_sid_text(sid)} iova {iova:#x}: pass-through ({why}) must be the "
                    f"identity but QEMU translated to gpa {gpa:#x}",
                    related=[("pass-through", p)] if p is not None else [],
                    sid=sid,
                    iova=iova,
                    expected=iova,
                    observed=gpa,
                )
            return
        domain: int | None
        model_or_none: IOTLB | None
        if kind is IotlbPageUpdate:
            assert isinstance(p, IotlbPageUpdate)
            domain = p.domain
            last = iova | mask
            if self._voids and id(p) in self._voids:
                void = self._is_void(p, iova, last)
                del self._voids[id(p)]
                if void:
                    # Invalidated before this translate: judged against the walk alone.
                    model_or_none = IOTLB()
                    model_or_none.add_range(iova, last, (p.slpte & SLPTE_ADDR_MASK) & ~mask,
                                            p.slpte & 3, p)
                    self._judge_translate(e, p, sid, domain, model_or_none)
                    return
            model = self._model(sid, domain)
            removed = model.del_range(iova, last)
            model.add_range(iova, last, (p.slpte & SLPTE_ADDR_MASK) & ~mask, p.slpte & 3, p)
            self._live += 1 - len(removed)
            if self._live > self.max_live_maps:
                self._guard_drop()
                model = self._model(sid, domain)
                model.add_range(iova, last, (p.slpte & SLPTE_ADDR_MASK) & ~mask, p.slpte & 3, p)
                self._live = 1
            self._unghost(domain, iova, last, sid)
        elif kind is IotlbPageHit:
            assert isinstance(p, IotlbPageHit)
            domain = p.domain
            if self._voids and id(p) in self._voids:
                void = self._is_void(p, iova, iova | mask)
                del self._voids[id(p)]
                if void:  # the entry was invalidated after QEMU used it
                    model_or_none = IOTLB()
                    model_or_none.add_range(iova, iova | mask, (p.slpte & SLPTE_ADDR_MASK) & ~mask,
                                            p.slpte & 3, p)
                    self._judge_translate(e, p, sid, domain, model_or_none)
                    return
        else:
            domain = self._sid_domain.get(sid)
        model_or_none = self._models.get((sid, domain)) if domain is not None else None
        self._judge_translate(e, p, sid, domain, model_or_none)

    def _judge_translate(self, e: DmarTranslate, p: _Pending | None, sid: int,
                         domain: int | None, model_or_none: IOTLB | None) -> None:
        c = self.counts
        iova, gpa = e.iova, e.gpa
        m = model_or_none.first(iova, iova) if model_or_none is not None else None
        if m is None:
            if domain is not None and self._unjudged(sid, domain, iova):
                c.not_judged += 1
                return
            dom = f" domain {domain:#x}" if domain is not None else " (domain unknown)"
            self._diverge(
                TRANSLATION_WITHOUT_ENTRY,
                e,
                f"{_sid_text(sid)}{dom} iova {iova:#x}: QEMU translated to gpa {gpa:#x} "
                "but the model holds no entry for it",
                related=[("preceded by", p)] if p is not None else [],
                sid=sid,
                domain=domain,
                iova=iova,
                observed=gpa,
            )
            return
        expected = (m.addr + iova - m.start) & _U64
        if expected != gpa:
            origin = _origin(m)
            self._diverge(
                WRONG_TRANSLATION,
                e,
                f"{_sid_text(sid)} domain {domain:#x} iova {iova:#x}: QEMU translated to gpa "
                f"{gpa:#x} but the model translates to {expected:#x} (map {_map_text(m)}"
                + (f", added at line {origin.lineno})" if origin is not None else ")"),
                related=_map_added(origin),
                sid=sid,
                domain=domain,
                iova=iova,
                expected=expected,
                observed=gpa,
            )
            return
        request = self._window.current
        if request is not None:
            c.dma_mappings_checked += 1
            need = VHOST_MAP_RO if request.to_dev else VHOST_MAP_WO
            if (m.perm & need) != need:
                origin = _origin(m)
                self._diverge(
                    DMA_PERMISSION,
                    e,
                    f"{_sid_text(sid)} domain {domain:#x} iova {iova:#x}: the device mapped this page to "
                    f"{'read' if request.to_dev else 'write'} guest memory (block request at line "
                    f"{request.lineno}, to_dev={int(request.to_dev)}) but the model's map "
                    f"{_map_text(m)} does not allow {perm_name(need)}",
                    related=[("dma request", request), *_map_added(origin)],
                    sid=sid,
                    domain=domain,
                    iova=iova,
                    expected=m.addr,
                    observed=gpa,
                )

    def _on_inv_pages(self, e: InvIotlbPages) -> None:
        c = self.counts
        c.invalidations += 1
        if type(e) is InvIotlbPasidPages:
            c.inv_pasid += 1
        else:
            c.inv_pages += 1
        domain = e.domain
        start = ((e.addr >> 12) & ~((1 << e.am) - 1)) << 12
        last = start + (4096 << e.am) - 1
        self._unghost(domain, start, last)
        if self._pending:
            self._void_walks(domain, start, last)
        if self._maybe:
            for (m_sid, m_domain), maybe in self._maybe.items():
                if m_domain == domain:
                    self._maybe_maps -= len(maybe.del_range(start, last))
        models = self._by_domain.get(domain)
        if models:
            for sid, model in models.items():
                removed = model.del_range(start, last)
                if removed:
                    self._live -= len(removed)
                    for m in removed:
                        if m.start < start or m.last > last:
                            self._record_inv(domain, m.start, m.last, e)
                if self.qemu_mask_quirk and type(e) is InvIotlbPages:
                    self._mask_quirk(sid, domain, model, e)
        self._record_inv(domain, start, last, e)

    def _mask_quirk(self, sid: int, domain: int, model: IOTLB, e: InvIotlbPages) -> None:
        """Mark the maps of ``model`` QEMU 7.2's ``vtd_hash_remove_by_page`` also
        drops (``(gfn & mask8) == (addr >> 12) & mask8``, ``mask8`` the low 8
        bits of ``~(2**am - 1)``) as maybe dropped (module docstring)."""
        mask8 = ~((1 << e.am) - 1) & 0xFF
        gfn8 = (e.addr >> 12) & mask8
        hit = [m for m in model if ((m.start >> 12) & mask8) == gfn8]
        if not hit:
            return
        maybe = self._maybe.get((sid, domain))
        if maybe is None:
            maybe = self._maybe[(sid, domain)] = IOTLB()
        if self._maybe_maps + len(hit) > self.max_live_maps:  # bound memory: forget the oldest marks
            self._maybe.clear()
            self._maybe_maps = 0
            maybe = self._maybe[(sid, domain)] = IOTLB()
        for m in hit:
            if maybe.first(m.start, m.last) is None:
                maybe.add_range(m.start, m.last, m.addr, m.perm, m.opaque)
                self._maybe_maps += 1
                self.counts.mask_quirk_drops += 1

    def _on_inv_desc(self, e: VtdInvDesc) -> None:
        """A descriptor QEMU took off the queue: a device-TLB invalidation is counted
        per device and never touches the models (module docstring)."""
        if e.is_device_tlb:
            self.counts.dev_tlb_invalidations += 1
            self._dev_tlb_by_sid[e.dev_sid] = self._dev_tlb_by_sid.get(e.dev_sid, 0) + 1

    def _on_inv_domain(self, e: InvIotlbDomain | InvIotlbPasid) -> None:
        c = self.counts
        c.invalidations += 1
        if type(e) is InvIotlbPasid:
            c.inv_pasid += 1
        else:
            c.inv_domain += 1
        self._drop_domain(e.domain)
        if self._pending:
            self._void_walks(e.domain)
        self._record_inv(e.domain, _ALL[0], _ALL[1], e)

    def _on_inv_global(self, e: InvIotlbGlobal) -> None:
        c = self.counts
        c.invalidations += 1
        c.inv_global += 1
        self._drop_all()
        self._last_global = e
        if self._pending:
            self._void_walks(None)

    def _on_iotlb_reset(self, e: IotlbReset) -> None:
        self.counts.resets += 1
        self._drop_all()
        self._last_global = e
        if self._pending:
            # vtd_update_iotlb traced its walk, then this reset, then inserts that walk.
            last = self._last_vtd
            self._void_walks(None, keep=last if type(last) is IotlbPageUpdate else None)

    def _on_cc_reset(self, e: ContextCacheReset) -> None:
        if self._after_cc_global:
            return  # vtd_context_global_invalidate's generation wrap: context cache only
        self.counts.resets += 1  # vtd_reset_caches: IOTLB too
        self._drop_all()
        self._last_global = e
        if self._pending:
            self._void_walks(None)

    def _on_cc_global(self, e: InvContextGlobal) -> None:
        self.counts.context_invalidations += 1

    def _on_fault(self, e: DmarFault) -> None:
        self.counts.faults += 1
        per_sid = self._by_sid.get(e.sid)
        if not per_sid:
            return
        access = VHOST_MAP_WO if e.write else VHOST_MAP_RO
        addr = e.addr & _U64
        for domain, model in per_sid.items():
            try:
                model.translate(addr, access)
            except (IOTLBMiss, IOTLBPermissionFault):
                continue
            m = model.first(addr, addr)
            assert m is not None
            origin = _origin(m)
            self._diverge(
                FAULT_ON_LIVE_ENTRY,
                e,
                f"{_sid_text(e.sid)} domain {domain:#x} addr {addr:#x}: QEMU reported a "
                f"{'write' if e.write else 'read'} fault ({e.reason}) but the model holds "
                f"the live entry {_map_text(m)} permitting it"
                + (f" (added at line {origin.lineno})" if origin is not None else ""),
                related=_map_added(origin),
                sid=e.sid,
                domain=domain,
                iova=addr,
                expected=(m.addr + addr - m.start) & _U64,
            )
            break

    def _on_dmar_enable(self, e: DmarEnable) -> None:
        self._dmar_enabled = e.enable

    # ---- handlers: NVMe and the rest ---------------------------------------

    def _on_nvme_read(self, e: NvmeRead) -> None:
        self.counts.nvme_commands += 1
        self.counts.nvme_reads += 1

    def _on_nvme_write(self, e: NvmeWrite) -> None:
        self.counts.nvme_commands += 1
        self.counts.nvme_writes += 1

    def _on_nvme_prp(self, e: NvmeMapPrp) -> None:
        self.counts.nvme_prp_maps += 1

    def _on_nvme_error(self, e: NvmeError) -> None:
        self.counts.nvme_errors += 1

    def _on_unknown(self, e: UnknownEvent) -> None:
        self.counts.unknown_lines += 1
        if e.is_vtd:
            self._after_cc_global = False

    def _on_malformed(self, e: Event) -> None:
        self.counts.malformed_lines += 1
        if e.IS_VTD or (isinstance(e, MalformedEvent) and e.is_vtd):
            self._malformed_vtd += 1
            if self._first_malformed is None:
                self._first_malformed = e
            self._after_cc_global = False


# --------------------------------------------------------------------------
# Conveniences
# --------------------------------------------------------------------------


def check_events(events: Iterable[Event], **options: Any) -> CheckReport:
    """Run a :class:`VtdChecker` (``options`` go to its constructor) over ``events``."""
    checker = VtdChecker(**options)
    checker.feed_all(events)
    return checker.finish()


def check_lines(lines: Iterable[str], **options: Any) -> CheckReport:
    """Parse trace lines (numbered from 1) and check them; e.g. ``text.splitlines()``."""
    return check_events(parse_lines(lines), **options)


def check_trace_file(path: str | os.PathLike[str], **options: Any) -> CheckReport:
    """Parse and check a QEMU trace file (streaming; ``.gz``/``.xz`` accepted).

    Raises ``OSError`` if the file cannot be read.
    """
    return check_events(parse_file(path), **options)
