"""The vIOMMU x device matrix: the same workloads behind every vIOMMU the harness has.

Rows are vIOMMU settings, columns DMA devices; each cell is a
:class:`~harness.scenario.Scenario` (a machine and the device's workload), run
by the VM tests (``tests/vm/test_matrix.py``, one VM per cell) and written as
``configs/matrix/<viommu>-<device>.toml`` for ``python -m harness run``
(``python -m harness matrix --write configs/matrix`` regenerates them; a unit
test keeps the files and this table in step).

==================  ===============================================================
vIOMMU              machine
==================  ===============================================================
``intel-cm``        intel-iommu, caching mode on, device IOTLB on (virtio devices
                    get ``ats=on`` behind a root port: device-TLB invalidations)
``intel-nocm``      intel-iommu, caching mode off (QEMU only learns of a mapping
                    when the device walks the page table)
``virtio-iommu``    virtio-iommu-pci (ACPI VIOT), every map and unmap a request
==================  ===============================================================

==============  =========================================================================
device          workload
==============  =========================================================================
``nvme``        O_DIRECT pattern write/read/verify on ``/dev/nvme0n1`` (``nvme-pattern``)
``virtio-blk``  the same on ``/dev/vda`` (``virtio-blk-pattern``)
``virtio-net``  ICMP echo through slirp, every payload verified (``virtio-net-echo``)
==============  =========================================================================

A cell QEMU or the guest cannot do is listed in :data:`UNSUPPORTED` with the
reason; :func:`cell` raises :class:`Unsupported` for it, so a test skips it
with that reason and the command says so, never silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness.errors import ConfigError, HarnessError
from harness.scenario import Scenario
from harness.vm.devices import Device, IntelIommu, NvmeController, NvmeNamespace
from harness.vm.spec import MachineSpec
from harness.vm.virtio import VirtioBlk, VirtioNet
from harness.vm.virtio_iommu import VirtioIommu
from harness.workloads import NvmePattern, VirtioBlkPattern, VirtioNetEcho, Workload

__all__ = ["VIOMMUS", "DEVICES", "UNSUPPORTED", "Unsupported", "Cell", "cells", "cell", "write_configs"]

VIOMMUS: Final[tuple[str, ...]] = ("intel-cm", "intel-nocm", "virtio-iommu")
"""Rows of the matrix, in the order tests and configs list them."""

DEVICES: Final[tuple[str, ...]] = ("nvme", "virtio-blk", "virtio-net")
"""Columns of the matrix."""

UNSUPPORTED: Final[dict[tuple[str, str], str]] = {}
"""(vIOMMU, device) -> why that cell cannot run.  Every cell of QEMU 7.2 with
the project's 6.12 guest runs today; a cell goes here, with its reason, when
a QEMU or kernel version cannot do it."""

_BLOCK_LENGTH: Final = 256 << 10
_BLOCK_CHUNK: Final = 64 << 10


class Unsupported(HarnessError):
    """The cell cannot run on this QEMU and guest; ``reason`` says why."""

    def __init__(self, viommu: str, device: str, reason: str) -> None:
        super().__init__(f"{viommu} x {device}: {reason}")
        self.reason = reason


def _viommu(name: str) -> Device:
    if name == "intel-cm":
        return IntelIommu(caching_mode=True, device_iotlb=True)
    if name == "intel-nocm":
        return IntelIommu(caching_mode=False)
    return VirtioIommu()


def _nvme(ats: bool) -> tuple[Device, Workload]:
    del ats  # QEMU 7.2's nvme device has no ATS capability
    return (NvmeController(namespaces=(NvmeNamespace(size_mib=32, lba_size=4096),)),
            NvmePattern(device="/dev/nvme0n1", length=_BLOCK_LENGTH, chunk=_BLOCK_CHUNK, rounds=2))


def _virtio_blk(ats: bool) -> tuple[Device, Workload]:
    return (VirtioBlk(id="vblk0", addr=2, size_mib=32, ats=ats),
            VirtioBlkPattern(device="/dev/vda", length=_BLOCK_LENGTH, chunk=_BLOCK_CHUNK, rounds=2))


def _virtio_net(ats: bool) -> tuple[Device, Workload]:
    dev = VirtioNet(id="vnet0", addr=3, ats=ats)
    return dev, VirtioNetEcho(mac=dev.mac, addr=dev.guest_addr, peer=dev.peer_addr, count=128)


_DEVICE_FACTORIES: Final[dict[str, Callable[[bool], tuple[Device, Workload]]]] = {
    "nvme": _nvme, "virtio-blk": _virtio_blk, "virtio-net": _virtio_net,
}


@dataclass(frozen=True)
class Cell:
    """One cell: its vIOMMU and device names and the scenario that runs it."""

    viommu: str
    device: str
    scenario: Scenario

    @property
    def name(self) -> str:
        """``<viommu>-<device>``: the scenario's name, its config file's stem and the test id."""
        return f"{self.viommu}-{self.device}"


def cell(viommu: str, device: str) -> Cell:
    """The cell of ``viommu`` (one of :data:`VIOMMUS`) and ``device`` (one of :data:`DEVICES`).

    Raises:
        ConfigError: an unknown vIOMMU or device name (the message lists the known ones).
        Unsupported: the cell is in :data:`UNSUPPORTED`.
    """
    if viommu not in VIOMMUS:
        raise ConfigError(f"unknown vIOMMU {viommu!r}: known are {', '.join(VIOMMUS)}", key="viommu")
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}: known are {', '.join(DEVICES)}", key="device")
    reason = UNSUPPORTED.get((viommu, device))
    if reason is not None:
        raise Unsupported(viommu, device, reason)
    iommu = _viommu(viommu)
    ats = isinstance(iommu, IntelIommu) and iommu.device_iotlb
    dev, workload = _DEVICE_FACTORIES[device](ats)
    name = f"{viommu}-{device}"
    what = {"intel-cm": "intel-iommu (caching-mode=on, device-iotlb=on)",
            "intel-nocm": "intel-iommu (caching-mode=off)",
            "virtio-iommu": "virtio-iommu-pci"}[viommu]
    scenario = Scenario(name=name, machine=MachineSpec(memory_mib=1024, devices=(iommu, dev)), workload=workload,
                        description=f"matrix cell: q35 + {what} + {device}; {workload.kind}", boot_timeout=90.0)
    return Cell(viommu, device, scenario)


def cells() -> list[tuple[str, str, Cell | Unsupported]]:
    """Every (vIOMMU, device) pair in matrix order, with its cell or why it cannot run."""
    out: list[tuple[str, str, Cell | Unsupported]] = []
    for v in VIOMMUS:
        for d in DEVICES:
            try:
                out.append((v, d, cell(v, d)))
            except Unsupported as exc:
                out.append((v, d, exc))
    return out


def write_configs(folder: Path) -> list[Path]:
    """Write every runnable cell as ``folder/<name>.toml`` (the folder is created);
    returns the paths written.  Raises OSError when the folder cannot be written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for _, _, c in cells():
        if isinstance(c, Cell):
            path = folder / f"{c.name}.toml"
            header = (f"# {c.scenario.description}\n"
                      f"# Generated by `python -m harness matrix --write {folder}` from harness/matrix.py.\n")
            path.write_text(header + c.scenario.to_toml(), encoding="utf-8")
            written.append(path)
    return written
