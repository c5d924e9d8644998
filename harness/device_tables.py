"""Devices from TOML tables: ``{"kind": "nvme", "serial": ..., "namespaces": [...]}``
-> the device objects of :mod:`harness.vm.devices`.

The config-file side of devices: ``harness/vm`` composes devices in code and knows
no file format; this module maps a ``kind`` to its class (``DEVICE_KINDS``) and
checks every key with :func:`harness.tables.from_table`, so an unknown, mistyped or
out-of-range key raises a :class:`~harness.errors.DeviceConfigError` whose ``key``
is its dotted path (``devices[1].namespaces[0].size_mib``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from harness.errors import DeviceConfigError
from harness.tables import from_table
from harness.vm.devices import DEVICE_KINDS, Device, NvmeController, NvmeNamespace


def device_from_table(table: dict[str, Any], where: str = "device") -> Device:
    """Build a device from ``{"kind": "nvme", ...}``; unknown kinds and keys are errors.

    Raises:
        DeviceConfigError: ``key`` names the offending key, prefixed with ``where``.
    """
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in DEVICE_KINDS:
        raise DeviceConfigError(f"{where}: unknown device kind {kind!r} (known: {', '.join(DEVICE_KINDS)})",
                                key=f"{where}.kind")
    cls = DEVICE_KINDS[kind]
    convert: Mapping[str, Callable[[Any, str], Any]] | None = (
        {"namespaces": _namespaces} if cls is NvmeController else None)
    return from_table(cls, table, where, error=DeviceConfigError, convert=convert)


def _namespaces(value: Any, path: str) -> tuple[NvmeNamespace, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DeviceConfigError(f"{path} must be a list of tables", key=path)
    return tuple(from_table(NvmeNamespace, v, f"{path}[{i}]", error=DeviceConfigError, ignore=())
                 for i, v in enumerate(value))
