"""Which block DMA request is mapping its scatter-gather list right now.

QEMU's dma-helpers (system/dma-helpers.c), which hw/nvme uses to move
PRP-described data: ``dma_blk_io`` starts a request (``dbs``, byte ``offset``
on the device, ``to_dev``), ``dma_blk_cb`` maps the request's scatter-gather
list with ``dma_memory_map(dir)`` -- one IOMMU translation a page -- before
any other trace event, and ``dma_complete`` ends it.  So every
``vtd_dmar_translate`` between a ``dma_blk_cb`` and the next non-``vtd_*``
event is a mapping of that request's data, in that request's direction.  It
is the only place QEMU's trace shows an access direction.

Pure code.  Memory is bounded: at most :attr:`BlockDmaWindow.MAX_REQUESTS`
requests that never completed are remembered (the oldest are forgotten).
"""

from __future__ import annotations

from typing import Final

from harness.trace.events import DmaBlkCb, DmaBlkIo, DmaComplete, Event

__all__ = ["BlockDmaWindow"]


class BlockDmaWindow:
    """Feed every host event in order with :meth:`feed`; :attr:`current` is
    the ``dma_blk_io`` event of the request whose sg list is being mapped (so
    the translation just fed belongs to it), else None."""

    MAX_REQUESTS: Final = 4096

    def __init__(self) -> None:
        self._requests: dict[int, DmaBlkIo] = {}  # dbs -> its dma_blk_io
        self.current: DmaBlkIo | None = None
        self.requests = 0
        """``dma_blk_io`` events seen."""

    def feed(self, event: Event) -> None:
        if not event.IS_VTD:
            self.current = None  # a request's mapping loop emits only vtd_* events
        kind = type(event)
        if kind is DmaBlkIo:
            assert isinstance(event, DmaBlkIo)
            self.requests += 1
            if len(self._requests) >= self.MAX_REQUESTS:  # requests that never completed
                self._requests.pop(next(iter(self._requests)))
            self._requests[event.dbs] = event
        elif kind is DmaBlkCb:
            assert isinstance(event, DmaBlkCb)
            self.current = self._requests.get(event.dbs)
        elif kind is DmaComplete:
            assert isinstance(event, DmaComplete)
            self._requests.pop(event.dbs, None)
