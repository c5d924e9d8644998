"""Choosing the accelerator. ``auto`` uses KVM only if a probe guest really boots
under it within a few seconds; otherwise TCG. The probe boots the harness's own
kernel with no root filesystem: a working accelerator gets it to print its banner
and panic ("VFS: Unable to mount root fs"), then QEMU exits (``-no-reboot``).

Results are cached per host boot (``/proc/sys/kernel/random/boot_id``), QEMU binary
and kernel, so the probe runs once per machine boot. Several processes resolving
``auto`` at once (pytest-xdist workers) take turns on ``accel-probe.lock`` beside
the cache file: the first probes and writes the file (atomically, by rename), the
others wait and read it, so at most one probe guest runs and no reader sees a
half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCELS = ("auto", "tcg", "kvm")
"""Accelerator names a machine spec or a front end accepts (``auto`` resolves to one of the others)."""
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class AccelChoice:
    accel: str   # "kvm" or "tcg"
    reason: str


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(qemu: str, kernel: Path, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM with no root fs; (True, detail) if it reached its panic."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible"
    with tempfile.TemporaryDirectory(prefix="dma-harness-probe-") as d:
        # The folder's name matches the harness's run directories (dma-harness-*):
        # say who owns it, so other processes' leftover checks and sweeps leave it alone.
        (Path(d) / "owner.pid").write_text(str(os.getpid()))
        log = Path(d) / "console.log"
        argv = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256",
                "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 loglevel=4",
                "-chardev", f"file,id=c0,path={log}", "-serial", "chardev:c0"]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return False, f"a KVM probe guest printed nothing useful within {timeout:.0f}s"
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Kernel panic" in text or "VFS:" in text:
            return True, f"a KVM probe guest booted to its root mount in {time.monotonic() - start:.1f}s"
        said = out.decode(errors="replace").strip().splitlines()
        return False, "KVM probe guest failed: " + (said[0][:200] if said else "no console output, no error")


def resolve_accel(requested: str, qemu: str, kernel: Path, cache_dir: Path | None = None) -> AccelChoice:
    """Map ``auto``/``tcg``/``kvm`` to the accelerator a VM will use.

    ``auto`` reads ``cache_dir/accel-probe.json`` (keyed by host boot, QEMU binary
    and its mtime, and kernel path) or runs :func:`probe_kvm` and writes it, under
    ``cache_dir/accel-probe.lock`` (see the module docstring). Raises OSError when
    ``qemu`` cannot be stat'ed or the lock cannot be created in ``cache_dir``.
    """
    if requested == "tcg":
        return AccelChoice("tcg", "requested")
    if requested == "kvm":
        return AccelChoice("kvm", "requested")
    key = hashlib.sha256(f"{_boot_id()}|{qemu}|{os.path.getmtime(qemu)}|{kernel}".encode()).hexdigest()[:16]
    cache_file = (cache_dir / "accel-probe.json") if cache_dir else None
    if cache_file is None:
        ok, detail = probe_kvm(qemu, kernel)
        return AccelChoice("kvm", detail) if ok else AccelChoice("tcg", detail)
    with _probe_lock(cache_file.with_suffix(".lock")):
        cached = _read_cached(cache_file, key)
        if cached is not None:
            return cached
        ok, detail = probe_kvm(qemu, kernel)
        choice = AccelChoice("kvm", detail) if ok else AccelChoice("tcg", detail)
        tmp = cache_file.with_name(f"{cache_file.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"key": key, "accel": choice.accel, "reason": choice.reason}))
            os.replace(tmp, cache_file)
        except OSError:  # an unwritable cache costs the next run a probe, nothing more
            tmp.unlink(missing_ok=True)
    return choice


def _read_cached(cache_file: Path, key: str) -> AccelChoice | None:
    """The cached choice for ``key``; None when there is none, it is for another
    key, or the file is unreadable (then the probe runs again and replaces it)."""
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return AccelChoice(cached["accel"], cached["reason"] + " (cached)")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    return None


@contextlib.contextmanager
def _probe_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created with its folder if missing),
    released on exit or when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
