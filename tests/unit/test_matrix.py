"""The vIOMMU x device matrix: its table, its scenario files and its command."""

import pytest

from harness import matrix
from harness.cli import main
from harness.errors import ConfigError
from harness.scenario import load_scenario
from harness.vm.devices import IntelIommu
from harness.vm.virtio import VirtioBlk, VirtioNet
from harness.vm.virtio_iommu import VirtioIommu

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "matrix"


def test_every_cell_is_a_scenario_with_its_viommu_and_device():
    seen = set()
    for viommu, device, c in matrix.cells():
        assert isinstance(c, matrix.Cell), c
        devices = c.scenario.machine.devices
        assert len(devices) == 2
        iommu, dev = devices
        assert dev.kind == device and c.name == f"{viommu}-{device}" == c.scenario.name
        if viommu == "virtio-iommu":
            assert isinstance(iommu, VirtioIommu)
        else:
            assert isinstance(iommu, IntelIommu) and iommu.caching_mode == (viommu == "intel-cm")
        if isinstance(dev, (VirtioBlk, VirtioNet)):
            # the caching-mode row also exercises device-TLB invalidations
            assert dev.ats == (viommu == "intel-cm")
        seen.add((viommu, device))
    assert seen == {(v, d) for v in matrix.VIOMMUS for d in matrix.DEVICES}


def test_checked_in_configs_are_the_cells():
    """configs/matrix is what ``python -m harness matrix --write`` writes: no file
    drifts from the table, and no cell is missing a file."""
    files = sorted(p.stem for p in CONFIGS.glob("*.toml"))
    names = sorted(c.name for _, _, c in matrix.cells() if isinstance(c, matrix.Cell))
    assert files == names
    for _, _, c in matrix.cells():
        assert isinstance(c, matrix.Cell)
        assert load_scenario(CONFIGS / f"{c.name}.toml") == c.scenario, c.name


def test_write_configs_round_trips(tmp_path):
    written = matrix.write_configs(tmp_path / "m")
    assert len(written) == len(matrix.VIOMMUS) * len(matrix.DEVICES)
    for path in written:
        assert load_scenario(path) == matrix.cell(*_split(path.stem)).scenario


def _split(name):
    for v in matrix.VIOMMUS:
        if name.startswith(v + "-"):
            return v, name[len(v) + 1:]
    raise AssertionError(name)


def test_unknown_names_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="unknown vIOMMU 'amd-iommu'") as exc:
        matrix.cell("amd-iommu", "nvme")
    assert exc.value.key == "viommu"
    with pytest.raises(ConfigError, match="unknown device 'e1000'"):
        matrix.cell("intel-cm", "e1000")


def test_an_unsupported_cell_raises_with_its_reason_and_is_listed(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(matrix.UNSUPPORTED, ("virtio-iommu", "virtio-net"), "no such thing here")
    with pytest.raises(matrix.Unsupported) as exc:
        matrix.cell("virtio-iommu", "virtio-net")
    assert exc.value.reason == "no such thing here"
    assert main(["matrix", "--write", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "virtio-iommu   virtio-net   skipped: no such thing here" in out
    assert not (tmp_path / "virtio-iommu-virtio-net.toml").exists()
    assert (tmp_path / "virtio-iommu-nvme.toml").exists()
