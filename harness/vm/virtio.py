"""virtio devices behind the emulated IOMMU: ``virtio-blk-pci`` and ``virtio-net-pci``.

Both are modern-only (``disable-legacy=on``) and, by default, negotiate
VIRTIO_F_ACCESS_PLATFORM (``iommu_platform=on``): the guest's virtio ring then
maps every buffer through the DMA API (drivers/virtio/virtio_ring.c
``vring_use_dma_api``) and QEMU reaches guest memory through the vIOMMU
(``vdev->dma_as``), so each ring access and each buffer page is one
``vtd_dmar_translate`` of the device's source id.

``ats`` (``ats=on``) gives the device a PCIe ATS capability.  QEMU 7.2 adds it
only to a virtio device that sits behind a PCI Express port
(hw/virtio/virtio-pci.c ``virtio_pci_realize``: ``pcie_port`` is false on the
root bus), so a device with ``ats`` is rendered behind its own
``pcie-root-port`` at ``addr`` and sits at slot 0 of the port's secondary bus.
The guest (drivers/iommu/intel/iommu.c, ``dmar_ats_supported``: QEMU's DMAR
table reports ATS for all root ports when ``device-iotlb=on``) then enables ATS
and follows each IOTLB invalidation with a device-TLB invalidation descriptor.
``ats`` needs ``intel-iommu`` with ``device_iotlb = true``; :func:`check_machine`
says so naming the key.

Source ids: :func:`expected_dma_devices` predicts where QEMU and the firmware
put each PCI device of a machine (explicit ``addr`` slots, else the lowest free
slot from 1 in argv order; root ports get secondary buses 1, 2, ... in slot
order, as SeaBIOS numbers them), so that checkers can say how many translations
each device made and call a device that made none inconclusive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from harness.errors import DeviceConfigError
from harness.vm.devices import Device, RenderContext

if TYPE_CHECKING:
    from harness.vm.spec import MachineSpec

__all__ = ["VirtioBlk", "VirtioNet", "DmaDevice", "expected_dma_devices", "check_machine", "bdf_text",
           "VIRTIO_NET_GUEST_ADDR", "VIRTIO_NET_PEER_ADDR"]

_MAC_RE = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
_NET_RE = re.compile(r"10\.0\.(\d{1,3})\.0/24")
VIRTIO_NET_GUEST_ADDR = 15
"""Host part of the guest's address on a virtio-net device's subnet (slirp's ``dhcpstart``)."""
VIRTIO_NET_PEER_ADDR = 2
"""Host part of slirp's own address (the gateway that answers ICMP echo)."""


def _onoff(value: bool) -> str:
    return "on" if value else "off"


def bdf_text(sid: int) -> str:
    """``bus:slot.func`` of a PCI source id (``bus << 8 | slot << 3 | func``), e.g. ``00:02.0``."""
    return f"{sid >> 8:02x}:{(sid >> 3) & 0x1F:02x}.{sid & 7:x}"


def _check_common(kind: str, device: Any) -> None:
    for name in ("iommu_platform", "ats"):
        if not isinstance(getattr(device, name), bool):
            raise DeviceConfigError(f"{kind}: {name} must be true or false, not {getattr(device, name)!r}",
                                    key=name)
    if device.addr is not None and (isinstance(device.addr, bool) or not isinstance(device.addr, int)
                                    or not 1 <= device.addr <= 31):
        raise DeviceConfigError(f"{kind}: addr must be a PCI slot 1..31, not {device.addr!r}", key="addr")
    if device.ats and not device.iommu_platform:
        raise DeviceConfigError(f"{kind}: ats = true needs iommu_platform = true (without it the device "
                                "bypasses the IOMMU)", key="ats")


def _pci_argv(device: Any, model: str, extra: list[str]) -> list[str]:
    """``-device`` options of a virtio PCI device, behind its own root port with ``ats``."""
    opts = [model, f"id={device.id}", "disable-legacy=on", f"iommu_platform={_onoff(device.iommu_platform)}"]
    out: list[str] = []
    if device.ats:
        port = f"{device.id}-port"
        rp = f"pcie-root-port,id={port},bus=pcie.0,chassis={_chassis(device.id)}"
        if device.addr is not None:
            rp += f",addr={device.addr:#x}"
        out += ["-device", rp]
        opts += ["ats=on", f"bus={port}", "addr=0x0"]
    elif device.addr is not None:
        opts.append(f"addr={device.addr:#x}")
    return out + ["-device", ",".join(opts + extra)]


def _chassis(device_id: str) -> int:
    """A chassis number for a root port, stable for a device id (QEMU wants them distinct)."""
    return 1 + sum(device_id.encode()) % 200


@dataclass(frozen=True)
class VirtioBlk(Device):
    """``virtio-blk-pci`` backed by a sparse raw file in the VM's run directory.

    Fields: ``id`` (QEMU device id; also names the backing file ``<id>.img``),
    ``addr`` (PCI slot on the root bus, or of its root port with ``ats``;
    optional), ``size_mib`` (MiB), ``lba_size`` (bytes: 512 or 4096, logical and
    physical block size), ``iommu_platform`` (default on: DMA through the
    IOMMU), ``ats`` (PCIe ATS behind a root port; needs intel-iommu
    ``device_iotlb``), ``num_queues`` (virtqueues; 1 keeps one request queue).
    The guest sees it as ``/dev/vdX`` (X in probe order: the first virtio-blk
    device is ``/dev/vda``).

    Raises DeviceConfigError naming the field for a bad value.
    """

    kind: ClassVar[str] = "virtio-blk"
    id: str = "vblk0"
    addr: int | None = None
    size_mib: int = 64
    lba_size: int = 512
    iommu_platform: bool = True
    ats: bool = False
    num_queues: int = 1

    def __post_init__(self) -> None:
        _check_common("virtio-blk", self)
        if isinstance(self.size_mib, bool) or not isinstance(self.size_mib, int) or not 1 <= self.size_mib <= 1 << 20:
            raise DeviceConfigError(f"virtio-blk: size_mib must be 1..1048576, not {self.size_mib!r}", key="size_mib")
        if self.lba_size not in (512, 4096):
            raise DeviceConfigError(f"virtio-blk: lba_size must be 512 or 4096, not {self.lba_size!r}",
                                    key="lba_size")
        if isinstance(self.num_queues, bool) or not isinstance(self.num_queues, int) or not 1 <= self.num_queues <= 16:
            raise DeviceConfigError(f"virtio-blk: num_queues must be 1..16, not {self.num_queues!r}",
                                    key="num_queues")

    def kernel_options(self) -> tuple[str, ...]:
        return ("VIRTIO_BLK", "VIRTIO_PCI")

    def image(self, ctx: RenderContext) -> Any:
        return ctx.run_dir / f"{self.id}.img"

    def setup(self, ctx: RenderContext) -> None:
        with open(self.image(ctx), "wb") as fh:
            fh.truncate(self.size_mib << 20)

    def argv(self, ctx: RenderContext) -> list[str]:
        node = self.id
        out = ["-blockdev", f"driver=file,filename={self.image(ctx)},node-name={node}-file",
               "-blockdev", f"driver=raw,file={node}-file,node-name={node}"]
        return out + _pci_argv(self, "virtio-blk-pci", [
            f"drive={node}", f"num-queues={self.num_queues}",
            f"logical_block_size={self.lba_size}", f"physical_block_size={self.lba_size}"])


@dataclass(frozen=True)
class VirtioNet(Device):
    """``virtio-net-pci`` on a QEMU user-mode (slirp) network of its own.

    The peer that echoes: slirp answers ICMP echo requests to its own address
    (``10.0.N.2``, libslirp ``icmp_input``: ``icmp_reflect`` for the virtual
    host address) with the request's payload, inside QEMU, with no host
    privileges and ``restrict=on`` (nothing leaves for the host's network).
    That is one NIC, and every echoed packet crosses the device twice (TX and
    RX buffers, each translated through the IOMMU).  A socket netdev pair
    between two NICs would need two devices under test and a guest that does
    not route the packet locally (network namespaces); slirp needs neither.

    Fields: ``id`` (QEMU device and netdev id), ``addr`` (PCI slot, or of its
    root port with ``ats``), ``mac`` (the guest finds its interface by it),
    ``net`` (slirp's ``10.0.N.0/24``; the harness's own SSH NIC uses
    10.0.2.0/24, so the default is 10.0.3.0/24), ``iommu_platform``, ``ats``
    (as for :class:`VirtioBlk`).

    Raises DeviceConfigError naming the field for a bad value.
    """

    kind: ClassVar[str] = "virtio-net"
    id: str = "vnet0"
    addr: int | None = None
    mac: str = "52:54:00:d4:a0:01"
    net: str = "10.0.3.0/24"
    iommu_platform: bool = True
    ats: bool = False

    def __post_init__(self) -> None:
        _check_common("virtio-net", self)
        if not isinstance(self.mac, str) or not _MAC_RE.fullmatch(self.mac) or int(self.mac[:2], 16) & 1:
            raise DeviceConfigError(f"virtio-net: mac must be a unicast address like 52:54:00:d4:a0:01 "
                                    f"(lower-case hex), not {self.mac!r}", key="mac")
        m = _NET_RE.fullmatch(self.net) if isinstance(self.net, str) else None
        if m is None or not 3 <= int(m[1]) <= 254:
            raise DeviceConfigError(f"virtio-net: net must be 10.0.N.0/24 with N in 3..254 (10.0.2.0/24 is the "
                                    f"harness's SSH network), not {self.net!r}", key="net")

    @property
    def guest_addr(self) -> str:
        """The address the workload gives the guest's interface (``10.0.N.15``)."""
        return self.net.replace(".0/24", f".{VIRTIO_NET_GUEST_ADDR}")

    @property
    def peer_addr(self) -> str:
        """slirp's own address, the echoing peer (``10.0.N.2``)."""
        return self.net.replace(".0/24", f".{VIRTIO_NET_PEER_ADDR}")

    def kernel_options(self) -> tuple[str, ...]:
        return ("VIRTIO_NET", "VIRTIO_PCI", "INET")

    def argv(self, ctx: RenderContext) -> list[str]:
        netdev = ["-netdev", f"user,id={self.id}-net,net={self.net},restrict=on,ipv6=off"]
        return netdev + _pci_argv(self, "virtio-net-pci", [f"netdev={self.id}-net", f"mac={self.mac}"])


def check_machine(spec: MachineSpec) -> None:
    """What a virtio device needs from the rest of the machine: ``ats`` needs
    ``intel-iommu`` with ``device_iotlb = true`` (the guest enables ATS only
    when the vIOMMU reports device-TLB support).

    Raises:
        DeviceConfigError: ``key`` is ``devices[i].ats`` of the first device at fault.
    """
    from harness.vm.devices import IntelIommu

    iommu = spec.iommu
    for i, d in enumerate(spec.devices):
        if isinstance(d, (VirtioBlk, VirtioNet)) and d.ats:
            if not isinstance(iommu, IntelIommu) or not iommu.device_iotlb:
                where = (f"the machine's intel-iommu has device_iotlb = false"
                         if isinstance(iommu, IntelIommu) else
                         f"the machine's IOMMU is {iommu.kind}" if iommu is not None else "the machine has no IOMMU")
                raise DeviceConfigError(f"devices[{i}].ats = true ({d.kind} {d.id}) needs intel-iommu with "
                                        f"device_iotlb = true, but {where}", key=f"devices[{i}].ats")


@dataclass(frozen=True)
class DmaDevice:
    """A PCI device of a machine that does DMA, where the guest will find it.

    ``sid``: PCI source id; ``kind`` and ``id``: the device's; ``index``: its
    position in the machine's devices."""

    sid: int
    kind: str
    id: str
    index: int

    @property
    def bdf(self) -> str:
        return bdf_text(self.sid)

    @property
    def label(self) -> str:
        """``virtio-blk vblk0 (01:00.0)``."""
        return f"{self.kind} {self.id} ({self.bdf})"


_DMA_KINDS = frozenset({"nvme", "virtio-blk", "virtio-net"})
"""Device kinds whose own DMA goes through the machine's IOMMU (the vIOMMU's own
PCI function, e.g. virtio-iommu-pci, is not one)."""


def expected_dma_devices(devices: Any) -> list[DmaDevice]:
    """Predict the source id of every DMA device of ``devices`` (a machine's
    device objects, or its ``to_table()`` dicts), in QEMU's argv order (IOMMU
    kinds first, as :meth:`MachineSpec.machine_argv` renders them).

    Rules (QEMU 7.2 ``do_pci_register_device``: a device without ``addr`` takes
    the lowest free slot of the root bus, the q35 host bridge holding slot 0;
    SeaBIOS numbers the secondary buses of bridges 1, 2, ... in slot order): a
    device with ``addr`` takes that slot; every device with an ``addr`` field
    (set or not) is a PCI function of the root bus; a virtio device with
    ``ats`` takes the slot with its root port and sits at ``bus:00.0``.
    Returns only the devices of kinds that DMA through the IOMMU.
    """
    rows: list[tuple[int, str, str, dict[str, Any]]] = []
    for index, d in enumerate(devices):
        table = d if isinstance(d, dict) else d.to_table()
        rows.append((index, str(table.get("kind", "")), str(table.get("id", "") or table.get("kind", "")), table))
    iommu_kinds = {"intel-iommu", "virtio-iommu"}
    ordered = sorted(rows, key=lambda r: r[1] not in iommu_kinds)
    taken = {0} | {int(r[3]["addr"]) for r in ordered if isinstance(r[3].get("addr"), int)}
    slots: dict[int, int] = {}
    for index, _kind, _id, table in ordered:
        if "addr" not in table:
            continue
        addr = table.get("addr")
        if isinstance(addr, int):
            slots[index] = addr
            continue
        slot = next(s for s in range(1, 32) if s not in taken) if len(taken) < 32 else -1
        taken.add(slot)
        slots[index] = slot
    bridges = sorted((slot, index) for index, slot in slots.items() if rows[index][3].get("ats"))
    bus_of = {index: bus for bus, (_slot, index) in enumerate(bridges, 1)}
    out: list[DmaDevice] = []
    for index, kind, dev_id, _table in rows:
        if kind not in _DMA_KINDS or index not in slots or slots[index] < 0:
            continue
        sid = bus_of[index] << 8 if index in bus_of else slots[index] << 3
        out.append(DmaDevice(sid, kind, dev_id, index))
    return out
