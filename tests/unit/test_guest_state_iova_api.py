"""Linux 7.2's NVMe maps multi-segment data with the DMA IOVA API (``dma_iova_link``),
which traces ``iommu:map``/``unmap`` but no DMA-API event naming the device: the
guest-intent attribution credits those maps to the controller of the same task's
``nvme_setup_cmd`` and those unmaps to the controller of the ``nvme_complete_rq``
after them, a controller's device being named by a DMA-API map inside one of its
commands (harness/checks/guest_attribution.py).  On a real 7.2 run (whole, and an
excerpt of it) and on edited copies of the excerpt: what the guest's trace does not
support stays unattributed; the recorded 6.12 runs are attributed exactly as before."""

from __future__ import annotations

import collections
import lzma
import re
import shutil
from pathlib import Path

import pytest

import harness.checks.guest_attribution as attribution
from harness.checks.guest_attribution import VIA_DMA_API, VIA_NVME_COMMAND, GuestOp, resolve_ops
from harness.checks.guest_state import GuestState
from harness.finish import RunEvidence, check_evidence
from harness.models.iommu_domain import IOMMU_READ, IOMMU_WRITE
from harness.trace.guest import GuestEvent, parse_guest_file, parse_guest_lines, pci_sid

DATA = Path(__file__).resolve().parents[1] / "data"
RUN = DATA / "kernel7.2-intel-iommu-nvme-run"
EXCERPT = DATA / "kernel7.2-nvme-iova-api.guest-trace.txt"
NVME0 = pci_sid("0000:00:01.0")
OTHER = pci_sid("0000:00:02.0")


def excerpt() -> list[str]:
    return EXCERPT.read_text().splitlines()


def resolve(lines: list[str]) -> tuple[list[GuestOp], int, int]:
    return resolve_ops(list(parse_guest_lines(lines)))


def at(lines: list[str], needle: str, start: int = 0) -> int:
    """Index of the first line from ``start`` that contains ``needle``."""
    return next(i for i in range(start, len(lines)) if needle in lines[i])


def line(task: str, pid: int, ts: float, event: str, body: str, flags: str = ".....") -> str:
    return f"{task:>16}-{pid:<7} [000] {flags}   {ts:.6f}: {event}: {body}"


def iova_ops(ops: list[GuestOp]) -> list[GuestOp]:
    """The ops of the excerpt's IOVA-API maps and unmaps (the 64 KiB requests at iova 0xfffc0000)."""
    return [op for op in ops if 0xfffc0000 <= op.iova < 0xfffd0000]


WRITE, READ, FLUSH = "cmdid=577,", "cmdid=594,", "cmdid=593,"


# --- the excerpt as recorded ------------------------------------------------------------------

def test_iova_api_maps_are_the_controllers_with_the_commands_direction() -> None:
    lines = excerpt()
    ops, lost_maps, lost_unmaps = resolve(lines)
    assert (lost_maps, lost_unmaps) == (0, 0)
    assert collections.Counter((op.map, op.via) for op in ops) == {
        (True, VIA_NVME_COMMAND): 32, (False, VIA_NVME_COMMAND): 2,  # two 64 KiB requests, 16 pages each
        (True, VIA_DMA_API): 2, (False, VIA_DMA_API): 2}  # identify and the 4 KiB read: dma_map_phys
    assert {op.sid for op in ops} == {NVME0}
    write_at, read_at = at(lines, WRITE), at(lines, READ)
    maps = [op for op in ops if op.map and op.via == VIA_NVME_COMMAND]
    # nvme_cmd_write's data is mapped DMA_TO_DEVICE (the device only reads), nvme_cmd_read's DMA_FROM_DEVICE
    assert {op.prot for op in maps if write_at < op.pos < read_at} == {IOMMU_READ}
    assert {op.prot for op in maps if op.pos > read_at} == {IOMMU_WRITE}
    assert [op.size for op in ops if not op.map and op.via == VIA_NVME_COMMAND] == [65536, 65536]


# --- what the trace does not support stays unattributed ---------------------------------------

def test_without_a_device_named_before_them_the_maps_stay_unattributed() -> None:
    lines = excerpt()
    identify = lines[at(lines, "cmdid=24,"):at(lines, "cmdid=24,", at(lines, "cmdid=24,") + 1) + 1]
    small_read = lines[at(lines, "cmdid=576,"):at(lines, "cmdid=576,", at(lines, "cmdid=576,") + 1) + 1]
    assert len(identify) == len(small_read) == 8
    bare = [ln for ln in lines if ln not in identify and ln not in small_read]
    ops, lost_maps, lost_unmaps = resolve(bare)
    assert (lost_maps, lost_unmaps) == (32, 2)
    assert all(op.sid is None and op.via == "" for op in iova_ops(ops))
    # named only afterwards: evidence counts for what follows it, never for what came before
    ops, lost_maps, lost_unmaps = resolve(bare + identify)
    assert (lost_maps, lost_unmaps) == (32, 2)


def test_a_controller_named_with_two_devices_is_ambiguous() -> None:
    lines = excerpt()
    flush = at(lines, FLUSH)
    # inside the flush command's window, the same task maps for another device
    lines[flush + 1:flush + 1] = [
        line("kworker/0:0H", 10, 7.3256, "map", "IOMMU: iova=0x00000000ffffb000 - 0x00000000ffffc000 "
                                                "paddr=0x0000000005d00000 size=4096"),
        line("kworker/0:0H", 10, 7.3257, "dma_map_phys", "0000:00:02.0 dir=FROM_DEVICE dma_addr=ffffb000 "
                                                         "size=4096 phys_addr=5d00000 attrs="),
    ]
    ops, lost_maps, lost_unmaps = resolve(lines)
    assert (lost_maps, lost_unmaps) == (16, 1)  # the 64 KiB read after it
    read_at = at(lines, READ)
    assert all(op.sid is None for op in iova_ops(ops) if op.pos > read_at)
    assert all(op.sid == NVME0 for op in iova_ops(ops) if op.pos < read_at)
    assert [op.sid for op in ops if op.iova == 0xffffb000] == [OTHER]


def test_a_removed_device_is_forgotten_until_named_again() -> None:
    lines = excerpt()
    write_at = at(lines, WRITE)
    lines.insert(write_at, line("swapper/0", 1, 6.1680, "remove_device_from_group",
                                "IOMMU: groupID=1 device=0000:00:01.0"))
    _, lost_maps, lost_unmaps = resolve(lines)
    assert (lost_maps, lost_unmaps) == (32, 2)
    # a controller probed again (its identify names the device) is credited again
    identify = [ln for ln in excerpt() if "kworker/u4:0-12" in ln]
    read_at = at(lines, READ)
    _, lost_maps, lost_unmaps = resolve(lines[:read_at] + identify + lines[read_at:])
    assert (lost_maps, lost_unmaps) == (16, 1)


def test_another_event_of_the_task_closes_its_window_but_not_another_tasks_event() -> None:
    lines = excerpt()
    write_at = at(lines, WRITE)
    other = lines[:write_at + 1] + [line("python3", 50, 6.1690, "tracing_mark_write", "x")] + lines[write_at + 1:]
    assert resolve(other)[1:] == (0, 0)
    same = lines[:write_at + 1] + [line("kworker/0:0H", 10, 6.1690, "tracing_mark_write", "x")] + lines[write_at + 1:]
    ops, lost_maps, lost_unmaps = resolve(same)
    assert (lost_maps, lost_unmaps) == (16, 0)
    read_at = at(same, READ)
    assert {op.sid for op in iova_ops(ops) if op.map and op.pos < read_at} == {None}


def test_a_completion_interrupting_the_mapping_keeps_the_window() -> None:
    """The 4 KiB read's completion (an interrupt in the submitting kworker) moved
    between the 64 KiB write's maps: the write's later maps are still its own."""
    lines = excerpt()
    done = at(lines, "unmap: IOMMU: iova=0x00000000fffdf000")
    completion = lines[done:done + 4]
    assert "nvme_complete_rq" in completion[-1]
    del lines[done:done + 4]
    eighth_map = at(lines, "map: IOMMU: iova=0x00000000fffc7000")
    lines[eighth_map + 1:eighth_map + 1] = completion
    ops, lost_maps, lost_unmaps = resolve(lines)
    assert (lost_maps, lost_unmaps) == (0, 0)
    assert len([op for op in ops if op.via == VIA_NVME_COMMAND and op.map]) == 32


def test_an_unmap_is_the_controllers_of_the_completion_right_after_it() -> None:
    lines = excerpt()
    read_unmap = at(lines, "unmap:", at(lines, READ))
    assert "sh-52" in lines[read_unmap]  # completed in an interrupt of another task
    lines.insert(read_unmap + 1, line("sh", 52, 7.34653, "tracing_mark_write", "x", flags="dBh.."))
    ops, lost_maps, lost_unmaps = resolve(lines)
    assert (lost_maps, lost_unmaps) == (0, 1)
    assert [op.sid for op in ops if op.pos == read_unmap] == [None]


def _as_second_controller(text: str) -> str:
    """An excerpt line as the same events of a second controller (nvme1 at 00:02.0),
    traced by other tasks (pid + 100) 0.1 us later."""
    def task(m: re.Match[str]) -> str:
        return f"{m['task']}-{int(m['pid']) + 100:<7}"
    text = re.sub(r"(?P<task>\S+)-(?P<pid>[0-9]+) *(?= \[)", task, text, count=1)
    text = re.sub(r"([0-9]+\.[0-9]{6}):", lambda m: f"{float(m[1]) + 1e-7:.7f}:", text, count=1)
    return text.replace("nvme0", "nvme1").replace("0000:00:01.0", "0000:00:02.0")


def test_two_controllers_keep_their_own_devices() -> None:
    first = [ln for ln in excerpt() if not ln.startswith("#")]
    second = [_as_second_controller(ln) for ln in first]
    merged = [ln for pair in zip(first, second) for ln in pair]  # their events interleave one by one
    events = list(parse_guest_lines(merged))
    ops, lost_maps, lost_unmaps = resolve_ops(events)
    assert (lost_maps, lost_unmaps) == (0, 0)
    by_pid: dict[int, set[int | None]] = collections.defaultdict(set)
    for op in ops:
        by_pid[events[op.pos].pid].add(op.sid)
    assert by_pid[10] == {NVME0} and by_pid[110] == {OTHER}, dict(by_pid)
    assert len([op for op in ops if op.via == VIA_NVME_COMMAND]) == 2 * 34


# --- whole recorded runs ----------------------------------------------------------------------

def _guest(folder: Path) -> list[GuestEvent]:
    return list(parse_guest_file(folder / "guest-trace.txt.xz"))


def test_the_recorded_7_2_run_is_wholly_attributed() -> None:
    events = _guest(RUN)
    ops, lost_maps, lost_unmaps = resolve_ops(events)
    assert (lost_maps, lost_unmaps) == (0, 0)
    assert collections.Counter((op.map, op.via) for op in ops) == {
        (True, VIA_NVME_COMMAND): 896, (False, VIA_NVME_COMMAND): 64,  # 64 I/Os of 64 KiB
        (True, VIA_DMA_API): 17, (False, VIA_DMA_API): 11}
    assert {op.sid for op in ops} == {NVME0}
    prots = collections.Counter(op.prot for op in ops if op.map and op.via == VIA_NVME_COMMAND)
    assert prots == {IOMMU_READ: 448, IOMMU_WRITE: 448}  # 32 writes, 32 reads
    # replayed: the device's domain holds a write command's pages read-only while it runs
    state = GuestState(events)
    write_map = next(op for op in ops if op.via == VIA_NVME_COMMAND and op.prot == IOMMU_READ)
    state.advance(write_map.pos)
    mapping = state.translate(NVME0, write_map.iova)
    assert mapping is not None and mapping.paddr == write_map.paddr and mapping.prot == IOMMU_READ
    assert None not in state.domains


def test_the_recorded_7_2_run_replays_ok_with_every_map_attributed() -> None:
    verdict = check_evidence(RunEvidence.from_folder(RUN))
    assert verdict.status == "ok", verdict.format()
    assert verdict.versions.get("kernel") == "7.2.12"
    intent = verdict.report("guest-intent").counts
    assert intent.translations_checked > 2000 and intent.directions_checked > 1000
    assert intent.unattributed_maps == intent.unattributed_unmaps == 0
    assert intent.guest_maps == 913 and intent.devices == 1
    data = verdict.report("block-data").counts
    assert data.ios_checked == data.ios == 64 and data.pages_checked == 1024


def test_a_device_writing_into_a_write_commands_data_is_a_permission_divergence(tmp_path: Path) -> None:
    """QEMU's first 64 KiB write request told to move data *into* guest memory: the
    guest mapped those pages read-only (nvme_cmd_write), which only the command's
    direction says, as no DMA-API event is traced for them."""
    host = lzma.decompress((RUN / "trace.log.xz").read_bytes()).decode().splitlines()
    first_write = next(i for i, ln in enumerate(host) if ln.startswith("dma_blk_io") and ln.endswith("to_dev=1")
                       and i > next(j for j, h in enumerate(host) if h.endswith("offset=0 to_dev=0")))
    host[first_write] = host[first_write].replace("to_dev=1", "to_dev=0")
    folder = tmp_path / "run"
    shutil.copytree(RUN, folder)
    (folder / "trace.log.xz").unlink()
    (folder / "trace.log").write_text("\n".join(host) + "\n")
    verdict = check_evidence(RunEvidence.from_folder(folder))
    intent = verdict.report("guest-intent")
    assert intent.status == "divergence", intent.format()
    assert set(intent.divergences_by_kind) == {"guest-permission"}, intent.format()


@pytest.mark.parametrize("run", sorted(p.name for p in DATA.glob("*-run")
                                       if (p / "guest-trace.txt.xz").is_file() and p != RUN))
def test_recorded_6_12_runs_are_attributed_as_before(run: str, monkeypatch: pytest.MonkeyPatch) -> None:
    events = _guest(DATA / run)
    now = resolve_ops(events)
    assert not [op for op in now[0] if op.via == VIA_NVME_COMMAND]
    monkeypatch.setattr(attribution, "_credit_nvme_commands", lambda guest, ops: ops)
    assert resolve_ops(events) == now
