"""The machine spec: what a guest is (machine type, memory, CPUs, accelerator,
kernel, command line, devices), validated at construction, rendered to argv."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness.errors import DeviceConfigError
from harness.vm.accel import ACCELS
from harness.vm.devices import IOMMU_KINDS, Device, IntelIommu, NvmeController, RenderContext
from harness.vm.pmem import UsrDimm
from harness.vm.xen import XEN_CPU, XEN_KERNEL_OPTIONS, XenHost

TCG_CPU = "max,-erms,-fsrm"
"""The CPU model under TCG: QEMU's ``max`` without ERMS and FSRM. With either flag
Linux's memcpy and copy_mc (arch/x86/lib/memcpy_64.S, copy_mc.c) and glibc's large
copies use ``rep movsb``, which TCG runs one byte per helper iteration: unpacking
the initramfs and reading the ``/usr`` NVDIMM copied about 50 MB/s, 2.4x slower than
the 8-byte moves used without them. Nothing the harness checks depends on them."""

HARNESS = "the harness"
HARNESS_KERNEL_OPTIONS: tuple[str, ...] = (
    "VIRTIO_PCI", "VIRTIO_CONSOLE",          # the guest agent's virtio-serial port
    "DEVTMPFS", "BLK_DEV_INITRD",            # the initramfs root filesystem and its /dev
    "PVPANIC", "PVPANIC_MMIO",               # -device pvpanic (ACPI QEMU0001): a panic reaches QMP
    "FTRACE", "TRACING", "EVENT_TRACING",    # tracefs events: the guest kernel's record of its DMA maps
)
"""Kernel options every guest needs, whatever its devices: what the VM adds beside
them (agent channel, pvpanic, initramfs) and the guest-side tracing."""


@dataclass(frozen=True)
class MachineSpec:
    """A guest machine.

    ``machine`` (QEMU machine type; intel-iommu needs ``q35``), ``memory_mib`` (MiB),
    ``cpus``, ``accel`` (``auto``: KVM if a probe guest really boots, else TCG),
    ``cpu`` (QEMU CPU model; default ``host`` under KVM, ``max`` under TCG),
    ``kernel`` / ``initrd`` (paths; ``None`` = the harness's own images), ``cmdline``
    (extra kernel arguments), ``devices`` (device objects, IOMMU first), ``xen``
    (a :class:`~harness.vm.xen.XenHost`: boot Xen with the kernel as PV dom0; None =
    the kernel runs on the bare machine).

    Raises DeviceConfigError naming the field for any invalid or conflicting value.
    """

    machine: str = "q35"
    memory_mib: int = 1024
    cpus: int = 1
    accel: str = "auto"
    cpu: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    devices: tuple[Device, ...] = field(default_factory=tuple)
    xen: XenHost | None = None

    def __post_init__(self) -> None:
        if self.machine not in ("q35", "pc"):
            raise DeviceConfigError(f"machine must be 'q35' or 'pc', not {self.machine!r}", key="machine")
        if not isinstance(self.memory_mib, int) or not 256 <= self.memory_mib <= 65536:
            raise DeviceConfigError(f"memory_mib must be 256..65536, not {self.memory_mib!r}", key="memory_mib")
        if not isinstance(self.cpus, int) or not 1 <= self.cpus <= 64:
            raise DeviceConfigError(f"cpus must be 1..64, not {self.cpus!r}", key="cpus")
        if self.accel not in ACCELS:
            raise DeviceConfigError(f"accel must be one of {', '.join(ACCELS)}, not {self.accel!r}", key="accel")
        iommus = [d for d in self.devices if isinstance(d, IOMMU_KINDS)]
        if len(iommus) > 1:
            raise DeviceConfigError("only one IOMMU per machine: " + ", ".join(d.kind for d in iommus),
                                    key="devices")
        if any(isinstance(d, IntelIommu) for d in self.devices) and self.machine != "q35":
            raise DeviceConfigError("intel-iommu needs machine = 'q35'", key="machine")
        ids = [getattr(d, "id") for d in self.devices if hasattr(d, "id")]
        if len(ids) != len(set(ids)):
            raise DeviceConfigError(f"duplicate device ids: {ids}", key="devices")
        if "\n" in self.cmdline:
            raise DeviceConfigError("cmdline must be one line", key="cmdline")
        if self.xen is not None:
            if not isinstance(self.xen, XenHost):
                raise DeviceConfigError(f"xen must be a XenHost, not {self.xen!r}", key="xen")
            if iommus:
                raise DeviceConfigError(f"a vIOMMU ({iommus[0].kind}) under Xen is not supported: Xen would "
                                        "drive it itself, and dom0 would see no IOMMU", key="devices")
            if self.memory_mib < self.xen.dom0_mem_mib + 256:
                raise DeviceConfigError(f"memory_mib ({self.memory_mib}) must leave Xen at least 256 MiB beside "
                                        f"dom0's {self.xen.dom0_mem_mib} MiB", key="memory_mib")
        # What virtio devices need from the rest of the machine (ats -> intel-iommu device_iotlb).
        from harness.vm.virtio import check_machine as _check_virtio
        _check_virtio(self)

    def replace(self, **changes: Any) -> MachineSpec:
        return dataclasses.replace(self, **changes)

    @property
    def iommu(self) -> Device | None:
        return next((d for d in self.devices if isinstance(d, IOMMU_KINDS)), None)

    def kernel_needs(self) -> dict[str, list[str]]:
        """The kernel options this machine's guest needs (``=y``), each with what
        needs it: ``{"INTEL_IOMMU": ["intel-iommu"], "VIRTIO_CONSOLE": ["the harness"]}``."""
        needs: dict[str, list[str]] = {name: [HARNESS] for name in HARNESS_KERNEL_OPTIONS}
        if self.xen is not None:
            for name in XEN_KERNEL_OPTIONS:
                needs.setdefault(name, []).append("xen (dom0)")
        for d in self.devices:
            for name in d.kernel_options():
                users = needs.setdefault(name, [])
                if d.kind not in users:
                    users.append(d.kind)
        return needs

    def cpu_model(self, accel: str) -> str:
        if self.cpu:
            return self.cpu
        if self.xen is not None:
            return XEN_CPU  # -cpu max crashes a PV dom0 under TCG (FACTS.md)
        return "host" if accel == "kvm" else TCG_CPU

    def kernel_cmdline(self) -> str:
        """The (dom0) kernel's command line: its console (``hvc0`` under Xen, which
        owns COM1), reboot on panic, each device's arguments, then ``cmdline``."""
        args = ["console=hvc0" if self.xen is not None else "console=ttyS0", "panic=-1", "loglevel=4"]
        for d in self.devices:
            args += d.kernel_args()
        if self.cmdline:
            args.append(self.cmdline)
        return " ".join(args)

    def machine_argv(self, ctx: RenderContext, dimm: UsrDimm | None = None) -> list[str]:
        """``-machine ... -cpu ... -m ... -smp ...`` plus every device, IOMMU first;
        with ``dimm``, the NVDIMM that holds the guest's ``/usr`` (harness.vm.pmem)."""
        mopts = [self.machine, f"accel={ctx.accel}"]
        iommu = self.iommu
        if isinstance(iommu, IntelIommu) and iommu.intremap and ctx.accel == "kvm":
            mopts.append("kernel-irqchip=split")
        if dimm is not None:
            mopts += dimm.machine_options()
        memory = dimm.memory_option(self.memory_mib) if dimm is not None else str(self.memory_mib)
        argv = ["-machine", ",".join(mopts), "-cpu", self.cpu_model(ctx.accel),
                "-m", memory, "-smp", str(self.cpus)]
        if dimm is not None:
            argv += dimm.argv()
        ordered = sorted(self.devices, key=lambda d: not isinstance(d, IOMMU_KINDS))
        for d in ordered:
            argv += d.argv(ctx)
        return argv

    def to_table(self) -> dict[str, Any]:
        t: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                             if f.name != "devices" and getattr(self, f.name) is not None}
        t["devices"] = [d.to_table() for d in self.devices]
        if self.xen is not None:
            t["xen"] = self.xen.to_table()
        return t


def default_machine() -> MachineSpec:
    """The machine used when none is given: q35, intel-iommu (caching mode), one NVMe
    controller with a 64 MiB namespace; accelerator ``auto``."""
    return MachineSpec(devices=(IntelIommu(caching_mode=True), NvmeController()))


def xen_machine() -> MachineSpec:
    """The Xen machine: q35, 2 GiB, Xen 4.17 with the harness's kernel as PV dom0
    (1 GiB), no vIOMMU; accelerator ``auto``."""
    return MachineSpec(memory_mib=2048, xen=XenHost())
