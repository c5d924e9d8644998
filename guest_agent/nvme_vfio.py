"""A minimal userspace NVMe driver over a VFIO device fd: admin queue, one I/O
queue pair, Identify, Read and Write, completions polled (no interrupts).

The device fd is a VFIO device cdev the host has already bound to an iommufd
context and attached to an IOAS (``vfio.bind_iommufd``, ``vfio.attach_pt``). The
host decides every IOVA and maps every buffer itself (``iommufd.map``); this
module only hands IOVAs to the controller and reads and writes the queue memory
through the user VAs of the same buffers (regions of ``mem.map``, memory of this
process). So every IOVA a command carries is in the host's op records, and the
host can judge each DMA of the controller against the IOAS the records describe.

Registers (NVMe base specification 2.0, "Controller Registers"; offsets in BAR0,
reached with pread/pwrite on the VFIO region, vfio-pci's ``vfio_pci_bar_rw``):
CAP 0x00 (MQES bits 0..15, TO bits 24..31 in 500 ms, DSTRD bits 32..35), VS 0x08,
CC 0x14, CSTS 0x1C (RDY bit 0, CFS bit 1), AQA 0x24, ASQ 0x28, ACQ 0x30;
doorbells from 0x1000, ``4 << DSTRD`` bytes apart: SQ y tail at
``0x1000 + 2y * stride``, CQ y head at ``0x1000 + (2y + 1) * stride``.

Queue entries: a 64-byte SQE (dword 0: opcode, flags, command id; dword 1:
nsid; bytes 24..39: PRP1, PRP2; dwords 10..15) and a 16-byte CQE (dword 0:
command specific; dword 2: SQ head bits 0..15, SQ id bits 16..31; dword 3: cid
bits 0..15, phase bit 16, status bits 17..31). A CQE is new when its phase bit
equals the phase the driver expects (1 on the first pass through the queue,
flipping at every wrap).

Command ids: ``0x800 + n`` (n < 0x800). The Linux driver's command ids are a
blk-mq tag (below its queue depth, at most 1024) plus a generation in bits 12..15
(drivers/nvme/host/nvme.h ``nvme_cid``), so an id whose low 12 bits are 0x800 or
more is never one of the kernel's: QEMU's trace lines of this driver's commands
cannot be mistaken for the kernel driver's.

Every op returns :func:`guest_agent.kabi.record` (``errno`` 0 or E, fields,
``vm_pin``/``vm_lck``); the ops that submit commands add ``commands``: one dict a
command, in submission order, with what the host needs to find it in QEMU's
trace and to judge its DMA::

    {"qid", "cid", "opcode", "nsid", "prp1", "prp2", "slba", "nlb", "cdw10", "cdw11",
     "sqe_iova", "cqe_iova", "status", "sqhd", "sqid", "dw0", "errno"}

``prp1``/``prp2``/``sqe_iova``/``cqe_iova`` are IOVAs (``sqe_iova``: where the
controller reads this SQE; ``cqe_iova``: where it should write its CQE);
``nlb`` is the number of logical blocks (not the 0-based field); ``status`` the
CQE status field without the phase bit (0 is success; bits 0..7 SC, 8..10 SCT,
14 DNR), None when no completion came. ``errno`` is 0 when a completion came,
ETIMEDOUT when none came within the timeout, EIO when the controller reported
fatal status (CSTS.CFS) while the driver waited, EPROTO for a completion whose
command id is not the one submitted.

Errors: a user VA outside the regions of ``mem.map`` raises ValueError (the
driver would otherwise touch memory that is not there); an unknown handle raises
KeyError. Kernel errnos (pread/pwrite on the device fd) are in the record.
"""

from __future__ import annotations

import ctypes
import errno as E
import hashlib
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from guest_agent import kabi, mem, vfio
from guest_agent.protocol import op

PAGE = 4096
BAR0 = 0
CONFIG_REGION = 7

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4

REG_CAP = 0x00
REG_VS = 0x08
REG_CC = 0x14
REG_CSTS = 0x1C
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
DOORBELLS = 0x1000

CC_EN = 0x1
CC_ENABLE = 0x00460001
"""CC: IOCQES 4 (16-byte CQE), IOSQES 6 (64-byte SQE), MPS 0 (4 KiB pages),
CSS 0 (NVM command set), EN 1."""
CSTS_RDY = 0x1
CSTS_CFS = 0x2

# admin opcodes
ADMIN_DELETE_SQ = 0x00
ADMIN_CREATE_SQ = 0x01
ADMIN_DELETE_CQ = 0x04
ADMIN_CREATE_CQ = 0x05
ADMIN_IDENTIFY = 0x06
# I/O opcodes (NVM command set)
IO_FLUSH = 0x00
IO_WRITE = 0x01
IO_READ = 0x02

SQE_SIZE = 64
CQE_SIZE = 16
CID_BASE = 0x800
CID_SPAN = 0x800
DEFAULT_TIMEOUT = 5.0
"""Seconds a command may take before its record says ETIMEDOUT."""


@dataclass
class Queue:
    """One SQ/CQ pair: user VAs (this process) and IOVAs (the controller's view)."""

    qid: int
    sq_va: int
    sq_iova: int
    cq_va: int
    cq_iova: int
    depth: int
    tail: int = 0
    head: int = 0
    phase: int = 1


@dataclass
class Controller:
    fd: int
    bar: int
    """File offset of BAR0 in the VFIO device fd."""
    stride: int
    """Doorbell stride in bytes (``4 << CAP.DSTRD``)."""
    cap_timeout: float
    """CAP.TO in seconds: how long CSTS.RDY may take to follow CC.EN."""
    queues: dict[int, Queue] = field(default_factory=dict)
    next_cid: int = 0


HANDLES: dict[int, Controller] = {}
_next_handle = [1]


# ---------------------------------------------------------------- registers


def _rd32(ctrl: Controller, reg: int) -> int:
    data = os.pread(ctrl.fd, 4, ctrl.bar + reg)
    if len(data) != 4:
        raise OSError(E.EIO, f"short read of BAR0 register {reg:#x}")
    return int.from_bytes(data, "little")


def _wr32(ctrl: Controller, reg: int, value: int) -> None:
    if os.pwrite(ctrl.fd, (value & 0xFFFFFFFF).to_bytes(4, "little"), ctrl.bar + reg) != 4:
        raise OSError(E.EIO, f"short write of BAR0 register {reg:#x}")


def _wr64(ctrl: Controller, reg: int, value: int) -> None:
    """A 64-bit register as two 32-bit writes, low half first (QEMU's hw/nvme
    takes ASQ/ACQ as two halves)."""
    _wr32(ctrl, reg, value & 0xFFFFFFFF)
    _wr32(ctrl, reg + 4, value >> 32)


def _wait_csts(ctrl: Controller, want_rdy: int, timeout: float) -> tuple[int, int]:
    """Poll CSTS until RDY == ``want_rdy`` or CFS is set: ``(errno, csts)``
    (ETIMEDOUT past ``timeout`` seconds, EIO for CFS)."""
    deadline = time.monotonic() + timeout
    while True:
        csts = _rd32(ctrl, REG_CSTS)
        if csts == 0xFFFFFFFF:
            return E.ENODEV, csts  # the device is gone (or BAR access is off)
        if csts & CSTS_CFS:
            return E.EIO, csts
        if csts & CSTS_RDY == want_rdy:
            return 0, csts
        if time.monotonic() > deadline:
            return E.ETIMEDOUT, csts
        time.sleep(0.001)


def _check_region(user_va: int, length: int) -> None:
    for base, size in mem.REGIONS.items():
        if base <= user_va and user_va + length <= base + size:
            return
    raise ValueError(f"[{user_va:#x}, +{length:#x}) is not inside a region mapped by mem.map")


def _region_offset(fd: int, index: int) -> int:
    info = vfio.region_info(fd, index)
    if info["errno"]:
        raise OSError(info["errno"], f"VFIO_DEVICE_GET_REGION_INFO of region {index} failed")
    return int(info["offset"])


# ---------------------------------------------------------------- commands


def _doorbell_sq(ctrl: Controller, q: Queue) -> int:
    return DOORBELLS + (2 * q.qid) * ctrl.stride


def _doorbell_cq(ctrl: Controller, q: Queue) -> int:
    return DOORBELLS + (2 * q.qid + 1) * ctrl.stride


def _submit(ctrl: Controller, q: Queue, opcode: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
            cdw: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0), slba: int | None = None,
            nlb: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Write one SQE at the tail of ``q``, ring its doorbell, poll its CQE.
    Returns the command's record (see the module docstring)."""
    cid = CID_BASE + ctrl.next_cid
    ctrl.next_cid = (ctrl.next_cid + 1) % CID_SPAN
    sqe = struct.pack("<BBHIQQQQ6I", opcode, 0, cid, nsid, 0, 0, prp1, prp2, *cdw)
    slot = q.tail
    ctypes.memmove(q.sq_va + slot * SQE_SIZE, sqe, SQE_SIZE)
    cq_slot = q.head
    cmd: dict[str, Any] = {
        "qid": q.qid, "cid": cid, "opcode": opcode, "nsid": nsid, "prp1": prp1, "prp2": prp2,
        "slba": slba, "nlb": nlb, "cdw10": cdw[0], "cdw11": cdw[1],
        "sqe_iova": q.sq_iova + slot * SQE_SIZE, "cqe_iova": q.cq_iova + cq_slot * CQE_SIZE,
        "status": None, "sqhd": None, "sqid": None, "dw0": None, "errno": 0,
    }
    q.tail = (q.tail + 1) % q.depth
    _wr32(ctrl, _doorbell_sq(ctrl, q), q.tail)
    dw3_addr = q.cq_va + cq_slot * CQE_SIZE + 12
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        dw3 = ctypes.c_uint32.from_address(dw3_addr).value
        if (dw3 >> 16) & 1 == q.phase:
            break
        polls += 1
        if polls % 64 == 0:
            csts = _rd32(ctrl, REG_CSTS)
            if csts & CSTS_CFS:
                cmd["errno"] = E.EIO
                cmd["csts"] = csts
                return cmd
            if time.monotonic() > deadline:
                cmd["errno"] = E.ETIMEDOUT
                cmd["csts"] = csts
                return cmd
        time.sleep(0.0002 if polls > 16 else 0)
    dw0, _dw1, dw2, dw3 = struct.unpack("<4I", ctypes.string_at(q.cq_va + cq_slot * CQE_SIZE, CQE_SIZE))
    cmd.update(status=dw3 >> 17, sqhd=dw2 & 0xFFFF, sqid=dw2 >> 16, dw0=dw0)
    if dw3 & 0xFFFF != cid:
        cmd["errno"] = E.EPROTO
        cmd["cqe_cid"] = dw3 & 0xFFFF
    q.head = (q.head + 1) % q.depth
    if q.head == 0:
        q.phase ^= 1
    _wr32(ctrl, _doorbell_cq(ctrl, q), q.head)
    return cmd


def _cqe(cmd: dict[str, Any]) -> dict[str, Any]:
    return {"status": cmd["status"], "cid": cmd["cid"], "sqhd": cmd["sqhd"], "sqid": cmd["sqid"],
            "dw0": cmd["dw0"]}


def _result(cmds: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """The op's record: the first command errno (0 if every one completed)."""
    err = next((c["errno"] for c in cmds if c["errno"]), 0)
    return kabi.record(err, commands=cmds, **fields)


def _handle(handle: int) -> Controller:
    ctrl = HANDLES.get(handle)
    if ctrl is None:
        raise KeyError(f"no NVMe controller handle {handle} (enable gives one)")
    return ctrl


# ---------------------------------------------------------------- ops


@op("nvme_vfio.enable")
def enable(fd: int, asq_va: int, asq_iova: int, acq_va: int, acq_iova: int, qdepth: int = 16,
           timeout: float | None = None) -> dict[str, Any]:
    """Bring the controller behind VFIO device fd ``fd`` up with an admin queue of
    ``qdepth`` entries: the SQ at user VA ``asq_va`` / IOVA ``asq_iova``
    (``qdepth`` * 64 bytes), the CQ at ``acq_va`` / ``acq_iova`` (``qdepth`` * 16
    bytes), both zeroed here.

    Steps (NVMe base spec "Initialization"): PCI command register |= memory +
    bus master (vfio-pci clears bus master when it enables the device); CC.EN=0
    and wait for CSTS.RDY=0; AQA, ASQ, ACQ; CC = 0x00460001; wait for
    CSTS.RDY=1. ``timeout`` (seconds) defaults to CAP.TO.

    Record: ``handle`` (for the other ops; None on failure), ``cap``, ``vs``,
    ``mqes`` (0-based), ``dstrd``, ``to_ms``, ``command`` (PCI command register
    after), ``csts``; errno ETIMEDOUT when RDY did not follow, EIO when CSTS.CFS
    was set, EINVAL for a qdepth outside 2..MQES+1, or the errno of a register
    access.
    """
    _check_region(asq_va, qdepth * SQE_SIZE)
    _check_region(acq_va, qdepth * CQE_SIZE)
    fields: dict[str, Any] = {"handle": None, "cap": None, "vs": None, "mqes": None, "dstrd": None,
                              "to_ms": None, "command": None, "csts": None}
    try:
        config = _region_offset(fd, CONFIG_REGION)
        bar = _region_offset(fd, BAR0)
        command = int.from_bytes(os.pread(fd, 2, config + PCI_COMMAND), "little")
        command |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        os.pwrite(fd, command.to_bytes(2, "little"), config + PCI_COMMAND)
        fields["command"] = int.from_bytes(os.pread(fd, 2, config + PCI_COMMAND), "little")
        probe = Controller(fd, bar, 4, 1.0)
        cap = _rd32(probe, REG_CAP) | _rd32(probe, REG_CAP + 4) << 32
        mqes = cap & 0xFFFF
        dstrd = (cap >> 32) & 0xF
        to_ms = ((cap >> 24) & 0xFF) * 500
        fields.update(cap=cap, vs=_rd32(probe, REG_VS), mqes=mqes, dstrd=dstrd, to_ms=to_ms)
        if not 2 <= qdepth <= mqes + 1 or qdepth > 4096:
            return kabi.record(E.EINVAL, **fields)
        ctrl = Controller(fd, bar, 4 << dstrd, max(to_ms / 1000, 0.5) if timeout is None else timeout)
        cc = _rd32(ctrl, REG_CC)
        if cc & CC_EN:
            _wr32(ctrl, REG_CC, cc & ~CC_EN)
        err, csts = _wait_csts(ctrl, 0, ctrl.cap_timeout)
        fields["csts"] = csts
        if err and err != E.EIO:  # a fatal status clears with the reset; anything else is final
            return kabi.record(err, **fields)
        ctypes.memset(asq_va, 0, qdepth * SQE_SIZE)
        ctypes.memset(acq_va, 0, qdepth * CQE_SIZE)
        _wr32(ctrl, REG_AQA, (qdepth - 1) << 16 | (qdepth - 1))
        _wr64(ctrl, REG_ASQ, asq_iova)
        _wr64(ctrl, REG_ACQ, acq_iova)
        _wr32(ctrl, REG_CC, CC_ENABLE)
        err, csts = _wait_csts(ctrl, 1, ctrl.cap_timeout)
        fields["csts"] = csts
        if err:
            return kabi.record(err, **fields)
    except OSError as exc:
        return kabi.record(exc.errno or E.EIO, **fields)
    ctrl.queues[0] = Queue(0, asq_va, asq_iova, acq_va, acq_iova, qdepth)
    handle = _next_handle[0]
    _next_handle[0] += 1
    HANDLES[handle] = ctrl
    fields["handle"] = handle
    return kabi.record(0, **fields)


def _identify_fields(cns: int, data: bytes) -> dict[str, Any]:
    if cns == 1:  # Identify Controller
        vid, ssvid = struct.unpack_from("<HH", data, 0)
        return {"vid": vid, "ssvid": ssvid, "sn": data[4:24].decode("ascii", "replace").strip(),
                "mn": data[24:64].decode("ascii", "replace").strip(),
                "fr": data[64:72].decode("ascii", "replace").strip(),
                "mdts": data[77], "nn": struct.unpack_from("<I", data, 516)[0]}
    if cns == 0:  # Identify Namespace
        nsze, ncap, nuse = struct.unpack_from("<QQQ", data, 0)
        flbas = data[26]
        lbaf = struct.unpack_from("<I", data, 128 + 4 * (flbas & 0xF))[0]
        return {"nsze": nsze, "ncap": ncap, "nuse": nuse, "flbas": flbas, "lba_size": 1 << ((lbaf >> 16) & 0xFF)}
    return {}


@op("nvme_vfio.identify")
def identify(handle: int, buf_va: int, prp1_iova: int, cns: int = 1, nsid: int = 0,
             timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Identify (admin opcode 0x06) into the 4 KiB buffer at IOVA ``prp1_iova``
    (user VA ``buf_va``, cleared first so stale data cannot pass for new).
    ``cns`` 1: the controller (record ``vid`` -- QEMU's is 0x1b36 --, ``ssvid``,
    ``sn``, ``mn``, ``fr``, ``mdts``, ``nn``); 0: namespace ``nsid`` (``nsze``,
    ``ncap``, ``nuse`` in blocks, ``flbas``, ``lba_size`` in bytes). The fields
    are read from the buffer only after a successful completion. Also ``sha256``
    of the 4 KiB buffer and ``cqe``."""
    ctrl = _handle(handle)
    _check_region(buf_va, PAGE)
    ctypes.memset(buf_va, 0, PAGE)
    try:
        cmd = _submit(ctrl, ctrl.queues[0], ADMIN_IDENTIFY, nsid=nsid, prp1=prp1_iova,
                      cdw=(cns, 0, 0, 0, 0, 0), timeout=timeout)
    except OSError as exc:
        return kabi.record(exc.errno or E.EIO, commands=[])
    data = ctypes.string_at(buf_va, PAGE)
    fields = _identify_fields(cns, data) if cmd["errno"] == 0 and cmd["status"] == 0 else {}
    return _result([cmd], cqe=_cqe(cmd), cns=cns, sha256=hashlib.sha256(data).hexdigest(), **fields)


@op("nvme_vfio.create_io_queues")
def create_io_queues(handle: int, sq_va: int, sq_iova: int, cq_va: int, cq_iova: int, qdepth: int = 16,
                     qid: int = 1, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Create I/O CQ ``qid`` (admin 0x05, physically contiguous, interrupts off)
    at IOVA ``cq_iova`` then I/O SQ ``qid`` (admin 0x01) at ``sq_iova`` feeding
    it, ``qdepth`` entries each; the queue memory (user VAs ``sq_va``, ``cq_va``)
    is zeroed first. Record: ``commands`` (two), ``cqes``; the queue pair is
    usable by ``nvme_vfio.io`` only when both completed with status 0."""
    ctrl = _handle(handle)
    _check_region(sq_va, qdepth * SQE_SIZE)
    _check_region(cq_va, qdepth * CQE_SIZE)
    ctypes.memset(sq_va, 0, qdepth * SQE_SIZE)
    ctypes.memset(cq_va, 0, qdepth * CQE_SIZE)
    admin = ctrl.queues[0]
    qsize = (qdepth - 1) << 16 | qid
    cmds: list[dict[str, Any]] = []
    try:
        cmds.append(_submit(ctrl, admin, ADMIN_CREATE_CQ, prp1=cq_iova, cdw=(qsize, 0x1, 0, 0, 0, 0),
                            timeout=timeout))
        if cmds[-1]["errno"] == 0 and cmds[-1]["status"] == 0:
            cmds.append(_submit(ctrl, admin, ADMIN_CREATE_SQ, prp1=sq_iova,
                                cdw=(qsize, qid << 16 | 0x1, 0, 0, 0, 0), timeout=timeout))
    except OSError as exc:
        return kabi.record(exc.errno or E.EIO, commands=cmds, cqes=[_cqe(c) for c in cmds])
    if len(cmds) == 2 and all(c["errno"] == 0 and c["status"] == 0 for c in cmds):
        ctrl.queues[qid] = Queue(qid, sq_va, sq_iova, cq_va, cq_iova, qdepth)
    return _result(cmds, cqes=[_cqe(c) for c in cmds], qid=qid)


@op("nvme_vfio.io")
def io(handle: int, opcode: int, nsid: int, slba: int, nlb: int, prp1_iova: int, prp2_iova: int = 0,
       qid: int = 1, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """One NVM command on I/O queue ``qid``: ``opcode`` 0x02 Read (the controller
    writes memory) or 0x01 Write (it reads memory), ``nlb`` logical blocks (1..65536)
    from block ``slba`` of namespace ``nsid``, data at IOVA ``prp1_iova`` and, for a
    transfer crossing into a second page, ``prp2_iova`` (the second page's IOVA:
    a PRP entry, not a list, for transfers of at most two pages).
    Record: ``cqe`` (``status`` 0 = success), ``commands`` (one)."""
    ctrl = _handle(handle)
    if qid not in ctrl.queues or qid == 0:
        raise KeyError(f"no I/O queue {qid} on handle {handle} (create_io_queues makes one)")
    if not 1 <= nlb <= 0x10000:
        raise ValueError(f"nlb must be 1..65536, not {nlb}")
    try:
        cmd = _submit(ctrl, ctrl.queues[qid], opcode, nsid=nsid, prp1=prp1_iova, prp2=prp2_iova,
                      cdw=(slba & 0xFFFFFFFF, slba >> 32, nlb - 1, 0, 0, 0), slba=slba, nlb=nlb,
                      timeout=timeout)
    except OSError as exc:
        return kabi.record(exc.errno or E.EIO, commands=[])
    return _result([cmd], cqe=_cqe(cmd))


@op("nvme_vfio.status")
def status(handle: int) -> dict[str, Any]:
    """CC and CSTS of the controller: ``{cc, csts, rdy, cfs}``."""
    ctrl = _handle(handle)
    try:
        cc, csts = _rd32(ctrl, REG_CC), _rd32(ctrl, REG_CSTS)
    except OSError as exc:
        return kabi.record(exc.errno or E.EIO, cc=None, csts=None)
    return kabi.record(0, cc=cc, csts=csts, rdy=bool(csts & CSTS_RDY), cfs=bool(csts & CSTS_CFS))


@op("nvme_vfio.disable")
def disable(handle: int) -> dict[str, Any]:
    """CC.EN=0 and wait for CSTS.RDY=0 (the controller drops every queue); the
    handle is forgotten whatever happens. Record: ``csts``; errno ETIMEDOUT if
    RDY stays set."""
    ctrl = HANDLES.pop(handle, None)
    if ctrl is None:
        raise KeyError(f"no NVMe controller handle {handle}")
    try:
        _wr32(ctrl, REG_CC, _rd32(ctrl, REG_CC) & ~CC_EN)
        err, csts = _wait_csts(ctrl, 0, ctrl.cap_timeout)
    except OSError as exc:
        return kabi.record(exc.errno or E.EIO, csts=None)
    return kabi.record(0 if err == E.EIO else err, csts=csts)


@op("nvme_vfio.kernel_log")
def kernel_log(match: str = "DMAR", after: int = -1) -> dict[str, Any]:
    """The guest kernel's log records (/dev/kmsg) whose text holds ``match``, with
    sequence number above ``after``: ``{lines: [{seq, usec, text}], last_seq}``.
    ``last_seq`` is the newest record's sequence number (pass it as ``after`` to
    get only later lines). Read without blocking; records lost to the ring
    buffer's wrap are skipped."""
    lines: list[dict[str, Any]] = []
    last = after
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                raw = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == E.EPIPE:  # overwritten records: keep reading
                    continue
                raise
            if not raw:
                break
            head, _, text = raw.decode("utf-8", "replace").partition(";")
            parts = head.split(",")
            seq, usec = int(parts[1]), int(parts[2])
            last = max(last, seq)
            text = text.split("\n", 1)[0]
            if seq > after and match in text:
                lines.append({"seq": seq, "usec": usec, "text": text})
    finally:
        os.close(fd)
    return {"lines": lines, "last_seq": last}
