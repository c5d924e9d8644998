"""O_DIRECT block I/O on an NVMe namespace (guest side: guest_agent/nvme.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import ConfigError
from harness.vm.agent import AgentChannel
from harness.workloads.base import (
    _DEVICE_RE,
    Workload,
    WorkloadFailed,
    _check_timeout,
    register,
)


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




register(NvmePattern)
