"""QEMU's ``virtio-iommu-pci`` (hw/virtio/virtio-iommu.c), the harness's second vIOMMU.

On x86 the guest finds it through the ACPI VIOT table QEMU builds
(hw/acpi/viot.c; Linux ``CONFIG_ACPI_VIOT``, drivers/acpi/viot.c), which puts
every PCI device of the root bus behind it; endpoint ids are PCI source ids
(``bus << 8 | devfn``).  QEMU 7.2's device has no granule or address-width
property: its ``page_size_mask`` is the target page mask (``~0xfff``, 4 KiB
and every larger power of two) and its input range is all 64 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness.errors import DeviceConfigError
from harness.vm.devices import Device, RenderContext

__all__ = ["VirtioIommu"]


@dataclass(frozen=True)
class VirtioIommu(Device):
    """``-device virtio-iommu-pci`` with the guest kernel's ``iommu.strict`` set.

    Fields: ``boot_bypass`` (QEMU's ``boot-bypass``, default on: until the
    driver attaches an endpoint to a domain its DMA bypasses translation, so
    the firmware works; it is the initial ``bypass`` of the device's config,
    VIRTIO_IOMMU_F_BYPASS_CONFIG), ``strict`` (``iommu.strict=1``: every
    DMA-API unmap sends its UNMAP request before returning; ``0``: unmaps are
    batched in the dma-iommu flush queue, drivers/iommu/dma-iommu.c),
    ``addr`` (PCI slot, optional).

    Kernel options: VIRTIO_IOMMU and VIRTIO_PCI (the driver); on x86 the guest
    also needs ACPI_VIOT to find its endpoints (the project's kernel has it
    from defconfig).

    Raises DeviceConfigError for an ``addr`` outside 1..31.
    """

    kind: ClassVar[str] = "virtio-iommu"
    boot_bypass: bool = True
    strict: bool = True
    addr: int | None = None

    def __post_init__(self) -> None:
        if self.addr is not None and (not isinstance(self.addr, int) or not 1 <= self.addr <= 31):
            raise DeviceConfigError(f"virtio-iommu: addr must be a PCI slot 1..31, not {self.addr!r}", key="addr")

    def argv(self, ctx: RenderContext) -> list[str]:
        opts = ["virtio-iommu-pci", f"boot-bypass={'on' if self.boot_bypass else 'off'}"]
        if self.addr is not None:
            opts.append(f"addr={self.addr:#x}")
        return ["-device", ",".join(opts)]

    def kernel_args(self) -> list[str]:
        return [f"iommu.strict={int(self.strict)}", "iommu.passthrough=0"]

    def kernel_options(self) -> tuple[str, ...]:
        return ("VIRTIO_IOMMU", "VIRTIO_PCI")
