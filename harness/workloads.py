"""Workloads: what the guest does while the host observes. Each workload is a
frozen dataclass built from the ``[workload]`` table of a scenario, run against an
:class:`~harness.vm.agent.AgentChannel`, returning op records (JSON-able dicts:
what the guest did and what the kernel returned)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import ConfigError, HarnessError
from harness.tables import from_table
from harness.vm.agent import AgentChannel


class WorkloadFailed(HarnessError):
    """The guest-side operation did not do what it should (e.g. data did not verify)."""


_DEVICE_RE = re.compile(r"/dev/[A-Za-z0-9._+:@/-]{1,200}")


def _check_timeout(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 86400:
        raise ConfigError(f"timeout must be a finite number of seconds in (0, 86400], not {value!r}", key="timeout")


@dataclass(frozen=True)
class Workload:
    kind: ClassVar[str] = ""

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        raise NotImplementedError

    def to_table(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@dataclass(frozen=True)
class NvmePattern(Workload):
    """Write a seeded pattern to an NVMe namespace with O_DIRECT, read it back and verify.

    ``device`` (guest path), ``offset``/``length``/``chunk`` (bytes, multiples of 4096),
    ``rounds`` (repetitions, each with a new seed), ``seed``, ``buffers`` (chunk-sized
    buffers the I/Os rotate through: with more than one, iovas are remapped to other
    pages between I/Os, which exposes stale IOTLB entries).
    """

    kind: ClassVar[str] = "nvme-pattern"
    device: str = "/dev/nvme0n1"
    offset: int = 0
    length: int = 1 << 20
    chunk: int = 1 << 16
    rounds: int = 2
    seed: int = 1
    buffers: int = 2
    timeout: float = 120.0
    """Seconds each round may take in the guest before it is reported hung."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device) \
                or ".." in self.device.split("/"):
            raise ConfigError(f"device must be a block device path under /dev/ (e.g. /dev/nvme0n1), "
                              f"not {self.device!r}", key="device")
        for name in ("offset", "length", "chunk"):
            value = getattr(self, name)
            if value < 0 or value % 4096:
                raise ConfigError(f"{name} must be a non-negative multiple of 4096, not {value}", key=name)
        for name in ("length", "chunk"):
            if getattr(self, name) == 0:
                raise ConfigError(f"{name} must be > 0", key=name)
        _check_timeout(self.timeout)
        if not 1 <= self.buffers <= 64:
            raise ConfigError(f"buffers must be 1..64, not {self.buffers}", key="buffers")
        if not 1 <= self.rounds <= 1000:
            raise ConfigError(f"rounds must be 1..1000, not {self.rounds}", key="rounds")

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records = []
        for r in range(self.rounds):
            rec = agent.call("nvme.pattern_rw", timeout=self.timeout, device=self.device, offset=self.offset,
                             length=self.length, chunk=self.chunk, seed=self.seed + r, buffers=self.buffers)
            records.append({"op": "nvme.pattern_rw", **rec})
            if not rec.get("verified"):
                raise WorkloadFailed(f"data read back from {self.device} did not match what was written "
                                     f"(round {r}, chunks at offsets {rec.get('mismatches')[:8]})")
        return records


@dataclass(frozen=True)
class AgentOps(Workload):
    """Replay guest agent ops in order: ``ops`` is a list of ``{"op": name, "args": {...}}``
    (what a pytest test ran through ``vm.agent``, saved in its failure artifacts).
    Each op's result is returned as a record ``{"op": name, **result}``."""

    kind: ClassVar[str] = "agent-ops"
    ops: tuple[dict[str, Any], ...] = ()
    timeout: float = 120.0

    def __post_init__(self) -> None:
        _check_timeout(self.timeout)
        ops = _agent_ops()
        for i, entry in enumerate(self.ops):
            if not isinstance(entry, dict) or not isinstance(entry.get("op"), str) \
                    or not isinstance(entry.get("args", {}), dict) or set(entry) - {"op", "args"}:
                raise ConfigError(f"ops[{i}] must be a table with a string 'op' and an 'args' table", key=f"ops[{i}]")
            handler = ops.get(entry["op"])
            if handler is None:
                raise ConfigError(f"ops[{i}]: unknown guest agent op {entry['op']!r} (known: {', '.join(sorted(ops))})",
                                  key=f"ops[{i}].op")
            try:
                inspect.signature(handler).bind(**entry.get("args", {}))
            except TypeError as exc:
                raise ConfigError(f"ops[{i}]: arguments of {entry['op']!r} do not fit it: {exc}",
                                  key=f"ops[{i}].args") from None

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records = []
        for entry in self.ops:
            result = agent.call(entry["op"], timeout=self.timeout, **entry.get("args", {}))
            records.append({"op": entry["op"], **(result if isinstance(result, dict) else {"result": result})})
        return records

    def to_table(self) -> dict[str, Any]:
        return {"kind": self.kind, "ops": [dict(e) for e in self.ops], "timeout": self.timeout}


def _agent_ops() -> dict[str, Callable[..., Any]]:
    """The guest agent's ops by name (the agent baked into the guest is this package)."""
    from guest_agent import nvme, system, tracefs  # noqa: F401  (registers the ops)
    from guest_agent.protocol import OPS
    return dict(OPS)


WORKLOADS: dict[str, type[Workload]] = {cls.kind: cls for cls in (NvmePattern, AgentOps)}


def workload_from_table(table: dict[str, Any]) -> Workload:
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in WORKLOADS:
        raise ConfigError(f"unknown workload kind {kind!r} (known: {', '.join(WORKLOADS)})", key="workload.kind")
    return from_table(WORKLOADS[kind], table, "workload", convert={"ops": _ops})


def _ops(value: Any, path: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path} must be an array of tables", key=path)
    return tuple(value)
