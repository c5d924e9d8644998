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

Models: :class:`harness.models.vfio_cdev.VfioCdevModel` (files, BIND, ATTACH,
DETACH, object ids), :class:`harness.models.kvm_vfio.KvmVfioModel` (the KVM-VFIO
device's file list) and one :class:`harness.models.pinning.IommufdCtx` per
iommufd file (areas, IOVAs, unmapped bytes, pins).  A HWPT the VFIO model
creates is a domain attached to its IOAS in the pinning model; a HWPT it
destroys is detached; an iommufd file it releases takes its context's pins
with it.

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

import bisect
import errno as E
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from harness.checks.verdict import CheckReport, DivergenceLog, TraceLine
from harness.models.kvm_vfio import KvmVfioError, KvmVfioModel
from harness.models.pinning import IOAS, Area, Domain, IommufdCtx, IommufdError
from harness.models.vfio_cdev import FileKind, IommufdCtx as VfioCtx, ObjType, VfioCdevModel, VfioError
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
OP_RESULT: Final = "op-result"
VM_PIN: Final = "vm-pin"
TRANSLATION_WITHOUT_AREA: Final = "translation-without-area"
USE_AFTER_UNMAP: Final = "use-after-unmap"
TRANSLATION_UNPINNED: Final = "translation-unpinned"
WRONG_GPA: Final = "wrong-gpa"
DMA_OUTSIDE_COMMAND: Final = "dma-outside-command"
COMMAND_MISMATCH: Final = "command-mismatch"
FAULT_ON_MAPPED: Final = "fault-on-mapped-iova"

PAGE: Final = 4096
_PAGE_MASK: Final = ~(PAGE - 1)
_SQE: Final = 64
_MODEL_PREFIXES: Final = ("iommufd.", "vfio.", "kvm.", "nvme_vfio.")
_DMAR_REPORT: Final = re.compile(
    r"\[DMA (Read|Write)[^\]]*\] Request device \[([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])\] "
    r"(?:PASID [0-9a-f]+ )?fault addr 0x([0-9a-f]+)")
_BDF: Final = re.compile(r"(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])")
GUEST_MAX_AUTO_ALIGNMENT: Final = PAGE
"""The largest automatic IOVA alignment of the guest kernel (``iopt_alloc_iova``:
``HPAGE_SIZE`` with CONFIG_TRANSPARENT_HUGEPAGE, else PAGE_SIZE). The project's
guest kernel is built without THP: a 2-page map of a 1 MiB-aligned user VA gets
the first free page, not the first free 8 KiB (seen: 0x3000 after areas at
0x1000 and 0x2000)."""


@dataclass
class IoasCounts:
    ops: int = 0
    """Op records (a ``batch`` counts its calls)."""
    ops_checked: int = 0
    """Ops whose errno and returned fields were compared with the models."""
    ops_unmodelled: int = 0
    """Ops of the modelled families the models cannot judge (e.g. a raw ``flags`` word)."""
    pins_checked: int = 0
    """``vm_pin`` values compared with the pages the models hold pinned."""
    commands: int = 0
    """NVMe commands the userspace driver submitted."""
    commands_matched: int = 0
    """Of those, found in QEMU's trace (fetched, or their SQE fetch faulted)."""
    translations: int = 0
    """``vtd_dmar_translate`` lines of the controller from its first driver command on."""
    translations_checked: int = 0
    gpas_checked: int = 0
    """Translations whose guest-physical page was compared with ``mem.gpa``."""
    after_completion: int = 0
    """Translations after a command's CQE was written (judged against the next state)."""
    faults_checked: int = 0
    """``vtd_dmar_fault`` lines of the controller judged against the IOAS."""
    faults_confirmed: int = 0
    """Unmapped pages of a command (SQE, CQE slot, PRP) with a QEMU fault in its window."""
    kernel_fault_reports: int = 0
    """Of those, also reported by the guest kernel (dmesg DMAR lines in the records)."""
    skipped_before_session: int = 0
    """Controller events before the driver's first command (the kernel driver's)."""
    divergences: int = 0


@dataclass(frozen=True, slots=True)
class AreaView:
    """One area of the controller's IOAS as the model held it: IOVAs
    ``[iova, last]`` on user VAs from ``user_va``; ``pinned``: the page-aligned
    user VAs of the area the model holds pinned; ``op``: the index of the op
    record that mapped it."""

    iova: int
    last: int
    user_va: int
    readable: bool
    writeable: bool
    pinned: frozenset[int]
    op: int


@dataclass(frozen=True)
class IoasView:
    """The IOAS the controller is attached to (``attached`` False: none: every
    DMA must fault), before op record ``op``; ``gpa``: user page -> guest-physical
    page from the ``mem.gpa`` records before it."""

    areas: tuple[AreaView, ...]
    gpa: Mapping[int, int]
    attached: bool
    op: int

    def find(self, iova: int) -> AreaView | None:
        i = bisect.bisect_right([a.iova for a in self.areas], iova) - 1
        if i >= 0 and self.areas[i].iova <= iova <= self.areas[i].last:
            return self.areas[i]
        return None

    def live(self, page: int) -> bool:
        """The page is in an area and pinned: the device may use it."""
        area = self.find(page)
        return area is not None and (area.user_va + page - area.iova) & _PAGE_MASK in area.pinned


@dataclass
class Command:
    """One command the driver submitted (from its record), with what the model
    says about it."""

    k: int
    op: int
    rec: Mapping[str, Any]
    view: IoasView
    post: IoasView | None = None
    matched: int | None = None
    """QEMU line of its fetch (or of its SQE fetch's fault)."""
    fault_pages: set[int] = field(default_factory=set)

    @property
    def qid(self) -> int:
        return int(self.rec["qid"])

    @property
    def cid(self) -> int:
        return int(self.rec["cid"])

    @property
    def opcode(self) -> int:
        return int(self.rec["opcode"])

    @property
    def sqe_page(self) -> int:
        return int(self.rec["sqe_iova"]) & _PAGE_MASK

    @property
    def cqe_page(self) -> int:
        return int(self.rec["cqe_iova"]) & _PAGE_MASK

    def pages(self) -> set[int]:
        """IOVA pages the controller may touch for it: the SQE, the CQE slot, PRP1, PRP2."""
        out = {self.sqe_page, self.cqe_page}
        for key in ("prp1", "prp2"):
            value = self.rec.get(key)
            if value:
                out.add(int(value) & _PAGE_MASK)
        return out

    @property
    def completed_in_guest(self) -> bool:
        return self.rec.get("status") is not None

    def describe(self) -> str:
        return (f"command {self.k} (qid {self.qid} cid {self.cid:#x} opcode {self.opcode:#04x} "
                f"prp1 {int(self.rec.get('prp1') or 0):#x} prp2 {int(self.rec.get('prp2') or 0):#x})")


def applies(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the records hold ops this checker judges (iommufd, VFIO, KVM or
    the userspace NVMe driver)."""
    return any(isinstance(r.get("op"), str) and r["op"].startswith(_MODEL_PREFIXES) for r in _flatten(records))


def _flatten(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Calls in order, a ``batch``'s calls in its place (each ``{"op", "args", "result"}``;
    a failed call of a batch has ``"error"`` instead of ``"result"``)."""
    out: list[Mapping[str, Any]] = []
    for rec in records:
        if rec.get("op") == "batch" and isinstance(rec.get("result"), list):
            calls = (rec.get("args") or {}).get("calls") or []
            for call, reply in zip(calls, rec["result"]):
                if not isinstance(call, Mapping) or not isinstance(reply, Mapping):
                    continue
                item: dict[str, Any] = {"op": call.get("op"), "args": call.get("args") or {}}
                if reply.get("ok"):
                    item["result"] = reply.get("result")
                else:
                    item["error"] = reply.get("error")
                out.append(item)
        else:
            out.append(rec)
    return out


def _op_line(index: int, rec: Mapping[str, Any]) -> TraceLine:
    text = json.dumps({"op": rec.get("op"), "args": rec.get("args"), "result": rec.get("result")},
                      separators=(",", ":"), default=str)
    return TraceLine(index + 1, text if len(text) <= 400 else text[:397] + "...", "ops")


def _sid(bdf: str) -> int | None:
    m = _BDF.fullmatch(bdf.strip())
    if m is None:
        return None
    return int(m[2], 16) << 8 | int(m[3], 16) << 3 | int(m[4])


class _Replay:
    """The op records replayed into the models (the first half of the check)."""

    def __init__(self, calls: Sequence[Mapping[str, Any]], log: DivergenceLog, counts: IoasCounts,
                 max_auto_alignment: int) -> None:
        self.calls = calls
        self.max_auto_alignment = max_auto_alignment
        self.log = log
        self.counts = counts
        self.vfio = VfioCdevModel()
        self.kvm = KvmVfioModel(self.vfio)
        self.pin_ctx: dict[int, IommufdCtx] = {}  # id(vfio ctx) -> pinning ctx
        self.vfio_ctx: dict[int, VfioCtx] = {}
        self.ioas: dict[tuple[int, int], IOAS] = {}  # (id(vfio ctx), ioas id) -> pinning IOAS
        self.domains: dict[tuple[int, int], Domain] = {}  # (id(vfio ctx), hwpt id) -> pinning domain
        self.area_op: dict[tuple[int, int], int] = {}  # (id(pinning IOAS), iova) -> op index
        self.user_memory: dict[int, int] = {}  # user_va -> length (mem.map regions)
        self.gpa: dict[int, int] = {}
        self.cdev_bdf: dict[str, str] = {}  # cdev path -> BDF
        self.device: str | None = None  # the BDF of the controller the driver drives
        self.sid: int | None = None
        self.removed: list[tuple[int, AreaView]] = []  # (op index, area) unmapped from the device's IOAS
        self.commands: list[Command] = []
        self.kernel_reports: list[tuple[int, int, int, str]] = []  # (op, sid, addr, text)
        self.notes: list[str] = []
        self.final: IoasView | None = None

    # ---- models' state -------------------------------------------------------

    def pinned_vm(self) -> int:
        return sum(ctx.pinned_vm for ctx in self.pin_ctx.values())

    def _device_ioas(self) -> tuple[IOAS | None, IommufdCtx | None]:
        if self.device is None or self.device not in self.vfio.devices:
            return None, None
        dev = self.vfio.devices[self.device]
        if dev.hwpt is None or dev.bound is None or dev.bound.ictx is None:
            return None, None
        key = (id(dev.bound.ictx), dev.hwpt.ioas_id or 0)
        return self.ioas.get(key), self.pin_ctx.get(id(dev.bound.ictx))

    def view(self, op: int) -> IoasView:
        ioas, ctx = self._device_ioas()
        if ioas is None or ctx is None:
            return IoasView((), dict(self.gpa), False, op)
        areas = []
        for a in ioas.areas():
            pinned = frozenset(va for va in range(a.user_va & _PAGE_MASK, a.user_va + a.length, PAGE)
                               if ctx.refs(va)) if a.length <= 1024 * PAGE else \
                frozenset([a.user_va & _PAGE_MASK] if ctx.refs(a.user_va) else [])
            areas.append(AreaView(a.iova, a.last, a.user_va, a.readable, a.writeable, pinned,
                                  self.area_op.get((id(ioas), a.iova), -1)))
        return IoasView(tuple(areas), dict(self.gpa), True, op)

    def _areas_of_all(self) -> dict[tuple[int, int], tuple[IOAS, Area]]:
        out = {}
        for ioas in self.ioas.values():
            for a in ioas.areas():
                out[(id(ioas), a.iova)] = (ioas, a)
        return out

    # ---- the replay ----------------------------------------------------------

    def run(self) -> None:
        for i, rec in enumerate(self.calls):
            self.counts.ops += 1
            op = rec.get("op")
            if not isinstance(op, str):
                continue
            args = rec.get("args") or {}
            result = rec.get("result")
            before = self._areas_of_all()
            try:
                self._apply(i, op, args, result if isinstance(result, Mapping) else {}, rec)
            except (KeyError, TypeError, ValueError) as exc:
                self.counts.ops_unmodelled += 1
                self.notes.append(f"op {i + 1} ({op}): the models cannot judge it: {exc}")
            self._sync_domains(i)
            self._note_removed(i, before)
            if isinstance(result, Mapping) and isinstance(result.get("vm_pin"), int):
                self.counts.pins_checked += 1
                want = self.pinned_vm()
                if result["vm_pin"] != want:
                    self.log.diverge(
                        VM_PIN, _op_line(i, rec),
                        f"op {i + 1} ({op}): VmPin is {result['vm_pin']} pages after it, the models hold "
                        f"{want} pages pinned", expected=want, observed=int(result["vm_pin"]))
        self.final = self.view(len(self.calls))
        for j, cmd in enumerate(self.commands):
            nxt = next((c for c in self.commands[j + 1:] if c.op != cmd.op), None)
            cmd.post = nxt.view if nxt is not None else self.final

    def _note_removed(self, i: int, before: dict[tuple[int, int], tuple[IOAS, Area]]) -> None:
        """Remember the areas op ``i`` removed (unmap, or the release of their context)."""
        after = self._areas_of_all()
        for key, (ioas, a) in before.items():
            if key not in after:
                self.removed.append((i, AreaView(a.iova, a.last, a.user_va, a.readable, a.writeable, frozenset(),
                                                 self.area_op.get(key, -1))))

    def _sync_domains(self, i: int) -> None:
        """Attach a pinning domain for every HWPT the VFIO model holds, detach
        those it destroyed, drop the contexts of released iommufd files."""
        live: set[tuple[int, int]] = set()
        for file in list(self.vfio.files.fds.values()) + [f for f in self._iommufd_files()]:
            if file.kind is not FileKind.IOMMUFD or not isinstance(file.payload, VfioCtx):
                continue
            ctx = file.payload
            for obj in ctx.objects.values():
                if obj.type is ObjType.HWPT_PAGING:
                    live.add((id(ctx), obj.id))
                    if (id(ctx), obj.id) not in self.domains:
                        ioas = self.ioas.get((id(ctx), obj.ioas_id or 0))
                        if ioas is not None:
                            try:
                                self.domains[(id(ctx), obj.id)] = ioas.attach_domain(
                                    aperture=self._aperture_after(i, obj.ioas_id or 0), iova_alignment=PAGE)
                            except IommufdError as exc:  # the VFIO model knows no EADDRINUSE/EFAULT of attach
                                self.notes.append(f"op {i + 1}: the pinning model refuses the domain of HWPT "
                                                  f"{obj.id}: {exc}; its pins are not modelled")
                                live.discard((id(ctx), obj.id))
        for key in [k for k in self.domains if k not in live]:
            dom = self.domains.pop(key)
            if dom.attached:
                dom.ioas.detach_domain(dom)
        for cid in [k for k, c in self.vfio_ctx.items() if c.destroyed]:
            del self.vfio_ctx[cid]
            self.pin_ctx.pop(cid, None)
            for ikey in [k for k in self.ioas if k[0] == cid]:
                del self.ioas[ikey]

    def _iommufd_files(self) -> list[Any]:
        """iommufd files still alive though no fd names them (held by a bound device)."""
        out = []
        for dev in self.vfio.devices.values():
            if dev.bound is not None and dev.bound.ictx_file is not None:
                out.append(dev.bound.ictx_file)
        return out

    def _aperture_after(self, i: int, ioas_id: int) -> tuple[int, int] | None:
        """The attached domain's aperture, from the first ``iommufd.iova_ranges``
        record of that IOAS after op ``i`` (the domain's geometry is a property of
        the IOMMU, not of the ops: the kernel reports it there). None if there is
        none (no reserved range outside the areas is then modelled)."""
        for rec in self.calls[i + 1:]:
            if rec.get("op") == "iommufd.iova_ranges" and (rec.get("args") or {}).get("ioas_id") == ioas_id:
                res = rec.get("result") or {}
                ranges = res.get("ranges") if isinstance(res, Mapping) else None
                if isinstance(ranges, list) and ranges and not res.get("errno"):
                    starts = [int(r[0] if isinstance(r, list) else r["start"]) for r in ranges]
                    lasts = [int(r[1] if isinstance(r, list) else r["last"]) for r in ranges]
                    return min(starts), max(lasts)
                return None
            if rec.get("op") in ("vfio.detach_pt", "fd.close", "fd.close_all"):
                return None
        return None

    def _check(self, i: int, rec: Mapping[str, Any], result: Mapping[str, Any], want_errno: int,
               **fields: Any) -> None:
        """Compare one op's errno (and, when both succeeded, ``fields``) with the models."""
        self.counts.ops_checked += 1
        got = result.get("errno")
        op = rec.get("op")
        if got != want_errno:
            self.log.diverge(
                OP_RESULT, _op_line(i, rec),
                f"op {i + 1} ({op}): errno {_errname(got)}, the models say {_errname(want_errno)}",
                expected=want_errno, observed=got if isinstance(got, int) else None)
            return
        if want_errno:
            return
        for name, want in fields.items():
            if result.get(name) != want:
                self.log.diverge(
                    OP_RESULT, _op_line(i, rec),
                    f"op {i + 1} ({op}): returned {name} {_hex(result.get(name))}, the models say {_hex(want)}",
                    expected=want if isinstance(want, int) else None,
                    observed=result.get(name) if isinstance(result.get(name), int) else None)
                return

    def _ctx_of(self, fd: int) -> tuple[VfioCtx, IommufdCtx]:
        vctx = self.vfio.ctx(fd, "iommufd")
        return vctx, self.pin_ctx[id(vctx)]

    def _apply(self, i: int, op: str, args: Mapping[str, Any], result: Mapping[str, Any],
               rec: Mapping[str, Any]) -> None:
        if "result" not in rec:
            return  # a batch call that raised: nothing happened in the kernel that the records show
        if op == "mem.map":
            self.user_memory[int(result["user_va"])] = int(result["length"])
            self._user_memory()
        elif op == "mem.unmap":
            self.user_memory.pop(int(result["user_va"]), None)
            self._user_memory()
        elif op == "mem.gpa":
            base = int(result["user_va"])
            for n, gpa in enumerate(result.get("pages") or []):
                if gpa is not None:
                    self.gpa[base + n * PAGE] = int(gpa)
        elif op in ("vfio.find_nvme", "vfio.driver_override"):
            bdf = result.get("bdf")
            if isinstance(bdf, str) and not result.get("errno"):
                if op == "vfio.driver_override" and args.get("driver", "vfio-pci") == "vfio-pci":
                    self.device = bdf
                    self.sid = _sid(bdf)
                    cdev = result.get("cdev")
                    if isinstance(cdev, str):
                        self.cdev_bdf[cdev] = bdf
                        if bdf not in self.vfio.devices:
                            self.vfio.add_device(bdf, int(result.get("group") or 0))
                elif self.device is None:
                    self.device, self.sid = bdf, _sid(bdf)
        elif op == "iommufd.open":
            if not result.get("errno"):
                fd = self.vfio.open_iommufd(int(result["fd"]))
                vctx = self.vfio.ctx(fd)
                self.vfio_ctx[id(vctx)] = vctx
                ctx = IommufdCtx(max_auto_alignment=self.max_auto_alignment)
                self._user_memory(ctx)
                self.pin_ctx[id(vctx)] = ctx
            self._check(i, rec, result, 0)
        elif op == "vfio.open_cdev":
            bdf = self.cdev_bdf.get(str(args.get("path")))
            if bdf is None:
                raise ValueError(f"{args.get('path')} is no cdev a vfio.driver_override record named")
            if not result.get("errno"):
                self.vfio.open_cdev(bdf, int(result["fd"]))
            self._check(i, rec, result, 0)
        elif op == "iommufd.ioas_alloc":
            want = 0
            ioas_id = None
            try:
                vctx, ctx = self._ctx_of(int(args["fd"]))
                ioas_id = vctx.ioas_alloc()
                self.ioas[(id(vctx), ioas_id)] = ctx.ioas_alloc()
            except VfioError as exc:
                want = exc.errno or 0
            self._check(i, rec, result, want, ioas_id=ioas_id)
        elif op in ("iommufd.map", "iommufd.unmap", "iommufd.unmap_all"):
            self._ioas_op(i, op, args, result, rec)
        elif op == "vfio.bind_iommufd":
            want, devid = 0, None
            try:
                devid = self.vfio.bind(int(args["fd"]), int(args["iommufd"]), int(args.get("flags", 0)),
                                       int(args["argsz"]) if args.get("argsz") is not None else 16)
            except VfioError as exc:
                want = exc.errno or 0
            self._check(i, rec, result, want, devid=devid)
        elif op == "vfio.attach_pt":
            want, pt_id = 0, None
            try:
                pt_id = self.vfio.attach(int(args["fd"]), int(args["pt_id"]), int(args.get("flags", 0)),
                                         int(args["argsz"]) if args.get("argsz") is not None else 12)
            except VfioError as exc:
                want = exc.errno or 0
            self._check(i, rec, result, want, pt_id=pt_id)
        elif op == "vfio.detach_pt":
            want = 0
            try:
                self.vfio.detach(int(args["fd"]), int(args.get("flags", 0)),
                                 int(args["argsz"]) if args.get("argsz") is not None else 8)
            except VfioError as exc:
                want = exc.errno or 0
            self._check(i, rec, result, want)
        elif op in ("vfio.region_info", "vfio.config_read", "vfio.config_write", "vfio.bar_read",
                    "vfio.bar_write", "vfio.get_info", "vfio.device_reset"):
            want = 0
            try:
                self.vfio.device_ioctl(int(args["fd"]), op)
            except VfioError as exc:
                want = exc.errno or 0
            if want or not result.get("errno"):
                self._check(i, rec, result, want)
            else:
                self.counts.ops_unmodelled += 1  # the access rule passed; the region op's own errnos are not modelled
        elif op == "fd.close":
            want = 0
            try:
                self.vfio.close(int(args["fd"]))
            except VfioError as exc:
                want = exc.errno or 0
            self._check(i, rec, result, want)
        elif op == "fd.close_all":
            fds = sorted(self.vfio.files.fds, reverse=True)
            for fd in fds:
                self.vfio.close(fd)
            self._check(i, rec, result, 0, closed=len(fds))
        elif op == "fd.dup":
            want, fd_out = 0, None
            try:
                fd_out = self.vfio.dup(int(args["fd"]), int(result["fd"]) if not result.get("errno") else None)
            except VfioError as exc:
                want = exc.errno or 0
            self._check(i, rec, result, want, fd=fd_out)
        elif op == "kvm.create_vm":
            if not result.get("errno"):
                self.kvm.create_vm(int(result["fd"]))
            self._check(i, rec, result, 0)
        elif op == "kvm.create_device":
            want = 0
            try:
                test = bool(args.get("test", False))
                self.kvm.create_device(int(args["vm_fd"]), int(args.get("type", 4)), test,
                                       None if test or result.get("errno") else int(result["fd"]))
            except KvmVfioError as exc:
                want = exc.errno or 0
            self._check(i, rec, result, want)
        elif op == "kvm.set_device_attr":
            if args.get("flags"):
                raise ValueError("flags are not modelled")
            want = 0
            try:
                self.kvm.set_attr(int(args["dev_fd"]), int(args.get("group", 1)), int(args.get("attr", 1)),
                                  None if args.get("fd") is None else int(args["fd"]))
            except KvmVfioError as exc:
                want = exc.errno or 0
            self._check(i, rec, result, want)
        elif op == "kvm.has_device_attr":
            want = 0
            try:
                self.kvm.has_attr(int(args["dev_fd"]), int(args.get("group", 1)), int(args.get("attr", 1)))
            except KvmVfioError as exc:
                want = exc.errno or 0
            self._check(i, rec, result, want)
        elif op.startswith("nvme_vfio."):
            if op == "nvme_vfio.kernel_log":
                for line in result.get("lines") or []:
                    m = _DMAR_REPORT.search(str(line.get("text", "")))
                    if m is not None:
                        sid = int(m[2], 16) << 8 | int(m[3], 16) << 3 | int(m[4])
                        self.kernel_reports.append((i, sid, int(m[5], 16), str(line.get("text"))))
                return
            cmds = result.get("commands")
            if isinstance(cmds, list) and cmds:
                view = self.view(i)
                for c in cmds:
                    if isinstance(c, Mapping) and {"qid", "cid", "opcode", "sqe_iova", "cqe_iova"} <= set(c):
                        self.commands.append(Command(len(self.commands), i, c, view))
                        self.counts.commands += 1
        elif op.startswith(_MODEL_PREFIXES):
            self.counts.ops_unmodelled += 1

    def _user_memory(self, ctx: IommufdCtx | None = None) -> None:
        regions = [(va, va + n - 1) for va, n in self.user_memory.items()]
        for c in [ctx] if ctx is not None else list(self.pin_ctx.values()):
            c.set_user_memory(regions)

    def _ioas_op(self, i: int, op: str, args: Mapping[str, Any], result: Mapping[str, Any],
                 rec: Mapping[str, Any]) -> None:
        if op == "iommufd.map" and args.get("flags") is not None:
            raise ValueError("a raw flags word is not modelled")
        try:
            vctx, _ = self._ctx_of(int(args["fd"]))
        except VfioError as exc:
            self._check(i, rec, result, exc.errno or 0)
            return
        ioas = self.ioas.get((id(vctx), int(args["ioas_id"])))
        want = 0
        value: int | None = None
        try:
            if ioas is None:
                raise IommufdError(E.ENOENT, f"no IOAS {args['ioas_id']}")
            if op == "iommufd.map":
                value = ioas.map(int(args["user_va"]), int(args["length"]),
                                 iova=None if args.get("iova") is None else int(args["iova"]),
                                 readable=bool(args.get("readable", True)), writeable=bool(args.get("writeable", True)))
                self.area_op[(id(ioas), value)] = i
            elif op == "iommufd.unmap":
                value = ioas.unmap(int(args["iova"]), int(args["length"]))
            else:
                value = ioas.unmap_all()
        except IommufdError as exc:
            want = exc.errno or 0
        if op == "iommufd.map":
            self._check(i, rec, result, want, iova=value)
        else:
            self._check(i, rec, result, want, length=value)


def _errname(err: object) -> str:
    if isinstance(err, int):
        return E.errorcode.get(err, str(err)) if err else "0"
    return repr(err)


def _hex(value: object) -> str:
    return f"{value:#x}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)


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
