"""Workloads: what the guest does while the host observes. Each workload is a
frozen dataclass built from the ``[workload]`` table of a scenario, run against an
:class:`~harness.vm.agent.AgentChannel`, returning op records (JSON-able dicts:
what the guest did and what the kernel returned)."""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import inspect
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import ConfigError, HarnessError
from harness.tables import from_table
from harness.vm.agent import AgentChannel


class WorkloadFailed(HarnessError):
    """The guest-side operation did not do what it should (e.g. data did not verify)."""


_DEVICE_RE = re.compile(r"/dev/[A-Za-z0-9._+:@/-]{1,200}")


def _check_timeout(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 86400:
        raise ConfigError(f"timeout must be a finite number of seconds in (0, 86400], not {value!r}", key="timeout")


@dataclass(frozen=True)
class Workload:
    kind: ClassVar[str] = ""

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        raise NotImplementedError

    def to_table(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@dataclass(frozen=True)
class NvmePattern(Workload):
    """Write a seeded pattern to an NVMe namespace with O_DIRECT, read it back and verify.

    ``device`` (guest path), ``offset``/``length``/``chunk`` (bytes, multiples of 4096),
    ``rounds`` (repetitions, each with a new seed), ``seed``, ``buffers`` (chunk-sized
    buffers the I/Os rotate through: with more than one, iovas are remapped to other
    pages between I/Os, which exposes stale IOTLB entries).
    """

    kind: ClassVar[str] = "nvme-pattern"
    device: str = "/dev/nvme0n1"
    offset: int = 0
    length: int = 1 << 20
    chunk: int = 1 << 16
    rounds: int = 2
    seed: int = 1
    buffers: int = 2
    timeout: float = 120.0
    """Seconds each round may take in the guest before it is reported hung."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device) \
                or ".." in self.device.split("/"):
            raise ConfigError(f"device must be a block device path under /dev/ (e.g. /dev/nvme0n1), "
                              f"not {self.device!r}", key="device")
        for name in ("offset", "length", "chunk"):
            value = getattr(self, name)
            if value < 0 or value % 4096:
                raise ConfigError(f"{name} must be a non-negative multiple of 4096, not {value}", key=name)
        for name in ("length", "chunk"):
            if getattr(self, name) == 0:
                raise ConfigError(f"{name} must be > 0", key=name)
        _check_timeout(self.timeout)
        if not 1 <= self.buffers <= 64:
            raise ConfigError(f"buffers must be 1..64, not {self.buffers}", key="buffers")
        if not 1 <= self.rounds <= 1000:
            raise ConfigError(f"rounds must be 1..1000, not {self.rounds}", key="rounds")

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records = []
        for r in range(self.rounds):
            rec = agent.call("nvme.pattern_rw", timeout=self.timeout, device=self.device, offset=self.offset,
                             length=self.length, chunk=self.chunk, seed=self.seed + r, buffers=self.buffers)
            records.append({"op": "nvme.pattern_rw", **rec})
            if not rec.get("verified"):
                raise WorkloadFailed(f"data read back from {self.device} did not match what was written "
                                     f"(round {r}, chunks at offsets {rec.get('mismatches')[:8]})")
        return records


@dataclass(frozen=True)
class AgentOps(Workload):
    """Replay guest agent ops in order: ``ops`` is a list of ``{"op": name, "args": {...}}``
    (what a pytest test ran through ``vm.agent``, saved in its failure artifacts).
    Each op's result is returned as a record ``{"op": name, **result}``."""

    kind: ClassVar[str] = "agent-ops"
    ops: tuple[dict[str, Any], ...] = ()
    timeout: float = 120.0

    def __post_init__(self) -> None:
        _check_timeout(self.timeout)
        ops = _agent_ops()
        for i, entry in enumerate(self.ops):
            if not isinstance(entry, dict) or not isinstance(entry.get("op"), str) \
                    or not isinstance(entry.get("args", {}), dict) or set(entry) - {"op", "args"}:
                raise ConfigError(f"ops[{i}] must be a table with a string 'op' and an 'args' table", key=f"ops[{i}]")
            handler = ops.get(entry["op"])
            if handler is None:
                raise ConfigError(f"ops[{i}]: unknown guest agent op {entry['op']!r} (known: {', '.join(sorted(ops))})",
                                  key=f"ops[{i}].op")
            try:
                inspect.signature(handler).bind(**entry.get("args", {}))
            except TypeError as exc:
                raise ConfigError(f"ops[{i}]: arguments of {entry['op']!r} do not fit it: {exc}",
                                  key=f"ops[{i}].args") from None

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records = []
        for entry in self.ops:
            result = agent.call(entry["op"], timeout=self.timeout, **entry.get("args", {}))
            records.append({"op": entry["op"], **(result if isinstance(result, dict) else {"result": result})})
        return records

    def to_table(self) -> dict[str, Any]:
        return {"kind": self.kind, "ops": [dict(e) for e in self.ops], "timeout": self.timeout}


def _agent_ops() -> dict[str, Callable[..., Any]]:
    """The guest agent's ops by name (the agent baked into the guest is this package;
    every module of it is imported, as the agent does at start-up)."""
    from guest_agent.__main__ import load_ops
    from guest_agent.protocol import OPS
    load_ops()
    return dict(OPS)


def _failed(op: str, result: dict[str, Any], why: str = "") -> WorkloadFailed:
    err = result.get("errno")
    name = errno_mod.errorcode.get(err, str(err)) if isinstance(err, int) else repr(err)
    return WorkloadFailed(f"{op} failed with errno {name}" + (f": {why}" if why else ""))


@dataclass(frozen=True)
class IommufdVfioNvme(Workload):
    """Drive an NVMe controller from guest userspace through VFIO and iommufd
    (:mod:`guest_agent.nvme_vfio`), one agent op a step, so that every ioctl,
    every IOVA and every NVMe command is in the op records:

    1. find the controller by ``serial``, hand it to vfio-pci, open its cdev and
       /dev/iommu, VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC;
    2. map the buffers (``mem.map`` at fixed user VAs, so automatic IOVAs repeat
       from run to run): the queues (4 pages) at the FIXED iova ``queue_iova``
       and the identify buffer at an automatic iova before the device is
       attached (nothing pinned yet), then attach (every area pinned), then the
       data buffers: the write buffer's first page FIXED at ``data_iova``, its
       second page at an automatic iova (a separate area: PRP2 is elsewhere),
       the 2-page read buffer at an automatic iova; ``mem.gpa`` of every buffer
       (the guest-physical pages the checker expects the device to reach);
    3. enable the controller (admin queue of ``qdepth``), Identify Controller
       (vendor 0x1b36 and ``serial`` expected), Identify Namespace ``nsid``,
       create an I/O queue pair;
    4. write a seeded 8 KiB pattern at block ``slba`` (PRP1 + PRP2), read it back
       into the other buffer, and compare sha256 (raises WorkloadFailed on a
       mismatch);
    5. with ``faults``: unmap the write buffer's second page, read with PRP1 at
       ``unmapped_iova`` (never mapped), then into the unmapped page's old iova
       (use after unmap); the guest kernel's DMAR reports are read from
       /dev/kmsg;
    6. with ``cfs``: unmap the queues and submit a read: QEMU cannot fetch the
       SQE and sets CSTS.CFS (the op's errno is EIO);
    7. disable the controller, unmap the read buffer (VmPin drops), detach
       (VmPin drops to 0 while areas remain), unmap everything left (the bytes
       returned are the areas that remained), close the iommufd;
    8. with ``kvm``: create a VM and its KVM-VFIO device, KVM_DEV_VFIO_FILE_ADD
       the cdev fd (0), and again (EEXIST); then close every fd.

    IOVAs are bytes in the IOAS, user VAs bytes of the agent process. The
    default ``queue_iova`` (0x180000) is not congruent modulo 1 MiB with the
    automatic iovas (0x1000 up) the workload unmaps while the controller runs:
    QEMU 7.2 keeps the mask of a page-selective IOTLB invalidation in a
    ``uint8_t`` (``VTDIOTLBPageInvInfo.mask``, hw/i386/intel_iommu_internal.h;
    widened to 64 bits upstream), so invalidating iova X also drops the cached
    translations of every iova X + n MiB in the domain; with the queues at
    0x100000 the unmap of 0x2000 drops the I/O SQ's entry, and the
    vtd-consistency check reports the re-walk (``unexpected-miss``).
    ``timeout``: seconds each op may take. Raises WorkloadFailed when a step
    that must succeed did not (its op and errno named).
    """

    kind: ClassVar[str] = "iommufd-vfio-nvme"
    serial: str = "vfio0"
    nsid: int = 1
    slba: int = 0
    qdepth: int = 16
    queue_iova: int = 0x180000
    data_iova: int = 0x200000
    unmapped_iova: int = 0x40000000
    seed: int = 1
    faults: bool = True
    cfs: bool = False
    kvm: bool = True
    timeout: float = 60.0

    USER_VA: ClassVar[int] = 0x7E0000000000
    """User VA of the first buffer; each buffer is 1 MiB after the previous one."""

    def __post_init__(self) -> None:
        if not isinstance(self.serial, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", self.serial):
            raise ConfigError(f"serial must be 1-20 characters of [A-Za-z0-9_-], not {self.serial!r}", key="serial")
        if not 1 <= self.nsid <= 256:
            raise ConfigError(f"nsid must be 1..256, not {self.nsid}", key="nsid")
        if not 2 <= self.qdepth <= 64:
            raise ConfigError(f"qdepth must be 2..64 (the queues live in one page each), not {self.qdepth}",
                              key="qdepth")
        if self.slba < 0:
            raise ConfigError(f"slba must be >= 0, not {self.slba}", key="slba")
        for name in ("queue_iova", "data_iova", "unmapped_iova"):
            value = getattr(self, name)
            if value <= 0 or value % 4096 or value >= 1 << 39:
                raise ConfigError(f"{name} must be a non-zero multiple of 4096 below 2**39, not {value:#x}", key=name)
        spans = sorted([(self.queue_iova, self.queue_iova + 4 * 4096), (self.data_iova, self.data_iova + 4096),
                        (self.unmapped_iova, self.unmapped_iova + 4096)])
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise ConfigError("queue_iova (4 pages), data_iova (1 page) and unmapped_iova must not overlap",
                              key="unmapped_iova")
        if self.unmapped_iova < 0x100000:
            raise ConfigError("unmapped_iova must be at or above 0x100000 (the automatic iovas are allocated "
                              "from 0x1000 up)", key="unmapped_iova")
        _check_timeout(self.timeout)

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []

        def call(op: str, *, ok: bool = True, **args: Any) -> dict[str, Any]:
            result = agent.call(op, timeout=self.timeout, **args)
            if not isinstance(result, dict):
                raise WorkloadFailed(f"{op} returned {result!r}, not a record")
            records.append({"op": op, **result})
            if ok and result.get("errno"):
                raise _failed(op, result)
            return result

        page = 4096
        bdf = call("vfio.find_nvme", serial=self.serial)["bdf"]
        bound = call("vfio.driver_override", bdf=bdf)
        dev = call("vfio.open_cdev", path=bound["cdev"])["fd"]
        ifd = call("iommufd.open")["fd"]
        call("vfio.bind_iommufd", fd=dev, iommufd=ifd)
        ioas = call("iommufd.ioas_alloc", fd=ifd)["ioas_id"]
        queues = call("mem.map", length=4 * page, at=self.USER_VA)["user_va"]
        ident = call("mem.map", length=page, at=self.USER_VA + (1 << 20))["user_va"]
        wbuf = call("mem.map", length=2 * page, at=self.USER_VA + (2 << 20))["user_va"]
        rbuf = call("mem.map", length=2 * page, at=self.USER_VA + (3 << 20))["user_va"]
        qiova = call("iommufd.map", fd=ifd, ioas_id=ioas, user_va=queues, length=4 * page,
                     iova=self.queue_iova)["iova"]
        id_iova = call("iommufd.map", fd=ifd, ioas_id=ioas, user_va=ident, length=page)["iova"]
        call("vfio.attach_pt", fd=dev, pt_id=ioas)
        call("iommufd.iova_ranges", fd=ifd, ioas_id=ioas)
        w0 = call("iommufd.map", fd=ifd, ioas_id=ioas, user_va=wbuf, length=page, iova=self.data_iova)["iova"]
        w1 = call("iommufd.map", fd=ifd, ioas_id=ioas, user_va=wbuf + page, length=page)["iova"]
        r0 = call("iommufd.map", fd=ifd, ioas_id=ioas, user_va=rbuf, length=2 * page)["iova"]
        for va, n in ((queues, 4), (ident, 1), (wbuf, 2), (rbuf, 2)):
            call("mem.gpa", user_va=va, length=n * page)

        ctrl = call("nvme_vfio.enable", fd=dev, asq_va=queues, asq_iova=qiova, acq_va=queues + page,
                    acq_iova=qiova + page, qdepth=self.qdepth)["handle"]

        def command(op: str, **args: Any) -> dict[str, Any]:
            result = call(op, handle=ctrl, **args)
            cqe = result.get("cqe") or {}
            if cqe.get("status"):
                raise WorkloadFailed(f"{op} completed with NVMe status {cqe['status']:#x}")
            return result

        idc = command("nvme_vfio.identify", buf_va=ident, prp1_iova=id_iova, cns=1)
        if idc.get("vid") != 0x1B36 or idc.get("sn") != self.serial:
            raise WorkloadFailed(f"Identify Controller read vendor {idc.get('vid')!r} serial {idc.get('sn')!r}, "
                                 f"not QEMU's 0x1b36 and {self.serial!r}")
        ns = command("nvme_vfio.identify", buf_va=ident, prp1_iova=id_iova, cns=0, nsid=self.nsid)
        lba = int(ns.get("lba_size") or 0)
        if lba not in (512, 1024, 2048, 4096) or int(ns.get("nsze") or 0) < self.slba + 2 * page // lba:
            raise WorkloadFailed(f"namespace {self.nsid}: lba_size {lba}, {ns.get('nsze')} blocks: "
                                 f"no room for 8 KiB at block {self.slba}")
        command("nvme_vfio.create_io_queues", sq_va=queues + 2 * page, sq_iova=qiova + 2 * page,
                cq_va=queues + 3 * page, cq_iova=qiova + 3 * page, qdepth=self.qdepth)
        nlb = 2 * page // lba
        wrote = call("mem.write", user_va=wbuf, pattern=self.seed, length=2 * page)["sha256"]
        call("mem.write", user_va=rbuf, pattern=self.seed + 1, length=2 * page)
        command("nvme_vfio.io", opcode=0x01, nsid=self.nsid, slba=self.slba, nlb=nlb, prp1_iova=w0, prp2_iova=w1)
        command("nvme_vfio.io", opcode=0x02, nsid=self.nsid, slba=self.slba, nlb=nlb, prp1_iova=r0,
                prp2_iova=r0 + page)
        read = call("mem.read", user_va=rbuf, length=2 * page)["sha256"]
        if read != wrote:
            raise WorkloadFailed(f"the 8 KiB read back from block {self.slba} (sha256 {read[:16]}) is not what "
                                 f"was written (sha256 {wrote[:16]})")

        if self.faults:
            mark = call("nvme_vfio.kernel_log", match="DMAR")["last_seq"]
            call("iommufd.unmap", fd=ifd, ioas_id=ioas, iova=w1, length=page)
            call("nvme_vfio.io", handle=ctrl, opcode=0x02, nsid=self.nsid, slba=self.slba, nlb=page // lba,
                 prp1_iova=self.unmapped_iova)
            call("nvme_vfio.io", handle=ctrl, opcode=0x02, nsid=self.nsid, slba=self.slba, nlb=page // lba,
                 prp1_iova=w1)
            deadline = time.monotonic() + 10.0
            while True:  # the fault interrupt may be handled a moment after the command completed
                log = call("nvme_vfio.kernel_log", match="DMAR", after=mark)
                reported = " ".join(line["text"] for line in log["lines"])
                if (f"fault addr {self.unmapped_iova:#x}" in reported and f"fault addr {w1:#x}" in reported) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.2)

        if self.cfs:
            call("iommufd.unmap", fd=ifd, ioas_id=ioas, iova=qiova, length=4 * page)
            lost = call("nvme_vfio.io", ok=False, handle=ctrl, opcode=0x02, nsid=self.nsid, slba=self.slba,
                        nlb=page // lba, prp1_iova=r0)
            if lost.get("errno") != errno_mod.EIO:
                raise _failed("nvme_vfio.io", lost, "a command whose SQE cannot be read must end in "
                                                    "controller fatal status (EIO)")
        call("nvme_vfio.disable", handle=ctrl)
        call("iommufd.unmap", fd=ifd, ioas_id=ioas, iova=r0, length=2 * page)
        call("vfio.detach_pt", fd=dev)
        call("iommufd.unmap_all", fd=ifd, ioas_id=ioas)
        call("fd.close", fd=ifd)
        if self.kvm:
            vm = call("kvm.create_vm")["fd"]
            kdev = call("kvm.create_device", vm_fd=vm, type=4)["fd"]
            call("kvm.set_device_attr", dev_fd=kdev, group=1, attr=1, fd=dev)
            again = call("kvm.set_device_attr", ok=False, dev_fd=kdev, group=1, attr=1, fd=dev)
            if again.get("errno") != errno_mod.EEXIST:
                raise _failed("kvm.set_device_attr", again, "the second KVM_DEV_VFIO_FILE_ADD of one file "
                                                            "must be EEXIST")
        call("fd.close_all")
        return records


WORKLOADS: dict[str, type[Workload]] = {cls.kind: cls for cls in (NvmePattern, AgentOps, IommufdVfioNvme)}


# ---- virtio-blk and virtio-net (guest side: guest_agent/block.py, guest_agent/net.py) ----


@dataclass(frozen=True)
class VirtioBlkPattern(NvmePattern):
    """:class:`NvmePattern` on a virtio-blk disk (``/dev/vda`` is the first
    virtio-blk device the guest probed), through the device-neutral op
    ``block.pattern_rw``; the ``virtio-blk-data`` check judges where its data went."""

    kind: ClassVar[str] = "virtio-blk-pattern"
    device: str = "/dev/vda"

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records = []
        for r in range(self.rounds):
            rec = agent.call("block.pattern_rw", timeout=self.timeout, device=self.device, offset=self.offset,
                             length=self.length, chunk=self.chunk, seed=self.seed + r, buffers=self.buffers)
            records.append({"op": "block.pattern_rw", **rec})
            if not rec.get("verified"):
                raise WorkloadFailed(f"data read back from {self.device} did not match what was written "
                                     f"(round {r}, chunks at offsets {rec.get('mismatches')[:8]})")
        return records


_MAC_RE = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
_IPV4_RE = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)")


@dataclass(frozen=True)
class VirtioNetEcho(Workload):
    """Echo packets through a virtio-net device: give the interface with MAC
    ``mac`` the address ``addr``/24, then send ``count`` ICMP echo requests of
    ``size`` payload bytes (a seeded pattern, different for every packet, at
    most ``window`` unanswered) to ``peer`` (QEMU's user-mode network answers
    at ``10.0.N.2``: :class:`harness.vm.virtio.VirtioNet`) and verify every
    reply's payload.  Each packet crosses the device twice (a TX and an RX
    buffer, each mapped through the IOMMU).  ``rounds`` repeats it (new seeds).
    The interface is brought down at the end, so the device does no DMA (an
    ARP refresh) after the guest's trace is collected.

    Raises WorkloadFailed if a packet was lost or came back different.
    """

    kind: ClassVar[str] = "virtio-net-echo"
    mac: str = "52:54:00:d4:a0:01"
    addr: str = "10.0.3.15"
    peer: str = "10.0.3.2"
    count: int = 256
    size: int = 1400
    window: int = 8
    rounds: int = 1
    seed: int = 1
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if not isinstance(self.mac, str) or not _MAC_RE.fullmatch(self.mac):
            raise ConfigError(f"mac must be a MAC address like 52:54:00:d4:a0:01, not {self.mac!r}", key="mac")
        for name in ("addr", "peer"):
            if not isinstance(getattr(self, name), str) or not _IPV4_RE.fullmatch(getattr(self, name)):
                raise ConfigError(f"{name} must be an IPv4 address, not {getattr(self, name)!r}", key=name)
        if not 1 <= self.count <= 65535:
            raise ConfigError(f"count must be 1..65535, not {self.count}", key="count")
        if not 1 <= self.size <= 1472:
            raise ConfigError(f"size must be 1..1472 bytes (one 1500-byte frame), not {self.size}", key="size")
        if not 1 <= self.window <= 64:
            raise ConfigError(f"window must be 1..64, not {self.window}", key="window")
        if not 1 <= self.rounds <= 1000:
            raise ConfigError(f"rounds must be 1..1000, not {self.rounds}", key="rounds")
        _check_timeout(self.timeout)

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        setup = agent.call("net.setup", timeout=self.timeout, mac=self.mac, addr=self.addr)
        records: list[dict[str, Any]] = [{"op": "net.setup", **setup}]
        for r in range(self.rounds):
            rec = agent.call("net.ping_pattern", timeout=self.timeout, iface=setup["iface"], peer=self.peer,
                             count=self.count, size=self.size, seed=self.seed + r, window=self.window,
                             reply_timeout=min(10.0, self.timeout))
            records.append({"op": "net.ping_pattern", **rec})
            if not rec.get("verified"):
                raise WorkloadFailed(f"echo through {setup['iface']} ({self.mac}) to {self.peer}: "
                                     f"{rec.get('lost_count')} of {self.count} packets lost, payload of "
                                     f"{len(rec.get('mismatches', []))} different (round {r})")
        # No DMA after the workload: the guest's trace is collected while it runs.
        records.append({"op": "net.down", **agent.call("net.down", timeout=self.timeout, iface=setup["iface"])})
        return records


@dataclass(frozen=True)
class VirtioMix(Workload):
    """Block and network I/O in one run: :class:`VirtioBlkPattern` on
    ``block_device`` (``block_length`` bytes in ``block_chunk`` I/Os, ``block_rounds``),
    then :class:`VirtioNetEcho` through the NIC with MAC ``net_mac``
    (``net_count`` packets of ``net_size`` bytes to ``net_peer``).  Either part
    is skipped with a length or count of 0."""

    kind: ClassVar[str] = "virtio-mix"
    block_device: str = "/dev/vda"
    block_length: int = 256 << 10
    block_chunk: int = 64 << 10
    block_rounds: int = 2
    block_buffers: int = 2
    net_mac: str = "52:54:00:d4:a0:01"
    net_addr: str = "10.0.3.15"
    net_peer: str = "10.0.3.2"
    net_count: int = 256
    net_size: int = 1400
    seed: int = 1
    timeout: float = 120.0

    def _parts(self) -> list[Workload]:
        parts: list[Workload] = []
        if self.block_length:
            parts.append(VirtioBlkPattern(device=self.block_device, length=self.block_length, chunk=self.block_chunk,
                                          rounds=self.block_rounds, buffers=self.block_buffers, seed=self.seed,
                                          timeout=self.timeout))
        if self.net_count:
            parts.append(VirtioNetEcho(mac=self.net_mac, addr=self.net_addr, peer=self.net_peer,
                                       count=self.net_count, size=self.net_size, seed=self.seed,
                                       timeout=self.timeout))
        return parts

    def __post_init__(self) -> None:
        try:
            parts = self._parts()
        except ConfigError as exc:
            prefix = "block_" if exc.key in {"device", "length", "chunk", "rounds", "buffers"} else "net_"
            key = exc.key if exc.key in ("seed", "timeout") else f"{prefix}{exc.key}"
            raise ConfigError(str(exc), key=key) from None
        if not parts:
            raise ConfigError("block_length and net_count are both 0: nothing to do", key="block_length")

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for part in self._parts():
            records += part.run(agent)
        return records


WORKLOADS.update({cls.kind: cls for cls in (VirtioBlkPattern, VirtioNetEcho, VirtioMix)})


def workload_from_table(table: dict[str, Any]) -> Workload:
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in WORKLOADS:
        raise ConfigError(f"unknown workload kind {kind!r} (known: {', '.join(WORKLOADS)})", key="workload.kind")
    return from_table(WORKLOADS[kind], table, "workload", convert={"ops": _ops})


def _ops(value: Any, path: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path} must be an array of tables", key=path)
    return tuple(value)
