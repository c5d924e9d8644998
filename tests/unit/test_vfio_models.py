"""The VFIO cdev and KVM-VFIO models: examples whose numbers were seen in a booted
guest (Linux 6.12, intel-iommu with intremap, QEMU NVMe on vfio-pci), and random
programs run side by side on the models and on a deliberately naive oracle."""

from __future__ import annotations

import errno as E
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.models.kvm_vfio import KvmVfioError, KvmVfioModel
from harness.models.vfio_cdev import FileKind, VfioCdevModel, VfioError

GROUP = 2


def fresh(msi_isolated: bool = True, allow_unsafe: bool = False) -> tuple[VfioCdevModel, KvmVfioModel]:
    vfio = VfioCdevModel(allow_unsafe_interrupts=allow_unsafe)
    vfio.add_device("nvme", GROUP, msi_isolated=msi_isolated)
    return vfio, KvmVfioModel(vfio)


def errno_of(fn: Callable[..., Any], *args: Any, **kw: Any) -> int:
    """The errno ``fn`` raises (the test fails if it returns)."""
    with pytest.raises(OSError) as info:
        fn(*args, **kw)
    assert info.value.errno is not None
    return info.value.errno


# ---------------------------------------------------------------------------
# Examples (the guest showed these errnos and ids)
# ---------------------------------------------------------------------------


def test_every_ioctl_before_bind_is_einval_and_open_always_succeeds() -> None:
    vfio, _ = fresh()
    a = vfio.open_cdev("nvme")
    b = vfio.open_cdev("nvme")
    assert a != b and vfio.files.lookup(a) is not vfio.files.lookup(b)
    assert errno_of(vfio.device_ioctl, a) == E.EINVAL
    assert errno_of(vfio.attach, a, 1) == E.EINVAL
    assert errno_of(vfio.detach, a) == E.EINVAL


def test_bind_errnos_in_the_kernels_order() -> None:
    vfio, _ = fresh()
    a = vfio.open_cdev("nvme")
    g = vfio.open_group(GROUP)
    i = vfio.open_iommufd()
    # argsz/flags/negative fd come before the group check
    assert errno_of(vfio.bind, a, i, argsz=15) == E.EINVAL
    assert errno_of(vfio.bind, a, i, flags=1) == E.EINVAL
    assert errno_of(vfio.bind, a, -1) == E.EINVAL
    assert errno_of(vfio.bind, a, i) == E.EBUSY
    # the group check comes before the iommufd fd is looked at
    assert errno_of(vfio.bind, a, 999) == E.EBUSY
    vfio.close(g)
    assert errno_of(vfio.bind, a, 999) == E.EBADF
    assert errno_of(vfio.bind, a, a) == E.EBADFD
    assert vfio.bind(a, i) == 1
    assert errno_of(vfio.bind, a, i) == E.EINVAL
    # bound twice comes before the iommufd fd check
    assert errno_of(vfio.bind, a, 999) == E.EINVAL
    assert errno_of(vfio.open_group, GROUP) == E.EBUSY
    b = vfio.open_cdev("nvme")
    assert errno_of(vfio.bind, b, i) == E.EINVAL
    # a second file: the iommufd fd is checked before the device's open count
    assert errno_of(vfio.bind, b, 999) == E.EBADF
    assert vfio.state("nvme") == {"group_open": False, "bound": 1, "hwpt": None, "open_files": 2, "files_held": {}}


def test_bind_on_files_that_are_not_a_cdev_is_enotty() -> None:
    vfio, kvm = fresh()
    i = vfio.open_iommufd()
    g = vfio.open_group(GROUP)
    vm = kvm.create_vm()
    for fd in (i, g, vm):
        assert errno_of(vfio.bind, fd, i) == E.ENOTTY
    with pytest.raises(ValueError):
        vfio.bind(vfio.open_other(), i)


def test_msi_not_isolated_is_eperm_unless_unsafe_interrupts_are_allowed() -> None:
    vfio, _ = fresh(msi_isolated=False)
    a, i = vfio.open_cdev("nvme"), vfio.open_iommufd()
    assert errno_of(vfio.bind, a, i) == E.EPERM
    assert errno_of(vfio.attach, a, 1) == E.EINVAL  # still unbound
    vfio2, _ = fresh(msi_isolated=False, allow_unsafe=True)
    assert vfio2.bind(vfio2.open_cdev("nvme"), vfio2.open_iommufd()) == 1


def test_attach_ids_and_replace_as_seen_in_the_guest() -> None:
    vfio, _ = fresh()
    a, i = vfio.open_cdev("nvme"), vfio.open_iommufd()
    assert vfio.bind(a, i) == 1
    ioas = vfio.ioas_alloc(i)
    assert ioas == 2
    assert errno_of(vfio.attach, a, 77) == E.ENOENT
    assert errno_of(vfio.attach, a, 1) == E.EINVAL  # the device object
    assert errno_of(vfio.attach, a, ioas, argsz=11) == E.EINVAL
    assert vfio.attach(a, ioas) == 3
    assert vfio.attach(a, ioas) == 3  # same IOAS: same automatic HWPT
    assert vfio.attach(a, 3) == 3  # the HWPT itself
    other = vfio.ioas_alloc(i)
    assert other == 4
    assert vfio.attach(a, other) == 5
    # the replaced automatic HWPT was destroyed: its id is unknown, then reused
    assert errno_of(vfio.attach, a, 3) == E.ENOENT
    assert vfio.attach(a, ioas) == 3
    assert errno_of(vfio.destroy, i, 5) == E.ENOENT
    vfio.destroy(i, other)  # its automatic HWPT 5 went with the replace
    vfio.detach(a)
    vfio.detach(a)
    assert vfio.state("nvme")["hwpt"] is None


def test_destroy_refuses_objects_in_use() -> None:
    vfio, _ = fresh()
    a, i = vfio.open_cdev("nvme"), vfio.open_iommufd()
    devid = vfio.bind(a, i)
    ioas = vfio.ioas_alloc(i)
    hwpt = vfio.attach(a, ioas)
    assert errno_of(vfio.destroy, i, devid) == E.EBUSY
    assert errno_of(vfio.destroy, i, ioas) == E.EBUSY
    assert errno_of(vfio.destroy, i, hwpt) == E.EBUSY
    assert errno_of(vfio.destroy, i, 99) == E.ENOENT
    vfio.detach(a)
    assert errno_of(vfio.destroy, i, hwpt) == E.ENOENT  # the auto HWPT went with the detach
    vfio.destroy(i, ioas)
    assert vfio.ioas_alloc(i) == ioas


def test_close_while_attached_detaches_and_unbinds_but_the_ioas_stays() -> None:
    vfio, _ = fresh()
    a, i = vfio.open_cdev("nvme"), vfio.open_iommufd()
    vfio.bind(a, i)
    ioas = vfio.ioas_alloc(i)
    vfio.attach(a, ioas)
    d = vfio.dup(a)
    vfio.close(a)
    assert vfio.state("nvme")["bound"] == 1  # the dup keeps the file
    vfio.close(d)
    assert vfio.state("nvme") == {"group_open": False, "bound": None, "hwpt": None, "open_files": 0, "files_held": {}}
    g = vfio.open_group(GROUP)
    vfio.close(g)
    b = vfio.open_cdev("nvme")
    assert vfio.bind(b, i) == 1  # devid 1 was freed
    assert vfio.attach(b, ioas) == 3


def test_iommufd_stays_alive_while_a_bound_device_holds_it() -> None:
    vfio, _ = fresh()
    a, i = vfio.open_cdev("nvme"), vfio.open_iommufd()
    vfio.bind(a, i)
    ioas = vfio.ioas_alloc(i)
    ictx = vfio.ctx(i)
    vfio.close(i)
    assert errno_of(vfio.ioas_alloc, i) == E.EBADF
    assert vfio.attach(a, ioas) == 3 and not ictx.destroyed
    vfio.close(a)
    assert ictx.destroyed and not ictx.objects


def test_fd_table_errors() -> None:
    vfio, _ = fresh()
    assert errno_of(vfio.close, 5) == E.EBADF
    assert errno_of(vfio.dup, 5) == E.EBADF
    with pytest.raises(ValueError):
        vfio.files.install(vfio.files.get(vfio.open_iommufd(), "x"), 3)  # fd 3 is taken
    err = errno_of(vfio.close, 7)
    assert err == E.EBADF
    with pytest.raises(VfioError) as info:
        vfio.close(7)
    assert isinstance(info.value, OSError) and info.value.op == "close"


def test_kvm_add_and_del_follow_struct_file_identity() -> None:
    vfio, kvm = fresh()
    vm = kvm.create_vm()
    kv = kvm.create_device(vm)
    assert kv is not None
    a = vfio.open_cdev("nvme")
    kvm.set_attr(kv, 1, 1, a)
    assert errno_of(kvm.set_attr, kv, 1, 1, a) == E.EEXIST
    a2 = vfio.dup(a)
    assert errno_of(kvm.set_attr, kv, 1, 1, a2) == E.EEXIST
    b = vfio.open_cdev("nvme")
    kvm.set_attr(kv, 1, 1, b)  # a second open is a second file
    i = vfio.open_iommufd()
    assert errno_of(kvm.set_attr, kv, 1, 1, i) == E.EINVAL
    assert errno_of(kvm.set_attr, kv, 1, 1, vm) == E.EINVAL
    assert errno_of(kvm.set_attr, kv, 1, 1, 999) == E.EBADF
    assert errno_of(kvm.set_attr, kv, 1, 2, i) == E.ENOENT  # DEL never checks the kind
    kvm.set_attr(kv, 1, 2, a2)  # deleted through the dup
    assert errno_of(kvm.set_attr, kv, 1, 2, a) == E.ENOENT
    assert errno_of(kvm.set_attr, kv, 1, 2, 999) == E.EBADF
    assert [f.kind for f in kvm.file_list(kv)] == [FileKind.VFIO_CDEV]
    assert kvm.file_list(kv)[0] is vfio.files.lookup(b)


def test_kvm_attributes_and_device_creation() -> None:
    vfio, kvm = fresh()
    vm = kvm.create_vm()
    kv = kvm.create_device(vm)
    assert kv is not None
    kvm.has_attr(kv, 1, 1)
    kvm.has_attr(kv, 1, 2)
    for group, attr in ((1, 3), (2, 1), (0, 0)):
        assert errno_of(kvm.has_attr, kv, group, attr) == E.ENXIO
        assert errno_of(kvm.set_attr, kv, group, attr, None) == E.ENXIO  # before addr is read
    assert errno_of(kvm.get_attr, kv, 1, 1) == E.EPERM
    assert errno_of(kvm.set_attr, kv, 1, 1, None) == E.EFAULT
    assert errno_of(kvm.create_device, vm) == E.EBUSY
    assert kvm.create_device(vm, test=True) is None
    assert errno_of(kvm.create_device, vm, type=3) == E.ENODEV
    assert errno_of(kvm.create_device, vm, type=3, test=True) == E.ENODEV
    assert errno_of(kvm.create_device, 999) == E.EBADF
    vfio.close(kv)
    assert errno_of(kvm.has_attr, kv, 1, 1) == E.EBADF
    assert kvm.create_device(vm) is not None
    with pytest.raises(KvmVfioError):
        kvm.create_device(vm)


def test_kvm_holds_the_group_open_after_close() -> None:
    vfio, kvm = fresh()
    kv = kvm.create_device(kvm.create_vm())
    assert kv is not None
    g = vfio.open_group(GROUP)
    kvm.set_attr(kv, 1, 1, g)
    vfio.close(g)
    assert vfio.held_by("nvme", "kvm-vfio")
    assert errno_of(vfio.open_group, GROUP) == E.EBUSY
    a, i = vfio.open_cdev("nvme"), vfio.open_iommufd()
    assert errno_of(vfio.bind, a, i) == E.EBUSY
    vfio.close(kv)
    assert not vfio.held_by("nvme", "kvm-vfio")
    assert vfio.bind(a, i) == 1


def test_kvm_keeps_a_closed_cdev_bound() -> None:
    vfio, kvm = fresh()
    kv = kvm.create_device(kvm.create_vm())
    assert kv is not None
    a, i = vfio.open_cdev("nvme"), vfio.open_iommufd()
    assert vfio.bind(a, i) == 1
    kvm.set_attr(kv, 1, 1, a)
    vfio.close(a)
    assert vfio.state("nvme") == {"group_open": False, "bound": 1, "hwpt": None, "open_files": 1,
                                  "files_held": {"kvm-vfio": 1}}
    assert errno_of(vfio.open_group, GROUP) == E.EBUSY
    b = vfio.open_cdev("nvme")
    assert errno_of(vfio.bind, b, i) == E.EINVAL  # open_count, not the group: EINVAL
    vfio.close(kv)
    assert vfio.bind(b, i) == 1


def test_kvm_del_of_the_last_reference_releases_the_file() -> None:
    vfio, kvm = fresh()
    kv = kvm.create_device(kvm.create_vm())
    assert kv is not None
    a, i = vfio.open_cdev("nvme"), vfio.open_iommufd()
    vfio.bind(a, i)
    a2 = vfio.dup(a)
    kvm.set_attr(kv, 1, 1, a)
    vfio.close(a)
    kvm.set_attr(kv, 1, 2, a2)
    assert vfio.state("nvme")["bound"] == 1
    vfio.close(a2)
    assert vfio.state("nvme")["bound"] is None


def test_errors_are_oserrors_with_the_kernels_errno() -> None:
    vfio, kvm = fresh()
    a = vfio.open_cdev("nvme")
    with pytest.raises(VfioError) as v:
        vfio.attach(a, 1)
    assert isinstance(v.value, OSError) and v.value.errno == E.EINVAL and "attach" in str(v.value)
    kv = kvm.create_device(kvm.create_vm())
    assert kv is not None
    with pytest.raises(KvmVfioError) as k:
        kvm.get_attr(kv, 1, 1)
    assert isinstance(k.value, OSError) and k.value.errno == E.EPERM and "EPERM" in str(k.value)


# ---------------------------------------------------------------------------
# A naive oracle: flat dicts, one device, liveness by reachability
# ---------------------------------------------------------------------------


class Oracle:
    """The same contract stated differently: no reference counts; after every call
    the files still reachable from an fd (through KVM lists, a bound cdev's
    iommufd, a KVM device's VM) are computed from scratch, and the unreachable
    ones are released. Object ids: min of the free ones."""

    def __init__(self, msi_isolated: bool = True) -> None:
        self.msi_isolated = msi_isolated
        self.fd: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self.live: set[int] = set()
        self.n = 0
        self.bound: dict[int, tuple[int, int]] = {}  # cdev file -> (ictx file, devid)
        self.hwpt: int | None = None
        self.objs: dict[int, dict[int, tuple[str, int | None]]] = {}  # ictx -> id -> (type, ioas)
        self.klist: dict[int, list[int]] = {}  # kvm device file -> files
        self.kvm_of: dict[int, int] = {}  # kvm device file -> vm file
        self.vm_dev: dict[int, int | None] = {}
        self.group: int | None = None

    # files
    def _new(self, kind: str) -> int:
        self.n += 1
        self.kind[self.n] = kind
        self.live.add(self.n)
        fd = 3
        while fd in self.fd:
            fd += 1
        self.fd[fd] = self.n
        return fd

    def _gc(self) -> None:
        reach: set[int] = set()
        todo = list(self.fd.values())
        while todo:
            f = todo.pop()
            if f in reach:
                continue
            reach.add(f)
            todo += self.klist.get(f, [])
            if f in self.kvm_of:
                todo.append(self.kvm_of[f])
            if f in self.bound:
                todo.append(self.bound[f][0])
        for f in sorted(self.live - reach):
            self.live.discard(f)
            if f in self.bound:
                ictx, devid = self.bound.pop(f)
                self.objs[ictx].pop(devid, None)
                self._drop_hwpt(ictx)
            if self.group == f:
                self.group = None
            if self.kind[f] == "iommufd":
                self.objs[f] = {}
            if f in self.klist:
                del self.klist[f]
                self.vm_dev[self.kvm_of.pop(f)] = None

    def _drop_hwpt(self, ictx: int) -> None:
        if self.hwpt is not None:
            self.objs[ictx].pop(self.hwpt, None)
            self.hwpt = None

    def _file(self, fd: int) -> int:
        if fd not in self.fd:
            raise OSError(E.EBADF, "")
        return self.fd[fd]

    def _free_id(self, ictx: int) -> int:
        return min(set(range(1, len(self.objs[ictx]) + 2)) - set(self.objs[ictx]))

    # calls
    def open_cdev(self) -> int:
        return self._new("cdev")

    def open_group(self) -> int:
        if self.bound or self.group is not None:
            raise OSError(E.EBUSY, "")
        fd = self._new("group")
        self.group = self.fd[fd]
        return fd

    def open_iommufd(self) -> int:
        fd = self._new("iommufd")
        self.objs[self.fd[fd]] = {}
        return fd

    def open_other(self) -> int:
        return self._new("other")

    def create_vm(self) -> int:
        fd = self._new("vm")
        self.vm_dev[self.fd[fd]] = None
        return fd

    def dup(self, fd: int) -> int:
        f = self._file(fd)
        new = 3
        while new in self.fd:
            new += 1
        self.fd[new] = f
        return new

    def close(self, fd: int) -> None:
        self._file(fd)
        del self.fd[fd]
        self._gc()

    def _ictx(self, fd: int) -> int:
        f = self._file(fd)
        if self.kind[f] == "other":
            raise ValueError
        if self.kind[f] != "iommufd":
            raise OSError(E.ENOTTY, "")
        return f

    def ioas_alloc(self, fd: int) -> int:
        ictx = self._ictx(fd)
        oid = self._free_id(ictx)
        self.objs[ictx][oid] = ("ioas", None)
        return oid

    def destroy(self, fd: int, oid: int) -> None:
        ictx = self._ictx(fd)
        objs = self.objs[ictx]
        if oid not in objs:
            raise OSError(E.ENOENT, "")
        kind, _ = objs[oid]
        if kind == "dev" or (kind == "hwpt" and self.hwpt == oid) or (
                kind == "ioas" and any(v == ("hwpt", oid) for v in objs.values())):
            raise OSError(E.EBUSY, "")
        del objs[oid]

    def _cdev(self, fd: int) -> int:
        f = self._file(fd)
        if self.kind[f] == "other":
            raise ValueError
        if self.kind[f] != "cdev":
            raise OSError(E.ENOTTY, "")
        return f

    def _granted(self, fd: int) -> int:
        f = self._cdev(fd)
        if f not in self.bound:
            raise OSError(E.EINVAL, "")
        return f

    def ioctl(self, fd: int) -> None:
        self._granted(fd)

    def bind(self, fd: int, ifd: int, flags: int, argsz: int) -> int:
        f = self._cdev(fd)
        rules: list[tuple[Callable[[], bool], int]] = [
            (lambda: argsz < 16 or flags != 0 or ifd < 0, E.EINVAL),
            (lambda: self.group is not None, E.EBUSY),
            (lambda: f in self.bound, E.EINVAL),
            (lambda: ifd not in self.fd, E.EBADF),
            (lambda: self.kind[self.fd[ifd]] != "iommufd", E.EBADFD),
            (lambda: bool(self.bound), E.EINVAL),
            (lambda: not self.msi_isolated, E.EPERM),
        ]
        for broken, err in rules:
            if broken():
                raise OSError(err, "")
        ictx = self.fd[ifd]
        devid = self._free_id(ictx)
        self.objs[ictx][devid] = ("dev", None)
        self.bound[f] = (ictx, devid)
        return devid

    def attach(self, fd: int, pt: int, flags: int, argsz: int) -> int:
        f = self._granted(fd)
        if argsz < 12 or flags:
            raise OSError(E.EINVAL, "")
        ictx = self.bound[f][0]
        objs = self.objs[ictx]
        if pt not in objs:
            raise OSError(E.ENOENT, "")
        kind, _ = objs[pt]
        if kind == "hwpt":
            new = pt
        elif kind == "ioas":
            mine = [i for i, v in objs.items() if v == ("hwpt", pt)]
            if mine:
                new = mine[0]
            else:
                new = self._free_id(ictx)
                objs[new] = ("hwpt", pt)
        else:
            raise OSError(E.EINVAL, "")
        if new != self.hwpt:
            self._drop_hwpt(ictx)
            self.hwpt = new
        return new

    def detach(self, fd: int, flags: int, argsz: int) -> None:
        f = self._granted(fd)
        if argsz < 8 or flags:
            raise OSError(E.EINVAL, "")
        self._drop_hwpt(self.bound[f][0])

    def _kdev(self, fd: int) -> int:
        f = self._file(fd)
        if self.kind[f] != "kvmdev":
            raise ValueError
        return f

    def create_device(self, vm_fd: int, type_: int, test: bool) -> int | None:
        vm = self._file(vm_fd)
        if self.kind[vm] != "vm":
            raise ValueError
        if type_ != 4:
            raise OSError(E.ENODEV, "")
        if test:
            return None
        if self.vm_dev[vm] is not None:
            raise OSError(E.EBUSY, "")
        fd = self._new("kvmdev")
        self.klist[self.fd[fd]] = []
        self.kvm_of[self.fd[fd]] = vm
        self.vm_dev[vm] = self.fd[fd]
        return fd

    def set_attr(self, dev_fd: int, group: int, attr: int, fd: int | None) -> None:
        lst = self.klist[self._kdev(dev_fd)]
        if (group, attr) not in ((1, 1), (1, 2)):
            raise OSError(E.ENXIO, "")
        if fd is None:
            raise OSError(E.EFAULT, "")
        f = self._file(fd)
        if attr == 1:
            if self.kind[f] not in ("cdev", "group"):
                raise OSError(E.EINVAL, "")
            if f in lst:
                raise OSError(E.EEXIST, "")
            lst.append(f)
        else:
            if f not in lst:
                raise OSError(E.ENOENT, "")
            lst.remove(f)
            self._gc()

    def has_attr(self, dev_fd: int, group: int, attr: int) -> None:
        self._kdev(dev_fd)
        if (group, attr) not in ((1, 1), (1, 2)):
            raise OSError(E.ENXIO, "")

    def get_attr(self, dev_fd: int) -> None:
        self._kdev(dev_fd)
        raise OSError(E.EPERM, "")

    def state(self) -> dict[str, object]:
        return {"group_open": self.group is not None,
                "bound": next(iter(self.bound.values()))[1] if self.bound else None,
                "hwpt": self.hwpt}


ARGS: dict[str, st.SearchStrategy[Any]] = {
    "id": st.integers(min_value=0, max_value=7),
    "flags": st.sampled_from([0] * 6 + [1]),
    "bind_argsz": st.sampled_from([16] * 6 + [15, 32]),
    "attach_argsz": st.sampled_from([12] * 6 + [11]),
    "detach_argsz": st.sampled_from([8] * 6 + [7]),
    "type": st.sampled_from([4, 4, 4, 3]),
    "test": st.booleans(),
    "group": st.sampled_from([1, 1, 1, 2, 0]),
    "attr": st.sampled_from([1, 1, 2, 2, 3]),
}
OPS: dict[str, tuple[str, ...]] = {
    "open_cdev": (), "open_group": (), "open_iommufd": (), "open_other": (), "create_vm": (),
    "dup": ("any",), "close": ("any",), "ioas_alloc": ("ictx",), "ioctl": ("cdev",), "get_attr": ("kdev",),
    "destroy": ("ictx", "id"),
    "bind": ("cdev", "ictx", "flags", "bind_argsz"),
    "attach": ("cdev", "id", "flags", "attach_argsz"),
    "detach": ("cdev", "flags", "detach_argsz"),
    "create_device": ("vm", "type", "test"),
    "set_attr": ("kdev", "group", "attr", "vfio|none"),
    "has_attr": ("kdev", "group", "attr"),
}
WEIGHT = {"bind": 4, "attach": 4, "set_attr": 4, "close": 3, "open_cdev": 2, "dup": 2, "ioas_alloc": 2}
OP_NAMES = st.sampled_from([name for name in sorted(OPS) for _ in range(WEIGHT.get(name, 1))])
KIND_OF = {"cdev": {FileKind.VFIO_CDEV}, "ictx": {FileKind.IOMMUFD}, "vm": {FileKind.KVM_VM},
           "kdev": {FileKind.KVM_DEVICE}, "vfio": {FileKind.VFIO_CDEV, FileKind.VFIO_GROUP}}
BAD_FDS = [-1, 2, 99]


def draw_step(data: st.DataObject, vfio: VfioCdevModel) -> tuple[Any, ...]:
    """One call. An fd argument is mostly an open fd of the kind the call expects
    (so calls reach their own files), else any open fd, or a closed or negative one."""
    name = data.draw(OP_NAMES)
    args: list[Any] = []
    for kind in OPS[name]:
        if kind in ARGS:
            args.append(data.draw(ARGS[kind]))
            continue
        base = kind.removesuffix("|none")
        every = sorted(vfio.files.fds)
        typed = [fd for fd in every if base == "any" or vfio.files.fds[fd].kind in KIND_OF[base]]
        pool = typed * 8 + every + BAD_FDS + ([None] if kind.endswith("|none") else [])
        args.append(pool[data.draw(st.integers(min_value=0, max_value=len(pool) - 1))])
    return (name, *args)


def run_model(vfio: VfioCdevModel, kvm: KvmVfioModel, step: tuple[Any, ...]) -> Any:
    name, *args = step
    calls: dict[str, Callable[..., Any]] = {
        "open_cdev": lambda: vfio.open_cdev("nvme"),
        "open_group": lambda: vfio.open_group(GROUP),
        "open_iommufd": vfio.open_iommufd,
        "open_other": vfio.open_other,
        "create_vm": kvm.create_vm,
        "dup": vfio.dup,
        "close": vfio.close,
        "ioas_alloc": vfio.ioas_alloc,
        "ioctl": vfio.device_ioctl,
        "get_attr": lambda fd: kvm.get_attr(fd, 1, 1),
        "destroy": vfio.destroy,
        "bind": lambda fd, i, fl, sz: vfio.bind(fd, i, flags=fl, argsz=sz),
        "attach": lambda fd, pt, fl, sz: vfio.attach(fd, pt, flags=fl, argsz=sz),
        "detach": lambda fd, fl, sz: vfio.detach(fd, flags=fl, argsz=sz),
        "create_device": lambda fd, t, test: kvm.create_device(fd, type=t, test=test),
        "set_attr": kvm.set_attr,
        "has_attr": kvm.has_attr,
    }
    return calls[name](*args)


def run_oracle(o: Oracle, step: tuple[Any, ...]) -> Any:
    name, *args = step
    if name == "get_attr":
        return o.get_attr(args[0])
    if name == "ioctl":
        return o.ioctl(args[0])
    return getattr(o, name)(*args)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("errno", E.errorcode.get(exc.errno or 0, exc.errno))
    except ValueError:
        return ("unmodelled", None)


def compare_step(vfio: VfioCdevModel, kvm: KvmVfioModel, oracle: Oracle, program: list[tuple[Any, ...]],
                 step: tuple[Any, ...]) -> None:
    program.append(step)
    got = outcome(lambda: run_model(vfio, kvm, step))
    want = outcome(lambda: run_oracle(oracle, step))
    state = vfio.state("nvme")
    seen = {k: state[k] for k in ("group_open", "bound", "hwpt")}
    if got != want or seen != oracle.state():
        trail = "\n".join(f"  {i}: {s}" for i, s in enumerate(program))
        pytest.fail(f"step {len(program) - 1} {step}: model {got} {seen}, oracle {want} {oracle.state()}\n{trail}")


def compare(program: list[tuple[Any, ...]], msi_isolated: bool = True) -> None:
    vfio, kvm = fresh(msi_isolated=msi_isolated)
    oracle = Oracle(msi_isolated=msi_isolated)
    done: list[tuple[Any, ...]] = []
    for step in program:
        compare_step(vfio, kvm, oracle, done, step)


PREAMBLE: list[tuple[Any, ...]] = [("open_iommufd",), ("open_cdev",), ("create_vm",), ("create_device", 5, 4, False),
                                    ("bind", 4, 3, 0, 16), ("ioas_alloc", 3), ("attach", 4, 2, 0, 12)]
"""fd 3 an iommufd, fd 4 a cdev, fd 5 a VM, fd 6 its KVM-VFIO device; then the cdev
bound (devid 1) and attached to IOAS 2 (HWPT 3). A program starts after the first
4, 5 or 7 of these, or from nothing."""


def random_program(data: st.DataObject, msi_isolated: bool, length: int) -> None:
    vfio, kvm = fresh(msi_isolated=msi_isolated)
    oracle = Oracle(msi_isolated=msi_isolated)
    done: list[tuple[Any, ...]] = []
    for step in PREAMBLE[:data.draw(st.sampled_from([0, 4, 5, 7]))]:
        compare_step(vfio, kvm, oracle, done, step)
    for _ in range(data.draw(st.integers(min_value=0, max_value=length))):
        compare_step(vfio, kvm, oracle, done, draw_step(data, vfio))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_model_agrees_with_the_naive_oracle(data: st.DataObject) -> None:
    random_program(data, msi_isolated=True, length=50)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_model_agrees_with_the_oracle_without_msi_isolation(data: st.DataObject) -> None:
    random_program(data, msi_isolated=False, length=25)


SCRIPTED = [
    # the lifecycle the VM test drives, as one program: bind, attach, KVM holds, close, release
    [("open_iommufd",), ("open_cdev",), ("bind", 4, 3, 0, 16), ("ioas_alloc", 3), ("attach", 4, 2, 0, 12),
     ("create_vm",), ("create_device", 5, 4, False), ("set_attr", 6, 1, 1, 4), ("close", 4),
     ("open_group",), ("open_cdev",), ("bind", 4, 3, 0, 16), ("close", 6), ("bind", 4, 3, 0, 16),
     ("attach", 4, 2, 0, 12)],
    [("open_group",), ("create_vm",), ("create_device", 4, 4, False), ("set_attr", 5, 1, 1, 3),
     ("close", 3), ("open_group",), ("open_cdev",), ("open_iommufd",), ("bind", 3, 6, 0, 16),
     ("set_attr", 5, 1, 2, 3), ("close", 5), ("open_group",), ("bind", 3, 6, 0, 16)],
    [("create_vm",), ("create_device", 3, 4, False), ("open_cdev",), ("set_attr", 4, 1, 1, 5),
     ("set_attr", 4, 1, 1, 5), ("dup", 5), ("set_attr", 4, 1, 1, 6), ("open_cdev",), ("set_attr", 4, 1, 1, 7),
     ("open_iommufd",), ("set_attr", 4, 1, 1, 8), ("set_attr", 4, 1, 2, 8), ("set_attr", 4, 1, 2, 6),
     ("set_attr", 4, 1, 2, 5), ("set_attr", 4, 1, 1, 99), ("set_attr", 4, 1, 2, 99), ("close", 4),
     ("create_device", 3, 4, False), ("set_attr", 4, 1, 1, 5)],
]


@pytest.mark.parametrize("program", SCRIPTED, ids=["cdev-held-by-kvm", "group-held-by-kvm", "kvm-file-identity"])
def test_model_agrees_with_the_oracle_on_the_vm_lifecycles(program: list[tuple[Any, ...]]) -> None:
    compare(program)
