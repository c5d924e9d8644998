"""The VM: one context manager that owns a QEMU process, its private run directory,
QMP, the console, SSH, the guest agent channel and the trace log.

Life of a VM::

    with VM(spec, images, accel="tcg") as vm:   # launch + wait for the guest agent
        vm.agent.call("nvme.pattern_rw", ...)
        vm.shutdown()                            # optional: stop early to read logs
        vm.save_artifacts(folder)                # optional
    # QEMU's process group is gone and the run directory removed, whatever happened

QEMU runs from an argv list (never a shell) in its own session/process group, with
PR_SET_PDEATHSIG so it dies with the harness. Shutdown is QMP ``quit``, then SIGKILL
of the process group after ``kill_timeout`` seconds. A guest panic (pvpanic ->
QMP GUEST_PANICKED) raises :class:`GuestPanicked` from any wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paramiko

from harness.errors import (
    ConfigError,
    GuestBootTimeout,
    GuestHung,
    GuestPanicked,
    QEMUExited,
    QEMUNotFound,
    VMError,
    VMLaunchError,
)
from harness.vm import ssh as ssh_mod
from harness.vm.agent import SocketAgent
from harness.vm.console import Console, tail_lines
from harness.vm.devices import RenderContext
from harness.vm.pmem import UsrDimm
from harness.vm.qmpmonitor import QMPMonitor
from harness.vm.spec import MachineSpec
from harness.vm.xen import panic_in

AGENT_PORT_NAME = "org.dmaharness.agent.0"
RUN_PREFIX = "dma-harness-"
ARTIFACT_FILES = ("argv.json", "console.log", "qmp.log", "trace.log", "qemu.log", "spec.json", "guest-trace.txt",
                  "guest-trace.json", "records.json", "snapshot.json")


@dataclass(frozen=True)
class BootImages:
    """What a VM boots: kernel, initrd, and the SSH material to reach it.

    Two optional shortcuts for a machine without Xen (each None: not used):
    ``pvh_kernel``, the bzImage's uncompressed ELF, booted through its PVH entry
    (harness.images.vmlinux); ``usr_image``, the guest's ``/usr`` as an erofs image
    on an NVDIMM (harness.vm.pmem), with ``usr_initrd``, the rest of the root as a
    small initramfs whose first stage is ``usr_init`` (harness.images.usr_image),
    booted instead of ``initrd``. A spec's own initrd (the busybox floor) boots with
    the same NVDIMM attached and no ``usr_initrd``, so the machine is the same."""

    kernel: Path
    initrd: Path
    ssh_key: Path | None = None
    host_key: str | None = None
    hypervisor: Path | None = None  # the Xen multiboot ELF, for a spec with ``xen``
    pvh_kernel: Path | None = None
    usr_image: Path | None = None
    usr_initrd: Path | None = None
    usr_init: str = "/init.usr"

    def boot_kernel(self, spec: MachineSpec) -> Path:
        """The file for ``-kernel`` (dom0's kernel under Xen is always the bzImage)."""
        return self.pvh_kernel if self.pvh_kernel is not None and spec.xen is None else self.kernel

    def usr_dimm(self, spec: MachineSpec) -> UsrDimm | None:
        """The NVDIMM holding ``/usr``, or None (Xen, or no image)."""
        return UsrDimm(self.usr_image) if self.usr_image is not None and spec.xen is None else None

    def split_root(self, spec: MachineSpec) -> bool:
        """Whether the guest boots the split root (``rdinit=`` :attr:`usr_init`): not
        when ``spec``'s command line names its own ``rdinit=`` or ``init=``, which gets
        the whole root as its initramfs."""
        own_init = any(arg.startswith(("rdinit=", "init=")) for arg in spec.cmdline.split())
        return self.usr_dimm(spec) is not None and self.usr_initrd is not None and not own_init

    def boot_initrd(self, spec: MachineSpec) -> Path:
        """The file for ``-initrd`` (under Xen: dom0's initrd module)."""
        return self.usr_initrd if self.split_root(spec) and self.usr_initrd is not None else self.initrd

    def describe(self, spec: MachineSpec) -> str:
        """One line: how the kernel and the root boot (for benchmarks and logs)."""
        kernel = "PVH entry of the uncompressed vmlinux" if self.boot_kernel(spec) != self.kernel else "bzImage"
        initrd = self.boot_initrd(spec)
        mib = initrd.stat().st_size / (1 << 20) if initrd.is_file() else 0.0
        if self.split_root(spec):
            root = f"/usr erofs on an NVDIMM + {mib:.1f} MiB initramfs"
        else:
            root = f"{mib:.1f} MiB initramfs" + (" (NVDIMM attached)" if self.usr_dimm(spec) else "")
        return f"kernel: {kernel}; root: {root}"


def find_qemu(binary: str | None = None) -> str:
    """Resolve the QEMU binary (argument, DMA_HARNESS_QEMU, qemu-system-x86_64 on PATH).

    Raises QEMUNotFound with the install hint when there is no such file, and
    VMError naming the path when it is there but not a file QEMU can run from
    (a directory, a file without execute permission).

    A version name (``10.0``, ``default``) is the harness's build of that QEMU in
    the default image cache, built if missing, and a folder holding
    ``qemu-system-x86_64`` (a QEMU build folder) is that binary
    (:func:`harness.images.qemu.resolve_qemu_option`, which also raises
    ConfigError for an unknown version name).
    """
    name = binary or os.environ.get("DMA_HARNESS_QEMU") or "qemu-system-x86_64"
    if "\0" in name:
        raise VMError(f"QEMU binary {name!r} is not a valid path (it holds a NUL byte)")
    from harness.images.qemu import BINARY as QEMU_BINARY, is_version_name
    if is_version_name(name):  # "10.0", "default": the QEMU versions of harness/images/qemu.py
        from harness.images.cache import ImageCache
        from harness.images.qemu import resolve_qemu_option
        return resolve_qemu_option(name, ImageCache()).path
    if os.sep in name and (Path(name) / QEMU_BINARY).is_file():  # a QEMU build folder
        name = str(Path(name) / QEMU_BINARY)
    if os.sep in name:  # a path: say what is wrong with it rather than "not found"
        candidate = Path(name)
        if candidate.is_dir():
            raise VMError(f"QEMU binary {name!r} is a directory, not an executable")
        if candidate.exists() and not candidate.is_file():
            raise VMError(f"QEMU binary {name!r} is not a regular file")
        if candidate.is_file() and not os.access(candidate, os.X_OK):
            raise VMError(f"QEMU binary {name!r} is not executable")
    path = shutil.which(name)
    if path is None:
        raise QEMUNotFound(name)
    return path


def run_base() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())


def owned_run_dirs(owner: int | None = None, base: Path | None = None) -> list[Path]:
    """Run directories under ``base`` (default :func:`run_base`) whose ``owner.pid``
    is ``owner`` (default: this process)."""
    me = os.getpid() if owner is None else owner
    out = []
    for d in (base or run_base()).glob(RUN_PREFIX + "*"):
        try:
            if int((d / "owner.pid").read_text()) == me:
                out.append(d)
        except (OSError, ValueError):
            continue
    return out


def sweep_stale_run_dirs(base: Path | None = None) -> list[Path]:
    """Remove run directories whose owning harness process is gone (it was SIGKILLed)."""
    removed = []
    for d in (base or run_base()).glob(RUN_PREFIX + "*"):
        try:
            owner = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reserve_port(host: str = "127.0.0.1") -> socket.socket:
    """A TCP port on ``host`` for QEMU's slirp ``hostfwd``, kept from other processes
    until the returned socket is closed: it is bound with ``SO_REUSEADDR`` and never
    listens. Linux then refuses the port to any other ``bind`` (so another harness
    process picking a free port, e.g. a second pytest-xdist worker, never gets it)
    except one that also sets ``SO_REUSEADDR`` and listens, which is what libslirp's
    ``tcp_listen()`` (slirp/src/socket.c) does for the hostfwd rule; a second QEMU
    listening on it would still fail (``Could not set up host forwarding rule``).
    Port choice by Linux's ``inet_csk_get_port()`` (net/ipv4/inet_connection_sock.c):
    a reuse-bound socket conflicts with a plain bind, not with a reuse listener.

    Raises OSError when no port can be bound on ``host``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class VM:
    """A running guest (see the module docstring).

    Args:
        spec: the machine and its devices.
        images: kernel and initrd to boot, SSH key and pinned host key.
        accel: the accelerator already resolved (``tcg`` or ``kvm``; see harness.vm.accel).
        qemu: QEMU binary path.
        trace_events: QEMU trace event names/patterns to log into ``trace.log``.
        guest_trace_events: guest kernel trace events (``system:event``) enabled from
            boot on the kernel command line (``trace_event=``), with a ring buffer of
            ``guest_trace_buffer_kb`` KiB per CPU; the guest agent collects them.
        boot_timeout: seconds for the guest agent to answer after QEMU starts.
        kill_timeout: seconds between QMP ``quit`` and SIGKILL.
        name: a label for logs.

    Raises (from ``__enter__``/``launch``): QEMUNotFound, VMLaunchError (QEMU failed to
    start: argv and output attached), GuestBootTimeout (last console lines),
    GuestPanicked. On any of them every resource is already released.
    """

    QUIT_TIMEOUT = 1.5
    """Seconds QMP ``quit`` may take before QEMU is SIGKILLed."""

    def __init__(self, spec: MachineSpec, images: BootImages, *, accel: str, qemu: str | None = None,
                 trace_events: Sequence[str] = (), guest_trace_events: Sequence[str] = (),
                 guest_trace_buffer_kb: int = 32768, boot_timeout: float = 60.0, kill_timeout: float = 10.0,
                 name: str = "vm"):
        if accel not in ("tcg", "kvm"):
            raise ValueError(f"accel must be resolved to 'tcg' or 'kvm', not {accel!r}")
        self.spec = spec
        self.images = images
        self.accel = accel
        self.qemu = find_qemu(qemu)
        self.trace_events = list(trace_events)
        self.guest_trace_events = list(guest_trace_events)
        self.guest_trace_buffer_kb = guest_trace_buffer_kb
        self.boot_timeout = boot_timeout
        self.kill_timeout = kill_timeout
        self.name = name
        self.run_dir: Path | None = None
        self.argv: list[str] = []
        self.ssh_port: int | None = None
        self.boot_seconds: float | None = None
        self.exitcode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMPMonitor | None = None
        self._agent: SocketAgent | None = None
        self._calls: list[dict[str, Any]] = []
        self._console: Console | None = None
        self._ssh: paramiko.SSHClient | None = None
        self._started = 0.0
        self._panicked = False
        self._panic_what = "the guest kernel panicked"
        self._console_seen = 0  # bytes of console.log already scanned for crash signatures (Xen)
        self._console_carry = ""
        self._port_hold: socket.socket | None = None  # keeps ssh_port ours (reserve_port) until close()
        self.start_note: str | None = None
        """How the VM was started when not by a plain cold boot, in one line: ``restored from
        snapshot KEY in 0.62s`` or ``cold boot: REASON`` (harness.vm.snapshot)."""

    # ------------------------------------------------------------------ context
    def __enter__(self) -> VM:
        """Launch and wait for the guest, unless that was already done (then the
        context manager only owns the running VM)."""
        try:
            if self._proc is None:
                self.launch()
            if self.boot_seconds is None:
                self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ paths
    def path(self, name: str) -> Path:
        if self.run_dir is None:
            raise VMError("the VM has no run directory (not launched, or closed)")
        return self.run_dir / name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def trace_log(self) -> Path:
        return self.path("trace.log")

    @property
    def console_log(self) -> Path:
        return self.path("console.log")

    def console_tail(self, n: int = 20) -> list[str]:
        return tail_lines(self.path("console.log"), n) if self.run_dir else []

    # ------------------------------------------------------------------ launch
    def build_argv(self) -> list[str]:
        ctx = RenderContext(self.path(""), self.accel)
        argv = [self.qemu, "-name", self.name, "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-msg", "timestamp=off"]
        argv += self.spec.machine_argv(ctx, self.images.usr_dimm(self.spec))
        if self.spec.xen is not None:
            if self.images.hypervisor is None:
                raise VMError("a Xen machine needs images.hypervisor (the Xen ELF)")
            argv += ["-kernel", str(self.images.hypervisor), "-append", self.spec.xen.xen_cmdline(),
                     "-initrd", self.spec.xen.modules(str(self.images.kernel), self.kernel_cmdline(),
                                                      str(self.images.initrd))]
        else:
            argv += ["-kernel", str(self.images.boot_kernel(self.spec)),
                     "-initrd", str(self.images.boot_initrd(self.spec)),
                     "-append", self.kernel_cmdline()]
        argv += ["-chardev", f"socket,id=qmp0,path={self.path('qmp.sock')},server=on,wait=off",
                 "-mon", "chardev=qmp0,mode=control"]
        argv += ["-chardev", f"socket,id=con0,path={self.path('console.sock')},server=on,wait=off,"
                             f"logfile={self.path('console.log')},logappend=off",
                 "-serial", "chardev:con0"]
        argv += ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=agent0,path={self.path('agent.sock')},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}"]
        argv += ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                 "-device", "virtio-net-pci,netdev=net0,romfile="]  # no iPXE: the kernel is loaded by QEMU
        argv += ["-device", "pvpanic"]
        if self.trace_events:
            argv += ["-trace", f"events={self.path('trace-events')}", "-D", str(self.path("trace.log"))]
        return argv

    def kernel_cmdline(self) -> str:
        """The spec's command line plus the guest tracing the harness asks for."""
        cmdline = self.spec.kernel_cmdline()
        if self.images.split_root(self.spec):  # first: a later rdinit= of the spec's would win
            cmdline = f"rdinit={self.images.usr_init} {cmdline}"
        if self.guest_trace_events:
            cmdline += (f" trace_event={','.join(self.guest_trace_events)}"
                        f" trace_buf_size={self.guest_trace_buffer_kb}K")
        return cmdline

    def launch(self, attempts: int = 3) -> None:
        """Start QEMU and connect QMP and the agent channel (does not wait for the guest)."""
        sweep_stale_run_dirs()
        self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=run_base()))
        os.chmod(self.run_dir, 0o700)
        self.path("owner.pid").write_text(str(os.getpid()))
        ctx = RenderContext(self.run_dir, self.accel)
        for d in self.spec.devices:
            d.setup(ctx)
        if self.trace_events:  # as this QEMU names them (harness/vm/qemu_binary.py)
            from harness.vm.qemu_binary import trace_events_for
            events = list(self.trace_events)
            with contextlib.suppress(ConfigError):  # not a QEMU that answers: its launch says what is wrong
                events = trace_events_for(self.qemu, events)
            self.path("trace-events").write_text("\n".join(events) + "\n")
        self.path("spec.json").write_text(json.dumps(self.spec.to_table(), indent=2, default=str))
        for attempt in range(attempts):
            self._release_port()
            self._port_hold = reserve_port()
            self.ssh_port = int(self._port_hold.getsockname()[1])
            self.argv = self.build_argv()
            self.path("argv.json").write_text(json.dumps(self.argv, indent=1))
            try:
                self._start_process()
                return
            except VMLaunchError as exc:
                if "hostfwd" in exc.output.lower() or "host forwarding" in exc.output.lower():
                    if attempt + 1 < attempts:
                        continue  # the free port was taken in between: try another
                raise

    def _start_process(self) -> None:
        for sock in ("qmp.sock", "console.sock", "agent.sock"):
            with contextlib.suppress(FileNotFoundError):
                self.path(sock).unlink()
        log = open(self.path("qemu.log"), "wb")
        self._started = time.monotonic()
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_set_pdeathsig)
        except OSError as exc:
            raise VMLaunchError(f"cannot execute QEMU: {exc}", argv=self.argv) from exc
        finally:
            log.close()
        deadline = time.monotonic() + 15
        while not self.path("agent.sock").exists():
            if self._proc.poll() is not None:
                self._reap_failed_launch("QEMU exited during start-up")
            if time.monotonic() > deadline:
                self._reap_failed_launch("QEMU did not create its sockets within 15s")
            time.sleep(0.01)
        try:
            self._qmp = QMPMonitor(self.path("qmp.sock"), self.path("qmp.log"), nickname=self.name)
            agent_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            agent_sock.connect(str(self.path("agent.sock")))
        except (OSError, VMError) as exc:
            self._reap_failed_launch(f"cannot connect to QEMU's sockets: {exc}")
        self._agent = SocketAgent(agent_sock, self.check_alive, self._hung)

    def _reap_failed_launch(self, message: str) -> None:
        self._kill()
        output = self.path("qemu.log").read_text(errors="replace") if self.run_dir else ""
        raise VMLaunchError(f"{message} (exit status {self.exitcode})", argv=self.argv, output=output)

    # ------------------------------------------------------------------ liveness
    def check_alive(self, grace: float = 0.0) -> None:
        """Raise if QEMU has exited or the guest panicked (used inside every wait).

        ``grace``: seconds to let a QEMU whose sockets just failed finish exiting, so
        its exit is reported rather than the broken socket.
        """
        if grace and self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(grace)
        if self._qmp is not None:
            for ev in self._qmp.poll_events():
                if ev.get("event") == "GUEST_PANICKED":
                    self._panicked = True
        if self.spec.xen is not None and not self._panicked:
            self._watch_xen_console()
        if self._panicked:
            raise GuestPanicked(f"{self.name}: {self._panic_what}", console_tail=self.console_tail(25))
        if self._proc is not None and self._proc.poll() is not None:
            self.exitcode = self._proc.returncode
            qemu_out = self.path("qemu.log").read_text(errors="replace").strip()
            raise QEMUExited(
                f"{self.name}: QEMU exited with status {self.exitcode}"
                + (f"; QEMU said: {qemu_out[-500:]}" if qemu_out else ""),
                exitcode=self.exitcode, console_tail=self.console_tail(25))

    def _watch_xen_console(self) -> None:
        """Scan the console output added since the last call for a Xen or dom0 crash
        (harness.vm.xen.PANIC_SIGNATURES): under Xen a dom0 panic does not reach
        pvpanic reliably, and Xen's own panic never does."""
        if self.run_dir is None:
            return
        try:
            with open(self.path("console.log"), "rb") as fh:
                fh.seek(self._console_seen)
                data = fh.read()
        except OSError:
            return
        self._console_seen += len(data)
        text = self._console_carry + data.decode(errors="replace")
        head, sep, self._console_carry = text.rpartition("\n")
        found = panic_in(head + sep)
        if found is not None:
            self._panicked = True
            self._panic_what = f"{found[0]} ({found[1][:160]})"

    def run_state(self) -> str:
        """QEMU's state in a few words: its QMP ``query-status`` (``running``,
        ``paused``, ``shutdown``, ...), or that it exited or does not answer QMP
        (within 1 s)."""
        if self._proc is not None and self._proc.poll() is not None:
            code = self._proc.returncode
            return f"exited ({'killed by signal ' + str(-code) if code < 0 else 'status ' + str(code)})"
        if self._qmp is None:
            return "QMP not connected"
        try:
            status = self._qmp.cmd("query-status", timeout=1.0)
        except VMError:
            return "not answering QMP (stopped, e.g. by SIGSTOP, or hung)"
        return str(status.get("status", status)) if isinstance(status, dict) else str(status)

    def _hung(self, op: str, seconds: float) -> GuestHung:
        state = self.run_state()
        return GuestHung(f"{self.name}: guest agent op {op!r} got no answer within {seconds:g}s; "
                         f"QEMU is {state}", op=op, seconds=seconds, qemu_state=state,
                         console_tail=self.console_tail(25))

    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait for the guest agent's hello; return seconds since QEMU started.

        Raises GuestBootTimeout (with the last console lines) or GuestPanicked.
        """
        if self._agent is None:
            raise VMError("wait_ready() before launch()")
        limit = self.boot_timeout if timeout is None else timeout
        try:
            self._agent.wait_hello(limit)
        except TimeoutError:
            raise GuestBootTimeout(f"{self.name}: the guest agent did not answer within {limit:g}s "
                                   f"(accel {self.accel})", console_tail=self.console_tail(25)) from None
        except QEMUExited as exc:
            raise GuestBootTimeout(f"{exc.args[0]} before the guest agent answered",
                                   console_tail=exc.console_tail, exitcode=exc.exitcode) from None
        self.boot_seconds = time.monotonic() - self._started
        return self.boot_seconds

    # ------------------------------------------------------------------ channels
    @property
    def agent(self) -> SocketAgent:
        if self._agent is None:
            raise VMError("the guest agent channel is not connected")
        return self._agent

    @property
    def agent_calls(self) -> list[dict[str, Any]]:
        """The ops the guest agent ran for this VM (see SocketAgent.calls), also after shutdown."""
        return self._agent.calls if self._agent is not None else self._calls

    @property
    def qmp(self) -> QMPMonitor:
        if self._qmp is None:
            raise VMError("QMP is not connected")
        return self._qmp

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = Console(self.path("console.sock"), self.path("console.log"))
        return self._console

    def ssh(self, timeout: float = 60.0) -> paramiko.SSHClient:
        """A paramiko client logged in as root (opened on first use, then reused)."""
        if self._ssh is None:
            if self.images.ssh_key is None or self.ssh_port is None:
                raise VMError("this VM has no SSH key configured")
            self._ssh = ssh_mod.connect(self.ssh_port, self.images.ssh_key, self.images.host_key, timeout)
        return self._ssh

    def ssh_run(self, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
        """Run ``command`` over SSH: (exit status, stdout, stderr).

        Raises VMError when the session fails (sshd gone, connection cut); the
        broken client is dropped, so the next call connects afresh.
        """
        try:
            return ssh_mod.run(self.ssh(), command, timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if self._ssh is not None:
                with contextlib.suppress(Exception):
                    self._ssh.close()
                self._ssh = None
            raise VMError(f"{self.name}: SSH command {command!r} failed: {exc or type(exc).__name__}") from exc

    # ------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Stop QEMU: QMP quit, then SIGKILL of its process group after kill_timeout.
        Idempotent; the run directory (logs, trace) stays until :meth:`close`."""
        if self._agent is not None:
            self._calls = self._agent.calls
        for closer in (self._ssh, self._console, self._agent):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self._ssh = self._console = None
        self._agent = None
        quit_ok = False
        if self._proc is not None and self._proc.poll() is None and self._qmp is not None:
            try:
                self._qmp.cmd("quit", timeout=self.QUIT_TIMEOUT)
                quit_ok = True
            except VMError:
                pass  # not answering QMP: no point waiting for it to quit
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._proc is not None and quit_ok:
            try:
                self._proc.wait(self.kill_timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill()

    def _kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:  # never signal a reaped (possibly reused) pgid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self.exitcode = self._proc.returncode

    def device_tables(self) -> list[dict[str, Any]]:
        """The machine's devices as tables, as QEMU has them (``spec.json``'s ``devices``);
        a VM restored from a snapshot (harness.vm.snapshot.RestoredVM) lists its root
        ports and its hot-plugged devices with their real source id (``sid``)."""
        return [d.to_table() for d in self.spec.devices]

    def save_artifacts(self, dest: Path, extra: dict[str, Any] | None = None) -> Path:
        """Copy argv, console, QMP, trace and QEMU logs and the spec into ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        if self.run_dir is not None:
            for name in ARTIFACT_FILES:
                src = self.run_dir / name
                if src.exists():
                    shutil.copy2(src, dest / name)
        for name, payload in (extra or {}).items():
            (dest / name).write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=2))
        return dest

    def close(self) -> None:
        """Shut down and remove the run directory. Safe to call more than once."""
        try:
            self.shutdown()
        finally:
            self._release_port()
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None

    def _release_port(self) -> None:
        """Give the SSH forwarding port back (see :func:`reserve_port`)."""
        if self._port_hold is not None:
            self._port_hold.close()
            self._port_hold = None
