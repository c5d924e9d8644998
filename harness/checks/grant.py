"""The ``xen-grant`` check: every grant, map, copy, end of access and data access
dom0's guest agent did (its op records) replayed into the grant model
(:class:`harness.models.grant.GrantTable`), and every answer compared with the
model's: the refs gntalloc returned (the free list is LIFO, so ref numbers are
the sharpest observation), the errnos of gntdev's mmap (Xen refusing a map),
GRANT_COPY's per-segment GNTST statuses, the bytes read through each mapping, and
Xen's own grant entries (pin, flags) from the ``'g'`` debug-key dumps.

The evidence is what dom0's kernel and Xen answered (ioctl results, Xen's dump),
never QEMU's view. How dom0's operations become grant-table operations (Linux
6.12, PV dom0):

* ``xen.alloc`` (IOCTL_GNTALLOC_ALLOC_GREF): ``count`` grants, one
  ``grant_foreign_access`` each, in order (drivers/xen/gntalloc.c ``add_grefs``).
* A gntalloc page's grant is ended (``end_foreign_access``) when its last user
  goes: the file's hold (``xen.dealloc``) and one per gntalloc mmap
  (``xen.alloc_munmap``) (gntalloc.c ``__del_gref``).
* ``xen.mmap`` of a gntdev map: in a PV domain two Xen host maps per page, the
  user PTE (``map_ops``, all pages first) then the kernel address (``kmap_ops``,
  arch/x86/xen/p2m.c ``set_foreign_p2m_mapping``); any refused map makes the mmap
  EINVAL and the maps that succeeded are undone (drivers/xen/gntdev.c). A map can
  be mmapped once, even after a failed mmap (``in_use``).
* ``xen.munmap`` of a gntdev mapping unmaps both (PV: at munmap, through the MMU
  notifier); ``xen.unmap`` (UNMAP_GRANT_REF) only forgets the map.
* Linux's deferred-end timer is applied once per tick of the guest kernel's own
  count (``xen.deferred_ticks``, a kprobe on ``gnttab_handle_deferred``). When
  the count moved between two readings that enclose other ops, the tick's place
  among them is unknown: every place is tried, and the window passes if one
  placement agrees with everything observed (counted as an ambiguous window).

Counts: grants, maps (Xen host maps predicted), mmaps, ends, deferred ends,
deferred freed, copy segments, data pages compared, Xen entries compared, ticks,
ambiguous tick windows, divergences. Inconclusive when no grant, no map, or no Xen entry
was compared, when a dump could not be read, or when the records are not a
Xen dom0's.
"""

from __future__ import annotations

import copy as copy_mod
import errno
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from guest_agent.mem import pattern_bytes
from harness.checks.verdict import CheckReport, Divergence, TraceLine
from harness.models.grant import GNTST_bad_domain, GNTST_okay, GrantError, GrantTable

PAGE = 4096
DOM0 = 0
MAPS_PER_PAGE = 2
"""Xen host maps per page of a gntdev mmap in a PV dom0 (user PTE + kernel map)."""
MAX_DIVERGENCES = 20

__all__ = ["GrantChecker", "GrantCounts", "flatten_calls", "applies"]


@dataclass
class GrantCounts:
    grants: int = 0
    maps: int = 0
    mmaps: int = 0
    ends: int = 0
    deferred_ends: int = 0
    deferred_freed: int = 0
    copy_segments: int = 0
    data_pages_compared: int = 0
    xen_entries_compared: int = 0
    dumps: int = 0
    ticks: int = 0
    ambiguous_tick_windows: int = 0
    ops: int = 0
    divergences: int = 0


def flatten_calls(calls: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, {"op", "args", "result"})`` for every agent call, batches opened
    (a batch's calls get its line); a call that raised has no ``result``."""
    for i, call in enumerate(calls, 1):
        if call.get("op") == "batch":
            inner = (call.get("args") or {}).get("calls") or []
            results = call.get("result") or []
            for c, r in zip(inner, results):
                yield i, {"op": c.get("op"), "args": c.get("args") or {},
                          "result": r.get("result") if isinstance(r, dict) and r.get("ok") else None}
        else:
            yield i, call


def applies(calls: list[dict[str, Any]]) -> bool:
    """The records hold grant ops (``xen.*``)."""
    return any(str(c.get("op", "")).startswith("xen.") for _, c in flatten_calls(calls))


@dataclass
class _GntdevMap:
    domid: int
    refs: list[int]
    in_use: bool = False
    handles: list[int] = field(default_factory=list)
    user_va: int | None = None
    writable: bool = False


@dataclass
class _State:
    """Everything the replay tracks; copied whole to try tick placements."""

    table: GrantTable | None = None
    alloc_pages: dict[int, int] = field(default_factory=dict)  # gntalloc file offset (bytes) -> ref
    uses: dict[int, int] = field(default_factory=dict)  # ref -> gntalloc users (file hold + mmaps)
    alloc_mmaps: dict[int, list[int]] = field(default_factory=dict)  # user_va -> refs
    maps: dict[int, _GntdevMap] = field(default_factory=dict)  # gntdev index -> map
    mmapped: dict[int, _GntdevMap] = field(default_factory=dict)  # user_va -> map
    plain: dict[int, int] = field(default_factory=dict)  # mem.map region start -> length
    content: dict[tuple[str, int], bytes] = field(default_factory=dict)  # ("ref", r) | ("va", page) -> bytes
    counts: GrantCounts = field(default_factory=GrantCounts)


class GrantChecker:
    """Replay agent calls (``[{"op", "args", "result"}]``, batches allowed) into
    the grant model and compare. ``table_factory(version)`` makes the model (a
    mutant's, to show the check can fail).

    Usage: ``GrantChecker(calls).finish()`` -> :class:`CheckReport`.
    """

    def __init__(self, calls: list[dict[str, Any]],
                 table_factory: Callable[[int], GrantTable] = lambda v: GrantTable(version=v)):
        self.calls = calls
        self.table_factory = table_factory
        self.divergences: list[Divergence] = []
        self.total = 0
        self.by_kind: dict[str, int] = {}
        self.inconclusive: list[str] = []
        self.warnings: list[str] = []
        self.state = _State()
        self.last_ticks: int | None = None
        self.xen_seen = False

    # ------------------------------------------------------------------ driving
    def finish(self) -> CheckReport:
        window: list[tuple[int, dict[str, Any]]] = []
        for line, call in flatten_calls(self.calls):
            if call.get("op") == "xen.deferred_ticks":
                self._close_window(window, line, call)
                window = []
            else:
                window.append((line, call))
        self._close_window(window, None, None)
        c = self.state.counts
        c.divergences = self.total
        if not self.xen_seen:
            self.inconclusive.append("no xen.info record says the guest ran on Xen")
        for what, n in (("grant", c.grants), ("Xen host map", c.maps), ("Xen grant entry", c.xen_entries_compared)):
            if n == 0:
                self.inconclusive.append(f"no {what} was checked")
        return CheckReport("xen-grant", c, self.divergences, self.total, dict(self.by_kind), self.warnings,
                           self.inconclusive, title="xen-grant (dom0's grants against the grant model)")

    def _close_window(self, window: list[tuple[int, dict[str, Any]]], line: int | None,
                      ticks_call: dict[str, Any] | None) -> None:
        """Replay ``window`` (the ops since the last tick reading); ``ticks_call``
        is the reading that ends it (None at the end of the records)."""
        ticks = (ticks_call.get("result") or {}).get("ticks") if ticks_call else None
        if not isinstance(ticks, int) or self.last_ticks is None:
            self._replay(self.state, window, 0, len(window), sink=self._record)
            if isinstance(ticks, int):
                self.last_ticks = ticks
            return
        delta = max(0, ticks - self.last_ticks)
        self.last_ticks = ticks
        self.state.counts.ticks += delta
        if delta == 0 or not window:
            self._replay(self.state, window, 0, len(window), sink=self._record)
            self._ticks(self.state, delta)
            return
        # A tick came somewhere in this window: the latest placement first (after every op),
        # then earlier ones; the first that agrees with everything wins.
        placements = list(range(len(window), -1, -1))
        for place in placements:
            trial = copy_mod.deepcopy(self.state)
            found: list[Divergence] = []
            self._replay(trial, window, 0, place, sink=found.append)
            self._ticks(trial, delta)
            self._replay(trial, window, place, len(window), sink=found.append)
            if not found:
                if place != len(window):
                    trial.counts.ambiguous_tick_windows += 1
                self.state = trial
                return
        self._replay(self.state, window, 0, len(window), sink=self._record)
        self._ticks(self.state, delta)

    def _ticks(self, st: _State, n: int) -> None:
        if st.table is None:
            return
        for _ in range(n):
            st.counts.deferred_freed += len(st.table.handle_deferred())

    def _record(self, d: Divergence) -> None:
        self.total += 1
        self.by_kind[d.kind] = self.by_kind.get(d.kind, 0) + 1
        if len(self.divergences) < MAX_DIVERGENCES:
            self.divergences.append(d)

    def _replay(self, st: _State, window: list[tuple[int, dict[str, Any]]], start: int, stop: int,
                sink: Callable[[Divergence], None]) -> None:
        for line, call in window[start:stop]:
            result = call.get("result")
            if not isinstance(result, dict):
                continue
            handler = _HANDLERS.get(str(call.get("op")))
            if handler is None:
                continue
            st.counts.ops += 1
            where = TraceLine(line, _short(call), "ops")
            for kind, message in handler(self, st, call.get("args") or {}, result):
                sink(Divergence(kind, message, where))

    # ------------------------------------------------------------------ ops
    def _table(self, st: _State) -> GrantTable:
        if st.table is None:
            st.table = self.table_factory(1)
        return st.table

    def _info(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        if r.get("xen"):
            self.xen_seen = True
        version = r.get("grant_version")
        if st.table is None and version in (1, 2):
            st.table = self.table_factory(int(version))
        return iter(())

    def _alloc(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        table = self._table(st)
        count, domid = int(args.get("count", 1)), int(args["domid"])
        readonly = not args.get("writable", True)
        predicted: list[int] = []
        err = 0
        for _ in range(count):
            try:
                predicted.append(table.grant_foreign_access(domid, 0, readonly=readonly))
            except GrantError as exc:
                err = exc.errno or errno.ENOSPC
                break
        got = r.get("refs") or []
        if r.get("errno", 0) != err:
            yield "alloc-errno", f"gntalloc ALLOC of {count} to d{domid}: errno {r.get('errno')}, model {err}"
            return
        if err:
            return
        st.counts.grants += count
        if list(got) != predicted:
            yield "ref", f"gntalloc ALLOC of {count} to d{domid} returned refs {got}, the model's free list gives " \
                         f"{predicted}"
        index = int(r.get("index", 0))
        for i, ref in enumerate(got):
            st.alloc_pages[index + i * PAGE] = ref
            st.uses[ref] = 1
            st.content[("ref", ref)] = bytes(PAGE)

    def _drop_use(self, st: _State, ref: int) -> None:
        if ref not in st.uses:  # after a ref divergence the observed refs may repeat
            return
        st.uses[ref] -= 1
        if st.uses[ref] == 0:
            del st.uses[ref]
            st.counts.ends += 1
            try:
                if not self._table(st).end_foreign_access(ref):
                    st.counts.deferred_ends += 1
            except GrantError as exc:
                self.warnings.append(f"end of ref {ref}: the model refused it ({exc})")

    def _dealloc(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        index, count = int(args["index"]), int(args["count"])
        offsets = [index + i * PAGE for i in range(count)]
        present = count > 0 and all(o in st.alloc_pages for o in offsets)
        if not present:
            if r.get("errno", 0) == 0:
                yield "dealloc-errno", f"gntalloc DEALLOC of {count} at {index:#x} succeeded; the model knows no " \
                                       "such pages"
            return
        if r.get("errno", 0) != 0:
            yield "dealloc-errno", f"gntalloc DEALLOC of {count} at {index:#x}: errno {r.get('errno')}, model 0"
            return
        for o in offsets:
            self._drop_use(st, st.alloc_pages.pop(o))

    def _alloc_mmap(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        index, count = int(args["index"]), int(args["count"])
        offsets = [index + i * PAGE for i in range(count)]
        if not all(o in st.alloc_pages for o in offsets):
            if r.get("errno", 0) == 0:
                yield "alloc-mmap-errno", f"gntalloc mmap at {index:#x} succeeded; the model knows no such pages"
            return
        if r.get("errno", 0) != 0:
            yield "alloc-mmap-errno", f"gntalloc mmap at {index:#x}: errno {r.get('errno')}, model 0"
            return
        refs = [st.alloc_pages[o] for o in offsets]
        for ref in refs:
            st.uses[ref] = st.uses.get(ref, 0) + 1
        st.alloc_mmaps[int(r["user_va"])] = refs

    def _alloc_munmap(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        refs = st.alloc_mmaps.pop(int(args["user_va"]), None)
        if refs is not None and r.get("errno", 0) == 0:
            for ref in refs:
                self._drop_use(st, ref)
        return iter(())

    def _map(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        refs = [int(x) for x in args.get("refs", [])]
        if not refs:
            if r.get("errno", 0) == 0:
                yield "map-errno", "gntdev MAP_GRANT_REF of 0 refs succeeded (the kernel refuses count 0)"
            return
        if r.get("errno", 0) != 0:
            yield "map-errno", f"gntdev MAP_GRANT_REF of {refs}: errno {r.get('errno')} (it only records them)"
            return
        st.maps[int(r["index"])] = _GntdevMap(int(args["domid"]), refs)

    def _mmap(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        index, count = args.get("index"), int(args.get("count", 0))
        writable = bool(args.get("writable", True))
        m = st.maps.get(int(index)) if isinstance(index, int) else None
        if m is None or len(m.refs) != count or m.in_use:
            if r.get("errno", 0) == 0:
                yield "mmap-errno", f"gntdev mmap at {index!r} of {count} pages succeeded; the model expects EINVAL " \
                                    "(no such map, or mmapped before)"
            return
        m.in_use = True
        st.counts.mmaps += 1
        table = self._table(st)
        handles: list[int] = []
        refused: list[str] = []
        for _ in range(MAPS_PER_PAGE):  # user PTEs of every page, then the kernel maps
            for ref in m.refs:
                if m.domid != DOM0:
                    refused.append(f"ref {ref} of d{m.domid}: status {GNTST_bad_domain} (no such domain here)")
                    continue
                try:
                    handles.append(table.map(ref, DOM0, readonly=not writable))
                    st.counts.maps += 1
                except GrantError as exc:
                    refused.append(f"ref {ref}: status {exc.status}")
        expected = errno.EINVAL if refused else 0
        if refused:
            for h in handles:
                table.unmap(h)
        if r.get("errno", 0) != expected:
            why = "; Xen refuses " + ", ".join(refused[:3]) if refused else ""
            yield "mmap-errno", f"gntdev mmap of refs {m.refs} ({'rw' if writable else 'ro'}): errno " \
                                f"{r.get('errno')}, model {expected}{why}"
            if r.get("errno", 0) == 0 or not refused:
                return
        if not refused and r.get("errno", 0) == 0:
            m.handles, m.user_va, m.writable = handles, int(r["user_va"]), writable
            st.mmapped[m.user_va] = m

    def _munmap(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        m = st.mmapped.pop(int(args["user_va"]), None)
        if m is not None and r.get("errno", 0) == 0:
            table = self._table(st)
            for h in m.handles:
                try:
                    table.unmap(h)
                except GrantError as exc:
                    yield "unmap", f"munmap of refs {m.refs}: the model cannot unmap handle {h} ({exc})"
            m.handles, m.user_va = [], None

    def _unmap(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        index, count = int(args["index"]), int(args["count"])
        m = st.maps.get(index)
        expected = 0 if m is not None and len(m.refs) == count else errno.ENOENT
        if r.get("errno", 0) != expected:
            yield "unmap-errno", f"gntdev UNMAP_GRANT_REF at {index:#x} of {count}: errno {r.get('errno')}, " \
                                 f"model {expected}"
        if expected == 0:
            del st.maps[index]

    def _copy(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        table = self._table(st)
        predicted: list[int] = []
        for seg in args.get("segments", []):
            src, dst, length = seg["source"], seg["dest"], int(seg["len"])
            status = GNTST_okay
            for side, is_dest in ((src, False), (dst, True)):
                if "ref" not in side or status != GNTST_okay:
                    continue
                if int(side.get("domid", 0)) != DOM0:
                    status = GNTST_bad_domain
                else:
                    status = table.copy(int(side["ref"]), DOM0, dest=is_dest, offset=int(side.get("offset", 0)),
                                        length=length)
            predicted.append(status)
            st.counts.copy_segments += 1
            if status == GNTST_okay:
                data = self._read_side(st, src, length)
                if data is not None:
                    self._write_side(st, dst, data)
                else:
                    self._forget_side(st, dst, length)
        got = r.get("status")
        if r.get("errno", 0) != 0 or got != predicted:
            yield "copy-status", f"GRANT_COPY statuses {got} (errno {r.get('errno')}), model {predicted}"

    # ------------------------------------------------------------------ data
    def _frames(self, st: _State, user_va: int, length: int) -> list[tuple[tuple[str, int], int]] | None:
        """(frame, offset in it) for each page of [user_va, +length); None if the range
        is not all in mappings the replay knows."""
        for start, refs in list(st.alloc_mmaps.items()) + [(va, m.refs) for va, m in st.mmapped.items()]:
            if start <= user_va and user_va + length <= start + len(refs) * PAGE:
                first = (user_va - start) // PAGE
                last = (user_va + length - 1 - start) // PAGE
                return [(("ref", refs[i]), 0) for i in range(first, last + 1)]
        for start, size in st.plain.items():
            if start <= user_va and user_va + length <= start + size:
                base = user_va - user_va % PAGE
                return [(("va", p), 0) for p in range(base, user_va + length, PAGE)]
        return None

    def _read_side(self, st: _State, side: dict[str, Any], length: int) -> bytes | None:
        if "ref" in side:
            data = st.content.get(("ref", int(side["ref"])))
            off = int(side.get("offset", 0))
            return None if data is None else data[off:off + length]
        return self._read_va(st, int(side["user_va"]), length)

    def _write_side(self, st: _State, side: dict[str, Any], data: bytes) -> None:
        if "ref" in side:
            key = ("ref", int(side["ref"]))
            old = st.content.get(key)
            if old is not None:
                off = int(side.get("offset", 0))
                st.content[key] = old[:off] + data + old[off + len(data):]
        else:
            self._write_va(st, int(side["user_va"]), data)

    def _forget_side(self, st: _State, side: dict[str, Any], length: int) -> None:
        if "ref" in side:
            st.content.pop(("ref", int(side["ref"])), None)
        else:
            for frame, _ in self._frames(st, int(side["user_va"]), length) or []:
                st.content.pop(frame, None)

    def _read_va(self, st: _State, user_va: int, length: int) -> bytes | None:
        frames = self._frames(st, user_va, length)
        if frames is None:
            return None
        out = bytearray()
        for frame, _ in frames:
            page = st.content.get(frame)
            if page is None:
                return None
            out += page
        skip = user_va % PAGE
        return bytes(out[skip:skip + length])

    def _write_va(self, st: _State, user_va: int, data: bytes) -> None:
        frames = self._frames(st, user_va, len(data))
        if frames is None:
            return
        skip = user_va % PAGE
        buf = bytearray()
        for frame, _ in frames:
            buf += st.content.get(frame, bytes(PAGE))
        buf[skip:skip + len(data)] = data
        for i, (frame, _) in enumerate(frames):
            st.content[frame] = bytes(buf[i * PAGE:(i + 1) * PAGE])

    def _mem_map(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        start, length = int(r["user_va"]), int(r["length"])
        st.plain[start] = length
        fill = args.get("fill", 0)
        for p in range(start, start + length, PAGE):
            if fill is None:
                st.content[("va", p)] = bytes(PAGE)
            else:
                st.content[("va", p)] = bytes([int(fill)]) * PAGE
        return iter(())

    def _mem_unmap(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        start = int(args["user_va"])
        for p in range(start, start + st.plain.pop(start, 0), PAGE):
            st.content.pop(("va", p), None)
        return iter(())

    def _mem_write(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        if args.get("data") is not None:
            data = bytes.fromhex(str(args["data"]))
        else:
            data = pattern_bytes(int(args.get("pattern") or 0), int(args.get("length") or 0))
        self._write_va(st, int(args["user_va"]), data)
        return iter(())

    def _mem_read(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        user_va, length = int(args["user_va"]), int(args["length"])
        expected = self._read_va(st, user_va, length)
        if expected is None:
            return
        frames = self._frames(st, user_va, length) or []
        if isinstance(r.get("data"), str):
            got = bytes.fromhex(r["data"])
            for i in range(0, length, PAGE):
                st.counts.data_pages_compared += 1
                if got[i:i + PAGE] != expected[i:i + PAGE]:
                    frame = frames[i // PAGE][0] if i // PAGE < len(frames) else None
                    yield "data", f"read at {user_va + i:#x} ({_frame_name(frame)}): the bytes differ from the " \
                                  "last ones written through any mapping of that frame " \
                                  f"(first difference at byte {_first_diff(got[i:i + PAGE], expected[i:i + PAGE])})"
        elif r.get("sha256") is not None:
            st.counts.data_pages_compared += (length + PAGE - 1) // PAGE
            if r["sha256"] != hashlib.sha256(expected).hexdigest():
                yield "data", f"read of {length} bytes at {user_va:#x}: sha256 differs from what was written there"

    # ------------------------------------------------------------------ Xen's entries
    def _grant_state(self, st: _State, args: dict[str, Any], r: dict[str, Any]) -> Iterator[tuple[str, str]]:
        if r.get("errno", 0) != 0:
            self.inconclusive.append(f"a Xen grant dump failed with errno {r.get('errno')}")
            return
        st.counts.dumps += 1
        table = self._table(st)
        dom0 = (r.get("domains") or {}).get(str(DOM0), {"entries": []})
        if dom0.get("version") not in (None, table.version):
            yield "xen-version", f"Xen dumps dom0's table as v{dom0.get('version')}, the model is v{table.version}"
        seen = {int(e["ref"]): e for e in dom0.get("entries", [])}
        model = {line.ref: line for line in table.usage_lines()}
        for ref in sorted(set(seen) | set(model)):
            st.counts.xen_entries_compared += 1
            x, m = seen.get(ref), model.get(ref)
            if x is None:
                assert m is not None
                yield "xen-entry", f"ref {ref}: the model has it pinned (pin {m.pin:#x}), Xen lists no active pin"
            elif m is None:
                yield "xen-entry", f"ref {ref}: Xen lists pin {int(x['pin']):#x} (by d{x['active_domid']}), " \
                                   "the model has it unpinned"
            else:
                got = (int(x["active_domid"]), int(x["pin"]), int(x["shared_domid"]), int(x["flags"]))
                want = (m.localdom, m.pin, m.domid, m.flags)
                if got != want:
                    yield "xen-entry", f"ref {ref}: Xen (localdom, pin, domid, flags) = {_hexes(got)}, model " \
                                       f"{_hexes(want)}"


_Handler = Callable[[GrantChecker, _State, dict[str, Any], dict[str, Any]], Iterator[tuple[str, str]]]
_HANDLERS: dict[str, _Handler] = {
    "xen.info": GrantChecker._info,
    "xen.alloc": GrantChecker._alloc,
    "xen.dealloc": GrantChecker._dealloc,
    "xen.alloc_mmap": GrantChecker._alloc_mmap,
    "xen.alloc_munmap": GrantChecker._alloc_munmap,
    "xen.map": GrantChecker._map,
    "xen.mmap": GrantChecker._mmap,
    "xen.munmap": GrantChecker._munmap,
    "xen.unmap": GrantChecker._unmap,
    "xen.copy": GrantChecker._copy,
    "xen.grant_state": GrantChecker._grant_state,
    "mem.map": GrantChecker._mem_map,
    "mem.unmap": GrantChecker._mem_unmap,
    "mem.write": GrantChecker._mem_write,
    "mem.read": GrantChecker._mem_read,
}


def _short(call: dict[str, Any]) -> str:
    args = json.dumps(call.get("args") or {}, sort_keys=True, default=str)
    result = {k: v for k, v in (call.get("result") or {}).items() if k not in ("data", "lines", "domains")}
    text = f"{call.get('op')} {args} -> {json.dumps(result, sort_keys=True, default=str)}"
    return text if len(text) <= 300 else text[:297] + "..."


def _frame_name(frame: tuple[str, int] | None) -> str:
    if frame is None:
        return "unknown frame"
    return f"grant ref {frame[1]}" if frame[0] == "ref" else f"page {frame[1]:#x}"


def _first_diff(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _hexes(values: tuple[int, ...]) -> str:
    return "(" + ", ".join(f"{v:#x}" for v in values) + ")"
