"""KVM ops that need no vCPU: create a VM, create a KVM device in it (the KVM-VFIO
device, type 4), and set/has/get its attributes.

Layouts and numbers (include/uapi/linux/kvm.h, KVMIO = 0xAE):

- ``KVM_GET_API_VERSION`` 0xae00, ``KVM_CREATE_VM`` 0xae01 (arg: machine type 0);
- ``KVM_CREATE_DEVICE`` 0xc00caee0, ``struct kvm_create_device`` 12 B: u32 type,
  u32 fd (out), u32 flags (``KVM_CREATE_DEVICE_TEST`` = 1: only ask whether the
  type exists, create nothing);
- ``KVM_SET_DEVICE_ATTR`` 0x4018aee1, ``KVM_GET_DEVICE_ATTR`` 0x4018aee2,
  ``KVM_HAS_DEVICE_ATTR`` 0x4018aee3, ``struct kvm_device_attr`` 24 B: u32 flags,
  u32 group, u64 attr, u64 addr (a user address: for the VFIO device's
  ``KVM_DEV_VFIO_FILE`` = 1 group, ADD = 1 / DEL = 2, it points at an s32 fd).

Every op returns :func:`guest_agent.kabi.record` and never raises for a kernel
errno; the VM and device fds stay in :data:`kabi.FDS` until ``fd.close``.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from guest_agent import kabi
from guest_agent.protocol import op

KVMIO = 0xAE
KVM_GET_API_VERSION = kabi.IO(KVMIO, 0x00)
KVM_CREATE_VM = kabi.IO(KVMIO, 0x01)


class CreateDevice(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class DeviceAttr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("group", ctypes.c_uint32),
                ("attr", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


KVM_CREATE_DEVICE = kabi.IOWR(KVMIO, 0xE0, ctypes.sizeof(CreateDevice))
KVM_SET_DEVICE_ATTR = kabi.IOW(KVMIO, 0xE1, ctypes.sizeof(DeviceAttr))
KVM_GET_DEVICE_ATTR = kabi.IOW(KVMIO, 0xE2, ctypes.sizeof(DeviceAttr))
KVM_HAS_DEVICE_ATTR = kabi.IOW(KVMIO, 0xE3, ctypes.sizeof(DeviceAttr))
KVM_CREATE_DEVICE_TEST = 1
KVM_DEV_TYPE_VFIO = 4
KVM_DEV_VFIO_FILE = 1
KVM_DEV_VFIO_FILE_ADD = 1
KVM_DEV_VFIO_FILE_DEL = 2


@op("kvm.create_vm")
def create_vm(machine_type: int = 0) -> dict[str, Any]:
    """Open /dev/kvm, KVM_CREATE_VM: ``{fd, api_version}`` (the VM fd is kept; the
    /dev/kvm fd is closed again). fd -1 and the errno on failure."""
    try:
        sys_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return kabi.record(exc.errno or 0, fd=-1, api_version=None)
    try:
        api, _ = kabi.ioctl_rc(sys_fd, KVM_GET_API_VERSION)
        fd, err = kabi.ioctl_rc(sys_fd, KVM_CREATE_VM, machine_type)
    finally:
        os.close(sys_fd)
    if err:
        return kabi.record(err, fd=-1, api_version=api)
    kabi.keep(fd, "kvm vm")
    return kabi.record(0, fd=fd, api_version=api)


@op("kvm.create_device")
def create_device(vm_fd: int, type: int = KVM_DEV_TYPE_VFIO, test: bool = False) -> dict[str, Any]:
    """KVM_CREATE_DEVICE of ``type`` (4 = KVM-VFIO) on a VM fd: ``{fd}`` (-1 for a
    ``test`` call, which creates nothing, or on failure; EBUSY for a second VFIO
    device in one VM, ENODEV for an unknown type)."""
    cd = CreateDevice(type=type, fd=0, flags=KVM_CREATE_DEVICE_TEST if test else 0)
    err = kabi.ioctl(vm_fd, KVM_CREATE_DEVICE, cd)
    if err or test:
        return kabi.record(err, fd=-1)
    kabi.keep(cd.fd, f"kvm device type {type}")
    return kabi.record(0, fd=cd.fd)


def _attr(dev_fd: int, request: int, group: int, attr: int, addr: int, flags: int) -> int:
    arg = DeviceAttr(flags=flags, group=group, attr=attr, addr=addr)
    return kabi.ioctl(dev_fd, request, arg)


@op("kvm.set_device_attr")
def set_device_attr(dev_fd: int, group: int = KVM_DEV_VFIO_FILE, attr: int = KVM_DEV_VFIO_FILE_ADD,
                    fd: int | None = None, flags: int = 0) -> dict[str, Any]:
    """KVM_SET_DEVICE_ATTR with ``addr`` pointing at an s32 holding ``fd`` (None:
    addr 0, which the kernel answers with EFAULT where it reads it). ``{}``."""
    value = ctypes.c_int32(fd if fd is not None else -1)
    addr = ctypes.addressof(value) if fd is not None else 0
    return kabi.record(_attr(dev_fd, KVM_SET_DEVICE_ATTR, group, attr, addr, flags))


@op("kvm.has_device_attr")
def has_device_attr(dev_fd: int, group: int = KVM_DEV_VFIO_FILE, attr: int = KVM_DEV_VFIO_FILE_ADD,
                    flags: int = 0) -> dict[str, Any]:
    """KVM_HAS_DEVICE_ATTR: errno 0 if the device has (group, attr), else ENXIO."""
    return kabi.record(_attr(dev_fd, KVM_HAS_DEVICE_ATTR, group, attr, 0, flags))


@op("kvm.get_device_attr")
def get_device_attr(dev_fd: int, group: int = KVM_DEV_VFIO_FILE, attr: int = KVM_DEV_VFIO_FILE_ADD,
                    flags: int = 0) -> dict[str, Any]:
    """KVM_GET_DEVICE_ATTR into a u64: ``{value}`` (the KVM-VFIO device has no getter:
    EPERM)."""
    value = ctypes.c_uint64(0)
    err = _attr(dev_fd, KVM_GET_DEVICE_ATTR, group, attr, ctypes.addressof(value), flags)
    return kabi.record(err, value=value.value if not err else None)
