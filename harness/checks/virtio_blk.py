"""virtio-blk requests as each side logs them: the guest's DMA-API maps of a
request, and QEMU's popped element with the translations it made for it.

Guest side (Linux 6.12, drivers/block/virtio_blk.c ``virtblk_add_req`` and
drivers/virtio/virtio_ring.c ``virtqueue_add_split``, with
VIRTIO_F_ACCESS_PLATFORM): one request is, in one task, in this order,

1. ``dma_map_page`` TO_DEVICE of the 16-byte ``virtio_blk_outhdr`` (the header);
2. one ``dma_map_page`` per data segment, TO_DEVICE for a write, FROM_DEVICE
   for a read (sizes in whole 512-byte sectors);
3. ``dma_map_page`` FROM_DEVICE of the status byte (``in_hdr``, under 512 bytes);
4. with indirect descriptors, ``dma_map_page`` TO_DEVICE of the indirect
   table (``16 * (segments + 2)`` bytes), mapped after the buffers
   (``vring_map_single`` once the table is filled).

Then the driver kicks the queue, so the last of these maps happened before
QEMU saw the request.  The completion (``virtblk_done`` -> ``detach_buf_split``)
unmaps them after QEMU pushed the used element.  A request without data
(flush) or whose segments are not whole sectors (discard, get-id) is not a
data request.

QEMU side (hw/virtio/virtio.c ``virtqueue_split_pop``, QEMU 7.2): popping an
element reads its descriptors and maps every buffer (``virtqueue_map_desc``
-> ``dma_memory_map``: one ``vtd_dmar_translate`` per page, plus reads of the
ring and the indirect table, each translated too) before
``virtqueue_alloc_element``; hw/block/virtio-blk.c then traces
``virtio_blk_handle_write`` / ``_read`` with the element as ``req`` (a
VirtIOBlockReq starts with its element).  So the translations between the
last non-vtd event before ``virtqueue_alloc_element`` and it are the
element's, and those of the data iovas are where the data went.

Pure code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from harness.trace.events import (
    DmarTranslate,
    Event,
    VirtioBlkHandleRead,
    VirtioBlkHandleWrite,
    VirtioBlkReqComplete,
    VirtqueueAllocElement,
)
from harness.trace.guest import GuestDmaMap, GuestDmaMapPage, GuestDmaUnmap, GuestEvent, GuestIommuUnmap

__all__ = ["SECTOR", "GuestBlkRequest", "HostBlkRequest", "guest_blk_requests", "VirtioElementTracker"]

SECTOR: Final = 512
HEADER_BYTES: Final = 16
"""``sizeof(struct virtio_blk_outhdr)`` (include/uapi/linux/virtio_blk.h)."""
_PAGE: Final = 4096
_WINDOW_MAX: Final = 8192
"""Translations kept for one element (a 126-segment request with ring reads is ~400)."""


@dataclass
class GuestBlkRequest:
    """One virtio-blk data request as the guest mapped it.

    ``header_pos``: guest position of the header's map; ``last_pos``: of the
    request's last map (status or indirect table), before the kick;
    ``data``: the data segments in order, ``(iova, size in bytes, guest-physical
    address)``; ``iovas``: every iova the request mapped (header, data, status,
    indirect table); ``complete_pos``: guest position of the first unmap of one
    of them after ``last_pos`` (the guest saw the completion), None if none.
    """

    sid: int
    device: str
    write: bool
    header: GuestDmaMap
    header_pos: int
    last_pos: int
    data: list[tuple[int, int, int]] = field(default_factory=list)
    iovas: list[int] = field(default_factory=list)
    complete_pos: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(size for _, size, _ in self.data)

    def data_pages(self) -> Iterator[tuple[int, int, int]]:
        """``(byte offset in the request, iova page, guest-physical page)`` of each
        4 KiB page of the data, in order (segments are page-aligned for O_DIRECT
        buffers; an unaligned segment yields the pages it touches)."""
        offset = 0
        for iova, size, phys in self.data:
            first = iova & ~(_PAGE - 1)
            for page in range(first, iova + size, _PAGE):
                yield offset + (page - first), page, (phys & ~(_PAGE - 1)) + (page - first)
            offset += size


def _is_header(e: GuestEvent) -> bool:
    return isinstance(e, GuestDmaMapPage) and e.dir == "TO_DEVICE" and e.size == HEADER_BYTES


def guest_blk_requests(guest: Sequence[GuestEvent]) -> list[GuestBlkRequest]:
    """The virtio-blk data requests of the guest's log, in order (module docstring).

    Maps are followed per (task, device): a header map opens a request, the
    maps after it are its data until the status map closes it, and a
    TO_DEVICE map of exactly the indirect table's size right after that is its
    table.  Devices are any PCI device whose maps follow this shape; others
    never match (NVMe maps are not 16-byte TO_DEVICE pages followed by a
    one-byte FROM_DEVICE one).
    """
    open_req: dict[tuple[int, str], tuple[GuestBlkRequest, bool]] = {}  # (pid, device) -> (req, closed)
    done: list[GuestBlkRequest] = []
    by_page: dict[int, list[GuestBlkRequest]] = {}  # iova page -> requests awaiting completion
    for pos, e in enumerate(guest):
        if isinstance(e, GuestDmaMapPage):
            key = (e.pid, e.device)
            entry = open_req.get(key)
            if _is_header(e):
                sid = e.sid
                if sid is None:
                    open_req.pop(key, None)
                    continue
                open_req[key] = (GuestBlkRequest(sid, e.device, False, e, pos, pos,
                                                 iovas=[e.segments[0][0]]), False)
                continue
            if entry is None:
                continue
            req, closed = entry
            iova, size = e.segments[0]
            if closed:  # the indirect table, or another map of the task
                if e.dir == "TO_DEVICE" and size == 16 * (len(req.data) + 2):
                    req.last_pos = pos
                    req.iovas.append(iova)
                    by_page.setdefault(iova & ~(_PAGE - 1), []).append(req)
                del open_req[key]
                continue
            if e.dir == "FROM_DEVICE" and size < SECTOR:  # the status byte
                req.last_pos = pos
                req.iovas.append(iova)
                if req.data:
                    done.append(req)
                    for page in {i & ~(_PAGE - 1) for i in req.iovas}:
                        by_page.setdefault(page, []).append(req)
                    open_req[key] = (req, True)
                else:
                    del open_req[key]  # a flush: no data
                continue
            if size % SECTOR or e.dir not in ("TO_DEVICE", "FROM_DEVICE") or \
                    (req.data and (e.dir == "TO_DEVICE") != req.write):
                del open_req[key]  # not a block data request (discard, get-id...)
                continue
            req.write = e.dir == "TO_DEVICE"
            req.data.append((iova, size, e.phys[0] if e.phys else 0))
            req.iovas.append(iova)
            req.last_pos = pos
        elif isinstance(e, (GuestIommuUnmap, GuestDmaUnmap)) and by_page:
            if isinstance(e, GuestIommuUnmap):
                pages = range(e.iova & ~(_PAGE - 1), e.iova + max(e.unmapped_size, 1), _PAGE)
            else:
                pages = range(0)
                if e.segments:
                    pages = range(e.segments[0][0] & ~(_PAGE - 1), e.segments[0][0] + 1, _PAGE)
            for page in pages:
                for req in by_page.pop(page, ()):
                    if req.complete_pos is None and pos > req.last_pos:
                        req.complete_pos = pos
        elif open_req and isinstance(e, GuestDmaMap):
            open_req.pop((e.pid, e.device), None)  # another kind of map in the middle: not ours
    return done


@dataclass
class HostBlkRequest:
    """One virtio-blk read or write as QEMU handled it: ``handle`` is the
    ``virtio_blk_handle_*`` event, ``sid`` the source id of the element's
    translations (None if it made none), ``translations`` the element's
    translations in trace order."""

    handle: VirtioBlkHandleWrite | VirtioBlkHandleRead
    sid: int | None
    translations: list[DmarTranslate]
    complete: VirtioBlkReqComplete | None = None

    @property
    def write(self) -> bool:
        return type(self.handle) is VirtioBlkHandleWrite

    @property
    def nbytes(self) -> int:
        return self.handle.nsectors * SECTOR


class VirtioElementTracker:
    """Feed every QEMU event in order; :meth:`feed` returns the
    :class:`HostBlkRequest` when its ``virtio_blk_handle_*`` event is fed, and
    again (its ``complete`` set) when its ``virtio_blk_req_complete`` is; else None.

    Memory: at most :data:`_WINDOW_MAX` translations of the current window and
    the elements popped but not yet handled (bounded to 1024)."""

    def __init__(self) -> None:
        self._window: list[DmarTranslate] = []
        self._elements: dict[int, list[DmarTranslate]] = {}
        self._inflight: dict[int, HostBlkRequest] = {}  # req pointer -> request being processed
        self.elements = 0

    def feed(self, event: Event) -> HostBlkRequest | None:
        kind = type(event)
        if kind is DmarTranslate:
            assert isinstance(event, DmarTranslate)
            if len(self._window) < _WINDOW_MAX:
                self._window.append(event)
            return None
        if event.IS_VTD:
            return None
        if kind is VirtqueueAllocElement:
            assert isinstance(event, VirtqueueAllocElement)
            self.elements += 1
            if len(self._elements) >= 1024:
                self._elements.pop(next(iter(self._elements)))
            self._elements[event.elem] = self._window
            self._window = []
            return None
        self._window = []
        if kind is VirtioBlkHandleWrite or kind is VirtioBlkHandleRead:
            assert isinstance(event, (VirtioBlkHandleWrite, VirtioBlkHandleRead))
            translations = self._elements.pop(event.req, [])
            sids: dict[int, int] = {}
            for t in translations:
                sids[t.sid] = sids.get(t.sid, 0) + 1
            sid = max(sids, key=lambda s: sids[s]) if sids else None
            req = HostBlkRequest(event, sid, [t for t in translations if t.sid == sid])
            if len(self._inflight) >= 1024:
                self._inflight.pop(next(iter(self._inflight)))
            self._inflight[event.req] = req
            return req
        if kind is VirtioBlkReqComplete:
            assert isinstance(event, VirtioBlkReqComplete)
            done = self._inflight.pop(event.req, None)
            if done is not None:
                done.complete = event
            return done
        return None
