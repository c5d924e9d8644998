"""Anonymous memory regions the host can place, fill, read and locate, for ops that
hand user addresses to the kernel (IOAS_MAP, vhost UPDATE, DMA buffers).

A region is mmap'ed private and anonymous, at ``at`` if given (MAP_FIXED_NOREPLACE:
replayable addresses, so a model that depends on the user address, e.g. iommufd's
automatic iova alignment, sees the same value on every run), advised
MADV_NOHUGEPAGE (4 KiB pages, so per-page pin counts are exact) and touched page by
page (a never-touched page is the shared zero page, which breaks pin refcounts).
Regions live until ``mem.unmap`` or the agent exits.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
from typing import Any

from guest_agent.protocol import op

PAGE = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
MADV_NOHUGEPAGE = 15
MAP_FAILED = ctypes.c_void_p(-1).value

REGIONS: dict[int, int] = {}
"""user_va -> length in bytes of each region this agent mapped."""
READ_ONLY: set[int] = set()
"""Starts of the regions in REGIONS mapped without PROT_WRITE (e.g. a read-only
gntdev mapping): ``mem.write`` refuses them instead of the agent dying of SIGSEGV."""


def _region_of(user_va: int, length: int, write: bool = False) -> None:
    for base, size in REGIONS.items():
        if base <= user_va and user_va + length <= base + size:
            if write and base in READ_ONLY:
                raise ValueError(f"[{user_va:#x}, +{length:#x}) is in a read-only mapping")
            return
    raise ValueError(f"[{user_va:#x}, +{length:#x}) is not inside a region mapped by mem.map")


@op("mem.map")
def map_region(length: int, at: int | None = None, fill: int | None = 0) -> dict[str, Any]:
    """Map ``length`` bytes (a multiple of 4096) of anonymous memory; ``at``: the
    address it must have. ``fill``: the byte every page is set to (touching it);
    None leaves the pages untouched (each is the zero page until written).

    Returns ``{"user_va": address, "length": bytes}``. Raises OSError (EEXIST if
    ``at`` is taken, ENOMEM) and ValueError for a length that is not page-sized.
    """
    if length <= 0 or length % PAGE:
        raise ValueError(f"mem.map: length {length!r} is not a positive multiple of {PAGE}")
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_FIXED_NOREPLACE if at is not None else 0)
    addr = _libc.mmap(at, length, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length:#x} bytes at {at!r} failed")
    if at is not None and addr != at:  # a kernel without MAP_FIXED_NOREPLACE treats it as a hint
        _libc.munmap(addr, length)
        raise OSError(17, f"mmap could not place the region at {at:#x} (got {addr:#x})")
    _libc.madvise(addr, length, MADV_NOHUGEPAGE)
    if fill is not None:
        ctypes.memset(addr, fill, length)
    REGIONS[addr] = length
    return {"user_va": addr, "length": length}


@op("mem.unmap")
def unmap_region(user_va: int) -> dict[str, Any]:
    """munmap a region made by ``mem.map`` (by its start address)."""
    length = REGIONS.pop(user_va)
    _libc.munmap(user_va, length)
    return {"user_va": user_va, "length": length}


@op("mem.write")
def write(user_va: int, data: str | None = None, pattern: int | None = None, length: int | None = None) -> dict[str, Any]:
    """Write ``data`` (hex) at ``user_va``, or ``length`` bytes of the deterministic
    pattern numbered ``pattern`` (see :func:`pattern_bytes`). Returns the sha256."""
    raw = bytes.fromhex(data) if data is not None else pattern_bytes(int(pattern or 0), int(length or 0))
    _region_of(user_va, len(raw), write=True)
    ctypes.memmove(user_va, raw, len(raw))
    return {"user_va": user_va, "length": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


@op("mem.read")
def read(user_va: int, length: int, hex: bool = False) -> dict[str, Any]:
    """Read ``length`` bytes at ``user_va``: their sha256 (and the bytes in hex if asked)."""
    _region_of(user_va, length)
    raw = ctypes.string_at(user_va, length)
    out: dict[str, Any] = {"user_va": user_va, "length": length, "sha256": hashlib.sha256(raw).hexdigest()}
    if hex:
        out["data"] = raw.hex()
    return out


@op("mem.gpa")
def gpa(user_va: int, length: int) -> dict[str, Any]:
    """Guest-physical address of each 4 KiB page of [user_va, user_va + length)
    (/proc/self/pagemap, as root); None for a page not present."""
    first = user_va // PAGE
    n = (user_va + length + PAGE - 1) // PAGE - first
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(first * 8)
        raw = fh.read(8 * n)
    pages: list[int | None] = []
    for (entry,) in struct.iter_unpack("<Q", raw):
        pfn = entry & ((1 << 55) - 1)
        pages.append(pfn * PAGE if entry >> 63 and pfn else None)
    return {"user_va": first * PAGE, "pages": pages}


def pattern_bytes(seed: int, length: int) -> bytes:
    """``length`` bytes that depend on ``seed`` and on each 16-byte offset (so a page
    landing at the wrong place or a stale page is visible)."""
    out = bytearray()
    block = 0
    while len(out) < length:
        out += hashlib.sha256(struct.pack("<QQ", seed, block)).digest()[:16]
        block += 1
    return bytes(out[:length])
