"""Differential test of the iommufd pinning model against the guest kernel: random
sequences of IOAS operations run in one booted guest (/dev/iommu with the selftest
mock domain) and in harness.models.pinning, compared after every step; a mutant of
the model must diverge (the proof that the comparison can fail), and its saved
minimal sequence must replay through the command line."""

import os
import subprocess
import sys
from pathlib import Path

from harness.difftest import replay
from harness.difftest.engine import AgentExecutor, search
from harness.difftest.pinning import PinningTarget
from harness.difftest.report import failure_lines

ROOT = Path(__file__).resolve().parents[2]


def test_the_model_agrees_with_the_kernel(no_leftovers, vm_factory):
    target = PinningTarget()
    vm = vm_factory(target.machine(), trace=False)
    report = search(target, AgentExecutor(vm.agent), sequences=20, seed=1, shrink_seconds=60, echo=print)
    assert report.status == "ok", "\n".join(failure_lines(target, report))
    assert report.stats.sequences == 20 and report.stats.compared == report.stats.operations > 100


def test_a_mutant_diverges_and_its_replay_file_reruns(no_leftovers, vm_factory, dma_harness, tmp_path):
    target = PinningTarget()
    vm = vm_factory(target.machine(), trace=False)
    report = search(target, AgentExecutor(vm.agent), sequences=100, seed=1, mutant="unmap-splits",
                    shrink_seconds=30, echo=print)
    assert report.status == "divergence"
    failure = report.failure
    assert failure is not None and failure.divergence is not None
    assert failure.divergence.step == failure.length <= 10, "\n".join(failure_lines(target, report))
    vm.shutdown()

    saved = replay.save(replay.ReplayFile("pinning", "unmap-splits", [p.step for p in failure.steps], 1,
                                          failure.divergence.to_dict()), tmp_path)
    env = dict(os.environ, DMA_HARNESS_CACHE=str(dma_harness.cache.root))
    proc = subprocess.run([sys.executable, "-m", "harness", "difftest", "--replay", str(saved)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert f"first divergent step: {failure.divergence.step} of {failure.length}" in proc.stdout
    assert "the replay diverges as saved" in proc.stdout
