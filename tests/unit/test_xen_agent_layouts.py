"""The guest agent's Xen ABI (guest_agent/xen.py) against the numbers of
SEMANTICS.md section 5 and the uapi/Xen public headers, and its parser of Xen's
'g' debug-key dump against text laid out as Xen 4.17's printk formats in
xen/common/grant_table.c (gnttab_usage_print_all, gnttab_usage_print) and
xen/drivers/char/console.c (printk_start_of_line) produce it."""

from __future__ import annotations

import ctypes
import struct

import pytest

from guest_agent import xen

# ------------------------------------------------------------------ ioctl numbers


@pytest.mark.parametrize("name, value", [
    ("IOCTL_GNTALLOC_ALLOC_GREF", 0x184705),
    ("IOCTL_GNTALLOC_DEALLOC_GREF", 0x104706),
    ("IOCTL_GNTALLOC_SET_UNMAP_NOTIFY", 0x104707),
    ("IOCTL_GNTDEV_MAP_GRANT_REF", 0x184700),
    ("IOCTL_GNTDEV_UNMAP_GRANT_REF", 0x104701),
    ("IOCTL_GNTDEV_GRANT_COPY", 0x104708),
    ("IOCTL_PRIVCMD_HYPERCALL", 0x305000),  # _IOC(_IOC_NONE, 'P', 0, 48)
])
def test_ioctl_numbers(name: str, value: int) -> None:
    assert getattr(xen, name) == value, f"{name} = {getattr(xen, name):#x}"


def test_xen_constants() -> None:
    assert xen.HYPERVISOR_sysctl == 35
    assert xen.XEN_SYSCTL_INTERFACE_VERSION == 0x15
    assert (xen.XEN_SYSCTL_readconsole, xen.XEN_SYSCTL_debug_keys) == (1, 7)
    assert (xen.GNTCOPY_source_gref, xen.GNTCOPY_dest_gref) == (1, 2)
    assert xen.GNTALLOC_FLAG_WRITABLE == 1
    # the placeholder of a segment the kernel never reached is no GNTST code (0 .. -13)
    assert not -13 <= xen.COPY_NOT_REACHED <= 0


# ------------------------------------------------------------------ struct layouts


def _layout(cls: type[ctypes.Structure] | type[ctypes.Union]) -> dict[str, int]:
    return {name: getattr(cls, name).offset for name, *_ in cls._fields_}


def test_gntalloc_layouts() -> None:
    one = xen.gntalloc_alloc_gref(1)
    assert ctypes.sizeof(one) == 24
    assert _layout(one) == {"domid": 0, "flags": 2, "count": 4, "index": 8, "gref_ids": 16}
    assert ctypes.sizeof(xen.gntalloc_alloc_gref(5)) >= 16 + 5 * 4  # the tail is padded to 8
    assert ctypes.sizeof(xen.GntallocAllocGrefHead) == 16
    assert ctypes.sizeof(xen.GntallocDeallocGref) == 16
    assert _layout(xen.GntallocDeallocGref) == {"index": 0, "count": 8}
    assert ctypes.sizeof(xen.GntallocUnmapNotify) == 16
    assert _layout(xen.GntallocUnmapNotify) == {"index": 0, "action": 8, "event_channel_port": 12}


def test_gntdev_layouts() -> None:
    assert ctypes.sizeof(xen.GntdevGrantRef) == 8
    one = xen.gntdev_map_grant_ref(1)
    assert ctypes.sizeof(one) == 24
    assert _layout(one) == {"count": 0, "pad": 4, "index": 8, "refs": 16}
    assert ctypes.sizeof(xen.gntdev_map_grant_ref(3)) == 16 + 3 * 8
    assert xen.gntdev_map_grant_ref(3).refs.offset == 16
    assert ctypes.sizeof(xen.GntdevUnmapGrantRef) == 16
    assert _layout(xen.GntdevUnmapGrantRef) == {"index": 0, "count": 8, "pad": 12}
    assert ctypes.sizeof(xen.GntdevGrantCopy) == 16
    assert _layout(xen.GntdevGrantCopy) == {"count": 0, "segments": 8}


def test_copy_segment_layout() -> None:
    seg_t = xen.GntdevGrantCopySegment
    assert ctypes.sizeof(seg_t) == 24
    assert _layout(seg_t) == {"source": 0, "dest": 8, "len": 16, "flags": 18, "status": 20}
    assert _layout(xen.GntdevForeign) == {"ref": 0, "offset": 4, "domid": 6}
    assert ctypes.sizeof(xen.GntdevCopyPtr) == 8
    seg = seg_t()
    seg.source.foreign.ref, seg.source.foreign.offset, seg.source.foreign.domid = 9, 0x10, 3
    seg.dest.virt = 0x7F0000001000
    seg.len, seg.flags, seg.status = 512, xen.GNTCOPY_source_gref, -3
    raw = bytes(seg)
    assert struct.unpack_from("<IHH", raw, 0) == (9, 0x10, 3)
    assert struct.unpack_from("<Q", raw, 8) == (0x7F0000001000,)
    assert struct.unpack_from("<HHh", raw, 16) == (512, 1, -3)
    back = seg_t.from_buffer_copy(raw[:20] + struct.pack("<h", -10) + raw[22:])
    assert back.status == -10  # the kernel's s16 reads back negative


def test_privcmd_and_sysctl_layouts() -> None:
    assert ctypes.sizeof(xen.PrivcmdHypercall) == 48
    assert _layout(xen.PrivcmdHypercall) == {"op": 0, "arg": 8}
    rc = xen.XenSysctlReadconsole
    assert ctypes.sizeof(rc) == 24
    assert _layout(rc) == {"clear": 0, "incremental": 1, "pad0": 2, "pad1": 3, "index": 4, "buffer": 8,
                           "count": 16}
    assert ctypes.sizeof(xen.XenSysctlDebugKeys) == 16
    assert _layout(xen.XenSysctlDebugKeys) == {"keys": 0, "nr_keys": 8}
    assert ctypes.sizeof(xen.XenSysctlUnion) == 128
    assert ctypes.sizeof(xen.XenSysctl) == 136
    assert _layout(xen.XenSysctl) == {"cmd": 0, "interface_version": 4, "u": 8}


def test_alloc_struct_carries_refs_in_order() -> None:
    arg = xen.gntalloc_alloc_gref(3)()
    raw = bytearray(ctypes.sizeof(arg))
    struct.pack_into("<HHIQIII", raw, 0, 0, 1, 3, 0x2000, 8, 9, 10)
    ctypes.memmove(ctypes.addressof(arg), bytes(raw), len(raw))
    assert (arg.domid, arg.flags, arg.count, arg.index) == (0, 1, 3, 0x2000)
    assert list(arg.gref_ids) == [8, 9, 10]


# ------------------------------------------------------------------ the 'g' dump


def _domain_block(domid: int, version: int, frames: tuple[int, int, int, int],
                  entries: list[tuple[int, int, int, int, int, int, int]]) -> list[str]:
    """gnttab_usage_print's lines for one domain, as its printk formats lay them out."""
    out = ["      -------- active --------       -------- shared --------",
           "[ref] localdom mfn      pin          localdom gmfn     flags",
           "grant-table for remote d%d (v%u)" % (domid, version),
           "  %u frames (%u max), %u maptrack frames (%u max)" % frames]
    for e in entries:
        out.append("[0x%03x]  %5d 0x%05x 0x%08x      %5d 0x%06x 0x%02x" % e)
    if not entries:
        out.append("no active grant table entries")
    return out


def _dump(blocks: list[list[str]], prefix: str = "(XEN) ") -> str:
    lines = ["gnttab_usage_print_all [ key 'g' pressed"]
    for b in blocks:
        lines += b
    lines.append("gnttab_usage_print_all ] done")
    return "".join(prefix + line + "\n" for line in lines)


ENTRIES = [(8, 0, 0x1a2b3, 0x2, 0, 0x01a2b3, 0x19),       # one writable gntdev mmap (user PTE + kmap)
           (0x00a, 0, 0x1a2b5, 0x200, 0, 0x01a2b5, 0x0d),  # read-only grant mapped read-only
           (0x1234, 0, 0x123456789, 0x101, 0, 0x123456789, 0x19)]  # wider than the format's widths


def test_parse_dump_entries() -> None:
    text = _dump([_domain_block(0, 1, (1, 64, 1, 1024), ENTRIES)])
    lines = xen.dump_lines(text)
    assert lines is not None
    domains, unparsed = xen.parse_usage_dump(lines)
    assert unparsed == []
    assert list(domains) == ["0"]
    d0 = domains["0"]
    assert (d0["version"], d0["nr_frames"], d0["max_frames"], d0["maptrack_frames"],
            d0["max_maptrack_frames"]) == (1, 1, 64, 1, 1024)
    assert d0["entries"] == [
        {"ref": 8, "active_domid": 0, "mfn": 0x1a2b3, "pin": 0x2, "shared_domid": 0, "gfn": 0x1a2b3,
         "flags": 0x19},
        {"ref": 10, "active_domid": 0, "mfn": 0x1a2b5, "pin": 0x200, "shared_domid": 0, "gfn": 0x1a2b5,
         "flags": 0x0D},
        {"ref": 0x1234, "active_domid": 0, "mfn": 0x123456789, "pin": 0x101, "shared_domid": 0,
         "gfn": 0x123456789, "flags": 0x19}]


def test_parse_dump_several_domains_and_no_entries() -> None:
    text = _dump([_domain_block(0, 1, (1, 64, 0, 1024), []),
                  _domain_block(7, 2, (2, 32, 1, 1024), [(9, 0, 0x4000, 0x1, 7, 0x55, 0x10)])])
    lines = xen.dump_lines(text)
    assert lines is not None
    domains, unparsed = xen.parse_usage_dump(lines)
    assert unparsed == []
    assert domains["0"]["entries"] == [] and domains["0"]["version"] == 1
    assert domains["7"]["version"] == 2
    assert domains["7"]["entries"] == [{"ref": 9, "active_domid": 0, "mfn": 0x4000, "pin": 1,
                                        "shared_domid": 7, "gfn": 0x55, "flags": 0x10}]


@pytest.mark.parametrize("prefix", ["(XEN) ", "(XEN) [  123.456789] ", "(XEN) [2024-01-02 03:04:05] ",
                                    "(XEN) [00000012345abcde] ", ""])
def test_parse_dump_with_console_prefixes(prefix: str) -> None:
    text = _dump([_domain_block(0, 1, (1, 64, 1, 1024), ENTRIES[:1])], prefix=prefix)
    lines = xen.dump_lines(text)
    assert lines is not None
    domains, unparsed = xen.parse_usage_dump(lines)
    assert unparsed == []
    assert [e["ref"] for e in domains["0"]["entries"]] == [8]
    assert domains["0"]["entries"][0]["pin"] == 2


def test_interleaved_lines_are_kept_apart() -> None:
    block = _domain_block(0, 1, (1, 64, 1, 1024), ENTRIES[:2])
    block.insert(5, "d0v1 some other message")
    text = _dump([block])
    lines = xen.dump_lines(text)
    assert lines is not None
    domains, unparsed = xen.parse_usage_dump(lines)
    assert unparsed == ["(XEN) d0v1 some other message"]
    assert [e["ref"] for e in domains["0"]["entries"]] == [8, 10]


def test_entry_before_domain_is_an_error() -> None:
    with pytest.raises(ValueError, match="before any domain"):
        xen.parse_usage_dump(["(XEN) [0x008]      0 0x1a2b3 0x00000002          0 0x01a2b3 0x19"])


def test_dump_lines_takes_the_last_complete_dump() -> None:
    first = _dump([_domain_block(0, 1, (1, 64, 1, 1024), ENTRIES[:1])])
    second = _dump([_domain_block(0, 1, (1, 64, 1, 1024), ENTRIES[1:2])])
    unfinished = "(XEN) gnttab_usage_print_all [ key 'g' pressed\n(XEN) grant-table for remote d0 (v1)\n"
    lines = xen.dump_lines("(XEN) earlier output\n" + first + second + unfinished)
    assert lines is not None
    domains, _ = xen.parse_usage_dump(lines)
    assert [e["ref"] for e in domains["0"]["entries"]] == [10]
    assert xen.dump_lines(unfinished) is None
    assert xen.dump_lines("(XEN) gnttab_usage_print_all ] done\n") is None
