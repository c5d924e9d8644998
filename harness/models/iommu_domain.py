"""Reference model of one IOMMU paging domain's mappings (Linux 6.12).

An IOMMU domain translates IO-virtual addresses (IOVAs, what a device is
given) to guest-physical addresses (``paddr``), page by page, with read and
write permissions.  This model states what drivers/iommu/iommu.c promises
about ``iommu_map()`` / ``__iommu_map()`` and ``iommu_unmap()`` /
``__iommu_unmap()``, so the harness can replay the guest's ``iommu:map`` and
``iommu:unmap`` trace events into it and judge the translations a device made.
It is pure Python: no I/O, no clock, deterministic.

Rules (all addresses and sizes in bytes, ``min_pagesz`` 4 KiB by default: the
smallest page of ``pgsize_bitmap``):

* ``map``: ``iova``, ``paddr`` and ``size`` must be multiples of
  ``min_pagesz`` (``__iommu_map``: ``!IS_ALIGNED(iova | paddr | size,
  min_pagesz)`` -> ``-EINVAL``).  ``size`` 0 is accepted and maps nothing:
  ``__iommu_map`` skips its loop, returns 0 and traces ``iommu:map`` with
  ``size=0``.  ``prot`` must allow reading or writing (VT-d
  ``__domain_mapping``: ``(prot & (DMA_PTE_READ|DMA_PTE_WRITE)) == 0`` ->
  ``-EINVAL``).  The range must fit the 64-bit address space (VT-d:
  ``domain_pfn_supported`` -> ``-EINVAL``).  Mapping over an IOVA that is
  already mapped raises ``EEXIST`` and changes nothing; see :meth:`IommuDomain.map`.
* ``unmap``: ``iova`` and ``size`` must be multiples of ``min_pagesz``, else
  nothing is unmapped and 0 returned (``__iommu_unmap``).  Pages are
  unmapped in order from ``iova`` while they are mapped; the first hole stops
  the unmap, and the bytes unmapped before it are returned.  Unmapping part of
  a mapping splits it: the rest stays mapped.

What the model does not know: the page sizes the driver chose (2 MiB, 1 GiB
superpages).  It works at ``min_pagesz`` granularity, which is what
``iommu_unmap``'s contract promises to callers.  The VT-d driver itself
returns more than asked when the IOVA lies in a superpage, and
``intel_iommu_unmap`` does not stop at holes (it returns the whole size, or
more when the hole is a non-present directory entry); those are visible in
the ``unmapped_size`` of ``iommu:unmap`` and are for a checker to judge.

Storage: a sorted list of non-overlapping mappings (maximal ranges as they
were mapped or left by splits; adjacent ranges are not merged) and a parallel
list of their start IOVAs for ``bisect``.  Finding the mapping of an IOVA is
O(log n) for n stored mappings; inserting or removing one is a list
insertion/deletion (a memmove).  Memory is bounded by the number of mappings,
never by their size: mapping 1 GiB stores one entry.
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "IOMMU_READ",
    "IOMMU_WRITE",
    "IOMMU_CACHE",
    "IOMMU_NOEXEC",
    "IOMMU_MMIO",
    "IOMMU_PRIV",
    "U64_LIMIT",
    "DomainError",
    "Mapping",
    "IommuDomain",
]

IOMMU_READ: Final = 1 << 0
"""The device may read the page (include/linux/iommu.h)."""
IOMMU_WRITE: Final = 1 << 1
"""The device may write the page (include/linux/iommu.h)."""
IOMMU_CACHE: Final = 1 << 2
IOMMU_NOEXEC: Final = 1 << 3
IOMMU_MMIO: Final = 1 << 4
IOMMU_PRIV: Final = 1 << 5

U64_LIMIT: Final = 1 << 64
"""One past the last IOVA / physical address (``unsigned long`` on 64-bit)."""

_INT_MAX: Final = (1 << 31) - 1


class DomainError(OSError):
    """A map the kernel refuses; ``errno`` is the kernel's (``EINVAL``, ``EEXIST``)."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """IOVAs ``[iova, last]`` (inclusive) map to guest-physical addresses from
    ``paddr`` with permission ``prot`` (``IOMMU_*`` bits).  ``origin`` is what
    the caller passed to :meth:`IommuDomain.map` (a split keeps it)."""

    iova: int
    last: int
    paddr: int
    prot: int
    origin: object = None

    @property
    def size(self) -> int:
        """Bytes covered."""
        return self.last - self.iova + 1

    def phys(self, iova: int) -> int:
        """Guest-physical address of byte ``iova``.

        Raises ValueError if ``iova`` is outside this mapping.
        """
        if not self.iova <= iova <= self.last:
            raise ValueError(f"iova {iova:#x} outside [{self.iova:#x}, {self.last:#x}]")
        return self.paddr + (iova - self.iova)

    def __contains__(self, iova: object) -> bool:
        return isinstance(iova, int) and self.iova <= iova <= self.last


def _check_u64(name: str, value: int) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < U64_LIMIT:
        raise DomainError(errno.EINVAL, f"{name} {value:#x} outside the 64-bit address space")


class IommuDomain:
    """The mappings of one IOMMU paging domain (see the module docstring)."""

    __slots__ = ("_min_pagesz", "_starts", "_maps", "_bytes")

    def __init__(self, min_pagesz: int = 4096) -> None:
        """``min_pagesz``: the smallest page size, a power of two (bytes).

        Raises ValueError for anything else.
        """
        if not isinstance(min_pagesz, int) or min_pagesz <= 0 or min_pagesz & (min_pagesz - 1):
            raise ValueError(f"min_pagesz must be a power of two, not {min_pagesz!r}")
        self._min_pagesz = min_pagesz
        self._starts: list[int] = []
        self._maps: list[Mapping] = []
        self._bytes = 0

    @property
    def min_pagesz(self) -> int:
        """The smallest page size in bytes."""
        return self._min_pagesz

    @property
    def mapped_bytes(self) -> int:
        """Bytes of IOVA space mapped."""
        return self._bytes

    def __len__(self) -> int:
        """Number of mapping ranges stored (not pages)."""
        return len(self._maps)

    def __iter__(self) -> Iterator[Mapping]:
        return iter(list(self._maps))

    def mappings(self) -> list[Mapping]:
        """All mappings, ascending by IOVA."""
        return list(self._maps)

    def _index(self, iova: int) -> int:
        """Index of the mapping containing ``iova``, or -1."""
        i = bisect_right(self._starts, iova) - 1
        if i >= 0 and self._maps[i].last >= iova:
            return i
        return -1

    def translate(self, iova: int) -> Mapping | None:
        """The mapping containing byte ``iova``, or None (also for an
        ``iova`` outside the 64-bit space)."""
        if not isinstance(iova, int) or not 0 <= iova < U64_LIMIT:
            return None
        i = self._index(iova)
        return self._maps[i] if i >= 0 else None

    def overlapping(self, iova: int, size: int) -> list[Mapping]:
        """The mappings that share at least one byte with ``[iova, iova + size)``,
        ascending (whole mappings, not clipped)."""
        if size <= 0 or iova >= U64_LIMIT or iova + size <= 0:
            return []
        last = min(iova + size, U64_LIMIT) - 1
        i = max(bisect_right(self._starts, max(iova, 0)) - 1, 0)
        out = []
        while i < len(self._maps) and self._maps[i].iova <= last:
            if self._maps[i].last >= iova:
                out.append(self._maps[i])
            i += 1
        return out

    def map(self, iova: int, paddr: int, size: int, prot: int, *, origin: object = None) -> None:
        """Map ``[iova, iova + size)`` to guest-physical ``paddr`` with ``prot``.

        Raises :class:`DomainError`:

        * ``EINVAL``: ``iova``, ``paddr`` or ``size`` not a multiple of
          ``min_pagesz``, a range beyond the 64-bit space, or ``prot``
          without ``IOMMU_READ`` or ``IOMMU_WRITE``;
        * ``EEXIST``: some page of the range is already mapped.

        A double map is all-or-nothing here: the domain is left unchanged.
        ``EEXIST`` is what the io-pgtable drivers return for a present PTE
        (drivers/iommu/io-pgtable-arm.c ``arm_lpae_init_pte``, io-pgtable-arm-v7s.c,
        io-pgtable-dart.c), after which ``__iommu_map`` unmaps what this call
        mapped and does not trace ``iommu:map``: the trace never shows the
        attempt.  The VT-d driver in 6.12 returns no error at all:
        ``__domain_mapping`` (drivers/iommu/intel/iommu.c) finds the PTE
        present with ``try_cmpxchg64_local``, prints "DMA PTE for vPFN ...
        already set", ``WARN_ON(1)``, keeps the old PTE and goes on, so
        ``iommu_map`` returns 0 and ``iommu:map`` *is* traced.  Either way a
        map over a live mapping is a kernel bug, which the model reports by
        raising instead of guessing a state.

        ``size`` 0 maps nothing and succeeds (``__iommu_map`` does the same).
        """
        _check_u64("iova", iova)
        _check_u64("paddr", paddr)
        _check_u64("size", size)
        if not isinstance(prot, int):
            raise TypeError(f"prot must be an int, not {type(prot).__name__}")
        pg = self._min_pagesz
        if (iova | paddr | size) & (pg - 1):
            raise DomainError(
                errno.EINVAL,
                f"unaligned: iova {iova:#x} pa {paddr:#x} size {size:#x} min_pagesz {pg:#x}")
        if iova + size > U64_LIMIT or paddr + size > U64_LIMIT:
            raise DomainError(errno.EINVAL, f"iova {iova:#x} pa {paddr:#x} size {size:#x} wraps")
        if not 0 <= prot <= _INT_MAX or not prot & (IOMMU_READ | IOMMU_WRITE):
            raise DomainError(errno.EINVAL, f"prot {prot:#x} allows neither read nor write")
        if size == 0:
            return
        last = iova + size - 1
        i = bisect_right(self._starts, last)  # first mapping starting after last
        if i > 0 and self._maps[i - 1].last >= iova:
            other = self._maps[i - 1]
            raise DomainError(
                errno.EEXIST,
                f"iova {max(iova, other.iova):#x} already mapped "
                f"([{other.iova:#x}, {other.last:#x}] -> {other.paddr:#x})")
        self._starts.insert(i, iova)
        self._maps.insert(i, Mapping(iova, last, paddr, prot, origin))
        self._bytes += size

    def unmap(self, iova: int, size: int) -> int:
        """Unmap from ``iova`` up to ``size`` bytes; return the bytes unmapped.

        As ``__iommu_unmap``: 0 if ``iova`` or ``size`` is not a multiple of
        ``min_pagesz``; otherwise pages are unmapped in order while mapped,
        the first hole stops it (the bytes before the hole are returned), and a
        mapping cut by either end is split, its rest staying mapped.
        """
        _check_u64("iova", iova)
        _check_u64("size", size)
        if (iova | size) & (self._min_pagesz - 1) or size == 0:
            return 0
        end = min(iova + size, U64_LIMIT)  # the address space ends there: a hole
        cur = iova
        i = self._index(cur)
        if i < 0:
            return 0
        starts, maps = self._starts, self._maps
        while cur < end and i < len(maps) and maps[i].iova <= cur:
            m = maps[i]
            cut = min(end, m.last + 1)
            pieces = []
            if m.iova < cur:
                pieces.append(Mapping(m.iova, cur - 1, m.paddr, m.prot, m.origin))
            if cut <= m.last:
                pieces.append(Mapping(cut, m.last, m.paddr + (cut - m.iova), m.prot, m.origin))
            starts[i:i + 1] = [p.iova for p in pieces]
            maps[i:i + 1] = pieces
            i += len(pieces)
            self._bytes -= cut - cur
            cur = cut
        return cur - iova

    def __repr__(self) -> str:
        return (f"IommuDomain(min_pagesz={self._min_pagesz:#x}, mappings={len(self._maps)}, "
                f"mapped_bytes={self._bytes:#x})")
