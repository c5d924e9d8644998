"""Reference model of iommufd's IO address spaces and page pinning (Linux 6.12).

One :class:`IommufdCtx` is one open ``/dev/iommu``.  It holds IOASes
(``struct iommufd_ioas`` / ``struct io_pagetable``), each a set of
non-overlapping *areas* (``struct iopt_area``): ranges of IO-virtual
addresses (IOVA) backed by a slice of user memory (``struct iopt_pages``).
The model states what the kernel promises about them, so that the harness
can run the same ioctls in a guest and in the model and compare errnos,
returned IOVAs, unmapped byte counts, per-page pin counts
(``IOMMU_TEST_OP_MD_CHECK_REFS``) and ``VmPin``.  It is pure Python: no I/O,
no clock, deterministic.

Sources of the semantics (Linux 6.12, ``drivers/iommu/iommufd/``):

* ``ioas.c``: ``iommufd_ioas_map`` (errno order of MAP), ``iommufd_ioas_copy``,
  ``iommufd_ioas_unmap`` (``iova == 0 && length == U64_MAX`` is unmap-all),
  ``iommufd_ioas_iova_ranges`` (holes of the reserved tree only),
  ``iommufd_ioas_allow_iovas``/``iommufd_ioas_load_iovas``,
  ``iommufd_ioas_option_huge_pages``.
* ``io_pagetable.c``: ``iopt_alloc_iova`` (automatic IOVA), ``iopt_check_iova``,
  ``iopt_alloc_area_pages``, ``iopt_insert_area``, ``iopt_get_pages``,
  ``iopt_unmap_iova_range``/``iopt_unmap_all``, ``iopt_reserve_iova``,
  ``iopt_set_allow_iova``, ``iopt_table_add_domain``/``iopt_table_remove_domain``,
  ``iopt_check_iova_alignment``, ``iopt_calculate_iova_alignment``,
  ``iopt_disable_large_pages``, ``iopt_add_access``.
* ``pages.c``: ``iopt_alloc_pages`` (EINVAL/EOVERFLOW on length and user VA),
  ``iopt_area_fill_domains``/``iopt_area_unfill_domains`` (pins follow the
  union of the pages' areas that sit in an IOAS with a domain; pages already
  pinned by the same ``iopt_pages`` are not pinned again), ``do_update_pinned``
  (every pinned page adds to ``mm->pinned_vm``, whatever the accounting mode),
  ``iopt_pages_rw_access``.
* ``device.c``: ``iommufd_access_rw`` (errnos of ACCESS_RW),
  ``iommufd_access_create``/``iommufd_access_attach`` (an access takes an
  object id), ``iommufd_device_bind`` (a device takes an id),
  ``iommufd_device_auto_get_domain`` (a second device attached to an IOAS
  reuses its automatic HWPT), ``iommufd_hw_pagetable_put`` (an automatic HWPT
  is destroyed with its last device).
* ``main.c``: ``iommufd_object_alloc`` (``xa_alloc`` in an ``XA_FLAGS_ALLOC1``
  xarray: the lowest free id >= 1, shared by every object), ``iommufd_destroy``
  / ``iommufd_object_remove`` (ENOENT, EBUSY while the object has users).
* ``selftest.c``: ``iommufd_test_mock_domain`` (ids in the order selftest
  object, device, HWPT), the mock domain (aperture ``[MOCK_APERTURE_START,
  MOCK_APERTURE_LAST]`` = ``[0x1000000, 0x7fffffff]``, ``pgsize_bitmap`` =
  ``MOCK_IO_PAGE_SIZE`` = PAGE_SIZE / 2), ``iommufd_test_access_rw``
  (ENOMEM above 16 MiB), ``iommufd_test_add_reserved``.

Units: IOVAs, user VAs (``user_va``) and lengths are in bytes; pin counts
and ``pinned_vm`` are in pages of ``page_size`` bytes.  Every u64 argument
must be an ``int`` in ``[0, U64_MAX]`` (``ValueError`` otherwise: that is a
bug in the caller, not a kernel errno).  ``ULONG_MAX`` is ``U64_MAX``
(x86-64).

Where the model differs from /work/shared SEMANTICS.md section 2, it follows
the kernel source and the guest:

1. Automatic IOVA alignment is capped (``iopt_alloc_iova`` since "iommufd:
   Protect against overflow of ALIGN() during iova allocation", in 6.12) at
   ``HPAGE_SIZE`` with ``CONFIG_TRANSPARENT_HUGEPAGE``, else at PAGE_SIZE.
   The project's guest kernel has THP off, and the guest confirmed the
   PAGE_SIZE cap: ``(user_va 0x100030000, length 0x3000)`` got iova 0x5000,
   not 0x8000.  So ``max_auto_alignment`` defaults to ``page_size``; pass
   ``HPAGE_SIZE`` for a kernel with THP.  SEMANTICS.md states neither cap.
2. The holes of an allowed span are searched from the span's *aligned* start
   (``__alloc_iova_check_used`` moves ``start_used``).  With the 2 MiB cap,
   ``ALIGN`` of a hole start in the last 2 MiB wraps to 0: the kernel then
   returns iova 0 if that is free, and with ``CONFIG_IOMMUFD_TEST`` (the guest
   has it) EINVAL when ``iopt_check_iova`` refuses it; the model does both.
3. COPY's EPERM is about the *pages*: a writeable copy is refused when the
   original MAP was not WRITEABLE (``iopt_insert_area``: ``!pages->writable``),
   not when the source area is read-only; a read-only copy of a writeable map
   can be copied again as writeable.  EPERM and the sub-page alignment EINVAL
   of ``iopt_insert_area`` come after the IOVA checks (EEXIST, ENOSPC ...).
4. MAP checks ``user_va + length`` for overflow (``iopt_alloc_pages``), so a
   map that ends exactly at 2**64 is EOVERFLOW; a MAP whose ``user_va`` page
   offset is not a multiple of the IOAS's ``iova_alignment`` is EINVAL
   (``iopt_insert_area``), after the IOVA checks.
5. IOVA_RANGES reports the holes of the reserved ranges only; the allowed list
   does not appear in it (``iommufd_ioas_iova_ranges``).
6. UNMAP looks the IOAS up before checking the length (ENOENT first), and on a
   partial ENOENT the ioctl does not write ``length`` back: the caller sees its
   own length.  :class:`IommufdError` carries what was removed anyway
   (``unmapped``).
7. A second mock domain on the same IOAS gets new selftest and device ids but
   shares the first one's HWPT (``iommufd_device_auto_get_domain``): no new
   id, no second domain, no new pins.  The HWPT (and its domain, and the pins)
   go away with the last device.
8. ALLOW_IOVAS refuses a range with ``start >= last`` (a one-byte range too).
9. IOMMU_TEST_OP_MOCK_DOMAIN fails EINVAL (no id consumed) in a guest whose
   real IOMMU (intel-iommu) registered before the selftest's mock IOMMU: the
   mock device gets no IOMMU and ``iommufd_device_bind`` refuses it.
   ``IommufdCtx(real_iommu=True)`` models such a guest.

Confirmed in the guest (Linux 6.12.95): ids (MOCK_DOMAIN on IOAS 1 with IOAS
2 present: stdev 3, idev 4, hwpt 5; a second one: stdev 6, idev 7, hwpt 5),
the MAP errno order, the automatic IOVAs, the partial UNMAP, COPY's pins and
EPERM, lazy pinning and the DESTROY EBUSY cases; the unit tests replay those
sequences.

Not modelled: RLIMIT_MEMLOCK accounting and its ENOMEM (the guest runs as
root: ``IOPT_PAGES_ACCOUNT_NONE``, but ``pinned_vm`` still counts), pins held
by ``IOMMU_TEST_OP_ACCESS_PAGES``, VFIO type1 compatibility (area splitting),
nested HWPTs, dirty tracking, huge IOMMU pages.  ``VmPin`` is per process:
two contexts of one process add up; each :class:`IommufdCtx` counts its own.

Layout: this module holds the ioctls, the object ids, the domains and the
areas (``_Area``, ``struct iopt_area``).  The ordered area tree with its gap
search (``iopt->area_itree``) is :mod:`harness.models.iopt_tree`; the pin map
of one ``iopt_pages`` and its counting is :mod:`harness.models.iopt_pages`.
Their private names (``_AreaTree``, ``_Node``, ``_Pages``, ``_Coverage``) are
re-exported here for :mod:`harness.models.pinning_mutants`.

Exception hierarchy::

    OSError
     +-- IommufdError   every refusal the kernel would return as -errno; .errno
                        is the kernel's; .unmapped is what an UNMAP removed
                        before it stopped (0 otherwise)
    ValueError          an argument the ioctl could not even carry (negative,
                        above U64_MAX, a non-power-of-two alignment ...)

Complexity (n areas in the IOAS, k areas touched, r reserved/allowed ranges,
p live ``iopt_pages``): fixed MAP and UNMAP of one area O(log n + r);
automatic IOVA O((log n + r) * c) where c is the number of holes that are
long enough but fail the alignment (usually 0 or 1); COPY O(k log n + r);
``pinned_vm`` O(1); ``refs`` O(p log s) (s: segments of one pages' pin map,
about 2 per area of those pages); ``areas()`` O(n); attaching the first
domain or detaching the last O(n).  Pins are counted with one step function
per ``iopt_pages`` over its page indices, never with a dict of pages.
"""

from __future__ import annotations

import errno as _errno
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from harness.models.iopt_pages import _Coverage as _Coverage
from harness.models.iopt_pages import _Pages as _Pages
from harness.models.iopt_tree import _AreaTree as _AreaTree
from harness.models.iopt_tree import _Node as _Node

__all__ = [
    "U64_MAX",
    "ULONG_MAX",
    "PAGE_SIZE",
    "HPAGE_SIZE",
    "MOCK_APERTURE_START",
    "MOCK_APERTURE_LAST",
    "ACCESS_RW_MAX",
    "IommufdError",
    "Area",
    "Domain",
    "MockDomain",
    "IOAS",
    "IommufdCtx",
]

U64_MAX: Final = 2**64 - 1
ULONG_MAX: Final = U64_MAX
PAGE_SIZE: Final = 4096
HPAGE_SIZE: Final = 2 * 1024 * 1024
MOCK_APERTURE_START: Final = 1 << 24  # selftest.c / iommufd_test.h MOCK_APERTURE_START
MOCK_APERTURE_LAST: Final = (1 << 31) - 1  # MOCK_APERTURE_LAST
ACCESS_RW_MAX: Final = 16 * 1024 * 1024  # iommufd_test_access_rw: larger is ENOMEM
_MASK: Final = U64_MAX

_STRERROR = {
    _errno.EEXIST: "an area already intersects the range",
    _errno.ENOENT: "no such object or no area there",
    _errno.EINVAL: "invalid argument",
    _errno.EOVERFLOW: "value out of range",
    _errno.ENOSPC: "no free IOVA range fits",
    _errno.EPERM: "protection refused",
    _errno.EADDRINUSE: "the range is in use",
    _errno.EBUSY: "the object is in use",
    _errno.EFAULT: "user memory is not mapped",
    _errno.ENOMEM: "too large",
}


class IommufdError(OSError):
    """A refusal the kernel returns as ``-errno``.

    ``.errno`` is the kernel's errno (``errno.ENOENT`` ...), ``.strerror`` a
    short reason.  ``.unmapped`` (bytes) is what an UNMAP removed before it
    stopped with ENOENT; the ioctl itself does not report it (``length`` is
    not written back on failure), but the areas stay removed.
    """

    def __init__(self, err: int, reason: str | None = None, *, unmapped: int = 0) -> None:
        super().__init__(err, reason or _STRERROR.get(err, "error"))
        self.unmapped = unmapped


def _fail(err: int, reason: str | None = None) -> IommufdError:
    return IommufdError(err, reason)


def _u64(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} must be an int in [0, 2**64-1], got {value!r}")
    return value


def _roundup_pow_of_two(x: int) -> int:
    return 1 << (x - 1).bit_length() if x > 1 else 1


def _align(x: int, a: int) -> int:
    """The kernel's ``ALIGN(x, a)`` in 64-bit arithmetic (it can wrap)."""
    return (x + a - 1) & ~(a - 1) & _MASK


def _merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of closed ranges, touching ranges merged (``interval_tree_span_iter``)."""
    out: list[tuple[int, int]] = []
    for s, l in sorted(spans):
        if out and s <= out[-1][1] + 1:
            if l > out[-1][1]:
                out[-1] = (out[-1][0], l)
        else:
            out.append((s, l))
    return out


def _holes(used: list[tuple[int, int]], first: int, last: int) -> Iterator[tuple[int, int]]:
    """Maximal sub-ranges of ``[first, last]`` outside ``used`` (merged, sorted)."""
    cur = first
    for s, l in used:
        if l < cur:
            continue
        if s > last:
            break
        if s > cur:
            yield cur, s - 1
        cur = l + 1
        if cur > last:
            return
    if cur <= last:
        yield cur, last


# --------------------------------------------------------------------------- areas


class _Area:
    """One ``struct iopt_area``: ``[iova, last]`` backed by ``pages`` from
    ``start_byte`` (offset from the page-aligned start of the pages)."""

    __slots__ = ("iova", "last", "pages", "start_byte", "readable", "writeable", "filled")

    def __init__(
        self, iova: int, last: int, pages: _Pages, start_byte: int, readable: bool, writeable: bool
    ) -> None:
        self.iova = iova
        self.last = last
        self.pages = pages
        self.start_byte = start_byte
        self.readable = readable
        self.writeable = writeable
        self.filled = False  # in pages->domains_itree: its pages are pinned for it

    def length(self) -> int:
        return self.last - self.iova + 1

    def first_index(self, page_size: int) -> int:
        return self.start_byte // page_size

    def last_index(self, page_size: int) -> int:
        return (self.start_byte + self.length() - 1) // page_size


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class Area:
    """A snapshot of one area: IOVAs ``[iova, last]`` (bytes) map the user
    VAs from ``user_va``; ``readable``/``writeable`` are the area's IOMMU
    protection (IOMMU_IOAS_MAP_READABLE / WRITEABLE)."""

    iova: int
    last: int
    user_va: int
    readable: bool
    writeable: bool

    @property
    def length(self) -> int:
        return self.last - self.iova + 1


class Domain:
    """An ``iommu_domain`` attached to an IOAS (``iopt_table_add_domain``):
    ``aperture`` ``(start, last)`` (None: the whole 64-bit space; everything
    outside is reserved while attached) and ``iova_alignment`` (bytes: the
    smallest page of its ``pgsize_bitmap``)."""

    __slots__ = ("ioas", "aperture", "iova_alignment", "attached")

    def __init__(self, ioas: IOAS, aperture: tuple[int, int] | None, iova_alignment: int) -> None:
        self.ioas = ioas
        self.aperture = aperture
        self.iova_alignment = iova_alignment
        self.attached = False

    def __repr__(self) -> str:
        return f"Domain(ioas={self.ioas.id}, aperture={self.aperture}, align={self.iova_alignment})"


@dataclass
class MockDomain:
    """What IOMMU_TEST_OP_MOCK_DOMAIN returns: the selftest object id
    (``stdev_id``: DESTROY it to detach and unbind), the HWPT id and the
    device id, plus the model's :class:`Domain` (shared by every mock device
    of the IOAS)."""

    stdev_id: int
    hwpt_id: int
    idev_id: int
    ioas: IOAS
    domain: Domain


class _Hwpt:
    __slots__ = ("id", "ioas", "domain", "devices")

    def __init__(self, hwpt_id: int, ioas: IOAS, domain: Domain) -> None:
        self.id = hwpt_id
        self.ioas = ioas
        self.domain = domain
        self.devices: set[int] = set()  # stdev ids


class _Idev:
    __slots__ = ("id", "stdev_id")

    def __init__(self, idev_id: int, stdev_id: int) -> None:
        self.id = idev_id
        self.stdev_id = stdev_id


class _Access:
    __slots__ = ("id", "ioas", "iova_alignment")

    def __init__(self, access_id: int, ioas: IOAS, iova_alignment: int) -> None:
        self.id = access_id
        self.ioas = ioas
        self.iova_alignment = iova_alignment


class _Piece:
    """One element of ``iopt_get_pages``'s list: a slice of an ``iopt_pages``."""

    __slots__ = ("pages", "start_byte", "length")

    def __init__(self, pages: _Pages, start_byte: int, length: int) -> None:
        self.pages = pages
        self.start_byte = start_byte
        self.length = length


class IOAS:
    """One IO address space (``IOMMU_IOAS_ALLOC``).  Every method raises
    :class:`IommufdError` ENOENT once the IOAS was destroyed."""

    def __init__(self, ctx: IommufdCtx, ioas_id: int) -> None:
        self._ctx = ctx
        self.id = ioas_id
        self._tree: _AreaTree[_Area] = _AreaTree()
        self._reserved: list[tuple[int, int, object]] = []  # (start, last, owner)
        self._allowed: list[tuple[int, int]] = []
        self._domains: list[Domain] = []
        self._accesses: list[_Access] = []
        self._iova_alignment = 1
        self._disable_large_pages = False
        self._destroyed = False
        self._hwpt: _Hwpt | None = None  # the automatic mock HWPT, if any

    def __repr__(self) -> str:
        return f"IOAS(id={self.id}, areas={self._tree.count}, domains={len(self._domains)})"

    # -- state --------------------------------------------------------------

    @property
    def iova_alignment(self) -> int:
        """``iopt->iova_alignment`` in bytes (``out_iova_alignment`` of IOVA_RANGES)."""
        return self._iova_alignment

    @property
    def domains(self) -> tuple[Domain, ...]:
        return tuple(self._domains)

    def areas(self) -> list[Area]:
        """Every area, ascending by IOVA."""
        ps = self._ctx.page_size
        return [
            Area(a.iova, a.last, a.pages.base_page * ps + a.start_byte, a.readable, a.writeable)
            for a in self._tree
        ]

    def __len__(self) -> int:
        return self._tree.count

    def reserved(self) -> list[tuple[int, int]]:
        """The reserved ranges ``(start, last)``, sorted (overlaps kept)."""
        return sorted((s, l) for s, l, _ in self._reserved)

    def allowed(self) -> list[tuple[int, int]]:
        """The allowed list (ALLOW_IOVAS), sorted; empty means everything."""
        return sorted(self._allowed)

    # -- ioctls -------------------------------------------------------------

    def map(
        self,
        user_va: int,
        length: int,
        *,
        iova: int | None = None,
        readable: bool = True,
        writeable: bool = True,
    ) -> int:
        """IOMMU_IOAS_MAP of ``length`` bytes of user memory at ``user_va``;
        ``iova=None`` lets the kernel choose (``iopt_alloc_iova``), else
        FIXED_IOVA.  Returns the IOVA.  Errnos, in the kernel's order
        (``iommufd_ioas_map``, ``iopt_alloc_pages``, ``iopt_alloc_area_pages``,
        ``iopt_alloc_iova``/``iopt_check_iova``, ``iopt_insert_area``):
        EOVERFLOW iova or length >= ULONG_MAX; EINVAL neither readable nor
        writeable; ENOENT destroyed IOAS; EINVAL length 0 or above
        ULONG_MAX - PAGE_SIZE; EOVERFLOW user_va + length past 2**64; EINVAL
        length not a multiple of ``iova_alignment``; then automatic: EOVERFLOW
        length >= ULONG_MAX/2, EINVAL alignment below ``iova_alignment``,
        ENOSPC; fixed: EINVAL misaligned iova, EOVERFLOW iova + length - 1
        past 2**64, EINVAL reserved, EEXIST an area; then EINVAL ``user_va``'s
        page offset not a multiple of ``iova_alignment``; EFAULT pinning
        unmapped user memory (only with a domain and a user-memory map, see
        :meth:`IommufdCtx.set_user_memory`).  A failure changes nothing."""
        return self._ctx._map(self, user_va, length, iova, readable, writeable)

    def copy_from(
        self,
        src: IOAS,
        src_iova: int,
        length: int,
        *,
        iova: int | None = None,
        readable: bool = True,
        writeable: bool = True,
    ) -> int:
        """IOMMU_IOAS_COPY from ``src`` ``[src_iova, src_iova + length)`` into
        this IOAS (automatic IOVA when ``iova`` is None).  The new areas (one
        per source area touched) share the source's ``iopt_pages``: nothing is
        pinned that those pages already pin.  Errnos in order
        (``iommufd_ioas_copy``): EOVERFLOW length, src_iova or iova >=
        ULONG_MAX; EINVAL no protection; ENOENT src destroyed; EINVAL length
        0; EOVERFLOW src range past 2**64; ENOENT a gap in the source; ENOENT
        destination destroyed; then the IOVA checks of :meth:`map` (alignment
        taken from the first piece's user VA); then per piece EPERM writeable
        copy of pages mapped without WRITEABLE, EINVAL sub-page offset not
        aligned; EFAULT.  Returns the IOVA."""
        return self._ctx._copy(self, src, src_iova, length, iova, readable, writeable)

    def unmap(self, iova: int, length: int) -> int:
        """IOMMU_IOAS_UNMAP; returns the bytes unmapped.  ``iova == 0`` and
        ``length == U64_MAX`` unmaps everything (0 on an empty IOAS).  Else:
        ENOENT destroyed IOAS; EOVERFLOW iova or length >= ULONG_MAX; EINVAL
        length 0; EOVERFLOW iova + length - 1 past 2**64; then areas are
        removed in ascending IOVA while they lie inside the range; the first
        one that sticks out stops it with ENOENT (``.unmapped`` = bytes
        removed before, which stay removed); no area meeting the range is
        ENOENT.  Areas are never split (``iopt_unmap_iova_range``)."""
        return self._ctx._unmap(self, iova, length)

    def unmap_all(self) -> int:
        """UNMAP with iova 0, length U64_MAX (``iopt_unmap_all``): bytes unmapped."""
        return self._ctx._unmap(self, 0, U64_MAX)

    def add_reserved(self, start: int, last: int) -> None:
        """IOMMU_TEST_OP_ADD_RESERVED of ``[start, last]`` (``iopt_reserve_iova``
        owned by nobody: kept until the IOAS is destroyed).  ENOENT destroyed;
        EADDRINUSE an area or an allowed range meets it.  ``start > last`` is
        ValueError (the test op takes a length >= 1)."""
        self._ctx._add_reserved(self, start, last)

    def iova_ranges(self) -> list[tuple[int, int]]:
        """IOMMU_IOAS_IOVA_RANGES: the holes of the reserved ranges in
        ``[0, ULONG_MAX]`` as ``(start, last)``, ascending; the allowed list
        plays no part (``iommufd_ioas_iova_ranges``)."""
        self._ctx._live(self)
        used = _merge_spans((s, l) for s, l, _ in self._reserved)
        return list(_holes(used, 0, ULONG_MAX))

    def allow_iovas(self, ranges: Iterable[tuple[int, int]]) -> None:
        """IOMMU_IOAS_ALLOW_IOVAS: replace the allowed list (empty: no limit).
        ENOENT destroyed; EINVAL a range with start >= last, or overlapping an
        earlier range of the list; EADDRINUSE a range meets a reserved range.
        Existing areas are not checked."""
        self._ctx._allow_iovas(self, list(ranges))

    def attach_domain(
        self, *, aperture: tuple[int, int] | None = None, iova_alignment: int = 1
    ) -> Domain:
        """Attach an iommu_domain (``iopt_table_add_domain``); the first one
        pins every area.  EINVAL alignment above PAGE_SIZE; EADDRINUSE an area
        violates the new alignment (iova, length or sub-page offset), or an
        area or allowed range lies outside the aperture; EFAULT pinning
        unmapped user memory.  Takes no object id (see
        :meth:`IommufdCtx.mock_domain` for the selftest path that does)."""
        return self._ctx._attach_domain(self, aperture, iova_alignment)

    def detach_domain(self, domain: Domain) -> None:
        """``iopt_table_remove_domain``: drop its reserved ranges, recompute
        the alignment; the last domain unpins every area."""
        self._ctx._detach_domain(self, domain)

    def access_rw(self, iova: int, length: int, *, write: bool) -> None:
        """Predict IOMMU_TEST_OP_ACCESS_RW through an access of this IOAS
        (``iommufd_test_access_rw``, ``iommufd_access_rw``): ENOMEM length
        above 16 MiB; EINVAL length 0; EOVERFLOW iova + length - 1 past 2**64;
        ENOENT destroyed IOAS; then over the areas met from ``iova`` on, in
        order: EPERM an area without the protection (READABLE to read,
        WRITEABLE to write), EFAULT when the area's user memory in range is not
        mapped (:meth:`IommufdCtx.set_user_memory`; ``iopt_pages_rw_access``
        reaches the user pages), ENOENT a gap before the end.  Works without a
        domain.  Returns None when the kernel would copy."""
        self._ctx._access_rw(self, iova, length, write)


class IommufdCtx:
    """One open ``/dev/iommu`` (``struct iommufd_ctx``).

    ``page_size`` is the kernel's PAGE_SIZE (bytes); ``max_auto_alignment``
    caps the automatic IOVA alignment (None: ``page_size``, a kernel without
    THP like the project's guest; pass ``HPAGE_SIZE`` for one with THP).
    ``real_iommu``: the guest has a real IOMMU registered before the
    selftest's mock one, so MOCK_DOMAIN fails EINVAL.  Object ids (IOAS, HWPT, device,
    selftest object, access) come from one space: the lowest free id >= 1.
    """

    def __init__(
        self,
        page_size: int = PAGE_SIZE,
        *,
        max_auto_alignment: int | None = None,
        real_iommu: bool = False,
    ) -> None:
        if page_size < 2 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if max_auto_alignment is None:
            max_auto_alignment = page_size
        if max_auto_alignment < page_size or max_auto_alignment & (max_auto_alignment - 1):
            raise ValueError("max_auto_alignment must be a power of two >= page_size")
        self.page_size = page_size
        self.max_auto_alignment = max_auto_alignment
        self.real_iommu = real_iommu
        self._objects: dict[int, object] = {}
        self._next_id = 1
        self._free_ids: list[int] = []  # min-heap of freed ids below _next_id
        self._pages: dict[int, _Pages] = {}  # live iopt_pages by sequence number
        self._pages_seq = 0
        self._pinned_vm = 0
        self._user_memory: list[tuple[int, int]] | None = None

    # -- public queries -----------------------------------------------------

    @property
    def pinned_vm(self) -> int:
        """Pages pinned for this context (its part of ``VmPin``), O(1)."""
        return self._pinned_vm

    def refs(self, user_va: int) -> int:
        """Pins held on the page containing ``user_va`` (what MD_CHECK_REFS
        compares), O(live iopt_pages x log)."""
        page = _u64("user_va", user_va) // self.page_size
        n = 0
        for p in self._pages.values():
            i = page - p.base_page
            if 0 <= i < p.npages and p.cov.covers(i):
                n += 1
        return n

    def pinned_pages(self) -> dict[int, int]:
        """``{page-aligned user_va: pins}`` of every pinned page (expands
        every pinned range: meant for test-sized regions)."""
        out: dict[int, int] = {}
        ps = self.page_size
        for p in self._pages.values():
            for first, last, _ in p.cov.segments():
                for i in range(first, last + 1):
                    va = (p.base_page + i) * ps
                    out[va] = out.get(va, 0) + 1
        return out

    def object_kind(self, obj_id: int) -> str | None:
        """``"ioas"``, ``"hwpt_paging"``, ``"device"``, ``"selftest"``,
        ``"access"``, or None when no object has that id."""
        obj = self._objects.get(obj_id)
        if obj is None:
            return None
        if isinstance(obj, IOAS):
            return "ioas"
        if isinstance(obj, _Hwpt):
            return "hwpt_paging"
        if isinstance(obj, _Idev):
            return "device"
        if isinstance(obj, MockDomain):
            return "selftest"
        return "access"

    def object_ids(self) -> list[int]:
        return sorted(self._objects)

    def ioas(self, ioas_id: int) -> IOAS:
        """The IOAS with that id (``iommufd_get_ioas``); ENOENT if none."""
        obj = self._objects.get(ioas_id)
        if not isinstance(obj, IOAS):
            raise _fail(_errno.ENOENT, f"no IOAS {ioas_id}")
        return obj

    def set_user_memory(self, ranges: Iterable[tuple[int, int]] | None) -> None:
        """Declare which user VAs ``(start, last)`` are mapped in the process;
        pinning a page outside them is EFAULT.  None (the default): every
        address can be pinned."""
        self._user_memory = None if ranges is None else _merge_spans(ranges)

    # -- object ids ---------------------------------------------------------

    def _alloc_id(self) -> int:
        """``xa_alloc`` with ``XA_FLAGS_ALLOC1``: the lowest free id >= 1."""
        if self._free_ids:
            return heapq.heappop(self._free_ids)
        i = self._next_id
        self._next_id += 1
        return i

    def _next_ids(self, n: int) -> list[int]:
        """The ``n`` ids :meth:`_alloc_id` would hand out next (nothing allocated)."""
        out = sorted(self._free_ids)[:n]
        nxt = self._next_id
        while len(out) < n:
            out.append(nxt)
            nxt += 1
        return out

    def _free_id(self, obj_id: int) -> None:
        del self._objects[obj_id]
        heapq.heappush(self._free_ids, obj_id)

    def ioas_alloc(self) -> IOAS:
        """IOMMU_IOAS_ALLOC."""
        ioas = IOAS(self, self._alloc_id())
        self._objects[ioas.id] = ioas
        return ioas

    def _resolve(self, ioas: IOAS | int) -> IOAS:
        if isinstance(ioas, IOAS):
            return self._live(ioas)
        return self.ioas(ioas)

    def _live(self, ioas: IOAS) -> IOAS:
        if ioas._destroyed or ioas._ctx is not self:
            raise _fail(_errno.ENOENT, f"IOAS {ioas.id} does not exist")
        return ioas

    def destroy(self, obj_id: int) -> None:
        """IOMMU_DESTROY (``iommufd_object_remove``): ENOENT no such id; EBUSY
        an IOAS with a domain or an access, a HWPT (its devices hold it), a
        device (its driver holds it) or an access (its fd holds it).
        Destroying a selftest object detaches and unbinds its mock device;
        the last device of a HWPT takes the HWPT and its domain away."""
        obj = self._objects.get(obj_id)
        if obj is None:
            raise _fail(_errno.ENOENT, f"no object {obj_id}")
        if isinstance(obj, IOAS):
            if obj._domains or obj._accesses:
                raise _fail(_errno.EBUSY, f"IOAS {obj_id} has a domain or an access")
            for area in list(obj._tree):  # iommufd_ioas_destroy: iopt_unmap_all
                self._remove(obj, area)
            obj._destroyed = True
            self._free_id(obj_id)
            return
        if isinstance(obj, MockDomain):
            self._destroy_mock(obj)
            return
        raise _fail(_errno.EBUSY, f"object {obj_id} is in use")

    # -- selftest objects ---------------------------------------------------

    def mock_domain(self, ioas: IOAS | int) -> MockDomain:
        """IOMMU_TEST_OP_MOCK_DOMAIN: bind a mock device and attach it to the
        IOAS (an IOAS object or id; the id of a mock HWPT attaches to that
        HWPT; another kind of object is EINVAL).  Ids are allocated selftest object, device, then HWPT (a HWPT
        already made for a mock device of this IOAS is reused: no new id,
        domain or pins).  A new HWPT attaches a domain with aperture
        ``[MOCK_APERTURE_START, MOCK_APERTURE_LAST]`` and alignment
        page_size/2: EADDRINUSE if areas or allowed ranges break them; ENOENT
        no such IOAS; EINVAL for an id the call allocates itself (its selftest
        object or device: the ids are taken before the IOAS is looked up).
        Every id is released on failure.  (The kernel refuses
        mock domains with EINVAL when a real IOMMU such as intel-iommu
        registered first; the model assumes a machine without one.)"""
        if self.real_iommu:
            raise _fail(_errno.EINVAL, "the mock device has no IOMMU (a real IOMMU came first)")
        if isinstance(ioas, IOAS):
            target = self._live(ioas)
            hwpt = target._hwpt
        else:
            if ioas in self._next_ids(2):
                # iommufd_test_mock_domain allocates the selftest object and binds
                # the device (two new ids) before iommufd_device_attach looks pt_id
                # up: an id the call itself just took names one of those objects
                raise _fail(_errno.EINVAL, f"object {ioas} is the call's own selftest object or device")
            obj = self._objects.get(ioas)
            if isinstance(obj, IOAS):
                target, hwpt = obj, obj._hwpt
            elif isinstance(obj, _Hwpt):
                target, hwpt = obj.ioas, obj
            elif obj is None:
                raise _fail(_errno.ENOENT, f"no object {ioas}")
            else:
                raise _fail(_errno.EINVAL, f"object {ioas} is not an IOAS or a HWPT")
        if hwpt is None:
            domain = Domain(target, (MOCK_APERTURE_START, MOCK_APERTURE_LAST), self.page_size // 2)
            self._check_add_domain(target, domain)
            self._check_fill(target, [a for a in target._tree if not a.filled])
        stdev_id = self._alloc_id()
        idev_id = self._alloc_id()
        if hwpt is None:
            hwpt = _Hwpt(self._alloc_id(), target, domain)
            self._add_domain(target, domain)
            target._hwpt = hwpt
            self._objects[hwpt.id] = hwpt
        md = MockDomain(stdev_id, hwpt.id, idev_id, target, hwpt.domain)
        hwpt.devices.add(stdev_id)
        self._objects[stdev_id] = md
        self._objects[idev_id] = _Idev(idev_id, stdev_id)
        return md

    def _destroy_mock(self, md: MockDomain) -> None:
        hwpt = md.ioas._hwpt
        assert hwpt is not None and md.stdev_id in hwpt.devices
        hwpt.devices.discard(md.stdev_id)
        if not hwpt.devices:
            self._detach_domain(md.ioas, hwpt.domain)
            md.ioas._hwpt = None
            self._free_id(hwpt.id)
        self._free_id(md.idev_id)
        self._free_id(md.stdev_id)

    def create_access(self, ioas: IOAS | int, *, needs_pin_pages: bool = False) -> int:
        """IOMMU_TEST_OP_CREATE_ACCESS: an access object (``iommufd_access_create``
        takes an id) attached to the IOAS.  ENOENT no such IOAS; with
        ``needs_pin_pages`` the IOAS alignment rises to PAGE_SIZE: EADDRINUSE
        if an area breaks it.  Returns the access id; the IOAS cannot be
        destroyed (EBUSY) until :meth:`close_access`."""
        target = self._resolve(ioas)
        align = self.page_size if needs_pin_pages else 1
        new = self._calc_alignment(target, extra=align)
        if new > target._iova_alignment:
            self._check_alignment(target, new)
        access = _Access(self._alloc_id(), target, align)
        target._accesses.append(access)
        target._iova_alignment = new
        self._objects[access.id] = access
        return access.id

    def close_access(self, access_id: int) -> None:
        """Close the access's fd (``iommufd_access_destroy``): its id is freed
        and the IOAS alignment recomputed.  ENOENT no such access."""
        access = self._objects.get(access_id)
        if not isinstance(access, _Access):
            raise _fail(_errno.ENOENT, f"no access {access_id}")
        ioas = access.ioas
        ioas._accesses.remove(access)
        ioas._iova_alignment = self._calc_alignment(ioas)
        self._free_id(access_id)

    def huge_pages(self, ioas: IOAS | int) -> bool:
        """IOMMU_OPTION HUGE_PAGES GET."""
        return not self._resolve(ioas)._disable_large_pages

    def set_huge_pages(self, ioas: IOAS | int, enabled: bool) -> None:
        """IOMMU_OPTION HUGE_PAGES SET (``iopt_disable_large_pages`` /
        ``iopt_enable_large_pages``).  Disabling: EINVAL when the IOAS has
        both a domain and an area; EADDRINUSE when an area is not aligned to
        PAGE_SIZE; then ``iova_alignment`` >= PAGE_SIZE.  Enabling recomputes
        the alignment."""
        target = self._resolve(ioas)
        if enabled:
            target._disable_large_pages = False
            target._iova_alignment = self._calc_alignment(target)
            return
        if target._disable_large_pages:
            return
        if target._domains and target._tree.count:
            raise _fail(_errno.EINVAL, "domains already hold pages")
        target._disable_large_pages = True
        new = self._calc_alignment(target)
        if new > target._iova_alignment:
            try:
                self._check_alignment(target, new)
            except IommufdError:
                target._disable_large_pages = False
                raise
        target._iova_alignment = new

    # -- alignment ----------------------------------------------------------

    def _calc_alignment(self, ioas: IOAS, extra: int = 1) -> int:
        """``iopt_calculate_iova_alignment``."""
        a = self.page_size if ioas._disable_large_pages else 1
        for d in ioas._domains:
            a = max(a, d.iova_alignment)
        for acc in ioas._accesses:
            a = max(a, acc.iova_alignment)
        return max(a, extra)

    def _check_alignment(self, ioas: IOAS, align: int) -> None:
        """``iopt_check_iova_alignment``: every area's iova, length and
        sub-page offset must be multiples of ``align``."""
        mask = align - 1
        ps = self.page_size
        for a in ioas._tree:
            if a.iova & mask or a.length() & mask or (a.start_byte % ps) & mask:
                raise _fail(_errno.EADDRINUSE, f"area at {a.iova:#x} breaks alignment {align:#x}")

    # -- domains ------------------------------------------------------------

    def _check_add_domain(self, ioas: IOAS, domain: Domain) -> None:
        """Every refusal of ``iopt_table_add_domain``, without changing anything."""
        new = max(domain.iova_alignment, ioas._iova_alignment)
        if new > self.page_size:
            raise _fail(_errno.EINVAL, "domain alignment above PAGE_SIZE")
        if new != ioas._iova_alignment:
            self._check_alignment(ioas, new)
        for start, last in self._aperture_reserved(domain):
            self._check_reserve(ioas, start, last)

    @staticmethod
    def _aperture_reserved(domain: Domain) -> list[tuple[int, int]]:
        if domain.aperture is None:
            return []
        start, last = domain.aperture
        out = []
        if start != 0:
            out.append((0, start - 1))
        if last != ULONG_MAX:
            out.append((last + 1, ULONG_MAX))
        return out

    def _add_domain(self, ioas: IOAS, domain: Domain) -> None:
        """Commit an attach that :meth:`_check_add_domain` and :meth:`_check_fill` passed."""
        for start, last in self._aperture_reserved(domain):
            ioas._reserved.append((start, last, domain))
        ioas._iova_alignment = max(domain.iova_alignment, ioas._iova_alignment)
        ioas._domains.append(domain)
        domain.attached = True
        if self._should_fill(ioas):
            for a in ioas._tree:
                if not a.filled:
                    self._fill(a)

    def _attach_domain(
        self, ioas: IOAS, aperture: tuple[int, int] | None, iova_alignment: int
    ) -> Domain:
        self._live(ioas)
        if iova_alignment < 1 or iova_alignment & (iova_alignment - 1):
            raise ValueError(f"iova_alignment must be a power of two, got {iova_alignment}")
        if aperture is not None:
            s, l = _u64("aperture start", aperture[0]), _u64("aperture last", aperture[1])
            if s > l:
                raise ValueError(f"empty aperture {aperture}")
        domain = Domain(ioas, aperture, iova_alignment)
        self._check_add_domain(ioas, domain)
        self._check_fill(ioas, [a for a in ioas._tree if not a.filled])
        self._add_domain(ioas, domain)
        return domain

    def _detach_domain(self, ioas: IOAS, domain: Domain) -> None:
        self._live(ioas)
        if domain not in ioas._domains:
            raise ValueError(f"{domain!r} is not attached to IOAS {ioas.id}")
        self._remove_domain(ioas, domain)

    def _remove_domain(self, ioas: IOAS, domain: Domain) -> None:
        """``iopt_table_remove_domain``: the last domain unpins every area."""
        ioas._domains.remove(domain)
        domain.attached = False
        ioas._reserved = [r for r in ioas._reserved if r[2] is not domain]
        ioas._iova_alignment = self._calc_alignment(ioas)
        if not self._should_fill(ioas):
            for a in ioas._tree:
                if a.filled:
                    self._unfill(a)

    def _should_fill(self, ioas: IOAS) -> bool:
        """Whether the IOAS's areas have their pages pinned: only while it
        has a domain (lazy pinning, ``iopt_area_fill_domains``)."""
        return bool(ioas._domains)

    # -- pins ---------------------------------------------------------------

    def _check_fill(self, ioas: IOAS, areas: Iterable[_Area]) -> None:
        """EFAULT if filling ``areas`` would pin a page outside the user memory
        (pages these ``iopt_pages`` already pin are not pinned again)."""
        if self._user_memory is None:
            return
        ps = self.page_size
        for a in areas:
            p = a.pages
            for first, last in p.cov.uncovered(a.first_index(ps), a.last_index(ps)):
                lo, hi = (p.base_page + first) * ps, (p.base_page + last + 1) * ps - 1
                if next(_holes(self._user_memory, lo, hi), None) is not None:
                    raise _fail(_errno.EFAULT, f"user memory {lo:#x}..{hi:#x} is not mapped")

    def _fill(self, area: _Area) -> None:
        ps = self.page_size
        self._pinned_vm += area.pages.cov.add(area.first_index(ps), area.last_index(ps), +1)
        area.filled = True

    def _unfill(self, area: _Area) -> None:
        ps = self.page_size
        self._pinned_vm -= area.pages.cov.add(area.first_index(ps), area.last_index(ps), -1)
        area.filled = False

    def _new_pages(self, user_va: int, length: int, writable: bool) -> _Pages:
        self._pages_seq += 1
        return _Pages(self._pages_seq, user_va, length, writable, self.page_size)

    # -- areas --------------------------------------------------------------

    def _insert(self, ioas: IOAS, area: _Area) -> None:
        ioas._tree.insert(area)
        p = area.pages
        p.users += 1
        self._pages[p.seq] = p

    def _remove(self, ioas: IOAS, area: _Area) -> None:
        if area.filled:
            self._unfill(area)
        ioas._tree.remove(area)
        p = area.pages
        p.users -= 1
        if p.users == 0:
            del self._pages[p.seq]

    def _check_reserve(self, ioas: IOAS, start: int, last: int) -> None:
        """The refusals of ``iopt_reserve_iova``."""
        if ioas._tree.first_intersecting(start, last) is not None:
            raise _fail(_errno.EADDRINUSE, f"an area meets {start:#x}..{last:#x}")
        if any(s <= last and start <= l for s, l in ioas._allowed):
            raise _fail(_errno.EADDRINUSE, f"an allowed range meets {start:#x}..{last:#x}")

    def _check_iova(self, ioas: IOAS, iova: int, length: int) -> None:
        """``iopt_check_iova`` for a fixed IOVA."""
        if iova & (ioas._iova_alignment - 1):
            raise _fail(_errno.EINVAL, f"iova {iova:#x} not aligned to {ioas._iova_alignment:#x}")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise _fail(_errno.EOVERFLOW, "iova + length overflows")
        if any(s <= last and iova <= l for s, l, _ in ioas._reserved):
            raise _fail(_errno.EINVAL, f"{iova:#x}..{last:#x} meets a reserved range")
        if ioas._tree.first_intersecting(iova, last) is not None:
            raise _fail(_errno.EEXIST, f"{iova:#x}..{last:#x} meets an area")

    def _auto_alignment(self, ioas: IOAS, user_va: int, length: int) -> int:
        """The alignment ``iopt_alloc_iova`` asks of an automatic IOVA:
        ``min(roundup_pow_of_two(length), lowest set bit of user_va)``
        (``roundup_pow_of_two(length)`` for user_va 0), capped at
        ``max_auto_alignment``."""
        a = _roundup_pow_of_two(length)
        if user_va:
            a = min(a, user_va & -user_va)
        if a >= self.max_auto_alignment:
            a = self.max_auto_alignment
        return a

    def _alloc_iova(self, ioas: IOAS, user_va: int, length: int) -> int:
        """``iopt_alloc_iova``: the lowest fitting hole of the reserved ranges
        and the areas, inside the allowed spans (or ``[PAGE_SIZE, ULONG_MAX -
        PAGE_SIZE]``), searched span by span."""
        if length == 0 or length >= ULONG_MAX // 2:
            raise _fail(_errno.EOVERFLOW, "length too large for an automatic IOVA")
        align = self._auto_alignment(ioas, user_va, length)
        if align < ioas._iova_alignment:
            raise _fail(_errno.EINVAL, f"automatic alignment {align:#x} below the IOAS's")
        offset = user_va % self.page_size
        ps = self.page_size
        if ioas._allowed:
            spans = [
                (max(s, ps), min(l, ULONG_MAX - ps))
                for s, l in _merge_spans(ioas._allowed)
                if l >= ps and s <= ULONG_MAX - ps
            ]
        else:
            spans = [(ps, ULONG_MAX - ps)]
        reserved = _merge_spans((s, l) for s, l, _ in ioas._reserved)
        need = length - 1
        for s, l in spans:
            if l - s < need:
                continue
            s = _align(s, align) | offset
            if s > l or l - s < need:
                continue
            for fs, fl in _holes(reserved, s, l):
                found = self._first_fit(ioas._tree, fs, fl, length, align, offset)
                if found is not None:
                    return found
        raise _fail(_errno.ENOSPC, "no hole fits")

    @staticmethod
    def _fit(hs: int, hl: int, length: int, align: int, offset: int) -> int | None:
        """``__alloc_iova_check_hole`` on one hole ``[hs, hl]``."""
        if hl - hs < length - 1:
            return None
        start = _align(hs, align) | offset
        if start > hl or hl - start < length - 1:
            return None
        return start

    def _first_fit(
        self, tree: _AreaTree[_Area], fs: int, fl: int, length: int, align: int, offset: int
    ) -> int | None:
        """The first area-free hole of ``[fs, fl]``, ascending, that fits."""
        a = tree.floor(fs)
        cur = a.last + 1 if a is not None and a.last >= fs else fs
        if cur > fl:
            return None
        nxt = tree.higher(cur - 1)
        # The hole that starts at cur (clipped to [cur, fl]).
        end = min(nxt.start - 1, fl) if nxt is not None else fl
        if end >= cur:
            got = self._fit(cur, end, length, align, offset)
            if got is not None:
                return got
        if nxt is None or nxt.area.last >= fl:
            return None
        # Later holes: each node's preceding gap, only those long enough.
        after = nxt.start
        while True:
            n = tree.first_gap_after(after, length)
            if n is None:
                break
            hs = n.start - n.pgap
            if hs > fl:
                return None
            got = self._fit(hs, min(n.start - 1, fl), length, align, offset)
            if got is not None:
                return got
            after = n.start
        hs = tree.hi() + 1
        if hs < cur:
            hs = cur
        if hs <= fl:
            return self._fit(hs, fl, length, align, offset)
        return None

    def _map(
        self,
        ioas: IOAS,
        user_va: int,
        length: int,
        iova: int | None,
        readable: bool,
        writeable: bool,
    ) -> int:
        _u64("user_va", user_va)
        _u64("length", length)
        if iova is not None:
            _u64("iova", iova)
        # iommufd_ioas_map
        if (iova is not None and iova >= ULONG_MAX) or length >= ULONG_MAX:
            raise _fail(_errno.EOVERFLOW, "iova or length >= ULONG_MAX")
        if not (readable or writeable):
            raise _fail(_errno.EINVAL, "neither READABLE nor WRITEABLE")
        self._live(ioas)
        # iopt_alloc_pages
        if length == 0 or length > ULONG_MAX - self.page_size:
            raise _fail(_errno.EINVAL, "bad length")
        if user_va + length > U64_MAX:
            raise _fail(_errno.EOVERFLOW, "user_va + length overflows")
        pages = self._new_pages(user_va, length, writeable)
        start_byte = user_va % self.page_size
        return self._map_pieces(ioas, [_Piece(pages, start_byte, length)], length, iova,
                                readable, writeable)

    def _map_pieces(
        self,
        ioas: IOAS,
        pieces: list[_Piece],
        length: int,
        iova: int | None,
        readable: bool,
        writeable: bool,
    ) -> int:
        """``iopt_map_pages``: check everything, then insert and fill."""
        ps = self.page_size
        # iopt_alloc_area_pages
        if length & (ioas._iova_alignment - 1) or not length:
            raise _fail(_errno.EINVAL, f"length not a multiple of {ioas._iova_alignment:#x}")
        if iova is None:
            first = pieces[0]
            uptr = first.pages.base_page * ps + first.start_byte
            iova = self._alloc_iova(ioas, uptr, length)
            try:
                self._check_iova(ioas, iova, length)  # CONFIG_IOMMUFD_TEST WARN_ON
            except IommufdError as exc:
                raise _fail(_errno.EINVAL, "automatic IOVA failed its own check") from exc
        else:
            self._check_iova(ioas, iova, length)
        # iopt_insert_area, piece by piece
        areas: list[_Area] = []
        cur = iova
        for piece in pieces:
            self._check_insert(ioas, piece, writeable)
            areas.append(_Area(cur, cur + piece.length - 1, piece.pages, piece.start_byte,
                               readable, writeable))
            cur += piece.length
        # iopt_fill_domains_pages
        if self._should_fill(ioas):
            self._check_fill(ioas, areas)
        for area in areas:
            self._insert(ioas, area)
            if self._should_fill(ioas):
                self._fill(area)
        return iova

    def _check_insert(self, ioas: IOAS, piece: _Piece, writeable: bool) -> None:
        """The refusals of ``iopt_insert_area``."""
        if writeable and not piece.pages.writable:
            raise _fail(_errno.EPERM, "writeable copy of pages mapped read-only")
        if (piece.start_byte % self.page_size) & (ioas._iova_alignment - 1):
            raise _fail(_errno.EINVAL, "user_va offset not aligned to the IOAS alignment")

    def _get_pages(self, ioas: IOAS, iova: int, length: int) -> list[_Piece]:
        """``iopt_get_pages``: the source pieces of a COPY, which share the
        source areas' ``iopt_pages``."""
        if not length:
            raise _fail(_errno.EINVAL, "length 0")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise _fail(_errno.EOVERFLOW, "src_iova + length overflows")
        pieces: list[_Piece] = []
        cur = iova
        a = ioas._tree.first_intersecting(cur, cur)
        while a is not None and a.iova <= cur:
            end = min(last, a.last)
            pieces.append(_Piece(a.pages, a.start_byte + (cur - a.iova), end - cur + 1))
            if end == last:
                return pieces
            cur = end + 1
            n = ioas._tree.higher(a.iova)
            a = n.area if n is not None and n.start == cur else None
        raise _fail(_errno.ENOENT, f"no area covers {cur:#x}")

    def _copy(
        self,
        dst: IOAS,
        src: IOAS,
        src_iova: int,
        length: int,
        iova: int | None,
        readable: bool,
        writeable: bool,
    ) -> int:
        _u64("src_iova", src_iova)
        _u64("length", length)
        if iova is not None:
            _u64("iova", iova)
        if length >= ULONG_MAX or src_iova >= ULONG_MAX or (iova is not None and iova >= ULONG_MAX):
            raise _fail(_errno.EOVERFLOW, "length, src_iova or dst_iova >= ULONG_MAX")
        if not (readable or writeable):
            raise _fail(_errno.EINVAL, "neither READABLE nor WRITEABLE")
        self._live(src)
        pieces = self._get_pages(src, src_iova, length)
        self._live(dst)
        return self._map_pieces(dst, pieces, length, iova, readable, writeable)

    def _unmap(self, ioas: IOAS, iova: int, length: int) -> int:
        _u64("iova", iova)
        _u64("length", length)
        self._live(ioas)
        if iova == 0 and length == U64_MAX:
            try:
                return self._unmap_range(ioas, 0, ULONG_MAX)
            except IommufdError as exc:
                if exc.errno == _errno.ENOENT and exc.unmapped == 0:
                    return 0  # iopt_unmap_all: an empty IOAS succeeds
                raise
        if iova >= ULONG_MAX or length >= ULONG_MAX:
            raise _fail(_errno.EOVERFLOW, "iova or length >= ULONG_MAX")
        if not length:
            raise _fail(_errno.EINVAL, "length 0")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise _fail(_errno.EOVERFLOW, "iova + length overflows")
        return self._unmap_range(ioas, iova, last)

    def _unmap_range(self, ioas: IOAS, start: int, last: int) -> int:
        """``iopt_unmap_iova_range``: remove areas inside ``[start, last]`` in
        ascending order; stop with ENOENT at one that sticks out (keeping the
        removals), ENOENT if none met the range."""
        unmapped = 0
        tree = ioas._tree
        while True:
            a = tree.first_intersecting(start, last)
            if a is None:
                break
            if a.iova < start or a.last > last:
                raise IommufdError(
                    _errno.ENOENT, f"area {a.iova:#x}..{a.last:#x} sticks out", unmapped=unmapped
                )
            self._remove(ioas, a)
            unmapped += a.length()
        if not unmapped:
            raise IommufdError(_errno.ENOENT, "no area in the range")
        return unmapped

    def _add_reserved(self, ioas: IOAS, start: int, last: int) -> None:
        _u64("start", start)
        _u64("last", last)
        if start > last:
            raise ValueError(f"start {start:#x} > last {last:#x}")
        self._live(ioas)
        self._check_reserve(ioas, start, last)
        ioas._reserved.append((start, last, None))

    def _allow_iovas(self, ioas: IOAS, ranges: list[tuple[int, int]]) -> None:
        self._live(ioas)
        loaded: list[tuple[int, int]] = []
        for start, last in ranges:
            _u64("start", start)
            _u64("last", last)
            if start >= last:
                raise _fail(_errno.EINVAL, f"allowed range {start:#x}..{last:#x} is empty")
            if any(s <= last and start <= l for s, l in loaded):
                raise _fail(_errno.EINVAL, "allowed ranges overlap")
            loaded.append((start, last))
        for start, last in loaded:
            if any(s <= last and start <= l for s, l, _ in ioas._reserved):
                raise _fail(_errno.EADDRINUSE, f"{start:#x}..{last:#x} meets a reserved range")
        ioas._allowed = loaded

    def _access_rw(self, ioas: IOAS, iova: int, length: int, write: bool) -> None:
        _u64("iova", iova)
        _u64("length", length)
        if length > ACCESS_RW_MAX:
            raise _fail(_errno.ENOMEM, "ACCESS_RW above 16 MiB")
        if not length:
            raise _fail(_errno.EINVAL, "length 0")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise _fail(_errno.EOVERFLOW, "iova + length overflows")
        self._live(ioas)
        tree = ioas._tree
        cur = iova
        a = tree.first_intersecting(cur, cur)
        while a is not None and a.iova <= cur:
            if not (a.writeable if write else a.readable):
                raise _fail(_errno.EPERM, f"area {a.iova:#x} lacks the protection")
            if write and not a.pages.writable:
                raise _fail(_errno.EPERM, "pages mapped read-only")
            if self._user_memory is not None:
                # iopt_pages_rw_access copies through the user's pages (GUP when
                # nothing pins them): an unmapped user page is EFAULT, before any
                # later area is looked at
                base = a.pages.base_page * self.page_size + a.start_byte - a.iova
                lo, hi = base + cur, base + min(a.last, last)
                if next(_holes(self._user_memory, lo, hi), None) is not None:
                    raise _fail(_errno.EFAULT, f"user memory {lo:#x}..{hi:#x} is not mapped")
            if a.last >= last:
                return
            cur = a.last + 1
            n = tree.higher(a.iova)
            a = n.area if n is not None and n.start == cur else None
        raise _fail(_errno.ENOENT, f"no area covers {cur:#x}")
