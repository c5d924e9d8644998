"""Deliberately wrong variants of the grant table model (:mod:`harness.models.grant`).

Each mutant is a subclass of :class:`GrantTable` that overrides one internal
method to break one rule of Linux's ``drivers/xen/grant-table.c`` or Xen's
``xen/common/grant_table.c``.  ``tests/unit/test_grant_mutants.py`` runs every
one against the naive oracle of ``tests/unit/test_grant_stateful.py`` and
requires that each is caught: a check that cannot tell these apart from the
real model checks nothing.

``MUTANTS`` maps a name to a :class:`Mutant` (``name``, one-line
``description`` of what is wrong, ``factory(nr_entries, version) -> GrantTable``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.models.grant import (
    GNTST_general_error,
    GTF_permit_access,
    GTF_reading,
    GTF_type_mask,
    GTF_writing,
    GrantError,
    GrantTable,
    _Entry,
)
from harness.models.grant_maptrack import Maptrack

__all__ = ["Mutant", "MUTANTS"]


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    factory: Callable[[int, int], GrantTable]


class _FifoReuse(GrantTable):
    def _put_free(self, ref: int) -> None:
        self._free.insert(0, ref)  # at the free list's tail


class _V1ClearsFlags(GrantTable):
    def _end_access_ref(self, e: _Entry) -> bool:
        e.flags = 0  # v2's order for every version
        return not e.status & (GTF_reading | GTF_writing)


class _RoMapWritable(GrantTable):
    def _set_status(self, e: _Entry, domid: int, readonly: bool) -> None:
        super()._set_status(e, domid, True)  # never sees the writable request
        if not readonly:
            e.status |= GTF_writing


class _DeferredFreeWhileMapped(GrantTable):
    def _deferred_try_end(self, e: _Entry) -> bool:
        self._end_access_ref(e)
        return True


class _DeferredRequeueHead(GrantTable):
    def _requeue(self, ref: int) -> None:
        self._deferred.appendleft(ref)


class _FlagsRecheckedWhenPinned(GrantTable):
    def _needs_set_status(self, e: _Entry, readonly: bool) -> bool:
        return True

    def _set_status(self, e: _Entry, domid: int, readonly: bool) -> None:
        if e.flags & GTF_type_mask != GTF_permit_access:
            raise GrantError("entry no longer granted", status=GNTST_general_error)
        super()._set_status(e, domid, readonly)


class _LifoMaptrack(Maptrack):
    def put(self, handle: int) -> None:
        self.free.appendleft(handle)


class _MaptrackLifo(GrantTable):
    def _new_maptrack(self) -> Maptrack:
        return _LifoMaptrack(self.max_maptrack_frames)


def _make(cls: type[GrantTable]) -> Callable[[int, int], GrantTable]:
    return lambda nr_entries, version: cls(nr_entries, version)


MUTANTS: dict[str, Mutant] = {m.name: m for m in (
    Mutant("grant-fifo-reuse", "freed refs go to the free list's tail (FIFO reuse)",
           _make(_FifoReuse)),
    Mutant("grant-v1-clears-flags", "a v1 end clears the flags before checking use, like v2",
           _make(_V1ClearsFlags)),
    Mutant("grant-ro-map-writable", "a writable map (or copy) of a read-only grant is allowed",
           _make(_RoMapWritable)),
    Mutant("grant-deferred-free-while-mapped", "the deferred timer frees refs still mapped",
           _make(_DeferredFreeWhileMapped)),
    Mutant("grant-deferred-requeue-head", "a deferred ref still in use is re-queued at the head",
           _make(_DeferredRequeueHead)),
    Mutant("grant-flags-rechecked-when-pinned",
           "every map checks GTF_permit_access, even of a pinned entry",
           _make(_FlagsRecheckedWhenPinned)),
    Mutant("grant-maptrack-lifo", "freed maptrack handles are reused first (LIFO)",
           _make(_MaptrackLifo)),
)}
