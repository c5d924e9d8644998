"""The xen-grant check on a recorded real run (Xen 4.17, PV dom0, configs/xen-grant.toml):
it passes on what really happened, and fails on a wrong model or tampered evidence."""

import copy
import json
from pathlib import Path

import pytest

from harness.checks.grant import GrantChecker, flatten_calls
from harness.finish import RunEvidence, check_evidence
from harness.models.grant_mutants import MUTANTS

DATA = Path(__file__).parent.parent / "data"
RUN = DATA / "xen-grant-run"
RUN_V2 = DATA / "xen-grant-v2-run"  # dom0 with grant_table.version=2
NOT_OBSERVABLE = {"grant-maptrack-lifo": "maptrack handles never leave Xen and dom0's kernel: gntdev keeps them"}


@pytest.fixture(scope="module")
def calls():
    return json.loads((RUN / "records.json").read_text())


@pytest.fixture(scope="module")
def calls_v2():
    return json.loads((RUN_V2 / "records.json").read_text())


def _first(calls, op, pred=lambda c: True):
    for call in calls:
        if call["op"] == op and isinstance(call.get("result"), dict) and pred(call):
            return call
    raise AssertionError(f"no {op} in the recorded run")


def test_the_recorded_run_passes_with_every_count_non_zero(calls):
    report = GrantChecker(calls).finish()
    assert report.status == "ok", report.format()
    c = report.counts
    for name in ("grants", "maps", "mmaps", "ends", "deferred_ends", "deferred_freed", "copy_segments",
                 "data_pages_compared", "xen_entries_compared", "ticks"):
        assert getattr(c, name) > 0, name


def test_the_version_2_run_passes_too(calls_v2):
    report = GrantChecker(calls_v2).finish()
    assert report.status == "ok", report.format()
    v2 = [c for c in calls_v2 if c["op"] == "xen.info"][0]["result"]["grant_version"]
    assert v2 == 2


@pytest.mark.parametrize("folder", [RUN, RUN_V2])
def test_the_finish_path_picks_the_grant_check_from_the_saved_folder(folder):
    verdict = check_evidence(RunEvidence.from_folder(folder))
    assert [r.checker for r in verdict.reports] == ["xen-grant"] and verdict.ok


@pytest.mark.parametrize("name", sorted(set(MUTANTS) - set(NOT_OBSERVABLE)))
def test_every_observable_model_mutant_diverges_on_a_real_run(calls, calls_v2, name):
    factory = MUTANTS[name].factory
    statuses = [GrantChecker(c, table_factory=lambda v: factory(512, v)).finish().status for c in (calls, calls_v2)]
    assert "divergence" in statuses, f"{name} was not caught by the v1 or the v2 run"


@pytest.mark.parametrize("name", sorted(NOT_OBSERVABLE))
def test_a_mutant_of_unobservable_state_is_not_caught(calls, name):
    """Kept honest: the check cannot see maptrack handles, and says so here."""
    factory = MUTANTS[name].factory
    assert GrantChecker(calls, table_factory=lambda v: factory(512, v)).finish().ok


def test_a_ref_number_off_by_one_is_a_ref_divergence(calls):
    bad = copy.deepcopy(calls)
    alloc = _first(bad, "xen.alloc", lambda c: len(c["result"]["refs"]) > 1)
    alloc["result"]["refs"][1] += 1
    report = GrantChecker(bad).finish()
    assert report.divergences_by_kind.get("ref") and report.divergences[0].line.source == "ops"


def test_a_wrong_pin_in_xens_dump_is_an_entry_divergence(calls):
    bad = copy.deepcopy(calls)
    dump = _first(bad, "xen.grant_state", lambda c: c["result"]["domains"].get("0", {}).get("entries"))
    dump["result"]["domains"]["0"]["entries"][0]["pin"] = 0x1
    report = GrantChecker(bad).finish()
    assert report.divergences_by_kind == {"xen-entry": 1}, report.format()


def test_a_missing_pin_in_xens_dump_is_an_entry_divergence(calls):
    bad = copy.deepcopy(calls)
    dump = _first(bad, "xen.grant_state", lambda c: c["result"]["domains"].get("0", {}).get("entries"))
    dump["result"]["domains"]["0"]["entries"].pop()
    assert GrantChecker(bad).finish().divergences_by_kind == {"xen-entry": 1}


def test_data_that_did_not_travel_is_a_data_divergence(calls):
    bad = copy.deepcopy(calls)
    read = _first(bad, "mem.read", lambda c: "data" in c["result"])
    data = bytearray.fromhex(read["result"]["data"])
    data[100] ^= 0xFF
    read["result"]["data"] = data.hex()
    report = GrantChecker(bad).finish()
    assert report.divergences_by_kind == {"data": 1}, report.format()
    assert report.counts.divergences == 1


def test_a_copy_status_that_differs_is_a_copy_divergence(calls):
    bad = copy.deepcopy(calls)
    cp = _first(bad, "xen.copy")
    cp["result"]["status"][2] = 0  # Xen refusing a copy into a read-only grant is what the model says
    assert GrantChecker(bad).finish().divergences_by_kind.get("copy-status") == 1


def test_a_writable_map_of_a_readonly_grant_that_succeeds_is_an_mmap_divergence(calls):
    bad = copy.deepcopy(calls)
    failed = _first(bad, "xen.mmap", lambda c: c["result"]["errno"] != 0 and c["args"].get("writable"))
    failed["result"]["errno"] = 0
    failed["result"]["user_va"] = 0x7F0000000000
    assert GrantChecker(bad).finish().divergences_by_kind.get("mmap-errno") == 1


def test_without_dumps_the_check_is_inconclusive(calls):
    bad = [c for c in calls if c["op"] != "xen.grant_state"]
    report = GrantChecker(bad).finish()
    assert report.status == "inconclusive" and any("Xen grant entry" in r for r in report.inconclusive)


def test_nothing_recorded_is_inconclusive_never_ok():
    report = GrantChecker([]).finish()
    assert report.status == "inconclusive"


def test_a_tick_read_late_is_placed_where_the_evidence_allows(calls):
    """Remove the tick reading right after the ends and the one before the timer wait:
    the tick is then somewhere in a longer window and the check must still place it."""
    flat = [c for _, c in flatten_calls(calls)]
    ticks = [i for i, c in enumerate(flat) if c["op"] == "xen.deferred_ticks"]
    assert len(ticks) > 4
    report = GrantChecker(flat).finish()
    assert report.ok
    thinned = [c for i, c in enumerate(flat) if i not in ticks[1:-1:2]]
    report = GrantChecker(thinned).finish()
    assert report.status == "ok", report.format()
