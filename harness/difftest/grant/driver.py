"""The dom0 side of one sequence: the agent calls of each step and how to read
their results."""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from harness.difftest.engine import (
    Call,
    DifftestError,
    Observation,
    Pending,
    Probe,
    Step,
    SystemStateError,
)
from harness.difftest.grant.common import (
    CANON_REFS,
    COPY_SEED,
    DOM0,
    FREE_PER_ITERATION,
    NO_INDEX,
    NR_ENTRIES,
    NR_RESERVED,
    PAGE,
    SCRATCH_PAGES,
    VERSION,
    gntdev_first_fit,
)

if TYPE_CHECKING:
    pass



# ---------------------------------------------------------------------- system side


def _ticks(result: Any) -> int:
    ticks = result.get("ticks") if isinstance(result, dict) else None
    if not isinstance(ticks, int):
        raise DifftestError(f"xen.deferred_ticks gave no count: {result!r:.300} (the guest kernel needs "
                            "kprobe events on gnttab_handle_deferred)")
    return ticks


_TICKS: Call = {"op": "xen.deferred_ticks", "args": {}}

Reader = Callable[[list[Any]], Observation]


class GrantDriver:
    """The dom0 side of one grant sequence (guest agent ops ``xen.*``, ``mem.*``).
    Driven by :class:`GrantExecutor`: its setup has more phases than the engine's
    executor knows (the canonical free list), its teardown is formed from every
    step's results, and it is told when the executor waited for the timer.

    A ``map`` step is MAP_GRANT_REF then mmap of the gntdev fd: in this PV dom0 the
    mmap makes two Xen host maps per page (the user PTE, then the kernel's linear
    address through ``set_foreign_p2m_mapping``'s ``kmap_ops``), measured as pin
    0x2 (rw) / 0x200 (ro) per mmap of a ref; the model maps each page twice. The
    munmap unmaps both (MMU notifier), whatever the order of munmap and
    UNMAP_GRANT_REF. Values from earlier steps (gntalloc indexes, user VAs) are
    taken from their results (:class:`Pending` when not read yet); gntdev indexes
    are computed as the kernel does (:func:`gntdev_first_fit`) and the kernel's are
    compared (``gntdev_index``)."""

    def __init__(self) -> None:
        self.bound_to_executor = False
        self.check_info = True
        self.scratch: int | None = None
        self.canon: tuple[int, list[int]] | None = None
        self.last_ticks = 0
        self.group_index: dict[int, int | None] = {}
        self.n_groups = self.n_maps = self.n_amaps = 0
        self.records: dict[int, tuple[int, int]] = {}
        """map id -> (index, count) in pages of gntdev records the driver expects."""
        self.map_va: dict[int, int | None] = {}
        self.map_info: dict[int, tuple[int, bool]] = {}
        """map id -> (count, writable)."""
        self.live_maps: dict[int, tuple[int, int]] = {}
        """map id -> (user_va, count) of gntdev mappings the guest made and did not unmap."""
        self.amap_va: dict[int, int | None] = {}
        self.live_amaps: dict[int, tuple[int, int]] = {}
        self.file_pages: set[int] = set()
        """gntalloc file offsets (bytes) of pages allocated and not deallocated."""
        self.window_left = 0
        self.window_base = 0
        self.waited: str | None = None
        self.deferring_ends = 0
        self._readers: deque[Reader] = deque()

    # -- setup: canonical free list ------------------------------------------------

    def setup(self) -> list[Call]:
        """Phase 1: the grant devices (unless ``check_info`` is False: the executor
        checked them before), the timer count, CANON_REFS refs, the scratch buffer."""
        return ([{"op": "xen.info", "args": {}}] if self.check_info else []) + [
            _TICKS, {"op": "xen.alloc", "args": {"domid": DOM0, "count": CANON_REFS, "writable": True}},
            {"op": "mem.map", "args": {"length": SCRATCH_PAGES * PAGE, "fill": 0}}]

    def bind_setup(self, results: list[Any]) -> None:
        """Read phase 1. Raises DifftestError if this is not a dom0 with the grant
        devices, version 1 and free_per_iteration 10, or not run by GrantExecutor."""
        if not self.bound_to_executor:
            raise DifftestError("the grant target runs only under GrantExecutor (GrantTarget.agent_executor): "
                                "its steps wait for Linux's deferred-end timer")
        if self.check_info:
            self.check(results[0])
            results = results[1:]
        ticks, alloc, scratch = results
        self.scratch = int(scratch["user_va"])
        self.last_ticks = _ticks(ticks)
        self.bind_canon(alloc)

    @staticmethod
    def check(info: Any) -> None:
        """Raises DifftestError unless ``xen.info`` shows what the target models."""
        if not info.get("xen"):
            raise DifftestError("the guest is not a Xen domain (/sys/hypervisor/type): boot xen_machine()")
        missing = [d for d, ok in (info.get("devices") or {}).items() if not ok]
        if missing:
            raise DifftestError(f"dom0 lacks /dev/xen/{', /dev/xen/'.join(missing)}")
        if info.get("grant_version") != VERSION:
            raise DifftestError(f"Linux uses grant table version {info.get('grant_version')}, the target "
                                f"models version {VERSION}")
        if info.get("free_per_iteration") not in (FREE_PER_ITERATION, None):
            raise DifftestError(f"grant_table.free_per_iteration is {info.get('free_per_iteration')}, the "
                                f"target models {FREE_PER_ITERATION}")

    def bind_canon(self, alloc: Any) -> None:
        if alloc.get("errno"):
            raise SystemStateError(f"gntalloc ALLOC of {CANON_REFS} refs failed: "
                                   f"{errno.errorcode.get(alloc['errno'], alloc['errno'])}")
        self.canon = (int(alloc["index"]), [int(r) for r in alloc["refs"]])

    def canonical(self) -> bool:
        """Whether the refs phase 1 got are 8..8+CANON_REFS-1 (else a ref of an
        earlier sequence is still on the deferred list)."""
        assert self.canon is not None
        return sorted(self.canon[1]) == list(range(NR_RESERVED, NR_RESERVED + CANON_REFS))

    def release_canon(self) -> list[Call]:
        """Give the phase-1 refs back one by one, last page first, which puts the free
        list back as it was (before waiting for the timer and trying again: the refs
        after the first CANON_REFS must stay behind them)."""
        assert self.canon is not None
        index, refs = self.canon
        self.canon = None
        return [{"op": "xen.dealloc", "args": {"index": index + i * PAGE, "count": 1}}
                for i in reversed(range(len(refs)))]

    def retry_canon(self) -> list[Call]:
        return [{"op": "xen.alloc", "args": {"domid": DOM0, "count": CANON_REFS, "writable": True}}, _TICKS]

    def order_calls(self) -> list[Call]:
        """Phase 2: free the phase-1 refs one by one, highest first (the free list's
        head becomes 8, 9, ...), fill the copy source, check Xen's state."""
        assert self.canon is not None and self.scratch is not None
        index, refs = self.canon
        order = sorted(range(len(refs)), key=lambda i: -refs[i])
        return ([{"op": "xen.dealloc", "args": {"index": index + i * PAGE, "count": 1}} for i in order]
                + [{"op": "mem.write", "args": {"user_va": self.scratch, "pattern": COPY_SEED, "length": PAGE}},
                   {"op": "xen.grant_state", "args": {}}, _TICKS])

    def bind_order(self, results: list[Any]) -> None:
        """Raises SystemStateError if a DEALLOC failed or Xen shows a pinned dom0
        entry; DifftestError if dom0's table is not NR_ENTRIES refs of version 1."""
        frees, state, ticks = results[:CANON_REFS], results[-2], results[-1]
        bad = [r for r in frees if r.get("errno")]
        if bad:
            raise SystemStateError(f"DEALLOC of the start refs failed: {bad[0]!r:.200}")
        if state.get("errno"):
            raise DifftestError(f"xen.grant_state failed: {errno.errorcode.get(state['errno'], state['errno'])}")
        d0 = (state.get("domains") or {}).get(str(DOM0))
        if d0 is None:
            raise DifftestError(f"Xen's grant dump has no table of d0: {state.get('lines')!r:.500}")
        if d0.get("version") != VERSION or (d0.get("nr_frames") or 0) * (PAGE // 8) != NR_ENTRIES:
            raise DifftestError(f"dom0's grant table is version {d0.get('version')} with {d0.get('nr_frames')} "
                                f"frame(s); the target models version {VERSION} with {NR_ENTRIES} refs")
        if d0.get("entries"):
            raise SystemStateError(f"Xen shows pinned dom0 grants before the sequence: {d0['entries']!r:.300}")
        self.last_ticks = _ticks(ticks)
        self.canon = None

    # -- steps ---------------------------------------------------------------------

    def tick_waited(self, ran: bool, ticks: int) -> None:
        """The executor waited for the timer before the next step: ``ran`` (it ran;
        ``ticks`` is the count it saw)."""
        self.waited = "ran" if ran else "idle"
        self.last_ticks = ticks
        self.window_left, self.window_base = 2, ticks

    def _group(self, g: int, page: int) -> int:
        if g not in self.group_index:
            raise Pending()
        index = self.group_index[g]
        return (index if index is not None else NO_INDEX) + page * PAGE

    def _view_va(self, view: Sequence[Any]) -> int | None:
        kind, k, page = view
        table = self.map_va if kind == "gntdev" else self.amap_va
        if k not in table:
            raise Pending()
        va = table[k]
        return None if va is None else va + page * PAGE

    def calls(self, step: Step, probes: Sequence[Probe]) -> list[Call]:
        op = step["op"]
        calls: list[Call]
        if op == "grant":
            g = self.n_groups + 1
            calls = [{"op": "xen.alloc", "args": {"domid": step["domid"], "count": step["count"],
                                                  "writable": step["writable"]}}]

            def read(res: list[Any]) -> Observation:
                r = res[0]
                self.group_index[g] = None if r.get("errno") else int(r["index"])
                if not r.get("errno"):
                    self.file_pages.update(int(r["index"]) + i * PAGE for i in range(len(r["refs"])))
                return {"errno": r["errno"], "refs": r.get("refs", [])}
            self.n_groups = g
        elif op == "map":
            k = self.n_maps + 1
            count = len(step["refs"])
            index = gntdev_first_fit(list(self.records.values()), count)
            self.records[k] = (index, count)
            self.map_info[k] = (count, step["writable"])
            calls = [{"op": "xen.map", "args": {"domid": DOM0, "refs": step["refs"]}},
                     {"op": "xen.mmap", "args": {"index": index * PAGE, "count": count,
                                                 "writable": step["writable"]}}]

            def read(res: list[Any]) -> Observation:
                m, mm = res
                va = mm.get("user_va") if not mm.get("errno") else None
                self.map_va[k] = va
                if va is not None:
                    self.live_maps[k] = (int(va), count)
                return {"gntdev_index": m.get("index"), "map_errno": m["errno"], "errno": mm["errno"]}
            self.n_maps = k
        elif op == "unmap":
            k = step["map"]
            if k not in self.map_va:
                raise Pending()
            va = self.map_va[k]
            index, count = self.records.pop(k, (NO_INDEX, self.map_info.get(k, (1, False))[0]))
            munmap: Call = {"op": "xen.munmap", "args": {"user_va": va if va is not None else NO_INDEX * PAGE,
                                                         "count": count}}
            unmap: Call = {"op": "xen.unmap", "args": {"index": index * PAGE, "count": count}}
            ioctl_first = step["ioctl_first"]
            calls = [unmap, munmap] if ioctl_first else [munmap, unmap]

            def read(res: list[Any]) -> Observation:
                u, m = (res[0], res[1]) if ioctl_first else (res[1], res[0])
                if not m.get("errno"):
                    self.live_maps.pop(k, None)
                return {"errno": m["errno"], "unmap_errno": u["errno"]}
        elif op == "end":
            index = self._group(step["group"], step["page"])
            count = step["count"]
            calls = [{"op": "xen.dealloc", "args": {"index": index, "count": count}}]

            def read(res: list[Any]) -> Observation:
                if not res[0].get("errno"):
                    self.file_pages.difference_update(index + i * PAGE for i in range(count))
                return {"errno": res[0]["errno"]}
        elif op == "amap":
            k = self.n_amaps + 1
            index = self._group(step["group"], step["page"])
            count = step["count"]
            calls = [{"op": "xen.alloc_mmap", "args": {"index": index, "count": count}}]

            def read(res: list[Any]) -> Observation:
                va = res[0].get("user_va") if not res[0].get("errno") else None
                self.amap_va[k] = va
                if va is not None:
                    self.live_amaps[k] = (int(va), count)
                return {"errno": res[0]["errno"]}
            self.n_amaps = k
        elif op == "aunmap":
            k = step["amap"]
            if k not in self.amap_va:
                raise Pending()
            live = self.live_amaps.get(k)
            calls = [{"op": "xen.alloc_munmap", "args": {"user_va": live[0], "count": live[1]}}] if live else []

            def read(res: list[Any]) -> Observation:
                if not res:
                    return {"errno": "no such gntalloc mapping"}
                if not res[0].get("errno"):
                    self.live_amaps.pop(k, None)
                return {"errno": res[0]["errno"]}
        elif op == "copy":
            assert self.scratch is not None
            segs = []
            for s in step["segments"]:
                grant = {"ref": s["ref"], "domid": s["domid"], "offset": s["offset"]}
                if s["to_ref"]:
                    segs.append({"source": {"user_va": self.scratch + s["offset"]}, "dest": grant, "len": s["len"]})
                else:
                    segs.append({"source": grant, "dest": {"user_va": self.scratch + PAGE + s["offset"]},
                                 "len": s["len"]})
            calls = [{"op": "xen.copy", "args": {"segments": segs}}]
            from_ref = any(not s["to_ref"] for s in step["segments"])
            if from_ref:
                calls.append({"op": "mem.read", "args": {"user_va": self.scratch + PAGE, "length": PAGE}})

            def read(res: list[Any]) -> Observation:
                out: Observation = {"errno": res[0]["errno"], "status": res[0]["status"]}
                if from_ref:
                    out["scratch_sha"] = res[1]["sha256"]
                return out
        elif op == "data":
            w_va, r_va = self._view_va(step["write"]), self._view_va(step["read"])
            if step["write"][0] == "gntdev" and not self.map_info.get(step["write"][1], (0, False))[1]:
                raise DifftestError(f"data step writes through read-only gntdev map {step['write'][1]}: "
                                    "that would fault the agent")
            if w_va is None or r_va is None:
                calls = []

                def read(res: list[Any]) -> Observation:
                    return {"read_before": "no such mapping", "read_after": "no such mapping"}
            else:
                calls = [{"op": "mem.read", "args": {"user_va": r_va, "length": PAGE}},
                         {"op": "mem.write", "args": {"user_va": w_va, "pattern": step["seed"], "length": PAGE}},
                         {"op": "mem.read", "args": {"user_va": r_va, "length": PAGE}}]

                def read(res: list[Any]) -> Observation:
                    return {"read_before": res[0]["sha256"], "read_after": res[2]["sha256"]}
        elif op == "state":
            calls = [{"op": "xen.grant_state", "args": {}}]

            def read(res: list[Any]) -> Observation:
                if res[0].get("errno"):
                    return {"entries": f"xen.grant_state errno {res[0]['errno']}"}
                d0 = (res[0].get("domains") or {}).get(str(DOM0), {})
                keys = ("ref", "active_domid", "pin", "shared_domid", "flags")
                return {"entries": [{k: e[k] for k in keys} for e in d0.get("entries", [])]}
        elif op == "settle":
            calls = []

            def read(res: list[Any]) -> Observation:
                return {}
        else:
            raise DifftestError(f"unknown grant step {op!r}")
        self._readers.append(self._with_ticks(step, read, len(calls)))
        return calls + [_TICKS]

    def _with_ticks(self, step: Step, read: Reader, n: int) -> Reader:
        """Wrap a step's reader: the timer fields from the tick count read after it."""
        waited, self.waited = (self.waited, None) if step.get("tick") else (None, None)
        in_window = self.window_left > 0
        base = self.window_base
        if in_window:
            self.window_left -= 1

        def observe(res: list[Any]) -> Observation:
            before = self.last_ticks
            after = _ticks(res[n])
            self.last_ticks = after
            out: Observation = {}
            if waited is not None:
                out["tick"] = waited
            out.update(read(res[:n]))
            if in_window:
                out["quiet"] = after == base
            out["timer"] = "idle" if after == before else "ran"
            out["ticks_before"], out["ticks_after"] = before, after
            return out
        return observe

    def observe(self, step: Step, probes: Sequence[Probe], results: list[Any]) -> Observation:
        return self._readers.popleft()(results)

    def teardown(self) -> list[Call]:
        """Every gntdev mapping and record, every gntalloc mapping and page, the
        scratch buffer (formed after every step's results are read)."""
        calls: list[Call] = [{"op": "xen.munmap", "args": {"user_va": va, "count": n}}
                             for va, n in self.live_maps.values()]
        calls += [{"op": "xen.unmap", "args": {"index": i * PAGE, "count": n}} for i, n in self.records.values()]
        calls += [{"op": "xen.alloc_munmap", "args": {"user_va": va, "count": n}}
                  for va, n in self.live_amaps.values()]
        if self.canon is not None:
            calls += self.release_canon()
        calls += [{"op": "xen.dealloc", "args": {"index": i, "count": 1}} for i in sorted(self.file_pages)]
        if self.scratch is not None:
            calls.append({"op": "mem.unmap", "args": {"user_va": self.scratch}})
        self.live_maps, self.records, self.live_amaps, self.file_pages = {}, {}, {}, set()
        self.scratch = None
        return calls
