"""The PVH kernel taken out of a bzImage (harness.images.vmlinux), on synthetic
images: the first gzip stream that is an ELF, the Xen PHYS32_ENTRY note, and the
file written once beside the bzImage."""

import gzip
import struct

from harness.images import vmlinux


def _elf(note_type: int | None) -> bytes:
    """A 64-bit little-endian ELF with one PT_NOTE segment holding a ``Xen`` note of
    ``note_type`` (None: a ``GNU`` note instead)."""
    name, ntype = (b"Xen\0", note_type) if note_type is not None else (b"GNU\0", 3)
    note = struct.pack("<III", len(name), 4, ntype) + name + b"\0\0\0\1"
    phoff = 64
    header = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0,
                                                                      64, 56, 1, 0, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 4, 4, phoff + 56, 0, 0, len(note), len(note), 4)
    return header + phdr + note


def _bzimage(payload: bytes) -> bytes:
    decoy = gzip.compress(b"not an elf")  # the setup code may hold other gzip magic first
    return b"MZ" + bytes(0x200) + b"HdrS" + bytes(100) + decoy + gzip.compress(payload) + bytes(64)


def test_extract_finds_the_elf_stream_after_a_decoy():
    elf = _elf(vmlinux.XEN_ELFNOTE_PHYS32_ENTRY)
    assert vmlinux.extract(_bzimage(elf)) == elf
    assert vmlinux.extract(b"HdrS" + gzip.compress(b"text only")) is None


def test_pvh_note_is_required():
    assert vmlinux.has_pvh_entry(_elf(vmlinux.XEN_ELFNOTE_PHYS32_ENTRY))
    assert not vmlinux.has_pvh_entry(_elf(17))
    assert not vmlinux.has_pvh_entry(_elf(None))
    assert not vmlinux.has_pvh_entry(_elf(vmlinux.XEN_ELFNOTE_PHYS32_ENTRY)[:70])  # cut inside the headers


def test_ensure_writes_once_and_remembers_a_kernel_without_pvh(tmp_path):
    good = tmp_path / "a" / "bzImage"
    good.parent.mkdir()
    elf = _elf(vmlinux.XEN_ELFNOTE_PHYS32_ENTRY)
    good.write_bytes(_bzimage(elf))
    path = vmlinux.ensure_pvh_vmlinux(good)
    assert path == good.with_name("vmlinux") and path.read_bytes() == elf
    good.write_bytes(b"changed")  # the cached file is reused, not re-extracted
    assert vmlinux.ensure_pvh_vmlinux(good) == path
    bad = tmp_path / "b" / "bzImage"
    bad.parent.mkdir()
    bad.write_bytes(_bzimage(_elf(None)))
    assert vmlinux.ensure_pvh_vmlinux(bad) is None
    assert not bad.with_name("vmlinux").exists() and bad.with_name("vmlinux.none").is_file()
    assert sorted(p.name for p in bad.parent.iterdir()) == ["bzImage", "vmlinux.none"]
