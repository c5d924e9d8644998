"""NVMe block I/O with O_DIRECT, so the controller DMAs straight to and from the
process's pages through the IOMMU (no page cache in between).

Each I/O is bracketed by markers in the guest kernel's trace
(``dma-harness io N begin write pos=P len=L`` ... ``dma-harness io N end``),
and the record gives the guest-physical pages of the buffer (from
/proc/self/pagemap; the buffer is mlocked so they do not move): the host
checks that the device's data landed on exactly those pages.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import mmap
import os
import struct
import time
from typing import Any

from guest_agent.protocol import op
from guest_agent.tracefs import marker_fd

_io_ids = itertools.count(1)
PAGE = 4096


def buffer_pages(buf: mmap.mmap) -> list[int]:
    """Guest-physical byte address of each page of ``buf`` (/proc/self/pagemap, as root).

    Raises OSError if a page is not present or the PFN is hidden (not root).
    """
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    n = (len(buf) + PAGE - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(addr // PAGE * 8)
        raw = fh.read(8 * n)
    pages = []
    for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
        pfn = entry & ((1 << 55) - 1)
        if not entry >> 63 or not pfn:
            raise OSError(14, f"buffer page {i} is not present or its frame is hidden (entry {entry:#x})")
        pages.append(pfn * PAGE)
    return pages


def _mlock(buf: mmap.mmap) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mlock of the I/O buffer failed: {os.strerror(err)}")


def _lba_size(device: str) -> int:
    name = os.path.basename(os.path.realpath(device))
    with open(f"/sys/block/{name}/queue/logical_block_size") as fh:
        return int(fh.read())


def pattern(seed: int, offset: int, length: int) -> bytes:
    """Deterministic bytes for [offset, offset+length): sha256 of (seed, block index) per 32 bytes."""
    out = bytearray()
    block = offset // 32
    while len(out) < length + (offset % 32):
        out += hashlib.sha256(b"%d:%d" % (seed, block)).digest()
        block += 1
    start = offset % 32
    return bytes(out[start:start + length])


@op("nvme.pattern_rw")
def pattern_rw(device: str = "/dev/nvme0n1", offset: int = 0, length: int = 1 << 20,
               chunk: int = 1 << 16, seed: int = 1) -> dict[str, Any]:
    """Write ``length`` bytes of a seeded pattern at byte ``offset`` in ``chunk``-sized
    O_DIRECT writes, read them back with O_DIRECT reads and compare.

    Returns a record: device, offset, length, chunk, the number of write and read
    syscalls, mismatching chunk offsets (empty when the data verified), timings.
    Raises OSError (reported with its errno) if the device cannot be opened or an I/O fails.
    """
    if offset % 4096 or length % 4096 or chunk % 4096:
        raise ValueError("offset, length and chunk must be multiples of 4096 bytes for O_DIRECT")
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
    buf.write(b"\1" * chunk)  # fault every page in before reading the page map
    _mlock(buf)
    pages = buffer_pages(buf)
    lba_size = _lba_size(device)
    marks = marker_fd()
    ios: list[dict[str, Any]] = []

    def mark(text: str) -> None:
        if marks is not None:
            os.write(marks, text.encode())

    def io(direction: str, pos: int, n: int) -> int:
        io_id = next(_io_ids)
        ios.append({"io": io_id, "dir": direction, "pos": pos, "len": n})
        mark(f"dma-harness io {io_id} begin {direction} pos={pos} len={n}")
        try:
            if direction == "write":
                return os.pwrite(fd, memoryview(buf)[:n], pos)
            return os.preadv(fd, [memoryview(buf)[:n]], pos)
        finally:
            mark(f"dma-harness io {io_id} end")

    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    writes = reads = 0
    mismatches: list[int] = []
    t0 = time.monotonic()
    try:
        for pos in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - pos)
            buf.seek(0)
            buf.write(pattern(seed, pos, n))
            done = io("write", pos, n)
            if done != n:
                raise OSError(5, f"short write {done} of {n} at {pos}")
            writes += 1
        os.fsync(fd)
        t1 = time.monotonic()
        for pos in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - pos)
            buf.seek(0)
            buf.write(b"\0" * n)
            got = io("read", pos, n)
            if got != n:
                raise OSError(5, f"short read {got} of {n} at {pos}")
            reads += 1
            if bytes(buf[:n]) != pattern(seed, pos, n):
                mismatches.append(pos)
        t2 = time.monotonic()
        pages_after = buffer_pages(buf)
    finally:
        os.close(fd)
        if marks is not None:
            os.close(marks)
        buf.close()
    return {"device": device, "offset": offset, "length": length, "chunk": chunk, "seed": seed,
            "writes": writes, "reads": reads, "mismatches": mismatches, "verified": not mismatches,
            "lba_size": lba_size, "buffer_pages": pages, "pages_moved": pages_after != pages,
            "ios": ios, "markers": marks is not None,
            "write_seconds": round(t1 - t0, 4), "read_seconds": round(t2 - t1, 4)}
