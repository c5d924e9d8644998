"""Reference model of VFIO device cdev files, their VFIO groups and the iommufd
contexts they bind to (Linux 6.12).

What it models, and where the kernel says so:

* **Files and descriptors** (``fs/file.c``): a :class:`FileTable` is one process's
  fd table.  Every ``open()`` makes a new :class:`OpenFile` (a ``struct file``);
  ``dup()`` makes a second fd on the *same* file; a file is released (its
  ``release`` op runs) when the last fd is closed and no kernel holder (KVM's
  file list, a bound device's iommufd reference) is left.  A closed or never
  opened fd gives ``EBADF`` (``fget`` fails).

* **The device cdev** (``drivers/vfio/device_cdev.c``, ``vfio_main.c``):
  ``vfio_device_fops_cdev_open`` always succeeds and the new file may do nothing
  but ``VFIO_DEVICE_BIND_IOMMUFD``: every other ioctl, read, write and mmap gives
  ``EINVAL`` until the file is bound (``access_granted``,
  ``vfio_device_fops_unl_ioctl``).  ``vfio_df_ioctl_bind_iommufd`` checks, in
  this order: ``argsz < 16``, ``flags != 0`` or ``iommufd < 0``: EINVAL; the group
  is open (``vfio_device_block_group``): EBUSY; this file is bound already:
  EINVAL; ``iommufd`` is not an open fd: EBADF, or not an iommufd file
  (``iommufd_ctx_from_fd``): EBADFD; another file of the device is bound
  (``vfio_df_open``: the cdev path allows one opener): EINVAL; MSI of the group
  not isolated and ``iommufd.allow_unsafe_interrupts`` off
  (``iommufd_device_bind``): EPERM.  Success allocates the device object in the
  context (``devid``), holds a reference on the iommufd file, and blocks the
  group.  Closing the last reference to the file unbinds
  (``vfio_df_unbind_iommufd``): it detaches, frees the devid, drops the iommufd
  reference and unblocks the group.

* **Attach and detach** (``vfio_df_ioctl_attach_pt``, ``vfio_df_ioctl_detach_pt``;
  ``drivers/vfio/iommufd.c`` ``vfio_iommufd_physical_attach_ioas``;
  ``drivers/iommu/iommufd/device.c`` ``iommufd_device_change_pt``,
  ``iommufd_device_auto_get_domain``, ``iommufd_device_do_replace``): ``argsz <
  12`` or ``flags``: EINVAL; ``pt_id`` not an object of the context: ENOENT; an
  object that is neither an IOAS nor a HWPT: EINVAL.  An IOAS id attaches to the
  IOAS's first automatic HWPT, or to a new one (the lowest free id); the HWPT id
  is returned.  Attaching while attached *replaces*: same HWPT, nothing happens;
  otherwise the old HWPT loses the device and, if it was automatic and has no
  device left, is destroyed (its id becomes free again).  Detach returns 0 even
  when nothing is attached.

* **The group** (``drivers/vfio/group.c`` ``vfio_group_fops_open``): a second open
  of the group, or an open while a cdev of one of its devices is bound
  (``cdev_device_open_cnt``): EBUSY.  The group stays open until its file is
  released (so while KVM holds it, see :mod:`harness.models.kvm_vfio`).

* **The iommufd context**, only as far as VFIO needs it
  (``drivers/iommu/iommufd/main.c``): object ids are the lowest free id >= 1,
  shared by every object type (``xa_alloc`` with ``XA_FLAGS_ALLOC1``);
  ``IOMMU_DESTROY`` of an unknown id: ENOENT; of an object in use (a device, an
  IOAS with a HWPT, a HWPT with a device): EBUSY.

Not modelled: the group path's device fds (``VFIO_GROUP_GET_DEVICE_FD``), noiommu,
PASID attach, HWPT_ALLOC'd (manual) HWPTs, reserved-region conflicts (EADDRINUSE),
groups of several devices, what the IOAS maps.

A VFIO device ioctl on a file that is not a VFIO device cdev (a group, an
iommufd, a KVM fd) is predicted to give ENOTTY (their ``unlocked_ioctl`` know no
such command); on a file of kind ``OTHER`` the model refuses (``ValueError``).

Exception hierarchy::

    OSError
     +-- VfioError        the kernel's errno for one call (fields: errno, op, reason)
    ValueError            a call the model cannot judge (misuse, unknown name)
"""

from __future__ import annotations

import enum
import errno as E
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "BIND_ARGSZ",
    "ATTACH_ARGSZ",
    "DETACH_ARGSZ",
    "VfioError",
    "FileKind",
    "OpenFile",
    "FileTable",
    "ObjType",
    "IommufdObject",
    "IommufdCtx",
    "VfioGroup",
    "VfioDevice",
    "CdevFile",
    "VfioCdevModel",
]

BIND_ARGSZ: Final = 16
"""``offsetofend(struct vfio_device_bind_iommufd, out_devid)``: the smallest argsz."""
ATTACH_ARGSZ: Final = 12
"""``offsetofend(struct vfio_device_attach_iommufd_pt, pt_id)``."""
DETACH_ARGSZ: Final = 8
"""``offsetofend(struct vfio_device_detach_iommufd_pt, flags)``."""

HOLD_BIND: Final = "vfio-bind"
"""Holder name of the reference a bound device file keeps on its iommufd file
(``df->iommufd``, ``iommufd_ctx_from_fd``)."""


class VfioError(OSError):
    """The kernel refuses a call: ``errno`` is what userspace sees.

    Fields: ``errno``, ``op`` (the call: "bind", "attach", "open_group", "close",
    ...), ``reason`` (the rule that fired, with the kernel function)."""

    def __init__(self, errno: int, op: str, reason: str) -> None:
        super().__init__(errno, f"{op}: {E.errorcode.get(errno, errno)}: {reason}")
        self.op = op
        self.reason = reason


class FileKind(enum.Enum):
    """What a ``struct file`` is (its ``f_op``)."""

    VFIO_CDEV = "vfio-cdev"
    VFIO_GROUP = "vfio-group"
    IOMMUFD = "iommufd"
    KVM_VM = "kvm-vm"
    KVM_DEVICE = "kvm-device"
    OTHER = "other"


class OpenFile:
    """One ``struct file``. Identity is the object: ``dup`` shares it, ``open``
    makes a new one.

    ``fd_refs``: fd-table slots naming it; ``holds``: kernel references by holder
    name (e.g. "kvm-vfio", :data:`HOLD_BIND`); ``released``: its release op has
    run (then nothing may name it again); ``payload``: the kind's state
    (:class:`CdevFile`, :class:`VfioGroup`, :class:`IommufdCtx`, or the KVM
    model's)."""

    _serial = 0

    def __init__(self, kind: FileKind, label: str, payload: object = None,
                 on_release: Callable[[OpenFile], None] | None = None) -> None:
        OpenFile._serial += 1
        self.serial = OpenFile._serial
        self.kind = kind
        self.label = label
        self.payload = payload
        self.on_release = on_release
        self.fd_refs = 0
        self.holds: Counter[str] = Counter()
        self.released = False

    @property
    def refs(self) -> int:
        """Every reference: fds plus kernel holders (``f_count``)."""
        return self.fd_refs + sum(self.holds.values())

    def __repr__(self) -> str:
        return f"<file#{self.serial} {self.kind.value} {self.label}{' released' if self.released else ''}>"


class FileTable:
    """A process's fd table and the reference counts of its files (``fs/file.c``).

    fds are ints; :meth:`install` takes the number the kernel returned, or picks
    the lowest free one >= 3 (what ``open`` does when 0-2 are taken).
    """

    def __init__(self) -> None:
        self.fds: dict[int, OpenFile] = {}

    def lookup(self, fd: int) -> OpenFile | None:
        """``fget``: the file behind ``fd``, None if ``fd`` is not open."""
        return self.fds.get(fd)

    def get(self, fd: int, op: str) -> OpenFile:
        """``fget`` or EBADF (:class:`VfioError`)."""
        file = self.fds.get(fd)
        if file is None:
            raise VfioError(E.EBADF, op, f"fd {fd} is not open")
        return file

    def install(self, file: OpenFile, fd: int | None = None) -> int:
        """Give ``file`` a new fd (``fd_install``). ValueError if ``fd`` is taken
        (the kernel never returns an fd that is in use: the model is out of step)."""
        if fd is None:
            fd = 3
            while fd in self.fds:
                fd += 1
        if fd < 0 or fd in self.fds:
            raise ValueError(f"fd {fd} is in use by {self.fds.get(fd)} or negative")
        if file.released:
            raise ValueError(f"{file} is released")
        self.fds[fd] = file
        file.fd_refs += 1
        return fd

    def dup(self, fd: int, new_fd: int | None = None) -> int:
        """dup(2): a second fd on the same file. EBADF if ``fd`` is not open."""
        return self.install(self.get(fd, "dup"), new_fd)

    def close(self, fd: int) -> None:
        """close(2): drop the fd; the file is released if nothing else holds it.
        EBADF if ``fd`` is not open."""
        file = self.get(fd, "close")
        del self.fds[fd]
        file.fd_refs -= 1
        self._maybe_release(file)

    def hold(self, file: OpenFile, holder: str) -> None:
        """A kernel reference (``get_file``) by ``holder``."""
        if file.released:
            raise ValueError(f"{holder} cannot hold released {file}")
        file.holds[holder] += 1

    def put(self, file: OpenFile, holder: str) -> None:
        """Drop one reference of ``holder`` (``fput``); release at the last one."""
        if file.holds[holder] <= 0:
            raise ValueError(f"{holder} holds no reference on {file}")
        file.holds[holder] -= 1
        if not file.holds[holder]:
            del file.holds[holder]
        self._maybe_release(file)

    def _maybe_release(self, file: OpenFile) -> None:
        if file.refs == 0 and not file.released:
            file.released = True
            if file.on_release is not None:
                file.on_release(file)

    def files(self) -> Iterator[tuple[int, OpenFile]]:
        return iter(sorted(self.fds.items()))


class ObjType(enum.Enum):
    """iommufd object types this model knows (``enum iommufd_object_type``)."""

    IOAS = "ioas"
    HWPT_PAGING = "hwpt_paging"
    DEVICE = "device"


@dataclass(eq=False)
class IommufdObject:
    """One object of an iommufd context: ``id``, ``type``; for a HWPT its ``ioas_id``,
    whether it is ``auto`` (made by attach to an IOAS) and the attached devices;
    for a device, its :class:`VfioDevice` name."""

    id: int
    type: ObjType
    ioas_id: int | None = None
    auto: bool = False
    devices: set[str] = field(default_factory=set)
    device: str | None = None


class IommufdCtx:
    """The object table of one iommufd context (``struct iommufd_ctx``), as far
    as VFIO needs it. Ids: the lowest free id >= 1 over every type
    (``iommufd_object_alloc_elm``: ``xa_alloc``, ``XA_FLAGS_ALLOC1``)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.objects: dict[int, IommufdObject] = {}
        self.destroyed = False

    def alloc(self, type_: ObjType, *, ioas_id: int | None = None, auto: bool = False,
               device: str | None = None) -> IommufdObject:
        """A new object with the lowest free id >= 1."""
        oid = 1
        while oid in self.objects:
            oid += 1
        obj = IommufdObject(oid, type_, ioas_id=ioas_id, auto=auto, device=device)
        self.objects[oid] = obj
        return obj

    def ioas_alloc(self) -> int:
        """IOMMU_IOAS_ALLOC: the new IOAS's id."""
        return self.alloc(ObjType.IOAS).id

    def hwpts_of(self, ioas_id: int) -> list[IommufdObject]:
        """HWPTs on ``ioas_id`` in creation order (``ioas->hwpt_list``, list_add_tail)."""
        return [o for o in self.objects.values() if o.type is ObjType.HWPT_PAGING and o.ioas_id == ioas_id]

    def destroy(self, oid: int) -> None:
        """IOMMU_DESTROY (``iommufd_destroy`` -> ``iommufd_object_remove``): ENOENT
        for an unknown id; EBUSY for an object someone else references (a bound
        device: its driver; an IOAS with a HWPT; a HWPT with a device)."""
        obj = self.objects.get(oid)
        if obj is None:
            raise VfioError(E.ENOENT, "destroy", f"no object {oid} in {self.label}")
        if obj.type is ObjType.DEVICE:
            raise VfioError(E.EBUSY, "destroy", f"device {oid} is held by its driver until unbind")
        if obj.type is ObjType.IOAS and self.hwpts_of(oid):
            raise VfioError(E.EBUSY, "destroy", f"IOAS {oid} has HWPTs {[h.id for h in self.hwpts_of(oid)]}")
        if obj.type is ObjType.HWPT_PAGING and obj.devices:
            raise VfioError(E.EBUSY, "destroy", f"HWPT {oid} has devices {sorted(obj.devices)} attached")
        del self.objects[oid]


@dataclass(eq=False)
class VfioGroup:
    """A VFIO group (``struct vfio_group``, /dev/vfio/N): ``opened_file`` is its one
    open file (``group->opened_file``)."""

    number: int
    devices: list[VfioDevice] = field(default_factory=list)
    opened_file: OpenFile | None = None

    @property
    def cdev_device_open_cnt(self) -> int:
        """Devices of the group bound through a cdev (``vfio_device_block_group``)."""
        return sum(1 for d in self.devices if d.bound is not None)


@dataclass(eq=False)
class VfioDevice:
    """A device registered with VFIO (``struct vfio_device``): the cdev file bound
    to it (the cdev path allows one: ``open_count`` 0 or 1), the HWPT it is
    attached to (``iommufd_attached``), the files of its cdev still open."""

    name: str
    group: VfioGroup
    msi_isolated: bool = True
    bound: CdevFile | None = None
    hwpt: IommufdObject | None = None
    files: list[OpenFile] = field(default_factory=list)


@dataclass(eq=False)
class CdevFile:
    """The private data of one open cdev file (``struct vfio_device_file``)."""

    device: VfioDevice
    ictx: IommufdCtx | None = None
    ictx_file: OpenFile | None = None
    devid: int | None = None

    @property
    def access_granted(self) -> bool:
        return self.ictx is not None


class VfioCdevModel:
    """VFIO device cdevs, groups and iommufd contexts of one process.

    Calls mirror the syscalls; each returns what the kernel returns (an fd, a
    devid, a pt_id) or raises :class:`VfioError` with the kernel's errno.  fds are
    the caller's: pass the number the kernel returned (``fd=``) to keep the model
    on the same numbers as a real process, or let the model pick.

    ``allow_unsafe_interrupts`` mirrors the iommufd module parameter of that name.
    """

    def __init__(self, allow_unsafe_interrupts: bool = False) -> None:
        self.files = FileTable()
        self.groups: dict[int, VfioGroup] = {}
        self.devices: dict[str, VfioDevice] = {}
        self.allow_unsafe_interrupts = allow_unsafe_interrupts

    # -- topology ----------------------------------------------------------
    def add_device(self, name: str, group: int, msi_isolated: bool = True) -> VfioDevice:
        """Register a device bound to vfio-pci, alone in IOMMU group ``group``
        (ValueError if the group has a device already: not modelled).
        ``msi_isolated``: interrupt remapping isolates its MSIs
        (``iommu_group_has_isolated_msi``)."""
        if name in self.devices:
            raise ValueError(f"device {name!r} exists")
        grp = self.groups.setdefault(group, VfioGroup(group))
        if grp.devices:
            raise ValueError(f"group {group} already has {grp.devices[0].name!r}: one device a group")
        dev = VfioDevice(name, grp, msi_isolated)
        grp.devices.append(dev)
        self.devices[name] = dev
        return dev

    def device(self, name: str) -> VfioDevice:
        try:
            return self.devices[name]
        except KeyError:
            raise ValueError(f"unknown device {name!r}") from None

    # -- opening files -----------------------------------------------------
    def open_cdev(self, device: str, fd: int | None = None) -> int:
        """open(/dev/vfio/devices/vfioN): always succeeds (``vfio_device_fops_cdev_open``)."""
        dev = self.device(device)
        file = OpenFile(FileKind.VFIO_CDEV, f"cdev {device}", CdevFile(dev), self._release_cdev)
        dev.files.append(file)
        return self.files.install(file, fd)

    def open_group(self, group: int, fd: int | None = None) -> int:
        """open(/dev/vfio/N) (``vfio_group_fops_open``): EBUSY while a cdev of the
        group is bound, or while the group is open (by any fd, or held by KVM)."""
        grp = self.groups.get(group)
        if grp is None:
            raise ValueError(f"unknown group {group}")
        if grp.cdev_device_open_cnt:
            raise VfioError(E.EBUSY, "open_group", f"a device cdev of group {group} is bound (cdev_device_open_cnt)")
        if grp.opened_file is not None:
            raise VfioError(E.EBUSY, "open_group", f"group {group} is open already ({grp.opened_file})")
        file = OpenFile(FileKind.VFIO_GROUP, f"group {group}", grp, self._release_group)
        grp.opened_file = file
        return self.files.install(file, fd)

    def open_iommufd(self, fd: int | None = None) -> int:
        """open(/dev/iommu): a new, empty context."""
        file = OpenFile(FileKind.IOMMUFD, "iommufd", None, self._release_iommufd)
        file.payload = IommufdCtx(f"iommufd#{file.serial}")
        return self.files.install(file, fd)

    def open_other(self, label: str = "other", fd: int | None = None) -> int:
        """open() of a file that is none of the above (e.g. /dev/null)."""
        return self.files.install(OpenFile(FileKind.OTHER, label), fd)

    def dup(self, fd: int, new_fd: int | None = None) -> int:
        """dup(2): EBADF if ``fd`` is not open."""
        return self.files.dup(fd, new_fd)

    def close(self, fd: int) -> None:
        """close(2): EBADF if ``fd`` is not open; may release the file."""
        self.files.close(fd)

    # -- iommufd -----------------------------------------------------------
    def ctx(self, iommufd: int, op: str = "iommufd") -> IommufdCtx:
        """The context behind an iommufd fd: EBADF if not open, ENOTTY if the file
        is a VFIO or KVM file (ValueError for an OTHER file)."""
        file = self.files.get(iommufd, op)
        if file.kind is FileKind.OTHER:
            raise ValueError(f"{op} on {file}: the model does not know that file's ioctls")
        if file.kind is not FileKind.IOMMUFD:
            raise VfioError(E.ENOTTY, op, f"{file} is not an iommufd")
        assert isinstance(file.payload, IommufdCtx)
        return file.payload

    def ioas_alloc(self, iommufd: int) -> int:
        """IOMMU_IOAS_ALLOC: the new IOAS id (lowest free object id >= 1)."""
        return self.ctx(iommufd, "ioas_alloc").ioas_alloc()

    def destroy(self, iommufd: int, oid: int) -> None:
        """IOMMU_DESTROY: see :meth:`IommufdCtx.destroy`."""
        self.ctx(iommufd, "destroy").destroy(oid)

    # -- device cdev ioctls --------------------------------------------------
    def _cdev(self, fd: int, op: str) -> CdevFile:
        file = self.files.get(fd, op)
        if file.kind is FileKind.OTHER:
            raise ValueError(f"{op} on {file}: the model does not know that file's ioctls")
        if file.kind is not FileKind.VFIO_CDEV:
            raise VfioError(E.ENOTTY, op, f"{file} is not a VFIO device cdev")
        assert isinstance(file.payload, CdevFile)
        return file.payload

    def _granted(self, fd: int, op: str) -> CdevFile:
        df = self._cdev(fd, op)
        if not df.access_granted:
            raise VfioError(E.EINVAL, op, "file not bound to an iommufd (access_granted, vfio_device_fops_unl_ioctl)")
        return df

    def device_ioctl(self, fd: int, op: str = "ioctl") -> None:
        """Any device ioctl but BIND/ATTACH/DETACH (GET_INFO, GET_REGION_INFO,
        RESET, ...) and any read/write/mmap of the file: only the access rule is
        modelled: EINVAL before BIND (``vfio_device_fops_unl_ioctl``,
        ``vfio_device_fops_read``)."""
        self._granted(fd, op)

    def bind(self, fd: int, iommufd: int, flags: int = 0, argsz: int = BIND_ARGSZ) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD (``vfio_df_ioctl_bind_iommufd``): the devid.

        Raises VfioError, first match wins: EBADF (``fd`` not open); ENOTTY (not a
        cdev); EINVAL (argsz < 16, flags, iommufd < 0); EBUSY (group open); EINVAL
        (this file bound); EBADF (``iommufd`` not open); EBADFD (not an iommufd
        file); EINVAL (another file of the device bound, ``vfio_df_open``); EPERM
        (MSI not isolated, ``iommufd_device_bind``)."""
        df = self._cdev(fd, "bind")
        dev = df.device
        if argsz < BIND_ARGSZ or flags or iommufd < 0:
            raise VfioError(E.EINVAL, "bind", f"argsz={argsz} flags={flags:#x} iommufd={iommufd}")
        if dev.group.opened_file is not None:
            raise VfioError(E.EBUSY, "bind", f"group {dev.group.number} is open (vfio_device_block_group)")
        if df.access_granted:
            raise VfioError(E.EINVAL, "bind", "this file is bound already")
        ifile = self.files.lookup(iommufd)
        if ifile is None:
            raise VfioError(E.EBADF, "bind", f"iommufd {iommufd} is not open (iommufd_ctx_from_fd)")
        if ifile.kind is not FileKind.IOMMUFD:
            raise VfioError(E.EBADFD, "bind", f"{ifile} is not an iommufd (iommufd_ctx_from_fd)")
        if dev.bound is not None:
            raise VfioError(E.EINVAL, "bind", f"{dev.name} is bound by another file (vfio_df_open)")
        if not dev.msi_isolated and not self.allow_unsafe_interrupts:
            raise VfioError(E.EPERM, "bind", "MSI not isolated (iommufd_device_bind)")
        ctx = ifile.payload
        assert isinstance(ctx, IommufdCtx)
        obj = ctx.alloc(ObjType.DEVICE, device=dev.name)
        self.files.hold(ifile, HOLD_BIND)
        df.ictx, df.ictx_file, df.devid = ctx, ifile, obj.id
        dev.bound = df
        return obj.id

    def attach(self, fd: int, pt_id: int, flags: int = 0, argsz: int = ATTACH_ARGSZ) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT (``vfio_df_ioctl_attach_pt``,
        ``iommufd_device_change_pt``): the HWPT id the device is now attached to.

        Raises VfioError: EBADF, ENOTTY; EINVAL (not bound); EINVAL (argsz < 12 or
        flags); ENOENT (``pt_id`` unknown in the bound context); EINVAL (``pt_id``
        neither an IOAS nor a HWPT)."""
        df = self._granted(fd, "attach")
        if argsz < ATTACH_ARGSZ or flags:
            raise VfioError(E.EINVAL, "attach", f"argsz={argsz} flags={flags:#x}")
        ctx = df.ictx
        assert ctx is not None
        obj = ctx.objects.get(pt_id)
        if obj is None:
            raise VfioError(E.ENOENT, "attach", f"no object {pt_id} (iommufd_get_object)")
        if obj.type is ObjType.HWPT_PAGING:
            target = obj
        elif obj.type is ObjType.IOAS:
            autos = [h for h in ctx.hwpts_of(obj.id) if h.auto]
            target = autos[0] if autos else ctx.alloc(ObjType.HWPT_PAGING, ioas_id=obj.id, auto=True)
        else:
            raise VfioError(E.EINVAL, "attach", f"object {pt_id} is a {obj.type.value}, not an IOAS or HWPT")
        dev = df.device
        old = dev.hwpt
        if old is not target:
            target.devices.add(dev.name)
            dev.hwpt = target
            if old is not None:
                self._hwpt_put(ctx, old, dev)
        return target.id

    def detach(self, fd: int, flags: int = 0, argsz: int = DETACH_ARGSZ) -> None:
        """VFIO_DEVICE_DETACH_IOMMUFD_PT: 0 whether attached or not
        (``vfio_iommufd_physical_detach_ioas``). EBADF, ENOTTY; EINVAL (not bound,
        argsz < 8, flags)."""
        df = self._granted(fd, "detach")
        if argsz < DETACH_ARGSZ or flags:
            raise VfioError(E.EINVAL, "detach", f"argsz={argsz} flags={flags:#x}")
        dev = df.device
        if dev.hwpt is not None:
            assert df.ictx is not None
            old, dev.hwpt = dev.hwpt, None
            self._hwpt_put(df.ictx, old, dev)

    @staticmethod
    def _hwpt_put(ctx: IommufdCtx, hwpt: IommufdObject, dev: VfioDevice) -> None:
        """The device leaves ``hwpt``; an automatic HWPT with no device left is
        destroyed (``iommufd_hw_pagetable_put``)."""
        hwpt.devices.discard(dev.name)
        if hwpt.auto and not hwpt.devices:
            del ctx.objects[hwpt.id]

    # -- release ops ---------------------------------------------------------
    def _release_cdev(self, file: OpenFile) -> None:
        """``vfio_device_fops_release`` -> ``vfio_df_unbind_iommufd``."""
        df = file.payload
        assert isinstance(df, CdevFile)
        dev = df.device
        dev.files.remove(file)
        if not df.access_granted:
            return
        ctx, ifile = df.ictx, df.ictx_file
        assert ctx is not None and ifile is not None and df.devid is not None
        if dev.hwpt is not None:
            old, dev.hwpt = dev.hwpt, None
            self._hwpt_put(ctx, old, dev)
        del ctx.objects[df.devid]
        dev.bound = None
        df.ictx, df.ictx_file, df.devid = None, None, None
        self.files.put(ifile, HOLD_BIND)

    def _release_group(self, file: OpenFile) -> None:
        """``vfio_group_fops_release``: the group is closed."""
        grp = file.payload
        assert isinstance(grp, VfioGroup)
        grp.opened_file = None

    def _release_iommufd(self, file: OpenFile) -> None:
        """``iommufd_fops_release``: every object of the context is destroyed."""
        ctx = file.payload
        assert isinstance(ctx, IommufdCtx)
        ctx.objects.clear()
        ctx.destroyed = True

    # -- observation -----------------------------------------------------------
    def held_by(self, device: str, holder: str) -> bool:
        """Whether ``holder`` (e.g. "kvm-vfio") holds a file of ``device``: one of
        its cdev files or its group's file."""
        dev = self.device(device)
        files = list(dev.files) + ([dev.group.opened_file] if dev.group.opened_file else [])
        return any(f.holds[holder] for f in files)

    def state(self, device: str) -> dict[str, object]:
        """A device's state as plain data: ``group_open``, ``bound`` (devid or
        None), ``hwpt`` (attached HWPT id or None), ``open_files`` (its open cdev
        files), ``files_held`` (holders of kernel references on them)."""
        dev = self.device(device)
        holders: Counter[str] = Counter()
        for f in dev.files:
            holders.update(f.holds)
        return {
            "group_open": dev.group.opened_file is not None,
            "bound": dev.bound.devid if dev.bound else None,
            "hwpt": dev.hwpt.id if dev.hwpt else None,
            "open_files": len(dev.files),
            "files_held": dict(sorted(holders.items())),
        }
