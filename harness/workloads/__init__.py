"""Workloads: what the guest does while the host observes. Each workload is a
frozen dataclass built from the ``[workload]`` table of a scenario, run against an
:class:`~harness.vm.agent.AgentChannel`, returning op records (JSON-able dicts:
what the guest did and what the kernel returned).

One module a family: :mod:`.nvme` (O_DIRECT on NVMe), :mod:`.agent_ops` (replay of
saved agent ops), :mod:`.iommufd` (NVMe through VFIO and iommufd from guest
userspace), :mod:`.virtio` (virtio-blk and virtio-net), :mod:`.xen` (Xen grants);
:mod:`.base` holds the base class and the registry.
"""

from __future__ import annotations

from typing import Any

from harness.errors import ConfigError
from harness.tables import from_table
from harness.workloads.agent_ops import AgentOps
from harness.workloads.base import WORKLOADS, Workload, WorkloadFailed
from harness.workloads.iommufd import IommufdVfioNvme
from harness.workloads.nvme import NvmePattern
from harness.workloads.virtio import VirtioBlkPattern, VirtioMix, VirtioNetEcho
from harness.workloads.xen import XenGrant

__all__ = ["WORKLOADS", "AgentOps", "IommufdVfioNvme", "NvmePattern", "VirtioBlkPattern", "VirtioMix",
           "VirtioNetEcho", "Workload", "WorkloadFailed", "XenGrant", "workload_from_table"]


def workload_from_table(table: dict[str, Any]) -> Workload:
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in WORKLOADS:
        raise ConfigError(f"unknown workload kind {kind!r} (known: {', '.join(WORKLOADS)})", key="workload.kind")
    return from_table(WORKLOADS[kind], table, "workload", convert={"ops": _ops})


def _ops(value: Any, path: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path} must be an array of tables", key=path)
    return tuple(value)
