"""dma-harness: boot real QEMU guests with an emulated IOMMU and judge their DMA
against reference models of the kernel's translation structures.

Packages:
  harness.models   pure reference models (no I/O): iotlb
  harness.trace    QEMU trace-log parsing into typed events
  harness.checks   replay of observed events into the models; verdicts
  harness.vm       QEMU process, argv rendering, QMP, console, SSH, guest agent
  harness.images   guest kernel and root filesystem builds, content-hash cache
"""

__version__ = "0.1.0"
