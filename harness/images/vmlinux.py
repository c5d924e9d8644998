"""The uncompressed kernel inside a bzImage, for a PVH boot.

QEMU boots an ELF ``-kernel`` that carries Xen's ``XEN_ELFNOTE_PHYS32_ENTRY`` note
(Linux with ``CONFIG_PVH``) through the PVH entry point (hw/i386/x86.c,
``x86_load_linux``; the ``pvh.bin`` option ROM): no real-mode setup code and, above
all, no decompression. Under TCG the guest's gunzip of the 6.12 bzImage took about
0.7 s of its only vCPU, the larger part of the time before the kernel ran.

The ELF is the bzImage's payload (``arch/x86/boot/compressed``: ``vmlinux`` stripped
of its symbols, compressed, with the relocations appended), as Linux's own
``scripts/extract-vmlinux`` finds it: the first gzip stream that decompresses to an
ELF file. Only gzip-compressed kernels (``CONFIG_KERNEL_GZIP``, the defconfig's) are
extracted; other kernels boot as bzImages.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

VMLINUX = "vmlinux"
GZIP_MAGIC = b"\x1f\x8b\x08"
ELF_MAGIC = b"\x7fELF"
XEN_ELFNOTE_PHYS32_ENTRY = 18  # xen/include/public/elfnote.h
PT_NOTE = 4


def extract(bzimage: bytes) -> bytes | None:
    """The ELF kernel compressed in ``bzimage`` (bytes of an x86 bzImage), or None
    when no gzip stream in it decompresses to an ELF file."""
    start = bzimage.find(GZIP_MAGIC)
    while start >= 0:
        try:
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bzimage[start:])
        except zlib.error:
            elf = b""
        if elf.startswith(ELF_MAGIC):
            return elf
        start = bzimage.find(GZIP_MAGIC, start + 1)
    return None


def has_pvh_entry(elf: bytes) -> bool:
    """Whether the 64-bit little-endian ELF ``elf`` has a ``Xen`` note of type
    XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment (what QEMU looks for)."""
    if len(elf) < 64 or not elf.startswith(ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(elf):
            return False
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", elf, off)
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (-(-namesz // 4) * 4) + (-(-descsz // 4) * 4)
    return False


def ensure_pvh_vmlinux(bzimage: Path) -> Path | None:
    """``vmlinux`` beside ``bzimage`` (a kernel of the harness's image cache), written
    once from it, if the bzImage's payload is an ELF with the PVH entry note; None
    otherwise (the kernel then boots as a bzImage). The file is written under a
    temporary name and renamed, so concurrent callers never see half of it.

    Raises OSError when the bzImage cannot be read or the folder is not writable.
    """
    target = bzimage.with_name(VMLINUX)
    marker = bzimage.with_name(VMLINUX + ".none")  # remembers "no PVH ELF in this bzImage"
    if target.is_file():
        return target
    if marker.is_file():
        return None
    elf = extract(bzimage.read_bytes())
    if elf is None or not has_pvh_entry(elf):
        marker.write_text("no gzip-compressed ELF with XEN_ELFNOTE_PHYS32_ENTRY in the bzImage\n")
        return None
    tmp = target.with_name(f".{VMLINUX}.{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, target)
    return target
