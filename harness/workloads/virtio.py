"""virtio-blk and virtio-net behind the vIOMMU (guest side: guest_agent/block.py,
guest_agent/net.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import ConfigError
from harness.vm.agent import AgentChannel
from harness.workloads.base import (
    Workload,
    WorkloadFailed,
    _check_timeout,
    register,
)
from harness.workloads.nvme import NvmePattern


@dataclass(frozen=True)
class VirtioBlkPattern(NvmePattern):
    """:class:`NvmePattern` on a virtio-blk disk (``/dev/vda`` is the first
    virtio-blk device the guest probed), through the device-neutral op
    ``block.pattern_rw``; the ``virtio-blk-data`` check judges where its data went."""

    kind: ClassVar[str] = "virtio-blk-pattern"
    device: str = "/dev/vda"

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records = []
        for r in range(self.rounds):
            rec = agent.call("block.pattern_rw", timeout=self.timeout, device=self.device, offset=self.offset,
                             length=self.length, chunk=self.chunk, seed=self.seed + r, buffers=self.buffers)
            records.append({"op": "block.pattern_rw", **rec})
            if not rec.get("verified"):
                raise WorkloadFailed(f"data read back from {self.device} did not match what was written "
                                     f"(round {r}, chunks at offsets {rec.get('mismatches')[:8]})")
        return records


_MAC_RE = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
_IPV4_RE = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)")


@dataclass(frozen=True)
class VirtioNetEcho(Workload):
    """Echo packets through a virtio-net device: give the interface with MAC
    ``mac`` the address ``addr``/24, then send ``count`` ICMP echo requests of
    ``size`` payload bytes (a seeded pattern, different for every packet, at
    most ``window`` unanswered) to ``peer`` (QEMU's user-mode network answers
    at ``10.0.N.2``: :class:`harness.vm.virtio.VirtioNet`) and verify every
    reply's payload.  Each packet crosses the device twice (a TX and an RX
    buffer, each mapped through the IOMMU).  ``rounds`` repeats it (new seeds).
    The interface is brought down at the end, so the device does no DMA (an
    ARP refresh) after the guest's trace is collected.

    Raises WorkloadFailed if a packet was lost or came back different.
    """

    kind: ClassVar[str] = "virtio-net-echo"
    mac: str = "52:54:00:d4:a0:01"
    addr: str = "10.0.3.15"
    peer: str = "10.0.3.2"
    count: int = 256
    size: int = 1400
    window: int = 8
    rounds: int = 1
    seed: int = 1
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if not isinstance(self.mac, str) or not _MAC_RE.fullmatch(self.mac):
            raise ConfigError(f"mac must be a MAC address like 52:54:00:d4:a0:01, not {self.mac!r}", key="mac")
        for name in ("addr", "peer"):
            if not isinstance(getattr(self, name), str) or not _IPV4_RE.fullmatch(getattr(self, name)):
                raise ConfigError(f"{name} must be an IPv4 address, not {getattr(self, name)!r}", key=name)
        if not 1 <= self.count <= 65535:
            raise ConfigError(f"count must be 1..65535, not {self.count}", key="count")
        if not 1 <= self.size <= 1472:
            raise ConfigError(f"size must be 1..1472 bytes (one 1500-byte frame), not {self.size}", key="size")
        if not 1 <= self.window <= 64:
            raise ConfigError(f"window must be 1..64, not {self.window}", key="window")
        if not 1 <= self.rounds <= 1000:
            raise ConfigError(f"rounds must be 1..1000, not {self.rounds}", key="rounds")
        _check_timeout(self.timeout)

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        setup = agent.call("net.setup", timeout=self.timeout, mac=self.mac, addr=self.addr)
        records: list[dict[str, Any]] = [{"op": "net.setup", **setup}]
        for r in range(self.rounds):
            rec = agent.call("net.ping_pattern", timeout=self.timeout, iface=setup["iface"], peer=self.peer,
                             count=self.count, size=self.size, seed=self.seed + r, window=self.window,
                             reply_timeout=min(10.0, self.timeout))
            records.append({"op": "net.ping_pattern", **rec})
            if not rec.get("verified"):
                raise WorkloadFailed(f"echo through {setup['iface']} ({self.mac}) to {self.peer}: "
                                     f"{rec.get('lost_count')} of {self.count} packets lost, payload of "
                                     f"{len(rec.get('mismatches', []))} different (round {r})")
        # No DMA after the workload: the guest's trace is collected while it runs.
        records.append({"op": "net.down", **agent.call("net.down", timeout=self.timeout, iface=setup["iface"])})
        return records


@dataclass(frozen=True)
class VirtioMix(Workload):
    """Block and network I/O in one run: :class:`VirtioBlkPattern` on
    ``block_device`` (``block_length`` bytes in ``block_chunk`` I/Os, ``block_rounds``),
    then :class:`VirtioNetEcho` through the NIC with MAC ``net_mac``
    (``net_count`` packets of ``net_size`` bytes to ``net_peer``).  Either part
    is skipped with a length or count of 0."""

    kind: ClassVar[str] = "virtio-mix"
    block_device: str = "/dev/vda"
    block_length: int = 256 << 10
    block_chunk: int = 64 << 10
    block_rounds: int = 2
    block_buffers: int = 2
    net_mac: str = "52:54:00:d4:a0:01"
    net_addr: str = "10.0.3.15"
    net_peer: str = "10.0.3.2"
    net_count: int = 256
    net_size: int = 1400
    seed: int = 1
    timeout: float = 120.0

    def _parts(self) -> list[Workload]:
        parts: list[Workload] = []
        if self.block_length:
            parts.append(VirtioBlkPattern(device=self.block_device, length=self.block_length, chunk=self.block_chunk,
                                          rounds=self.block_rounds, buffers=self.block_buffers, seed=self.seed,
                                          timeout=self.timeout))
        if self.net_count:
            parts.append(VirtioNetEcho(mac=self.net_mac, addr=self.net_addr, peer=self.net_peer,
                                       count=self.net_count, size=self.net_size, seed=self.seed,
                                       timeout=self.timeout))
        return parts

    def __post_init__(self) -> None:
        try:
            parts = self._parts()
        except ConfigError as exc:
            prefix = "block_" if exc.key in {"device", "length", "chunk", "rounds", "buffers"} else "net_"
            key = exc.key if exc.key in ("seed", "timeout") else f"{prefix}{exc.key}"
            raise ConfigError(str(exc), key=key) from None
        if not parts:
            raise ConfigError("block_length and net_count are both 0: nothing to do", key="block_length")

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for part in self._parts():
            records += part.run(agent)
        return records



register(VirtioBlkPattern, VirtioNetEcho, VirtioMix)
