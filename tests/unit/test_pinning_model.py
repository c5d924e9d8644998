"""Examples of the pinning model (:mod:`harness.models.pinning`) straight from
the kernel's rules (Linux 6.12 drivers/iommu/iommufd) and from what the guest
showed, each with its errno; the MAP errno order is checked pairwise (two
faults at once: the earlier check wins)."""

from __future__ import annotations

import errno

import pytest

from harness.models.pinning import (
    HPAGE_SIZE,
    MOCK_APERTURE_LAST,
    MOCK_APERTURE_START,
    U64_MAX,
    IOAS,
    IommufdCtx,
    IommufdError,
)
from harness.models.pinning_mutants import MUTANTS

PS = 4096
B = 0x1_0000_0000  # a user VA like the guest's buffers
M = MOCK_APERTURE_START


def err(fn: object, *args: object, **kwargs: object) -> IommufdError:
    with pytest.raises(IommufdError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value


def ctx_with_mock() -> tuple[IommufdCtx, IOAS]:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    ctx.mock_domain(ioas)
    return ctx, ioas


# --------------------------------------------------------------------------- errors


def test_error_is_an_oserror_with_the_kernels_errno() -> None:
    ctx = IommufdCtx()
    e = err(ctx.ioas, 7)
    assert isinstance(e, OSError) and e.errno == errno.ENOENT and e.unmapped == 0


def test_bad_argument_is_valueerror_not_an_errno() -> None:
    ioas = IommufdCtx().ioas_alloc()
    with pytest.raises(ValueError):
        ioas.map(-1, PS)
    with pytest.raises(ValueError):
        ioas.map(B, 2**64)


# --------------------------------------------------------------------------- MAP errno order


def test_map_errno_order_pairwise() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    gone = ctx.ioas_alloc()
    ctx.destroy(gone.id)
    # EOVERFLOW (length >= ULONG_MAX) before EINVAL (no protection)
    assert err(ioas.map, B, U64_MAX, readable=False, writeable=False).errno == errno.EOVERFLOW
    # EINVAL (no protection) before ENOENT (bad IOAS): the guest saw the same
    assert err(gone.map, B, PS, readable=False, writeable=False).errno == errno.EINVAL
    # ENOENT (bad IOAS) before EINVAL (length 0)
    assert err(gone.map, B, 0).errno == errno.ENOENT
    # EINVAL length 0, EOVERFLOW user_va + length wraps (guest: 2**64-0x1000, 0x2000)
    assert err(ioas.map, B, 0).errno == errno.EINVAL
    assert err(ioas.map, 2**64 - 0x1000, 0x2000).errno == errno.EOVERFLOW
    assert err(ioas.map, 2**64 - 0x1000, 0x1000).errno == errno.EOVERFLOW  # ends at 2**64
    assert err(ioas.map, B, U64_MAX - 100).errno == errno.EINVAL  # > ULONG_MAX - PAGE_SIZE


def test_map_fixed_errno_order_with_mock_domain() -> None:
    ctx, ioas = ctx_with_mock()
    ioas.map(B, 0x2000, iova=M + 0x4000)
    # length not a multiple of 2048: EINVAL before anything about the iova
    assert err(ioas.map, B, 0x400, iova=0x1000).errno == errno.EINVAL
    # misaligned iova (0x1000400), also overlapping: EINVAL before EEXIST
    assert err(ioas.map, B, 0x800, iova=M + 0x4400).errno == errno.EINVAL
    # reserved (outside the aperture) + misaligned: EINVAL
    assert err(ioas.map, B, 0x800, iova=0x1400).errno == errno.EINVAL
    # reserved range straddling the aperture end: EINVAL
    assert err(ioas.map, B, 0x2000, iova=0x7FFFF000).errno == errno.EINVAL
    # overlapping an area: EEXIST
    assert err(ioas.map, B, 0x800, iova=M + 0x4800).errno == errno.EEXIST
    # aligned and free: OK
    assert ioas.map(B, 0x800, iova=M + 0x6800) == M + 0x6800
    # iova + length wraps
    assert err(ioas.map, B, 0x1000, iova=2**64 - 0x800).errno == errno.EOVERFLOW
    # user VA's sub-page offset not a multiple of 2048: EINVAL after the iova checks
    assert err(ioas.map, B + 0x400, 0x800, iova=M + 0x8000).errno == errno.EINVAL
    assert err(ioas.map, B + 0x400, 0x800, iova=M + 0x4000).errno == errno.EEXIST


def test_reserved_checked_before_areas() -> None:
    ioas = IommufdCtx().ioas_alloc()
    ioas.map(B, PS, iova=PS)
    ioas.add_reserved(2 * PS, 3 * PS - 1)
    # [PS, 3*PS) meets the area and the reserved range: EINVAL (iopt_check_iova order)
    assert err(ioas.map, B, 2 * PS, iova=PS).errno == errno.EINVAL


def test_no_domain_alignment_is_one() -> None:
    ioas = IommufdCtx().ioas_alloc()
    assert ioas.map(B, PS, iova=0x1001) == 0x1001
    assert ioas.map(B, PS, iova=0) == 0  # a fixed iova 0 is fine; automatic never picks it


def test_auto_no_room_is_enospc() -> None:
    ctx, ioas = ctx_with_mock()
    aperture = MOCK_APERTURE_LAST - MOCK_APERTURE_START + 1
    assert err(ioas.map, B, 2 * aperture).errno == errno.ENOSPC


def test_auto_errors() -> None:
    ioas = IommufdCtx().ioas_alloc()
    assert err(ioas.map, B, 2**63 - 1).errno == errno.EOVERFLOW  # >= ULONG_MAX / 2
    ctx, mocked = ctx_with_mock()
    # user VA only 2-byte aligned: automatic alignment 2 < 2048
    assert err(mocked.map, B + 2, 0x800).errno == errno.EINVAL


# --------------------------------------------------------------------------- automatic IOVA


def test_auto_iova_sequence_seen_in_the_guest() -> None:
    """The guest's sequence without a domain (THP off: alignment capped at 4 KiB)."""
    ioas = IommufdCtx().ioas_alloc()
    seq = [(B, 0x1000, 0x1000), (B + 0x10000, 0x2000, 0x2000), (B + 0x21000, 0x1000, 0x4000),
           (B + 0x30000, 0x3000, 0x5000), (B + 0x40000, 0x800, 0x8000),
           (B + 0x50800, 0x800, 0x8800)]
    assert [ioas.map(uva, n) for uva, n, _ in seq] == [want for _, _, want in seq]


def test_auto_iova_sequence_with_mock_domain_seen_in_the_guest() -> None:
    ctx, ioas = ctx_with_mock()
    seq = [(B, 0x1000, M), (B + 0x1000, 0x2000, M + 0x1000), (B + 0x3000, 0x1000, M + 0x3000),
           (B + 0x10000, 0x4000, M + 0x4000), (B + 0x20800, 0x800, M + 0x8800),
           (B + 0x21000, 0x800, M + 0x8000),  # fills the hole below
           (B + 0x22800, 0x1800, M + 0x9800), (B + 0x30000, 0x3000, M + 0xB000)]
    assert [ioas.map(uva, n) for uva, n, _ in seq] == [w for _, _, w in seq]


def test_auto_iova_with_thp_cap_differs() -> None:
    """SEMANTICS.md's rule without a cap (or a 2 MiB THP cap) aligns to 16 KiB here."""
    ioas = IommufdCtx(max_auto_alignment=HPAGE_SIZE).ioas_alloc()
    assert ioas.map(B, 0x1000) == 0x1000
    assert ioas.map(B + 0x10000, 0x4000) == 0x4000
    ioas2 = IommufdCtx(max_auto_alignment=HPAGE_SIZE).ioas_alloc()
    assert ioas2.map(B, 64 << 20) == HPAGE_SIZE  # capped at 2 MiB, not 64 MiB


def test_auto_iova_user_va_zero_and_offset() -> None:
    ioas = IommufdCtx(max_auto_alignment=HPAGE_SIZE).ioas_alloc()
    assert ioas.map(0, 0x3000) == 0x4000  # user_va 0: roundup_pow_of_two(length)
    # page offset kept: ALIGN(hole, A) | (user_va % PAGE_SIZE)
    assert ioas.map(B + 0x10, 0x10) == 0x1010


def test_auto_iova_allowed_list_steers_only_automatic() -> None:
    ctx, ioas = ctx_with_mock()
    ioas.allow_iovas([(0x3000000, 0x3003FFF), (0x5000000, 0x5FFFFFF)])
    assert ioas.map(B, 0x2000) == 0x3000000
    assert ioas.map(B + 0x10000, 0x4000) == 0x5000000
    assert ioas.map(B, 0x1000, iova=0x2000000) == 0x2000000
    assert ioas.iova_ranges() == [(M, MOCK_APERTURE_LAST)]
    ioas.allow_iovas([])
    assert ioas.map(B, 0x1000) == M


def test_auto_iova_searches_from_the_aligned_span_start() -> None:
    """``__alloc_iova_check_used`` moves the allowed span's start to
    ALIGN(start, A) | offset before the holes are searched."""
    ioas = IommufdCtx().ioas_alloc()
    ioas.allow_iovas([(0x1000, 0x2FFF)])
    ioas.map(B, 0x50, iova=0x1000)
    # A = 0x10, offset 0x100: the span's start becomes ALIGN(0x1000)|0x100 =
    # 0x1100, so the hole after the area is searched from 0x1100 and gives
    # 0x1100 (aligning the hole's own start 0x1050 would give 0x1150).
    assert ioas.map(B + 0x100, 0x10) == 0x1100


def test_auto_iova_skips_reserved_and_areas() -> None:
    ioas = IommufdCtx().ioas_alloc()
    ioas.add_reserved(0x1000, 0x2FFF)
    ioas.map(B, 0x1000, iova=0x3000)
    assert ioas.map(B, 0x1000) == 0x4000
    assert ioas.map(B, 0x2000) == 0x5000  # A = 0x2000 capped at PAGE_SIZE
    assert [(a.iova, a.last) for a in ioas.areas()][:2] == [(0x3000, 0x3FFF), (0x4000, 0x4FFF)]


def test_auto_iova_align_wraps_near_the_top_with_thp() -> None:
    """With a 2 MiB alignment a hole in the last 2 MiB makes ALIGN() wrap to
    0: under CONFIG_IOMMUFD_TEST ``iopt_check_iova`` then refuses it (EINVAL),
    or, when iova 0 happens to be free, the map lands at 0."""
    length = 2**20 + 1  # roundup_pow_of_two: 2 MiB
    top = 2**64 - HPAGE_SIZE + PS
    ioas = IommufdCtx(max_auto_alignment=HPAGE_SIZE).ioas_alloc()
    ioas.add_reserved(0, top - 1)
    assert err(ioas.map, 0, length).errno == errno.EINVAL
    ioas2 = IommufdCtx(max_auto_alignment=HPAGE_SIZE).ioas_alloc()
    ioas2.add_reserved(HPAGE_SIZE, top - 1)
    assert ioas2.map(0, length) == 0


def test_auto_iova_uses_a_hole_opened_by_unmap() -> None:
    ioas = IommufdCtx().ioas_alloc()
    for iova in (0x1000, 0x3000, 0x5000, 0x7000, 0x9000):
        ioas.map(B, PS, iova=iova)
    assert ioas.map(B, 0x3000) == 0xA000  # no hole of 3 pages yet
    ioas.unmap(0x5000, PS)
    assert ioas.map(B, 0x3000) == 0x4000  # [0x4000, 0x6fff] is free now
    ioas.unmap(0x3000, PS)
    ioas.unmap(0x1000, PS)
    assert ioas.map(B, 0x2000) == 0x1000


def test_auto_iova_never_picks_the_last_page() -> None:
    ioas = IommufdCtx().ioas_alloc()
    ioas.add_reserved(0, 2**64 - PS - 1)
    assert err(ioas.map, B, PS).errno == errno.ENOSPC  # the last page is free but never picked
    assert ioas.map(B, PS, iova=2**64 - PS) == 2**64 - PS  # a fixed map may use it
    ioas2 = IommufdCtx().ioas_alloc()
    ioas2.add_reserved(0, 2**64 - 2 * PS - 1)
    assert ioas2.map(B, PS) == 2**64 - 2 * PS


# --------------------------------------------------------------------------- UNMAP


def test_partial_unmap_keeps_what_it_removed() -> None:
    """The guest's case: four 0x2000 areas, UNMAP [X, X+0x5000): ENOENT, the
    first two are gone, pins follow."""
    ctx, ioas = ctx_with_mock()
    x = 0x1100000
    for k in range(4):
        ioas.map(B + k * 0x2000, 0x2000, iova=x + k * 0x2000)
    assert ctx.pinned_vm == 8
    e = err(ioas.unmap, x, 0x5000)
    assert e.errno == errno.ENOENT and e.unmapped == 0x4000
    assert [a.iova for a in ioas.areas()] == [x + 0x4000, x + 0x6000]
    assert ctx.pinned_vm == 4 and ctx.refs(B) == 0 and ctx.refs(B + 0x4000) == 1
    assert err(ioas.unmap, x, 0x2000).errno == errno.ENOENT


def test_unmap_rules() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    ioas.map(B, 0x2000, iova=0x10000)
    assert err(ioas.unmap, 0x11000, 0x1000).errno == errno.ENOENT  # starts inside: nothing removed
    assert err(ioas.unmap, 0x20000, 0x1000).errno == errno.ENOENT  # no area
    assert err(ioas.unmap, 0x10000, 0).errno == errno.EINVAL
    assert err(ioas.unmap, 0x10000, U64_MAX - 1).errno == errno.EOVERFLOW
    assert err(ioas.unmap, 1, U64_MAX).errno == errno.EOVERFLOW
    assert err(ioas.unmap, U64_MAX, 1).errno == errno.EOVERFLOW
    assert len(ioas) == 1
    ioas.map(B, 0x1000, iova=0x13000)
    assert ioas.unmap(0x8000, 0x10000) == 0x3000  # a superset removes every area inside
    assert ioas.unmap_all() == 0  # empty: success, 0 bytes
    ioas.map(B, 0x8000)
    assert ioas.unmap(0, U64_MAX) == 0x8000
    gone = ctx.ioas_alloc()
    ctx.destroy(gone.id)
    assert err(gone.unmap, 0x10000, 0).errno == errno.ENOENT  # IOAS looked up first


# --------------------------------------------------------------------------- COPY


def test_copy_rules_seen_in_the_guest() -> None:
    ctx, ioas = ctx_with_mock()
    x = M + 0x100000
    ioas.map(B, 0x2000, iova=x)
    ioas.map(B + 0x2000, 0x2000, iova=x + 0x2000, writeable=False)
    pinned = ctx.pinned_vm
    assert err(ioas.copy_from, ioas, x + 0x1000, 0x2000).errno == errno.EPERM
    got = ioas.copy_from(ioas, x + 0x1000, 0x2000, writeable=False)
    assert got == M
    # one area per source piece
    assert [(a.iova, a.last, a.user_va) for a in ioas.areas()][:2] == [
        (M, M + 0xFFF, B + 0x1000), (M + 0x1000, M + 0x1FFF, B + 0x2000)]
    assert ioas.unmap(M, 0x1000) == 0x1000
    assert ctx.pinned_vm == pinned  # the copy pinned nothing
    assert err(ioas.copy_from, ioas, x + 0x3000, 0x2000).errno == errno.ENOENT
    assert err(ioas.copy_from, ioas, x, 0).errno == errno.EINVAL


def test_copy_eperm_is_about_the_maps_pages() -> None:
    ioas = IommufdCtx().ioas_alloc()
    ioas.map(B, PS, iova=0x1000)  # writeable MAP
    ioas.copy_from(ioas, 0x1000, PS, iova=0x2000, writeable=False)
    # a read-only copy of writeable pages can be copied again as writeable
    assert ioas.copy_from(ioas, 0x2000, PS, iova=0x3000) == 0x3000
    ioas.map(B, PS, iova=0x8000, writeable=False)
    assert err(ioas.copy_from, ioas, 0x8000, PS, iova=0x9000).errno == errno.EPERM


def test_copy_into_another_ioas_with_its_own_domain_pins_nothing() -> None:
    ctx = IommufdCtx()
    a, b = ctx.ioas_alloc(), ctx.ioas_alloc()
    ctx.mock_domain(a)
    a.map(B, 0x6000, iova=M)
    assert ctx.pinned_vm == 6
    ctx.mock_domain(b)
    b.copy_from(a, M, 0x6000, iova=M)
    assert ctx.pinned_vm == 6 and ctx.refs(B) == 1
    a.unmap_all()  # the copy keeps the shared pages pinned
    assert ctx.pinned_vm == 6


def test_copy_into_an_ioas_without_domain_is_lazy() -> None:
    ctx = IommufdCtx()
    a, b = ctx.ioas_alloc(), ctx.ioas_alloc()
    md = ctx.mock_domain(a)
    a.map(B, 0x2000, iova=M)
    b.copy_from(a, M, 0x2000, iova=0x1000)
    ctx.destroy(md.stdev_id)
    assert ctx.pinned_vm == 0  # b has no domain: nothing holds the shared pages
    b.attach_domain()
    assert ctx.pinned_vm == 2 and ctx.refs(B + 0x1000) == 1


def test_copy_errno_order() -> None:
    ctx = IommufdCtx()
    src, dst = ctx.ioas_alloc(), ctx.ioas_alloc()
    gone = ctx.ioas_alloc()
    ctx.destroy(gone.id)
    src.map(B, PS, iova=PS, writeable=False)
    dst.map(B, PS, iova=PS)
    assert err(dst.copy_from, src, PS, U64_MAX).errno == errno.EOVERFLOW
    assert err(dst.copy_from, src, PS, PS, readable=False, writeable=False).errno == errno.EINVAL
    assert err(dst.copy_from, gone, PS, 0).errno == errno.ENOENT  # source first
    assert err(gone.copy_from, src, 5 * PS, PS).errno == errno.ENOENT  # then the gap
    assert err(gone.copy_from, src, PS, PS).errno == errno.ENOENT  # then the destination
    assert err(dst.copy_from, src, PS, PS, iova=PS).errno == errno.EEXIST  # before EPERM
    assert err(dst.copy_from, src, PS, PS, iova=2 * PS).errno == errno.EPERM


# --------------------------------------------------------------------------- pinning


def test_lazy_pinning_and_double_map() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    ioas.map(B, 0x4000, iova=M)
    assert ctx.pinned_vm == 0 and ctx.refs(B) == 0  # no domain: nothing pinned
    md = ctx.mock_domain(ioas)
    assert ctx.pinned_vm == 4
    ioas.map(B + 0x1000, 0x2000, iova=M + 0x10000)  # with a domain: pinned at once
    assert [ctx.refs(B + k * PS) for k in range(4)] == [1, 2, 2, 1]
    assert ctx.pinned_vm == 6
    assert ctx.pinned_pages() == {B: 1, B + PS: 2, B + 2 * PS: 2, B + 3 * PS: 1}
    ctx.mock_domain(ioas)  # a second mock device shares the HWPT: no new pins
    assert ctx.pinned_vm == 6
    ctx.destroy(md.stdev_id)
    assert ctx.pinned_vm == 6  # one device still holds the HWPT
    ctx.destroy(md.stdev_id + 3)
    assert ctx.pinned_vm == 0 and len(ioas) == 2  # the last detach unpins, areas stay
    assert ioas.unmap_all() == 0x6000


def test_sub_page_maps_pin_whole_pages() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    ioas.attach_domain()
    ioas.map(B + 0xF00, 0x200)  # straddles a page boundary
    assert ctx.pinned_pages() == {B: 1, B + PS: 1}


def test_two_domains_pin_once_and_first_detach_keeps_pins() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    d1 = ioas.attach_domain()
    d2 = ioas.attach_domain(iova_alignment=PS)
    ioas.map(B, 0x3000)
    assert ctx.pinned_vm == 3
    ioas.detach_domain(d2)
    assert ctx.pinned_vm == 3 and ioas.iova_alignment == 1
    ioas.detach_domain(d1)
    assert ctx.pinned_vm == 0


def test_efault_only_when_pinning() -> None:
    ctx = IommufdCtx()
    ctx.set_user_memory([(B, B + 0xFFFF)])
    ioas = ctx.ioas_alloc()
    bogus = 0x7000_0000_0000
    ioas.map(bogus, PS, iova=M)  # no domain: accepted
    assert err(ctx.mock_domain, ioas).errno == errno.EFAULT
    assert ctx.object_ids() == [ioas.id]  # no id consumed, no domain
    ioas.unmap_all()
    ctx.mock_domain(ioas)
    assert err(ioas.map, bogus, PS).errno == errno.EFAULT
    assert err(ioas.map, B + 0xF000, 2 * PS).errno == errno.EFAULT  # runs off the end
    assert len(ioas) == 0 and ctx.pinned_vm == 0
    ioas.map(B, PS)
    assert ctx.pinned_vm == 1


# --------------------------------------------------------------------------- ids, domains, options


def test_object_ids_seen_in_the_guest() -> None:
    ctx = IommufdCtx()
    a, b = ctx.ioas_alloc(), ctx.ioas_alloc()
    assert (a.id, b.id) == (1, 2)
    md = ctx.mock_domain(a)
    assert (md.stdev_id, md.idev_id, md.hwpt_id) == (3, 4, 5)
    md2 = ctx.mock_domain(a)
    assert (md2.stdev_id, md2.idev_id, md2.hwpt_id) == (6, 7, 5)
    assert [ctx.object_kind(i) for i in range(1, 9)] == [
        "ioas", "ioas", "selftest", "device", "hwpt_paging", "selftest", "device", None]
    ctx.destroy(md.stdev_id)
    ctx.destroy(md2.stdev_id)
    assert err(ctx.destroy, 5).errno == errno.ENOENT  # the HWPT went with its last device
    assert ctx.ioas_alloc().id == 3
    ctx.destroy(1)
    assert ctx.ioas_alloc().id == 1


def test_failed_mock_domain_consumes_no_id() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    ioas.map(B, PS, iova=0x1000)  # outside the aperture
    assert err(ctx.mock_domain, ioas).errno == errno.EADDRINUSE
    assert ctx.ioas_alloc().id == 2


def test_mock_domain_refusals() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    ioas.map(B, 0x400, iova=M + 0x400)  # 1 KiB aligned
    assert err(ctx.mock_domain, ioas).errno == errno.EADDRINUSE
    assert err(ctx.mock_domain, 99).errno == errno.ENOENT
    assert err(IommufdCtx(real_iommu=True).mock_domain, 1).errno == errno.EINVAL
    c2 = IommufdCtx()
    i2 = c2.ioas_alloc()
    i2.allow_iovas([(0x1000, 0x1FFF)])  # an allowed range outside the aperture
    assert err(c2.mock_domain, i2).errno == errno.EADDRINUSE


def test_destroy_busy_cases() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    md = ctx.mock_domain(ioas)
    for obj in (ioas.id, md.hwpt_id, md.idev_id):
        assert err(ctx.destroy, obj).errno == errno.EBUSY
    assert err(ctx.destroy, 42).errno == errno.ENOENT
    ctx.destroy(md.stdev_id)
    access = ctx.create_access(ioas)
    assert err(ctx.destroy, ioas.id).errno == errno.EBUSY
    assert err(ctx.destroy, access).errno == errno.EBUSY
    ctx.close_access(access)
    ctx.destroy(ioas.id)
    assert err(ioas.map, B, PS).errno == errno.ENOENT
    assert err(ctx.ioas, ioas.id).errno == errno.ENOENT


def test_access_takes_an_id() -> None:
    """Guest: fresh fd, IOAS 1, an access, then IOAS_ALLOC gives 3; close the
    access and IOAS_ALLOC gives 2."""
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    access = ctx.create_access(ioas)
    assert access == 2 and ctx.object_kind(2) == "access"
    assert ctx.ioas_alloc().id == 3
    ctx.close_access(access)
    assert ctx.ioas_alloc().id == 2
    assert err(ctx.create_access, 99).errno == errno.ENOENT


def test_pin_access_raises_alignment() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    a = ctx.create_access(ioas, needs_pin_pages=True)
    assert ioas.iova_alignment == PS
    ctx.close_access(a)
    assert ioas.iova_alignment == 1
    ioas.map(B, 0x800, iova=0x1000)
    assert err(ctx.create_access, ioas, needs_pin_pages=True).errno == errno.EADDRINUSE


def test_alignment_and_ranges_transitions() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    assert ioas.iova_ranges() == [(0, U64_MAX)] and ioas.iova_alignment == 1
    md = ctx.mock_domain(ioas)
    assert ioas.iova_ranges() == [(M, MOCK_APERTURE_LAST)] and ioas.iova_alignment == 2048
    ctx.destroy(md.stdev_id)
    assert ioas.iova_ranges() == [(0, U64_MAX)] and ioas.iova_alignment == 1
    ioas.add_reserved(0x1000, 0x1FFF)
    assert ioas.iova_ranges() == [(0, 0xFFF), (0x2000, U64_MAX)]


def test_attach_domain_refusals() -> None:
    ioas = IommufdCtx().ioas_alloc()
    assert err(ioas.attach_domain, iova_alignment=2 * PS).errno == errno.EINVAL
    ioas.map(B, 0x800, iova=0x1000)
    assert err(ioas.attach_domain, iova_alignment=PS).errno == errno.EADDRINUSE
    assert err(ioas.attach_domain, aperture=(0x2000, U64_MAX)).errno == errno.EADDRINUSE
    d = ioas.attach_domain(aperture=(0x1000, 0xFFFFF))
    assert ioas.iova_ranges() == [(0x1000, 0xFFFFF)]
    ioas.detach_domain(d)
    assert ioas.iova_ranges() == [(0, U64_MAX)]


def test_huge_pages_option_seen_in_the_guest() -> None:
    ctx = IommufdCtx()
    ioas = ctx.ioas_alloc()
    assert ctx.huge_pages(ioas)
    ctx.set_huge_pages(ioas, False)
    assert ioas.iova_alignment == PS
    assert err(ioas.map, B, 0x800).errno == errno.EINVAL
    ctx.set_huge_pages(ioas, True)
    assert ioas.iova_alignment == 1
    ioas.map(B, 0x400, iova=0x1400)
    assert err(ctx.set_huge_pages, ioas, False).errno == errno.EADDRINUSE
    assert ctx.huge_pages(ioas) and ioas.iova_alignment == 1
    ioas.unmap_all()
    ctx2, i2 = ctx_with_mock()
    ctx2.set_huge_pages(i2, False)  # a domain but no area: OK
    assert i2.iova_alignment == PS
    ctx2.set_huge_pages(i2, True)
    assert i2.iova_alignment == 2048
    i2.map(B, PS)
    assert err(ctx2.set_huge_pages, i2, False).errno == errno.EINVAL  # domain and area
    assert err(ctx.huge_pages, 99).errno == errno.ENOENT


def test_allow_iovas_refusals() -> None:
    ioas = IommufdCtx().ioas_alloc()
    assert err(ioas.allow_iovas, [(0x1000, 0x1000)]).errno == errno.EINVAL  # start >= last
    assert err(ioas.allow_iovas, [(0x1000, 0x2FFF), (0x2000, 0x3FFF)]).errno == errno.EINVAL
    ioas.add_reserved(0x10000, 0x10FFF)
    assert err(ioas.allow_iovas, [(0x8000, 0x10000)]).errno == errno.EADDRINUSE
    ioas.allow_iovas([(0x20000, 0x2FFFF)])
    assert err(ioas.add_reserved, 0x2F000, 0x30FFF).errno == errno.EADDRINUSE
    assert ioas.allowed() == [(0x20000, 0x2FFFF)]


def test_access_rw_errnos() -> None:
    ioas = IommufdCtx().ioas_alloc()
    ioas.map(B, 0x2000, iova=0x10000)
    ioas.map(B, 0x1000, iova=0x12000, writeable=False)
    ioas.map(B, 0x1000, iova=0x13000, readable=False)
    ioas.access_rw(0x10000, 0x3000, write=False)  # runs over two areas
    assert err(ioas.access_rw, 0x11000, 0x2000, write=True).errno == errno.EPERM
    assert err(ioas.access_rw, 0x13000, 0x10, write=False).errno == errno.EPERM
    ioas.access_rw(0x13000, 0x10, write=True)
    assert err(ioas.access_rw, 0x13000, 0x2000, write=True).errno == errno.ENOENT  # into a hole
    assert err(ioas.access_rw, 0x8000, 0x10, write=False).errno == errno.ENOENT
    assert err(ioas.access_rw, 0x10000, 0, write=False).errno == errno.EINVAL
    assert err(ioas.access_rw, U64_MAX, 2, write=False).errno == errno.EOVERFLOW
    assert err(ioas.access_rw, 0x10000, (16 << 20) + 1, write=False).errno == errno.ENOMEM


def test_destroying_an_ioas_unpins_its_areas() -> None:
    ctx = IommufdCtx()
    a, b = ctx.ioas_alloc(), ctx.ioas_alloc()
    d = b.attach_domain()
    b.map(B, 0x2000)
    b.detach_domain(d)
    a.attach_domain()
    a.copy_from(b, b.areas()[0].iova, 0x2000)
    assert ctx.pinned_vm == 2
    ctx.destroy(b.id)
    assert ctx.pinned_vm == 2  # a's copy still pins the shared pages
    assert a.areas()[0].user_va == B


# --------------------------------------------------------------------------- mutants


def test_mutants_are_listed_with_what_they_break() -> None:
    required = {"unmap-splits", "copy-pins", "eager-pinning", "auto-iova-unaligned",
                "partial-unmap-rollback", "detach-keeps-pins"}
    assert required <= set(MUTANTS)
    for name, mutant in MUTANTS.items():
        assert mutant.name == name and mutant.description
        assert isinstance(mutant.factory(), IommufdCtx)
        assert type(mutant.factory()) is not IommufdCtx


# --------------------------------------------------------------------------- benchmark


def test_benchmark_runs_small_and_checks_its_inputs() -> None:
    from harness.bench import pinning as bench

    rows = bench.run(sizes=(16, 32), ops=128, seed=1)
    assert [r["n"] for r in rows] == [16.0, 32.0]
    for kind in (*bench.KINDS, "mixed"):
        assert rows[0][f"{kind}_log_ratio"] == pytest.approx(1.0)
        assert rows[1][f"{kind}_ops"] > 0 and rows[1][f"{kind}_ns_per_op"] > 0
    with pytest.raises(ValueError):
        bench.run(sizes=(1,))
    with pytest.raises(ValueError):
        bench.run(sizes=(16,), ops=0)
    assert bench.main(["--sizes", "16", "--ops", "64"]) == 0


def test_mock_domain_on_an_id_the_call_allocates_itself_is_einval() -> None:
    """Seen in the guest: on a fresh context MOCK_DOMAIN(2) is EINVAL (ids 1 and 2
    are the call's own selftest object and device), MOCK_DOMAIN(9) ENOENT; no id
    is consumed by the failure."""
    ctx = IommufdCtx()
    assert err(ctx.mock_domain, 2).errno == errno.EINVAL
    assert err(ctx.mock_domain, 1).errno == errno.EINVAL
    assert err(ctx.mock_domain, 9).errno == errno.ENOENT
    ioas = ctx.ioas_alloc()
    assert ioas.id == 1
    md = ctx.mock_domain(1)
    assert (md.stdev_id, md.idev_id, md.hwpt_id) == (2, 3, 4)


def test_access_rw_of_an_area_whose_user_memory_is_not_mapped_is_efault() -> None:
    """Seen in the guest: without a domain a MAP of unmapped user memory succeeds
    (nothing is pinned), and ACCESS_RW through it is EFAULT (iopt_pages_rw_access
    reaches the user pages); EPERM is checked first, and the EFAULT of an area
    comes before the ENOENT of a later gap."""
    ctx = IommufdCtx()
    ctx.set_user_memory([(0x10000, 0x1FFFF)])
    ioas = ctx.ioas_alloc()
    bad = ioas.map(0x0, 0x1000, iova=0x1000)
    good = ioas.map(0x10000, 0x1000, iova=0x2000)
    ro = ioas.map(0x0, 0x1000, iova=0x5000, writeable=False)
    assert err(ioas.access_rw, bad, 0x1000, write=False).errno == errno.EFAULT
    assert ioas.access_rw(good, 0x1000, write=True) is None
    assert err(ioas.access_rw, ro, 0x1000, write=True).errno == errno.EPERM
    assert err(ioas.access_rw, bad, 0x3000, write=False).errno == errno.EFAULT
    assert err(ioas.access_rw, good, 0x2000, write=False).errno == errno.ENOENT
