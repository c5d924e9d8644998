"""The block-data checker on small two-sided streams (tests/unit/two_sided.py): the
guest's O_DIRECT data must land on the agent's buffer pages, matched to its I/Os in
time order."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.checks.block_data import BlockDataChecker, ios_from_records
from harness.checks.sync import SyncPairs, host_sync_keys
from harness.checks.verdict import CheckReport
from harness.trace import parse_lines
from harness.trace.events import Event
from harness.trace.guest import GuestEvent, parse_guest_lines
from tests.unit.two_sided import (
    ENABLE,
    IOVA,
    PAGE_A,
    PAGE_B,
    g_cmd,
    g_dma_map,
    g_dma_unmap,
    g_done,
    g_map,
    g_mark,
    g_unmap,
    h_cmd,
    h_dma,
    h_done,
    h_inv,
    kinds,
    one_read,
)


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
