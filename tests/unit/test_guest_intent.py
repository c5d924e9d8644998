"""The guest-intent and block-data checkers on small two-sided streams: the guest
kernel's trace (tracefs text, as the agent collects it) beside QEMU 7.2's trace.

Device 0000:00:03.0 is sid 0x18, QEMU prints it ``dev 00:03.00``; VT-d domain 1.
Each planted misbehaviour of the device (or of a guest that skips a flush) must
give its own divergence kind, and the clean streams none.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.checks.block_data import BlockDataChecker, ios_from_records
from harness.checks.guest_intent import check_guest_intent
from harness.checks.sync import SyncPairs, host_sync_keys
from harness.checks.verdict import CheckReport
from harness.trace import parse_lines
from harness.trace.events import Event
from harness.trace.guest import GuestEvent, parse_guest_lines

DEV = "0000:00:03.0"
IOVA, IOVA2 = 0xFFFFF000, 0xFFFFE000
PAGE_A, PAGE_B = 0x5000000, 0x6000000
_ts = [100.0]


def g(event: str, body: str) -> str:
    """One guest trace line."""
    _ts[0] += 0.000001
    return f"          python3-120     [000] .....   {_ts[0]:.6f}: {event}: {body}"


def g_map(iova: int, paddr: int, size: int = 4096) -> str:
    return g("map", f"IOMMU: iova=0x{iova:016x} - 0x{iova + size:016x} paddr=0x{paddr:016x} size={size}")


def g_unmap(iova: int, size: int = 4096) -> str:
    return g("unmap", f"IOMMU: iova=0x{iova:016x} - 0x{iova + size:016x} size={size} unmapped_size={size}")


def g_dma_map(iova: int, paddr: int, direction: str, size: int = 4096) -> str:
    return g("dma_map_page", f"{DEV} dir={direction} dma_addr={iova:x} size={size} phys_addr={paddr:x} attrs=")


def g_dma_unmap(iova: int, direction: str, size: int = 4096) -> str:
    return g("dma_unmap_page", f"{DEV} dir={direction} dma_addr={iova:x} size={size} attrs=")


def g_inv(iova: int, did: int = 1) -> str:
    return g("qi_submit", f"iotlb_inv dmar0: {did << 16 | 0x32:#x} {iova:#x} 0x0 0x0")


def g_cmd(cid: int, opcode: str = "nvme_cmd_read", slba: int = 0) -> str:
    return g("nvme_setup_cmd", f"nvme0: disk=nvme0n1, qid=1, cmdid={cid}, nsid=1, flags=0x0, meta=0x0, "
                               f"cmd=({opcode} slba={slba}, len=7, ctrl=0x0, dsmgmt=0, reftag=0)")


def g_done(cid: int) -> str:
    return g("nvme_complete_rq", f"nvme0: disk=nvme0n1, qid=1, cmdid={cid}, res=0x0, retries=0, flags=0x0, "
                                 "status=0x0")


def g_mark(text: str) -> str:
    return g("tracing_mark_write", text)


def h_inv(iova: int, domain: int = 1) -> str:
    return f"vtd_inv_desc_iotlb_pages iotlb invalidate domain {domain:#x} addr {iova:#x} mask 0x0"


def h_cmd(cid: int, read: bool = True, lba: int = 0) -> list[str]:
    opc, name = ("0x2", "NVME_NVM_CMD_READ") if read else ("0x1", "NVME_NVM_CMD_WRITE")
    rw = (f"pci_nvme_read cid {cid} nsid 1 nlb 8 count 4096 lba {lba:#x}" if read
          else f"pci_nvme_write cid {cid} opname 'write' nsid 1 nlb 8 count 4096 lba {lba:#x}")
    return [f"pci_nvme_io_cmd cid {cid} nsid 0x1 sqid 1 opc {opc} opname '{name}'", rw]


def h_dma(dbs: int, to_dev: bool, *translations: tuple[int, int]) -> list[str]:
    out = [f"dma_blk_io dbs={dbs:#x} bs=0x5555 offset=0 to_dev={int(to_dev)}", f"dma_blk_cb dbs={dbs:#x} ret=0"]
    for iova, gpa in translations:
        out.append(f"vtd_iotlb_page_update IOTLB page update sid 0x18 iova {iova:#x} slpte {gpa | 3:#x} domain 0x1")
        out.append(f"vtd_dmar_translate dev 00:03.00 iova {iova:#x} -> gpa {gpa:#x} mask 0xfff")
    out.append(f"dma_complete dbs={dbs:#x} ret=0 cb=0x7777")
    return out


def h_done(cid: int) -> str:
    return f"pci_nvme_enqueue_req_completion cid {cid} cqid 1 dw0 0x0 dw1 0x0 status 0x0"


def one_read(direction: str = "FROM_DEVICE", gpa: int = PAGE_A, to_dev: bool = False) -> tuple[list[str], list[str]]:
    """A guest reading one page from the NVMe namespace into PAGE_A at IOVA (caching mode: flush on map)."""
    guest = [g_mark("dma-harness io 1 begin read pos=0 len=4096"), g_map(IOVA, PAGE_A),
             g_dma_map(IOVA, PAGE_A, direction), g_inv(IOVA), g_cmd(5), g_done(5), g_unmap(IOVA), g_inv(IOVA),
             g_dma_unmap(IOVA, direction), g_mark("dma-harness io 1 end")]
    host = [h_inv(IOVA), *h_cmd(5), *h_dma(0x1000, to_dev, (IOVA, gpa)), h_done(5), h_inv(IOVA)]
    return guest, host


ENABLE = "vtd_dmar_enable enable 1"


def intent(guest: list[str], host: list[str]) -> CheckReport:
    events = list(parse_guest_lines(guest))
    return check_guest_intent(events, lambda: parse_lines([ENABLE, *host]))


def kinds(report: CheckReport) -> list[str]:
    return [d.kind for d in report.divergences]


def test_clean_read_is_conclusive_and_ok() -> None:
    report = intent(*one_read())
    assert report.status == "ok", report.format()
    c = report.counts
    assert c.translations_checked == 1 and c.directions_checked == 1
    assert c.invalidation_pairs == 2 and c.nvme_pairs == 2 and c.guest_maps == 1 and c.guest_unmaps == 1
    assert c.unattributed_maps == 0


def test_device_writing_a_to_device_mapping_is_a_guest_permission_divergence() -> None:
    guest, host = one_read(direction="TO_DEVICE")
    assert kinds(intent(guest, host)) == ["guest-permission"]


def test_translation_to_another_page_is_a_guest_wrong_translation() -> None:
    report = intent(*one_read(gpa=PAGE_B))
    assert kinds(report) == ["guest-wrong-translation"]
    d = report.divergences[0]
    assert (d.iova, d.expected, d.observed) == (IOVA, PAGE_A, PAGE_B)
    assert any(role == "guest mapped" and ln.source == "guest" for role, ln in d.related), d.format()


def test_use_after_unmap_once_the_invalidation_reached_the_viommu() -> None:
    guest, host = one_read()
    late = [*h_cmd(6), *h_dma(0x2000, False, (IOVA, PAGE_A)), h_done(6)]
    report = intent(guest + [g_cmd(6), g_done(6)], host + late)
    assert kinds(report) == ["use-after-unmap"], report.format()
    roles = [role for role, _ in report.divergences[0].related]
    assert "guest unmapped" in roles and "guest invalidated" in roles


def test_use_before_the_invalidation_reached_the_viommu_is_allowed() -> None:
    """Unmapped in the guest, but the flush has not reached QEMU: the IOTLB may still serve it."""
    guest, host = one_read()
    unmap = guest.index(next(line for line in guest if ": unmap: " in line))
    guest.insert(unmap + 1, g_cmd(6))  # the guest is known to be past its unmap...
    host = host[:-1] + [*h_cmd(6), *h_dma(0x2000, False, (IOVA, PAGE_A)), host[-1]]  # ...before the flush
    report = intent(guest, host)
    assert report.status == "ok", report.format()
    assert report.counts.allowed_unflushed == 1


def test_iova_the_guest_never_mapped() -> None:
    guest, host = one_read()
    host = host[:-2] + [*h_dma(0x3000, False, (IOVA2, PAGE_B))] + host[-2:]
    assert kinds(intent(guest, host)) == ["translation-without-guest-mapping"]


def test_stale_iotlb_entry_after_a_skipped_flush_is_caught() -> None:
    """The guest kernel bug the planted-kernel test builds: unmap without flushing,
    remap the iova to another page (caching mode off: no flush on map), and the
    device, served from QEMU's stale IOTLB entry, writes to the old page."""
    guest = [g_map(IOVA, PAGE_A), g_dma_map(IOVA, PAGE_A, "FROM_DEVICE"), g_cmd(5), g_done(5),
             g_unmap(IOVA), g_dma_unmap(IOVA, "FROM_DEVICE"),  # no qi_submit: the flush was skipped
             g_map(IOVA, PAGE_B), g_dma_map(IOVA, PAGE_B, "FROM_DEVICE"), g_cmd(6), g_done(6)]
    host = [*h_cmd(5), *h_dma(0x1000, False, (IOVA, PAGE_A)), h_done(5),
            *h_cmd(6), f"vtd_iotlb_page_hit IOTLB page hit sid 0x18 iova {IOVA:#x} slpte {PAGE_A | 3:#x} domain 0x1",
            f"vtd_dmar_translate dev 00:03.00 iova {IOVA:#x} -> gpa {PAGE_A:#x} mask 0xfff", h_done(6)]
    report = intent(guest, host)
    assert kinds(report) == ["stale-after-remap"], report.format()
    assert (report.divergences[0].expected, report.divergences[0].observed) == (PAGE_B, PAGE_A)


def test_guest_invalidation_qemu_never_processed() -> None:
    guest, host = one_read()
    report = intent(guest, host[:-1])
    assert kinds(report) == ["invalidation-not-processed"], report.format()


def test_firmware_nvme_commands_before_remapping_are_not_paired() -> None:
    """SeaBIOS drives the NVMe controller before the kernel (same command ids, DMA
    remapping off): those QEMU events must not shift the pairing of the kernel's."""
    guest, host = one_read()
    firmware = [*h_cmd(5), h_done(5)]
    events = list(parse_guest_lines(guest))
    report = check_guest_intent(events, lambda: parse_lines([*firmware, ENABLE, *host]))
    assert report.status == "ok", report.format()
    assert report.counts.nvme_pairs == 2


def test_missing_guest_stream_is_inconclusive() -> None:
    _, host = one_read()
    report = check_guest_intent([], lambda: parse_lines(host))
    assert report.status == "inconclusive"
    assert any("missing" in r for r in report.inconclusive)


def test_guest_ring_buffer_overrun_is_inconclusive() -> None:
    guest, host = one_read()
    report = check_guest_intent(list(parse_guest_lines(guest)), lambda: parse_lines(host), lost=3)
    assert report.status == "inconclusive" and any("lost 3 events" in r for r in report.inconclusive)


# ---- block data ------------------------------------------------------------------------

def data(guest: list[str], host: list[str], records: list[dict[str, object]]) -> CheckReport:
    gevents: list[GuestEvent] = list(parse_guest_lines(guest))

    def hevents() -> Iterator[Event]:
        return parse_lines([ENABLE, *host])

    sync = SyncPairs.build(gevents, host_sync_keys(hevents()))
    checker = BlockDataChecker(ios_from_records(records), gevents, sync)
    checker.feed_all(hevents())
    return checker.finish()


RECORD = {"op": "nvme.pattern_rw", "lba_size": 512, "buffers_pages": [[PAGE_A]],
          "ios": [{"io": 1, "dir": "read", "pos": 0, "len": 4096}]}


def test_data_lands_on_the_buffer_page() -> None:
    report = data(*one_read(), [RECORD])
    assert report.status == "ok", report.format()
    assert report.counts.pages_checked == 1 and report.counts.bytes_read_checked == 4096


def test_data_on_another_page_is_caught() -> None:
    report = data(*one_read(gpa=PAGE_B), [RECORD])
    assert kinds(report) == ["data-wrong-page"], report.format()


def test_boot_time_read_of_the_same_lba_does_not_cover_the_guest_io() -> None:
    """The device commands are matched to the I/O in time order: a read of LBA 0
    before the I/O's markers (the boot-time partition scan) is not its transfer."""
    guest, host = one_read()
    guest = [g_cmd(3), g_done(3)] + guest[:4] + guest[6:]  # the I/O's own command never reached the device
    host = [*h_cmd(3), *h_dma(0x900, False, (IOVA, PAGE_A)), h_done(3)] + [h_inv(IOVA)] + host[-1:]
    report = data(guest, host, [RECORD])
    assert "io-not-at-device" in kinds(report), report.format()


def test_write_direction_and_lba_size_come_from_the_record() -> None:
    guest = [g_mark("dma-harness io 1 begin write pos=4096 len=4096"), g_map(IOVA, PAGE_A),
             g_dma_map(IOVA, PAGE_A, "TO_DEVICE"), g_cmd(7, "nvme_cmd_write", slba=1), g_done(7),
             g_unmap(IOVA), g_dma_unmap(IOVA, "TO_DEVICE"), g_mark("dma-harness io 1 end")]
    host = [*h_cmd(7, read=False, lba=1), *h_dma(0x1000, True, (IOVA, PAGE_A)), h_done(7)]
    record = {**RECORD, "lba_size": 4096, "ios": [{"io": 1, "dir": "write", "pos": 4096, "len": 4096}]}
    assert data(guest, host, [record]).status == "ok"
    record512 = {**record, "lba_size": 512}  # lba 1 is byte 512: outside the I/O
    assert "command-outside-io" in kinds(data(guest, host, [record512]))
    wrong_dir = [*h_cmd(7, read=False, lba=1), *h_dma(0x1000, False, (IOVA, PAGE_A)), h_done(7)]
    assert "data-wrong-direction" in kinds(data(guest, wrong_dir, [record]))


@pytest.mark.parametrize("records", [[], [{"op": "ping"}]])
def test_no_io_recorded_is_not_a_data_check(records: list[dict[str, object]]) -> None:
    report = data(*one_read(), records)
    assert report.status == "inconclusive"


def test_ring_buffer_that_overwrote_events_is_inconclusive() -> None:
    """The trace's own header says the ring buffer wrapped: the record is incomplete."""
    guest, host = one_read()
    header = ["# tracer: nop", "#", "# entries-in-buffer/entries-written: 10/14   #P:1", "#"]
    report = intent(header + guest, host)
    assert report.status == "inconclusive" and any("lost 4 events" in r for r in report.inconclusive)


def test_direct_mapping_belongs_to_the_devices_attached_after_it() -> None:
    """iommu_create_device_direct_mappings() maps a firmware-requested range, then the
    group's devices are attached: the map is theirs, not every device's."""
    guest = [g_map(0, 0, 16 << 20), g_inv(0, did=6),
             g("attach_device_to_domain", "IOMMU: device=0000:00:1f.0"),
             g("attach_device_to_domain", "IOMMU: device=0000:00:1f.2")]
    host = [h_inv(0, domain=6),
            "vtd_iotlb_page_update IOTLB page update sid 0xfa iova 0x1000 slpte 0x1003 domain 0x6",
            "vtd_dmar_translate dev 00:1f.02 iova 0x1000 -> gpa 0x1000 mask 0xfff",
            "vtd_iotlb_page_update IOTLB page update sid 0x18 iova 0x2000 slpte 0x2003 domain 0x1",
            "vtd_dmar_translate dev 00:03.00 iova 0x2000 -> gpa 0x2000 mask 0xfff"]
    report = intent(guest, host)
    assert report.counts.unattributed_maps == 0 and report.counts.devices == 2
    assert kinds(report) == ["translation-without-guest-mapping"], report.format()
    assert report.divergences[0].sid == 0x18


def test_write_zeroes_is_not_data() -> None:
    """A write-zeroes command over the I/O's bytes moves no data from the buffer: it
    does not cover the guest's write."""
    guest = [g_mark("dma-harness io 1 begin write pos=0 len=4096"), g_cmd(7, "nvme_cmd_write_zeroes"), g_done(7),
             g_mark("dma-harness io 1 end")]
    host = ["pci_nvme_io_cmd cid 7 nsid 0x1 sqid 1 opc 0x8 opname 'NVME_NVM_CMD_WRITE_ZEROES'",
            "pci_nvme_write cid 7 opname 'NVME_NVM_CMD_WRITE_ZEROES' nsid 1 nlb 8 count 4096 lba 0x0", h_done(7)]
    record = {**RECORD, "ios": [{"io": 1, "dir": "write", "pos": 0, "len": 4096}]}
    report = data(guest, host, [record])
    assert report.counts.non_data_commands == 1 and report.counts.bytes_written_checked == 0
    assert kinds(report) == ["io-not-at-device"], report.format()
