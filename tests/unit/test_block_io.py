"""Guest op records against the NVMe commands in a trace."""

import lzma
from pathlib import Path

from harness.checks.block_io import BlockIoCollector, _missing, _union
from harness.trace import parse_lines

DATA = Path(__file__).resolve().parents[1] / "data"
RECORD = {"op": "nvme.pattern_rw", "device": "/dev/nvme0n1", "offset": 0, "length": 1 << 20, "verified": True}


def collect(lines):
    c = BlockIoCollector()
    for e in parse_lines(lines):
        c.feed(e)
    return c


def test_interval_helpers():
    assert _union([(5, 8), (0, 2), (2, 4), (7, 9)]) == [(0, 4), (5, 9)]
    assert _missing([(0, 10)], [(2, 4), (6, 12)]) == [(0, 2), (4, 6)]
    assert _missing([(0, 10)], []) == [(0, 10)]
    assert _missing([(3, 5)], [(0, 10)]) == []


def test_recorded_run_covers_the_guest_io():
    lines = lzma.decompress((DATA / "intel-iommu-nvme-qemu7.2.trace.xz").read_bytes()).decode().splitlines()
    report = collect(lines).finish([RECORD, dict(RECORD, seed=2)])
    assert report.ok, report.format()
    assert report.device_written >= 2 << 20 and report.guest_written == 2 << 20


def test_missing_device_commands_are_named():
    lines = lzma.decompress((DATA / "intel-iommu-nvme-qemu7.2.trace.xz").read_bytes()).decode().splitlines()
    # Drop the device's write commands for the second 64 KiB chunk (LBA 0x80, 512-byte blocks).
    kept = [t for t in lines if not (t.startswith("pci_nvme_write") and t.endswith("lba 0x80"))]
    assert len(kept) < len(lines)
    report = collect(kept).finish([RECORD])
    assert report.missing_writes == [(1, 0x10000, 0x20000)] and report.missing_reads == []
    assert "[0x10000, 0x20000) written by the guest reached no NVMe write command" in report.format()


def test_guest_io_on_another_namespace_is_not_covered():
    report = collect(["pci_nvme_write cid 1 opname 'NVME_NVM_CMD_WRITE' nsid 1 nlb 8 count 4096 lba 0x0",
                      "pci_nvme_read cid 2 nsid 1 nlb 8 count 4096 lba 0x0"]).finish(
        [dict(RECORD, device="/dev/nvme0n2", length=4096)])
    assert report.missing_writes == [(2, 0, 4096)] and report.missing_reads == [(2, 0, 4096)]
