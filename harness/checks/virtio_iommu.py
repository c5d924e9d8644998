"""Judge QEMU's virtio-iommu against a model of its own requests.

The driver's requests, as QEMU received them (``virtio_iommu_attach``,
``_detach``, ``_map``, ``_unmap`` and the ``_unmap_done`` of each mapping it
removed), are replayed into :class:`~harness.models.virtio_iommu.VirtioIommuModel`;
the config (``virtio_iommu_get_config``: bypass bit, page size mask) and the
reserved regions the device reported (``virtio_iommu_fill_resv_property``)
set it up; ``virtio_iommu_device_reset`` empties it.  Then every device access
(``virtio_iommu_translate`` sid, addr, access flag) is judged by the model's
outcome against what QEMU did next for that sid:

* ``virtio_iommu_translate_out`` (addr -> gpa): allowed only if the model maps
  ``addr`` for the sid's domain to that ``gpa`` with a permission covering
  the access; else ``viommu-wrong-translation`` (another gpa),
  ``viommu-permission`` (the mapping's flags forbid the access) or
  ``viommu-translation-without-mapping`` (the model faults or bypasses);
* no ``translate_out`` (bypass, MSI region, fault): a divergence
  ``viommu-missing-translation`` when the model maps the access with enough
  permission (QEMU refused or bypassed a live mapping).

The requests themselves:

* a traced MAP is one QEMU accepted (it traces after its checks): the model
  must accept it too (``viommu-map-accepted``: overlap, unknown domain,
  bypass domain); a MAP the specification forbids (not aligned on the
  granule of ``page_size_mask``, virt_end below virt_start) is
  ``viommu-request-violates-spec``;
* an UNMAP that would split a mapping is ``viommu-request-violates-spec``
  (the spec's device removes nothing and answers S_RANGE; QEMU 7.2 removes
  the mappings it met before the split one); each ``unmap_done`` must be a
  whole mapping of the model inside the request (``viommu-unmap-mismatch``);
  a mapping the request covers whole that QEMU did not remove, when the
  request split none, is ``viommu-unmap-incomplete``.

An ATTACH's flags are not traced: the ``virtio_iommu_switch_address_space``
QEMU traces right after a successful attach says whether the domain is a
bypass one (``iommu enabled=0``).

Inconclusive when no translation was checked, when fewer endpoints than the
caller expects had one checked (``expect_endpoints``), or when a
``virtio_iommu_*`` line could not be parsed.

Pure code: events in, a :class:`~harness.checks.verdict.CheckReport` out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from harness.checks.verdict import CheckReport, DivergenceLog
from harness.models.virtio_iommu import (
    ATTACH_F_BYPASS,
    S_OK,
    STATUS_NAMES,
    Translation,
    VirtioIommuModel,
)
from harness.trace.events import (
    DmarTranslate,
    Event,
    MalformedEvent,
    VirtioIommuAttach,
    VirtioIommuDetach,
    VirtioIommuDeviceReset,
    VirtioIommuEvent,
    VirtioIommuFillResvProperty,
    VirtioIommuGetConfig,
    VirtioIommuMap,
    VirtioIommuReportFault,
    VirtioIommuSetConfig,
    VirtioIommuSwitchAddressSpace,
    VirtioIommuTranslate,
    VirtioIommuTranslateOut,
    VirtioIommuUnmap,
    VirtioIommuUnmapDone,
    u32,
)

__all__ = [
    "CHECKER", "WRONG_TRANSLATION", "PERMISSION", "TRANSLATION_WITHOUT_MAPPING", "MISSING_TRANSLATION",
    "MAP_ACCEPTED", "SPEC_VIOLATION", "UNMAP_MISMATCH", "UNMAP_INCOMPLETE",
    "VirtioIommuCounts", "VirtioIommuChecker", "check_virtio_iommu", "as_dmar_translations",
]

CHECKER: Final = "virtio-iommu"
TITLE: Final = "virtio-iommu translations against the model of the driver's requests"
WRONG_TRANSLATION: Final = "viommu-wrong-translation"
PERMISSION: Final = "viommu-permission"
TRANSLATION_WITHOUT_MAPPING: Final = "viommu-translation-without-mapping"
MISSING_TRANSLATION: Final = "viommu-missing-translation"
MAP_ACCEPTED: Final = "viommu-map-accepted"
SPEC_VIOLATION: Final = "viommu-request-violates-spec"
UNMAP_MISMATCH: Final = "viommu-unmap-mismatch"
UNMAP_INCOMPLETE: Final = "viommu-unmap-incomplete"

_ACCESS_NAMES: Final = ("none", "read", "write", "read+write")


@dataclass
class VirtioIommuCounts:
    events: int = 0
    attaches: int = 0
    bypass_attaches: int = 0
    detaches: int = 0
    maps: int = 0
    unmaps: int = 0
    unmaps_done: int = 0
    translations: int = 0
    """``virtio_iommu_translate`` events (device accesses)."""
    translations_checked: int = 0
    """Accesses QEMU translated through a mapping (``translate_out``), each judged against the model."""
    translations_by_sid: str = ""
    """``sid=count`` of the checked translations, per endpoint (PCI source id)."""
    identity_accesses: int = 0
    """Accesses QEMU let through untranslated (bypass, MSI region) where the model agrees."""
    faults_expected: int = 0
    """Accesses the model faults that QEMU did not translate either."""
    faults_reported: int = 0
    reserved_regions: int = 0
    device_resets: int = 0
    endpoints: int = 0
    domains: int = 0
    malformed_lines: int = 0


@dataclass
class _PendingUnmap:
    event: VirtioIommuUnmap
    domain: int
    splits: bool
    done: int = 0


class VirtioIommuChecker:
    """Feed QEMU's events in order with :meth:`feed`, then :meth:`finish`.

    ``bypass``: the config's bypass bit before any ``get_config`` (QEMU's
    ``boot-bypass``, default on); ``expect_endpoints``: how many endpoints
    must have a translation checked for a conclusive report (e.g. the NVMe
    controllers of the machine).
    """

    def __init__(self, *, bypass: bool = True, expect_endpoints: int = 1, max_divergences: int = 20,
                 context: int = 8) -> None:
        self.model = VirtioIommuModel(bypass=bypass)
        self.counts = VirtioIommuCounts()
        self.expect_endpoints = expect_endpoints
        self._log = DivergenceLog(max_divergences=max_divergences, context=context)
        self._pending: dict[int, VirtioIommuTranslate] = {}  # sid -> access awaiting its outcome
        self._attach: dict[int, VirtioIommuAttach] = {}  # endpoint -> attach awaiting its switch event
        self._unmap: _PendingUnmap | None = None
        self._by_sid: dict[int, int] = {}
        self._endpoints: set[int] = set()
        self._domains: set[int] = set()
        self._report: CheckReport | None = None

    # ---- events ------------------------------------------------------------

    def feed(self, event: Event) -> None:
        kind = type(event)
        if self._unmap is not None and kind is not VirtioIommuUnmapDone:
            self._end_unmap()
        if kind is MalformedEvent:
            assert isinstance(event, MalformedEvent)
            if event.trace_name.startswith("virtio_iommu"):
                self.counts.malformed_lines += 1
            return
        if not isinstance(event, VirtioIommuEvent):
            return
        self._log.seen(event)
        self.counts.events += 1
        if kind is VirtioIommuTranslate:
            assert isinstance(event, VirtioIommuTranslate)
            sid = u32(event.rid)
            self._resolve(sid, None)
            self.counts.translations += 1
            self._pending[sid] = event
        elif kind is VirtioIommuTranslateOut:
            assert isinstance(event, VirtioIommuTranslateOut)
            self._resolve(u32(event.sid), event)
        elif kind is VirtioIommuReportFault:
            assert isinstance(event, VirtioIommuReportFault)
            self.counts.faults_reported += 1
            self._resolve(u32(event.endpoint), None)
        elif kind is VirtioIommuAttach:
            assert isinstance(event, VirtioIommuAttach)
            self._flush_attaches()
            self.counts.attaches += 1
            self._attach[u32(event.endpoint)] = event
        elif kind is VirtioIommuSwitchAddressSpace:
            assert isinstance(event, VirtioIommuSwitchAddressSpace)
            attach = self._attach.pop(event.sid, None)
            if attach is not None:
                self._apply_attach(attach, bypass=not event.enabled)
        elif kind is VirtioIommuDetach:
            assert isinstance(event, VirtioIommuDetach)
            self._flush_attaches()
            self.counts.detaches += 1
            self.model.detach(u32(event.domain), u32(event.endpoint))
        elif kind is VirtioIommuMap:
            assert isinstance(event, VirtioIommuMap)
            self._flush_attaches()
            self._on_map(event)
        elif kind is VirtioIommuUnmapDone:
            assert isinstance(event, VirtioIommuUnmapDone)
            self._on_unmap_done(event)
        elif kind is VirtioIommuUnmap:
            assert isinstance(event, VirtioIommuUnmap)
            self._flush_attaches()
            self._on_unmap(event)
        elif kind is VirtioIommuGetConfig:
            assert isinstance(event, VirtioIommuGetConfig)
            self.model.bypass = bool(event.bypass)
            if event.page_size_mask:
                self.model.page_size_mask = event.page_size_mask
        elif kind is VirtioIommuSetConfig:
            assert isinstance(event, VirtioIommuSetConfig)
            self.model.bypass = bool(event.bypass)
        elif kind is VirtioIommuFillResvProperty:
            assert isinstance(event, VirtioIommuFillResvProperty)
            before = len(self.model.reserved)
            self.model.add_reserved(event.start, event.end, event.type)
            self.counts.reserved_regions += len(self.model.reserved) - before
        elif kind is VirtioIommuDeviceReset:
            self._flush_attaches()
            self.counts.device_resets += 1
            self.model.reset()
            self._pending.clear()

    def feed_all(self, events: Iterable[Event]) -> None:
        for e in events:
            self.feed(e)

    # ---- attach / map / unmap ------------------------------------------------

    def _flush_attaches(self) -> None:
        """Attaches no switch event followed: QEMU refused them before switching."""
        self._attach.clear()

    def _apply_attach(self, e: VirtioIommuAttach, *, bypass: bool) -> None:
        domain, endpoint = u32(e.domain), u32(e.endpoint)
        status = self.model.attach(domain, endpoint, ATTACH_F_BYPASS if bypass else 0)
        self.counts.bypass_attaches += bypass
        self._endpoints.add(endpoint)
        self._domains.add(domain)
        if status != S_OK:
            self._log.diverge(MAP_ACCEPTED, e,
                              f"QEMU attached endpoint {endpoint:#x} to domain {domain} "
                              f"({'bypass' if bypass else 'translated'}) but the model answers "
                              f"{STATUS_NAMES.get(status, status)}", domain=domain, sid=endpoint)

    def _on_map(self, e: VirtioIommuMap) -> None:
        self.counts.maps += 1
        domain = u32(e.domain)
        problems = self.model.spec_problems_map(domain, e.virt_start, e.virt_end, e.phys_start, e.flags)
        layout = [p for p in problems if not p.startswith("overlaps")]
        if layout:
            self._log.diverge(SPEC_VIOLATION, e, f"MAP of domain {domain}: " + "; ".join(layout),
                              domain=domain, iova=e.virt_start)
        status = self.model.map(domain, e.virt_start, e.virt_end, e.phys_start, e.flags, origin=e)
        if status != S_OK:
            d = self.model.domains.get(domain)
            old = next(d.overlapping(e.virt_start, e.virt_end), None) if d is not None else None
            related = [("existing mapping", old.origin)] if old is not None and isinstance(old.origin, Event) else []
            self._log.diverge(MAP_ACCEPTED, e,
                              f"QEMU accepted MAP {e.virt_start:#x}-{e.virt_end:#x} -> {e.phys_start:#x} of "
                              f"domain {domain} but the model answers {STATUS_NAMES.get(status, status)}"
                              + (f" (overlaps {old.virt_start:#x}-{old.virt_end:#x})" if old is not None else ""),
                              related=related, domain=domain, iova=e.virt_start)

    def _on_unmap(self, e: VirtioIommuUnmap) -> None:
        self.counts.unmaps += 1
        domain = u32(e.domain)
        split = self.model.spec_problems_unmap(domain, e.virt_start, e.virt_end)
        if split:
            self._log.diverge(SPEC_VIOLATION, e, f"UNMAP {e.virt_start:#x}-{e.virt_end:#x} of domain {domain} "
                              + "; ".join(split) + " (the device must answer S_RANGE and remove nothing)",
                              domain=domain, iova=e.virt_start)
        self._unmap = _PendingUnmap(e, domain, bool(split))

    def _on_unmap_done(self, e: VirtioIommuUnmapDone) -> None:
        self.counts.unmaps_done += 1
        pending = self._unmap
        domain = u32(e.domain)
        inside = (pending is not None and pending.domain == domain
                  and pending.event.virt_start <= e.virt_start and e.virt_end <= pending.event.virt_end)
        removed = self.model.remove_exact(domain, e.virt_start, e.virt_end) if inside else None
        if removed is None:
            self._log.diverge(UNMAP_MISMATCH, e,
                              f"QEMU removed {e.virt_start:#x}-{e.virt_end:#x} of domain {domain}, which is "
                              + ("not inside the UNMAP request" if not inside else "no whole mapping of the model"),
                              related=[("request", pending.event)] if pending is not None else [],
                              domain=domain, iova=e.virt_start)
        elif pending is not None:
            pending.done += 1

    def _end_unmap(self) -> None:
        pending, self._unmap = self._unmap, None
        assert pending is not None
        if pending.splits:
            return  # QEMU stops at the split mapping: which ones it removed first is its tree's order
        d = self.model.domains.get(pending.domain)
        if d is None:
            return
        e = pending.event
        left = [m for m in d.overlapping(e.virt_start, e.virt_end)]
        if left:
            m = left[0]
            self._log.diverge(UNMAP_INCOMPLETE, e,
                              f"UNMAP {e.virt_start:#x}-{e.virt_end:#x} of domain {pending.domain} covers the "
                              f"mapping {m.virt_start:#x}-{m.virt_end:#x} whole but QEMU did not remove it "
                              f"({len(left)} such mapping(s))", domain=pending.domain, iova=m.virt_start)

    # ---- translations ----------------------------------------------------------

    def _resolve(self, sid: int, out: VirtioIommuTranslateOut | None) -> None:
        """Judge the pending access of ``sid``: ``out`` is its translate_out, or None
        when QEMU did not translate it through a mapping."""
        access = self._pending.pop(sid, None)
        if access is None:
            if out is not None:
                self._log.diverge(TRANSLATION_WITHOUT_MAPPING, out,
                                  f"translate_out for sid {sid:#x} with no access before it", sid=sid,
                                  iova=out.addr, observed=out.gpa)
            return
        c = self.counts
        t = self.model.translate(sid, access.addr, access.flag)
        if out is None:
            if t.kind == "mapped":
                self._diverge_missing(access, t)
            elif t.kind == "fault":
                c.faults_expected += 1
            else:
                c.identity_accesses += 1
            return
        c.translations_checked += 1
        self._by_sid[sid] = self._by_sid.get(sid, 0) + 1
        where = f"sid {sid:#06x} {_ACCESS_NAMES[access.flag & 3]} of iova {out.addr:#x} -> gpa {out.gpa:#x}"
        if out.addr != access.addr:
            self._log.diverge(WRONG_TRANSLATION, out, f"{where}: the access was to {access.addr:#x}",
                              related=[("access", access)], sid=sid, iova=access.addr, observed=out.gpa)
            return
        if t.kind == "mapped":
            if t.gpa != out.gpa:
                self._log.diverge(WRONG_TRANSLATION, out, f"{where}: the model maps it to {t.gpa:#x}",
                                  related=_origin(t), sid=sid, iova=out.addr, expected=t.gpa, observed=out.gpa)
            return
        if t.kind == "fault" and t.mapping is not None:
            self._log.diverge(PERMISSION, out, f"{where}: {t.why}", related=_origin(t), sid=sid, iova=out.addr,
                              expected=None, observed=out.gpa)
            return
        self._log.diverge(TRANSLATION_WITHOUT_MAPPING, out, f"{where}: the model has no mapping for it ({t.why})",
                          sid=sid, iova=out.addr, expected=t.gpa, observed=out.gpa)

    def _diverge_missing(self, access: VirtioIommuTranslate, t: Translation) -> None:
        sid = u32(access.rid)
        self._log.diverge(MISSING_TRANSLATION, access,
                          f"sid {sid:#06x} {_ACCESS_NAMES[access.flag & 3]} of iova {access.addr:#x}: the model "
                          f"maps it to {t.gpa:#x} but QEMU did not translate it", related=_origin(t),
                          sid=sid, iova=access.addr, expected=t.gpa)

    # ---- the end -------------------------------------------------------------

    def finish(self) -> CheckReport:
        if self._report is not None:
            return self._report
        if self._unmap is not None:
            self._end_unmap()
        for sid in list(self._pending):
            self._resolve(sid, None)
        c = self.counts
        c.translations_by_sid = " ".join(f"{sid:#06x}={n}" for sid, n in sorted(self._by_sid.items()))
        c.endpoints = len(self._endpoints)
        c.domains = len(self._domains)
        inconclusive: list[str] = []
        if not c.translations_checked:
            inconclusive.append("no virtio-iommu translation was checked")
        elif len(self._by_sid) < self.expect_endpoints:
            inconclusive.append(f"translations of {len(self._by_sid)} endpoint(s) were checked; "
                                f"the machine has {self.expect_endpoints} DMA device(s) behind the IOMMU")
        if c.malformed_lines:
            inconclusive.append(f"{c.malformed_lines} virtio_iommu_* lines of QEMU's trace could not be parsed")
        self._report = self._log.report(CHECKER, c, inconclusive=inconclusive, title=TITLE)
        return self._report


def _origin(t: Translation) -> list[tuple[str, Event]]:
    origin = t.mapping.origin if t.mapping is not None else None
    return [("mapped by", origin)] if isinstance(origin, Event) else []


def check_virtio_iommu(events: Iterable[Event], **options: int | bool) -> CheckReport:
    """Run a :class:`VirtioIommuChecker` over ``events``."""
    checker = VirtioIommuChecker(**options)  # type: ignore[arg-type]
    checker.feed_all(events)
    return checker.finish()


def as_dmar_translations(event: Event) -> Event | None:
    """QEMU's virtio-iommu translations in the shape of ``vtd_dmar_translate``, for
    checkers that read only that event (:mod:`harness.checks.block_data`).

    A ``virtio_iommu_translate_out`` becomes a :class:`DmarTranslate` of its sid
    with its iova and gpa aligned down to the 4 KiB page (``mask 0xfff``; the
    line and its raw text stay the virtio-iommu one); a ``virtio_iommu_translate``
    becomes None (the caller drops it: the block DMA window of
    :mod:`harness.checks.dma_window` stays open across a request's page
    translations only while no other event comes between them); any other
    event is returned as it is.
    """
    kind = type(event)
    if kind is VirtioIommuTranslateOut:
        assert isinstance(event, VirtioIommuTranslateOut)
        sid = u32(event.sid) & 0xFFFF
        return DmarTranslate(event.lineno, event.raw, sid >> 8, (sid >> 3) & 0x1F, sid & 7,
                             event.addr & ~0xFFF, event.gpa & ~0xFFF, 0xFFF)
    if kind is VirtioIommuTranslate:
        return None
    return event


def dmar_view(events: Iterable[Event]) -> Iterator[Event]:
    """:func:`as_dmar_translations` over a stream, dropped events left out."""
    for e in events:
        out = as_dmar_translations(e)
        if out is not None:
            yield out

