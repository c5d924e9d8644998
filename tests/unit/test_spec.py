"""Machine/device rendering and validation (pure code, no QEMU)."""

from pathlib import Path

import pytest

from harness.errors import DeviceConfigError
from harness.device_tables import device_from_table
from harness.vm.devices import IntelIommu, NvmeController, NvmeNamespace, RenderContext
from harness.vm.spec import HARNESS_KERNEL_OPTIONS, MachineSpec

CTX = RenderContext(Path("/run/x"), "tcg")


def test_iommu_renders_first_and_adds_kernel_args():
    spec = MachineSpec(devices=(NvmeController(), IntelIommu(caching_mode=True)))
    argv = spec.machine_argv(CTX)
    devs = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devs[0].startswith("intel-iommu,caching-mode=on,")
    assert devs[1] == "nvme,id=nvme0,serial=dmaharness0"
    assert devs[2].startswith("nvme-ns,drive=nvme0n1,bus=nvme0,nsid=1,")
    assert "intel_iommu=on iommu.strict=1" in spec.kernel_cmdline()
    assert argv[argv.index("-machine") + 1] == "q35,accel=tcg"
    assert argv[argv.index("-cpu") + 1] == "max,-erms,-fsrm"


def test_intremap_under_kvm_splits_irqchip():
    spec = MachineSpec(devices=(IntelIommu(intremap=True),))
    argv = spec.machine_argv(RenderContext(Path("/r"), "kvm"))
    assert argv[argv.index("-machine") + 1] == "q35,accel=kvm,kernel-irqchip=split"
    assert argv[argv.index("-cpu") + 1] == "host"


@pytest.mark.parametrize("kwargs, key", [
    ({"memory_mib": 64}, "memory_mib"),
    ({"cpus": 0}, "cpus"),
    ({"accel": "hvf"}, "accel"),
    ({"machine": "virt"}, "machine"),
    ({"machine": "pc", "devices": (IntelIommu(),)}, "machine"),
    ({"devices": (IntelIommu(), IntelIommu())}, "devices"),
    ({"devices": (NvmeController(), NvmeController())}, "devices"),
])
def test_machine_errors_name_the_field(kwargs, key):
    with pytest.raises(DeviceConfigError) as info:
        MachineSpec(**kwargs)
    assert info.value.key == key


def test_device_errors_name_the_field():
    with pytest.raises(DeviceConfigError) as info:
        IntelIommu(aw_bits=40)
    assert info.value.key == "aw_bits" and "40" in str(info.value)
    with pytest.raises(DeviceConfigError) as info:
        NvmeController(serial="has space")
    assert info.value.key == "serial"
    with pytest.raises(DeviceConfigError) as info:
        NvmeController(namespaces=(NvmeNamespace(nsid=1), NvmeNamespace(nsid=1)))
    assert info.value.key == "namespaces"
    with pytest.raises(DeviceConfigError) as info:
        NvmeNamespace(lba_size=1000)
    assert info.value.key == "lba_size"


def test_device_from_table_rejects_unknown_kind_key_and_type():
    with pytest.raises(DeviceConfigError, match="unknown device kind 'virtio-gpu'") as info:
        device_from_table({"kind": "virtio-gpu"}, "devices[1]")
    assert info.value.key == "devices[1].kind"
    with pytest.raises(DeviceConfigError, match="unknown key 'cachingmode'") as info:
        device_from_table({"kind": "intel-iommu", "cachingmode": True}, "devices[0]")
    assert info.value.key == "devices[0].cachingmode"
    with pytest.raises(DeviceConfigError, match="must be bool") as info:
        device_from_table({"kind": "intel-iommu", "caching_mode": "yes"}, "devices[0]")
    assert info.value.key == "devices[0].caching_mode"
    with pytest.raises(DeviceConfigError, match="size_mb") as info:
        device_from_table({"kind": "nvme", "namespaces": [{"size_mb": 1}]}, "devices[0]")
    assert info.value.key == "devices[0].namespaces[0].size_mb"


def test_nvme_setup_creates_sparse_backing_files(tmp_path):
    ctrl = NvmeController(namespaces=(NvmeNamespace(size_mib=8), NvmeNamespace(size_mib=2, lba_size=4096)))
    ctx = RenderContext(tmp_path, "tcg")
    ctrl.setup(ctx)
    assert (tmp_path / "nvme0n1.img").stat().st_size == 8 << 20
    assert (tmp_path / "nvme0n2.img").stat().st_size == 2 << 20
    argv = ctrl.argv(ctx)
    assert f"driver=file,filename={tmp_path}/nvme0n2.img,node-name=nvme0n2-file" in argv
    assert any("nsid=2,logical_block_size=4096" in a for a in argv)


def test_vm_layer_imports_no_front_end_or_config_module():
    """harness/vm knows QEMU, not front ends or config files (see harness/device_tables.py)."""
    import ast

    vm_dir = Path(__file__).resolve().parents[2] / "harness" / "vm"
    outside = ("harness.options", "harness.tables", "harness.scenario", "harness.device_tables",
               "harness.cli", "harness.pytest_plugin", "harness.session", "harness.run")
    offenders = []
    for source in sorted(vm_dir.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{source.name}: {n}" for n in names if n.startswith(outside)]
    assert offenders == []


def test_kernel_needs_are_the_harness_and_each_device():
    bare = MachineSpec().kernel_needs()
    assert set(bare) == set(HARNESS_KERNEL_OPTIONS) and bare["VIRTIO_CONSOLE"] == ["the harness"]
    needs = MachineSpec(devices=(IntelIommu(), NvmeController(), NvmeController(id="nvme1"))).kernel_needs()
    assert needs["INTEL_IOMMU"] == ["intel-iommu"] and needs["BLK_DEV_NVME"] == ["nvme"]
    assert "IRQ_REMAP" not in needs and "XEN_DOM0" not in needs
    assert MachineSpec(devices=(IntelIommu(intremap=True),)).kernel_needs()["IRQ_REMAP"] == ["intel-iommu"]


def test_interrupt_remapping_skips_the_io_apic_timer_check():
    """With intremap the kernel's IO-APIC timer check can panic under TCG on a busy
    host: the device adds no_timer_check; without intremap it is not added."""
    assert "no_timer_check" in IntelIommu(intremap=True).kernel_args()
    assert "no_timer_check" not in IntelIommu(intremap=False).kernel_args()
    assert "no_timer_check" in MachineSpec(devices=(IntelIommu(intremap=True),)).kernel_cmdline()
