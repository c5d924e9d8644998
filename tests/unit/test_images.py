"""Image helpers that need no network: newc writer, tar->cpio, kconfig checks, cache."""

import io
import os
import shutil
import dataclasses
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from harness.errors import KernelConfigError

BZ_HEADER = bytes(0x202) + b"HdrS"
"""The x86 boot header magic a bzImage carries (checked by read_user_kernel): stand-in kernels start with it."""
from harness.images.cache import ImageCache, content_key
from harness.images.cpio import NewcWriter, tar_to_newc
from harness.images.kernel import (cached_kernel, check_kernel, missing_options, parse_kconfig,
                                   read_user_kernel, recipe_key, required_options, user_kernel)
from harness.options import HarnessOptions
from harness.session import Harness
from harness.vm.devices import DEVICE_KINDS, IntelIommu, NvmeController
from harness.vm.spec import HARNESS_KERNEL_OPTIONS, MachineSpec

ROOT = Path(__file__).resolve().parents[2]


def test_newc_archive_lists_with_cpio(tmp_path):
    if shutil.which("cpio") is None:
        pytest.skip("cpio is not installed")
    out = tmp_path / "a.cpio"
    with open(out, "wb") as fh:
        w = NewcWriter(fh)
        w.add_dir("etc")
        w.add_file("etc/hello", b"hello\n", 0o600)
        w.add_symlink("etc/link", "hello")
        w.close()
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=open(out, "rb"), capture_output=True,
                             text=True, check=True).stdout
    assert "etc/hello" in listing and "-rw-------" in listing and "etc/link -> hello" in listing
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], stdin=open(out, "rb"), cwd=extract, check=True)
    assert (extract / "etc/hello").read_bytes() == b"hello\n"


def test_tar_to_newc_keeps_files_links_and_hardlinks(tmp_path):
    if shutil.which("cpio") is None:
        pytest.skip("cpio is not installed")
    tar_path = tmp_path / "t.tar"
    with tarfile.open(tar_path, "w") as tar:
        d = tarfile.TarInfo("./usr")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        f = tarfile.TarInfo("./usr/a")
        f.size = 3
        tar.addfile(f, io.BytesIO(b"abc"))
        h = tarfile.TarInfo("./usr/b")
        h.type = tarfile.LNKTYPE
        h.linkname = "./usr/a"
        tar.addfile(h)
    out = tmp_path / "t.cpio"
    assert tar_to_newc(tar_path, out) == 3
    x = tmp_path / "x"
    x.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], stdin=open(out, "rb"), cwd=x, check=True)
    assert (x / "usr/b").read_bytes() == b"abc"


def test_kconfig_parsing_and_required_options():
    opts = parse_kconfig("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n")
    assert opts == {"A": "y", "B": "n", "C": "m"}
    assert missing_options(opts, ["A", "B", "C", "D"]) == ["B", "C", "D"]
    req = required_options()
    assert {"INTEL_IOMMU", "IOMMUFD", "VDPA_SIM_BLOCK", "KVM_AMD", "PVPANIC_PCI"} <= set(req)


def test_user_kernel_lacking_an_option_is_refused(tmp_path):
    bz = tmp_path / "bzImage"
    bz.write_bytes(BZ_HEADER + b"not really a kernel")
    (tmp_path / "config").write_text("\n".join(f"CONFIG_{o}=y" for o in required_options()
                                               if o != "IOMMUFD") + "\n")
    with pytest.raises(KernelConfigError) as info:
        user_kernel(bz)
    assert info.value.missing == ["IOMMUFD"] and "CONFIG_IOMMUFD" in str(info.value)


def _user_kernel_lacking(tmp_path: Path, *lacking: str) -> Path:
    """A stand-in bzImage whose config has every option anything may ask for but ``lacking``."""
    bz = tmp_path / "bzImage"
    bz.write_bytes(BZ_HEADER + b"not really a kernel")
    every = set(required_options()) | set(HARNESS_KERNEL_OPTIONS)
    (tmp_path / "config").write_text("".join(f"CONFIG_{o}=y\n" for o in sorted(every - set(lacking))))
    return bz


def test_user_kernel_is_checked_only_for_what_its_machine_needs(tmp_path):
    nvme_machine = MachineSpec(devices=(IntelIommu(caching_mode=True), NvmeController()))
    bz = _user_kernel_lacking(tmp_path, "XEN_DOM0", "VDPA_SIM", "IRQ_REMAP", "IOMMUFD")
    check_kernel(read_user_kernel(bz), nvme_machine.kernel_needs())  # none of those is needed here
    with pytest.raises(KernelConfigError) as info:
        user_kernel(bz, MachineSpec(devices=(IntelIommu(intremap=True),)).kernel_needs())
    assert info.value.missing == ["IRQ_REMAP"]
    assert "CONFIG_IRQ_REMAP (needed by intel-iommu)" in str(info.value)
    with pytest.raises(KernelConfigError):
        user_kernel(bz)  # the project's full list, by default


def test_missing_options_are_named_with_what_needs_them(tmp_path):
    bz = _user_kernel_lacking(tmp_path, "BLK_DEV_NVME", "VIRTIO_CONSOLE", "INTEL_IOMMU")
    spec = MachineSpec(devices=(IntelIommu(), NvmeController()))
    with pytest.raises(KernelConfigError) as info:
        check_kernel(read_user_kernel(bz), spec.kernel_needs())
    assert info.value.missing == ["BLK_DEV_NVME", "INTEL_IOMMU", "VIRTIO_CONSOLE"]
    message = str(info.value)
    assert f"kernel {bz} lacks options" in message
    for needle in ("CONFIG_BLK_DEV_NVME (needed by nvme)", "CONFIG_INTEL_IOMMU (needed by intel-iommu)",
                   "CONFIG_VIRTIO_CONSOLE (needed by the harness)"):
        assert needle in message


def test_session_checks_a_user_kernel_against_the_scenario_before_building(tmp_path):
    bz = _user_kernel_lacking(tmp_path, "BLK_DEV_NVME", "XEN_DOM0")
    cache = tmp_path / "cache"
    h = Harness(HarnessOptions(qemu=sys.executable, kernel=str(bz), cache=str(cache)))
    assert h.kernel().bzimage == bz  # no machine given: nothing to check against
    h.kernel(MachineSpec(devices=(IntelIommu(),)))
    with pytest.raises(KernelConfigError, match=r"CONFIG_BLK_DEV_NVME \(needed by nvme\)"):
        h.images(MachineSpec(devices=(IntelIommu(), NvmeController())))
    with pytest.raises(KernelConfigError, match="CONFIG_BLK_DEV_NVME"):
        h.images(MachineSpec(kernel=str(bz), devices=(NvmeController(),)))
    assert not cache.exists()  # refused before any image step


def test_the_project_kernel_has_what_every_device_can_ask_for():
    """images/kernel.required (the project's build) covers every device in every setting."""
    asked: set[str] = set()
    for cls in DEVICE_KINDS.values():
        flags = [f.name for f in dataclasses.fields(cls) if f.type == "bool"]
        for variant in [{}] + [{flag: value} for flag in flags for value in (False, True)]:
            asked |= set(cls(**variant).kernel_options())
    assert {"INTEL_IOMMU", "IRQ_REMAP", "BLK_DEV_NVME"} <= asked
    assert asked <= set(required_options())


def test_doctor_and_images_show_build_nothing(tmp_path):
    """With nothing cached, doctor says the kernel is not built (and how to build it)
    instead of building it, and images show only looks: the cache stays empty."""
    cache = tmp_path / "cache"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harness", *args, "--cache", str(cache), "--qemu",
                               sys.executable], capture_output=True, text=True, timeout=60, cwd=tmp_path)

    doctor = run("doctor")
    assert doctor.returncode in (0, 2), doctor.stderr  # 2: a build tool is missing on this machine
    assert f"kernel: not built yet ({cache / 'kernel' / recipe_key()})" in doctor.stdout
    assert "python -m harness images build" in doctor.stdout
    assert "accelerator: not probed" in doctor.stdout
    assert "accelerator: tcg (requested)" in run("doctor", "--accel", "tcg").stdout
    show = run("images", "show")
    assert show.returncode == 0, show.stderr
    assert f"kernel  {cache / 'kernel' / recipe_key()}  [not built]" in show.stdout
    assert "[not generated]" in show.stdout
    assert not cache.exists() and cached_kernel(ImageCache(cache)) is None


def test_user_kernel_config_is_read_from_its_embedded_ikconfig(tmp_path):
    """A gzip-compressed kernel image with IKCONFIG, followed by more data, as in a bzImage."""
    import gzip
    config = "CONFIG_INTEL_IOMMU=y\n# CONFIG_XEN is not set\n"
    vmlinux = b"\x90" * 512 + b"IKCFG_ST" + gzip.compress(config.encode()) + b"IKCFG_ED" + b"\x90" * 512
    bz = tmp_path / "bzImage"
    bz.write_bytes(BZ_HEADER + b"\0" * 2048 + gzip.compress(vmlinux) + b"\xff" * 4096)
    kernel = read_user_kernel(bz)
    assert kernel.config is None and kernel.options() == {"INTEL_IOMMU": "y", "XEN": "n"}
    check_kernel(kernel, {"INTEL_IOMMU": ["intel-iommu"]})
    with pytest.raises(KernelConfigError, match=r"CONFIG_XEN \(needed by xen\)"):
        check_kernel(kernel, {"XEN": ["xen"]})


def test_user_kernel_without_readable_config_warns(tmp_path):
    bz = tmp_path / "bzImage"
    bz.write_bytes(BZ_HEADER + os.urandom(4096))
    with pytest.warns(UserWarning, match="required options not confirmed"):
        k = user_kernel(bz)
    assert k.config is None


def test_content_key_and_building_publishes_atomically(tmp_path):
    assert content_key({"a": "1", "b": b"2"}) == content_key({"b": "2", "a": b"1"})
    assert content_key({"a": "1"}) != content_key({"a": "2"})
    cache = ImageCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.building("kind", "k1") as d:
            (d / "manifest.json").write_text("{}")
            raise RuntimeError("step failed")
    assert not cache.complete("kind", "k1") and list((tmp_path / "kind").iterdir()) == []
    with cache.building("kind", "k1") as d:
        (d / "manifest.json").write_text("{}")
    assert cache.complete("kind", "k1")


def test_only_the_newest_initrds_are_kept(tmp_path):
    from harness.images.rootfs import _prune_initrds
    cache = ImageCache(tmp_path)
    for i in range(6):
        with cache.building("initrd", f"k{i}") as d:
            (d / "initrd.cpio").write_bytes(b"x")
            (d / "manifest.json").write_text("{}")
        os.utime(cache.entry("initrd", f"k{i}") / "manifest.json", (1000 + i, 1000 + i))
    _prune_initrds(cache, keep=4)
    assert sorted(p.name for p in (tmp_path / "initrd").iterdir() if p.is_dir()) == ["k2", "k3", "k4", "k5"]
