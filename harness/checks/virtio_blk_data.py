"""Did the guest's O_DIRECT data on a virtio-blk disk land where the guest put
it?  The virtio-blk counterpart of :mod:`harness.checks.block_data`.

Evidence, none of it from the device under test:

* the guest agent's op records (``block.pattern_rw`` on ``/dev/vdX``): each
  O_DIRECT I/O (``io`` id, ``dir``, byte ``pos``, ``len``) and the
  guest-physical pages of its buffer (``buffers_pages``, /proc/self/pagemap);
* the guest kernel's trace: the agent's markers around each I/O and, between
  them, the DMA-API maps of each virtio-blk request the driver queued
  (:func:`harness.checks.virtio_blk.guest_blk_requests`: header, data
  segments with their iovas, status).

Each guest request is found in QEMU's trace through its ``virtio-blk-submit``
sync pair (:mod:`harness.checks.sync`: the n-th request of (source id,
direction, bytes) on each side), so requests are matched to the workload's
I/Os in time order.  QEMU's ``virtio_blk_handle_{read,write}`` gives the
request's first sector; the translations QEMU made while popping its element
(:class:`harness.checks.virtio_blk.VirtioElementTracker`) give, for every
data iova the guest handed the device, the guest-physical page QEMU reached.
Byte ``sector * 512 - pos + k`` of the I/O is in buffer page
``(sector * 512 - pos + k) // 4096``: each data page's translation must land
there.

Divergence kinds: ``data-wrong-page`` (a data iova translated to another
page than the buffer's), ``data-pages-missing`` (a data iova the element's
mapping never translated), ``io-not-at-device`` (a request QEMU never handled,
or bytes of an I/O no request of it moved), ``command-outside-io`` (a
request's sectors outside its I/O).  Counts per device
(``pages_checked_by_sid``).  Inconclusive when there is no I/O record, no
marker, no guest log, or no page was checked.

Pure code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from harness.checks.block_data import IoRecord, _gaps, pattern_ios
from harness.checks.sync import VIRTIO_BLK_SUBMIT, SyncPairs
from harness.checks.verdict import CheckReport, DivergenceLog, TraceLine
from harness.checks.virtio_blk import SECTOR, GuestBlkRequest, HostBlkRequest, VirtioElementTracker, guest_blk_requests
from harness.trace.events import Event, MalformedEvent
from harness.trace.guest import GuestEvent, GuestMarker

__all__ = ["CHECKER", "DATA_WRONG_PAGE", "DATA_PAGES_MISSING", "IO_NOT_AT_DEVICE", "COMMAND_OUTSIDE_IO",
           "VirtioBlkDataCounts", "VirtioBlkDataChecker", "virtio_ios_from_records", "is_virtio_disk"]

CHECKER: Final = "virtio-blk-data"
TITLE: Final = "guest O_DIRECT data on virtio-blk against the device's translations (buffer pages from pagemap)"
DATA_WRONG_PAGE: Final = "data-wrong-page"
DATA_PAGES_MISSING: Final = "data-pages-missing"
IO_NOT_AT_DEVICE: Final = "io-not-at-device"
COMMAND_OUTSIDE_IO: Final = "command-outside-io"

_PAGE: Final = 4096
_BEGIN: Final = re.compile(r"dma-harness io (\d+) begin (read|write) pos=(\d+) len=(\d+)$")
_END: Final = re.compile(r"dma-harness io (\d+) end$")
_VIRTIO_DISK: Final = re.compile(r"/dev/vd[a-z]+")


def is_virtio_disk(device: str) -> bool:
    """``/dev/vda``, ``/dev/vdb``...: the names Linux gives virtio-blk disks."""
    return bool(_VIRTIO_DISK.fullmatch(device))


def virtio_ios_from_records(records: Iterable[Mapping[str, Any]]) -> list[IoRecord]:
    """The I/Os of pattern op records (``block.pattern_rw``, ``nvme.pattern_rw``)
    on a virtio-blk disk; other records are ignored."""
    return pattern_ios(rec for rec in records if rec.get("op") in ("block.pattern_rw", "nvme.pattern_rw")
                       and is_virtio_disk(str(rec.get("device", ""))))


@dataclass
class VirtioBlkDataCounts:
    ios: int = 0
    """O_DIRECT I/Os on virtio-blk disks the agent recorded."""
    ios_checked: int = 0
    requests: int = 0
    """Guest virtio-blk data requests inside an I/O's markers."""
    requests_at_device: int = 0
    """Of those, requests QEMU handled (paired with a ``virtio_blk_handle_*``)."""
    pages_checked: int = 0
    pages_checked_by_sid: str = ""
    """``sid=count`` of the data pages checked, per device (PCI source id)."""
    bytes_written_checked: int = 0
    bytes_read_checked: int = 0
    guest_phys_mismatches: int = 0
    """Data segments whose guest-physical page (the guest's own dma_map_page) is not
    the agent's buffer page (a guest-side inconsistency; warned about)."""


class VirtioBlkDataChecker:
    """``ios``: from :func:`virtio_ios_from_records`; ``guest``: the guest's
    events; ``sync``: the run's pairs (built with virtio pairs).  Feed QEMU's
    events in order, then :meth:`finish`."""

    def __init__(self, ios: Sequence[IoRecord], guest: Sequence[GuestEvent], sync: SyncPairs, *,
                 max_divergences: int = 20, context: int = 4) -> None:
        self.counts = VirtioBlkDataCounts(ios=len(ios))
        self._log = DivergenceLog(max_divergences=max_divergences, context=context)
        self._ios = {io.io: io for io in ios}
        self._guest_has_events = bool(guest)
        self._markers = 0
        self._by_io: dict[int, list[GuestBlkRequest]] = {}
        self._collect(guest)
        host_of = {p.origin: p.host for p in sync.pairs if p.kind == VIRTIO_BLK_SUBMIT}
        self._host_line: dict[int, int] = {}  # guest header position -> host line
        wanted: set[int] = set()
        for reqs in self._by_io.values():
            for r in reqs:
                line = host_of.get(r.header_pos)
                if line is not None:
                    self._host_line[r.header_pos] = line
                    wanted.add(line)
        self._wanted = wanted
        self._host: dict[int, HostBlkRequest] = {}  # host line -> request
        self._tracker = VirtioElementTracker()
        self._malformed = 0
        self._by_sid: dict[int, int] = {}
        self._report: CheckReport | None = None

    def _collect(self, guest: Sequence[GuestEvent]) -> None:
        spans: list[tuple[int, int, IoRecord]] = []
        open_io: tuple[int, IoRecord] | None = None
        for pos, e in enumerate(guest):
            if not isinstance(e, GuestMarker):
                continue
            m = _BEGIN.match(e.text)
            if m is not None:
                self._markers += 1
                io = self._ios.get(int(m.group(1)))
                open_io = (pos, io) if io is not None else None
                continue
            if _END.match(e.text) is not None and open_io is not None:
                spans.append((open_io[0], pos, open_io[1]))
                open_io = None
        if not spans:
            return
        for req in guest_blk_requests(guest):
            for begin, end, io in spans:
                if begin < req.header_pos < end:
                    self._by_io.setdefault(io.io, []).append(req)
                    self.counts.requests += 1
                    break

    def feed(self, event: Event) -> None:
        self._log.seen(event)
        req = self._tracker.feed(event)
        if req is not None and req.complete is None and event.lineno in self._wanted:
            self._host[event.lineno] = req
            self.counts.requests_at_device += 1
        elif type(event) is MalformedEvent:
            assert isinstance(event, MalformedEvent)
            if event.trace_name.startswith(("virtio", "vtd_dmar_translate")):
                self._malformed += 1

    def feed_all(self, events: Iterable[Event]) -> None:
        for e in events:
            self.feed(e)

    def finish(self) -> CheckReport:
        if self._report is not None:
            return self._report
        c = self.counts
        if self._guest_has_events and self._markers:
            for io_id, io in sorted(self._ios.items()):
                self._judge_io(io, self._by_io.get(io_id, []))
        c.pages_checked_by_sid = " ".join(f"{sid:#06x}={n}" for sid, n in sorted(self._by_sid.items()))
        inconclusive: list[str] = []
        if not self._ios:
            inconclusive.append("the workload recorded no O_DIRECT I/O on a virtio-blk disk")
        elif not self._guest_has_events:
            inconclusive.append("the guest kernel's event log is missing")
        elif not self._markers:
            inconclusive.append("no I/O marker in the guest's trace")
        elif not c.pages_checked:
            inconclusive.append("no data page was checked")
        if self._malformed:
            inconclusive.append(f"{self._malformed} virtio_*/vtd_dmar_translate lines of QEMU's trace "
                                "could not be parsed")
        warnings: list[str] = []
        if c.guest_phys_mismatches:
            warnings.append(f"{c.guest_phys_mismatches} data segments were mapped by the guest from another "
                            "page than the agent's buffer page (pagemap)")
        self._report = self._log.report(CHECKER, c, inconclusive=inconclusive, warnings=warnings, title=TITLE)
        return self._report

    def _judge_io(self, io: IoRecord, requests: list[GuestBlkRequest]) -> None:
        c = self.counts
        covered: list[tuple[int, int]] = []
        judged = False
        for g in requests:
            where = f"I/O {io.io} ({io.dir} of {io.len} B at {io.pos:#x}), virtio-blk request of {g.device}"
            guest_line = TraceLine(g.header.lineno, g.header.raw, "guest")
            line = self._host_line.get(g.header_pos)
            h = self._host.get(line) if line is not None else None
            if h is None:
                self._log.diverge(IO_NOT_AT_DEVICE, guest_line,
                                  f"{where}: QEMU never handled this request ({'write' if g.write else 'read'} "
                                  f"of {g.nbytes} B)", related=[])
                continue
            start = h.handle.sector * SECTOR
            covered.append((start, start + h.nbytes))
            handle_line = TraceLine.of(h.handle)
            if start < io.pos or start + h.nbytes > io.pos + io.len:
                self._log.diverge(COMMAND_OUTSIDE_IO, h.handle,
                                  f"{where}: the device moves bytes [{start:#x}, {start + h.nbytes:#x}) "
                                  f"outside the I/O's [{io.pos:#x}, {io.pos + io.len:#x})",
                                  related=[("guest mapped", guest_line)])
                continue
            first: dict[int, tuple[int, Any]] = {}
            for t in h.translations:
                first.setdefault(t.iova & ~(_PAGE - 1), (t.gpa & ~(_PAGE - 1), t))
            for offset, iova, phys in g.data_pages():
                index = (start - io.pos + offset) // _PAGE
                expected = io.pages[index] if index < len(io.pages) else None
                if expected is not None and phys != expected:
                    c.guest_phys_mismatches += 1
                got = first.get(iova)
                if got is None:
                    self._log.diverge(
                        DATA_PAGES_MISSING, h.handle,
                        f"{where}: the guest handed the device iova {iova:#x} for byte {start + offset:#x} of the "
                        "disk but QEMU never translated it while mapping the request's buffers",
                        related=[("guest mapped", guest_line)], sid=h.sid, iova=iova, expected=expected)
                    continue
                gpa, tr = got
                c.pages_checked += 1
                judged = True
                if h.sid is not None:
                    self._by_sid[h.sid] = self._by_sid.get(h.sid, 0) + 1
                if gpa != expected:
                    self._log.diverge(
                        DATA_WRONG_PAGE, tr,
                        f"{where}: byte {start + offset:#x} of the disk (iova {iova:#x}) went to gpa {gpa:#x} "
                        "but the agent's buffer holds it at "
                        + (f"{expected:#x}" if expected is not None else "no page (beyond the buffer)"),
                        related=[("guest mapped", guest_line), ("device request", handle_line)],
                        sid=h.sid, iova=iova, expected=expected, observed=gpa)
            if io.dir == "write":
                c.bytes_written_checked += h.nbytes
            else:
                c.bytes_read_checked += h.nbytes
        gaps = _gaps(io.pos, io.pos + io.len, covered)
        if gaps and self._guest_has_events:
            lo, hi = gaps[0]
            self._log.diverge(
                IO_NOT_AT_DEVICE, TraceLine(0, f"op record: io {io.io} {io.dir} pos={io.pos} len={io.len}", "ops"),
                f"I/O {io.io}: bytes [{lo:#x}, {hi:#x}) ({sum(h - l for l, h in gaps)} B in all) of this "
                f"{io.dir} reached no virtio-blk request of it", related=[])
        if judged:
            c.ios_checked += 1
