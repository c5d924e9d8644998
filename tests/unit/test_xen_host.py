"""The XenHost machine profile: validation, the multiboot argv, dom0's command line
and crash signatures (pure code, no QEMU)."""

from pathlib import Path

import pytest

from harness.errors import DeviceConfigError
import tomllib

from harness.scenario import scenario_from_table
from harness.vm.devices import IntelIommu, NvmeController
from harness.vm.machine import VM, BootImages
from harness.vm.spec import MachineSpec
from harness.vm.xen import XEN_KERNEL_OPTIONS, XenHost, panic_in


def test_xen_cmdline_and_dom0_defaults():
    spec = MachineSpec(memory_mib=2048, xen=XenHost(dom0_vcpus=1))
    cmdline = spec.xen.xen_cmdline()
    assert "console=com1" in cmdline and "dom0_mem=1024M,max:1024M" in cmdline
    assert "conring_size=1024k" in cmdline and "dom0_max_vcpus=1" in cmdline
    assert spec.kernel_cmdline().startswith("console=hvc0 ")
    assert spec.cpu_model("tcg") == "qemu64,+svm"
    assert MachineSpec().kernel_cmdline().startswith("console=ttyS0 ")
    needs = spec.kernel_needs()
    assert all("xen (dom0)" in needs[name] for name in XEN_KERNEL_OPTIONS)
    assert "XEN_GNTDEV" not in MachineSpec().kernel_needs()


def test_multiboot_argv_escapes_commas_in_dom0_cmdline(tmp_path):
    spec = MachineSpec(memory_mib=2048, xen=XenHost(), cmdline="trace_event=a,b")
    images = BootImages(Path("/k/bzImage"), Path("/i/initrd.cpio"), hypervisor=Path("/x/xen"))
    vm = VM(spec, images, accel="tcg", qemu="/bin/true")
    vm.run_dir = tmp_path
    vm.ssh_port = 2222
    argv = vm.build_argv()
    assert argv[argv.index("-kernel") + 1] == "/x/xen"
    assert argv[argv.index("-append") + 1] == spec.xen.xen_cmdline()
    modules = argv[argv.index("-initrd") + 1]
    assert modules.startswith("/k/bzImage console=hvc0 ") and modules.endswith("trace_event=a,,b,/i/initrd.cpio")
    assert argv[argv.index("-cpu") + 1] == "qemu64,+svm"


def test_module_paths_with_commas_are_refused():
    with pytest.raises(DeviceConfigError) as info:
        XenHost.modules("/a,b/bzImage", "x", "/i")
    assert info.value.key == "kernel"


@pytest.mark.parametrize("kwargs, key", [
    ({"dom0_mem_mib": 100}, "dom0_mem_mib"),
    ({"dom0_mem_mib": True}, "dom0_mem_mib"),
    ({"dom0_vcpus": 0}, "dom0_vcpus"),
    ({"conring_kib": 8}, "conring_kib"),
    ({"xen_args": "a\nb"}, "xen_args"),
    ({"hypervisor": "/x,y"}, "hypervisor"),
])
def test_xenhost_errors_name_the_field(kwargs, key):
    with pytest.raises(DeviceConfigError) as info:
        XenHost(**kwargs)
    assert info.value.key == key


def test_machine_refuses_a_viommu_and_too_little_memory_under_xen():
    with pytest.raises(DeviceConfigError) as info:
        MachineSpec(memory_mib=2048, xen=XenHost(), devices=(IntelIommu(), NvmeController()))
    assert info.value.key == "devices" and "intel-iommu" in str(info.value)
    with pytest.raises(DeviceConfigError) as info:
        MachineSpec(memory_mib=1024, xen=XenHost(dom0_mem_mib=1024))
    assert info.value.key == "memory_mib"


def test_scenario_machine_xen_table():
    text = """
name = "x"
[machine]
memory_mib = 2048
[machine.xen]
dom0_mem_mib = 768
[workload]
kind = "agent-ops"
ops = [{ op = "ping" }]
"""
    scenario = scenario_from_table(tomllib.loads(text))
    assert scenario.machine.xen == XenHost(dom0_mem_mib=768)
    assert scenario_from_table(tomllib.loads(tomllib_dump(scenario))).machine == scenario.machine


def test_scenario_machine_xen_errors_name_the_key():
    text = """
name = "x"
[machine]
memory_mib = 2048
[machine.xen]
dom0_mem_mib = 10
[workload]
kind = "agent-ops"
"""
    with pytest.raises(DeviceConfigError) as info:
        scenario_from_table(tomllib.loads(text))
    assert info.value.key == "machine.xen.dom0_mem_mib"


def tomllib_dump(scenario):
    import tomli_w
    return tomli_w.dumps(scenario.to_table())


@pytest.mark.parametrize("line, what", [
    ("(XEN) Panic on CPU 0:", "Xen panicked"),
    ("(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds.", "dom0 crashed"),
    ("[   10.1] Kernel panic - not syncing: sysrq triggered crash", "dom0 kernel panicked"),
])
def test_panic_signatures(line, what):
    assert panic_in("(XEN) ok\n" + line + "\n") == (what, line)
    assert panic_in("(XEN) Brought up 1 CPUs\n[ 1.0] Grant table initialized\n") is None
