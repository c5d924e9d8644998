"""The grant target: Hypothesis strategies of grant/map/copy/end steps, their
resolution against the model, and the replay-file argument checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st

from harness.difftest.engine import (
    Observation,
    Probe,
    Step,
)
from harness.difftest.engine import format_value as default_format
from harness.difftest.grant.common import (
    BAD_REF,
    DOM0,
    FREE_PER_ITERATION,
    GNTST_NAMES,
    MAX_AMAPS,
    MAX_MAPS,
    MAX_REFS,
    NO_INDEX,
    NR_ENTRIES,
    NR_RESERVED,
    OTHER_DOMID,
    PAGE,
    VERSION,
    pattern_bytes,
    sha,
)
from harness.difftest.grant.driver import GrantDriver
from harness.difftest.grant.model import GrantModel
from harness.difftest.strategies import weighted
from harness.models.grant import (
    GrantTable,
)
from harness.models.grant_mutants import MUTANTS

if TYPE_CHECKING:
    from harness.difftest.grant.executor import GrantExecutor
    from harness.vm.agent import AgentChannel
    from harness.vm.spec import MachineSpec



# ---------------------------------------------------------------------- strategies




_n = st.integers(0, 63)
_bool_rare = weighted(4, 1).map(bool)
_ref_sel = st.tuples(weighted(5, 5, 2, 1, 1, 1), _n)
"""Which ref: the last unmapped map's, a granted one, a deferred one, any granted
before, one granted to the other domain, one outside the table."""
_seg = st.tuples(weighted(1, 1).map(bool), _ref_sel, weighted(4, 2, 2, 1), weighted(4, 2, 1),
                 weighted(12, 1).map(bool))
_OPS: tuple[st.SearchStrategy[tuple[Any, ...]], ...] = (
    st.tuples(st.just("grant"), weighted(6, 3, 2), _bool_rare, weighted(9, 1).map(bool)),
    st.tuples(st.just("map"), _ref_sel, weighted(5, 1).map(bool), _bool_rare),
    st.tuples(st.just("unmap"), _n, _bool_rare),
    st.tuples(st.just("end"), weighted(4, 3, 1, 1), _n),
    st.tuples(st.just("amap"), _n, weighted(4, 1)),
    st.tuples(st.just("aunmap"), _n),
    st.tuples(st.just("copy"), st.lists(_seg, min_size=1, max_size=3)),
    st.tuples(st.just("data"), _n, _n, _n),
    st.tuples(st.just("state")),
    st.tuples(st.just("settle")),
)
_op_sel = weighted(7, 8, 6, 6, 2, 2, 3, 2, 2, 3)
_STEP = _op_sel.flatmap(lambda kind: _OPS[kind])

_PREFIXES: tuple[tuple[tuple[Any, ...], ...], ...] = (
    (("grant", 0, 0, False),),
    # two refs each mapped alone, both ended while mapped: two deferred ends in a row
    (("grant", 1, 0, False), ("map", (1, 0), False, False), ("map", (1, 1), False, False), ("end", 2, 0)),
    (),
)
"""How a sequence starts: one grant; two deferred ends; nothing."""

OPS = ("grant", "map", "unmap", "end", "amap", "aunmap", "copy", "data", "state", "settle")
_VIEW_KINDS = ("gntdev", "gntalloc")


def _pick(items: Sequence[Any], n: int) -> Any:
    return items[n % len(items)]


# ---------------------------------------------------------------------- the target


class GrantTarget:
    """:class:`~harness.difftest.engine.Target` for :mod:`harness.models.grant` in a
    Xen dom0 (see the module docstring)."""

    name = "grant"
    description = "Xen grant tables: dom0 grants (gntalloc) to itself, maps and copies them (gntdev)"
    system = "kernel"

    def mutants(self) -> Mapping[str, str]:
        return {name: m.description for name, m in MUTANTS.items()}

    def new_model(self, mutant: str | None) -> GrantModel:
        table = GrantTable(NR_ENTRIES, VERSION) if mutant is None else MUTANTS[mutant].factory(NR_ENTRIES, VERSION)
        return GrantModel(table)

    def sequences(self, max_steps: int) -> st.SearchStrategy[list[Any]]:
        """Lists of 1..max_steps abstract steps, of a length drawn evenly (deferred
        ends need a grant, a map, an end and an unmap before the timer matters),
        after one of :data:`_PREFIXES`."""
        steps = st.integers(1, max_steps).flatmap(lambda n: st.lists(_STEP, min_size=n, max_size=n))
        return st.tuples(weighted(4, 2, 1), steps).map(lambda t: (list(_PREFIXES[t[0]]) + t[1])[:max_steps])

    # -- resolve -------------------------------------------------------------------

    def resolve(self, model: GrantModel, abstract: Any) -> Step:
        step = self._resolve_op(model, abstract)
        step["tick"] = self._needs_tick(model, step)
        return step

    def _needs_tick(self, model: GrantModel, step: Step) -> bool:
        """Wait for the timer before ``step``? (see the module docstring)"""
        if not model.table.deferred_refs():
            return False
        if step["op"] == "settle":
            return True
        if model.window > 0:
            return False  # right after a waited step: inside its window
        if model.tick_changes():
            return True
        # only a munmap takes pins away: wait before one that lets the timer end a deferred ref
        return step["op"] == "unmap" and model.unmap_unpins_deferred(step["map"])

    def _ref(self, model: GrantModel, sel: tuple[int, int]) -> int:
        kind, n = sel
        t = model.table
        granted = [p.ref for p in model.gref_list]
        deferred = t.deferred_refs()
        if kind == 0 and model.last_unmapped:
            return int(_pick(model.last_unmapped, n))
        if kind == 2 and deferred:
            return int(_pick(deferred, n))
        if kind == 3 and model.ever_granted:
            return int(_pick(model.ever_granted, n))
        if kind == 4 and model.foreign_refs:
            return int(_pick(model.foreign_refs, n))
        if kind == 5:
            return BAD_REF
        if granted:
            return int(_pick(granted, n))
        if model.ever_granted:
            return int(_pick(model.ever_granted, n))
        return NR_RESERVED + n % 4  # nothing granted yet: a ref that is free

    def _fallback(self, model: GrantModel) -> Step:
        """What a step with nothing to work on becomes: a grant of one page, or a dump."""
        if model.in_use_refs() < MAX_REFS:
            return {"op": "grant", "domid": DOM0, "count": 1, "writable": True}
        return {"op": "state"}

    def _resolve_op(self, model: GrantModel, abstract: Any) -> Step:
        kind = abstract[0]
        if kind == "grant":
            count = 1 + abstract[1]
            if model.in_use_refs() + count > MAX_REFS:
                live = [p for p in model.file_list]
                if live:  # too many refs in use: end one instead
                    return self._end_step(model, live[0].index, 1)
                return {"op": "state"}
            return {"op": "grant", "domid": OTHER_DOMID if abstract[3] else DOM0, "count": count,
                    "writable": not abstract[2]}
        if kind == "map":
            if sum(1 for m in model.maps if m.mapped) >= MAX_MAPS:
                return self._unmap_step(model, abstract[1][1], False)
            refs = [self._ref(model, abstract[1])]
            if abstract[2]:
                refs.append(self._ref(model, (abstract[1][0], abstract[1][1] + 1)))
            return {"op": "map", "refs": refs, "writable": not abstract[3]}
        if kind == "unmap":
            return self._unmap_step(model, abstract[1], abstract[2])
        if kind == "end":
            sel, n = abstract[1], abstract[2]
            live = model.file_list
            if not live:  # nothing left to end: a range past the file (EINVAL)
                return {"op": "settle"} if not model.groups else self._end_step(model, model.file_index, 1)
            if sel == 0:  # a page of a mapped ref: its end is deferred
                mapped = {r for m in model.maps if m.mapped for r in m.refs}
                pages = [p for p in live if p.ref in mapped] or live
                return self._end_step(model, _pick(pages, n).index, 1)
            if sel == 1:
                return self._end_step(model, _pick(live, n).index, 1)
            if sel == 2:  # two pages (EINVAL unless contiguous in the file)
                return self._end_step(model, _pick(live, n).index, 2)
            gone_index = [i for i in range(model.file_index) if not any(p.index == i for p in live)]
            return self._end_step(model, _pick(gone_index, n) if gone_index else model.file_index, 1)
        if kind == "amap":
            live = model.file_list
            if not live or sum(1 for a in model.amaps if a is not None and a.live) >= MAX_AMAPS:
                return self._fallback(model)
            return self._file_step(model, "amap", _pick(live, abstract[1]).index, 1 + abstract[2])
        if kind == "aunmap":
            live_amaps = [k for k, a in enumerate(model.amaps, 1) if a is not None and a.live]
            if not live_amaps:
                return {"op": "settle"}
            return {"op": "aunmap", "amap": _pick(live_amaps, abstract[1])}
        if kind == "copy":
            segs = []
            for to_ref, ref_sel, off_kind, len_kind, foreign in abstract[1]:
                ref = self._ref(model, ref_sel)
                n = ref_sel[1]
                offset = (0, 16 * (1 + n % 200), PAGE - 64, PAGE - 8)[off_kind]
                length = (16 * (1 + n % 16), PAGE - offset, 0)[len_kind] if off_kind != 3 else 16
                length = min(length, PAGE - offset) if off_kind != 3 else length
                segs.append({"to_ref": to_ref, "ref": ref, "domid": OTHER_DOMID if foreign else DOM0,
                             "offset": offset, "len": length})
            return {"op": "copy", "segments": segs}
        if kind == "data":
            views = model.views()
            writable = [v for v in views if v[4]]
            if not writable:
                return self._fallback(model)
            w = _pick(writable, abstract[1])
            same = [v for v in views if v[3] == w[3] and v[:3] != w[:3]]
            r = _pick(same, abstract[2]) if same and abstract[2] % 4 else _pick(views, abstract[2])
            return {"op": "data", "write": list(w[:3]), "read": list(r[:3]), "seed": abstract[3]}
        if kind in ("state", "settle"):
            return {"op": kind}
        raise ValueError(f"unknown abstract step {abstract!r}")

    def _unmap_step(self, model: GrantModel, n: int, ioctl_first: bool) -> Step:
        """Mostly a mapping of a deferred ref (its munmap lets the timer end it)."""
        mapped = [k for k, m in enumerate(model.maps, 1) if m.mapped]
        if not mapped:
            return self._fallback(model)
        deferred = set(model.table.deferred_refs())
        of_deferred = [k for k in mapped if deferred & set(model.maps[k - 1].refs)]
        pool = of_deferred if of_deferred and n % 3 else mapped
        return {"op": "unmap", "map": _pick(pool, n), "ioctl_first": bool(ioctl_first)}

    def _end_step(self, model: GrantModel, index: int, count: int) -> Step:
        return self._file_step(model, "end", index, count)

    def _file_step(self, model: GrantModel, op: str, index: int, count: int) -> Step:
        """A step on the gntalloc file range [index, index + count) (pages), named by
        the group it starts in and the page in that group."""
        for g, grp in enumerate(model.groups, 1):
            if grp is not None and grp[0] <= index < grp[0] + grp[1]:
                return {"op": op, "group": g, "page": index - grp[0], "count": count}
        last = max((g for g, grp in enumerate(model.groups, 1) if grp is not None), default=None)
        if last is None:
            return {"op": "state"}
        grp = model.groups[last - 1]
        assert grp is not None
        return {"op": op, "group": last, "page": index - grp[0], "count": count}

    # -- apply ---------------------------------------------------------------------

    def apply(self, model: GrantModel, step: Step) -> Observation:
        out: Observation = {}
        deferred_before = bool(model.table.deferred_refs())
        if step["tick"]:
            out["tick"] = "ran" if deferred_before else "idle"
            model.table.handle_deferred(FREE_PER_ITERATION)
            model.window = 2
            deferred_before = bool(model.table.deferred_refs())
        out.update(self._apply_op(model, step))
        if model.window > 0:
            out["quiet"] = True
            model.window -= 1
        if not deferred_before and not model.table.deferred_refs():
            out["timer"] = "idle"
        return out

    def _group_index(self, model: GrantModel, step: Step) -> int:
        g = step["group"]
        if not 1 <= g <= len(model.groups):
            raise ValueError(f"group {g} does not exist (the sequence has {len(model.groups)})")
        grp = model.groups[g - 1]
        return (grp[0] if grp is not None else NO_INDEX) + int(step["page"])

    def _apply_op(self, model: GrantModel, step: Step) -> Observation:
        op = step["op"]
        if op == "grant":
            err, refs = model.alloc(step["domid"], step["count"], step["writable"])
            return {"errno": err, "refs": refs}
        if op == "map":
            index, err = model.map(step["refs"], step["writable"])
            return {"gntdev_index": index * PAGE, "map_errno": 0, "errno": err}
        if op == "unmap":
            model.unmap(step["map"])
            return {"errno": 0, "unmap_errno": 0}
        if op == "end":
            return {"errno": model.dealloc(self._group_index(model, step), step["count"])}
        if op == "amap":
            return {"errno": model.amap(self._group_index(model, step), step["count"])}
        if op == "aunmap":
            return {"errno": model.aunmap(step["amap"])}
        if op == "copy":
            err, statuses = model.copy(step["segments"])
            out: Observation = {"errno": err, "status": statuses}
            if any(not s["to_ref"] for s in step["segments"]):
                out["scratch_sha"] = sha(model.scratch)
            return out
        if op == "data":
            read_gfn = model.view_gfn(step["read"])
            write_gfn = model.view_gfn(step["write"])
            before = sha(model.frames[read_gfn])
            model.frames[write_gfn] = pattern_bytes(step["seed"], PAGE)
            return {"read_before": before, "read_after": sha(model.frames[read_gfn])}
        if op == "state":
            return {"entries": [{"ref": u.ref, "active_domid": u.localdom, "pin": u.pin, "shared_domid": u.domid,
                                 "flags": u.flags} for u in model.table.usage_lines()]}
        if op == "settle":
            return {}
        raise ValueError(f"unknown op {op!r}")

    def probes(self, model: GrantModel) -> list[Probe]:
        return []

    def answer_probes(self, model: GrantModel, probes: Sequence[Probe]) -> Observation:
        return {}

    def counters(self, step: Step, predicted: Observation) -> dict[str, int]:
        """Counts for the summary line: errnos, refs, copy statuses, Xen entries and
        data hashes compared; steps that waited for the timer; window steps."""
        return {
            "errnos compared": sum(1 for k in predicted if k == "errno" or k.endswith("_errno")),
            "refs compared": len(predicted.get("refs", [])),
            "copy statuses": len(predicted.get("status", [])),
            "Xen entries compared": len(predicted.get("entries", [])),
            "grant dumps": 1 if "entries" in predicted else 0,
            "data hashes": sum(1 for k in ("read_before", "read_after", "scratch_sha") if k in predicted),
            "ticks waited": 1 if step.get("tick") else 0,
            "window steps": 1 if "quiet" in predicted else 0,
        }

    # -- replay files, reports -------------------------------------------------------

    def check_step(self, raw: Any) -> Step:
        if not isinstance(raw, dict):
            raise ValueError(f"{raw!r} is not a step object")
        op = raw.get("op")
        if op not in OPS:
            raise ValueError(f"'op' is {op!r}, not one of {', '.join(OPS)}")
        fields = _FIELDS[op]
        extra = sorted(set(raw) - set(fields) - {"op", "tick"})
        if extra:
            raise ValueError(f"{op}: unknown key {extra[0]!r}")
        step: Step = {"op": op}
        for key, check in fields.items():
            if key not in raw:
                raise ValueError(f"{op}: missing key {key!r}")
            step[key] = check(op, key, raw[key])
        tick = raw.get("tick", False)
        if type(tick) is not bool:
            raise ValueError(f"{op}: 'tick' is {tick!r}, not true or false")
        step["tick"] = tick
        return step

    def describe(self, step: Step) -> str:
        op = step["op"]
        pre = "[after the timer] " if step.get("tick") else ""
        if op == "grant":
            return (f"{pre}gntalloc ALLOC {step['count']} page(s) to d{step['domid']} "
                    f"{'rw' if step['writable'] else 'ro'}")
        if op == "map":
            return f"{pre}gntdev MAP_GRANT_REF refs {step['refs']} + mmap {'rw' if step['writable'] else 'ro'}"
        if op == "unmap":
            order = "UNMAP_GRANT_REF + munmap" if step["ioctl_first"] else "munmap + UNMAP_GRANT_REF"
            return f"{pre}{order} of map {step['map']}"
        if op in ("end", "amap"):
            what = "gntalloc DEALLOC" if op == "end" else "gntalloc mmap"
            return f"{pre}{what} group {step['group']} page {step['page']} count {step['count']}"
        if op == "aunmap":
            return f"{pre}gntalloc munmap of amap {step['amap']}"
        if op == "copy":
            segs = ", ".join(f"{'to' if s['to_ref'] else 'from'} ref {s['ref']}"
                             f"{'' if s['domid'] == DOM0 else ' of d' + str(s['domid'])} +{s['offset']:#x} "
                             f"len {s['len']:#x}" for s in step["segments"])
            return f"{pre}GRANT_COPY [{segs}]"
        if op == "data":
            w, r = step["write"], step["read"]
            return (f"{pre}data: write pattern {step['seed']} via {w[0]} {w[1]} page {w[2]}, "
                    f"read via {r[0]} {r[1]} page {r[2]}")
        if op == "state":
            return f"{pre}Xen grant dump (debug key g)"
        return f"{pre}settle (wait for the deferred-end timer)" if step.get("tick") else "settle (nothing deferred)"

    def format_value(self, field_name: str, value: Any) -> str:
        leaf = field_name.rsplit(".", 1)[-1]
        if leaf.startswith("status") and isinstance(value, list):
            return "[" + ", ".join(f"{v} ({GNTST_NAMES.get(v, '?')})" for v in value) + "]"
        if field_name.startswith("status[") and isinstance(value, int):
            return f"{value} ({GNTST_NAMES.get(value, '?')})"
        if leaf in ("pin", "flags") and isinstance(value, int):
            return hex(value)
        if field_name.startswith("entries") and isinstance(value, list):
            return "[" + ", ".join(_entry_text(e) for e in value) + "]"
        if field_name.startswith("entries[") and isinstance(value, dict):
            return _entry_text(value)
        return default_format(field_name, value)

    # -- system side -------------------------------------------------------------------

    def driver(self) -> GrantDriver:
        return GrantDriver()

    def agent_executor(self, agent: AgentChannel) -> GrantExecutor:
        from harness.difftest.grant.executor import (
            GrantExecutor,  # the executor builds on this module
        )
        """The executor this target needs (waits for the deferred-end timer)."""
        return GrantExecutor(agent)

    def machine(self) -> MachineSpec:
        """Xen 4.17 with the harness's kernel as PV dom0 (harness.vm.spec.xen_machine)."""
        from harness.vm.spec import xen_machine
        return xen_machine()


def _entry_text(e: Any) -> str:
    if not isinstance(e, dict):
        return repr(e)
    return (f"ref {e.get('ref')} d{e.get('active_domid')} pin {_hex(e.get('pin'))} "
            f"shared d{e.get('shared_domid')} flags {_hex(e.get('flags'))}")


def _hex(v: Any) -> str:
    return hex(v) if isinstance(v, int) else repr(v)


def _int(limit: int) -> Callable[[str, str, Any], int]:
    def check(op: str, key: str, value: Any) -> int:
        if type(value) is not int or not 0 <= value <= limit:
            raise ValueError(f"{op}: {key!r} is {value!r}, not an integer in [0, {limit:#x}]")
        return value
    return check


def _bool(op: str, key: str, value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{op}: {key!r} is {value!r}, not true or false")
    return value


def _refs(op: str, key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not 1 <= len(value) <= 8 or \
            any(type(r) is not int or not 0 <= r < 1 << 32 for r in value):
        raise ValueError(f"{op}: {key!r} is {value!r}, not a list of 1..8 refs")
    return list(value)


def _view(op: str, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or len(value) != 3 or value[0] not in _VIEW_KINDS or \
            any(type(v) is not int or not 0 <= v < 1 << 16 for v in value[1:]):
        raise ValueError(f"{op}: {key!r} is {value!r}, not [\"gntdev\"|\"gntalloc\", id, page]")
    return list(value)


def _segments(op: str, key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not 1 <= len(value) <= 8:
        raise ValueError(f"{op}: {key!r} is {value!r}, not a list of 1..8 segments")
    out = []
    for seg in value:
        if not isinstance(seg, dict) or set(seg) != {"to_ref", "ref", "domid", "offset", "len"}:
            raise ValueError(f"{op}: segment {seg!r} needs exactly to_ref, ref, domid, offset, len")
        out.append({"to_ref": _bool(op, "to_ref", seg["to_ref"]), "ref": _int(0xFFFFFFFF)(op, "ref", seg["ref"]),
                    "domid": _int(0xFFFF)(op, "domid", seg["domid"]),
                    "offset": _int(PAGE - 1)(op, "offset", seg["offset"]), "len": _int(PAGE)(op, "len", seg["len"])})
    return out


_FIELDS: dict[str, dict[str, Callable[[str, str, Any], Any]]] = {
    "grant": {"domid": _int(0xFFFF), "count": _int(8), "writable": _bool},
    "map": {"refs": _refs, "writable": _bool},
    "unmap": {"map": _int(0xFFFF), "ioctl_first": _bool},
    "end": {"group": _int(0xFFFF), "page": _int(0xFFFF), "count": _int(8)},
    "amap": {"group": _int(0xFFFF), "page": _int(0xFFFF), "count": _int(8)},
    "aunmap": {"amap": _int(0xFFFF)},
    "copy": {"segments": _segments},
    "data": {"write": _view, "read": _view, "seed": _int(0xFFFFFFFF)},
    "state": {},
    "settle": {},
}
