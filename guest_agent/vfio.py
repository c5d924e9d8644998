"""VFIO device cdev ops: hand a PCI function to vfio-pci, open its device cdev
(/dev/vfio/devices/vfioN) or its group (/dev/vfio/N), bind the cdev to an iommufd
context, attach it to an IOAS or HWPT, and reach its regions (config space, BARs)
with pread/pwrite.

Layouts and numbers (include/uapi/linux/vfio.h, VFIO_TYPE ';' = 0x3b, base 100):

- ``VFIO_DEVICE_BIND_IOMMUFD`` 0x3b76, ``struct vfio_device_bind_iommufd`` 16 B:
  u32 argsz, u32 flags, s32 iommufd, u32 out_devid;
- ``VFIO_DEVICE_ATTACH_IOMMUFD_PT`` 0x3b77, 12 B: argsz, flags, pt_id (in: an IOAS
  or HWPT id; out: the HWPT id the device is attached to);
- ``VFIO_DEVICE_DETACH_IOMMUFD_PT`` 0x3b78, 8 B: argsz, flags;
- ``VFIO_DEVICE_GET_INFO`` 0x3b6b, 24 B: argsz, flags, num_regions, num_irqs,
  cap_offset, pad;
- ``VFIO_DEVICE_GET_REGION_INFO`` 0x3b6c, 32 B: argsz, flags, index, cap_offset,
  u64 size@16 (bytes), u64 offset@24 (the file offset of the region for
  pread/pwrite/mmap); vfio-pci: BAR0..5 = index 0..5, config space = index 7;
- ``VFIO_DEVICE_RESET`` 0x3b6f.

Every op returns :func:`guest_agent.kabi.record` (``errno`` 0 or the kernel's) and
never raises for a kernel errno; file descriptors stay in :data:`kabi.FDS`.
"""

from __future__ import annotations

import ctypes
import errno as E
import glob
import os
import stat
import time
from typing import Any

from guest_agent import kabi
from guest_agent.protocol import op

VFIO_TYPE = 0x3B
VFIO_BASE = 100
VFIO_DEVICE_GET_INFO = kabi.IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = kabi.IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_RESET = kabi.IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_DEVICE_BIND_IOMMUFD = kabi.IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = kabi.IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = kabi.IO(VFIO_TYPE, VFIO_BASE + 20)
VFIO_GROUP_GET_STATUS = kabi.IO(VFIO_TYPE, VFIO_BASE + 3)

VFIO_PCI_CONFIG_REGION_INDEX = 7

SYS_PCI = "/sys/bus/pci"


class BindIommufd(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("iommufd", ctypes.c_int32), ("out_devid", ctypes.c_uint32)]


class AttachPt(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pt_id", ctypes.c_uint32)]


class DetachPt(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class DeviceInfo(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("num_regions", ctypes.c_uint32), ("num_irqs", ctypes.c_uint32),
                ("cap_offset", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class RegionInfo(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("cap_offset", ctypes.c_uint32),
                ("size", ctypes.c_uint64), ("offset", ctypes.c_uint64)]


class GroupStatus(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _driver_of(bdf: str) -> str | None:
    link = f"{SYS_PCI}/devices/{bdf}/driver"
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def _ensure_chardev(node: str, sysfs_dev: str) -> bool:
    """Make ``node`` a character device with the numbers in ``sysfs_dev``
    ("major:minor") unless devtmpfs already did; True if this created it."""
    major, minor = (int(x) for x in _read(sysfs_dev).split(":"))
    want = os.makedev(major, minor)
    try:
        st = os.stat(node)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == want:
            return False
        os.unlink(node)
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(node), exist_ok=True)
    os.mknod(node, stat.S_IFCHR | 0o600, want)
    return True


_SERIALS: dict[str, str] = {}
"""NVMe serial -> BDF, remembered while the kernel's nvme driver still showed them
(once a controller is bound to vfio-pci its serial is no longer in sysfs)."""


def _scan_nvme_serials() -> None:
    for path in glob.glob(f"{SYS_PCI}/devices/*/nvme/nvme*/serial"):
        bdf = path.split("/")[5]
        try:
            _SERIALS[_read(path)] = bdf
        except OSError:
            continue


@op("vfio.find_nvme")
def find_nvme(serial: str) -> dict[str, Any]:
    """The PCI address (BDF) of the NVMe controller whose serial is ``serial`` (from
    /sys/bus/pci/devices/BDF/nvme/nvmeN/serial, or remembered from an earlier look
    if it has since been handed to vfio-pci). ENODEV if there is none."""
    _scan_nvme_serials()
    bdf = _SERIALS.get(serial)
    return kabi.record(0 if bdf else E.ENODEV, bdf=bdf, serial=serial)


@op("vfio.driver_override")
def driver_override(bdf: str, driver: str = "vfio-pci", timeout: float = 10.0) -> dict[str, Any]:
    """Bind PCI function ``bdf`` to ``driver``: write driver_override, unbind it from
    its current driver, write the BDF to drivers_probe.

    With vfio-pci, waits for /sys/bus/pci/devices/BDF/vfio-dev/vfioN and makes sure
    /dev/vfio/devices/vfioN and the group's /dev/vfio/N exist (mknod from the sysfs
    dev numbers if devtmpfs has not made them). Record: ``bdf``,
    ``previous_driver`` (None if unbound), ``driver``, ``cdev`` (path or None),
    ``group`` (IOMMU group number or None), ``mknod`` (nodes this created); errno
    of a failed sysfs write, or ETIMEDOUT if the cdev never appears."""
    dev = f"{SYS_PCI}/devices/{bdf}"
    fields: dict[str, Any] = {"bdf": bdf, "previous_driver": None, "driver": driver,
                              "cdev": None, "group": None, "mknod": []}
    try:
        _scan_nvme_serials()
        previous = _driver_of(bdf)
        fields["previous_driver"] = previous
        _write(f"{dev}/driver_override", driver)
        if previous is not None and previous != driver:
            _write(f"{dev}/driver/unbind", bdf)
        if _driver_of(bdf) != driver:
            _write(f"{SYS_PCI}/drivers_probe", bdf)
        if os.path.islink(f"{dev}/iommu_group"):
            fields["group"] = int(os.path.basename(os.readlink(f"{dev}/iommu_group")))
        if driver != "vfio-pci":
            return kabi.record(0, **fields)
        deadline = time.monotonic() + timeout
        names: list[str] = []
        while not names:
            names = sorted(os.listdir(f"{dev}/vfio-dev")) if os.path.isdir(f"{dev}/vfio-dev") else []
            if not names:
                if time.monotonic() > deadline:
                    return kabi.record(E.ETIMEDOUT, **fields)
                time.sleep(0.01)
        cdev = f"/dev/vfio/devices/{names[0]}"
        if _ensure_chardev(cdev, f"{dev}/vfio-dev/{names[0]}/dev"):
            fields["mknod"].append(cdev)
        fields["cdev"] = cdev
        group = fields["group"]
        if group is not None and os.path.exists(f"/sys/class/vfio/{group}/dev"):
            if _ensure_chardev(f"/dev/vfio/{group}", f"/sys/class/vfio/{group}/dev"):
                fields["mknod"].append(f"/dev/vfio/{group}")
    except OSError as exc:
        return kabi.record(exc.errno or E.EIO, **fields)
    return kabi.record(0, **fields)


@op("vfio.open_cdev")
def open_cdev(path: str) -> dict[str, Any]:
    """open(2) a VFIO device cdev (O_RDWR): ``{fd}`` (-1 and the errno on failure).
    The open itself never checks binding (device_cdev.c
    ``vfio_device_fops_cdev_open``): every later ioctl but BIND gives EINVAL until
    the file is bound."""
    return kabi.open_fd(path, what=f"vfio cdev {path}")


@op("vfio.open_group")
def open_group(group: int) -> dict[str, Any]:
    """open(2) /dev/vfio/``group``: ``{fd}``, or -1 and the errno: EBUSY while the
    group is open elsewhere or a device cdev of it is bound (group.c
    ``vfio_group_fops_open``)."""
    return kabi.open_fd(f"/dev/vfio/{group}", what=f"vfio group {group}")


@op("vfio.group_status")
def group_status(fd: int) -> dict[str, Any]:
    """VFIO_GROUP_GET_STATUS: ``{flags}`` (VIABLE=1, CONTAINER_SET=2)."""
    st = GroupStatus(argsz=ctypes.sizeof(GroupStatus))
    err = kabi.ioctl(fd, VFIO_GROUP_GET_STATUS, st)
    return kabi.record(err, flags=st.flags)


@op("vfio.bind_iommufd")
def bind_iommufd(fd: int, iommufd: int, flags: int = 0, argsz: int | None = None) -> dict[str, Any]:
    """VFIO_DEVICE_BIND_IOMMUFD: ``{devid}`` (the iommufd object id of the device).
    ``argsz`` defaults to the struct's 16 bytes."""
    arg = BindIommufd(argsz=ctypes.sizeof(BindIommufd) if argsz is None else argsz,
                      flags=flags, iommufd=iommufd)
    err = kabi.ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, arg)
    return kabi.record(err, devid=arg.out_devid if not err else None)


@op("vfio.attach_pt")
def attach_pt(fd: int, pt_id: int, flags: int = 0, argsz: int | None = None) -> dict[str, Any]:
    """VFIO_DEVICE_ATTACH_IOMMUFD_PT to an IOAS or HWPT id: ``{pt_id}``, the HWPT
    the device is now attached to (an IOAS id in gives an automatic HWPT's id)."""
    arg = AttachPt(argsz=ctypes.sizeof(AttachPt) if argsz is None else argsz, flags=flags, pt_id=pt_id)
    err = kabi.ioctl(fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg)
    return kabi.record(err, pt_id=arg.pt_id if not err else None)


@op("vfio.detach_pt")
def detach_pt(fd: int, flags: int = 0, argsz: int | None = None) -> dict[str, Any]:
    """VFIO_DEVICE_DETACH_IOMMUFD_PT (0 even when nothing is attached)."""
    arg = DetachPt(argsz=ctypes.sizeof(DetachPt) if argsz is None else argsz, flags=flags)
    return kabi.record(kabi.ioctl(fd, VFIO_DEVICE_DETACH_IOMMUFD_PT, arg))


@op("vfio.get_info")
def get_info(fd: int) -> dict[str, Any]:
    """VFIO_DEVICE_GET_INFO: ``{flags, num_regions, num_irqs}``."""
    info = DeviceInfo(argsz=ctypes.sizeof(DeviceInfo))
    err = kabi.ioctl(fd, VFIO_DEVICE_GET_INFO, info)
    return kabi.record(err, flags=info.flags, num_regions=info.num_regions, num_irqs=info.num_irqs)


def _region(fd: int, index: int) -> tuple[int, RegionInfo]:
    info = RegionInfo(argsz=ctypes.sizeof(RegionInfo), index=index)
    return kabi.ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, info), info


@op("vfio.region_info")
def region_info(fd: int, index: int) -> dict[str, Any]:
    """VFIO_DEVICE_GET_REGION_INFO: ``{size, offset, flags}`` in bytes; ``offset`` is
    the file offset of the region (vfio-pci: index << 40)."""
    err, info = _region(fd, index)
    return kabi.record(err, index=index, size=info.size, offset=info.offset, flags=info.flags)


def _pread(fd: int, index: int, offset: int, size: int) -> dict[str, Any]:
    if size not in (1, 2, 4, 8):
        return kabi.record(E.EINVAL, value=None)
    err, info = _region(fd, index)
    if err:
        return kabi.record(err, value=None)
    try:
        data = os.pread(fd, size, info.offset + offset)
    except OSError as exc:
        return kabi.record(exc.errno or E.EIO, value=None)
    if len(data) != size:
        return kabi.record(E.EIO, value=None, count=len(data))
    return kabi.record(0, value=int.from_bytes(data, "little"))


def _pwrite(fd: int, index: int, offset: int, size: int, value: int) -> dict[str, Any]:
    if size not in (1, 2, 4, 8):
        return kabi.record(E.EINVAL)
    err, info = _region(fd, index)
    if err:
        return kabi.record(err)
    try:
        n = os.pwrite(fd, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), info.offset + offset)
    except OSError as exc:
        return kabi.record(exc.errno or E.EIO)
    return kabi.record(0 if n == size else E.EIO, count=n)


@op("vfio.config_read")
def config_read(fd: int, offset: int, size: int = 4) -> dict[str, Any]:
    """Read ``size`` (1, 2, 4) bytes of PCI config space at byte ``offset``
    (pread at the config region's offset): ``{value}`` (little-endian)."""
    return _pread(fd, VFIO_PCI_CONFIG_REGION_INDEX, offset, size)


@op("vfio.config_write")
def config_write(fd: int, offset: int, size: int, value: int) -> dict[str, Any]:
    """Write ``size`` bytes of ``value`` to PCI config space at byte ``offset``."""
    return _pwrite(fd, VFIO_PCI_CONFIG_REGION_INDEX, offset, size, value)


@op("vfio.bar_read")
def bar_read(fd: int, index: int, offset: int, size: int = 4) -> dict[str, Any]:
    """Read ``size`` (4 or 8) bytes at byte ``offset`` of BAR ``index`` through
    pread: ``{value}``."""
    return _pread(fd, index, offset, size)


@op("vfio.bar_write")
def bar_write(fd: int, index: int, offset: int, size: int, value: int) -> dict[str, Any]:
    """Write ``size`` (4 or 8) bytes of ``value`` at byte ``offset`` of BAR ``index``."""
    return _pwrite(fd, index, offset, size, value)


@op("vfio.device_reset")
def device_reset(fd: int) -> dict[str, Any]:
    """VFIO_DEVICE_RESET (a function-level or bus reset, whatever the device offers)."""
    return kabi.record(kabi.ioctl(fd, VFIO_DEVICE_RESET))


@op("vfio.devices")
def devices() -> dict[str, Any]:
    """Every PCI function: ``{bdf: {class, vendor, device, driver, group}}``."""
    out: dict[str, Any] = {}
    for dev in sorted(glob.glob(f"{SYS_PCI}/devices/*")):
        bdf = os.path.basename(dev)
        group = None
        if os.path.islink(f"{dev}/iommu_group"):
            group = int(os.path.basename(os.readlink(f"{dev}/iommu_group")))
        out[bdf] = {"class": int(_read(f"{dev}/class"), 16), "vendor": int(_read(f"{dev}/vendor"), 16),
                    "device": int(_read(f"{dev}/device"), 16), "driver": _driver_of(bdf), "group": group}
    return kabi.record(0, devices=out)
