"""Scenarios: a TOML file describing a machine, its devices and a workload.

Example (configs/intel-iommu-nvme.toml)::

    name = "intel-iommu-nvme"
    [machine]
    memory_mib = 1024
    [[devices]]
    kind = "intel-iommu"
    caching_mode = true
    [[devices]]
    kind = "nvme"
    serial = "dmaharness0"
    [workload]
    kind = "nvme-pattern"

Every key is checked: a missing required key, an unknown key or a value of the wrong
type raises :class:`~harness.errors.ConfigError` naming it. :meth:`Scenario.to_toml`
writes a config that reproduces the same VM (used for failure artifacts).
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from harness.errors import ConfigError, DeviceConfigError
from harness.device_tables import device_from_table
from harness.tables import check_type, from_table
from harness.vm.devices import Device, NvmeController
from harness.vm.spec import MachineSpec
from harness.vm.xen import XenHost
from harness.workloads import NvmePattern, Workload, workload_from_table

_TOP_KEYS = {"name", "description", "machine", "devices", "workload", "boot_timeout"}
MAX_CONFIG_BYTES = 1 << 20
"""A scenario file larger than this is refused unread (configs are a few hundred bytes)."""
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A scenario name: safe as a QEMU option value (``-name``: no comma) and as one path
component (artifacts go to ``<artifacts>/<name>``: no ``/``, never ``.`` or ``..``)."""
_NVME_DEVICE_RE = re.compile(r"/dev/nvme(\d+)n(\d+)")
MAX_CMDLINE = 1024
"""Characters of ``machine.cmdline``: x86 kernels take 2048, the harness's own
arguments (console, IOMMU, trace events) about 500 of them."""


@dataclass(frozen=True)
class Scenario:
    name: str
    machine: MachineSpec
    workload: Workload
    description: str = ""
    boot_timeout: float = 60.0

    def to_table(self) -> dict[str, Any]:
        m = self.machine.to_table()
        devices = m.pop("devices")
        return {"name": self.name, "description": self.description, "boot_timeout": self.boot_timeout,
                "machine": m, "devices": devices, "workload": self.workload.to_table()}

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.to_table()))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file.

    Raises ConfigError (with ``key`` set) for unreadable files, TOML syntax errors,
    missing/unknown/mistyped keys, unknown device or workload kinds, bad values.
    """
    p = Path(path)
    text = _read_config_text(p)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(p)) from None
    except RecursionError:
        raise ConfigError("invalid TOML: arrays or tables nested too deeply", source=str(p)) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"invalid TOML: {exc}", source=str(p)) from None
    try:
        return scenario_from_table(data)
    except ConfigError as exc:
        raise type(exc)(str(exc), key=exc.key, source=str(p)) from None


def _read_config_text(p: Path) -> str:
    """The text of a config file: a regular file of at most MAX_CONFIG_BYTES, UTF-8.

    Opened without blocking (a FIFO never hangs) and checked with ``fstat`` before a
    byte is read; at most MAX_CONFIG_BYTES + 1 bytes are ever read (``/dev/zero``).
    """
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=str(p)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"cannot read config: {_file_kind(mode)}, not a regular file", source=str(p))
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=str(p)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"cannot read config: larger than {MAX_CONFIG_BYTES >> 20} MiB", source=str(p))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start})", source=str(p)) from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {kind}"
    return "is a special file"


def _devices(tables: list[dict[str, Any]], path: str) -> tuple[Device, ...]:
    return tuple(device_from_table(d, f"devices[{i}]") for i, d in enumerate(tables))


def scenario_from_table(data: dict[str, Any]) -> Scenario:
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"unknown top-level key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})", key=key)
    for key in ("name", "workload"):
        if key not in data:
            raise ConfigError(f"missing required key {key!r}", key=key)
    if not isinstance(data["name"], str):
        raise ConfigError("name must be a string", key="name")
    if not NAME_RE.fullmatch(data["name"]):
        raise ConfigError(f"name must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit "
                          f"(it names the VM and its artifacts folder), not {data['name']!r}", key="name")
    if "description" in data and not isinstance(data["description"], str):
        raise ConfigError("description must be a string", key="description")
    machine = data.get("machine", {})
    if not isinstance(machine, dict):
        raise ConfigError("[machine] must be a table", key="machine")
    if "devices" in machine:
        raise ConfigError("devices go in top-level [[devices]] tables, not in [machine]", key="machine.devices")
    devices = data.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise ConfigError("devices must be an array of tables ([[devices]])", key="devices")
    spec = from_table(MachineSpec, {**machine, "devices": devices}, "machine", error=DeviceConfigError,
                      ignore=(), convert={"devices": _devices, "xen": _xen_host})
    _check_machine_strings(spec)
    wl = data["workload"]
    if not isinstance(wl, dict):
        raise ConfigError("[workload] must be a table", key="workload")
    timeout = data.get("boot_timeout", 60.0)
    check_type("boot_timeout", timeout, "float")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout) \
            or not 0 < timeout <= 3600:
        raise ConfigError(f"boot_timeout must be a finite number of seconds in (0, 3600], not {timeout!r}",
                          key="boot_timeout")
    workload = workload_from_table(wl)
    if isinstance(workload, NvmePattern):
        _check_nvme_target(workload, spec)
        if workload.chunk * workload.buffers > (spec.memory_mib << 20) // 4:
            raise ConfigError(f"workload.chunk * workload.buffers = {workload.chunk} * {workload.buffers} bytes of "
                              f"locked guest buffers exceed a quarter of machine.memory_mib = {spec.memory_mib}",
                              key="workload.chunk")
    return Scenario(name=data["name"], machine=spec, workload=workload,
                    description=str(data.get("description", "")), boot_timeout=float(timeout))


def _xen_host(value: Any, path: str) -> XenHost:
    """``[machine.xen]``: boot Xen with the kernel as dom0 (harness.vm.xen.XenHost)."""
    if not isinstance(value, dict):
        raise DeviceConfigError(f"{path} must be a table ([machine.xen])", key=path)
    return from_table(XenHost, value, path, error=DeviceConfigError, ignore=())


def _check_machine_strings(spec: MachineSpec) -> None:
    """Strings that go into QEMU's argv or name host files: no control characters
    (a NUL cannot be in an argv), and a ``kernel`` or ``initrd`` of the user's must
    be a regular file (QEMU would otherwise fail after it started; whether the
    kernel is a bzImage with what the machine needs is checked when it is read).

    Raises:
        DeviceConfigError: ``key`` is ``machine.<field>``.
    """
    for name in ("cpu", "kernel", "initrd", "cmdline"):
        value = getattr(spec, name)
        if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
            raise DeviceConfigError(f"machine.{name} must not hold control characters, not {value!r}",
                                    key=f"machine.{name}")
    if len(spec.cmdline) > MAX_CMDLINE:
        raise DeviceConfigError(f"machine.cmdline must be at most {MAX_CMDLINE} characters (the kernel's command "
                                f"line holds 2048 with the harness's own arguments), not {len(spec.cmdline)}",
                                key="machine.cmdline")
    for name in ("kernel", "initrd"):
        value = getattr(spec, name)
        if value is not None and not value:
            raise DeviceConfigError(f"machine.{name} must be a file path, not empty", key=f"machine.{name}")
    for name in ("kernel", "initrd"):
        value = getattr(spec, name)
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            raise DeviceConfigError(f"machine.{name} {value!r} does not exist", key=f"machine.{name}")
        if not path.is_file():
            raise DeviceConfigError(f"machine.{name} {value!r} is not a regular file", key=f"machine.{name}")


def _check_nvme_target(workload: NvmePattern, spec: MachineSpec) -> None:
    """An NVMe workload's device must exist in the machine and its I/O fit in the
    namespace: ``/dev/nvmeCnN`` is the C-th NVMe controller of ``[[devices]]`` (in
    order) and its N-th namespace by nsid (as Linux numbers them). Other device paths
    (``/dev/disk/by-id/...``) are not checked here.

    Raises:
        ConfigError: ``key`` names the workload key at fault.
    """
    match = _NVME_DEVICE_RE.fullmatch(workload.device)
    if match is None:
        if workload.device.startswith("/dev/nvme"):  # a partition, a character device: never there
            raise ConfigError(f"workload.device {workload.device!r} is no NVMe namespace's block device "
                              "(/dev/nvme<controller>n<namespace>, e.g. /dev/nvme0n1)", key="workload.device")
        return
    ctrl_index, ns_index = int(match[1]), int(match[2])
    controllers = [(i, d) for i, d in enumerate(spec.devices) if isinstance(d, NvmeController)]
    if ctrl_index >= len(controllers):
        raise ConfigError(f"workload.device {workload.device!r} names NVMe controller {ctrl_index}, but the machine "
                          f"has {len(controllers)} NVMe controller(s) in [[devices]]", key="workload.device")
    dev_index, ctrl = controllers[ctrl_index]
    by_nsid = sorted(range(len(ctrl.namespaces)), key=lambda i: ctrl.namespaces[i].nsid or i + 1)
    if not 1 <= ns_index <= len(by_nsid):
        raise ConfigError(f"workload.device {workload.device!r} names namespace {ns_index}, but devices[{dev_index}] "
                          f"has {len(by_nsid)} namespace(s)", key="workload.device")
    ns_pos = by_nsid[ns_index - 1]
    size = ctrl.namespaces[ns_pos].size_mib << 20
    if workload.offset + workload.length > size:
        raise ConfigError(f"workload.offset + workload.length = {workload.offset} + {workload.length} bytes "
                          f"go past the end of {workload.device} "
                          f"(devices[{dev_index}].namespaces[{ns_pos}].size_mib = "
                          f"{ctrl.namespaces[ns_pos].size_mib}, {size} bytes)", key="workload.offset")
