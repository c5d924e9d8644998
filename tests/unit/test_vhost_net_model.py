"""The vhost-net device IOTLB model (harness.models.vhost_net): what the kernel did
in a booted guest (the transcript below was measured with guest_agent/vhost.py),
a Hypothesis state machine against a naive oracle, and the IOTLB mutants."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from harness.models.iotlb import U64_MAX
from harness.models.iotlb_mutants import MUTANTS, RetireLowestIOTLB, SplittingIOTLB, TieNewestIOTLB
from harness.models.vhost_net import (
    EAGAIN,
    EFAULT,
    EINVAL,
    ENOBUFS,
    INVALIDATE,
    MAX_IOTLB_ENTRIES,
    UPDATE,
    USER_PTR_MAX,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
    IotlbMsg,
    Miss,
    VhostNetDevice,
    avail_size,
    desc_size,
    umem_access_ok,
    used_size,
)

FEATURES = VIRTIO_F_ACCESS_PLATFORM | VIRTIO_F_VERSION_1
W = 0x40000
D = 0x7E0000000000 - W
RINGS = [(W, W + 0x1000, W + 0x2000), (W + 0x3000, W + 0x4000, W + 0x5000)]


def device(num: int = 8, rings: list[tuple[int, int, int]] = RINGS) -> VhostNetDevice:
    dev = VhostNetDevice()
    assert dev.set_features(FEATURES) == 0
    for i, (desc, avail, used) in enumerate(rings):
        assert dev.set_vring(i, num, desc, avail, used) == 0
    return dev


def upd(iova: int, size: int, perm: int = 3, uaddr: int | None = None, **kw: int) -> IotlbMsg:
    return IotlbMsg(UPDATE, iova, size, iova + D if uaddr is None else uaddr, perm, **kw)


def inv(iova: int, size: int) -> IotlbMsg:
    return IotlbMsg(INVALIDATE, iova, size)


def misses(dev: VhostNetDevice) -> list[tuple[int, int]]:
    return [(m.iova, m.perm) for m in dev.read_all()]


# ------------------------------------------------------------------ the measured transcript


def test_what_the_kernel_did_in_the_guest():
    """Each line: the guest's answer (Linux 6.12, /dev/vhost-net, num 8, the rings
    of RINGS, measured with the guest agent's vhost ops)."""
    dev = device()
    assert dev.set_backend(0, True) == EFAULT and misses(dev) == [(W + 0x2000, 1)]  # used ring, RO
    assert dev.set_backend(1, True) == EFAULT and misses(dev) == [(W + 0x5000, 1)]
    assert dev.write(upd(W + 0x2000, 0x1000)) == (0, 72) and misses(dev) == []
    assert dev.set_backend(0, True) == 0 and misses(dev) == []  # RX: no handler until a kick
    assert dev.write(upd(W + 0x5000, 0x1000)) == (0, 72)
    assert dev.set_backend(1, True) == 0 and misses(dev) == [(W + 0x3000, 1)]  # TX: the handler at once: desc
    assert dev.write(upd(W + 0x3000, 0x1000)) == (0, 72) and misses(dev) == [(W + 0x4000, 1)]  # then avail
    assert dev.write(upd(W + 0x4000, 0x1000)) == (0, 72) and misses(dev) == []
    dev.kick(1)
    assert misses(dev) == []
    dev.kick(0)
    assert misses(dev) == [(W, 1)]
    assert dev.write(upd(W, 16 * 8 - 8)) == (0, 72) and misses(dev) == [(W + 0x78, 1)]  # first uncovered
    dev.kick(0)
    assert misses(dev) == [(W + 0x78, 1)]  # a duplicate: two pending MISSes at 0x40078 now
    assert dev.write(upd(W + 0x78, 8)) == (0, 72) and misses(dev) == [(W + 0x1000, 1)]  # one handler run
    assert dev.write(upd(W + 0x1000, 0x1000, perm=1)) == (0, 72)
    dev.kick(0)
    assert misses(dev) == []
    assert dev.write(inv(0, 0)) == (0, 72)  # iova 0 size 0: everything
    dev.kick(0)
    assert misses(dev) == [(W, 1)]
    dev.kick(1)
    assert misses(dev) == [(W + 0x3000, 1)]
    # equal starts: the older map is found (WO first: init_access's RO read fails, no MISS)
    assert dev.set_backend(0, False) == 0
    assert dev.write(upd(W + 0x2000, 0x100, perm=2)) == (0, 72) and dev.write(upd(W + 0x2000, 0x100, perm=1)) == (0, 72)
    assert dev.set_backend(0, True) == EFAULT and misses(dev) == []
    assert dev.write(inv(0, 0)) == (0, 72) and dev.set_backend(0, False) == 0
    assert dev.write(upd(W + 0x2000, 0x100, perm=1)) == (0, 72) and dev.write(upd(W + 0x2000, 0x100, perm=2)) == (0, 72)
    assert dev.set_backend(0, True) == 0
    # message formats
    assert dev.write(upd(0x100000, 0x1000, count=40)) == (0, 72)
    assert dev.write(upd(0x100000, 0x1000, count=39)) == (EINVAL, -1)
    assert dev.write(upd(0x100000, 0x1000, count=100)) == (0, 72)
    assert dev.write(upd(0x100000, 0x1000, count=3)) == (EINVAL, -1)
    assert dev.write(upd(0x100000, 0x1000, asid=5)) == (0, 72)  # no IOTLB_ASID on net: the asid is skipped
    assert dev.write(upd(0x100000, 0x1000, outer=1)) == (0, 72)
    assert dev.write(upd(0x100000, 0x1000, outer=3)) == (EINVAL, -1)
    assert dev.write(upd(0x100000, 0)) == (EINVAL, -1)
    for kind in (5, 6, 1, 4, 0):
        assert dev.write(IotlbMsg(kind)) == (EFAULT, -1)
    assert dev.write(upd(0, U64_MAX, perm=0, uaddr=0)) == (0, 72)
    assert dev.write(upd(1, U64_MAX, perm=0, uaddr=0)) == (0, 72)
    assert dev.write(upd(1, U64_MAX, perm=0, uaddr=2)) == (EFAULT, -1)  # vhost_overflow
    assert dev.write(upd(2**64 - 0x1000, 0x2000, perm=0, uaddr=0)) == (EFAULT, -1)  # iova + size - 1 wraps
    for end, ok in ((0x7FFFFFFFF000, True), (1 << 47, True), ((1 << 56) - 4096, True), ((1 << 56) - 4095, False)):
        for perm in (1, 2):
            assert dev.write(upd(0x200000, 0x1000, perm=perm, uaddr=end - 0x1000)) == ((0, 72) if ok else (EFAULT, -1))
    # an unread MISS is not pending: an UPDATE covering it re-queues nothing
    assert dev.write(inv(0, 0)) == (0, 72)
    assert dev.set_backend(0, False) == 0 and dev.set_backend(1, False) == 0
    assert dev.write(upd(W + 0x5000, 0x1000)) == (0, 72)
    assert dev.set_backend(1, True) == 0 and dev.pollin
    assert dev.write(upd(W + 0x3000, 0x1000)) == (0, 72)
    assert misses(dev) == [(W + 0x3000, 1)]  # only the start's MISS
    assert dev.write(upd(W + 0x4000, 0x1000)) == (0, 72) and misses(dev) == []
    dev.kick(1)
    assert misses(dev) == []


def test_the_2049th_update_retires_the_oldest_map():
    dev = device()
    assert dev.write(upd(W + 0x2000, 0x1000)) == (0, 72)  # the oldest: vq 0's used ring
    for k in range(MAX_IOTLB_ENTRIES - 1):
        assert dev.write(upd(k * 16, 8)) == (0, 72)
    assert dev.iotlb is not None and len(dev.iotlb) == MAX_IOTLB_ENTRIES
    assert dev.set_backend(0, True) == 0
    assert dev.set_backend(0, False) == 0
    assert dev.write(upd(0x100000, 8)) == (0, 72)  # the 2049th
    assert len(dev.iotlb) == MAX_IOTLB_ENTRIES
    assert dev.set_backend(0, True) == EFAULT and misses(dev) == [(W + 0x2000, 1)]


def test_miss_order_is_desc_avail_used_one_per_handler_run():
    dev = device(num=4)
    used_len = used_size(4)
    assert dev.write(upd(W + 0x2000, used_len, perm=1)) == (0, 72)  # RO: init_access only
    assert dev.set_backend(0, True) == 0
    dev.kick(0)
    assert misses(dev) == [(W, 1)]
    assert dev.write(upd(W, desc_size(4))) == (0, 72)
    assert misses(dev) == [(W + 0x1000, 1)]
    assert dev.write(upd(W + 0x1000, avail_size(4) - 2)) == (0, 72)
    assert misses(dev) == [(W + 0x1000 + avail_size(4) - 2, 1)]  # the first uncovered byte
    assert dev.write(upd(W + 0x1000 + avail_size(4) - 2, 2)) == (0, 72)
    assert misses(dev) == []  # used is mapped RO only: the WO prefetch fails without a MISS
    assert dev.write(inv(W + 0x2000, 1)) == (0, 72)
    dev.kick(0)
    assert misses(dev) == [(W + 0x2000, 2)]  # now a miss, and with perm WO


def test_init_access_needs_the_used_flags_and_idx_in_one_map_each():
    dev = device()
    assert dev.write(upd(W + 0x2000, 1)) == (0, 72) and dev.write(upd(W + 0x2001, 3)) == (0, 72)
    assert dev.set_backend(0, True) == EFAULT and misses(dev) == []  # used->flags spans two maps
    assert dev.write(inv(0, 0)) == (0, 72)
    assert dev.write(upd(W + 0x2000, 2)) == (0, 72)
    assert dev.set_backend(0, True) == EFAULT and misses(dev) == [(W + 0x2002, 1)]  # used->idx


def test_stop_drops_every_message_and_reset_keeps_them():
    dev = device()
    assert dev.set_backend(0, True) == EFAULT
    assert dev.pollin
    assert dev.set_features(FEATURES) == 0  # a new IOTLB; the MISS stays
    assert dev.pollin and dev.read() == Miss(W + 0x2000, 1, 0)
    assert dev.read() == EAGAIN and dev.read(71) == 0
    assert dev.set_backend(1, True) == EFAULT
    assert dev.set_backend(0, False) == 0
    assert not dev.pollin and dev.pending_list == []
    assert dev.set_backend(2, True) == ENOBUFS


def test_umem_access_ok():
    assert umem_access_ok(0, U64_MAX, 0) and not umem_access_ok(2, U64_MAX, 0)
    assert umem_access_ok(USER_PTR_MAX - 8, 8, 1) and not umem_access_ok(USER_PTR_MAX - 7, 8, 1)
    assert umem_access_ok(2**63, 8, 0) and not umem_access_ok(2**63, 8, 2)
    assert umem_access_ok(U64_MAX - 0x10, 0x11, 4) and not umem_access_ok(U64_MAX - 0x10, 0x13, 4)


# ------------------------------------------------------------------ the mutants' IOTLBs


def test_the_mutant_iotlbs_do_what_they_say():
    s = SplittingIOTLB(limit=0)
    s.add_range(0, 99, 1000, 3)
    s.del_range(10, 19)
    assert [(m.start, m.last, m.addr) for m in s] == [(0, 9, 1000), (20, 99, 1020)]
    r = RetireLowestIOTLB(limit=2, retire=True)
    r.add_range(50, 59, 0, 3)
    r.add_range(0, 9, 0, 3)
    r.add_range(70, 79, 0, 3)
    assert [m.start for m in r] == [50, 70]
    t = TieNewestIOTLB()
    t.add_range(0, 9, 0, 1)
    t.add_range(0, 9, 0, 2)
    t.add_range(0, 3, 0, 3)
    found = t.first(5, 5)
    assert found is not None and found.perm == 2
    assert set(MUTANTS) >= {"del-range-split", "retire-lowest", "tie-newest", "lookup-request-start"}


# ------------------------------------------------------------------ against a naive oracle


@dataclass
class NaiveNet:
    """The rules of SEMANTICS.md section 1 written as plainly as possible: the maps
    in a list (oldest first), lookups by scanning it."""

    maps: list[tuple[int, int, int]] = field(default_factory=list)  # (start, last, perm), oldest first
    started: list[bool] = field(default_factory=lambda: [False, False])
    read_list: list[tuple[int, int, int]] = field(default_factory=list)  # (iova, perm, vq)
    pending: list[tuple[int, int, int]] = field(default_factory=list)
    rings: list[tuple[int, int, int]] = field(default_factory=list)
    num: int = 1

    def write(self, m: IotlbMsg) -> int:
        if m.count < 40 or m.outer not in (1, 2) or (m.type == UPDATE and m.size == 0):
            return EINVAL
        last = (m.iova + m.size - 1) % 2**64
        if m.type == UPDATE:
            if not umem_access_ok(m.uaddr, m.size, m.perm) or last < m.iova:
                return EFAULT
            if len(self.maps) == MAX_IOTLB_ENTRIES:
                self.maps.pop(0)
            self.maps.append((m.iova, last, m.perm))
            woken: list[int] = []
            for p in list(self.pending):
                if m.iova <= p[0] <= last:
                    self.pending.remove(p)
                    if p[2] not in woken:
                        woken.append(p[2])
            for vq in woken:
                self.handler(vq)
            return 0
        if m.type == INVALIDATE:
            self.maps = [x for x in self.maps if not (x[0] <= last and m.iova <= x[1])]
            return 0
        return EFAULT

    def first(self, a: int, last: int) -> tuple[int, int, int] | None:
        hits = [(x[0], i) for i, x in enumerate(self.maps) if x[0] <= last and a <= x[1]]
        return self.maps[min(hits)[1]] if hits else None

    def access(self, vq: int, addr: int, length: int, perm: int, atomic: bool = False) -> bool:
        last, pieces = addr + length - 1, 0
        while addr <= last:
            m = self.first(addr, last)
            if m is None or m[0] > addr:
                self.read_list.append((addr, perm, vq))
                return False
            if not m[2] & perm:
                return False
            addr, pieces = m[1] + 1, pieces + 1
        return pieces == 1 or not atomic

    def handler(self, vq: int) -> None:
        if self.started[vq]:
            desc, avail, used = self.rings[vq]
            _ = (self.access(vq, desc, 16 * self.num, 1) and self.access(vq, avail, 4 + 2 * self.num, 1)
                 and self.access(vq, used, 4 + 8 * self.num, 2))

    def backend(self, vq: int, start: bool) -> int:
        if not start:
            self.read_list, self.pending = [], []
            self.started[vq] = False
            return 0
        if self.started[vq]:
            return 0
        used = self.rings[vq][2]
        if not (self.access(vq, used, 2, 1, True) and self.access(vq, used + 2, 2, 1, True)):
            return EFAULT
        self.started[vq] = True
        if vq == 1:
            self.handler(1)
        return 0

    def read_all(self) -> list[tuple[int, int]]:
        out = [(x[0], x[1]) for x in self.read_list]
        self.pending += self.read_list
        self.read_list = []
        return out


SMALL_RINGS = [(0x10, 0x30, 0x40), (0x60, 0x80, 0x90)]  # num 1: 16, 6 and 12 bytes
_addr = st.integers(0, 0xA8)
_size = st.one_of(st.integers(1, 0x40), st.sampled_from([0, U64_MAX, 2**63]))
_perm = st.sampled_from([3, 3, 1, 2, 0])


class DeviceAgainstOracle(RuleBasedStateMachine):
    """Random messages, starts, stops, kicks and reads in a 0xa8-byte iova space
    with six 1-entry rings: the model and the naive oracle must answer alike."""

    def __init__(self) -> None:
        super().__init__()
        self.dev = device(num=1, rings=SMALL_RINGS)
        self.naive = NaiveNet(rings=SMALL_RINGS, num=1)

    @rule(iova=_addr, size=_size, perm=_perm, big=st.booleans())
    def update(self, iova: int, size: int, perm: int, big: bool) -> None:
        msg = upd(iova, size, perm, uaddr=0 if perm == 0 else None)
        assert self.dev.write(msg)[0] == self.naive.write(msg)

    @rule(iova=_addr, size=st.one_of(st.integers(0, 0x40), st.just(U64_MAX)))
    def invalidate(self, iova: int, size: int) -> None:
        assert self.dev.write(inv(iova, size))[0] == self.naive.write(inv(iova, size))

    @rule(n=st.integers(1, 40))
    def fill_far(self, n: int) -> None:
        for k in range(n):
            msg = upd(0x1000 + 8 * k, 8)
            assert self.dev.write(msg)[0] == self.naive.write(msg)

    @precondition(lambda self: self.dev.iotlb is not None and len(self.dev.iotlb) < 64)
    @rule(n=st.integers(MAX_IOTLB_ENTRIES - 20, MAX_IOTLB_ENTRIES + 4))
    def fill_to_the_limit(self, n: int) -> None:
        for k in range(n):
            msg = upd(0x100000 + 8 * k, 8)
            assert self.dev.write(msg)[0] == self.naive.write(msg)

    @rule(vq=st.integers(0, 1), start=st.booleans())
    def backend(self, vq: int, start: bool) -> None:
        assert self.dev.set_backend(vq, start) == self.naive.backend(vq, start)

    @rule(vq=st.integers(0, 1))
    def kick(self, vq: int) -> None:
        self.dev.kick(vq)
        self.naive.handler(vq)

    @rule()
    def read(self) -> None:
        assert misses(self.dev) == self.naive.read_all()

    @invariant()
    def same_maps_and_queue(self) -> None:
        assert self.dev.iotlb is not None
        assert sorted((m.start, m.last, m.perm) for m in self.dev.iotlb) == sorted(self.naive.maps)
        assert [(m.iova, m.perm, m.vq) for m in self.dev.read_list] == self.naive.read_list
        assert self.dev.pollin == bool(self.naive.read_list)


DeviceAgainstOracle.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None,
                                                 suppress_health_check=list(HealthCheck))
test_device_against_naive_oracle = DeviceAgainstOracle.TestCase


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_every_mutant_device_differs_from_the_model_somewhere(name):
    """A hand-made sequence per mutant where the mutant answers differently."""
    good, bad = device(), MUTANTS[name].factory()
    for d in (good, bad):
        d.set_features(FEATURES)
        for i, (desc, avail, used) in enumerate(RINGS):
            d.set_vring(i, 8, desc, avail, used)
    script = {
        "del-range-split": [upd(W + 0x2000, 0x1000), inv(W + 0x2800, 1)],
        "retire-lowest": [upd(W + 0x2000, 0x1000)] + [upd(16 * k, 8) for k in range(MAX_IOTLB_ENTRIES)],
        "tie-newest": [upd(W + 0x2000, 0x100, perm=2), upd(W + 0x2000, 0x100, perm=1)],
        "lookup-request-start": [upd(W + 0x2000, 3)],  # used->idx: 0x42002 mapped, 0x42003 not
    }[name]
    for msg in script:
        assert good.write(msg) == bad.write(msg)
    answers = [(d.set_backend(0, True), misses(d)) for d in (good, bad)]
    assert answers[0] != answers[1]
