"""``python -m harness bench boot``: boot time to the guest agent, against a floor.

Each round boots the machine twice with the same kernel and the same QEMU argv but
for ``-initrd``: first with the busybox floor (harness.images.busybox: ``/init``
prints a marker and powers off), then with the harness's root filesystem (time to
the guest agent's hello on virtio-serial). The two alternate so that a load change
on a shared host hits both alike. The overhead is the median harness boot over the
median floor boot.

Each boot's time splits at the guest kernel's start: the guest's uptime at the
marker or the agent's hello is kernel + userspace; the rest (QEMU start, firmware,
loading kernel and initrd, decompression) came before it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import GuestBootTimeout, HarnessError, QEMUExited
from harness.images.busybox import ensure_floor_initrd, marker_uptime
from harness.session import Harness
from harness.vm.machine import VM
from harness.vm.spec import MachineSpec

TARGET_MEDIAN_SECONDS = 4.0
TARGET_OVERHEAD = 1.4


@dataclass(frozen=True)
class BootSummary:
    """Median, min and max of ``n`` boot times (seconds)."""

    median: float
    min: float
    max: float
    n: int

    def format(self) -> str:
        return f"median {self.median:.2f}s, min {self.min:.2f}s, max {self.max:.2f}s"


def summarize(times: Sequence[float]) -> BootSummary:
    """Summary of boot times in seconds. Raises ValueError for no times or a time <= 0."""
    if not times:
        raise ValueError("no boot times")
    if any(t <= 0 for t in times):
        raise ValueError(f"boot times must be > 0 s: {list(times)}")
    return BootSummary(statistics.median(times), min(times), max(times), len(times))


def overhead_ratio(harness: BootSummary, floor: BootSummary) -> float:
    """Median harness boot / median floor boot (``1.0`` = no cost over the floor)."""
    return harness.median / floor.median


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages of ``/proc/loadavg`` text.
    Raises ValueError on anything else."""
    fields = text.split()
    if len(fields) < 3:
        raise ValueError(f"not /proc/loadavg: {text!r}")
    return float(fields[0]), float(fields[1]), float(fields[2])


def host_load() -> str:
    """``load 1.23 2.00 2.50 on 2 CPUs`` (``load unknown`` without /proc/loadavg)."""
    try:
        one, five, fifteen = parse_loadavg(Path("/proc/loadavg").read_text())
    except (OSError, ValueError):
        return "load unknown"
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def verdict_line(harness: BootSummary, floor: BootSummary | None) -> str:
    """Whether the targets (median <= 4.0 s, overhead <= 1.4x) are met."""
    parts = [f"median {harness.median:.2f}s {'<=' if harness.median <= TARGET_MEDIAN_SECONDS else '>'} "
             f"{TARGET_MEDIAN_SECONDS:.1f}s"]
    if floor is not None:
        ratio = overhead_ratio(harness, floor)
        parts.append(f"overhead {ratio:.2f}x {'<=' if ratio <= TARGET_OVERHEAD else '>'} {TARGET_OVERHEAD:.1f}x")
    return "targets: " + ", ".join(parts)


def floor_boot(h: Harness, spec: MachineSpec, initrd: Path, *, name: str,
               timeout: float = 60.0) -> tuple[float, float]:
    """Boot ``spec`` with the floor ``initrd``; return (seconds from QEMU start to
    the marker on the console, the guest's uptime in the marker).

    Raises GuestBootTimeout (no marker within ``timeout`` s, or QEMU exited first).
    """
    vm = h.vm(spec.replace(initrd=str(initrd)), name=name, trace=False)
    try:
        vm.launch()
        started = vm._started  # the instant VM.boot_seconds counts from (QEMU start)
        deadline = started + timeout
        while True:
            try:
                text = vm.console_log.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            up = marker_uptime(text)
            if up is not None:
                return time.monotonic() - started, up
            try:
                vm.check_alive()
            except QEMUExited as exc:
                raise GuestBootTimeout(f"{name}: QEMU exited before the floor marker",
                                       console_tail=vm.console_tail(25), exitcode=exc.exitcode) from None
            if time.monotonic() > deadline:
                raise GuestBootTimeout(f"{name}: no floor marker within {timeout:g}s",
                                       console_tail=vm.console_tail(25))
            time.sleep(0.01)
    finally:
        vm.close()


def run(h: Harness, spec: MachineSpec, *, runs: int, trace: bool = False, floor: bool = True,
        out: Callable[[str], None] = print,
        per_boot: Callable[[int, VM], str] | None = None) -> tuple[BootSummary, BootSummary | None]:
    """Boot ``runs`` rounds (floor, then harness) and print each boot and the summary.

    ``per_boot(i, vm)`` adds text to the harness boot's line (round trips measured
    on the running VM). Returns the harness summary and the floor's (None without
    ``floor``). Raises HarnessError if ``runs`` < 1.
    """
    if runs < 1:
        raise HarnessError("--runs must be at least 1")
    floor_initrd = ensure_floor_initrd(h.cache) if floor else None
    out(f"host: {host_load()} (before)")
    out(f"boot path: {h.images(spec).describe(spec)}")
    if floor_initrd is not None:
        floor_spec = spec.replace(initrd=str(floor_initrd))
        out(f"floor boot path: {h.images(floor_spec).describe(floor_spec)}")
    times: list[float] = []
    floor_times: list[float] = []
    for i in range(runs):
        if floor_initrd is not None:
            seconds, up = floor_boot(h, spec, floor_initrd, name=f"floor{i}")
            floor_times.append(seconds)
            out(f"floor {i + 1}/{runs}: {seconds:.2f}s to the busybox marker "
                f"(guest uptime {up:.2f}s, so {seconds - up:.2f}s before the kernel ran)")
        with h.vm(spec, name=f"bench{i}", trace=trace) as vm:
            assert vm.boot_seconds is not None
            times.append(vm.boot_seconds)
            hello = vm.agent.hello or {}
            up = float(hello.get("uptime", 0.0))
            line = (f"boot {i + 1}/{runs}: {vm.boot_seconds:.2f}s to guest agent (guest uptime {up:.2f}s, "
                    f"so {vm.boot_seconds - up:.2f}s before the kernel ran)")
            if per_boot is not None:
                line += per_boot(i, vm)
            out(line)
    out(f"host: {host_load()} (after)")
    summary = summarize(times)
    out(f"boot time over {summary.n} boots (QEMU start -> guest agent answers): {summary.format()}")
    floor_summary = summarize(floor_times) if floor_times else None
    if floor_summary is not None:
        out(f"floor over {floor_summary.n} boots (same kernel and machine, busybox initramfs: QEMU start -> "
            f"marker): {floor_summary.format()}")
        out(f"overhead over the floor: {overhead_ratio(summary, floor_summary):.2f}x "
            "(median boot / median floor)")
    out(verdict_line(summary, floor_summary))
    return summary, floor_summary


# ---- bench boot --snapshot (harness/vm/snapshot.py) ---------------------------

TARGET_RESTORE_SECONDS = 1.0


def restore_target_line(restore: BootSummary) -> str:
    """Whether the restore target (median QEMU start -> agent answers <= 1.0 s) is met."""
    ok = restore.median <= TARGET_RESTORE_SECONDS
    return f"target: restore median {restore.median:.2f}s {'<=' if ok else '>'} {TARGET_RESTORE_SECONDS:.1f}s"


def run_snapshot(h: Harness, spec: MachineSpec, *, runs: int, trace: bool = True,
                 out: Callable[[str], None] = print) -> BootSummary:
    """Save ``spec``'s guest once, restore it ``runs`` times and print each
    restore (QEMU start -> the guest agent answers a ping on the new channel),
    the time the guest then took to find the hot-plugged devices, the median and
    the target line. Returns the restore summary.

    Raises HarnessError if ``runs`` < 1, SnapshotUnsupported (its one-line
    reason) if ``spec`` cannot be snapshotted, and what a cold boot raises.
    """
    from harness.vm.snapshot import RestoredVM, SnapshotStore, snapshot_plan
    if runs < 1:
        raise HarnessError("--runs must be at least 1")
    snapshot_plan(spec)  # refuse an unsnapshottable machine before booting anything
    out(f"host: {host_load()} (before)")
    restores: list[float] = []
    with SnapshotStore(h) as store:
        snap = store.snapshot(spec, trace=trace)
        plugged = ", ".join(f"{d.kind} {d.id}" for d, _ in snap.plan.hotplug) or "none"
        out(f"snapshot {snap.key}: cold boot {snap.boot_seconds:.2f}s, saved in {snap.save_seconds:.2f}s "
            f"({snap.size / (1 << 20):.0f} MiB); hot-plugged after each restore: {plugged}")
        for i in range(runs):
            vm = store.vm(spec, name=f"restore{i}", trace=trace)
            assert isinstance(vm, RestoredVM)
            with vm:
                assert vm.restore_seconds is not None and vm.hotplug_seconds is not None
                restores.append(vm.restore_seconds)
                line = f"restore {i + 1}/{runs}: {vm.restore_seconds:.2f}s to guest agent"
                if vm.hotplugged:
                    line += f", then {vm.hotplug_seconds:.2f}s until the guest found {', '.join(vm.hotplugged)}"
                out(line)
    out(f"host: {host_load()} (after)")
    summary = summarize(restores)
    out(f"restore time over {summary.n} restores (QEMU start -> guest agent answers): {summary.format()}")
    out(restore_target_line(summary))
    return summary
