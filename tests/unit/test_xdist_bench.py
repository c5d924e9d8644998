"""``python -m harness bench xdist`` (harness.bench.xdist): counts from the JUnit XML,
the judgement (target, failed runs, different selections) and a real invocation on
a tiny test file (no VM)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.bench.xdist import TARGET, Counts, PytestRun, judge, pytest_argv, read_counts

XML = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2"
skipped="3" tests="20" time="12.5"><testcase classname="a" name="b" time="1"/></testsuite></testsuites>"""


def test_counts_are_read_from_the_junit_xml() -> None:
    c = read_counts(XML)
    assert c == Counts(tests=20, failed=2, errors=1, skipped=3) and c.passed == 14
    assert c.format() == "14 passed, 2 failed, 1 errors, 3 skipped"
    assert read_counts('<testsuite tests="4" failures="0" errors="0" skipped="0"/>').passed == 4


@pytest.mark.parametrize("text", ["", "<testsuites/>", '<testsuite tests="x"/>', "not xml"])
def test_unreadable_junit_xml_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        read_counts(text)


def _run(workers: int, seconds: float, *, returncode: int = 0, tests: int = 10) -> PytestRun:
    argv = ("python", "-m", "pytest", "-n", str(workers)) + (("--dist", "loadfile") if workers else ())
    return PytestRun(workers, argv, seconds, returncode, Counts(tests, 0, 0, 0), "load 1", "load 2")


def test_judge_compares_wall_times_against_the_target() -> None:
    ok, lines = judge(_run(0, 100.0), _run(2, 55.0))
    assert ok and lines[0] == "speed-up: 1.82x (100.0 s / 55.0 s)"
    assert lines[1] == f"target: speed-up >= {TARGET:g}x with 2 workers: met"
    ok, lines = judge(_run(0, 100.0), _run(2, 70.0))
    assert not ok and lines[1].endswith("NOT met")
    assert judge(_run(0, 160.0), _run(2, 100.0))[0]  # exactly the target


def test_judge_refuses_a_failed_run_or_a_different_selection() -> None:
    ok, lines = judge(_run(0, 100.0, returncode=1), _run(2, 50.0))
    assert not ok and "invalid: the -n 0 run did not pass (pytest exit 1)" in lines
    ok, lines = judge(_run(0, 100.0), _run(2, 50.0, tests=9))
    assert not ok and "invalid: the runs ran different numbers of tests (10 vs 9)" in lines
    ok, lines = judge(_run(0, 100.0), PytestRun(2, (), 50.0, 0, None, "", ""))
    assert not ok and "invalid: a run wrote no readable JUnit XML" in lines


def test_both_runs_get_the_same_selection(tmp_path: Path) -> None:
    serial = pytest_argv(0, "loadfile", tmp_path / "a.xml", ["tests/vm/test_lifecycle.py", "-k", "panic"])
    parallel = pytest_argv(2, "loadfile", tmp_path / "b.xml", ["tests/vm/test_lifecycle.py", "-k", "panic"])
    assert serial[-3:] == parallel[-3:] == ["tests/vm/test_lifecycle.py", "-k", "panic"]
    assert "--dist" not in serial and parallel[parallel.index("--dist") + 1] == "loadfile"
    assert pytest_argv(2, "load", tmp_path / "c.xml", [])[-1] == "tests/vm"


TINY = """
    import time
    import pytest

    @pytest.mark.parametrize("n", range(4))
    def test_sleep(n):
        time.sleep(1.0)
        assert {fail}
"""


def test_the_command_runs_the_selection_serially_then_in_parallel(tmp_path: Path) -> None:
    """One real invocation on four 1-second tests, one of which fails: both runs are
    reported with their counts, and a failing run makes the comparison invalid."""
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent(TINY.format(fail="n != 3")))
    proc = subprocess.run([sys.executable, "-m", "harness", "bench", "xdist", "--no-warm-up", "--",
                           "test_tiny.py", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    out = proc.stdout
    assert proc.returncode == 1, (out, proc.stderr)
    assert "pytest-xdist speed-up of: test_tiny.py -q" in out
    assert re.search(r"^-n 0: [\d.]+ s wall, 3 passed, 1 failed, 0 errors, 0 skipped, pytest exit 1; "
                     r"host load [\d.]+ [\d.]+ [\d.]+ on \d+ CPUs before, load .* after$", out, re.M), out
    assert re.search(r"^-n 2 --dist loadfile: [\d.]+ s wall, 3 passed, 1 failed", out, re.M), out
    speed = re.search(r"^speed-up: ([\d.]+)x", out, re.M)
    assert speed is not None, out
    met = float(speed.group(1)) >= TARGET
    assert f"with 2 workers: {'met' if met else 'NOT met'}" in out
    assert "invalid: the -n 0 run did not pass (pytest exit 1)" in out
    assert "invalid: the -n 2 --dist loadfile run did not pass (pytest exit 1)" in out
    assert not list(tmp_path.glob("*.xml"))  # the JUnit files lived in a temporary folder
