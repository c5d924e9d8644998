"""The accelerator probe's cache (harness.vm.accel) with several processes resolving
``auto`` at once (pytest-xdist workers): one probe, readers never see half a file,
and the probe's folder names its owner. No real KVM guest: the probe is a stand-in."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest

from harness.vm import accel
from harness.vm.machine import sweep_stale_run_dirs


def _resolve_with_slow_probe(cache_dir: str, kernel: str, log: str, out: str) -> None:
    """A worker: resolve ``auto`` with a probe that takes 0.5 s and logs each run."""
    def probe(qemu: str, kernel: Path, timeout: float = 10.0) -> tuple[bool, str]:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return False, "stand-in probe: no KVM"

    accel.probe_kvm = probe  # type: ignore[assignment]
    choice = accel.resolve_accel("auto", sys.executable, Path(kernel), Path(cache_dir))
    Path(out).write_text(json.dumps([choice.accel, choice.reason]))


def test_concurrent_resolvers_run_one_probe(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    log = tmp_path / "probes"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_resolve_with_slow_probe,
                         args=(str(tmp_path / "cache"), str(kernel), str(log), str(tmp_path / f"out{i}")))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1, "more than one process probed"
    answers = [json.loads((tmp_path / f"out{i}").read_text()) for i in range(4)]
    assert {a[0] for a in answers} == {"tcg"}
    assert sum(a[1].endswith("(cached)") for a in answers) == 3
    cached = json.loads((tmp_path / "cache" / "accel-probe.json").read_text())
    assert cached["accel"] == "tcg" and cached["reason"] == "stand-in probe: no KVM"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["accel-probe.json", "accel-probe.lock"]


def test_a_torn_cache_file_is_probed_again_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []
    monkeypatch.setattr(accel, "probe_kvm", lambda qemu, kernel: (runs.append(1), (False, "no KVM"))[1])
    (tmp_path / "accel-probe.json").write_text('{"key": "abc", "acc')
    choice = accel.resolve_accel("auto", sys.executable, tmp_path / "bzImage", tmp_path)
    assert choice == accel.AccelChoice("tcg", "no KVM") and runs == [1]
    again = accel.resolve_accel("auto", sys.executable, tmp_path / "bzImage", tmp_path)
    assert again == accel.AccelChoice("tcg", "no KVM (cached)") and runs == [1]
    (tmp_path / "accel-probe.json").write_text("[1, 2]")  # valid JSON, wrong shape
    assert accel.resolve_accel("auto", sys.executable, tmp_path / "bzImage", tmp_path).reason == "no KVM"
    assert runs == [1, 1]


FAKE_QEMU = """#!{python}
import os, sys
from pathlib import Path
log = next(a.split("path=", 1)[1] for a in sys.argv if "path=" in a)
folder = Path(log).parent
Path(sys.argv[0] + ".seen").write_text(folder.name + " " + (folder / "owner.pid").read_text())
Path(log).write_text("VFS: Unable to mount root fs on unknown-block(0,0)\\n")
"""


def test_the_probe_folder_names_its_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe guest's folder is called dma-harness-probe-*, like a run directory:
    its owner.pid keeps other processes' sweeps and leftover checks off it while
    this process lives."""
    qemu = tmp_path / "qemu"
    qemu.write_text(FAKE_QEMU.format(python=sys.executable))
    qemu.chmod(0o755)
    real_access = os.access
    monkeypatch.setattr(accel.os, "access",
                        lambda p, mode, **kw: True if str(p) == "/dev/kvm" else real_access(p, mode, **kw))
    ok, detail = accel.probe_kvm(str(qemu), tmp_path / "bzImage")
    assert ok, detail
    name, owner = (tmp_path / "qemu.seen").read_text().split()
    assert name.startswith("dma-harness-probe-") and int(owner) == os.getpid()


def test_a_live_probe_folder_is_not_swept(tmp_path: Path) -> None:
    folder = tmp_path / "dma-harness-probe-x"
    folder.mkdir()
    (folder / "owner.pid").write_text(str(os.getppid()))  # alive, and not this process
    assert sweep_stale_run_dirs(tmp_path) == [] and folder.is_dir()
