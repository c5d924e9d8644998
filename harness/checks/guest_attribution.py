"""Which device each of the guest kernel's IOMMU changes belongs to.

``iommu:map`` / ``iommu:unmap`` (drivers/iommu/iommu.c ``__iommu_map`` /
``__iommu_unmap``) name no domain and no device.  :func:`resolve_ops` credits
each to a device (PCI source id) from the guest's own trace, by three rules
tried in this order; used by :class:`harness.checks.guest_state.GuestState`.

1. DMA API (``via="dma-api"``): the device of the DMA-API event of the same
   task that reports the IOMMU call right after it (``dma:dma_map_*``,
   ``dma_alloc*``, ``dma_unmap_*``, ``dma_free*``, kernel/dma/mapping.c;
   ``dma_unmap_sg`` is logged right *before* its unmaps), whose ``dir`` also
   gives the permission (iommu-dma's ``dma_info_to_prot``: TO_DEVICE -> read,
   FROM_DEVICE -> write, BIDIRECTIONAL -> both).
2. Direct mapping (``via="direct-mapping"``): a map followed by
   ``iommu:attach_device_to_domain`` events before any DMA-API event is a
   firmware-requested direct mapping (drivers/iommu/iommu.c
   ``iommu_create_device_direct_mappings``, made before the group's devices
   are attached): it belongs to each device attached.
3. NVMe command (``via="nvme-command"``), for the maps the DMA IOVA API makes
   with no DMA-API event (Linux 7.2's NVMe driver; see below).

Anything else is *unattributed* (device None, ``via=""``) and counted: never
a guess.

The NVMe command rule
=====================

Linux 7.2's NVMe driver maps a multi-segment request's data with the DMA IOVA
API (drivers/nvme/host/pci.c ``nvme_map_data`` -> block/blk-mq-dma.c
``blk_rq_dma_map_iter_start`` -> ``blk_rq_dma_map_iova``: ``dma_iova_link`` per
segment, then ``dma_iova_sync``; drivers/iommu/dma-iommu.c ``__dma_iova_link``
-> ``iommu_map_nosync``), which traces ``iommu:map`` per segment and an IOTLB
flush (``qi_submit``, caching mode) but no DMA-API event.  It unmaps with
``blk_rq_dma_unmap`` -> ``dma_iova_destroy`` (one ``iommu:unmap`` of the whole
range and its flush), again with no DMA-API event.  What identifies the device
is the NVMe command around them, in the same task:

* ``nvme_queue_rq`` -> ``nvme_prep_rq`` traces ``nvme:nvme_setup_cmd``
  (drivers/nvme/host/core.c ``nvme_setup_cmd``) and then maps the request's
  data (``nvme_map_data``) and metadata in the same call chain.  An
  unattributed ``iommu:map`` is the controller's of the same task's latest
  ``nvme_setup_cmd`` (its *window*) when the task traced nothing since but
  IOMMU maps, ``qi_submit``, DMA-API maps and completion-side events
  (``iommu:unmap``, DMA-API unmaps, ``nvme_complete_rq``: only an interrupt
  brings those into the submitting task, never more maps of another request).
  Any other event of the task closes its window; the next ``nvme_setup_cmd``
  opens a new one.  Its permission follows the command: the data of
  ``nvme_cmd_write`` is mapped DMA_TO_DEVICE (read), of ``nvme_cmd_read``
  DMA_FROM_DEVICE (write) (``blk_rq_dma_map_iova`` maps with ``rq_dma_dir``;
  core.c ``nvme_setup_cmd`` builds those opcodes for REQ_OP_WRITE and
  REQ_OP_READ); any other opcode gets both.
* ``nvme_pci_complete_rq`` / ``nvme_complete_batch`` unmap a request
  (``nvme_pci_unmap_rq``) and then trace its ``nvme:nvme_complete_rq``
  (core.c ``nvme_complete_rq`` / ``nvme_complete_batch_req``).  An
  unattributed ``iommu:unmap`` is the controller's of the same task's next
  ``nvme_complete_rq`` when only ``qi_submit``, IOMMU unmaps and DMA-API
  unmaps of that task come between.
* A controller ``nvmeN`` names no PCI device; its device is learned from the
  same trace: a DMA-API map event inside one of ``nvmeN``'s windows names it
  (7.2 maps single-segment data, such as the admin commands' identify buffers
  at probe, with ``dma_map_phys``).  Only evidence seen *before* a map or
  unmap counts for it; two different devices named for one controller make it
  ambiguous (none); ``iommu:remove_device_from_group`` of the device forgets
  it (a controller number can be reused by the next controller probed).

Tasks are told apart by pid, except that the idle tasks (pid 0) are one per
CPU.  The trace's irq-context flags are not read, so an interrupt event of
another kind (a ``tracing_mark_write``, ...) inside a window closes it and the
request's remaining maps stay unattributed (counted, not guessed).

Pure code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from harness.models.iommu_domain import IOMMU_READ, IOMMU_WRITE
from harness.trace.guest import (
    GuestAttachDevice,
    GuestDmaMap,
    GuestDmaUnmap,
    GuestEvent,
    GuestIommuMap,
    GuestIommuUnmap,
    GuestNvmeCompleteRq,
    GuestNvmeSetupCmd,
    GuestQiSubmit,
    GuestRemoveDeviceFromGroup,
)

__all__ = ["GuestOp", "resolve_ops", "VIA_DMA_API", "VIA_DIRECT_MAPPING", "VIA_NVME_COMMAND"]

VIA_DMA_API: Final = "dma-api"
VIA_DIRECT_MAPPING: Final = "direct-mapping"
VIA_NVME_COMMAND: Final = "nvme-command"

_DIR_PROT: Final = {"TO_DEVICE": IOMMU_READ, "FROM_DEVICE": IOMMU_WRITE,
                    "BIDIRECTIONAL": IOMMU_READ | IOMMU_WRITE}
_NVME_DATA_PROT: Final = {"nvme_cmd_write": IOMMU_READ, "nvme_cmd_read": IOMMU_WRITE}
_LOOKAHEAD: Final = 256  # guest events searched for the event that reports an IOMMU call
_PAGE: Final = 4096


@dataclass(frozen=True, slots=True)
class GuestOp:
    """A guest IOMMU change with its device resolved.

    ``pos``: index of ``event`` in the guest's event list; ``map``: a map (else
    an unmap); ``sid``: PCI source id, None when unattributed; ``iova``, ``size``
    (bytes), ``paddr`` (guest-physical, 0 for unmaps); ``prot``: IOMMU_READ /
    IOMMU_WRITE bits (0 for unmaps); ``via``: the rule that named the device
    (``VIA_*``, "" when unattributed)."""

    pos: int
    map: bool
    sid: int | None
    iova: int
    size: int
    paddr: int
    prot: int
    event: GuestEvent
    via: str = ""


def _overlaps(segments: Iterable[tuple[int, int]], start: int, last: int) -> bool:
    for addr, size in segments:
        lo = addr & ~(_PAGE - 1)
        hi = (addr + max(size, 1) - 1) | (_PAGE - 1)
        if lo <= last and start <= hi:
            return True
    return False


def _same_task(event: GuestEvent, later: GuestEvent) -> bool:
    """Whether ``later`` may report the IOMMU call ``event``: the DMA-API event that
    reports an ``iommu_map``/``iommu_unmap`` is logged in the same call chain, so by
    the same task (two controllers probing at once on two kworkers interleave their
    events, often at the same iova in their own domains). Lines without a header
    (pid -1) are not filtered."""
    return event.pid < 0 or later.pid < 0 or later.pid == event.pid


def _unmap_sg_before(guest: Sequence[GuestEvent], pos: int) -> int | None:
    """The device of the ``dma_unmap_sg`` that announced the ``iommu:unmap`` at
    ``pos``: unlike the other DMA-API unmap events, ``dma_unmap_sg_attrs`` logs its
    event *before* unmapping (kernel/dma/mapping.c), so it is the same task's most
    recent DMA-API unmap event, with no IOMMU change of that task in between."""
    event = guest[pos]
    for earlier in reversed(guest[max(0, pos - _LOOKAHEAD):pos]):
        if not _same_task(event, earlier):
            continue
        if isinstance(earlier, (GuestIommuMap, GuestIommuUnmap)):
            return None
        if isinstance(earlier, GuestDmaUnmap):
            return earlier.sid if earlier.NAME == "dma_unmap_sg" else None
    return None


def resolve_ops(guest: Sequence[GuestEvent]) -> tuple[list[GuestOp], int, int]:
    """Attribute each ``iommu:map``/``unmap`` of ``guest`` to a device (module docstring).

    Returns the ops in guest order (one per device for a direct mapping; none
    for an unmap that removed nothing) and the numbers of unattributed maps and
    unmaps.  Never raises on any event sequence.
    """
    ops: list[GuestOp] = []
    n = len(guest)
    for pos, event in enumerate(guest):
        if isinstance(event, GuestIommuMap):
            last = event.iova + event.size - 1
            sids: list[int | None] = []
            prot = IOMMU_READ | IOMMU_WRITE
            via = VIA_DMA_API
            for later in guest[pos + 1:min(n, pos + 1 + _LOOKAHEAD)]:
                if not _same_task(event, later):
                    continue
                if isinstance(later, GuestDmaMap) and _overlaps(later.segments, event.iova, last):
                    sids = [later.sid]
                    prot = _DIR_PROT.get(later.dir, prot)
                    break
                if isinstance(later, GuestAttachDevice):
                    # A firmware-requested direct mapping (iommu_create_device_direct_mappings)
                    # is made just before the group's devices are attached to the domain.
                    sids.append(later.sid)
                    via = VIA_DIRECT_MAPPING
                elif sids and not isinstance(later, GuestQiSubmit):
                    break
            if not sids:
                sids = [None]
            ops.extend(GuestOp(pos, True, sid, event.iova, event.size, event.paddr, prot, event,
                               via if sid is not None else "") for sid in sids)
        elif isinstance(event, GuestIommuUnmap):
            if not event.unmapped_size:
                continue
            last = event.iova + event.unmapped_size - 1
            sid = _unmap_sg_before(guest, pos)
            for later in guest[pos + 1:min(n, pos + 1 + _LOOKAHEAD)] if sid is None else ():
                if not _same_task(event, later):
                    continue
                if isinstance(later, GuestDmaUnmap) and (
                        not later.segments or _overlaps(later.segments, event.iova, last)):
                    sid = later.sid
                    break
            ops.append(GuestOp(pos, False, sid, event.iova, event.unmapped_size, 0, 0, event,
                               VIA_DMA_API if sid is not None else ""))
    if any(op.sid is None for op in ops):
        ops = _credit_nvme_commands(guest, ops)
    lost_maps = sum(1 for op in ops if op.map and op.sid is None)
    lost_unmaps = sum(1 for op in ops if not op.map and op.sid is None)
    return ops, lost_maps, lost_unmaps


# --- the NVMe command rule ---------------------------------------------------------------------

_Task = tuple[int, int]


def _task(event: GuestEvent) -> _Task:
    """The task that traced ``event``: its pid; the idle tasks (pid 0) are one per CPU."""
    return event.pid, event.cpu if event.pid == 0 else -1


# Events a task may trace inside an NVMe command's window without closing it: its own
# maps and their flush, and what only an interrupt's completion brings (module docstring).
_WINDOW_KEEPS: Final = (GuestIommuMap, GuestQiSubmit, GuestDmaMap, GuestIommuUnmap, GuestDmaUnmap,
                        GuestNvmeCompleteRq)


class _Controllers:
    """NVMe controller number -> PCI source id, as the trace has named it so far."""

    def __init__(self) -> None:
        self._sid: dict[int, int | None] = {}  # None: named with two devices (ambiguous)

    def learn(self, ctrl: int, sid: int) -> None:
        known = self._sid.get(ctrl, sid)
        self._sid[ctrl] = sid if known == sid else None

    def forget(self, sid: int) -> None:
        for ctrl in [c for c, s in self._sid.items() if s == sid]:
            del self._sid[ctrl]

    def sid(self, ctrl: int) -> int | None:
        return self._sid.get(ctrl)


def _completed_ctrl(guest: Sequence[GuestEvent], pos: int) -> int | None:
    """The controller of the ``nvme_complete_rq`` that the same task traces after the
    unmap at ``pos`` with only flushes and unmaps between (module docstring), else None."""
    task = _task(guest[pos])
    for later in guest[pos + 1:min(len(guest), pos + 1 + _LOOKAHEAD)]:
        if later.pid < 0 or _task(later) != task:
            continue
        if isinstance(later, GuestNvmeCompleteRq):
            return later.ctrl
        if not isinstance(later, (GuestQiSubmit, GuestIommuUnmap, GuestDmaUnmap)):
            return None
    return None


def _credit_nvme_commands(guest: Sequence[GuestEvent], ops: list[GuestOp]) -> list[GuestOp]:
    """``ops`` with the unattributed maps and unmaps the NVMe command rule credits
    (module docstring) given their controller's device."""
    pending = {op.pos: i for i, op in enumerate(ops) if op.sid is None}
    out = list(ops)
    windows: dict[_Task, GuestNvmeSetupCmd] = {}
    controllers = _Controllers()
    for pos, event in enumerate(guest):
        if event.pid < 0:
            continue  # not an event line: no task
        task = _task(event)
        window = windows.get(task)
        i = pending.get(pos)
        if isinstance(event, GuestNvmeSetupCmd):
            windows[task] = event
        elif isinstance(event, GuestRemoveDeviceFromGroup):
            if event.sid is not None:
                controllers.forget(event.sid)
            windows.pop(task, None)
        elif not isinstance(event, _WINDOW_KEEPS):
            windows.pop(task, None)
        elif isinstance(event, GuestDmaMap):
            if window is not None and event.sid is not None:
                controllers.learn(window.ctrl, event.sid)
        elif i is not None and isinstance(event, GuestIommuMap):
            sid = controllers.sid(window.ctrl) if window is not None else None
            if window is not None and sid is not None:
                prot = _NVME_DATA_PROT.get(window.opcode_name, IOMMU_READ | IOMMU_WRITE)
                out[i] = replace(ops[i], sid=sid, prot=prot, via=VIA_NVME_COMMAND)
        elif i is not None and isinstance(event, GuestIommuUnmap):
            ctrl = _completed_ctrl(guest, pos)
            sid = controllers.sid(ctrl) if ctrl is not None else None
            if sid is not None:
                out[i] = replace(ops[i], sid=sid, via=VIA_NVME_COMMAND)
    return out
