"""/dev/iommu (iommufd) and its selftest ioctl, one op per ioctl, for the
differential tests of the pinning model.

Every ioctl op takes the iommufd file descriptor ``fd`` (from ``iommufd.open``) and
returns :func:`guest_agent.kabi.record`: ``{"errno": 0 | E, <fields>, "vm_pin":
pages, "vm_lck": pages}``. The fields are the struct's output fields as the kernel
left them: iommufd copies the struct back only on success
(``iommufd_ucmd_respond``, drivers/iommu/iommufd/main.c), so after an errno they
still hold what the op passed in (IOMMU_IOAS_UNMAP's ``length`` after a partial
unmap's ENOENT is the requested length, not the bytes removed). The exception is
IOMMU_IOAS_IOVA_RANGES, which responds before EMSGSIZE.

Addresses: ``iova`` is an IO-virtual address in an IOAS; ``user_va`` a virtual
address of the agent process (a region of ``mem.map``); lengths are in bytes.
Integer arguments are checked against the width of their struct field (u32 or
u64) and a ValueError is raised outside it; inside it every value goes to the
kernel unchanged (length 0, 2**64-1, misaligned addresses), so the kernel's errno
is what the record shows.

Semantics: drivers/iommu/iommufd/ioas.c (the IOAS ioctls), io_pagetable.c
(iova allocation, area insertion and removal), pages.c (pinning and accounting),
selftest.c with iommufd_test.h (IOMMU_TEST_CMD, CONFIG_IOMMUFD_TEST).
"""

from __future__ import annotations

import ctypes
from typing import Any

from guest_agent import kabi
from guest_agent.kabi import IO, ioctl, record
from guest_agent.protocol import op

PAGE = 4096
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

IOMMUFD_TYPE = ord(";")
IOMMU_DESTROY = IO(IOMMUFD_TYPE, 0x80)
IOMMU_IOAS_ALLOC = IO(IOMMUFD_TYPE, 0x81)
IOMMU_IOAS_ALLOW_IOVAS = IO(IOMMUFD_TYPE, 0x82)
IOMMU_IOAS_COPY = IO(IOMMUFD_TYPE, 0x83)
IOMMU_IOAS_IOVA_RANGES = IO(IOMMUFD_TYPE, 0x84)
IOMMU_IOAS_MAP = IO(IOMMUFD_TYPE, 0x85)
IOMMU_IOAS_UNMAP = IO(IOMMUFD_TYPE, 0x86)
IOMMU_OPTION = IO(IOMMUFD_TYPE, 0x87)
IOMMU_TEST_CMD = IO(IOMMUFD_TYPE, 0xA0)

# enum iommufd_ioas_map_flags
MAP_FIXED_IOVA, MAP_WRITEABLE, MAP_READABLE = 1, 2, 4
# enum iommufd_option / iommufd_option_ops
OPTION_RLIMIT_MODE, OPTION_HUGE_PAGES = 0, 1
OPTION_OP_SET, OPTION_OP_GET = 0, 1

# IOMMU_TEST_OP_* of drivers/iommu/iommufd/iommufd_test.h (Linux 6.12)
TEST_OP_ADD_RESERVED = 1
TEST_OP_MOCK_DOMAIN = 2
TEST_OP_MD_CHECK_MAP = 3
TEST_OP_MD_CHECK_REFS = 4
TEST_OP_CREATE_ACCESS = 5
TEST_OP_DESTROY_ACCESS_PAGES = 6
TEST_OP_ACCESS_PAGES = 7
TEST_OP_ACCESS_RW = 8
TEST_OP_SET_TEMP_MEMORY_LIMIT = 9
TEST_OP_MOCK_DOMAIN_REPLACE = 10
TEST_OP_ACCESS_REPLACE_IOAS = 11
TEST_OP_MOCK_DOMAIN_FLAGS = 12
MOCK_ACCESS_RW_WRITE = 1 << 0
MOCK_ACCESS_RW_SLOW_PATH = 1 << 2
MOCK_FLAGS_ACCESS_WRITE = 1 << 0
MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES = 1 << 0

EIO, EMSGSIZE = 5, 90

_u32, _u16, _u64 = ctypes.c_uint32, ctypes.c_uint16, ctypes.c_uint64


class IommuDestroy(ctypes.Structure):
    _fields_ = [("size", _u32), ("id", _u32)]


class IoasAlloc(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("out_ioas_id", _u32)]


class IovaRange(ctypes.Structure):
    _fields_ = [("start", _u64), ("last", _u64)]


class IoasIovaRanges(ctypes.Structure):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("num_iovas", _u32), ("reserved", _u32),
                ("allowed_iovas", _u64), ("out_iova_alignment", _u64)]


class IoasAllowIovas(ctypes.Structure):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("num_iovas", _u32), ("reserved", _u32),
                ("allowed_iovas", _u64)]


class IoasMap(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("ioas_id", _u32), ("reserved", _u32),
                ("user_va", _u64), ("length", _u64), ("iova", _u64)]


class IoasCopy(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("dst_ioas_id", _u32), ("src_ioas_id", _u32),
                ("length", _u64), ("dst_iova", _u64), ("src_iova", _u64)]


class IoasUnmap(ctypes.Structure):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("iova", _u64), ("length", _u64)]


class IommuOption(ctypes.Structure):
    _fields_ = [("size", _u32), ("option_id", _u32), ("op", _u16), ("reserved", _u16),
                ("object_id", _u32), ("val64", _u64)]


class _AddReserved(ctypes.Structure):
    _fields_ = [("start", _u64), ("length", _u64)]


class _MockDomain(ctypes.Structure):
    _fields_ = [("out_stdev_id", _u32), ("out_hwpt_id", _u32), ("out_idev_id", _u32), ("dev_flags", _u32)]


class _MockDomainReplace(ctypes.Structure):
    _fields_ = [("pt_id", _u32)]


class _CheckMap(ctypes.Structure):
    _fields_ = [("iova", _u64), ("length", _u64), ("uptr", _u64)]


class _CheckRefs(ctypes.Structure):
    _fields_ = [("length", _u64), ("uptr", _u64), ("refs", _u32)]


class _CreateAccess(ctypes.Structure):
    _fields_ = [("out_access_fd", _u32), ("flags", _u32)]


class _DestroyAccessPages(ctypes.Structure):
    _fields_ = [("access_pages_id", _u32)]


class _AccessPages(ctypes.Structure):
    _fields_ = [("flags", _u32), ("out_access_pages_id", _u32), ("iova", _u64), ("length", _u64),
                ("uptr", _u64)]


class _AccessRw(ctypes.Structure):
    _fields_ = [("iova", _u64), ("length", _u64), ("uptr", _u64), ("flags", _u32)]


class _AccessReplaceIoas(ctypes.Structure):
    _fields_ = [("ioas_id", _u32)]


class _TestUnion(ctypes.Union):
    _fields_ = [("add_reserved", _AddReserved), ("mock_domain", _MockDomain),
                ("mock_domain_replace", _MockDomainReplace), ("check_map", _CheckMap),
                ("check_refs", _CheckRefs), ("create_access", _CreateAccess),
                ("destroy_access_pages", _DestroyAccessPages), ("access_pages", _AccessPages),
                ("access_rw", _AccessRw), ("access_replace_ioas", _AccessReplaceIoas),
                ("raw", ctypes.c_uint8 * 48)]  # the largest member (dirty) is 48 bytes


class IommuTestCmd(ctypes.Structure):
    """struct iommu_test_cmd: size, op, id, __reserved, a 48-byte union at 16, last at 64."""
    _fields_ = [("size", _u32), ("op", _u32), ("id", _u32), ("reserved", _u32), ("u", _TestUnion),
                ("last", _u32)]


for _struct, _size in ((IommuDestroy, 8), (IoasAlloc, 12), (IovaRange, 16), (IoasIovaRanges, 32),
                       (IoasAllowIovas, 24), (IoasMap, 40), (IoasCopy, 40), (IoasUnmap, 24),
                       (IommuOption, 24), (IommuTestCmd, 72)):
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct))


def _int(name: str, value: Any, top: int) -> int:
    """``value`` if it is an int in 0..top; ValueError otherwise (a value the struct
    field cannot hold would be truncated silently by ctypes)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"{name}={value!r} is not an integer in 0..{top:#x}")
    return value


def u32(name: str, value: Any) -> int:
    return _int(name, value, U32_MAX)


def u64(name: str, value: Any) -> int:
    return _int(name, value, U64_MAX)


def _new(cls: type[ctypes.Structure]) -> Any:
    s = cls()
    s.size = ctypes.sizeof(cls)
    return s


def _test_cmd(test_op: int, obj_id: int = 0) -> IommuTestCmd:
    cmd = IommuTestCmd()
    cmd.size = ctypes.sizeof(IommuTestCmd)
    cmd.op = test_op
    cmd.id = u32("id", obj_id)
    return cmd


@op("iommufd.open")
def open_iommufd() -> dict[str, Any]:
    """open("/dev/iommu"): a new iommufd context (``iommufd_fops_open``). Record
    ``{fd}`` (-1 and the errno if the open fails); the fd stays in kabi.FDS until
    ``fd.close``, whose release destroys every object of the context."""
    return kabi.open_fd("/dev/iommu", what="iommufd")


@op("iommufd.ioas_alloc")
def ioas_alloc(fd: int) -> dict[str, Any]:
    """IOMMU_IOAS_ALLOC: a new, empty IOAS (``iommufd_ioas_alloc_ioctl``). Record
    ``{ioas_id}``: the lowest free object id >= 1 of the context (ids are shared by
    every object type: ``xa_alloc`` with XA_FLAGS_ALLOC1, main.c)."""
    cmd = _new(IoasAlloc)
    err = ioctl(fd, IOMMU_IOAS_ALLOC, cmd)
    return record(err, ioas_id=cmd.out_ioas_id)


def map_flags(iova: int | None, readable: bool, writeable: bool) -> int:
    """IOMMU_IOAS_MAP/COPY flags: FIXED_IOVA when an iova is given, plus the access."""
    return ((MAP_FIXED_IOVA if iova is not None else 0) | (MAP_READABLE if readable else 0)
            | (MAP_WRITEABLE if writeable else 0))


@op("iommufd.map")
def map_(fd: int, ioas_id: int, user_va: int, length: int, iova: int | None = None,
         readable: bool = True, writeable: bool = True, flags: int | None = None) -> dict[str, Any]:
    """IOMMU_IOAS_MAP of ``length`` bytes of user memory at ``user_va`` into IOAS
    ``ioas_id``: at ``iova`` (IO-virtual, flag FIXED_IOVA) or, with ``iova`` None,
    where ``iopt_alloc_iova`` (io_pagetable.c) puts it. ``flags`` replaces the
    computed flags word entirely (FIXED_IOVA=1, WRITEABLE=2, READABLE=4).

    Record ``{iova}``: the iova of the new area (on an errno, the iova passed in, 0
    for an automatic map). Pages are pinned at once only if the IOAS has a domain
    or an access that pins (``iopt_map_pages`` -> ``iopt_fill_domains_pages``).
    """
    cmd = _new(IoasMap)
    cmd.flags = u32("flags", flags) if flags is not None else map_flags(iova, readable, writeable)
    cmd.ioas_id = u32("ioas_id", ioas_id)
    cmd.user_va = u64("user_va", user_va)
    cmd.length = u64("length", length)
    cmd.iova = u64("iova", iova) if iova is not None else 0
    err = ioctl(fd, IOMMU_IOAS_MAP, cmd)
    return record(err, iova=cmd.iova)


@op("iommufd.unmap")
def unmap(fd: int, ioas_id: int, iova: int, length: int) -> dict[str, Any]:
    """IOMMU_IOAS_UNMAP of [iova, iova + length) (``iommufd_ioas_unmap``,
    ``iopt_unmap_iova_range``): removes every area inside it, in ascending iova,
    never splitting one; an area straddling either end stops it with ENOENT (the
    areas removed before it stay removed), as does a range with no area.

    Record ``{length}``: bytes unmapped on success; after an errno the kernel did
    not write the struct back, so ``length`` is the length passed in.
    ``iova`` 0 with ``length`` 2**64-1 is unmap-all (see ``iommufd.unmap_all``).
    """
    return _unmap(fd, ioas_id, iova, length)


def _unmap(fd: int, ioas_id: int, iova: int, length: int) -> dict[str, Any]:
    cmd = _new(IoasUnmap)
    cmd.ioas_id = u32("ioas_id", ioas_id)
    cmd.iova = u64("iova", iova)
    cmd.length = u64("length", length)
    err = ioctl(fd, IOMMU_IOAS_UNMAP, cmd)
    return record(err, length=cmd.length)


@op("iommufd.unmap_all")
def unmap_all(fd: int, ioas_id: int) -> dict[str, Any]:
    """IOMMU_IOAS_UNMAP with iova 0 and length 2**64-1: every area of the IOAS
    (``iopt_unmap_all``; succeeds on an empty IOAS). Record ``{length}``: bytes unmapped."""
    return _unmap(fd, ioas_id, 0, U64_MAX)


@op("iommufd.copy")
def copy(fd: int, dst_ioas_id: int, src_ioas_id: int, src_iova: int, length: int,
         dst_iova: int | None = None, readable: bool = True, writeable: bool = True,
         flags: int | None = None) -> dict[str, Any]:
    """IOMMU_IOAS_COPY of [src_iova, src_iova + length) of IOAS ``src_ioas_id`` to
    ``dst_ioas_id`` at ``dst_iova`` (FIXED_IOVA) or an automatic iova (None)
    (``iommufd_ioas_copy``: ``iopt_get_pages`` then ``iopt_map_pages``). The source
    range must be covered without a gap (ENOENT); the copy shares the source
    areas' iopt_pages (no new pin), one destination area per source piece; a
    writeable copy of a read-only source is EPERM. ``flags`` replaces the computed
    flags word. Record ``{dst_iova}`` (the value passed in after an errno)."""
    cmd = _new(IoasCopy)
    cmd.flags = u32("flags", flags) if flags is not None else map_flags(dst_iova, readable, writeable)
    cmd.dst_ioas_id = u32("dst_ioas_id", dst_ioas_id)
    cmd.src_ioas_id = u32("src_ioas_id", src_ioas_id)
    cmd.length = u64("length", length)
    cmd.dst_iova = u64("dst_iova", dst_iova) if dst_iova is not None else 0
    cmd.src_iova = u64("src_iova", src_iova)
    err = ioctl(fd, IOMMU_IOAS_COPY, cmd)
    return record(err, dst_iova=cmd.dst_iova)


@op("iommufd.iova_ranges")
def iova_ranges(fd: int, ioas_id: int, capacity: int | None = None) -> dict[str, Any]:
    """IOMMU_IOAS_IOVA_RANGES (``iommufd_ioas_iova_ranges``): the holes of the
    IOAS's reserved ranges, i.e. where MAP may put areas, and the iova alignment
    every MAP must honour (1 for a fresh IOAS; the domains' page size and accesses
    raise it).

    Record ``{ranges: [[start, last], ...] (inclusive), iova_alignment, num_iovas}``.
    With ``capacity`` None the array grows until it fits (EMSGSIZE is retried);
    with ``capacity`` n the kernel gets exactly n slots and EMSGSIZE is returned
    as is (``num_iovas`` then says how many there are; ``ranges`` holds the first n).
    """
    slots = 8 if capacity is None else u32("capacity", capacity)
    while True:
        arr = (IovaRange * max(slots, 1))()
        cmd = _new(IoasIovaRanges)
        cmd.ioas_id = u32("ioas_id", ioas_id)
        cmd.num_iovas = slots
        cmd.allowed_iovas = ctypes.addressof(arr)
        err = ioctl(fd, IOMMU_IOAS_IOVA_RANGES, cmd)
        if err == EMSGSIZE and capacity is None and cmd.num_iovas > slots:
            slots = cmd.num_iovas
            continue
        break
    ranges: list[list[int]] | None = None
    if err in (0, EMSGSIZE):
        ranges = [[arr[i].start, arr[i].last] for i in range(min(slots, cmd.num_iovas))]
    return record(err, ranges=ranges, iova_alignment=cmd.out_iova_alignment, num_iovas=cmd.num_iovas)


@op("iommufd.allow_iovas")
def allow_iovas(fd: int, ioas_id: int, ranges: list[list[int]]) -> dict[str, Any]:
    """IOMMU_IOAS_ALLOW_IOVAS (``iommufd_ioas_allow_iovas``): replace the IOAS's
    allowed list (automatic iovas are taken only inside it) by ``ranges``
    ([[start, last], ...], inclusive). start >= last or ranges overlapping each
    other EINVAL; a range over a reserved one EADDRINUSE. Record ``{}``."""
    arr = (IovaRange * max(len(ranges), 1))()
    for i, pair in enumerate(ranges):
        start, last = pair
        arr[i].start = u64("start", start)
        arr[i].last = u64("last", last)
    cmd = _new(IoasAllowIovas)
    cmd.ioas_id = u32("ioas_id", ioas_id)
    cmd.num_iovas = len(ranges)
    cmd.allowed_iovas = ctypes.addressof(arr)
    return record(ioctl(fd, IOMMU_IOAS_ALLOW_IOVAS, cmd))


@op("iommufd.option")
def option(fd: int, option_id: int, op: int | None = None, object_id: int = 0, val64: int = 0,
           option_op: int | None = None) -> dict[str, Any]:
    """IOMMU_OPTION (``iommufd_option``, ioas.c ``iommufd_option_rlimit_mode`` and
    ``iommufd_ioas_option_huge_pages``): ``option_id`` RLIMIT_MODE=0 (object_id 0;
    0 = charge user->locked_vm, 1 = mm->locked_vm) or HUGE_PAGES=1 (object_id an
    IOAS); ``op`` SET=0 or GET=1 (``option_op`` is the same argument under a name
    that does not clash with the ``op`` parameter of the host's ``agent.call``; give
    exactly one). Record ``{val64}`` (GET's value; the value passed in after an
    errno or a SET). Raises ValueError if neither or both of op/option_op are given."""
    if (op is None) == (option_op is None):
        raise ValueError("iommufd.option takes exactly one of op and option_op")
    cmd = _new(IommuOption)
    cmd.option_id = u32("option_id", option_id)
    cmd.op = _int("op", op if op is not None else option_op, 0xFFFF)
    cmd.object_id = u32("object_id", object_id)
    cmd.val64 = u64("val64", val64)
    err = ioctl(fd, IOMMU_OPTION, cmd)
    return record(err, val64=cmd.val64)


@op("iommufd.destroy")
def destroy(fd: int, id: int) -> dict[str, Any]:
    """IOMMU_DESTROY of object ``id`` (``iommufd_object_remove``, main.c): ENOENT
    for no such object, EBUSY while another object holds it (an IOAS with a
    domain or access attached). Destroying a selftest stdev id detaches and
    unbinds its mock device. Record ``{}``."""
    cmd = _new(IommuDestroy)
    cmd.id = u32("id", id)
    return record(ioctl(fd, IOMMU_DESTROY, cmd))


# ---------------------------------------------------------------- selftest (IOMMU_TEST_CMD)


@op("iommufd.test_mock_domain")
def test_mock_domain(fd: int, ioas_id: int, dev_flags: int | None = None) -> dict[str, Any]:
    """IOMMU_TEST_OP_MOCK_DOMAIN (``iommufd_test_mock_domain``, selftest.c): create a
    mock device, bind it (an idev object) and attach it to IOAS ``ioas_id`` (an
    automatic hwpt with a mock domain: 2 KiB IO pages, aperture
    [MOCK_APERTURE_START, MOCK_APERTURE_LAST]). ``dev_flags`` (not None) uses
    MOCK_DOMAIN_FLAGS with those mock device flags. Record ``{stdev_id, hwpt_id,
    idev_id}``; destroying stdev_id detaches and unbinds the device."""
    cmd = _test_cmd(TEST_OP_MOCK_DOMAIN if dev_flags is None else TEST_OP_MOCK_DOMAIN_FLAGS, ioas_id)
    if dev_flags is not None:
        cmd.u.mock_domain.dev_flags = u32("dev_flags", dev_flags)
    err = ioctl(fd, IOMMU_TEST_CMD, cmd)
    md = cmd.u.mock_domain
    return record(err, stdev_id=md.out_stdev_id, hwpt_id=md.out_hwpt_id, idev_id=md.out_idev_id)


@op("iommufd.test_mock_domain_replace")
def test_mock_domain_replace(fd: int, stdev_id: int, pt_id: int) -> dict[str, Any]:
    """IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: move mock device ``stdev_id`` to ``pt_id``
    (an IOAS, getting an automatic hwpt, or an hwpt) (``iommufd_device_replace``).
    Record ``{pt_id}``: the hwpt now attached."""
    cmd = _test_cmd(TEST_OP_MOCK_DOMAIN_REPLACE, stdev_id)
    cmd.u.mock_domain_replace.pt_id = u32("pt_id", pt_id)
    err = ioctl(fd, IOMMU_TEST_CMD, cmd)
    return record(err, pt_id=cmd.u.mock_domain_replace.pt_id)


@op("iommufd.test_add_reserved")
def test_add_reserved(fd: int, ioas_id: int, start: int, length: int) -> dict[str, Any]:
    """IOMMU_TEST_OP_ADD_RESERVED: reserve [start, start + length) in IOAS
    ``ioas_id`` (``iopt_reserve_iova``; EINVAL for length 0, EOVERFLOW on wrap,
    EADDRINUSE over an area). Record ``{}``."""
    cmd = _test_cmd(TEST_OP_ADD_RESERVED, ioas_id)
    cmd.u.add_reserved.start = u64("start", start)
    cmd.u.add_reserved.length = u64("length", length)
    return record(ioctl(fd, IOMMU_TEST_CMD, cmd))


@op("iommufd.test_create_access")
def test_create_access(fd: int, ioas_id: int, flags: int = 0) -> dict[str, Any]:
    """IOMMU_TEST_OP_CREATE_ACCESS (``iommufd_test_create_access``): an in-kernel
    access (like an emulated device's) attached to IOAS ``ioas_id``, as a new file.
    ``flags`` 1 (NEEDS_PIN_PAGES) makes it able to pin pages (ACCESS_PAGES) and
    raises the IOAS's iova alignment to PAGE_SIZE. Record ``{access_fd}`` (kept in
    kabi.FDS: ``fd.close`` of it unpins its pages and destroys the access)."""
    cmd = _test_cmd(TEST_OP_CREATE_ACCESS, ioas_id)
    cmd.u.create_access.flags = u32("flags", flags)
    err = ioctl(fd, IOMMU_TEST_CMD, cmd)
    access_fd = cmd.u.create_access.out_access_fd
    if err == 0:
        kabi.keep(access_fd, f"iommufd selftest access on ioas {ioas_id}")
    return record(err, access_fd=access_fd if err == 0 else -1)


@op("iommufd.test_access_replace_ioas")
def test_access_replace_ioas(fd: int, access_fd: int, ioas_id: int) -> dict[str, Any]:
    """IOMMU_TEST_OP_ACCESS_REPLACE_IOAS: move access ``access_fd`` to IOAS
    ``ioas_id`` (``iommufd_access_replace``). Record ``{}``."""
    cmd = _test_cmd(TEST_OP_ACCESS_REPLACE_IOAS, access_fd)
    cmd.u.access_replace_ioas.ioas_id = u32("ioas_id", ioas_id)
    return record(ioctl(fd, IOMMU_TEST_CMD, cmd))


@op("iommufd.test_access_rw")
def test_access_rw(fd: int, access_fd: int, iova: int, user_va: int, length: int,
                   write: bool = False, slow_path: bool = False) -> dict[str, Any]:
    """IOMMU_TEST_OP_ACCESS_RW (``iommufd_test_access_rw`` -> ``iommufd_access_rw``,
    device.c): the kernel copies ``length`` bytes between the IOAS at ``iova`` and
    the user buffer at ``user_va``: write=True user -> IOAS, else IOAS -> user.
    ``slow_path`` forces the page-by-page path. Works without a domain. ENOENT
    where no area covers the range, EPERM for a write to a read-only area (or a
    read of a write-only one), ENOMEM above 16 MiB. Record ``{}``."""
    cmd = _test_cmd(TEST_OP_ACCESS_RW, access_fd)
    rw = cmd.u.access_rw
    rw.iova = u64("iova", iova)
    rw.length = u64("length", length)
    rw.uptr = u64("user_va", user_va)
    rw.flags = (MOCK_ACCESS_RW_WRITE if write else 0) | (MOCK_ACCESS_RW_SLOW_PATH if slow_path else 0)
    return record(ioctl(fd, IOMMU_TEST_CMD, cmd))


@op("iommufd.test_access_pages")
def test_access_pages(fd: int, access_fd: int, iova: int, length: int, user_va: int = 0,
                      write: bool = False) -> dict[str, Any]:
    """IOMMU_TEST_OP_ACCESS_PAGES (``iommufd_test_access_pages`` ->
    ``iommufd_access_pin_pages``): pin the pages behind [iova, iova + length) of the
    access's IOAS for an access created with NEEDS_PIN_PAGES (else EOPNOTSUPP);
    ``user_va`` not 0: the kernel also checks they are the pages behind it (EBADE).
    ENOENT for a gap, EPERM for a write to a read-only area, ENOMEM above 16 MiB.
    An UNMAP over the pinned range unpins it silently. Record ``{access_pages_id}``
    (the item to give ``iommufd.test_destroy_access_pages``)."""
    cmd = _test_cmd(TEST_OP_ACCESS_PAGES, access_fd)
    ap = cmd.u.access_pages
    ap.flags = MOCK_FLAGS_ACCESS_WRITE if write else 0
    ap.iova = u64("iova", iova)
    ap.length = u64("length", length)
    ap.uptr = u64("user_va", user_va)
    err = ioctl(fd, IOMMU_TEST_CMD, cmd)
    return record(err, access_pages_id=ap.out_access_pages_id if err == 0 else None)


@op("iommufd.test_destroy_access_pages")
def test_destroy_access_pages(fd: int, access_fd: int, access_pages_id: int) -> dict[str, Any]:
    """IOMMU_TEST_OP_DESTROY_ACCESS_PAGES: unpin an ACCESS_PAGES item (ENOENT if it
    is gone, e.g. after an UNMAP over it). Record ``{}``."""
    cmd = _test_cmd(TEST_OP_DESTROY_ACCESS_PAGES, access_fd)
    cmd.u.destroy_access_pages.access_pages_id = u32("access_pages_id", access_pages_id)
    return record(ioctl(fd, IOMMU_TEST_CMD, cmd))


@op("iommufd.test_check_map")
def test_check_map(fd: int, hwpt_id: int, iova: int, length: int, user_va: int) -> dict[str, Any]:
    """IOMMU_TEST_OP_MD_CHECK_MAP (``iommufd_test_md_check_pa``): errno 0 if every
    2 KiB entry of mock domain ``hwpt_id`` over [iova, iova + length) maps to the
    physical address behind the same offset of ``user_va``; EINVAL for a missing
    or different entry (or iova, length, user_va not 2 KiB aligned), ENOENT for
    an id that is not a mock hwpt. Record ``{}``."""
    cmd = _test_cmd(TEST_OP_MD_CHECK_MAP, hwpt_id)
    cm = cmd.u.check_map
    cm.iova = u64("iova", iova)
    cm.length = u64("length", length)
    cm.uptr = u64("user_va", user_va)
    return record(ioctl(fd, IOMMU_TEST_CMD, cmd))


def _check_refs(fd: int, user_va: int, length: int, refs: int) -> int:
    cmd = _test_cmd(TEST_OP_MD_CHECK_REFS)
    cr = cmd.u.check_refs
    cr.length = length
    cr.uptr = user_va
    cr.refs = refs
    return ioctl(fd, IOMMU_TEST_CMD, cmd)


@op("iommufd.test_check_refs")
def test_check_refs(fd: int, user_va: int, length: int, refs: int) -> dict[str, Any]:
    """IOMMU_TEST_OP_MD_CHECK_REFS (``iommufd_test_md_check_refs``): errno 0 if each
    4 KiB page of [user_va, user_va + length) has ``refs`` pins (page refcount /
    GUP_PIN_COUNTING_BIAS; compound pages are skipped), EIO at the first that does
    not, EINVAL if user_va or length is not page aligned, EFAULT for an unmapped
    page. Record ``{}``."""
    return record(_check_refs(fd, u64("user_va", user_va), u64("length", length), u32("refs", refs)))


@op("iommufd.test_refs")
def test_refs(fd: int, user_va: int, length: int, max_refs: int = 4,
              expect: list[int | None] | None = None) -> dict[str, Any]:
    """The pin count of each 4 KiB page of [user_va, user_va + length) (both page
    aligned), measured with MD_CHECK_REFS (see ``iommufd.test_check_refs``).

    Record ``{refs: [count or None per page], ioctls}``: None for a page pinned more
    than ``max_refs`` times or that cannot be probed (not mapped: the record's errno
    is then that page's errno, e.g. EFAULT; the other pages are still counted).
    ``ioctls``: how many MD_CHECK_REFS it took. EINVAL (refs None) for a misaligned
    range. Raises ValueError if ``expect`` does not have one entry per page.

    ``expect`` (optional, one entry per page, e.g. a model's prediction) only
    orders the probes: each run of equal expected counts is checked in one ioctl,
    and only the runs that fail are probed page by page; the result is always what
    the kernel says. Without it (or in a failing run) the probe assumes runs of
    equal counts: it finds one page's count (the previous count first, then the
    nearest ones), then checks the rest of the run in one ioctl and, if that
    fails, extends the run by doubling steps and bisects for the first page that
    differs (MD_CHECK_REFS stops at the first mismatch).
    """
    u64("user_va", user_va)
    u64("length", length)
    u32("max_refs", max_refs)
    if user_va % PAGE or length % PAGE:
        return record(22, refs=None, ioctls=0)
    n = length // PAGE
    if expect is not None and len(expect) != n:
        raise ValueError(f"expect has {len(expect)} entries for {n} pages")
    refs: list[int | None] = [None] * n
    calls = 0
    first_err = 0

    def check(first: int, count: int, value: int) -> int:
        nonlocal calls
        calls += 1
        return _check_refs(fd, user_va + first * PAGE, count * PAGE, value)

    def page_count(page: int, guess: int, skip: int | None) -> int | None:
        """The count of one page: ``guess`` first, then the nearest counts."""
        nonlocal first_err
        for value in sorted(range(max_refs + 1), key=lambda v: (abs(v - guess), v)):
            if value == skip:
                continue
            err = check(page, 1, value)
            if err == 0:
                return value
            if err != EIO:
                first_err = first_err or err
                return None
        return None

    def run_end(start: int, end: int, value: int) -> int:
        """The first page in [start, end) whose count is not ``value`` (end if none)."""
        if start >= end or check(start, end - start, value) == 0:
            return end
        cur, step = start, 1  # [start, cur) has `value`; [cur, end) does not all have it
        while True:
            size = min(step, end - cur)
            if size < end - cur and check(cur, size, value) == 0:
                cur += size
                step *= 2
                continue
            lo, hi = cur, cur + size  # [lo, hi) does not all have `value`: bisect
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if check(lo, mid - lo, value) == 0:
                    lo = mid
                else:
                    hi = mid
            return lo

    def probe(start: int, end: int, guess: int, skip: int | None) -> None:
        pos = start
        while pos < end:
            value = page_count(pos, guess, skip)
            refs[pos] = value
            if value is None:
                pos, skip = pos + 1, None
                continue
            stop = run_end(pos + 1, end, value)
            refs[pos + 1:stop] = [value] * (stop - pos - 1)
            pos, guess, skip = stop, value, value

    if expect is None:
        probe(0, n, 0, None)
    else:
        pos, last = 0, 0
        while pos < n:
            stop = pos
            while stop < n and expect[stop] == expect[pos]:
                stop += 1
            want = expect[pos]
            if want is not None and 0 <= want <= max_refs and check(pos, stop - pos, want) == 0:
                refs[pos:stop] = [want] * (stop - pos)
            else:
                probe(pos, stop, want if want is not None else last, None)
            tail = refs[stop - 1]
            last = tail if tail is not None else last
            pos = stop
    return record(first_err, refs=refs, ioctls=calls)
