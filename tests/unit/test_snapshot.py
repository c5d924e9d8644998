"""Pure parts of snapshot restore (harness/vm/snapshot.py): which machines are
snapshotted and how, the hot-plugged device's source id from QMP query-pci, the
checkers taking it, stores and their removal, the restore target line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.bench.boot import BootSummary, restore_target_line
from harness.finish import _placed_dma_devices
from harness.vm import IntelIommu, MachineSpec, NvmeController, NvmeNamespace, VirtioIommu
from harness.vm.devices import RenderContext
from harness.vm.snapshot import (
    STORE_PREFIX,
    PcieRootPort,
    SnapshotStore,
    SnapshotUnsupported,
    _sids,
    snapshot_plan,
    sweep_stale_stores,
)
from harness.vm.virtio import VirtioBlk
from harness.vm.xen import XenHost


def test_nvme_is_replaced_by_an_empty_root_port_in_its_place() -> None:
    spec = MachineSpec(devices=(IntelIommu(caching_mode=True), NvmeController(addr=5), VirtioBlk()))
    plan = snapshot_plan(spec)
    kinds = [d.kind for d in plan.base.devices]
    assert kinds == ["intel-iommu", "pcie-root-port", "virtio-blk"]
    port = plan.base.devices[1]
    assert isinstance(port, PcieRootPort) and port.addr == 5 and port.id == "nvme0-hp"
    assert [(d.id, p) for d, p in plan.hotplug] == [("nvme0", "nvme0-hp")]
    assert plan.base.kernel_cmdline() == spec.kernel_cmdline()
    assert port.argv(RenderContext(Path("/x"), "tcg")) == ["-device",
                                                           "pcie-root-port,id=nvme0-hp,bus=pcie.0,chassis=201,addr=0x5"]


def test_a_machine_without_unmigratable_devices_is_saved_whole() -> None:
    spec = MachineSpec(devices=(VirtioIommu(), VirtioBlk()))
    plan = snapshot_plan(spec)
    assert plan.base == spec and plan.hotplug == ()


@pytest.mark.parametrize("spec, reason", [
    (MachineSpec(memory_mib=2048, xen=XenHost()), "a Xen machine"),
    (MachineSpec(machine="pc", devices=(NvmeController(),)), "machine 'pc' has no PCIe root port"),
    (MachineSpec(devices=(NvmeController(namespaces=(NvmeNamespace(), NvmeNamespace())),)), "nvme-ns"),
    (MachineSpec(devices=(NvmeController(namespaces=(NvmeNamespace(nsid=2),)),)), "one namespace (nsid 1)"),
])
def test_unsnapshottable_machines_say_why_in_one_line(spec: MachineSpec, reason: str) -> None:
    with pytest.raises(SnapshotUnsupported) as info:
        snapshot_plan(spec)
    assert reason in str(info.value) and "\n" not in str(info.value)


QUERY_PCI: list[dict[str, Any]] = [{"bus": 0, "devices": [
    {"bus": 0, "slot": 0, "function": 0, "qdev_id": ""},
    {"bus": 0, "slot": 1, "function": 0, "qdev_id": "nvme0-hp",
     "pci_bridge": {"bus": {"number": 0, "secondary": 1, "subordinate": 1},
                    "devices": [{"bus": 1, "slot": 0, "function": 0, "qdev_id": "nvme0"}]}},
    {"bus": 0, "slot": 3, "function": 0, "qdev_id": "vblk0"},
]}]


def test_source_ids_from_query_pci_go_through_bridges() -> None:
    assert _sids(QUERY_PCI) == {"nvme0-hp": 0x0008, "nvme0": 0x0100, "vblk0": 0x0018}
    assert _sids(None) == {}


def test_checkers_take_a_hotplugged_device_where_it_is() -> None:
    tables = [IntelIommu().to_table(), PcieRootPort(id="nvme0-hp").to_table(),
              {**NvmeController().to_table(), "sid": 0x0100, "hotplugged": "nvme0-hp"}]
    placed = _placed_dma_devices(tables)
    assert [(d.kind, d.id, d.sid) for d in placed] == [("nvme", "nvme0", 0x0100)]
    # without its sid the same controller would be predicted on the root bus
    cold = _placed_dma_devices([IntelIommu().to_table(), NvmeController().to_table()])
    assert [d.sid for d in cold] == [0x0008]


class _NoHarness:
    """A store is made and removed without booting anything."""


def test_store_is_removed_at_exit_and_sweeps_dead_owners(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / (STORE_PREFIX + "stale")
    stale.mkdir()
    (stale / "owner.pid").write_text(str(dead.pid))
    (stale / "migration.bin").write_bytes(b"x")
    live = tmp_path / (STORE_PREFIX + "live")
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getppid()))
    with SnapshotStore(_NoHarness(), base=tmp_path) as store:  # type: ignore[arg-type]
        assert store.folder is not None and store.folder.is_dir()
        assert (store.folder.stat().st_mode & 0o777) == 0o700
        assert not stale.exists() and live.exists()
        folder = store.folder
    assert not folder.exists() and store.folder is None
    assert sweep_stale_stores(tmp_path) == []


def test_restore_target_line() -> None:
    assert restore_target_line(BootSummary(0.7, 0.58, 0.94, 5)) == "target: restore median 0.70s <= 1.0s"
    assert restore_target_line(BootSummary(1.2, 1.0, 1.5, 5)) == "target: restore median 1.20s > 1.0s"
