"""``python -m harness images key`` and ``python -m harness nightly-history``: the recipe
keys a CI cache is keyed by, and the history of verdict counts that shows a
regression as a change (harness/nightly.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_cli_errors import assert_one_line_error
from harness.images.kernel import recipe_key
from harness.images.rootfs import base_key
from harness.images.xen import xen_key
from harness.nightly import (
    TROUBLE_COUNT,
    append_record,
    compare,
    last_record,
    record_from_junit,
    recipe_keys,
    totals_line,
)

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


# --- images key -------------------------------------------------------------------------------

def test_images_key_prints_the_recipe_keys_and_touches_no_cache(tmp_path):
    import os
    cache = tmp_path / "cache"
    env = {**os.environ, "DMA_HARNESS_CACHE": str(cache)}
    proc = run_cli("images", "key", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == [f"kernel {recipe_key()}", f"rootfs {base_key()}", f"xen {xen_key()}"]
    # then one line per other version the harness builds (kernel-7.2, qemu-10.0, ...), each keyed
    kinds = [ln.split()[0] for ln in lines[3:]]
    assert {"qemu-10.0", "kernel-7.2"} <= set(kinds) and len(set(kinds)) == len(kinds)
    as_json = json.loads(run_cli("images", "key", "--json", env=env).stdout)
    assert as_json == {ln.split()[0]: ln.split()[1] for ln in lines}
    assert (as_json["kernel"], as_json["rootfs"], as_json["xen"]) == (recipe_key(), base_key(), xen_key())
    assert not cache.exists()  # nothing built, locked or created


def test_recipe_keys_follow_the_recipes(monkeypatch):
    keys = recipe_keys()
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in keys.values())
    import harness.images.xen as xen
    monkeypatch.setattr(xen, "XEN_PACKAGE", xen.XEN_PACKAGE + "-other")
    changed = recipe_keys()
    assert changed["xen"] != keys["xen"] and changed["kernel"] == keys["kernel"]


# --- records ----------------------------------------------------------------------------------

def case(name: str, props: dict[str, object], outcome: str = "passed", classname: str = "tests.vm.test_x") -> str:
    body = {"passed": "", "failed": "<failure message='boom'>trace</failure>",
            "error": "<error message='teardown'>trace</error>", "skipped": "<skipped message='no qemu'/>"}[outcome]
    properties = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props.items())
    return (f'<testcase classname="{classname}" name="{name}" time="1.0">'
            f'{"<properties>" + properties + "</properties>" if properties else ""}{body}</testcase>')


def junit(*cases: str, timestamp: str = "2026-11-21T03:00:00+00:00") -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" timestamp="{timestamp}">'
            + "".join(cases) + "</testsuite></testsuites>")


def nvme_props(translations: int = 1200, status: str = "ok", unpaired: int = 0,
               qemu: str | None = None) -> dict[str, object]:
    props: dict[str, object] = {"vm0.status": status, "vm0.failures": 0,
                                "vm0.guest-intent.status": status,
                                "vm0.guest-intent.translations_checked": translations,
                                "vm0.guest-intent.translations_by_sid": "00:03.0=1200",
                                "vm0.sync.status": "ok", "vm0.sync.pairs": 40,
                                "vm0.sync.guest_unpaired": unpaired}
    if qemu:
        props["vm0.version.qemu"] = qemu
    return props


def test_record_of_a_junit_file():
    rec = record_from_junit(junit(
        case("test_nvme", {**nvme_props(qemu="7.2.19"), "boot_seconds": 6.5}),
        case("test_fails", {}, "failed"), case("test_teardown", {}, "error"),
        case("test_skip", {}, "skipped", classname="")), labels={"qemu": "default"})
    assert rec["date"] == "2026-11-21T03:00:00+00:00"
    assert rec["labels"] == {"qemu": "default"}
    assert rec["versions"] == {"qemu": ["7.2.19"]}
    assert rec["totals"] == {"tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1, "verdicts_ok": 1,
                             "verdicts_divergence": 0, "verdicts_inconclusive": 0}
    nvme = rec["tests"]["tests.vm.test_x::test_nvme"]
    assert nvme["outcome"] == "passed"
    assert nvme["vms"] == {"vm0": {"status": "ok", "failures": 0, "versions": {"qemu": "7.2.19"}, "checkers": {
        "guest-intent": {"status": "ok", "counts": {"translations_checked": 1200}},
        "sync": {"status": "ok", "counts": {"pairs": 40, "guest_unpaired": 0}}}}}
    assert rec["tests"]["test_skip"]["outcome"] == "skipped"  # no classname: the name alone
    assert rec["tests"]["tests.vm.test_x::test_teardown"]["outcome"] == "error"


def test_a_bare_testsuite_root_and_no_timestamp():
    import datetime as dt
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    rec = record_from_junit('<testsuite name="x">' + case("t", {}) + "</testsuite>", now=now)
    assert rec["date"] == "2026-01-02T03:04:05+00:00" and rec["totals"]["tests"] == 1


# --- compare ----------------------------------------------------------------------------------

def record(*cases: str) -> dict:
    return record_from_junit(junit(*cases))


BASE = record(case("test_nvme", nvme_props()), case("test_ok", {}), case("test_flaky", {}, "failed"))


def test_no_previous_run_is_no_regression():
    changes = compare(None, record(case("test_nvme", nvme_props(status="divergence")), case("t", {}, "failed")))
    assert changes.regressions == [] and changes.notes == []


def test_the_same_run_twice_changes_nothing():
    changes = compare(BASE, record(case("test_nvme", nvme_props()), case("test_ok", {}),
                                   case("test_flaky", {}, "failed")))
    assert changes.regressions == [] and changes.notes == []


def test_verdict_that_diverges_is_a_regression():
    changes = compare(BASE, record(case("test_nvme", nvme_props(status="divergence")), case("test_ok", {}),
                                   case("test_flaky", {}, "failed")))
    assert changes.regressions == ["tests.vm.test_x::test_nvme: vm0 verdict: ok -> divergence",
                                   "tests.vm.test_x::test_nvme: vm0 guest-intent: ok -> divergence"]


def test_inconclusive_to_ok_is_a_note():
    before = record(case("test_nvme", nvme_props(status="inconclusive")))
    changes = compare(before, record(case("test_nvme", nvme_props())))
    assert changes.regressions == []
    assert "tests.vm.test_x::test_nvme: vm0 verdict: inconclusive -> ok" in changes.notes


def test_count_that_drops_to_zero_is_a_regression():
    changes = compare(BASE, record(case("test_nvme", nvme_props(translations=0)), case("test_ok", {}),
                                   case("test_flaky", {}, "failed")))
    assert changes.regressions == [
        "tests.vm.test_x::test_nvme: vm0 guest-intent.translations_checked dropped to zero (was 1200)"]


def test_count_that_only_shrinks_is_no_regression():
    changes = compare(BASE, record(case("test_nvme", nvme_props(translations=5)), case("test_ok", {}),
                                   case("test_flaky", {}, "failed")))
    assert changes.regressions == [] and changes.notes == []


def test_trouble_counts_falling_to_zero_or_rising_are_notes():
    assert TROUBLE_COUNT.search("guest_unpaired") and TROUBLE_COUNT.search("nvme_errors")
    assert not TROUBLE_COUNT.search("translations_checked") and not TROUBLE_COUNT.search("grants")
    before = record(case("test_nvme", nvme_props(unpaired=3)))
    fell = compare(before, record(case("test_nvme", nvme_props(unpaired=0))))
    assert fell.regressions == []
    assert fell.notes == ["tests.vm.test_x::test_nvme: vm0 sync.guest_unpaired dropped to zero (was 3)"]
    rose = compare(record(case("test_nvme", nvme_props())), before)
    assert rose.regressions == []
    assert rose.notes == ["tests.vm.test_x::test_nvme: vm0 sync.guest_unpaired rose from zero to 3"]


def test_new_failures_and_fixes():
    changes = compare(BASE, record(case("test_nvme", nvme_props()), case("test_ok", {}, "error"),
                                   case("test_flaky", {}), case("test_new", {}, "failed"), case("test_new2", {})))
    assert changes.regressions == [
        "tests.vm.test_x::test_new: new failure (failed; not in the previous run)",
        "tests.vm.test_x::test_ok: new failure (passed -> error)"]
    assert changes.notes == ["tests.vm.test_x::test_flaky: failed -> passed",
                             "tests.vm.test_x::test_new2: new test (passed)"]


def test_a_failing_test_that_keeps_failing_is_not_new():
    changes = compare(BASE, record(case("test_nvme", nvme_props()), case("test_ok", {}),
                                   case("test_flaky", {}, "error")))
    assert changes.regressions == [] and changes.notes == ["tests.vm.test_x::test_flaky: failed -> error"]


def test_gone_verdicts_checkers_and_tests():
    props = nvme_props()
    no_sync = {k: v for k, v in props.items() if not k.startswith("vm0.sync.")}
    changes = compare(BASE, record(case("test_nvme", no_sync), case("test_ok", {"vm1.status": "ok"})))
    assert changes.regressions == ["tests.vm.test_x::test_nvme: vm0 checker sync is no longer reported"]
    assert changes.notes == ["tests.vm.test_x::test_ok: vm1 verdict is new (ok)",
                             "tests.vm.test_x::test_flaky: not in this run any more (was failed)"]
    gone = compare(BASE, record(case("test_nvme", {}), case("test_ok", {}), case("test_flaky", {}, "failed")))
    assert gone.regressions == ["tests.vm.test_x::test_nvme: vm0 has no verdict any more (was ok)"]


def test_a_run_without_tests_is_a_regression():
    assert compare(BASE, record()).regressions == ["no test ran (the previous run had 3)"]


def test_versions_and_failures():
    before = record(case("test_nvme", nvme_props(qemu="7.2.19")))
    props = {**nvme_props(qemu="10.0.2"), "vm0.failures": 1}
    changes = compare(before, record(case("test_nvme", props)))
    assert changes.notes == ["version qemu: ['7.2.19'] -> ['10.0.2']"]
    assert changes.regressions == ["tests.vm.test_x::test_nvme: vm0 failures 0 -> 1"]


def test_totals_line_names_what_changed():
    after = record(case("test_nvme", nvme_props()), case("test_ok", {}, "failed"))
    assert totals_line(after, BASE) == ("2 tests (was 3): 1 passed (was 2), 1 failed, 0 errors, 0 skipped; "
                                        "verdicts 1 ok, 0 divergence, 0 inconclusive")
    assert totals_line(after) == "2 tests: 1 passed, 1 failed, 0 errors, 0 skipped; verdicts 1 ok, 0 divergence, " \
                                 "0 inconclusive"


# --- history file -----------------------------------------------------------------------------

def test_history_file_append_and_last(tmp_path):
    history = tmp_path / "sub" / "history.jsonl"
    assert last_record(history) is None
    append_record(history, BASE)
    with history.open("a") as fh:
        fh.write('{"tests": {}, "totals": {}, "date": "x"}')  # no newline at the end
    append_record(history, {**BASE, "date": "last"})
    lines = history.read_text().splitlines()
    assert len(lines) == 3 and history.read_text().endswith("\n")
    rec, lineno = last_record(history)
    assert rec["date"] == "last" and lineno == 3
    append_record(history, {**BASE, "date": "newest"}, keep=2)
    assert [json.loads(ln)["date"] for ln in history.read_text().splitlines()] == ["last", "newest"]
    append_record(history, {**BASE, "date": "more"}, keep=5)
    assert len(history.read_text().splitlines()) == 3


# --- the command ------------------------------------------------------------------------------

def test_nightly_history_command(tmp_path):
    history = tmp_path / "history.jsonl"
    first = tmp_path / "first.xml"
    first.write_text(junit(case("test_nvme", nvme_props()), case("test_ok", {})))
    proc = run_cli("nightly-history", str(first), "--history", str(history), "--label", "qemu=default")
    assert proc.returncode == 0, proc.stderr
    assert "first run in" in proc.stdout and "0 regressions" in proc.stdout
    assert json.loads(history.read_text())["labels"] == {"qemu": "default"}

    same = run_cli("nightly-history", str(first), "--history", str(history))
    assert same.returncode == 0 and "line 1" in same.stdout

    second = tmp_path / "second.xml"
    second.write_text(junit(case("test_nvme", nvme_props(translations=0)), case("test_ok", {}, "failed"),
                            timestamp="2026-11-22T03:00:00+00:00"))
    dry = run_cli("nightly-history", str(second), "--history", str(history), "--dry-run")
    assert dry.returncode == 1 and len(history.read_text().splitlines()) == 2
    proc = run_cli("nightly-history", str(second), "--history", str(history))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "REGRESSION: tests.vm.test_x::test_nvme: vm0 guest-intent.translations_checked dropped to zero " \
           "(was 1200)" in proc.stdout
    assert "REGRESSION: tests.vm.test_x::test_ok: new failure (passed -> failed)" in proc.stdout
    assert "2 regressions" in proc.stdout
    assert len(history.read_text().splitlines()) == 3  # a regression is recorded too: the next run compares to it

    again = run_cli("nightly-history", str(second), "--history", str(history))
    assert again.returncode == 0 and "0 regressions" in again.stdout


@pytest.mark.parametrize("setup, needles", [
    (lambda d: None, ["missing.xml", "does not exist"]),
    (lambda d: (d / "missing.xml").write_text("not <xml"), ["missing.xml", "not XML"]),
    (lambda d: (d / "missing.xml").write_text("<html/>"), ["missing.xml", "root element is <html>"]),
    (lambda d: (d / "missing.xml").write_bytes(b"<testsuite>\xff</testsuite>"), ["missing.xml", "not UTF-8"]),
    (lambda d: (d / "missing.xml").mkdir(), ["missing.xml", "not a regular file"]),
    (lambda d: (d / "missing.xml").write_text("<testsuite><testcase/></testsuite>"), ["testcase 1 has no name"]),
])
def test_bad_junit_is_one_line_exit_2(tmp_path, setup, needles):
    setup(tmp_path)
    history = tmp_path / "h.jsonl"
    proc = run_cli("nightly-history", str(tmp_path / "missing.xml"), "--history", str(history))
    assert_one_line_error(proc, *needles)
    assert not history.exists()


@pytest.mark.parametrize("content, needles", [
    ('{"tests": {}, "totals": {}}\n{"truncated', ["h.jsonl line 2", "cannot read it as JSON"]),
    ("[1, 2]\n", ["h.jsonl line 1", "not a history record"]),
    ('{"tests": [], "totals": {}}\n', ["not a history record"]),
    ('{"tests": {"t": {"vms": {"vm0": 5}}}, "totals": {}}\n', ["not a history record"]),
    ('{"tests": {"t": {"vms": {"vm0": {"checkers": {"sync": {"counts": []}}}}}}, "totals": {}}\n',
     ["not a history record"]),
    (b"\xff\xfe\n", ["not UTF-8"]),
])
def test_bad_history_is_one_line_exit_2_and_untouched(tmp_path, content, needles):
    xml = tmp_path / "j.xml"
    xml.write_text(junit(case("t", {})))
    history = tmp_path / "h.jsonl"
    (history.write_bytes if isinstance(content, bytes) else history.write_text)(content)
    before = history.read_bytes()
    assert_one_line_error(run_cli("nightly-history", str(xml), "--history", str(history)), *needles)
    assert history.read_bytes() == before


def test_bad_label_and_history_folder(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(junit(case("t", {})))
    assert_one_line_error(run_cli("nightly-history", str(xml), "--history", str(tmp_path / "h"), "--label", "x"),
                          "--label 'x' is not NAME=VALUE")
    assert_one_line_error(run_cli("nightly-history", str(xml), "--history", str(tmp_path)), "not a regular file")
    assert_one_line_error(run_cli("nightly-history", str(xml)), "--history")
    assert_one_line_error(run_cli("nightly-history", str(xml), "--history", str(tmp_path / "h"), "--keep", "-1"),
                          "--keep -1 is negative")
