"""/dev/vhost-net with a device IOTLB in a booted guest: the semantics
harness.models.vhost_net relies on (SEMANTICS.md section 1), each checked against
the kernel and against the model. One boot for the whole module.

Every check runs on both: the guest agent's vhost ops and the model's device
(:class:`Both`), then the numbers are asserted as well."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from harness.models.vhost_net import (
    MAX_IOTLB_ENTRIES,
    USER_PTR_MAX,
    USER_PTR_MAX_4LEVEL,
    VHOST_NET_FEATURES,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
    IotlbMsg,
    VhostNetDevice,
    umem_access_ok,
)
from harness.vm.spec import MachineSpec

EFAULT, EINVAL, EAGAIN = errno.EFAULT, errno.EINVAL, errno.EAGAIN
FEATURES = VIRTIO_F_ACCESS_PLATFORM | VIRTIO_F_VERSION_1
REGION_VA = 0x7C00_0000_0000
W = 0x40000
D = REGION_VA - W
NUM = 8
RINGS = [[W, W + 0x1000, W + 0x2000], [W + 0x3000, W + 0x4000, W + 0x5000]]
UPDATE, INVALIDATE = 2, 3


@pytest.fixture(scope="module")
def guest(dma_harness):
    with dma_harness.vm(MachineSpec(), name="vhost-net", trace=False, boot_timeout=120) as vm:
        yield vm


class Both:
    """One /dev/vhost-net in the guest and one model device, driven alike; every
    method returns the guest's answer after asserting the model gave the same."""

    def __init__(self, call: Any):
        self.call = call
        self.fd = call("vhost.net_open")["fd"]
        self.model = VhostNetDevice()

    def setup(self, num: int = NUM, rings: list[list[int]] = RINGS) -> dict[str, Any]:
        rec = self.call("vhost.net_setup", fd=self.fd, num=num, rings=rings, features=FEATURES)
        assert rec["errno"] == 0, rec
        assert self.model.set_features(FEATURES) == 0
        for i, (desc, avail, used) in enumerate(rings):
            assert self.model.set_vring(i, num, desc, avail, used) == 0
        return rec

    def _misses(self, rec: dict[str, Any]) -> list[tuple[int, int]]:
        got = [(m["iova"], m["perm"]) for m in rec["misses"]]
        for m in rec["misses"]:
            assert (m["type"], m["size"], m["uaddr"], m["outer"], m["asid"]) == (1, 0, 0, 2, 0), m
        want = [(m.iova, m.perm) for m in self.model.read_all()]
        assert got == want, (got, want)
        return got

    def write(self, *msgs: dict[str, int], read: bool = True) -> tuple[list[list[int]], list[tuple[int, int]]]:
        rec = self.call("vhost.write", fd=self.fd, msgs=list(msgs), read=read)
        want = [list(self.model.write(IotlbMsg(**m))) for m in msgs]
        assert rec["results"] == want, (msgs, rec["results"], want)
        assert rec["pollin"] == self.model.pollin
        return rec["results"], self._misses(rec) if read else []

    def backend(self, vq: int, start: bool = True, read: bool = True) -> tuple[int, list[tuple[int, int]]]:
        rec = self.call("vhost.set_backend", fd=self.fd, index=vq, backend="sock" if start else "none", read=read)
        assert rec["errno"] == self.model.set_backend(vq, start), rec
        assert rec["pollin"] == self.model.pollin
        return rec["errno"], self._misses(rec) if read else []

    def kick(self, vq: int) -> list[tuple[int, int]]:
        rec = self.call("vhost.kick", fd=self.fd, index=vq)
        self.model.kick(vq)
        return self._misses(rec)

    def fill(self, n: int, iova: int, stride: int, size: int) -> int:
        rec = self.call("vhost.fill", fd=self.fd, n=n, iova=iova, stride=stride, size=size, perm=3, uaddr_delta=D)
        results = [self.model.write(IotlbMsg(UPDATE, iova + k * stride, size, iova + k * stride + D, 3))
                   for k in range(n)]
        assert rec["written"] == sum(1 for e, _ in results if not e)
        self._misses(rec)
        return int(rec["written"])

    def close(self) -> None:
        assert self.call("vhost.close", fd=self.fd)["closed"] == 6  # the device, 2 kicks, 2 calls, the socket


def upd(iova: int, size: int, perm: int = 3, uaddr: int | None = None, **kw: int) -> dict[str, int]:
    return {"type": UPDATE, "iova": iova, "size": size, "uaddr": iova + D if uaddr is None else uaddr,
            "perm": perm, **kw}


def inv(iova: int, size: int) -> dict[str, int]:
    return {"type": INVALIDATE, "iova": iova, "size": size, "uaddr": 0, "perm": 0}


@pytest.fixture
def dev(guest):
    call = guest.agent.call
    assert call("mem.map", length=0x10000, at=REGION_VA)["user_va"] == REGION_VA
    both = Both(call)
    yield both
    both.close()
    call("mem.unmap", user_va=REGION_VA)


def test_features_and_the_first_miss(dev):
    feats = dev.call("vhost.get_features", fd=dev.fd)
    assert feats["features"] == VHOST_NET_FEATURES == 0x1033D008000 and feats["backend_features"] == 2
    dev.setup()
    # nothing mapped: the synchronous used-ring read of the start misses, RO, size 0
    assert dev.backend(0) == (EFAULT, [(W + 0x2000, 1)])
    assert dev.backend(1) == (EFAULT, [(W + 0x5000, 1)])
    assert dev.write(upd(W + 0x2000, 0x1000)) == ([[0, 72]], [])
    assert dev.backend(0) == (0, [])  # RX: the handler waits for a packet or a kick
    assert dev.write(upd(W + 0x5000, 0x1000)) == ([[0, 72]], [])
    assert dev.backend(1) == (0, [(W + 0x3000, 1)])  # TX: the writable socket runs the handler at once
    assert dev.backend(1) == (0, [])  # the same socket again: nothing happens


def test_miss_order_desc_avail_used_at_the_first_uncovered_address(dev):
    dev.setup(num=4)
    assert dev.write(upd(W + 0x2000, 4 + 8 * 4, perm=1))[0] == [[0, 72]]  # used RO: enough for the start
    assert dev.backend(0) == (0, [])
    assert dev.kick(0) == [(W, 1)]  # desc
    assert dev.write(upd(W, 16 * 4 - 8)) == ([[0, 72]], [(W + 0x38, 1)])  # desc, its first uncovered byte
    assert dev.kick(0) == [(W + 0x38, 1)]  # a duplicate (now two pending MISSes at 0x40038)
    assert dev.write(upd(W + 0x38, 8)) == ([[0, 72]], [(W + 0x1000, 1)])  # one handler run: avail next
    assert dev.write(upd(W + 0x1000, 4 + 2 * 4)) == ([[0, 72]], [])  # used is RO: the WO prefetch stops silently
    assert dev.write(inv(W + 0x2000, 1))[0] == [[0, 72]]
    assert dev.kick(0) == [(W + 0x2000, 2)]  # used, WO


def test_equal_starts_the_older_map_is_found(dev):
    """SEMANTICS.md's "(unverified)" tie order: confirmed, insertion order."""
    dev.setup()
    assert dev.write(upd(W + 0x2000, 0x100, perm=2), upd(W + 0x2000, 0x100, perm=1))[0] == [[0, 72], [0, 72]]
    assert dev.backend(0) == (EFAULT, [])  # the WO map is found: EPERM, no MISS
    assert dev.write(inv(0, 0))[0] == [[0, 72]]
    assert dev.write(upd(W + 0x2000, 0x100, perm=1), upd(W + 0x2000, 0x100, perm=2))[0] == [[0, 72], [0, 72]]
    assert dev.backend(0) == (0, [])


def test_an_update_covering_a_pending_miss_requeues_an_unread_one_does_not(dev):
    dev.setup()
    assert dev.write(upd(W + 0x5000, 0x1000))[0] == [[0, 72]]
    assert dev.backend(1, read=False) == (0, [])  # the desc MISS stays in read_list
    assert dev.write(upd(W + 0x3000, 0x1000), read=False)[0] == [[0, 72]]  # not pending: no re-run
    rec = dev.call("vhost.read", fd=dev.fd)
    assert dev._misses(rec) == [(W + 0x3000, 1)]  # only the start's MISS
    assert dev.write(upd(W + 0x4000, 0x1000)) == ([[0, 72]], [])
    assert dev.kick(1) == []


def test_invalidate_size_0_at_iova_0_removes_everything(dev):
    dev.setup()
    assert dev.write(upd(W, 0x6000), upd(0x100000, 0x1000), upd(2**40, 0x1000))[0] == [[0, 72]] * 3
    assert dev.backend(0) == (0, []) and dev.backend(1) == (0, [])
    assert dev.write(inv(W + 0x10, 0))[0] == [[0, 72]]  # size 0 elsewhere: maps holding iova-1 and iova
    assert dev.kick(0) == [(W, 1)] and dev.kick(1) == [(W + 0x3000, 1)]
    assert dev.write(upd(W, 0x6000))[1] == []
    assert dev.write(inv(0, 0))[0] == [[0, 72]]
    assert dev.kick(0) == [(W, 1)] and dev.kick(1) == [(W + 0x3000, 1)]
    assert dev.model.iotlb is not None and len(dev.model.iotlb) == 0


def test_the_2049th_entry_retires_the_oldest(dev):
    dev.setup()
    assert dev.write(upd(W + 0x2000, 0x1000))[0] == [[0, 72]]  # the oldest: vq 0's used ring
    assert dev.fill(MAX_IOTLB_ENTRIES - 1, 0, 16, 8) == MAX_IOTLB_ENTRIES - 1  # below it: the lowest starts
    assert dev.backend(0) == (0, []) and dev.backend(0, start=False) == (0, [])
    assert dev.fill(1, 0x100000, 16, 8) == 1  # the 2049th
    assert dev.backend(0) == (EFAULT, [(W + 0x2000, 1)])  # the oldest went, not the lowest


def test_write_errnos_and_message_formats(dev):
    dev.setup()
    assert dev.write(upd(0x100000, 0x1000, count=40), upd(0x100000, 0x1000, count=100),
                     upd(0x100000, 0x1000, count=39), upd(0x100000, 0x1000, count=3))[0] == \
        [[0, 72], [0, 72], [EINVAL, -1], [EINVAL, -1]]
    assert dev.write(upd(0x100000, 0x1000, asid=5), upd(0x100000, 0x1000, outer=1),
                     upd(0x100000, 0x1000, outer=3), upd(0x100000, 0))[0] == \
        [[0, 72], [0, 72], [EINVAL, -1], [EINVAL, -1]]  # the asid is skipped on net (no IOTLB_ASID)
    assert dev.write(*({"type": t, "iova": 0, "size": 8, "uaddr": 0, "perm": 0} for t in (0, 1, 4, 5, 6)))[0] == \
        [[EFAULT, -1]] * 5
    assert dev.write(upd(0, 2**64 - 1, perm=0, uaddr=0), upd(1, 2**64 - 1, perm=0, uaddr=1),
                     upd(1, 2**64 - 1, perm=0, uaddr=2), upd(2**64 - 0x1000, 0x2000, perm=0, uaddr=0))[0] == \
        [[0, 72], [0, 72], [EFAULT, -1], [EFAULT, -1]]  # vhost_overflow; iova + size - 1 wraps
    rec = dev.call("vhost.read_raw", fd=dev.fd, count=71)
    assert rec["errno"] == 0 and rec["length"] == 0
    rec = dev.call("vhost.read_raw", fd=dev.fd, count=72)
    assert rec["errno"] == EAGAIN


def test_access_ok_limit_of_update(dev):
    """``uaddr + size`` may reach TASK_SIZE_MAX (5-level paging on the TCG guest's
    ``-cpu max``: 2**56 - 4096; else 2**47 - 4096) and not one byte more."""
    dev.setup()
    probe = dev.call("vhost.write", fd=dev.fd, msgs=[upd(0x200000, 0x1000, perm=1, uaddr=USER_PTR_MAX_4LEVEL)])
    limit = USER_PTR_MAX if probe["results"] == [[0, 72]] else USER_PTR_MAX_4LEVEL
    dev.model.user_ptr_max = limit
    dev.model.write(IotlbMsg(UPDATE, 0x200000, 0x1000, USER_PTR_MAX_4LEVEL, 1))  # keep the two in step
    for perm in (1, 2, 3):
        for end in (limit, limit + 1):
            assert dev.write(upd(0x200000, 0x1000, perm=perm, uaddr=end - 0x1000))[0] == \
                [[0, 72] if end <= limit else [EFAULT, -1]]
            assert umem_access_ok(end - 0x1000, 0x1000, perm, limit) == (end <= limit)
    assert dev.write(upd(0x200000, 0x1000, perm=0, uaddr=2**63))[0] == [[0, 72]]  # perm 0: no access_ok


def test_set_features_gives_a_new_iotlb_and_keeps_the_messages_stop_drops_them(dev):
    dev.setup()
    assert dev.write(upd(W + 0x2000, 0x1000))[0] == [[0, 72]]
    assert dev.backend(1, read=False) == (EFAULT, [])
    assert dev.call("vhost.set_features", fd=dev.fd, features=FEATURES)["errno"] == dev.model.set_features(FEATURES)
    assert dev.backend(0) == (EFAULT, [(W + 0x5000, 1), (W + 0x2000, 1)])  # the old MISS, then the new one
    assert dev.backend(1, read=False) == (EFAULT, [])
    assert dev.backend(0, start=False) == (0, [])  # a stop drops read_list and pending_list
    rec = dev.call("vhost.read", fd=dev.fd)
    assert rec["pollin"] is False and dev._misses(rec) == []
