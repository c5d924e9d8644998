"""Whatever happens to a guest (QEMU crash, boot timeout, kernel panic, Ctrl-C), no
QEMU process and no run directory survive it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import GuestBootTimeout, GuestHung, GuestPanicked, QEMUExited, VMError
from harness.vm import IntelIommu, MachineSpec, NvmeController
from tests.vm.conftest import harness_qemu_pids, own_run_dirs

SPEC = MachineSpec(devices=(IntelIommu(caching_mode=True), NvmeController()))
ROOT = Path(__file__).resolve().parents[2]


def test_qemu_crash_is_reported_and_cleaned_up(dma_harness, no_leftovers):
    vm = dma_harness.vm(SPEC, name="crash", trace=False)
    with pytest.raises(QEMUExited, match="QEMU exited with status -9"):
        with vm:
            run_dir = vm.run_dir
            os.kill(vm.pid, signal.SIGKILL)
            vm.agent.call("ping", timeout=10)
    assert vm.exitcode == -signal.SIGKILL
    assert not run_dir.exists()


def test_stopped_qemu_is_reported_within_seconds_with_its_state(dma_harness, no_leftovers):
    """QEMU stopped (SIGSTOP) during an op: GuestHung within 5 s of the op's timeout,
    naming the op and QEMU's state; the teardown SIGKILLs it within 2 s of the quit attempt."""
    with pytest.raises(GuestHung) as info:
        with dma_harness.vm(SPEC, name="stopped", trace=False) as vm:
            os.kill(vm.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                vm.agent.call("nvme.pattern_rw", timeout=3, length=65536, chunk=65536)
            finally:
                reported = time.monotonic() - t0
                t1 = time.monotonic()
                vm.shutdown()
                torn_down = time.monotonic() - t1
    assert info.value.op == "nvme.pattern_rw" and info.value.seconds == 3
    assert "not answering QMP" in info.value.qemu_state and "not answering QMP" in str(info.value)
    assert reported < 3 + 5, reported
    assert torn_down < 2 + 1, torn_down


def test_boot_timeout_reports_console_and_cleans_up(dma_harness, no_leftovers):
    vm = dma_harness.vm(SPEC, name="slow", trace=False, boot_timeout=0.7)
    with pytest.raises(GuestBootTimeout) as info:
        vm.__enter__()
    assert "did not answer within" in str(info.value)
    assert vm.exitcode is not None and vm.run_dir is None


def test_guest_panic_is_detected_through_pvpanic(dma_harness, no_leftovers):
    with pytest.raises(GuestPanicked) as info:
        with dma_harness.vm(SPEC, name="panic", trace=False) as vm:
            vm.agent.call("panic", timeout=60)
    assert any("Kernel panic" in line or "sysrq" in line.lower() for line in info.value.console_tail), \
        info.value.console_tail


def test_keyboard_interrupt_in_cli_tears_everything_down(dma_harness, no_leftovers, tmp_path):
    """SIGINT to ``python -m harness bench boot`` while a guest is up: exit 130, nothing left."""
    env = dict(os.environ, DMA_HARNESS_CACHE=str(dma_harness.cache.root), TMPDIR=str(tmp_path),
               XDG_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "harness", "bench", "boot", "--runs", "20",
                             "--accel", dma_harness.accel().accel],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("dma-harness-*/agent.sock")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert list(tmp_path.glob("dma-harness-*")) == []
    assert harness_qemu_pids(base=tmp_path) == []


def test_sigkilled_harness_takes_qemu_with_it(dma_harness, no_leftovers, tmp_path):
    """PR_SET_PDEATHSIG: even a SIGKILLed harness leaves no QEMU; the stale run
    directory is swept by the next VM start."""
    env = dict(os.environ, DMA_HARNESS_CACHE=str(dma_harness.cache.root), XDG_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "harness", "bench", "boot", "--runs", "20",
                             "--accel", dma_harness.accel().accel],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("dma-harness-*/agent.sock")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while harness_qemu_pids(base=tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert harness_qemu_pids(base=tmp_path) == []
    from harness.vm.machine import sweep_stale_run_dirs
    assert len(sweep_stale_run_dirs(tmp_path)) == 1
    assert list(tmp_path.glob("dma-harness-*")) == []
    assert own_run_dirs() == []
