"""Judge a userspace NVMe driver's DMA through an iommufd IOAS: every op the
guest program ran against the reference models, every DMA the controller made
against the IOAS those ops built.

Evidence
========

* The guest agent's op records (``records.json``: ``{"op", "args", "result"}``
  in the order the guest ran them): the ``iommufd.*``, ``vfio.*``, ``kvm.*``
  and ``fd.*`` ioctls with their errnos, returned ids/IOVAs/byte counts and
  ``vm_pin`` (VmPin after the op, 4 KiB pages); ``mem.map`` (the process's user
  memory) and ``mem.gpa`` (the guest-physical page behind each user page, from
  /proc/self/pagemap); the userspace NVMe driver's commands
  (``nvme_vfio.*``, :mod:`guest_agent.nvme_vfio`: qid, cid, opcode, PRP IOVAs,
  the IOVAs of the SQE and of its CQE slot, the CQE status); the guest
  kernel's DMAR fault reports (``nvme_vfio.kernel_log``).
* QEMU's trace: ``vtd_dmar_translate`` (every DMA translation of a device, with
  its PCI address), ``vtd_dmar_fault`` (a refused DMA), ``pci_nvme_admin_cmd``
  / ``pci_nvme_io_cmd`` (a command fetched: cid, sqid, opcode),
  ``pci_nvme_enqueue_req_completion`` (a completion queued: cid, cqid).

Layout: the op records are replayed into the models (VFIO cdev, KVM-VFIO,
one pinning context per iommufd file) by :mod:`harness.checks.ioas_replay`,
which judges items 1 and 2 below and leaves the IOAS state before each
command; this module judges QEMU's events (items 3 and 4) against that state
and builds the report.

What is judged
==============

1. Ops (``ops_checked``): each modelled op's errno, and on success its returned
   ``devid``/``ioas_id``/``pt_id``/``iova``/``length``/``fd``, against the
   models replayed over the ops before it (``op-result``).
2. Pins (``pins_checked``): ``vm_pin`` of every record that carries it against
   the pages the models hold pinned then (``vm-pin``).
3. Device DMA (``translations_checked``).  The driver is synchronous and the
   controller idle between its commands, so the k-th command QEMU fetched for
   the controller is the k-th command the records say the driver submitted,
   and the IOAS at that command is the model's state after every op before the
   op that submitted it.  A command of the controller is recognised without
   QEMU naming it: QEMU reads the SQE through the IOMMU right before it logs
   the command (hw/nvme/ctrl.c ``nvme_process_sq``: ``nvme_addr_read`` then
   ``nvme_admin_cmd``/``nvme_io_cmd``), so the ``vtd_dmar_translate`` just
   before a command line names the controller (its PCI address, from the
   ``vfio.find_nvme``/``vfio.driver_override`` records) and the SQE's page.
   The driver's command ids (0x800 + n) are never the kernel driver's, whose
   earlier commands on the same controller (before it was handed to vfio-pci)
   are skipped until the driver's first command.  Translations between command
   k's fetch and command k+1's belong to command k; once its CQE was written
   (the translation of its CQE page after ``pci_nvme_enqueue_req_completion``)
   the rest of the window is judged against the model's state just before the
   next command (every unmap in between applies).  Each translation must land
   in a live area of the IOAS (``translation-without-area``; an IOVA the guest
   unmapped before: ``use-after-unmap``, naming the unmap's record), on a page
   the model holds pinned (``translation-unpinned``), at the guest-physical
   page ``mem.gpa`` gave for the mapped user page (``wrong-gpa``), and on a
   page the command names: its SQE, its CQE slot, PRP1, PRP2
   (``dma-outside-command``).  A command QEMU fetched that is not the driver's
   next one is ``command-mismatch``.
4. Faults (``faults_checked``): each ``vtd_dmar_fault`` of the controller in
   the session must be at an IOVA the model does not hold mapped and pinned
   (``fault-on-mapped-iova``).  A command whose SQE, CQE slot or PRP pages are
   not mapped is expected to fault there: ``faults_confirmed`` counts those
   pages with a QEMU fault in the command's window, ``kernel_fault_reports``
   those the guest kernel also reported (``DMAR: [DMA Read|Write ...] Request
   device [bb:dd.f] fault addr ...`` in ``nvme_vfio.kernel_log`` records); a
   faulted command's CQE status is in the warnings.

Inconclusive when the records hold no modelled op or lack their arguments, the
controller's PCI address is unknown, no translation of the driver's commands
was checked, a command that completed in the guest is missing from QEMU's
trace, or QEMU's vtd/pci_nvme lines did not parse.

Pure code: records and events in, a :class:`~harness.checks.verdict.CheckReport` out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from harness.checks.ioas_replay import (
    _MODEL_PREFIXES,
    _PAGE_MASK,
    OP_RESULT,
    VM_PIN,
    IoasCounts,
    _flatten,
    _op_line,
    _Replay,
)
from harness.checks.ioas_replay import PAGE as PAGE
from harness.checks.ioas_replay import AreaView as AreaView
from harness.checks.ioas_replay import Command as Command
from harness.checks.ioas_replay import IoasView as IoasView
from harness.checks.verdict import CheckReport, DivergenceLog
from harness.trace.events import (
    DmarFault,
    DmarTranslate,
    Event,
    IotlbPageHit,
    IotlbPageUpdate,
    MalformedEvent,
    NvmeAdminCmd,
    NvmeEnqueueReqCompletion,
    NvmeError,
    NvmeIoCmd,
)

__all__ = [
    "CHECKER",
    "OP_RESULT",
    "VM_PIN",
    "TRANSLATION_WITHOUT_AREA",
    "USE_AFTER_UNMAP",
    "TRANSLATION_UNPINNED",
    "WRONG_GPA",
    "DMA_OUTSIDE_COMMAND",
    "COMMAND_MISMATCH",
    "FAULT_ON_MAPPED",
    "IoasCounts",
    "IoasChecker",
    "applies",
    "check_ioas",
]

CHECKER: Final = "ioas"
TITLE: Final = "userspace NVMe DMA through an iommufd IOAS against the pinning model and the op records"
TRANSLATION_WITHOUT_AREA: Final = "translation-without-area"
USE_AFTER_UNMAP: Final = "use-after-unmap"
TRANSLATION_UNPINNED: Final = "translation-unpinned"
WRONG_GPA: Final = "wrong-gpa"
DMA_OUTSIDE_COMMAND: Final = "dma-outside-command"
COMMAND_MISMATCH: Final = "command-mismatch"
FAULT_ON_MAPPED: Final = "fault-on-mapped-iova"

_SQE: Final = 64
GUEST_MAX_AUTO_ALIGNMENT: Final = PAGE
"""The largest automatic IOVA alignment of the guest kernel (``iopt_alloc_iova``:
``HPAGE_SIZE`` with CONFIG_TRANSPARENT_HUGEPAGE, else PAGE_SIZE). The project's
guest kernel is built without THP: a 2-page map of a 1 MiB-aligned user VA gets
the first free page, not the first free 8 KiB (seen: 0x3000 after areas at
0x1000 and 0x2000)."""


def applies(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the records hold ops this checker judges (iommufd, VFIO, KVM or
    the userspace NVMe driver)."""
    return any(isinstance(r.get("op"), str) and r["op"].startswith(_MODEL_PREFIXES) for r in _flatten(records))


class IoasChecker:
    """Replays the op records into the models (at construction), then judges
    QEMU's events fed in order with :meth:`feed`; :meth:`finish` gives the report.

    ``records``: the agent's calls (``{"op", "args", "result"}``, as saved in
    ``records.json``). ``max_auto_alignment``: the guest kernel's cap on the
    automatic IOVA alignment, bytes (:data:`GUEST_MAX_AUTO_ALIGNMENT`)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], *, max_divergences: int = 20,
                 context: int = 8, max_auto_alignment: int = GUEST_MAX_AUTO_ALIGNMENT) -> None:
        self.counts = IoasCounts()
        self._log = DivergenceLog(max_divergences=max_divergences, context=context)
        self._calls = _flatten(records)
        self._no_args = bool(self._calls) and all("args" not in r for r in self._calls)
        self._replay = _Replay(self._calls, self._log, self.counts, max_auto_alignment)
        if not self._no_args:
            self._replay.run()
        self._commands = self._replay.commands
        self._sid = self._replay.sid
        self._next = 0  # index of the next command expected from QEMU
        self._cur: Command | None = None
        self._alien = False  # the current window is a command the driver did not submit
        self._completion_seen = False
        self._completed = False
        self._held: DmarTranslate | None = None
        self._malformed = 0
        self._nvme_errors: list[str] = []
        self._report: CheckReport | None = None

    # ---- QEMU's events -----------------------------------------------------

    def feed(self, event: Event) -> None:
        self._log.seen(event)
        kind = type(event)
        held, self._held = self._held, None
        if kind is IotlbPageHit or kind is IotlbPageUpdate:
            self._held = held  # QEMU logs the IOTLB lookup before the translation: not between it and the command
            return
        if kind is NvmeAdminCmd or kind is NvmeIoCmd:
            assert isinstance(event, (NvmeAdminCmd, NvmeIoCmd))
            if held is not None:
                self._on_fetch(held, event)
            return
        if held is not None:
            self._on_translate(held)
        if kind is DmarTranslate:
            assert isinstance(event, DmarTranslate)
            if event.sid == self._sid:
                self._held = event
        elif kind is DmarFault:
            assert isinstance(event, DmarFault)
            if event.sid == self._sid:
                self._on_fault(event)
        elif kind is NvmeEnqueueReqCompletion:
            assert isinstance(event, NvmeEnqueueReqCompletion)
            cur = self._cur
            if cur is not None and not self._alien and event.cid == cur.cid and event.cqid == cur.qid:
                self._completion_seen = True
        elif kind is MalformedEvent:
            assert isinstance(event, MalformedEvent)
            if event.family in ("vtd", "pci_nvme"):
                self._malformed += 1
        elif kind is NvmeError:
            assert isinstance(event, NvmeError)
            if self._cur is not None and len(self._nvme_errors) < 8:
                self._nvme_errors.append(f"line {event.lineno}: {event.raw}")

    def feed_all(self, events: Iterable[Event]) -> None:
        for e in events:
            self.feed(e)
        self.flush()

    def flush(self) -> None:
        """Judge a translation held back to see whether a command line follows it."""
        held, self._held = self._held, None
        if held is not None:
            self._on_translate(held)

    def _skippable(self, cmd: Command) -> bool:
        """A command QEMU may not have fetched: its record has no completion
        (timed out, fatal status), or the model says its SQE could not be read."""
        return not cmd.completed_in_guest or not cmd.view.live(cmd.sqe_page)

    def _find(self, match: Callable[[Command], bool]) -> Command | None:
        for cmd in self._commands[self._next:]:
            if match(cmd):
                return cmd
            if not self._skippable(cmd):
                return None
        return None

    def _start(self, cmd: Command, line: int) -> None:
        cmd.matched = line
        self.counts.commands_matched += 1
        self._next = cmd.k + 1
        self._cur = cmd
        self._alien = False
        self._completion_seen = self._completed = False

    def _on_fetch(self, fetch: DmarTranslate, e: NvmeAdminCmd | NvmeIoCmd) -> None:
        page = fetch.iova & _PAGE_MASK
        cmd = self._find(lambda c: c.qid == e.sqid and c.cid == e.cid and c.opcode == e.opc and c.sqe_page == page)
        if cmd is not None:
            self._start(cmd, e.lineno)
            self._judge(fetch)
            return
        if self._cur is None:
            self.counts.skipped_before_session += 1
            return
        expected = self._commands[self._next] if self._next < len(self._commands) else None
        self._log.diverge(
            COMMAND_MISMATCH, e,
            f"QEMU fetched a command of the controller (cid {e.cid:#x} sqid {e.sqid} opcode {e.opc:#04x}, "
            f"SQE at iova {fetch.iova:#x}) that is not the driver's next one: "
            + (expected.describe() + f", SQE at {int(expected.rec['sqe_iova']):#x}" if expected else
               "the driver submitted nothing more"),
            related=[("next command submitted by", _op_line(expected.op, self._calls[expected.op]))] if expected else [],
            sid=fetch.sid, iova=fetch.iova)
        self._alien = True
        self._judge(fetch)

    def _state(self) -> IoasView | None:
        cur = self._cur
        if cur is None:
            return None
        if self._completed and cur.post is not None:
            return cur.post
        return cur.view

    def _on_translate(self, e: DmarTranslate) -> None:
        if self._cur is None:
            self.counts.skipped_before_session += 1
            return
        self._judge(e)

    def _judge(self, e: DmarTranslate) -> None:
        cur = self._cur
        view = self._state()
        assert cur is not None and view is not None
        c = self.counts
        c.translations += 1
        c.translations_checked += 1
        if self._completed:
            c.after_completion += 1
        page = e.iova & _PAGE_MASK
        related = [("submitted by", _op_line(cur.op, self._calls[cur.op]))]
        where = f"{cur.describe()}: the controller translated iova {e.iova:#x} -> gpa {e.gpa:#x}"
        area = view.find(page)
        if area is None:
            gone = next((rm for rm in reversed(self._replay.removed)
                         if rm[0] < view.op and rm[1].iova <= page <= rm[1].last), None)
            if gone is not None:
                self._log.diverge(
                    USE_AFTER_UNMAP, e,
                    f"{where}, but the guest had unmapped that iova (op {gone[0] + 1}) before the op that "
                    f"{'submitted this command' if not self._completed else 'follows its completion'}",
                    related=[*related, ("unmapped by", _op_line(gone[0], self._calls[gone[0]]))],
                    sid=e.sid, iova=e.iova, observed=e.gpa)
            else:
                self._log.diverge(
                    TRANSLATION_WITHOUT_AREA, e,
                    f"{where}, but no area of the IOAS holds that iova" +
                    ("" if view.attached else " (the controller is attached to no IOAS)"),
                    related=related, sid=e.sid, iova=e.iova, observed=e.gpa)
            self._after_translate(cur, page)
            return
        user_page = (area.user_va + page - area.iova) & _PAGE_MASK
        mapped = [("mapped by", _op_line(area.op, self._calls[area.op]))] if area.op >= 0 else []
        if user_page not in area.pinned:
            self._log.diverge(
                TRANSLATION_UNPINNED, e,
                f"{where}: the iova maps user page {user_page:#x}, which the model does not hold pinned "
                "(no domain attached to the IOAS)", related=[*related, *mapped], sid=e.sid, iova=e.iova, observed=e.gpa)
        want = view.gpa.get(user_page)
        if want is not None:
            c.gpas_checked += 1
            if want != e.gpa & _PAGE_MASK:
                self._log.diverge(
                    WRONG_GPA, e,
                    f"{where}: the iova maps user page {user_page:#x}, whose guest-physical page is {want:#x} "
                    "(mem.gpa)", related=[*related, *mapped], sid=e.sid, iova=e.iova, expected=want, observed=e.gpa)
        if not self._alien and page not in cur.pages():
            self._log.diverge(
                DMA_OUTSIDE_COMMAND, e,
                f"{where}: that page is none of the command's (SQE {cur.sqe_page:#x}, CQE {cur.cqe_page:#x}, "
                f"PRP pages {sorted(p for p in cur.pages() if p not in (cur.sqe_page, cur.cqe_page))})",
                related=[*related, *mapped], sid=e.sid, iova=e.iova, observed=e.gpa)
        self._after_translate(cur, page)

    def _after_translate(self, cur: Command, page: int) -> None:
        if self._completion_seen and not self._alien and page == cur.cqe_page:
            self._completed = True
            self._completion_seen = False

    def _on_fault(self, e: DmarFault) -> None:
        page = e.addr & _PAGE_MASK
        if self._cur is None or self._completed or self._alien:
            # the fetch of the next command may be what faulted (its SQE is not mapped)
            cmd = self._find(lambda c: not c.view.live(c.sqe_page) and c.sqe_page == page
                             and int(c.rec["sqe_iova"]) <= e.addr < int(c.rec["sqe_iova"]) + _SQE)
            if cmd is not None:
                self._start(cmd, e.lineno)
        cur = self._cur
        view = self._state()
        if cur is None or view is None:
            self.counts.skipped_before_session += 1
            return
        self.counts.faults_checked += 1
        if view.live(page):
            area = view.find(page)
            assert area is not None
            self._log.diverge(
                FAULT_ON_MAPPED, e,
                f"{cur.describe()}: the vIOMMU refused the controller's {'write' if e.write else 'read'} at iova "
                f"{e.addr:#x} ({e.reason}), but the IOAS maps that page and the model holds it pinned",
                related=[("submitted by", _op_line(cur.op, self._calls[cur.op])),
                         *([("mapped by", _op_line(area.op, self._calls[area.op]))] if area.op >= 0 else [])],
                sid=e.sid, iova=e.addr)
        elif not self._alien and page in cur.pages():
            cur.fault_pages.add(page)

    # ---- the end -------------------------------------------------------------

    def finish(self) -> CheckReport:
        if self._report is not None:
            return self._report
        self.flush()
        c = self.counts
        replay = self._replay
        warnings: list[str] = []
        inconclusive: list[str] = []
        faulted_ok: list[str] = []
        for cmd in self._commands:
            if not cmd.fault_pages:
                continue
            c.faults_confirmed += len(cmd.fault_pages)
            for page in cmd.fault_pages:
                if any(r[0] > cmd.op and r[1] == self._sid and r[2] & _PAGE_MASK == page for r in replay.kernel_reports):
                    c.kernel_fault_reports += 1
            status = cmd.rec.get("status")
            if status == 0:
                faulted_ok.append(f"cid {cmd.cid:#x}")
        if faulted_ok:
            warnings.append(f"{len(faulted_ok)} command(s) whose DMA the vIOMMU refused completed with status 0 "
                            f"(success): {', '.join(faulted_ok[:8])} (QEMU 7.2 moves PRP data through "
                            "dma_memory_map, whose failed translation gives a bounce buffer, not an error)")
        missing = [cmd for cmd in self._commands if cmd.matched is None and cmd.completed_in_guest
                   and cmd.view.live(cmd.sqe_page)]
        if self._no_args:
            inconclusive.append("the op records lack their arguments (not the agent's calls)")
        if not c.ops_checked:
            inconclusive.append("no iommufd/VFIO/KVM op was checked against the models")
        if self._commands and self._sid is None:
            inconclusive.append("the records do not say which PCI device the driver drove (no vfio.driver_override)")
        if missing:
            inconclusive.append(f"{len(missing)} command(s) completed in the guest but QEMU's trace does not show "
                                f"their fetch (first: {missing[0].describe()})")
        if self._malformed:
            inconclusive.append(f"{self._malformed} vtd/pci_nvme lines of QEMU's trace could not be parsed")
        if not c.translations_checked:
            inconclusive.append("no DMA translation of the driver's commands was checked")
        if replay.notes:
            warnings.extend(replay.notes[:8])
        if self._nvme_errors:
            warnings.append("QEMU's NVMe errors during the session: " + "; ".join(self._nvme_errors[:4]))
        c.divergences = self._log.total
        self._report = self._log.report(CHECKER, c, warnings=warnings, inconclusive=inconclusive, title=TITLE)
        return self._report


def check_ioas(records: Sequence[Mapping[str, Any]], events: Iterable[Event], **options: int) -> CheckReport:
    """Run the whole check: the agent's calls and QEMU's events in trace order."""
    checker = IoasChecker(records, **options)
    checker.feed_all(events)
    return checker.finish()
