"""The boot shortcuts on QEMU's command line (pure code, no QEMU): the PVH kernel,
``/usr`` on an NVDIMM with the small initramfs and ``rdinit=``, and neither under Xen
or for a spec's own initrd."""

from pathlib import Path

import pytest

from harness.vm.machine import VM, BootImages
from harness.vm.pmem import UsrDimm
from harness.vm.spec import MachineSpec
from harness.vm.xen import XenHost


def _argv(tmp_path: Path, spec: MachineSpec, images: BootImages) -> list[str]:
    vm = VM(spec, images, accel="tcg", qemu="/bin/true")
    vm.run_dir = tmp_path
    vm.ssh_port = 2222
    return vm.build_argv()


@pytest.fixture
def usr(tmp_path: Path) -> Path:
    image = tmp_path / "usr,img.erofs"
    image.write_bytes(b"\0" * (32 << 20))
    return image


def test_split_root_boots_the_pvh_kernel_small_initrd_and_nvdimm(tmp_path, usr):
    images = BootImages(Path("/k/bzImage"), Path("/i/initrd.cpio"), pvh_kernel=Path("/k/vmlinux"),
                        usr_image=usr, usr_initrd=Path("/i/initrd-usr.cpio"))
    argv = _argv(tmp_path, MachineSpec(memory_mib=1024), images)
    assert argv[argv.index("-kernel") + 1] == "/k/vmlinux"
    assert argv[argv.index("-initrd") + 1] == "/i/initrd-usr.cpio"
    assert argv[argv.index("-append") + 1].split()[0] == "rdinit=/init.usr"
    assert argv[argv.index("-machine") + 1].endswith(",nvdimm=on")
    assert argv[argv.index("-m") + 1] == "1024,slots=1,maxmem=1056M"
    backend = argv[argv.index("-object") + 1]
    assert "mem-path=" + str(usr).replace(",", ",,") + "," in backend
    assert backend.endswith(f"size={32 << 20},share=on,readonly=on")
    assert argv[argv.index(backend) + 2].startswith("nvdimm,") and "unarmed=on" in argv[argv.index(backend) + 2]


def test_a_specs_own_initrd_keeps_the_machine_but_not_the_first_stage(tmp_path, usr):
    images = BootImages(Path("/k/bzImage"), Path("/floor.cpio"), pvh_kernel=Path("/k/vmlinux"), usr_image=usr)
    argv = _argv(tmp_path, MachineSpec(), images)
    assert argv[argv.index("-initrd") + 1] == "/floor.cpio"
    assert "rdinit=" not in argv[argv.index("-append") + 1]
    assert "nvdimm=on" in argv[argv.index("-machine") + 1]


@pytest.mark.parametrize("own", ["rdinit=/bin/cat", "init=/sbin/other"])
def test_a_cmdline_naming_its_own_init_gets_the_whole_root(tmp_path, usr, own):
    images = BootImages(Path("/k/bzImage"), Path("/i/initrd.cpio"), usr_image=usr,
                        usr_initrd=Path("/i/initrd-usr.cpio"))
    argv = _argv(tmp_path, MachineSpec(cmdline=f"loglevel=7 {own}"), images)
    assert argv[argv.index("-initrd") + 1] == "/i/initrd.cpio"
    assert "rdinit=/init.usr" not in argv[argv.index("-append") + 1]


def test_without_shortcuts_the_bzimage_and_whole_initramfs_boot(tmp_path):
    argv = _argv(tmp_path, MachineSpec(), BootImages(Path("/k/bzImage"), Path("/i/initrd.cpio")))
    assert argv[argv.index("-kernel") + 1] == "/k/bzImage"
    assert argv[argv.index("-initrd") + 1] == "/i/initrd.cpio"
    assert argv[argv.index("-m") + 1] == "1024" and "nvdimm" not in " ".join(argv)
    assert "rdinit=" not in argv[argv.index("-append") + 1]


def test_xen_dom0_boots_the_bzimage_and_whole_initramfs(tmp_path, usr):
    images = BootImages(Path("/k/bzImage"), Path("/i/initrd.cpio"), hypervisor=Path("/x/xen"),
                        pvh_kernel=Path("/k/vmlinux"), usr_image=usr, usr_initrd=Path("/i/initrd-usr.cpio"))
    argv = _argv(tmp_path, MachineSpec(memory_mib=2048, xen=XenHost()), images)
    modules = argv[argv.index("-initrd") + 1]
    assert modules.startswith("/k/bzImage ") and modules.endswith(",/i/initrd.cpio")
    assert "nvdimm" not in " ".join(argv) and "rdinit" not in modules


def test_dimm_memory_rounds_up_to_whole_mib(tmp_path):
    image = tmp_path / "u"
    image.write_bytes(b"\0" * ((2 << 20) + 1))
    assert UsrDimm(image).memory_option(512) == "512,slots=1,maxmem=515M"
