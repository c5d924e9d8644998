"""Basic guest ops: ping, sysinfo, exec, poweroff, panic."""

from __future__ import annotations

import os
TYPE_CHECKING = False  # typing costs ~0.2 s of a TCG vCPU on the boot's critical path
if TYPE_CHECKING:
    from typing import Any

from guest_agent.protocol import op


def uptime() -> float:
    with open("/proc/uptime") as fh:
        return float(fh.read().split()[0])


@op("ping")
def ping() -> dict[str, Any]:
    return {"uptime": uptime(), "pid": os.getpid()}


@op("sysinfo")
def sysinfo() -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            with open(path) as fh:
                return fh.read().strip()
        except OSError:
            return ""

    groups: dict[str, list[str]] = {}
    base = "/sys/kernel/iommu_groups"
    if os.path.isdir(base):
        for g in sorted(os.listdir(base), key=int):
            groups[g] = sorted(os.listdir(f"{base}/{g}/devices"))
    return {
        "kernel": os.uname().release,
        "cmdline": read("/proc/cmdline"),
        "iommus": sorted(os.listdir("/sys/class/iommu")) if os.path.isdir("/sys/class/iommu") else [],
        "iommu_groups": groups,
        "nvme": sorted(d for d in os.listdir("/sys/block") if d.startswith("nvme")),
        "uptime": uptime(),
    }


@op("exec")
def run(argv: list[str], timeout: float = 60.0, input: str | None = None) -> dict[str, Any]:
    import subprocess  # imported on first use: not on the boot's critical path
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    return {"argv": argv, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


@op("poweroff")
def poweroff() -> dict[str, Any]:
    return {"then": "poweroff"}


def power_off() -> None:
    import ctypes
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF


@op("panic")
def panic() -> dict[str, Any]:
    """Crash the guest kernel through sysrq (for tests of panic handling)."""
    with open("/proc/sysrq-trigger", "w") as fh:
        fh.write("c")
    return {}
