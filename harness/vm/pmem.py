"""The emulated NVDIMM that carries the guest's read-only ``/usr``
(harness.images.usr_image).

QEMU side (docs/nvdimm.txt; hw/mem/nvdimm.c, hw/acpi/nvdimm.c): the machine gets
``nvdimm=on`` and a hot-pluggable memory slot (``-m SIZE,slots=1,maxmem=...``); the
image is a ``memory-backend-file`` with ``share=on,readonly=on`` (QEMU maps the cache
file read-only and shared, so no guest write can reach it and every VM shares the
host's page cache of it) behind ``-device nvdimm,unarmed=on`` (the NFIT tells the
guest the DIMM does not accept writes). The DIMM sits in the device-memory window
above the guest's RAM: it is no PCI device, has no IOMMU group and does no DMA.

Guest side: ACPI's NFIT describes one region; Linux's nfit and libnvdimm drivers
(drivers/acpi/nfit/, drivers/nvdimm/) make it the raw namespace ``/dev/pmem0``
(``BLK_DEV_PMEM``), which ``/init.usr`` mounts as erofs on ``/usr``.

Migration: the image's RAM block is shared, so a snapshot skips it with the
``x-ignore-shared`` capability (harness.vm.snapshot); the restored QEMU maps the same
file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MEMDEV_ID = "dmausr0"
DEVICE_ID = "dmausrdimm0"


@dataclass(frozen=True)
class UsrDimm:
    """``image``: the erofs file (its size a multiple of 2 MiB, as
    harness.images.usr_image pads it)."""

    image: Path

    @property
    def size(self) -> int:
        """The DIMM's size in bytes (the file's)."""
        return self.image.stat().st_size

    def machine_options(self) -> list[str]:
        """Options appended to ``-machine``."""
        return ["nvdimm=on"]

    def memory_option(self, memory_mib: int) -> str:
        """The ``-m`` value for a guest of ``memory_mib`` MiB of RAM: one slot, and a
        maximum that leaves room for the DIMM (rounded up to whole MiB)."""
        return f"{memory_mib},slots=1,maxmem={memory_mib + -(-self.size // (1 << 20))}M"

    def argv(self) -> list[str]:
        """The backend and the device."""
        path = str(self.image).replace(",", ",,")  # QEMU's option syntax doubles a comma
        return ["-object", f"memory-backend-file,id={MEMDEV_ID},mem-path={path},size={self.size},"
                           "share=on,readonly=on",
                "-device", f"nvdimm,id={DEVICE_ID},memdev={MEMDEV_ID},unarmed=on"]
