"""Deliberately wrong variants of the pinning model (:mod:`harness.models.pinning`).

Each mutant is a subclass of :class:`IommufdCtx` that overrides one internal
method to break one kernel rule.  The tests run every mutant against the
naive oracle of ``tests/unit/test_pinning_stateful.py`` and require that each
one is caught: a check that cannot tell these apart from the real model
checks nothing.  The differential tests can also run a mutant against a
guest to see that the comparison fails.

``MUTANTS`` maps a name to a :class:`Mutant` (``name``, one-line
``description`` of what is wrong, ``factory() -> IommufdCtx``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from harness.models.pinning import (
    IOAS,
    Domain,
    IommufdCtx,
    IommufdError,
    _Area,
    _Pages,
    _Piece,
)

__all__ = ["Mutant", "MUTANTS"]


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    factory: Callable[[], IommufdCtx]


class _UnmapSplits(IommufdCtx):
    def _unmap_range(self, ioas: IOAS, start: int, last: int) -> int:
        # Trims areas that stick out instead of refusing: keeps the outside parts.
        unmapped = 0
        while True:
            a = ioas._tree.first_intersecting(start, last)
            if a is None:
                break
            self._remove(ioas, a)
            lo, hi = max(a.iova, start), min(a.last, last)
            if a.iova < lo:
                self._keep(ioas, a, a.iova, lo - 1)
            if hi < a.last:
                self._keep(ioas, a, hi + 1, a.last)
            unmapped += hi - lo + 1
        if not unmapped:
            raise IommufdError(errno.ENOENT, "no area in the range")
        return unmapped

    def _keep(self, ioas: IOAS, a: _Area, first: int, last: int) -> None:
        part = _Area(first, last, a.pages, a.start_byte + (first - a.iova), a.readable,
                     a.writeable)
        self._insert(ioas, part)
        if self._should_fill(ioas):
            self._fill(part)


class _CopyPins(IommufdCtx):
    def _get_pages(self, ioas: IOAS, iova: int, length: int) -> list[_Piece]:
        # Each copied piece gets pages of its own, so it is pinned again.
        pieces = super()._get_pages(ioas, iova, length)
        out = []
        for p in pieces:
            user_va = p.pages.base_page * self.page_size + p.start_byte
            fresh = self._new_pages(user_va, p.length, p.pages.writable)
            out.append(_Piece(fresh, user_va % self.page_size, p.length))
        return out


class _EagerPinning(IommufdCtx):
    def _should_fill(self, ioas: IOAS) -> bool:
        return True  # pins at MAP even without a domain


class _AutoIovaUnaligned(IommufdCtx):
    def _auto_alignment(self, ioas: IOAS, user_va: int, length: int) -> int:
        return ioas.iova_alignment  # ignores length and user_va alignment


class _PartialUnmapRollback(IommufdCtx):
    def _unmap_range(self, ioas: IOAS, start: int, last: int) -> int:
        removed: list[_Area] = []
        tree = ioas._tree
        while True:
            a = tree.first_intersecting(start, last)
            if a is None:
                break
            if a.iova < start or a.last > last:
                for r in removed:  # puts back what it removed before the ENOENT
                    self._insert(ioas, r)
                    if self._should_fill(ioas):
                        self._fill(r)
                raise IommufdError(errno.ENOENT, "area sticks out", unmapped=0)
            self._remove(ioas, a)
            removed.append(a)
        if not removed:
            raise IommufdError(errno.ENOENT, "no area in the range")
        return sum(a.length() for a in removed)


class _DetachKeepsPins(IommufdCtx):
    def _remove_domain(self, ioas: IOAS, domain: Domain) -> None:
        # Forgets to unpin when the last domain goes.
        ioas._domains.remove(domain)
        domain.attached = False
        ioas._reserved = [r for r in ioas._reserved if r[2] is not domain]
        ioas._iova_alignment = self._calc_alignment(ioas)


class _CopyIgnoresReadOnly(IommufdCtx):
    def _check_insert(self, ioas: IOAS, piece: _Piece, writeable: bool) -> None:
        super()._check_insert(ioas, piece, False)  # no EPERM for writeable copies


class _ReservedAfterAreas(IommufdCtx):
    def _check_iova(self, ioas: IOAS, iova: int, length: int) -> None:
        # EEXIST before the reserved-range EINVAL (wrong order of checks).
        last = iova + length - 1
        if last <= 2**64 - 1 and ioas._tree.first_intersecting(iova, last) is not None:
            raise IommufdError(errno.EEXIST)
        super()._check_iova(ioas, iova, length)


class _IdsNeverReused(IommufdCtx):
    def _alloc_id(self) -> int:
        i = self._next_id  # cyclic allocation instead of the lowest free id
        self._next_id += 1
        return i


class _SharedPagesForEveryMap(IommufdCtx):
    def _new_pages(self, user_va: int, length: int, writable: bool) -> _Pages:
        # Reuses the pages of an earlier map of the same user range: pins once.
        for p in self._pages.values():
            if p.base_page == user_va // self.page_size and p.npages * self.page_size >= length:
                return p
        return super()._new_pages(user_va, length, writable)


def _entry(name: str, description: str, cls: type[IommufdCtx]) -> tuple[str, Mutant]:
    return name, Mutant(name, description, cls)


MUTANTS: dict[str, Mutant] = dict(
    [
        _entry("unmap-splits", "an UNMAP of part of an area splits it instead of ENOENT",
               _UnmapSplits),
        _entry("copy-pins", "COPY gives the copy pages of its own, so they are pinned again",
               _CopyPins),
        _entry("eager-pinning", "MAP pins the pages even when the IOAS has no domain",
               _EagerPinning),
        _entry("auto-iova-unaligned",
               "the automatic IOVA ignores the length and user VA alignment rule",
               _AutoIovaUnaligned),
        _entry("partial-unmap-rollback",
               "an UNMAP that stops with ENOENT restores the areas it had removed",
               _PartialUnmapRollback),
        _entry("detach-keeps-pins", "detaching the last domain leaves the pages pinned",
               _DetachKeepsPins),
        _entry("copy-ignores-readonly",
               "a writeable COPY of pages mapped read-only is allowed instead of EPERM",
               _CopyIgnoresReadOnly),
        _entry("eexist-before-reserved",
               "a fixed MAP checks areas (EEXIST) before reserved ranges (EINVAL)",
               _ReservedAfterAreas),
        _entry("ids-never-reused", "object ids are allocated cyclically, not lowest-free",
               _IdsNeverReused),
        _entry("maps-share-pages",
               "two MAPs of the same user memory share one iopt_pages and pin once",
               _SharedPagesForEveryMap),
    ]
)
