"""Differential test of the Xen grant model against a booted Xen 4.17 dom0 (one boot
for the module): random sequences agree with Linux and Xen, a hand-written deferred
end shows version 1's rules step by step, and a mutant diverges with a short
shrunk sequence."""

from __future__ import annotations

import errno
import hashlib

import pytest

from harness.difftest.engine import plan, replay_steps, search
from harness.difftest.grant import GrantTarget
from harness.difftest.report import failure_lines


@pytest.fixture(scope="module")
def executor(dma_harness):
    target = GrantTarget()
    with dma_harness.vm(target.machine(), name="difftest-grant", trace=False, boot_timeout=180) as vm:
        yield target.agent_executor(vm.agent)


def test_random_sequences_agree_with_linux_and_xen(executor):
    target = GrantTarget()
    report = search(target, executor, sequences=15, seed=1, shrink_seconds=60, echo=print)
    assert report.status == "ok", "\n".join(failure_lines(target, report))
    assert report.stats.sequences == 15 and report.stats.compared == report.stats.operations > 60
    assert report.stats.counters["refs compared"] > 0 and report.stats.counters["errnos compared"] > 0
    assert executor.counters()["tick retries"] == 0


def test_a_deferred_end_step_by_step(executor):
    """Grant 8, map it, end it (deferred), munmap after the timer ran, map it again
    inside the window (v1: the entry is still valid), Xen shows pin 0x2 with
    GTF_permit_access|reading|writing, unmap, and after the next run of the timer
    the ref is free and reused first."""
    target = GrantTarget()
    steps = [{"op": "grant", "domid": 0, "count": 1, "writable": True, "tick": False},
             {"op": "map", "refs": [8], "writable": True, "tick": False},
             {"op": "end", "group": 1, "page": 0, "count": 1, "tick": False},
             {"op": "unmap", "map": 1, "ioctl_first": False, "tick": True},
             {"op": "map", "refs": [8], "writable": True, "tick": False},
             {"op": "state", "tick": False},
             {"op": "unmap", "map": 2, "ioctl_first": True, "tick": True},
             {"op": "state", "tick": False},
             {"op": "grant", "domid": 0, "count": 2, "writable": True, "tick": True}]
    planned, error = plan(target, None, steps, abstract=False)
    assert error is None
    predicted = [p.predicted for p in planned]
    assert predicted[3]["tick"] == "ran" and predicted[4]["errno"] == 0 and predicted[4]["quiet"] is True
    assert predicted[5]["entries"] == [{"ref": 8, "active_domid": 0, "pin": 0x2, "shared_domid": 0, "flags": 0x19}]
    assert predicted[7]["entries"] == [] and predicted[8]["refs"] == [8, 9] and predicted[8]["timer"] == "idle"
    report = replay_steps(target, executor, steps, mutant=None)  # the kernel and Xen must answer the same
    assert report.status == "ok", "\n".join(failure_lines(target, report))
    assert report.stats.compared == len(steps)


def test_gntalloc_use_counts_and_gntdev_first_fit(executor):
    """A DEALLOC of a page a gntalloc mmap holds ends nothing (the next ALLOC gets
    the next ref) until that munmap; a second DEALLOC is EINVAL, a gntalloc mmap of
    it ENOENT; a gntdev map of one page does not take a one-page gap (index 0 after
    map 1 went), it goes after the last map."""
    target = GrantTarget()
    steps = [{"op": "grant", "domid": 0, "count": 1, "writable": True, "tick": False},
             {"op": "amap", "group": 1, "page": 0, "count": 1, "tick": False},
             {"op": "end", "group": 1, "page": 0, "count": 1, "tick": False},
             {"op": "end", "group": 1, "page": 0, "count": 1, "tick": False},
             {"op": "amap", "group": 1, "page": 0, "count": 1, "tick": False},
             {"op": "grant", "domid": 0, "count": 1, "writable": True, "tick": False},
             {"op": "aunmap", "amap": 1, "tick": False},
             {"op": "grant", "domid": 0, "count": 1, "writable": False, "tick": False},
             {"op": "map", "refs": [9], "writable": True, "tick": False},
             {"op": "map", "refs": [8], "writable": False, "tick": False},
             {"op": "unmap", "map": 1, "ioctl_first": False, "tick": False},
             {"op": "map", "refs": [9], "writable": False, "tick": False},
             {"op": "state", "tick": False},
             {"op": "copy", "tick": False, "segments": [
                 {"to_ref": True, "ref": 8, "domid": 0, "offset": 0, "len": 16},  # a read-only grant
                 {"to_ref": False, "ref": 9, "domid": 1, "offset": 0, "len": 16},  # no domain 1
                 {"to_ref": False, "ref": 640, "domid": 0, "offset": 0, "len": 16},  # outside the table
                 {"to_ref": False, "ref": 9, "domid": 1, "offset": 0, "len": 0},  # never issued
                 {"to_ref": False, "ref": 9, "domid": 0, "offset": 16, "len": 32}]},
             {"op": "copy", "tick": False, "segments": [
                 {"to_ref": True, "ref": 9, "domid": 0, "offset": 0, "len": 16},
                 {"to_ref": True, "ref": 9, "domid": 0, "offset": 4088, "len": 16}]},  # crosses the page
             {"op": "amap", "group": 2, "page": 0, "count": 1, "tick": False},
             {"op": "data", "write": ["gntalloc", 3, 0], "read": ["gntdev", 3, 0], "seed": 5, "tick": False}]
    planned, error = plan(target, None, steps, abstract=False)
    assert error is None
    predicted = [p.predicted for p in planned]
    assert [predicted[i]["errno"] for i in (2, 3, 4)] == [0, errno.EINVAL, errno.ENOENT]
    assert predicted[5]["refs"] == [9] and predicted[7]["refs"] == [8]
    assert [predicted[i]["gntdev_index"] for i in (8, 9, 11)] == [0, 0x1000, 0x2000]
    assert predicted[12]["entries"] == [{"ref": 8, "active_domid": 0, "pin": 0x200, "shared_domid": 0, "flags": 0xD},
                                        {"ref": 9, "active_domid": 0, "pin": 0x200, "shared_domid": 0, "flags": 0x9}]
    assert predicted[13]["status"] == [-1, -2, -3, 0, 0] and predicted[13]["errno"] == 0
    assert predicted[14]["status"] == [0, 1] and predicted[14]["errno"] == errno.EINVAL
    assert predicted[16]["read_before"] == hashlib.sha256(bytes(4096)).hexdigest()  # the queued copy never ran
    report = replay_steps(target, executor, steps, mutant=None)
    assert report.status == "ok", "\n".join(failure_lines(target, report))


def test_a_mutant_diverges_at_the_last_step_of_its_shrunk_sequence(executor):
    target = GrantTarget()
    report = search(target, executor, sequences=40, seed=1, mutant="grant-fifo-reuse", shrink_seconds=45,
                    echo=print)
    assert report.status == "divergence"
    failure = report.failure
    assert failure is not None and failure.divergence is not None
    assert failure.divergence.field.startswith("refs"), "\n".join(failure_lines(target, report))
    # Shrinking is bounded in time and each attempt waits for dom0's 1 Hz timer, so how
    # far it gets varies with the draw and the host: what must hold is that the
    # divergence is the last step (every step after it was dropped) of a sequence no
    # longer than the search's bound (20 steps).
    assert failure.divergence.step == failure.length <= 20, "\n".join(failure_lines(target, report))
