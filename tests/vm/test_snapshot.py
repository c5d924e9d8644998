"""Snapshot restore (harness/vm/snapshot.py): one saved guest per session, tests
start from it in about a second; the NVMe controller QEMU 7.2 cannot migrate is
hot-plugged after the restore; the checkers see the boot trace and the restored
trace as one stream."""

import json
import shutil

import pytest

from harness.finish import RunEvidence, check_evidence
from harness.pytest_plugin import snapshot_store
from harness.vm import IntelIommu, MachineSpec, NvmeController, NvmeNamespace
from harness.vm.snapshot import SNAPSHOT_INFO, RestoredVM
from harness.workloads import NvmePattern
from tests.vm.conftest import harness_qemu_pids, own_run_dirs

# the machine of configs/intel-iommu-nvme.toml
SPEC = MachineSpec(devices=(IntelIommu(caching_mode=True),
                            NvmeController(namespaces=(NvmeNamespace(size_mib=32, lba_size=4096),))))


def test_restored_vm_with_hotplugged_nvme_gets_a_conclusive_ok(vm_factory, dma_verdict, tmp_path):
    vm = vm_factory(SPEC, snapshot=True)
    assert isinstance(vm, RestoredVM), vm.start_note
    assert vm.restore_seconds is not None and vm.restore_seconds < vm.boot_seconds
    sid = vm.hotplugged["nvme0"]
    assert sid >> 8 != 0, "the hot-plugged NVMe sits behind its root port, not on the root bus"
    info = vm.agent.call("sysinfo")
    assert "intel_iommu=on" in info["cmdline"] and info["nvme"], info

    records = NvmePattern(length=256 << 10, chunk=64 << 10, rounds=2).run(vm.agent)
    assert all(r["verified"] for r in records)

    verdict = dma_verdict(vm)
    assert verdict.status == "ok", verdict.format()
    vtd = verdict.report("vtd-consistency").counts
    assert vtd.translations > 0 and vtd.invalidations > 0 and vtd.nvme_prp_maps > 0, verdict.format()
    assert f"{sid:#06x}=" in vtd.translations_by_sid, verdict.format()
    guest = verdict.report("guest-intent").counts
    assert guest.translations_checked > 0 and guest.nvme_pairs > 0 and guest.unattributed_maps == 0
    data = verdict.report("block-data").counts
    assert data.ios_checked == data.ios == 16 and data.pages_checked == 2 * 2 * (256 << 10) // 4096

    # The evidence replays to the same verdict (spec.json names the NVMe's real source id) ...
    run = vm.run_dir
    saved = tmp_path / "run"
    saved.mkdir()
    for name in ("trace.log", "guest-trace.txt", "guest-trace.json", "records.json", "spec.json", SNAPSHOT_INFO):
        shutil.copy2(run / name, saved / name)
    assert check_evidence(RunEvidence.from_folder(saved)).status == "ok"
    # ... and without the snapshot's boot trace (only what the restored QEMU traced) it is not OK:
    boot_bytes = json.loads((run / SNAPSHOT_INFO).read_text())["boot_trace_bytes"]
    assert boot_bytes > 0
    (saved / "trace.log").write_bytes((run / "trace.log").read_bytes()[boot_bytes:])
    dropped = check_evidence(RunEvidence.from_folder(saved))
    assert dropped.status != "ok", dropped.format()


def test_unsnapshottable_machine_is_cold_booted_with_the_reason(request, dma_harness):
    two_namespaces = MachineSpec(devices=(IntelIommu(caching_mode=True),
                                          NvmeController(namespaces=(NvmeNamespace(), NvmeNamespace()))))
    vm = snapshot_store(request.config, dma_harness).vm(two_namespaces)  # not started: nothing to boot here
    assert not isinstance(vm, RestoredVM)
    assert vm.start_note.startswith("cold boot: nvme nvme0: ") and "nvme-ns" in vm.start_note, vm.start_note
    assert "\n" not in vm.start_note


def test_no_leftovers_after_a_failure_inside_a_restored_vm(request, dma_harness, no_leftovers):
    store = snapshot_store(request.config, dma_harness)
    with pytest.raises(RuntimeError, match="planted"):
        with store.vm(SPEC, name="fails") as vm:
            assert isinstance(vm, RestoredVM)
            run_dir, pid = vm.run_dir, vm.pid
            assert vm.ssh_run("cat /sys/class/nvme/nvme0/serial")[1].strip() == "dmaharness0"
            raise RuntimeError("planted failure inside the restored VM")
    assert not run_dir.exists()
    assert vm.exitcode is not None and pid not in harness_qemu_pids()
    assert own_run_dirs() == []
    assert store.folder is not None and any(store.folder.iterdir()), "the snapshot outlives the VM"
