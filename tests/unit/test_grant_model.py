"""Examples and properties of the grant table model (:mod:`harness.models.grant`):
each example pins one fact of Linux's drivers/xen/grant-table.c or Xen's
xen/common/grant_table.c, with the numbers a guest would show."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.models.grant import (
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_general_error,
    GNTST_no_space,
    GNTST_okay,
    GNTST_permission_denied,
    GrantArgumentError,
    GrantError,
    GrantTable,
    UsageLine,
)


def status_of(fn: object, *args: object, **kw: object) -> int | None:
    with pytest.raises(GrantError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value.status


def test_gntst_constants_are_xens() -> None:
    assert (GNTST_okay, GNTST_general_error, GNTST_bad_domain, GNTST_bad_gntref, GNTST_bad_handle,
            GNTST_permission_denied, GNTST_bad_copy_arg, GNTST_no_space) == (0, -1, -2, -3, -4, -8, -10, -13)


# ----------------------------------------------------------------- granting side


def test_refs_start_at_8_ascending_and_reuse_is_lifo() -> None:
    t = GrantTable()
    assert [t.grant_foreign_access(0, g) for g in range(3)] == [8, 9, 10]
    assert t.end_foreign_access(8) and t.end_foreign_access(10)
    assert t.next_ref() == 10
    assert [t.grant_foreign_access(0, 7) for _ in range(3)] == [10, 8, 11]
    assert len(t) == 4


def test_enospc_when_every_ref_is_in_use() -> None:
    t = GrantTable(nr_entries=10)
    assert [t.grant_foreign_access(1, 0), t.grant_foreign_access(1, 0)] == [8, 9]
    with pytest.raises(GrantError) as info:
        t.grant_foreign_access(1, 0)
    assert info.value.errno == errno.ENOSPC and info.value.status is None
    assert GrantTable(nr_entries=8).next_ref() is None


def test_grant_writes_the_flags() -> None:
    t = GrantTable()
    rw, ro = t.grant_foreign_access(3, 0x1234), t.grant_foreign_access(3, 5, readonly=True)
    e = t.entry(rw)
    assert (e.domid, e.gfn, e.readonly, e.flags, e.in_use, e.deferred, e.pin) == (3, 0x1234, False, 0x1, True, False, 0)
    assert t.entry(ro).flags == 0x1 | 0x4 and t.entry(ro).readonly
    assert t.entry(0).flags == 0 and not t.entry(0).in_use  # reserved


@pytest.mark.parametrize("ref, err", [(11, errno.EINVAL), (3, errno.EINVAL), (512, errno.EINVAL), (-1, errno.EINVAL)])
def test_end_of_a_ref_not_in_use_is_einval(ref: int, err: int) -> None:
    t = GrantTable()
    t.grant_foreign_access(0, 0)
    with pytest.raises(GrantError) as info:
        t.end_foreign_access(ref)
    assert info.value.errno == err
    assert len(t) == 1 and t.next_ref() == 9


def test_ending_twice_is_ealready_then_einval() -> None:
    t = GrantTable()
    ref = t.grant_foreign_access(0, 0)
    t.map(ref, 0)
    assert t.end_foreign_access(ref) is False
    with pytest.raises(GrantError) as info:
        t.end_foreign_access(ref)
    assert info.value.errno == errno.EALREADY
    u = GrantTable()
    u.end_foreign_access(u.grant_foreign_access(0, 0))
    with pytest.raises(GrantError) as info:
        u.end_foreign_access(8)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("bad", [
    dict(domid=-1, gfn=0), dict(domid=0x10000, gfn=0), dict(domid=0, gfn=-1), dict(domid=0, gfn=2**32),
])
def test_grant_arguments_outside_their_c_types(bad: dict[str, int]) -> None:
    with pytest.raises(GrantArgumentError) as info:
        GrantTable().grant_foreign_access(bad["domid"], bad["gfn"])
    assert info.value.errno == errno.EINVAL and isinstance(info.value, ValueError)
    assert GrantTable(version=2).grant_foreign_access(0, 2**32) == 8  # v2 frames are u64


@pytest.mark.parametrize("kw", [dict(version=3), dict(nr_entries=7), dict(max_maptrack_frames=0)])
def test_constructor_checks(kw: dict[str, int]) -> None:
    with pytest.raises(GrantArgumentError):
        GrantTable(**kw)


# ----------------------------------------------------------------- deferred end


def test_v1_deferred_entry_stays_valid_until_the_tick() -> None:
    t = GrantTable(version=1)
    ref = t.grant_foreign_access(0, 9)
    h = t.map(ref, 0)
    assert t.end_foreign_access(ref) is False
    assert t.entry(ref).deferred and t.entry(ref).flags == 0x1 | 0x8 | 0x10
    assert t.handle_deferred() == []  # still mapped: re-queued
    t.unmap(h)
    assert t.entry(ref).flags == 0x1
    h2 = t.map(ref, 0, readonly=True)  # the entry is still valid after the last unmap
    assert t.handle_deferred() == []
    t.unmap(h2)
    assert t.handle_deferred() == [ref]
    e = t.entry(ref)
    assert (e.in_use, e.deferred, e.flags) == (False, False, 0) and t.next_ref() == ref
    assert status_of(t.map, ref, 0) == GNTST_general_error


def test_v2_end_clears_the_flags_but_a_pinned_entry_still_maps() -> None:
    t = GrantTable(version=2)
    ref = t.grant_foreign_access(0, 9, readonly=True)
    h = t.map(ref, 0, readonly=True)
    assert t.end_foreign_access(ref) is False
    e = t.entry(ref)
    assert (e.flags, e.status, e.readonly, e.deferred) == (0, 0x8, False, True)
    h2 = t.map(ref, 0, readonly=True)  # pinned: Xen does not look at the flags again
    h3 = t.map(ref, 0)  # first writer: _set_status_v2 sees no GTF_readonly any more
    assert t.entry(ref).usage() == (0x200 + 0x1, 0x8 | 0x10)
    for x in (h, h2, h3):
        t.unmap(x)
    assert status_of(t.map, ref, 0, readonly=True) == GNTST_general_error  # unpinned: flags 0
    assert t.handle_deferred() == [ref]


def test_deferred_tick_order_limit_and_requeue_at_the_tail() -> None:
    t = GrantTable()
    refs = [t.grant_foreign_access(0, g) for g in range(14)]
    handles = {r: t.map(r, 0) for r in refs}
    for r in refs:
        assert t.end_foreign_access(r) is False
    for r in refs[1:12]:
        t.unmap(handles[r])
    # the tick looks at 10: refs[0] (mapped) goes to the tail, refs[1..9] are freed in order
    assert t.handle_deferred() == refs[1:10]
    assert t.deferred_refs() == refs[10:] + refs[:1]
    assert t.next_ref() == refs[9]  # freed last, reused first
    # next tick: refs[10], refs[11] freed, refs[12], refs[13] and refs[0] re-queued, then it meets refs[12]
    assert t.handle_deferred() == refs[10:12]
    assert t.deferred_refs() == [refs[12], refs[13], refs[0]]
    assert t.handle_deferred(free_per_iteration=1) == []
    assert t.deferred_refs() == [refs[13], refs[0], refs[12]]
    for r in (refs[0], refs[12], refs[13]):
        t.unmap(handles[r])
    assert t.handle_deferred(free_per_iteration=0) == [refs[13], refs[0], refs[12]]
    assert len(t) == 0


# ----------------------------------------------------------------- mapping side


def test_map_statuses_in_xens_order() -> None:
    t = GrantTable(nr_entries=16)
    ro = t.grant_foreign_access(0, 1, readonly=True)
    other = t.grant_foreign_access(5, 2)
    assert status_of(t.map, 16, 0) == GNTST_bad_gntref
    assert status_of(t.map, 2**32, 0) == GNTST_bad_gntref
    assert status_of(t.map, 12, 0) == GNTST_general_error  # never granted
    assert status_of(t.map, 3, 0) == GNTST_general_error  # reserved
    assert status_of(t.map, other, 0) == GNTST_general_error  # granted to d5
    assert status_of(t.map, ro, 0) == GNTST_general_error  # writable map of a read-only grant
    t.map(ro, 0, readonly=True)
    assert status_of(t.map, ro, 0) == GNTST_general_error  # a first writer is checked even when pinned
    h = t.map(other, 5)
    t.grant_foreign_access(0, 3)
    assert status_of(t.map, other, 0, readonly=True) == GNTST_general_error  # pinned by d5
    t.unmap(h, domid=5)
    assert status_of(t.unmap, h, domid=5) == GNTST_bad_handle
    assert status_of(t.unmap, 99) == GNTST_bad_handle


def test_pins_and_status_bits_as_debug_keys_g_prints_them() -> None:
    t = GrantTable()
    ref = t.grant_foreign_access(0, 0x42)
    ro = [t.map(ref, 0, readonly=True) for _ in range(2)]
    rw = t.map(ref, 0)
    assert t.usage_lines() == [UsageLine(ref, 0, 0x201, 0, 0x42, 0x1 | 0x8 | 0x10)]
    t.unmap(rw)
    assert t.entry(ref).usage() == (0x200, 0x1 | 0x8)
    for h in ro:
        t.unmap(h)
    assert t.usage_lines() == [] and t.entry(ref).usage() == (0, 0x1)
    v2 = GrantTable(version=2)
    r2 = v2.grant_foreign_access(0, 7)
    v2.map(r2, 0)
    assert v2.usage_lines() == [UsageLine(r2, 0, 0x1, 0, 7, 0x8 | 0x10)]  # v2 prints the status word


def test_at_most_128_pins_of_each_kind() -> None:
    t = GrantTable()
    ref = t.grant_foreign_access(0, 0)
    for _ in range(128):
        t.map(ref, 0, readonly=True)
    assert status_of(t.map, ref, 0, readonly=True) == GNTST_general_error
    for _ in range(128):
        t.map(ref, 0)
    assert status_of(t.map, ref, 0) == GNTST_general_error
    assert t.entry(ref).pin == 0x8080


def test_maptrack_handles_fifo_and_the_kept_back_anchor() -> None:
    t = GrantTable()
    refs = [t.grant_foreign_access(0, 0) for _ in range(3)]
    got = [t.map(refs[i // 100], 0, readonly=True) for i in range(256)]
    assert got == list(range(255)) + [256]  # 255 anchors the first frame's list
    t.unmap(0)
    assert t.map(refs[0], 0, readonly=True) == 257  # freed handles go to the tail
    assert status_of(t.map, 4000, 0) == GNTST_bad_gntref  # took 258, put it back at the tail
    assert t.map(refs[0], 0, readonly=True) == 259
    assert t.map(t.grant_foreign_access(1, 0), 1) == 0  # each mapping domain has its own maptrack


def test_maptrack_exhaustion_is_no_space() -> None:
    t = GrantTable(max_maptrack_frames=1)
    refs = [t.grant_foreign_access(0, 0) for _ in range(2)]
    for i in range(255):
        t.map(refs[i % 2], 0, readonly=True)
    assert status_of(t.map, refs[0], 0, readonly=True) == GNTST_no_space
    t.unmap(7)  # of refs[1]
    assert t.map(refs[1], 0, readonly=True) == 255


def test_unmap_needs_domid_only_when_handles_collide() -> None:
    t = GrantTable()
    a, b = t.grant_foreign_access(0, 0), t.grant_foreign_access(1, 0)
    assert t.map(a, 0) == 0 == t.map(b, 1)
    with pytest.raises(GrantArgumentError):
        t.unmap(0)
    t.unmap(0, domid=1)
    t.unmap(0)
    assert t.live_handles(0) == {} == t.live_handles(1)


def test_copy_statuses() -> None:
    t = GrantTable()
    ro = t.grant_foreign_access(0, 0, readonly=True)
    rw = t.grant_foreign_access(0, 1)
    assert t.copy(ro, 0, dest=True) == GNTST_general_error  # into a read-only grant
    assert t.copy(ro, 0) == GNTST_okay
    assert t.copy(rw, 0, dest=True, offset=4000, length=200) == GNTST_bad_copy_arg
    assert t.copy(999, 0, offset=4000, length=200) == GNTST_bad_gntref  # the grant is checked first
    assert t.copy(999, 0, length=0) == GNTST_okay  # an empty segment checks nothing
    assert t.copy(rw, 1) == GNTST_general_error
    before = t.entry(rw)
    assert t.copy(rw, 0, dest=True) == GNTST_okay and t.entry(rw) == before  # pin dropped again


# ----------------------------------------------------------------- properties


ops = st.lists(st.tuples(st.sampled_from("gemut"), st.integers(0, 40), st.booleans()), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, version=st.sampled_from((1, 2)))
def test_invariants_under_any_sequence(ops: list[tuple[str, int, bool]], version: int) -> None:
    """Whatever happens: refs in use are unique and never reserved; len counts
    them; a free ref is never pinned; every pinned entry's pin equals its live
    handles; the deferred list holds each in-use-and-ended ref once."""
    t = GrantTable(nr_entries=20, version=version)
    granted: set[int] = set()
    for op, n, flag in ops:
        try:
            if op == "g":
                ref = t.grant_foreign_access(n % 2, n, readonly=flag)
                assert ref not in granted and 8 <= ref < 20
                granted.add(ref)
            elif op == "e" and granted:
                if t.end_foreign_access(sorted(granted)[n % len(granted)]):
                    pass
            elif op == "m":
                t.map(n % 24, n % 2, readonly=flag)
            elif op == "u":
                t.unmap(n % 8, domid=n % 2)
            else:
                t.handle_deferred(n % 3)
        except GrantError:
            pass
        granted = {r for r in range(20) if t.entry(r).in_use}
        assert len(t) == len(granted)
        live = [r for d in (0, 1) for r in t.live_handles(d).values()]
        for r in range(20):
            e = t.entry(r)
            assert e.pin_ro + e.pin_rw == live.count(r)
            assert e.in_use or not (e.pin_ro + e.pin_rw)
            assert (r < 8) <= (not e.in_use)
        deferred = t.deferred_refs()
        assert len(set(deferred)) == len(deferred) and all(t.entry(r).deferred for r in deferred)


# ----------------------------------------------------------------- benchmark


def test_benchmark_runs_small_and_reports_memory() -> None:
    from harness.bench import grant as bench
    from harness.cli import build_parser

    rows = bench.run(sizes=(16, 32), ops=128, seed=1)
    assert [r["n"] for r in rows] == [16.0, 32.0]
    assert 0 < rows[0]["peak_kib"] < rows[1]["peak_kib"]
    for kind in (*bench.KINDS, "mixed"):
        assert rows[0][f"{kind}_log_ratio"] == pytest.approx(1.0)
        assert rows[1][f"{kind}_ops"] > 0 and rows[1][f"{kind}_ns_per_op"] > 0
    with pytest.raises(ValueError):
        bench.run(sizes=(16,), ops=0)
    assert bench.main(["--sizes", "16", "--ops", "64"]) == 0
    assert build_parser().parse_args(["bench", "grant", "--ops", "7"]).ops == 7
