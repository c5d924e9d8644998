"""VM tests boot the real kernel in real QEMU (TCG here; KVM where it works)."""

import os
from pathlib import Path

import pytest

from harness.vm.machine import RUN_PREFIX, run_base


def harness_qemu_pids() -> list[int]:
    """PIDs of QEMU processes started by the harness (their argv names a run dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and RUN_PREFIX.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def own_run_dirs() -> list[Path]:
    """Run directories owned by this test process."""
    out = []
    for d in run_base().glob(RUN_PREFIX + "*"):
        try:
            if int((d / "owner.pid").read_text()) == os.getpid():
                out.append(d)
        except (OSError, ValueError):
            continue
    return out


@pytest.fixture
def no_leftovers():
    """Asserts, after the test, that no harness QEMU process or run directory remains."""
    yield
    assert harness_qemu_pids() == [], "QEMU processes left running"
    assert own_run_dirs() == [], "run directories left behind"
