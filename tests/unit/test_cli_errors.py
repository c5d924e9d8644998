"""Bad input: one clear line naming the offending key or value, exit status 2, no
traceback. (The guest-that-never-comes-up case boots a VM: tests/vm/test_cli_vm.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.images.kernel import required_options

ROOT = Path(__file__).resolve().parents[2]
GOOD = (ROOT / "configs" / "intel-iommu-nvme.toml").read_text()


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.replace('name = "intel-iommu-nvme"\n', ""), ["missing required key 'name'"]),
    (lambda t: t.replace("memory_mib = 1024", "memory_mib = \"lots\""), ["machine.memory_mib", "'lots'"]),
    (lambda t: t.replace("memory_mib = 1024", "memroy_mib = 1024"), ["unknown key 'memroy_mib'"]),
    (lambda t: t.replace('kind = "nvme"\n', 'kind = "nvme-oops"\n'), ["unknown device kind 'nvme-oops'"]),
    (lambda t: t.replace("caching_mode = true", "caching_mode = 1"), ["devices[0].caching_mode", "bool"]),
    (lambda t: t.replace("[workload]", "[workload_typo]"), ["workload_typo"]),
])
def test_bad_config(tmp_path, edit, needles):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(edit(GOOD))
    assert_one_line_error(run_cli("run", str(cfg)), str(cfg), *needles)


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("run", str(tmp_path / "nope.toml")), "nope.toml", "cannot read config")


def test_missing_qemu_says_how_to_install(tmp_path):
    proc = run_cli("run", "configs/intel-iommu-nvme.toml", "--qemu", "/nonexistent/qemu-system-x86_64",
                   "--cache", str(tmp_path))
    assert_one_line_error(proc, "/nonexistent/qemu-system-x86_64", "apt-get install qemu-system-x86")


def fake_bzimage(path: Path) -> Path:
    """A file with the x86 boot header's "HdrS" magic at 0x202: a bzImage as far as
    the harness checks before QEMU runs."""
    data = bytearray(4096)
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


def test_kernel_lacking_a_required_option(tmp_path):
    fake_bzimage(tmp_path / "bzImage")
    (tmp_path / "config").write_text("\n".join(f"CONFIG_{o}=y" for o in required_options()
                                               if o not in ("INTEL_IOMMU", "VDPA_SIM")) + "\n")
    # The kernel is refused before QEMU runs: any executable stands in for it here.
    proc = run_cli("run", "configs/intel-iommu-nvme.toml", "--kernel", str(tmp_path / "bzImage"),
                   "--cache", str(tmp_path / "cache"), "--accel", "tcg", "--qemu", "/bin/true")
    # Only what this scenario's machine needs is asked for: VDPA_SIM is not.
    assert_one_line_error(proc, "CONFIG_INTEL_IOMMU (needed by intel-iommu)")
    assert "VDPA_SIM" not in proc.stderr


def test_missing_trace_for_check(tmp_path):
    assert_one_line_error(run_cli("check", str(tmp_path / "trace.log")), "does not exist")


def test_kernel_that_is_not_a_bzimage(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 1024)
    proc = run_cli("run", "configs/intel-iommu-nvme.toml", "--kernel", str(tmp_path / "vmlinux"),
                   "--cache", str(tmp_path / "cache"), "--accel", "tcg", "--qemu", "/bin/true")
    assert_one_line_error(proc, str(tmp_path / "vmlinux"), "is not an x86 bzImage")
    assert not (tmp_path / "cache").exists()


def test_qemu_that_is_not_executable(tmp_path):
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\n")
    qemu.chmod(0o644)
    proc = run_cli("run", "configs/intel-iommu-nvme.toml", "--qemu", str(qemu), "--cache", str(tmp_path / "c"))
    assert_one_line_error(proc, str(qemu), "is not executable")


@pytest.mark.parametrize("option", ["--cache", "--artifacts"])
def test_folder_option_pointing_at_a_file(tmp_path, option):
    (tmp_path / "f").write_text("")
    args = {"--cache": str(tmp_path / "c"), "--artifacts": str(tmp_path / "a"), option: str(tmp_path / "f")}
    proc = run_cli("run", "configs/intel-iommu-nvme.toml", "--qemu", "/bin/true", "--accel", "tcg",
                   "--kernel", str(fake_bzimage(tmp_path / "bzImage")), *(x for kv in args.items() for x in kv))
    assert_one_line_error(proc, option, str(tmp_path / "f"), "is a regular file, not a folder")


def test_bad_accel_environment_variable(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "configs/intel-iommu-nvme.toml",
                           "--cache", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DMA_HARNESS_ACCEL": "bogus"})
    assert_one_line_error(proc, "DMA_HARNESS_ACCEL", "'bogus'", "auto, tcg, kvm")


def test_config_that_is_not_utf8(tmp_path):
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes(GOOD.replace("O_DIRECT", "O_DIRECT \u00e9").encode("latin-1"))
    assert_one_line_error(run_cli("run", str(cfg)), str(cfg), "not UTF-8")


def test_check_a_folder_without_trace(tmp_path):
    assert_one_line_error(run_cli("check", str(tmp_path)), str(tmp_path), "without trace.log")
