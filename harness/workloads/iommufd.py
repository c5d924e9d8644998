"""An NVMe controller driven from guest userspace through VFIO and iommufd
(guest side: guest_agent/nvme_vfio.py)."""

from __future__ import annotations

import errno as errno_mod
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import ConfigError
from harness.vm.agent import AgentChannel
from harness.workloads.base import (
    Workload,
    WorkloadFailed,
    _check_timeout,
    _failed,
    register,
)


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



register(IommufdVfioNvme)
