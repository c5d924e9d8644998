"""Constants and small helpers shared by the grant target's model side and dom0 side."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from guest_agent.mem import pattern_bytes as pattern_bytes  # the bytes the agent writes: one definition for both sides

if TYPE_CHECKING:
    pass



PAGE = 4096
DOM0 = 0
OTHER_DOMID = 1
"""A domain that does not exist: dom0 can grant to it, but its maps of that grant fail."""
VERSION = 1
"""The grant table version Linux picks in this dom0 ("Grant tables using version 1 layout")."""
NR_ENTRIES = 512
"""Xen's size of dom0's table: one v1 grant frame (checked at every sequence start)."""
NR_RESERVED = 8
CANON_REFS = 16
"""Refs allocated and freed in order at every sequence start (a sequence never has more in use)."""
MAX_REFS = 10
"""Refs in use (granted or deferred) at most in a sequence: few refs keep Xen's dump short."""
MAX_MAPS = 4
MAX_AMAPS = 3
BAD_REF = NR_ENTRIES + 0x80
"""A ref outside dom0's table (GNTST_bad_gntref)."""
FREE_PER_ITERATION = 10
TICK_TIMEOUT = 2.5
"""Seconds the executor waits for the deferred-end timer (it runs every second while needed)."""
POLL_SECONDS = 0.02
COPY_SEED = 0x6772616E74
"""Pattern seed of the scratch buffer's source page (the user side of user -> grant copies)."""
SCRATCH_PAGES = 3
"""Scratch buffer: page 0 the copy source, page 1 the copy destination, page 2 spare."""
GFN_BASE = 0x1000
COPY_NOT_REACHED = 1
"""The status the agent puts in every copy segment before the ioctl (guest_agent.xen)."""
NO_INDEX = 1 << 40
"""A file offset no gntalloc/gntdev object has (stands for an object whose creation failed)."""
GNTST_NAMES = {0: "okay", -1: "general_error", -2: "bad_domain", -3: "bad_gntref", -4: "bad_handle",
               -8: "permission_denied", -10: "bad_copy_arg", -13: "no_space", 1: "not reached"}




def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gntdev_first_fit(records: Sequence[tuple[int, int]], count: int) -> int:
    """The index (pages) ``gntdev_add_map`` gives a new map of ``count`` pages among
    the maps ``records`` ((index, count) in pages): the first place after a map
    (or 0) where ``index + count < next map's index``, else after the last one."""
    index = 0
    for start, n in sorted(records):
        if index + count < start:
            return index
        index = start + n
    return index
