"""The vhost-vdpa difftest target without a VM: the correct model against itself,
every mutant diverges, the driver's calls and observations, replay-step checks."""

from __future__ import annotations

import errno

import pytest

from harness.difftest import get_target
from harness.difftest.engine import DifftestError, ModelExecutor, SystemStateError, plan, search
from harness.difftest.vhost_vdpa import (
    KERNEL_CMDLINE,
    REGION_VA,
    RUNS,
    VhostVdpaDriver,
    VhostVdpaTarget,
    probe_ranges,
)
from harness.models.vhost_vdpa_mutants import MUTANTS


def quiet(line: str) -> None:
    pass


def test_registry_machine_and_mutant_names() -> None:
    target = get_target("vhost-vdpa")
    assert isinstance(target, VhostVdpaTarget)
    assert KERNEL_CMDLINE in target.machine().kernel_cmdline()
    assert set(target.mutants()) == set(MUTANTS) and all(n.startswith("vdpa-") for n in MUTANTS)


def test_correct_model_never_diverges_from_itself() -> None:
    report = search(VhostVdpaTarget(), ModelExecutor(None), sequences=40, seed=3, echo=quiet)
    assert report.status == "ok" and report.stats.compared > 0
    assert report.stats.counters["errnos compared"] > report.stats.compared


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_every_mutant_diverges(name: str) -> None:
    report = search(VhostVdpaTarget(), ModelExecutor(None), sequences=200, seed=1, mutant=name,
                    shrink_seconds=0, echo=quiet)
    assert report.status == "divergence", name


def test_probes_cover_mapped_pages_alone_and_gaps_in_pieces() -> None:
    target = VhostVdpaTarget()
    model = target.new_model(None)
    step = {"op": "msg", "type": 2, "asid": 0, "iova": 0x3000, "size": 0x4000, "uaddr": REGION_VA, "perm": 3}
    assert target.apply(model, step) == {"errno": 0, "vm_pin": 4}
    ranges = probe_ranges(model.dev, 0)
    assert ranges[:6] == [(0, 0x3000), (0x3000, 0x1000), (0x4000, 0x1000), (0x5000, 0x1000), (0x6000, 0x1000),
                          (0x7000, 0x10000)]
    answers = target.answer_probes(model, target.probes(model))
    assert answers["probe"]["asid 0 [0x3000, +0x1000)"] == errno.EFAULT
    assert answers["probe"]["asid 0 [0x0, +0x3000)"] == 0 and answers["vm_pin_probed"] == 4


def test_driver_setup_checks_and_observation() -> None:
    driver = VhostVdpaDriver()
    good = [{"driver": "vhost_vdpa", "path": "/dev/vhost-vdpa-0", "use_va": "N"}, {"runs": list(RUNS)},
            {"old": 2048}, {"errno": 0, "fd": 7, "owner_errno": 0, "vm_pin": 0}]
    with pytest.raises(DifftestError, match="use_va"):
        driver.bind_setup([dict(good[0], use_va="Y")] + good[1:])
    with pytest.raises(SystemStateError):
        driver.bind_setup(good[:3] + [dict(good[3], vm_pin=3)])
    driver.bind_setup(good)
    step = {"op": "msg", "type": 2, "asid": 0, "iova": 0, "size": 0x1000, "uaddr": REGION_VA, "perm": 3}
    probes = [{"asid": 0, "ranges": [[0, 0x1000], [0x1000, 0x2000]]}]
    calls = driver.calls(step, probes)
    assert calls[0]["op"] == "vhost_vdpa.msg" and calls[0]["args"]["fd"] == 7 and calls[1]["op"] == "vhost_vdpa.probe"
    obs = driver.observe(step, probes, [{"errno": 0, "written": 72, "vm_pin": 1},
                                        {"errno": 0, "answers": [14, 0], "vm_pin": 1}])
    assert obs == {"errno": 0, "vm_pin": 1, "probe": {"asid 0 [0x0, +0x1000)": 14, "asid 0 [0x1000, +0x2000)": 0},
                   "vm_pin_probed": 1}
    assert [c["op"] for c in driver.teardown()] == ["fd.close", "vhost_vdpa.memlock"]


def test_check_step_and_describe() -> None:
    target = VhostVdpaTarget()
    step = {"op": "msg", "type": 3, "asid": 1, "iova": 0x2000, "size": 0, "uaddr": 0, "perm": 0}
    assert target.check_step(step) == step
    assert target.describe(step) == "INVALIDATE asid 1 iova 0x2000 size 0x0"
    with pytest.raises(ValueError, match="'size'"):
        target.check_step(dict(step, size=-1))
    with pytest.raises(ValueError, match="unknown key"):
        target.check_step({"op": "reopen", "fd": 3})
    planned, error = plan(target, None, [{"op": "features", "features": 0xE}, {"op": "reopen"}, {"op": "open2"}],
                          abstract=False)
    assert error is None and [p.predicted["errno"] for p in planned] == [0, 0, errno.EBUSY]
