"""The iommufd guest agent module against the real kernel (Linux 6.12, CONFIG_IOMMUFD_TEST):
the facts the pinning model and the differential tests rely on, with the numbers
the kernel gave (drivers/iommu/iommufd: ioas.c, io_pagetable.c, pages.c, selftest.c).

The mock domain needs a guest without an active VT-d: with intel-iommu the
selftest's mock device is probed with intel-iommu's ops (``__iommu_probe_device``
takes the first IOMMU registered without a fwnode) and MOCK_DOMAIN fails EINVAL;
the second test pins that.
"""

from __future__ import annotations

import errno
from typing import Any, Callable

from harness.vm import IntelIommu, MachineSpec

U64_MAX = 2**64 - 1
PAGE = 4096
B = 0x100000000  # the test's 64-page buffer (placed: automatic iovas depend on the user VA)
BOGUS = 0x200000000  # a user VA with nothing mapped
X = 0x1100000  # iovas of the partial-unmap and copy areas, inside the mock aperture
APERTURE = [0x1000000, 0x7FFFFFFF]  # MOCK_APERTURE_START, MOCK_APERTURE_LAST

Call = Callable[..., Any]


def _agent(vm: Any) -> tuple[Call, Call, Call]:
    """``do(op, **args)`` -> the record; ``ok`` asserts errno 0; ``err(e, op, ...)`` asserts errno e."""

    def do(op: str, **args: Any) -> Any:
        return vm.agent.call(op if "." in op else f"iommufd.{op}", **args)

    def ok(op: str, **args: Any) -> Any:
        rec = do(op, **args)
        assert rec["errno"] == 0, (op, args, rec)
        return rec

    def err(e: int, op: str, **args: Any) -> Any:
        rec = do(op, **args)
        assert rec["errno"] == e, (op, args, f"want {errno.errorcode[e]}", rec)
        return rec

    return do, ok, err


def pages(*runs: tuple[int, int]) -> list[int]:
    """A refs list from (count, pages) runs."""
    return [count for count, n in runs for _ in range(n)]


def test_iommufd_ops_against_the_kernel(no_leftovers: None, vm_factory: Any) -> None:
    vm = vm_factory(MachineSpec(), trace=False)  # no VT-d: the mock domain needs it absent
    do, ok, err = _agent(vm)
    do("mem.map", length=64 * PAGE, at=B, fill=0x5A)
    fd = ok("open")["fd"]

    def refs(length: int = 8 * PAGE, user_va: int = B) -> list[int | None]:
        return list(ok("test_refs", fd=fd, user_va=user_va, length=length)["refs"])

    # ids and lazy pinning: nothing is pinned until the IOAS has a domain
    a = ok("ioas_alloc", fd=fd)["ioas_id"]
    b = ok("ioas_alloc", fd=fd)["ioas_id"]
    assert (a, b) == (1, 2)
    assert ok("iova_ranges", fd=fd, ioas_id=a)["ranges"] == [[0, U64_MAX]]
    assert ok("iova_ranges", fd=fd, ioas_id=a)["iova_alignment"] == 1
    rec = ok("map", fd=fd, ioas_id=a, user_va=B, length=0x4000, iova=0x1000000)
    assert rec["iova"] == 0x1000000 and rec["vm_pin"] == 0
    assert refs() == [0] * 8
    assert ok("map", fd=fd, ioas_id=b, user_va=BOGUS, length=0x2000)["iova"] == 0x1000  # never touched
    md = ok("test_mock_domain", fd=fd, ioas_id=a)
    assert (md["stdev_id"], md["idev_id"], md["hwpt_id"]) == (3, 4, 5)  # selftest object, device, hwpt
    assert md["vm_pin"] == 4  # the attach pinned the existing area
    assert refs() == pages((1, 4), (0, 4))
    ok("test_check_map", fd=fd, hwpt_id=5, iova=0x1000000, length=0x4000, user_va=B)
    err(errno.EINVAL, "test_check_map", fd=fd, hwpt_id=5, iova=0x1000000, length=0x4000, user_va=B + PAGE)
    rng = ok("iova_ranges", fd=fd, ioas_id=a)
    assert rng["ranges"] == [APERTURE] and rng["iova_alignment"] == 2048
    rng = err(errno.EMSGSIZE, "iova_ranges", fd=fd, ioas_id=a, capacity=0)
    assert rng["num_iovas"] == 1
    err(errno.EADDRINUSE, "test_mock_domain", fd=fd, ioas_id=b)  # area at 0x1000: outside the aperture
    ok("unmap_all", fd=fd, ioas_id=b)
    ok("map", fd=fd, ioas_id=b, user_va=BOGUS, length=0x2000, iova=0x1000000)
    err(errno.EFAULT, "test_mock_domain", fd=fd, ioas_id=b)  # the attach pins every area
    ok("unmap_all", fd=fd, ioas_id=b)
    md2 = ok("test_mock_domain", fd=fd, ioas_id=a)  # the failed ones took no id; the hwpt is shared
    assert (md2["stdev_id"], md2["idev_id"], md2["hwpt_id"]) == (6, 7, 5)
    assert refs() == pages((1, 4), (0, 4)) and md2["vm_pin"] == 4

    # MAP errnos, in the kernel's order (iommufd_ioas_map, iopt_alloc_area_pages, iopt_check_iova)
    def map_err(e: int, **args: Any) -> None:
        err(e, "map", **{"fd": fd, "ioas_id": a, "user_va": B, "length": PAGE, **args})

    map_err(errno.EOPNOTSUPP, flags=8 | 6)
    map_err(errno.EOVERFLOW, length=U64_MAX)
    map_err(errno.EOVERFLOW, iova=U64_MAX)
    map_err(errno.EINVAL, flags=0, ioas_id=99)  # no access bit is checked before the IOAS lookup
    map_err(errno.ENOENT, ioas_id=99, length=0)  # the IOAS lookup before length 0
    map_err(errno.EINVAL, length=0)
    map_err(errno.EOVERFLOW, user_va=2**64 - PAGE, length=2 * PAGE)
    map_err(errno.EINVAL, length=0x400)  # not a multiple of the mock domain's 2048
    map_err(errno.EINVAL, iova=0x1000400)  # misaligned
    map_err(errno.EINVAL, iova=0x1000)  # reserved (outside the aperture)
    map_err(errno.EINVAL, iova=0x7FFFF000, length=2 * PAGE)  # straddles the aperture's end
    map_err(errno.EEXIST, iova=0x1002000)
    map_err(errno.EINVAL, iova=0x1002400)  # misaligned and overlapping: alignment first
    map_err(errno.ENOSPC, length=0x80000000)
    map_err(errno.EFAULT, user_va=BOGUS)  # with a domain the pages are pinned at MAP
    map_err(errno.EFAULT, user_va=BOGUS, iova=0x3000000)
    assert ok("unmap_all", fd=fd, ioas_id=a)["length"] == 0x4000
    assert refs() == [0] * 8

    # automatic iova: alignment min(roundup_pow_of_two(length), lowest set bit of user_va),
    # capped at PAGE_SIZE (the guest kernel has no THP), keeping user_va's page offset
    autos = [(B, 0x1000, 0x1000000), (B + 0x1000, 0x2000, 0x1001000), (B + 0x3000, 0x1000, 0x1003000),
             (B + 0x10000, 0x4000, 0x1004000), (B + 0x20800, 0x800, 0x1008800),
             (B + 0x21000, 0x800, 0x1008000),  # the hole left below the previous one
             (B + 0x22800, 0x1800, 0x1009800),
             (B + 0x30000, 0x3000, 0x100B000)]  # 0x100C000 if the alignment were not capped at 4 KiB
    for user_va, length, iova in autos:
        assert ok("map", fd=fd, ioas_id=a, user_va=user_va, length=length)["iova"] == iova, (user_va, length)
    want = [0] * 64
    for user_va, length, _ in autos:
        for p in range((user_va - B) // PAGE, (user_va - B + length + PAGE - 1) // PAGE):
            want[p] += 1
    got = ok("test_refs", fd=fd, user_va=B, length=64 * PAGE)
    assert got["refs"] == want and got["vm_pin"] == sum(want) == 15
    hinted = ok("test_refs", fd=fd, user_va=B, length=64 * PAGE, expect=want)
    assert hinted["refs"] == want and hinted["ioctls"] < got["ioctls"]
    assert ok("unmap_all", fd=fd, ioas_id=a)["length"] == sum(length for _, length, _ in autos)

    # each MAP pins on its own; COPY shares the source's pages and pins nothing new
    assert ok("map", fd=fd, ioas_id=a, user_va=B, length=0x4000)["iova"] == 0x1000000
    assert ok("map", fd=fd, ioas_id=a, user_va=B + PAGE, length=0x2000)["iova"] == 0x1004000
    assert refs() == pages((1, 1), (2, 2), (1, 1), (0, 4))
    rec = ok("copy", fd=fd, dst_ioas_id=a, src_ioas_id=a, src_iova=0x1000000, length=0x4000)
    assert rec["dst_iova"] == 0x1006000 and rec["vm_pin"] == 6
    c = ok("ioas_alloc", fd=fd)["ioas_id"]
    assert c == 8
    mdc = ok("test_mock_domain", fd=fd, ioas_id=c)
    rec = ok("copy", fd=fd, dst_ioas_id=c, src_ioas_id=a, src_iova=0x1004000, length=0x2000, dst_iova=0x1000000)
    assert rec["vm_pin"] == 6  # another IOAS's domain maps the same iopt_pages: no new pin
    assert refs() == pages((1, 1), (2, 2), (1, 1), (0, 4))
    ok("destroy", fd=fd, id=mdc["stdev_id"])
    ok("unmap_all", fd=fd, ioas_id=c)
    assert ok("unmap_all", fd=fd, ioas_id=a)["length"] == 0xA000
    assert refs() == [0] * 8

    # partial UNMAP: areas are removed in ascending iova until one straddles the end
    for k in range(4):
        ok("map", fd=fd, ioas_id=a, user_va=B + k * 0x2000, length=0x2000, iova=X + k * 0x2000)
    rec = err(errno.ENOENT, "unmap", fd=fd, ioas_id=a, iova=X, length=0x5000)
    assert rec["length"] == 0x5000  # not written back on an errno: the caller's own length
    assert rec["vm_pin"] == 4 and refs() == pages((0, 4), (1, 4))  # areas 0 and 1 are gone
    err(errno.ENOENT, "unmap", fd=fd, ioas_id=a, iova=X, length=0x2000)
    assert err(errno.ENOENT, "unmap", fd=fd, ioas_id=a, iova=X + 0x5000, length=0x3000)["vm_pin"] == 4
    err(errno.ENOENT, "unmap", fd=fd, ioas_id=a, iova=0x5000000, length=PAGE)
    err(errno.EINVAL, "unmap", fd=fd, ioas_id=a, iova=X, length=0)
    err(errno.EOVERFLOW, "unmap", fd=fd, ioas_id=a, iova=X, length=U64_MAX - 1)
    err(errno.EOVERFLOW, "unmap", fd=fd, ioas_id=a, iova=1, length=U64_MAX)
    err(errno.ENOENT, "unmap", fd=fd, ioas_id=99, iova=X, length=PAGE)
    assert ok("unmap", fd=fd, ioas_id=a, iova=X, length=0x10000)["length"] == 0x4000
    rec = ok("unmap_all", fd=fd, ioas_id=a)
    assert rec["length"] == 0 and rec["vm_pin"] == 0

    # COPY across two areas; EPERM is about the MAP's pages
    ok("map", fd=fd, ioas_id=a, user_va=B, length=0x2000, iova=X)
    ok("map", fd=fd, ioas_id=a, user_va=B + 0x4000, length=0x2000, iova=X + 0x2000, writeable=False)
    err(errno.EPERM, "copy", fd=fd, dst_ioas_id=a, src_ioas_id=a, src_iova=X + 0x1000, length=0x2000)
    rec = ok("copy", fd=fd, dst_ioas_id=a, src_ioas_id=a, src_iova=X + 0x1000, length=0x2000, writeable=False)
    assert rec["dst_iova"] == 0x1000000
    assert ok("unmap", fd=fd, ioas_id=a, iova=0x1000000, length=PAGE)["length"] == PAGE  # one area per piece
    err(errno.ENOENT, "copy", fd=fd, dst_ioas_id=a, src_ioas_id=a, src_iova=X + 0x3000, length=0x2000)
    err(errno.EINVAL, "copy", fd=fd, dst_ioas_id=a, src_ioas_id=a, src_iova=X, length=0)
    ok("copy", fd=fd, dst_ioas_id=a, src_ioas_id=a, src_iova=X, length=0x2000, dst_iova=0x2000000, writeable=False)
    ok("copy", fd=fd, dst_ioas_id=a, src_ioas_id=a, src_iova=0x2000000, length=0x2000)  # its MAP was writeable
    assert refs() == pages((1, 2), (0, 2), (1, 2), (0, 2))

    # DESTROY: EBUSY while in use; the stdev detaches; the automatic hwpt goes with its last device
    err(errno.EBUSY, "destroy", fd=fd, id=a)
    err(errno.EBUSY, "destroy", fd=fd, id=md["hwpt_id"])
    err(errno.EBUSY, "destroy", fd=fd, id=md["idev_id"])
    assert ok("destroy", fd=fd, id=md["stdev_id"])["vm_pin"] == 4  # the second device keeps the domain
    assert ok("destroy", fd=fd, id=md2["stdev_id"])["vm_pin"] == 0
    assert refs() == [0] * 8
    err(errno.ENOENT, "destroy", fd=fd, id=md["hwpt_id"])
    rng = ok("iova_ranges", fd=fd, ioas_id=a)
    assert rng["ranges"] == [[0, U64_MAX]] and rng["iova_alignment"] == 1
    assert ok("unmap_all", fd=fd, ioas_id=a)["length"] == 0x9000  # the areas outlived the domain

    # options
    assert ok("option", fd=fd, option_id=1, option_op=1, object_id=a)["val64"] == 1
    err(errno.EBUSY, "option", fd=fd, option_id=0, option_op=0, val64=1)  # RLIMIT_MODE with objects
    ok("option", fd=fd, option_id=1, option_op=0, object_id=a, val64=0)
    assert ok("iova_ranges", fd=fd, ioas_id=a)["iova_alignment"] == PAGE
    ok("option", fd=fd, option_id=1, option_op=0, object_id=a, val64=1)
    ok("map", fd=fd, ioas_id=a, user_va=B, length=0x800, iova=0x1000400)
    err(errno.EADDRINUSE, "option", fd=fd, option_id=1, option_op=0, object_id=a, val64=0)
    ok("unmap_all", fd=fd, ioas_id=a)

    # accesses: ACCESS_RW works without a domain; a pinning access pins once per page
    acc = ok("test_create_access", fd=fd, ioas_id=a)["access_fd"]
    ok("map", fd=fd, ioas_id=a, user_va=B, length=0x2000, iova=0x1000000)
    ok("map", fd=fd, ioas_id=a, user_va=B + 0x2000, length=0x2000, iova=0x1002000, writeable=False)
    ok("map", fd=fd, ioas_id=a, user_va=B + 0x4000, length=0x2000, iova=0x1004000, readable=False)
    src = do("mem.write", user_va=B + 0x8000, pattern=7, length=PAGE)["sha256"]
    ok("test_access_rw", fd=fd, access_fd=acc, iova=0x1000800, user_va=B + 0x8000, length=PAGE, write=True)
    assert do("mem.read", user_va=B + 0x800, length=PAGE)["sha256"] == src
    ok("test_access_rw", fd=fd, access_fd=acc, iova=0x1000800, user_va=B + 0xA000, length=PAGE, slow_path=True)
    assert do("mem.read", user_va=B + 0xA000, length=PAGE)["sha256"] == src
    rw: dict[str, Any] = {"fd": fd, "access_fd": acc, "user_va": B + 0xA000, "length": 0x100}
    err(errno.ENOENT, "test_access_rw", **{**rw, "iova": 0x1006000})
    err(errno.ENOENT, "test_access_rw", **{**rw, "iova": 0x1005F00, "length": 0x200, "write": True})  # then a hole
    err(errno.EPERM, "test_access_rw", **rw, iova=0x1002000, write=True)
    err(errno.EPERM, "test_access_rw", **rw, iova=0x1004000)  # read of a write-only area
    err(errno.EBADFD, "test_access_rw", **{**rw, "access_fd": fd, "iova": 0x1000000})
    err(errno.EBUSY, "destroy", fd=fd, id=a)
    assert refs() == [0] * 8
    err(errno.EOPNOTSUPP, "test_access_pages", fd=fd, access_fd=acc, iova=0x1000000, length=PAGE)
    pacc = ok("test_create_access", fd=fd, ioas_id=a, flags=1)["access_fd"]
    assert ok("iova_ranges", fd=fd, ioas_id=a)["iova_alignment"] == PAGE
    item = ok("test_access_pages", fd=fd, access_fd=pacc, iova=0x1000000, length=0x2000, user_va=B)
    assert item["vm_pin"] == 2 and refs() == pages((1, 2), (0, 6))
    assert ok("test_access_pages", fd=fd, access_fd=pacc, iova=0x1001000, length=PAGE)["vm_pin"] == 2
    err(errno.EPERM, "test_access_pages", fd=fd, access_fd=pacc, iova=0x1002000, length=PAGE, write=True)
    err(errno.EINVAL, "test_access_pages", fd=fd, access_fd=pacc, iova=0x1000800, length=PAGE)
    md3 = ok("test_mock_domain", fd=fd, ioas_id=a)
    assert md3["vm_pin"] == 6 and refs() == pages((1, 6), (0, 2))  # pages pinned by the access: still 1
    assert ok("destroy", fd=fd, id=md3["stdev_id"])["vm_pin"] == 2  # the access keeps its pages
    assert ok("unmap", fd=fd, ioas_id=a, iova=0x1000000, length=0x2000)["vm_pin"] == 0  # unpins the access
    err(errno.ENOENT, "test_destroy_access_pages", fd=fd, access_fd=pacc, access_pages_id=item["access_pages_id"])

    # test_refs: a page that is not mapped, a misaligned range
    assert err(errno.EFAULT, "test_refs", fd=fd, user_va=BOGUS, length=2 * PAGE)["refs"] == [None, None]
    assert err(errno.EINVAL, "test_refs", fd=fd, user_va=B + 0x800, length=PAGE)["refs"] is None

    # closing every fd with pages pinned frees everything
    ok("test_mock_domain", fd=fd, ioas_id=a)
    ok("map", fd=fd, ioas_id=a, user_va=B + 0x10000, length=0x8000)
    assert refs(16 * PAGE, B + 0x10000) == pages((1, 8), (0, 8))
    assert do("fd.close_all")["vm_pin"] == 0
    assert do("fd.list")["fds"] == {}

    # an access holds an object id while it exists
    fd = ok("open")["fd"]
    assert ok("ioas_alloc", fd=fd)["ioas_id"] == 1
    acc = ok("test_create_access", fd=fd, ioas_id=1)["access_fd"]
    assert ok("ioas_alloc", fd=fd)["ioas_id"] == 3
    do("fd.close", fd=acc)
    assert ok("ioas_alloc", fd=fd)["ioas_id"] == 2
    rec = do("fd.close_all")
    assert rec["closed"] == 1 and rec["vm_pin"] == 0


def test_mock_domain_needs_a_guest_without_vtd(no_leftovers: None, vm_factory: Any) -> None:
    # (IntelIommu with intremap adds no_timer_check to the kernel command line itself)
    spec = MachineSpec(devices=(IntelIommu(caching_mode=True, intremap=True),))
    vm = vm_factory(spec, trace=False)
    do, ok, err = _agent(vm)
    assert any(name.startswith("dmar") for name in vm.agent.call("sysinfo")["iommus"])
    do("mem.map", length=8 * PAGE, at=B, fill=0x5A)
    fd = ok("open")["fd"]
    assert ok("ioas_alloc", fd=fd)["ioas_id"] == 1
    err(errno.EINVAL, "test_mock_domain", fd=fd, ioas_id=1)
    assert ok("ioas_alloc", fd=fd)["ioas_id"] == 2  # the failed attach left no object behind
    # everything without a domain works under VT-d too
    assert ok("map", fd=fd, ioas_id=1, user_va=B, length=0x2000)["iova"] == PAGE
    acc = ok("test_create_access", fd=fd, ioas_id=1)["access_fd"]
    src = do("mem.write", user_va=B + 0x4000, pattern=3, length=0x2000)["sha256"]
    ok("test_access_rw", fd=fd, access_fd=acc, iova=PAGE, user_va=B + 0x4000, length=0x2000, write=True)
    assert do("mem.read", user_va=B, length=0x2000)["sha256"] == src
    assert ok("test_refs", fd=fd, user_va=B, length=8 * PAGE)["refs"] == [0] * 8
    rec = do("fd.close_all")
    assert rec["closed"] == 2 and rec["vm_pin"] == 0
