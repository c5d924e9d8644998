"""The command line against a real guest: the main job, and a guest that never
comes up (exit 2, one clear line, then its last console lines)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, env_cache, cwd=ROOT, timeout=300):
    import os
    env = dict(os.environ, DMA_HARNESS_CACHE=str(env_cache))
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_main_job_prints_verdict_with_counts(dma_harness, tmp_path, no_leftovers):
    proc = run_cli("run", "configs/intel-iommu-nvme.toml", "--json", "--artifacts", str(tmp_path),
                   env_cache=dma_harness.cache.root)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr)
    result = json.loads(proc.stdout)
    verdict = result["verdict"]
    assert verdict["status"] == "ok" and verdict["conclusive"] is True
    reports = {r["checker"]: r for r in verdict["reports"]}
    assert set(reports) == {"vtd-consistency", "guest-intent", "block-data"}
    vtd = reports["vtd-consistency"]["counts"]
    assert vtd["translations"] > 0 and vtd["invalidations"] > 0
    intent = reports["guest-intent"]["counts"]
    assert intent["translations_checked"] > 0 and intent["guest_maps"] > 0
    data = reports["block-data"]["counts"]
    assert data["bytes_written_checked"] == data["bytes_read_checked"] == 2 << 20
    assert data["pages_checked"] == 2 * (2 << 20) // 4096
    assert list(tmp_path.iterdir()) == []  # nothing diverged: no artifacts


def test_saved_run_replays_without_a_vm(dma_harness, tmp_path, no_leftovers):
    """``--keep-artifacts`` then ``check FOLDER``: the same verdict from the saved evidence alone."""
    proc = run_cli("run", "configs/intel-iommu-nvme-nocm.toml", "--json", "--keep-artifacts",
                   "--artifacts", str(tmp_path), env_cache=dma_harness.cache.root)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr)
    folder = tmp_path / "intel-iommu-nvme-nocm"
    for name in ("trace.log", "guest-trace.txt", "guest-trace.json", "records.json", "verdict.json", "config.toml"):
        assert (folder / name).is_file(), name
    replay = run_cli("check", str(folder), "--json", env_cache=dma_harness.cache.root)
    assert replay.returncode == 0, replay.stderr
    live = json.loads(proc.stdout)["verdict"]
    again = json.loads(replay.stdout)
    assert [r["counts"] for r in again["reports"]] == [r["counts"] for r in live["reports"]]
    host_only = run_cli("check", str(folder / "trace.log"), env_cache=dma_harness.cache.root)
    assert host_only.returncode == 3, host_only.stderr
    assert "guest kernel's event log is empty or missing" in host_only.stderr


def test_guest_that_never_comes_up(dma_harness, tmp_path, no_leftovers):
    cfg = (ROOT / "configs" / "intel-iommu-nvme.toml").read_text()
    cfg = cfg.replace("boot_timeout = 60.0", "boot_timeout = 15.0")
    cfg = cfg.replace('accel = "auto"', 'accel = "auto"\ncmdline = "rdinit=/bin/cat loglevel=7"')
    path = tmp_path / "stuck.toml"
    path.write_text(cfg)
    proc = run_cli("run", str(path), "--artifacts", str(tmp_path / "art"), env_cache=dma_harness.cache.root)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    saved = tmp_path / "art" / "intel-iommu-nvme"  # a failed boot keeps its console log and argv
    assert "Run /bin/cat as init process" in (saved / "console.log").read_text()
    assert (saved / "argv.json").is_file() and (saved / "config.toml").is_file()
    assert "Traceback" not in proc.stderr
    first, *rest = proc.stderr.strip().splitlines()
    assert first.startswith("error: intel-iommu-nvme: the guest agent did not answer within 15s"), first
    assert rest[0] == "last console lines:" and all(line.startswith("  | ") for line in rest[1:]), rest
    assert any("/bin/cat" in line for line in rest), rest


def test_qemu_that_dies_at_start_up_is_reported_with_its_output(dma_harness, tmp_path, no_leftovers):
    """Not a QEMU test: a stand-in binary that fails at start-up exercises the
    harness's launch-failure path (exit 2, QEMU's own words, the argv)."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'qemu-system-x86_64: -device nvme: could not open backing file' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = run_cli("run", "configs/intel-iommu-nvme.toml", "--qemu", str(fake), "--accel", "tcg",
                   env_cache=dma_harness.cache.root)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: QEMU exited during start-up (exit status 1)"), lines[0]
    assert "could not open backing file" in proc.stderr and f"argv: {fake} -name" in proc.stderr
