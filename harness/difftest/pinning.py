"""The iommufd pinning target of ``difftest``: sequences of IOAS operations run
against ``/dev/iommu`` of one guest with the selftest mock domain
(CONFIG_IOMMUFD_TEST) and against :mod:`harness.models.pinning`.

Every sequence opens a fresh iommufd context and maps one buffer region of
:data:`REGION_PAGES` 4 KiB pages at the fixed user VA :data:`REGION_VA`
(``mem.map(at=...)``: anonymous, touched, no THP), so every sequence starts from
no object and no pin, and a replay sees the same user VAs (the automatic iova
depends on their low bits). At its end the context is closed (every object and
pin goes) and the region unmapped.

Operations (a step's ``op``; ids are object ids, ``user_va`` a user VA of the
agent process, ``iova`` an IO-virtual address, lengths in bytes):

========================  =====================================================
``ioas_alloc``            IOMMU_IOAS_ALLOC -> ``ioas_id``
``map``                   IOMMU_IOAS_MAP (``iova`` None: automatic) -> ``iova``
``unmap``                 IOMMU_IOAS_UNMAP of [iova, iova + length) -> ``length``
``unmap_all``             IOMMU_IOAS_UNMAP iova 0, length 2**64-1 -> ``length``
``copy``                  IOMMU_IOAS_COPY src -> dst (``iova`` None: automatic)
                          -> ``dst_iova``
``mock_domain``           IOMMU_TEST_OP_MOCK_DOMAIN -> ``stdev_id``, ``hwpt_id``,
                          ``idev_id``
``destroy``               IOMMU_DESTROY of any id
``access_create``         IOMMU_TEST_OP_CREATE_ACCESS (``pin``: NEEDS_PIN_PAGES)
``access_rw``             IOMMU_TEST_OP_ACCESS_RW through the sequence's
                          ``access``-th access (0-based, in creation order)
``access_close``          close(2) of that access's fd
``check``                 nothing: the state probes only
========================  =====================================================

After every step the observation holds the step's ``errno`` and, when it is 0,
its returned fields; ``vm_pin`` (VmPin, pages); ``refs``, the pin count of every
page of the region (MD_CHECK_REFS; None above :data:`MAX_REFS`); ``check_map``,
MD_CHECK_MAP's errno for every area of every IOAS with a mock domain (0: each
2 KiB IO page maps the page behind the area's user VA), and for the areas the
step removed (EINVAL: the mock domain no longer maps them).

Semantics: drivers/iommu/iommufd/ (ioas.c, io_pagetable.c, pages.c, device.c,
main.c, selftest.c) of Linux 6.12, as stated by the model.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st

from harness.difftest.engine import (
    Call,
    DifftestError,
    Observation,
    Pending,
    Probe,
    Step,
    SystemStateError,
)
from harness.difftest.engine import format_value as default_format
from harness.difftest.strategies import weighted
from harness.models.pinning import (
    IOAS,
    MOCK_APERTURE_LAST,
    MOCK_APERTURE_START,
    PAGE_SIZE,
    U64_MAX,
    IommufdCtx,
    IommufdError,
    MockDomain,
)

if TYPE_CHECKING:
    from harness.vm.spec import MachineSpec

PAGE = PAGE_SIZE
REGION_VA = 0x7E00_0000_0000
"""User VA of each sequence's buffer region: far below the mmap base of the agent
(at most 1 TiB of ASLR below the 47-bit top) and above everything else, so
``mem.map(at=...)`` always finds it free."""
REGION_PAGES = 64
REGION_LEN = REGION_PAGES * PAGE
REGION_END = REGION_VA + REGION_LEN
MOCK_IO_PAGE = PAGE // 2
"""The mock domain's IO page (MOCK_IO_PAGE_SIZE): MD_CHECK_MAP needs iova, length
and user VA aligned to it."""
MAX_REFS = 8
"""Pin counts above this are reported as None by the refs probe (guest op ``iommufd.test_refs``)."""
ACCESS_RW_BUFFER = REGION_VA
"""The user buffer of ACCESS_RW (the data is not compared; only errno)."""
FAR_FD = 0x7FFF_FFFF
"""An fd number no process has: stands for an access the guest never created
(only after a divergence, when the system and the model disagree on it)."""
EINVAL, ENOENT = errno.EINVAL, errno.ENOENT

OPS = ("ioas_alloc", "map", "unmap", "unmap_all", "copy", "mock_domain", "destroy", "access_create",
       "access_rw", "access_close", "check")

# ---------------------------------------------------------------------- model side


@dataclass
class _Access:
    """An access the sequence created: its object id in the model, its IOAS, open or closed."""

    id: int
    ioas: int
    open: bool = True


class NoSuchIOAS(IOAS):
    """An id of the context that is not a live IOAS (never allocated, destroyed, or
    another kind of object): the model refuses every operation on it with ENOENT at
    the point where the kernel's ``iommufd_get_ioas`` fails, after the checks that
    come before the lookup (e.g. a COPY to it from a live IOAS still checks the
    source range first)."""

    def __init__(self, ctx: IommufdCtx, ioas_id: int):
        super().__init__(ctx, ioas_id)
        self._destroyed = True  # the model's own mark of an IOAS that is gone


@dataclass
class PinningModel:
    """The model of one sequence: the context (the correct model or a mutant), the
    mock domains and accesses the sequence made, the largest id seen and, per HWPT,
    the areas after the previous step (to probe the ones a step removed)."""

    ctx: IommufdCtx
    mocks: list[MockDomain] = field(default_factory=list)
    accesses: list[_Access] = field(default_factory=list)
    max_id: int = 0
    last_areas: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)

    def ioas_ids(self) -> list[int]:
        return [i for i in self.ctx.object_ids() if self.ctx.object_kind(i) == "ioas"]

    def lookup(self, ioas_id: int) -> IOAS:
        """The IOAS with that id, or a :class:`NoSuchIOAS`."""
        if self.ctx.object_kind(ioas_id) == "ioas":
            return self.ctx.ioas(ioas_id)
        return NoSuchIOAS(self.ctx, ioas_id)

    def seen(self, *ids: int) -> None:
        self.max_id = max(self.max_id, *ids)

    def hwpts(self) -> dict[int, IOAS]:
        """Live mock HWPTs: id -> the IOAS they are attached to."""
        out: dict[int, IOAS] = {}
        for md in self.mocks:
            if md.domain.attached and self.ctx.object_kind(md.hwpt_id) == "hwpt_paging":
                out.setdefault(md.hwpt_id, md.ioas)
        return out


def _areas(ioas: IOAS) -> list[tuple[int, int, int]]:
    """``(iova, last, user_va)`` of every area, ascending."""
    return [(a.iova, a.last, a.user_va) for a in ioas.areas()]


def check_map_answer(areas: Sequence[tuple[int, int, int]], iova: int, length: int, user_va: int) -> int:
    """What MD_CHECK_MAP returns for [iova, iova + length) against ``user_va`` when the
    mock domain maps exactly ``areas`` (``iommufd_test_md_check_pa``): EINVAL for a
    misaligned argument, for a 2 KiB IO page no area maps, or one whose area maps a
    different user VA at that offset (private anonymous memory: another VA is another
    physical page); else 0."""
    if iova % MOCK_IO_PAGE or length % MOCK_IO_PAGE or user_va % MOCK_IO_PAGE or user_va + length > U64_MAX:
        return EINVAL
    cur, end = iova, iova + length
    for a_iova, a_last, a_va in areas:
        if a_last < cur:
            continue
        if a_iova > cur or a_va + (cur - a_iova) != user_va + (cur - iova):
            return EINVAL
        cur = a_last + 1
        if cur >= end:
            return 0
    return 0 if cur >= end else EINVAL


def _audit_keys(step: Step) -> list[str]:
    return ([f"unmap ioas {i} iova {iova:#x} length {length:#x}" for i, iova, length in step["areas"]]
            + [f"unmap_all ioas {i}" for i in step["ioas"]])


def _audit(m: PinningModel, step: Step) -> dict[str, dict[str, int]]:
    """The audit's predicted answers: each area's UNMAP, then each IOAS's UNMAP-all."""
    out: dict[str, dict[str, int]] = {}
    keys = iter(_audit_keys(step))
    for ioas, iova, length in step["areas"]:
        try:
            out[next(keys)] = {"errno": 0, "length": m.lookup(ioas).unmap(iova, length)}
        except IommufdError as exc:
            out[next(keys)] = {"errno": exc.errno or 0}
    for ioas in step["ioas"]:
        try:
            out[next(keys)] = {"errno": 0, "length": m.lookup(ioas).unmap_all()}
        except IommufdError as exc:
            out[next(keys)] = {"errno": exc.errno or 0}
    return out


def _probe_key(p: Probe) -> str:
    return f"hwpt {p['hwpt']} [{p['iova']:#x}, +{p['length']:#x}) -> {p['user_va']:#x}"


# ---------------------------------------------------------------------- abstract steps

# Abstract steps are tuples of small integers (selectors) that resolve() turns into
# concrete arguments from the model's state. Each selector's first field is a kind
# drawn with weights (kind 0, the most common, is also where Hypothesis shrinks to),
# the others index into what the state offers (IOASes, areas) modulo its size.




_sel = st.integers(0, 63)
# IOAS argument: a live IOAS, a live IOAS that has areas, another object's id, 0, an unused id
_ioas_sel = st.tuples(weighted(60, 0, 2, 1, 1), _sel)
_src_sel = st.tuples(weighted(8, 50, 1, 1, 1), _sel)  # COPY's source, UNMAP: one with areas
# user VA: a region page, + 2 KiB, + 1, past the region, its last pages, 0, the top of the space
_va_sel = st.tuples(weighted(24, 2, 1, 1, 1, 1, 1), _sel)
# length: whole pages fitting the region, 0, 2 KiB multiples, unaligned, overflowing, past the region
_len_sel = st.tuples(weighted(24, 1, 2, 1, 1, 1), _sel)
# fixed iova (None: automatic); kinds in _resolve_iova; then a sub-page offset
_sub_sel = weighted(13, 2, 1)
_iova_sel = st.one_of(st.none(), st.tuples(weighted(6, 4, 3, 3, 2, 1, 2, 1, 1, 1), _sel, _sub_sel))
# (iova, length) over areas: kinds in _resolve_range; then a delta
_delta_sel = weighted(4, 2, 1, 1, 1)
_range_sel = st.tuples(weighted(10, 2, 2, 2, 2, 6, 1, 2, 1, 1, 1, 1, 1), _sel, _delta_sel)
_copy_range_sel = st.tuples(weighted(10, 2, 2, 3, 2, 1, 0, 3, 0, 1, 1, 0, 1), _sel, _delta_sel)
# (readable, writeable): rw, r-, -w, --
_prot_sel = weighted(12, 3, 1, 1)
# destroy: a live object (newest first), a mock device's selftest id, 0, an unused id
_obj_sel = st.tuples(weighted(3, 10, 1, 1), _sel)

# An abstract step draws its op by weight (MAP most often, and the op Hypothesis
# shrinks toward), then only the selectors that op uses: a choice no op reads would
# still be "shrunk" by Hypothesis, spending its budget of successful shrinks
# (500) on nothing.
ABSTRACT_OPS = ("map", "unmap", "copy", "mock_domain", "unmap_all", "destroy", "access_create", "access_rw",
                "access_close", "ioas_alloc")
_op_sel = weighted(8, 6, 3, 2, 1, 1, 1, 2, 1, 1)
_OP_STEPS: tuple[st.SearchStrategy[tuple[Any, ...]], ...] = (
    st.tuples(st.just("map"), _ioas_sel, _va_sel, _len_sel, _iova_sel, _prot_sel),
    st.tuples(st.just("unmap"), _src_sel, _range_sel),
    st.tuples(st.just("copy"), _ioas_sel, _src_sel, _copy_range_sel, _iova_sel, _prot_sel),
    st.tuples(st.just("mock_domain"), _ioas_sel),
    st.tuples(st.just("unmap_all"), _ioas_sel),
    st.tuples(st.just("destroy"), _obj_sel),
    st.tuples(st.just("access_create"), _ioas_sel, st.booleans()),
    st.tuples(st.just("access_rw"), _sel, _range_sel, st.booleans()),
    st.tuples(st.just("access_close"), _sel),
    st.tuples(st.just("ioas_alloc")),
)
_STEP = _op_sel.flatmap(lambda kind: _OP_STEPS[kind])


_DELTAS = (PAGE, 2 * PAGE, MOCK_IO_PAGE, 1, 3 * PAGE)
_SUBS = (0, MOCK_IO_PAGE, 1)


_SPAN = 8


def _pick(items: Sequence[Any], n: int) -> Any:
    """Item ``n % 8``, or the last one when there are fewer: the choice of an IOAS or
    an area does not move when the shrinker deletes ones made after it."""
    return items[min(n % _SPAN, len(items) - 1)]


def _wrap(x: int) -> int:
    return x % (U64_MAX + 1)


def _resolve_ioas(m: PinningModel, sel: tuple[int, int]) -> int:
    """An id for an IOAS argument (see ``_ioas_sel``)."""
    kind, n = sel
    live = m.ioas_ids()
    if kind == 1:
        with_areas = [i for i in live if m.ctx.ioas(i).areas()]
        live = with_areas or live
    if kind <= 1 and live:
        return int(_pick(live, n))
    others = [i for i in m.ctx.object_ids() if i not in live]
    if kind == 2 and others:
        return int(_pick(others, n))
    if kind == 3:
        return 0
    return m.max_id + 1 + n % 2


def _resolve_va(sel: tuple[int, int]) -> int:
    kind, n = sel
    page = REGION_VA + (n % REGION_PAGES) * PAGE
    if kind == 0:
        return page
    if kind == 1:
        return page + MOCK_IO_PAGE
    if kind == 2:
        return page + 1
    if kind == 3:  # just past the region: not mapped
        return REGION_END + (n % 4) * PAGE
    if kind == 4:  # the region's last pages: long lengths run past its end
        return REGION_END - (1 + n % 4) * PAGE
    if kind == 5:
        return 0
    return U64_MAX + 1 - (1 + n % 2) * PAGE  # the top of the space: user_va + length wraps


def _resolve_len(sel: tuple[int, int], user_va: int) -> int:
    kind, n = sel
    room = max(1, (REGION_END - user_va) // PAGE) if REGION_VA <= user_va < REGION_END else REGION_PAGES
    if kind == 0:  # whole pages that fit in the region from user_va
        return (1 + n % room) * PAGE
    if kind == 1:
        return 0
    if kind == 2:  # mock IO pages: 2 KiB multiples
        return MOCK_IO_PAGE * (1 + n % 4)
    if kind == 3:  # not a multiple of anything
        return (1 + n % 8) * PAGE + (1 if n % 2 else -1)
    if kind == 4:  # the overflow edges
        return (U64_MAX, U64_MAX - 1, U64_MAX - PAGE + 1, 1 << 63)[n % 4]
    return REGION_LEN + (1 + n % 4) * PAGE  # past the region's end (with a domain: EFAULT)


def _resolve_iova(m: PinningModel, sel: tuple[int, int, int] | None, ioas: int, length: int) -> int | None:
    """A fixed iova (None: automatic) near the interesting places: the mock aperture
    [0x1000000, 0x7fffffff] and its ends, next to, before or inside existing areas,
    iova 0, the last pages of the 64-bit space, 2**64-1; sometimes off by a sub-page."""
    if sel is None:
        return None
    kind, n, sub = sel
    areas = _areas(m.ctx.ioas(ioas)) if m.ctx.object_kind(ioas) == "ioas" else []
    a = _pick(areas, n) if areas else None
    if a is None and kind in (1, 2, 3):
        kind = 0
    if kind == 0:  # inside the aperture
        base = MOCK_APERTURE_START + (n % 32) * PAGE
    elif kind == 1:  # right after an area
        assert a is not None
        base = a[1] + 1
    elif kind == 2:  # right before an area
        assert a is not None
        base = a[0] - length
    elif kind == 3:  # overlapping an area
        assert a is not None
        base = a[0] + (n // _SPAN % 4) * PAGE
    elif kind == 4:  # ending exactly at the aperture's end
        base = MOCK_APERTURE_LAST + 1 - length - (n % 2) * PAGE
    elif kind == 5:  # straddling the aperture's end
        base = MOCK_APERTURE_LAST + 1 - (1 + n % 4) * PAGE
    elif kind == 6:  # straddling the aperture's start
        base = MOCK_APERTURE_START - (1 + n % 4) * PAGE
    elif kind == 7:  # low iovas, 0 included
        base = (n % 4) * PAGE
    elif kind == 8:  # the last pages of the 64-bit space
        base = U64_MAX + 1 - (1 + n % 4) * PAGE
    else:
        base = U64_MAX - (n % 2)
    return _wrap(base + _SUBS[sub])


def _resolve_range(m: PinningModel, ioas: int, sel: tuple[int, int, int], *,
                   limit: int | None = None) -> tuple[int, int]:
    """An (iova, length) over the IOAS's areas: one area exactly, its head, tail or
    inside (straddling one end or both), two neighbours, an area and part of the
    next, an area with margins, from inside one to inside the next, everything,
    length 0, overflowing, nowhere, or from the first area to the last."""
    kind, n, d_sel = sel
    d = _DELTAS[d_sel]
    areas = _areas(m.ctx.ioas(ioas)) if m.ctx.object_kind(ioas) == "ioas" else []
    if not areas and kind not in (8, 9, 10):
        kind = 11
    first = last = 0
    nxt: tuple[int, int, int] | None = None
    if areas:
        # the kinds about "the next area" take one that has a next one, if any
        i = min(n % _SPAN, len(areas) - (2 if kind in (4, 5, 7) and len(areas) > 1 else 1))
        first, last, _ = areas[i]
        nxt = areas[i + 1] if i + 1 < len(areas) else None
    if kind == 0:  # exactly one area
        iova, length = first, last - first + 1
    elif kind == 1:  # its head: the area sticks out past the end
        iova, length = first, max(0, last - first + 1 - d)
    elif kind == 2:  # its tail: the area sticks out before the start
        iova, length = first + d, max(0, last - first + 1 - d)
    elif kind == 3:  # inside it: the area sticks out at both ends
        iova, length = first + d, max(0, last - first + 1 - 2 * d)
    elif kind == 4:  # this area and the next one (with what lies between)
        end = nxt[1] if nxt is not None else last
        iova, length = first, end - first + 1
    elif kind == 5:  # this area and part of the next one (less than all of it)
        if nxt is not None:
            part = d if d < nxt[1] - nxt[0] + 1 else max(1, (nxt[1] - nxt[0] + 1) // 2)
            end = nxt[0] + part - 1
        else:
            end = last + d
        iova, length = first, end - first + 1
    elif kind == 6:  # this area with margins on both sides
        iova, length = first - d, last - first + 1 + 2 * d
    elif kind == 7:  # from inside this area to inside the next
        end = nxt[0] + d - 1 if nxt is not None else last
        iova, length = first + d, max(0, end - first - d + 1)
    elif kind == 8:  # everything (iova 0, length 2**64-1)
        iova, length = 0, U64_MAX
    elif kind == 9:  # length 0
        iova, length = (first if areas else MOCK_APERTURE_START), 0
    elif kind == 10:  # overflowing
        iova, length = ((U64_MAX + 1 - PAGE, 2 * PAGE), (MOCK_APERTURE_START, U64_MAX - 1),
                        (U64_MAX, 1), (MOCK_APERTURE_START, (16 << 20) + 1))[n % 4]
    elif kind == 11:  # where nothing is mapped (probably)
        iova, length = 0x4000_0000 + (n % 8) * PAGE, (1 + d_sel % 4) * PAGE
    else:  # from the first area to the last one
        iova, length = areas[0][0], areas[-1][1] - areas[0][0] + 1
    iova = _wrap(iova)
    if limit is not None and length > limit and length != (16 << 20) + 1:
        length = limit
    return iova, min(length, U64_MAX)


def _prot(sel: int) -> tuple[bool, bool]:
    """(readable, writeable) of a ``_prot_sel`` kind."""
    return ((True, True), (True, False), (False, True), (False, False))[sel]


# ---------------------------------------------------------------------- step validation

_U32 = (1 << 32) - 1


def _int(step: Mapping[str, Any], key: str, top: int) -> int:
    value = step.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"{key!r} is {value!r}, not an integer in 0..{top:#x}")
    return value


def _bool(step: Mapping[str, Any], key: str) -> bool:
    value = step.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"{key!r} is {value!r}, not true or false")
    return value


_FIELDS: dict[str, dict[str, str]] = {
    "ioas_alloc": {},
    "map": {"ioas": "u32", "user_va": "u64", "length": "u64", "iova": "u64?", "readable": "bool",
            "writeable": "bool"},
    "unmap": {"ioas": "u32", "iova": "u64", "length": "u64"},
    "unmap_all": {"ioas": "u32"},
    "copy": {"dst": "u32", "src": "u32", "src_iova": "u64", "length": "u64", "iova": "u64?",
             "readable": "bool", "writeable": "bool"},
    "mock_domain": {"ioas": "u32"},
    "destroy": {"id": "u32"},
    "access_create": {"ioas": "u32", "pin": "bool"},
    "access_rw": {"access": "u32", "iova": "u64", "length": "u64", "write": "bool"},
    "access_close": {"access": "u32"},
    "check": {},
    "audit": {},
}


def _check_audit(raw: Mapping[str, Any]) -> Step:
    areas, ids = raw.get("areas"), raw.get("ioas")
    if not isinstance(areas, list) or not all(
            isinstance(a, list) and len(a) == 3 and all(isinstance(x, int) and not isinstance(x, bool)
                                                        and 0 <= x <= U64_MAX for x in a) for a in areas):
        raise ValueError(f"audit: 'areas' is {areas!r:.80}, not a list of [ioas, iova, length]")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= _U32
                                            for i in ids):
        raise ValueError(f"audit: 'ioas' is {ids!r:.80}, not a list of ids")
    extra = sorted(set(raw) - {"op", "areas", "ioas"})
    if extra:
        raise ValueError(f"audit: unknown key {extra[0]!r}")
    return {"op": "audit", "areas": [list(a) for a in areas], "ioas": list(ids)}


# ---------------------------------------------------------------------- the target


class PinningTarget:
    """The iommufd pinning target (see the module docstring)."""

    name = "pinning"
    description = "iommufd IOAS areas, automatic iova, unmap/copy rules and page pins (harness.models.pinning)"
    system = "kernel"

    def mutants(self) -> Mapping[str, str]:
        from harness.models.pinning_mutants import MUTANTS
        return {name: m.description for name, m in MUTANTS.items()}

    def new_model(self, mutant: str | None) -> PinningModel:
        if mutant is None:
            ctx = IommufdCtx()
        else:
            from harness.models.pinning_mutants import MUTANTS
            ctx = MUTANTS[mutant].factory()
        ctx.set_user_memory([(REGION_VA, REGION_END - 1)])
        return PinningModel(ctx)

    def sequences(self, max_steps: int) -> st.SearchStrategy[list[Any]]:
        """Lists of abstract steps: an IOAS_ALLOC (nearly every minimal sequence needs
        one), for half of them a MOCK_DOMAIN on it, random steps up to ``max_steps``
        in all, then the audit (UNMAP of every
        area the model has, then UNMAP-all of every IOAS: what an IOAS holds without a
        domain is seen nowhere else). The random steps are drawn as a list of short
        lists (about 12 steps on average; a flat list would average 5) that Hypothesis
        shrinks by deleting steps and whole chunks."""
        chunk = st.lists(_STEP, min_size=0, max_size=4)
        rest = st.lists(chunk, min_size=1, max_size=8)
        top = max(0, max_steps - 1)
        # half the sequences give IOAS 1 a mock domain at once: automatic iovas start
        # at PAGE_SIZE, outside the mock aperture, so a later MOCK_DOMAIN rarely fits
        start = weighted(1, 1).map(lambda k: [("ioas_alloc",), ("mock_domain", (0, 0))][:k + 1])
        return st.tuples(start, rest).map(
            lambda sr: [*sr[0], *[s for c in sr[1] for s in c][:top + 1 - len(sr[0])], ("audit",)])

    # -- resolve -------------------------------------------------------------

    def resolve(self, model: PinningModel, abstract: Any) -> Step:
        m = model
        op = abstract[0]
        if op in ("unmap", "copy") and abstract[1 if op == "unmap" else 2][0] <= 1 \
                and not any(m.ctx.ioas(i).areas() for i in m.ioas_ids()):
            # nothing is mapped anywhere: an UNMAP or COPY of a live IOAS would only say
            # ENOENT; map something first
            n = abstract[1][1]
            abstract = ("map", (0, n), (0, n), (0, n), None, 0)
            op = "map"
        if op == "ioas_alloc":
            return {"op": "ioas_alloc"}
        if op == "audit":
            ids = m.ioas_ids()
            areas = [[i, iova, last - iova + 1] for i in ids for iova, last, _ in _areas(m.ctx.ioas(i))]
            return {"op": "audit", "areas": areas, "ioas": ids}
        if op == "map":
            _, ioas_sel, va_sel, len_sel, iova_sel, prot = abstract
            ioas = _resolve_ioas(m, ioas_sel)
            user_va = _resolve_va(va_sel)
            length = _resolve_len(len_sel, user_va)
            readable, writeable = _prot(prot)
            return {"op": "map", "ioas": ioas, "user_va": user_va, "length": length,
                    "iova": _resolve_iova(m, iova_sel, ioas, length), "readable": readable,
                    "writeable": writeable}
        if op == "unmap":
            _, ioas_sel, range_sel = abstract
            ioas = _resolve_ioas(m, ioas_sel)
            iova, length = _resolve_range(m, ioas, range_sel)
            return {"op": "unmap", "ioas": ioas, "iova": iova, "length": length}
        if op == "unmap_all":
            return {"op": "unmap_all", "ioas": _resolve_ioas(m, abstract[1])}
        if op == "copy":
            _, dst_sel, src_sel, range_sel, iova_sel, prot = abstract
            src = _resolve_ioas(m, src_sel)
            dst = _resolve_ioas(m, dst_sel)
            src_iova, length = _resolve_range(m, src, range_sel)
            readable, writeable = _prot(prot)
            return {"op": "copy", "dst": dst, "src": src, "src_iova": src_iova, "length": length,
                    "iova": _resolve_iova(m, iova_sel, dst, length), "readable": readable,
                    "writeable": writeable}
        if op == "mock_domain":
            return {"op": "mock_domain", "ioas": _resolve_ioas(m, abstract[1])}
        if op == "destroy":
            kind, n = abstract[1]
            ids = m.ctx.object_ids()
            stdevs = [i for i in ids if m.ctx.object_kind(i) == "selftest"]
            if kind == 1 and stdevs:
                obj = _pick(stdevs, n)
            elif kind <= 1 and ids:
                obj = _pick(ids[::-1], n)
            else:
                obj = 0 if kind == 2 else m.max_id + 1 + n % 2
            return {"op": "destroy", "id": obj}
        if op == "access_create":
            return {"op": "access_create", "ioas": _resolve_ioas(m, abstract[1]), "pin": bool(abstract[2])}
        if op in ("access_rw", "access_close"):
            live = [i for i, acc in enumerate(m.accesses) if acc.open]
            if not live:  # no access to use: make one
                return {"op": "access_create", "ioas": _resolve_ioas(m, (0, abstract[1])), "pin": False}
            k = _pick(live, abstract[1])
            if op == "access_close":
                return {"op": "access_close", "access": k}
            iova, length = _resolve_range(m, m.accesses[k].ioas, abstract[2], limit=REGION_LEN)
            return {"op": "access_rw", "access": k, "iova": iova, "length": length, "write": bool(abstract[3])}
        raise ValueError(f"unknown abstract step {abstract!r}")

    # -- the model's prediction -------------------------------------------------

    def apply(self, model: PinningModel, step: Step) -> Observation:
        """Run ``step`` on the model: ``{"errno": 0, <returned fields>}`` or ``{"errno": E}``."""
        m, op = model, step["op"]
        try:
            if op == "ioas_alloc":
                ioas = m.ctx.ioas_alloc()
                m.seen(ioas.id)
                return {"errno": 0, "ioas_id": ioas.id}
            if op == "map":
                iova = m.lookup(step["ioas"]).map(step["user_va"], step["length"], iova=step["iova"],
                                                  readable=step["readable"], writeable=step["writeable"])
                return {"errno": 0, "iova": iova}
            if op == "unmap":
                return {"errno": 0, "length": m.lookup(step["ioas"]).unmap(step["iova"], step["length"])}
            if op == "unmap_all":
                return {"errno": 0, "length": m.lookup(step["ioas"]).unmap_all()}
            if op == "copy":
                src, dst = m.lookup(step["src"]), m.lookup(step["dst"])
                iova = dst.copy_from(src, step["src_iova"], step["length"], iova=step["iova"],
                                     readable=step["readable"], writeable=step["writeable"])
                return {"errno": 0, "dst_iova": iova}
            if op == "mock_domain":
                md = m.ctx.mock_domain(step["ioas"])
                m.mocks.append(md)
                m.seen(md.stdev_id, md.hwpt_id, md.idev_id)
                return {"errno": 0, "stdev_id": md.stdev_id, "hwpt_id": md.hwpt_id, "idev_id": md.idev_id}
            if op == "destroy":
                m.ctx.destroy(step["id"])
                return {"errno": 0}
            if op == "access_create":
                access_id = m.ctx.create_access(step["ioas"], needs_pin_pages=step["pin"])
                m.seen(access_id)
                m.accesses.append(_Access(access_id, step["ioas"]))
                return {"errno": 0}
            if op == "access_rw":
                acc = m.accesses[step["access"]]
                m.ctx.ioas(acc.ioas).access_rw(step["iova"], step["length"], write=step["write"])
                return {"errno": 0}
            if op == "access_close":
                acc = m.accesses[step["access"]]
                m.ctx.close_access(acc.id)
                acc.open = False
                return {"errno": 0}
            if op == "check":
                return {}
            if op == "audit":
                return {"audit": _audit(m, step)}
        except IommufdError as exc:
            return {"errno": exc.errno}
        raise ValueError(f"unknown op {op!r}")

    def probes(self, model: PinningModel) -> list[Probe]:
        """MD_CHECK_MAP of every area of every IOAS with a mock HWPT (2 KiB aligned
        ones: all of them, with a mock domain's alignment), then of each area such a
        HWPT had after the previous step that no area meets now."""
        out: list[Probe] = []
        current: dict[int, list[tuple[int, int, int]]] = {}
        for hwpt, ioas in sorted(model.hwpts().items()):
            areas = _areas(ioas)
            current[hwpt] = areas
            for iova, last, user_va in areas:
                out.append({"hwpt": hwpt, "ioas": ioas.id, "iova": iova, "length": last - iova + 1,
                            "user_va": user_va})
            for iova, last, user_va in model.last_areas.get(hwpt, []):
                if all(a_last < iova or a_iova > last for a_iova, a_last, _ in areas):
                    out.append({"hwpt": hwpt, "ioas": ioas.id, "iova": iova, "length": last - iova + 1,
                                "user_va": user_va})
        model.last_areas = current
        return [p for p in out if not (p["iova"] % MOCK_IO_PAGE or p["length"] % MOCK_IO_PAGE
                                       or p["user_va"] % MOCK_IO_PAGE)]

    def answer_probes(self, model: PinningModel, probes: Sequence[Probe]) -> Observation:
        ctx = model.ctx
        pinned = ctx.pinned_pages() if ctx.pinned_vm else {}
        refs: list[int | None] = []
        for page in range(REGION_PAGES):
            n = pinned.get(REGION_VA + page * PAGE, 0)
            refs.append(n if n <= MAX_REFS else None)
        hwpts = model.hwpts()
        check_map: dict[str, int] = {}
        for p in probes:
            ioas = hwpts.get(p["hwpt"])
            answer = ENOENT if ioas is None else check_map_answer(_areas(ioas), p["iova"], p["length"],
                                                                  p["user_va"])
            check_map[_probe_key(p)] = answer
        return {"vm_pin": ctx.pinned_vm, "refs": refs, "check_map": check_map}

    # -- replay files, reports ---------------------------------------------------

    def check_step(self, raw: Any) -> Step:
        if not isinstance(raw, dict):
            raise ValueError(f"{raw!r} is not a step object")
        op = raw.get("op")
        if op not in _FIELDS:
            raise ValueError(f"'op' is {op!r}, not one of {', '.join(OPS)}")
        if op == "audit":
            return _check_audit(raw)
        fields = _FIELDS[op]
        extra = sorted(set(raw) - set(fields) - {"op"})
        if extra:
            raise ValueError(f"{op}: unknown key {extra[0]!r}")
        step: Step = {"op": op}
        for key, kind in fields.items():
            if kind == "bool":
                step[key] = _bool(raw, key)
            elif kind == "u64?" and raw.get(key, None) is None:
                if key not in raw:
                    raise ValueError(f"{op}: missing key {key!r} (null for an automatic iova)")
                step[key] = None
            else:
                step[key] = _int(raw, key, U64_MAX if kind.startswith("u64") else _U32)
        return step

    def describe(self, step: Step) -> str:
        op = step["op"]

        def prot() -> str:
            return ("r" if step["readable"] else "-") + ("w" if step["writeable"] else "-")

        def at() -> str:
            return "auto" if step["iova"] is None else f"{step['iova']:#x}"

        if op == "map":
            return (f"map ioas {step['ioas']} user_va {step['user_va']:#x} length {step['length']:#x} "
                    f"iova {at()} {prot()}")
        if op == "unmap":
            return f"unmap ioas {step['ioas']} iova {step['iova']:#x} length {step['length']:#x}"
        if op == "unmap_all":
            return f"unmap_all ioas {step['ioas']}"
        if op == "copy":
            return (f"copy ioas {step['src']} iova {step['src_iova']:#x} length {step['length']:#x} "
                    f"-> ioas {step['dst']} iova {at()} {prot()}")
        if op in ("mock_domain", "access_create"):
            return f"{op} ioas {step['ioas']}" + (" needs-pin-pages" if step.get("pin") else "")
        if op == "destroy":
            return f"destroy id {step['id']}"
        if op == "access_rw":
            return (f"access_rw access #{step['access']} iova {step['iova']:#x} length {step['length']:#x} "
                    + ("write" if step["write"] else "read"))
        if op == "access_close":
            return f"access_close access #{step['access']}"
        if op == "audit":
            return f"audit: unmap each of {len(step['areas'])} areas, then unmap_all ioas {step['ioas']}"
        return str(op)

    def format_value(self, field_name: str, value: Any) -> str:
        if field_name.startswith("refs") and isinstance(value, list):
            return "[" + " ".join("-" if v is None else str(v) for v in value) + "]"
        if field_name.startswith("refs["):
            page = int(field_name[5:].split("]")[0])
            return f"{'-' if value is None else value} (page {page}, user_va {REGION_VA + page * PAGE:#x})"
        if field_name.startswith("check_map") and isinstance(value, int):
            return default_format("errno", value)
        if field_name in ("ioas_id", "stdev_id", "hwpt_id", "idev_id", "vm_pin") and isinstance(value, int):
            return str(value)
        return default_format(field_name, value)

    # -- system side -----------------------------------------------------------

    def driver(self) -> PinningDriver:
        return PinningDriver()

    def machine(self) -> MachineSpec:
        """A machine without an IOMMU device: with intel-iommu registered first the
        selftest's mock device gets no iommu and MOCK_DOMAIN is EINVAL (the kernel's
        fwspec-less probe takes the first registered IOMMU)."""
        from harness.vm.spec import MachineSpec
        return MachineSpec()


class PinningDriver:
    """The guest side of one pinning sequence (guest agent ops ``iommufd.*``,
    ``mem.map``/``mem.unmap``, ``fd.close``/``fd.close_all``)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.access_fds: list[int] = []
        self.creates_issued = 0

    def setup(self) -> list[Call]:
        return [{"op": "iommufd.open", "args": {}},
                {"op": "mem.map", "args": {"length": REGION_LEN, "at": REGION_VA}}]

    def bind_setup(self, results: list[Any]) -> None:
        opened, region = results
        if opened.get("errno"):
            raise DifftestError(f"the guest cannot open /dev/iommu: {errno.errorcode.get(opened['errno'], '?')} "
                                "(the kernel needs CONFIG_IOMMUFD)")
        self.fd = opened["fd"]
        if region.get("user_va") != REGION_VA:
            raise DifftestError(f"mem.map placed the region at {region.get('user_va')!r}, not {REGION_VA:#x}")
        if opened.get("vm_pin"):
            raise SystemStateError(f"VmPin is {opened['vm_pin']} pages before the sequence starts: the previous "
                                   "sequence's pins outlived the close of its iommufd context")

    def _args(self, **args: Any) -> dict[str, Any]:
        return {"fd": self.fd, **args}

    def _access_fd(self, k: int) -> int:
        if k < len(self.access_fds):
            return self.access_fds[k]
        if self.creates_issued > len(self.access_fds):
            raise Pending()
        return FAR_FD  # the guest never created it (the model and the kernel already disagreed)

    def _op_call(self, step: Step) -> Call | None:
        op = step["op"]
        a = self._args
        if op == "ioas_alloc":
            return {"op": "iommufd.ioas_alloc", "args": a()}
        if op == "map":
            return {"op": "iommufd.map", "args": a(ioas_id=step["ioas"], user_va=step["user_va"],
                                                   length=step["length"], iova=step["iova"],
                                                   readable=step["readable"], writeable=step["writeable"])}
        if op == "unmap":
            return {"op": "iommufd.unmap", "args": a(ioas_id=step["ioas"], iova=step["iova"],
                                                     length=step["length"])}
        if op == "unmap_all":
            return {"op": "iommufd.unmap_all", "args": a(ioas_id=step["ioas"])}
        if op == "copy":
            return {"op": "iommufd.copy", "args": a(dst_ioas_id=step["dst"], src_ioas_id=step["src"],
                                                    src_iova=step["src_iova"], length=step["length"],
                                                    dst_iova=step["iova"], readable=step["readable"],
                                                    writeable=step["writeable"])}
        if op == "mock_domain":
            return {"op": "iommufd.test_mock_domain", "args": a(ioas_id=step["ioas"])}
        if op == "destroy":
            return {"op": "iommufd.destroy", "args": a(id=step["id"])}
        if op == "access_create":
            return {"op": "iommufd.test_create_access", "args": a(ioas_id=step["ioas"],
                                                                  flags=1 if step["pin"] else 0)}
        if op == "access_rw":
            return {"op": "iommufd.test_access_rw",
                    "args": a(access_fd=self._access_fd(step["access"]), iova=step["iova"],
                              user_va=ACCESS_RW_BUFFER, length=step["length"], write=step["write"])}
        if op == "access_close":
            return {"op": "fd.close", "args": {"fd": self._access_fd(step["access"])}}
        return None

    def _op_calls(self, step: Step) -> list[Call]:
        if step["op"] == "audit":
            return ([{"op": "iommufd.unmap", "args": self._args(ioas_id=i, iova=iova, length=length)}
                     for i, iova, length in step["areas"]]
                    + [{"op": "iommufd.unmap_all", "args": self._args(ioas_id=i)} for i in step["ioas"]])
        op_call = self._op_call(step)
        return [op_call] if op_call is not None else []

    def calls(self, step: Step, probes: Sequence[Probe]) -> list[Call]:
        calls = self._op_calls(step)
        if step["op"] == "access_create":
            self.creates_issued += 1
        calls.append({"op": "iommufd.test_refs", "args": self._args(user_va=REGION_VA, length=REGION_LEN,
                                                                    max_refs=MAX_REFS)})
        for p in probes:
            calls.append({"op": "iommufd.test_check_map",
                          "args": self._args(hwpt_id=p["hwpt"], iova=p["iova"], length=p["length"],
                                             user_va=p["user_va"])})
        return calls

    def observe(self, step: Step, probes: Sequence[Probe], results: list[Any]) -> Observation:
        if step["op"] == "audit":
            keys = _audit_keys(step)
            audit = {k: ({"errno": 0, "length": r["length"]} if r["errno"] == 0 else {"errno": r["errno"]})
                     for k, r in zip(keys, results)}
            obs: Observation = {"audit": audit}
            return self._probed(obs, probes, results[len(keys):])
        has_op = step["op"] != "check"
        obs = {}
        if has_op:
            rec = results[0]
            obs = {k: v for k, v in rec.items() if k not in ("vm_pin", "vm_lck")}
            if step["op"] == "access_create" and rec.get("errno") == 0:
                self.access_fds.append(rec["access_fd"])
            elif step["op"] == "access_create":
                self.creates_issued -= 1
        return self._probed(obs, probes, results[1 if has_op else 0:])

    @staticmethod
    def _probed(obs: Observation, probes: Sequence[Probe], results: list[Any]) -> Observation:
        """``obs`` with the probes' answers: ``results`` = the refs record, then one
        MD_CHECK_MAP record per probe."""
        refs = results[0]
        obs["vm_pin"] = refs["vm_pin"]
        obs["refs"] = refs["refs"]
        obs["check_map"] = {_probe_key(p): r["errno"] for p, r in zip(probes, results[1:])}
        return obs

    def teardown(self) -> list[Call]:
        return [{"op": "fd.close_all", "args": {}}, {"op": "mem.unmap", "args": {"user_va": REGION_VA}}]
