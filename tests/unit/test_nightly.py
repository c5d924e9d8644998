"""``python -m harness images key`` and ``python -m harness nightly-history``: the recipe
keys a CI cache is keyed by, and the history of verdict counts that shows a
regression as a change (harness/nightly.py); and the nightly workflows that use them
(.github/workflows/nightly.yml, .gitlab-ci.yml: their matrix, each entry's image cache
key, the entry kernel's build step run with a stand-in Python, their timeouts)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
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


# --- the nightly workflows (.github/workflows/nightly.yml, .gitlab-ci.yml) ---------------------

GITHUB = ROOT / ".github" / "workflows" / "nightly.yml"
GITLAB = ROOT / ".gitlab-ci.yml"


def matrix_entries(text: str, name: str) -> list[str]:
    """The values of the matrix line ``name: ["a", "b"]`` of a workflow."""
    found = re.findall(rf"^\s*(?:- )?{name}: (\[.*\])\s*$", text, re.MULTILINE)
    assert len(found) == 1, (name, found)
    values = json.loads(found[0])
    assert isinstance(values, list) and all(isinstance(v, str) for v in values)
    return values


def step_script(text: str, name: str) -> str:
    """The ``run: |`` block of the GitHub workflow step called ``name``, dedented."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == f"- name: {name}")
    run = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "run: |")
    indent = len(lines[run]) - len(lines[run].lstrip())
    body: list[str] = []
    for ln in lines[run + 1:]:
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            break
        body.append(ln)
    return textwrap.dedent("\n".join(body)) + "\n"


def run_step(script: str, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a workflow shell step in ``folder``, ``.venv/bin/python`` being this Python."""
    script = script.replace(".venv/bin/python", shlex.quote(sys.executable))
    return subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=folder, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_the_matrices_name_the_kernel_and_qemu_versions_the_harness_builds() -> None:
    from harness.images.kernel import KERNEL_SOURCES
    from harness.images.qemu import QEMU_VERSIONS
    github, gitlab = GITHUB.read_text(), GITLAB.read_text()
    kernels, qemus = matrix_entries(github, "kernel"), matrix_entries(github, "qemu")
    assert kernels == ["default", "7.2"] and qemus == ["default", "10.0"]
    assert set(kernels) - {"default"} <= set(KERNEL_SOURCES) and set(qemus) - {"default"} <= set(QEMU_VERSIONS)
    assert (matrix_entries(gitlab, "KERNEL"), matrix_entries(gitlab, "QEMU")) == (kernels, qemus)


@pytest.mark.parametrize("kernel, has_own", [("default", False), ("7.2", True), ("/srv/bzImage", False)])
def test_each_kernel_entry_has_its_own_image_cache_key(tmp_path: Path, kernel: str, has_own: bool) -> None:
    """The recipe keys the Actions cache of the entry's images is keyed by: the 7.2 entries'
    name Linux 7.2's recipe key too, so their cache (which holds it) is not the default's."""
    text = GITHUB.read_text()
    assert "key: dma-images-${{ hashFiles('entry-keys.txt') }}" in text
    env = {"GITHUB_ENV": str(tmp_path / "github-env"), "GITHUB_WORKSPACE": str(tmp_path),
           "QEMU_ENTRY": "default", "KERNEL_ENTRY": kernel}
    proc = run_step(step_script(text, "Cache folder, entry name and recipe keys"), tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    keys = dict(ln.split() for ln in (tmp_path / "entry-keys.txt").read_text().splitlines())
    from harness.images.qemu import qemu_key
    expected = {"kernel": recipe_key(), "xen": xen_key(), "qemu-10.0": qemu_key("10.0")}
    if has_own:
        expected[f"kernel-{kernel}"] = recipe_key(version=kernel)
    assert keys == expected
    assert f"ENTRY_SLUG=qemu-default-kernel-{kernel.replace('/', '_')}" in (tmp_path / "github-env").read_text()


FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "{log}"
"""


@pytest.mark.parametrize("kernel, built", [("7.2", True), ("/srv/bzImage", False)])
def test_the_entry_kernel_is_built_when_it_is_a_version(tmp_path: Path, kernel: str, built: bool) -> None:
    github, gitlab = GITHUB.read_text(), GITLAB.read_text()
    assert "if: ${{ matrix.kernel != 'default' }}" in github.split("- name: Build or reuse the entry's kernel")[1] \
        .split("- name:")[0]
    keys = run_cli("images", "key").stdout
    (tmp_path / "image-keys.txt").write_text(keys)
    (tmp_path / "entry-keys.txt").write_text("".join(ln + "\n" for ln in keys.splitlines()
                                                      if ln.split()[0] in ("kernel", f"kernel-{kernel}")))
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON.format(log=tmp_path / "calls"))
    fake.chmod(0o755)
    github_step = step_script(github, "Build or reuse the entry's kernel").replace(".venv/bin/python", str(fake))
    gitlab_line = next(ln.strip()[2:] for ln in gitlab.splitlines() if "images build kernel" in ln)
    for script, env in ((github_step, {"KERNEL_ENTRY": kernel}), (gitlab_line.replace(".venv/bin/python", str(fake)),
                                                                  {"KERNEL": kernel})):
        (tmp_path / "calls").unlink(missing_ok=True)
        proc = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr
        calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
        assert calls == ([f"-m harness images build kernel --version {kernel}"] if built else []), script


def test_the_timeouts_allow_a_cold_kernel_7_2_build() -> None:
    """Linux 7.2's cold build took 52 minutes on 2 loaded cores; the default entries had 150."""
    github, gitlab = GITHUB.read_text(), GITLAB.read_text()
    m = re.search(r"timeout-minutes: \$\{\{ matrix\.kernel == 'default' && ([0-9]+) \|\| ([0-9]+) \}\}", github)
    assert m is not None
    default, other = int(m[1]), int(m[2])
    assert default >= 150 and other >= default + 60
    m = re.search(r"^  timeout: ([0-9]+)m$", gitlab, re.MULTILINE)
    assert m is not None and int(m[1]) >= other
    assert "- key: dma-images-$KERNEL\n" in gitlab  # a default entry's cache must not replace the 7.2 entries'


def test_actionlint_accepts_the_github_workflow() -> None:
    tool = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(tool).is_file():
        pytest.skip("actionlint is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([tool, str(GITHUB)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
