"""The model side of the grant target: GrantModel, the grant table (harness.models.grant)
with the gntalloc and gntdev objects around it (drivers/xen/gntalloc.c, gntdev.c)."""

from __future__ import annotations

import copy
import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.difftest.grant.common import (
    COPY_NOT_REACHED,
    COPY_SEED,
    DOM0,
    FREE_PER_ITERATION,
    GFN_BASE,
    PAGE,
    gntdev_first_fit,
    pattern_bytes,
)
from harness.models.grant import (
    GNTST_bad_domain,
    GNTST_okay,
    GrantError,
    GrantTable,
)

if TYPE_CHECKING:
    pass



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
