"""Differential test of the vhost device IOTLB models against the guest kernel:
random sequences run in one booted guest (/dev/vhost-net; and vhost-vdpa when that
part exists) and in the models, compared after every step; a mutant must diverge,
and its saved minimal sequence must replay. One boot for the whole module (the
``iotlb`` machine: what every part needs)."""

from __future__ import annotations

import pytest

from harness.difftest import replay
from harness.difftest.engine import AgentExecutor, replay_steps, search
from harness.difftest.iotlb import IotlbTarget
from harness.difftest.report import failure_lines, summary
from harness.difftest.vhost_net import VhostNetTarget


@pytest.fixture(scope="module")
def guest(dma_harness):
    with dma_harness.vm(IotlbTarget().machine(), name="difftest-iotlb", trace=False, boot_timeout=120) as vm:
        yield vm


def test_the_vhost_net_model_agrees_with_the_kernel(guest):
    target = VhostNetTarget()
    report = search(target, AgentExecutor(guest.agent), sequences=25, seed=1, shrink_seconds=60, echo=print)
    assert report.status == "ok", "\n".join(failure_lines(target, report))
    assert report.stats.sequences == 25 and report.stats.compared == report.stats.operations > 200
    assert report.stats.counters["misses compared"] > 20
    print(summary(report))


def test_a_mutant_diverges_and_its_replay_file_reruns(guest, tmp_path):
    target = IotlbTarget()
    report = search(target, AgentExecutor(guest.agent), sequences=100, seed=1, mutant="del-range-split",
                    shrink_seconds=30, echo=print)
    assert report.status == "divergence", "no divergence in 100 sequences"
    failure = report.failure
    assert failure is not None and failure.divergence is not None
    assert failure.divergence.step == failure.length, "\n".join(failure_lines(target, report))
    path = replay.save(replay.ReplayFile("iotlb", "del-range-split", [p.step for p in failure.steps], 1,
                                         failure.divergence.to_dict()), tmp_path)
    saved = replay.load(path)
    steps = [target.check_step(s) for s in saved.steps]
    again = replay_steps(target, AgentExecutor(guest.agent), steps, mutant=saved.mutant)
    assert again.failure is not None and again.failure.divergence is not None
    assert (again.failure.divergence.step, again.failure.divergence.field) == \
        (failure.divergence.step, failure.divergence.field)
    correct = replay_steps(target, AgentExecutor(guest.agent), steps, mutant=None)
    assert correct.status == "ok", "\n".join(failure_lines(target, correct))


def test_the_combined_iotlb_target_agrees_with_the_kernel(guest):
    target = IotlbTarget()
    if "vhost-vdpa" not in target.parts:
        pytest.skip(target.description)
    report = search(target, AgentExecutor(guest.agent), sequences=20, seed=1, shrink_seconds=60, echo=print)
    assert report.status == "ok", "\n".join(failure_lines(target, report))
    print(summary(report))
