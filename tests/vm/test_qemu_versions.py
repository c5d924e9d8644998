"""The intel-iommu + NVMe scenario on QEMU 10.0 as the harness provides it (Debian
bookworm-backports' build, ``python -m harness images build qemu --version 10.0``):
a conclusive OK verdict that names 10.0, artifacts that say which QEMU ran and
replay to the same verdict. The session's own QEMU (Debian bookworm's 7.2 by
default) runs every other VM test.

Skipped, naming the build command, when the 10.0 build is not in the image cache,
unless ``DMA_HARNESS_QEMU_MATRIX`` is set (then it is built first).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from harness.finish import RunEvidence, check_evidence
from harness.images.qemu import cached_qemu, ensure_qemu
from harness.run import run_scenario
from harness.scenario import load_scenario
from harness.session import Harness

ROOT = Path(__file__).resolve().parents[2]
VERSION = "10.0"


@pytest.fixture(scope="module")
def qemu10(dma_harness: Harness) -> str:
    cache = dma_harness.cache
    build = cached_qemu(cache, VERSION)
    if build is None:
        if not os.environ.get("DMA_HARNESS_QEMU_MATRIX"):
            pytest.skip(f"QEMU {VERSION} is not built in {cache.root}: python -m harness images build qemu "
                        f"--version {VERSION} (or set DMA_HARNESS_QEMU_MATRIX=1 to build it here)")
        build = ensure_qemu(cache, VERSION)
    return str(build.path)


def test_intel_iommu_nvme_on_qemu_10_0(dma_harness: Harness, qemu10: str, tmp_path: Path, no_leftovers: None) -> None:
    options = dataclasses.replace(dma_harness.options, qemu=qemu10, keep_artifacts=True)
    harness = Harness(options)
    try:
        scenario = load_scenario(ROOT / "configs" / "intel-iommu-nvme.toml")
        result = run_scenario(harness, scenario, artifacts_dir=tmp_path / "art")
    finally:
        harness.close()
    verdict = result.verdict
    assert verdict.status == "ok" and verdict.conclusive, verdict.format()
    assert verdict.versions["qemu.name"] == VERSION and verdict.versions["qemu"].startswith(VERSION + ".")
    assert verdict.versions["qemu.trace_formats"] == VERSION
    assert verdict.report("guest-intent").counts.translations_checked > 1000
    assert verdict.report("block-data").counts.ios_checked == verdict.report("block-data").counts.ios > 0

    art = tmp_path / "art"
    assert json.loads((art / "qemu.json").read_text())["trace_formats"]["series"] == VERSION
    head = (art / "config.toml").read_text().splitlines()[:2]
    assert head[1].endswith(f"--qemu {VERSION}"), head
    saved = json.loads((art / "verdict.json").read_text())
    assert saved["versions"]["qemu.name"] == VERSION
    replay = check_evidence(RunEvidence.from_folder(art))
    assert replay.status == "ok" and replay.versions == verdict.versions
