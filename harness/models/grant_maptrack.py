"""Maptrack handles of one mapping domain (Xen ``xen/common/grant_table.c``:
``get_maptrack_handle``, ``_get_maptrack_handle``, ``put_maptrack_handle``).

Every grant map gets a handle from the *mapping* domain's maptrack; the unmap
names it.  Xen keeps a free list per vCPU; this model assumes all maps and
unmaps of the domain run on one vCPU (then the numbering is deterministic):

* the free list is FIFO: a handle is taken from the head, a freed one (also
  the handle of a map that failed after taking it) goes to the tail;
* the list's last entry is never handed out (it anchors the tail): when only
  one is left, a new maptrack frame of ``MAPTRACK_PER_PAGE`` (256) handles is
  taken, its first handle is returned and the other 255 go to the list's
  head, in ascending order;
* after ``max_frames`` frames (Xen's ``max_maptrack_frames``, default 1024)
  there is no handle left (the stealing from other vCPUs finds none either):
  the map fails with GNTST_no_space.

So a fresh domain gets handles 0, 1, ..., 254, then 256, ..., 510, 512, ...;
handle 255 (the first frame's anchor) comes only after every later free one.
"""

from __future__ import annotations

from collections import deque

PAGE_SIZE = 4096
MAPTRACK_PER_PAGE = PAGE_SIZE // 16  # sizeof(struct grant_mapping) == 16
DEFAULT_MAX_MAPTRACK_FRAMES = 1024  # Xen's opt_max_maptrack_frames


class Maptrack:
    """One mapping domain's maptrack: ``live`` maps each handle in use to
    ``(ref, readonly)``; ``limit`` is the number of handles in its frames."""

    __slots__ = ("free", "limit", "live", "max_frames")

    def __init__(self, max_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES) -> None:
        self.free: deque[int] = deque()  # head at the left
        self.limit = 0
        self.live: dict[int, tuple[int, bool]] = {}
        self.max_frames = max_frames

    def get(self) -> int | None:
        """Take a handle (``get_maptrack_handle``); None if none is left."""
        if len(self.free) > 1:
            return self.free.popleft()
        if self.limit // MAPTRACK_PER_PAGE >= self.max_frames:
            return None
        handle = self.limit
        self.limit += MAPTRACK_PER_PAGE
        self.free.extendleft(range(self.limit - 1, handle, -1))
        return handle

    def put(self, handle: int) -> None:
        """Give a handle back (``put_maptrack_handle``): at the tail."""
        self.free.append(handle)
