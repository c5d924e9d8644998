"""vhost-vdpa with a vdpa_sim device in PA mode (vdpa_sim.use_va=0) in a booted
guest: the semantics harness.models.vhost_vdpa relies on (SEMANTICS.md section 1),
then a short differential run of the model against the kernel and a mutant that
must diverge. One boot for the whole module."""

from __future__ import annotations

import errno

import pytest

from harness.difftest.engine import AgentExecutor, search
from harness.difftest.report import failure_lines
from harness.difftest.vhost_vdpa import READONLY_PAGES, REGION_VA, RUNS, VhostVdpaTarget
from harness.models.vhost_vdpa import VDPASIM_BACKEND_FEATURES

P = 4096
EFAULT, EBUSY, EINVAL = errno.EFAULT, errno.EBUSY, errno.EINVAL
V2_BATCH_ASID = 0xE


@pytest.fixture(scope="module")
def guest(dma_harness):
    target = VhostVdpaTarget()
    with dma_harness.vm(target.machine(), name="vhost-vdpa", trace=False, boot_timeout=120) as vm:
        yield vm


@pytest.fixture
def dev(guest):
    """An open, owned /dev/vhost-vdpa-N on vdpasim_net, the layout region mapped; closed afterwards."""
    call = guest.agent.call
    device = call("vhost_vdpa.add_device", name="vdpa0", mgmtdev="vdpasim_net")
    assert device["driver"] == "vhost_vdpa" and device["use_va"] == "N", device
    region = call("vhost_vdpa.region", user_va=REGION_VA, runs=list(RUNS), readonly=READONLY_PAGES)
    assert region["runs"] == list(RUNS)
    opened = call("vhost_vdpa.open", name="vdpa0", owner=True)
    assert opened["errno"] == 0 and opened["owner_errno"] == 0 and opened["vm_pin"] == 0
    fd = opened["fd"]

    def msg(type, iova=0, size=0, uaddr=REGION_VA, perm=3, asid=0, **kw):
        return call("vhost_vdpa.msg", fd=fd, type=type, iova=iova, size=size, uaddr=uaddr, perm=perm, asid=asid, **kw)

    yield call, fd, msg
    call("fd.close_all")
    assert call("vhost_vdpa.memlock")["vm_pin"] == 0


def test_device_ioctls_and_exclusive_open(dev):
    call, fd, msg = dev
    assert call("vhost_vdpa.get_backend_features", fd=fd)["features"] == VDPASIM_BACKEND_FEATURES == 0x17E
    assert call("vhost_vdpa.get_iova_range", fd=fd)["first"] == 0
    assert call("vhost_vdpa.get_iova_range", fd=fd)["last"] == 2**64 - 1
    assert call("vhost_vdpa.get_info", fd=fd)["nas"] == 2
    assert call("vhost_vdpa.open", name="vdpa0")["errno"] == EBUSY
    assert call("vhost_vdpa.set_owner", fd=fd)["errno"] == EBUSY
    assert call("vhost_vdpa.set_backend_features", fd=fd, features=0x7)["errno"] == errno.EOPNOTSUPP


def test_update_eexist_pins_and_invalidate_whole_chunks(dev):
    call, fd, msg = dev
    r = msg("update", 0x10000, 4 * P)  # pages 0 | 1-2 | 3 of the region: three maps
    assert (r["errno"], r["written"], r["vm_pin"]) == (0, 72, 4)
    assert msg("update", 0x13000, P)["errno"] == EFAULT  # EEXIST, seen as EFAULT
    assert msg("update", 0x14000, P)["vm_pin"] == 5  # adjacent: fine
    assert msg("invalidate", 0x12000, 1)["vm_pin"] == 3  # removes the whole 2-page map
    probe = call("vhost_vdpa.probe", fd=fd, asid=0, ranges=[[0x10000 + i * P, P] for i in range(6)], uaddr=REGION_VA)
    assert probe["answers"] == [EFAULT, 0, 0, EFAULT, EFAULT, 0] and probe["vm_pin"] == 3
    assert msg("invalidate", 0x14000, 0)["vm_pin"] == 3  # size 0: last = iova - 1, nothing holds both
    assert msg("invalidate", 0x14001, 0)["vm_pin"] == 2
    assert msg("invalidate", 0, 0)["vm_pin"] == 0  # iova 0 size 0: everything
    assert msg("update", 0x1000, 0)["errno"] == EINVAL  # size 0, before the handler
    assert msg("update", 2**64 - P, 2 * P)["errno"] == EFAULT and msg("update", 2**64 - P, P)["vm_pin"] == 1


def test_readonly_memory_memlock_and_close_unpins(dev):
    call, fd, msg = dev
    ro = REGION_VA + (sum(RUNS) - 2) * P
    assert msg("update", 0x40000, P, ro, perm=3)["errno"] == EFAULT  # FOLL_WRITE on a read-only page
    assert msg("update", 0x40000, P, ro, perm=1)["vm_pin"] == 1
    old = call("vhost_vdpa.memlock", pages=8)["old"]
    try:
        assert msg("update", 0x100000, 8 * P)["errno"] == EFAULT  # 1 + 8 > 8: ENOMEM
        assert msg("update", 0x100000, 7 * P)["vm_pin"] == 8
    finally:
        call("vhost_vdpa.memlock", pages=old)
    r = call("vhost_vdpa.reopen", fd=fd)
    assert (r["errno"], r["vm_pin_closed"], r["owner_errno"], r["vm_pin"]) == (0, 0, 0, 0)


def test_asid_and_batch_rules(dev):
    call, fd, msg = dev
    assert call("vhost_vdpa.set_backend_features", fd=fd, features=V2_BATCH_ASID)["errno"] == 0
    assert msg("invalidate", 0, 0, asid=1)["errno"] == EFAULT  # no address space 1 yet
    assert msg("batch_begin", asid=0)["errno"] == 0
    assert msg("update", 0xA0000, P, asid=1)["errno"] == EFAULT  # batch of asid 0 under way...
    assert msg("update", 0xA0000, P, asid=0)["vm_pin"] == 1  # its own asid is fine
    assert msg("batch_end", asid=0)["errno"] == 0
    assert msg("invalidate", 0, P, asid=1)["errno"] == 0  # ...yet address space 1 now exists
    assert msg("update", 0xA0000, P, asid=1)["vm_pin"] == 2  # separate IOTLBs, one pinned_vm
    assert msg("update", 0, P, asid=2)["errno"] == EFAULT  # vdpasim_net has 2 address spaces
    assert msg("batch_end", asid=0)["errno"] == 0  # outside a batch: fine
    assert msg("miss")["errno"] == EFAULT
    assert msg("batch_end", length=40)["written"] == 72 and msg("batch_end", length=39)["errno"] == EINVAL


def test_difftest_agrees_with_the_kernel_and_a_mutant_diverges(guest):
    target = VhostVdpaTarget()
    report = search(target, AgentExecutor(guest.agent), sequences=25, seed=1, shrink_seconds=30, echo=print)
    assert report.status == "ok", "\n".join(failure_lines(target, report))
    # How many operations 25 sequences hold depends on Hypothesis's draws, which vary with the test
    # modules loaded in the process; what must hold is that every one was run and compared.
    assert report.stats.sequences == 25 and report.stats.compared == report.stats.operations >= 25 - report.stats.cached
    assert report.stats.counters["errnos compared"] > 0
    report = search(target, AgentExecutor(guest.agent), sequences=50, seed=1, mutant="vdpa-invalidate-split",
                    shrink_seconds=10, echo=print)
    assert report.status == "divergence"
    assert report.failure is not None and report.failure.length <= 8, "\n".join(failure_lines(target, report))
