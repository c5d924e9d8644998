"""``python -m harness bench xdist``: the wall-time speed-up of running a test
selection (the VM tests, ``tests/vm``, by default) with pytest-xdist workers.

One invocation runs the same selection twice, one run after the other: first with
``-n 0`` (xdist loaded, tests in the controller process, one VM at a time), then
with ``-n N --dist MODE`` (N worker processes, each booting its own VMs). Each run
writes a JUnit XML into a temporary folder, from which its counts are read. The
report gives both wall times (seconds, ``time.monotonic`` around the pytest
process), both runs' counts (passed, failed, errors, skipped), the speed-up
(serial wall time / parallel wall time), the host load (``/proc/loadavg``) before
and after each run, and the target line (speed-up >= :data:`TARGET`).

Before the timed runs the guest images are built if missing and read once (the
kernel and initrd, so neither run pays for a build or a cold page cache); the
images are the ones the ``DMA_HARNESS_*`` environment selects (pytest options such
as ``--dma-cache`` given as pytest arguments are not seen by the warm-up).

The exit status is 0 when both runs passed (pytest exit 0), ran the same number of
tests, and the target is met; 1 otherwise (the report says which); 2 for bad
input (pytest-xdist missing, fewer than 2 workers).

A figure measured on a host that is busy with other work is not representative:
the report's load lines say how busy it was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.bench.boot import host_load
from harness.errors import HarnessError

TARGET = 1.6
"""Speed-up (serial wall time / parallel wall time) the VM suite must reach with 2
workers on a 2-core host (issue 10)."""
DEFAULT_SELECTION = ("tests/vm",)
DIST_MODES = ("loadfile", "load", "loadscope", "worksteal", "loadgroup")
DEFAULT_DIST = "loadfile"
"""One test file per worker at a time: a module-scoped VM fixture boots once per
module, as in a serial run (``load`` would boot it in each worker that gets one
of the module's tests)."""
INTERRUPT_GRACE = 120.0
"""Seconds a pytest run interrupted by the bench may take to shut its VMs down
before it is killed."""


@dataclass(frozen=True)
class Counts:
    """What one pytest run ran, from its JUnit XML (``<testsuite>`` attributes,
    summed over suites): ``tests`` = passed + failed + errors + skipped."""

    tests: int
    failed: int
    errors: int
    skipped: int

    @property
    def passed(self) -> int:
        return self.tests - self.failed - self.errors - self.skipped

    def format(self) -> str:
        return f"{self.passed} passed, {self.failed} failed, {self.errors} errors, {self.skipped} skipped"


def read_counts(xml_text: str) -> Counts:
    """The counts of a pytest JUnit XML (root ``<testsuites>`` or ``<testsuite>``).

    Raises:
        ValueError: not XML, or no ``<testsuite>`` with integer ``tests``,
            ``failures``, ``errors`` and ``skipped`` attributes.
    """
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise ValueError(f"not a JUnit XML: {exc}") from None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    if not suites:
        raise ValueError("the JUnit XML has no <testsuite>")
    total = [0, 0, 0, 0]
    for suite in suites:
        for i, name in enumerate(("tests", "failures", "errors", "skipped")):
            value = suite.get(name, "0")
            try:
                total[i] += int(value)
            except ValueError:
                raise ValueError(f"<testsuite {name}={value!r}> is not an integer") from None
    return Counts(*total)


@dataclass(frozen=True)
class PytestRun:
    """One timed pytest run: its worker count (0: serial), argv, wall seconds,
    exit status, counts (None when it wrote no readable JUnit XML) and the host
    load before and after it."""

    workers: int
    argv: tuple[str, ...]
    seconds: float
    returncode: int
    counts: Counts | None
    load_before: str
    load_after: str

    @property
    def label(self) -> str:
        if self.workers == 0:
            return "-n 0"
        dist = self.argv[self.argv.index("--dist") + 1] if "--dist" in self.argv else "?"
        return f"-n {self.workers} --dist {dist}"

    def format(self) -> str:
        counts = self.counts.format() if self.counts is not None else "no JUnit XML"
        return (f"{self.label}: {self.seconds:.1f} s wall, {counts}, pytest exit {self.returncode}; "
                f"host {self.load_before} before, {self.load_after} after")


def pytest_argv(workers: int, dist: str, junit: Path, args: Sequence[str]) -> list[str]:
    """The pytest command line of one run: the same selection ``args`` (default
    :data:`DEFAULT_SELECTION`), ``-n workers`` (and ``--dist`` when parallel), a
    JUnit XML and ``-p no:cacheprovider`` (no run's ``--lf``/``--ff`` state changes
    the other's order)."""
    argv = [sys.executable, "-m", "pytest", "-n", str(workers)]
    if workers > 0:
        argv += ["--dist", dist]
    argv += [f"--junitxml={junit}", "-p", "no:cacheprovider"]
    return argv + (list(args) if args else list(DEFAULT_SELECTION))


def run_pytest(argv: Sequence[str], workers: int, junit: Path, *,
               clock: Callable[[], float] = time.monotonic) -> PytestRun:
    """Run one pytest process (its output goes to this terminal) and time it.

    On Ctrl-C the pytest process got the same SIGINT (same process group) and shuts
    its VMs down: it is waited for (up to :data:`INTERRUPT_GRACE` s) before the
    interrupt goes on. On any other exception it is sent SIGINT first.
    """
    before = host_load()
    start = clock()
    proc = subprocess.Popen(list(argv))
    try:
        returncode = proc.wait()
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        try:
            proc.wait(INTERRUPT_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    seconds = clock() - start
    try:
        counts: Counts | None = read_counts(junit.read_text())
    except (OSError, ValueError):
        counts = None
    return PytestRun(workers, tuple(argv), seconds, returncode, counts, before, host_load())


def speedup(serial: PytestRun, parallel: PytestRun) -> float:
    """Serial wall time over parallel wall time (2.0: twice as fast)."""
    return serial.seconds / parallel.seconds if parallel.seconds > 0 else float("inf")


def judge(serial: PytestRun, parallel: PytestRun, target: float = TARGET) -> tuple[bool, list[str]]:
    """Whether the comparison holds and meets ``target``, and the report's last lines
    (the speed-up, the target line, and each reason the comparison fails)."""
    ratio = speedup(serial, parallel)
    met = ratio >= target
    lines = [f"speed-up: {ratio:.2f}x ({serial.seconds:.1f} s / {parallel.seconds:.1f} s)",
             f"target: speed-up >= {target:g}x with {parallel.workers} workers: {'met' if met else 'NOT met'}"]
    ok = met
    for run in (serial, parallel):
        if run.returncode != 0:
            lines.append(f"invalid: the {run.label} run did not pass (pytest exit {run.returncode})")
            ok = False
    if serial.counts is None or parallel.counts is None:
        lines.append("invalid: a run wrote no readable JUnit XML")
        ok = False
    elif serial.counts.tests != parallel.counts.tests:
        lines.append(f"invalid: the runs ran different numbers of tests "
                     f"({serial.counts.tests} vs {parallel.counts.tests})")
        ok = False
    return ok, lines


def warm_up() -> str:
    """Build the guest images if missing and read the kernel and initrd once; a
    one-line description of what was read. Raises what Harness.images raises
    (HarnessError, ImageError, QEMUNotFound)."""
    from harness.options import HarnessOptions
    from harness.session import Harness
    h = Harness(HarnessOptions.from_env())
    try:
        images = h.images()
        total = 0
        for path in (images.kernel, images.initrd):
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
    finally:
        h.close()
    return f"images ready: {images.kernel} and {images.initrd} read ({total >> 20} MiB)"


def run(workers: int, dist: str, pytest_args: Sequence[str], *, warm: bool = True,
        target: float = TARGET) -> int:
    """The command: print the report, return the exit status (module docstring).

    Raises:
        HarnessError: ``workers`` below 2, an unknown ``dist``, or pytest-xdist
            not installed (the CLI prints one line and exits 2).
    """
    if workers < 2:
        raise HarnessError(f"--workers must be at least 2, not {workers}")
    if dist not in DIST_MODES:
        raise HarnessError(f"--dist must be one of {', '.join(DIST_MODES)}, not {dist!r}")
    if importlib.util.find_spec("xdist") is None:
        raise HarnessError("pytest-xdist is not installed (it is in the dev extras: pip install -e '.[dev]')")
    args = list(pytest_args)
    if args[:1] == ["--"]:
        args = args[1:]
    selection = " ".join(args) if args else " ".join(DEFAULT_SELECTION)
    print(f"pytest-xdist speed-up of: {selection}", flush=True)
    if warm:
        print(warm_up(), flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-xdist-") as tmp:
        for n in (0, workers):
            junit = Path(tmp) / f"n{n}.xml"
            argv = pytest_argv(n, dist, junit, args)
            print(f"== python {' '.join(argv[1:])}", flush=True)
            runs.append(run_pytest(argv, n, junit))
    serial, parallel = runs
    ok, verdict = judge(serial, parallel, target)
    print(f"\nhost: {os.cpu_count()} CPUs")
    for r in runs:
        print(r.format())
    for line in verdict:
        print(line)
    return 0 if ok else 1
