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
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from harness.errors import ConfigError, DeviceConfigError
from harness.device_tables import device_from_table
from harness.tables import from_table
from harness.vm.devices import Device
from harness.vm.spec import MachineSpec
from harness.workloads import Workload, workload_from_table

_TOP_KEYS = {"name", "description", "machine", "devices", "workload", "boot_timeout"}


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
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=str(p)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(p)) from None
    try:
        return scenario_from_table(data)
    except ConfigError as exc:
        raise type(exc)(str(exc), key=exc.key, source=str(p)) from None


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
    machine = data.get("machine", {})
    if not isinstance(machine, dict):
        raise ConfigError("[machine] must be a table", key="machine")
    if "devices" in machine:
        raise ConfigError("devices go in top-level [[devices]] tables, not in [machine]", key="machine.devices")
    devices = data.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise ConfigError("devices must be an array of tables ([[devices]])", key="devices")
    spec = from_table(MachineSpec, {**machine, "devices": devices}, "machine", error=DeviceConfigError,
                      ignore=(), convert={"devices": _devices})
    wl = data["workload"]
    if not isinstance(wl, dict):
        raise ConfigError("[workload] must be a table", key="workload")
    timeout = data.get("boot_timeout", 60.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout) \
            or not 0 < timeout <= 3600:
        raise ConfigError(f"boot_timeout must be a finite number of seconds in (0, 3600], not {timeout!r}",
                          key="boot_timeout")
    return Scenario(name=data["name"], machine=spec, workload=workload_from_table(wl),
                    description=str(data.get("description", "")), boot_timeout=float(timeout))
