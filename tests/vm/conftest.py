"""VM tests boot the real kernel in real QEMU (TCG here; KVM where it works)."""

import os
import re
from pathlib import Path

import pytest

from harness.vm.machine import RUN_PREFIX, owned_run_dirs


def harness_qemu_pids(owner: int | None = None, base: Path | None = None) -> list[int]:
    """PIDs of QEMU processes started by the harness (their argv names a run dir).

    ``owner``: only those whose run directory says this process made them (its
    ``owner.pid``), or whose run directory is already gone (an orphan); ``base``:
    only those whose run directory is under that folder; neither: all.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" not in cmdline or RUN_PREFIX.encode() not in cmdline:
            continue
        if owner is not None and _run_dir_owner(cmdline) not in (owner, None):
            continue
        if base is not None and str(base).encode() + b"/" + RUN_PREFIX.encode() not in cmdline:
            continue
        pids.append(int(entry.name))
    return pids


def _run_dir_owner(cmdline: bytes) -> int | None:
    """The owner.pid of the run directory a QEMU argv names (None: gone or unreadable)."""
    m = re.search(rf"(/[^,=\s\x00]*?{RUN_PREFIX}[^/,\x00]*)".encode(), cmdline)
    if m is None:
        return None
    try:
        return int((Path(m.group(1).decode(errors="replace")) / "owner.pid").read_text())
    except (OSError, ValueError):
        return None


def own_run_dirs() -> list[Path]:
    """Run directories owned by this test process."""
    return owned_run_dirs()


@pytest.fixture
def no_leftovers():
    """Asserts, after the test, that no harness QEMU process or run directory remains."""
    yield
    assert harness_qemu_pids(owner=os.getpid()) == [], "QEMU processes left running"
    assert own_run_dirs() == [], "run directories left behind"
