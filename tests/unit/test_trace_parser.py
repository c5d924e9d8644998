"""Tests of harness.trace: QEMU 7.2 ``log`` trace lines -> typed events."""

from __future__ import annotations

import dataclasses
import gzip
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.trace import (
    TRACE_EVENTS,
    ContextCacheReset,
    DmarEnable,
    DmarFault,
    DmarTranslate,
    Event,
    InvContextGlobal,
    InvIotlbDomain,
    InvIotlbGlobal,
    InvIotlbPages,
    InvIotlbPasid,
    InvIotlbPasidPages,
    IotlbPageHit,
    IotlbPageUpdate,
    IotlbReset,
    MalformedEvent,
    NvmeAdminCmd,
    NvmeCreateCq,
    NvmeCreateSq,
    NvmeEnqueueReqCompletion,
    NvmeError,
    NvmeIoCmd,
    NvmeMapPrp,
    NvmeRead,
    NvmeRwCb,
    NvmeWrite,
    ParseStats,
    SwitchAddressSpace,
    TranslatePassthrough,
    UnknownEvent,
    make_sid,
    parse_file,
    parse_line,
    parse_lines,
    slpte_gpa,
    slpte_perm,
    write_events_file,
)

# (line as QEMU 7.2 prints it, expected class, expected fields)
CASES: list[tuple[str, type[Event], dict[str, Any]]] = [
    (
        "vtd_iotlb_page_update IOTLB page update sid 0xfa iova 0xfffe0400 slpte 0x1d59003 domain 0x6",
        IotlbPageUpdate,
        {"sid": 0xFA, "iova": 0xFFFE0400, "slpte": 0x1D59003, "domain": 6, "pasid": None},
    ),
    (
        "vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x7ffff000 slpte 0x800000012345b003 domain 0x1",
        IotlbPageHit,
        {"sid": 0x10, "iova": 0x7FFFF000, "slpte": 0x800000012345B003, "domain": 1},
    ),
    (
        "vtd_dmar_translate dev 00:1f.02 iova 0xfffe0000 -> gpa 0x1d59000 mask 0xfff",
        DmarTranslate,
        {"bus": 0, "slot": 0x1F, "func": 2, "iova": 0xFFFE0000, "gpa": 0x1D59000, "mask": 0xFFF},
    ),
    (
        "vtd_translate_pt source id 0x18, iova 0x12345000",
        TranslatePassthrough,
        {"sid": 0x18, "iova": 0x12345000},
    ),
    (
        "vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x6 addr 0xfffe0000 mask 0x5",
        InvIotlbPages,
        {"domain": 6, "addr": 0xFFFE0000, "am": 5, "pasid": None},
    ),
    (
        "vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x6",
        InvIotlbDomain,
        {"domain": 6},
    ),
    ("vtd_inv_desc_iotlb_global iotlb invalidate global", InvIotlbGlobal, {}),
    (
        "vtd_iotlb_reset IOTLB reset (reason: iotlb exceeds size limit)",
        IotlbReset,
        {"reason": "iotlb exceeds size limit"},
    ),
    ("vtd_context_cache_reset ", ContextCacheReset, {}),
    ("vtd_context_cache_reset", ContextCacheReset, {}),
    ("vtd_inv_desc_cc_global context invalidate globally", InvContextGlobal, {}),
    (
        "vtd_dmar_fault sid 0xfa fault 6 addr 0xfffff000 write 0",
        DmarFault,
        {"sid": 0xFA, "fault": 6, "addr": 0xFFFFF000, "write": False},
    ),
    ("vtd_dmar_enable enable 1", DmarEnable, {"enable": True}),
    ("vtd_dmar_enable enable 0", DmarEnable, {"enable": False}),
    (
        "vtd_switch_address_space Device 00:03.0 switching address space (iommu enabled=1)",
        SwitchAddressSpace,
        {"bus": 0, "slot": 3, "func": 0, "enabled": True},
    ),
    (
        "vtd_inv_desc_iotlb_pasid_pages iotlb invalidate domain 0x2 addr 0x1000 mask 0x0 pasid 0x0",
        InvIotlbPasidPages,
        {"domain": 2, "addr": 0x1000, "am": 0, "pasid": 0},
    ),
    (
        "vtd_inv_desc_iotlb_pasid iotlb invalidate domain 0x2 pasid 0x5",
        InvIotlbPasid,
        {"domain": 2, "pasid": 5},
    ),
    (
        "pci_nvme_map_prp trans_len 4096 len 4096 prp1 0x3efde000 prp2 0x0 num_prps 2",
        NvmeMapPrp,
        {"trans_len": 4096, "len": 4096, "prp1": 0x3EFDE000, "prp2": 0, "num_prps": 2},
    ),
    (
        "pci_nvme_read cid 17 nsid 1 nlb 8 count 4096 lba 0x800",
        NvmeRead,
        {"cid": 17, "nsid": 1, "nlb": 8, "count": 4096, "lba": 0x800},
    ),
    (
        "pci_nvme_write cid 18 opname 'write' nsid 1 nlb 1 count 512 lba 0x1f",
        NvmeWrite,
        {"cid": 18, "opname": "write", "nsid": 1, "nlb": 1, "count": 512, "lba": 0x1F},
    ),
    (
        "pci_nvme_write cid 19 opname 'write zeroes' nsid 1 nlb 1 count 512 lba 0x0",
        NvmeWrite,
        {"cid": 19, "opname": "write zeroes"},
    ),
    (
        "pci_nvme_io_cmd cid 17 nsid 0x1 sqid 1 opc 0x2 opname 'NVME_NVM_CMD_READ'",
        NvmeIoCmd,
        {"cid": 17, "nsid": 1, "sqid": 1, "opc": 2, "opname": "NVME_NVM_CMD_READ"},
    ),
    (
        "pci_nvme_admin_cmd cid 3 sqid 0 opc 0x6 opname 'NVME_ADM_CMD_IDENTIFY'",
        NvmeAdminCmd,
        {"cid": 3, "sqid": 0, "opc": 6, "opname": "NVME_ADM_CMD_IDENTIFY"},
    ),
    ("pci_nvme_rw_cb cid 17 blk 'drive0'", NvmeRwCb, {"cid": 17, "blk": "drive0"}),
    (
        "pci_nvme_enqueue_req_completion cid 17 cqid 1 dw0 0x0 dw1 0x0 status 0x0",
        NvmeEnqueueReqCompletion,
        {"cid": 17, "cqid": 1, "dw0": 0, "dw1": 0, "status": 0},
    ),
    (
        "pci_nvme_create_sq create submission queue, addr=0x3f6a0000, sqid=1, cqid=1, "
        "qsize=1023, qflags=1",
        NvmeCreateSq,
        {"addr": 0x3F6A0000, "sqid": 1, "cqid": 1, "qsize": 1023, "qflags": 1},
    ),
    (
        "pci_nvme_create_cq create completion queue, addr=0x3f6b0000, cqid=1, vector=1, "
        "qsize=1023, qflags=1, ien=1",
        NvmeCreateCq,
        {"addr": 0x3F6B0000, "cqid": 1, "vector": 1, "qsize": 1023, "qflags": 1, "ien": 1},
    ),
    (
        "pci_nvme_err_invalid_prp2_align PRP2 is not page aligned: 0x3efde010",
        NvmeError,
        {"trace_name": "pci_nvme_err_invalid_prp2_align", "text": "PRP2 is not page aligned: 0x3efde010"},
    ),
]


@pytest.mark.parametrize(("line", "cls", "fields"), CASES, ids=[c[0].split()[0] for c in CASES])
def test_every_event_kind_parses(line: str, cls: type[Event], fields: dict[str, Any]) -> None:
    event = parse_line(line + "\n", 42)
    assert type(event) is cls
    assert event.lineno == 42
    assert event.raw == line
    for name, value in fields.items():
        assert getattr(event, name) == value, name
    assert event.timestamp is None and event.pid is None


@pytest.mark.parametrize(("line", "cls", "fields"), CASES, ids=[c[0].split()[0] for c in CASES])
def test_timestamp_prefix(line: str, cls: type[Event], fields: dict[str, Any]) -> None:
    prefixed = f"4242@1700000000.000123:{line}"
    event = parse_line(prefixed, 7)
    assert type(event) is cls
    assert event.raw == prefixed
    for name, value in fields.items():
        assert getattr(event, name) == value, name
    assert event.pid == 4242
    assert event.timestamp == pytest.approx(1700000000.000123)


def test_events_are_frozen_slotted_dataclasses() -> None:
    event = parse_line(CASES[0][0], 1)
    assert isinstance(event, IotlbPageUpdate)
    assert dataclasses.is_dataclass(event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.sid = 1  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


def test_helpers() -> None:
    update = parse_line(CASES[0][0], 1)
    assert isinstance(update, IotlbPageUpdate)
    assert update.gpa == 0x1D59000 and update.perm == 3
    assert slpte_gpa(0x800000012345B003) == 0x12345B000  # bit 63 and low bits dropped
    assert slpte_perm(0x1D59001) == 1 and slpte_perm(0x1D59002) == 2
    assert make_sid(0, 0x1F, 2) == 0xFA
    translate = parse_line(CASES[2][0], 1)
    assert isinstance(translate, DmarTranslate)
    assert translate.sid == 0xFA and translate.devfn == 0xFA and translate.page_size == 4096
    inv = parse_line("vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x6 addr 0xfffe1000 mask 0x5", 1)
    assert isinstance(inv, InvIotlbPages)
    assert inv.pages == 32 and inv.size == 32 * 4096
    assert inv.start == 0xFFFE0000 and inv.last == 0xFFFFFFFF
    fault = parse_line("vtd_dmar_fault sid 0xfa fault 5 addr 0x1000 write 1", 1)
    assert isinstance(fault, DmarFault) and fault.write and "write" in fault.reason


def test_newer_qemu_trailing_pasid_and_pte_are_accepted() -> None:
    hit = parse_line(
        "vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x1000 pte 0x2003 domain 0x1 pasid 0x3", 1
    )
    assert isinstance(hit, IotlbPageHit) and hit.slpte == 0x2003 and hit.pasid == 3
    inv = parse_line(
        "vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x1 addr 0x1000 mask 0x0 pasid 0x3", 1
    )
    assert isinstance(inv, InvIotlbPages) and inv.pasid == 3


def test_unknown_and_non_trace_lines_are_kept() -> None:
    unknown = parse_line("vtd_reg_write addr 0x88 size 0x4 value 0x0", 3)
    assert isinstance(unknown, UnknownEvent)
    assert unknown.trace_name == "vtd_reg_write" and unknown.is_vtd
    assert unknown.text == "addr 0x88 size 0x4 value 0x0"
    warning = parse_line("qemu-system-x86_64: warning: host doesn't support requested feature", 4)
    assert isinstance(warning, UnknownEvent) and warning.trace_name is None
    assert warning.raw.startswith("qemu-system-x86_64:")
    assert isinstance(parse_line("", 5), UnknownEvent)


def test_malformed_lines_are_kept() -> None:
    for line in (
        "vtd_dmar_translate dev 00:1f.02 iova 0xfffe0000 -> gpa",
        "vtd_iotlb_page_update IOTLB page update sid 0xzz iova 0x1 slpte 0x1 domain 0x1",
        "pci_nvme_read cid x nsid 1 nlb 8 count 4096 lba 0x800",
        "vtd_inv_desc_iotlb_global surprise",
    ):
        event = parse_line(line, 9)
        assert isinstance(event, MalformedEvent), line
        assert event.trace_name == line.split()[0] and event.raw == line and event.lineno == 9


def test_parse_lines_counts_and_numbers() -> None:
    lines = [
        CASES[0][0],
        "garbage that is not a trace line!",
        "vtd_dmar_translate dev 00:1f.02 iova nonsense",
        "some_other_event a b c",
        CASES[2][0],
    ]
    stats = ParseStats()
    events = list(parse_lines(lines, stats=stats))
    assert [e.lineno for e in events] == [1, 2, 3, 4, 5]
    assert stats.lines == 5 and stats.unknown == 2 and stats.malformed == 1
    assert stats.by_name == {"vtd_iotlb_page_update": 1, "vtd_dmar_translate": 1}
    assert [e.lineno for e in parse_lines(lines, start=10)] == [10, 11, 12, 13, 14]


def test_parse_file_streams(tmp_path: Path) -> None:
    text = "\n".join(case[0] for case in CASES) + "\n"
    plain = tmp_path / "trace.log"
    plain.write_text(text)
    gen = parse_file(plain)
    assert isinstance(gen, types.GeneratorType)
    events = list(gen)
    assert [type(e) for e in events] == [case[1] for case in CASES]
    assert [e.lineno for e in events] == list(range(1, len(CASES) + 1))
    packed = tmp_path / "trace.log.gz"
    with gzip.open(packed, "wt") as fh:
        fh.write(text)
    assert [e.raw for e in parse_file(packed)] == [e.raw for e in events]


def test_parse_file_tolerates_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bad.log"
    path.write_bytes(b"\xff\xfe garbage\r\n" + CASES[2][0].encode() + b"\r\n")
    events = list(parse_file(path))
    assert isinstance(events[0], UnknownEvent)
    assert isinstance(events[1], DmarTranslate) and events[1].lineno == 2


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        list(parse_file(tmp_path / "absent.log"))


def test_trace_events_and_events_file(tmp_path: Path) -> None:
    assert "vtd_*" not in TRACE_EVENTS
    for name in (
        "vtd_iotlb_page_update",
        "vtd_iotlb_page_hit",
        "vtd_dmar_translate",
        "vtd_translate_pt",
        "vtd_inv_desc_iotlb_pages",
        "vtd_inv_desc_iotlb_domain",
        "vtd_inv_desc_iotlb_global",
        "vtd_iotlb_reset",
        "vtd_context_cache_reset",
        "vtd_inv_desc_cc_global",
        "vtd_dmar_fault",
        "vtd_dmar_enable",
        "pci_nvme_map_prp",
        "pci_nvme_err_*",
    ):
        assert name in TRACE_EVENTS
    path = tmp_path / "events"
    write_events_file(path)
    assert path.read_text().splitlines() == list(TRACE_EVENTS)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_never_raises_on_random_text(text: str) -> None:
    event = parse_line(text, 3)
    assert isinstance(event, Event)
    assert event.lineno == 3


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([c[0] for c in CASES]),
    st.integers(min_value=0, max_value=80),
    st.text(max_size=8),
)
def test_never_raises_on_mangled_lines(line: str, cut: int, junk: str) -> None:
    event = parse_line(line[:cut] + junk + line[cut:], 1)
    assert isinstance(event, Event)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 31),
    st.integers(0, 7),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)
def test_translate_round_trip(bus: int, slot: int, func: int, iova: int, gpa: int) -> None:
    line = f"vtd_dmar_translate dev {bus:02x}:{slot:02x}.{func:02x} iova 0x{iova:x} -> gpa 0x{gpa:x} mask 0xfff"
    event = parse_line(line, 1)
    assert isinstance(event, DmarTranslate)
    assert (event.bus, event.slot, event.func, event.iova, event.gpa) == (bus, slot, func, iova, gpa)
    assert event.sid == make_sid(bus, slot, func)


def test_dma_helpers_events_parse_pointers_and_direction() -> None:
    from harness.trace import parse_line
    from harness.trace.events import DmaBlkCb, DmaBlkIo, DmaComplete
    e = parse_line("dma_blk_io dbs=0x5654f3557350 bs=0x5654f26c2ef0 offset=196608 to_dev=1", 3)
    assert isinstance(e, DmaBlkIo) and (e.dbs, e.offset, e.to_dev, e.lineno) == (0x5654F3557350, 196608, True, 3)
    e = parse_line("dma_blk_cb dbs=0x5654f3557350 ret=-5", 4)
    assert isinstance(e, DmaBlkCb) and e.ret == -5
    e = parse_line("dma_complete dbs=0x1 ret=0 cb=(nil)", 5)
    assert isinstance(e, DmaComplete) and e.cb == 0


# --------------------------------------------------------------------------
# Formats and field widths
# --------------------------------------------------------------------------

from harness.trace import EVENT_CLASSES, MAX_LINE_CHARS, TraceReadError, event_family  # noqa: E402
from harness.trace.events import Arg  # noqa: E402


def test_every_event_class_has_a_format_and_a_width_per_field() -> None:
    import typing

    for cls in EVENT_CLASSES:
        assert cls.NAME and cls.FORMAT is not None, cls
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls)[2:]:
            args = [a for a in getattr(hints[f.name], "__metadata__", ()) if isinstance(a, Arg)]
            assert len(args) == 1, (cls.__name__, f.name)
            assert "{" + f.name + "}" in cls.FORMAT, (cls.__name__, f.name)


INV = "vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x1 addr 0x{addr} mask 0x{am}"
HIT = "vtd_iotlb_page_hit IOTLB page hit sid 0x{sid} iova 0x{iova} slpte 0x{slpte} domain 0x{domain}"
XLATE = "vtd_dmar_translate dev {bus}:{slot}.{func} iova 0x1000 -> gpa 0x2000 mask 0xfff"
READ = "pci_nvme_read cid {cid} nsid {nsid} nlb {nlb} count {count} lba 0x{lba}"

# (line, field, parsed value or None when the line must be malformed)
WIDTH_CASES: list[tuple[str, str, int | None]] = [
    (INV.format(addr="0", am="3f"), "am", 63),
    (INV.format(addr="0", am="12"), "am", 18),
    (INV.format(addr="0", am="40"), "am", None),
    (INV.format(addr="0", am="ff"), "am", None),
    (INV.format(addr="0", am="ffffffff"), "am", None),
    (INV.format(addr="0", am="ffffffffffffffff"), "am", None),
    (INV.format(addr="0", am="-1"), "am", None),
    (INV.format(addr="ffffffffffffffff", am="0"), "addr", 2**64 - 1),
    (INV.format(addr="10000000000000000", am="0"), "addr", None),
    (HIT.format(sid="ffff", iova="1", slpte="1", domain="1"), "sid", 0xFFFF),
    (HIT.format(sid="10000", iova="1", slpte="1", domain="1"), "sid", None),
    (HIT.format(sid="1", iova="1", slpte="1", domain="ffff"), "domain", 0xFFFF),
    (HIT.format(sid="1", iova="1", slpte="1", domain="10000"), "domain", None),
    (HIT.format(sid="1", iova="1", slpte="f" * 16, domain="1"), "slpte", 2**64 - 1),
    (HIT.format(sid="1", iova="1", slpte="f" * 17, domain="1"), "slpte", None),
    (HIT.format(sid="1", iova="1" + "0" * 16, slpte="1", domain="1"), "iova", None),
    (XLATE.format(bus="ff", slot="1f", func="07"), "bus", 0xFF),
    (XLATE.format(bus="100", slot="00", func="00"), "bus", None),
    (XLATE.format(bus="00", slot="1f", func="07"), "slot", 0x1F),
    (XLATE.format(bus="00", slot="20", func="00"), "slot", None),
    (XLATE.format(bus="00", slot="00", func="7"), "func", 7),
    (XLATE.format(bus="00", slot="00", func="08"), "func", None),
    (READ.format(cid=65535, nsid=1, nlb=1, count=1, lba="0"), "cid", 65535),
    (READ.format(cid=65536, nsid=1, nlb=1, count=1, lba="0"), "cid", None),
    (READ.format(cid=-1, nsid=1, nlb=1, count=1, lba="0"), "cid", None),
    (READ.format(cid=1, nsid=2**32 - 1, nlb=1, count=1, lba="0"), "nsid", 2**32 - 1),
    (READ.format(cid=1, nsid=2**32, nlb=1, count=1, lba="0"), "nsid", None),
    (READ.format(cid=1, nsid=1, nlb=2**32, count=1, lba="0"), "nlb", None),
    (READ.format(cid=1, nsid=1, nlb=1, count=2**64 - 1, lba="0"), "count", 2**64 - 1),
    (READ.format(cid=1, nsid=1, nlb=1, count=2**64, lba="0"), "count", None),
    (READ.format(cid=1, nsid=1, nlb=1, count=10**40, lba="0"), "count", None),
    ("pci_nvme_io_cmd cid 1 nsid 0xffffffff sqid 1 opc 0xff opname 'x'", "opc", 0xFF),
    ("pci_nvme_io_cmd cid 1 nsid 0x1 sqid 1 opc 0x100 opname 'x'", "opc", None),
    ("dma_blk_cb dbs=0x1 ret=-2147483648", "ret", -(2**31)),
    ("dma_blk_cb dbs=0x1 ret=2147483648", "ret", None),
    ("dma_blk_io dbs=0x1 bs=(nil) offset=-1 to_dev=0", "offset", -1),
    ("dma_blk_io dbs=0x1 bs=0x2 offset=1 to_dev=2", "to_dev", None),
    ("dma_blk_io dbs=0x1ffffffffffffffff bs=0x2 offset=1 to_dev=1", "dbs", None),
    ("vtd_dmar_fault sid 0xfa fault 255 addr 0x0 write 1", "fault", 255),
    ("vtd_dmar_fault sid 0xfa fault 256 addr 0x0 write 1", "fault", None),
    ("vtd_dmar_enable enable 2", "enable", None),
    ("vtd_iotlb_page_hit IOTLB page hit sid 0x1 iova 0x1 pte 0x1 domain 0x1 pasid 0x100000000",
     "pasid", None),
]


@pytest.mark.parametrize(("line", "fname", "value"), WIDTH_CASES)
def test_every_field_is_checked_against_its_width(line: str, fname: str, value: int | None) -> None:
    event = parse_line(line, 5)
    if value is None:
        assert isinstance(event, MalformedEvent), event
        assert event.trace_name == line.split()[0] and event.lineno == 5 and event.raw == line
        # the reason names the field, unless the value is not even a number of its kind
        assert event.reason == "" or event.reason.startswith(f"{fname} "), event.reason
        assert event.reason or "-" in line, line
    else:
        assert not isinstance(event, (MalformedEvent, UnknownEvent)), event
        assert getattr(event, fname) == value


def test_malformed_reason_names_the_field_and_its_width() -> None:
    event = parse_line(INV.format(addr="0", am="ffffffffffffffff"), 1)
    assert isinstance(event, MalformedEvent)
    assert event.reason == "am 0xffffffffffffffff does not fit its field (hex, 6 bits: 0x0..0x3f)"
    event = parse_line(READ.format(cid=70000, nsid=1, nlb=1, count=1, lba="0"), 1)
    assert isinstance(event, MalformedEvent)
    assert event.reason == "cid 70000 does not fit its field (decimal, 16 bits: 0..65535)"
    # a line of another shape has no field to blame
    event = parse_line("vtd_dmar_translate dev 00:1f.02 iova", 1)
    assert isinstance(event, MalformedEvent) and event.reason == ""


def test_am_never_reaches_a_consumer_wider_than_six_bits() -> None:
    lines = [INV.format(addr="0", am=f"{am:x}") for am in (0, 18, 63, 64, 255, 2**32 - 1, 2**64 - 1)]
    parsed = [e for e in parse_lines(lines) if isinstance(e, InvIotlbPages)]
    assert [e.am for e in parsed] == [0, 18, 63]
    assert all(e.pages <= 2**63 for e in parsed)


def test_hostile_invalidations_check_fast() -> None:
    from harness.checks.vtd import check_lines

    import time

    started = time.monotonic()
    report = check_lines([INV.format(addr="0", am="ffffffffffffffff")])
    report = check_lines([INV.format(addr="0", am="ffffffff")] * 20)
    assert time.monotonic() - started < 5
    assert report.counts.malformed_lines == 20
    assert any("20 vtd_* lines could not be parsed" in why for why in report.inconclusive)


def test_timestamp_prefix_digits_are_bounded() -> None:
    line = "9" * 5000 + "@1.2:vtd_dmar_enable enable 1"
    event = parse_line(line, 1)
    assert isinstance(event, UnknownEvent) and event.pid is None and event.timestamp is None


def test_event_family() -> None:
    assert event_family("vtd_dmar_translate") == "vtd"
    assert event_family("pci_nvme_read") == "pci_nvme"
    assert event_family("pci_nvme_err_invalid_prp2_align") == "pci_nvme"
    assert event_family("dma_blk_io") == "dma"
    assert event_family("virtio_queue_notify") == "virtio"
    assert event_family("memory_region_ops_read") == "memory"
    assert event_family("vtdx_foo") == "vtdx"
    assert event_family(None) == event_family("") == "?"


def test_stats_count_malformed_lines_per_family() -> None:
    lines = [
        CASES[0][0],
        INV.format(addr="0", am="ff"),
        "pci_nvme_read cid x",
        INV.format(addr="0", am="40"),
        "dma_blk_cb dbs=0x1 ret=oops",
        "x" * (MAX_LINE_CHARS + 1),
        "not a trace line",
    ]
    stats = ParseStats()
    events = list(parse_lines(lines, stats=stats))
    assert len(events) == 7 and stats.lines == 7
    assert stats.malformed == 5 and stats.unknown == 1 and stats.overlong == 1
    assert stats.malformed_by_family == {"vtd": 2, "pci_nvme": 1, "dma": 1, "?": 1}
    assert stats.first_malformed["vtd"] == (2, lines[1])
    assert stats.first_malformed["pci_nvme"] == (3, "pci_nvme_read cid x")
    assert stats.first_malformed["?"] == (6, "x" * 200)
    assert stats.by_name == {"vtd_iotlb_page_update": 1}
    why = stats.unparsed("vtd")
    assert why is not None and why.startswith("2 vtd_* lines could not be parsed (first: line 2: ")
    assert stats.unparsed("virtio") is None


# --------------------------------------------------------------------------
# Long lines, truncated and compressed files, non-regular files
# --------------------------------------------------------------------------

GOOD = CASES[2][0]  # vtd_dmar_translate


def _peak_while(fn: Any) -> tuple[Any, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def test_a_20_mb_line_is_read_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "long.log"
    with open(path, "wb") as fh:
        fh.write(GOOD.encode() + b"\n")
        fh.write(b"vtd_iotlb_page_hit IOTLB page hit sid 0x" + b"f" * (20 << 20) + b"\n")
        fh.write(GOOD.encode() + b"\n")
    stats = ParseStats()
    events, peak = _peak_while(lambda: list(parse_file(path, stats=stats)))
    assert peak < 2 << 20, peak  # the line is 20 MiB (about 0.2 MiB measured)
    assert [type(e) for e in events] == [DmarTranslate, MalformedEvent, DmarTranslate]
    assert [e.lineno for e in events] == [1, 2, 3]
    long = events[1]
    assert isinstance(long, MalformedEvent) and long.trace_name == "vtd_iotlb_page_hit"
    assert len(long.raw) <= 1024 and long.raw.startswith("vtd_iotlb_page_hit IOTLB page hit sid 0xfff")
    assert f"line of {len(b'vtd_iotlb_page_hit IOTLB page hit sid 0x') + (20 << 20)} characters" in long.reason
    assert stats.overlong == 1 and stats.malformed_by_family == {"vtd": 1}
    assert stats.bytes_read == path.stat().st_size and not stats.truncated


def test_line_length_limit_boundary(tmp_path: Path) -> None:
    fits = ("vtd_iotlb_reset IOTLB reset (reason: " + "r" * MAX_LINE_CHARS)[: MAX_LINE_CHARS - 1] + ")"
    assert len(fits) == MAX_LINE_CHARS
    path = tmp_path / "edge.log"
    path.write_bytes(fits.encode() + b"\n" + b"q" + fits.encode() + b"\n" + b"y" * (MAX_LINE_CHARS + 1))
    stats = ParseStats()
    events = list(parse_file(path, stats=stats))
    assert isinstance(events[0], IotlbReset) and len(events[0].raw) == MAX_LINE_CHARS
    assert isinstance(events[1], MalformedEvent) and events[1].trace_name == "qvtd_iotlb_reset"
    assert isinstance(events[2], MalformedEvent) and events[2].lineno == 3
    assert stats.overlong == 2 and stats.truncated  # the last line has no newline
    assert stats.bytes_read == path.stat().st_size


def test_a_name_that_does_not_fit_is_dropped() -> None:
    event = parse_line("v" * (MAX_LINE_CHARS + 10), 3)
    assert isinstance(event, MalformedEvent) and event.trace_name == "" and event.family == "?"
    assert event.lineno == 3 and len(event.raw) == 1024


def test_last_line_without_newline_sets_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cut.log"
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.encode()[:30])
    stats = ParseStats()
    events = list(parse_file(path, stats=stats))
    assert isinstance(events[0], DmarTranslate) and isinstance(events[1], MalformedEvent)
    assert stats.truncated and stats.bytes_read == path.stat().st_size
    path.write_bytes(GOOD.encode())  # complete, but QEMU was killed before the newline
    stats = ParseStats()
    events = list(parse_file(path, stats=stats))
    assert isinstance(events[0], DmarTranslate) and stats.truncated
    path.write_bytes(GOOD.encode() + b"\n")
    stats = ParseStats()
    list(parse_file(path, stats=stats))
    assert not stats.truncated and stats.bytes_read == len(GOOD) + 1


def _trace_bytes(n: int = 2000) -> bytes:
    """``n`` lines: the CASES in turn, every other one a translate with
    pseudo-random addresses (so that compression leaves something to cut)."""
    import random

    rng = random.Random(n)
    out = []
    for i in range(n):
        if i % 2:
            out.append(f"vtd_dmar_translate dev 00:03.00 iova 0x{rng.getrandbits(48):x} "
                       f"-> gpa 0x{rng.getrandbits(40):x} mask 0xfff\n")
        else:
            out.append(CASES[(i // 2) % len(CASES)][0] + "\n")
    return "".join(out).encode()


def test_compression_is_recognised_by_magic_bytes(tmp_path: Path) -> None:
    import lzma

    data = _trace_bytes(200)
    plain = [e.raw for e in parse_lines(data.decode().splitlines())]
    for name, blob in (
        ("trace.log.xz", lzma.compress(data)),
        ("trace-xz.log", lzma.compress(data)),
        ("trace.log.gz", gzip.compress(data)),
        ("trace-gz.log", gzip.compress(data)),
        ("two-streams.xz", lzma.compress(data[:1000]) + lzma.compress(data[1000:])),
        ("padded.xz", lzma.compress(data) + b"\x00" * 8),
    ):
        path = tmp_path / name
        path.write_bytes(blob)
        stats = ParseStats()
        assert [e.raw for e in parse_file(path, stats=stats)] == plain, name
        assert stats.bytes_read == len(data) and not stats.truncated


@pytest.mark.parametrize("kind", ["xz", "gz"])
def test_truncated_compressed_trace_raises_after_the_events_read(tmp_path: Path, kind: str) -> None:
    import lzma

    data = _trace_bytes(20000)
    blob = lzma.compress(data) if kind == "xz" else gzip.compress(data)
    path = tmp_path / f"trace.log.{kind}"
    path.write_bytes(blob[: len(blob) // 2])
    stats = ParseStats()
    events: list[Event] = []
    with pytest.raises(TraceReadError) as info:
        for event in parse_file(path, stats=stats):
            events.append(event)
    err = info.value
    assert isinstance(err, OSError) and str(path) in str(err) and "truncated" in str(err)
    assert err.path == str(path) and err.lines_read == len(events) > 100
    assert stats.truncated and stats.lines == len(events)
    # every line decoded before the damage, the last one cut short
    lines = data.decode().splitlines()
    assert [e.raw for e in events[:-1]] == lines[: len(events) - 1]
    assert lines[len(events) - 1].startswith(events[-1].raw)


def test_corrupt_compressed_trace_raises_trace_read_error(tmp_path: Path) -> None:
    import lzma

    data = _trace_bytes(4000)
    xz = bytearray(lzma.compress(data, preset=1))
    xz[len(xz) // 2] ^= 0xFF
    path = tmp_path / "bad.xz"
    path.write_bytes(bytes(xz))
    with pytest.raises(TraceReadError, match="corrupt: not valid xz data"):
        list(parse_file(path))
    gz = bytearray(gzip.compress(data))
    gz[-6] ^= 0xFF  # the CRC/size trailer
    path = tmp_path / "bad.gz"
    path.write_bytes(bytes(gz))
    with pytest.raises(TraceReadError, match="corrupt: not valid gzip data"):
        list(parse_file(path))
    path = tmp_path / "not.xz"
    path.write_bytes(b"plain text, not xz\n")
    with pytest.raises(TraceReadError, match="not valid xz data"):
        list(parse_file(path))
    path = tmp_path / "empty.gz"
    path.write_bytes(b"")
    with pytest.raises(TraceReadError, match="truncated gzip data"):
        list(parse_file(path))
    path = tmp_path / "trace.bz2"
    path.write_bytes(__import__("bz2").compress(data))
    with pytest.raises(TraceReadError, match="compressed with bzip2"):
        list(parse_file(path))


def test_non_regular_files_are_refused_without_blocking(tmp_path: Path) -> None:
    import os

    with pytest.raises(TraceReadError, match="is a directory") as info:
        list(parse_file(tmp_path))
    assert str(tmp_path) in str(info.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TraceReadError, match="is a FIFO, not a regular file"):
        list(parse_file(fifo))  # would block forever if it were opened for reading
    if os.path.exists("/dev/null"):
        with pytest.raises(TraceReadError, match="is a character device"):
            list(parse_file("/dev/null"))


def test_trace_read_error_pickles() -> None:
    import pickle

    err = TraceReadError("/x/trace.xz", "truncated xz data", 7)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, back.lines_read, str(back)) == (
        "/x/trace.xz", "truncated xz data", 7, "/x/trace.xz: truncated xz data")


def test_recorded_traces_parse_without_malformed_lines() -> None:
    root = Path(__file__).resolve().parents[1] / "data"
    for path in sorted(root.glob("*.trace.xz")):
        stats = ParseStats()
        for _ in parse_file(path, stats=stats):
            pass
        assert stats.lines > 1000 and stats.malformed == 0 and not stats.truncated, path
        assert stats.by_name.get("vtd_dmar_translate", 0) > 100
