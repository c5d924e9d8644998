"""Real misbehaviour, not edited traces: the system under test built with a planted
bug must be caught as the specific divergence, where the unpatched build passes.

Opt-in: each test needs its planted-bug build (``python -m harness images build
--patch NAME``, about 10 min on 2 cores) and is skipped, naming that command, when
it is not in the image cache.
"""

from __future__ import annotations

import pytest

from harness.errors import AgentError
from harness.images.kernel import cached_kernel
from harness.vm import IntelIommu, MachineSpec, NvmeController, NvmeNamespace
from harness.workloads import NvmePattern, WorkloadFailed

SKIP_FLUSH = "intel-skip-unmap-flush"
NO_AHCI = "initcall_blacklist=ahci_pci_driver_init"
"""q35's built-in SATA controller is left unprobed: with no IOTLB flush at all, its
probe DMA through stale entries corrupts the booting kernel before the test starts."""


def planted_kernel(dma_harness, patch: str) -> str:
    kernel = cached_kernel(dma_harness.cache, patch=patch)
    if kernel is None:
        pytest.skip(f"the planted-bug kernel is not built: python -m harness images build --patch {patch}")
    return str(kernel.bzimage)


@pytest.mark.dma_no_check  # the verdict is asserted here: it must diverge
def test_guest_kernel_that_skips_the_unmap_flush_is_caught(vm_factory, dma_verdict, dma_harness):
    """drivers/iommu/intel/iommu.c intel_iommu_tlb_sync() with its cache_tag_flush_range()
    removed: strict unmaps no longer invalidate the IOTLB. Without caching mode nothing
    else flushes a remapped iova either, so QEMU keeps translating it to the old page.
    The guest-intent check must name it (``stale-after-remap``: the device used the page
    of a mapping the guest unmapped and never invalidated, after the iova was mapped
    again elsewhere), and the data must be seen landing on the wrong buffer page."""
    spec = MachineSpec(kernel=planted_kernel(dma_harness, SKIP_FLUSH), cmdline=NO_AHCI,
                       devices=(IntelIommu(caching_mode=False),
                                NvmeController(namespaces=(NvmeNamespace(size_mib=32, lba_size=512),))))
    vm = vm_factory(spec)
    try:
        NvmePattern(length=512 << 10, chunk=64 << 10, rounds=2, buffers=2).run(vm.agent)
    except (WorkloadFailed, AgentError):
        pass  # corrupted data is expected; the verdict says where it went
    verdict = dma_verdict(vm)
    intent = verdict.report("guest-intent")
    assert intent.divergences_by_kind.get("stale-after-remap", 0) > 0, verdict.format()
    first = next(d for d in intent.divergences if d.kind == "stale-after-remap")
    assert any(role == "guest unmapped" for role, _ in first.related), first.format()
    assert verdict.report("vtd-consistency").ok, "QEMU is consistent with itself: only the guest oracle sees it"


def test_same_workload_on_the_unpatched_kernel_passes(vm_factory, dma_verdict, dma_harness):
    """The control: the project's own kernel, same machine and workload."""
    planted_kernel(dma_harness, SKIP_FLUSH)  # run the control only beside the planted test
    spec = MachineSpec(cmdline=NO_AHCI, devices=(IntelIommu(caching_mode=False),
                                NvmeController(namespaces=(NvmeNamespace(size_mib=32, lba_size=512),))))
    vm = vm_factory(spec)
    NvmePattern(length=512 << 10, chunk=64 << 10, rounds=2, buffers=2).run(vm.agent)
    verdict = dma_verdict(vm)
    assert verdict.status == "ok", verdict.format()
