"""The guest kernel's own record of what it mapped: tracefs.

The harness enables the events on the kernel command line (``trace_event=``,
``trace_buf_size=``), so the record starts before any driver probes and covers
every mapping the device under test will ever use.  This module adds markers
(``trace_marker``: the workload says where each of its operations begins and
ends) and hands the record to the host at the end of the run.

Ops:
  ``tracefs.status``  which events are enabled, buffer size, entries and overruns
  ``tracefs.mark``    write a line into the trace (``tracing_mark_write`` event)
  ``tracefs.collect`` the whole trace text, and per-CPU loss counters
"""

from __future__ import annotations

import os
import time
from typing import Any

from guest_agent.protocol import op

TRACEFS = "/sys/kernel/tracing"


def _mounted() -> str:
    """Mount tracefs if it is not (the initramfs does not); return its path.

    Raises OSError if the kernel has no tracefs.
    """
    if not os.path.exists(f"{TRACEFS}/trace"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"nodev", TRACEFS.encode(), b"tracefs", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot mount tracefs at {TRACEFS}: {os.strerror(err)}")
    return TRACEFS


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _cpu_stats() -> dict[str, dict[str, int]]:
    """``per_cpu/cpuN/stats`` as numbers (entries, overrun, commit overrun, dropped events...)."""
    base = _mounted()
    out: dict[str, dict[str, int]] = {}
    for cpu in sorted(os.listdir(f"{base}/per_cpu")):
        stats: dict[str, int] = {}
        for line in _read(f"{base}/per_cpu/{cpu}/stats").splitlines():
            key, _, value = line.partition(":")
            value = value.strip().split()[0] if value.strip() else ""
            if value.isdigit():
                stats[key.strip().replace(" ", "_")] = int(value)
        out[cpu] = stats
    return out


def marker_fd() -> int | None:
    """An fd open on ``trace_marker`` for the caller to write markers to, or
    None when the kernel has no tracefs (the caller then writes none)."""
    try:
        return os.open(f"{_mounted()}/trace_marker", os.O_WRONLY)
    except OSError:
        return None


@op("tracefs.status")
def status() -> dict[str, Any]:
    """Enabled events (``set_event``), per-CPU buffer size in KiB, per-CPU stats."""
    base = _mounted()
    return {"set_event": _read(f"{base}/set_event").split(),
            "buffer_size_kb": _read(f"{base}/buffer_size_kb").strip(),
            "tracing_on": _read(f"{base}/tracing_on").strip() == "1",
            "stats": _cpu_stats()}


@op("tracefs.mark")
def mark(text: str) -> dict[str, Any]:
    """Write ``text`` (one line) into the trace through ``trace_marker``."""
    if "\n" in text:
        raise ValueError("a trace marker is one line")
    fd = os.open(f"{_mounted()}/trace_marker", os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return {"text": text}


@op("tracefs.collect")
def collect() -> dict[str, Any]:
    """Stop tracing and return the whole trace.

    Returns ``text`` (the content of ``trace``: header lines start with '#'),
    ``stats`` (per CPU: ``entries``, ``overrun`` -- events lost because the ring
    buffer wrapped --, ``dropped_events``...), ``lost`` (the sum of overrun and
    dropped events over CPUs: non-zero means the record is incomplete),
    ``seconds`` (time spent reading) and ``bytes``.
    """
    base = _mounted()
    t0 = time.monotonic()
    with open(f"{base}/tracing_on", "w") as fh:
        fh.write("0")
    text = _read(f"{base}/trace")
    stats = _cpu_stats()
    lost = sum(s.get("overrun", 0) + s.get("dropped_events", 0) for s in stats.values())
    return {"text": text, "stats": stats, "lost": lost, "bytes": len(text),
            "seconds": round(time.monotonic() - t0, 4)}
