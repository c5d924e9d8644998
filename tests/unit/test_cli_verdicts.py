"""``python -m harness check``: the exit status is the verdict's (0 ok, 1 divergence,
3 inconclusive), an inconclusive one says why in one line, and ``--json`` prints the
verdict as data."""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", "check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_empty_trace_is_inconclusive(tmp_path: Path) -> None:
    empty = tmp_path / "trace.log"
    empty.write_text("")
    proc = check(str(empty))
    assert proc.returncode == 3, proc.stderr
    assert "the host trace is empty" in one_line(proc.stderr)


def test_unparseable_vtd_lines_are_inconclusive(tmp_path: Path) -> None:
    """A newer QEMU whose vtd_* formats differ must not pass as OK."""
    text = lzma.decompress((DATA / "intel-iommu-nvme-qemu7.2.trace.xz").read_bytes()).decode()
    trace = tmp_path / "trace.log"
    trace.write_text("\n".join(line.replace(" iova ", " IOVA=").replace(" domain ", " DID=")
                               if line.startswith("vtd_") else line for line in text.splitlines()) + "\n")
    proc = check(str(trace))
    assert proc.returncode == 3, proc.stdout[-2000:]
    assert "vtd_* lines could not be parsed" in one_line(proc.stderr)


def test_recorded_run_folder_is_ok_and_json(tmp_path: Path) -> None:
    proc = check(str(DATA / "intel-iommu-nvme-run"), "--json")
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict["status"] == "ok" and verdict["conclusive"] is True
    assert [r["checker"] for r in verdict["reports"]] == ["vtd-consistency", "guest-intent", "block-data"]
    counts = {r["checker"]: r["counts"] for r in verdict["reports"]}
    assert counts["guest-intent"]["translations_checked"] > 0 and counts["block-data"]["pages_checked"] > 0


def test_divergence_exits_1(tmp_path: Path) -> None:
    text = lzma.decompress((DATA / "intel-iommu-nvme-nocm-qemu7.2.trace.xz").read_bytes()).decode().splitlines()
    i = next(i for i, t in enumerate(text) if i > 900 and t.startswith("vtd_dmar_translate"))
    text[i] = text[i].replace("-> gpa 0x", "-> gpa 0x1")
    trace = tmp_path / "trace.log"
    trace.write_text("\n".join(text) + "\n")
    proc = check(str(trace))
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "wrong-translation" in proc.stdout
