"""Did the guest's data land where the guest put it?  The block workload's own
oracle.

Evidence, none of it from the device under test:

* the guest agent's op records (``nvme.pattern_rw``): each O_DIRECT I/O
  (``io`` id, ``dir``, byte ``pos`` on the namespace, ``len``), the
  guest-physical pages of its buffer (``buffer_pages``, from
  /proc/self/pagemap) and the namespace's ``lba_size`` (from sysfs);
* the guest kernel's trace: the agent's markers around each I/O
  (``dma-harness io N begin ...`` / ``... end``) and the NVMe commands the
  driver submitted in between (``nvme:nvme_setup_cmd``, qid and cmdid).

Each such command is found in QEMU's trace through its sync pair
(:mod:`harness.checks.sync`: the n-th guest submission of (qid, cid) is the
n-th ``pci_nvme_io_cmd`` of (sqid, cid)) -- so commands are matched to the
workload's operations in time order, never as a union over the trace.  Then,
for every data command (``pci_nvme_read`` / ``pci_nvme_write``; write-zeroes
and other commands without data are not data), the block DMA request it
started (``dma_blk_io``) must move data in the I/O's direction, and its
translations, page by page in scatter-gather order
(:mod:`harness.checks.dma_window`), must land on exactly the buffer pages
that hold those bytes: byte ``lba * lba_size - pos + k`` of the I/O is in
buffer page ``(lba * lba_size - pos + k) // 4096``.  The commands of an I/O
must cover its bytes exactly.

Divergence kinds: ``data-wrong-page``, ``data-pages-missing``,
``data-wrong-direction``, ``io-not-at-device`` (bytes of an I/O no command
of it moved, or a command QEMU never logged), ``command-outside-io``.
Inconclusive when there is no I/O record, no marker, no guest log, or no
page was checked.

Pure code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from harness.checks.dma_window import BlockDmaWindow
from harness.checks.sync import NVME_SUBMIT, SyncPairs
from harness.checks.verdict import CheckReport, DivergenceLog, TraceLine
from harness.trace.events import (
    DmaBlkIo,
    DmaComplete,
    DmarTranslate,
    Event,
    MalformedEvent,
    NvmeIoCmd,
    NvmeRead,
    NvmeWrite,
)
from harness.trace.guest import GuestEvent, GuestMarker, GuestNvmeSetupCmd

__all__ = ["CHECKER", "BlockDataCounts", "BlockDataChecker", "ios_from_records"]

CHECKER: Final = "block-data"
TITLE: Final = "guest O_DIRECT data against the device's transfers (buffer pages from pagemap)"
DATA_WRONG_PAGE: Final = "data-wrong-page"
DATA_PAGES_MISSING: Final = "data-pages-missing"
DATA_WRONG_DIRECTION: Final = "data-wrong-direction"
IO_NOT_AT_DEVICE: Final = "io-not-at-device"
COMMAND_OUTSIDE_IO: Final = "command-outside-io"

_PAGE: Final = 4096
_BEGIN: Final = re.compile(r"dma-harness io (\d+) begin (read|write) pos=(\d+) len=(\d+)$")
_END: Final = re.compile(r"dma-harness io (\d+) end$")
_DATA_OPCODES: Final = {"nvme_cmd_read": "read", "nvme_cmd_write": "write"}


@dataclass
class BlockDataCounts:
    ios: int = 0
    """O_DIRECT I/Os the agent recorded."""
    ios_checked: int = 0
    commands: int = 0
    """Guest NVMe data commands inside an I/O's markers."""
    commands_at_device: int = 0
    pages_checked: int = 0
    bytes_written_checked: int = 0
    bytes_read_checked: int = 0
    non_data_commands: int = 0
    """Commands inside an I/O that move no data (flush, write-zeroes...)."""


@dataclass(frozen=True, slots=True)
class IoRecord:
    """One O_DIRECT I/O as the agent recorded it."""

    io: int
    dir: str
    pos: int
    len: int
    pages: tuple[int, ...]
    lba_size: int


def ios_from_records(records: Iterable[Mapping[str, Any]]) -> list[IoRecord]:
    """The I/Os of ``nvme.pattern_rw`` op records (other records, and those on a
    virtio-blk disk ``/dev/vdX``, are ignored)."""
    return pattern_ios(rec for rec in records if rec.get("op") == "nvme.pattern_rw"
                       and not str(rec.get("device", "")).startswith("/dev/vd"))  # virtio-blk: virtio_blk_data


def pattern_ios(records: Iterable[Mapping[str, Any]]) -> list[IoRecord]:
    """The I/Os (``ios``) of pattern op records, each with the guest-physical pages
    of its buffer (``buffers_pages``); records without ``ios`` are skipped."""
    out: list[IoRecord] = []
    for rec in records:
        if "ios" not in rec:
            continue
        buffers = [tuple(int(p) for p in pages) for pages in rec.get("buffers_pages", ())]
        for io in rec["ios"]:
            index = int(io.get("buffer", 0))
            pages = buffers[index] if index < len(buffers) else ()
            out.append(IoRecord(int(io["io"]), str(io["dir"]), int(io["pos"]), int(io["len"]), pages,
                                int(rec.get("lba_size", 512))))
    return out


@dataclass
class _Command:
    io: IoRecord
    guest: GuestNvmeSetupCmd
    guest_index: int
    direction: str
    host_line: int | None = None
    rw: NvmeRead | NvmeWrite | None = None
    dbs: int | None = None
    to_dev: bool | None = None
    gpas: list[tuple[int, DmarTranslate]] = field(default_factory=list)


class BlockDataChecker:
    """``ios``: from :func:`ios_from_records`; ``guest``: the guest's events;
    ``sync``: the run's pairs.  Feed QEMU's events in order, then :meth:`finish`."""

    def __init__(self, ios: Sequence[IoRecord], guest: Sequence[GuestEvent], sync: SyncPairs, *,
                 max_divergences: int = 20, context: int = 4) -> None:
        self.counts = BlockDataCounts(ios=len(ios))
        self._log = DivergenceLog(max_divergences=max_divergences, context=context)
        self._window = BlockDmaWindow()
        self._ios = {io.io: io for io in ios}
        self._markers = 0
        self._commands: list[_Command] = []
        self._by_io: dict[int, list[_Command]] = {}
        self._guest_has_events = bool(guest)
        self._collect_commands(guest)
        host_of = {p.origin: p.host for p in sync.pairs if p.kind == NVME_SUBMIT}
        self._by_host: dict[int, _Command] = {}
        for cmd in self._commands:
            cmd.host_line = host_of.get(cmd.guest_index)
            if cmd.host_line is not None:
                self._by_host[cmd.host_line] = cmd
        self._pending_rw: dict[int, _Command] = {}  # cid -> command whose io_cmd was seen
        self._last_rw: _Command | None = None
        self._by_dbs: dict[int, _Command] = {}
        self._malformed_nvme = 0
        self._report: CheckReport | None = None

    def _collect_commands(self, guest: Sequence[GuestEvent]) -> None:
        open_io: IoRecord | None = None
        for index, e in enumerate(guest):
            if isinstance(e, GuestMarker):
                m = _BEGIN.match(e.text)
                if m is not None:
                    self._markers += 1
                    open_io = self._ios.get(int(m.group(1)))
                    continue
                if _END.match(e.text) is not None:
                    open_io = None
                continue
            if open_io is not None and isinstance(e, GuestNvmeSetupCmd) and e.qid > 0:
                direction = _DATA_OPCODES.get(e.opcode_name)
                if direction is None:
                    self.counts.non_data_commands += 1
                    continue
                cmd = _Command(open_io, e, index, direction)
                self._commands.append(cmd)
                self._by_io.setdefault(open_io.io, []).append(cmd)
        self.counts.commands = len(self._commands)

    def feed(self, event: Event) -> None:
        self._log.seen(event)
        self._window.feed(event)
        kind = type(event)
        if kind is NvmeIoCmd:
            cmd = self._by_host.get(event.lineno)
            if cmd is not None:
                assert isinstance(event, NvmeIoCmd)
                self._pending_rw[event.cid] = cmd
                self.counts.commands_at_device += 1
        elif kind is NvmeRead or kind is NvmeWrite:
            assert isinstance(event, (NvmeRead, NvmeWrite))
            cmd = self._pending_rw.pop(event.cid, None)
            self._last_rw = None
            if cmd is not None and not (isinstance(event, NvmeWrite) and "zero" in event.opname.lower()):
                cmd.rw = event
                self._last_rw = cmd
        elif kind is DmaBlkIo:
            assert isinstance(event, DmaBlkIo)
            cmd = self._last_rw
            self._last_rw = None
            if cmd is not None:
                cmd.dbs, cmd.to_dev = event.dbs, event.to_dev
                self._by_dbs[event.dbs] = cmd
        elif kind is DmarTranslate:
            request = self._window.current
            if request is not None:
                cmd = self._by_dbs.get(request.dbs)
                if cmd is not None:
                    assert isinstance(event, DmarTranslate)
                    cmd.gpas.append((event.gpa, event))
        elif kind is DmaComplete:
            assert isinstance(event, DmaComplete)
            self._by_dbs.pop(event.dbs, None)
        elif kind is MalformedEvent:
            assert isinstance(event, MalformedEvent)
            if event.trace_name.startswith(("pci_nvme", "dma_")):
                self._malformed_nvme += 1

    def feed_all(self, events: Iterable[Event]) -> None:
        for e in events:
            self.feed(e)

    def finish(self) -> CheckReport:
        if self._report is not None:
            return self._report
        c = self.counts
        if self._guest_has_events and self._markers:  # without them there is nothing to judge by
            for io_id, io in sorted(self._ios.items()):
                self._judge_io(io, self._by_io.get(io_id, []))
        inconclusive: list[str] = []
        if not self._ios:
            inconclusive.append("the workload recorded no O_DIRECT I/O")
        elif not self._guest_has_events:
            inconclusive.append("the guest kernel's event log is missing")
        elif not self._markers:
            inconclusive.append("no I/O marker in the guest's trace")
        elif not c.pages_checked:
            inconclusive.append("no data page was checked")
        if self._malformed_nvme:
            inconclusive.append(f"{self._malformed_nvme} pci_nvme_*/dma_* lines of QEMU's trace could not be parsed")
        self._report = self._log.report(CHECKER, c, inconclusive=inconclusive, title=TITLE)
        return self._report

    def _judge_io(self, io: IoRecord, commands: list[_Command]) -> None:
        c = self.counts
        covered: list[tuple[int, int]] = []
        judged = False
        for cmd in commands:
            g = cmd.guest
            where = f"I/O {io.io} ({io.dir} of {io.len} B at {io.pos:#x}), guest command qid {g.qid} cid {g.cid}"
            guest_line = TraceLine(g.lineno, g.raw, "guest")
            if cmd.host_line is None or cmd.rw is None:
                self._log.diverge(IO_NOT_AT_DEVICE, guest_line,
                                  f"{where}: QEMU never logged this command or its data transfer",
                                  related=[])
                continue
            rw = cmd.rw
            start = rw.lba * io.lba_size
            length = rw.count
            covered.append((start, start + length))
            rw_line = TraceLine.of(rw)
            if start < io.pos or start + length > io.pos + io.len:
                self._log.diverge(COMMAND_OUTSIDE_IO, rw_line,
                                  f"{where}: the command moves bytes [{start:#x}, {start + length:#x}) "
                                  f"outside the I/O's [{io.pos:#x}, {io.pos + io.len:#x})",
                                  related=[("guest submitted", guest_line)])
                continue
            if cmd.to_dev is not None and cmd.to_dev != (io.dir == "write"):
                self._log.diverge(DATA_WRONG_DIRECTION, rw_line,
                                  f"{where}: the device moved the data {'to' if cmd.to_dev else 'from'} "
                                  f"itself for a guest {io.dir}",
                                  related=[("guest submitted", guest_line)])
            first_page = (start - io.pos) // _PAGE
            want = length // _PAGE
            # QEMU may translate a page more than once while mapping (an IOTLB hit
            # inside it, the map being extended); the scatter-gather order is the
            # order in which each iova page is first translated.
            # The window of a request can also hold translations of other DMA the
            # device did meanwhile (its queues): the request's own are its first
            # ``want`` distinct pages.
            pages: dict[int, tuple[int, DmarTranslate]] = {}
            for gpa, tr in cmd.gpas:
                page = tr.iova & ~(_PAGE - 1)
                if page not in pages and len(pages) == want:
                    break
                seen = pages.setdefault(page, (gpa, tr))
                if seen[0] != gpa:
                    self._log.diverge(
                        DATA_WRONG_PAGE, tr,
                        f"{where}: iova {page:#x} was translated to {seen[0]:#x} and then to {gpa:#x} "
                        "within one transfer", related=[("first translation", seen[1])], observed=gpa)
            for i, (gpa, tr) in enumerate(list(pages.values())[:want]):
                index = first_page + i
                expected = io.pages[index] if index < len(io.pages) else None
                c.pages_checked += 1
                judged = True
                if expected != (gpa & ~(_PAGE - 1)):
                    self._log.diverge(
                        DATA_WRONG_PAGE, tr,
                        f"{where}: page {i} of the transfer (byte {start + i * _PAGE:#x} of the namespace) "
                        f"landed on gpa {gpa:#x} but the agent's buffer holds it at "
                        + (f"{expected:#x}" if expected is not None else "no page (beyond the buffer)"),
                        related=[("guest submitted", guest_line), ("device command", rw_line)],
                        expected=expected, observed=gpa)
            if len(pages) < want:
                self._log.diverge(
                    DATA_PAGES_MISSING, rw_line,
                    f"{where}: {length} B is {want} pages but the device translated {len(pages)} distinct "
                    "pages for it", related=[("guest submitted", guest_line)])
            if io.dir == "write":
                c.bytes_written_checked += length
            else:
                c.bytes_read_checked += length
        gaps = _gaps(io.pos, io.pos + io.len, covered)
        if gaps and self._guest_has_events:
            lo, hi = gaps[0]
            self._log.diverge(
                IO_NOT_AT_DEVICE, TraceLine(0, f"op record: io {io.io} {io.dir} pos={io.pos} len={io.len}", "ops"),
                f"I/O {io.io}: bytes [{lo:#x}, {hi:#x}) ({sum(h - l for l, h in gaps)} B in all) of this "
                f"{io.dir} reached no NVMe data command of it", related=[])
        if judged:
            c.ios_checked += 1


def _gaps(start: int, end: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    gaps: list[tuple[int, int]] = []
    pos = start
    for lo, hi in sorted(covered):
        if lo > pos:
            gaps.append((pos, min(lo, end)))
        pos = max(pos, hi)
        if pos >= end:
            break
    if pos < end:
        gaps.append((pos, end))
    return gaps
