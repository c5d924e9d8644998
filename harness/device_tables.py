"""Devices from TOML tables: ``{"kind": "nvme", "serial": ..., "namespaces": [...]}``
-> the device objects of :mod:`harness.vm.devices`.

The config-file side of devices: ``harness/vm`` composes devices in code and knows
no file format; this module maps a ``kind`` to its class (``DEVICE_KINDS``) and
checks every key with :func:`harness.tables.from_table`, so an unknown, mistyped or
out-of-range key raises a :class:`~harness.errors.DeviceConfigError` whose ``key``
is its dotted path (``devices[1].namespaces[0].size_mib``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from harness.errors import DeviceConfigError
from harness.tables import from_table
from harness.vm.devices import DEVICE_KINDS, Device, NvmeController, NvmeNamespace

ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,31}")
"""A device id: QEMU's rule for ids (a letter, then letters, digits, ``-._``), also
safe in the host file names it gives (``<id>n1.img``) and inside QEMU option values."""
MAX_NSID = 256
"""QEMU's emulated NVMe controller serves namespace ids 1..256 (NVME_MAX_NAMESPACES)."""


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
    device = from_table(cls, table, where, error=DeviceConfigError, convert=convert)
    device_id = getattr(device, "id", None)
    if device_id is not None and (not isinstance(device_id, str) or not ID_RE.fullmatch(device_id)):
        raise DeviceConfigError(f"{where}.id must be 1-32 characters of [A-Za-z0-9._-] starting with a letter, "
                                f"not {device_id!r}", key=f"{where}.id")
    return device


def _namespaces(value: Any, path: str) -> tuple[NvmeNamespace, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DeviceConfigError(f"{path} must be a list of tables", key=path)
    namespaces = tuple(from_table(NvmeNamespace, v, f"{path}[{i}]", error=DeviceConfigError, ignore=())
                       for i, v in enumerate(value))
    for i, ns in enumerate(namespaces):
        if (ns.nsid or i + 1) > MAX_NSID:
            raise DeviceConfigError(f"{path}[{i}].nsid must be 1..{MAX_NSID}, not {ns.nsid or i + 1}",
                                    key=f"{path}[{i}].nsid")
    return namespaces
