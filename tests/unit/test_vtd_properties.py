"""Property tests of the VT-d consistency checker (harness/checks/vtd.py) over the
simulated QEMU 7.2 VT-d of tests/unit/vtd_streams.py, plus the examples that pin
down the ``max_live_maps`` guard and concurrent translations.

A correct simulated QEMU must give a report with no divergence and the same counts
as the simulation; a faulty one (vtd_streams.FAULTS) must give its divergence kind
first, at the line of the probe that makes the fault visible.

Which test catches which hand-planted checker bug (each was planted in a working
copy, seen to fail the tests named, and reverted):

1. ``_pending_walk_matches`` returning True whenever a walk is pending (a hit
   excused without comparing slpte and domain):
   ``test_hit_after_invalidation_is_not_excused_by_an_unrelated_pending_walk``,
   ``test_a_hit_on_a_walk_invalidated_before_its_translate_is_not_excused``
   (and ``test_each_fault_is_reported_first_at_its_line`` for the dropped
   invalidations, when it draws a pending walk).
2. ``_on_update`` checking a walk only against the model of its own domain
   instead of every domain of the sid:
   ``test_walk_is_checked_against_every_domain_of_its_sid``,
   ``test_a_domain_invalidation_keeps_the_sids_models_of_other_domains`` and
   ``test_each_fault_is_reported_first_at_its_line[untraced-invalidation]``.
3. ``_drop_domain`` leaving ``_by_sid`` stale (a false ``stale-entry`` or
   ``unexpected-miss`` when a page is walked again after a domain
   invalidation): ``test_correct_qemu_gives_no_divergence`` (and most fault
   tests, whose clean prefix then diverges first).
4. The live-map count and the guard (e.g. ``_live`` not decremented on an
   invalidation; the guard's dropped entries reported as
   ``hit-after-invalidation``): ``test_guard_does_not_fire_while_the_models_fit``,
   ``test_guard_does_not_fire_on_recorded_runs``,
   ``test_guard_firing_is_never_a_divergence`` and
   ``test_faults_after_the_guard_fired_are_still_reported``.
"""

from __future__ import annotations

import lzma
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from harness.checks.verdict import CheckReport
from harness.checks.vtd import check_lines
from tests.unit.vtd_streams import (
    FAULTS,
    GUARD_SAFE_FAULTS,
    SIDS,
    UNTRACED_INVALIDATION,
    VTD_IOTLB_MAX_SIZE,
    Guest,
    SimQemu,
    Stream,
    build_stream,
    vtd_streams,
)

# Streams are long (a sweep fills QEMU's 1024-entry IOTLB): shrinking one takes
# minutes, so it is off unless VTD_SHRINK=1; a failure prints the whole stream.
_PHASES = tuple(Phase) if os.environ.get("VTD_SHRINK") else (Phase.explicit, Phase.reuse, Phase.generate)
# VTD_EXAMPLES scales the number of examples (mutation testing runs them at 0.25).
_SCALE = float(os.environ.get("VTD_EXAMPLES", "1"))
SETTINGS = settings(max_examples=max(int(40 * _SCALE), 4), deadline=None, derandomize=True,
                    phases=_PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(SETTINGS, max_examples=max(int(12 * _SCALE), 3))

DATA = Path(__file__).resolve().parents[1] / "data"
RECORDINGS = sorted(DATA.glob("*.trace.xz"))


def numbered(stream: Stream) -> str:
    return "\n".join(f"{n:>5}: {line}" for n, line in enumerate(stream.lines, 1))


def assert_clean(stream: Stream, report: CheckReport) -> None:
    assert report.ok, numbered(stream) + "\n" + report.format()
    assert report.conclusive or stream.counts["translations"] == 0, report.format()
    for name, value in stream.counts.items():
        assert getattr(report.counts, name) == value, (name, report.format())


def assert_expected(stream: Stream, report: CheckReport) -> None:
    exp = stream.expected
    assert exp is not None
    assert not report.ok, numbered(stream) + "\n" + report.format()
    first = report.divergences[0]
    assert (first.kind, first.lineno) == (exp.kind, exp.lineno), (
        numbered(stream) + f"\nexpected {exp}\n" + report.format())
    assert first.sid == exp.sid, first.format()
    if exp.kind in ("hit-after-invalidation", "hit-mismatch"):
        assert first.domain == exp.domain, first.format()
    if exp.kind in ("hit-mismatch", "stale-entry", "unexpected-miss"):
        assert "added at line" in first.message, first.format()
    for name in ("iova", "expected", "observed"):
        want = getattr(exp, name)
        if want is not None:
            got = getattr(first, name)
            if name == "iova" and exp.kind != "hit-after-invalidation":
                want &= ~0xFFF  # translate lines and walks name the page or the address
                got = got & ~0xFFF if got is not None else None
            assert got == want, (name, first.format())


# ---- a correct QEMU ------------------------------------------------------------------


@SETTINGS
@given(vtd_streams())
def test_correct_qemu_gives_no_divergence(stream: Stream) -> None:
    report = check_lines(stream.lines)
    assert_clean(stream, report)
    assert report.counts.model_overflow_resets == 0 and report.counts.not_judged == 0
    assert report.warnings == [], report.format()


@FEW
@given(vtd_streams(max_steps=60))
def test_guard_does_not_fire_while_the_models_fit(stream: Stream) -> None:
    """The models never hold more maps than the simulated QEMU's checked entries:
    with that many as the limit the guard never fires."""
    report = check_lines(stream.lines, max_live_maps=max(stream.peak_maps, 1))
    assert_clean(stream, report)
    assert report.counts.model_overflow_resets == 0, report.format()
    assert report.counts.not_judged == 0 and report.warnings == [], report.format()


@SETTINGS
@given(vtd_streams(max_steps=60), st.integers(1, 8))
def test_guard_firing_is_never_a_divergence(stream: Stream, limit: int) -> None:
    """Hits and translations of entries the guard dropped are counted as not judged."""
    report = check_lines(stream.lines, max_live_maps=limit)
    assert_clean(stream, report)
    c = report.counts
    if stream.peak_maps > limit:
        assert c.model_overflow_resets > 0, report.format()
    if c.model_overflow_resets:
        assert any(f"exceeded {limit} maps" in w for w in report.warnings), report.warnings
    if c.not_judged:
        assert any(w.startswith(f"{c.not_judged} hits/translations were not judged")
                   for w in report.warnings), report.warnings
    else:
        assert not any("not judged" in w for w in report.warnings)


# ---- a faulty QEMU ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", FAULTS)
@FEW
@given(data=st.data())
def test_each_fault_is_reported_first_at_its_line(fault: str, data: st.DataObject) -> None:
    stream = build_stream(data.draw, fault=fault)
    report = check_lines(stream.lines)
    if stream.expected is None:  # the scenario found no way to show it
        assert report.ok, report.format()
        return
    assert_expected(stream, report)


@pytest.mark.parametrize("fault", GUARD_SAFE_FAULTS)
@FEW
@given(data=st.data(), limit=st.integers(1, 6))
def test_faults_after_the_guard_fired_are_still_reported(fault: str, data: st.DataObject,
                                                         limit: int) -> None:
    """Entries added, or invalidated, after the guard fired are judged as usual."""
    stream = build_stream(data.draw, fault=fault, guard_safe=True)
    if stream.expected is None:
        return
    assert_expected(stream, check_lines(stream.lines, max_live_maps=limit))


@FEW
@given(data=st.data())
def test_hit_after_invalidation_is_not_excused_by_an_unrelated_pending_walk(
        data: st.DataObject) -> None:
    """Another walk of the same sid waits for its translate when QEMU hits an entry
    it kept across an invalidation: only a waiting walk of the same slpte and
    domain may excuse a hit the model cannot explain."""
    fault = data.draw(st.sampled_from(FAULTS[:3]))
    stream = build_stream(data.draw, fault=fault, pending=True)
    if stream.expected is None:
        return
    assert_expected(stream, check_lines(stream.lines))


@FEW
@given(data=st.data())
def test_walk_is_checked_against_every_domain_of_its_sid(data: st.DataObject) -> None:
    """QEMU's IOTLB lookup ignores the domain: a walk over an address the model
    still caches for the sid under any domain is a lost invalidation."""
    stream = build_stream(data.draw, fault=UNTRACED_INVALIDATION, cross_domain=True)
    if stream.expected is None:
        return
    assert_expected(stream, check_lines(stream.lines))


# ---- recorded runs -------------------------------------------------------------------

_UPDATE = re.compile(r"vtd_iotlb_page_update .* sid (0x[0-9a-f]+) iova (0x[0-9a-f]+) .* domain (0x[0-9a-f]+)")
_TRANSLATE = re.compile(r"vtd_dmar_translate dev (\w+):(\w+)\.(\w+) iova (0x[0-9a-f]+) -> gpa \S+ mask (0x[0-9a-f]+)")
_INV = re.compile(r"vtd_inv_desc_iotlb_pages .* domain (0x[0-9a-f]+) addr (0x[0-9a-f]+) mask (0x[0-9a-f]+)")
_INV_DOMAIN = re.compile(r"vtd_inv_desc_iotlb_domain .* domain (0x[0-9a-f]+)")


def naive_peak(lines: list[str]) -> int:
    """Most entries a recording's IOTLB held at once, by a naive replay: a dict of
    (sid, domain, page start, page end) filled at each walk's translate (walks are
    not interleaved in these recordings) and emptied by invalidations."""
    live: set[tuple[int, int, int, int]] = set()
    walk: tuple[int, int] | None = None
    peak = 0
    after_cc_global = False
    for text in lines:
        if m := _UPDATE.match(text):
            walk = (int(m.group(1), 16), int(m.group(3), 16))
        elif (m := _TRANSLATE.match(text)) and walk is not None:
            sid, domain = walk
            start, mask = int(m.group(4), 16), int(m.group(5), 16)
            live = {e for e in live if not (e[0] == sid and e[1] == domain
                                            and e[2] <= start | mask and start <= e[3])}
            live.add((sid, domain, start, start | mask))
            peak = max(peak, len(live))
            walk = None
        elif m := _INV.match(text):
            domain, addr, am = (int(x, 16) for x in m.groups())
            first = ((addr >> 12) & ~((1 << am) - 1)) << 12
            last = first + (4096 << am) - 1
            live = {e for e in live if not (e[1] == domain and e[2] <= last and first <= e[3])}
        elif m := _INV_DOMAIN.match(text):
            live = {e for e in live if e[1] != int(m.group(1), 16)}
        elif text.startswith(("vtd_inv_desc_iotlb_global", "vtd_iotlb_reset")) or (
                text.startswith("vtd_context_cache_reset") and not after_cc_global):
            live.clear()
        if text.startswith("vtd_"):
            after_cc_global = text.startswith("vtd_inv_desc_cc_global")
    return peak


@pytest.fixture(scope="module", params=RECORDINGS, ids=lambda p: p.name.split(".")[0])
def recording(request: pytest.FixtureRequest) -> list[str]:
    return lzma.decompress(request.param.read_bytes()).decode().splitlines()


def test_guard_does_not_fire_on_recorded_runs(recording: list[str]) -> None:
    assert RECORDINGS
    default = check_lines(recording)
    assert default.ok and default.counts.model_overflow_resets == 0, default.format()
    peak = naive_peak(recording)
    assert peak > 4
    fit = check_lines(recording, max_live_maps=peak)
    assert fit.ok and fit.counts.model_overflow_resets == 0, fit.format()
    assert fit.counts.not_judged == 0 and fit.warnings == [], fit.format()
    tight = check_lines(recording, max_live_maps=peak - 1)
    assert tight.ok, tight.format()
    assert tight.counts.model_overflow_resets > 0 and tight.counts.not_judged > 0
    assert tight.counts.translations == default.counts.translations


# ---- examples: the guard -------------------------------------------------------------


def trace(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def walk(iova: int, gpa: int, sid: int = 0x10, domain: int = 2, offset: int = 0x40) -> str:
    return (f"vtd_iotlb_page_update IOTLB page update sid {sid:#x} iova {iova + offset:#x} "
            f"slpte {gpa | 3:#x} domain {domain:#x}\n" + translate(iova, gpa, sid))


def hit(iova: int, gpa: int, sid: int = 0x10, domain: int = 2, offset: int = 0x80) -> str:
    return (f"vtd_iotlb_page_hit IOTLB page hit sid {sid:#x} iova {iova + offset:#x} "
            f"slpte {gpa | 3:#x} domain {domain:#x}\n" + translate(iova, gpa, sid))


def translate(iova: int, gpa: int, sid: int = 0x10) -> str:
    return (f"vtd_dmar_translate dev 00:{(sid >> 3) & 0x1F:02x}.{sid & 7:02x} iova {iova:#x} "
            f"-> gpa {gpa:#x} mask 0xfff")


def inv_page(iova: int, domain: int = 2) -> str:
    return f"vtd_inv_desc_iotlb_pages iotlb invalidate domain {domain:#x} addr {iova:#x} mask 0x0"


GUARD = "\n".join([walk(0x1000, 0xA000), walk(0x2000, 0xB000), walk(0x3000, 0xC000)])
"""Three maps with max_live_maps=2: the guard fires at the third walk's translate."""


def test_hits_on_entries_the_guard_dropped_are_not_judged() -> None:
    report = check_lines(trace("\n".join([GUARD, hit(0x1000, 0xA000), hit(0x3000, 0xC000),
                                          hit(0x2000, 0xB000)])), max_live_maps=2)
    c = report.counts
    assert report.ok, report.format()
    assert c.model_overflow_resets == 1 and c.not_judged == 4  # two hits and their translates
    assert c.iotlb_hits == 3 and c.translations == 6
    assert report.warnings == [
        "the models exceeded 2 maps 1 times and were dropped (is vtd_iotlb_reset traced?)",
        ("4 hits/translations were not judged: their entries had been dropped when the "
         "models exceeded 2 maps"),
    ]


def test_entries_walked_after_the_guard_fired_are_judged() -> None:
    # 0x3000 was walked by the walk that fired the guard; 0x4000 after it.
    text = GUARD + "\n" + walk(0x4000, 0xD000) + "\n" + inv_page(0x4000) + "\n" + inv_page(0x3000)
    report = check_lines(trace(text + "\n" + hit(0x4000, 0xD000) + "\n" + hit(0x3000, 0xC000)),
                         max_live_maps=3)
    # Each hit, then its translate (which finds no entry either).
    assert [d.kind for d in report.divergences] == [
        "hit-after-invalidation", "translation-without-entry"] * 2, report.format()
    assert report.counts.model_overflow_resets == 1 and report.counts.not_judged == 0
    report = check_lines(trace(GUARD + "\n" + translate(0x3000, 0xC001000)), max_live_maps=2)
    assert [d.kind for d in report.divergences] == ["wrong-translation"], report.format()


def test_dropped_entry_invalidated_after_the_guard_is_judged_again() -> None:
    text = GUARD + "\n" + inv_page(0x1000) + "\n" + hit(0x1000, 0xA000) + "\n" + hit(0x2000, 0xB000)
    report = check_lines(trace(text), max_live_maps=2)
    assert [(d.kind, d.lineno) for d in report.divergences] == [
        ("hit-after-invalidation", 8), ("translation-without-entry", 9)], report.format()
    assert report.counts.not_judged == 2  # the other hit and its translate


@pytest.mark.parametrize("flush", [
    "vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x2",
    "vtd_inv_desc_iotlb_global iotlb invalidate global",
])
def test_a_wider_invalidation_after_the_guard_makes_everything_judged(flush: str) -> None:
    # With max_live_maps=1 the second firing forgets the ghosts of the first.
    text = GUARD + "\n" + flush + "\n" + hit(0x2000, 0xB000)
    report = check_lines(trace(text), max_live_maps=1)
    assert [d.kind for d in report.divergences][:1] == ["hit-after-invalidation"], report.format()
    report = check_lines(trace(GUARD + "\n" + hit(0x2000, 0xB000)), max_live_maps=1)
    assert report.ok and report.counts.not_judged == 2, report.format()


def test_lost_ghosts_still_judge_pages_invalidated_since() -> None:
    text = GUARD + "\n" + inv_page(0x1000) + "\n" + hit(0x1000, 0xA000)
    report = check_lines(trace(text), max_live_maps=1)
    assert report.counts.model_overflow_resets == 2
    assert [d.kind for d in report.divergences][:1] == ["hit-after-invalidation"], report.format()
    other_domain = GUARD + "\n" + inv_page(0x1000, domain=3) + "\n" + hit(0x1000, 0xA000)
    assert check_lines(trace(other_domain), max_live_maps=1).ok


# ---- examples: concurrent translations (bugs found with the simulation) ---------------


def test_translates_of_one_sid_may_come_out_of_order() -> None:
    """Thread A walks 0x1000; thread B hits 0x2000 and prints its translate first."""
    text = "\n".join([
        walk(0x2000, 0xB000),
        "vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1000 slpte 0xa003 domain 0x2",
        hit(0x2000, 0xB000),
        translate(0x1000, 0xA000),
        hit(0x1000, 0xA000),
    ])
    report = check_lines(trace(text))
    assert report.ok, report.format()
    assert report.counts.walks_without_translate == 0


def test_invalidation_between_a_walk_and_its_translate_removes_the_entry() -> None:
    """QEMU inserted the walked entry before another thread's invalidation removed it:
    the next access walks again, which is no lost invalidation."""
    text = "\n".join([
        "vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1000 slpte 0xa003 domain 0x2",
        inv_page(0x1000),
        translate(0x1000, 0xA000),
        walk(0x1000, 0xE000),
    ])
    report = check_lines(trace(text))
    assert report.ok, report.format()
    # The translate is still judged, against the walk.
    bad = check_lines(trace(text.replace(translate(0x1000, 0xA000), translate(0x1000, 0xF000))))
    assert [(d.kind, d.lineno) for d in bad.divergences] == [("wrong-translation", 3)], bad.format()


def test_a_hit_on_a_walk_invalidated_before_its_translate_is_not_excused() -> None:
    text = "\n".join([
        "vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1000 slpte 0xa003 domain 0x2",
        inv_page(0x1000),
        hit(0x1000, 0xA000),
        translate(0x1000, 0xA000),
    ])
    report = check_lines(trace(text))
    assert [(d.kind, d.lineno) for d in report.divergences][:1] == [("hit-after-invalidation", 3)]


def test_size_limit_reset_removes_other_threads_walks() -> None:
    """vtd_update_iotlb traces the walk, resets, then inserts that walk only: another
    thread's walk still waiting for its translate was inserted before the reset."""
    text = "\n".join([
        "vtd_iotlb_page_update IOTLB page update sid 0x18 iova 0x5000 slpte 0xc003 domain 0x2",
        "vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1000 slpte 0xa003 domain 0x2",
        "vtd_iotlb_reset IOTLB reset (reason: iotlb exceeds size limit)",
        translate(0x1000, 0xA000),
        translate(0x5000, 0xC000, sid=0x18),
        hit(0x1000, 0xA000),
        walk(0x5000, 0xC000, sid=0x18),
    ])
    report = check_lines(trace(text))
    assert report.ok, report.format()


def test_hit_whose_entry_is_invalidated_before_its_translate() -> None:
    text = "\n".join([
        walk(0x1000, 0xA000),
        "vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x1040 slpte 0xa003 domain 0x2",
        inv_page(0x1000),
        translate(0x1000, 0xA000),
    ])
    assert check_lines(trace(text)).ok
    lines = trace(text)
    lines[-1] = translate(0x1000, 0xF000)
    bad = check_lines(lines)
    assert [(d.kind, d.lineno) for d in bad.divergences] == [("wrong-translation", 5)], bad.format()
    assert [role for role, _ in bad.divergences[0].related] == ["entry hit"]


def test_qemu_size_limit_reset_with_a_walk_in_flight() -> None:
    """A correct QEMU filling its 1024-entry IOTLB while another thread's walk waits."""
    guest = Guest()
    qemu = SimQemu(guest)
    domain = guest.context[SIDS[0]]
    for i in range(VTD_IOTLB_MAX_SIZE + 8):
        guest.pt4k[domain][0x80000 + i] = (guest.alloc(4096), 3, 0)
    qemu.access(SIDS[0], 0x80000000 + 8 * 4096, write=False, thread=1, defer=True)
    for i in range(VTD_IOTLB_MAX_SIZE + 8):
        qemu.access(SIDS[0], 0x80000000 + i * 4096 + 0x10, write=True)
    qemu.complete_all()
    for i in range(16):
        qemu.access(SIDS[0], 0x80000000 + i * 4096 + 0x20, write=False)
    assert qemu.iotlb_resets == 1
    report = check_lines(qemu.lines)
    assert report.ok, report.format()
    assert report.counts.resets == 1 and report.counts.iotlb_hits == qemu.counts["iotlb_hits"] > 0


# ---- gaps found by mutation testing (docs/mutation.md) --------------------------------

HUGE_WALK = "\n".join([
    "vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x200040 slpte 0x40000083 domain 0x2",
    "vtd_dmar_translate dev 00:02.00 iova 0x200000 -> gpa 0x40000000 mask 0x1fffff",
])


@pytest.mark.parametrize(("slpte", "kind"), [
    (0x40005003, "unexpected-miss"),  # the 4 KiB page the live 2 MiB map gives 0x205000
    (0x40006003, "stale-entry"),      # one page off
    (0x40005001, "stale-entry"),      # other permission
    (0x40000083, "unexpected-miss"),  # the same 2 MiB page
])
def test_walk_inside_a_live_larger_map_agrees_only_at_the_same_offset(slpte: int, kind: str) -> None:
    # A byte address (odd: only its page matters).
    text = HUGE_WALK + (f"\nvtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x205011 "
                        f"slpte {slpte:#x} domain 0x2")
    report = check_lines(trace(text))
    assert [(d.kind, d.lineno) for d in report.divergences] == [(kind, 3)], report.format()


def test_nvme_commands_unknown_and_malformed_lines_are_counted_each() -> None:
    lines = [
        "pci_nvme_read cid 1 nsid 1 nlb 8 count 4096 lba 0x0",
        "pci_nvme_read cid 2 nsid 1 nlb 8 count 4096 lba 0x8",
        "pci_nvme_write cid 3 opname 'write' nsid 1 nlb 8 count 4096 lba 0x10",
        "pci_nvme_write cid 4 opname 'write' nsid 1 nlb 8 count 4096 lba 0x18",
        "pci_nvme_read cid oops",
        "pci_nvme_read cid oops again",
        "pci_nvme_err_invalid_prp ",
        "pci_nvme_err_invalid_opc opc 0x7f",
        *trace(HUGE_WALK),
    ]
    report = check_lines(lines)
    c = report.counts
    assert (c.nvme_commands, c.nvme_reads, c.nvme_writes, c.nvme_errors) == (4, 2, 2, 2)
    assert c.malformed_lines == 2 and report.conclusive, report.format()  # not vtd_*: a warning
    assert report.warnings[0].startswith("2 lines of known non-vtd events"), report.warnings
    bad_vtd = ["vtd_iotlb_page_hit garbage", "vtd_iotlb_page_hit more garbage", *trace(HUGE_WALK)]
    report = check_lines(bad_vtd)
    assert report.counts.malformed_lines == 2 and report.warnings == []
    assert report.inconclusive[0].startswith("2 vtd_* lines could not be parsed (first: line 1:")


@pytest.mark.parametrize("between", ["vtd_reg_write_gcmd whatever", "vtd_dmar_enable maybe"])
def test_an_unknown_vtd_line_between_cc_global_and_cc_reset_makes_it_a_full_reset(
        between: str) -> None:
    text = "\n".join([
        "vtd_inv_desc_cc_global context invalidate globally",
        between,
        "vtd_context_cache_reset ",
        HUGE_WALK,
    ])
    report = check_lines(trace(text))
    c = report.counts
    assert c.resets == 1 and c.unknown_lines + c.malformed_lines == 1, report.format()


# ---- the IOTLB model's argument errors (gaps found by mutation testing) ----------------


def test_iotlb_argument_errors_name_argument_value_and_reason() -> None:
    import enum

    from harness.models.iotlb import IOTLB, U32_MAX, U64_MAX, InvalidRange

    class Big(enum.IntEnum):
        TOP = U64_MAX
        PERM = U32_MAX
        ZERO = 0
        ONE = 1

    iotlb = IOTLB()
    iotlb.add_range(0, Big.TOP, 0, Big.PERM)  # int subclasses at the limits are fine
    assert iotlb.translate(Big.TOP, 1) == U64_MAX
    cases = [
        (lambda: iotlb.add_range("0", 1, 0, 1), "start", "0", "must be an int, not str"),
        (lambda: iotlb.add_range(-1, 1, 0, 1), "start", -1, "must not be negative"),
        (lambda: iotlb.add_range(0, 1, U64_MAX + 1, 1), "addr", U64_MAX + 1,
         f"does not fit in [0, {U64_MAX:#x}]"),
        (lambda: iotlb.add_range(0, 1, 0, U32_MAX + 1), "perm", U32_MAX + 1,
         f"does not fit in [0, {U32_MAX:#x}]"),
        (lambda: iotlb.translate(0, 0), "access", 0,
         "must be VHOST_MAP_RO (1), VHOST_MAP_WO (2) or VHOST_MAP_RW (3)"),
        (lambda: iotlb.translate(0, True), "access", True,
         "must be VHOST_MAP_RO (1), VHOST_MAP_WO (2) or VHOST_MAP_RW (3)"),
    ]
    for call, argument, value, reason in cases:
        with pytest.raises(InvalidRange) as info:
            call()
        err = info.value
        assert (err.argument, err.value, err.reason) == (argument, value, reason)
        assert err.args == (argument, value, reason)
        shown = hex(value) if type(value) is int else repr(value)
        assert str(err) == f"invalid {argument}={shown}: {reason}"
    # The slow path (int subclasses) accepts the lower limits too.
    IOTLB().add_range(Big.ZERO, Big.ZERO, Big.ZERO, Big.ZERO)
    assert iotlb.translate(Big.ZERO, Big.ONE) == 0


def test_iotlb_iteration_notices_a_reset() -> None:
    from harness.models.iotlb import IOTLB, IOTLBError

    for maps in (1, 3):  # one map: the version a reset must change is 1
        iotlb = IOTLB()
        for step in range(maps):
            iotlb.add_range(0x1000 * step, 0x1000 * step + 0xFFF, 0, 1)
        it = iter(iotlb)
        next(it)
        iotlb.reset()
        with pytest.raises((RuntimeError, IOTLBError)):
            next(it)


def test_guard_firing_again_after_its_ghosts_were_invalidated_keeps_new_ghosts() -> None:
    text = "\n".join([
        GUARD,  # fires at 0x3000: ghosts 0x1000 and 0x2000
        inv_page(0x1000), inv_page(0x2000),  # no ghost left
        walk(0x4000, 0xD000), walk(0x5000, 0xE000),  # fires again: ghosts 0x3000, 0x4000
        hit(0x3000, 0xC000),  # a ghost: not judged
        hit(0x1000, 0xA000),  # invalidated before the second firing: judged
    ])
    report = check_lines(trace(text), max_live_maps=2)
    assert report.counts.model_overflow_resets == 2
    assert report.counts.not_judged == 2, report.format()
    assert [(d.kind, d.lineno) for d in report.divergences] == [
        ("hit-after-invalidation", 15), ("translation-without-entry", 16)], report.format()


@pytest.mark.parametrize("offset", [0, 0xFFF])
def test_lost_ghosts_judge_an_invalidated_page_to_its_first_and_last_byte(offset: int) -> None:
    text = GUARD + "\n" + inv_page(0x1000) + "\n" + hit(0x1000, 0xA000, offset=offset)
    report = check_lines(trace(text), max_live_maps=1)
    assert [d.kind for d in report.divergences][:1] == ["hit-after-invalidation"], report.format()


@pytest.mark.parametrize("offset", [0, 0xFFF])
def test_a_walk_invalidated_before_its_translate_excuses_no_hit_to_its_last_byte(
        offset: int) -> None:
    text = "\n".join([
        update(0x9000, 0xF000, domain=3),  # another domain: untouched by the invalidation
        update(0x8000, 0xE000),
        update(0x1000, 0xA000),
        inv_page(0x1000),
        hit(0x9000, 0xF000, domain=3),  # lines 5-6: excused
        hit(0x8000, 0xE000),  # lines 7-8: the other waiting walk's entry: excused
        hit(0x1000, 0xA000, offset=offset),  # lines 9-10: the invalidated walk's: not excused
    ])
    report = check_lines(trace(text))
    assert [(d.kind, d.lineno) for d in report.divergences] == [("hit-after-invalidation", 9)], (
        report.format())


def update(iova: int, gpa: int, sid: int = 0x10, domain: int = 2) -> str:
    """A walk whose translate is printed later (another thread's lines in between)."""
    return (f"vtd_iotlb_page_update IOTLB page update sid {sid:#x} iova {iova:#x} "
            f"slpte {gpa | 3:#x} domain {domain:#x}")


def test_domain_invalidation_after_the_guard_drops_that_domains_ghosts() -> None:
    flush = "vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x2"
    report = check_lines(trace(GUARD + "\n" + flush + "\n" + hit(0x1000, 0xA000)), max_live_maps=2)
    assert [d.kind for d in report.divergences][:1] == ["hit-after-invalidation"], report.format()
    assert report.counts.not_judged == 0
    other = GUARD + "\n" + flush.replace("0x2", "0x3") + "\n" + hit(0x1000, 0xA000)
    report = check_lines(trace(other), max_live_maps=2)
    assert report.ok and report.counts.not_judged == 2, report.format()


def test_domain_invalidation_after_lost_ghosts_outlives_the_invalidation_history() -> None:
    text = "\n".join([GUARD, "vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x2",
                      inv_page(0x9000), hit(0x2000, 0xB000)])
    report = check_lines(trace(text), max_live_maps=1, history=1)
    assert [d.kind for d in report.divergences][:1] == ["hit-after-invalidation"], report.format()


def test_domain_invalidation_counts_the_maps_it_drops() -> None:
    text = "\n".join([
        walk(0x5000, 0x15000, domain=3), walk(0x6000, 0x16000, domain=3),
        walk(0x1000, 0x11000), walk(0x1000, 0x11000, sid=0x18),
        "vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x2",  # 2 maps left
        walk(0x7000, 0x17000, domain=3), walk(0x8000, 0x18000, domain=3),  # 4: fits
    ])
    report = check_lines(trace(text), max_live_maps=4)
    assert report.ok and report.counts.model_overflow_resets == 0, report.format()
    report = check_lines(trace(text + "\n" + walk(0x9000, 0x19000, domain=3)), max_live_maps=4)
    assert report.ok and report.counts.model_overflow_resets == 1, report.format()  # 5 > 4


def test_pasid_invalidations_act_on_the_domain_and_are_counted_apart() -> None:
    text = "\n".join([
        walk(0x1000, 0xA000), walk(0x2000, 0xB000),
        "vtd_inv_desc_iotlb_pasid_pages iotlb invalidate domain 0x2 addr 0x1000 mask 0x0 pasid 0x1",
        "vtd_inv_desc_iotlb_pasid_pages iotlb invalidate domain 0x2 addr 0x1000 mask 0x0 pasid 0x1",
        walk(0x1000, 0xA000),
        "vtd_inv_desc_iotlb_pasid iotlb invalidate domain 0x2 pasid 0x1",
        "vtd_inv_desc_iotlb_pasid iotlb invalidate domain 0x2 pasid 0x1",
        walk(0x2000, 0xB000),
    ])
    report = check_lines(trace(text))
    c = report.counts
    assert report.ok, report.format()
    assert (c.invalidations, c.inv_pasid, c.inv_pages, c.inv_domain) == (4, 4, 0, 0)


def test_invalidating_address_zero_voids_only_waiting_walks_of_that_page() -> None:
    text = "\n".join([update(0x5000, 0xE000), inv_page(0x0), translate(0x5000, 0xE000),
                      hit(0x5000, 0xE000)])
    report = check_lines(trace(text))
    assert report.ok, report.format()


@pytest.mark.parametrize("flush", [
    "vtd_inv_desc_iotlb_global iotlb invalidate global",
    "vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x2",
])
def test_a_wide_invalidation_voids_every_waiting_walk(flush: str) -> None:
    text = "\n".join([
        update(0x5000, 0xE000, domain=3), update(0x1000, 0xA000), update(0x2000, 0xB000),
        flush,
        translate(0x5000, 0xE000), translate(0x1000, 0xA000), translate(0x2000, 0xB000),
        walk(0x1000, 0xA000), walk(0x2000, 0xB000),  # QEMU walks again: no lost invalidation
    ])
    report = check_lines(trace(text))
    assert report.ok, report.format()


def test_page_invalidation_after_a_wide_one_still_voids_later_waiting_walks() -> None:
    text = "\n".join([
        update(0x5000, 0xE000),
        "vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x2",  # voids 0x5000
        update(0x1000, 0xA000),
        inv_page(0x1000),  # voids 0x1000 too
        translate(0x5000, 0xE000), translate(0x1000, 0xA000),
        walk(0x1000, 0xA000), walk(0x5000, 0xE000),
    ])
    report = check_lines(trace(text))
    assert report.ok, report.format()


def test_many_page_invalidations_during_a_walk_are_summarised() -> None:
    invalidations = [inv_page(0x100000 + 0x1000 * i) for i in range(20)]
    text = "\n".join([update(0x1000, 0xA000), *invalidations, translate(0x1000, 0xA000),
                      hit(0x1000, 0xA000)])
    report = check_lines(trace(text))
    assert report.ok, report.format()
    covered = "\n".join([update(0x108000, 0xA000), *invalidations, translate(0x108000, 0xA000),
                         walk(0x108000, 0xA000)])
    assert check_lines(trace(covered)).ok


def test_global_invalidation_after_the_guard_lets_the_next_firing_keep_ghosts() -> None:
    text = "\n".join([
        GUARD,  # fires: ghosts 0x1000, 0x2000
        "vtd_inv_desc_iotlb_global iotlb invalidate global",  # nothing left, exact again
        walk(0x4000, 0xD000), walk(0x5000, 0xE000), walk(0x6000, 0xF000),  # fires again
        hit(0x4000, 0xD000),  # a ghost of the second firing: not judged
        hit(0x1000, 0xA000),  # invalidated by the global invalidation: judged
    ])
    report = check_lines(trace(text), max_live_maps=2)
    assert report.counts.model_overflow_resets == 2 and report.counts.not_judged == 2
    assert [d.kind for d in report.divergences][:1] == ["hit-after-invalidation"], report.format()


def test_a_translate_whose_hit_line_is_lost_uses_the_sids_last_domain() -> None:
    text = "\n".join([walk(0x1000, 0xA000, domain=3), hit(0x1000, 0xA000, domain=3),
                      translate(0x1000, 0xA000)])
    report = check_lines(trace(text))
    assert report.ok, report.format()


def test_a_hit_on_a_page_never_walked_says_so() -> None:
    report = check_lines(trace(hit(0x1000, 0xA000)))
    first = report.divergences[0]
    assert first.kind == "hit-after-invalidation" and first.related == []
    assert first.message == (
        "sid 0x0010 (00:02.0) domain 0x2 iova 0x1080: QEMU's IOTLB hit (gpa 0xa000 rw) but "
        "the model holds no live entry; no invalidation of it recorded (never walked in this "
        "trace?)")


def test_a_page_invalidation_voids_waiting_walks_of_its_domain_only() -> None:
    text = "\n".join([update(0x1000, 0xA000, domain=3), inv_page(0x1000, domain=2),
                      translate(0x1000, 0xA000), hit(0x1000, 0xA000, domain=3)])
    report = check_lines(trace(text))
    assert report.ok, report.format()


def test_a_domain_invalidation_keeps_the_sids_models_of_other_domains() -> None:
    text = "\n".join([
        walk(0x5000, 0xE000, domain=3), walk(0x1000, 0xA000),
        "vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x2",
        update(0x5000, 0xE000, domain=2),  # line 6: 0x5000 is still cached under domain 3
        translate(0x5000, 0xE000),
    ])
    report = check_lines(trace(text))
    assert [(d.kind, d.lineno, d.domain) for d in report.divergences] == [
        ("unexpected-miss", 6, 3)], report.format()
