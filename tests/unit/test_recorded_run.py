"""A whole recorded run (tests/data/intel-iommu-nvme-run: QEMU 7.2's trace, the
guest kernel's trace, the agent's op records, from ``python -m harness run
configs/intel-iommu-nvme.toml --keep-artifacts``) replayed through every checker,
as ``python -m harness check FOLDER`` does, and tampered copies of it."""

from __future__ import annotations

import lzma
import re
import shutil
from pathlib import Path

import pytest

from harness.checks.verdict import Verdict
from harness.finish import RunEvidence, check_evidence

RUN = Path(__file__).resolve().parents[1] / "data" / "intel-iommu-nvme-run"


@pytest.fixture(scope="module")
def host_lines() -> list[str]:
    return lzma.decompress((RUN / "trace.log.xz").read_bytes()).decode().splitlines()


def replay(tmp_path: Path, host: list[str] | None = None, guest: list[str] | None = None) -> Verdict:
    folder = tmp_path / "run"
    shutil.copytree(RUN, folder)
    if host is not None:
        (folder / "trace.log.xz").unlink()
        (folder / "trace.log").write_text("\n".join(host) + "\n")
    if guest is not None:
        (folder / "guest-trace.txt.xz").unlink()
        (folder / "guest-trace.txt").write_text("\n".join(guest) + "\n")
    return check_evidence(RunEvidence.from_folder(folder))


def test_recorded_run_is_conclusive_and_ok(tmp_path: Path) -> None:
    verdict = replay(tmp_path)
    assert verdict.status == "ok", verdict.format()
    intent = verdict.report("guest-intent").counts
    assert intent.translations_checked > 2000 and intent.unattributed_maps == 0
    assert intent.invalidation_pairs == intent.guest_invalidations > 0 and intent.nvme_pairs > 0
    data = verdict.report("block-data").counts
    assert data.ios_checked == data.ios == 64 and data.pages_checked == 1024


def _data_translation(host: list[str]) -> int:
    """Index of the page walk of a data page well into the run (inside a block request)."""
    in_request = False
    for i, line in enumerate(host):
        if line.startswith("dma_blk_cb"):
            in_request = True
        elif not line.startswith("vtd_"):
            in_request = False
        elif in_request and i > 3000 and line.startswith("vtd_iotlb_page_update") \
                and host[i + 1].startswith("vtd_dmar_translate"):
            return i
    raise AssertionError("no page walk inside a block request")


def test_a_qemu_that_walks_wrongly_is_invisible_to_itself_but_not_to_the_guest(
        tmp_path: Path, host_lines: list[str]) -> None:
    """The walk and the translation agree with each other (QEMU is self-consistent),
    but both point at a page the guest never mapped there: only the independent
    oracles see it."""
    host = list(host_lines)
    i = _data_translation(host)
    host[i] = re.sub(r"slpte 0x([0-9a-f]+)", lambda m: f"slpte {int(m.group(1), 16) ^ 0x100000:#x}", host[i])
    host[i + 1] = re.sub(r"-> gpa 0x([0-9a-f]+)", lambda m: f"-> gpa {int(m.group(1), 16) ^ 0x100000:#x}",
                         host[i + 1])
    verdict = replay(tmp_path, host=host)
    assert verdict.status == "divergence"
    intent, data = verdict.report("guest-intent"), verdict.report("block-data")
    assert intent.divergences[0].kind == "guest-wrong-translation" and intent.divergences[0].lineno == i + 2
    assert data.divergences[0].kind == "data-wrong-page", data.format()
    vtd = verdict.report("vtd-consistency")
    assert "wrong-translation" not in vtd.divergences_by_kind, vtd.format()


def test_an_invalidation_qemu_never_processed(tmp_path: Path, host_lines: list[str]) -> None:
    host = list(host_lines)
    drop = max(i for i, line in enumerate(host) if line.startswith("vtd_inv_desc_iotlb_pages"))
    del host[drop]
    verdict = replay(tmp_path, host=host)
    assert "invalidation-not-processed" in verdict.report("guest-intent").divergences_by_kind


def test_guest_trace_missing_makes_the_run_inconclusive(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(RUN, folder)
    (folder / "guest-trace.txt.xz").unlink()
    verdict = check_evidence(RunEvidence.from_folder(folder))
    assert verdict.status == "inconclusive"
    assert any("guest kernel's event log" in r for r in verdict.inconclusive_reasons)
