"""Soak: many consecutive VMs, some of them broken on purpose, and after each one
a look for what it may have left behind.

``python -m harness soak --vms N --faults K --seed S`` boots N VMs of the default
machine one after the other. Each runs a small O_DIRECT workload (256 KiB in
4 KiB chunks through the guest agent, repeated until it is interrupted or has
run :data:`ROUNDS` times). K of them, chosen with ``random.Random(S)``, get a
fault from :data:`FAULTS` while an op is in flight; the others end the way a
``run`` does (:func:`harness.finish.finish_vm`: collect both traces, check them).

A fault must be reported as its own exception (:data:`EXPECTED`) within
:data:`SLACK` seconds of its deadline: the moment of the fault, or for a stopped
QEMU the op's timeout after it. After each VM is closed the soak looks for leaks:

- QEMU processes that are children of this process or whose argv names one of
  its run directories (a zombie counts: it was never reaped);
- run directories of this process (``owner.pid``) or of its VMs, still there;
- file descriptors of this process (``/proc/self/fd``) more than before the VM;
- new entries in the image cache (``kernel``, ``rootfs``, ``initrd``, ``ssh``),
  except those another process was seen building (a ``KEY.build`` or
  ``KEY.tmp-PID`` sibling of another PID).

Exit status: 0 when there were no leaks, no late (or missing) reports and no
unexpected outcome (a faulted VM raising something else, a clean VM failing);
else 1.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp.util import get_or_create_event_loop

from harness.errors import (
    AgentError,
    GuestHung,
    GuestPanicked,
    HarnessError,
    QEMUExited,
    VMError,
)
from harness.finish import finish_vm
from harness.session import Harness
from harness.vm.machine import VM, owned_run_dirs
from harness.vm.spec import MachineSpec, default_machine
from harness.workloads import NvmePattern, WorkloadFailed

FAULTS = ("qemu-sigkill", "qemu-sigstop", "guest-panic", "agent-closed")
"""The faults a VM may get: QEMU SIGKILLed or SIGSTOPped during an op, the guest
kernel panicking (the agent's ``panic`` op), the host side of the agent channel
closed during an op."""
EXPECTED: dict[str, type[VMError]] = {"qemu-sigkill": QEMUExited, "qemu-sigstop": GuestHung,
                                      "guest-panic": GuestPanicked, "agent-closed": AgentError}
WORKLOAD = NvmePattern(length=256 << 10, chunk=4 << 10, rounds=1)
ROUNDS = 20
"""Workload rounds a faulted VM runs at most while waiting for its fault to be reported."""
OP_TIMEOUT = 3.0
"""Seconds an op may take in a VM that gets a fault (a stopped QEMU is reported after it)."""
FAULT_DELAY = 0.15
"""Seconds into an op at which the fault is injected (an op takes about 0.5 s under TCG)."""
SLACK = 5.0
"""Seconds past its deadline a fault may take to be reported."""
CACHE_KINDS = ("kernel", "rootfs", "initrd", "ssh")
_BUILDING = re.compile(r"^(?P<key>.+?)\.(?:build|tmp-(?P<pid>\d+))$")


@dataclass
class VMOutcome:
    """One VM of the soak: its fault (None: none), what happened and what it left."""

    index: int
    name: str
    fault: str | None
    boot_seconds: float | None = None
    outcome: str = ""
    expected: bool = True
    reported_after: float | None = None
    """Seconds from the fault to its report (None: no fault, or never reported)."""
    late_by: float | None = None
    """Seconds past deadline + SLACK (set only when the report was late or missing)."""
    leaks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self, total: int) -> str:
        fault = f"fault {self.fault}" if self.fault else "no fault"
        boot = f"boot {self.boot_seconds:.1f}s" if self.boot_seconds is not None else "no boot"
        text = f"vm {self.index + 1}/{total} {self.name}: {boot}, {fault} -> {self.outcome}"
        if self.reported_after is not None:
            text += f", reported {self.reported_after:.2f}s after the fault"
        if self.late_by is not None:
            text += f", LATE by {self.late_by:.2f}s"
        if not self.expected:
            text += ", UNEXPECTED"
        text += f"; {self.seconds:.1f}s; leaks: {', '.join(self.leaks) if self.leaks else 'none'}"
        return text


@dataclass
class SoakReport:
    seed: int
    vms: list[VMOutcome]
    seconds: float
    others_building: set[str]

    @property
    def leaks(self) -> list[str]:
        return [f"{vm.name}: {leak}" for vm in self.vms for leak in vm.leaks]

    @property
    def late(self) -> list[VMOutcome]:
        return [vm for vm in self.vms if vm.late_by is not None]

    @property
    def unexpected(self) -> list[VMOutcome]:
        return [vm for vm in self.vms if not vm.expected]

    @property
    def ok(self) -> bool:
        return not self.leaks and not self.late and not self.unexpected

    def summary(self) -> str:
        faults = Counter(vm.fault for vm in self.vms if vm.fault)
        lines = [f"soak: {len(self.vms)} VMs in {self.seconds:.1f}s (seed {self.seed})",
                 f"faults: {sum(faults.values())}"
                 + (" (" + ", ".join(f"{k} {faults[k]}" for k in FAULTS if faults[k]) + ")" if faults else ""),
                 f"leaks: {len(self.leaks)}" + "".join(f"\n  {leak}" for leak in self.leaks),
                 f"late reports: {len(self.late)}" + "".join(
                     f"\n  {vm.name}: {vm.fault} {vm.outcome}, late by {vm.late_by:.2f}s" for vm in self.late),
                 f"unexpected outcomes: {len(self.unexpected)}" + "".join(
                     f"\n  {vm.name}: {vm.fault or 'no fault'} -> {vm.outcome}" for vm in self.unexpected)]
        if self.others_building:
            lines.append("not counted (built by another process meanwhile): "
                         + ", ".join(sorted(self.others_building)))
        return "\n".join(lines)


def plan(vms: int, faults: int, seed: int) -> list[str | None]:
    """Which VM gets which fault (None: none), from ``random.Random(seed)``.

    Raises:
        HarnessError: ``vms`` < 1, or ``faults`` not in 0..vms.
    """
    if vms < 1:
        raise HarnessError(f"--vms must be at least 1, not {vms}")
    if not 0 <= faults <= vms:
        raise HarnessError(f"--faults must be between 0 and --vms ({vms}), not {faults}")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(vms), faults))
    kinds: list[str | None] = [None] * vms
    for i in chosen:
        kinds[i] = rng.choice(FAULTS)
    return kinds


# ---------------------------------------------------------------- what a VM may leave
def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the descriptor listdir itself used
    return fds


def _qemu_processes(run_dirs: Sequence[Path]) -> list[str]:
    """Running or zombie QEMU processes of ours: children, or naming one of ``run_dirs``."""
    me = os.getpid()
    markers = [str(d).encode() for d in run_dirs]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        ours = int(ppid) == me and comm.startswith("qemu-system")
        if ours or (b"qemu-system" in cmdline and any(m in cmdline for m in markers)):
            found.append(f"QEMU process {entry.name} ({'zombie' if state == 'Z' else 'state ' + state})")
    return found


class CacheWatch:
    """The image cache's entries (``kind/name``), and the keys other processes build."""

    def __init__(self, root: Path):
        self.root = root
        self.others_building: set[str] = set()
        self.before = self.snapshot()

    def snapshot(self) -> set[str]:
        names = set()
        for kind in CACHE_KINDS:
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.name.endswith(".lock"):
                    continue
                names.add(f"{kind}/{p.name}")
                m = _BUILDING.match(p.name)
                if m and (m.group("pid") is None or int(m.group("pid")) != os.getpid()):
                    self.others_building.add(f"{kind}/{m.group('key')}")
        return names

    def new_entries(self) -> list[str]:
        now = self.snapshot()
        new = now - self.before
        self.before = now
        mine = []
        for name in sorted(new):
            kind, base = name.split("/", 1)
            m = _BUILDING.match(base)
            key = m.group("key") if m else base.removesuffix(".log")
            if f"{kind}/{key}" in self.others_building and not (m and m.group("pid") == str(os.getpid())):
                continue
            mine.append(name)
        return mine


# ---------------------------------------------------------------- one VM
class _Injector:
    """Injects ``fault`` into ``vm`` FAULT_DELAY seconds after :meth:`arm` (from a thread)."""

    def __init__(self, vm: VM, fault: str):
        self.vm = vm
        self.fault = fault
        self.at: float | None = None
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(FAULT_DELAY, self._fire)
            self._timer.start()

    def _fire(self) -> None:
        pid = self.vm.pid
        if self.fault == "agent-closed":
            self.vm.agent.close()
        elif pid is not None and self.vm.exitcode is None:
            os.kill(pid, signal.SIGKILL if self.fault == "qemu-sigkill" else signal.SIGSTOP)
        self.at = time.monotonic()

    def join(self) -> None:
        if self._timer is not None:
            self._timer.join()


def _run_faulted(vm: VM, fault: str, out: VMOutcome) -> None:
    """Inject ``fault`` during an op; record how and when it was reported."""
    deadline_extra = OP_TIMEOUT if fault == "qemu-sigstop" else 0.0
    injector = _Injector(vm, fault)
    error: BaseException | None = None
    try:
        if fault == "guest-panic":
            injector.at = time.monotonic()
            vm.agent.call("panic", timeout=OP_TIMEOUT + 30)
        else:
            workload = NvmePattern(length=WORKLOAD.length, chunk=WORKLOAD.chunk, rounds=1, timeout=OP_TIMEOUT)
            for _ in range(ROUNDS):
                injector.arm()
                workload.run(vm.agent)
    except (VMError, WorkloadFailed) as exc:
        error = exc
    reported = time.monotonic()
    injector.join()
    if error is None:
        out.outcome, out.expected = "no error reported", False
        out.late_by = float("inf")
        return
    out.outcome = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    out.expected = isinstance(error, EXPECTED[fault])
    if injector.at is None:  # reported before the fault was injected
        out.expected = False
        return
    out.reported_after = reported - injector.at
    late = reported - (injector.at + deadline_extra + SLACK)
    if late > 0:
        out.late_by = late


def _run_clean(vm: VM, out: VMOutcome) -> None:
    try:
        failures: list[str] = []
        try:
            WORKLOAD.run(vm.agent)
        except WorkloadFailed as exc:
            failures.append(str(exc))
        verdict = finish_vm(vm, failures=failures).verdict
    except VMError as exc:
        out.outcome, out.expected = f"{type(exc).__name__}: {str(exc).splitlines()[0]}", False
        return
    out.outcome = f"verdict {verdict.status}"
    out.expected = verdict.ok


def soak_one(harness: Harness, spec: MachineSpec, index: int, fault: str | None, cache: CacheWatch) -> VMOutcome:
    """Boot VM ``index``, run the workload (with ``fault``), close it, look for leaks."""
    started = time.monotonic()
    out = VMOutcome(index, f"soak{index}", fault)
    fds_before = _open_fds()
    run_dirs: list[Path] = []
    vm = harness.vm(spec, name=out.name)
    try:
        vm.launch()
        if vm.run_dir is not None:
            run_dirs.append(vm.run_dir)
        out.boot_seconds = vm.wait_ready()
        if fault is None:
            _run_clean(vm, out)
        else:
            _run_faulted(vm, fault, out)
    except VMError as exc:  # the VM did not come up
        out.outcome, out.expected = f"{type(exc).__name__}: {str(exc).splitlines()[0]}", False
    finally:
        vm.close()
    out.leaks += _qemu_processes(run_dirs)
    out.leaks += [f"run directory {d}" for d in sorted(set(run_dirs) | set(owned_run_dirs())) if d.exists()]
    fds_after = _open_fds()
    extra = sorted(set(fds_after) - set(fds_before))
    if len(fds_after) > len(fds_before):
        out.leaks.append(f"{len(fds_after) - len(fds_before)} more file descriptors ("
                         + ", ".join(f"{fd} -> {fds_after[fd]}" for fd in extra[:8]) + ")")
    out.leaks += [f"new cache entry {name}" for name in cache.new_entries()]
    out.seconds = time.monotonic() - started
    return out


def run_soak(harness: Harness, *, vms: int, faults: int, seed: int, spec: MachineSpec | None = None,
             echo: Callable[[str], None] | None = None) -> SoakReport:
    """Run the soak (see the module docstring); ``echo`` gets each VM's line."""
    kinds = plan(vms, faults, seed)
    machine = spec or default_machine()
    harness.images(machine)  # build or find the images first: that is not a leak of the soak
    harness.accel(machine.accel)
    # QMP's client keeps one asyncio event loop per thread for the life of the process
    # (3 descriptors): made here, it is not counted against the first VM.
    get_or_create_event_loop()
    cache = CacheWatch(harness.cache.root)
    started = time.monotonic()
    outcomes = []
    for i, fault in enumerate(kinds):
        outcome = soak_one(harness, machine, i, fault, cache)
        outcomes.append(outcome)
        if echo is not None:
            echo(outcome.line(vms))
    return SoakReport(seed, outcomes, time.monotonic() - started, cache.others_building)
