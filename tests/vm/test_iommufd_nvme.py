"""A userspace NVMe driver in the guest (guest_agent/nvme_vfio.py) drives the second
controller through a VFIO device cdev and iommufd; every op is checked against the
pinning/VFIO/KVM-VFIO models and every DMA of that controller against the IOAS
(harness/checks/ioas.py). The fault tests send the controller to IOVAs the guest
never mapped, or unmapped, and look for the refusal in three places the device
does not control: QEMU's VT-d fault trace, the guest kernel's DMAR report, the
checker's judgement against the model."""

from __future__ import annotations

import re
from typing import Any

import pytest

from harness.checks.verdict import Verdict
from harness.trace.events import DmarFault, NvmeError
from harness.trace.parser import parse_file
from harness.vm import IntelIommu, MachineSpec, NvmeController, NvmeNamespace
from harness.workloads import IommufdVfioNvme

SERIAL = "vfio0"
SPEC = MachineSpec(devices=(IntelIommu(caching_mode=True, intremap=True),
                            NvmeController(id="nvme0", serial="kernel0"),
                            NvmeController(id="nvme1", serial=SERIAL,
                                           namespaces=(NvmeNamespace(size_mib=16, lba_size=512),))))
DMAR_LINE = re.compile(r"\[DMA (Read|Write) NO_PASID\] Request device \[([0-9a-f]{2}:[0-9a-f]{2})\.(\d)\] "
                       r"fault addr (0x[0-9a-f]+) \[fault reason (0x[0-9a-f]+)\]")
DATA_TRANSFER_ERROR = 0x04  # generic command status (SCT 0), NVMe base spec "Data Transfer Error"


def _ops(vm: Any, name: str) -> list[dict[str, Any]]:
    return [c for c in vm.agent_calls if c["op"] == name]


def _check_other_reports(vm: Any, verdict: Verdict) -> None:
    """Every report is OK and conclusive: vtd-consistency, guest-intent (both NVMe
    controllers, the kernel's and the vfio one) and ioas."""
    for report in verdict.reports:
        assert report.conclusive and report.status == "ok", verdict.format()
    assert {r.checker for r in verdict.reports} >= {"vtd-consistency", "guest-intent", "ioas"}


@pytest.mark.dma_no_check  # the verdict is asserted below, report by report
def test_userspace_nvme_through_iommufd_matches_the_models(no_leftovers, vm_factory, dma_verdict):
    vm = vm_factory(SPEC, snapshot=True)  # one saved guest for both tests; the NVMe pair is hot-plugged
    records = IommufdVfioNvme(serial=SERIAL, faults=False, kvm=True).run(vm.agent)
    ident = next(r for r in records if r["op"] == "nvme_vfio.identify" and r.get("cns") == 1)
    assert ident["vid"] == 0x1B36 and ident["sn"] == SERIAL
    pins = {r["op"]: r["vm_pin"] for r in records if r["op"] in ("vfio.attach_pt", "vfio.detach_pt")}
    assert pins == {"vfio.attach_pt": 5, "vfio.detach_pt": 0}, pins  # 4 queue pages + identify; none after detach
    left = next(r for r in records if r["op"] == "iommufd.unmap_all")
    assert left["length"] == (4 + 1 + 2) * 4096  # areas outlive the detach: queues, identify, write buffer

    verdict = dma_verdict(vm)
    c = verdict.report("ioas").counts
    assert c.ops_checked > 0 and c.pins_checked > 0 and c.translations_checked > 0, verdict.format()
    assert c.commands == c.commands_matched == 6 and c.gpas_checked == c.translations_checked, verdict.format()
    assert c.divergences == 0 and c.faults_checked == 0
    _check_other_reports(vm, verdict)


@pytest.mark.dma_no_check  # the verdict is asserted below, report by report
def test_unmapped_and_unmapped_after_use_prps_fault_and_are_reported(no_leftovers, vm_factory, dma_verdict):
    vm = vm_factory(SPEC, snapshot=True)  # one saved guest for both tests; the NVMe pair is hot-plugged
    wl = IommufdVfioNvme(serial=SERIAL, faults=True, cfs=True, kvm=False)
    records = wl.run(vm.agent)
    bdf = next(r["bdf"] for r in records if r["op"] == "vfio.driver_override")
    bus, slot, func = int(bdf[5:7], 16), int(bdf[8:10], 16), int(bdf[11])
    sid = bus << 8 | slot << 3 | func  # behind its root port when hot-plugged after a snapshot restore
    freed = next(r["args"] for r in _ops(vm, "iommufd.unmap") if r["args"]["length"] == 4096)["iova"]
    reads = [c["result"] for c in _ops(vm, "nvme_vfio.io") if c["args"]["opcode"] == 0x02]
    never, after_unmap, lost = reads[-3], reads[-2], reads[-1]
    assert never["commands"][0]["prp1"] == wl.unmapped_iova and after_unmap["commands"][0]["prp1"] == freed

    # the command's completion: QEMU 7.2 reports success (its PRP data goes through
    # dma_memory_map, which gives a bounce buffer for a refused translation); a
    # Data Transfer Error is what the NVMe specification asks for
    for rec in (never, after_unmap):
        assert rec["errno"] == 0 and rec["cqe"]["status"] in (0, DATA_TRANSFER_ERROR), rec
    # a command whose SQE the controller cannot read: controller fatal status, no completion
    assert lost["errno"] == 5 and lost["commands"][0]["status"] is None and lost["commands"][0]["csts"] & 0x2

    # the guest kernel's own DMAR fault reports (dmesg), for that device and those iovas
    log = [ln["text"] for c in _ops(vm, "nvme_vfio.kernel_log") for ln in c["result"]["lines"]]
    reports = {(m[1], int(m[2][:2], 16) << 8 | int(m[2][3:], 16) << 3 | int(m[3]), int(m[4], 16), int(m[5], 16))
               for m in (DMAR_LINE.search(t) for t in log) if m}
    assert ("Write", sid, wl.unmapped_iova, 5) in reports, log  # the controller writes memory for a read
    assert ("Write", sid, freed, 5) in reports, log

    verdict = dma_verdict(vm)
    faults = [e for e in parse_file(vm.trace_log) if isinstance(e, DmarFault) and e.sid == sid]
    pages = {(e.addr & ~0xFFF, e.write, e.fault) for e in faults}
    assert (wl.unmapped_iova, True, 5) in pages and (freed, True, 5) in pages, sorted(pages)[:8]
    sq = next(r["args"]["iova"] for r in _ops(vm, "iommufd.unmap") if r["args"]["length"] == 4 * 4096)
    assert (sq + 0x2000, False, 6) in pages  # the I/O SQ's page, read by the SQE fetch
    errors = [e for e in parse_file(vm.trace_log) if isinstance(e, NvmeError)]
    assert [e.name for e in errors][-2:] == ["pci_nvme_err_addr_read", "pci_nvme_err_cfs"], errors[-4:]

    c = verdict.report("ioas").counts
    assert c.faults_confirmed == 3 and c.kernel_fault_reports >= 2 and c.divergences == 0, verdict.format()
    assert c.commands == c.commands_matched, verdict.format()
    _check_other_reports(vm, verdict)
