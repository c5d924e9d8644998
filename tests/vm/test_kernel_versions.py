"""The newer kernel the project builds (Linux 7.2, harness/images/kernel.py) boots on
the default machine and its DMA is judged as 6.12's is: O_DIRECT NVMe I/O through
intel-iommu, a conclusive OK verdict that names the kernel's release, and its
DMA-API map events (``dma:dma_map_phys`` in 7.2) attributing the guest's IOMMU maps.

Opt-in, outside ``.ci/run``'s time: skipped unless the 7.2 kernel is already in the
image cache (``python -m harness images build kernel --version 7.2``) or
``DMA_HARNESS_KERNEL_MATRIX=1`` is set (then it is built first, 15-30 minutes on 2
cores). One boot.
"""

from __future__ import annotations

import os

import pytest

from harness.images.kernel import cached_kernel, ensure_kernel, kernel_release
from harness.vm import IntelIommu, MachineSpec, NvmeController, NvmeNamespace
from harness.workloads import NvmePattern

VERSION = "7.2"


@pytest.fixture(scope="module")
def newer_kernel(dma_harness):
    kernel = cached_kernel(dma_harness.cache, version=VERSION)
    if kernel is None:
        if not os.environ.get("DMA_HARNESS_KERNEL_MATRIX"):
            pytest.skip(f"the Linux {VERSION} kernel is not built: python -m harness images build kernel "
                        f"--version {VERSION} (or set DMA_HARNESS_KERNEL_MATRIX=1 to build it here)")
        kernel = ensure_kernel(dma_harness.cache, version=VERSION)
    return kernel


def test_linux_7_2_nvme_dma_is_judged_like_6_12s(vm_factory, dma_verdict, newer_kernel):
    release = kernel_release(newer_kernel.bzimage)
    assert release is not None and release.startswith(VERSION + "."), release
    vm = vm_factory(MachineSpec(kernel=str(newer_kernel.bzimage),
                                devices=(IntelIommu(caching_mode=True),
                                         NvmeController(namespaces=(NvmeNamespace(size_mib=32, lba_size=4096),)))))
    status, out, _ = vm.ssh_run("uname -r")
    assert status == 0 and out.strip() == release
    records = NvmePattern(length=256 << 10, chunk=64 << 10, rounds=2).run(vm.agent)
    assert all(r["verified"] for r in records)
    events = vm.agent.call("tracefs.status")["set_event"]
    assert "dma:dma_map_phys" in events and "dma:dma_unmap_phys" in events, events

    verdict = dma_verdict(vm)
    assert verdict.status == "ok", verdict.format()
    assert verdict.versions.get("kernel") == release, verdict.versions
    guest = verdict.report("guest-intent").counts
    assert guest.translations_checked > 0 and guest.guest_maps > 0 and guest.nvme_pairs > 0, verdict.format()
    assert guest.invalidation_pairs > 0, verdict.format()
    assert guest.directions_checked > 0, verdict.format()
    # Linux 7.2's NVMe maps its data through the DMA IOVA API (block/blk-mq-dma.c
    # blk_rq_dma_map_iova: dma_iova_try_alloc + dma_iova_link), which traces iommu:map/unmap but
    # no DMA-API event: guest_attribution.py credits them to the controller of the same task's
    # nvme_setup_cmd, so, as on 6.12, none is left unattributed.
    assert guest.unattributed_maps == 0 and guest.unattributed_unmaps == 0, verdict.format()
    data = verdict.report("block-data").counts
    assert data.ios_checked == data.ios == 16, verdict.format()
