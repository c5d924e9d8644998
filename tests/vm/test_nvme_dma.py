"""intel-iommu + NVMe: real O_DIRECT block I/O in a real guest, every translation
the vIOMMU made for the device checked against the IOTLB model."""

import pytest

from harness.vm import IntelIommu, MachineSpec, NvmeController, NvmeNamespace
from harness.workloads import NvmePattern


@pytest.mark.parametrize("caching_mode", [True, False], ids=["caching-mode", "no-caching-mode"])
def test_nvme_o_direct_dma_matches_iotlb_model(vm_factory, dma_verdict, caching_mode):
    vm = vm_factory(MachineSpec(devices=(IntelIommu(caching_mode=caching_mode),
                                         NvmeController(namespaces=(NvmeNamespace(size_mib=32, lba_size=4096),)))))
    info = vm.agent.call("sysinfo")
    assert "intel_iommu=on" in info["cmdline"] and "iommu.strict=1" in info["cmdline"]
    assert any(name.startswith("dmar") for name in info["iommus"]), info["iommus"]
    assert info["nvme"], "the guest sees no NVMe namespace"

    records = NvmePattern(length=256 << 10, chunk=64 << 10, rounds=2).run(vm.agent)
    assert all(r["verified"] for r in records)
    assert sum(r["writes"] + r["reads"] for r in records) == 16

    verdict = dma_verdict(vm)
    assert verdict.status == "ok", verdict.format()
    c = verdict.report("vtd-consistency").counts
    assert c.translations > 0 and c.iotlb_updates > 0 and c.invalidations > 0, verdict.format()
    assert c.nvme_prp_maps > 0
    guest = verdict.report("guest-intent").counts
    assert guest.translations_checked > 0 and guest.guest_maps > 0 and guest.nvme_pairs > 0, verdict.format()
    assert guest.invalidation_pairs > 0, verdict.format()
    assert guest.directions_checked > 0 and guest.unattributed_maps == 0, verdict.format()
    data = verdict.report("block-data").counts
    # 2 rounds, each writing then reading 256 KiB: every page checked
    assert data.ios_checked == data.ios == 16 and data.pages_checked == 2 * 2 * (256 << 10) // 4096, verdict.format()


def test_ssh_and_console_reach_the_guest(vm):
    status, out, _ = vm.ssh_run("cat /proc/cmdline; ls /dev/iommu /dev/vfio/vfio")
    assert status == 0 and "intel_iommu=on" in out and "/dev/iommu" in out
    assert "dma-harness-guest-console-ok" in vm.console.run("echo dma-harness-guest-console-ok")
