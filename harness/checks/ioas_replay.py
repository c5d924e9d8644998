"""The first half of the ``ioas`` check (:mod:`harness.checks.ioas`): the
guest agent's op records replayed, in order, into the reference models.

Each modelled op (``iommufd.*``, ``vfio.*``, ``kvm.*``, ``fd.*``) is applied to
the models and its errno and returned fields (``devid``, ``ioas_id``,
``pt_id``, ``iova``, ``length``, ``fd``) compared with what they say
(``op-result``); every ``vm_pin`` (VmPin after the op, 4 KiB pages) is
compared with the pages the models hold pinned then (``vm-pin``).  ``mem.map``
records declare the process's user memory, ``mem.gpa`` records the
guest-physical page behind each user page, ``vfio.find_nvme`` /
``vfio.driver_override`` which PCI device the userspace driver drives,
``nvme_vfio.*`` records its commands and the guest kernel's DMAR fault
reports.

Models: :class:`harness.models.vfio_cdev.VfioCdevModel` (files, BIND, ATTACH,
DETACH, object ids), :class:`harness.models.kvm_vfio.KvmVfioModel` (the KVM-VFIO
device's file list) and one :class:`harness.models.pinning.IommufdCtx` per
iommufd file (areas, IOVAs, unmapped bytes, pins).  A HWPT the VFIO model
creates is a domain attached to its IOAS in the pinning model (aperture from
the next ``iommufd.iova_ranges`` record of that IOAS); a HWPT it destroys is
detached; an iommufd file it releases takes its context's pins with it.

What the replay leaves for the judgement of QEMU's events: for each command
the driver submitted (:class:`Command`) the controller's IOAS as the models
held it before the op that submitted it and before the next command
(:class:`IoasView` of :class:`AreaView`; IOVAs and user VAs in bytes, pinned
pages as page-aligned user VAs), the areas unmapped from that IOAS (with the
op that removed them), the controller's BDF and PCI source id, and the
kernel's DMAR reports.  :class:`IoasCounts` are the counters of the whole
check; the replay fills the op and pin ones.

Complexity: O(ops x areas) (each op snapshots the areas of every IOAS to see
which it removed), plus O(area pages) per command for its view.  Pure code:
records in, models' state and divergences out.
"""

from __future__ import annotations

import bisect
import errno as E
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from harness.checks.verdict import DivergenceLog, TraceLine
from harness.models.kvm_vfio import KvmVfioError, KvmVfioModel
from harness.models.pinning import IOAS, Area, Domain, IommufdCtx, IommufdError
from harness.models.vfio_cdev import FileKind, IommufdCtx as VfioCtx, ObjType, VfioCdevModel, VfioError

OP_RESULT: Final = "op-result"
VM_PIN: Final = "vm-pin"

PAGE: Final = 4096
_PAGE_MASK: Final = ~(PAGE - 1)
_MODEL_PREFIXES: Final = ("iommufd.", "vfio.", "kvm.", "nvme_vfio.")
_DMAR_REPORT: Final = re.compile(
    r"\[DMA (Read|Write)[^\]]*\] Request device \[([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])\] "
    r"(?:PASID [0-9a-f]+ )?fault addr 0x([0-9a-f]+)")
_BDF: Final = re.compile(r"(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])")


@dataclass
class IoasCounts:
    """The counters of the whole ``ioas`` check (the report's ``counts``); the
    replay fills ``ops`` to ``commands``, the judgement of QEMU's events the rest."""

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
