"""VM orchestration: devices and machine spec rendered to argv, the QEMU process
with QMP, console, SSH and the guest agent channel, and accelerator selection.
Knows nothing about the reference models."""

from harness.vm.devices import Device, IntelIommu, NvmeController, NvmeNamespace
from harness.vm.machine import VM, BootImages, find_qemu
from harness.vm.spec import MachineSpec

__all__ = ["VM", "BootImages", "Device", "IntelIommu", "MachineSpec", "NvmeController", "NvmeNamespace",
           "find_qemu"]

# virtio-blk and virtio-net behind the IOMMU (harness/vm/virtio.py)
from harness.vm.virtio import VirtioBlk, VirtioNet  # noqa: E402

__all__ += ["VirtioBlk", "VirtioNet"]

# virtio-iommu, the second vIOMMU (harness/vm/virtio_iommu.py)
from harness.vm.virtio_iommu import VirtioIommu  # noqa: E402

__all__ += ["VirtioIommu"]
