"""Trace formats per QEMU version (harness/trace/formats.py): lines QEMU 10.0.2
(Debian bookworm-backports) really wrote, and two recorded 10.0 runs
(tests/data/qemu10-*-run, from ``python -m harness run CONFIG --qemu 10.0
--keep-artifacts``) replayed through every checker."""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import pytest

from harness.finish import RunEvidence, check_evidence
from harness.trace.events import (
    DmaBlkIo,
    DmarTranslate,
    InvIotlbPages,
    IotlbPageUpdate,
    MalformedEvent,
    NvmeMapPrp,
    UnknownEvent,
    VirtioIommuDeviceReset,
    VirtioIommuGetConfig,
    VirtioIommuMap,
    VirtioIommuTranslateOut,
    VirtqueuePop,
)
from harness.trace.formats import FORMATS, FormatChoice
from harness.trace.parser import DEFAULT_FORMATS, ParseStats, parse_file, parse_line

DATA = Path(__file__).resolve().parents[1] / "data"
NVME_RUN = DATA / "qemu10-intel-iommu-nvme-run"
VIOMMU_RUN = DATA / "qemu10-virtio-iommu-nvme-run"
T10 = FORMATS["10.0"].compiled

# Lines of QEMU 10.0.2's log backend, copied from the recorded runs.
GET_CONFIG = ("virtio_iommu_get_config page_size_mask=0xfffffffffffff000 input range start=0x0 input range "
              "end=0x7fffffffff domain range start=0 domain range end=4294967295 probe_size=0x200 bypass=0x1")
RESET_EXIT = "virtio_iommu_device_reset_exit reset!"


def test_10_0_virtio_iommu_get_config_prints_the_domain_range_unsigned() -> None:
    event = parse_line(GET_CONFIG, 7, table=T10)
    assert type(event) is VirtioIommuGetConfig
    assert (event.domain_start, event.domain_end, event.bypass, event.probe_size) == (0, 4294967295, 1, 0x200)
    old = parse_line(GET_CONFIG, 7)  # 7.2's %d format: the value does not fit
    assert type(old) is MalformedEvent and "domain_end 4294967295 does not fit" in old.reason


def test_10_0_virtio_iommu_reset_is_the_same_event_under_its_new_name() -> None:
    event = parse_line(RESET_EXIT, 3, table=T10)
    assert type(event) is VirtioIommuDeviceReset and event.raw == RESET_EXIT and event.lineno == 3
    assert type(parse_line(RESET_EXIT)) is UnknownEvent
    assert type(parse_line("virtio_iommu_device_reset reset!", table=T10)) is UnknownEvent


@pytest.mark.parametrize("line,kind,fields", [
    ("vtd_iotlb_page_update IOTLB page update sid 0x8 iova 0xfffff000 slpte 0x3b1a003 domain 0x1",
     IotlbPageUpdate, {"sid": 8, "iova": 0xFFFFF000, "slpte": 0x3B1A003, "domain": 1, "pasid": None}),
    ("vtd_dmar_translate dev 00:01.00 iova 0xfffff000 -> gpa 0x3b1a000 mask 0xfff",
     DmarTranslate, {"bus": 0, "slot": 1, "func": 0, "gpa": 0x3B1A000, "mask": 0xFFF}),
    ("pci_nvme_map_prp trans_len 4096 len 4096 prp1 0xfffff000 prp2 0x0 num_prps 2",
     NvmeMapPrp, {"trans_len": 4096, "prp1": 0xFFFFF000, "num_prps": 2}),
    ("virtio_iommu_map domain=0 virt_start=0xfffff000 virt_end=0xffffffff phys_start=0x3b1a000 flags=3",
     VirtioIommuMap, {"domain": 0, "virt_end": 0xFFFFFFFF, "flags": 3}),
    ("virtio_iommu_translate_out 0xffffe000 -> 0x3b1b000 for sid=16",
     VirtioIommuTranslateOut, {"addr": 0xFFFFE000, "gpa": 0x3B1B000, "sid": 16}),
])
def test_formats_10_0_shares_with_7_2_parse_alike(line: str, kind: type, fields: dict[str, object]) -> None:
    for table in (T10, None):
        event = parse_line(line, table=table)
        assert type(event) is kind
        assert {k: getattr(event, k) for k in fields} == fields


def _first(path: Path, prefix: str) -> str:
    for line in lzma.decompress(path.read_bytes()).decode().splitlines():
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix} line in {path}")


@pytest.mark.parametrize("prefix,kind", [
    ("vtd_inv_desc_iotlb_pages ", InvIotlbPages), ("dma_blk_io ", DmaBlkIo), ("virtqueue_pop ", VirtqueuePop),
])
def test_recorded_10_0_lines_of_every_family_parse(prefix: str, kind: type) -> None:
    run = VIOMMU_RUN if prefix.startswith("virtqueue") else NVME_RUN
    assert type(parse_line(_first(run / "trace.log.xz", prefix), table=T10)) is kind


def _stats(path: Path, table: object) -> ParseStats:
    stats = ParseStats()
    for _ in parse_file(path, stats=stats, table=table):  # type: ignore[arg-type]
        pass
    return stats


def test_recorded_10_0_traces_parse_without_a_bad_line_only_with_their_table() -> None:
    for run in (NVME_RUN, VIOMMU_RUN):
        stats = _stats(run / "trace.log.xz", T10)
        assert stats.lines > 4000 and stats.malformed == 0 and stats.unknown == 0, stats
    old = _stats(VIOMMU_RUN / "trace.log.xz", None)
    assert old.malformed == 9 and old.unknown == 1  # every get_config line, and the renamed reset


def test_7_2_table_is_the_parser_default() -> None:
    assert FORMATS["7.2"].compiled is DEFAULT_FORMATS
    recorded = DATA / "intel-iommu-nvme-run" / "trace.log.xz"
    assert list(parse_file(recorded)) == list(parse_file(recorded, table=DEFAULT_FORMATS))


def _replay(tmp_path: Path, run: Path, trace_formats: dict[str, object] | None) -> RunEvidence:
    folder = tmp_path / run.name
    shutil.copytree(run, folder)
    info = json.loads((folder / "qemu.json").read_text())
    if trace_formats is None:
        (folder / "qemu.json").unlink()
    else:
        info["trace_formats"] = trace_formats
        (folder / "qemu.json").write_text(json.dumps(info))
    return RunEvidence.from_folder(folder)


@pytest.mark.parametrize("run,checkers", [
    (NVME_RUN, ("vtd-consistency", "guest-intent", "block-data")),
    (VIOMMU_RUN, ("virtio-iommu", "guest-intent", "block-data")),
])
def test_recorded_10_0_run_is_ok_and_names_its_versions(run: Path, checkers: tuple[str, ...]) -> None:
    ev = RunEvidence.from_folder(run)
    assert ev.formats is not None and ev.formats.series == "10.0"
    verdict = check_evidence(ev)
    assert verdict.status == "ok" and verdict.conclusive, verdict.format()
    assert tuple(r.checker for r in verdict.reports) == checkers
    assert verdict.versions["qemu.name"] == "10.0" and verdict.versions["qemu"].startswith("10.0.2 ")
    assert verdict.report("guest-intent").counts.translations_checked > 2000


def test_unknown_family_makes_the_verdict_inconclusive_never_ok(tmp_path: Path) -> None:
    reason = "QEMU 10.0.2 does not list the vtd_* trace events vtd_dmar_translate ..."
    ev = _replay(tmp_path, NVME_RUN, {"series": "10.0", "qemu": "10.0.2", "unknown": {"vtd": reason}})
    verdict = check_evidence(ev)
    assert verdict.status == "inconclusive", verdict.format()
    assert all(reason in r.inconclusive for r in verdict.reports)
    # a family the machine does not have (virtio-iommu on an intel-iommu machine) does not count
    ev = _replay(tmp_path / "b", NVME_RUN, {"series": "10.0", "unknown": {"virtio_iommu": reason}})
    assert check_evidence(ev).status == "ok"


def test_a_version_without_a_table_is_inconclusive(tmp_path: Path) -> None:
    from harness.trace.formats import choose_format
    choice = choose_format("11.1", version="11.1.0")
    ev = _replay(tmp_path, VIOMMU_RUN, choice.to_dict())
    verdict = check_evidence(ev)
    assert verdict.status == "inconclusive"
    assert any("QEMU 11.1.0: the trace formats of this version are not known" in why
               for why in verdict.inconclusive_reasons)


def test_the_10_0_trace_read_as_7_2_is_not_ok(tmp_path: Path) -> None:
    """The table matters: without its qemu.json the 10.0 virtio-iommu trace is read with
    7.2's formats, and its unreadable get_config lines keep the verdict from OK."""
    verdict = check_evidence(_replay(tmp_path, VIOMMU_RUN, None))
    assert verdict.status != "ok"


def test_saved_choice_is_checked() -> None:
    assert FormatChoice.from_dict({"series": "10.0"}).series == "10.0"
    with pytest.raises(ValueError, match="series '9.2'"):
        FormatChoice.from_dict({"series": "9.2"})
    with pytest.raises(ValueError, match="unknown"):
        FormatChoice.from_dict({"series": "7.2", "unknown": ["vtd"]})
