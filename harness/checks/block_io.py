"""Did the guest's block I/O reach the device? The guest agent's op records say
which byte ranges of a namespace the guest wrote and read back with O_DIRECT; the
NVMe controller's trace (``pci_nvme_write`` / ``pci_nvme_read``: ``lba``, ``nlb``
blocks, ``count`` bytes; hw/nvme/ctrl.c nvme_rw) says which ranges it moved by DMA.
Every guest byte must be covered by a device command of the same direction: O_DIRECT
bypasses the page cache, so anything less means the I/O did not take the DMA path
under test (or the trace missed it). Pure code: records and events in, a report out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.trace.events import Event, NvmeRead, NvmeWrite

Range = tuple[int, int]  # [start, end) in bytes of a namespace

_NS = re.compile(r"nvme\d+n(\d+)$")


def _union(ranges: Iterable[Range]) -> list[Range]:
    out: list[Range] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _missing(wanted: Iterable[Range], covered: list[Range]) -> list[Range]:
    """The parts of ``wanted`` not inside ``covered`` (a sorted, merged union)."""
    gaps: list[Range] = []
    for start, end in _union(wanted):
        pos = start
        for c_start, c_end in covered:
            if c_end <= pos:
                continue
            if c_start >= end:
                break
            if c_start > pos:
                gaps.append((pos, c_start))
            pos = max(pos, c_end)
            if pos >= end:
                break
        if pos < end:
            gaps.append((pos, end))
    return gaps


@dataclass
class BlockIoReport:
    """Bytes the guest wrote/read per namespace id, bytes the device moved, and the
    guest byte ranges no device command covered (``missing_writes``/``missing_reads``,
    ``(nsid, start, end)``, bytes)."""

    guest_written: int = 0
    guest_read: int = 0
    device_written: int = 0
    device_read: int = 0
    missing_writes: list[tuple[int, int, int]] = field(default_factory=list)
    missing_reads: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing_writes and not self.missing_reads

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "guest_written": self.guest_written, "guest_read": self.guest_read,
                "device_written": self.device_written, "device_read": self.device_read,
                "missing_writes": self.missing_writes, "missing_reads": self.missing_reads}

    def format(self) -> str:
        head = (f"guest block I/O at the device: {'OK' if self.ok else 'MISSING'} (guest wrote "
                f"{self.guest_written} B, read {self.guest_read} B; NVMe commands wrote {self.device_written} B, "
                f"read {self.device_read} B)")
        lines = [head]
        for what, command, gaps in (("written", "write", self.missing_writes),
                                    ("read", "read", self.missing_reads)):
            for nsid, start, end in gaps[:10]:
                lines.append(f"  nsid {nsid}: bytes [{start:#x}, {end:#x}) {what} by the guest reached no "
                             f"NVMe {command} command")
        return "\n".join(lines)


class BlockIoCollector:
    """Feed trace events (any, in order); :meth:`finish` compares with op records."""

    def __init__(self) -> None:
        self._writes: dict[int, list[Range]] = {}
        self._reads: dict[int, list[Range]] = {}

    def feed(self, event: Event) -> None:
        kind = type(event)
        if kind is NvmeWrite:
            assert isinstance(event, NvmeWrite)
            if "ZEROES" in event.opname.upper() or event.nlb == 0:
                return
            self._writes.setdefault(event.nsid, []).append(_bytes(event.lba, event.nlb, event.count))
        elif kind is NvmeRead:
            assert isinstance(event, NvmeRead)
            if event.nlb:
                self._reads.setdefault(event.nsid, []).append(_bytes(event.lba, event.nlb, event.count))

    def finish(self, records: Iterable[Mapping[str, Any]]) -> BlockIoReport:
        """``records``: the guest agent's ``nvme.pattern_rw`` results (device, offset,
        length, verified); other records are ignored."""
        report = BlockIoReport()
        wanted: dict[int, list[Range]] = {}
        for rec in records:
            if rec.get("op") != "nvme.pattern_rw":
                continue
            m = _NS.search(str(rec.get("device", "")))
            nsid = int(m.group(1)) if m else 1
            start, length = int(rec["offset"]), int(rec["length"])
            wanted.setdefault(nsid, []).append((start, start + length))
            report.guest_written += length
            report.guest_read += length
        report.device_written = sum(e - s for r in self._writes.values() for s, e in r)
        report.device_read = sum(e - s for r in self._reads.values() for s, e in r)
        for nsid, ranges in sorted(wanted.items()):
            for start, end in _missing(ranges, _union(self._writes.get(nsid, []))):
                report.missing_writes.append((nsid, start, end))
            for start, end in _missing(ranges, _union(self._reads.get(nsid, []))):
                report.missing_reads.append((nsid, start, end))
        return report


def _bytes(lba: int, nlb: int, count: int) -> Range:
    lba_size = count // nlb
    return (lba * lba_size, lba * lba_size + count)
