"""Kernel versions (harness/images/kernel.py): a ``--kernel`` value is a version name
or a bzImage path; each version has its own cache key (and so has each planted-bug
patch of it); a bad value is one line and exit 2; the build merges the version's own
fragment after the common one and checks the required options as that version
spells them. Nothing here builds or boots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_cli_errors import assert_one_line_error
from harness.errors import ConfigError, ImageError, KernelConfigError
from harness.images import kernel as k
from harness.images.cache import ImageCache, content_key, recipes_dir
from harness.images.kernel import (DEFAULT_KERNEL_VERSION, KERNEL_SOURCES, KernelChoice, KernelSource,
                                   cached_kernel, is_version_name, kernel_patches, kernel_release,
                                   kernel_source, patch_file_name, recipe_key, resolve_kernel_choice,
                                   resolve_kernel_option)

ROOT = Path(__file__).resolve().parents[2]
PATCH = "intel-skip-unmap-flush"

pytest_plugins = ["pytester"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def one_line_exit_2(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert_one_line_error(proc, *needles)
    return proc.stderr.strip()


def fake_bzimage(path: Path, release: str = "7.2.12") -> Path:
    """A file with an x86 boot header whose kernel_version string says ``release``."""
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x300).to_bytes(2, "little")  # the string at 0x300 + 0x200
    text = f"{release} (builder@host) #1 SMP PREEMPT_DYNAMIC".encode() + b"\0"
    data[0x500:0x500 + len(text)] = text
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("value, version, path", [
    (None, DEFAULT_KERNEL_VERSION, None),
    ("", DEFAULT_KERNEL_VERSION, None),
    ("default", DEFAULT_KERNEL_VERSION, None),
    ("6.12", "6.12", None),
    ("7.2", "7.2", None),
    ("./7.2", None, "./7.2"),
    ("/boot/vmlinuz-7.2", None, "/boot/vmlinuz-7.2"),
    ("bzImage", None, "bzImage"),
    ("7.2.12", None, "7.2.12"),  # not a version name (MAJOR.MINOR only, as for QEMU): a path
])
def test_a_kernel_value_is_a_version_name_or_a_path(value, version, path):
    choice = resolve_kernel_choice(value)
    assert choice == KernelChoice(version, path)
    assert choice.label == (f"kernel-{version}" if version else f"kernel-{Path(path).name}")


def test_version_names_look_like_qemus():
    from harness.images import qemu
    for value in ("default", "7.2", "10.0", "6.12", "7.2.1", "./7.2", "v7.2", "7"):
        assert is_version_name(value) == qemu.is_version_name(value), value


@pytest.mark.parametrize("value", ["7.9", "6.1", "99.0"])
def test_an_unknown_version_names_the_value_and_the_known_ones(value):
    with pytest.raises(ConfigError) as err:
        resolve_kernel_choice(value)
    msg = str(err.value)
    assert f"--kernel {value!r}" in msg and "6.12, 7.2" in msg and f"./{value}" in msg
    assert err.value.key == "--kernel"
    with pytest.raises(ConfigError, match=f"kernel version '{value}' is not one the project builds"):
        kernel_source(value)


def test_every_known_version_has_its_own_source_package():
    assert DEFAULT_KERNEL_VERSION == "6.12"
    assert KERNEL_SOURCES["6.12"].package == "linux-source-6.12"
    assert KERNEL_SOURCES["6.12"].suite == "bookworm-backports"
    assert KERNEL_SOURCES["7.2"].package == "linux-source-7.2"
    assert KERNEL_SOURCES["7.2"].suite == "trixie-backports"
    assert len({(s.package, s.suite) for s in KERNEL_SOURCES.values()}) == len(KERNEL_SOURCES)
    for version, source in KERNEL_SOURCES.items():
        assert source.version == version
        assert source.fragment_name == f"kernel-{version}.fragment"


# ---------------------------------------------------------------------------- keys


def test_the_default_versions_key_is_the_recipe_it_always_was():
    """The 6.12 key holds exactly what it held before versions existed (so caches and
    CI caches keyed by it stay valid): package, suite, fragment, required list, recipe."""
    r = recipes_dir()
    before = content_key({"recipe": k.RECIPE_VERSION, "package": "linux-source-6.12", "suite": "bookworm-backports",
                          "fragment": (r / "kernel.fragment").read_bytes(),
                          "required": (r / "kernel.required").read_bytes()})
    assert recipe_key() == recipe_key(version="6.12") == recipe_key(version="default") == before


def test_keys_differ_by_version_and_by_patch():
    keys = {recipe_key(), recipe_key(version="7.2"), recipe_key(PATCH), recipe_key(PATCH, "7.2")}
    assert len(keys) == 4
    assert recipe_key(PATCH, "7.2") == recipe_key(PATCH, "7.2")  # stable
    with pytest.raises(ConfigError):
        recipe_key(version="7.9")
    with pytest.raises(ImageError, match="unknown kernel patch 'no-such'"):
        recipe_key("no-such", "7.2")


@pytest.fixture
def recipes(tmp_path, monkeypatch):
    """A writable copy of images/ that the kernel module reads instead."""
    copy = tmp_path / "images"
    shutil.copytree(Path(str(recipes_dir())), copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(k, "recipes_dir", lambda: copy)
    return copy


def test_a_versions_own_fragment_changes_only_its_key(recipes):
    default, newer = recipe_key(), recipe_key(version="7.2")
    (recipes / "kernel-7.2.fragment").write_text("CONFIG_SOMETHING_7_2=y\n")
    assert recipe_key() == default
    assert recipe_key(version="7.2") != newer
    (recipes / "kernel.fragment").write_text((recipes / "kernel.fragment").read_text() + "CONFIG_X=y\n")
    assert recipe_key() != default  # the common fragment is in every version's key


def test_renamed_and_gone_options_are_in_the_key(monkeypatch):
    plain = recipe_key(version="7.2")
    monkeypatch.setitem(KERNEL_SOURCES, "7.2", KernelSource("7.2", "linux-source-7.2", "trixie-backports",
                                                            renamed={"VDPA_SIM_BLOCK": "VDPA_SIM_BLK"}))
    assert recipe_key(version="7.2") != plain


def test_required_options_as_a_version_spells_them():
    source = KernelSource("9.9", "linux-source-9.9", "x", renamed={"B": "B2"}, gone={"C": "merged into A"})
    assert source.required(["A", "B", "C", "D"]) == ["A", "B2", "D"]
    assert KERNEL_SOURCES["7.2"].required(["INTEL_IOMMU", "IOMMUFD"]) == ["INTEL_IOMMU", "IOMMUFD"]


# ---------------------------------------------------------------------------- planted-bug patches


def test_a_patch_has_a_file_per_version_when_the_source_differs():
    assert PATCH in kernel_patches()
    assert all("@" not in name for name in kernel_patches())  # NAME@VERSION is a variant, not a name
    assert patch_file_name(PATCH) == f"{PATCH}.patch"
    assert patch_file_name(PATCH, "6.12") == f"{PATCH}.patch"
    assert patch_file_name(PATCH, "7.2") == f"{PATCH}@7.2.patch"
    text = (Path(str(recipes_dir())) / "patches" / f"{PATCH}@7.2.patch").read_text()
    assert "iommu_pages_list_empty" in text and "PLANTED BUG" in text


def test_a_version_without_its_own_patch_file_uses_the_common_one(recipes):
    (recipes / "patches" / f"{PATCH}@7.2.patch").unlink()
    assert patch_file_name(PATCH, "7.2") == f"{PATCH}.patch"
    with_common = recipe_key(PATCH, "7.2")
    (recipes / "patches" / f"{PATCH}@7.2.patch").write_text("--- a/x\n+++ b/x\n")
    assert recipe_key(PATCH, "7.2") != with_common


# ---------------------------------------------------------------------------- release and cache


def test_kernel_release_reads_the_boot_header(tmp_path):
    assert kernel_release(fake_bzimage(tmp_path / "bz", "7.2.12")) == "7.2.12"
    (tmp_path / "elf").write_bytes(b"\x7fELF" + bytes(0x300))
    assert kernel_release(tmp_path / "elf") is None
    (tmp_path / "short").write_bytes(b"MZ")
    assert kernel_release(tmp_path / "short") is None
    assert kernel_release(tmp_path / "missing") is None
    data = bytearray(fake_bzimage(tmp_path / "nopointer").read_bytes())
    data[0x20E:0x210] = b"\0\0"
    (tmp_path / "nopointer").write_bytes(bytes(data))
    assert kernel_release(tmp_path / "nopointer") is None


def test_the_project_kernel_names_its_release():
    built = cached_kernel(ImageCache())
    if built is None:
        pytest.skip("the project's kernel is not built in the default cache")
    release = kernel_release(built.bzimage)
    assert release is not None and release.startswith("6.12."), release


def fake_entry(cache: ImageCache, version: str | None) -> Path:
    entry = cache.entry("kernel", recipe_key(version=version))
    entry.mkdir(parents=True)
    fake_bzimage(entry / "bzImage", "7.2.12")
    (entry / "config").write_text("CONFIG_INTEL_IOMMU=y\n")
    (entry / "manifest.json").write_text(json.dumps({"version": "7.2.12-1~bpo13+1", "kernel_version": "7.2"}))
    return entry


def test_resolving_a_version_finds_its_own_cache_entry(tmp_path):
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(ConfigError) as err:
        resolve_kernel_option("7.2", cache, build=False)
    assert "images build kernel --version 7.2" in str(err.value)
    entry = fake_entry(cache, "7.2")
    got = resolve_kernel_option("7.2", cache, build=False)
    assert got.bzimage == entry / "bzImage"
    assert "linux-source-7.2 7.2.12-1~bpo13+1" in got.origin
    assert cached_kernel(cache) is None  # the default version is another entry
    user = resolve_kernel_option(str(entry / "bzImage"), cache, build=False)
    assert user.origin == "user" and user.bzimage == entry / "bzImage"


# ---------------------------------------------------------------------------- the build steps


def test_the_build_merges_the_versions_fragment_last_and_checks_its_spelling(recipes, tmp_path, monkeypatch):
    """_configure with every external step faked: the fragments are merged common
    first, then images/kernel-<version>.fragment; a renamed required option is
    checked under its new name and a gone one not at all (both written to the log);
    a required option missing from the final .config fails naming it."""
    (recipes / "kernel.required").write_text("A\nB\nC\n")
    (recipes / "kernel-9.9.fragment").write_text("CONFIG_B2=y\n")
    source = KernelSource("9.9", "linux-source-9.9", "x", renamed={"B": "B2"}, gone={"C": "merged into A"})
    monkeypatch.setitem(KERNEL_SOURCES, "9.9", source)
    steps: list[tuple[str, list[str]]] = []
    final_config = {"text": "CONFIG_A=y\nCONFIG_B2=y\n"}

    def fake_step(what, argv, *, log, cwd=None):
        argv = [str(a) for a in argv]
        steps.append((what, argv))
        if what == "unpack .deb":
            (Path(argv[-1]) / "usr" / "src").mkdir(parents=True)
            (Path(argv[-1]) / "usr" / "src" / "linux-source-9.9.tar.xz").write_bytes(b"")
        elif what == "unpack kernel source":
            (Path(argv[-1]) / "linux-source-9.9").mkdir()
        elif what == "make olddefconfig":
            (Path(argv[2]) / ".config").write_text(final_config["text"])

    monkeypatch.setattr(k, "run_step", fake_step)
    build, log = tmp_path / "build", tmp_path / "build.log"
    build.mkdir()
    log.write_text("")
    src = k._configure(build, tmp_path / "x.deb", log, None, source)
    assert src == build / "linux-source-9.9"
    merge = next(argv for what, argv in steps if what.startswith("merge fragment"))
    assert [Path(a).name for a in merge[-2:]] == ["kernel.fragment", "kernel-9.9.fragment"]
    text = log.read_text()
    assert "CONFIG_B is CONFIG_B2 in Linux 9.9" in text and "CONFIG_C is not checked in Linux 9.9: merged into A" in text

    final_config["text"] = "CONFIG_A=y\nCONFIG_B=y\n"  # the old name only: the renamed option is missing
    shutil.rmtree(src)
    steps.clear()
    with pytest.raises(KernelConfigError) as err:
        k._configure(build, tmp_path / "x.deb", log, None, source)
    assert err.value.missing == ["B2"] and "Linux 9.9" in str(err.value)


def test_the_default_build_merges_only_the_common_fragment(recipes, tmp_path, monkeypatch):
    steps: list[list[str]] = []

    def fake_step(what, argv, *, log, cwd=None):
        argv = [str(a) for a in argv]
        steps.append(argv)
        if what == "unpack .deb":
            (Path(argv[-1]) / "usr" / "src").mkdir(parents=True)
            (Path(argv[-1]) / "usr" / "src" / "linux-source-6.12.tar.xz").write_bytes(b"")
        elif what == "unpack kernel source":
            (Path(argv[-1]) / "linux-source-6.12").mkdir()
        elif what.startswith("apply "):
            assert Path(argv[-1]).name == f"{PATCH}.patch"
        elif what == "make olddefconfig":
            (Path(argv[2]) / ".config").write_text("".join(f"CONFIG_{n}=y\n" for n in k.required_options()))

    monkeypatch.setattr(k, "run_step", fake_step)
    (tmp_path / "b").mkdir()
    k._configure(tmp_path / "b", tmp_path / "x.deb", tmp_path / "log", PATCH, kernel_source())
    merge = next(argv for argv in steps if "merge_config.sh" in argv[0])
    assert Path(merge[-1]).name == "kernel.fragment" and not any("kernel-6.12" in a for a in merge)
    assert any(Path(a[-1]).name == f"{PATCH}.patch" for a in steps if a[0] == "patch")


# ---------------------------------------------------------------------------- the command line


def test_cli_refuses_an_unknown_kernel_version():
    line = one_line_exit_2(run_cli("run", "configs/intel-iommu-nvme.toml", "--kernel", "7.9"), "--kernel '7.9'",
                           "6.12, 7.2")
    assert "./7.9" in line


def test_cli_refuses_an_unknown_kernel_version_from_the_environment():
    one_line_exit_2(run_cli("run", "configs/intel-iommu-nvme.toml", env={"DMA_HARNESS_KERNEL": "8.1"}),
                    "DMA_HARNESS_KERNEL '8.1'", "6.12, 7.2")


@pytest.mark.parametrize("args, needles", [
    (("images", "build", "kernel", "--version", "7.9"), ("--version '7.9'", "6.12, 7.2")),
    (("images", "build", "kernel", "--version", "./x"), ("--version './x'", "not a kernel version name")),
    (("images", "build", "kernel", "--version", "7.2", "--patch", "no-such"), ("unknown kernel patch 'no-such'",)),
])
def test_images_build_kernel_refuses_bad_versions(tmp_path, args, needles):
    one_line_exit_2(run_cli(*args, "--cache", str(tmp_path / "cache")), *needles)
    assert not (tmp_path / "cache" / "kernel").exists()  # nothing built or downloaded


def test_images_show_lists_the_other_versions(tmp_path):
    proc = run_cli("images", "show", "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert (f"kernel 7.2 (linux-source-7.2) {tmp_path / 'cache' / 'kernel' / recipe_key(version='7.2')}  "
            "[not built: images build kernel --version 7.2]") in proc.stdout


# ---------------------------------------------------------------------------- Linux 7.2's trace events


CTX = "  kworker/0:1H-45      [000] .....    12.345678: "


def test_linux_7_2s_dma_map_phys_events_are_page_maps_for_the_checkers():
    """Linux 7.2 traces dma_map_page_attrs/dma_map_resource as dma:dma_map_phys and
    their unmaps as dma:dma_unmap_phys (same bodies as 6.12's dma_map/dma_unmap
    classes); both are enabled and parse as the page events the checkers read."""
    from harness.trace.guest import (GUEST_TRACE_EVENTS, GuestDmaMap, GuestDmaMapPage, GuestDmaUnmap,
                                     GuestDmaUnmapPage, parse_guest_line)
    assert {"dma:dma_map_phys", "dma:dma_unmap_phys", "dma:dma_map_page", "dma:dma_unmap_page"} <= set(
        GUEST_TRACE_EVENTS)
    m = parse_guest_line(CTX + "dma_map_phys: 0000:00:03.0 dir=FROM_DEVICE dma_addr=fffff000 size=4096 "
                               "phys_addr=1234000 attrs=", 1)
    assert isinstance(m, GuestDmaMapPage) and isinstance(m, GuestDmaMap) and m.NAME == "dma_map_phys"
    assert (m.segments, m.phys, m.dir, m.sid) == (((0xfffff000, 4096),), (0x1234000,), "FROM_DEVICE", 0x18)
    u = parse_guest_line(CTX + "dma_unmap_phys: 0000:00:03.0 dir=FROM_DEVICE dma_addr=fffff000 size=4096 "
                               "attrs=MMIO", 2)
    assert isinstance(u, GuestDmaUnmapPage) and isinstance(u, GuestDmaUnmap) and u.attrs == "MMIO"
    assert u.segments == ((0xfffff000, 4096),)


# ---------------------------------------------------------------------------- pytest: --dma-kernel


MATRIX_CONFTEST = """
    import harness.pytest_plugin as plugin

    MADE = []

    class FakeHarness:
        def __init__(self, options):
            self.options = options
            MADE.append((options.qemu, options.kernel))
        def images(self, spec=None):
            return None
        def close(self):
            pass

    plugin.Harness = FakeHarness
"""

MATRIX_TESTS = """
    from conftest import MADE

    def test_kernel(dma_harness, request):
        print(f"RAN {request.node.name} qemu={dma_harness.options.qemu} kernel={dma_harness.options.kernel}")

    def test_made():
        print(f"MADE {sorted(MADE, key=str)}")
"""


def _matrix_run(pytester, *args: str):
    pytester.makeconftest(MATRIX_CONFTEST)
    pytester.makepyfile(test_inner=MATRIX_TESTS)
    return pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", "-p", "no:randomly", *args)


def _ran(result) -> list[str]:
    return sorted(line.split("RAN ", 1)[1] for line in result.outlines if "RAN " in line)


def test_dma_kernel_twice_runs_each_test_once_per_kernel(pytester):
    result = _matrix_run(pytester, "--dma-kernel", "6.12", "--dma-kernel", "7.2")
    result.assert_outcomes(passed=3)
    assert _ran(result) == ["test_kernel[kernel-6.12] qemu=None kernel=6.12",
                            "test_kernel[kernel-7.2] qemu=None kernel=7.2"]
    assert any("MADE [(None, '6.12'), (None, '7.2')]" in line for line in result.outlines)  # one Harness a column


def test_dma_kernel_and_dma_qemu_make_a_matrix(pytester):
    result = _matrix_run(pytester, "--dma-qemu", "/q/a", "--dma-qemu", "/q/b", "--dma-kernel", "6.12",
                         "--dma-kernel", "7.2")
    result.assert_outcomes(passed=5)
    ran = _ran(result)
    assert len(ran) == 4 and len({line.split()[0] for line in ran}) == 4
    for line in ran:  # each test sees its own column's QEMU and kernel
        test_id, qemu, kernel = line.split()
        assert f"qemu-{qemu.split('=')[1]}" in test_id and f"kernel-{kernel.split('=')[1]}" in test_id


def test_one_dma_kernel_keeps_the_test_ids(pytester):
    result = _matrix_run(pytester, "--dma-kernel", "7.2")
    result.assert_outcomes(passed=2)
    assert _ran(result) == ["test_kernel qemu=None kernel=7.2"]


def test_dma_kernel_with_an_unknown_version_is_a_usage_error(pytester):
    result = _matrix_run(pytester, "--dma-kernel", "6.12", "--dma-kernel", "7.9")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert any("--dma-kernel '7.9' is not a kernel version the project builds" in line for line in result.errlines)


# ---------------------------------------------------------------------------- the verdict's versions


def test_the_verdict_names_a_built_kernels_version_and_how_to_run_it_again():
    from harness.finish import _kernel_version_name, versions_comment
    assert _kernel_version_name({"kernel_version": "7.2", "package": "linux-source-7.2"}) == "7.2"
    assert _kernel_version_name({"package": "linux-source-6.12"}) == "6.12"  # manifests written before versions
    assert _kernel_version_name({"kernel_version": "7.2", "patch": PATCH}) is None  # a planted-bug variant
    assert _kernel_version_name({"package": "linux-source-5.10"}) is None and _kernel_version_name({}) is None
    newer = versions_comment({"kernel": "7.2.12", "kernel.key": "k", "kernel.name": "7.2", "qemu.path": "/q"})
    assert "--kernel 7.2" in newer and "kernel 7.2.12" in newer
    assert "--kernel" not in versions_comment({"kernel": "6.12.95", "kernel.name": "6.12", "qemu.path": "/q"})


def test_doctor_never_builds_a_named_kernel_version(tmp_path):
    proc = run_cli("doctor", "--kernel", "7.2", "--cache", str(tmp_path / "cache"))
    assert f"kernel: not built yet ({tmp_path / 'cache' / 'kernel' / recipe_key(version='7.2')}); build it with: " \
           "python -m harness images build kernel --version 7.2" in proc.stdout, (proc.stdout, proc.stderr)
    assert not (tmp_path / "cache" / "kernel" / recipe_key(version="7.2")).exists()
