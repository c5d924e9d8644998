"""The ioas checker on a recorded run of configs/iommufd-vfio-nvme.toml (QEMU 7.2,
the project's 6.12 guest: a userspace NVMe driver over VFIO + iommufd) and on
planted corruptions of it: each corruption must be caught, named with its kind
and with the record or trace line that proves it."""

from __future__ import annotations

import copy
import json
import lzma
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.checks import ioas
from harness.checks.verdict import CheckReport
from harness.finish import RunEvidence, check_evidence
from harness.trace.parser import parse_lines

RUN = Path(__file__).resolve().parent.parent / "data" / "iommufd-vfio-nvme-run"
OTHER_RUN = Path(__file__).resolve().parent.parent / "data" / "intel-iommu-nvme-run"
ASSIGNED = "dev 00:02.00"


@pytest.fixture(scope="module")
def trace_lines() -> list[str]:
    return lzma.decompress((RUN / "trace.log.xz").read_bytes()).decode().splitlines()


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((RUN / "records.json").read_text())
    return data


def run(records: list[dict[str, Any]], lines: list[str]) -> CheckReport:
    return ioas.check_ioas(records, parse_lines(lines), max_divergences=50)


def kinds(report: CheckReport) -> dict[str, int]:
    return dict(report.divergences_by_kind)


def index(lines: list[str], pattern: str, start: int = 0) -> int:
    """Index of the first line at or after ``start`` matching ``pattern``."""
    rx = re.compile(pattern)
    for i in range(start, len(lines)):
        if rx.search(lines[i]):
            return i
    raise AssertionError(f"no line matches {pattern!r}")


def find_record(records: list[dict[str, Any]], op: str, pred: Callable[[dict[str, Any]], bool] = lambda r: True) -> int:
    for i, rec in enumerate(records):
        if rec["op"] == op and pred(rec):
            return i
    raise AssertionError(f"no {op} record")


# ---- the recorded run -------------------------------------------------------


def test_recorded_run_is_ok_and_every_count_is_non_zero(records, trace_lines):
    report = run(records, trace_lines)
    assert report.status == "ok", report.format()
    c = report.counts
    assert c.ops_checked >= 19 and c.pins_checked >= 30, report.format()
    assert c.commands == c.commands_matched == 8, report.format()
    assert c.translations_checked == c.translations >= 20 and c.gpas_checked == c.translations_checked
    assert c.faults_checked > 2000 and c.faults_confirmed == 2 and c.kernel_fault_reports == 2
    assert c.skipped_before_session > 0  # the kernel nvme driver's commands on the controller before vfio-pci
    assert c.divergences == 0
    assert any("status 0 (success)" in w for w in report.warnings), report.warnings


def test_the_finish_path_runs_the_ioas_checker_only_for_runs_with_its_ops():
    verdict = check_evidence(RunEvidence.from_folder(RUN))
    report = verdict.report("ioas")
    assert report.ok and report.conclusive, report.format()
    other = check_evidence(RunEvidence.from_folder(OTHER_RUN))
    with pytest.raises(KeyError):
        other.report("ioas")


# ---- planted corruptions: the device ------------------------------------------


def test_a_translation_to_the_wrong_gpa_is_caught(records, trace_lines):
    lines = list(trace_lines)
    i = index(lines, rf"{ASSIGNED} iova 0x200000 -> gpa ")
    lines[i] = re.sub(r"gpa 0x[0-9a-f]+", "gpa 0x12345000", lines[i])
    report = run(records, lines)
    assert kinds(report) == {ioas.WRONG_GPA: 1}, report.format()
    d = report.divergences[0]
    assert d.lineno == i + 1 and d.iova == 0x200000 and d.observed == 0x12345000
    assert d.expected is not None and d.expected != 0x12345000
    assert [role for role, _ in d.related] == ["submitted by", "mapped by"]
    assert "iommufd.map" in d.related[1][1].raw and d.related[1][1].source == "ops"


def test_a_translation_after_the_unmap_is_caught_inside_a_later_command(records, trace_lines):
    lines = list(trace_lines)
    # the write went through iova 0x2000 (PRP2); the guest unmaps it before the last read
    old = lines[index(lines, rf"{ASSIGNED} iova 0x2000 -> gpa ")]
    last = index(lines, r"pci_nvme_io_cmd cid 2055 ")
    lines.insert(last + 1, old)
    report = run(records, lines)
    assert kinds(report) == {ioas.USE_AFTER_UNMAP: 1}, report.format()
    d = report.divergences[0]
    unmap = find_record(records, "iommufd.unmap", lambda r: r["args"]["iova"] == 0x2000)
    assert ("unmapped by", d.related[1][1]) == d.related[1] and d.related[1][1].lineno == unmap + 1


def test_a_translation_after_the_last_completion_is_judged_against_the_later_unmaps(records, trace_lines):
    lines = list(trace_lines)
    # the read buffer (iova 0x3000) is unmapped after the controller is disabled
    old = lines[index(lines, rf"{ASSIGNED} iova 0x3000 -> gpa ")]
    done = index(lines, r"pci_nvme_enqueue_req_completion cid 2055 ")
    cqe = index(lines, rf"{ASSIGNED} iova 0x183000 ", done)
    lines.insert(cqe + 1, old)
    report = run(records, lines)
    assert kinds(report) == {ioas.USE_AFTER_UNMAP: 1}, report.format()
    assert report.counts.after_completion == 1
    # the same line before the CQE was written belongs to the command: the read buffer was mapped then
    lines = list(trace_lines)
    lines.insert(done, old)
    report = run(records, lines)
    assert kinds(report) == {ioas.DMA_OUTSIDE_COMMAND: 1}, report.format()


def test_a_translation_of_a_page_the_command_does_not_name_is_caught(records, trace_lines):
    lines = list(trace_lines)
    ident = lines[index(lines, rf"{ASSIGNED} iova 0x1000 -> gpa ")]
    write = index(lines, r"pci_nvme_io_cmd cid 2052 ")
    lines.insert(write + 1, ident)
    report = run(records, lines)
    assert kinds(report) == {ioas.DMA_OUTSIDE_COMMAND: 1}, report.format()


def test_a_translation_of_an_iova_never_mapped_is_caught(records, trace_lines):
    lines = list(trace_lines)
    write = index(lines, r"pci_nvme_io_cmd cid 2052 ")
    lines.insert(write + 1, f"vtd_dmar_translate {ASSIGNED} iova 0x7000000 -> gpa 0x3f000000 mask 0xfff")
    report = run(records, lines)
    assert kinds(report) == {ioas.TRANSLATION_WITHOUT_AREA: 1}, report.format()


def test_a_fault_on_a_mapped_and_pinned_page_is_caught(records, trace_lines):
    lines = list(trace_lines)
    i = index(lines, r"vtd_dmar_fault sid 0x10 fault 5 addr 0x40000000 ")
    lines[i] = lines[i].replace("addr 0x40000000", "addr 0x200000")
    report = run(records, lines)
    assert kinds(report) == {ioas.FAULT_ON_MAPPED: 1}, report.format()


def test_a_command_the_driver_did_not_submit_is_caught(records, trace_lines):
    lines = list(trace_lines)
    i = index(lines, r"pci_nvme_io_cmd cid 2053 ")
    lines[i] = lines[i].replace("cid 2053", "cid 2099")
    report = run(records, lines)
    assert ioas.COMMAND_MISMATCH in kinds(report), report.format()


def test_faults_without_the_kernel_report_are_not_counted_as_reported(records, trace_lines):
    recs = copy.deepcopy(records)
    for rec in recs:
        if rec["op"] == "nvme_vfio.kernel_log":
            rec["result"]["lines"] = []
    report = run(recs, trace_lines)
    assert report.ok and report.counts.faults_confirmed == 2 and report.counts.kernel_fault_reports == 0


# ---- planted corruptions: the op records -------------------------------------


def test_a_vm_pin_off_by_one_is_caught(records, trace_lines):
    recs = copy.deepcopy(records)
    i = find_record(recs, "vfio.attach_pt")
    recs[i]["result"]["vm_pin"] += 1
    report = run(recs, trace_lines)
    assert kinds(report) == {ioas.VM_PIN: 1}, report.format()
    d = report.divergences[0]
    assert d.line.source == "ops" and d.line.lineno == i + 1 and d.observed == d.expected + 1  # type: ignore[operator]


def test_a_changed_errno_is_caught(records, trace_lines):
    recs = copy.deepcopy(records)
    i = find_record(recs, "iommufd.map")
    recs[i]["result"]["errno"] = 17  # EEXIST where the map succeeded
    report = run(recs, trace_lines)
    assert kinds(report) == {ioas.OP_RESULT: 1}, report.format()
    assert report.divergences[0].line.lineno == i + 1 and "EEXIST" in report.divergences[0].message


def test_a_missing_eexist_of_the_second_kvm_file_add_is_caught(records, trace_lines):
    recs = copy.deepcopy(records)
    i = max(n for n, r in enumerate(recs) if r["op"] == "kvm.set_device_attr")
    assert recs[i]["result"]["errno"] == 17
    recs[i]["result"]["errno"] = 0
    report = run(recs, trace_lines)
    assert kinds(report) == {ioas.OP_RESULT: 1}, report.format()


def test_a_changed_automatic_iova_is_caught(records, trace_lines):
    recs = copy.deepcopy(records)
    i = find_record(recs, "iommufd.map", lambda r: r["args"].get("iova") is None and r["args"]["length"] == 8192)
    recs[i]["result"]["iova"] += 0x1000
    report = run(recs, trace_lines)
    assert report.divergences[0].kind == ioas.OP_RESULT and report.divergences[0].line.lineno == i + 1
    assert report.divergences[0].expected == records[i]["result"]["iova"]


def test_a_changed_devid_is_caught(records, trace_lines):
    recs = copy.deepcopy(records)
    i = find_record(recs, "vfio.bind_iommufd")
    recs[i]["result"]["devid"] = 7
    report = run(recs, trace_lines)
    assert kinds(report) == {ioas.OP_RESULT: 1}, report.format()


# ---- inconclusive ------------------------------------------------------------


def test_no_translation_is_inconclusive(records, trace_lines):
    lines = [ln for ln in trace_lines if ASSIGNED not in ln]
    report = run(records, lines)
    assert not report.conclusive and report.counts.translations_checked == 0
    assert any("QEMU's trace does not show their fetch" in r for r in report.inconclusive), report.inconclusive


def test_records_without_arguments_are_inconclusive(records, trace_lines):
    bare = [{"op": r["op"], **r["result"]} for r in records if isinstance(r.get("result"), dict)]
    report = run(bare, trace_lines)
    assert not report.conclusive and any("arguments" in r for r in report.inconclusive)


def test_applies_only_to_records_with_its_ops(records):
    assert ioas.applies(records)
    assert not ioas.applies([{"op": "nvme.pattern_rw", "args": {}, "result": {}}])
    assert ioas.applies([{"op": "batch", "args": {"calls": [{"op": "iommufd.open"}]},
                          "result": [{"ok": True, "result": {"errno": 0, "fd": 3}}]}])
