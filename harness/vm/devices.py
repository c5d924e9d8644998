"""Devices composed in code. Each device is a frozen dataclass validated at
construction and rendered to QEMU argv by :meth:`Device.argv`; the kernel command
line arguments a device needs come from :meth:`Device.kernel_args`, the kernel
options its driver needs from :meth:`Device.kernel_options`.

``DEVICE_KINDS`` maps the name a device has in config files to its class; reading
devices from config files (TOML tables) is not this layer's business: it lives in
:mod:`harness.device_tables`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from harness.errors import DeviceConfigError


@dataclass(frozen=True)
class RenderContext:
    """What rendering needs from the running VM: its private run directory and accel."""

    run_dir: Path
    accel: str


@dataclass(frozen=True)
class Device:
    """Base of all devices. ``kind`` is the name used in config files."""

    kind: ClassVar[str] = ""

    def argv(self, ctx: RenderContext) -> list[str]:
        raise NotImplementedError

    def kernel_args(self) -> list[str]:
        return []

    def kernel_options(self) -> tuple[str, ...]:
        """Kernel options (without ``CONFIG_``, built in: ``=y``) the guest needs to drive
        this device as configured; a user's kernel lacking one is refused."""
        return ()

    def setup(self, ctx: RenderContext) -> None:
        """Create host-side files the device needs (e.g. backing images) in the run dir."""

    def to_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v.to_table() if isinstance(v, NvmeNamespace) else v for v in value]
            table[f.name] = value
        return table


def _onoff(value: bool) -> str:
    return "on" if value else "off"


@dataclass(frozen=True)
class IntelIommu(Device):
    """QEMU's ``intel-iommu`` (VT-d) on a q35 machine, with the guest kernel told
    ``intel_iommu=on``.

    Fields: ``caching_mode`` (CM=1: the guest must invalidate on map too, as vfio
    needs), ``intremap`` (interrupt remapping; with KVM it needs kernel-irqchip=split,
    which the machine adds), ``device_iotlb`` (ATS), ``aw_bits`` (39 or 48 address
    width bits), ``strict`` (``iommu.strict=1``: unmaps flush the IOTLB synchronously).
    """

    kind: ClassVar[str] = "intel-iommu"
    caching_mode: bool = False
    intremap: bool = False
    device_iotlb: bool = False
    aw_bits: int = 39
    strict: bool = True

    def __post_init__(self) -> None:
        if self.aw_bits not in (39, 48):
            raise DeviceConfigError(f"intel-iommu: aw_bits must be 39 or 48, not {self.aw_bits!r}",
                                    key="aw_bits")

    def argv(self, ctx: RenderContext) -> list[str]:
        opts = [f"caching-mode={_onoff(self.caching_mode)}", f"intremap={_onoff(self.intremap)}",
                f"device-iotlb={_onoff(self.device_iotlb)}", f"aw-bits={self.aw_bits}"]
        return ["-device", "intel-iommu," + ",".join(opts)]

    def kernel_args(self) -> list[str]:
        args = ["intel_iommu=on", f"iommu.strict={int(self.strict)}"]
        if self.intremap:
            # Under TCG on a busy host the kernel's check that the timer interrupt
            # arrives through the interrupt-remapped IO-APIC can time out and panic
            # ("timer doesn't work through Interrupt-remapped IO-APIC"): skip it.
            args.append("no_timer_check")
        return args

    def kernel_options(self) -> tuple[str, ...]:
        return ("INTEL_IOMMU", "IRQ_REMAP") if self.intremap else ("INTEL_IOMMU",)


_SERIAL_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")


@dataclass(frozen=True)
class NvmeNamespace:
    """One NVMe namespace backed by a sparse raw file in the VM's run directory.

    ``size_mib`` (MiB), ``lba_size`` (bytes: 512 or 4096), ``nsid`` (1-based, default
    its position).
    """

    size_mib: int = 64
    lba_size: int = 512
    nsid: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size_mib, int) or not 1 <= self.size_mib <= 1 << 20:
            raise DeviceConfigError(f"nvme namespace: size_mib must be 1..1048576, not {self.size_mib!r}",
                                    key="size_mib")
        if self.lba_size not in (512, 4096):
            raise DeviceConfigError(f"nvme namespace: lba_size must be 512 or 4096, not {self.lba_size!r}",
                                    key="lba_size")
        if self.nsid is not None and (not isinstance(self.nsid, int) or self.nsid < 1):
            raise DeviceConfigError(f"nvme namespace: nsid must be >= 1, not {self.nsid!r}", key="nsid")

    def to_table(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class NvmeController(Device):
    """QEMU's emulated NVMe controller (hw/nvme) with its namespaces.

    ``serial`` (1-20 of [A-Za-z0-9_-], required by QEMU), ``namespaces`` (at least one),
    ``id`` (QEMU device id, also names the backing files), ``addr`` (PCI slot, optional).
    """

    kind: ClassVar[str] = "nvme"
    serial: str = "dmaharness0"
    namespaces: tuple[NvmeNamespace, ...] = field(default_factory=lambda: (NvmeNamespace(),))
    id: str = "nvme0"
    addr: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.serial, str) or not _SERIAL_RE.match(self.serial):
            raise DeviceConfigError(f"nvme: serial must be 1-20 characters of [A-Za-z0-9_-], not {self.serial!r}",
                                    key="serial")
        if not self.namespaces:
            raise DeviceConfigError("nvme: at least one namespace is needed", key="namespaces")
        nsids = [ns.nsid or i + 1 for i, ns in enumerate(self.namespaces)]
        if len(set(nsids)) != len(nsids):
            raise DeviceConfigError(f"nvme: duplicate namespace ids {nsids}", key="namespaces")
        if self.addr is not None and not 1 <= self.addr <= 31:
            raise DeviceConfigError(f"nvme: addr must be a PCI slot 1..31, not {self.addr!r}", key="addr")

    def kernel_options(self) -> tuple[str, ...]:
        return ("BLK_DEV_NVME",)

    def image(self, ctx: RenderContext, index: int) -> Path:
        return ctx.run_dir / f"{self.id}n{index + 1}.img"

    def setup(self, ctx: RenderContext) -> None:
        for i, ns in enumerate(self.namespaces):
            with open(self.image(ctx, i), "wb") as fh:
                fh.truncate(ns.size_mib << 20)

    def argv(self, ctx: RenderContext) -> list[str]:
        ctrl = f"nvme,id={self.id},serial={self.serial}"
        if self.addr is not None:
            ctrl += f",addr={self.addr:#x}"
        out = ["-device", ctrl]
        for i, ns in enumerate(self.namespaces):
            node = f"{self.id}n{i + 1}"
            out += ["-blockdev", f"driver=file,filename={self.image(ctx, i)},node-name={node}-file",
                    "-blockdev", f"driver=raw,file={node}-file,node-name={node}",
                    "-device", f"nvme-ns,drive={node},bus={self.id},nsid={ns.nsid or i + 1},"
                               f"logical_block_size={ns.lba_size},physical_block_size={ns.lba_size}"]
        return out


DEVICE_KINDS: dict[str, type[Device]] = {cls.kind: cls for cls in (IntelIommu, NvmeController)}
IOMMU_KINDS: tuple[type[Device], ...] = (IntelIommu,)


# virtio-iommu (harness/vm/virtio_iommu.py): registered here, after the classes above.
from harness.vm.virtio_iommu import VirtioIommu  # noqa: E402

DEVICE_KINDS[VirtioIommu.kind] = VirtioIommu
IOMMU_KINDS = (*IOMMU_KINDS, VirtioIommu)

# virtio-blk and virtio-net (harness/vm/virtio.py): registered here, after the classes above.
from harness.vm.virtio import VirtioBlk, VirtioNet  # noqa: E402

DEVICE_KINDS[VirtioBlk.kind] = VirtioBlk
DEVICE_KINDS[VirtioNet.kind] = VirtioNet
