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
               chunk: int = 1 << 16, seed: int = 1, buffers: int = 1) -> dict[str, Any]:
    """Write ``length`` bytes of a seeded pattern at byte ``offset`` in ``chunk``-sized
    O_DIRECT writes, read them back with O_DIRECT reads and compare.

    ``buffers``: how many chunk-sized buffers the I/Os rotate through (more than one
    makes the kernel map the same iovas to different pages from one I/O to the next,
    which is what exposes a stale IOTLB entry).

    Returns a record: device, offset, length, chunk, the number of write and read
    syscalls, mismatching chunk offsets (empty when the data verified), ``lba_size``
    (bytes, from sysfs), ``buffers_pages`` (per buffer, the guest-physical byte
    address of each of its pages), ``ios`` (each I/O: id, dir, byte pos, len, buffer
    index), ``pages_moved`` (a buffer page changed frame during the run), timings.
    Raises OSError (reported with its errno) if the device cannot be opened or an I/O fails.
    """
    if offset % 4096 or length % 4096 or chunk % 4096:
        raise ValueError("offset, length and chunk must be multiples of 4096 bytes for O_DIRECT")
    if not 1 <= buffers <= 64:
        raise ValueError("buffers must be 1..64")
    bufs = [mmap.mmap(-1, chunk) for _ in range(buffers)]  # page-aligned, as O_DIRECT requires
    for b in bufs:
        b.write(b"\1" * chunk)  # fault every page in before reading the page map
        _mlock(b)
    pages = [buffer_pages(b) for b in bufs]
    lba_size = _lba_size(device)
    marks = marker_fd()
    ios: list[dict[str, Any]] = []

    def mark(text: str) -> None:
        if marks is not None:
            os.write(marks, text.encode())

    def io(direction: str, pos: int, n: int, index: int) -> int:
        io_id = next(_io_ids)
        ios.append({"io": io_id, "dir": direction, "pos": pos, "len": n, "buffer": index})
        view = memoryview(bufs[index])[:n]
        mark(f"dma-harness io {io_id} begin {direction} pos={pos} len={n}")
        try:
            if direction == "write":
                return os.pwrite(fd, view, pos)
            return os.preadv(fd, [view], pos)
        finally:
            view.release()
            mark(f"dma-harness io {io_id} end")

    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    writes = reads = 0
    mismatches: list[int] = []
    t0 = time.monotonic()
    try:
        for i, pos in enumerate(range(offset, offset + length, chunk)):
            n = min(chunk, offset + length - pos)
            buf = bufs[i % buffers]
            buf.seek(0)
            buf.write(pattern(seed, pos, n))
            done = io("write", pos, n, i % buffers)
            if done != n:
                raise OSError(5, f"short write {done} of {n} at {pos}")
            writes += 1
        os.fsync(fd)
        t1 = time.monotonic()
        for i, pos in enumerate(range(offset, offset + length, chunk)):
            n = min(chunk, offset + length - pos)
            buf = bufs[(i + 1) % buffers]  # not the buffer that wrote this chunk
            buf.seek(0)
            buf.write(b"\0" * n)
            got = io("read", pos, n, (i + 1) % buffers)
            if got != n:
                raise OSError(5, f"short read {got} of {n} at {pos}")
            reads += 1
            if bytes(buf[:n]) != pattern(seed, pos, n):
                mismatches.append(pos)
        t2 = time.monotonic()
        pages_after = [buffer_pages(b) for b in bufs]
    finally:
        os.close(fd)
        if marks is not None:
            os.close(marks)
        for b in bufs:
            b.close()
    return {"device": device, "offset": offset, "length": length, "chunk": chunk, "seed": seed,
            "buffers": buffers, "writes": writes, "reads": reads, "mismatches": mismatches,
            "verified": not mismatches, "lba_size": lba_size, "buffers_pages": pages,
            "pages_moved": pages_after != pages, "ios": ios, "markers": marks is not None,
            "write_seconds": round(t1 - t0, 4), "read_seconds": round(t2 - t1, 4)}
