"""Stateful test of the grant table model: a hypothesis state machine drives
:class:`harness.models.grant.GrantTable` and a deliberately naive oracle side
by side and compares every result, error and the whole state after each rule.

The oracle is written from the rules, not from the model: the free list is a
plain Python list with the head at index 0; pins, status bits and the
pinning domain are recomputed from the set of live mappings every time; one
tick of the deferred timer is "look at the first min(limit, len) deferred
refs once, free the unmapped ones in order, move the others behind the rest";
maptrack handles come from a list with the head at index 0.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from harness.models.grant import GrantEntry, GrantError, GrantTable, UsageLine

NR = 13  # refs 8..12 can be granted: small enough to run out
DOMS = (0, 1)
PER_FRAME = 256


class NaiveErr(Exception):
    def __init__(self, err: int | None = None, status: int | None = None) -> None:
        super().__init__(err, status)
        self.errno, self.status = err, status


@dataclass
class Shared:
    domid: int = 0
    gfn: int = 0
    readonly: bool = False
    permit: bool = False


@dataclass
class Naive:
    nr: int
    version: int
    free: list[int] = field(default_factory=list)
    shared: dict[int, Shared] = field(default_factory=dict)
    in_use: set[int] = field(default_factory=set)
    deferred: list[int] = field(default_factory=list)
    maps: dict[int, dict[int, tuple[int, bool]]] = field(default_factory=dict)  # domid -> handle -> (ref, ro)
    hfree: dict[int, list[int]] = field(default_factory=dict)
    hlimit: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free = list(range(8, self.nr))
        self.shared = {r: Shared() for r in range(self.nr)}

    # what the mappings say
    def mappings(self, ref: int) -> list[tuple[int, bool]]:
        return [(d, ro) for d, hs in self.maps.items() for (r, ro) in hs.values() if r == ref]

    def pins(self, ref: int) -> tuple[int, int]:
        m = self.mappings(ref)
        return sum(ro for _, ro in m), sum(not ro for _, ro in m)

    def owner(self, ref: int) -> int | None:
        m = self.mappings(ref)
        return m[0][0] if m else None

    def status(self, ref: int) -> int:
        ro, rw = self.pins(ref)
        return (0x8 if ro + rw else 0) | (0x10 if rw else 0)

    def flags(self, ref: int) -> int:
        s = self.shared[ref]
        return (0x1 | (0x4 if s.readonly else 0)) if s.permit else 0

    # granting side
    def grant(self, domid: int, gfn: int, ro: bool) -> int:
        if not self.free:
            raise NaiveErr(err=errno.ENOSPC)
        ref = self.free.pop(0)
        self.shared[ref] = Shared(domid, gfn, ro, True)
        self.in_use.add(ref)
        return ref

    def end(self, ref: int) -> bool:
        if ref in self.deferred:
            raise NaiveErr(err=errno.EALREADY)
        if ref not in self.in_use:
            raise NaiveErr(err=errno.EINVAL)
        busy = bool(self.mappings(ref))
        if self.version == 2 or not busy:
            self.shared[ref].permit = False
            self.shared[ref].readonly = False
        if busy:
            self.deferred.append(ref)
            return False
        self.in_use.discard(ref)
        self.free.insert(0, ref)
        return True

    def tick(self, limit: int) -> list[int]:
        k = len(self.deferred) if limit == 0 else min(limit, len(self.deferred))
        looked, rest = self.deferred[:k], self.deferred[k:]
        freed = [r for r in looked if not self.mappings(r)]
        self.deferred = rest + [r for r in looked if self.mappings(r)]
        for r in freed:
            self.shared[r].permit = self.shared[r].readonly = False
            self.in_use.discard(r)
            self.free.insert(0, r)
        return freed

    # mapping side
    def check(self, ref: int, domid: int, ro: bool) -> None:
        if not 0 <= ref < self.nr:
            raise NaiveErr(status=-3)
        pro, prw = self.pins(ref)
        if pro + prw:
            if self.owner(ref) != domid or (pro if ro else prw) >= 128:
                raise NaiveErr(status=-1)
            if ro or prw:
                return  # Xen does not look at the flags again
        s = self.shared[ref]
        if not pro + prw and (not s.permit or s.domid != domid):
            raise NaiveErr(status=-1)
        if not ro and s.permit and s.readonly:
            raise NaiveErr(status=-1)

    def map(self, ref: int, domid: int, ro: bool) -> int:
        free = self.hfree.setdefault(domid, [])
        limit = self.hlimit.get(domid, 0)
        if len(free) >= 2:
            h = free.pop(0)
        else:
            h = limit
            self.hfree[domid] = free = list(range(limit + 1, limit + PER_FRAME)) + free
            self.hlimit[domid] = limit + PER_FRAME
        try:
            self.check(ref, domid, ro)
        except NaiveErr:
            free.append(h)
            raise
        self.maps.setdefault(domid, {})[h] = (ref, ro)
        return h

    def unmap(self, handle: int, domid: int) -> None:
        if handle not in self.maps.get(domid, {}):
            raise NaiveErr(status=-4)
        del self.maps[domid][handle]
        self.hfree[domid].append(handle)

    def copy(self, ref: int, domid: int, dest: bool, offset: int, length: int) -> int:
        if length == 0:
            return 0
        try:
            self.check(ref, domid, not dest)
        except NaiveErr as e:
            assert e.status is not None
            return e.status
        return -10 if offset + length > 4096 else 0

    def entry(self, ref: int) -> GrantEntry:
        s, (pro, prw) = self.shared[ref], self.pins(ref)
        flags = self.flags(ref) | (self.status(ref) if self.version == 1 else 0)
        return GrantEntry(ref, self.version, s.domid, s.gfn, s.permit and s.readonly, pro, prw,
                          ref in self.in_use, ref in self.deferred, flags, self.status(ref),
                          self.owner(ref))

    def usage(self) -> list[UsageLine]:
        out = []
        for ref in range(self.nr):
            e = self.entry(ref)
            if e.pin_ro + e.pin_rw:
                shown = e.flags if self.version == 1 else e.status
                assert e.map_domid is not None
                out.append(UsageLine(ref, e.map_domid, e.pin_ro * 0x100 + e.pin_rw, e.domid, e.gfn, shown))
        return out


def run(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except (GrantError, NaiveErr) as exc:
        return "err", (exc.errno, exc.status)


def make_machine(factory: Callable[[int, int], GrantTable], version: int) -> type[RuleBasedStateMachine]:
    class GrantMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.model = factory(NR, version)
            self.naive = Naive(NR, version)

        def both(self, fm: Callable[[], Any], fn: Callable[[], Any]) -> Any:
            got, want = run(fm), run(fn)
            assert got == want, f"model {got} != oracle {want}"
            return got[1]

        def pick_ref(self, i: int, *, endable: bool = False) -> int:
            """Mostly a ref in use (not yet ended, for an end), sometimes any."""
            live = sorted(self.naive.in_use - set(self.naive.deferred) if endable else self.naive.in_use)
            return live[i % len(live)] if live and i < 1000 else i % (NR + 3)

        def mapper(self, ref: int, other: bool) -> int:
            """The domain the ref is granted to, or the other one."""
            grantee = self.naive.shared[ref].domid if 0 <= ref < NR else 0
            return grantee ^ other

        @rule(domid=st.sampled_from(DOMS), gfn=st.integers(0, 3), ro=st.booleans())
        def grant(self, domid: int, gfn: int, ro: bool) -> None:
            self.both(lambda: self.model.grant_foreign_access(domid, gfn, readonly=ro),
                      lambda: self.naive.grant(domid, gfn, ro))

        @rule(domid=st.sampled_from(DOMS), ro=st.booleans())
        def grant_map_end(self, domid: int, ro: bool) -> None:
            """A frontend ends a grant its backend still maps: the end is deferred."""
            ref = self.both(lambda: self.model.grant_foreign_access(domid, 1, readonly=ro),
                            lambda: self.naive.grant(domid, 1, ro))
            if isinstance(ref, int):
                self.both(lambda: self.model.map(ref, domid, readonly=ro), lambda: self.naive.map(ref, domid, ro))
                self.both(lambda: self.model.end_foreign_access(ref), lambda: self.naive.end(ref))

        @rule(i=st.integers(0, 1100))
        def end(self, i: int) -> None:
            ref = self.pick_ref(i, endable=True)
            self.both(lambda: self.model.end_foreign_access(ref), lambda: self.naive.end(ref))

        @rule(limit=st.sampled_from((0, 1, 2, 10)))
        def tick(self, limit: int) -> None:
            self.both(lambda: self.model.handle_deferred(limit), lambda: self.naive.tick(limit))

        @rule(i=st.integers(0, 1100), other=st.sampled_from((0, 0, 0, 1)), ro=st.booleans())
        def map(self, i: int, other: int, ro: bool) -> None:
            ref = self.pick_ref(i)
            domid = self.mapper(ref, bool(other))
            self.both(lambda: self.model.map(ref, domid, readonly=ro), lambda: self.naive.map(ref, domid, ro))

        @rule(i=st.integers(0, 50), domid=st.sampled_from(DOMS), stale=st.sampled_from((False, False, True)))
        def unmap(self, i: int, domid: int, stale: bool) -> None:
            live = sorted(self.naive.maps.get(domid, {}))
            handle = live[i % len(live)] if live and not stale else i
            self.both(lambda: self.model.unmap(handle, domid=domid), lambda: self.naive.unmap(handle, domid))

        @rule(i=st.integers(0, 1100), other=st.sampled_from((0, 0, 0, 1)), dest=st.booleans(),
              offset=st.sampled_from((0, 8, 4095)), length=st.sampled_from((0, 1, 4088, 4096)))
        def copy(self, i: int, other: int, dest: bool, offset: int, length: int) -> None:
            ref = self.pick_ref(i)
            domid = self.mapper(ref, bool(other))
            self.both(lambda: self.model.copy(ref, domid, dest=dest, offset=offset, length=length),
                      lambda: self.naive.copy(ref, domid, dest, offset, length))

        @invariant()
        def same_state(self) -> None:
            m, n = self.model, self.naive
            assert len(m) == len(n.in_use)
            assert m.next_ref() == (n.free[0] if n.free else None)
            assert m.deferred_refs() == n.deferred
            for ref in range(NR):
                assert m.entry(ref) == n.entry(ref), ref
            assert m.usage_lines() == n.usage()
            for d in DOMS:
                assert m.live_handles(d) == {h: r for h, (r, _) in n.maps.get(d, {}).items()}

    GrantMachine.__name__ = f"GrantMachineV{version}"
    return GrantMachine


SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

TestGrantV1 = make_machine(GrantTable, 1).TestCase
TestGrantV1.settings = SETTINGS
TestGrantV2 = make_machine(GrantTable, 2).TestCase
TestGrantV2.settings = SETTINGS
