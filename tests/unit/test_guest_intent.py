"""The guest-intent checker on small two-sided streams (tests/unit/two_sided.py):
each planted misbehaviour of the device (or of a guest that skips a flush) must give
its own divergence kind, and the clean streams none."""

from __future__ import annotations

from harness.checks.guest_intent import check_guest_intent
from harness.checks.verdict import CheckReport
from harness.trace import parse_lines
from harness.trace.guest import parse_guest_lines
from tests.unit.two_sided import (
    ENABLE,
    IOVA,
    IOVA2,
    PAGE_A,
    PAGE_B,
    g,
    g_cmd,
    g_dma_map,
    g_dma_unmap,
    g_done,
    g_inv,
    g_map,
    g_unmap,
    h_cmd,
    h_dma,
    h_done,
    h_inv,
    kinds,
    one_read,
)


def intent(guest: list[str], host: list[str]) -> CheckReport:
    events = list(parse_guest_lines(guest))
    return check_guest_intent(events, lambda: parse_lines([ENABLE, *host]))


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


def test_ring_buffer_that_overwrote_events_is_inconclusive() -> None:
    """The trace's own header says the ring buffer wrapped: the record is incomplete."""
    guest, host = one_read()
    header = ["# tracer: nop", "#", "# entries-in-buffer/entries-written: 10/14   #P:1", "#"]
    report = intent(header + guest, host)
    assert report.status == "inconclusive" and any("lost 4 events" in r for r in report.inconclusive)


def test_concurrent_probes_of_two_controllers_keep_their_own_maps() -> None:
    """Two NVMe controllers probed at once on two kworkers both map their admin queue
    at the same iova in their own domains; their events interleave. Each iommu:map
    belongs to the DMA-API event of its own task, not to the next one that overlaps."""
    from harness.checks.guest_state import resolve_ops
    from harness.trace.guest import pci_sid

    def line(task: str, pid: int, ts: float, event: str, body: str) -> str:
        return f"{task:>16}-{pid:<7} [000] .....   {ts:.6f}: {event}: {body}"

    a, b = "0000:00:02.0", "0000:00:03.0"
    guest = [
        line("kworker/u4:1", 50, 1.0, "map", f"IOMMU: iova=0x{IOVA:016x} - 0x{IOVA + 4096:016x} "
                                              f"paddr=0x{PAGE_A:016x} size=4096"),
        line("kworker/u4:2", 51, 1.1, "map", f"IOMMU: iova=0x{IOVA:016x} - 0x{IOVA + 4096:016x} "
                                              f"paddr=0x{PAGE_B:016x} size=4096"),
        line("kworker/u4:2", 51, 1.2, "dma_map_page", f"{b} dir=BIDIRECTIONAL dma_addr={IOVA:x} size=4096 "
                                                       f"phys_addr={PAGE_B:x} attrs="),
        line("kworker/u4:1", 50, 1.3, "dma_map_page", f"{a} dir=BIDIRECTIONAL dma_addr={IOVA:x} size=4096 "
                                                       f"phys_addr={PAGE_A:x} attrs="),
    ]
    ops, lost_maps, _ = resolve_ops(list(parse_guest_lines(guest)))
    assert lost_maps == 0
    assert [(op.sid, op.paddr) for op in ops] == [(pci_sid(a), PAGE_A), (pci_sid(b), PAGE_B)]


def test_unmap_sg_is_announced_before_its_unmap() -> None:
    """dma_unmap_sg_attrs logs its event before it unmaps (dma_unmap_page after):
    an interrupt's unmap belongs to the dma_unmap_sg just before it, not to another
    task's DMA-API unmap that follows."""
    from harness.checks.guest_state import resolve_ops
    from harness.trace.guest import pci_sid

    def line(task: str, pid: int, ts: float, event: str, body: str) -> str:
        return f"{task:>16}-{pid:<7} [000] d.H1.   {ts:.6f}: {event}: {body}"

    a, b = "0000:00:02.0", "0000:00:03.0"
    guest = [
        line("<idle>", 0, 1.0, "dma_unmap_sg", f"{a} dir=FROM_DEVICE phys_addrs={{0x{PAGE_A:x}}} attrs="),
        line("<idle>", 0, 1.1, "unmap", f"IOMMU: iova=0x{IOVA:016x} - 0x{IOVA + 4096:016x} size=4096 "
                                        "unmapped_size=4096"),
        line("python3", 81, 1.2, "unmap", f"IOMMU: iova=0x{IOVA2:016x} - 0x{IOVA2 + 4096:016x} size=4096 "
                                          "unmapped_size=4096"),
        line("python3", 81, 1.3, "dma_unmap_page", f"{b} dir=FROM_DEVICE dma_addr={IOVA2:x} size=4096 attrs="),
    ]
    ops, _, lost_unmaps = resolve_ops(list(parse_guest_lines(guest)))
    assert lost_unmaps == 0
    assert [(op.sid, op.iova) for op in ops] == [(pci_sid(a), IOVA), (pci_sid(b), IOVA2)]
