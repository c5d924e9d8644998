"""Tests of the guest ftrace parser (harness.trace.guest).

The event lines are written from the TP_printk formats of Linux 6.12
(include/trace/events/iommu.h, include/trace/events/dma.h,
drivers/iommu/intel/trace.h, drivers/nvme/host/trace.h and trace.c) with the
context columns of kernel/trace/trace_output.c.
"""

from __future__ import annotations

import gzip
import itertools
import lzma
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.trace.guest import (
    GUEST_EVENT_CLASSES,
    GUEST_TRACE_EVENTS,
    MAX_LINE_CHARS,
    NO_TIMESTAMP,
    GuestAddDeviceToGroup,
    GuestAttachDevice,
    GuestDetachDevice,
    GuestDmaAlloc,
    GuestDmaAllocPages,
    GuestDmaFree,
    GuestDmaFreePages,
    GuestDmaMap,
    GuestDmaMapPage,
    GuestDmaMapResource,
    GuestDmaMapSg,
    GuestDmaUnmap,
    GuestDmaUnmapPage,
    GuestDmaUnmapResource,
    GuestDmaUnmapSg,
    GuestEvent,
    GuestHeader,
    GuestIommuMap,
    GuestIommuUnmap,
    GuestIoPageFault,
    GuestLostEvents,
    GuestMalformedEvent,
    GuestMarker,
    GuestNvmeCompleteRq,
    GuestNvmeSetupCmd,
    GuestQiSubmit,
    GuestRemoveDeviceFromGroup,
    GuestUnknownEvent,
    parse_guest_file,
    parse_guest_line,
    parse_guest_lines,
    pci_sid,
)

CTX = "          python3-1234    [000] .....    12.345678: "
"""A default-options context: comm right-aligned in 16, pid, [cpu], 5 flags, timestamp."""


def ev(body: str, ctx: str = CTX) -> GuestEvent:
    return parse_guest_line(ctx + body + "\n", 7)


def malformed(body: str) -> GuestMalformedEvent:
    e = ev(body)
    assert isinstance(e, GuestMalformedEvent), e
    return e


# ---------------------------------------------------------------------------
# Context columns
# ---------------------------------------------------------------------------


def test_context_columns() -> None:
    e = ev("map: IOMMU: iova=0x00000000fffff000 - 0x0000000100000000 paddr=0x0000000004a1b000 size=4096")
    assert isinstance(e, GuestIommuMap)
    assert (e.lineno, e.timestamp, e.cpu, e.task, e.pid) == (7, 12.345678, 0, "python3", 1234)
    assert e.raw == CTX + "map: IOMMU: iova=0x00000000fffff000 - 0x0000000100000000 paddr=0x0000000004a1b000 size=4096"
    assert e.NAME == "map" and e.SYSTEM == "iommu"


@pytest.mark.parametrize(
    "ctx, task, pid, cpu, ts",
    [
        ("     kworker/0:1H-88      [001] d.h1.    99.000001: ", "kworker/0:1H", 88, 1, 99.000001),
        ("      Web Content-4242    [003] ....     1.500000: ", "Web Content", 4242, 3, 1.5),
        ("      jbd2/vda1-8-123     [000] .....     2.000000: ", "jbd2/vda1-8", 123, 0, 2.0),
        ("  a-b-c - d-e-77 [012] .N.1.  3.250000: ", "a-b-c - d-e", 77, 12, 3.25),
        ("           <idle>-0       [000] d..2. 0.000100: ", "<idle>", 0, 0, 0.0001),
        ("           <...>-5        [001] 7.000000: ", "<...>", 5, 1, 7.0),  # irq-info off
        ("         python3-10    (     10) [000] ..... 4.000000: ", "python3", 10, 0, 4.0),  # record-tgid
        ("         python3-10    (-------) [000] ..... 4.000000: ", "python3", 10, 0, 4.0),
        ("python3-10 [000] ..... 1234567: ", "python3", 10, 0, 1234567.0),  # counter clock
    ],
)
def test_context_variants(ctx: str, task: str, pid: int, cpu: int, ts: float) -> None:
    e = ev("tracing_mark_write: hello", ctx)
    assert isinstance(e, GuestMarker), e
    assert (e.task, e.pid, e.cpu, e.timestamp, e.text) == (task, pid, cpu, ts, "hello")


def test_a_marker_that_looks_like_a_context_stays_a_marker() -> None:
    text = "x-1 [001] ..... 1.000000: map: IOMMU: iova=0x0 - 0x1000 paddr=0x0 size=4096"
    e = ev("tracing_mark_write: " + text, "  sh-9 [000] ..... 5.000000: ")
    assert isinstance(e, GuestMarker), e
    assert (e.task, e.pid, e.cpu, e.text) == ("sh", 9, 0, text)


def test_crlf_and_missing_newline() -> None:
    body = "tracing_mark_write: x"
    assert parse_guest_line(CTX + body + "\r\n", 1).raw == CTX + body
    assert parse_guest_line(CTX + body, 1).raw == CTX + body


# ---------------------------------------------------------------------------
# Header, lost events, unknown lines
# ---------------------------------------------------------------------------

HEADER = """\
# tracer: nop
#
# entries-in-buffer/entries-written: 12/15   #P:2
#
#                                _-----=> irqs-off/BH-disabled
#                               / _----=> need-resched
#                              | / _---=> hardirq/softirq
#                              || / _--=> preempt-depth
#                              ||| / _-=> migrate-disable
#                              |||| /     delay
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
"""


def test_header_lines() -> None:
    events = list(parse_guest_lines(HEADER.splitlines()))
    assert all(isinstance(e, GuestHeader) for e in events)
    assert [e.lineno for e in events] == list(range(1, 13))
    assert isinstance(events[0], GuestHeader) and events[0].text == " tracer: nop"
    counts = events[2]
    assert isinstance(counts, GuestHeader)
    assert (counts.entries_in_buffer, counts.entries_written) == (12, 15)
    assert isinstance(events[0], GuestHeader) and events[0].entries_written is None
    assert all(e.timestamp == NO_TIMESTAMP and e.pid == -1 and e.task == "" for e in events)


def test_lost_events() -> None:
    e = parse_guest_line("CPU:1 [LOST 123 EVENTS]", 3)
    assert isinstance(e, GuestLostEvents)
    assert (e.cpu, e.count, e.lineno) == (1, 123, 3)


@pytest.mark.parametrize(
    "line",
    ["", "garbage", "   ", "\x00\x01\x02", "CPU:1 [LOST x EVENTS]",
     "  bash-1 [000] ..... 1.0: do_sys_open <-do_syscall_64",  # function tracer
     "map: IOMMU: iova=0x0 - 0x0 paddr=0x0 size=0",  # context-info off
     "python3 [000] ..... 1.0: map: x"],  # no pid
)
def test_non_event_lines_are_unknown_without_name(line: str) -> None:
    e = parse_guest_line(line, 1)
    assert isinstance(e, GuestUnknownEvent)
    assert e.name is None and e.body == line and e.raw == line
    assert (e.timestamp, e.cpu, e.pid, e.task) == (NO_TIMESTAMP, -1, -1, "")


def test_unknown_event_name_keeps_context() -> None:
    e = ev("dma_sync_single_for_cpu: 0000:00:03.0 dir=FROM_DEVICE dma_addr=fffff000 size=4096")
    assert isinstance(e, GuestUnknownEvent)
    assert e.name == "dma_sync_single_for_cpu"
    assert e.body == "0000:00:03.0 dir=FROM_DEVICE dma_addr=fffff000 size=4096"
    assert (e.pid, e.cpu) == (1234, 0)


# ---------------------------------------------------------------------------
# iommu
# ---------------------------------------------------------------------------


def test_iommu_map() -> None:
    e = ev("map: IOMMU: iova=0x00000000fffff000 - 0x0000000100000000 paddr=0x0000000004a1b000 size=4096")
    assert isinstance(e, GuestIommuMap)
    assert (e.iova, e.paddr, e.size, e.last) == (0xFFFFF000, 0x4A1B000, 4096, 0xFFFFFFFF)


def test_iommu_map_end_wraps_like_u64() -> None:
    e = ev("map: IOMMU: iova=0xfffffffffffff000 - 0x0000000000000000 paddr=0x0000000000001000 size=4096")
    assert isinstance(e, GuestIommuMap) and e.iova == 0xFFFFFFFFFFFFF000


def test_iommu_map_end_must_be_iova_plus_size() -> None:
    m = malformed("map: IOMMU: iova=0x0000000000001000 - 0x0000000000003000 paddr=0x0000000000001000 size=4096")
    assert m.name == "map" and m.family == "iommu" and "iova + size" in m.reason


def test_iommu_unmap() -> None:
    e = ev("unmap: IOMMU: iova=0x00000000ffffe000 - 0x0000000100000000 size=8192 unmapped_size=4096")
    assert isinstance(e, GuestIommuUnmap)
    assert (e.iova, e.size, e.unmapped_size) == (0xFFFFE000, 8192, 4096)


def test_io_page_fault() -> None:
    e = ev("io_page_fault: IOMMU:nvme 0000:00:04.0 iova=0x00000000deadb000 flags=0x0001")
    assert isinstance(e, GuestIoPageFault)
    assert (e.driver, e.device, e.iova, e.flags, e.sid) == ("nvme", "0000:00:04.0", 0xDEADB000, 1, 0x20)
    e = ev("io_page_fault: IOMMU: 0000:00:04.0 iova=0x0000000000001000 flags=0x0000")  # no driver
    assert isinstance(e, GuestIoPageFault) and e.driver == "" and e.device == "0000:00:04.0"


def test_attach_detach_and_groups_are_distinct_classes() -> None:
    a = ev("attach_device_to_domain: IOMMU: device=0000:00:03.0")
    d = ev("detach_device_from_domain: IOMMU: device=0000:00:03.0")
    g = ev("add_device_to_group: IOMMU: groupID=7 device=0000:00:03.0")
    r = ev("remove_device_from_group: IOMMU: groupID=7 device=0000:00:03.0")
    assert isinstance(a, GuestAttachDevice) and not isinstance(a, GuestDetachDevice)
    assert isinstance(d, GuestDetachDevice) and not isinstance(d, GuestAttachDevice)
    assert isinstance(g, GuestAddDeviceToGroup) and not isinstance(g, GuestRemoveDeviceFromGroup)
    assert isinstance(r, GuestRemoveDeviceFromGroup) and not isinstance(r, GuestAddDeviceToGroup)
    assert a.device == d.device == "0000:00:03.0" and a.sid == 0x18
    assert (g.group_id, g.device, r.group_id) == (7, "0000:00:03.0", 7)


# ---------------------------------------------------------------------------
# dma
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, cls", [("dma_map_page", GuestDmaMapPage),
                                       ("dma_map_resource", GuestDmaMapResource)])
def test_dma_map_page_and_resource(name: str, cls: type[GuestDmaMap]) -> None:
    e = ev(f"{name}: 0000:00:04.0 dir=TO_DEVICE dma_addr=fffff000 size=4096 phys_addr=4a1b000"
           " attrs=SKIP_CPU_SYNC|WEAK_ORDERING")
    assert type(e) is cls and isinstance(e, GuestDmaMap)
    assert e.api == name[4:]
    assert (e.device, e.dir, e.segments, e.phys) == ("0000:00:04.0", "TO_DEVICE", ((0xFFFFF000, 4096),),
                                                     (0x4A1B000,))
    assert (e.truncated, e.attrs, e.sid, e.failed, e.size) == (False, "SKIP_CPU_SYNC|WEAK_ORDERING", 0x20,
                                                               False, 4096)


def test_dma_map_page_no_attrs() -> None:
    e = ev("dma_map_page: 0000:00:04.0 dir=BIDIRECTIONAL dma_addr=0 size=512 phys_addr=0 attrs=")
    assert isinstance(e, GuestDmaMapPage) and e.attrs == "" and e.segments == ((0, 512),)


@pytest.mark.parametrize("name, cls", [("dma_alloc", GuestDmaAlloc), ("dma_alloc_pages", GuestDmaAllocPages)])
def test_dma_alloc(name: str, cls: type[GuestDmaMap]) -> None:
    e = ev(f"{name}: 0000:00:04.0 dir=BIDIRECTIONAL dma_addr=fffe0000 size=8192 virt_addr=00000000c0ffee12"
           " flags=GFP_KERNEL|__GFP_ZERO attrs=")
    assert type(e) is cls
    assert (e.api, e.segments, e.phys, e.virt_addr, e.gfp_flags) == (
        name[4:], ((0xFFFE0000, 8192),), (), "00000000c0ffee12", "GFP_KERNEL|__GFP_ZERO")
    assert not e.failed


@pytest.mark.parametrize("virt", ["0000000000000000", "(null)", "          (null)", "0"])
def test_dma_alloc_failure_is_kept_and_flagged(virt: str) -> None:
    # kernel/dma/mapping.c: trace_dma_alloc(dev, NULL, 0, size, ...) on failure.
    e = ev(f"dma_alloc: 0000:00:04.0 dir=BIDIRECTIONAL dma_addr=0 size=4096 virt_addr={virt}"
           " flags=GFP_KERNEL attrs=")
    assert isinstance(e, GuestDmaAlloc)
    assert e.failed and e.segments == ((0, 4096),)


def test_dma_map_sg() -> None:
    e = ev("dma_map_sg: 0000:00:04.0 dir=FROM_DEVICE nents=3/3 ents=2/2 dma_addrs={0xfffe0000,0xfff00000}"
           " sizes={0x3000,0x1000} phys_addrs={0x4a1b000,0x4a1c000,0x7000000} attrs=")
    assert isinstance(e, GuestDmaMapSg)
    assert e.api == "map_sg" and e.dir == "FROM_DEVICE"
    assert e.segments == ((0xFFFE0000, 0x3000), (0xFFF00000, 0x1000))
    assert e.phys == (0x4A1B000, 0x4A1C000, 0x7000000)
    assert (e.nents, e.ents, e.truncated, e.size) == (3, 2, False, 0x4000)


def test_dma_map_sg_truncated() -> None:
    dma = ",".join(f"{0x100000 + i * 0x1000:#x}" for i in range(128))
    sizes = ",".join(["0x1000"] * 128)
    phys = ",".join(f"{0x200000 + i * 0x1000:#x}" for i in range(128))
    e = ev(f"dma_map_sg: 0000:00:04.0 dir=TO_DEVICE nents=128/300 ents=128/300 [TRUNCATED]"
           f" dma_addrs={{{dma}}} sizes={{{sizes}}} phys_addrs={{{phys}}} attrs=")
    assert isinstance(e, GuestDmaMapSg)
    assert e.truncated and (e.nents, e.ents) == (300, 300) and len(e.segments) == 128


@pytest.mark.parametrize(
    "counts, arrays",
    [
        ("nents=2/2 ents=1/1", "dma_addrs={0x1000,0x2000} sizes={0x1000} phys_addrs={0x1,0x2}"),
        ("nents=2/2 ents=1/1", "dma_addrs={0x1000} sizes={0x1000} phys_addrs={0x1}"),
        ("nents=1/200 ents=1/1", "dma_addrs={0x1000} sizes={0x1000} phys_addrs={0x1}"),
        ("nents=1/1 ents=1/1 [TRUNCATED]", "dma_addrs={0x1000} sizes={0x1000} phys_addrs={0x1}"),
        ("nents=1/1 ents=1/1", "dma_addrs={0x1000} sizes={0x100000000} phys_addrs={0x1}"),
        ("nents=1/1 ents=1/1", "dma_addrs={0x10000000000000000} sizes={0x1} phys_addrs={0x1}"),
        ("nents=1/1 ents=1/1", "dma_addrs={1000} sizes={0x1} phys_addrs={0x1}"),
        ("nents=1/1 ents=1/1", "dma_addrs={0x1,} sizes={0x1} phys_addrs={0x1}"),
    ],
    ids=["dma-len", "phys-len", "traced-count", "truncated-flag", "size-u32", "addr-u64", "no-0x",
         "trailing-comma"],
)
def test_dma_map_sg_inconsistent_is_malformed(counts: str, arrays: str) -> None:
    m = malformed(f"dma_map_sg: 0000:00:04.0 dir=TO_DEVICE {counts} {arrays} attrs=")
    assert m.family == "dma"


@pytest.mark.parametrize("name, cls", [("dma_unmap_page", GuestDmaUnmapPage),
                                       ("dma_unmap_resource", GuestDmaUnmapResource)])
def test_dma_unmap_page_and_resource(name: str, cls: type[GuestDmaUnmap]) -> None:
    e = ev(f"{name}: 0000:00:04.0 dir=TO_DEVICE dma_addr=fffff000 size=4096 attrs=")
    assert type(e) is cls and isinstance(e, GuestDmaUnmap)
    assert (e.api, e.device, e.dir, e.segments, e.phys, e.sid) == (
        name[4:], "0000:00:04.0", "TO_DEVICE", ((0xFFFFF000, 4096),), (), 0x20)


@pytest.mark.parametrize("name, cls", [("dma_free", GuestDmaFree), ("dma_free_pages", GuestDmaFreePages)])
def test_dma_free(name: str, cls: type[GuestDmaUnmap]) -> None:
    e = ev(f"{name}: 0000:00:04.0 dir=BIDIRECTIONAL dma_addr=fffe0000 size=8192"
           " virt_addr=00000000c0ffee12 attrs=")
    assert type(e) is cls
    assert (e.api, e.segments, e.virt_addr) == (name[4:], ((0xFFFE0000, 8192),), "00000000c0ffee12")


def test_dma_unmap_sg() -> None:
    e = ev("dma_unmap_sg: 0000:00:04.0 dir=FROM_DEVICE phys_addrs={0x4a1b000,0x4a1c000} attrs=")
    assert isinstance(e, GuestDmaUnmapSg)
    assert (e.api, e.segments, e.phys) == ("unmap_sg", (), (0x4A1B000, 0x4A1C000))
    e = ev("dma_unmap_sg: 0000:00:04.0 dir=FROM_DEVICE phys_addrs={} attrs=")
    assert isinstance(e, GuestDmaUnmapSg) and e.phys == ()


@pytest.mark.parametrize(
    "body",
    [
        "dma_map_page: 0000:00:04.0 dir=0x5 dma_addr=1000 size=4096 phys_addr=1000 attrs=",
        "dma_map_page: 0000:00:04.0 dir=TO_DEVICE dma_addr=10000000000000000 size=4096 phys_addr=1 attrs=",
        "dma_map_page: 0000:00:04.0 dir=TO_DEVICE dma_addr=1000 size=18446744073709551616 phys_addr=1 attrs=",
        "dma_map_page: 0000:00:04.0 dir=TO_DEVICE dma_addr=0x1000 size=4096 phys_addr=1 attrs=",
        "dma_unmap_page: 0000:00:04.0 dir=TO_DEVICE dma_addr=1000 size=-1 attrs=",
        "dma_alloc: 0000:00:04.0 dir=BIDIRECTIONAL dma_addr=0 size=4096 flags=GFP_KERNEL attrs=",
    ],
    ids=["dir", "addr-u64", "size-u64", "0x-prefix", "negative", "no-virt"],
)
def test_dma_malformed(body: str) -> None:
    assert malformed(body).family == "dma"


@pytest.mark.parametrize(
    "device, sid",
    [("0000:00:03.0", 0x18), ("0000:01:00.1", 0x101), ("0001:ff:1f.7", 0xFFFF), ("10000:00:02.0", 0x10),
     ("0000:00:20.0", None), ("0000:00:03.8", None), ("virtio0", None), ("0000:00:03", None), ("", None)],
)
def test_pci_sid(device: str, sid: int | None) -> None:
    assert pci_sid(device) == sid


def test_non_pci_device_has_no_sid() -> None:
    e = ev("dma_map_page: ACPI0007:00 dir=TO_DEVICE dma_addr=1000 size=4096 phys_addr=1000 attrs=")
    assert isinstance(e, GuestDmaMapPage) and e.device == "ACPI0007:00" and e.sid is None


# ---------------------------------------------------------------------------
# intel_iommu
# ---------------------------------------------------------------------------


def test_qi_submit_page_selective_iotlb() -> None:
    # qi_flush_iotlb(): QI_IOTLB_DID(5) | QI_IOTLB_DR | QI_IOTLB_DW | QI_IOTLB_GRAN(PSI) | QI_IOTLB_TYPE
    qw0 = (5 << 16) | (1 << 7) | (1 << 6) | (3 << 4) | 0x2
    qw1 = 0xFFFF0000 | (1 << 6) | 4
    e = ev(f"qi_submit: iotlb_inv dmar0: {qw0:#x} {qw1:#x} 0x0 0x0")
    assert isinstance(e, GuestQiSubmit)
    assert (e.desc_type, e.iommu, e.qw0, e.qw1, e.qw2, e.qw3) == ("iotlb_inv", "dmar0", qw0, qw1, 0, 0)
    assert (e.granularity, e.did, e.addr, e.am, e.ih) == ("page", 5, 0xFFFF0000, 4, 1)


@pytest.mark.parametrize("gran, name", [(1, "global"), (2, "domain"), (3, "page"), (0, None)])
def test_qi_submit_granularity(gran: int, name: str | None) -> None:
    e = ev(f"qi_submit: iotlb_inv dmar0: {(gran << 4) | 2:#x} 0x0 0x0 0x0")
    assert isinstance(e, GuestQiSubmit) and e.granularity == name


def test_qi_submit_other_types() -> None:
    e = ev("qi_submit: inv_wait dmar1: 0x200000025 0x7f3c1000 0x0 0x0")
    assert isinstance(e, GuestQiSubmit) and e.desc_type == "inv_wait" and e.granularity is None
    e = ev("qi_submit: 0xb dmar0: 0xb 0x0 0x0 0x0")  # __print_symbolic of an unknown type
    assert isinstance(e, GuestQiSubmit) and e.desc_type == "0xb"


@pytest.mark.parametrize(
    "body",
    ["qi_submit: iotlb_inv dmar0: 0x15 0x0 0x0 0x0",  # type 5 printed as iotlb_inv
     "qi_submit: bogus_inv dmar0: 0x2 0x0 0x0 0x0",
     "qi_submit: iotlb_inv dmar0: 0x12 0x10000000000000000 0x0 0x0",
     "qi_submit: iotlb_inv dmar0: 0x12 0x0 0x0"],
    ids=["type-mismatch", "unknown-name", "qw1-u64", "three-qwords"],
)
def test_qi_submit_malformed(body: str) -> None:
    assert malformed(body).family == "intel_iommu"


# ---------------------------------------------------------------------------
# nvme
# ---------------------------------------------------------------------------


def test_nvme_setup_cmd_write() -> None:
    e = ev("nvme_setup_cmd: nvme0: disk=nvme0n1, qid=1, cmdid=16385, nsid=1, flags=0x0, meta=0x0,"
           " cmd=(nvme_cmd_write slba=2048, len=7, ctrl=0x0, dsmgmt=0, reftag=0)")
    assert isinstance(e, GuestNvmeSetupCmd)
    assert (e.ctrl, e.disk, e.qid, e.cid, e.nsid, e.flags, e.meta) == (0, "nvme0n1", 1, 16385, 1, 0, 0)
    assert (e.opcode_name, e.cmd_args) == ("nvme_cmd_write", "slba=2048, len=7, ctrl=0x0, dsmgmt=0, reftag=0")
    assert (e.slba, e.length, e.blocks) == (2048, 7, 8)


def test_nvme_setup_cmd_admin_without_disk() -> None:
    e = ev("nvme_setup_cmd: nvme0: qid=0, cmdid=12, nsid=0, flags=0x0, meta=0x0,"
           " cmd=(nvme_admin_identify cns=1, ctrlid=0)")
    assert isinstance(e, GuestNvmeSetupCmd)
    assert (e.disk, e.qid, e.opcode_name, e.cmd_args) == (None, 0, "nvme_admin_identify", "cns=1, ctrlid=0")
    assert (e.slba, e.length, e.blocks) == (None, None, None)


def test_nvme_setup_cmd_hex_slba_and_raw_cdw10() -> None:
    # nvme_trace_get_lba_status prints slba=0x%llx; nvme_trace_common cdw10=%*ph.
    e = ev("nvme_setup_cmd: nvme1: qid=0, cmdid=3, nsid=1, flags=0x0, meta=0x0,"
           " cmd=(nvme_admin_get_lba_status slba=0x1f4, mndw=0x10, rl=0x0, atype=0)")
    assert isinstance(e, GuestNvmeSetupCmd) and e.ctrl == 1 and e.slba == 0x1F4 and e.length is None
    cdw = " ".join(["00"] * 24)
    e = ev(f"nvme_setup_cmd: nvme0: disk=nvme0n1, qid=2, cmdid=9, nsid=1, flags=0x0, meta=0x0,"
           f" cmd=(nvme_cmd_flush cdw10={cdw})")
    assert isinstance(e, GuestNvmeSetupCmd)
    assert (e.opcode_name, e.cmd_args, e.slba) == ("nvme_cmd_flush", f"cdw10={cdw}", None)


def test_nvme_complete_rq() -> None:
    e = ev("nvme_complete_rq: nvme0: disk=nvme0n1, qid=1, cmdid=16385, res=0, retries=0, flags=0x0, status=0")
    assert isinstance(e, GuestNvmeCompleteRq)
    assert (e.ctrl, e.disk, e.qid, e.cid, e.result, e.retries, e.flags, e.status) == (
        0, "nvme0n1", 1, 16385, 0, 0, 0, 0)
    e = ev("nvme_complete_rq: nvme0: qid=0, cmdid=7, res=0x1f001f, retries=2, flags=0x2, status=0x4004")
    assert isinstance(e, GuestNvmeCompleteRq)
    assert (e.disk, e.result, e.retries, e.flags, e.status) == (None, 0x1F001F, 2, 2, 0x4004)


@pytest.mark.parametrize(
    "body",
    [
        "nvme_setup_cmd: nvme0: disk=nvme0n1, qid=1, cmdid=65536, nsid=1, flags=0x0, meta=0x0, cmd=(nvme_cmd_read slba=0, len=0, ctrl=0x0, dsmgmt=0, reftag=0)",
        "nvme_setup_cmd: nvme0: disk=nvme0n1, qid=1, cmdid=1, nsid=4294967296, flags=0x0, meta=0x0, cmd=(nvme_cmd_read slba=0, len=0, ctrl=0x0, dsmgmt=0, reftag=0)",
        "nvme_setup_cmd: nvme0: disk=nvme0n1, qid=1, cmdid=1, nsid=1, flags=0x100, meta=0x0, cmd=(nvme_cmd_read slba=0, len=0, ctrl=0x0, dsmgmt=0, reftag=0)",
        "nvme_setup_cmd: nvme0: disk=nvme0n1, qid=1, cmdid=1, nsid=1, flags=0x0, meta=0x0, cmd=(nvme_cmd_read slba=18446744073709551616, len=0, ctrl=0x0, dsmgmt=0, reftag=0)",
        "nvme_setup_cmd: nvme0: disk=nvme0n1, qid=1, cmdid=1, nsid=1, flags=0x0, meta=0x0, cmd=(nvme_cmd_read slba=0, len=65536, ctrl=0x0, dsmgmt=0, reftag=0)",
        "nvme_setup_cmd: nvme0: disk=nvme0n1, qid=2147483648, cmdid=1, nsid=1, flags=0x0, meta=0x0, cmd=(nvme_cmd_read slba=0, len=0, ctrl=0x0, dsmgmt=0, reftag=0)",
        "nvme_complete_rq: nvme0: qid=0, cmdid=7, res=0x10000000000000000, retries=0, flags=0x0, status=0",
        "nvme_complete_rq: nvme0: qid=0, cmdid=7, res=0, retries=256, flags=0x0, status=0",
        "nvme_complete_rq: nvme0: qid=0, cmdid=7, res=0, retries=0, flags=0x0, status=0x10000",
        "nvme_complete_rq: nvme0: qid=0, cmdid=7, res=00, retries=0, flags=0x0, status=0",
    ],
    ids=["cid-u16", "nsid-u32", "flags-u8", "slba-u64", "len-u16", "qid-int", "res-u64", "retries-u8",
         "status-u16", "res-format"],
)
def test_nvme_malformed(body: str) -> None:
    assert malformed(body).family == "nvme"


# ---------------------------------------------------------------------------
# Marker, malformed, limits
# ---------------------------------------------------------------------------


def test_marker() -> None:
    e = ev("tracing_mark_write: dma-harness op=3 begin  ")
    assert isinstance(e, GuestMarker) and e.text == "dma-harness op=3 begin  "
    e = ev("tracing_mark_write: ")
    assert isinstance(e, GuestMarker) and e.text == ""


def test_iommu_values_wider_than_their_field() -> None:
    m = malformed("map: IOMMU: iova=0x10000000000000000 - 0x0000000000001000 paddr=0x0 size=4096")
    assert m.name == "map" and "64 bits" in m.reason
    malformed("unmap: IOMMU: iova=0x0 - 0x0 size=0 unmapped_size=99999999999999999999999")
    malformed("io_page_fault: IOMMU:nvme 0000:00:04.0 iova=0x0000000000001000 flags=0x100000000")
    malformed("add_device_to_group: IOMMU: groupID=2147483648 device=0000:00:03.0")
    malformed("map: IOMMU: iova=0x" + "0" * 5000 + "1" * 5000 + " - 0x0 paddr=0x0 size=0")
    malformed("map: IOMMU: iova=0x0 - 0x0 paddr=0x0 size=" + "9" * 10000)


def test_leading_zeros_are_not_width() -> None:
    e = ev("map: IOMMU: iova=0x" + "0" * 40 + "1000 - 0x2000 paddr=0x0 size=4096")
    assert isinstance(e, GuestIommuMap) and e.iova == 0x1000


def test_malformed_families() -> None:
    assert malformed("map: nonsense").family == "iommu"
    assert malformed("dma_map_sg: nonsense").family == "dma"
    assert malformed("qi_submit: nonsense").family == "intel_iommu"
    assert malformed("nvme_setup_cmd: nonsense").family == "nvme"
    m = malformed("map: IOMMU: iova=0x1 - 0x2 paddr=0x3 size=1 trailing")
    assert m.body == "IOMMU: iova=0x1 - 0x2 paddr=0x3 size=1 trailing"
    assert (m.pid, m.task, m.lineno) == (1234, "python3", 7)


def test_line_of_one_megabyte() -> None:
    line = CTX + "tracing_mark_write: " + "x" * (1 << 20)
    e = parse_guest_line(line, 5)
    assert isinstance(e, GuestMalformedEvent)
    assert len(e.raw) <= 4096 and line.startswith(e.raw)
    assert (e.name, e.family, e.pid, e.lineno) == ("tracing_mark_write", "ftrace", 1234, 5)
    e = parse_guest_line("y" * (1 << 20), 6)
    assert isinstance(e, GuestMalformedEvent) and e.name is None and e.family == ""
    assert isinstance(parse_guest_line(CTX + "tracing_mark_write: " + "x" * 60000, 1), GuestMarker)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_guest_trace_events() -> None:
    assert all(re.fullmatch(r"[a-z_]+:[a-z_]+", name) for name in GUEST_TRACE_EVENTS)
    assert len(set(GUEST_TRACE_EVENTS)) == len(GUEST_TRACE_EVENTS)
    for name in ("iommu:map", "iommu:unmap", "iommu:io_page_fault", "iommu:attach_device_to_domain",
                 "iommu:add_device_to_group", "dma:dma_map_page", "dma:dma_map_resource", "dma:dma_alloc",
                 "dma:dma_alloc_pages", "dma:dma_map_sg", "dma:dma_unmap_page", "dma:dma_unmap_resource",
                 "dma:dma_free", "dma:dma_free_pages", "dma:dma_unmap_sg", "intel_iommu:qi_submit",
                 "nvme:nvme_setup_cmd", "nvme:nvme_complete_rq"):
        assert name in GUEST_TRACE_EVENTS
    assert not any("tracing_mark_write" in n or "detach" in n for n in GUEST_TRACE_EVENTS)


def test_every_class_has_its_own_name_and_format() -> None:
    names = [cls.NAME for cls in GUEST_EVENT_CLASSES]
    assert len(set(names)) == len(names) and all(names)
    assert all(cls.SYSTEM for cls in GUEST_EVENT_CLASSES)
    for cls in GUEST_EVENT_CLASSES:
        assert cls.FORMAT is not GuestEvent.FORMAT, cls
        assert "__slots__" in vars(cls), cls


def test_events_are_frozen() -> None:
    e = ev("tracing_mark_write: x")
    with pytest.raises(AttributeError):
        e.lineno = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Streams and files
# ---------------------------------------------------------------------------

SAMPLE = HEADER + "\n".join(CTX + body for body in [
    "attach_device_to_domain: IOMMU: device=0000:00:04.0",
    "dma_map_page: 0000:00:04.0 dir=TO_DEVICE dma_addr=fffff000 size=4096 phys_addr=4a1b000 attrs=",
    "map: IOMMU: iova=0x00000000fffff000 - 0x0000000100000000 paddr=0x0000000004a1b000 size=4096",
    "nvme_setup_cmd: nvme0: disk=nvme0n1, qid=1, cmdid=1, nsid=1, flags=0x0, meta=0x0,"
    " cmd=(nvme_cmd_write slba=0, len=7, ctrl=0x0, dsmgmt=0, reftag=0)",
    "nvme_complete_rq: nvme0: disk=nvme0n1, qid=1, cmdid=1, res=0, retries=0, flags=0x0, status=0",
    "dma_unmap_page: 0000:00:04.0 dir=TO_DEVICE dma_addr=fffff000 size=4096 attrs=",
    "unmap: IOMMU: iova=0x00000000fffff000 - 0x0000000100000000 size=4096 unmapped_size=4096",
    "qi_submit: iotlb_inv dmar0: 0x10032 0xfffff000 0x0 0x0",
]) + "\n"

SAMPLE_TYPES = [GuestHeader] * 12 + [GuestAttachDevice, GuestDmaMapPage, GuestIommuMap, GuestNvmeSetupCmd,
                                     GuestNvmeCompleteRq, GuestDmaUnmapPage, GuestIommuUnmap, GuestQiSubmit]


def test_parse_guest_lines_numbers_from_start() -> None:
    events = list(parse_guest_lines(SAMPLE.splitlines(keepends=True), start=10))
    assert [type(e) for e in events] == SAMPLE_TYPES
    assert [e.lineno for e in events] == list(range(10, 10 + len(SAMPLE_TYPES)))


def test_parse_guest_lines_is_lazy() -> None:
    def endless() -> Iterator[str]:
        while True:
            yield CTX + "tracing_mark_write: tick"

    gen = parse_guest_lines(endless())
    assert [e.lineno for e in itertools.islice(gen, 3)] == [1, 2, 3]


def test_parse_guest_file(tmp_path: Path) -> None:
    path = tmp_path / "trace"
    path.write_text(SAMPLE)
    assert [type(e) for e in parse_guest_file(path)] == SAMPLE_TYPES
    gz = tmp_path / "trace.gz"
    gz.write_bytes(gzip.compress(SAMPLE.encode()))
    assert [type(e) for e in parse_guest_file(str(gz))] == SAMPLE_TYPES


def test_parse_guest_file_replaces_bad_bytes_and_bounds_long_lines(tmp_path: Path) -> None:
    path = tmp_path / "trace"
    long_line = (CTX + "tracing_mark_write: ").encode() + b"z" * (3 * MAX_LINE_CHARS)
    path.write_bytes(CTX.encode() + b"tracing_mark_write: caf\xe9\r\n" + long_line + b"\n"
                     + CTX.encode() + b"tracing_mark_write: after")
    events = list(parse_guest_file(path))
    assert len(events) == 3
    assert isinstance(events[0], GuestMarker) and events[0].text == "caf\ufffd"
    assert isinstance(events[1], GuestMalformedEvent) and events[1].name == "tracing_mark_write"
    assert isinstance(events[2], GuestMarker) and events[2].text == "after" and events[2].lineno == 3


def test_parse_guest_file_missing_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        list(parse_guest_file(tmp_path / "absent"))


@pytest.mark.parametrize("suffix, data", [
    (".gz", gzip.compress(SAMPLE.encode())[:-30]),
    (".xz", lzma.compress(SAMPLE.encode())[:-30]),
    (".xz", b"not xz at all"),
    (".gz", gzip.compress(SAMPLE.encode())[:20] + b"\xff" * 50),
], ids=["gz-truncated", "xz-truncated", "xz-garbage", "gz-corrupt"])
def test_damaged_compressed_file_is_oserror(tmp_path: Path, suffix: str, data: bytes) -> None:
    path = tmp_path / f"trace{suffix}"
    path.write_bytes(data)
    with pytest.raises(OSError):
        list(parse_guest_file(path))


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

KNOWN_NAMES = [cls.NAME for cls in GUEST_EVENT_CLASSES]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_arbitrary_text(text: str) -> None:
    e = parse_guest_line(text, 1)
    assert isinstance(e, GuestEvent)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(KNOWN_NAMES),
       st.lists(st.one_of(st.sampled_from(["IOMMU: ", "iova=0x", " - 0x", " paddr=0x", " size=", "0000:00:04.0",
                                           " dir=TO_DEVICE", " dma_addr=", " attrs=", "{", "}", ",", "0x",
                                           "nvme0: ", "disk=nvme0n1, ", "qid=", ", cmdid=", "cmd=(", ")",
                                           "iotlb_inv dmar0: ", " unmapped_size=", "-", "ffffffffffffffffff"]),
                          st.from_regex(r"[0-9a-f]{0,20}", fullmatch=True)), max_size=25))
def test_never_raises_on_near_miss_bodies(name: str, parts: list[str]) -> None:
    e = parse_guest_line(f"{CTX}{name}: {''.join(parts)}", 1)
    assert isinstance(e, GuestEvent)
    assert not isinstance(e, GuestUnknownEvent)


U64 = st.integers(0, 2**64 - 1)


@settings(max_examples=200, deadline=None)
@given(U64, U64, U64)
def test_map_round_trip(iova: int, paddr: int, size: int) -> None:
    body = (f"map: IOMMU: iova=0x{iova:016x} - 0x{(iova + size) % 2**64:016x} paddr=0x{paddr:016x}"
            f" size={size}")
    e = ev(body)
    assert isinstance(e, GuestIommuMap) and (e.iova, e.paddr, e.size) == (iova, paddr, size)


@settings(max_examples=200, deadline=None)
@given(U64, U64, st.integers(0, 2**16 - 1), st.integers(0, 0x3F), st.integers(0, 1))
def test_dma_and_qi_round_trip(dma: int, phys: int, did: int, am: int, ih: int) -> None:
    e = ev(f"dma_map_page: 0000:00:04.0 dir=FROM_DEVICE dma_addr={dma:x} size={phys} phys_addr={phys:x} attrs=")
    assert isinstance(e, GuestDmaMapPage) and e.segments == ((dma, phys),) and e.phys == (phys,)
    qw0, qw1 = (did << 16) | (3 << 4) | 2, (dma & ~0xFFF) | (ih << 6) | am
    q = ev(f"qi_submit: iotlb_inv dmar0: {qw0:#x} {qw1:#x} 0x0 0x0")
    assert isinstance(q, GuestQiSubmit)
    assert (q.granularity, q.did, q.addr, q.am, q.ih) == ("page", did, dma & ~0xFFF, am, ih)
