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


def test_dma_helpers_events_parse_pointers_and_direction():
    from harness.trace import parse_line
    from harness.trace.events import DmaBlkCb, DmaBlkIo, DmaComplete
    e = parse_line("dma_blk_io dbs=0x5654f3557350 bs=0x5654f26c2ef0 offset=196608 to_dev=1", 3)
    assert isinstance(e, DmaBlkIo) and (e.dbs, e.offset, e.to_dev, e.lineno) == (0x5654F3557350, 196608, True, 3)
    e = parse_line("dma_blk_cb dbs=0x5654f3557350 ret=-5", 4)
    assert isinstance(e, DmaBlkCb) and e.ret == -5
    e = parse_line("dma_complete dbs=0x1 ret=0 cb=(nil)", 5)
    assert isinstance(e, DmaComplete) and e.cb == 0
