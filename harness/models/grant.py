"""Reference model of one domain's Xen grant table, granting and mapping side.

Granting side: Linux 6.12 ``drivers/xen/grant-table.c``.

* ``gnttab_init``/``gnttab_set_free``: refs 0 to 7 are reserved
  (``GNTTAB_NR_RESERVED_ENTRIES``); the free list starts ascending from 8.
* ``get_free_entries`` takes the free list's head; ``put_free_entry`` pushes a
  freed ref at the head (so reuse is LIFO) and ignores refs below 8.  The
  model's ``nr_entries`` is the table's final size: Linux grows the table
  (``gnttab_expand``) only once the free list is empty and appends the new refs
  at its tail, which gives the same order as a table that had them all from
  the start.
* ``gnttab_end_foreign_access`` frees the ref at once if no mapping uses it,
  else queues it on ``deferred_list`` (``gnttab_add_deferred``, at the tail).
  ``gnttab_end_foreign_access_ref_v1`` clears the flags only if neither
  GTF_reading nor GTF_writing is set; ``..._v2`` clears the flags first and
  then looks at the status word.
* ``gnttab_handle_deferred`` (a 1 Hz timer) pops up to ``free_per_iteration``
  (module parameter, default 10, 0 = no limit) entries from the head; a ref
  that can be ended is freed (pushed at the free list's head, in that order),
  one still in use goes back at the tail, and the tick stops when it meets the
  first ref it re-queued.

Mapping side: Xen ``xen/common/grant_table.c``.

* ``map_grant_ref`` with ``GNTMAP_host_map`` (and ``GNTMAP_readonly``): takes a
  maptrack handle, then checks in this order: ref outside the table
  ``GNTST_bad_gntref``; entry already pinned by another domain, or the pin
  counter about to overflow (bit 7 of its byte set: at most 128 host-RO and 128
  host-RW pins) ``GNTST_general_error``; then, only if the entry is not pinned
  or this is the first writer, ``_set_status_v1``/``_v2``: (if not pinned) the
  flags' type is not GTF_permit_access or the grantee is another domain, or a
  writable pin of a GTF_readonly entry: ``GNTST_general_error``.  So a further
  map of a pinned entry is not checked against the flags again.  On any
  failure the handle goes back to the maptrack free list.
* Pins: ``act->pin`` counts host-RO maps in units of ``GNTPIN_hstr_inc``
  (0x100) and host-RW maps in units of ``GNTPIN_hstw_inc`` (0x1).  The status
  bits GTF_reading (any pin) and GTF_writing (any RW pin) live in the shared
  entry's flags with v1 and in a separate status array with v2;
  ``reduce_status_for_pin`` clears them as the pins drop.
* Maptrack handles belong to the mapping domain; their numbering is
  :mod:`harness.models.grant_maptrack`'s (0, 1, ..., 254, 256, ...; freed
  ones at the tail; GNTST_no_space past ``max_maptrack_frames``).
* ``unmap_common``: a handle at or above the maptrack limit, or not in use:
  ``GNTST_bad_handle``.
* ``gnttab_copy``: per-segment status (see :meth:`GrantTable.copy`).
* ``gnttab_usage_print`` (``xl debug-keys g``): prints each pinned entry's
  ``act->pin`` and, as "flags", the shared flags with v1 but only the status
  word (GTF_reading|GTF_writing) with v2 (:meth:`GrantTable.usage_lines`).

Units: ``gfn`` is a guest frame number of the granting domain (pages); refs
and handles are indices; ``domid`` is a Xen domain id (u16).  The model is
pure: no I/O, no clock (the deferred timer is :meth:`GrantTable.handle_deferred`).

Exceptions::

    GrantError            .errno (Linux errno or None), .status (GNTST_* or None)
     +-- GrantArgumentError (also ValueError)  an argument outside its C type
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from harness.models.grant_maptrack import DEFAULT_MAX_MAPTRACK_FRAMES, PAGE_SIZE, Maptrack

GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_permission_denied = -8
GNTST_bad_copy_arg = -10
GNTST_no_space = -13

GTF_permit_access = 0x1
GTF_type_mask = 0x3
GTF_readonly = 0x4
GTF_reading = 0x8
GTF_writing = 0x10
GNTPIN_hstw_inc = 0x1
GNTPIN_hstr_inc = 0x100
PIN_LIMIT = 128  # GNTPIN_incr2oflow_mask: a counter with bit 7 set takes no more pins

NR_RESERVED_ENTRIES = 8
FREE_PER_ITERATION = 10  # gnttab_handle_deferred's module parameter default

_FREE, _GRANTED, _DEFERRED = 0, 1, 2


class GrantError(Exception):
    """A grant operation failed: ``errno`` is the Linux errno (ENOSPC, EINVAL,
    EALREADY) for granting-side errors, ``status`` the Xen GNTST_* code for
    hypercall errors; the other one is None."""

    def __init__(self, message: str, *, err: int | None = None, status: int | None = None):
        super().__init__(message)
        self.errno = err
        self.status = status


class GrantArgumentError(GrantError, ValueError):
    """An argument outside its C type (domid not u16, negative gfn, ...);
    ``errno`` is EINVAL."""

    def __init__(self, message: str) -> None:
        super().__init__(message, err=errno.EINVAL)


@dataclass(frozen=True)
class GrantEntry:
    """Snapshot of one ref (:meth:`GrantTable.entry`).

    ``domid``/``gfn`` (guest frame number, pages): what the granting side last
    wrote, kept after the end as in the shared page (0 if never granted);
    ``readonly``: GTF_readonly in the current flags (False once an end cleared
    them); ``pin_ro``/``pin_rw``: host-RO/RW mappings; ``in_use``: granted or
    deferred on the Linux side; ``deferred``: on the deferred list; ``flags``:
    the shared entry's flags word (with v1 it includes the status bits);
    ``status``: GTF_reading|GTF_writing; ``map_domid``: the domain whose maps
    pin the entry (None if unpinned).
    """

    ref: int
    version: int
    domid: int
    gfn: int
    readonly: bool
    pin_ro: int
    pin_rw: int
    in_use: bool
    deferred: bool
    flags: int
    status: int
    map_domid: int | None

    @property
    def pin(self) -> int:
        """Xen's ``act->pin`` (host pins only): pin_ro * 0x100 + pin_rw * 0x1."""
        return self.pin_ro * GNTPIN_hstr_inc + self.pin_rw * GNTPIN_hstw_inc

    def usage(self) -> tuple[int, int]:
        """The (pin, flags) pair ``gnttab_usage_print`` prints for this ref: the
        flags are the shared flags with v1, the status word with v2."""
        return self.pin, self.flags if self.version == 1 else self.status


class UsageLine(NamedTuple):
    """One line of ``xl debug-keys g`` (``gnttab_usage_print``), minus the mfn:
    ``localdom`` is the mapping domain, ``domid``/``gfn`` the shared entry's."""

    ref: int
    localdom: int
    pin: int
    domid: int
    gfn: int
    flags: int


class _Entry:
    __slots__ = ("state", "domid", "gfn", "flags", "status", "pin_ro", "pin_rw", "map_domid")

    def __init__(self) -> None:
        self.state = _FREE
        self.domid = self.gfn = self.flags = self.status = self.pin_ro = self.pin_rw = 0
        self.map_domid: int | None = None


def _check_u(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise GrantArgumentError(f"{name} must be an integer in [0, 2**{bits}), got {value!r}")


class GrantTable:
    """One domain's grant table (``nr_entries`` refs, version 1 or 2), with
    the maptracks of the domains that map its grants.

    Raises GrantArgumentError if ``version`` is not 1 or 2, ``nr_entries`` is
    below 8 (the reserved refs) or ``max_maptrack_frames`` below 1.
    """

    def __init__(self, nr_entries: int = 512, version: int = 1, *,
                 max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES) -> None:
        if version not in (1, 2):
            raise GrantArgumentError(f"grant table version must be 1 or 2, got {version!r}")
        if not isinstance(nr_entries, int) or nr_entries < NR_RESERVED_ENTRIES:
            raise GrantArgumentError(f"nr_entries must be at least {NR_RESERVED_ENTRIES}")
        if not isinstance(max_maptrack_frames, int) or max_maptrack_frames < 1:
            raise GrantArgumentError("max_maptrack_frames must be at least 1")
        self.nr_entries = nr_entries
        self.version = version
        self.max_maptrack_frames = max_maptrack_frames
        self._entries = [_Entry() for _ in range(nr_entries)]
        self._free = list(range(nr_entries - 1, NR_RESERVED_ENTRIES - 1, -1))  # head at the end
        self._in_use = 0
        self._deferred: deque[int] = deque()
        self._maptracks: dict[int, Maptrack] = {}

    # ------------------------------------------------------------ granting side

    def grant_foreign_access(self, domid: int, gfn: int, *, readonly: bool = False) -> int:
        """Grant domain ``domid`` access to frame ``gfn`` (a guest frame number
        of this domain, pages), read-only if ``readonly``; return the ref, the
        free list's head (``gnttab_grant_foreign_access``: flags become
        GTF_permit_access | GTF_readonly if read-only).  Raises GrantError with
        errno ENOSPC if no ref is free; GrantArgumentError if ``domid`` is not a
        u16 or ``gfn`` does not fit the entry's frame field (u32 with v1, u64
        with v2)."""
        _check_u("domid", domid, 16)
        _check_u("gfn", gfn, 32 if self.version == 1 else 64)
        if not self._free:
            raise GrantError("no free grant reference", err=errno.ENOSPC)
        ref = self._free.pop()
        e = self._entries[ref]
        e.state, e.domid, e.gfn = _GRANTED, domid, gfn
        e.flags = GTF_permit_access | (GTF_readonly if readonly else 0)
        self._in_use += 1
        return ref

    def end_foreign_access(self, ref: int) -> bool:
        """End the grant ``ref`` (``gnttab_end_foreign_access``).  Returns True
        if the ref was freed now (pushed at the free list's head), False if a
        mapping still uses it and the end is deferred (queued at the deferred
        list's tail; with v1 the entry stays valid until then, with v2 its
        flags are cleared now).

        Raises GrantError with errno EINVAL if ``ref`` is outside the table,
        reserved or not granted (the kernel does not check: a free ref's flags
        are 0, so it "ends" at once and is pushed on the free list a second
        time, corrupting it), and with errno EALREADY if ``ref`` is already on
        the deferred list (the kernel would queue it twice and free it twice).
        """
        e = self._entry(ref, err=errno.EINVAL)
        if e.state == _DEFERRED:
            raise GrantError(f"grant ref {ref} is already deferred", err=errno.EALREADY)
        if e.state != _GRANTED:
            raise GrantError(f"grant ref {ref} is not in use", err=errno.EINVAL)
        if self._end_access_ref(e):
            self._release(ref)
            return True
        e.state = _DEFERRED
        self._deferred.append(ref)
        return False

    def handle_deferred(self, free_per_iteration: int = FREE_PER_ITERATION) -> list[int]:
        """One tick of the deferred timer (``gnttab_handle_deferred``): look at
        up to ``free_per_iteration`` deferred refs (0: no limit) from the head;
        free those no mapping uses, re-queue the others at the tail, stop at
        the first re-queued one.  Returns the freed refs in the order they were
        freed (each went to the free list's head, so the last is reused first).
        Raises GrantArgumentError for a negative ``free_per_iteration``."""
        _check_u("free_per_iteration", free_per_iteration, 32)
        freed: list[int] = []
        first: int | None = None
        budget = free_per_iteration or -1
        while budget != 0 and self._deferred:
            budget -= 1
            ref = self._deferred[0]
            if ref == first:
                break
            self._deferred.popleft()
            if self._deferred_try_end(self._entries[ref]):
                self._release(ref)
                freed.append(ref)
            else:
                if first is None:
                    first = ref
                self._requeue(ref)
        return freed

    # ------------------------------------------------------------ mapping side

    def map(self, ref: int, domid: int, *, readonly: bool = False) -> int:
        """Domain ``domid`` maps grant ``ref`` of this table (Xen
        ``map_grant_ref`` with GNTMAP_host_map, plus GNTMAP_readonly if
        ``readonly``); returns the maptrack handle (of ``domid``'s maptrack).
        Raises GrantError with ``status``: GNTST_no_space if ``domid`` has no
        handle left; GNTST_bad_gntref if ``ref`` is outside the table;
        GNTST_general_error if the entry is pinned by another domain or has
        128 pins of this kind, or (checked only when the entry is unpinned or
        this is its first writable map) it is not granted to ``domid``
        (flags not GTF_permit_access, e.g. never granted, ended, or cleared by
        a v2 end) or a writable map meets GTF_readonly.  GrantArgumentError if
        ``domid`` is not a u16."""
        _check_u("domid", domid, 16)
        mt = self._maptracks.get(domid)
        if mt is None:
            mt = self._maptracks[domid] = self._new_maptrack()
        handle = mt.get()
        if handle is None:
            raise GrantError(f"d{domid} has no maptrack handle left", status=GNTST_no_space)
        try:
            e = self._entry(ref, status=GNTST_bad_gntref)
            pinned = e.pin_ro or e.pin_rw
            if pinned and (e.map_domid != domid or (e.pin_ro if readonly else e.pin_rw) >= PIN_LIMIT):
                raise GrantError(f"ref {ref} pinned by d{e.map_domid} or its pin count is full",
                                 status=GNTST_general_error)
            if self._needs_set_status(e, readonly):
                self._set_status(e, domid, readonly)
        except GrantError:
            mt.put(handle)
            raise
        if not pinned:
            e.map_domid = domid
        if readonly:
            e.pin_ro += 1
        else:
            e.pin_rw += 1
        mt.live[handle] = (ref, readonly)
        return handle

    def unmap(self, handle: int, *, domid: int | None = None) -> None:
        """Unmap ``handle`` (Xen ``unmap_common`` + ``unmap_common_complete``):
        drop its pin, clear GTF_writing when the last RW pin goes and
        GTF_reading when the last pin goes, put the handle at the tail of the
        maptrack free list.  Handles belong to the mapping domain: ``domid``
        names it; if omitted, the one domain holding a live ``handle`` is used.
        Raises GrantError with status GNTST_bad_handle if the handle is not in
        use (in that domain); GrantArgumentError if ``domid`` is omitted and
        several domains hold a live ``handle``."""
        if domid is None:
            owners = [d for d, m in self._maptracks.items() if handle in m.live]
            if len(owners) > 1:
                raise GrantArgumentError(f"handle {handle} is live in domains {owners}: pass domid")
            domid = owners[0] if owners else -1
        mt = self._maptracks.get(domid)
        if mt is None or handle not in mt.live:
            raise GrantError(f"handle {handle} is not in use", status=GNTST_bad_handle)
        ref, readonly = mt.live.pop(handle)
        e = self._entries[ref]
        if readonly:
            e.pin_ro -= 1
        else:
            e.pin_rw -= 1
        if not e.pin_rw:
            e.status &= ~GTF_writing
        if not e.pin_ro and not e.pin_rw:
            e.status &= ~GTF_reading
            e.map_domid = None
        mt.put(handle)

    def copy(self, ref: int, domid: int, *, dest: bool = False, offset: int = 0,
             length: int = PAGE_SIZE) -> int:
        """One GNTTABOP_copy segment by domain ``domid`` with ``ref`` as its
        source (``dest=False``, read-only) or destination (``dest=True``),
        ``offset``/``length`` in bytes within the page (``gnttab_copy_one``,
        ``acquire_grant_for_copy``, ``gnttab_copy_buf``).  Returns the
        segment's GNTST status, never raises for it: ``length == 0`` is
        GNTST_okay without any check; then the same checks as :meth:`map`
        (GNTST_bad_gntref, GNTST_general_error: a copy into a read-only grant
        is -1); then ``offset + length > PAGE_SIZE`` GNTST_bad_copy_arg.  The
        pin is taken and dropped within the call, so nothing changes.  Raises
        GrantArgumentError if ``domid`` is not a u16 or ``offset``/``length``
        not a u16."""
        _check_u("domid", domid, 16)
        _check_u("offset", offset, 16)
        _check_u("length", length, 16)
        if length == 0:
            return GNTST_okay
        readonly = not dest
        try:
            e = self._entry(ref, status=GNTST_bad_gntref)
            pinned = e.pin_ro or e.pin_rw
            if pinned and (e.map_domid != domid or (e.pin_ro if readonly else e.pin_rw) >= PIN_LIMIT):
                return GNTST_general_error
            if self._needs_set_status(e, readonly):
                saved = e.status
                self._set_status(e, domid, readonly)
                e.status = saved  # release_grant_for_copy / reduce_status_for_pin
        except GrantError as exc:
            assert exc.status is not None
            return exc.status
        return GNTST_bad_copy_arg if offset + length > PAGE_SIZE else GNTST_okay

    # ------------------------------------------------------------ queries

    def entry(self, ref: int) -> GrantEntry:
        """Snapshot of ``ref`` (see :class:`GrantEntry`).  Raises GrantError
        with status GNTST_bad_gntref and errno EINVAL if ``ref`` is outside the
        table."""
        e = self._entry(ref, status=GNTST_bad_gntref, err=errno.EINVAL)
        flags = e.flags | e.status if self.version == 1 else e.flags
        return GrantEntry(ref, self.version, e.domid, e.gfn, bool(e.flags & GTF_readonly),
                          e.pin_ro, e.pin_rw, e.state != _FREE, e.state == _DEFERRED, flags,
                          e.status, e.map_domid)

    def usage_lines(self) -> list[UsageLine]:
        """What ``xl debug-keys g`` prints for this table: one line per pinned
        ref, ascending (``gnttab_usage_print``; the mfn is not modelled)."""
        lines = []
        for ref, e in enumerate(self._entries):
            if e.pin_ro or e.pin_rw:
                pin, flags = self.entry(ref).usage()
                assert e.map_domid is not None
                lines.append(UsageLine(ref, e.map_domid, pin, e.domid, e.gfn, flags))
        return lines

    def next_ref(self) -> int | None:
        """The ref the next :meth:`grant_foreign_access` returns (the free
        list's head), or None if none is free."""
        return self._free[-1] if self._free else None

    def deferred_refs(self) -> list[int]:
        """The deferred list, head first."""
        return list(self._deferred)

    def live_handles(self, domid: int) -> dict[int, int]:
        """Domain ``domid``'s live maptrack handles -> the ref each maps."""
        mt = self._maptracks.get(domid)
        return {h: ref for h, (ref, _) in mt.live.items()} if mt else {}

    def __len__(self) -> int:
        """Refs in use: granted or deferred (not free, not reserved)."""
        return self._in_use

    # ------------------------------------------------------------ internals (mutants override)

    def _entry(self, ref: int, *, status: int | None = None, err: int | None = None) -> _Entry:
        if not isinstance(ref, int) or not 0 <= ref < self.nr_entries:
            raise GrantError(f"grant ref {ref!r} is outside the table of {self.nr_entries}",
                             err=err, status=status)
        return self._entries[ref]

    def _release(self, ref: int) -> None:
        """The ref's end succeeded: it is free again."""
        self._entries[ref].state = _FREE
        self._in_use -= 1
        self._put_free(ref)

    def _put_free(self, ref: int) -> None:
        """put_free_entry: the freed ref becomes the free list's head."""
        self._free.append(ref)

    def _end_access_ref(self, e: _Entry) -> bool:
        """gnttab_end_foreign_access_ref_v1/_v2: True if the flags were
        cleared and the entry is no longer in use."""
        if self.version == 2:
            e.flags = 0
            return not e.status & (GTF_reading | GTF_writing)
        if e.status & (GTF_reading | GTF_writing):
            return False
        e.flags = 0
        return True

    def _deferred_try_end(self, e: _Entry) -> bool:
        return self._end_access_ref(e)

    def _requeue(self, ref: int) -> None:
        """A deferred ref still in use goes back at the tail."""
        self._deferred.append(ref)

    def _needs_set_status(self, e: _Entry, readonly: bool) -> bool:
        """map_grant_ref calls _set_status only for an unpinned entry or the
        first writable pin."""
        return not (e.pin_ro or e.pin_rw) or (not readonly and not e.pin_rw)

    def _set_status(self, e: _Entry, domid: int, readonly: bool) -> None:
        """_set_status_v1/_v2 for a map or copy by ``domid``: raise GrantError
        (GNTST_general_error) or set the status bits."""
        if not (e.pin_ro or e.pin_rw) and (e.flags & GTF_type_mask != GTF_permit_access or e.domid != domid):
            raise GrantError(f"grant flags {e.flags:#x} / domid {e.domid} do not permit d{domid}",
                             status=GNTST_general_error)
        if not readonly and e.flags & GTF_readonly:
            raise GrantError("writable map of a read-only grant", status=GNTST_general_error)
        e.status |= GTF_reading if readonly else GTF_reading | GTF_writing

    def _new_maptrack(self) -> Maptrack:
        return Maptrack(self.max_maptrack_frames)
