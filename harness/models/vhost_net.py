"""Reference model of the vhost-net device IOTLB as user space sees it: what
write(2) of an IOTLB message answers, which MISS messages read(2) returns and in
what order, and whether ``VHOST_NET_SET_BACKEND`` (a start) succeeds.

The model holds one ``/dev/vhost-net`` after SET_OWNER and SET_MEM_TABLE (0
regions): its device IOTLB (:class:`harness.models.iotlb.IOTLB`, 2,048 maps with
retire, as ``iotlb_alloc`` makes it), the two virtqueues (RX = 0, TX = 1) with
their ring iovas, whether each has a backend, and the two message lists of the
device (``read_list``: queued, not yet read; ``pending_list``: read MISSes waiting
for an UPDATE). Work the kernel's worker thread would run (a vq's handler) runs
at once, after the call that queued it: the guest agent flushes the worker before
anything else can change the IOTLB (see guest_agent/vhost.py), so the kernel's
asynchronous run sees the same state.

Addresses: ``iova`` is an IO-virtual address (the vrings are placed at iovas;
the IOTLB maps iovas); ``uaddr`` is a user virtual address of the process that
owns the device. Sizes are in bytes. Errors are errno numbers returned as values,
never raised: ``write`` returns ``(errno, bytes written)``.

Semantics (Linux 6.12):

* ``vhost_chr_write_iter`` (drivers/vhost/vhost.c): the outer message type (1 =
  ``struct vhost_msg``, 2 = ``struct vhost_msg_v2``) is read first; a short
  buffer (fewer than 40 bytes: the type, 4 skipped bytes, the 32-byte
  ``struct vhost_iotlb_msg``), another outer type, or an UPDATE of size 0 is
  EINVAL; every error of ``vhost_process_iotlb_msg`` becomes EFAULT; success
  returns 72 whatever the count (the bytes after the first 40 are ignored).
  vhost-net offers no ``VHOST_BACKEND_F_IOTLB_ASID``, so the asid word of a v2
  message is skipped, not checked.
* ``vhost_process_iotlb_msg``: UPDATE needs an IOTLB (EFAULT before
  SET_FEATURES with ACCESS_PLATFORM), ``umem_access_ok`` (``vhost_overflow`` of
  uaddr + size, and ``access_ok`` when perm has RO or WO), then
  ``vhost_iotlb_add_range(iova, iova + size - 1)`` (EFAULT when that wraps), then
  ``vhost_iotlb_notify_vq``. INVALIDATE is ``vhost_iotlb_del_range(iova, iova +
  size - 1)`` computed mod 2**64 (size 0 at iova 0 removes everything). Any other
  inner type is EFAULT.
* ``vhost_iotlb_notify_vq``: every MISS in ``pending_list`` whose iova lies in
  the UPDATE's range is dropped and its vq's handler queued (a vq queued twice
  runs once: ``vhost_work_queue`` does not queue queued work).
* ``vhost_chr_read_iter``: a read of fewer than 72 bytes returns 0; otherwise the
  head of ``read_list`` moves to ``pending_list`` (EAGAIN when empty: the device
  is opened O_NONBLOCK). poll() is EPOLLIN while ``read_list`` is not empty.
* ``translate_desc`` and ``iotlb_access_ok``: a lookup of [addr, addr + len) walks
  the IOTLB map by map (``vhost_iotlb_itree_first``: the lowest-start map
  overlapping what is left, ties in insertion order); a map starting above the
  address (or none) is a miss: a MISS {iova = that first uncovered address, perm =
  the access} is queued on ``read_list``; a map lacking the access bit stops the
  lookup with no message. ``__vhost_get_user_slow`` also fails (no message) when
  the bytes span more than one map. The per-vq ``meta_iotlb`` cache is not
  modelled: it only holds a map that covers a whole ring with the access, which
  the lookup would find too, and every UPDATE and INVALIDATE clears it.
* ``vhost_net_set_backend`` (drivers/vhost/net.c): vq index >= 2 is ENOBUFS; fd
  -1 (a stop) first drops every message of both lists (``vhost_clear_msg``); the
  same socket again does nothing; a new socket runs ``vhost_vq_init_access``,
  which writes the used ring's flags and reads its idx through
  ``__vhost_get_user`` (2 bytes at ``used`` then at ``used + 2``, both looked up
  with access RO): a failure is EFAULT and the backend stays as it was. A started
  TX vq polls its socket for EPOLLOUT, which a packet socket always is: its
  handler runs at once.
* ``handle_tx`` / ``handle_rx``: with a backend, ``vq_meta_prefetch`` looks up
  the descriptor table (16 * num bytes, RO), then the avail ring (4 + 2 * num
  bytes, RO), then the used ring (4 + 8 * num bytes, WO), stopping at the first
  that fails (at most one MISS per run). Past the prefetch the rings hold zeros
  (an empty avail ring), so nothing else is looked up.
* ``vhost_init_device_iotlb`` (SET_FEATURES with ACCESS_PLATFORM): a new, empty
  IOTLB each time; the message lists stay.

Limits: no VIRTIO_RING_F_EVENT_IDX (ring sizes above), no log, no packets on the
backend (the socket is of protocol 0), one vCPU (a handler queued twice within
one syscall runs once). ``USER_PTR_MAX`` is the largest end of a user range
``access_ok`` allows: 2**56 - 4096 with 5-level paging (what the project's TCG
guest has), 2**47 - 4096 without.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from harness.models.iotlb import U64_MAX, VHOST_MAP_RO, VHOST_MAP_WO, IOTLB

__all__ = [
    "EINVAL", "EFAULT", "ENOBUFS", "EBUSY", "EOPNOTSUPP", "EAGAIN",
    "MAX_IOTLB_ENTRIES", "MSG_SIZE", "MSG_MIN_SIZE", "USER_PTR_MAX", "USER_PTR_MAX_4LEVEL",
    "VHOST_IOTLB_MSG", "VHOST_IOTLB_MSG_V2", "MISS", "UPDATE", "INVALIDATE",
    "VIRTIO_F_VERSION_1", "VIRTIO_F_ACCESS_PLATFORM", "VHOST_NET_FEATURES", "RX", "TX",
    "IotlbMsg", "Miss", "Vring", "Lookup", "VhostNetDevice", "new_iotlb",
    "desc_size", "avail_size", "used_size", "umem_access_ok",
]

EINVAL: Final = 22
EFAULT: Final = 14
ENOBUFS: Final = 105
EBUSY: Final = 16
EOPNOTSUPP: Final = 95
EAGAIN: Final = 11

MAX_IOTLB_ENTRIES: Final = 2048
"""``max_iotlb_entries`` (module parameter of vhost, default 2048)."""
MSG_SIZE: Final = 72
"""``sizeof(struct vhost_msg_v2)`` and ``sizeof(struct vhost_msg)``."""
MSG_MIN_SIZE: Final = 40
"""Bytes write() needs: type (4), skipped (4), ``struct vhost_iotlb_msg`` (32)."""
USER_PTR_MAX: Final = 2**56 - 4096
"""Largest ``uaddr + size`` access_ok allows with 5-level paging (measured)."""
USER_PTR_MAX_4LEVEL: Final = 2**47 - 4096
"""The same with 4-level paging (TASK_SIZE_MAX)."""

VHOST_IOTLB_MSG: Final = 1
VHOST_IOTLB_MSG_V2: Final = 2
MISS: Final = 1
UPDATE: Final = 2
INVALIDATE: Final = 3

VIRTIO_F_VERSION_1: Final = 1 << 32
VIRTIO_F_ACCESS_PLATFORM: Final = 1 << 33
VHOST_NET_FEATURES: Final = 0x1033D008000
"""What VHOST_GET_FEATURES offers on the project's kernel (measured)."""

RX: Final = 0
TX: Final = 1
_NVQS: Final = 2


def new_iotlb() -> IOTLB:
    """The IOTLB ``iotlb_alloc`` (drivers/vhost/vhost.c) makes for net and vsock."""
    return IOTLB(limit=MAX_IOTLB_ENTRIES, retire=True)


def desc_size(num: int) -> int:
    """``vhost_get_desc_size``: 16 bytes per descriptor."""
    return 16 * num


def avail_size(num: int) -> int:
    """``vhost_get_avail_size`` without EVENT_IDX: flags, idx, ring[num] (u16 each)."""
    return 4 + 2 * num


def used_size(num: int) -> int:
    """``vhost_get_used_size`` without EVENT_IDX: flags, idx, ring[num] (8 bytes each)."""
    return 4 + 8 * num


def umem_access_ok(uaddr: int, size: int, perm: int, user_ptr_max: int = USER_PTR_MAX) -> bool:
    """``umem_access_ok`` (drivers/vhost/vhost.c): ``vhost_overflow`` (uaddr + size
    past 2**64), then, if perm has RO or WO, ``access_ok``: uaddr + size must not
    wrap and must be at most ``user_ptr_max``."""
    if size and uaddr > U64_MAX - size + 1:
        return False
    if perm & (VHOST_MAP_RO | VHOST_MAP_WO):
        end = (uaddr + size) & U64_MAX
        if end > user_ptr_max or end < uaddr:
            return False
    return True


@dataclass(frozen=True)
class IotlbMsg:
    """One message for write(2): ``struct vhost_iotlb_msg`` (``type``, ``iova``,
    ``size``, ``uaddr``, ``perm``) inside the outer ``outer`` type (2: v2, 1: v1)
    with ``asid`` (v2 only), written with a buffer of ``count`` bytes."""

    type: int
    iova: int = 0
    size: int = 0
    uaddr: int = 0
    perm: int = 0
    outer: int = VHOST_IOTLB_MSG_V2
    asid: int = 0
    count: int = MSG_SIZE

    @property
    def last(self) -> int:
        """``iova + size - 1`` mod 2**64: the kernel's last byte."""
        return (self.iova + self.size - 1) & U64_MAX


@dataclass(frozen=True)
class Miss:
    """A MISS message: ``iova`` (the first uncovered address), ``perm`` (the access,
    ``VHOST_MAP_RO``/``WO``), and the ``vq`` that looked it up (not part of the
    message; the kernel keeps it to re-queue that vq's handler)."""

    iova: int
    perm: int
    vq: int


@dataclass
class Vring:
    """One virtqueue: ``num`` descriptors, ring iovas ``desc``, ``avail``, ``used``,
    and whether a backend socket is set (``started``)."""

    num: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    started: bool = False


@dataclass(frozen=True)
class Lookup:
    """The result of a lookup of ``[addr, addr + length)``: ``kind`` is ``ok``,
    ``miss`` (``iova``: the first uncovered address) or ``eperm`` (``iova``: where
    a map without the access bit was found); ``pieces``: maps walked."""

    kind: str
    iova: int = 0
    pieces: int = 0


@dataclass
class VhostNetDevice:
    """One ``/dev/vhost-net`` after SET_OWNER and SET_MEM_TABLE (see the module
    docstring). ``iotlb`` is None until SET_FEATURES with ACCESS_PLATFORM;
    ``make_iotlb`` makes each new one (mutants pass their own)."""

    make_iotlb: Callable[[], IOTLB] = new_iotlb
    user_ptr_max: int = USER_PTR_MAX
    iotlb: IOTLB | None = None
    vqs: list[Vring] = field(default_factory=lambda: [Vring() for _ in range(_NVQS)])
    read_list: deque[Miss] = field(default_factory=deque)
    pending_list: list[Miss] = field(default_factory=list)
    _queued: list[int] = field(default_factory=list)

    # ---- ioctls -------------------------------------------------------------

    def set_features(self, features: int) -> int:
        """VHOST_SET_FEATURES (``vhost_net_set_features``): EOPNOTSUPP for a bit not
        offered; with ACCESS_PLATFORM a new, empty IOTLB (``vhost_init_device_iotlb``)."""
        if features & ~VHOST_NET_FEATURES:
            return EOPNOTSUPP
        if features & VIRTIO_F_ACCESS_PLATFORM:
            self.iotlb = self.make_iotlb()
        return 0

    def set_vring(self, index: int, num: int, desc: int, avail: int, used: int) -> int:
        """VHOST_SET_VRING_NUM then VHOST_SET_VRING_ADDR (``vhost_vring_set_num``,
        ``vhost_vring_set_addr``): ENOBUFS for index >= 2, EBUSY with a backend,
        EINVAL for num 0, above 0xffff or not a power of 2, for avail not 2-aligned
        or used not 4-aligned. No lookup: with a device IOTLB the addresses are
        iovas checked at prefetch time (``vq_access_ok``)."""
        if not 0 <= index < _NVQS:
            return ENOBUFS
        vq = self.vqs[index]
        if vq.started:
            return EBUSY
        if not num or num > 0xFFFF or num & (num - 1):
            return EINVAL
        vq.num = num
        if avail & 1 or used & 3:
            return EINVAL
        vq.desc, vq.avail, vq.used = desc, avail, used
        return 0

    def set_backend(self, index: int, start: bool) -> int:
        """VHOST_NET_SET_BACKEND with the packet socket (``start``) or fd -1
        (``vhost_net_set_backend``); the errno (see the module docstring)."""
        if not 0 <= index < _NVQS:
            return ENOBUFS
        vq = self.vqs[index]
        if not start:
            self.read_list.clear()
            self.pending_list.clear()
        if start == vq.started:
            return 0
        if start:
            if not self._init_access(index):
                return EFAULT
            vq.started = True
            if index == TX:  # vhost_net_enable_vq: the socket is writable at once
                self._queue(index)
        else:
            vq.started = False
        self._run_queued()
        return 0

    def kick(self, index: int) -> None:
        """A write to vq ``index``'s kick eventfd: its handler runs."""
        self._queue(index)
        self._run_queued()

    # ---- the character device -----------------------------------------------

    def write(self, msg: IotlbMsg) -> tuple[int, int]:
        """write(2) of ``msg``: ``(0, 72)`` or ``(errno, -1)`` (``vhost_chr_write_iter``)."""
        if msg.count < 4 or msg.outer not in (VHOST_IOTLB_MSG, VHOST_IOTLB_MSG_V2):
            return EINVAL, -1
        if msg.count < MSG_MIN_SIZE:
            return EINVAL, -1
        if msg.type == UPDATE and msg.size == 0:
            return EINVAL, -1
        err = self._process(msg)
        self._run_queued()
        return (EFAULT, -1) if err else (0, MSG_SIZE)

    def read(self, count: int = MSG_SIZE) -> Miss | int:
        """read(2) of ``count`` bytes: the next MISS (moved to ``pending_list``),
        0 for a count below 72, EAGAIN (as an int) when nothing is queued."""
        if count < MSG_SIZE:
            return 0
        if not self.read_list:
            return EAGAIN
        miss = self.read_list.popleft()
        self.pending_list.append(miss)
        return miss

    def read_all(self) -> list[Miss]:
        """Every queued MISS, in order (reads until EAGAIN)."""
        out: list[Miss] = []
        while self.read_list:
            miss = self.read(MSG_SIZE)
            assert isinstance(miss, Miss)
            out.append(miss)
        return out

    @property
    def pollin(self) -> bool:
        """poll()'s EPOLLIN (``vhost_chr_poll``): a message waits in ``read_list``."""
        return bool(self.read_list)

    # ---- lookups --------------------------------------------------------------

    def lookup(self, addr: int, length: int, access: int) -> Lookup:
        """Walk [addr, addr + length) through the IOTLB as ``translate_desc`` and
        ``iotlb_access_ok`` do (see the module docstring). Queues nothing."""
        iotlb = self.iotlb
        if iotlb is None:
            return Lookup("miss", addr)
        last = (addr + length - 1) & U64_MAX
        done, pieces = 0, 0
        while length > done:
            m = iotlb.first(addr, last)
            if m is None or m.start > addr:
                return Lookup("miss", addr, pieces)
            if not m.perm & access:
                return Lookup("eperm", addr, pieces)
            size = (m.last - addr + 1) & U64_MAX
            done += size
            addr = (addr + size) & U64_MAX
            pieces += 1
        return Lookup("ok", addr, pieces)

    def _miss(self, vq: int, request: int, lookup: Lookup, access: int) -> None:
        """``vhost_iotlb_miss``: queue the MISS of a failed lookup of ``request``."""
        self.read_list.append(Miss(lookup.iova, access, vq))

    def _access(self, vq: int, addr: int, length: int, access: int, *, atomic: bool = False) -> bool:
        """One ring access of vq ``vq``; False when it fails. Without a device IOTLB
        the ring addresses are user addresses, which is not modelled: it fails."""
        if self.iotlb is None:
            return False
        result = self.lookup(addr, length, access)
        if result.kind == "miss":
            self._miss(vq, addr, result, access)
            return False
        if result.kind == "eperm":
            return False
        return not atomic or result.pieces == 1

    def _init_access(self, index: int) -> bool:
        """``vhost_vq_init_access``: put used->flags, get used->idx, 2 bytes each
        through ``__vhost_get_user`` (looked up RO, in one map)."""
        vq = self.vqs[index]
        return (self._access(index, vq.used, 2, VHOST_MAP_RO, atomic=True)
                and self._access(index, (vq.used + 2) & U64_MAX, 2, VHOST_MAP_RO, atomic=True))

    def _prefetch(self, index: int) -> bool:
        """``vq_meta_prefetch``: desc (RO), avail (RO), used (WO); stops at the first failure."""
        vq = self.vqs[index]
        return (self._access(index, vq.desc, desc_size(vq.num), VHOST_MAP_RO)
                and self._access(index, vq.avail, avail_size(vq.num), VHOST_MAP_RO)
                and self._access(index, vq.used, used_size(vq.num), VHOST_MAP_WO))

    def _handler(self, index: int) -> None:
        """``handle_tx`` / ``handle_rx``: nothing without a backend, else the prefetch."""
        if self.vqs[index].started:
            self._prefetch(index)

    def _queue(self, index: int) -> None:
        if index not in self._queued:
            self._queued.append(index)

    def _run_queued(self) -> None:
        while self._queued:
            self._handler(self._queued.pop(0))

    # ---- messages -------------------------------------------------------------

    def _process(self, msg: IotlbMsg) -> int:
        """``vhost_process_iotlb_msg``: 0 or an errno (write() turns any into EFAULT)."""
        iotlb = self.iotlb
        if msg.type == UPDATE:
            if iotlb is None or not umem_access_ok(msg.uaddr, msg.size, msg.perm, self.user_ptr_max):
                return EFAULT
            if msg.last < msg.iova:
                return EFAULT  # vhost_iotlb_add_range: last < start (the kernel says ENOMEM)
            iotlb.add_range(msg.iova, msg.last, msg.uaddr, msg.perm)
            self._notify(msg.iova, msg.last)
            return 0
        if msg.type == INVALIDATE:
            if iotlb is None:
                return EFAULT
            iotlb.del_range(msg.iova, msg.last)
            return 0
        return EINVAL

    def _notify(self, iova: int, last: int) -> None:
        """``vhost_iotlb_notify_vq``: drop the pending MISSes in [iova, last], queue their vqs."""
        kept: list[Miss] = []
        for miss in self.pending_list:
            if iova <= miss.iova <= last:
                self._queue(miss.vq)
            else:
                kept.append(miss)
        self.pending_list = kept
