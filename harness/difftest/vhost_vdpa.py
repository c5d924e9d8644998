"""The vhost-vdpa target of ``difftest``: sequences of IOTLB messages written to
``/dev/vhost-vdpa-N`` of a vdpa_sim (vdpasim_net) device in PA mode
(``vdpa_sim.use_va=0``) and run against :mod:`harness.models.vhost_vdpa`.

Every sequence opens the device (and takes ownership), so it starts with no
address space, no map, no batch, backend features 0 and VmPin 0, and closes it at
its end (every map goes and is unpinned). User memory is one region of
:data:`REGION_PAGES` pages at the fixed user VA :data:`REGION_VA`, built once by
the agent (``vhost_vdpa.region``) with a known physical layout: runs of
physically consecutive pages of the lengths :data:`RUNS` (so the model knows
where an UPDATE is split into maps), the last :data:`READONLY_PAGES` pages
read-only. Each sequence runs with RLIMIT_MEMLOCK set to :data:`MEMLOCK_PAGES`
(restored afterwards).

Steps (``op``):

=============  ==============================================================
``msg``        write() of one ``vhost_msg_v2``: ``type`` (2 UPDATE,
               3 INVALIDATE, 5 BATCH_BEGIN, 6 BATCH_END, or another number),
               ``asid``, ``iova``, ``size``, ``uaddr``, ``perm``
``features``   VHOST_SET_BACKEND_FEATURES ``features``
``reopen``     close the device and open it again (same fd number), SET_OWNER
``open2``      a second open() of the device while it is open
=============  ==============================================================

Observation after every step: ``errno`` (what write() or the ioctl returned;
every handler error of a message is EFAULT), ``vm_pin`` (VmPin, pages), for
``reopen`` also ``vm_pin_closed`` (VmPin between close and open) and
``owner_errno``; then the probes: for every address space the model has (and
that no batch of another asid blocks), probe UPDATEs over the iova windows
:data:`WINDOW` pages from 0 and the last :data:`TOP_PAGES` pages of the 64-bit
space: one per page the model says is mapped (must fail: EEXIST, seen as EFAULT)
and one per stretch of at most :data:`GAP_PROBE_PAGES` pages it says is free
(must succeed, and is invalidated again at once), and ``vm_pin_probed``, VmPin
after them (the probes must leave no pin behind).

The IOTLB itself cannot be read back: vhost-vdpa has no read() and no ioctl that
lists maps, and vdpa_sim exposes none; the probes and VmPin are what shows.

Semantics: drivers/vhost/vdpa.c, drivers/vhost/vhost.c (vhost_chr_write_iter),
drivers/vdpa/vdpa_sim/ of Linux 6.12, as stated by the model.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st

from harness.difftest.engine import (
    Call,
    DifftestError,
    Observation,
    Probe,
    Step,
    SystemStateError,
)
from harness.difftest.engine import format_value as default_format
from harness.difftest.strategies import weighted
from harness.models.iotlb import U64_MAX
from harness.models.vhost_vdpa import (
    F_DESC_ASID,
    F_IOTLB_ASID,
    F_IOTLB_BATCH,
    F_IOTLB_MSG_V2,
    IOTLB_ACCESS_FAIL,
    IOTLB_BATCH_BEGIN,
    IOTLB_BATCH_END,
    IOTLB_INVALIDATE,
    IOTLB_MISS,
    IOTLB_UPDATE,
    PAGE_SIZE,
    VDPASIM_BACKEND_FEATURES,
    Mm,
    UserPage,
    VhostVdpa,
    user_memory,
)
from harness.models.vhost_vdpa_mutants import MUTANTS

if TYPE_CHECKING:
    from harness.vm.spec import MachineSpec

PAGE = PAGE_SIZE
REGION_VA = 0x7D00_0000_0000
"""User VA of the region (1 TiB below the iommufd target's, far below the agent's mmap base)."""
RUNS = (1, 2, 1, 3, 1, 4, 2, 1, 5, 1, 2, 8, 1, 3, 1, 1, 6, 2, 1, 4)
"""Lengths of the runs of physically consecutive pages of the region, in order."""
REGION_PAGES = sum(RUNS)
READONLY_PAGES = 4
"""The region's last pages, mprotect'ed read-only: pinning them for WO/RW fails."""
RW_PAGES = REGION_PAGES - READONLY_PAGES
MEMLOCK_PAGES = 48
"""RLIMIT_MEMLOCK of the agent during a sequence (pages): a few large UPDATEs reach it."""
WINDOW = 64
"""Pages of the iova window from 0 where most maps go and the probes look."""
TOP_PAGES = 4
"""Pages at the top of the 64-bit iova space, probed too."""
FAR_IOVA = 0x100_0000
FAR_STRIDE = 0x10_0000
"""UPDATEs at FAR_IOVA + k * FAR_STRIDE (k < 8) never overlap one another (the region is smaller)."""
GAP_PROBE_PAGES = 16
"""A probe UPDATE over a free stretch covers at most this many pages."""
VDPA_NAME = "vdpa0"
MGMTDEV = "vdpasim_net"
NAS = 2
"""Address spaces of vdpasim_net."""
KERNEL_CMDLINE = "vdpa_sim.use_va=0"
"""What the guest kernel needs (vdpa_sim is built in: no module parameters)."""
_PHYS_BASE = 0x1000_0000
_TOP = (1 << 64) - TOP_PAGES * PAGE


def region_phys() -> list[int]:
    """Physical addresses the model assumes for the region's pages: run k at
    ``_PHYS_BASE + k MiB``, its pages consecutive; runs never adjacent. (Only the
    layout matters to what user space sees; the guest checks it has the same.)"""
    out: list[int] = []
    for k, run in enumerate(RUNS):
        out += [_PHYS_BASE + k * 0x10_0000 + i * PAGE for i in range(run)]
    return out


def region_memory() -> dict[int, UserPage]:
    return user_memory(REGION_VA, region_phys(), readonly=range(RW_PAGES, REGION_PAGES))


MSG_NAMES = {IOTLB_MISS: "MISS", IOTLB_UPDATE: "UPDATE", IOTLB_INVALIDATE: "INVALIDATE",
             IOTLB_ACCESS_FAIL: "ACCESS_FAIL", IOTLB_BATCH_BEGIN: "BATCH_BEGIN", IOTLB_BATCH_END: "BATCH_END"}
_PERMS = {0: "none", 1: "RO", 2: "WO", 3: "RW"}


# ---------------------------------------------------------------------- model side


@dataclass
class VdpaModel:
    """The model of one sequence: the open device (correct model or a mutant),
    the class to reopen it with, the process's mm (shared across reopens)."""

    dev: VhostVdpa
    cls: type[VhostVdpa]
    mm: Mm

    def reopen(self) -> int:
        """Close and open again: VmPin between the two (pages)."""
        self.dev.close()
        closed = self.mm.pinned_vm
        self.dev = self.cls(self.dev.memory, nas=NAS, mm=self.mm, owner=True)
        return closed

    def probe_asids(self) -> list[int]:
        """Address spaces the probes look at: every one the model has, as the
        messages reach them (without IOTLB_ASID every message goes to asid 0),
        except those a batch of another asid blocks."""
        dev = self.dev
        asids = sorted(dev.ases) if dev.acked_backend_features & F_IOTLB_ASID else [a for a in (0,) if 0 in dev.ases]
        return [a for a in asids if not dev.batch_blocks(a)]


def probe_ranges(dev: VhostVdpa, asid: int) -> list[tuple[int, int]]:
    """``(iova, size)`` of the probe UPDATEs of ``asid``: each mapped page of the
    windows alone, each free stretch in pieces of at most GAP_PROBE_PAGES."""
    out: list[tuple[int, int]] = []
    for base, pages in ((0, WINDOW), (_TOP, TOP_PAGES)):
        gap: list[int] = []
        for i in range(pages + 1):
            iova = base + i * PAGE
            mapped = i < pages and dev.covered(asid, iova, PAGE)
            if i < pages and not mapped:
                gap.append(iova)
                if len(gap) < GAP_PROBE_PAGES:
                    continue
            if gap:
                out.append((gap[0], len(gap) * PAGE))
                gap = []
            if mapped:
                out.append((iova, PAGE))
    return out


def _probe_key(asid: int, iova: int, size: int) -> str:
    return f"asid {asid} [{iova:#x}, +{size:#x})"




_n = st.integers(0, 63)
_asid_sel = st.tuples(weighted(10, 3, 1), _n)
_iova_sel = st.tuples(weighted(8, 4, 4, 3, 1, 1, 1, 3), _n)
_size_sel = st.tuples(weighted(10, 4, 1, 2, 1, 1), _n)
_uaddr_sel = st.tuples(weighted(10, 2, 1, 1, 2), _n)
_perm_sel = weighted(4, 3, 2, 1, 1, 1)
_range_sel = st.tuples(weighted(4, 5, 3, 3, 1, 2, 1, 1), _n)
_features_sel = weighted(8, 3, 2, 1, 1, 1, 1)
_other_sel = weighted(2, 1, 1, 1)

ABSTRACT_OPS = ("update", "invalidate", "batch_begin", "batch_end", "features", "other", "reopen", "open2")
_op_sel = weighted(20, 12, 3, 3, 2, 1, 1, 1)
_OP_STEPS: tuple[st.SearchStrategy[tuple[Any, ...]], ...] = (
    st.tuples(st.just("update"), _asid_sel, _iova_sel, _size_sel, _uaddr_sel, _perm_sel),
    st.tuples(st.just("invalidate"), _asid_sel, _range_sel),
    st.tuples(st.just("batch_begin"), _asid_sel),
    st.tuples(st.just("batch_end"), _asid_sel),
    st.tuples(st.just("features"), _features_sel),
    st.tuples(st.just("other"), _other_sel, _asid_sel),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("open2")),
)
_STEP = _op_sel.flatmap(lambda kind: _OP_STEPS[kind])

FEATURE_CHOICES = (F_IOTLB_MSG_V2 | F_IOTLB_BATCH | F_IOTLB_ASID, F_IOTLB_MSG_V2 | F_IOTLB_BATCH,
                   VDPASIM_BACKEND_FEATURES, 0, 1, F_DESC_ASID | F_IOTLB_ASID | F_IOTLB_MSG_V2,
                   F_DESC_ASID | F_IOTLB_MSG_V2)
"""VHOST_SET_BACKEND_FEATURES arguments: V2|BATCH|ASID, V2|BATCH, all vdpa_sim offers,
none, bit 0 (EOPNOTSUPP), DESC_ASID (EOPNOTSUPP), DESC_ASID without ASID (EINVAL)."""
OTHER_TYPES = (IOTLB_MISS, IOTLB_ACCESS_FAIL, 7, 0)


def _map_at(maps: Sequence[tuple[int, int, int, int]], n: int) -> tuple[int, int]:
    """(start, last) of one of the maps, chosen by ``n``."""
    start, last = maps[min(n // 8, len(maps) - 1)][:2]
    return start, last


def _maps(m: VdpaModel, asid: int) -> list[tuple[int, int, int, int]]:
    effective = asid if m.dev.acked_backend_features & F_IOTLB_ASID else 0
    return m.dev.maps(effective)


def _resolve_asid(sel: tuple[int, int]) -> int:
    return (0, 1, 2)[sel[0]]


def _resolve_iova(m: VdpaModel, asid: int, sel: tuple[int, int]) -> int:
    kind, n = sel
    maps = _maps(m, asid)
    if kind in (1, 2, 3) and not maps:
        kind = 0
    if kind == 0:
        return (n % WINDOW) * PAGE
    if kind == 4:  # the top of the space: size decides whether it wraps
        return (1 << 64) - (1 + n % TOP_PAGES) * PAGE
    if kind == 5:
        return (n % WINDOW) * PAGE + PAGE // 2
    if kind == 6:
        return (n % WINDOW) * PAGE + 1
    if kind == 7:  # a fresh place above the window: large UPDATEs there add up to RLIMIT_MEMLOCK
        return FAR_IOVA + (n % 8) * FAR_STRIDE
    start, last = _map_at(maps, n)
    pages = (last - start + 1) // PAGE
    if kind == 1:  # right after a map
        return (last + 1) % (1 << 64)
    if kind == 2:  # inside (or at the start of) a map
        return start + (n % pages) * PAGE
    return max(0, start - (1 + n % 3) * PAGE)  # just before a map: overlaps if long enough


def _resolve_size(sel: tuple[int, int], uaddr: int) -> int:
    kind, n = sel
    if kind == 0:
        return (1 + n % 8) * PAGE
    if kind == 1:  # every writable page from uaddr on (RLIMIT_MEMLOCK is soon reached)
        if REGION_VA <= uaddr < REGION_VA + RW_PAGES * PAGE:
            return REGION_VA + RW_PAGES * PAGE - (uaddr & ~(PAGE - 1))
        return (1 + n % RW_PAGES) * PAGE
    if kind == 2:
        return 0
    if kind == 3:
        return (1 + n % 4) * PAGE + (1, -1, PAGE // 2, 1 - PAGE)[n // 4 % 4]
    if kind == 4:  # over RLIMIT_MEMLOCK, and past the region
        return (MEMLOCK_PAGES + 1 + n % 4) * PAGE
    return (U64_MAX, U64_MAX - PAGE + 1, 1 << 63, U64_MAX - 1)[n % 4]


def _resolve_uaddr(sel: tuple[int, int]) -> int:
    kind, n = sel
    if kind == 0:
        return REGION_VA + (n % RW_PAGES) * PAGE
    if kind == 1:
        return REGION_VA + (RW_PAGES + n % READONLY_PAGES) * PAGE
    if kind == 2:
        return REGION_VA + (n % RW_PAGES) * PAGE + PAGE // 2
    if kind == 3:  # not mapped: just below or just past the region
        return REGION_VA - PAGE if n % 2 else REGION_VA + REGION_PAGES * PAGE
    return REGION_VA + (RW_PAGES - 1 - n % 2) * PAGE  # a few pages more run into the read-only tail


def _resolve_range(m: VdpaModel, asid: int, sel: tuple[int, int]) -> tuple[int, int]:
    """(iova, size) of an INVALIDATE."""
    kind, n = sel
    maps = _maps(m, asid)
    if kind in (0, 1, 2, 5, 6) and not maps:
        kind = 3
    if kind == 3:
        return (n % WINDOW) * PAGE, (1 + n % 8) * PAGE
    if kind == 4:
        return 0, 0  # everything
    if kind == 7:
        return 0x4000_0000 + (n % 4) * PAGE, PAGE  # nothing there
    start, last = _map_at(maps, n)
    pages = (last - start + 1) // PAGE
    if kind == 0:
        return start, last - start + 1
    if kind == 1:  # one page (or one byte) inside the map
        return start + (n % pages) * PAGE + (1 if n % 3 == 2 else 0), (PAGE, 1, 1)[n % 3]
    if kind == 2:  # from inside this map to past its end (into the next one, if any)
        return start + (n % pages) * PAGE, (pages - n % pages + 1) * PAGE
    if kind == 5:  # size 0 at a page boundary inside (or at the start of) the map
        return start + (n % pages) * PAGE, 0
    return start + PAGE, (1 << 64) - PAGE // 2  # last = start + PAGE/2 - 1 < iova: the wrapped range


def _msg_step(type: int, asid: int = 0, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0) -> Step:
    return {"op": "msg", "type": type, "asid": asid, "iova": iova, "size": size, "uaddr": uaddr, "perm": perm}


_FIELDS: dict[str, dict[str, int]] = {
    "msg": {"type": 0xFF, "asid": 0xFFFFFFFF, "iova": U64_MAX, "size": U64_MAX, "uaddr": U64_MAX, "perm": 0xFF},
    "features": {"features": U64_MAX},
    "reopen": {},
    "open2": {},
}


class VhostVdpaTarget:
    """:class:`~harness.difftest.engine.Target` for :mod:`harness.models.vhost_vdpa`."""

    name = "vhost-vdpa"
    description = "vhost-vdpa IOTLB of a vdpa_sim device in PA mode (UPDATE/INVALIDATE/BATCH, VmPin)"
    system = "kernel"

    def mutants(self) -> Mapping[str, str]:
        return {name: m.description for name, m in MUTANTS.items()}

    def new_model(self, mutant: str | None) -> VdpaModel:
        cls = VhostVdpa if mutant is None else MUTANTS[mutant].cls
        mm = Mm(memlock_pages=MEMLOCK_PAGES)
        return VdpaModel(cls(region_memory(), nas=NAS, mm=mm, owner=True), cls, mm)

    def sequences(self, max_steps: int) -> st.SearchStrategy[list[Any]]:
        """Lists of 1..max_steps steps; most start by acking V2|BATCH|ASID (so
        asid 1 is reachable)."""
        steps = st.lists(_STEP, min_size=1, max_size=max_steps)
        return st.tuples(weighted(3, 1), steps).map(
            lambda t: ([("features", 0)] + t[1])[:max_steps] if t[0] == 0 else t[1])

    def resolve(self, model: VdpaModel, abstract: Any) -> Step:
        kind = abstract[0]
        if kind == "update":
            asid = _resolve_asid(abstract[1])
            uaddr = _resolve_uaddr(abstract[4])
            return _msg_step(IOTLB_UPDATE, asid, _resolve_iova(model, asid, abstract[2]),
                             _resolve_size(abstract[3], uaddr), uaddr, (3, 1, 2, 0, 4, 6)[abstract[5]])
        if kind == "invalidate":
            asid = _resolve_asid(abstract[1])
            iova, size = _resolve_range(model, asid, abstract[2])
            return _msg_step(IOTLB_INVALIDATE, asid, iova, size)
        if kind in ("batch_begin", "batch_end"):
            asid = _resolve_asid(abstract[1])
            if abstract[1][0] == 0 and model.dev.in_batch:
                asid = model.dev.batch_asid  # mostly the batch's own asid
            return _msg_step(IOTLB_BATCH_BEGIN if kind == "batch_begin" else IOTLB_BATCH_END, asid)
        if kind == "features":
            return {"op": "features", "features": FEATURE_CHOICES[abstract[1]]}
        if kind == "other":
            return _msg_step(OTHER_TYPES[abstract[1]], _resolve_asid(abstract[2]))
        if kind in ("reopen", "open2"):
            return {"op": kind}
        raise ValueError(f"unknown abstract step {abstract!r}")

    def apply(self, model: VdpaModel, step: Step) -> Observation:
        op = step["op"]
        if op == "msg":
            r = model.dev.write(step["type"], step["iova"], step["size"], step["uaddr"], step["perm"], step["asid"])
            return {"errno": r.errno, "vm_pin": model.mm.pinned_vm}
        if op == "features":
            return {"errno": model.dev.set_backend_features(step["features"]), "vm_pin": model.mm.pinned_vm}
        if op == "reopen":
            closed = model.reopen()
            return {"errno": 0, "vm_pin_closed": closed, "owner_errno": 0, "vm_pin": model.mm.pinned_vm}
        if op == "open2":
            return {"errno": errno.EBUSY, "vm_pin": model.mm.pinned_vm}
        raise ValueError(f"unknown op {op!r}")

    def probes(self, model: VdpaModel) -> list[Probe]:
        return [{"asid": a, "ranges": [list(r) for r in probe_ranges(model.dev, a)]} for a in model.probe_asids()]

    def answer_probes(self, model: VdpaModel, probes: Sequence[Probe]) -> Observation:
        """Runs the probe UPDATEs (and the INVALIDATE after each that succeeds) on
        the model, as the guest does: the answers are their errnos."""
        answers: dict[str, int] = {}
        dev = model.dev
        for p in probes:
            for iova, size in p["ranges"]:
                r = dev.write(IOTLB_UPDATE, iova, size, REGION_VA, 1, p["asid"])
                answers[_probe_key(p["asid"], iova, size)] = r.errno
                if r.errno == 0:
                    dev.write(IOTLB_INVALIDATE, iova, size, 0, 0, p["asid"])
        out: Observation = {"probe": answers}
        if probes:
            out["vm_pin_probed"] = model.mm.pinned_vm
        return out

    def counters(self, predicted: Observation) -> dict[str, int]:
        """Counts for the summary line: errnos compared (the step's and each probe
        UPDATE's) and how many of them were probe writes."""
        probes = predicted.get("probe", {})
        return {"errnos compared": (1 if "errno" in predicted else 0) + len(probes), "probe writes": len(probes)}

    # -- replay files, reports -------------------------------------------------

    def check_step(self, raw: Any) -> Step:
        if not isinstance(raw, dict):
            raise ValueError(f"{raw!r} is not a step object")
        op = raw.get("op")
        if op not in _FIELDS:
            raise ValueError(f"'op' is {op!r}, not one of {', '.join(_FIELDS)}")
        fields = _FIELDS[op]
        extra = sorted(set(raw) - set(fields) - {"op"})
        if extra:
            raise ValueError(f"{op}: unknown key {extra[0]!r}")
        step: Step = {"op": op}
        for key, limit in fields.items():
            value = raw.get(key)
            if type(value) is not int or not 0 <= value <= limit:
                raise ValueError(f"{op}: {key!r} is {value!r}, not an integer in [0, {limit:#x}]")
            step[key] = value
        return step

    def describe(self, step: Step) -> str:
        op = step["op"]
        if op == "features":
            return f"SET_BACKEND_FEATURES {step['features']:#x}"
        if op == "reopen":
            return "close and reopen the device"
        if op == "open2":
            return "second open of the device"
        t = step["type"]
        name = MSG_NAMES.get(t, f"type {t}")
        if t == IOTLB_UPDATE:
            return (f"UPDATE asid {step['asid']} iova {step['iova']:#x} size {step['size']:#x} "
                    f"uaddr {step['uaddr']:#x} perm {_PERMS.get(step['perm'], step['perm'])}")
        if t == IOTLB_INVALIDATE:
            return f"INVALIDATE asid {step['asid']} iova {step['iova']:#x} size {step['size']:#x}"
        return f"{name} asid {step['asid']}"

    def format_value(self, field_name: str, value: Any) -> str:
        if field_name.startswith("probe.") and isinstance(value, int):
            return default_format("errno", value)
        if field_name.startswith("vm_pin") and isinstance(value, int):
            return f"{value} pages"
        return default_format(field_name, value)

    # -- system side -------------------------------------------------------------

    def driver(self) -> VhostVdpaDriver:
        return VhostVdpaDriver()

    def machine(self) -> MachineSpec:
        """The default q35 machine, with ``vdpa_sim.use_va=0`` on the kernel command
        line (vdpa_sim is built in; with use_va=1 anonymous memory is not pinned)."""
        from harness.vm.spec import MachineSpec
        return MachineSpec(cmdline=KERNEL_CMDLINE)


class VhostVdpaDriver:
    """The guest side of one vhost-vdpa sequence (guest agent ops ``vhost_vdpa.*``, ``fd.close``)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.old_memlock = 2048

    def setup(self) -> list[Call]:
        return [{"op": "vhost_vdpa.add_device", "args": {"name": VDPA_NAME, "mgmtdev": MGMTDEV}},
                {"op": "vhost_vdpa.region", "args": {"user_va": REGION_VA, "runs": list(RUNS),
                                                     "readonly": READONLY_PAGES}},
                {"op": "vhost_vdpa.memlock", "args": {"pages": MEMLOCK_PAGES}},
                {"op": "vhost_vdpa.open", "args": {"name": VDPA_NAME, "owner": True}}]

    def bind_setup(self, results: list[Any]) -> None:
        device, region, memlock, opened = results
        if device.get("driver") != "vhost_vdpa" or not device.get("path"):
            raise DifftestError(f"vdpa device {VDPA_NAME} is not bound to vhost_vdpa: {device!r}")
        if device.get("use_va") != "N":
            raise DifftestError(f"vdpa_sim runs with use_va={device.get('use_va')!r}: the target needs "
                                f"{KERNEL_CMDLINE} on the kernel command line (PA mode pins the pages)")
        if region.get("runs") != list(RUNS):
            raise DifftestError(f"the region's physical layout is {region.get('runs')}, not {list(RUNS)}")
        self.old_memlock = memlock["old"]
        if opened.get("errno"):
            raise SystemStateError(f"cannot open {device['path']}: {errno.errorcode.get(opened['errno'], '?')} "
                                   "(EBUSY: the previous sequence left it open)")
        self.fd = opened["fd"]
        if opened.get("owner_errno"):
            raise DifftestError(f"VHOST_SET_OWNER failed: {errno.errorcode.get(opened['owner_errno'], '?')}")
        if opened.get("vm_pin"):
            raise SystemStateError(f"VmPin is {opened['vm_pin']} pages before the sequence starts: the previous "
                                   "sequence's pins outlived the close of its vhost-vdpa fd")

    def calls(self, step: Step, probes: Sequence[Probe]) -> list[Call]:
        op = step["op"]
        if op == "msg":
            call: Call = {"op": "vhost_vdpa.msg", "args": {"fd": self.fd, **{k: step[k] for k in _FIELDS["msg"]}}}
        elif op == "features":
            call = {"op": "vhost_vdpa.set_backend_features", "args": {"fd": self.fd, "features": step["features"]}}
        elif op == "reopen":
            call = {"op": "vhost_vdpa.reopen", "args": {"fd": self.fd, "owner": True}}
        else:
            call = {"op": "vhost_vdpa.open", "args": {"name": VDPA_NAME, "close": True}}
        return [call] + [{"op": "vhost_vdpa.probe", "args": {"fd": self.fd, "asid": p["asid"], "ranges": p["ranges"],
                                                             "uaddr": REGION_VA, "perm": 1}} for p in probes]

    def observe(self, step: Step, probes: Sequence[Probe], results: list[Any]) -> Observation:
        rec = results[0]
        obs: Observation = {"errno": rec["errno"]}
        if step["op"] == "reopen":
            obs.update(vm_pin_closed=rec["vm_pin_closed"], owner_errno=rec["owner_errno"])
        obs["vm_pin"] = rec["vm_pin"]
        answers: dict[str, int] = {}
        for p, r in zip(probes, results[1:]):
            for (iova, size), err in zip(p["ranges"], r["answers"]):
                answers[_probe_key(p["asid"], iova, size)] = err
        obs["probe"] = answers
        if probes:
            obs["vm_pin_probed"] = results[-1]["vm_pin"]
        return obs

    def teardown(self) -> list[Call]:
        calls: list[Call] = [{"op": "fd.close", "args": {"fd": self.fd}}] if self.fd is not None else []
        return calls + [{"op": "vhost_vdpa.memlock", "args": {"pages": self.old_memlock}}]
