"""vhost-vdpa (/dev/vhost-vdpa-N) on a vdpa_sim device: setting the device up,
the ioctls that prepare it, and the IOTLB messages written to it, one op each,
for the differential tests of the vhost-vdpa IOTLB model.

Set-up: ``vhost_vdpa.add_device`` runs iproute2's ``vdpa dev add`` (vdpasim_net
or vdpasim_blk) and rebinds the new vdpa device from virtio_vdpa to vhost_vdpa
(``driver_override``); ``vhost_vdpa.del_device`` removes it. The kernel must run
vdpa_sim with ``use_va=0`` (kernel command line ``vdpa_sim.use_va=0`` when it is
built in): with the default use_va=1, anonymous memory is neither mapped nor
pinned (``vhost_vdpa_va_map`` skips every vma that is not a shared file).

Every op on an open device takes its file descriptor ``fd`` (from
``vhost_vdpa.open``) and returns :func:`guest_agent.kabi.record`: ``{"errno": 0 |
E, <fields>, "vm_pin": pages, "vm_lck": pages}`` (VmPin/VmLck of the agent in
4 KiB pages after the call). Messages (``vhost_vdpa.msg``) are ``struct
vhost_msg_v2`` (72 bytes: type@0 = VHOST_IOTLB_MSG_V2, asid@4, then ``struct
vhost_iotlb_msg`` iova@8, size@16, uaddr@24, perm@32 (u8), type@33 (u8)); their
record has ``written`` (bytes write() returned, or -1 with the errno). The kernel
turns every error of the message handler into EFAULT (``vhost_chr_write_iter``).

Addresses: ``iova`` is an IO-virtual address of the device's IOTLB; ``uaddr`` a
user virtual address of the agent (a region of ``mem.map`` or
``vhost_vdpa.region``); sizes in bytes.

What the kernel lets user space see of the IOTLB: nothing directly. vhost-vdpa
has no read() (EINVAL) and no ioctl that lists the maps, vdpa_sim has no
tracepoints or debugfs for its IOTLB; what shows is write()'s answer (EEXIST of an
UPDATE over an existing map, as EFAULT) and VmPin (mm->pinned_vm, which PA mode
raises and lowers per map). ``vhost_vdpa.probe`` uses the first: probe UPDATEs
that must fail where a map exists, each successful one invalidated again.

Semantics: drivers/vhost/vdpa.c (vhost_vdpa_unlocked_ioctl,
vhost_vdpa_process_iotlb_msg, vhost_vdpa_pa_map, vhost_vdpa_pa_unmap,
vhost_vdpa_open/release), drivers/vhost/vhost.c (vhost_chr_write_iter),
drivers/vdpa/vdpa_sim/vdpa_sim.c; include/uapi/linux/vhost.h, vhost_types.h.
"""

from __future__ import annotations

import ctypes
import os
import resource
import struct
import subprocess
from typing import Any

from guest_agent import kabi
from guest_agent.kabi import IOR, IOW, ioctl, record
from guest_agent.protocol import op

PAGE = 4096
U64_MAX = 2**64 - 1
# The ioctls vhost-vdpa shares with every vhost device (include/uapi/linux/vhost.h).
from guest_agent.vhost import (VHOST as VHOST_VIRTIO, VHOST_GET_BACKEND_FEATURES, VHOST_GET_FEATURES,  # noqa: E402
                               VHOST_SET_BACKEND_FEATURES, VHOST_SET_OWNER)

VHOST_VDPA_GET_DEVICE_ID = IOR(VHOST_VIRTIO, 0x70, 4)
VHOST_VDPA_GET_IOVA_RANGE = IOR(VHOST_VIRTIO, 0x78, 16)
VHOST_VDPA_GET_AS_NUM = IOR(VHOST_VIRTIO, 0x7A, 4)
VHOST_VDPA_GET_GROUP_NUM = IOR(VHOST_VIRTIO, 0x81, 4)

VHOST_IOTLB_MSG_V2 = 0x2
# struct vhost_iotlb_msg .type
IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL = 1, 2, 3, 4
IOTLB_BATCH_BEGIN, IOTLB_BATCH_END = 5, 6
MSG_TYPES = {"miss": IOTLB_MISS, "update": IOTLB_UPDATE, "invalidate": IOTLB_INVALIDATE,
             "access_fail": IOTLB_ACCESS_FAIL, "batch_begin": IOTLB_BATCH_BEGIN, "batch_end": IOTLB_BATCH_END}
MSG_V2_SIZE = 72
_MSG_V2 = struct.Struct("<IIQQQBB38x")
assert _MSG_V2.size == MSG_V2_SIZE

SYS_VDPA = "/sys/bus/vdpa/devices"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
_libc.write.restype = ctypes.c_ssize_t
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_libc.mremap.restype = ctypes.c_void_p

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
MADV_NOHUGEPAGE = 15
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MAP_FAILED = ctypes.c_void_p(-1).value


# ---------------------------------------------------------------------- the vdpa device


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _write_sys(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _driver(name: str) -> str | None:
    link = os.path.join(SYS_VDPA, name, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def _node(name: str) -> str | None:
    base = os.path.join(SYS_VDPA, name)
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if entry.startswith("vhost-vdpa-"):
            return "/dev/" + entry
    return None


@op("vhost_vdpa.add_device")
def add_device(name: str = "vdpa0", mgmtdev: str = "vdpasim_net") -> dict[str, Any]:
    """Create vdpa device ``name`` on management device ``mgmtdev`` (iproute2 ``vdpa
    dev add``; kept if it exists already) and bind it to vhost_vdpa.

    Returns ``{"name", "driver", "path": "/dev/vhost-vdpa-N" | None, "use_va":
    vdpa_sim's module parameter ("Y"/"N", "" if unknown), "created": bool}``.
    Raises RuntimeError if ``vdpa dev add`` fails (its stderr in the message).
    """
    created = False
    if not os.path.isdir(os.path.join(SYS_VDPA, name)):
        proc = subprocess.run(["vdpa", "dev", "add", "name", name, "mgmtdev", mgmtdev],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"vdpa dev add name {name} mgmtdev {mgmtdev}: {proc.stderr.strip()}")
        created = True
    base = os.path.join(SYS_VDPA, name)
    if _driver(name) != "vhost_vdpa":
        _write_sys(os.path.join(base, "driver_override"), "vhost_vdpa")
        if _driver(name) is not None:
            _write_sys(os.path.join(base, "driver", "unbind"), name)
        _write_sys("/sys/bus/vdpa/drivers_probe", name)
    return {"name": name, "driver": _driver(name), "path": _node(name),
            "use_va": _read("/sys/module/vdpa_sim/parameters/use_va"),
            "batch_mapping": _read("/sys/module/vdpa_sim/parameters/batch_mapping"), "created": created}


@op("vhost_vdpa.del_device")
def del_device(name: str = "vdpa0") -> dict[str, Any]:
    """Remove vdpa device ``name`` (``vdpa dev del``); ``{"returncode", "stderr"}``."""
    proc = subprocess.run(["vdpa", "dev", "del", name], capture_output=True, text=True, timeout=30)
    return {"name": name, "returncode": proc.returncode, "stderr": proc.stderr.strip()}


# ---------------------------------------------------------------------- ioctls


PATHS: dict[int, str] = {}
"""fd -> the device node it was opened from (for ``vhost_vdpa.reopen``)."""


@op("vhost_vdpa.open")
def open_dev(path: str | None = None, name: str | None = None, owner: bool = False,
             close: bool = False) -> dict[str, Any]:
    """open(2) the device node ``path`` (or that of vdpa device ``name``) read-write:
    ``fd`` (or -1 and the errno; a second open of the same device is EBUSY,
    ``vhost_vdpa_open``). ``owner``: VHOST_SET_OWNER right after a successful
    open (``owner_errno``, None when not tried). ``close``: close it again at once
    (to try an open without keeping it)."""
    if path is None:
        path = _node(name or "vdpa0")
        if path is None:
            return record(2, fd=-1, path=None, owner_errno=None)  # ENOENT: no vhost-vdpa node
    rec = kabi.open_fd(path, what=f"vhost-vdpa {path}")
    owner_errno = None
    if rec["errno"] == 0:
        PATHS[rec["fd"]] = path
        if owner:
            owner_errno = ioctl(rec["fd"], VHOST_SET_OWNER)
        if close:
            kabi.close(rec["fd"])
            PATHS.pop(rec["fd"], None)
    rec.update(owner_errno=owner_errno, **kabi.pin_counters())
    return rec


@op("vhost_vdpa.reopen")
def reopen(fd: int, owner: bool = True) -> dict[str, Any]:
    """close(2) ``fd`` (a vhost-vdpa fd of ``vhost_vdpa.open``: every map goes and
    is unpinned), then open the same node again under the same fd number (dup2),
    with VHOST_SET_OWNER if ``owner``.

    Record: ``errno`` of the open, ``vm_pin_closed`` (VmPin between the close and
    the open, pages), ``owner_errno``, then VmPin/VmLck at the end."""
    path = PATHS.pop(fd)
    kabi.FDS.pop(fd, None)
    os.close(fd)
    closed_pin = kabi.pin_counters()["vm_pin"]
    try:
        new = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return record(exc.errno or 0, fd=-1, vm_pin_closed=closed_pin, owner_errno=None)
    if new != fd:
        os.dup2(new, fd, inheritable=False)
        os.close(new)
    kabi.keep(fd, f"vhost-vdpa {path}")
    PATHS[fd] = path
    owner_errno = ioctl(fd, VHOST_SET_OWNER) if owner else None
    return record(0, fd=fd, vm_pin_closed=closed_pin, owner_errno=owner_errno)


@op("vhost_vdpa.set_owner")
def set_owner(fd: int) -> dict[str, Any]:
    """VHOST_SET_OWNER: binds the device to this process's mm (a second one EBUSY)."""
    return record(ioctl(fd, VHOST_SET_OWNER))


class _U64(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64)]


class _U32(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint32)]


class IovaRange(ctypes.Structure):
    """struct vhost_vdpa_iova_range (16 bytes)."""

    _fields_ = [("first", ctypes.c_uint64), ("last", ctypes.c_uint64)]


def _get_u64(fd: int, request: int) -> tuple[int, int]:
    value = _U64(0)
    return ioctl(fd, request, value), int(value.value)


def _get_u32(fd: int, request: int) -> tuple[int, int]:
    value = _U32(0)
    return ioctl(fd, request, value), int(value.value)


@op("vhost_vdpa.get_backend_features")
def get_backend_features(fd: int) -> dict[str, Any]:
    """VHOST_GET_BACKEND_FEATURES: ``features`` (VHOST_BACKEND_F_* bits)."""
    err, value = _get_u64(fd, VHOST_GET_BACKEND_FEATURES)
    return record(err, features=value)


@op("vhost_vdpa.set_backend_features")
def set_backend_features(fd: int, features: int) -> dict[str, Any]:
    """VHOST_SET_BACKEND_FEATURES with ``features`` (u64; an unknown bit EOPNOTSUPP)."""
    if not 0 <= features <= U64_MAX:
        raise ValueError(f"features {features!r} is not a u64")
    return record(ioctl(fd, VHOST_SET_BACKEND_FEATURES, _U64(features)), features=features)


@op("vhost_vdpa.get_features")
def get_features(fd: int) -> dict[str, Any]:
    """VHOST_GET_FEATURES: the device's virtio ``features``."""
    err, value = _get_u64(fd, VHOST_GET_FEATURES)
    return record(err, features=value)


@op("vhost_vdpa.get_iova_range")
def get_iova_range(fd: int) -> dict[str, Any]:
    """VHOST_VDPA_GET_IOVA_RANGE: ``first`` and ``last`` usable iova (inclusive)."""
    buf = IovaRange(0, 0)
    err = ioctl(fd, VHOST_VDPA_GET_IOVA_RANGE, buf)
    return record(err, first=int(buf.first), last=int(buf.last))


@op("vhost_vdpa.get_info")
def get_info(fd: int) -> dict[str, Any]:
    """VHOST_VDPA_GET_DEVICE_ID, GET_AS_NUM, GET_GROUP_NUM: ``device_id``, ``nas``, ``ngroups``."""
    e1, device_id = _get_u32(fd, VHOST_VDPA_GET_DEVICE_ID)
    e2, nas = _get_u32(fd, VHOST_VDPA_GET_AS_NUM)
    e3, ngroups = _get_u32(fd, VHOST_VDPA_GET_GROUP_NUM)
    return record(e1 or e2 or e3, device_id=device_id, nas=nas, ngroups=ngroups)


# ---------------------------------------------------------------------- messages


def pack_msg(type: int, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0, asid: int = 0) -> bytes:
    """The 72 bytes of a ``struct vhost_msg_v2`` carrying one ``vhost_iotlb_msg``."""
    for name, value, limit in (("iova", iova, U64_MAX), ("size", size, U64_MAX), ("uaddr", uaddr, U64_MAX),
                               ("perm", perm, 0xFF), ("type", type, 0xFF), ("asid", asid, 0xFFFFFFFF)):
        if not 0 <= value <= limit:
            raise ValueError(f"{name} {value!r} does not fit its field (at most {limit:#x})")
    return _MSG_V2.pack(VHOST_IOTLB_MSG_V2, asid, iova, size, uaddr, perm, type)


def _write(fd: int, data: bytes) -> tuple[int, int]:
    """write(2) ``data``: (bytes written, 0) or (-1, errno)."""
    ctypes.set_errno(0)
    n = _libc.write(fd, data, len(data))
    return (n, 0) if n >= 0 else (-1, ctypes.get_errno())


def _msg_type(type: int | str) -> int:
    return MSG_TYPES[type] if isinstance(type, str) else int(type)


@op("vhost_vdpa.msg")
def msg(fd: int, type: int | str, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0, asid: int = 0,
        length: int = MSG_V2_SIZE) -> dict[str, Any]:
    """write(2) one ``vhost_msg_v2``: ``type`` is a VHOST_IOTLB_* number or one of
    "update", "invalidate", "batch_begin", "batch_end", "miss", "access_fail";
    ``length``: bytes written (72, or fewer to see the short-write EINVAL).

    Record: ``{"errno", "written": bytes write() returned (72 on success) or -1}``.
    """
    data = pack_msg(_msg_type(type), iova, size, uaddr, perm, asid)
    written, err = _write(fd, data[:length] if length <= MSG_V2_SIZE else data + bytes(length - MSG_V2_SIZE))
    return record(err, written=written)


@op("vhost_vdpa.probe")
def probe(fd: int, asid: int, ranges: list[list[int]], uaddr: int, perm: int = 1) -> dict[str, Any]:
    """For each ``[iova, size]`` of ``ranges``: write an UPDATE of it (user memory
    at ``uaddr``, permission ``perm``, address space ``asid``); when it succeeds,
    write an INVALIDATE of the same range at once, which removes exactly the maps
    the probe made (nothing else intersected it, or the UPDATE would have failed).

    Returns ``{"errno": 0, "answers": [errno of each UPDATE (0: nothing was mapped
    there; EFAULT: something was, or the UPDATE failed otherwise)], "undo":
    [errno of each INVALIDATE, None where none was needed]}`` plus VmPin after all.
    """
    answers: list[int] = []
    undo: list[int | None] = []
    for iova, size in ranges:
        _, err = _write(fd, pack_msg(IOTLB_UPDATE, iova, size, uaddr, perm, asid))
        answers.append(err)
        if err == 0:
            _, err2 = _write(fd, pack_msg(IOTLB_INVALIDATE, iova, size, 0, 0, asid))
            undo.append(err2)
        else:
            undo.append(None)
    return record(0, answers=answers, undo=undo)


# ---------------------------------------------------------------------- RLIMIT_MEMLOCK


@op("vhost_vdpa.memlock")
def memlock(pages: int | None = None) -> dict[str, Any]:
    """Get, or set (``pages``: 4 KiB pages, -1 for unlimited), the soft
    RLIMIT_MEMLOCK of the agent (vhost_vdpa_pa_map refuses an UPDATE whose pages
    plus mm->pinned_vm exceed it, whatever the capabilities). Returns the
    ``old`` and ``new`` soft limits in pages (-1: unlimited) and the ``hard`` one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def pages_of(v: int) -> int:
        return -1 if v == resource.RLIM_INFINITY else v // PAGE

    if pages is not None:
        new = resource.RLIM_INFINITY if pages < 0 else pages * PAGE
        if hard != resource.RLIM_INFINITY and (new == resource.RLIM_INFINITY or new > hard):
            hard = new
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (new, hard))
    now_soft, now_hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return record(0, old=pages_of(soft), new=pages_of(now_soft), hard=pages_of(now_hard))


# ---------------------------------------------------------------------- regions of known physical layout

REGIONS: dict[int, int] = {}
"""user_va -> length of each region :func:`region` built."""


def _pfns(addr: int, n: int) -> list[int]:
    """PFN of each of the ``n`` pages at ``addr`` (0 for a page not present)."""
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(addr // PAGE * 8)
        raw = fh.read(8 * n)
    out = []
    for (entry,) in struct.iter_unpack("<Q", raw):
        out.append(entry & ((1 << 55) - 1) if entry >> 63 else 0)
    return out


def layout_of(pfns: list[int]) -> list[int]:
    """Lengths of the runs of consecutive PFNs in ``pfns`` (page i+1 directly after page i)."""
    runs: list[int] = []
    for i, pfn in enumerate(pfns):
        if i and pfns[i - 1] and pfn == pfns[i - 1] + 1:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def _find_runs(pfns: list[int], want: list[int]) -> list[list[int]] | None:
    """Pool page indexes for each run of ``want`` (each run's pages physically
    consecutive, a run never starting right after the previous run's last page),
    or None if the pool lacks them."""
    by_pfn = {pfn: i for i, pfn in enumerate(pfns) if pfn}
    starts: dict[int, int] = {}  # pfn -> length of the consecutive stretch starting there
    for pfn in sorted(by_pfn, reverse=True):
        starts[pfn] = starts.get(pfn + 1, 0) + 1
    used: set[int] = set()
    chosen: list[list[int] | None] = [None] * len(want)
    for k in sorted(range(len(want)), key=lambda k: -want[k]):
        length = want[k]
        for pfn in sorted(starts):
            if starts[pfn] < length or any(p in used for p in range(pfn, pfn + length)):
                continue
            used.update(range(pfn, pfn + length))
            # keep a gap on both sides so neighbouring runs cannot join
            used.update((pfn - 1, pfn + length))
            chosen[k] = [by_pfn[p] for p in range(pfn, pfn + length)]
            break
        else:
            return None
    return [c for c in chosen if c is not None]


@op("vhost_vdpa.region")
def region(user_va: int, runs: list[int], readonly: int = 0, pool_pages: int = 4096) -> dict[str, Any]:
    """Build (or check) an anonymous region at ``user_va`` whose pages form runs of
    physically consecutive pages of the lengths ``runs`` (in order), the page after
    each run not physically next to its last page; its last ``readonly`` pages are
    mprotect'ed read-only (pin_user_pages with FOLL_WRITE fails there).

    Pages come from a pool of ``pool_pages`` touched pages (MADV_NOHUGEPAGE),
    sorted by PFN and moved into place one by one with mremap (which keeps the
    physical page). If the region exists already and still has that layout it is
    kept (the pages of an unpinned region may move, e.g. by compaction: then it is
    built again).

    Returns ``{"user_va", "length", "runs": the layout found (equal to ``runs``),
    "pfns": PFN of each page, "rebuilt": bool}``. Raises RuntimeError if the pool
    has no such runs, OSError if a mapping call fails.
    """
    npages = sum(runs)
    length = npages * PAGE
    if user_va in REGIONS:
        pfns = _pfns(user_va, npages)
        if layout_of(pfns) == list(runs) and REGIONS[user_va] == length:
            return {"user_va": user_va, "length": length, "runs": list(runs), "pfns": pfns, "rebuilt": False}
        region_free(user_va)
    pool = _libc.mmap(None, pool_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if pool in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap of the page pool failed")
    try:
        _libc.madvise(pool, pool_pages * PAGE, MADV_NOHUGEPAGE)
        for i in range(pool_pages):
            ctypes.memset(pool + i * PAGE, (i % 251) + 1, PAGE)
        chosen = _find_runs(_pfns(pool, pool_pages), list(runs))
        if chosen is None:
            raise RuntimeError(f"no runs {runs} of consecutive PFNs among {pool_pages} pool pages")
        base = _libc.mmap(user_va, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        if base in (None, MAP_FAILED) or base != user_va:
            raise OSError(ctypes.get_errno() or 17, f"cannot reserve {length:#x} bytes at {user_va:#x}")
        slot = 0
        for run in chosen:
            for index in run:
                got = _libc.mremap(pool + index * PAGE, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED,
                                   user_va + slot * PAGE)
                if got in (None, MAP_FAILED):
                    raise OSError(ctypes.get_errno(), f"mremap of pool page {index} to slot {slot} failed")
                slot += 1
    finally:
        _libc.munmap(pool, pool_pages * PAGE)  # what was not moved out of it
    REGIONS[user_va] = length
    if readonly:
        if _libc.mprotect(user_va + (npages - readonly) * PAGE, readonly * PAGE, PROT_READ) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of the read-only tail failed")
    pfns = _pfns(user_va, npages)
    found = layout_of(pfns)
    if found != list(runs):
        raise RuntimeError(f"region built with layout {found}, not {runs}")
    return {"user_va": user_va, "length": length, "runs": found, "pfns": pfns, "rebuilt": True}


@op("vhost_vdpa.region_free")
def region_free(user_va: int) -> dict[str, Any]:
    """munmap a region made by :func:`region`."""
    length = REGIONS.pop(user_va)
    _libc.munmap(user_va, length)
    return {"user_va": user_va, "length": length}
