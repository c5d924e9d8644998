"""The vhost-net device IOTLB target of ``difftest``: sequences of IOTLB messages,
backend starts and stops and kicks run against ``/dev/vhost-net`` in one guest
(guest agent ops ``vhost.*``, guest_agent/vhost.py) and against
:mod:`harness.models.vhost_net`.

Every sequence opens a fresh ``/dev/vhost-net`` and maps its ring memory,
:data:`WINDOW_LEN` bytes at the fixed user VA :data:`REGION_VA` (zero-filled). Its
first step (``setup``) is the device set-up with the sequence's ring placement:
``num`` descriptors per vq and the desc, avail and used ring iovas of both vqs,
all inside the iova window [:data:`WINDOW_IOVA`, + :data:`WINDOW_LEN`) and never
overlapping each other. Every UPDATE that can pass ``access_ok`` (perm RO or WO)
maps an iova to uaddr = iova + :data:`DELTA` (mod 2**64) or to an address that
fails; so whatever map the kernel uses for a ring, the bytes it reads and writes
are the ones of the region behind that ring: an avail ring's idx stays 0 and no
handler ever goes past ``vq_meta_prefetch``. Maps with perm 0 may point
anywhere: the kernel never dereferences them. At the end the device is closed
(its IOTLB and messages go, with its eventfds and socket) and the region unmapped.

Operations (a step's ``op``):

========== ==================================================================
``setup``  SET_OWNER, SET_MEM_TABLE (0 regions), SET_FEATURES (ACCESS_PLATFORM |
           VERSION_1), SET_BACKEND_FEATURES (IOTLB_MSG_V2), VRING_NUM/ADDR and
           kick/call eventfds of vq 0 and 1, the packet socket
``write``  write(2) of each message of ``msgs`` (UPDATE, INVALIDATE, or malformed:
           short, another outer or inner type, an asid)
``fill``   ``n`` UPDATEs [iova + k*stride, +size), uaddr linear, in one agent call
``start``  VHOST_NET_SET_BACKEND of vq ``vq`` with the socket
``stop``   VHOST_NET_SET_BACKEND of vq ``vq`` with fd -1 (drops every message)
``kick``   a write to vq ``vq``'s kick eventfd
``reset``  SET_FEATURES again: a new, empty IOTLB
``read``   nothing but the flush and the reads
========== ==================================================================

Each op but ``setup`` and ``reset`` flushes the device's worker and then
answers ``pollin`` (a message is queued) and, when its ``read`` is true,
``misses``: every MISS read, in order (``iova`` = the first uncovered address,
``perm`` = the access, and the constant fields ``type`` 1, ``size`` 0, ``outer``
2). Observation: ``errno`` (or, for ``write``, ``results``: ``[errno, bytes
written]`` per message; for ``fill``, ``written``, ``errnos`` and the ``sha256`` of
the per-message results), ``pollin``, ``misses``, ``vm_pin`` (always 0: vhost-net
pins nothing). Every sequence ends with the audit: stop both vqs, start both,
kick both: the misses show the first uncovered address of each ring.

No state probes: vhost has no read-only view of its IOTLB; the starts and kicks
are the probes, and the model predicts what they queue.
"""

from __future__ import annotations

import errno
import hashlib
import struct
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
from harness.models.vhost_net import (
    INVALIDATE,
    MAX_IOTLB_ENTRIES,
    UPDATE,
    VHOST_IOTLB_MSG_V2,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
    IotlbMsg,
    Miss,
    VhostNetDevice,
    avail_size,
    desc_size,
    used_size,
)

if TYPE_CHECKING:
    from harness.vm.spec import MachineSpec

PAGE = 4096
REGION_VA = 0x7C00_0000_0000
"""User VA of each sequence's ring memory (below the agent's mmap base, above
everything else; not the pinning or vhost-vdpa targets' regions, which may stay
mapped in the same guest)."""
WINDOW_IOVA = 0x40000
"""First iova of the ring window."""
WINDOW_PAGES = 16
WINDOW_LEN = WINDOW_PAGES * PAGE
DELTA = (REGION_VA - WINDOW_IOVA) & U64_MAX
"""uaddr - iova of every linear map: the window's iovas translate into the region."""
FEATURES = VIRTIO_F_ACCESS_PLATFORM | VIRTIO_F_VERSION_1
BACKEND_FEATURES = 1 << 1  # VHOST_BACKEND_F_IOTLB_MSG_V2
FAR_IOVA = 0x10_0000_0000
"""Where the ``far`` ranges and fills lie: nowhere near a ring."""
KERNEL_UADDR = 0xFFFF_8880_0000_0000
"""A kernel address: access_ok refuses it (perm RO or WO); with perm 0 only the
overflow check applies and the map is stored (it is never dereferenced)."""
MISS_FIELDS = {"type": 1, "size": 0, "outer": VHOST_IOTLB_MSG_V2}
"""The fields every MISS has besides iova and perm."""
RINGS = ("desc", "avail", "used")
NUMS = (1, 2, 4, 8, 16, 64)
PERMS = (3, 1, 2, 0, 4)
OPS = ("setup", "write", "fill", "start", "stop", "kick", "reset", "read")


# ---------------------------------------------------------------------- model side


@dataclass
class NetModel:
    """The model of one sequence: the device (correct or a mutant) and whether the
    sequence's ``setup`` ran."""

    dev: VhostNetDevice
    ready: bool = False

    def rings(self) -> list[tuple[int, int]]:
        """(iova, size) of the six rings: vq 0 desc, avail, used, then vq 1's."""
        out = []
        for vq in self.dev.vqs:
            out += [(vq.desc, desc_size(vq.num)), (vq.avail, avail_size(vq.num)), (vq.used, used_size(vq.num))]
        return out


def _miss_obs(m: Miss) -> dict[str, int]:
    return {"iova": m.iova, "perm": m.perm, **MISS_FIELDS}


def _tail(m: NetModel, read: bool) -> Observation:
    """What every flushing op ends with: pollin, then the misses read (if asked)."""
    out: Observation = {"pollin": m.dev.pollin}
    if read:
        out["misses"] = [_miss_obs(x) for x in m.dev.read_all()]
    out["vm_pin"] = 0
    return out


def fill_msgs(step: Step) -> list[IotlbMsg]:
    """The UPDATEs of a ``fill`` step, in order."""
    return [IotlbMsg(UPDATE, (step["iova"] + k * step["stride"]) & U64_MAX, step["size"],
                     (step["iova"] + k * step["stride"] + DELTA) & U64_MAX, step["perm"])
            for k in range(step["n"])]


def fill_digest(results: Sequence[tuple[int, int]]) -> str:
    """sha256 of the per-message ``(errno, bytes written)`` (the agent's ``vhost.fill``)."""
    h = hashlib.sha256()
    for err, written in results:
        h.update(struct.pack("<iq", err, written))
    return h.hexdigest()


# ---------------------------------------------------------------------- abstract steps




_n = st.integers(0, 255)
_read = weighted(6, 1).map(lambda k: k == 0)
# a range: kind (see _resolve_range), ring/map selector, two deltas
_range = st.tuples(weighted(10, 5, 5, 3, 4, 3, 2, 2, 4, 5, 1, 2, 2, 1, 24), _n, _n, _n)
# UPDATE: range, uaddr kind (linear, kernel, overflow, anything with perm 0), perm kind
_update = st.tuples(st.just("update"), _range, weighted(30, 1, 1, 1), weighted(12, 3, 3, 2, 1))
# INVALIDATE: range (plus the size-0 and everything kinds of _resolve_range)
_invalidate = st.tuples(st.just("invalidate"), _range)
# the same range twice with two perms (equal starts: the lookup takes the older)
_twice = st.tuples(st.just("twice"), _range, weighted(3, 1, 1, 1), weighted(3, 1, 1, 1))
# a malformed or unusual message: kind, range
_odd = st.tuples(st.just("odd"), weighted(2, 2, 2, 2, 2, 2, 2, 2, 2, 1), _range)
_vq = st.integers(0, 1)
_fill = st.tuples(st.just("fill"), weighted(4, 2, 2, 1), weighted(3, 2), _n)
_OPS: tuple[st.SearchStrategy[tuple[Any, ...]], ...] = (
    st.tuples(st.just("write"), st.lists(_update, min_size=1, max_size=3), _read),
    _invalidate.map(lambda i: ("write", [i], True)),
    st.tuples(st.just("kick"), _vq, _read),
    st.tuples(st.just("start"), _vq, _read),
    st.tuples(st.just("stop"), _vq, _read),
    st.tuples(st.just("write"), st.lists(_twice, min_size=1, max_size=1), _read),
    st.tuples(st.just("write"), st.lists(_odd, min_size=1, max_size=2), _read),
    _fill,
    st.tuples(st.just("read")),
    st.tuples(st.just("reset")),
)
_STEP = weighted(30, 14, 14, 12, 4, 5, 4, 4, 2, 1).flatmap(lambda k: _OPS[k])
# ring placement: num, layout kind (own pages / packed), page permutation seed, offsets
_placement = st.tuples(weighted(3, 2, 3, 3, 2, 1), weighted(3, 1), st.permutations(range(WINDOW_PAGES)),
                       st.lists(weighted(3, 2, 2), min_size=6, max_size=6), _n)
_USED_RW = ("update", (15, 0, 0, 0), 0, 0)  # range kind 15: the used rings; linear uaddr; RW
PROLOGUES: tuple[list[tuple[Any, ...]], ...] = (
    [],
    [("write", [_USED_RW], True)],
    [("write", [_USED_RW], True), ("start", 0, True), ("start", 1, True)],
)
"""What a sequence may start with after its setup: nothing; UPDATEs of both used
rings (so the starts succeed and the handlers get to the prefetch); that and both
starts."""
AUDIT: list[tuple[Any, ...]] = [("stop", 0, True), ("stop", 1, True), ("start", 0, True), ("start", 1, True),
                                ("kick", 0, True), ("kick", 1, True)]


def _pick(items: Sequence[Any], n: int) -> Any:
    return items[n % len(items)]


_DELTAS = (1, 2, 4, 8, 16, 3, PAGE // 2, 0x80)


def place_rings(num_kind: int, layout: int, pages: Sequence[int], offsets: Sequence[int],
                n: int) -> tuple[int, list[list[int]]]:
    """``(num, [[desc, avail, used] of vq 0, of vq 1])`` for an abstract placement:
    each ring in a page of its own (at the page start, its end, or the middle; the
    page order drawn), or all six packed one after another (4-byte aligned) from
    an offset. Never overlapping, all inside the window."""
    num = NUMS[num_kind]
    sizes = [desc_size(num), avail_size(num), used_size(num)] * 2
    addrs: list[int] = []
    if layout == 0:
        for r in range(6):
            base = WINDOW_IOVA + pages[r] * PAGE
            size = sizes[r]
            where = offsets[r]
            if where == 0:
                addrs.append(base)
            elif where == 1:
                addrs.append(base + PAGE - ((size + 3) & ~3))
            else:
                addrs.append(base + ((PAGE // 2 - size // 2) & ~3))
    else:
        at = WINDOW_IOVA + (n % 8) * 0x104 + pages[0] * 4
        for size in sizes:
            addrs.append(at)
            at += (size + 3) & ~3
    return num, [addrs[0:3], addrs[3:6]]


def _resolve_range(m: NetModel, sel: tuple[int, int, int, int]) -> tuple[int, int]:
    """An (iova, size) near the rings and maps: one ring exactly, its head, its
    tail, its inside, from one ring to the end of another, pages of the window,
    the whole window, a ring with margins, an existing map exactly, a part of an
    existing map (head, tail or inside), low iovas, far iovas, iova 0 with size 0
    (for INVALIDATE: everything), size 0 elsewhere, a wrapping range, a huge one;
    or, most often, the answer to a MISS the model holds (read or not): from its
    iova, the rest of its ring, a part of that, its page, or past the ring."""
    kind, a, b, c = sel
    rings = m.rings()
    misses = [x.iova for x in (*m.dev.pending_list, *m.dev.read_list)]
    if kind == 14 and misses:  # answer a MISS: the rest of its ring, a part of it, its page, or more
        at = _pick(misses[::-1], a)
        end = next((i + n for i, n in rings if i <= at < i + n), at + 1)
        rest = end - at
        part = b % 4
        if part == 0:
            return at, rest
        if part == 1:
            return at, max(1, min(_DELTAS[c % len(_DELTAS)], rest - 1))
        if part == 2:
            return at & ~(PAGE - 1), PAGE
        return at, rest + _DELTAS[c % len(_DELTAS)]
    if kind == 14:
        kind = 0
    r_iova, r_size = _pick(rings, a)
    d1, d2 = _DELTAS[b % len(_DELTAS)], _DELTAS[c % len(_DELTAS)]
    maps = list(m.dev.iotlb) if m.dev.iotlb is not None else []
    window_maps = [x for x in maps if x.start < WINDOW_IOVA + WINDOW_LEN and x.last >= WINDOW_IOVA]
    if kind in (9, 10) and not window_maps:
        kind = 0
    if kind == 0:  # a ring exactly
        return r_iova, r_size
    if kind == 1:  # its head
        return r_iova, max(1, r_size - d1) if d1 < r_size else 1
    if kind == 2:  # its tail
        off = min(d1, r_size - 1)
        return r_iova + off, r_size - off
    if kind == 3:  # inside it
        off = min(d1, r_size - 1)
        return r_iova + off, max(1, min(d2, r_size - off))
    if kind == 4:  # from this ring to the end of another
        o_iova, o_size = _pick(rings, b)
        lo, hi = min(r_iova, o_iova), max(r_iova + r_size, o_iova + o_size)
        return lo, hi - lo
    if kind == 5:  # pages of the window
        return WINDOW_IOVA + (a % WINDOW_PAGES) * PAGE, (1 + b % 4) * PAGE
    if kind == 6:  # the whole window
        return WINDOW_IOVA, WINDOW_LEN
    if kind == 7:  # a ring with margins
        return r_iova - d1, r_size + d1 + d2
    if kind == 8:  # a map exactly (or a ring)
        if window_maps:
            x = _pick(window_maps, a)
            return x.start, x.size
        return r_iova, r_size
    if kind == 9:  # part of a map: head, tail or inside
        x = _pick(window_maps, a)
        part = b % 3
        off = min(d1, x.size - 1)
        if part == 0:
            return x.start, max(1, x.size - off)
        if part == 1:
            return x.start + off, x.size - off
        return x.start + off, max(1, min(d2, x.size - off))
    if kind == 10:  # from inside one map past its end
        x = _pick(window_maps, a)
        off = min(d1, x.size - 1)
        return x.start + off, x.size - off + d2
    if kind == 11:  # below the window
        return (a % 64) * 0x100, (1 + b % 16) * 0x10
    if kind == 12:  # far away
        return FAR_IOVA + (a % 16) * PAGE, (1 + b % 4) * PAGE
    # kind 13: edges: iova 0 size 0, size 0 at a ring, wrapping, huge
    edge = b % 4
    if edge == 0:
        return 0, 0
    if edge == 1:
        return r_iova + (d1 if c % 2 else 0), 0
    if edge == 2:
        return U64_MAX + 1 - PAGE, 2 * PAGE
    return 0, U64_MAX


def _uaddr(kind: int, iova: int, size: int, perm: int) -> int:
    if kind == 0 or (kind == 3 and perm & 3):
        return (iova + DELTA) & U64_MAX
    if kind == 1:
        return KERNEL_UADDR
    if kind == 2:
        return U64_MAX - 0x10  # overflows with any size above 0x11
    return 0 if perm & 3 == 0 and size > U64_MAX // 2 else (iova * 7) & U64_MAX  # perm 0: anywhere


def _msg(type_: int, iova: int, size: int, uaddr: int = 0, perm: int = 0, **extra: int) -> dict[str, int]:
    out = {"type": type_, "iova": iova, "size": size, "uaddr": uaddr, "perm": perm}
    out.update(extra)
    return out


def _resolve_msg(m: NetModel, abstract: tuple[Any, ...]) -> list[dict[str, int]]:
    kind = abstract[0]
    if kind == "update" and abstract[1][0] == 15:  # the prologue's UPDATEs of both used rings
        return [_msg(UPDATE, vq.used, used_size(vq.num), (vq.used + DELTA) & U64_MAX, 3) for vq in m.dev.vqs]
    if kind == "update":
        _, rsel, ukind, pkind = abstract
        iova, size = _resolve_range(m, rsel)
        perm = PERMS[pkind]
        return [_msg(UPDATE, iova, size, _uaddr(ukind, iova, size, perm), perm)]
    if kind == "invalidate":
        iova, size = _resolve_range(m, abstract[1])
        return [_msg(INVALIDATE, iova, size)]
    if kind == "twice":
        _, rsel, p1, p2 = abstract
        iova, size = _resolve_range(m, rsel)
        size = size or 1
        return [_msg(UPDATE, iova, size, (iova + DELTA) & U64_MAX, PERMS[p1]),
                _msg(UPDATE, iova, size, (iova + DELTA) & U64_MAX, PERMS[p2])]
    # odd
    _, okind, rsel = abstract
    iova, size = _resolve_range(m, rsel)
    size = size or 1
    base = _msg(UPDATE, iova, size, (iova + DELTA) & U64_MAX, 3)
    if okind == 0:
        return [{**base, "count": (3, 39, 40, 100)[rsel[3] % 4]}]
    if okind == 1:
        return [{**base, "outer": (1, 0, 3)[rsel[3] % 3]}]
    if okind == 2:
        return [{**base, "asid": 1 + rsel[3]}]
    if okind == 3:
        return [{**base, "type": (0, 1, 4, 5, 6)[rsel[3] % 5]}]
    if okind == 4:
        return [{**base, "size": 0}]
    if okind == 5:  # INVALIDATE in the v1 format
        return [{**_msg(INVALIDATE, iova, size), "outer": 1}]
    if okind == 6:  # iova + size - 1 wraps
        return [_msg(UPDATE, U64_MAX + 1 - PAGE + (rsel[3] % 8) * 0x100, 2 * PAGE, 0, 0)]
    if okind == 7:  # perm bits access_ok ignores
        return [{**base, "perm": (4, 0xFF, 0x81)[rsel[3] % 3]}]
    if okind == 8:  # [1, U64_MAX] with perm 0: only the overflow check applies (uaddr 0 or 1)
        return [_msg(UPDATE, 1, U64_MAX, rsel[3] % 3, 0)]
    # one byte past the 5-level paging limit (so past the 4-level one too): EFAULT
    return [_msg(UPDATE, iova, size, ((1 << 56) - PAGE - size + 1) & U64_MAX, 1)]


# ---------------------------------------------------------------------- step validation


def _int(raw: Mapping[str, Any], key: str, top: int = U64_MAX) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"{key!r} is {value!r}, not an integer in 0..{top:#x}")
    return value


def _bool(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"{key!r} is {value!r}, not true or false")
    return value


_MSG_KEYS = {"type": 0xFF, "iova": U64_MAX, "size": U64_MAX, "uaddr": U64_MAX, "perm": 0xFF,
             "outer": 0xFFFFFFFF, "asid": 0xFFFFFFFF, "count": 4096}
_FIELDS: dict[str, dict[str, str]] = {
    "write": {"msgs": "msgs", "read": "bool"},
    "fill": {"n": "n", "iova": "u64", "stride": "u64", "size": "u64", "perm": "u8", "read": "bool"},
    "start": {"vq": "vq", "read": "bool"},
    "stop": {"vq": "vq", "read": "bool"},
    "kick": {"vq": "vq", "read": "bool"},
    "reset": {},
    "read": {},
}
MAX_FILL = 8192


def _check_msgs(raw: Any) -> list[dict[str, int]]:
    if not isinstance(raw, list) or not raw or len(raw) > 64 or not all(isinstance(x, dict) for x in raw):
        raise ValueError(f"'msgs' is {raw!r:.80}, not a list of 1..64 message objects")
    out = []
    for msg in raw:
        extra = sorted(set(msg) - set(_MSG_KEYS))
        if extra:
            raise ValueError(f"write: unknown message key {extra[0]!r}")
        for key in ("type", "iova", "size", "uaddr", "perm"):
            if key not in msg:
                raise ValueError(f"write: message without {key!r}")
        out.append({k: _int(msg, k, _MSG_KEYS[k]) for k in msg})
    return out


# ---------------------------------------------------------------------- the target


class VhostNetTarget:
    """The vhost-net device IOTLB target (see the module docstring)."""

    name = "vhost-net"
    description = ("vhost-net device IOTLB: UPDATE/INVALIDATE errnos, the MISS queue, SET_BACKEND and "
                   "kicks (harness.models.vhost_net)")
    system = "kernel"

    def mutants(self) -> Mapping[str, str]:
        from harness.models.iotlb_mutants import MUTANTS
        return {name: m.description for name, m in MUTANTS.items()}

    def new_model(self, mutant: str | None) -> NetModel:
        if mutant is None:
            return NetModel(VhostNetDevice())
        from harness.models.iotlb_mutants import MUTANTS
        return NetModel(MUTANTS[mutant].factory())

    def sequences(self, max_steps: int) -> st.SearchStrategy[list[Any]]:
        """A ring placement, then 0..``max_steps`` - 1 random steps (drawn as a list
        of short chunks, so Hypothesis can delete whole chunks), then the audit
        (stop, start and kick both vqs, reading every MISS)."""
        chunk = st.lists(_STEP, min_size=0, max_size=4)
        rest = st.lists(chunk, min_size=1, max_size=8)
        top = max(0, max_steps - 1)
        return st.tuples(_placement, weighted(1, 1, 2), rest).map(
            lambda pr: [("setup", *pr[0]), *PROLOGUES[pr[1]], *[s for c in pr[2] for s in c]][:top + 1] + AUDIT)

    # -- resolve ---------------------------------------------------------------

    def resolve(self, model: NetModel, abstract: Any) -> Step:
        m, op = model, abstract[0]
        if op == "setup":
            num, rings = place_rings(*abstract[1:])
            return {"op": "setup", "num": num, "rings": rings}
        if op in ("start", "stop", "kick"):
            return {"op": op, "vq": abstract[1], "read": bool(abstract[2])}
        if op in ("read", "reset"):
            return {"op": op}
        if op == "fill":
            _, nkind, where, n = abstract
            have = len(m.dev.iotlb) if m.dev.iotlb is not None else 0
            count = (MAX_IOTLB_ENTRIES - have + (0, 1, 2, 7)[n % 4], 1 + n % 32, MAX_IOTLB_ENTRIES + 50,
                     MAX_IOTLB_ENTRIES)[nkind]
            count = max(1, count)
            if where == 0:  # below the window, 16 bytes apart
                return {"op": "fill", "n": count, "iova": 0, "stride": 16, "size": 8, "perm": 3, "read": True}
            return {"op": "fill", "n": count, "iova": FAR_IOVA, "stride": PAGE, "size": PAGE, "perm": 3,
                    "read": True}
        if op == "write":
            msgs = [x for a in abstract[1] for x in _resolve_msg(m, a)]
            return {"op": "write", "msgs": msgs, "read": bool(abstract[2])}
        raise ValueError(f"unknown abstract step {abstract!r}")

    # -- the model's prediction ----------------------------------------------------

    def apply(self, model: NetModel, step: Step) -> Observation:
        m, dev, op = model, model.dev, step["op"]
        if op == "setup":
            errnos = {"set_owner": 0, "set_mem_table": 0, "set_features": dev.set_features(FEATURES),
                      "set_backend_features": 0}
            for i, (desc, avail, used) in enumerate(step["rings"]):
                errnos[f"vring{i}"] = dev.set_vring(i, step["num"], desc, avail, used)
                errnos[f"kick{i}"] = 0
            errnos["socket"] = 0
            m.ready = True
            return {"errno": next((e for e in errnos.values() if e), 0), "errnos": errnos, "vm_pin": 0}
        if not m.ready:
            raise ValueError(f"{op}: the sequence has no setup step before it")
        if op == "write":
            results = []
            for raw in step["msgs"]:
                err, written = dev.write(IotlbMsg(**raw))
                results.append([err, written])
            return {"results": results, **_tail(m, step["read"])}
        if op == "fill":
            fill = [dev.write(x) for x in fill_msgs(step)]
            errnos = {}
            for err, _ in fill:
                if err:
                    errnos[str(err)] = errnos.get(str(err), 0) + 1
            return {"written": sum(1 for e, _ in fill if not e), "errnos": errnos, "sha256": fill_digest(fill),
                    **_tail(m, step["read"])}
        if op in ("start", "stop"):
            return {"errno": dev.set_backend(step["vq"], op == "start"), **_tail(m, step["read"])}
        if op == "kick":
            dev.kick(step["vq"])
            return {"errno": 0, **_tail(m, step["read"])}
        if op == "reset":
            return {"errno": dev.set_features(FEATURES), "vm_pin": 0}
        if op == "read":
            return _tail(m, True)
        raise ValueError(f"unknown op {op!r}")

    def probes(self, model: NetModel) -> list[Probe]:
        """None: vhost has no read-only view of its IOTLB (the starts and kicks of
        the sequence and its audit are the probes)."""
        return []

    def answer_probes(self, model: NetModel, probes: Sequence[Probe]) -> Observation:
        return {}

    def counters(self, step: Step, predicted: Observation) -> dict[str, int]:
        """``misses compared`` (MISS messages a step's prediction holds) and ``errnos
        compared`` (errnos it holds: one per message written, per ioctl)."""
        misses = len(predicted.get("misses", []))
        errnos = 0
        if "results" in predicted:
            errnos += len(predicted["results"])
        if "written" in predicted:
            errnos += predicted["written"] + sum(predicted["errnos"].values())
        if "errnos" in predicted and isinstance(predicted.get("errno"), int):
            errnos += len(predicted["errnos"])
        elif "errno" in predicted:
            errnos += 1
        return {"misses compared": misses, "errnos compared": errnos}

    # -- replay files, reports --------------------------------------------------------

    def check_step(self, raw: Any) -> Step:
        if not isinstance(raw, dict):
            raise ValueError(f"{raw!r} is not a step object")
        op = raw.get("op")
        if op == "setup":
            extra = sorted(set(raw) - {"op", "num", "rings"})
            if extra:
                raise ValueError(f"setup: unknown key {extra[0]!r}")
            num = _int(raw, "num", 0xFFFF)
            rings = raw.get("rings")
            if not isinstance(rings, list) or len(rings) != 2 or not all(
                    isinstance(r, list) and len(r) == 3 and all(
                        isinstance(x, int) and not isinstance(x, bool) and WINDOW_IOVA <= x < WINDOW_IOVA + WINDOW_LEN
                        for x in r) for r in rings):
                raise ValueError(f"setup: 'rings' is {rings!r:.80}, not two [desc, avail, used] iovas in the window")
            return {"op": "setup", "num": num, "rings": [list(r) for r in rings]}
        if op not in _FIELDS:
            raise ValueError(f"'op' is {op!r}, not one of {', '.join(OPS)}")
        fields = _FIELDS[op]
        extra = sorted(set(raw) - set(fields) - {"op"})
        if extra:
            raise ValueError(f"{op}: unknown key {extra[0]!r}")
        step: Step = {"op": op}
        for key, kind in fields.items():
            if kind == "bool":
                step[key] = _bool(raw, key)
            elif kind == "msgs":
                step[key] = _check_msgs(raw.get(key))
            elif kind == "vq":
                step[key] = _int(raw, key, 1)
            elif kind == "n":
                step[key] = _int(raw, key, MAX_FILL)
            elif kind == "u8":
                step[key] = _int(raw, key, 0xFF)
            else:
                step[key] = _int(raw, key)
        return step

    def describe(self, step: Step) -> str:
        op = step["op"]
        rd = "" if step.get("read", True) else " (not read)"
        if op == "setup":
            r = step["rings"]
            return (f"setup num {step['num']} vq0 desc {r[0][0]:#x} avail {r[0][1]:#x} used {r[0][2]:#x}, "
                    f"vq1 desc {r[1][0]:#x} avail {r[1][1]:#x} used {r[1][2]:#x}")
        if op == "write":
            return "write " + "; ".join(describe_msg(x) for x in step["msgs"]) + rd
        if op == "fill":
            return (f"fill {step['n']} UPDATEs iova {step['iova']:#x} + k*{step['stride']:#x} size "
                    f"{step['size']:#x} perm {step['perm']}" + rd)
        if op in ("start", "stop", "kick"):
            return f"{op} vq {step['vq']}" + rd
        return str(op)

    def format_value(self, field_name: str, value: Any) -> str:
        leaf = field_name.rsplit(".", 1)[-1]
        if leaf.startswith("results") and isinstance(value, list):
            return "[" + ", ".join(format_value_result(v) for v in value) + "]"
        if leaf.startswith("misses") and isinstance(value, list):
            return "[" + ", ".join(f"{x.get('iova', 0):#x} perm {x.get('perm')}" if isinstance(x, dict) else repr(x)
                                   for x in value) + "]"
        if leaf in ("iova", "uaddr", "size") and isinstance(value, int):
            return hex(value)
        return default_format(field_name, value)

    # -- system side -------------------------------------------------------------------

    def driver(self) -> VhostNetDriver:
        return VhostNetDriver()

    def machine(self) -> MachineSpec:
        """The default q35 machine: vhost-net needs no device of its own."""
        from harness.vm.spec import MachineSpec
        return MachineSpec()


def describe_msg(msg: Mapping[str, int]) -> str:
    kind = {UPDATE: "UPDATE", INVALIDATE: "INVALIDATE"}.get(msg["type"], f"type {msg['type']}")
    text = f"{kind} iova {msg['iova']:#x} size {msg['size']:#x}"
    if msg["type"] == UPDATE:
        uaddr = msg["uaddr"]
        text += " uaddr " + ("linear" if uaddr == (msg["iova"] + DELTA) & U64_MAX else f"{uaddr:#x}")
        text += f" perm {msg['perm']}"
    for key in ("outer", "asid", "count"):
        if key in msg:
            text += f" {key} {msg[key]}"
    return text


def format_value_result(v: Any) -> str:
    if isinstance(v, list) and len(v) == 2:
        err, written = v
        return f"{written}" if not err else default_format("errno", err)
    return repr(v)


class VhostNetDriver:
    """The guest side of one vhost-net sequence (guest agent ops ``vhost.*``,
    ``mem.map``/``mem.unmap``; ``vhost.close`` closes only this sequence's fds)."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def setup(self) -> list[Call]:
        return [{"op": "vhost.net_open", "args": {}},
                {"op": "mem.map", "args": {"length": WINDOW_LEN, "at": REGION_VA}}]

    def bind_setup(self, results: list[Any]) -> None:
        opened, region = results
        if opened.get("errno"):
            raise DifftestError(f"the guest cannot open /dev/vhost-net: "
                                f"{errno.errorcode.get(opened['errno'], '?')} (the kernel needs CONFIG_VHOST_NET)")
        self.fd = opened["fd"]
        if region.get("user_va") != REGION_VA:
            raise DifftestError(f"mem.map placed the region at {region.get('user_va')!r}, not {REGION_VA:#x}")
        if opened.get("vm_pin"):
            raise SystemStateError(f"VmPin is {opened['vm_pin']} pages before the sequence starts")

    def calls(self, step: Step, probes: Sequence[Probe]) -> list[Call]:
        op, fd = step["op"], self.fd
        if op == "setup":
            return [{"op": "vhost.net_setup", "args": {"fd": fd, "num": step["num"], "rings": step["rings"],
                                                       "features": FEATURES,
                                                       "backend_features": BACKEND_FEATURES}}]
        if op == "write":
            return [{"op": "vhost.write", "args": {"fd": fd, "msgs": step["msgs"], "read": step["read"]}}]
        if op == "fill":
            return [{"op": "vhost.fill", "args": {"fd": fd, "n": step["n"], "iova": step["iova"],
                                                  "stride": step["stride"], "size": step["size"],
                                                  "perm": step["perm"], "uaddr_delta": DELTA,
                                                  "read": step["read"]}}]
        if op in ("start", "stop"):
            return [{"op": "vhost.set_backend", "args": {"fd": fd, "index": step["vq"],
                                                         "backend": "sock" if op == "start" else "none",
                                                         "read": step["read"]}}]
        if op == "kick":
            return [{"op": "vhost.kick", "args": {"fd": fd, "index": step["vq"], "read": step["read"]}}]
        if op == "reset":
            return [{"op": "vhost.set_features", "args": {"fd": fd, "features": FEATURES}}]
        if op == "read":
            return [{"op": "vhost.read", "args": {"fd": fd}}]
        raise DifftestError(f"unknown step op {op!r}")

    def observe(self, step: Step, probes: Sequence[Probe], results: list[Any]) -> Observation:
        rec = results[0]
        op = step["op"]
        obs: Observation = {}
        if op == "setup":
            return {"errno": rec["errno"], "errnos": rec["errnos"], "vm_pin": rec["vm_pin"]}
        if op == "write":
            obs["results"] = rec["results"]
        elif op == "fill":
            obs.update(written=rec["written"], errnos=rec["errnos"], sha256=rec["sha256"])
        elif op != "read":
            obs["errno"] = rec["errno"]
        if op != "reset":
            obs["pollin"] = rec["pollin"]
            if "misses" in rec:
                obs["misses"] = [{"iova": x["iova"], "perm": x["perm"], "type": x["type"], "size": x["size"],
                                  "outer": x["outer"]} for x in rec["misses"]]
        obs["vm_pin"] = rec["vm_pin"]
        return obs

    def teardown(self) -> list[Call]:
        close = [{"op": "vhost.close", "args": {"fd": self.fd}}] if self.fd is not None else []
        return close + [{"op": "mem.unmap", "args": {"user_va": REGION_VA}}]
