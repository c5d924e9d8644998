"""Xen grant tables from a PV dom0: granting its own pages (/dev/xen/gntalloc),
mapping and copying grants (/dev/xen/gntdev), and Xen's own view of the grant
table (the ``'g'`` debug key read back from Xen's console ring through
/dev/xen/privcmd), for the differential tests of harness.models.grant.

Dom0 grants to itself: ``xen.alloc(domid=0)`` then ``xen.map(0, refs)`` and
``xen.mmap``; Xen's ``map_grant_ref`` accepts a mapping domain equal to the
granting one.

Ops (every ioctl op returns :func:`guest_agent.kabi.record`, ``{"errno": 0 | E,
<fields>, "vm_pin": pages, "vm_lck": pages}``; kernel and Xen errnos are
reported, never raised):

- ``xen.info()`` -> ``{"errno", "xen", "grant_version", "devices",
  "free_per_iteration"}``
- ``xen.alloc(domid, count=1, writable=True)`` -> ``{"errno", "index", "refs"}``
- ``xen.dealloc(index, count)``, ``xen.alloc_mmap(index, count)`` ->
  ``{"errno", "user_va"}``, ``xen.alloc_munmap(user_va, count)``
- ``xen.map(domid, refs)`` -> ``{"errno", "index"}``, ``xen.mmap(index, count,
  writable=True)`` -> ``{"errno", "user_va"}``, ``xen.munmap(user_va, count)``,
  ``xen.unmap(index, count)``
- ``xen.copy(segments)`` -> ``{"errno", "status": [GNTST per segment]}``
- ``xen.grant_state()`` -> ``{"errno", "domains", "unparsed", "lines"}``
- ``xen.deferred_ticks()`` -> ``{"errno", "ticks"}``

Units: ``index`` is a byte offset in the device file (a multiple of 4096: what
mmap takes), ``count`` a number of 4 KiB pages, ``user_va`` a user virtual
address of the agent, ``ref`` a grant reference (an index in the granting
domain's table), ``domid`` a Xen domain id, ``mfn``/``gfn`` frame numbers.

A gntalloc or gntdev mapping is added to :data:`guest_agent.mem.REGIONS`, so
``mem.read``/``mem.write`` work through it.  A read-only mapping is registered
too (for ``mem.read``) and marked in :data:`guest_agent.mem.READ_ONLY`, so
``mem.write`` into it is refused rather than killing the agent.

The gntalloc and gntdev fds are opened on first use and kept in
:data:`guest_agent.kabi.FDS` (``fd.close`` of one releases what it holds, as
close(2) does; the next op opens a new one, whose index space starts again at
0).  The privcmd fd and the hypercall buffer are the agent's own and are not
listed there.

Sources (Linux 6.12 unless stated; facts, not code):

- include/uapi/xen/gntalloc.h, gntdev.h, privcmd.h: the ioctl structures and
  numbers (``_IOC(_IOC_NONE, 'G' | 'P', nr, sizeof(struct))``).
- drivers/xen/gntalloc.c: ``gntalloc_ioctl_alloc`` (global ``limit``, default
  1024, else ENOSPC; the index advances by count pages and is never reused;
  zeroed pages), ``add_grefs`` (read-only grant unless GNTALLOC_FLAG_WRITABLE),
  ``gntalloc_ioctl_dealloc`` (EINVAL unless the refs are contiguous in the file),
  ``gntalloc_mmap`` (MAP_SHARED only, else EINVAL; ENOENT for an unknown
  index), ``gntalloc_vma_close``/``__del_gref``: each ref has a use count, one
  for the file list plus one per mmap; the grant is ended
  (``gnttab_end_foreign_access``) when the count drops to 0, i.e. at the later
  of DEALLOC (or close) and the munmap of the last gntalloc mapping.
- drivers/xen/grant-table.c: ``gnttab_end_foreign_access`` frees the ref at
  once when no mapping uses it, else ``gnttab_add_deferred`` queues it and
  arms ``deferred_timer`` (jiffies + HZ); ``gnttab_handle_deferred`` retries up
  to ``free_per_iteration`` (module parameter, default 10, mode 0600) entries a
  tick and re-arms itself while the list is not empty.  ``gnttab_request_version``
  prints "Grant tables using version N layout"; the built-in parameter
  ``grant_table.version`` (1 or 2, not in sysfs) overrides the automatic
  choice.
- drivers/xen/gntdev.c: ``gntdev_ioctl_map_grant_ref`` records the refs only;
  ``gntdev_mmap`` (writable needs MAP_SHARED; the map's (index, count) must
  match exactly; one mmap per map; no PROT_WRITE -> GNTMAP_readonly);
  ``gntdev_map_grant_pages``: in a PV domain (``use_ptemod``) each page is
  mapped twice, the user PTE (``map_ops``) and the kernel's linear address
  (``kmap_ops``, issued by arch/x86/xen/p2m.c ``set_foreign_p2m_mapping`` as a
  second GNTTABOP_map_grant_ref), and any status other than GNTST_okay gives
  EINVAL; ``gntdev_ioctl_grant_copy``/``gntdev_grant_copy_seg``: a segment with
  no grant side or crossing a page on its grant side is EINVAL (later segments
  untouched), otherwise the status is set to GNTST_okay and then to the first
  failing GNTTABOP_copy status of the segment; the ioctl returns 0.
- drivers/xen/privcmd.c ``privcmd_ioctl_hypercall``: the ioctl returns the
  hypercall's value (a negative Xen errno becomes the ioctl's errno).
  drivers/xen/privcmd-buf.c: /dev/xen/hypercall pages are kernel pages mapped
  at mmap time (what libxencall uses for hypercall buffers).
- Xen 4.17 (xen-project/xen, RELEASE-4.17.x): xen/include/public/xen.h
  (``__HYPERVISOR_sysctl`` = 35); xen/include/public/sysctl.h
  (``XEN_SYSCTL_INTERFACE_VERSION`` 0x15, ``struct xen_sysctl``: cmd,
  interface_version, then a 128-byte union at offset 8; ``readconsole`` = 1,
  ``debug_keys`` = 7); xen/common/sysctl.c ``do_sysctl`` (EACCES on a wrong
  interface version; debug keys run through ``handle_keypress``, which calls
  the handler synchronously outside interrupt context, with every line
  printed); xen/drivers/char/console.c ``read_console_ring`` (incremental reads
  from an index) and ``printk_start_of_line`` (each ring line starts with
  "(XEN) ", then an optional "[timestamp] "); xen/common/grant_table.c
  ``gnttab_usage_print_all``/``gnttab_usage_print`` (the dump's format, parsed
  by :func:`parse_usage_dump`).
"""

from __future__ import annotations

import ctypes
import errno as E
import os
import re
from collections.abc import Iterable
from typing import Any

from guest_agent import kabi, mem
from guest_agent.kabi import IO, ioctl, record
from guest_agent.protocol import op

PAGE = 4096

# ---------------------------------------------------------------- gntalloc ABI


class GntallocAllocGrefHead(ctypes.Structure):
    """``struct ioctl_gntalloc_alloc_gref`` without its ``gref_ids`` array
    (which starts at offset 16)."""

    _fields_ = [("domid", ctypes.c_uint16), ("flags", ctypes.c_uint16), ("count", ctypes.c_uint32),
                ("index", ctypes.c_uint64)]


def gntalloc_alloc_gref(count: int) -> type[ctypes.Structure]:
    """``struct ioctl_gntalloc_alloc_gref`` with room for ``count`` refs
    (``gref_ids[count]``, u32 each; at least 1, as the header declares)."""

    class AllocGref(ctypes.Structure):
        _fields_ = [("domid", ctypes.c_uint16), ("flags", ctypes.c_uint16), ("count", ctypes.c_uint32),
                    ("index", ctypes.c_uint64), ("gref_ids", ctypes.c_uint32 * max(count, 1))]

    return AllocGref


class GntallocDeallocGref(ctypes.Structure):
    """``struct ioctl_gntalloc_dealloc_gref`` (16 bytes: u64 index, u32 count, padding)."""

    _fields_ = [("index", ctypes.c_uint64), ("count", ctypes.c_uint32)]


class GntallocUnmapNotify(ctypes.Structure):
    """``struct ioctl_gntalloc_unmap_notify`` (u64 index, u32 action, u32 port)."""

    _fields_ = [("index", ctypes.c_uint64), ("action", ctypes.c_uint32), ("event_channel_port", ctypes.c_uint32)]


GNTALLOC_FLAG_WRITABLE = 1
_G = ord("G")
IOCTL_GNTALLOC_ALLOC_GREF = IO(_G, 5) | ctypes.sizeof(gntalloc_alloc_gref(1)) << 16
IOCTL_GNTALLOC_DEALLOC_GREF = IO(_G, 6) | ctypes.sizeof(GntallocDeallocGref) << 16
IOCTL_GNTALLOC_SET_UNMAP_NOTIFY = IO(_G, 7) | ctypes.sizeof(GntallocUnmapNotify) << 16

# ---------------------------------------------------------------- gntdev ABI


class GntdevGrantRef(ctypes.Structure):
    """``struct ioctl_gntdev_grant_ref`` (u32 domid, u32 ref)."""

    _fields_ = [("domid", ctypes.c_uint32), ("ref", ctypes.c_uint32)]


def gntdev_map_grant_ref(count: int) -> type[ctypes.Structure]:
    """``struct ioctl_gntdev_map_grant_ref`` with ``refs[count]`` (at offset 16)."""

    class MapGrantRef(ctypes.Structure):
        _fields_ = [("count", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("index", ctypes.c_uint64),
                    ("refs", GntdevGrantRef * max(count, 1))]

    return MapGrantRef


class GntdevUnmapGrantRef(ctypes.Structure):
    """``struct ioctl_gntdev_unmap_grant_ref`` (u64 index, u32 count, u32 pad)."""

    _fields_ = [("index", ctypes.c_uint64), ("count", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class GntdevForeign(ctypes.Structure):
    """The grant side of a copy segment: u32 ref, u16 offset (bytes in the page), u16 domid."""

    _fields_ = [("ref", ctypes.c_uint32), ("offset", ctypes.c_uint16), ("domid", ctypes.c_uint16)]


class GntdevCopyPtr(ctypes.Union):
    """``source``/``dest`` of a copy segment: a user address or a grant."""

    _fields_ = [("virt", ctypes.c_uint64), ("foreign", GntdevForeign)]


class GntdevGrantCopySegment(ctypes.Structure):
    """``struct gntdev_grant_copy_segment``: 24 bytes; ``len`` at 16, ``flags``
    (GNTCOPY_*) at 18, the s16 ``status`` (GNTST_*) the kernel writes back at 20."""

    _fields_ = [("source", GntdevCopyPtr), ("dest", GntdevCopyPtr), ("len", ctypes.c_uint16),
                ("flags", ctypes.c_uint16), ("status", ctypes.c_int16)]


class GntdevGrantCopy(ctypes.Structure):
    """``struct ioctl_gntdev_grant_copy`` (unsigned int count, segments pointer at 8)."""

    _fields_ = [("count", ctypes.c_uint), ("segments", ctypes.c_void_p)]


GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1
IOCTL_GNTDEV_MAP_GRANT_REF = IO(_G, 0) | ctypes.sizeof(gntdev_map_grant_ref(1)) << 16
IOCTL_GNTDEV_UNMAP_GRANT_REF = IO(_G, 1) | ctypes.sizeof(GntdevUnmapGrantRef) << 16
IOCTL_GNTDEV_GRANT_COPY = IO(_G, 8) | ctypes.sizeof(GntdevGrantCopy) << 16

COPY_NOT_REACHED = 1
"""The status a segment keeps when the kernel stopped before it (never a GNTST code)."""

# ---------------------------------------------------------------- privcmd and Xen sysctl ABI


class PrivcmdHypercall(ctypes.Structure):
    """``struct privcmd_hypercall`` (u64 op, u64 arg[5]: 48 bytes)."""

    _fields_ = [("op", ctypes.c_uint64), ("arg", ctypes.c_uint64 * 5)]


class XenSysctlReadconsole(ctypes.Structure):
    """``struct xen_sysctl_readconsole``: clear, incremental (u8), index (u32 at
    4; in: where to start if incremental, out: where the read ended), buffer
    (64-bit guest handle at 8), count (u32 at 16; in: buffer size, out: bytes)."""

    _fields_ = [("clear", ctypes.c_uint8), ("incremental", ctypes.c_uint8), ("pad0", ctypes.c_uint8),
                ("pad1", ctypes.c_uint8), ("index", ctypes.c_uint32), ("buffer", ctypes.c_uint64),
                ("count", ctypes.c_uint32)]


class XenSysctlDebugKeys(ctypes.Structure):
    """``struct xen_sysctl_debug_keys``: keys (64-bit guest handle), nr_keys (u32 at 8)."""

    _fields_ = [("keys", ctypes.c_uint64), ("nr_keys", ctypes.c_uint32)]


class XenSysctlUnion(ctypes.Union):
    """The part of ``struct xen_sysctl``'s union the agent uses (128 bytes)."""

    _fields_ = [("readconsole", XenSysctlReadconsole), ("debug_keys", XenSysctlDebugKeys),
                ("pad", ctypes.c_uint8 * 128)]


class XenSysctl(ctypes.Structure):
    """``struct xen_sysctl``: u32 cmd, u32 interface_version, union at 8 (136 bytes)."""

    _fields_ = [("cmd", ctypes.c_uint32), ("interface_version", ctypes.c_uint32), ("u", XenSysctlUnion)]


IOCTL_PRIVCMD_HYPERCALL = IO(ord("P"), 0) | ctypes.sizeof(PrivcmdHypercall) << 16
HYPERVISOR_sysctl = 35
XEN_SYSCTL_INTERFACE_VERSION = 0x15
XEN_SYSCTL_readconsole = 1
XEN_SYSCTL_debug_keys = 7

# ---------------------------------------------------------------- libc

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value

GNTALLOC, GNTDEV, PRIVCMD, HYPERCALL_BUF = ("/dev/xen/gntalloc", "/dev/xen/gntdev", "/dev/xen/privcmd",
                                            "/dev/xen/hypercall")

_DEV_FDS: dict[str, int] = {}
"""Device path -> the fd the agent opened on it (gntalloc, gntdev, privcmd)."""

MAPPINGS: dict[int, tuple[str, int]] = {}
"""user_va -> (device path, length in bytes) of each gntalloc/gntdev mapping."""


def _dev_fd(path: str, listed: bool = True) -> int:
    """The agent's fd on ``path``, opened on first use (again if the host closed
    it with ``fd.close``). Raises OSError when the open fails."""
    fd = _DEV_FDS.get(path)
    if fd is not None and (not listed or kabi.FDS.get(fd) == path):
        return fd
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    _DEV_FDS[path] = fd
    if listed:
        kabi.keep(fd, path)
    return fd


def _mmap(path: str, index: int, count: int, prot: int) -> dict[str, Any]:
    """mmap(NULL, count pages, prot, MAP_SHARED, fd of ``path``, index)."""
    try:
        fd = _dev_fd(path)
    except OSError as exc:
        return record(exc.errno or E.EIO, user_va=None)
    length = count * PAGE
    ctypes.set_errno(0)
    addr = _libc.mmap(None, length, prot, MAP_SHARED, fd, index)
    if addr in (None, MAP_FAILED):
        return record(ctypes.get_errno(), user_va=None)
    MAPPINGS[addr] = (path, length)
    mem.REGIONS[addr] = length
    if not prot & PROT_WRITE:
        mem.READ_ONLY.add(addr)
    return record(0, user_va=addr)


def _munmap(user_va: int, count: int) -> dict[str, Any]:
    ctypes.set_errno(0)
    rc = _libc.munmap(user_va, count * PAGE)
    if rc != 0:
        return record(ctypes.get_errno())
    MAPPINGS.pop(user_va, None)
    mem.REGIONS.pop(user_va, None)
    mem.READ_ONLY.discard(user_va)
    return record(0)


# ---------------------------------------------------------------- info


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _grant_version_from_kmsg() -> int | None:
    """N of the kernel's "Grant tables using version N layout" (/dev/kmsg), or None."""
    pattern = re.compile(r"Grant tables using version (\d+)")
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found: int | None = None
    try:
        while True:
            try:
                raw = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == E.EPIPE:  # records overwritten: keep reading
                    continue
                break
            if not raw:
                break
            m = pattern.search(raw.decode("utf-8", "replace"))
            if m:
                found = int(m.group(1))
    finally:
        os.close(fd)
    return found


@op("xen.info")
def info() -> dict[str, Any]:
    """Whether this kernel runs on Xen (/sys/hypervisor/type is "xen"), the
    grant table version it chose (dmesg, None if not found), which grant
    devices exist, and grant-table.c's ``free_per_iteration`` (None without
    the parameter)."""
    fpi = _read("/sys/module/grant_table/parameters/free_per_iteration")
    return record(0, xen=_read("/sys/hypervisor/type") == "xen", grant_version=_grant_version_from_kmsg(),
                  devices={"gntalloc": os.path.exists(GNTALLOC), "gntdev": os.path.exists(GNTDEV),
                           "privcmd": os.path.exists(PRIVCMD)},
                  free_per_iteration=int(fpi) if fpi is not None and fpi.isdigit() else None)


# ---------------------------------------------------------------- gntalloc


@op("xen.alloc")
def alloc(domid: int, count: int = 1, writable: bool = True) -> dict[str, Any]:
    """IOCTL_GNTALLOC_ALLOC_GREF: ``count`` zeroed pages granted to ``domid``
    (read-only unless ``writable``). ``index``: the file offset for
    ``xen.alloc_mmap``/``xen.dealloc``; ``refs``: one grant ref per page, in
    page order. Errors: ENOSPC past gntalloc's global ``limit`` (pages),
    ENOSPC/ENOMEM when Linux has no free ref; then ``index`` is None and
    ``refs`` empty."""
    try:
        fd = _dev_fd(GNTALLOC)
    except OSError as exc:
        return record(exc.errno or E.EIO, index=None, refs=[])
    arg = gntalloc_alloc_gref(count)()
    arg.domid = domid
    arg.flags = GNTALLOC_FLAG_WRITABLE if writable else 0
    arg.count = count
    err = ioctl(fd, IOCTL_GNTALLOC_ALLOC_GREF, arg)
    if err:
        return record(err, index=None, refs=[])
    return record(0, index=arg.index, refs=[int(arg.gref_ids[i]) for i in range(count)])


@op("xen.dealloc")
def dealloc(index: int, count: int) -> dict[str, Any]:
    """IOCTL_GNTALLOC_DEALLOC_GREF: drop the file's hold on ``count`` pages from
    ``index``. A ref whose pages are not mmapped is ended here (at once, or
    deferred while a mapping uses it); with a gntalloc mapping left, at its
    munmap. EINVAL unless the pages are contiguous in this fd's list."""
    try:
        fd = _dev_fd(GNTALLOC)
    except OSError as exc:
        return record(exc.errno or E.EIO)
    arg = GntallocDeallocGref(index=index, count=count)
    return record(ioctl(fd, IOCTL_GNTALLOC_DEALLOC_GREF, arg))


@op("xen.alloc_mmap")
def alloc_mmap(index: int, count: int) -> dict[str, Any]:
    """mmap of the gntalloc fd at ``index`` (MAP_SHARED, read-write): the
    granting side's view of the pages. ``user_va`` None on error (ENOENT: no
    such contiguous pages in this fd)."""
    return _mmap(GNTALLOC, index, count, PROT_READ | PROT_WRITE)


@op("xen.alloc_munmap")
def alloc_munmap(user_va: int, count: int) -> dict[str, Any]:
    """munmap of ``count`` pages of a gntalloc mapping (the last one of a
    deallocated ref ends its grant)."""
    return _munmap(user_va, count)


# ---------------------------------------------------------------- gntdev


@op("xen.map")
def map_refs(domid: int, refs: list[int]) -> dict[str, Any]:
    """IOCTL_GNTDEV_MAP_GRANT_REF of ``refs`` granted by ``domid``: records
    them only (no hypercall). ``index``: the file offset for ``xen.mmap`` and
    ``xen.unmap`` (None on error; EINVAL for 0 or too many refs)."""
    try:
        fd = _dev_fd(GNTDEV)
    except OSError as exc:
        return record(exc.errno or E.EIO, index=None)
    arg = gntdev_map_grant_ref(len(refs))()
    arg.count = len(refs)
    for i, ref in enumerate(refs):
        arg.refs[i].domid = domid
        arg.refs[i].ref = ref
    err = ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg)
    return record(err, index=None if err else int(arg.index))


@op("xen.mmap")
def mmap_refs(index: int, count: int, writable: bool = True) -> dict[str, Any]:
    """mmap of the gntdev fd at ``index`` (MAP_SHARED, PROT_READ plus
    PROT_WRITE if ``writable``): the map hypercalls happen here (in a PV dom0
    two per page, user PTE and kernel address). EINVAL when Xen refused any
    page (a writable map of a read-only grant, a ref not granted), when
    (index, count) is not one map, or when the map was mmapped before."""
    return _mmap(GNTDEV, index, count, PROT_READ | (PROT_WRITE if writable else 0))


@op("xen.munmap")
def munmap_refs(user_va: int, count: int) -> dict[str, Any]:
    """munmap of a gntdev mapping (in a PV dom0 the unmap hypercalls happen here)."""
    return _munmap(user_va, count)


@op("xen.unmap")
def unmap_refs(index: int, count: int) -> dict[str, Any]:
    """IOCTL_GNTDEV_UNMAP_GRANT_REF: forget the map at ``index`` (ENOENT if no
    map has exactly this (index, count))."""
    try:
        fd = _dev_fd(GNTDEV)
    except OSError as exc:
        return record(exc.errno or E.EIO)
    return record(ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, GntdevUnmapGrantRef(index=index, count=count)))


def _copy_side(seg: GntdevGrantCopySegment, side: dict[str, Any], dest: bool) -> None:
    ptr = seg.dest if dest else seg.source
    if "user_va" in side:
        ptr.virt = int(side["user_va"])
    elif "ref" in side:
        ptr.foreign.ref = int(side["ref"])
        ptr.foreign.domid = int(side.get("domid", 0))
        ptr.foreign.offset = int(side.get("offset", 0))
        seg.flags |= GNTCOPY_dest_gref if dest else GNTCOPY_source_gref
    else:
        raise ValueError(f"a copy side needs 'user_va' or 'ref', got {side!r}")


@op("xen.copy")
def copy(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """IOCTL_GNTDEV_GRANT_COPY of ``segments``, each ``{"source": side, "dest":
    side, "len": bytes}`` with side ``{"ref", "domid", "offset"}`` (a grant;
    offset in bytes within its page) or ``{"user_va"}`` (the agent's memory).

    ``status``: per segment, the GNTST code the kernel wrote back (0 okay, -1
    general error e.g. a copy into a read-only grant, -2 bad domain, -3 bad
    ref, -10 bad copy argument...). With ``errno`` EINVAL (a segment with no
    grant side, or crossing its grant page) or EFAULT, segments the kernel
    never reached keep :data:`COPY_NOT_REACHED`. Raises ValueError for a
    segment without a side."""
    segs = (GntdevGrantCopySegment * max(len(segments), 1))()
    for i, s in enumerate(segments):
        _copy_side(segs[i], s["source"], dest=False)
        _copy_side(segs[i], s["dest"], dest=True)
        segs[i].len = int(s["len"])
        segs[i].status = COPY_NOT_REACHED
    try:
        fd = _dev_fd(GNTDEV)
    except OSError as exc:
        return record(exc.errno or E.EIO, status=[])
    arg = GntdevGrantCopy(count=len(segments), segments=ctypes.addressof(segs))
    err = ioctl(fd, IOCTL_GNTDEV_GRANT_COPY, arg)
    return record(err, status=[int(segs[i].status) for i in range(len(segments))])


# ---------------------------------------------------------------- Xen's grant table dump

_CHUNK = 64 * 1024
_BUF_PAGES = 1 + _CHUNK // PAGE
_hcall_buf: int | None = None
_ring_index: int | None = None
"""Where the agent's last read of Xen's console ring ended."""


def _hypercall_buffer() -> int:
    """The address of the agent's hypercall buffer (page 0: the sysctl and the
    keys; pages 1..: the console read buffer): pages from /dev/xen/hypercall
    (present and never moved), else anonymous memory, touched and mlocked.
    Raises OSError if neither can be had."""
    global _hcall_buf
    if _hcall_buf is not None:
        return _hcall_buf
    length = _BUF_PAGES * PAGE
    addr: int | None = None
    try:
        fd = os.open(HYPERCALL_BUF, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        addr = _libc.mmap(None, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        os.close(fd)  # the mapping keeps the file
        if addr in (None, MAP_FAILED):
            addr = None
    if addr is None:
        addr = _libc.mmap(None, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if addr in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "no memory for the hypercall buffer")
        ctypes.memset(addr, 0, length)
        if _libc.mlock(addr, length) != 0:
            raise OSError(ctypes.get_errno(), "mlock of the hypercall buffer failed")
    assert addr is not None
    _hcall_buf = addr
    return addr


def _sysctl(sysctl: XenSysctl) -> int:
    """Issue ``sysctl`` (already in the hypercall buffer) through privcmd; 0 or the errno."""
    fd = _dev_fd(PRIVCMD, listed=False)
    hc = PrivcmdHypercall(op=HYPERVISOR_sysctl)
    hc.arg[0] = ctypes.addressof(sysctl)
    return ioctl(fd, IOCTL_PRIVCMD_HYPERCALL, hc)


def _read_ring(start: int | None) -> tuple[int, bytes, int]:
    """Read Xen's console ring from index ``start`` (None: from its oldest
    byte) to its end: (errno, bytes, index after the last byte)."""
    buf = _hypercall_buffer()
    sysctl = XenSysctl.from_address(buf)
    out = bytearray()
    index = start
    while True:
        ctypes.memset(buf, 0, ctypes.sizeof(XenSysctl))
        sysctl.cmd = XEN_SYSCTL_readconsole
        sysctl.interface_version = XEN_SYSCTL_INTERFACE_VERSION
        rc = sysctl.u.readconsole
        rc.incremental = 0 if index is None else 1
        rc.index = index or 0
        rc.buffer = buf + PAGE
        rc.count = _CHUNK
        err = _sysctl(sysctl)
        if err:
            return err, bytes(out), index or 0
        got = int(rc.count)
        out += ctypes.string_at(buf + PAGE, got)
        index = int(rc.index)
        if got < _CHUNK:
            return 0, bytes(out), index


def _debug_key(key: str) -> int:
    buf = _hypercall_buffer()
    sysctl = XenSysctl.from_address(buf)
    ctypes.memset(buf, 0, PAGE)
    keys = buf + ctypes.sizeof(XenSysctl)
    ctypes.memmove(keys, key.encode(), len(key))
    sysctl.cmd = XEN_SYSCTL_debug_keys
    sysctl.interface_version = XEN_SYSCTL_INTERFACE_VERSION
    sysctl.u.debug_keys.keys = keys
    sysctl.u.debug_keys.nr_keys = len(key)
    return _sysctl(sysctl)


DUMP_BEGIN = "gnttab_usage_print_all [ key 'g' pressed"
DUMP_END = "gnttab_usage_print_all ] done"

_PREFIX = re.compile(r"^\(XEN\) (?:\[(?:\s*\d+\.\d{6}|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{3})?|[0-9a-f]{16})\] )?")
"""Xen's line prefix: "(XEN) ", then the console timestamp if enabled
(``console_timestamps``: boot "[%5u.%06u] ", date "[YYYY-MM-DD hh:mm:ss(.mmm)] ",
raw "[%016x] "); an entry line's own "[0x...]" is not one."""
_DOMAIN = re.compile(r"^grant-table for remote d(\d+) \(v(\d+)\)$")
_FRAMES = re.compile(r"^\s*(\d+) frames \((\d+) max\), (\d+) maptrack frames \((\d+) max\)$")
_ENTRY = re.compile(r"^\[0x([0-9a-f]+)\]\s+(\d+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+(\d+)\s+0x([0-9a-f]+)"
                    r"\s+0x([0-9a-f]+)\s*$")
_IGNORED = (re.compile(r"^\s*-+ active -+\s+-+ shared -+\s*$"),
            re.compile(r"^\[ref\] localdom mfn\s+pin\s+localdom gmfn\s+flags\s*$"),
            re.compile(r"^no active grant table entries$"),
            re.compile(r"^" + re.escape(DUMP_BEGIN) + r"$"),
            re.compile(r"^" + re.escape(DUMP_END) + r"$"))


def strip_prefix(line: str) -> str:
    """A console ring line without Xen's "(XEN) " and optional "[timestamp] "."""
    return _PREFIX.sub("", line.rstrip("\r\n"), count=1)


def parse_usage_dump(lines: Iterable[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Parse the output of Xen's ``gnttab_usage_print_all`` (debug key 'g';
    xen/common/grant_table.c of Xen 4.17) given as console ring lines, with or
    without the "(XEN) [timestamp] " prefix.

    Per granting domain (``rd``, key: its domid as a string): ``{"version",
    "nr_frames", "max_frames", "maptrack_frames", "max_maptrack_frames",
    "entries"}``; one entry per ref with a non-zero active pin, in ref order:
    ``{"ref", "active_domid" (the mapping domain), "mfn", "pin" (act->pin:
    0x1 per host-RW map, 0x100 per host-RO map, 0x10000/0x1000000 per device
    map), "shared_domid" (the shared entry's grantee), "gfn" (the shared
    entry's frame), "flags" (v1: the shared entry's flags with
    GTF_reading 0x8/GTF_writing 0x10; v2: the status word)}``.

    Returns (domains, unparsed): lines that are neither part of the dump's
    format nor empty (output of other Xen code interleaved) go to unparsed.
    Raises ValueError for an entry or frames line before any domain line."""
    domains: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    unparsed: list[str] = []
    for raw in lines:
        line = strip_prefix(raw)
        if not line.strip():
            continue
        m = _DOMAIN.match(line)
        if m:
            current = {"version": int(m.group(2)), "nr_frames": None, "max_frames": None,
                       "maptrack_frames": None, "max_maptrack_frames": None, "entries": []}
            domains[m.group(1)] = current
            continue
        m = _FRAMES.match(line)
        if m:
            if current is None:
                raise ValueError(f"grant dump: frames line before any domain: {raw!r}")
            current.update(nr_frames=int(m.group(1)), max_frames=int(m.group(2)),
                           maptrack_frames=int(m.group(3)), max_maptrack_frames=int(m.group(4)))
            continue
        m = _ENTRY.match(line)
        if m:
            if current is None:
                raise ValueError(f"grant dump: entry line before any domain: {raw!r}")
            current["entries"].append({"ref": int(m.group(1), 16), "active_domid": int(m.group(2)),
                                       "mfn": int(m.group(3), 16), "pin": int(m.group(4), 16),
                                       "shared_domid": int(m.group(5)), "gfn": int(m.group(6), 16),
                                       "flags": int(m.group(7), 16)})
            continue
        if any(p.match(line) for p in _IGNORED):
            continue
        unparsed.append(raw.rstrip("\r\n"))
    return domains, unparsed


def dump_lines(text: str) -> list[str] | None:
    """The lines of the last complete 'g' dump in console ring text, from its
    begin line to its end line; None if there is no complete dump."""
    lines = text.splitlines()
    end = next((i for i in range(len(lines) - 1, -1, -1) if strip_prefix(lines[i]) == DUMP_END), None)
    if end is None:
        return None
    begin = next((i for i in range(end, -1, -1) if strip_prefix(lines[i]) == DUMP_BEGIN), None)
    return None if begin is None else lines[begin:end + 1]


@op("xen.grant_state")
def grant_state() -> dict[str, Any]:
    """Xen's view of every domain's grant table: debug key 'g' through
    XEN_SYSCTL_debug_keys, then the new part of Xen's console ring through
    XEN_SYSCTL_readconsole (read incrementally; the ring is not cleared).

    ``domains`` and ``unparsed``: :func:`parse_usage_dump`; ``lines``: the
    dump's raw ring lines. ``errno``: a privcmd/sysctl error (EACCES: Xen's
    sysctl interface version is not 0x15; EPERM: not the control domain).
    Raises ValueError if the ring holds no complete dump (ring too small).

    Seen in the project's PV dom0 (Xen 4.17, Linux 6.12): one writable gntdev
    mmap of a dom0 grant shows pin 0x2 (user PTE + kernel map), flags 0x19
    with v1 and 0x18 with v2; one read-only mmap pin 0x200, flags 0x09 (0x0d
    for a read-only grant) with v1 and 0x08 with v2."""
    global _ring_index
    try:
        err, _, index = _read_ring(_ring_index)
        if not err:
            _ring_index = index
            err = _debug_key("g")
        if not err:
            err, data, index = _read_ring(_ring_index)
            _ring_index = index
    except OSError as exc:
        return record(exc.errno or E.EIO, domains={}, unparsed=[], lines=[])
    if err:
        return record(err, domains={}, unparsed=[], lines=[])
    lines = dump_lines(data.decode("utf-8", "replace"))
    if lines is None:
        raise ValueError(f"no complete 'g' dump in the {len(data)} bytes Xen's console ring gave")
    domains, unparsed = parse_usage_dump(lines)
    return record(0, domains=domains, unparsed=unparsed, lines=lines)


# ---------------------------------------------------------------- deferred-end timer ticks

TRACEFS = "/sys/kernel/tracing"
KPROBE_GROUP, KPROBE_EVENT, KPROBE_SYMBOL = "xen_agent", "gnttab_deferred", "gnttab_handle_deferred"


def _tracefs() -> str:
    if not os.path.exists(f"{TRACEFS}/kprobe_events"):
        if _libc.mount(b"nodev", TRACEFS.encode(), b"tracefs", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot mount tracefs at {TRACEFS}: {os.strerror(err)}")
    return TRACEFS


def _write(path: str, text: str, append: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _install_kprobe() -> str:
    """Install (once) an enabled kprobe on ``gnttab_handle_deferred`` whose
    filter drops every record: its hit count still grows (kernel/trace/
    trace_kprobe.c ``kprobe_dispatcher`` counts before the trace function), and
    nothing is written to the trace buffer. Returns the event's directory."""
    base = _tracefs()
    event_dir = f"{base}/events/{KPROBE_GROUP}/{KPROBE_EVENT}"
    if not os.path.isdir(event_dir):
        _write(f"{base}/kprobe_events", f"p:{KPROBE_GROUP}/{KPROBE_EVENT} {KPROBE_SYMBOL}\n", append=True)
        _write(f"{event_dir}/filter", "common_pid < 0\n")
    if _read(f"{event_dir}/enable") != "1":
        _write(f"{event_dir}/enable", "1\n")
    return event_dir


@op("xen.deferred_ticks")
def deferred_ticks() -> dict[str, Any]:
    """How many times Linux's deferred grant-end timer
    (``gnttab_handle_deferred``, drivers/xen/grant-table.c) has run since the
    agent's first call of this op: the hit count of a kprobe on it
    (``kprobe_profile``). ``ticks`` None with the errno if the kprobe cannot be
    installed (no tracefs, no kprobe events, symbol not found)."""
    try:
        _install_kprobe()
        text = _read(f"{TRACEFS}/kprobe_profile") or ""
    except OSError as exc:
        return record(exc.errno or E.EIO, ticks=None)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == KPROBE_EVENT:
            return record(0, ticks=int(parts[1]))
    return record(E.ENOENT, ticks=None)
