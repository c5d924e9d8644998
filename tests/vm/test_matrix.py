"""The vIOMMU x device matrix in real guests: every cell of :mod:`harness.matrix`
boots its machine, runs its device's workload (real data: O_DIRECT block I/O or
echoed packets, verified by the guest) and must get a conclusive OK verdict
with translations of its device checked against the guest kernel's own mappings.
"""

import pytest

from harness import matrix
from harness.checks.devices import BY_SID_FIELDS, parse_by_sid
from harness.checks.verdict import counts_dict
from harness.scenario import load_scenario
from harness.vm.virtio import expected_dma_devices

from tests.unit.test_matrix import CONFIGS

PAIRS = [(v, d) for v in matrix.VIOMMUS for d in matrix.DEVICES]


@pytest.mark.parametrize(("viommu", "device"), PAIRS, ids=[f"{v}-{d}" for v, d in PAIRS])
def test_matrix_cell(vm_factory, dma_verdict, viommu, device):
    try:
        cell = matrix.cell(viommu, device)
    except matrix.Unsupported as exc:
        pytest.skip(f"{viommu} x {device} cannot run: {exc.reason}")
    # The scenario file is what a user runs with `python -m harness run`.
    scenario = load_scenario(CONFIGS / f"{cell.name}.toml")
    assert scenario == cell.scenario
    vm = vm_factory(scenario.machine, name=cell.name, boot_timeout=scenario.boot_timeout)
    scenario.workload.run(vm.agent)

    verdict = dma_verdict(vm)
    assert verdict.status == "ok", verdict.format()
    (dma_device,) = expected_dma_devices(scenario.machine.devices)
    by_check = {}
    for report in verdict.reports:
        counts = counts_dict(report.counts)
        field = next((f for f in BY_SID_FIELDS if isinstance(counts.get(f), str)), None)
        if field is not None:
            by_check[report.checker] = parse_by_sid(counts[field]).get(dma_device.sid, 0)
    # The guest's own mappings judged this device's translations.
    assert by_check.get("guest-intent", 0) > 0, (dma_device.label, by_check, verdict.format())
