"""VFIO device cdev and KVM-VFIO lifecycles in a booted guest, judged step by step
by the models (harness.models.vfio_cdev, harness.models.kvm_vfio).

One guest runs the whole table: an NVMe controller (serial "vfio0") is handed to
vfio-pci, then each case is a short script of guest agent ops run on the kernel
and on a fresh model; at every step the kernel's errno (and any id it returns:
devid, IOAS id, pt_id) must be the model's. Between cases every fd is closed,
which must leave the device unbound, its group closed and still on vfio-pci:
each case starts by opening and closing the group to prove it.
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from harness.models.kvm_vfio import KvmVfioModel
from harness.models.vfio_cdev import VfioCdevModel
from harness.vm import IntelIommu, MachineSpec, NvmeController, NvmeNamespace

SPEC = MachineSpec(devices=(IntelIommu(caching_mode=True, intremap=True),
                            NvmeController(id="nvme0", serial="kernel0"),
                            NvmeController(id="nvme1", serial="vfio0", namespaces=(NvmeNamespace(size_mib=16),))))
DEVICE = "nvme1"
ADD, DEL = 1, 2


@dataclass(frozen=True)
class Step:
    """One op: ``op`` and its arguments; a str argument names an fd or an id made
    by an earlier step (``out`` names what this step makes), an int is passed as is.
    ``expect``: the errno this step is known to give (documents the case; checked
    against the model too, so the table cannot drift with it)."""

    op: str
    args: tuple[Any, ...] = ()
    out: str | None = None
    expect: int | None = None
    kw: dict[str, Any] = field(default_factory=dict)


def S(op: str, *args: Any, out: str | None = None, expect: int | None = None, **kw: Any) -> Step:
    return Step(op, args, out, expect, kw)


# name -> steps. Conventions: i = iommufd, x/y = IOAS ids, a/b = cdev fds, g = group fd,
# vm = VM fd, kv = KVM-VFIO device fd.
CASES: dict[str, list[Step]] = {
    "ioctl before bind": [
        S("cdev", out="a"), S("info", "a", expect=E.EINVAL), S("config_read", "a", expect=E.EINVAL),
        S("attach", "a", 1, expect=E.EINVAL), S("detach", "a", expect=E.EINVAL),
        S("iommufd", out="i"), S("bind", "a", "i", out="devid"), S("info", "a", expect=0),
        S("config_read", "a", expect=0),
    ],
    "bind arguments and fds": [
        S("iommufd", out="i"), S("cdev", out="a"), S("vm", out="vm"),
        S("bind", "a", "i", argsz=15, expect=E.EINVAL), S("bind", "a", "i", flags=1, expect=E.EINVAL),
        S("bind", "a", -1, expect=E.EINVAL), S("bind", "a", 999, expect=E.EBADF),
        S("bind", "a", "a", expect=E.EBADFD), S("bind", "a", "vm", expect=E.EBADFD),
        S("bind", "i", "i", expect=E.ENOTTY), S("bind", "a", "i", argsz=32, out="devid", expect=0),
    ],
    "bind twice": [
        S("iommufd", out="i"), S("cdev", out="a"), S("bind", "a", "i", out="devid"),
        S("bind", "a", "i", expect=E.EINVAL), S("bind", "a", 999, expect=E.EINVAL),
    ],
    "bind while the group is open": [
        S("group", out="g"), S("iommufd", out="i"), S("cdev", out="a"),
        S("bind", "a", "i", expect=E.EBUSY), S("bind", "g", "i", expect=E.ENOTTY),
        S("close", "g"), S("bind", "a", "i", out="devid", expect=0),
        S("group", out="g2", expect=E.EBUSY),
    ],
    "second file while bound": [
        S("iommufd", out="i"), S("cdev", out="a"), S("bind", "a", "i", out="devid"),
        S("cdev", out="b"), S("bind", "b", "i", expect=E.EINVAL), S("bind", "b", 999, expect=E.EBADF),
        S("info", "b", expect=E.EINVAL), S("close", "a"), S("bind", "b", "i", out="devid2", expect=0),
    ],
    "attach to an unknown id": [
        S("iommufd", out="i"), S("cdev", out="a"), S("bind", "a", "i", out="devid"),
        S("attach", "a", 77, expect=E.ENOENT), S("attach", "a", "devid", expect=E.EINVAL),
        S("ioas", "i", out="x"), S("attach", "a", "x", argsz=11, expect=E.EINVAL),
        S("attach", "a", "x", flags=1, expect=E.EINVAL), S("attach", "a", "x", out="hwpt", expect=0),
    ],
    "re-attach replaces": [
        S("iommufd", out="i"), S("cdev", out="a"), S("bind", "a", "i", out="devid"), S("ioas", "i", out="x"),
        S("attach", "a", "x", out="hwpt"), S("attach", "a", "x", out="same"), S("attach", "a", "hwpt"),
        S("ioas", "i", out="y"), S("attach", "a", "y", out="hwpt_y"),
        S("attach", "a", "hwpt", expect=E.ENOENT),  # the replaced automatic HWPT is gone
        S("destroy", "i", "y", expect=E.EBUSY), S("attach", "a", "x", out="hwpt_again"),
        S("destroy", "i", "y", expect=0), S("destroy", "i", "x", expect=E.EBUSY),
        S("destroy", "i", "devid", expect=E.EBUSY),
    ],
    "detach when detached": [
        S("iommufd", out="i"), S("cdev", out="a"), S("bind", "a", "i", out="devid"),
        S("detach", "a", expect=0), S("ioas", "i", out="x"), S("attach", "a", "x", out="hwpt"),
        S("detach", "a", expect=0), S("detach", "a", expect=0), S("detach", "a", flags=1, expect=E.EINVAL),
        S("destroy", "i", "x", expect=0),
    ],
    "close while attached": [
        S("iommufd", out="i"), S("cdev", out="a"), S("bind", "a", "i", out="devid"), S("ioas", "i", out="x"),
        S("attach", "a", "x", out="hwpt"), S("dup", "a", out="a2"), S("close", "a"),
        S("group", out="g", expect=E.EBUSY),  # the dup keeps the file bound
        S("close", "a2"), S("group", out="g2", expect=0), S("close", "g2"),
        S("destroy", "i", "devid", expect=E.ENOENT), S("cdev", out="b"), S("bind", "b", "i", out="devid2"),
        S("attach", "b", "x", out="hwpt2"),  # the IOAS outlived the device
    ],
    "iommufd closed while bound": [
        S("iommufd", out="i"), S("cdev", out="a"), S("bind", "a", "i", out="devid"), S("ioas", "i", out="x"),
        S("close", "i"), S("attach", "a", "x", out="hwpt", expect=0), S("close", "a"),
        S("group", out="g", expect=0),
    ],
    "KVM ADD of a cdev": [
        S("vm", out="vm"), S("kvmdev", "vm", out="kv"), S("cdev", out="a"),
        S("add", "kv", "a", expect=0), S("add", "kv", "a", expect=E.EEXIST),
        S("iommufd", out="i"), S("bind", "a", "i", out="devid", expect=0),
        S("del", "kv", "a", expect=0), S("add", "kv", "a", expect=0),
    ],
    "KVM ADD of a dup'd fd": [
        S("vm", out="vm"), S("kvmdev", "vm", out="kv"), S("cdev", out="a"), S("dup", "a", out="a2"),
        S("add", "kv", "a", expect=0), S("add", "kv", "a2", expect=E.EEXIST),
        S("cdev", out="b"), S("add", "kv", "b", expect=0),  # a second open is a second file
        S("del", "kv", "a2", expect=0), S("del", "kv", "a", expect=E.ENOENT),
    ],
    "KVM ADD of a non-VFIO fd": [
        S("vm", out="vm"), S("kvmdev", "vm", out="kv"), S("iommufd", out="i"),
        S("add", "kv", "i", expect=E.EINVAL), S("add", "kv", "vm", expect=E.EINVAL),
        S("add", "kv", "kv", expect=E.EINVAL), S("add", "kv", 999, expect=E.EBADF),
        S("add", "kv", -1, expect=E.EBADF), S("add", "kv", None, expect=E.EFAULT),
    ],
    "KVM DEL of an absent file": [
        S("vm", out="vm"), S("kvmdev", "vm", out="kv"), S("cdev", out="a"), S("iommufd", out="i"),
        S("del", "kv", "a", expect=E.ENOENT), S("del", "kv", "i", expect=E.ENOENT),
        S("del", "kv", 999, expect=E.EBADF),
    ],
    "group reopen while KVM holds it": [
        S("vm", out="vm"), S("kvmdev", "vm", out="kv"), S("group", out="g"), S("add", "kv", "g", expect=0),
        S("close", "g"), S("group", out="g2", expect=E.EBUSY),
        S("iommufd", out="i"), S("cdev", out="a"), S("bind", "a", "i", expect=E.EBUSY),
        S("close", "kv"), S("group", out="g3", expect=0), S("close", "g3"),
        S("bind", "a", "i", out="devid", expect=0),
    ],
    "bound cdev held by KVM after close": [
        S("vm", out="vm"), S("kvmdev", "vm", out="kv"), S("iommufd", out="i"), S("cdev", out="a"),
        S("bind", "a", "i", out="devid"), S("add", "kv", "a"), S("close", "a"),
        S("group", out="g", expect=E.EBUSY), S("cdev", out="b"), S("bind", "b", "i", expect=E.EINVAL),
        S("close", "kv"), S("bind", "b", "i", out="devid2", expect=0),
    ],
    "KVM attributes": [
        S("vm", out="vm"), S("kvmdev", "vm", out="kv"),
        S("has", "kv", 1, ADD, expect=0), S("has", "kv", 1, DEL, expect=0), S("has", "kv", 1, 3, expect=E.ENXIO),
        S("has", "kv", 2, ADD, expect=E.ENXIO), S("get", "kv", 1, ADD, expect=E.EPERM),
        S("set", "kv", 1, 3, None, expect=E.ENXIO), S("set", "kv", 2, ADD, None, expect=E.ENXIO),
    ],
    "KVM VM and its VFIO device": [
        S("vm", out="vm"), S("kvmdev", "vm", out="kv", expect=0), S("kvmdev", "vm", out="kv2", expect=E.EBUSY),
        S("kvmdev", "vm", out="t", test=True, expect=0), S("kvmdev", "vm", out="t2", type=3, expect=E.ENODEV),
        S("iommufd", out="i"), S("cdev", out="a"), S("bind", "a", "i", out="devid"),
        S("ioas", "i", out="x"), S("attach", "a", "x", out="hwpt"), S("add", "kv", "a", expect=0),
        S("close", "kv"), S("kvmdev", "vm", out="kv3", expect=0), S("add", "kv3", "a", expect=0),
    ],
}


class Runner:
    """Runs one case on the guest and on fresh models, step by step."""

    def __init__(self, call: Callable[..., Any], cdev: str, group: int) -> None:
        self.call = call
        self.cdev = cdev
        self.group = group
        self.vfio = VfioCdevModel()
        self.vfio.add_device(DEVICE, group)
        self.kvm = KvmVfioModel(self.vfio)
        self.fds: dict[str, int] = {}
        self.ids: dict[str, int] = {}

    def fd(self, arg: Any) -> Any:
        return self.fds.get(arg, -1) if isinstance(arg, str) else arg

    def oid(self, arg: Any) -> Any:
        return self.ids[arg] if isinstance(arg, str) else arg

    def kernel(self, step: Step) -> tuple[int, Any]:
        """Run ``step`` in the guest: (errno, returned value or None)."""
        op, a, kw = step.op, step.args, step.kw
        fd = self.fd
        if op == "iommufd":
            r = self.call("iommufd.open")
            return r["errno"], r["fd"]
        if op == "cdev":
            r = self.call("vfio.open_cdev", path=self.cdev)
            return r["errno"], r["fd"]
        if op == "group":
            r = self.call("vfio.open_group", group=self.group)
            return r["errno"], r["fd"]
        if op == "vm":
            r = self.call("kvm.create_vm")
            assert r["errno"] or r["api_version"] == 12, r
            return r["errno"], r["fd"]
        if op == "kvmdev":
            r = self.call("kvm.create_device", vm_fd=fd(a[0]), **kw)
            return r["errno"], r["fd"] if r["fd"] >= 0 else None
        if op == "dup":
            r = self.call("fd.dup", fd=fd(a[0]))
            return r["errno"], r["fd"]
        if op == "close":
            return self.call("fd.close", fd=fd(a[0]))["errno"], None
        if op == "ioas":
            r = self.call("iommufd.ioas_alloc", fd=fd(a[0]))
            return r["errno"], r["ioas_id"]
        if op == "destroy":
            return self.call("iommufd.destroy", fd=fd(a[0]), id=self.oid(a[1]))["errno"], None
        if op == "bind":
            r = self.call("vfio.bind_iommufd", fd=fd(a[0]), iommufd=fd(a[1]), **kw)
            return r["errno"], r["devid"]
        if op == "attach":
            r = self.call("vfio.attach_pt", fd=fd(a[0]), pt_id=self.oid(a[1]), **kw)
            return r["errno"], r["pt_id"]
        if op == "detach":
            return self.call("vfio.detach_pt", fd=fd(a[0]), **kw)["errno"], None
        if op == "info":
            return self.call("vfio.get_info", fd=fd(a[0]))["errno"], None
        if op == "config_read":
            r = self.call("vfio.config_read", fd=fd(a[0]), offset=0, size=4)
            assert r["errno"] or r["value"] & 0xFFFF == 0x1B36, r  # QEMU's NVMe: vendor 0x1b36
            return r["errno"], None
        if op in ("add", "del", "set"):
            group, attr, target = (1, ADD if op == "add" else DEL, a[1]) if op != "set" else a[1:4]
            r = self.call("kvm.set_device_attr", dev_fd=fd(a[0]), group=group, attr=attr,
                          fd=None if target is None else fd(target))
            return r["errno"], None
        if op == "has":
            return self.call("kvm.has_device_attr", dev_fd=fd(a[0]), group=a[1], attr=a[2])["errno"], None
        if op == "get":
            return self.call("kvm.get_device_attr", dev_fd=fd(a[0]), group=a[1], attr=a[2])["errno"], None
        raise ValueError(f"unknown step op {op!r}")

    def model(self, step: Step, kernel_value: Any) -> tuple[int, Any]:
        """Run ``step`` on the models: (errno, predicted value or None). fds the
        kernel made are installed in the model under the same numbers."""
        op, a, kw = step.op, step.args, step.kw
        fd, v, k = self.fd, self.vfio, self.kvm
        new = kernel_value if isinstance(kernel_value, int) and kernel_value >= 0 else None
        calls: dict[str, Callable[[], Any]] = {
            "iommufd": lambda: v.open_iommufd(fd=new),
            "cdev": lambda: v.open_cdev(DEVICE, fd=new),
            "group": lambda: v.open_group(self.group, fd=new),
            "vm": lambda: k.create_vm(fd=new),
            "kvmdev": lambda: k.create_device(fd(a[0]), fd=new, **kw),
            "dup": lambda: v.dup(fd(a[0]), new_fd=new),
            "close": lambda: v.close(fd(a[0])),
            "ioas": lambda: v.ioas_alloc(fd(a[0])),
            "destroy": lambda: v.destroy(fd(a[0]), self.oid(a[1])),
            "bind": lambda: v.bind(fd(a[0]), fd(a[1]), **kw),
            "attach": lambda: v.attach(fd(a[0]), self.oid(a[1]), **kw),
            "detach": lambda: v.detach(fd(a[0]), **kw),
            "info": lambda: v.device_ioctl(fd(a[0]), "get_info"),
            "config_read": lambda: v.device_ioctl(fd(a[0]), "pread"),
            "add": lambda: k.set_attr(fd(a[0]), 1, ADD, None if a[1] is None else fd(a[1])),
            "del": lambda: k.set_attr(fd(a[0]), 1, DEL, None if a[1] is None else fd(a[1])),
            "set": lambda: k.set_attr(fd(a[0]), a[1], a[2], None if a[3] is None else fd(a[3])),
            "has": lambda: k.has_attr(fd(a[0]), a[1], a[2]),
            "get": lambda: k.get_attr(fd(a[0]), a[1], a[2]),
        }
        try:
            return 0, calls[op]()
        except OSError as exc:
            return exc.errno or 0, None
        except ValueError as exc:  # the model cannot judge: reported as a divergence
            return -1, f"model error: {exc}"

    def run(self, name: str, steps: list[Step]) -> list[str]:
        """Every step on both sides; the first divergence ends the case. Returns the
        problems (empty: the kernel did what the models said)."""
        out: list[str] = []
        for n, step in enumerate([S("group", out="_clean", expect=0), S("close", "_clean")] + steps):
            k_err, k_val = self.kernel(step)
            m_err, m_val = self.model(step, k_val)
            where = f"{name!r} step {n - 2} {step.op}{step.args}{step.kw or ''}"
            if n < 2:
                where = f"{name!r} precondition (group opens: device unbound, group closed)"
            if m_err < 0:
                out.append(f"{where}: kernel {E.errorcode.get(k_err, k_err) if k_err else 0}, {m_val}")
                break
            if k_err != m_err:
                out.append(f"{where}: model {E.errorcode.get(m_err, m_err) if m_err else 0}, "
                           f"kernel {E.errorcode.get(k_err, k_err) if k_err else 0}")
                break
            if not k_err and step.op in ("bind", "attach", "ioas") and k_val != m_val:
                out.append(f"{where}: model returned {m_val}, kernel {k_val}")
                break
            if step.expect is not None and m_err != step.expect:
                out.append(f"{where}: the table expects {E.errorcode.get(step.expect, step.expect)}, "
                           f"model and kernel gave {E.errorcode.get(m_err, m_err) if m_err else 0}")
                break
            if step.out is not None:
                if step.op in ("bind", "attach", "ioas"):
                    if not k_err:
                        self.ids[step.out] = k_val
                else:
                    self.fds[step.out] = k_val if not k_err and k_val is not None else -1
        return out


def test_vfio_cdev_and_kvm_vfio_lifecycles_match_the_models(no_leftovers: None, vm_factory: Callable[..., Any]) -> None:
    vm = vm_factory(SPEC, trace=False)
    call = vm.agent.call
    cpu = call("exec", argv=["sh", "-c", "grep -m1 -o AuthenticAMD /proc/cpuinfo; grep -m1 -ow svm /proc/cpuinfo;"
                                         " ls /dev/kvm /dev/iommu"])
    assert cpu["stdout"].split() == ["AuthenticAMD", "svm", "/dev/iommu", "/dev/kvm"], cpu

    found = call("vfio.find_nvme", serial="vfio0")
    assert found["errno"] == 0, found
    kernel_nvme = call("vfio.find_nvme", serial="kernel0")
    assert kernel_nvme["errno"] == 0 and kernel_nvme["bdf"] != found["bdf"], kernel_nvme
    bound = call("vfio.driver_override", bdf=found["bdf"])
    assert bound["errno"] == 0 and bound["previous_driver"] == "nvme", bound
    assert bound["cdev"].startswith("/dev/vfio/devices/vfio") and isinstance(bound["group"], int), bound

    problems: list[str] = []
    for name, steps in CASES.items():
        problems += Runner(call, bound["cdev"], bound["group"]).run(name, steps)
        closed = call("fd.close_all")
        assert closed["errno"] == 0

    devices = call("vfio.devices")["devices"]
    assert devices[found["bdf"]]["driver"] == "vfio-pci", devices[found["bdf"]]
    assert devices[kernel_nvme["bdf"]]["driver"] == "nvme"
    assert not problems, f"{len(problems)} of {len(CASES)} cases diverged:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_table_is_well_formed(name: str) -> None:
    """Every name a step uses was made by an earlier step; every op is known."""
    made: set[str] = set()
    known = {"iommufd", "cdev", "group", "vm", "kvmdev", "dup", "close", "ioas", "destroy", "bind", "attach",
             "detach", "info", "config_read", "add", "del", "set", "has", "get"}
    for step in CASES[name]:
        assert step.op in known, step
        for arg in step.args:
            assert not isinstance(arg, str) or arg in made, (name, step)
        if step.out is not None:
            made.add(step.out)
