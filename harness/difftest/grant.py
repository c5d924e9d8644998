"""The Xen grant-table target of ``difftest``: dom0 grants its own pages to itself
(/dev/xen/gntalloc), maps and copies those grants (/dev/xen/gntdev), and the
sequences run against :mod:`harness.models.grant` (one dom0 :class:`GrantTable`,
grant table version 1) plus the gntalloc/gntdev bookkeeping this module models.

The machine is :func:`harness.vm.spec.xen_machine` (Xen 4.17, the harness's kernel
as PV dom0, one vCPU). The system side is the guest agent's ``xen.*`` ops
(guest_agent/xen.py) and ``mem.read``/``mem.write``/``mem.map``.

Steps (``op``; every step also has ``tick``, see below). ``group`` k is the k-th
``grant`` step of the sequence (one gntalloc ALLOC), ``map`` k the k-th ``map``
step (one gntdev MAP_GRANT_REF + mmap), ``amap`` k the k-th ``amap`` step (one
gntalloc mmap); pages are 4 KiB, offsets and lengths bytes:

==========  ====================================================================
``grant``   IOCTL_GNTALLOC_ALLOC_GREF of ``count`` pages to ``domid`` (0, or 1: a
            domain that does not exist, so dom0's maps of it fail), ``writable``
            -> ``errno``, ``refs`` (the Linux free list's head: LIFO reuse)
``map``     IOCTL_GNTDEV_MAP_GRANT_REF of ``refs`` (granted by d0), then mmap
            (PROT_WRITE if ``writable``) -> ``gntdev_index`` (bytes; first fit in
            the fd's list), ``errno`` (the mmap's: EINVAL if Xen refused a page)
``unmap``   munmap of map k's mapping and IOCTL_GNTDEV_UNMAP_GRANT_REF (``ioctl_first``:
            the ioctl before the munmap) -> ``errno``, ``unmap_errno``
``end``     IOCTL_GNTALLOC_DEALLOC_GREF of ``count`` pages from page ``page`` of
            ``group`` (a range may run into the next group's pages) -> ``errno``.
            A page no gntalloc mapping holds is ended now (``gnttab_end_foreign_access``:
            freed at once, or deferred while mapped)
``amap``    mmap of ``count`` gntalloc pages from (``group``, ``page``) -> ``errno``
            (ENOENT: not contiguous pages of the file); holds the pages' grants
``aunmap``  munmap of amap k: a page already deallocated is ended here
``copy``    IOCTL_GNTDEV_GRANT_COPY of ``segments`` (``to_ref``: user -> grant, else
            grant -> user; ``ref``, ``domid`` of the grant side, ``offset``, ``len``;
            the user side is the sequence's scratch buffer at the same offset) ->
            ``errno``, ``status`` (GNTST per segment), ``scratch_sha`` (sha256 of
            the copy destination page after grant -> user copies)
``data``    through two views (a gntdev mapping's page or a gntalloc mapping's
            page): sha256 of the ``read`` view, ``mem.write`` of pattern ``seed``
            (4 KiB) into the ``write`` view, sha256 of the ``read`` view again ->
            ``read_before``, ``read_after`` (the model keeps every frame's bytes:
            gntalloc pages start zeroed, copies and writes change them)
``state``   Xen's own entries (``xen.grant_state``: debug key 'g') -> ``entries``,
            one per pinned ref of d0: ``ref``, ``active_domid``, ``pin``,
            ``shared_domid``, ``flags`` (against ``GrantTable.usage_lines``)
``settle``  nothing: waits for the deferred-end timer (see below)
==========  ====================================================================

How a gntdev mmap maps to the model: in a PV dom0 (``use_ptemod``) gntdev maps
every page twice, the user PTE (``map_ops``, GNTMAP_host_map|application_map|
contains_pte) and the kernel's linear address (``kmap_ops``, issued as a second
GNTTABOP_map_grant_ref by arch/x86/xen/p2m.c ``set_foreign_p2m_mapping``), so one
mmap page is two :meth:`GrantTable.map` calls (all user maps first, then all
kernel maps); any failure gives EINVAL and every successful map of the mmap is
unmapped again. Measured in dom0 (Xen 4.17, Linux 6.12): ``pin`` 0x2 for one
writable mmap of a ref, 0x200 for a read-only one; flags 0x19 and 0x0d. The unmap
happens at munmap (MMU notifier), whatever the order of munmap and UNMAP_GRANT_REF.

gntalloc (drivers/xen/gntalloc.c): each page (gref) has a use count, 1 for the
file's list plus 1 per gntalloc mmap; DEALLOC takes pages out of the file's list
(``find_grefs``: the range must be contiguous in the file, else EINVAL) and drops
their count; a page whose count reaches 0 is deleted (``__del_gref``, which ends
the grant) in the order of the global list (allocation order), at DEALLOC
(``do_cleanup``) or at the munmap of its last gntalloc mapping.
gntdev (drivers/xen/gntdev.c): ``gntdev_add_map`` gives a new map the first index
after which it fits before the next map with at least one page to spare
(``index + count < next->index``); a map that failed to mmap keeps its index until
UNMAP_GRANT_REF (the driver leaves it there until the teardown);
``gntdev_grant_copy_seg`` rejects a segment crossing its grant page with EINVAL
before any hypercall: the segments queued before it report GNTST_okay but were
never copied, it and the later ones keep their initial status (the agent's 1); a
segment of length 0 is never issued (status 0).

The deferred end. ``gnttab_end_foreign_access`` of a ref still mapped queues it;
Linux's timer (``gnttab_handle_deferred``, 1 Hz while the list is not empty,
re-armed ``jiffies + HZ`` from within itself) frees those no longer mapped. The
guest's own evidence of when it ran is ``xen.deferred_ticks`` (hit count of a
kprobe on it), read after every step. A step's ``tick`` True means: the executor
waits for the next run of the timer before the step (polling, at most
:data:`TICK_TIMEOUT` s) and the model applies :meth:`GrantTable.handle_deferred`
once before it. The target sets ``tick`` on a ``settle`` step while the model has
deferred refs, and on any step while a tick would change the model (a deferred ref
no longer mapped) or that would make one so (the munmap of a deferred ref's last
mapping) -- except the step right after a waited one: the timer just ran and runs
again only a second later, so those two steps (the *window*) run before it with
certainty; that is how a map right after the last unmap sees version 1's entry
still valid before the deferred end completes. Observation fields of this timing:
``tick`` ("ran"/"idle": did the timer run within the wait), ``quiet`` (window
steps: the timer did not run again up to the end of the step) and ``timer``
("idle" when the model has no deferred ref before and after the step, which the
kernel must confirm by no run of its timer). A tick seen during a step outside a
window is harmless by construction (a tick then changes nothing in the model):
counted as "ambiguous ticks". A window the timer broke into (only a stall of the
guest of about a second can do that) makes the executor run the sequence again
("tick retries"). So every sequence needs :class:`GrantExecutor`
(``GrantTarget.agent_executor``), not the engine's AgentExecutor.

Every sequence starts from the same state: the executor allocates
:data:`CANON_REFS` refs, checks they are refs 8.. 8 + CANON_REFS - 1 (else it
waits for the timer to free a ref the previous sequence left deferred) and frees
them one by one in descending order, so the Linux free list's head is 8, 9, ...
as in a fresh :class:`GrantTable`; Xen must show no pinned dom0 entry. The
teardown unmaps every mapping and deallocates every page.

Not observable here, so two mutants of harness/models/grant_mutants.py cannot
diverge on this target: maptrack handles never leave the kernel
(``grant-maptrack-lifo``), and with version 1 a pinned entry's flags are never
cleared (an end of a mapped ref leaves GTF_permit_access: ``grant-flags-rechecked-
when-pinned`` predicts the same as the model; it needs version 2's end).

Semantics: drivers/xen/grant-table.c, gntalloc.c, gntdev.c, arch/x86/xen/p2m.c of
Linux 6.12 and xen/common/grant_table.c of Xen 4.17.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st

from harness.difftest.engine import (
    AgentExecutor,
    Call,
    DifftestError,
    Observation,
    Pending,
    Planned,
    Probe,
    Step,
    SystemStateError,
    Target,
)
from harness.difftest.engine import format_value as default_format
from harness.models.grant import (
    GNTST_bad_domain,
    GNTST_okay,
    GrantError,
    GrantTable,
)
from harness.models.grant_mutants import MUTANTS

if TYPE_CHECKING:
    from harness.vm.agent import AgentChannel
    from harness.vm.spec import MachineSpec

PAGE = 4096
DOM0 = 0
OTHER_DOMID = 1
"""A domain that does not exist: dom0 can grant to it, but its maps of that grant fail."""
VERSION = 1
"""The grant table version Linux picks in this dom0 ("Grant tables using version 1 layout")."""
NR_ENTRIES = 512
"""Xen's size of dom0's table: one v1 grant frame (checked at every sequence start)."""
NR_RESERVED = 8
CANON_REFS = 16
"""Refs allocated and freed in order at every sequence start (a sequence never has more in use)."""
MAX_REFS = 10
"""Refs in use (granted or deferred) at most in a sequence: few refs keep Xen's dump short."""
MAX_MAPS = 4
MAX_AMAPS = 3
BAD_REF = NR_ENTRIES + 0x80
"""A ref outside dom0's table (GNTST_bad_gntref)."""
FREE_PER_ITERATION = 10
TICK_TIMEOUT = 2.5
"""Seconds the executor waits for the deferred-end timer (it runs every second while needed)."""
POLL_SECONDS = 0.02
COPY_SEED = 0x6772616E74
"""Pattern seed of the scratch buffer's source page (the user side of user -> grant copies)."""
SCRATCH_PAGES = 3
"""Scratch buffer: page 0 the copy source, page 1 the copy destination, page 2 spare."""
GFN_BASE = 0x1000
COPY_NOT_REACHED = 1
"""The status the agent puts in every copy segment before the ioctl (guest_agent.xen)."""
NO_INDEX = 1 << 40
"""A file offset no gntalloc/gntdev object has (stands for an object whose creation failed)."""
GNTST_NAMES = {0: "okay", -1: "general_error", -2: "bad_domain", -3: "bad_gntref", -4: "bad_handle",
               -8: "permission_denied", -10: "bad_copy_arg", -13: "no_space", 1: "not reached"}


def pattern_bytes(seed: int, length: int) -> bytes:
    """The bytes of the guest agent's ``mem.write(pattern=seed, length=n)``
    (guest_agent.mem.pattern_bytes: sha256 of (seed, 16-byte block number), 16 bytes
    a block)."""
    out = bytearray()
    block = 0
    while len(out) < length:
        out += hashlib.sha256(struct.pack("<QQ", seed, block)).digest()[:16]
        block += 1
    return bytes(out[:length])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gntdev_first_fit(records: Sequence[tuple[int, int]], count: int) -> int:
    """The index (pages) ``gntdev_add_map`` gives a new map of ``count`` pages among
    the maps ``records`` ((index, count) in pages): the first place after a map
    (or 0) where ``index + count < next map's index``, else after the last one."""
    index = 0
    for start, n in sorted(records):
        if index + count < start:
            return index
        index = start + n
    return index


# ---------------------------------------------------------------------- model side


@dataclass
class FilePage:
    """One gntalloc page (``struct gntalloc_gref``): its ``ref`` and frame ``gfn``,
    ``index`` (pages, relative to the sequence's first ALLOC), ``users`` (the file
    list's hold + one per gntalloc mmap), ``in_file`` (not yet DEALLOCated)."""

    ref: int
    gfn: int
    index: int
    users: int = 1
    in_file: bool = True


@dataclass
class DevMap:
    """One gntdev map: ``index`` (pages) and ``count``, the ``refs``, ``writable``;
    ``record``: the MAP_GRANT_REF record is there; ``mapped``: its mmap succeeded and
    was not unmapped; ``handles``: the model's maptrack handles (user maps, then
    kernel maps); ``gfns``: the frame each page shows."""

    index: int
    refs: list[int]
    writable: bool
    record: bool = True
    mapped: bool = False
    handles: list[int] = field(default_factory=list)
    gfns: list[int] = field(default_factory=list)


@dataclass
class AllocMap:
    """One gntalloc mmap: its pages (in file order) and their frames."""

    pages: list[FilePage]
    gfns: list[int]
    live: bool = True


@dataclass
class GrantModel:
    """One sequence's model: dom0's :class:`GrantTable` (or a mutant) with the
    gntalloc file and gntdev fd around it, and the bytes of every frame."""

    table: GrantTable
    file_list: list[FilePage] = field(default_factory=list)
    gref_list: list[FilePage] = field(default_factory=list)
    file_index: int = 0
    groups: list[tuple[int, int] | None] = field(default_factory=list)
    """Group k-1: (first file index, count) of the k-th ALLOC, None if it failed."""
    maps: list[DevMap] = field(default_factory=list)
    amaps: list[AllocMap | None] = field(default_factory=list)
    frames: dict[int, bytes] = field(default_factory=dict)
    scratch: bytes = bytes(PAGE)
    """The copy destination page (scratch page 1)."""
    next_gfn: int = GFN_BASE
    window: int = 0
    """Steps left in the current tick window (2 at a waited step)."""
    last_unmapped: list[int] = field(default_factory=list)
    ever_granted: list[int] = field(default_factory=list)
    foreign_refs: list[int] = field(default_factory=list)

    # -- gntalloc ------------------------------------------------------------

    def alloc(self, domid: int, count: int, writable: bool) -> tuple[int, list[int]]:
        """gntalloc_ioctl_alloc + add_grefs: (errno, refs)."""
        index = self.file_index
        self.file_index += count
        new: list[FilePage] = []
        for i in range(count):
            gfn = self.next_gfn
            self.next_gfn += 1
            try:
                ref = self.table.grant_foreign_access(domid, gfn, readonly=not writable)
            except GrantError as exc:  # undo: the pages granted so far are ended again, in order
                for page in new:
                    self.table.end_foreign_access(page.ref)
                self.groups.append(None)
                return exc.errno or errno.ENOSPC, []
            self.frames[gfn] = bytes(PAGE)
            new.append(FilePage(ref, gfn, index + i))
        self.file_list += new
        self.gref_list += new
        self.groups.append((index, count))
        refs = [p.ref for p in new]
        self.ever_granted += [r for r in refs if r not in self.ever_granted]
        if domid != DOM0:
            self.foreign_refs += refs
        return 0, refs

    def find_grefs(self, index: int, count: int) -> list[FilePage] | None:
        """find_grefs: the ``count`` pages from file index ``index``, contiguous in
        the file's list, or None."""
        start = next((i for i, p in enumerate(self.file_list) if p.index == index), None)
        if start is None or count < 1:
            return None
        pages = self.file_list[start:start + count]
        if len(pages) < count or any(p.index != index + i for i, p in enumerate(pages)):
            return None
        return pages

    def _del_gref(self, page: FilePage) -> None:
        """__del_gref: end the grant (now, or deferred while mapped)."""
        self.table.end_foreign_access(page.ref)
        self.gref_list.remove(page)

    def dealloc(self, index: int, count: int) -> int:
        """gntalloc_ioctl_dealloc: errno."""
        pages = self.find_grefs(index, count)
        if pages is None:
            return errno.EINVAL
        for p in pages:
            self.file_list.remove(p)
            p.in_file = False
            p.users -= 1
        for p in list(self.gref_list):  # do_cleanup, in the global list's order
            if p.users == 0:
                self._del_gref(p)
        return 0

    def amap(self, index: int, count: int) -> int:
        """gntalloc_mmap: errno (ENOENT: no such contiguous pages in the file)."""
        pages = self.find_grefs(index, count)
        if pages is None:
            self.amaps.append(None)
            return errno.ENOENT
        for p in pages:
            p.users += 1
        self.amaps.append(AllocMap(pages, [p.gfn for p in pages]))
        return 0

    def aunmap(self, k: int) -> int:
        """gntalloc_vma_close of amap ``k`` (1-based): pages whose use count drops to 0 are deleted."""
        am = self.amaps[k - 1]
        if am is None or not am.live:
            raise ValueError(f"amap {k} is not mapped")
        am.live = False
        for p in am.pages:
            p.users -= 1
            if p.users == 0:
                self._del_gref(p)
        return 0

    # -- gntdev --------------------------------------------------------------

    def records(self) -> list[tuple[int, int]]:
        return [(m.index, len(m.refs)) for m in self.maps if m.record]

    def map(self, refs: list[int], writable: bool) -> tuple[int, int]:
        """MAP_GRANT_REF + mmap: (gntdev index in pages, mmap errno)."""
        m = DevMap(gntdev_first_fit(self.records(), len(refs)), list(refs), writable)
        self.maps.append(m)
        handles: list[int] = []
        failed = False
        for _ in ("user PTE", "kernel address"):
            for ref in refs:
                try:
                    handles.append(self.table.map(ref, DOM0, readonly=not writable))
                except GrantError:
                    failed = True
        if failed:
            for h in handles:
                self.table.unmap(h, domid=DOM0)
            return m.index, errno.EINVAL
        m.mapped, m.handles = True, handles
        m.gfns = [self.table.entry(ref).gfn for ref in refs]
        return m.index, 0

    def unmap(self, k: int) -> None:
        """munmap (the Xen unmaps, user and kernel) and UNMAP_GRANT_REF of map ``k``."""
        m = self.maps[k - 1]
        if not m.mapped or not m.record:
            raise ValueError(f"map {k} is not mapped")
        for h in m.handles:
            self.table.unmap(h, domid=DOM0)
        m.mapped, m.record, m.handles = False, False, []
        self.last_unmapped = list(m.refs)

    def copy(self, segments: Sequence[Mapping[str, Any]]) -> tuple[int, list[int]]:
        """GRANT_COPY: (errno, statuses); the bytes move in the model's frames."""
        for k, seg in enumerate(segments):
            if seg["offset"] + seg["len"] > PAGE:  # gntdev_grant_copy_seg: nothing was issued
                return errno.EINVAL, [GNTST_okay] * k + [COPY_NOT_REACHED] * (len(segments) - k)
        statuses = []
        for seg in segments:
            ref, off, n = seg["ref"], seg["offset"], seg["len"]
            if n == 0:
                status = GNTST_okay
            elif seg["domid"] != DOM0:
                status = GNTST_bad_domain  # gnttab_copy_lock_domain: no such domain
            else:
                status = self.table.copy(ref, DOM0, dest=seg["to_ref"], offset=off, length=n)
            if status == GNTST_okay and n:
                gfn = self.table.entry(ref).gfn
                if seg["to_ref"]:
                    src = pattern_bytes(COPY_SEED, PAGE)
                    self.frames[gfn] = _put(self.frames[gfn], off, src[off:off + n])
                else:
                    self.scratch = _put(self.scratch, off, self.frames[gfn][off:off + n])
            statuses.append(status)
        return 0, statuses

    # -- views for data steps ---------------------------------------------------

    def views(self) -> list[tuple[str, int, int, int, bool]]:
        """Every page one can read: (kind, id, page, gfn, writable)."""
        out: list[tuple[str, int, int, int, bool]] = []
        for k, m in enumerate(self.maps, 1):
            if m.mapped:
                out += [("gntdev", k, i, gfn, m.writable) for i, gfn in enumerate(m.gfns)]
        for k, am in enumerate(self.amaps, 1):
            if am is not None and am.live:
                out += [("gntalloc", k, i, gfn, True) for i, gfn in enumerate(am.gfns)]
        return out

    def view_gfn(self, view: Sequence[Any]) -> int:
        kind, k, i = str(view[0]), int(view[1]), int(view[2])
        if not 1 <= k <= (len(self.maps) if kind == "gntdev" else len(self.amaps)):
            raise ValueError(f"{kind} mapping {k} does not exist")
        if kind == "gntdev":
            m = self.maps[k - 1]
            if not m.mapped:
                raise ValueError(f"map {k} is not mapped")
            return m.gfns[i]
        am = self.amaps[k - 1]
        if am is None or not am.live:
            raise ValueError(f"amap {k} is not mapped")
        return am.gfns[i]

    # -- the deferred timer ----------------------------------------------------

    def tick_changes(self) -> bool:
        """Whether one run of the deferred timer now would change the model (tried on
        a copy of the table)."""
        before = self.table.deferred_refs()
        if not before:
            return False
        # A run of the timer touches the deferred entries, the free and deferred
        # lists only: the other entries and the maptracks are shared with the copy
        # (a large speed-up; with other internals this is a plain deep copy).
        memo: dict[int, Any] = {}
        entries = getattr(self.table, "_entries", None)
        if isinstance(entries, list):
            deferred = set(before)
            memo.update((id(e), e) for i, e in enumerate(entries) if i not in deferred)
        maptracks = getattr(self.table, "_maptracks", None)
        if maptracks is not None:
            memo[id(maptracks)] = maptracks
        trial = copy.deepcopy(self.table, memo)
        freed = trial.handle_deferred(FREE_PER_ITERATION)
        return bool(freed) or trial.deferred_refs() != before

    def unmap_unpins_deferred(self, k: int) -> bool:
        """Whether munmap of map ``k`` drops the last pin of a deferred ref."""
        m = self.maps[k - 1]
        deferred = set(self.table.deferred_refs())
        for ref in set(m.refs) & deferred:
            e = self.table.entry(ref)
            if e.pin_ro + e.pin_rw <= 2 * m.refs.count(ref):  # a user and a kernel map per page
                return True
        return False

    def in_use_refs(self) -> int:
        return len(self.table)


def _put(page: bytes, offset: int, data: bytes) -> bytes:
    return page[:offset] + data + page[offset + len(data):]


# ---------------------------------------------------------------------- strategies


def _weighted(*weights: int) -> st.SearchStrategy[int]:
    """Kind i with probability about weights[i] / sum(weights); shrinks toward kind 0
    (the draw is spread over 0..999 by a permutation that keeps 0 at 0)."""
    total = sum(weights)
    bounds = [sum(weights[:i + 1]) * 1000 // total for i in range(len(weights))]

    def kind(x: int) -> int:
        spread = x * 7919 % 1000
        return next(i for i, b in enumerate(bounds) if spread < b)

    return st.integers(0, 999).map(kind)


_n = st.integers(0, 63)
_bool_rare = _weighted(4, 1).map(bool)
_ref_sel = st.tuples(_weighted(5, 5, 2, 1, 1, 1), _n)
"""Which ref: the last unmapped map's, a granted one, a deferred one, any granted
before, one granted to the other domain, one outside the table."""
_seg = st.tuples(_weighted(1, 1).map(bool), _ref_sel, _weighted(4, 2, 2, 1), _weighted(4, 2, 1),
                 _weighted(12, 1).map(bool))
_OPS: tuple[st.SearchStrategy[tuple[Any, ...]], ...] = (
    st.tuples(st.just("grant"), _weighted(6, 3, 2), _bool_rare, _weighted(9, 1).map(bool)),
    st.tuples(st.just("map"), _ref_sel, _weighted(5, 1).map(bool), _bool_rare),
    st.tuples(st.just("unmap"), _n, _bool_rare),
    st.tuples(st.just("end"), _weighted(4, 3, 1, 1), _n),
    st.tuples(st.just("amap"), _n, _weighted(4, 1)),
    st.tuples(st.just("aunmap"), _n),
    st.tuples(st.just("copy"), st.lists(_seg, min_size=1, max_size=3)),
    st.tuples(st.just("data"), _n, _n, _n),
    st.tuples(st.just("state")),
    st.tuples(st.just("settle")),
)
_op_sel = _weighted(7, 8, 6, 6, 2, 2, 3, 2, 2, 3)
_STEP = _op_sel.flatmap(lambda kind: _OPS[kind])

_PREFIXES: tuple[tuple[tuple[Any, ...], ...], ...] = (
    (("grant", 0, 0, False),),
    # two refs each mapped alone, both ended while mapped: two deferred ends in a row
    (("grant", 1, 0, False), ("map", (1, 0), False, False), ("map", (1, 1), False, False), ("end", 2, 0)),
    (),
)
"""How a sequence starts: one grant; two deferred ends; nothing."""

OPS = ("grant", "map", "unmap", "end", "amap", "aunmap", "copy", "data", "state", "settle")
_VIEW_KINDS = ("gntdev", "gntalloc")


def _pick(items: Sequence[Any], n: int) -> Any:
    return items[n % len(items)]


# ---------------------------------------------------------------------- the target


class GrantTarget:
    """:class:`~harness.difftest.engine.Target` for :mod:`harness.models.grant` in a
    Xen dom0 (see the module docstring)."""

    name = "grant"
    description = "Xen grant tables: dom0 grants (gntalloc) to itself, maps and copies them (gntdev)"
    system = "kernel"

    def mutants(self) -> Mapping[str, str]:
        return {name: m.description for name, m in MUTANTS.items()}

    def new_model(self, mutant: str | None) -> GrantModel:
        table = GrantTable(NR_ENTRIES, VERSION) if mutant is None else MUTANTS[mutant].factory(NR_ENTRIES, VERSION)
        return GrantModel(table)

    def sequences(self, max_steps: int) -> st.SearchStrategy[list[Any]]:
        """Lists of 1..max_steps abstract steps, of a length drawn evenly (deferred
        ends need a grant, a map, an end and an unmap before the timer matters),
        after one of :data:`_PREFIXES`."""
        steps = st.integers(1, max_steps).flatmap(lambda n: st.lists(_STEP, min_size=n, max_size=n))
        return st.tuples(_weighted(4, 2, 1), steps).map(lambda t: (list(_PREFIXES[t[0]]) + t[1])[:max_steps])

    # -- resolve -------------------------------------------------------------------

    def resolve(self, model: GrantModel, abstract: Any) -> Step:
        step = self._resolve_op(model, abstract)
        step["tick"] = self._needs_tick(model, step)
        return step

    def _needs_tick(self, model: GrantModel, step: Step) -> bool:
        """Wait for the timer before ``step``? (see the module docstring)"""
        if not model.table.deferred_refs():
            return False
        if step["op"] == "settle":
            return True
        if model.window > 0:
            return False  # right after a waited step: inside its window
        if model.tick_changes():
            return True
        # only a munmap takes pins away: wait before one that lets the timer end a deferred ref
        return step["op"] == "unmap" and model.unmap_unpins_deferred(step["map"])

    def _ref(self, model: GrantModel, sel: tuple[int, int]) -> int:
        kind, n = sel
        t = model.table
        granted = [p.ref for p in model.gref_list]
        deferred = t.deferred_refs()
        if kind == 0 and model.last_unmapped:
            return int(_pick(model.last_unmapped, n))
        if kind == 2 and deferred:
            return int(_pick(deferred, n))
        if kind == 3 and model.ever_granted:
            return int(_pick(model.ever_granted, n))
        if kind == 4 and model.foreign_refs:
            return int(_pick(model.foreign_refs, n))
        if kind == 5:
            return BAD_REF
        if granted:
            return int(_pick(granted, n))
        if model.ever_granted:
            return int(_pick(model.ever_granted, n))
        return NR_RESERVED + n % 4  # nothing granted yet: a ref that is free

    def _fallback(self, model: GrantModel) -> Step:
        """What a step with nothing to work on becomes: a grant of one page, or a dump."""
        if model.in_use_refs() < MAX_REFS:
            return {"op": "grant", "domid": DOM0, "count": 1, "writable": True}
        return {"op": "state"}

    def _resolve_op(self, model: GrantModel, abstract: Any) -> Step:
        kind = abstract[0]
        if kind == "grant":
            count = 1 + abstract[1]
            if model.in_use_refs() + count > MAX_REFS:
                live = [p for p in model.file_list]
                if live:  # too many refs in use: end one instead
                    return self._end_step(model, live[0].index, 1)
                return {"op": "state"}
            return {"op": "grant", "domid": OTHER_DOMID if abstract[3] else DOM0, "count": count,
                    "writable": not abstract[2]}
        if kind == "map":
            if sum(1 for m in model.maps if m.mapped) >= MAX_MAPS:
                return self._unmap_step(model, abstract[1][1], False)
            refs = [self._ref(model, abstract[1])]
            if abstract[2]:
                refs.append(self._ref(model, (abstract[1][0], abstract[1][1] + 1)))
            return {"op": "map", "refs": refs, "writable": not abstract[3]}
        if kind == "unmap":
            return self._unmap_step(model, abstract[1], abstract[2])
        if kind == "end":
            sel, n = abstract[1], abstract[2]
            live = model.file_list
            if not live:  # nothing left to end: a range past the file (EINVAL)
                return {"op": "settle"} if not model.groups else self._end_step(model, model.file_index, 1)
            if sel == 0:  # a page of a mapped ref: its end is deferred
                mapped = {r for m in model.maps if m.mapped for r in m.refs}
                pages = [p for p in live if p.ref in mapped] or live
                return self._end_step(model, _pick(pages, n).index, 1)
            if sel == 1:
                return self._end_step(model, _pick(live, n).index, 1)
            if sel == 2:  # two pages (EINVAL unless contiguous in the file)
                return self._end_step(model, _pick(live, n).index, 2)
            gone_index = [i for i in range(model.file_index) if not any(p.index == i for p in live)]
            return self._end_step(model, _pick(gone_index, n) if gone_index else model.file_index, 1)
        if kind == "amap":
            live = model.file_list
            if not live or sum(1 for a in model.amaps if a is not None and a.live) >= MAX_AMAPS:
                return self._fallback(model)
            return self._file_step(model, "amap", _pick(live, abstract[1]).index, 1 + abstract[2])
        if kind == "aunmap":
            live_amaps = [k for k, a in enumerate(model.amaps, 1) if a is not None and a.live]
            if not live_amaps:
                return {"op": "settle"}
            return {"op": "aunmap", "amap": _pick(live_amaps, abstract[1])}
        if kind == "copy":
            segs = []
            for to_ref, ref_sel, off_kind, len_kind, foreign in abstract[1]:
                ref = self._ref(model, ref_sel)
                n = ref_sel[1]
                offset = (0, 16 * (1 + n % 200), PAGE - 64, PAGE - 8)[off_kind]
                length = (16 * (1 + n % 16), PAGE - offset, 0)[len_kind] if off_kind != 3 else 16
                length = min(length, PAGE - offset) if off_kind != 3 else length
                segs.append({"to_ref": to_ref, "ref": ref, "domid": OTHER_DOMID if foreign else DOM0,
                             "offset": offset, "len": length})
            return {"op": "copy", "segments": segs}
        if kind == "data":
            views = model.views()
            writable = [v for v in views if v[4]]
            if not writable:
                return self._fallback(model)
            w = _pick(writable, abstract[1])
            same = [v for v in views if v[3] == w[3] and v[:3] != w[:3]]
            r = _pick(same, abstract[2]) if same and abstract[2] % 4 else _pick(views, abstract[2])
            return {"op": "data", "write": list(w[:3]), "read": list(r[:3]), "seed": abstract[3]}
        if kind in ("state", "settle"):
            return {"op": kind}
        raise ValueError(f"unknown abstract step {abstract!r}")

    def _unmap_step(self, model: GrantModel, n: int, ioctl_first: bool) -> Step:
        """Mostly a mapping of a deferred ref (its munmap lets the timer end it)."""
        mapped = [k for k, m in enumerate(model.maps, 1) if m.mapped]
        if not mapped:
            return self._fallback(model)
        deferred = set(model.table.deferred_refs())
        of_deferred = [k for k in mapped if deferred & set(model.maps[k - 1].refs)]
        pool = of_deferred if of_deferred and n % 3 else mapped
        return {"op": "unmap", "map": _pick(pool, n), "ioctl_first": bool(ioctl_first)}

    def _end_step(self, model: GrantModel, index: int, count: int) -> Step:
        return self._file_step(model, "end", index, count)

    def _file_step(self, model: GrantModel, op: str, index: int, count: int) -> Step:
        """A step on the gntalloc file range [index, index + count) (pages), named by
        the group it starts in and the page in that group."""
        for g, grp in enumerate(model.groups, 1):
            if grp is not None and grp[0] <= index < grp[0] + grp[1]:
                return {"op": op, "group": g, "page": index - grp[0], "count": count}
        last = max((g for g, grp in enumerate(model.groups, 1) if grp is not None), default=None)
        if last is None:
            return {"op": "state"}
        grp = model.groups[last - 1]
        assert grp is not None
        return {"op": op, "group": last, "page": index - grp[0], "count": count}

    # -- apply ---------------------------------------------------------------------

    def apply(self, model: GrantModel, step: Step) -> Observation:
        out: Observation = {}
        deferred_before = bool(model.table.deferred_refs())
        if step["tick"]:
            out["tick"] = "ran" if deferred_before else "idle"
            model.table.handle_deferred(FREE_PER_ITERATION)
            model.window = 2
            deferred_before = bool(model.table.deferred_refs())
        out.update(self._apply_op(model, step))
        if model.window > 0:
            out["quiet"] = True
            model.window -= 1
        if not deferred_before and not model.table.deferred_refs():
            out["timer"] = "idle"
        return out

    def _group_index(self, model: GrantModel, step: Step) -> int:
        g = step["group"]
        if not 1 <= g <= len(model.groups):
            raise ValueError(f"group {g} does not exist (the sequence has {len(model.groups)})")
        grp = model.groups[g - 1]
        return (grp[0] if grp is not None else NO_INDEX) + int(step["page"])

    def _apply_op(self, model: GrantModel, step: Step) -> Observation:
        op = step["op"]
        if op == "grant":
            err, refs = model.alloc(step["domid"], step["count"], step["writable"])
            return {"errno": err, "refs": refs}
        if op == "map":
            index, err = model.map(step["refs"], step["writable"])
            return {"gntdev_index": index * PAGE, "map_errno": 0, "errno": err}
        if op == "unmap":
            model.unmap(step["map"])
            return {"errno": 0, "unmap_errno": 0}
        if op == "end":
            return {"errno": model.dealloc(self._group_index(model, step), step["count"])}
        if op == "amap":
            return {"errno": model.amap(self._group_index(model, step), step["count"])}
        if op == "aunmap":
            return {"errno": model.aunmap(step["amap"])}
        if op == "copy":
            err, statuses = model.copy(step["segments"])
            out: Observation = {"errno": err, "status": statuses}
            if any(not s["to_ref"] for s in step["segments"]):
                out["scratch_sha"] = sha(model.scratch)
            return out
        if op == "data":
            read_gfn = model.view_gfn(step["read"])
            write_gfn = model.view_gfn(step["write"])
            before = sha(model.frames[read_gfn])
            model.frames[write_gfn] = pattern_bytes(step["seed"], PAGE)
            return {"read_before": before, "read_after": sha(model.frames[read_gfn])}
        if op == "state":
            return {"entries": [{"ref": u.ref, "active_domid": u.localdom, "pin": u.pin, "shared_domid": u.domid,
                                 "flags": u.flags} for u in model.table.usage_lines()]}
        if op == "settle":
            return {}
        raise ValueError(f"unknown op {op!r}")

    def probes(self, model: GrantModel) -> list[Probe]:
        return []

    def answer_probes(self, model: GrantModel, probes: Sequence[Probe]) -> Observation:
        return {}

    def counters(self, step: Step, predicted: Observation) -> dict[str, int]:
        """Counts for the summary line: errnos, refs, copy statuses, Xen entries and
        data hashes compared; steps that waited for the timer; window steps."""
        return {
            "errnos compared": sum(1 for k in predicted if k == "errno" or k.endswith("_errno")),
            "refs compared": len(predicted.get("refs", [])),
            "copy statuses": len(predicted.get("status", [])),
            "Xen entries compared": len(predicted.get("entries", [])),
            "grant dumps": 1 if "entries" in predicted else 0,
            "data hashes": sum(1 for k in ("read_before", "read_after", "scratch_sha") if k in predicted),
            "ticks waited": 1 if step.get("tick") else 0,
            "window steps": 1 if "quiet" in predicted else 0,
        }

    # -- replay files, reports -------------------------------------------------------

    def check_step(self, raw: Any) -> Step:
        if not isinstance(raw, dict):
            raise ValueError(f"{raw!r} is not a step object")
        op = raw.get("op")
        if op not in OPS:
            raise ValueError(f"'op' is {op!r}, not one of {', '.join(OPS)}")
        fields = _FIELDS[op]
        extra = sorted(set(raw) - set(fields) - {"op", "tick"})
        if extra:
            raise ValueError(f"{op}: unknown key {extra[0]!r}")
        step: Step = {"op": op}
        for key, check in fields.items():
            if key not in raw:
                raise ValueError(f"{op}: missing key {key!r}")
            step[key] = check(op, key, raw[key])
        tick = raw.get("tick", False)
        if type(tick) is not bool:
            raise ValueError(f"{op}: 'tick' is {tick!r}, not true or false")
        step["tick"] = tick
        return step

    def describe(self, step: Step) -> str:
        op = step["op"]
        pre = "[after the timer] " if step.get("tick") else ""
        if op == "grant":
            return (f"{pre}gntalloc ALLOC {step['count']} page(s) to d{step['domid']} "
                    f"{'rw' if step['writable'] else 'ro'}")
        if op == "map":
            return f"{pre}gntdev MAP_GRANT_REF refs {step['refs']} + mmap {'rw' if step['writable'] else 'ro'}"
        if op == "unmap":
            order = "UNMAP_GRANT_REF + munmap" if step["ioctl_first"] else "munmap + UNMAP_GRANT_REF"
            return f"{pre}{order} of map {step['map']}"
        if op in ("end", "amap"):
            what = "gntalloc DEALLOC" if op == "end" else "gntalloc mmap"
            return f"{pre}{what} group {step['group']} page {step['page']} count {step['count']}"
        if op == "aunmap":
            return f"{pre}gntalloc munmap of amap {step['amap']}"
        if op == "copy":
            segs = ", ".join(f"{'to' if s['to_ref'] else 'from'} ref {s['ref']}"
                             f"{'' if s['domid'] == DOM0 else ' of d' + str(s['domid'])} +{s['offset']:#x} "
                             f"len {s['len']:#x}" for s in step["segments"])
            return f"{pre}GRANT_COPY [{segs}]"
        if op == "data":
            w, r = step["write"], step["read"]
            return (f"{pre}data: write pattern {step['seed']} via {w[0]} {w[1]} page {w[2]}, "
                    f"read via {r[0]} {r[1]} page {r[2]}")
        if op == "state":
            return f"{pre}Xen grant dump (debug key g)"
        return f"{pre}settle (wait for the deferred-end timer)" if step.get("tick") else "settle (nothing deferred)"

    def format_value(self, field_name: str, value: Any) -> str:
        leaf = field_name.rsplit(".", 1)[-1]
        if leaf.startswith("status") and isinstance(value, list):
            return "[" + ", ".join(f"{v} ({GNTST_NAMES.get(v, '?')})" for v in value) + "]"
        if field_name.startswith("status[") and isinstance(value, int):
            return f"{value} ({GNTST_NAMES.get(value, '?')})"
        if leaf in ("pin", "flags") and isinstance(value, int):
            return hex(value)
        if field_name.startswith("entries") and isinstance(value, list):
            return "[" + ", ".join(_entry_text(e) for e in value) + "]"
        if field_name.startswith("entries[") and isinstance(value, dict):
            return _entry_text(value)
        return default_format(field_name, value)

    # -- system side -------------------------------------------------------------------

    def driver(self) -> GrantDriver:
        return GrantDriver()

    def agent_executor(self, agent: AgentChannel) -> GrantExecutor:
        """The executor this target needs (waits for the deferred-end timer)."""
        return GrantExecutor(agent)

    def machine(self) -> MachineSpec:
        """Xen 4.17 with the harness's kernel as PV dom0 (harness.vm.spec.xen_machine)."""
        from harness.vm.spec import xen_machine
        return xen_machine()


def _entry_text(e: Any) -> str:
    if not isinstance(e, dict):
        return repr(e)
    return (f"ref {e.get('ref')} d{e.get('active_domid')} pin {_hex(e.get('pin'))} "
            f"shared d{e.get('shared_domid')} flags {_hex(e.get('flags'))}")


def _hex(v: Any) -> str:
    return hex(v) if isinstance(v, int) else repr(v)


def _int(limit: int) -> Callable[[str, str, Any], int]:
    def check(op: str, key: str, value: Any) -> int:
        if type(value) is not int or not 0 <= value <= limit:
            raise ValueError(f"{op}: {key!r} is {value!r}, not an integer in [0, {limit:#x}]")
        return value
    return check


def _bool(op: str, key: str, value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{op}: {key!r} is {value!r}, not true or false")
    return value


def _refs(op: str, key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not 1 <= len(value) <= 8 or \
            any(type(r) is not int or not 0 <= r < 1 << 32 for r in value):
        raise ValueError(f"{op}: {key!r} is {value!r}, not a list of 1..8 refs")
    return list(value)


def _view(op: str, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or len(value) != 3 or value[0] not in _VIEW_KINDS or \
            any(type(v) is not int or not 0 <= v < 1 << 16 for v in value[1:]):
        raise ValueError(f"{op}: {key!r} is {value!r}, not [\"gntdev\"|\"gntalloc\", id, page]")
    return list(value)


def _segments(op: str, key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not 1 <= len(value) <= 8:
        raise ValueError(f"{op}: {key!r} is {value!r}, not a list of 1..8 segments")
    out = []
    for seg in value:
        if not isinstance(seg, dict) or set(seg) != {"to_ref", "ref", "domid", "offset", "len"}:
            raise ValueError(f"{op}: segment {seg!r} needs exactly to_ref, ref, domid, offset, len")
        out.append({"to_ref": _bool(op, "to_ref", seg["to_ref"]), "ref": _int(0xFFFFFFFF)(op, "ref", seg["ref"]),
                    "domid": _int(0xFFFF)(op, "domid", seg["domid"]),
                    "offset": _int(PAGE - 1)(op, "offset", seg["offset"]), "len": _int(PAGE)(op, "len", seg["len"])})
    return out


_FIELDS: dict[str, dict[str, Callable[[str, str, Any], Any]]] = {
    "grant": {"domid": _int(0xFFFF), "count": _int(8), "writable": _bool},
    "map": {"refs": _refs, "writable": _bool},
    "unmap": {"map": _int(0xFFFF), "ioctl_first": _bool},
    "end": {"group": _int(0xFFFF), "page": _int(0xFFFF), "count": _int(8)},
    "amap": {"group": _int(0xFFFF), "page": _int(0xFFFF), "count": _int(8)},
    "aunmap": {"amap": _int(0xFFFF)},
    "copy": {"segments": _segments},
    "data": {"write": _view, "read": _view, "seed": _int(0xFFFFFFFF)},
    "state": {},
    "settle": {},
}


# ---------------------------------------------------------------------- system side


def _ticks(result: Any) -> int:
    ticks = result.get("ticks") if isinstance(result, dict) else None
    if not isinstance(ticks, int):
        raise DifftestError(f"xen.deferred_ticks gave no count: {result!r:.300} (the guest kernel needs "
                            "kprobe events on gnttab_handle_deferred)")
    return ticks


_TICKS: Call = {"op": "xen.deferred_ticks", "args": {}}

Reader = Callable[[list[Any]], Observation]


class GrantDriver:
    """The dom0 side of one grant sequence (guest agent ops ``xen.*``, ``mem.*``).
    Driven by :class:`GrantExecutor`: its setup has more phases than the engine's
    executor knows (the canonical free list), its teardown is formed from every
    step's results, and it is told when the executor waited for the timer.

    A ``map`` step is MAP_GRANT_REF then mmap of the gntdev fd: in this PV dom0 the
    mmap makes two Xen host maps per page (the user PTE, then the kernel's linear
    address through ``set_foreign_p2m_mapping``'s ``kmap_ops``), measured as pin
    0x2 (rw) / 0x200 (ro) per mmap of a ref; the model maps each page twice. The
    munmap unmaps both (MMU notifier), whatever the order of munmap and
    UNMAP_GRANT_REF. Values from earlier steps (gntalloc indexes, user VAs) are
    taken from their results (:class:`Pending` when not read yet); gntdev indexes
    are computed as the kernel does (:func:`gntdev_first_fit`) and the kernel's are
    compared (``gntdev_index``)."""

    def __init__(self) -> None:
        self.bound_to_executor = False
        self.check_info = True
        self.scratch: int | None = None
        self.canon: tuple[int, list[int]] | None = None
        self.last_ticks = 0
        self.group_index: dict[int, int | None] = {}
        self.n_groups = self.n_maps = self.n_amaps = 0
        self.records: dict[int, tuple[int, int]] = {}
        """map id -> (index, count) in pages of gntdev records the driver expects."""
        self.map_va: dict[int, int | None] = {}
        self.map_info: dict[int, tuple[int, bool]] = {}
        """map id -> (count, writable)."""
        self.live_maps: dict[int, tuple[int, int]] = {}
        """map id -> (user_va, count) of gntdev mappings the guest made and did not unmap."""
        self.amap_va: dict[int, int | None] = {}
        self.live_amaps: dict[int, tuple[int, int]] = {}
        self.file_pages: set[int] = set()
        """gntalloc file offsets (bytes) of pages allocated and not deallocated."""
        self.window_left = 0
        self.window_base = 0
        self.waited: str | None = None
        self.deferring_ends = 0
        self._readers: deque[Reader] = deque()

    # -- setup: canonical free list ------------------------------------------------

    def setup(self) -> list[Call]:
        """Phase 1: the grant devices (unless ``check_info`` is False: the executor
        checked them before), the timer count, CANON_REFS refs, the scratch buffer."""
        return ([{"op": "xen.info", "args": {}}] if self.check_info else []) + [
            _TICKS, {"op": "xen.alloc", "args": {"domid": DOM0, "count": CANON_REFS, "writable": True}},
            {"op": "mem.map", "args": {"length": SCRATCH_PAGES * PAGE, "fill": 0}}]

    def bind_setup(self, results: list[Any]) -> None:
        """Read phase 1. Raises DifftestError if this is not a dom0 with the grant
        devices, version 1 and free_per_iteration 10, or not run by GrantExecutor."""
        if not self.bound_to_executor:
            raise DifftestError("the grant target runs only under GrantExecutor (GrantTarget.agent_executor): "
                                "its steps wait for Linux's deferred-end timer")
        if self.check_info:
            self.check(results[0])
            results = results[1:]
        ticks, alloc, scratch = results
        self.scratch = int(scratch["user_va"])
        self.last_ticks = _ticks(ticks)
        self.bind_canon(alloc)

    @staticmethod
    def check(info: Any) -> None:
        """Raises DifftestError unless ``xen.info`` shows what the target models."""
        if not info.get("xen"):
            raise DifftestError("the guest is not a Xen domain (/sys/hypervisor/type): boot xen_machine()")
        missing = [d for d, ok in (info.get("devices") or {}).items() if not ok]
        if missing:
            raise DifftestError(f"dom0 lacks /dev/xen/{', /dev/xen/'.join(missing)}")
        if info.get("grant_version") != VERSION:
            raise DifftestError(f"Linux uses grant table version {info.get('grant_version')}, the target "
                                f"models version {VERSION}")
        if info.get("free_per_iteration") not in (FREE_PER_ITERATION, None):
            raise DifftestError(f"grant_table.free_per_iteration is {info.get('free_per_iteration')}, the "
                                f"target models {FREE_PER_ITERATION}")

    def bind_canon(self, alloc: Any) -> None:
        if alloc.get("errno"):
            raise SystemStateError(f"gntalloc ALLOC of {CANON_REFS} refs failed: "
                                   f"{errno.errorcode.get(alloc['errno'], alloc['errno'])}")
        self.canon = (int(alloc["index"]), [int(r) for r in alloc["refs"]])

    def canonical(self) -> bool:
        """Whether the refs phase 1 got are 8..8+CANON_REFS-1 (else a ref of an
        earlier sequence is still on the deferred list)."""
        assert self.canon is not None
        return sorted(self.canon[1]) == list(range(NR_RESERVED, NR_RESERVED + CANON_REFS))

    def release_canon(self) -> list[Call]:
        """Give the phase-1 refs back one by one, last page first, which puts the free
        list back as it was (before waiting for the timer and trying again: the refs
        after the first CANON_REFS must stay behind them)."""
        assert self.canon is not None
        index, refs = self.canon
        self.canon = None
        return [{"op": "xen.dealloc", "args": {"index": index + i * PAGE, "count": 1}}
                for i in reversed(range(len(refs)))]

    def retry_canon(self) -> list[Call]:
        return [{"op": "xen.alloc", "args": {"domid": DOM0, "count": CANON_REFS, "writable": True}}, _TICKS]

    def order_calls(self) -> list[Call]:
        """Phase 2: free the phase-1 refs one by one, highest first (the free list's
        head becomes 8, 9, ...), fill the copy source, check Xen's state."""
        assert self.canon is not None and self.scratch is not None
        index, refs = self.canon
        order = sorted(range(len(refs)), key=lambda i: -refs[i])
        return ([{"op": "xen.dealloc", "args": {"index": index + i * PAGE, "count": 1}} for i in order]
                + [{"op": "mem.write", "args": {"user_va": self.scratch, "pattern": COPY_SEED, "length": PAGE}},
                   {"op": "xen.grant_state", "args": {}}, _TICKS])

    def bind_order(self, results: list[Any]) -> None:
        """Raises SystemStateError if a DEALLOC failed or Xen shows a pinned dom0
        entry; DifftestError if dom0's table is not NR_ENTRIES refs of version 1."""
        frees, state, ticks = results[:CANON_REFS], results[-2], results[-1]
        bad = [r for r in frees if r.get("errno")]
        if bad:
            raise SystemStateError(f"DEALLOC of the start refs failed: {bad[0]!r:.200}")
        if state.get("errno"):
            raise DifftestError(f"xen.grant_state failed: {errno.errorcode.get(state['errno'], state['errno'])}")
        d0 = (state.get("domains") or {}).get(str(DOM0))
        if d0 is None:
            raise DifftestError(f"Xen's grant dump has no table of d0: {state.get('lines')!r:.500}")
        if d0.get("version") != VERSION or (d0.get("nr_frames") or 0) * (PAGE // 8) != NR_ENTRIES:
            raise DifftestError(f"dom0's grant table is version {d0.get('version')} with {d0.get('nr_frames')} "
                                f"frame(s); the target models version {VERSION} with {NR_ENTRIES} refs")
        if d0.get("entries"):
            raise SystemStateError(f"Xen shows pinned dom0 grants before the sequence: {d0['entries']!r:.300}")
        self.last_ticks = _ticks(ticks)
        self.canon = None

    # -- steps ---------------------------------------------------------------------

    def tick_waited(self, ran: bool, ticks: int) -> None:
        """The executor waited for the timer before the next step: ``ran`` (it ran;
        ``ticks`` is the count it saw)."""
        self.waited = "ran" if ran else "idle"
        self.last_ticks = ticks
        self.window_left, self.window_base = 2, ticks

    def _group(self, g: int, page: int) -> int:
        if g not in self.group_index:
            raise Pending()
        index = self.group_index[g]
        return (index if index is not None else NO_INDEX) + page * PAGE

    def _view_va(self, view: Sequence[Any]) -> int | None:
        kind, k, page = view
        table = self.map_va if kind == "gntdev" else self.amap_va
        if k not in table:
            raise Pending()
        va = table[k]
        return None if va is None else va + page * PAGE

    def calls(self, step: Step, probes: Sequence[Probe]) -> list[Call]:
        op = step["op"]
        calls: list[Call]
        if op == "grant":
            g = self.n_groups + 1
            calls = [{"op": "xen.alloc", "args": {"domid": step["domid"], "count": step["count"],
                                                  "writable": step["writable"]}}]

            def read(res: list[Any]) -> Observation:
                r = res[0]
                self.group_index[g] = None if r.get("errno") else int(r["index"])
                if not r.get("errno"):
                    self.file_pages.update(int(r["index"]) + i * PAGE for i in range(len(r["refs"])))
                return {"errno": r["errno"], "refs": r.get("refs", [])}
            self.n_groups = g
        elif op == "map":
            k = self.n_maps + 1
            count = len(step["refs"])
            index = gntdev_first_fit(list(self.records.values()), count)
            self.records[k] = (index, count)
            self.map_info[k] = (count, step["writable"])
            calls = [{"op": "xen.map", "args": {"domid": DOM0, "refs": step["refs"]}},
                     {"op": "xen.mmap", "args": {"index": index * PAGE, "count": count,
                                                 "writable": step["writable"]}}]

            def read(res: list[Any]) -> Observation:
                m, mm = res
                va = mm.get("user_va") if not mm.get("errno") else None
                self.map_va[k] = va
                if va is not None:
                    self.live_maps[k] = (int(va), count)
                return {"gntdev_index": m.get("index"), "map_errno": m["errno"], "errno": mm["errno"]}
            self.n_maps = k
        elif op == "unmap":
            k = step["map"]
            if k not in self.map_va:
                raise Pending()
            va = self.map_va[k]
            index, count = self.records.pop(k, (NO_INDEX, self.map_info.get(k, (1, False))[0]))
            munmap: Call = {"op": "xen.munmap", "args": {"user_va": va if va is not None else NO_INDEX * PAGE,
                                                         "count": count}}
            unmap: Call = {"op": "xen.unmap", "args": {"index": index * PAGE, "count": count}}
            ioctl_first = step["ioctl_first"]
            calls = [unmap, munmap] if ioctl_first else [munmap, unmap]

            def read(res: list[Any]) -> Observation:
                u, m = (res[0], res[1]) if ioctl_first else (res[1], res[0])
                if not m.get("errno"):
                    self.live_maps.pop(k, None)
                return {"errno": m["errno"], "unmap_errno": u["errno"]}
        elif op == "end":
            index = self._group(step["group"], step["page"])
            count = step["count"]
            calls = [{"op": "xen.dealloc", "args": {"index": index, "count": count}}]

            def read(res: list[Any]) -> Observation:
                if not res[0].get("errno"):
                    self.file_pages.difference_update(index + i * PAGE for i in range(count))
                return {"errno": res[0]["errno"]}
        elif op == "amap":
            k = self.n_amaps + 1
            index = self._group(step["group"], step["page"])
            count = step["count"]
            calls = [{"op": "xen.alloc_mmap", "args": {"index": index, "count": count}}]

            def read(res: list[Any]) -> Observation:
                va = res[0].get("user_va") if not res[0].get("errno") else None
                self.amap_va[k] = va
                if va is not None:
                    self.live_amaps[k] = (int(va), count)
                return {"errno": res[0]["errno"]}
            self.n_amaps = k
        elif op == "aunmap":
            k = step["amap"]
            if k not in self.amap_va:
                raise Pending()
            live = self.live_amaps.get(k)
            calls = [{"op": "xen.alloc_munmap", "args": {"user_va": live[0], "count": live[1]}}] if live else []

            def read(res: list[Any]) -> Observation:
                if not res:
                    return {"errno": "no such gntalloc mapping"}
                if not res[0].get("errno"):
                    self.live_amaps.pop(k, None)
                return {"errno": res[0]["errno"]}
        elif op == "copy":
            assert self.scratch is not None
            segs = []
            for s in step["segments"]:
                grant = {"ref": s["ref"], "domid": s["domid"], "offset": s["offset"]}
                if s["to_ref"]:
                    segs.append({"source": {"user_va": self.scratch + s["offset"]}, "dest": grant, "len": s["len"]})
                else:
                    segs.append({"source": grant, "dest": {"user_va": self.scratch + PAGE + s["offset"]},
                                 "len": s["len"]})
            calls = [{"op": "xen.copy", "args": {"segments": segs}}]
            from_ref = any(not s["to_ref"] for s in step["segments"])
            if from_ref:
                calls.append({"op": "mem.read", "args": {"user_va": self.scratch + PAGE, "length": PAGE}})

            def read(res: list[Any]) -> Observation:
                out: Observation = {"errno": res[0]["errno"], "status": res[0]["status"]}
                if from_ref:
                    out["scratch_sha"] = res[1]["sha256"]
                return out
        elif op == "data":
            w_va, r_va = self._view_va(step["write"]), self._view_va(step["read"])
            if step["write"][0] == "gntdev" and not self.map_info.get(step["write"][1], (0, False))[1]:
                raise DifftestError(f"data step writes through read-only gntdev map {step['write'][1]}: "
                                    "that would fault the agent")
            if w_va is None or r_va is None:
                calls = []

                def read(res: list[Any]) -> Observation:
                    return {"read_before": "no such mapping", "read_after": "no such mapping"}
            else:
                calls = [{"op": "mem.read", "args": {"user_va": r_va, "length": PAGE}},
                         {"op": "mem.write", "args": {"user_va": w_va, "pattern": step["seed"], "length": PAGE}},
                         {"op": "mem.read", "args": {"user_va": r_va, "length": PAGE}}]

                def read(res: list[Any]) -> Observation:
                    return {"read_before": res[0]["sha256"], "read_after": res[2]["sha256"]}
        elif op == "state":
            calls = [{"op": "xen.grant_state", "args": {}}]

            def read(res: list[Any]) -> Observation:
                if res[0].get("errno"):
                    return {"entries": f"xen.grant_state errno {res[0]['errno']}"}
                d0 = (res[0].get("domains") or {}).get(str(DOM0), {})
                keys = ("ref", "active_domid", "pin", "shared_domid", "flags")
                return {"entries": [{k: e[k] for k in keys} for e in d0.get("entries", [])]}
        elif op == "settle":
            calls = []

            def read(res: list[Any]) -> Observation:
                return {}
        else:
            raise DifftestError(f"unknown grant step {op!r}")
        self._readers.append(self._with_ticks(step, read, len(calls)))
        return calls + [_TICKS]

    def _with_ticks(self, step: Step, read: Reader, n: int) -> Reader:
        """Wrap a step's reader: the timer fields from the tick count read after it."""
        waited, self.waited = (self.waited, None) if step.get("tick") else (None, None)
        in_window = self.window_left > 0
        base = self.window_base
        if in_window:
            self.window_left -= 1

        def observe(res: list[Any]) -> Observation:
            before = self.last_ticks
            after = _ticks(res[n])
            self.last_ticks = after
            out: Observation = {}
            if waited is not None:
                out["tick"] = waited
            out.update(read(res[:n]))
            if in_window:
                out["quiet"] = after == base
            out["timer"] = "idle" if after == before else "ran"
            out["ticks_before"], out["ticks_after"] = before, after
            return out
        return observe

    def observe(self, step: Step, probes: Sequence[Probe], results: list[Any]) -> Observation:
        return self._readers.popleft()(results)

    def teardown(self) -> list[Call]:
        """Every gntdev mapping and record, every gntalloc mapping and page, the
        scratch buffer (formed after every step's results are read)."""
        calls: list[Call] = [{"op": "xen.munmap", "args": {"user_va": va, "count": n}}
                             for va, n in self.live_maps.values()]
        calls += [{"op": "xen.unmap", "args": {"index": i * PAGE, "count": n}} for i, n in self.records.values()]
        calls += [{"op": "xen.alloc_munmap", "args": {"user_va": va, "count": n}}
                  for va, n in self.live_amaps.values()]
        if self.canon is not None:
            calls += self.release_canon()
        calls += [{"op": "xen.dealloc", "args": {"index": i, "count": 1}} for i in sorted(self.file_pages)]
        if self.scratch is not None:
            calls.append({"op": "mem.unmap", "args": {"user_va": self.scratch}})
        self.live_maps, self.records, self.live_amaps, self.file_pages = {}, {}, {}, set()
        self.scratch = None
        return calls


class GrantExecutor(AgentExecutor):
    """Runs grant sequences in dom0 (see the module docstring): the canonical start,
    the waits for Linux's deferred-end timer before ``tick`` steps (polling
    ``xen.deferred_ticks`` every ``poll_seconds``, at most ``tick_timeout`` s), the
    steps batched between waits, a teardown formed from every result. A sequence
    whose tick window the timer broke into is run again (at most ``attempts``
    times in all); the last run's observations are returned.

    ``counters()``: "ambiguous ticks" (timer runs seen during a step outside a
    window: the model is the same either way), "tick retries", "timer runs during steps".

    Raises AgentError (an agent op failed), DifftestError (the guest cannot run the
    target), SystemStateError (the start state cannot be made canonical)."""

    def __init__(self, agent: AgentChannel, *, timeout: float = 60.0, per_call: float = 0.5,
                 tick_timeout: float = TICK_TIMEOUT, poll_seconds: float = POLL_SECONDS, attempts: int = 3,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        super().__init__(agent, timeout=timeout, per_call=per_call)
        self.tick_timeout = tick_timeout
        self.poll_seconds = poll_seconds
        self.attempts = attempts
        self.clock = clock
        self.sleep = sleep
        self.counts: dict[str, int] = {"ambiguous ticks": 0, "tick retries": 0, "timer runs during steps": 0}
        self.info_checked = False

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

    def wait_tick(self, last: int) -> tuple[bool, int]:
        """Poll until the timer count exceeds ``last``: (ran, count)."""
        deadline = self.clock() + self.tick_timeout
        while True:
            ticks = _ticks(self._batch([_TICKS])[0])
            if ticks > last:
                return True, ticks
            if self.clock() >= deadline:
                return False, ticks
            self.sleep(self.poll_seconds)

    def _setup(self, driver: GrantDriver) -> None:
        driver.check_info = not self.info_checked
        driver.bind_setup(self._batch(driver.setup()))
        self.info_checked = True
        for _ in range(3):
            if driver.canonical():
                break
            self._batch(driver.release_canon())
            self.wait_tick(driver.last_ticks)
            alloc, ticks = self._batch(driver.retry_canon())
            driver.bind_canon(alloc)
            driver.last_ticks = _ticks(ticks)
        else:
            assert driver.canon is not None
            raise SystemStateError(f"the Linux free list does not start with refs {NR_RESERVED}.."
                                   f"{NR_RESERVED + CANON_REFS - 1} (got {sorted(driver.canon[1])}) even after "
                                   "the deferred-end timer ran: refs leaked by an earlier sequence")
        driver.bind_order(self._batch(driver.order_calls()))

    def run(self, target: Target, planned: Sequence[Planned]) -> list[Observation]:
        observations: list[Observation] = []
        for attempt in range(1, self.attempts + 1):
            observations = self._run_once(target, planned)
            broken = any(o.get("quiet") is False for o in observations)
            if not broken or attempt == self.attempts:
                break
            self.counts["tick retries"] += 1
        for p, o in zip(planned, observations):
            seen = int(o.get("ticks_after", 0)) - int(o.get("ticks_before", 0))
            self.counts["timer runs during steps"] += seen
            if seen and not p.step.get("tick") and "quiet" not in p.predicted and "timer" not in p.predicted:
                self.counts["ambiguous ticks"] += 1
        return observations

    def _run_once(self, target: Target, planned: Sequence[Planned]) -> list[Observation]:
        driver = target.driver()
        if not isinstance(driver, GrantDriver):
            raise DifftestError(f"GrantExecutor runs GrantDriver sequences, not {type(driver).__name__}")
        driver.bound_to_executor = True
        observations: list[Observation] = []
        pending: list[tuple[Planned, list[Call]]] = []

        def flush() -> None:
            calls = [c for _, cs in pending for c in cs]
            results = self._batch(calls)
            pos = 0
            for p, cs in pending:
                observations.append(driver.observe(p.step, p.probes, results[pos:pos + len(cs)]))
                pos += len(cs)
            pending.clear()

        try:
            self._setup(driver)
            for p in planned:
                if p.step.get("tick"):
                    flush()
                    driver.tick_waited(*self.wait_tick(driver.last_ticks))
                try:
                    calls = driver.calls(p.step, p.probes)
                except Pending:
                    flush()
                    calls = driver.calls(p.step, p.probes)
                pending.append((p, calls))
            flush()
        except BaseException:
            try:
                self._batch(driver.teardown())
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        self._batch(driver.teardown())
        return observations
