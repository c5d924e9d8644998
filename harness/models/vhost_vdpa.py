"""Reference model of the vhost-vdpa IOTLB as user space sees it, with a vdpa_sim
device in PA mode (``vdpa_sim.use_va=0``): the messages written to
``/dev/vhost-vdpa-N``, what write() answers, the maps each address space holds,
and the pages they pin (``mm->pinned_vm``, VmPin in /proc/PID/status).

Sources (Linux 6.12):

* ``drivers/vhost/vhost.c``: ``vhost_chr_write_iter`` (message framing; UPDATE
  with size 0 is EINVAL before the handler; every handler error becomes EFAULT;
  success returns 72, the size of ``struct vhost_msg_v2`` / ``vhost_msg``;
  the asid field is read only once VHOST_BACKEND_F_IOTLB_ASID was acked).
* ``drivers/vhost/vdpa.c``: ``vhost_vdpa_process_iotlb_msg`` (owner check,
  address space lookup and allocation, the batch rules),
  ``vhost_vdpa_process_iotlb_update`` (range check, EEXIST),
  ``vhost_vdpa_pa_map`` (RLIMIT_MEMLOCK, pinning, one map per physically
  contiguous run), ``vhost_vdpa_map`` (pinned_vm += PFN_DOWN(size) per map),
  ``vhost_vdpa_unmap`` / ``vhost_vdpa_pa_unmap`` (INVALIDATE: every
  intersecting map removed whole, unpinned, pinned_vm -= PFN_DOWN(size)),
  ``vhost_vdpa_unlocked_ioctl`` (SET_BACKEND_FEATURES, GET_BACKEND_FEATURES),
  ``vhost_vdpa_open`` / ``vhost_vdpa_release`` / ``vhost_vdpa_cleanup``
  (exclusive open; close removes every address space and unpins it all;
  ``vhost_vdpa_reset`` clears the batch flag at open and close).
* ``drivers/vdpa/vdpa_sim/vdpa_sim.c`` and ``vdpa_sim_net.c``: the iova range
  is [0, U64_MAX] (``vdpasim_get_iova_range``); vdpasim_net has 2 address
  spaces, vdpasim_blk 1; with the default ``batch_mapping=1`` the device only
  has ``set_map``, which ``vhost_vdpa_map``/``vhost_vdpa_unmap`` call after
  each change outside a batch and BATCH_END calls once. ``set_map`` copies the
  whole IOTLB into the simulator's own one, whose ``max_iotlb_entries`` limit
  is not enforced (``vhost_iotlb_add_range_ctx`` only enforces it with
  VHOST_IOTLB_FLAG_RETIRE), so it never fails: what a batch defers is invisible
  to user space except through the device's own DMA.
* ``drivers/vhost/iotlb.c``: the interval part, modelled by
  :class:`harness.models.iotlb.IOTLB`.

Units: iova, size, uaddr in bytes; ``pinned_vm`` and the memlock limit in
4 KiB pages. User memory is given as a table of pages (page-aligned user VA ->
:class:`UserPage`: physical address, writable or not); which pages are
physically contiguous decides how many maps an UPDATE makes.

Everything is deterministic and pure: no I/O.
"""

from __future__ import annotations

import errno as E
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from harness.models.iotlb import IOTLB, U64_MAX, IOTLBMap

__all__ = [
    "PAGE_SIZE", "MSG_V2_SIZE", "VHOST_IOTLB_MSG", "VHOST_IOTLB_MSG_V2",
    "IOTLB_MISS", "IOTLB_UPDATE", "IOTLB_INVALIDATE", "IOTLB_ACCESS_FAIL", "IOTLB_BATCH_BEGIN",
    "IOTLB_BATCH_END", "VHOST_ACCESS_RO", "VHOST_ACCESS_WO", "VHOST_ACCESS_RW",
    "F_IOTLB_MSG_V2", "F_IOTLB_BATCH", "F_IOTLB_ASID", "F_SUSPEND", "F_RESUME",
    "F_ENABLE_AFTER_DRIVER_OK", "F_DESC_ASID", "F_IOTLB_PERSIST", "VDPASIM_BACKEND_FEATURES",
    "UserPage", "user_memory", "Mm", "MsgResult", "VhostVdpa",
]

PAGE_SIZE: Final = 4096
MSG_V2_SIZE: Final = 72
"""sizeof(struct vhost_msg_v2) == sizeof(struct vhost_msg): what a successful write() returns."""
_MSG_MIN: Final = 40
"""Bytes write() needs: the 4-byte outer type, 4 bytes (asid or padding), the 32-byte vhost_iotlb_msg."""

VHOST_IOTLB_MSG: Final = 1
VHOST_IOTLB_MSG_V2: Final = 2

IOTLB_MISS: Final = 1
IOTLB_UPDATE: Final = 2
IOTLB_INVALIDATE: Final = 3
IOTLB_ACCESS_FAIL: Final = 4
IOTLB_BATCH_BEGIN: Final = 5
IOTLB_BATCH_END: Final = 6

VHOST_ACCESS_RO: Final = 1
VHOST_ACCESS_WO: Final = 2
VHOST_ACCESS_RW: Final = 3

# VHOST_BACKEND_F_* (include/uapi/linux/vhost_types.h), as bit values
F_IOTLB_MSG_V2: Final = 1 << 1
F_IOTLB_BATCH: Final = 1 << 2
F_IOTLB_ASID: Final = 1 << 3
F_SUSPEND: Final = 1 << 4
F_RESUME: Final = 1 << 5
F_ENABLE_AFTER_DRIVER_OK: Final = 1 << 6
F_DESC_ASID: Final = 1 << 7
F_IOTLB_PERSIST: Final = 1 << 8

VDPASIM_BACKEND_FEATURES: Final = (F_IOTLB_MSG_V2 | F_IOTLB_BATCH | F_IOTLB_ASID | F_SUSPEND | F_RESUME
                                   | F_ENABLE_AFTER_DRIVER_OK | F_IOTLB_PERSIST)
"""What VHOST_GET_BACKEND_FEATURES reports for a vdpa_sim device (0x17e, measured):
vhost-vdpa's own MSG_V2|BATCH|ASID, SUSPEND and RESUME (vdpa_sim has both ops),
IOTLB_PERSIST (it has reset_map) and vdpa_sim's ENABLE_AFTER_DRIVER_OK; no
DESC_ASID (no get_vq_desc_group)."""

_SETTABLE: Final = (F_IOTLB_MSG_V2 | F_IOTLB_BATCH | F_IOTLB_ASID | F_DESC_ASID | F_IOTLB_PERSIST | F_SUSPEND
                    | F_RESUME | F_ENABLE_AFTER_DRIVER_OK)
_PAGE_MASK: Final = U64_MAX & ~(PAGE_SIZE - 1)
_U64: Final = 1 << 64


@dataclass(frozen=True)
class UserPage:
    """One 4 KiB page of the process: ``phys`` its physical (guest-physical)
    address, ``writable`` whether pin_user_pages with FOLL_WRITE succeeds on it."""

    phys: int
    writable: bool = True


def user_memory(user_va: int, phys_pages: Iterable[int | None], readonly: Iterable[int] = ()) -> dict[int, UserPage]:
    """The page table of a region at ``user_va`` (page-aligned): page ``i`` at
    ``user_va + i * PAGE_SIZE`` has physical address ``phys_pages[i]`` (None: not
    present, i.e. not pinnable); the page indexes in ``readonly`` are read-only.
    ``phys_pages`` may come from the guest (``mem.gpa``, ``vhost_vdpa.region``)."""
    ro = set(readonly)
    return {user_va + i * PAGE_SIZE: UserPage(p, i not in ro)
            for i, p in enumerate(phys_pages) if p is not None}


@dataclass
class Mm:
    """The process's ``mm_struct`` as far as pinning goes: ``pinned_vm`` (pages,
    shown as VmPin) and RLIMIT_MEMLOCK in pages (None: unlimited). Shared by every
    vhost-vdpa device the process opens (and by iommufd's pins in the kernel)."""

    pinned_vm: int = 0
    memlock_pages: int | None = 2048
    """The default RLIMIT_MEMLOCK is 8 MiB (measured in the guest: ``ulimit -l`` 8192)."""


@dataclass(frozen=True)
class MsgResult:
    """What one write() of a message did.

    ``errno``: what write() reports (0; EINVAL from ``vhost_chr_write_iter``
    itself; EFAULT for any error of the handler). ``cause``: the handler's own
    errno behind an EFAULT (EPERM not the owner, EINVAL bad asid / batch
    mismatch / range / unknown type, EEXIST overlap, ENOMEM over
    RLIMIT_MEMLOCK, EFAULT user memory not pinnable), else equal to ``errno``.
    ``written``: 72 on success, else -1.
    """

    errno: int
    cause: int = 0

    @property
    def written(self) -> int:
        return MSG_V2_SIZE if self.errno == 0 else -1


def _pfn_up(x: int) -> int:
    """PFN_UP in unsigned long arithmetic (the addition wraps at 2**64)."""
    return ((x + PAGE_SIZE - 1) % _U64) >> 12


class VhostVdpa:
    """One open ``/dev/vhost-vdpa-N`` of a vdpa_sim device in PA mode.

    ``memory``: the process's pages (user VA -> :class:`UserPage`); ``nas``:
    the device's address spaces (vdpasim_net 2, vdpasim_blk 1); ``iova_first``,
    ``iova_last``: GET_IOVA_RANGE (vdpa_sim: 0, U64_MAX); ``mm``: the process's
    :class:`Mm` (a fresh one if None); ``owner``: SET_OWNER already done.

    State: ``ases`` (asid -> :class:`IOTLB`; an address space exists from the
    first UPDATE or BATCH_BEGIN naming it), ``in_batch``/``batch_asid``,
    ``acked_backend_features``, ``owner``, ``closed``.
    """

    def __init__(self, memory: Mapping[int, UserPage], *, nas: int = 2, iova_first: int = 0,
                 iova_last: int = U64_MAX, mm: Mm | None = None, owner: bool = False) -> None:
        self.memory = memory
        self.nas = nas
        self.iova_first = iova_first
        self.iova_last = iova_last
        self.mm = mm if mm is not None else Mm()
        self.owner = owner
        self.ases: dict[int, IOTLB] = {}
        self.in_batch = False
        self.batch_asid = 0
        self.acked_backend_features = 0
        self.closed = False

    # -- ioctls -------------------------------------------------------------

    def set_owner(self) -> int:
        """VHOST_SET_OWNER (``vhost_dev_set_owner``): 0, or EBUSY if already owned."""
        if self.owner:
            return E.EBUSY
        self.owner = True
        return 0

    def get_backend_features(self) -> int:
        """VHOST_GET_BACKEND_FEATURES of vdpa_sim: :data:`VDPASIM_BACKEND_FEATURES`."""
        return VDPASIM_BACKEND_FEATURES

    def set_backend_features(self, features: int) -> int:
        """VHOST_SET_BACKEND_FEATURES (``vhost_vdpa_unlocked_ioctl``): EOPNOTSUPP for a
        bit outside the settable set (bit 0 included), EINVAL for DESC_ASID without
        IOTLB_ASID, EOPNOTSUPP for DESC_ASID (vdpa_sim has no descriptor groups);
        else 0 and the features are acked (``vhost_set_backend_features``). Works
        before SET_OWNER."""
        if features & ~_SETTABLE:
            return E.EOPNOTSUPP
        if features & F_DESC_ASID and not features & F_IOTLB_ASID:
            return E.EINVAL
        if features & F_DESC_ASID:
            return E.EOPNOTSUPP
        self.acked_backend_features = features
        return 0

    # -- messages -----------------------------------------------------------

    def write(self, type: int, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0, asid: int = 0, *,
              version: int = VHOST_IOTLB_MSG_V2, length: int = MSG_V2_SIZE) -> MsgResult:
        """write() of one message (``vhost_chr_write_iter``): outer ``version``
        (VHOST_IOTLB_MSG 1 or _V2 2; another: EINVAL), ``asid`` (u32, used only for
        V2 once IOTLB_ASID is acked; else 0), then the ``vhost_iotlb_msg`` fields
        (``type``, ``perm`` u8; ``iova``, ``size``, ``uaddr`` u64). Fewer than 40
        bytes: EINVAL; an UPDATE of size 0: EINVAL; then the handler
        (:meth:`handle`), whose errors all read as EFAULT.

        Raises ValueError for a field outside its type, RuntimeError after close.
        """
        if self.closed:
            raise RuntimeError("write() on a closed vhost-vdpa file")
        for name, value, limit in (("iova", iova, U64_MAX), ("size", size, U64_MAX), ("uaddr", uaddr, U64_MAX),
                                   ("perm", perm, 0xFF), ("type", type, 0xFF), ("asid", asid, 0xFFFFFFFF)):
            if not 0 <= value <= limit:
                raise ValueError(f"{name} {value!r} does not fit its field")
        if length < 4 or version not in (VHOST_IOTLB_MSG, VHOST_IOTLB_MSG_V2) or length < _MSG_MIN:
            return MsgResult(E.EINVAL, E.EINVAL)
        if version == VHOST_IOTLB_MSG or not self.acked_backend_features & F_IOTLB_ASID:
            asid = 0
        if type == IOTLB_UPDATE and size == 0:
            return MsgResult(E.EINVAL, E.EINVAL)
        cause = self.handle(asid, type, iova, size, uaddr, perm)
        return MsgResult(E.EFAULT if cause else 0, cause)

    def handle(self, asid: int, type: int, iova: int, size: int, uaddr: int, perm: int) -> int:
        """``vhost_vdpa_process_iotlb_msg``: the handler's errno (0 on success).

        EPERM if not the owner. UPDATE and BATCH_BEGIN create address space
        ``asid`` if it does not exist and ``asid < nas`` (else EINVAL); it stays
        even when the message then fails. Other types need it to exist (EINVAL).
        During a batch, a message for another asid is EINVAL. Then UPDATE
        (:meth:`update`), INVALIDATE (:meth:`invalidate`, never fails),
        BATCH_BEGIN (starts a batch on ``asid``, again allowed), BATCH_END (ends
        it; allowed outside a batch), anything else EINVAL.
        """
        if not self.owner:
            return E.EPERM
        iotlb = self.ases.get(asid)
        if type in (IOTLB_UPDATE, IOTLB_BATCH_BEGIN) and iotlb is None:
            if asid >= self.nas:
                return E.EINVAL
            iotlb = self.ases[asid] = IOTLB()
        if self.batch_blocks(asid) or iotlb is None:
            return E.EINVAL
        if type == IOTLB_UPDATE:
            return self.update(iotlb, iova, size, uaddr, perm)
        if type == IOTLB_INVALIDATE:
            self.invalidate(iotlb, iova, size)
            return 0
        if type == IOTLB_BATCH_BEGIN:
            self.batch_asid = asid
            self.in_batch = True
            return 0
        if type == IOTLB_BATCH_END:
            self.in_batch = False
            return 0
        return E.EINVAL

    def batch_blocks(self, asid: int) -> bool:
        """A batch on another address space is under way (``v->in_batch &&
        v->batch_asid != asid``): the message is refused."""
        return self.in_batch and self.batch_asid != asid

    def overlaps(self, iotlb: IOTLB, iova: int, size: int) -> bool:
        """``vhost_iotlb_itree_first(iotlb, iova, iova + size - 1)`` is not NULL."""
        return iotlb.first(iova, iova + size - 1) is not None

    def npages(self, iova: int, size: int) -> int:
        """``npages = PFN_UP(size + (iova & ~PAGE_MASK))`` (unsigned long: it wraps)."""
        return _pfn_up((size + (iova & (PAGE_SIZE - 1))) % _U64)

    def pin(self, uaddr: int, npages: int, write: bool) -> list[int] | None:
        """pin_user_pages(uaddr & PAGE_MASK, npages, FOLL_LONGTERM | (FOLL_WRITE if
        ``write``)): the physical address of each page, or None when a page is not
        present or (``write``) not writable (the kernel's EFAULT, or ENOMEM for a
        partial pin: both undone)."""
        base = uaddr & _PAGE_MASK
        out: list[int] = []
        for i in range(npages):  # ends at the first missing page: at most len(memory) + 1 rounds
            page = self.memory.get(base + i * PAGE_SIZE)
            if page is None or (write and not page.writable):
                return None
            out.append(page.phys)
        return out

    def chunks(self, phys: list[int]) -> list[tuple[int, int]]:
        """Runs of physically contiguous pages: ``(first page index, pages)`` each
        (``vhost_vdpa_pa_map`` maps a run when the next PFN is not last_pfn + 1)."""
        runs: list[tuple[int, int]] = []
        for i, p in enumerate(phys):
            if runs and p == phys[i - 1] + PAGE_SIZE:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        return runs

    def update(self, iotlb: IOTLB, iova: int, size: int, uaddr: int, perm: int) -> int:
        """``vhost_vdpa_process_iotlb_update`` + ``vhost_vdpa_pa_map``.

        EINVAL if ``[iova, iova + size - 1]`` leaves the iova range or wraps;
        EEXIST if it intersects a map; EINVAL if npages is 0 (wrapped);
        ENOMEM if npages + pinned_vm exceeds RLIMIT_MEMLOCK (no CAP_IPC_LOCK
        bypass); EFAULT if a page is not pinnable (FOLL_WRITE when ``perm`` has the
        WO bit). On success: maps from ``iova & PAGE_MASK`` on, one per physically
        contiguous run of the pages at ``uaddr & PAGE_MASK``, each
        ``[start, start + pages * 4096 - 1] -> phys``, permission ``perm`` as
        given (0 and values above 3 included); pinned_vm += npages. A failure
        changes nothing (the maps made so far are unmapped and unpinned).
        """
        if (iova < self.iova_first or iova > U64_MAX - size + 1 or iova + size - 1 > self.iova_last):
            return E.EINVAL
        if self.overlaps(iotlb, iova, size):
            return E.EEXIST
        npages = self.npages(iova, size)
        if npages == 0:
            return E.EINVAL
        if self.mm.memlock_pages is not None and npages + self.mm.pinned_vm > self.mm.memlock_pages:
            return E.ENOMEM
        phys = self.pin(uaddr, npages, bool(perm & VHOST_ACCESS_WO))
        if phys is None:
            return E.EFAULT
        start = iova & _PAGE_MASK
        for first, pages in self.chunks(phys):
            self.map(iotlb, start + first * PAGE_SIZE, pages * PAGE_SIZE, phys[first], perm)
        return 0

    def map(self, iotlb: IOTLB, start: int, size: int, phys: int, perm: int) -> None:
        """``vhost_vdpa_map``: add one map and count its pages in pinned_vm."""
        iotlb.add_range(start, start + size - 1, phys, perm)
        self.mm.pinned_vm += size // PAGE_SIZE

    def invalidate(self, iotlb: IOTLB, iova: int, size: int) -> list[IOTLBMap]:
        """``vhost_vdpa_unmap`` -> ``vhost_vdpa_pa_unmap(iova, iova + size - 1)``:
        every map intersecting the range (``last`` computed mod 2**64, so size 0
        gives last = iova - 1: iova 0 removes everything, another iova the maps
        holding both iova - 1 and iova) is removed whole and its pages unpinned
        (pinned_vm -= PFN_DOWN(map size)). Returns the removed maps."""
        removed = iotlb.del_range(iova, (iova + size - 1) % _U64)
        for m in removed:
            self.unpin(m)
        return removed

    def unpin(self, m: IOTLBMap) -> None:
        """``vhost_vdpa_pa_unmap`` for one map: pinned_vm -= PFN_DOWN(size)."""
        self.mm.pinned_vm -= m.size // PAGE_SIZE

    def close(self) -> None:
        """``vhost_vdpa_release``: the batch ends, every address space is removed
        (``vhost_vdpa_cleanup`` -> ``vhost_vdpa_remove_as``) and its maps unpinned."""
        for iotlb in self.ases.values():
            self.invalidate(iotlb, 0, 0)
        self.ases.clear()
        self.in_batch = False
        self.closed = True

    # -- queries ------------------------------------------------------------

    def maps(self, asid: int) -> list[tuple[int, int, int, int]]:
        """``(start, last, phys, perm)`` of every map of address space ``asid``, by start."""
        iotlb = self.ases.get(asid)
        return [] if iotlb is None else [(m.start, m.last, m.addr, m.perm) for m in iotlb]

    def covered(self, asid: int, iova: int, size: int) -> bool:
        """Whether some map of ``asid`` intersects ``[iova, iova + size - 1]``."""
        iotlb = self.ases.get(asid)
        return iotlb is not None and iotlb.first(iova, iova + size - 1) is not None

