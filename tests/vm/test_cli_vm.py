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
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    counts = result["verdict"]["counts"]
    assert result["verdict"]["ok"] and counts["translations"] > 0 and counts["invalidations"] > 0
    assert all(r["verified"] for r in result["records"])
    io = result["block_io"]
    assert io["ok"] and io["device_written"] >= io["guest_written"] == 2 << 20
    assert list(tmp_path.iterdir()) == []  # nothing diverged: no artifacts


def test_guest_that_never_comes_up(dma_harness, tmp_path, no_leftovers):
    cfg = (ROOT / "configs" / "intel-iommu-nvme.toml").read_text()
    cfg = cfg.replace("boot_timeout = 60.0", "boot_timeout = 15.0")
    cfg = cfg.replace('accel = "auto"', 'accel = "auto"\ncmdline = "rdinit=/bin/cat loglevel=7"')
    path = tmp_path / "stuck.toml"
    path.write_text(cfg)
    proc = run_cli("run", str(path), env_cache=dma_harness.cache.root)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
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
