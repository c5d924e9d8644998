"""Stateful test of the pinning model: a hypothesis state machine drives the
model (:mod:`harness.models.pinning`) and a deliberately naive oracle side by
side (lists of areas scanned linearly, pins recomputed from scratch as a set
of (pages, page) pairs after every step) and compares every result, errno and
the whole state after each rule.  A second test runs every mutant of
:mod:`harness.models.pinning_mutants` through the same machine and requires
that the comparison fails within a bounded search."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from harness.models.pinning import (
    HPAGE_SIZE,
    MOCK_APERTURE_LAST,
    MOCK_APERTURE_START,
    IOAS,
    IommufdCtx,
    IommufdError,
)
from harness.models.pinning_mutants import MUTANTS

PS = 4096
U64 = 2**64 - 1


# --------------------------------------------------------------------------- naive oracle


class Err(Exception):
    def __init__(self, err: int, unmapped: int = 0) -> None:
        super().__init__(err)
        self.errno = err
        self.unmapped = unmapped


@dataclass
class NArea:
    iova: int
    last: int
    pages: int  # id of the iopt_pages
    start_byte: int  # from the page-aligned start of the pages
    readable: bool
    writeable: bool


@dataclass
class NIOAS:
    id: int
    areas: list[NArea] = field(default_factory=list)
    reserved: list[tuple[int, int, object]] = field(default_factory=list)
    allowed: list[tuple[int, int]] = field(default_factory=list)
    domains: list[object] = field(default_factory=list)  # (alignment, aperture) tokens
    no_huge: bool = False
    hwpt: int | None = None
    hwpt_token: object = None
    hwpt_devices: list[int] = field(default_factory=list)

    def alignment(self) -> int:
        a = PS if self.no_huge else 1
        for d in self.domains:
            a = max(a, d[0])  # type: ignore[index]
        return a


class Naive:
    """The kernel's rules, restated with lists and linear scans."""

    def __init__(self, cap: int = PS) -> None:
        self.cap = cap  # automatic alignment cap: PAGE_SIZE without THP, HPAGE_SIZE with
        self.objects: dict[int, tuple[str, Any]] = {}
        self.pages: dict[int, tuple[int, bool]] = {}  # id -> (page-aligned user VA, writable)
        self.npages = 0

    # ids
    def new_id(self) -> int:
        i = 1
        while i in self.objects:
            i += 1
        return i

    def ioas(self, i: int) -> NIOAS:
        kind, obj = self.objects.get(i, ("", None))
        if kind != "ioas":
            raise Err(errno.ENOENT)
        assert isinstance(obj, NIOAS)
        return obj

    def ioas_alloc(self) -> int:
        i = self.new_id()
        self.objects[i] = ("ioas", NIOAS(i))
        return i

    # pins, recomputed from scratch
    def pinned(self) -> set[tuple[int, int]]:
        out: set[tuple[int, int]] = set()
        for kind, obj in self.objects.values():
            if kind != "ioas" or not obj.domains:
                continue
            for a in obj.areas:
                base = self.pages[a.pages][0]
                first = a.start_byte // PS
                last = (a.start_byte + a.last - a.iova) // PS
                for idx in range(first, last + 1):
                    out.add((a.pages, base + idx * PS))
        return out

    def pinned_pages(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for _, va in self.pinned():
            refs[va] = refs.get(va, 0) + 1
        return refs

    # iova helpers
    @staticmethod
    def meets(s: int, l: int, s2: int, l2: int) -> bool:
        return s <= l2 and s2 <= l

    def alloc(self, io: NIOAS, uva: int, length: int) -> int:
        if length >= U64 // 2:
            raise Err(errno.EOVERFLOW)
        a = 1
        while a < length:
            a *= 2
        if uva:
            low = 1
            while not uva & low:
                low *= 2
            a = min(a, low)
        if a >= self.cap:
            a = self.cap
        if a < io.alignment():
            raise Err(errno.EINVAL)
        off = uva % PS

        def align(x: int) -> int:
            return ((x + a - 1) // a * a) % 2**64 | off

        if io.allowed:
            spans = []
            for s, l in sorted(io.allowed):
                if spans and s <= spans[-1][1] + 1:
                    spans[-1] = (spans[-1][0], max(l, spans[-1][1]))
                else:
                    spans.append((s, l))
            spans = [(max(s, PS), min(l, U64 - PS)) for s, l in spans if l >= PS and s <= U64 - PS]
        else:
            spans = [(PS, U64 - PS)]
        used = sorted([(s, l) for s, l, _ in io.reserved] + [(x.iova, x.last) for x in io.areas])
        for s, l in spans:
            if l - s < length - 1:
                continue
            s = align(s)
            if s > l or l - s < length - 1:
                continue
            cur = s
            holes = []
            for us, ul in used:
                if ul < cur or us > l:
                    continue
                if us > cur:
                    holes.append((cur, us - 1))
                cur = max(cur, ul + 1)
            if cur <= l:
                holes.append((cur, l))
            for hs, hl in holes:
                if hl - hs < length - 1:
                    continue
                start = align(hs)
                if start > hl or hl - start < length - 1:
                    continue
                return start
        raise Err(errno.ENOSPC)

    def place(self, io: NIOAS, pieces: list[tuple[int, int, int]], length: int,
              iova: int | None, readable: bool, writeable: bool) -> int:
        al = io.alignment()
        if length % al or not length:
            raise Err(errno.EINVAL)
        if iova is None:
            pid, sb, _ = pieces[0]
            iova = self.alloc(io, self.pages[pid][0] + sb, length)
        else:
            if iova % al:
                raise Err(errno.EINVAL)
            if iova + length - 1 > U64:
                raise Err(errno.EOVERFLOW)
            if any(self.meets(s, l, iova, iova + length - 1) for s, l, _ in io.reserved):
                raise Err(errno.EINVAL)
            if any(self.meets(x.iova, x.last, iova, iova + length - 1) for x in io.areas):
                raise Err(errno.EEXIST)
        new = []
        cur = iova
        for pid, sb, ln in pieces:
            if writeable and not self.pages[pid][1]:
                raise Err(errno.EPERM)
            if (sb % PS) % al:
                raise Err(errno.EINVAL)
            new.append(NArea(cur, cur + ln - 1, pid, sb, readable, writeable))
            cur += ln
        io.areas.extend(new)
        io.areas.sort(key=lambda x: x.iova)
        return iova

    # ioctls
    def map(self, i: int, uva: int, length: int, iova: int | None, r: bool, w: bool) -> int:
        if (iova is not None and iova >= U64) or length >= U64:
            raise Err(errno.EOVERFLOW)
        if not (r or w):
            raise Err(errno.EINVAL)
        io = self.ioas(i)
        if length == 0 or length > U64 - PS:
            raise Err(errno.EINVAL)
        if uva + length > U64:
            raise Err(errno.EOVERFLOW)
        self.npages += 1
        self.pages[self.npages] = (uva - uva % PS, w)
        try:
            return self.place(io, [(self.npages, uva % PS, length)], length, iova, r, w)
        except Err:
            del self.pages[self.npages]
            raise

    def copy(self, dst: int, src: int, src_iova: int, length: int, iova: int | None,
             r: bool, w: bool) -> int:
        if length >= U64 or src_iova >= U64 or (iova is not None and iova >= U64):
            raise Err(errno.EOVERFLOW)
        if not (r or w):
            raise Err(errno.EINVAL)
        s = self.ioas(src)
        if not length:
            raise Err(errno.EINVAL)
        last = src_iova + length - 1
        if last > U64:
            raise Err(errno.EOVERFLOW)
        pieces = []
        cur = src_iova
        while cur <= last:
            hit = [x for x in s.areas if x.iova <= cur <= x.last]
            if not hit:
                raise Err(errno.ENOENT)
            x = hit[0]
            end = min(last, x.last)
            pieces.append((x.pages, x.start_byte + cur - x.iova, end - cur + 1))
            cur = end + 1
        d = self.ioas(dst)
        return self.place(d, pieces, length, iova, r, w)

    def unmap(self, i: int, iova: int, length: int) -> int:
        io = self.ioas(i)
        if iova == 0 and length == U64:
            n = sum(x.last - x.iova + 1 for x in io.areas)
            io.areas.clear()
            return n
        if iova >= U64 or length >= U64:
            raise Err(errno.EOVERFLOW)
        if not length:
            raise Err(errno.EINVAL)
        last = iova + length - 1
        if last > U64:
            raise Err(errno.EOVERFLOW)
        done = 0
        for x in sorted(io.areas, key=lambda x: x.iova):
            if not self.meets(x.iova, x.last, iova, last):
                continue
            if x.iova < iova or x.last > last:
                raise Err(errno.ENOENT, done)
            io.areas.remove(x)
            done += x.last - x.iova + 1
        if not done:
            raise Err(errno.ENOENT)
        return done

    def add_domain(self, io: NIOAS, token: tuple[int, tuple[int, int] | None]) -> None:
        align, aperture = token
        new = max(align, io.alignment())
        if new > PS:
            raise Err(errno.EINVAL)
        if new != io.alignment():
            for x in io.areas:
                if x.iova % new or (x.last - x.iova + 1) % new or (x.start_byte % PS) % new:
                    raise Err(errno.EADDRINUSE)
        res = []
        if aperture is not None:
            if aperture[0]:
                res.append((0, aperture[0] - 1))
            if aperture[1] != U64:
                res.append((aperture[1] + 1, U64))
        for s, l in res:
            if any(self.meets(x.iova, x.last, s, l) for x in io.areas):
                raise Err(errno.EADDRINUSE)
            if any(self.meets(a, b, s, l) for a, b in io.allowed):
                raise Err(errno.EADDRINUSE)
        io.reserved.extend((s, l, token) for s, l in res)
        io.domains.append(token)

    def remove_domain(self, io: NIOAS, token: object) -> None:
        io.domains.remove(token)
        io.reserved = [r for r in io.reserved if r[2] is not token]

    def mock_domain(self, i: int) -> tuple[int, int, int]:
        io = self.ioas(i)
        if io.hwpt is None:
            token = (PS // 2, (MOCK_APERTURE_START, MOCK_APERTURE_LAST))
            self.add_domain(io, token)
            io.hwpt_token = token
            stdev, idev = self.new_id(), 0
            self.objects[stdev] = ("selftest", i)
            idev = self.new_id()
            self.objects[idev] = ("device", stdev)
            hwpt = self.new_id()
            self.objects[hwpt] = ("hwpt_paging", i)
            io.hwpt = hwpt
        else:
            stdev = self.new_id()
            self.objects[stdev] = ("selftest", i)
            idev = self.new_id()
            self.objects[idev] = ("device", stdev)
        io.hwpt_devices.append(stdev)
        return stdev, idev, io.hwpt

    def destroy(self, obj_id: int) -> None:
        if obj_id not in self.objects:
            raise Err(errno.ENOENT)
        kind, obj = self.objects[obj_id]
        if kind == "ioas":
            if obj.domains:
                raise Err(errno.EBUSY)
            del self.objects[obj_id]
            return
        if kind != "selftest":
            raise Err(errno.EBUSY)
        io = self.ioas(obj)
        io.hwpt_devices.remove(obj_id)
        idev = next(k for k, (kd, o) in self.objects.items() if kd == "device" and o == obj_id)
        del self.objects[idev]
        del self.objects[obj_id]
        if not io.hwpt_devices:
            assert io.hwpt is not None
            del self.objects[io.hwpt]
            io.hwpt = None
            io.domains = [d for d in io.domains if d is not io.hwpt_token]
            io.reserved = [r for r in io.reserved if r[2] is not io.hwpt_token]

    def add_reserved(self, i: int, s: int, l: int) -> None:
        io = self.ioas(i)
        if any(self.meets(x.iova, x.last, s, l) for x in io.areas):
            raise Err(errno.EADDRINUSE)
        if any(self.meets(a, b, s, l) for a, b in io.allowed):
            raise Err(errno.EADDRINUSE)
        io.reserved.append((s, l, None))

    def allow_iovas(self, i: int, spans: list[tuple[int, int]]) -> None:
        io = self.ioas(i)
        for k, (s, l) in enumerate(spans):
            if s >= l or any(self.meets(s, l, a, b) for a, b in spans[:k]):
                raise Err(errno.EINVAL)
        for s, l in spans:
            if any(self.meets(s, l, a, b) for a, b, _ in io.reserved):
                raise Err(errno.EADDRINUSE)
        io.allowed = list(spans)

    def iova_ranges(self, i: int) -> list[tuple[int, int]]:
        io = self.ioas(i)
        out = []
        cur = 0
        for s, l in sorted((s, l) for s, l, _ in io.reserved):
            if s > cur:
                out.append((cur, s - 1))
            cur = max(cur, l + 1)
        if cur <= U64:
            out.append((cur, U64))
        return out

    def access_rw(self, i: int, iova: int, length: int, write: bool) -> None:
        if length > 16 << 20:
            raise Err(errno.ENOMEM)
        if not length:
            raise Err(errno.EINVAL)
        last = iova + length - 1
        if last > U64:
            raise Err(errno.EOVERFLOW)
        io = self.ioas(i)
        cur = iova
        while True:
            hit = [x for x in io.areas if x.iova <= cur <= x.last]
            if not hit:
                raise Err(errno.ENOENT)
            x = hit[0]
            if not (x.writeable if write else x.readable):
                raise Err(errno.EPERM)
            if x.last >= last:
                return
            cur = x.last + 1


# --------------------------------------------------------------------------- the machine

IOVA_BASES = [0, PS, 2 * PS, 3 * PS, 5 * PS, 8 * PS, MOCK_APERTURE_START,
              MOCK_APERTURE_START + PS, MOCK_APERTURE_START + 4 * PS]
UVA_BASE = 0x10000
LENGTHS = [PS, 2 * PS, 3 * PS, 4 * PS, PS // 2, 3 * PS // 2]


def run(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except IommufdError as exc:
        return "err", (exc.errno, exc.unmapped)
    except Err as exc:
        return "err", (exc.errno, exc.unmapped)


def make_machine(
    factory: Callable[[], IommufdCtx], cap: int = PS
) -> type[RuleBasedStateMachine]:
    class PinningMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.model = factory()
            self.naive = Naive(cap)
            self.domains: dict[int, list[tuple[Any, Any]]] = {}  # ioas id -> (model, naive)
            self.mocks: list[int] = []
            self.ioas_ids: list[int] = []
            for _ in range(2):
                self.alloc()

        def alloc(self) -> None:
            m = self.model.ioas_alloc()
            n = self.naive.ioas_alloc()
            assert m.id == n, (m.id, n)
            self.ioas_ids.append(n)

        def mio(self, i: int) -> IOAS:
            return self.model.ioas(i)

        def both(self, fm: Callable[[], Any], fn: Callable[[], Any]) -> Any:
            got, want = run(fm), run(fn)
            assert got == want, f"model {got} != oracle {want}"
            return got[1]

        @rule(which=st.integers(0, 3), destroy=st.booleans())
        def ioas_churn(self, which: int, destroy: bool) -> None:
            if not destroy:
                if len(self.ioas_ids) < 4:
                    self.alloc()
                return
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            self.both(lambda: self.model.destroy(i), lambda: self.naive.destroy(i))
            if self.naive.objects.get(i) is None:
                self.ioas_ids.remove(i)

        @rule(which=st.integers(0, 3), page=st.integers(0, 12), sub=st.sampled_from([0, 0, 0, 0x800]),
              length=st.sampled_from(LENGTHS), fixed=st.booleans(),
              base=st.sampled_from(IOVA_BASES), prot=st.sampled_from([(1, 1), (1, 1), (1, 0), (0, 1)]))
        def map(self, which: int, page: int, sub: int, length: int, fixed: bool, base: int,
                prot: tuple[int, int]) -> None:
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            uva = UVA_BASE + page * PS + sub
            iova = base if fixed else None
            r, w = bool(prot[0]), bool(prot[1])
            self.both(lambda: self.mio(i).map(uva, length, iova=iova, readable=r, writeable=w),
                      lambda: self.naive.map(i, uva, length, iova, r, w))

        map_again = map  # a second rule: maps are what the other rules need

        @rule(which=st.integers(0, 3), data=st.data())
        def map_over(self, which: int, data: st.DataObject) -> None:
            """A fixed MAP that starts on an area or just before a reserved
            range and runs on: EEXIST against EINVAL, in the kernel's order."""
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            io = self.naive.ioas(i)
            starts = [a.iova for a in io.areas] + [max(s - PS, 0) for s, _, _ in io.reserved
                                                   if s < 2**40]
            base = data.draw(st.sampled_from(starts)) if starts else 0
            ahead = [s for s, _, _ in io.reserved if base < s < base + (1 << 30)]
            if ahead and data.draw(st.booleans()):
                length = min(ahead) - base + PS  # up to the first page of a reserved range
            else:
                length = data.draw(st.sampled_from([2 * PS, 4 * PS, 16 * PS]))
            uva = UVA_BASE + data.draw(st.integers(0, 12)) * PS
            self.both(lambda: self.mio(i).map(uva, length, iova=base),
                      lambda: self.naive.map(i, uva, length, base, True, True))

        @rule(which=st.integers(0, 3), data=st.data())
        def unmap(self, which: int, data: st.DataObject) -> None:
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            areas = self.naive.ioas(i).areas
            if areas and data.draw(st.booleans()):
                # From the start of one area to inside or past the end of another.
                a = data.draw(st.sampled_from(areas))
                b = data.draw(st.sampled_from(areas))
                start = min(a.iova, b.iova) + data.draw(st.sampled_from([0, 0, PS]))
                end = max(a.last, b.last) + data.draw(st.sampled_from([0, 0, -PS, PS]))
                length = max(end - start + 1, 0)
            elif data.draw(st.integers(0, 5)) == 0:
                start, length = 0, U64  # unmap all
            else:
                start = data.draw(st.sampled_from(IOVA_BASES))
                length = data.draw(st.sampled_from(LENGTHS + [0, 8 * PS, U64]))
            self.both(lambda: self.mio(i).unmap(start, length),
                      lambda: self.naive.unmap(i, start, length))

        @rule(src=st.integers(0, 3), dst=st.integers(0, 3), data=st.data(),
              fixed=st.booleans(), base=st.sampled_from(IOVA_BASES),
              prot=st.sampled_from([(1, 1), (1, 0), (0, 1)]))
        def copy(self, src: int, dst: int, data: st.DataObject, fixed: bool, base: int,
                 prot: tuple[int, int]) -> None:
            if not self.ioas_ids:
                return
            full = [i for i in self.ioas_ids if self.naive.ioas(i).areas] or self.ioas_ids
            s = full[src % len(full)]
            d = self.ioas_ids[dst % len(self.ioas_ids)]
            areas = self.naive.ioas(s).areas
            if areas:
                a = data.draw(st.sampled_from(areas))
                start = a.iova + data.draw(st.sampled_from([0, 0, PS // 2, PS]))
                length = data.draw(st.sampled_from([a.last - a.iova + 1, PS, 2 * PS, 5 * PS]))
            else:
                start, length = PS, PS
            iova = base if fixed else None
            r, w = bool(prot[0]), bool(prot[1])
            self.both(
                lambda: self.mio(d).copy_from(self.mio(s), start, length, iova=iova,
                                              readable=r, writeable=w),
                lambda: self.naive.copy(d, s, start, length, iova, r, w))

        @rule(dst=st.integers(0, 3), data=st.data(), writeable=st.booleans())
        def copy_area(self, dst: int, data: st.DataObject, writeable: bool) -> None:
            """COPY one whole source area to an automatic IOVA."""
            full = [i for i in self.ioas_ids if self.naive.ioas(i).areas]
            if not full:
                return
            s = data.draw(st.sampled_from(full))
            d = self.ioas_ids[dst % len(self.ioas_ids)]
            a = data.draw(st.sampled_from(self.naive.ioas(s).areas))
            length = a.last - a.iova + 1
            self.both(
                lambda: self.mio(d).copy_from(self.mio(s), a.iova, length, writeable=writeable),
                lambda: self.naive.copy(d, s, a.iova, length, None, True, writeable))

        @rule(which=st.integers(0, 3), data=st.data())
        def unmap_span(self, which: int, data: st.DataObject) -> None:
            """UNMAP from one area's start to inside a later area."""
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            areas = self.naive.ioas(i).areas
            if not areas:
                return
            a = data.draw(st.sampled_from(areas))
            later = [b for b in areas if b.iova > a.iova]
            end = data.draw(st.sampled_from(later)).last - PS // 2 if later else a.last
            self.both(lambda: self.mio(i).unmap(a.iova, end - a.iova + 1),
                      lambda: self.naive.unmap(i, a.iova, end - a.iova + 1))

        @rule(which=st.integers(0, 3), align=st.sampled_from([1, PS // 2, PS]),
              aperture=st.sampled_from([None, None, (PS, U64), (0, MOCK_APERTURE_LAST)]))
        def attach_domain(self, which: int, align: int, aperture: Any) -> None:
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            token = (align, aperture)
            got = run(lambda: self.mio(i).attach_domain(aperture=aperture, iova_alignment=align))
            want = run(lambda: self.naive.add_domain(self.naive.ioas(i), token))
            assert got[0] == want[0] and (got[0] == "ok" or got == want), (got, want)
            if got[0] == "ok":
                self.domains.setdefault(i, []).append((got[1], token))

        @rule(which=st.integers(0, 3), k=st.integers(0, 3))
        def detach_domain(self, which: int, k: int) -> None:
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            doms = self.domains.get(i)
            if not doms:
                return
            dm, token = doms.pop(k % len(doms))
            self.mio(i).detach_domain(dm)
            self.naive.remove_domain(self.naive.ioas(i), token)

        @rule(which=st.integers(0, 3))
        def mock_domain(self, which: int) -> None:
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]

            def model() -> tuple[int, int, int]:
                md = self.model.mock_domain(i)
                return md.stdev_id, md.idev_id, md.hwpt_id

            got = self.both(model, lambda: self.naive.mock_domain(i))
            if isinstance(got, tuple) and len(got) == 3:
                self.mocks.append(got[0])

        @precondition(lambda self: bool(self.mocks))
        @rule(k=st.integers(0, 5))
        def destroy_mock(self, k: int) -> None:
            stdev = self.mocks.pop(k % len(self.mocks))
            self.both(lambda: self.model.destroy(stdev), lambda: self.naive.destroy(stdev))

        @rule(obj=st.integers(0, 12))
        def destroy_any(self, obj: int) -> None:
            kind = self.naive.objects.get(obj, ("", None))[0]
            if kind in ("selftest", "ioas"):
                return  # done by the rules that keep track of them
            self.both(lambda: self.model.destroy(obj), lambda: self.naive.destroy(obj))

        @rule(which=st.integers(0, 3), ranges=st.lists(
            st.tuples(st.sampled_from(IOVA_BASES), st.sampled_from([1, PS - 1, 4 * PS - 1])),
            max_size=3))
        def allow_iovas(self, which: int, ranges: list[tuple[int, int]]) -> None:
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            spans = [(s, s + n) for s, n in ranges]
            self.both(lambda: self.mio(i).allow_iovas(spans),
                      lambda: self.naive.allow_iovas(i, spans))

        @rule(which=st.integers(0, 3), base=st.sampled_from(IOVA_BASES),
              length=st.sampled_from([PS, 2 * PS, 16 * PS]))
        def add_reserved(self, which: int, base: int, length: int) -> None:
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            self.both(lambda: self.mio(i).add_reserved(base, base + length - 1),
                      lambda: self.naive.add_reserved(i, base, base + length - 1))

        @rule(which=st.integers(0, 3), base=st.sampled_from(IOVA_BASES),
              length=st.sampled_from([1, PS, PS, 3 * PS, 3 * PS, 17 << 20]), write=st.booleans())
        def access_rw(self, which: int, base: int, length: int, write: bool) -> None:
            if not self.ioas_ids:
                return
            i = self.ioas_ids[which % len(self.ioas_ids)]
            self.both(lambda: self.mio(i).access_rw(base, length, write=write),
                      lambda: self.naive.access_rw(i, base, length, write))

        @invariant()
        def same_state(self) -> None:
            naive = self.naive
            model = self.model
            assert model.object_ids() == sorted(naive.objects)
            for oid, (kind, _) in naive.objects.items():
                assert model.object_kind(oid) == kind
            for i in self.ioas_ids:
                n = naive.ioas(i)
                m = model.ioas(i)
                want = [(a.iova, a.last, naive.pages[a.pages][0] + a.start_byte, a.readable,
                         a.writeable) for a in n.areas]
                got = [(a.iova, a.last, a.user_va, a.readable, a.writeable) for a in m.areas()]
                assert got == want
                assert m.iova_alignment == n.alignment()
                assert m.iova_ranges() == naive.iova_ranges(i)
            pinned = naive.pinned_pages()
            assert model.pinned_pages() == pinned
            assert model.pinned_vm == sum(pinned.values())
            for va in list(pinned)[:4] + [UVA_BASE - PS]:
                assert model.refs(va + 5) == pinned.get(va, 0)

    return PinningMachine


PinningMachine = make_machine(IommufdCtx)
PinningMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPinningMachine = PinningMachine.TestCase

# A kernel with THP caps the automatic alignment at 2 MiB instead.
ThpMachine = make_machine(lambda: IommufdCtx(max_auto_alignment=HPAGE_SIZE), HPAGE_SIZE)
ThpMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestThpMachine = ThpMachine.TestCase


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_every_mutant_is_caught(name: str) -> None:
    """Each mutant must diverge from the oracle within a bounded, derandomised
    search (no shrinking: only the verdict matters here)."""
    machine = make_machine(MUTANTS[name].factory)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=1500, stateful_step_count=30, deadline=None, derandomize=True,
                database=None, phases=[Phase.generate], report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck),
            ),
        )
