"""NVMe block I/O with O_DIRECT, so the controller DMAs straight to and from the
process's pages through the IOMMU (no page cache in between)."""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from typing import Any

from guest_agent.protocol import op


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
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    writes = reads = 0
    mismatches: list[int] = []
    t0 = time.monotonic()
    try:
        for pos in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - pos)
            buf.seek(0)
            buf.write(pattern(seed, pos, n))
            done = os.pwrite(fd, memoryview(buf)[:n], pos)
            if done != n:
                raise OSError(5, f"short write {done} of {n} at {pos}")
            writes += 1
        os.fsync(fd)
        t1 = time.monotonic()
        for pos in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - pos)
            buf.seek(0)
            buf.write(b"\0" * n)
            got = os.preadv(fd, [memoryview(buf)[:n]], pos)
            if got != n:
                raise OSError(5, f"short read {got} of {n} at {pos}")
            reads += 1
            if bytes(buf[:n]) != pattern(seed, pos, n):
                mismatches.append(pos)
        t2 = time.monotonic()
    finally:
        os.close(fd)
        buf.close()
    return {"device": device, "offset": offset, "length": length, "chunk": chunk, "seed": seed,
            "writes": writes, "reads": reads, "mismatches": mismatches, "verified": not mismatches,
            "write_seconds": round(t1 - t0, 4), "read_seconds": round(t2 - t1, 4)}
