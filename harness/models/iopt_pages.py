"""Pin accounting of one ``iopt_pages``: which pages are pinned, and how often.

Stands for ``struct iopt_pages`` (Linux 6.12,
``drivers/iommu/iommufd/io_pagetable.h``): the user memory of one
IOMMU_IOAS_MAP, shared by every area that maps it, COPYs included, and its
``domains_itree``, the areas whose pages are filled into an IOMMU domain.
``pages.c`` pins a page while at least one such area covers it
(``iopt_area_fill_domains``/``iopt_area_unfill_domains``) and pins it only
once however many areas do; every page it pins adds one to ``mm->pinned_vm``
(``do_update_pinned``).

:class:`_Pages` is one ``iopt_pages``: its first user page, its length in
pages, whether the MAP was WRITEABLE and how many areas use it.
:class:`_Coverage` is its pin map: a step function over page indices
(0 = the page of the MAP's ``user_va``) giving how many filled areas cover
each page; a page is pinned where the count is non-zero.  Units: page indices
and counts of pages of ``page_size`` bytes; user VAs in bytes.

Complexity (s steps of one coverage, about 2 per area of those pages):
``covers`` O(log s); ``add`` of one area O(s) (list inserts), returning the
change in pinned pages so that ``pinned_vm`` stays O(1) to read; ``uncovered``
over a range O(log s + steps met); ``segments`` O(s).  Never one entry per page.
A count going below 0 raises ``AssertionError`` (an unfill without a fill: a
bug in the caller).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator


class _Coverage:
    """A step function over page indices of one ``iopt_pages``: how many
    domain-filled areas cover each index.  ``bounds`` is sorted; ``counts[i]``
    holds on ``[bounds[i], bounds[i+1])``; outside, the count is 0.  Adjacent
    steps never have equal counts and the last count is always 0."""

    __slots__ = ("bounds", "counts")

    def __init__(self) -> None:
        self.bounds: list[int] = []
        self.counts: list[int] = []

    def _count_at(self, x: int) -> int:
        i = bisect_right(self.bounds, x) - 1
        return self.counts[i] if i >= 0 else 0

    def _split(self, x: int) -> int:
        i = bisect_left(self.bounds, x)
        if i == len(self.bounds) or self.bounds[i] != x:
            c = self.counts[i - 1] if i > 0 else 0
            self.bounds.insert(i, x)
            self.counts.insert(i, c)
        return i

    def covers(self, index: int) -> bool:
        return self._count_at(index) > 0

    def uncovered(self, first: int, last: int) -> list[tuple[int, int]]:
        """The parts of ``[first, last]`` with count 0."""
        b, c = self.bounds, self.counts
        out: list[tuple[int, int]] = []
        i = bisect_right(b, first) - 1
        cur = first
        while cur <= last:
            cnt = c[i] if i >= 0 else 0
            end = b[i + 1] - 1 if i + 1 < len(b) else last
            end = min(end, last)
            if cnt == 0:
                if out and out[-1][1] + 1 == cur:
                    out[-1] = (out[-1][0], end)
                else:
                    out.append((cur, end))
            cur = end + 1
            i += 1
        return out

    def add(self, first: int, last: int, delta: int) -> int:
        """Add ``delta`` (+1 or -1) on ``[first, last]``; return how many
        indices went from 0 to non-zero (``delta`` > 0) or back to 0."""
        i = self._split(first)
        j = self._split(last + 1)
        counts, bounds = self.counts, self.bounds
        changed = 0
        for k in range(i, j):
            before = counts[k]
            after = before + delta
            if after < 0:
                raise AssertionError("pin coverage went negative")
            if (before == 0) != (after == 0):
                changed += bounds[k + 1] - bounds[k]
            counts[k] = after
        # Restore the invariants around the touched window [i-1, j].
        k = min(j, len(bounds) - 1)
        while k >= max(i, 1):
            if counts[k] == counts[k - 1]:
                del bounds[k], counts[k]
            k -= 1
        while counts and counts[0] == 0:
            del bounds[0], counts[0]
        return changed

    def segments(self) -> Iterator[tuple[int, int, int]]:
        """``(first, last, count)`` of every covered step."""
        b, c = self.bounds, self.counts
        for i in range(len(b) - 1):
            if c[i]:
                yield b[i], b[i + 1] - 1, c[i]


class _Pages:
    """One ``struct iopt_pages``: the user memory of one MAP, shared by copies."""

    __slots__ = ("seq", "base_page", "npages", "writable", "cov", "users")

    def __init__(self, seq: int, user_va: int, length: int, writable: bool, page_size: int) -> None:
        self.seq = seq
        self.base_page = user_va // page_size
        self.npages = (user_va + length - 1) // page_size - self.base_page + 1
        self.writable = writable
        self.cov = _Coverage()
        self.users = 0  # areas that reference these pages
