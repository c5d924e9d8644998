"""virtio-iommu + NVMe: real O_DIRECT block I/O in a real guest, every translation
QEMU's virtio-iommu made for the device checked against the model of the
driver's requests and against the guest kernel's own mappings (one boot)."""

from harness.vm import MachineSpec, NvmeController, NvmeNamespace
from harness.vm.virtio_iommu import VirtioIommu
from harness.workloads import NvmePattern


def test_nvme_o_direct_dma_behind_virtio_iommu(vm_factory, dma_verdict):
    vm = vm_factory(MachineSpec(devices=(VirtioIommu(),
                                         NvmeController(namespaces=(NvmeNamespace(size_mib=32, lba_size=4096),)))),
                    boot_timeout=180.0)
    info = vm.agent.call("sysinfo")
    assert "iommu.strict=1" in info["cmdline"] and "intel_iommu=on" not in info["cmdline"]
    assert info["iommus"], "the guest registered no IOMMU"
    assert info["nvme"], "the guest sees no NVMe namespace"

    records = NvmePattern(length=256 << 10, chunk=64 << 10, rounds=2).run(vm.agent)
    assert all(r["verified"] for r in records)

    verdict = dma_verdict(vm)
    assert verdict.status == "ok", verdict.format()
    assert [r.checker for r in verdict.reports][:2] == ["virtio-iommu", "guest-intent"]
    viommu = verdict.report("virtio-iommu").counts
    assert viommu.translations_checked > 0 and viommu.maps > 0 and viommu.unmaps_done > 0, verdict.format()
    assert viommu.reserved_regions == 1  # the x86 MSI window QEMU reports in PROBE replies
    guest = verdict.report("guest-intent").counts
    assert guest.translations_checked == viommu.translations_checked, verdict.format()
    assert guest.viommu_map_pairs > 0 and guest.viommu_unmap_pairs > 0 and guest.nvme_pairs > 0, verdict.format()
    assert guest.directions_checked == guest.translations_checked and guest.unattributed_maps == 0
    data = verdict.report("block-data").counts
    assert data.ios_checked == data.ios == 16 and data.pages_checked == 2 * 2 * (256 << 10) // 4096, verdict.format()
