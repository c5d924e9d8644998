"""Xen 4.17 with the harness's kernel as PV dom0, under QEMU TCG: the grant
scenarios end to end through ``python -m harness run`` (one boot each, the same
path a user takes), and a dom0 panic that leaves nothing behind."""

import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import AgentError, GuestPanicked, QEMUExited
from harness.vm.spec import xen_machine

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config, version", [("xen-grant.toml", 1), ("xen-grant-v2.toml", 2)])
def test_xen_grant_scenario_is_conclusive_and_ok(dma_harness, no_leftovers, tmp_path, config, version):
    import json
    env_cache = str(dma_harness.cache.root)
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(ROOT / "configs" / config), "--json",
                           "--cache", env_cache, "--accel", dma_harness.accel().accel,
                           "--artifacts", str(tmp_path / "artifacts")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    report = result["verdict"]["reports"][0]
    assert report["checker"] == "xen-grant" and report["status"] == "ok", report
    counts = report["counts"]
    for name in ("grants", "maps", "ends", "deferred_ends", "xen_entries_compared", "data_pages_compared",
                 "copy_segments"):
        assert counts[name] > 0, (name, counts)
    assert counts["deferred_freed"] == counts["deferred_ends"], counts
    # Xen host maps a round (2 per page of a gntdev mmap: user PTE + kernel map): 3 writable
    # pages, 2 read-only ones, the ended-but-pinned grant mapped again (1), and the grant mapped
    # right after its last unmap (1), which works only with version 1: the entry of an ended grant
    # stays valid until the deferred end completes, while version 2 cleared its flags at the end.
    per_round = 2 * (3 + 2 + 1 + (1 if version == 1 else 0))
    assert counts["maps"] == 2 * per_round, counts


def test_dom0_panic_is_reported_with_the_console_and_leaves_nothing(dma_harness, no_leftovers):
    vm = dma_harness.vm(xen_machine(), name="xenpanic", trace=False, boot_timeout=120)
    with pytest.raises((GuestPanicked, QEMUExited)) as info:
        with vm:
            assert vm.agent.call("xen.info")["xen"]
            run_dir = vm.run_dir
            # a write into a read-only grant mapping is refused by the agent, which survives it
            g = vm.agent.call("xen.alloc", domid=0, count=1, writable=False)
            m = vm.agent.call("xen.map", domid=0, refs=g["refs"])
            ro = vm.agent.call("xen.mmap", index=m["index"], count=1, writable=False)
            assert ro["errno"] == 0
            with pytest.raises(AgentError, match="read-only mapping"):
                vm.agent.call("mem.write", user_va=ro["user_va"], pattern=1, length=4096)
            assert vm.agent.call("mem.read", user_va=ro["user_va"], length=4096, hex=True)["data"] == "00" * 4096
            vm.agent.call("panic", timeout=60)
    tail = "\n".join(info.value.console_tail)
    assert "Kernel panic" in tail or "Dom0 crashed" in tail or "sysrq" in tail.lower(), tail
    assert vm.run_dir is None and not run_dir.exists()
