"""Image helpers that need no network: newc writer, tar->cpio, kconfig checks, cache."""

import io
import os
import shutil
import subprocess
import tarfile

import pytest

from harness.errors import KernelConfigError
from harness.images.cache import ImageCache, content_key
from harness.images.cpio import NewcWriter, tar_to_newc
from harness.images.kernel import missing_options, parse_kconfig, required_options, user_kernel


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
    bz.write_bytes(b"not really a kernel")
    (tmp_path / "config").write_text("\n".join(f"CONFIG_{o}=y" for o in required_options()
                                               if o != "IOMMUFD") + "\n")
    with pytest.raises(KernelConfigError) as info:
        user_kernel(bz)
    assert info.value.missing == ["IOMMUFD"] and "CONFIG_IOMMUFD" in str(info.value)


def test_user_kernel_without_readable_config_warns(tmp_path):
    bz = tmp_path / "bzImage"
    bz.write_bytes(os.urandom(4096))
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
