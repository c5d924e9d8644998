"""QEMU-like VT-d trace streams for property tests of :mod:`harness.checks.vtd`.

:class:`SimQemu` simulates QEMU 7.2's emulated VT-d IOTLB and DMA translation
path (hw/i386/intel_iommu.c) and prints what its ``log`` trace backend prints,
line for line in QEMU 7.2's formats (hw/i386/trace-events):

* the IOTLB is a hash table keyed by (source id, level, gfn) whose entries
  carry the domain id they were walked under (``vtd_lookup_iotlb`` looks up
  level 1 (4 KiB), then level 2 (2 MiB), ignoring the domain);
* a device access (``vtd_iommu_translate``) that hits prints
  ``vtd_iotlb_page_hit`` then ``vtd_dmar_translate``; one that misses walks
  the guest's page table of the sid's current domain: a present leaf with the
  access's permission prints ``vtd_iotlb_page_update`` (``vtd_update_iotlb``:
  then ``vtd_iotlb_reset`` and a reset when the table already holds
  :data:`VTD_IOTLB_MAX_SIZE` entries, then the insertion) and
  ``vtd_dmar_translate``; anything else prints ``vtd_dmar_fault``;
* the hit/update line and the translate line of one access may be split by
  another thread's lines (the translate is printed after the IOMMU lock is
  released), so several walks and hits can wait for their translates;
* ``vtd_inv_desc_iotlb_pages`` (``vtd_hash_remove_by_page``: same domain and
  ``entry.gfn & mask == gfn`` or ``entry.gfn == gfn of addr at the entry's
  level``), ``vtd_inv_desc_iotlb_domain``, ``vtd_inv_desc_iotlb_global``,
  ``vtd_context_cache_reset`` from ``vtd_reset_caches`` (IOTLB too), and
  ``vtd_inv_desc_cc_global`` (context cache only, sometimes with the
  generation-wrap ``vtd_context_cache_reset`` right after it).

:class:`Guest` is the guest kernel: per-domain page tables of 4 KiB and 2 MiB
pages, a sid -> domain context, maps, unmaps and remaps with page-, domain- or
global invalidations (or, sloppily, none: QEMU then keeps serving the old
entry, which is still consistent), and sids moving to another domain with or
without flushing the old one.

A correct simulated QEMU must get a report without divergence from the
checker.  :data:`FAULTS` are QEMU (or trace) faults; a stream with one ends
with a probe that makes it visible, and :attr:`Stream.expected` is the
divergence kind the checker must report first and the line it must name.

Entry points: :func:`vtd_streams` (a Hypothesis strategy of :class:`Stream`)
and :func:`build_stream` (the same, driven by any ``draw`` function).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from hypothesis import strategies as st

VTD_IOTLB_MAX_SIZE: Final = 1024
"""QEMU 7.2 ``VTD_IOTLB_MAX_SIZE``: ``vtd_update_iotlb`` resets the IOTLB at this size."""

SIDS: Final = (0x10, 0x18, 0xFA)  # 00:02.0, 00:03.0, 00:1f.2
DOMAINS: Final = (0x1, 0x2, 0x5)

PAGE_4K: Final = 1 << 12
PAGE_2M: Final = 1 << 21
SMALL_BASE: Final = 0x100000  # 16 pages of 4 KiB
SMALL_PAGES: Final = 16
HUGE_BASE: Final = 0x40000000  # 4 slots of 2 MiB: one 2 MiB page, or 4 KiB pages
HUGE_SLOTS: Final = 4
SWEEP_BASE: Final = 0x80000000  # 4 KiB pages touched once each by sweeps
SWEEP_PAGES: Final = 4096
PROBE_BASE: Final = 0xC0000000  # fresh 4 KiB pages for the fault scenarios

SLPTE_PS: Final = 1 << 7  # page size bit of a 2 MiB leaf
SLPTE_SNP: Final = 1 << 11
SLPTE_TM: Final = 1 << 62
VTD_FR_WRITE: Final = 5
VTD_FR_READ: Final = 6

# Faults of the simulated QEMU (or of its trace) and the divergence each must give.
DROPPED_PAGE_INVALIDATION: Final = "dropped-page-invalidation"
DROPPED_DOMAIN_INVALIDATION: Final = "dropped-domain-invalidation"
DROPPED_GLOBAL_INVALIDATION: Final = "dropped-global-invalidation"
UNTRACED_INVALIDATION: Final = "untraced-invalidation"
HIT_FROM_REPLACED_ENTRY: Final = "hit-from-replaced-entry"
WRONG_GPA: Final = "wrong-gpa"
LOST_WALK_LINE: Final = "lost-walk-line"
FAULT_ON_CACHED_ENTRY: Final = "fault-on-cached-entry"
FAULTS: Final = (
    DROPPED_PAGE_INVALIDATION,
    DROPPED_DOMAIN_INVALIDATION,
    DROPPED_GLOBAL_INVALIDATION,
    UNTRACED_INVALIDATION,
    HIT_FROM_REPLACED_ENTRY,
    WRONG_GPA,
    LOST_WALK_LINE,
    FAULT_ON_CACHED_ENTRY,
)
GUARD_SAFE_FAULTS: Final = (
    DROPPED_PAGE_INVALIDATION,
    DROPPED_DOMAIN_INVALIDATION,
    DROPPED_GLOBAL_INVALIDATION,
    HIT_FROM_REPLACED_ENTRY,
    WRONG_GPA,
)
"""Faults whose expected divergence does not depend on the checker still holding
entries from before the probe (so it holds when the ``max_live_maps`` guard fires)."""

Draw = Callable[[st.SearchStrategy[Any]], Any]


def bdf(sid: int) -> str:
    """``dev %02x:%02x.%02x`` of ``vtd_dmar_translate``."""
    return f"{sid >> 8:02x}:{(sid >> 3) & 0x1F:02x}.{sid & 7:02x}"


def page_of(addr: int, level: int) -> int:
    return addr & ~(level_size(level) - 1)


def level_size(level: int) -> int:
    return PAGE_4K if level == 1 else PAGE_2M


def iotlb_gfn(addr: int, level: int) -> int:
    """``vtd_get_iotlb_gfn``."""
    return page_of(addr, level) >> 12


@dataclass(eq=False)
class Entry:
    """``VTDIOTLBEntry``."""

    sid: int
    gfn: int
    level: int
    domain: int
    slpte: int

    @property
    def page_mask(self) -> int:
        return ~(level_size(self.level) - 1)

    @property
    def start(self) -> int:
        return self.gfn << 12

    @property
    def gpa(self) -> int:
        return self.slpte & ((1 << 52) - 1) & ~0xFFF & self.page_mask

    @property
    def perm(self) -> int:
        return self.slpte & 3

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.sid, self.level, self.gfn)


@dataclass
class Expected:
    kind: str
    lineno: int
    sid: int | None = None
    domain: int | None = None
    iova: int | None = None
    expected: int | None = None
    observed: int | None = None


@dataclass
class Stream:
    """A generated trace: ``lines`` (QEMU 7.2 ``log`` backend text), what the
    checker must count, and for a faulty QEMU the first divergence it must report."""

    lines: list[str]
    fault: str | None
    expected: Expected | None
    peak_maps: int
    """Most maps the checker's models must hold at once (its ``max_live_maps``
    guard must not fire when that is the limit)."""
    counts: dict[str, int]
    """Checker ``Counts`` fields and the values they must have."""
    iotlb_resets: int
    """``vtd_iotlb_reset`` lines (IOTLB size limit reached)."""

    def text(self) -> str:
        return "\n".join(self.lines)


# --------------------------------------------------------------------------
# QEMU
# --------------------------------------------------------------------------


@dataclass
class _Access:
    sid: int
    tail: str  # the vtd_dmar_translate line still to print
    walk: Entry | None  # the entry this access walked and inserted
    expect_wrong: tuple[int, int] | None = None  # (expected, observed) for a faulty translate


class SimQemu:
    """QEMU 7.2's VT-d IOTLB and translate path; every trace line goes to ``lines``.

    ``iotlb_max`` is ``VTD_IOTLB_MAX_SIZE``.  The entries the checker's models
    hold are tracked too (``visible``: walked entries whose translate has been
    printed and that QEMU still holds), for :attr:`Stream.peak_maps`.
    """

    def __init__(self, guest: Guest, iotlb_max: int = VTD_IOTLB_MAX_SIZE) -> None:
        self.guest = guest
        self.iotlb_max = iotlb_max
        self.iotlb: dict[tuple[int, int, int], Entry] = {}
        self.lines: list[str] = []
        self.inflight: dict[int, _Access] = {}  # thread -> access waiting for its translate
        self.visible: set[int] = set()  # id() of entries in the checker's models
        self.peak = 0
        self.iotlb_resets = 0
        self.counts: dict[str, int] = dict.fromkeys(
            ("translations", "iotlb_updates", "iotlb_hits", "invalidations", "inv_pages",
             "inv_domain", "inv_global", "resets", "context_invalidations", "faults",
             "passthrough"), 0)
        self.dmar_enabled = True
        # Fault hooks (all off for a correct QEMU).
        self.keep: Entry | None = None  # survives the next invalidation that covers it
        self.trace_invalidations = True
        self.expected: Expected | None = None

    # ---- output -----------------------------------------------------------------

    def emit(self, line: str) -> int:
        self.lines.append(line)
        return len(self.lines)

    def _count(self, *names: str) -> None:
        for name in names:
            self.counts[name] += 1

    # ---- IOTLB ------------------------------------------------------------------

    def lookup(self, sid: int, addr: int) -> Entry | None:
        """``vtd_lookup_iotlb``: level 1, then level 2; the domain is not part of the key."""
        for level in (1, 2):
            entry = self.iotlb.get((sid, level, iotlb_gfn(addr, level)))
            if entry is not None:
                return entry
        return None

    def _remove(self, pred: Callable[[Entry], bool]) -> None:
        for key, entry in list(self.iotlb.items()):
            if pred(entry):
                if entry is self.keep:
                    continue  # the fault: QEMU keeps it
                del self.iotlb[key]
                self.visible.discard(id(entry))

    def _note_peak(self) -> None:
        self.peak = max(self.peak, len(self.visible))

    # ---- device accesses ----------------------------------------------------------

    def access(self, sid: int, addr: int, write: bool, thread: int = 0, *, defer: bool = False,
               wrong_gpa: bool = False) -> tuple[str, int]:
        """One DMA translation by ``sid`` of ``addr``.  Returns ``(what, line)``:
        ``hit``/``walk`` and the hit/update line, or ``fault`` and the fault line.
        With ``defer`` the translate stays in flight on ``thread``."""
        self.complete(thread)
        entry = self.lookup(sid, addr)
        if entry is not None:
            line = self.emit(f"vtd_iotlb_page_hit IOTLB page hit sid {sid:#x} iova {addr:#x} "
                             f"slpte {entry.slpte:#x} domain {entry.domain:#x}")
            self._count("iotlb_hits")
            self._start(thread, sid, addr, entry, None, defer, wrong_gpa)
            return "hit", line
        domain = self.guest.context[sid]
        leaf = self.guest.walk(domain, addr)
        need = 2 if write else 1
        if leaf is None or not (leaf[0] & need):
            line = self.emit(f"vtd_dmar_fault sid {sid:#x} fault "
                             f"{VTD_FR_WRITE if write else VTD_FR_READ} addr {addr:#x} write {int(write)}")
            self._count("faults")
            return "fault", line
        slpte, level = leaf
        line = self.emit(f"vtd_iotlb_page_update IOTLB page update sid {sid:#x} iova {addr:#x} "
                         f"slpte {slpte:#x} domain {domain:#x}")
        self._count("iotlb_updates")
        if len(self.iotlb) >= self.iotlb_max:
            self.emit("vtd_iotlb_reset IOTLB reset (reason: iotlb exceeds size limit)")
            self._count("resets")
            self.iotlb_resets += 1
            self.iotlb.clear()
            self.visible.clear()
        walked = Entry(sid, iotlb_gfn(addr, level), level, domain, slpte)
        self.iotlb[walked.key] = walked
        self._start(thread, sid, addr, walked, walked, defer, wrong_gpa)
        return "walk", line

    def _start(self, thread: int, sid: int, addr: int, entry: Entry, walk: Entry | None,
               defer: bool, wrong_gpa: bool) -> None:
        iova = addr & entry.page_mask
        gpa = entry.gpa
        wrong = None
        if wrong_gpa:
            bad = gpa ^ (level_size(entry.level) << 3)
            wrong = (gpa, bad)
            gpa = bad
        tail = (f"vtd_dmar_translate dev {bdf(sid)} iova {iova:#x} -> gpa {gpa:#x} "
                f"mask {level_size(entry.level) - 1:#x}")
        self.inflight[thread] = _Access(sid, tail, walk, wrong)
        if not defer:
            self.complete(thread)

    def complete(self, thread: int) -> int | None:
        """Print ``thread``'s pending translate, if any; returns its line."""
        acc = self.inflight.pop(thread, None)
        if acc is None:
            return None
        line = self.emit(acc.tail)
        self._count("translations")
        if acc.walk is not None and self.iotlb.get(acc.walk.key) is acc.walk:
            self.visible.add(id(acc.walk))
            self._note_peak()
        if acc.expect_wrong is not None and self.expected is None:
            expected, observed = acc.expect_wrong
            self.expected = Expected("wrong-translation", line, sid=acc.sid,
                                     expected=expected, observed=observed)
        return line

    def complete_all(self, order: list[int] | None = None) -> None:
        for thread in order if order is not None else sorted(self.inflight):
            self.complete(thread)
        for thread in sorted(self.inflight):
            self.complete(thread)

    # ---- invalidations --------------------------------------------------------------

    def invalidate_pages(self, domain: int, addr: int, am: int) -> int | None:
        """A page-selective IOTLB invalidation (``vtd_iotlb_page_invalidate``)."""
        line = None
        if self.trace_invalidations:
            line = self.emit(f"vtd_inv_desc_iotlb_pages iotlb invalidate domain {domain:#x} "
                             f"addr {addr:#x} mask {am:#x}")
            self._count("invalidations", "inv_pages")
        mask = ~((1 << am) - 1)
        gfn = (addr >> 12) & mask

        def hit(e: Entry) -> bool:
            gfn_tlb = (addr & e.page_mask) >> 12
            return e.domain == domain and ((e.gfn & mask) == gfn or e.gfn == gfn_tlb)

        self._remove(hit)
        return line

    def invalidate_domain(self, domain: int) -> int | None:
        line = None
        if self.trace_invalidations:
            line = self.emit(f"vtd_inv_desc_iotlb_domain iotlb invalidate whole domain {domain:#x}")
            self._count("invalidations", "inv_domain")
        self._remove(lambda e: e.domain == domain)
        return line

    def invalidate_global(self) -> int | None:
        line = None
        if self.trace_invalidations:
            line = self.emit("vtd_inv_desc_iotlb_global iotlb invalidate global")
            self._count("invalidations", "inv_global")
        self._remove(lambda e: True)
        return line

    def reset_caches(self) -> int:
        """``vtd_reset_caches`` (root table pointer, translation enable): context cache and IOTLB."""
        line = self.emit("vtd_context_cache_reset ")
        self._count("resets")
        self._remove(lambda e: True)
        return line

    def after_cc_global(self) -> bool:
        """Is the last vtd_* line ``vtd_inv_desc_cc_global``?"""
        for line in reversed(self.lines):
            if line.startswith("vtd_"):
                return line.startswith("vtd_inv_desc_cc_global")
        return False

    def set_translation(self, enable: bool) -> None:
        """``vtd_handle_gcmd_te``: trace, then ``vtd_reset_caches``."""
        self.complete_all()
        self.emit(f"vtd_dmar_enable enable {int(enable)}")
        self.reset_caches()
        self.dmar_enabled = enable

    def access_passthrough(self, sid: int, addr: int) -> int:
        """``vtd_iommu_translate`` with DMAR disabled: 4 KiB identity, no IOTLB."""
        assert not self.dmar_enabled
        page = addr & ~(PAGE_4K - 1)
        self._count("translations", "passthrough")
        return self.emit(f"vtd_dmar_translate dev {bdf(sid)} iova {page:#x} -> gpa {page:#x} "
                         f"mask {PAGE_4K - 1:#x}")

    def context_global_invalidate(self, wrap: bool, noise: int = 0) -> None:
        """``vtd_context_global_invalidate``: context cache only; ``wrap``: the
        generation counter wrapped (``vtd_reset_context_cache_locked``)."""
        self.emit("vtd_inv_desc_cc_global context invalidate globally")
        self._count("context_invalidations")
        for i in range(noise):  # other devices' lines may land in between
            self.emit(f"pci_nvme_rw_cb cid {i} blk 'drive0'")
        if wrap:
            self.emit("vtd_context_cache_reset ")


# --------------------------------------------------------------------------
# The guest
# --------------------------------------------------------------------------


class Guest:
    """Per-domain page tables and the sid -> domain context of the guest kernel."""

    def __init__(self) -> None:
        self.pt4k: dict[int, dict[int, tuple[int, int, int]]] = {d: {} for d in DOMAINS}
        self.pt2m: dict[int, dict[int, tuple[int, int, int]]] = {d: {} for d in DOMAINS}
        self.context: dict[int, int] = {sid: DOMAINS[i % len(DOMAINS)] for i, sid in enumerate(SIDS)}
        self._next_gpa = 0x10000000

    def alloc(self, size: int) -> int:
        """A guest-physical block never handed out before (so slptes never repeat)."""
        gpa = (self._next_gpa + size - 1) & ~(size - 1)
        self._next_gpa = gpa + size
        return gpa

    def walk(self, domain: int, addr: int) -> tuple[int, int] | None:
        """``(slpte, level)`` of the leaf mapping ``addr``, or None."""
        huge = self.pt2m[domain].get(addr >> 21)
        if huge is not None:
            gpa, perm, extra = huge
            return gpa | perm | SLPTE_PS | extra, 2
        small = self.pt4k[domain].get(addr >> 12)
        if small is not None:
            gpa, perm, extra = small
            return gpa | perm | extra, 1
        return None

    def mapped(self, domain: int) -> list[tuple[int, int, int]]:
        """``(start, size, perm)`` of every leaf of ``domain`` (sweep pages left out)."""
        out = [(p << 12, PAGE_4K, v[1]) for p, v in self.pt4k[domain].items()
               if not SWEEP_BASE <= p << 12 < SWEEP_BASE + SWEEP_PAGES * PAGE_4K]
        out += [(s << 21, PAGE_2M, v[1]) for s, v in self.pt2m[domain].items()]
        return sorted(out)


# --------------------------------------------------------------------------
# Building a stream
# --------------------------------------------------------------------------

_PERMS = st.sampled_from([3, 3, 1, 2])
_EXTRA = st.sampled_from([0, 0, 0, SLPTE_SNP, SLPTE_TM])
_OPS = st.sampled_from([
    *["access"] * 10, "complete", "complete",
    "map4k", "map4k", "map4k", "map2m", "unmap4k", "unmap2m", "remap4k",
    "invalidate", "move", "cc_global", "reset_caches", "sweep",
])


class _Builder:
    def __init__(self, draw: Draw, iotlb_max: int) -> None:
        self.draw = draw
        self.guest = Guest()
        self.qemu = SimQemu(self.guest, iotlb_max)
        self.sweep_next: dict[int, int] = dict.fromkeys(DOMAINS, 0)
        self.probe_next = 0
        self.guard_safe = False  # only probes whose outcome needs no entry from before
        self.recent: list[tuple[int, int]] = []  # (sid, addr) of the last accesses

    # ---- guest operations ----------------------------------------------------------

    def _invalidate_range(self, domain: int, start: int, size: int, style: str | None = None) -> None:
        """How the guest flushes ``[start, start + size)`` of ``domain`` after changing it."""
        draw, q = self.draw, self.qemu
        style = style or draw(st.sampled_from(["page", "page", "page", "domain", "global"]))
        if style == "domain":
            q.invalidate_domain(domain)
        elif style == "global":
            q.invalidate_global()
        else:
            pages = size >> 12
            am_min = pages.bit_length() - 1
            am = draw(st.integers(am_min, am_min + 2))
            block = start & ~((PAGE_4K << am) - 1)
            # Linux passes the block's first address; QEMU masks whatever is given.
            addr = block + draw(st.sampled_from([0, 0, 0, start - block]))
            q.invalidate_pages(domain, addr, am)

    def map4k(self, domain: int, page: int, perm: int, *, invalidate: bool) -> None:
        slot = page >> 9
        if slot in self.guest.pt2m[domain]:  # a 2 MiB page is there: split it (flushed)
            del self.guest.pt2m[domain][slot]
            self._invalidate_range(domain, slot << 21, PAGE_2M)
        self.guest.pt4k[domain][page] = (self.guest.alloc(PAGE_4K), perm, self.draw(_EXTRA))
        if invalidate:  # caching mode: the guest also flushes what it maps
            self._invalidate_range(domain, page << 12, PAGE_4K)

    def map2m(self, domain: int, slot: int, perm: int) -> None:
        pt4k = self.guest.pt4k[domain]
        for page in [p for p in pt4k if p >> 9 == slot]:
            del pt4k[page]
        self.guest.pt2m[domain][slot] = (self.guest.alloc(PAGE_2M), perm, self.draw(_EXTRA))
        # Replacing a page table by a superpage is always flushed (so QEMU never
        # holds a 4 KiB and a 2 MiB entry of one domain for the same address).
        self._invalidate_range(domain, slot << 21, PAGE_2M, self.draw(st.sampled_from(["page", "domain"])))

    def _addr(self, domain: int) -> int:
        """An address to access: mostly mapped in ``domain``, sometimes not."""
        draw = self.draw
        mapped = self.guest.mapped(domain)
        if mapped and draw(st.integers(0, 9)) > 0:
            start, size, _ = draw(st.sampled_from(mapped))
        else:
            start, size = draw(st.sampled_from([
                (SMALL_BASE + draw(st.integers(0, SMALL_PAGES - 1)) * PAGE_4K, PAGE_4K),
                (HUGE_BASE + draw(st.integers(0, HUGE_SLOTS - 1)) * PAGE_2M, PAGE_2M),
            ]))
        if size == PAGE_2M:
            return start + draw(st.integers(0, 511)) * PAGE_4K + draw(st.integers(0, 63)) * 64
        return start + draw(st.integers(0, 63)) * 64

    def step(self) -> None:
        draw, g, q = self.draw, self.guest, self.qemu
        op = draw(_OPS)
        if op == "access":
            if self.recent and draw(st.booleans()):  # the device reuses a buffer
                sid, addr = draw(st.sampled_from(self.recent))
                addr = (addr & ~(PAGE_4K - 1)) + draw(st.integers(0, 63)) * 64
            else:
                sid = draw(st.sampled_from(SIDS))
                addr = self._addr(g.context[sid])
            self.recent = [*self.recent[-7:], (sid, addr)]
            leaf = g.walk(g.context[sid], addr)
            perm = leaf[0] & 3 if leaf is not None else 3
            # Mostly in a direction the buffer allows; sometimes not (a fault on a miss).
            write = draw(st.booleans()) if perm == 3 or not draw(st.integers(0, 4)) else perm == 2
            q.access(sid, addr, write, draw(st.integers(0, 1)), defer=draw(st.booleans()))
        elif op == "complete":
            q.complete(draw(st.integers(0, 1)))
        elif op == "map4k":
            domain = draw(st.sampled_from(DOMAINS))
            base = draw(st.sampled_from([SMALL_BASE >> 12, HUGE_BASE >> 12]))
            span = SMALL_PAGES if base == SMALL_BASE >> 12 else HUGE_SLOTS * 512
            page = base + draw(st.integers(0, span - 1))
            if page in g.pt4k[domain]:
                return
            self.map4k(domain, page, draw(_PERMS), invalidate=draw(st.booleans()))
        elif op == "map2m":
            domain = draw(st.sampled_from(DOMAINS))
            slot = (HUGE_BASE >> 21) + draw(st.integers(0, HUGE_SLOTS - 1))
            if slot not in g.pt2m[domain]:
                self.map2m(domain, slot, draw(_PERMS))
        elif op in ("unmap4k", "remap4k"):
            domain = draw(st.sampled_from(DOMAINS))
            pages = sorted(g.pt4k[domain])
            if not pages:
                return
            page = draw(st.sampled_from(pages))
            del g.pt4k[domain][page]
            if op == "remap4k":  # same page, new frame (and maybe permission)
                g.pt4k[domain][page] = (g.alloc(PAGE_4K), draw(_PERMS), draw(_EXTRA))
            if draw(st.integers(0, 5)):  # a sloppy guest may forget to flush
                self._invalidate_range(domain, page << 12, PAGE_4K)
        elif op == "unmap2m":
            domain = draw(st.sampled_from(DOMAINS))
            slots = sorted(g.pt2m[domain])
            if not slots:
                return
            slot = draw(st.sampled_from(slots))
            del g.pt2m[domain][slot]
            if draw(st.integers(0, 5)):
                self._invalidate_range(domain, slot << 21, PAGE_2M)
        elif op == "invalidate":
            domain = draw(st.sampled_from(DOMAINS))
            style = draw(st.sampled_from(["page", "page", "huge", "domain", "global"]))
            if style == "huge":
                slot = (HUGE_BASE >> 21) + draw(st.integers(0, HUGE_SLOTS - 1))
                self._invalidate_range(domain, (slot << 21) + draw(st.integers(0, 511)) * PAGE_4K,
                                       PAGE_4K, "page")
            elif style == "page":
                self._invalidate_range(domain, SMALL_BASE + draw(st.integers(0, SMALL_PAGES - 1))
                                       * PAGE_4K, PAGE_4K, "page")
            else:
                self._invalidate_range(domain, 0, 0, style)
        elif op == "move":
            sid = draw(st.sampled_from(SIDS))
            new = draw(st.sampled_from(DOMAINS))
            old = g.context[sid]
            g.context[sid] = new
            if new != old and draw(st.booleans()):  # Linux: DSI flush of the old domain
                q.invalidate_domain(old)
        elif op == "cc_global":
            q.context_global_invalidate(wrap=draw(st.booleans()), noise=draw(st.integers(0, 1)))
        elif op == "reset_caches":
            if draw(st.booleans()):  # translation disabled for a while: identity, no IOTLB
                q.set_translation(False)
                for _ in range(draw(st.integers(0, 2))):
                    sid = draw(st.sampled_from(SIDS))
                    q.access_passthrough(sid, self._addr(g.context[sid]))
                q.set_translation(True)
            elif not q.after_cc_global():
                # Root table pointer set.  (Right after vtd_inv_desc_cc_global the same
                # line would read as the context generation wrap: the checker takes it so.)
                q.reset_caches()
        elif op == "sweep":
            n = draw(st.one_of(st.integers(1, 64), st.integers(1, 64),
                               st.integers(VTD_IOTLB_MAX_SIZE - 100, VTD_IOTLB_MAX_SIZE + 50)))
            self.sweep(draw(st.sampled_from(SIDS)), n)

    def sweep(self, sid: int, n: int) -> None:
        """Map (if needed) and touch ``n`` more pages of the sweep region: fills the IOTLB."""
        domain = self.guest.context[sid]
        start = self.sweep_next[domain]
        pt = self.guest.pt4k[domain]
        for i in range(start, start + n):
            page = (SWEEP_BASE >> 12) + i % SWEEP_PAGES
            if page not in pt:
                pt[page] = (self.guest.alloc(PAGE_4K), 3, 0)
            self.qemu.access(sid, (page << 12) + 0x80, write=bool(i & 1))
        self.sweep_next[domain] = (start + n) % SWEEP_PAGES

    # ---- fault scenarios --------------------------------------------------------------

    def fresh_page(self, domain: int, perm: int = 3) -> int:
        """Map a never-used 4 KiB page in ``domain`` (no flush needed); its address."""
        page = (PROBE_BASE >> 12) + self.probe_next
        self.probe_next += 1
        self.guest.pt4k[domain][page] = (self.guest.alloc(PAGE_4K), perm, 0)
        return page << 12

    def cached_entry(self, ok: Callable[[Entry], bool] = lambda e: True) -> Entry:
        """An entry QEMU holds (the checker having seen its translate): an existing
        one or one made now by walking a fresh page."""
        q = self.qemu
        candidates = [e for e in q.iotlb.values() if id(e) in q.visible and ok(e)]
        if candidates and self.draw(st.integers(0, 3)):
            return self.draw(st.sampled_from(candidates))
        sid = self.draw(st.sampled_from(SIDS))
        addr = self.fresh_page(self.guest.context[sid]) + 0x40
        q.access(sid, addr, write=self.draw(st.booleans()))
        entry = q.lookup(sid, addr)
        assert entry is not None
        return entry

    def probe_addr(self, entry: Entry, free: bool = False) -> int | None:
        """An address inside ``entry``'s page that QEMU's lookup for its sid
        answers with ``entry`` (or, with ``free``, with nothing)."""
        q = self.qemu
        pages = [0] if entry.level == 1 else list(range(512))
        first = self.draw(st.integers(0, len(pages) - 1))
        for i in pages[first:] + pages[:first]:
            addr = entry.start + i * PAGE_4K + 0x18
            found = q.lookup(entry.sid, addr)
            if (found is None) if free else (found is entry):
                return addr
        return None

    def pending_walk(self, sid: int) -> None:
        """Thread 1 walks a fresh page for ``sid``; its translate stays in flight."""
        addr = self.fresh_page(self.guest.context[sid]) + 0x100
        self.qemu.access(sid, addr, write=False, thread=1, defer=True)

    def scenario(self, fault: str, pending: bool | None, cross_domain: bool | None = None) -> None:
        draw, g, q = self.draw, self.guest, self.qemu
        q.complete_all()
        if pending is None:
            pending = draw(st.booleans())
        if fault in (DROPPED_PAGE_INVALIDATION, DROPPED_DOMAIN_INVALIDATION,
                     DROPPED_GLOBAL_INVALIDATION):
            entry = self.cached_entry()
            q.keep = entry  # QEMU traces the invalidation but keeps this entry
            if fault == DROPPED_PAGE_INVALIDATION:
                size = level_size(entry.level)
                at = entry.start if entry.level == 1 else entry.start + draw(st.integers(0, 511)) * PAGE_4K
                self._invalidate_range(entry.domain, at, PAGE_4K if draw(st.booleans()) else size, "page")
            elif fault == DROPPED_DOMAIN_INVALIDATION:
                q.invalidate_domain(entry.domain)
            elif draw(st.booleans()):
                q.invalidate_global()
            else:
                q.reset_caches()
            q.keep = None
            addr = self.probe_addr(entry)
            if addr is None:  # level-1 entries of other domains cover all of it
                return
            if pending:
                self.pending_walk(entry.sid)
            what, line = q.access(entry.sid, addr, draw(st.booleans()))
            assert what == "hit"
            q.expected = Expected("hit-after-invalidation", line, sid=entry.sid,
                                  domain=entry.domain, iova=addr)
        elif fault == UNTRACED_INVALIDATION:
            entry = self.cached_entry()
            sid, domain = entry.sid, entry.domain
            cross = draw(st.booleans()) if cross_domain is None else cross_domain
            if cross:  # the sid moved to another domain, its old entries not flushed
                other = draw(st.sampled_from([d for d in DOMAINS if d != domain]))
                g.context[sid] = other
            q.trace_invalidations = False  # the invalidation happens; its line is lost
            self._invalidate_range(domain, entry.start, level_size(entry.level), "page")
            q.trace_invalidations = True
            addr = self.probe_addr(entry, free=True)
            if addr is None:
                return
            walk_domain = g.context[sid]
            leaf = g.walk(walk_domain, addr)
            same = leaf is not None and leaf[0] == entry.slpte and not cross and draw(st.booleans())
            if not same:  # the guest remapped the page (a fresh frame) before it was reused
                page = addr >> 12
                if leaf is not None and leaf[1] == 2:
                    del g.pt2m[walk_domain][addr >> 21]
                g.pt4k[walk_domain][page] = (g.alloc(PAGE_4K), 3, 0)
            if pending:
                self.pending_walk(sid)
            what, line = q.access(sid, addr, write=False)
            assert what == "walk"
            q.expected = Expected("unexpected-miss" if same else "stale-entry", line, sid=sid,
                                  domain=domain, iova=addr)
        elif fault == HIT_FROM_REPLACED_ENTRY:
            entry = self.cached_entry(lambda e: g.context[e.sid] == e.domain)
            sid, domain = entry.sid, entry.domain
            if g.context[sid] != domain:
                return
            # The guest remaps the page to a fresh frame (same size) and flushes it.
            slot = entry.gfn >> 9
            if entry.level == 2:
                for page in [p for p in g.pt4k[domain] if p >> 9 == slot]:
                    del g.pt4k[domain][page]
                g.pt2m[domain][slot] = (g.alloc(PAGE_2M), 3, 0)
            else:
                g.pt2m[domain].pop(slot, None)
                g.pt4k[domain][entry.gfn] = (g.alloc(PAGE_4K), 3, 0)
            self._invalidate_range(domain, entry.start, level_size(entry.level))
            addr = self.probe_addr(entry, free=True)
            if addr is None:
                return
            what, _ = q.access(sid, addr, write=True)
            assert what == "walk"
            fresh = q.lookup(sid, addr)
            assert fresh is not None
            if pending:
                self.pending_walk(sid)
            # QEMU answers the next lookup with the entry the walk replaced.
            line = q.emit(f"vtd_iotlb_page_hit IOTLB page hit sid {sid:#x} iova {addr:#x} "
                          f"slpte {entry.slpte:#x} domain {domain:#x}")
            q._count("iotlb_hits")
            q.inflight[0] = _Access(sid, f"vtd_dmar_translate dev {bdf(sid)} iova "
                                    f"{addr & entry.page_mask:#x} -> gpa {entry.gpa:#x} "
                                    f"mask {level_size(entry.level) - 1:#x}", None)
            q.complete(0)
            q.expected = Expected("hit-mismatch", line, sid=sid, domain=domain, iova=addr,
                                  expected=fresh.gpa, observed=entry.gpa)
        elif fault == WRONG_GPA:
            if pending:
                self.pending_walk(draw(st.sampled_from(SIDS)))
            if self.guard_safe or draw(st.booleans()):  # through a walk (guard-safe)
                sid = draw(st.sampled_from(SIDS))
                addr = self.fresh_page(g.context[sid]) + 0x200
            else:  # through a hit on an entry the checker holds
                entry = self.cached_entry()
                sid = entry.sid
                maybe = self.probe_addr(entry)
                if maybe is None:
                    return
                addr = maybe
            q.access(sid, addr, draw(st.booleans()), wrong_gpa=True)
        elif fault == LOST_WALK_LINE:
            sid = draw(st.sampled_from(SIDS))
            addr = self.fresh_page(g.context[sid]) + 0x300
            before = len(q.lines)
            what, line = q.access(sid, addr, write=False)
            assert what == "walk"
            del q.lines[line - 1]  # the update line is lost
            q.counts["iotlb_updates"] -= 1
            assert len(q.lines) == before + 1
            q.expected = Expected("translation-without-entry", len(q.lines), sid=sid, iova=addr)
        elif fault == FAULT_ON_CACHED_ENTRY:
            entry = self.cached_entry()
            addr = self.probe_addr(entry)
            if addr is None:
                return
            write = bool(entry.perm & 2) if entry.perm != 3 else draw(st.booleans())
            line = q.emit(f"vtd_dmar_fault sid {entry.sid:#x} fault "
                          f"{VTD_FR_WRITE if write else VTD_FR_READ} addr {addr:#x} write {int(write)}")
            q._count("faults")
            q.expected = Expected("fault-on-live-entry", line, sid=entry.sid, domain=entry.domain,
                                  iova=addr)
        else:
            raise ValueError(f"unknown fault {fault!r}")
        q.complete_all()


def build_stream(draw: Draw, *, fault: str | None = None, steps: int | None = None,
                 max_steps: int = 40, iotlb_max: int = VTD_IOTLB_MAX_SIZE,
                 pending: bool | None = None, cross_domain: bool | None = None,
                 guard_safe: bool = False) -> Stream:
    """Generate one stream with ``draw`` (e.g. Hypothesis' ``data.draw``).

    ``steps`` guest/device operations (drawn up to ``max_steps`` if None), all
    translates printed, then, with a ``fault``, its scenario and probe.
    ``pending``: force (True) or forbid (False) a walk of the probing sid
    waiting for its translate when the fault shows.  ``cross_domain``: for
    :data:`UNTRACED_INVALIDATION`, the sid has moved to another domain (its
    old entries not flushed) before the probe walks.  ``guard_safe``: with
    :data:`GUARD_SAFE_FAULTS`, a probe whose divergence does not depend on
    the checker still holding entries from before it.
    """
    b = _Builder(draw, iotlb_max)
    b.guard_safe = guard_safe
    q = b.qemu
    q.emit("vtd_dmar_enable enable 1")
    q.reset_caches()
    for sid in SIDS:
        q.emit(f"vtd_switch_address_space Device {bdf(sid)[:5]}.{sid & 7:x} switching address "
               "space (iommu enabled=1)")
    for domain in DOMAINS:  # the buffers the drivers start with
        for page in draw(st.sets(st.integers(0, SMALL_PAGES - 1), max_size=4)):
            b.map4k(domain, (SMALL_BASE >> 12) + page, draw(_PERMS), invalidate=draw(st.booleans()))
        if draw(st.booleans()):
            b.map2m(domain, (HUGE_BASE >> 21) + draw(st.integers(0, HUGE_SLOTS - 1)), draw(_PERMS))
    if steps is None:
        steps = draw(st.integers(min(10, max_steps), max_steps))
    for _ in range(steps):
        b.step()
    order = draw(st.permutations(sorted(q.inflight)))
    q.complete_all(list(order))
    if fault is not None:
        b.scenario(fault, pending, cross_domain)
    counts = dict(q.counts)
    counts.update(walks_without_translate=0, unknown_lines=0, malformed_lines=0)
    return Stream(lines=q.lines, fault=fault, expected=q.expected, peak_maps=q.peak,
                  counts=counts, iotlb_resets=q.iotlb_resets)


@st.composite
def vtd_streams(draw: Draw, **options: Any) -> Stream:
    """Hypothesis strategy of :class:`Stream`; ``options`` go to :func:`build_stream`."""
    return build_stream(draw, **options)
