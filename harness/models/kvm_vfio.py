"""Reference model of the KVM-VFIO device (Linux 6.12 ``virt/kvm/vfio.c``, with
``virt/kvm/kvm_main.c`` for device creation and the attribute ioctls).

A VM (``KVM_CREATE_VM``) may have one KVM-VFIO device (``KVM_CREATE_DEVICE``
type ``KVM_DEV_TYPE_VFIO`` = 4).  The device keeps a list of VFIO files (group
files and device cdev files), each held with a file reference until it is
deleted or the device is closed.  The files are those of a
:class:`~harness.models.vfio_cdev.VfioCdevModel`, so file identity is the
kernel's: a dup'd fd names the same ``struct file``, two ``open()`` calls make
two.  Because KVM holds the file, closing the user's last fd does not release
it: a group stays open (a reopen is EBUSY, and a cdev BIND of its device EBUSY),
a bound cdev stays bound (the group stays busy, a second file's BIND is EINVAL)
until KVM lets go.

Rules (errno, first match wins):

* ``KVM_CREATE_DEVICE`` (``kvm_ioctl_create_device``): a type KVM has no ops for:
  ENODEV; the TEST flag: 0 and nothing is created; a second KVM-VFIO device in
  one VM (``kvm_vfio_create``): EBUSY.  Closing the device fd releases it
  (``kvm_device_release`` -> ``kvm_vfio_release``: every listed file is put) and
  the VM may have a new one.
* ``KVM_SET_DEVICE_ATTR`` (``kvm_vfio_set_attr``, ``kvm_vfio_set_file``): group
  other than ``KVM_DEV_VFIO_FILE`` (1), or attr other than ADD (1) / DEL (2):
  ENXIO; the s32 fd at ``addr`` unreadable: EFAULT.  ADD
  (``kvm_vfio_file_add``): fd not open EBADF; not a VFIO file
  (``vfio_file_is_valid``: group or cdev, bound or not) EINVAL; the same
  ``struct file`` listed already EEXIST.  DEL (``kvm_vfio_file_del``): fd not
  open EBADF; its file not listed ENOENT (any file, VFIO or not).
* ``KVM_HAS_DEVICE_ATTR`` (``kvm_vfio_has_attr``): 0 for (1, ADD) and (1, DEL),
  else ENXIO.  ``KVM_GET_DEVICE_ATTR``: the device has no ``get_attr``: EPERM
  (``kvm_device_ioctl_attr``).

Not modelled: the kvm reference a bound device takes (``vfio_device_get_kvm_safe``:
invisible to userspace), coherency tracking, SPAPR TCE.

Exception hierarchy::

    OSError
     +-- KvmVfioError     the kernel's errno for one call (fields: errno, op, reason)
    ValueError            a call the model cannot judge (misuse)
"""

from __future__ import annotations

import errno as E
from dataclasses import dataclass, field
from typing import Final

from harness.models.vfio_cdev import FileKind, OpenFile, VfioCdevModel

__all__ = [
    "KVM_DEV_TYPE_VFIO",
    "KVM_DEV_VFIO_FILE",
    "KVM_DEV_VFIO_FILE_ADD",
    "KVM_DEV_VFIO_FILE_DEL",
    "HOLD_KVM",
    "KvmVfioError",
    "KvmVm",
    "KvmVfioDevice",
    "KvmVfioModel",
]

KVM_DEV_TYPE_VFIO: Final = 4
KVM_DEV_VFIO_FILE: Final = 1
KVM_DEV_VFIO_FILE_ADD: Final = 1
KVM_DEV_VFIO_FILE_DEL: Final = 2
HOLD_KVM: Final = "kvm-vfio"
"""Holder name of the reference the KVM-VFIO device keeps on each listed file."""
HOLD_VM: Final = "kvm-device"
"""Holder name of the VM reference each KVM device keeps (``kvm_get_kvm``)."""


class KvmVfioError(OSError):
    """The kernel refuses a KVM call: ``errno`` is what userspace sees.
    Fields: ``errno``, ``op``, ``reason`` (the rule, with the kernel function)."""

    def __init__(self, errno: int, op: str, reason: str) -> None:
        super().__init__(errno, f"{op}: {E.errorcode.get(errno, errno)}: {reason}")
        self.op = op
        self.reason = reason


@dataclass(eq=False)
class KvmVm:
    """A VM: its file and its KVM-VFIO device, if any (``kvm->devices``)."""

    file: OpenFile
    vfio_device: KvmVfioDevice | None = None


@dataclass(eq=False)
class KvmVfioDevice:
    """The KVM-VFIO device (``struct kvm_vfio``): ``file_list`` in ADD order."""

    file: OpenFile
    vm: KvmVm
    file_list: list[OpenFile] = field(default_factory=list)


class KvmVfioModel:
    """KVM VMs and their KVM-VFIO devices, over the files of ``vfio``.

    ``registered_types``: device types KVM has ops for (x86: only VFIO).
    Calls raise :class:`KvmVfioError` with the kernel's errno."""

    def __init__(self, vfio: VfioCdevModel, registered_types: frozenset[int] = frozenset({KVM_DEV_TYPE_VFIO})) -> None:
        self.vfio = vfio
        self.registered_types = registered_types

    def _get(self, fd: int, op: str, kind: FileKind) -> OpenFile:
        file = self.vfio.files.lookup(fd)
        if file is None:
            raise KvmVfioError(E.EBADF, op, f"fd {fd} is not open")
        if file.kind is not kind:
            raise ValueError(f"{op} on {file}: not a {kind.value} file (not modelled)")
        return file

    def create_vm(self, fd: int | None = None) -> int:
        """KVM_CREATE_VM: the VM fd."""
        file = OpenFile(FileKind.KVM_VM, "kvm-vm")
        file.payload = KvmVm(file)
        return self.vfio.files.install(file, fd)

    def create_device(self, vm_fd: int, type: int = KVM_DEV_TYPE_VFIO, test: bool = False,
                      fd: int | None = None) -> int | None:
        """KVM_CREATE_DEVICE (``kvm_ioctl_create_device``, ``kvm_vfio_create``): the
        device fd, or None for a ``test`` call. EBADF, ENODEV, EBUSY (see module)."""
        vm = self._get(vm_fd, "create_device", FileKind.KVM_VM).payload
        assert isinstance(vm, KvmVm)
        if type not in self.registered_types:
            raise KvmVfioError(E.ENODEV, "create_device", f"no device ops for type {type}")
        if test:
            return None
        if type != KVM_DEV_TYPE_VFIO:
            raise ValueError(f"device type {type} is not modelled")
        if vm.vfio_device is not None:
            raise KvmVfioError(E.EBUSY, "create_device", "the VM has a KVM-VFIO device already (kvm_vfio_create)")
        file = OpenFile(FileKind.KVM_DEVICE, "kvm-vfio", None, self._release_device)
        dev = KvmVfioDevice(file, vm)
        file.payload = dev
        vm.vfio_device = dev
        self.vfio.files.hold(vm.file, HOLD_VM)
        return self.vfio.files.install(file, fd)

    def _device(self, dev_fd: int, op: str) -> KvmVfioDevice:
        dev = self._get(dev_fd, op, FileKind.KVM_DEVICE).payload
        assert isinstance(dev, KvmVfioDevice)
        return dev

    def set_attr(self, dev_fd: int, group: int, attr: int, fd: int | None) -> None:
        """KVM_SET_DEVICE_ATTR with ``addr`` -> s32 ``fd`` (None: an unreadable
        addr). See the module for the errnos."""
        dev = self._device(dev_fd, "set_attr")
        if group != KVM_DEV_VFIO_FILE or attr not in (KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL):
            raise KvmVfioError(E.ENXIO, "set_attr", f"no attribute ({group}, {attr}) (kvm_vfio_set_attr)")
        if fd is None:
            raise KvmVfioError(E.EFAULT, "set_attr", "get_user of the fd failed")
        if attr == KVM_DEV_VFIO_FILE_ADD:
            self.file_add(dev, fd)
        else:
            self.file_del(dev, fd)

    def file_add(self, dev: KvmVfioDevice, fd: int) -> None:
        """``kvm_vfio_file_add``: EBADF, EINVAL (not VFIO), EEXIST (same file)."""
        file = self.vfio.files.lookup(fd)
        if file is None:
            raise KvmVfioError(E.EBADF, "file_add", f"fd {fd} is not open")
        if file.kind not in (FileKind.VFIO_CDEV, FileKind.VFIO_GROUP):
            raise KvmVfioError(E.EINVAL, "file_add", f"{file} is not a VFIO file (vfio_file_is_valid)")
        if any(f is file for f in dev.file_list):
            raise KvmVfioError(E.EEXIST, "file_add", f"{file} is listed already")
        dev.file_list.append(file)
        self.vfio.files.hold(file, HOLD_KVM)

    def file_del(self, dev: KvmVfioDevice, fd: int) -> None:
        """``kvm_vfio_file_del``: EBADF, ENOENT (the file is not listed)."""
        file = self.vfio.files.lookup(fd)
        if file is None:
            raise KvmVfioError(E.EBADF, "file_del", f"fd {fd} is not open")
        for i, listed in enumerate(dev.file_list):
            if listed is file:
                del dev.file_list[i]
                self.vfio.files.put(file, HOLD_KVM)
                return
        raise KvmVfioError(E.ENOENT, "file_del", f"{file} is not listed")

    def has_attr(self, dev_fd: int, group: int, attr: int) -> None:
        """KVM_HAS_DEVICE_ATTR (``kvm_vfio_has_attr``): ENXIO unless (1, ADD|DEL)."""
        self._device(dev_fd, "has_attr")
        if group != KVM_DEV_VFIO_FILE or attr not in (KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL):
            raise KvmVfioError(E.ENXIO, "has_attr", f"no attribute ({group}, {attr})")

    def get_attr(self, dev_fd: int, group: int, attr: int) -> None:
        """KVM_GET_DEVICE_ATTR: always EPERM (no ``get_attr`` op, ``kvm_device_ioctl_attr``)."""
        self._device(dev_fd, "get_attr")
        raise KvmVfioError(E.EPERM, "get_attr", "the KVM-VFIO device has no get_attr")

    def file_list(self, dev_fd: int) -> tuple[OpenFile, ...]:
        """The files listed by the device behind ``dev_fd``, in ADD order."""
        return tuple(self._device(dev_fd, "file_list").file_list)

    def _release_device(self, file: OpenFile) -> None:
        """``kvm_device_release`` -> ``kvm_vfio_release``: put every listed file,
        leave the VM (which may then create a new KVM-VFIO device)."""
        dev = file.payload
        assert isinstance(dev, KvmVfioDevice)
        dev.vm.vfio_device = None
        listed, dev.file_list = dev.file_list, []
        for f in listed:
            self.vfio.files.put(f, HOLD_KVM)
        self.vfio.files.put(dev.vm.file, HOLD_VM)
