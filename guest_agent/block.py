"""O_DIRECT pattern I/O on any block device (``/dev/vdX`` of a virtio-blk device,
``/dev/nvmeXnY``...): the same operation as ``nvme.pattern_rw``
(:func:`guest_agent.nvme.pattern_rw`, which is not NVMe-specific), under a
device-neutral name, plus a lookup of a virtio-blk disk by its PCI address.

Ops:
  ``block.pattern_rw``  write a seeded pattern with O_DIRECT, read it back, verify
  ``block.find_virtio`` the ``/dev/vdX`` of the virtio-blk function at a PCI address
"""

from __future__ import annotations

import os
from typing import Any

from guest_agent.nvme import pattern_rw as _pattern_rw
from guest_agent.protocol import op


@op("block.pattern_rw")
def pattern_rw(device: str = "/dev/vda", offset: int = 0, length: int = 1 << 20,
               chunk: int = 1 << 16, seed: int = 1, buffers: int = 1) -> dict[str, Any]:
    """See :func:`guest_agent.nvme.pattern_rw`: the record (device, ios with byte
    pos/len, ``buffers_pages`` guest-physical page addresses, ``lba_size``,
    ``verified``) is the same, and ``pci`` adds the PCI address of the device's
    function (``0000:01:00.0``; None if sysfs has none)."""
    record: dict[str, Any] = _pattern_rw(device=device, offset=offset, length=length, chunk=chunk, seed=seed, buffers=buffers)
    record["pci"] = _pci_of(device)
    return record


def _pci_of(device: str) -> str | None:
    """The PCI function a block device hangs off (``/sys/block/vda/device`` is the
    virtio device, its parent the PCI function)."""
    name = os.path.basename(os.path.realpath(device))
    try:
        path = os.path.realpath(f"/sys/block/{name}/device")
    except OSError:
        return None
    for part in reversed(path.split("/")):
        if part.count(":") == 2 and "." in part:
            return part
    return None


@op("block.find_virtio")
def find_virtio(pci: str | None = None) -> dict[str, Any]:
    """The virtio-blk disks: ``{"disks": {"/dev/vda": "0000:01:00.0", ...}, "device": path}``
    where ``device`` is the disk of PCI function ``pci`` (None if none or not asked)."""
    disks: dict[str, str | None] = {}
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith("vd"):
            disks[f"/dev/{name}"] = _pci_of(f"/dev/{name}")
    found = next((d for d, p in disks.items() if pci is not None and p == pci), None)
    return {"disks": disks, "device": found}
