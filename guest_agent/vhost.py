"""/dev/vhost-net with a device IOTLB, driven from user space: the setup ioctls,
the IOTLB messages written to and the MISS messages read from the device fd, the
backend (an AF_PACKET raw socket bound to ``lo``) and the kicks, for the
differential tests of the vhost IOTLB model (harness.models.vhost_net).

Every op takes the vhost device fd ``fd`` (from ``vhost.net_open``, opened
O_NONBLOCK so a read with nothing queued is EAGAIN) and returns
:func:`guest_agent.kabi.record`: ``{"errno": 0 | E, <fields>, "vm_pin": pages,
"vm_lck": pages}``. Ops that can make the kernel queue work (a write, a backend
change, a kick) finish with:

* a flush: ``VHOST_SET_LOG_FD`` with -1 (``vhost_net_ioctl`` flushes the device's
  worker after every ioctl ``vhost_dev_ioctl`` handles), so the handlers the op
  queued (``handle_tx``/``handle_rx`` and their ``vq_meta_prefetch``) have run
  (``flush_errno``);
* ``pollin``: whether poll() reports EPOLLIN (a message waits in ``read_list``);
* ``misses`` (only when ``read`` is true): every message read() returns until
  EAGAIN, in order, each ``{"outer", "asid", "type", "iova", "size", "uaddr",
  "perm"}`` (``outer`` 2 for ``struct vhost_msg_v2``, 1 for ``struct vhost_msg``).

With ``read`` false the messages stay in ``read_list``.

Addresses: ``iova`` is an IO-virtual address (what the vrings are placed at and
what the IOTLB maps); ``uaddr`` a user virtual address of this process (a region
of ``mem.map``). Sizes are in bytes.

Semantics: drivers/vhost/vhost.c (``vhost_chr_write_iter``,
``vhost_process_iotlb_msg``, ``vhost_iotlb_notify_vq``, ``vhost_chr_read_iter``,
``translate_desc``, ``iotlb_access_ok``, ``vq_meta_prefetch``,
``vhost_vq_init_access``, ``vhost_init_device_iotlb``) and drivers/vhost/net.c
(``vhost_net_set_backend``, ``handle_tx``, ``handle_rx``, ``vhost_net_ioctl``) of
Linux 6.12.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import select
import socket
import struct
from typing import Any

from guest_agent import kabi
from guest_agent.kabi import IO, IOR, IOW, ioctl, record
from guest_agent.protocol import op

VHOST = 0xAF
VHOST_GET_FEATURES = IOR(VHOST, 0x00, 8)
VHOST_SET_FEATURES = IOW(VHOST, 0x00, 8)
VHOST_SET_OWNER = IO(VHOST, 0x01)
VHOST_SET_MEM_TABLE = IOW(VHOST, 0x03, 8)
VHOST_SET_LOG_FD = IOW(VHOST, 0x07, 4)
VHOST_SET_VRING_NUM = IOW(VHOST, 0x10, 8)
VHOST_SET_VRING_ADDR = IOW(VHOST, 0x11, 40)
VHOST_SET_VRING_KICK = IOW(VHOST, 0x20, 8)
VHOST_SET_VRING_CALL = IOW(VHOST, 0x21, 8)
VHOST_GET_BACKEND_FEATURES = IOR(VHOST, 0x26, 8)
VHOST_SET_BACKEND_FEATURES = IOW(VHOST, 0x25, 8)
VHOST_NET_SET_BACKEND = IOW(VHOST, 0x30, 8)

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VHOST_BACKEND_F_IOTLB_MSG_V2 = 1 << 1

VHOST_IOTLB_MSG, VHOST_IOTLB_MSG_V2 = 1, 2
MISS, UPDATE, INVALIDATE = 1, 2, 3
MSG_SIZE = 72
U64_MAX = 2**64 - 1

_VQS = 2  # VHOST_NET_VQ_RX = 0, VHOST_NET_VQ_TX = 1


class _U64(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64)]


class _I32(ctypes.Structure):
    _fields_ = [("value", ctypes.c_int32)]


class _State(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("num", ctypes.c_uint32)]


class _File(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("fd", ctypes.c_int32)]


class _Addr(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("desc", ctypes.c_uint64),
                ("used", ctypes.c_uint64), ("avail", ctypes.c_uint64), ("log", ctypes.c_uint64)]


class _Device:
    """What the agent keeps per vhost fd: its kick/call eventfds, its backend
    socket, and the iovas of the MISS messages it read that no successful UPDATE
    has covered yet (the kernel's ``pending_list``, as far as this process can
    tell; only used to decide when a write must be followed by a flush)."""

    def __init__(self) -> None:
        self.kick: list[int] = [-1] * _VQS
        self.call: list[int] = [-1] * _VQS
        self.sock = -1
        self.pending: list[int] = []


DEVICES: dict[int, _Device] = {}


def _dev(fd: int) -> _Device:
    dev = DEVICES.get(fd)
    if dev is None or fd not in kabi.FDS:
        dev = DEVICES[fd] = _Device()
    return dev


def _u64(value: int) -> _U64:
    return _U64(value & U64_MAX)


def pack_msg(iotlb_type: int, iova: int, size: int, uaddr: int = 0, perm: int = 0, *,
             outer: int = VHOST_IOTLB_MSG_V2, asid: int = 0) -> bytes:
    """``struct vhost_msg_v2`` (72 B: type@0, asid@4, iotlb@8) or, for ``outer`` 1,
    ``struct vhost_msg`` (72 B: type@0, iotlb@8); ``struct vhost_iotlb_msg`` is
    iova@0 size@8 uaddr@16 (u64) perm@24 type@25 (u8)."""
    head = struct.pack("<II", outer & 0xFFFFFFFF, asid & 0xFFFFFFFF)
    body = struct.pack("<QQQBB6x", iova & U64_MAX, size & U64_MAX, uaddr & U64_MAX, perm & 0xFF,
                       iotlb_type & 0xFF)
    return (head + body).ljust(MSG_SIZE, b"\0")


def unpack_msg(raw: bytes) -> dict[str, int]:
    outer, asid = struct.unpack_from("<II", raw, 0)
    iova, size, uaddr, perm, kind = struct.unpack_from("<QQQBB", raw, 8)
    return {"outer": outer, "asid": asid if outer == VHOST_IOTLB_MSG_V2 else 0, "type": kind,
            "iova": iova, "size": size, "uaddr": uaddr, "perm": perm}


def _flush(fd: int) -> int:
    """VHOST_SET_LOG_FD -1: no log eventfd (the tests never set one), and
    ``vhost_net_ioctl`` then runs ``vhost_net_flush``: every work queued on the
    device's worker before it has finished."""
    return ioctl(fd, VHOST_SET_LOG_FD, _I32(-1))


def _pollin(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLIN for _, ev in p.poll(0))


def _drain(fd: int, limit: int = 4096) -> list[dict[str, int]]:
    out: list[dict[str, int]] = []
    dev = _dev(fd)
    while len(out) < limit:
        try:
            raw = os.read(fd, MSG_SIZE)
        except BlockingIOError:
            break
        if len(raw) < MSG_SIZE:
            break
        msg = unpack_msg(raw)
        out.append(msg)
        if msg["type"] == MISS:
            dev.pending.append(msg["iova"])
    return out


def _finish(fd: int, rec: dict[str, Any], read: bool) -> dict[str, Any]:
    rec["flush_errno"] = _flush(fd)
    rec["pollin"] = _pollin(fd)
    if read:
        rec["misses"] = _drain(fd)
    return rec


@op("vhost.net_open")
def net_open() -> dict[str, Any]:
    """open("/dev/vhost-net", O_RDWR | O_NONBLOCK): ``fd`` (or -1 and the errno)."""
    rec = kabi.open_fd("/dev/vhost-net", os.O_RDWR | os.O_NONBLOCK, what="vhost-net")
    if rec["fd"] >= 0:
        DEVICES[rec["fd"]] = _Device()
    return rec


@op("vhost.get_features")
def get_features(fd: int) -> dict[str, Any]:
    """VHOST_GET_FEATURES and VHOST_GET_BACKEND_FEATURES."""
    f, b = _U64(0), _U64(0)
    e1 = ioctl(fd, VHOST_GET_FEATURES, f)
    e2 = ioctl(fd, VHOST_GET_BACKEND_FEATURES, b)
    return record(e1 or e2, features=f.value, backend_features=b.value)


@op("vhost.set_owner")
def set_owner(fd: int) -> dict[str, Any]:
    return record(ioctl(fd, VHOST_SET_OWNER))


@op("vhost.set_mem_table")
def set_mem_table(fd: int) -> dict[str, Any]:
    """VHOST_SET_MEM_TABLE with 0 regions (``struct vhost_memory``: nregions, padding)."""
    return record(ioctl(fd, VHOST_SET_MEM_TABLE, _U64(0)))


@op("vhost.set_features")
def set_features(fd: int, features: int = VIRTIO_F_ACCESS_PLATFORM | VIRTIO_F_VERSION_1) -> dict[str, Any]:
    """VHOST_SET_FEATURES; with ACCESS_PLATFORM every call gives the device a new,
    empty IOTLB (``vhost_init_device_iotlb``)."""
    return record(ioctl(fd, VHOST_SET_FEATURES, _u64(features)), features=features)


@op("vhost.set_backend_features")
def set_backend_features(fd: int, features: int = VHOST_BACKEND_F_IOTLB_MSG_V2) -> dict[str, Any]:
    return record(ioctl(fd, VHOST_SET_BACKEND_FEATURES, _u64(features)), features=features)


@op("vhost.set_vring")
def set_vring(fd: int, index: int, num: int, desc: int, avail: int, used: int, flags: int = 0) -> dict[str, Any]:
    """VHOST_SET_VRING_NUM then VHOST_SET_VRING_ADDR (desc, avail, used are iovas
    with a device IOTLB); ``num_errno`` and ``addr_errno``."""
    e_num = ioctl(fd, VHOST_SET_VRING_NUM, _State(index, num))
    e_addr = ioctl(fd, VHOST_SET_VRING_ADDR, _Addr(index, flags, desc & U64_MAX, used & U64_MAX,
                                                    avail & U64_MAX, 0))
    return record(e_num or e_addr, num_errno=e_num, addr_errno=e_addr)


@op("vhost.set_kick")
def set_kick(fd: int, index: int) -> dict[str, Any]:
    """A new eventfd as the vq's kick (VHOST_SET_VRING_KICK) and another as its call
    (VHOST_SET_VRING_CALL); both kept in the fd table."""
    dev = _dev(fd)
    kick = kabi.keep(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), f"vhost kick {index}")
    call = kabi.keep(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), f"vhost call {index}")
    e_kick = ioctl(fd, VHOST_SET_VRING_KICK, _File(index, kick))
    e_call = ioctl(fd, VHOST_SET_VRING_CALL, _File(index, call))
    if 0 <= index < _VQS:
        dev.kick[index], dev.call[index] = kick, call
    return record(e_kick or e_call, kick_errno=e_kick, call_errno=e_call, kick_fd=kick, call_fd=call)


@op("vhost.packet_socket")
def packet_socket(fd: int, ifname: str = "lo") -> dict[str, Any]:
    """An AF_PACKET SOCK_RAW socket of protocol 0 (it receives nothing) bound to
    ``ifname``: the backend ``vhost.set_backend`` installs. ``sock`` is its fd."""
    dev = _dev(fd)
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        s.bind((ifname, 0))
    except OSError as exc:
        return record(exc.errno or 0, sock=-1)
    dev.sock = kabi.keep(s.detach(), f"AF_PACKET on {ifname}")
    return record(0, sock=dev.sock)


@op("vhost.net_setup")
def net_setup(fd: int, num: int, rings: list[list[int]], features: int = VIRTIO_F_ACCESS_PLATFORM | VIRTIO_F_VERSION_1,
              backend_features: int = VHOST_BACKEND_F_IOTLB_MSG_V2) -> dict[str, Any]:
    """The whole setup in one call: SET_OWNER, SET_MEM_TABLE (0 regions),
    SET_FEATURES, SET_BACKEND_FEATURES, then for each vq ``i`` (``rings[i]`` =
    [desc, avail, used] iovas) SET_VRING_NUM/ADDR and a kick and a call eventfd,
    then the packet socket. ``errnos``: each step's errno by name; ``errno`` the
    first non-zero one."""
    errnos: dict[str, int] = {}
    errnos["set_owner"] = ioctl(fd, VHOST_SET_OWNER)
    errnos["set_mem_table"] = ioctl(fd, VHOST_SET_MEM_TABLE, _U64(0))
    errnos["set_features"] = ioctl(fd, VHOST_SET_FEATURES, _u64(features))
    errnos["set_backend_features"] = ioctl(fd, VHOST_SET_BACKEND_FEATURES, _u64(backend_features))
    for i, (desc, avail, used) in enumerate(rings):
        errnos[f"vring{i}"] = set_vring(fd, i, num, desc, avail, used)["errno"]
        errnos[f"kick{i}"] = set_kick(fd, i)["errno"]
    sock = packet_socket(fd)
    errnos["socket"] = sock["errno"]
    first = next((e for e in errnos.values() if e), 0)
    return record(first, errnos=errnos, sock=sock["sock"])


@op("vhost.set_backend")
def set_backend(fd: int, index: int, backend: str | int = "sock", read: bool = True) -> dict[str, Any]:
    """VHOST_NET_SET_BACKEND of vq ``index``: ``backend`` "sock" (the packet
    socket: a start), "none" (fd -1: a stop, which also drops every queued and
    pending message, ``vhost_clear_msg``) or an fd number. Then flush, poll, read."""
    dev = _dev(fd)
    bfd = dev.sock if backend == "sock" else -1 if backend == "none" else int(backend)
    err = ioctl(fd, VHOST_NET_SET_BACKEND, _File(index, bfd))
    if bfd == -1:
        dev.pending.clear()
    return _finish(fd, record(err, index=index, backend_fd=bfd), read)


@op("vhost.kick")
def kick(fd: int, index: int, read: bool = True) -> dict[str, Any]:
    """Write 1 to vq ``index``'s kick eventfd (its handler is queued), then flush,
    poll, read."""
    dev = _dev(fd)
    err = 0
    try:
        os.eventfd_write(dev.kick[index], 1)
    except OSError as exc:
        err = exc.errno or 0
    return _finish(fd, record(err, index=index), read)


def _write_one(fd: int, dev: _Device, raw: bytes, msg: dict[str, Any]) -> tuple[int, int]:
    """write(2) one message; (errno, bytes written). A successful UPDATE covering
    the iova of a miss this process read is followed by a flush, so the handler
    ``vhost_iotlb_notify_vq`` queued runs before the next message changes the IOTLB."""
    try:
        written = os.write(fd, raw)
    except OSError as exc:
        return exc.errno or 0, -1
    if msg.get("type") == UPDATE and dev.pending:
        lo, last = msg["iova"], (msg["iova"] + msg["size"] - 1) & U64_MAX
        covered = [i for i in dev.pending if lo <= i <= last]
        if covered:
            dev.pending = [i for i in dev.pending if not lo <= i <= last]
            _flush(fd)
    return 0, written


@op("vhost.write")
def write(fd: int, msgs: list[dict[str, Any]], read: bool = True) -> dict[str, Any]:
    """write(2) each message of ``msgs`` (``{"type", "iova", "size", "uaddr",
    "perm"}``, optional ``"outer"`` (2), ``"asid"`` (0), ``"count"``: the bytes
    passed to write(), 72 by default: fewer truncate the message, more pad it with
    zeros). ``results``: ``[errno, bytes written]`` per message (-1 bytes on an
    errno). Then flush, poll, read."""
    dev = _dev(fd)
    results: list[list[int]] = []
    for m in msgs:
        raw = pack_msg(m["type"], m.get("iova", 0), m.get("size", 0), m.get("uaddr", 0), m.get("perm", 0),
                       outer=m.get("outer", VHOST_IOTLB_MSG_V2), asid=m.get("asid", 0))
        count = m.get("count", MSG_SIZE)
        raw = raw[:count] if count <= MSG_SIZE else raw + bytes(count - MSG_SIZE)
        err, written = _write_one(fd, dev, raw, m)
        results.append([err, written])
    return _finish(fd, record(next((e for e, _ in results if e), 0), results=results), read)


@op("vhost.fill")
def fill(fd: int, n: int, iova: int, stride: int, size: int, perm: int, uaddr_delta: int,
         read: bool = True) -> dict[str, Any]:
    """``n`` UPDATEs: the k-th maps [iova + k*stride, +size) to uaddr = its iova +
    ``uaddr_delta`` (mod 2**64) with ``perm``. A digest instead of ``n`` results:
    ``written`` (how many returned 72), ``errnos`` ({errno: count} of the others)
    and ``sha256`` of the per-message results. Then flush, poll, read."""
    dev = _dev(fd)
    h = hashlib.sha256()
    ok = 0
    errnos: dict[str, int] = {}
    for k in range(n):
        at = (iova + k * stride) & U64_MAX
        m = {"type": UPDATE, "iova": at, "size": size}
        raw = pack_msg(UPDATE, at, size, (at + uaddr_delta) & U64_MAX, perm)
        err, written = _write_one(fd, dev, raw, m)
        h.update(struct.pack("<iq", err, written))
        if err == 0 and written == MSG_SIZE:
            ok += 1
        else:
            errnos[str(err)] = errnos.get(str(err), 0) + 1
    return _finish(fd, record(0, written=ok, errnos=errnos, sha256=h.hexdigest()), read)


@op("vhost.read")
def read_misses(fd: int, flush: bool = True) -> dict[str, Any]:
    """Flush (if asked), poll, then read every queued message."""
    return _finish(fd, record(0), True) if flush else record(0, pollin=_pollin(fd), misses=_drain(fd))


@op("vhost.read_raw")
def read_raw(fd: int, count: int) -> dict[str, Any]:
    """One read(2) of ``count`` bytes: ``length`` returned (or the errno) and the
    message if a whole one came."""
    try:
        raw = os.read(fd, count)
    except OSError as exc:
        return record(exc.errno or 0, length=-1)
    out = record(0, length=len(raw))
    if len(raw) >= MSG_SIZE:
        out["msg"] = unpack_msg(raw)
        if out["msg"]["type"] == MISS:
            _dev(fd).pending.append(out["msg"]["iova"])
    return out


@op("vhost.flush")
def flush(fd: int) -> dict[str, Any]:
    return record(_flush(fd))


@op("vhost.close")
def close(fd: int) -> dict[str, Any]:
    """Close the vhost fd and the eventfds and socket the agent made for it (and
    nothing else of the fd table). ``closed``: how many."""
    dev = DEVICES.pop(fd, None)
    fds = [fd] + ([*dev.kick, *dev.call, dev.sock] if dev is not None else [])
    n = 0
    for f in fds:
        if f >= 0 and f in kabi.FDS:
            n += kabi.close(f)["errno"] == 0
    return record(0, closed=n)
