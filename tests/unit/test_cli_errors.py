"""Bad input: one clear line naming the offending key or value, exit status 2, no
traceback. (The guest-that-never-comes-up case boots a VM: tests/vm/test_cli_vm.py.)"""

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


def test_kernel_lacking_a_required_option(tmp_path):
    (tmp_path / "bzImage").write_bytes(b"\0" * 1024)
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
