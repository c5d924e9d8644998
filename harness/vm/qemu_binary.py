"""What a QEMU binary is: its version (``-version``) and the trace events it was
built with (``-trace help``), probed once per (path, mtime, size) and cached in
the process.

QEMU prints ``QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)``
for ``-version`` (system/vl.c ``version()``: ``QEMU_FULL_VERSION``, the package
string in parentheses) and one event name a line for ``-trace help``
(trace/control.c ``trace_list_events``). The trace parser chooses its format table
from both (:func:`harness.trace.formats.choose_format`): never from the version
alone, so a build whose events differ from its release's is noticed.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.trace.formats import FormatChoice, choose_format

__all__ = ["QemuVersion", "QemuProbe", "parse_version", "parse_trace_help", "probe_qemu", "clear_probe_cache",
           "format_choice", "trace_events_for"]

PROBE_TIMEOUT = 30.0
"""Seconds each of ``-version`` and ``-trace help`` may take."""

_VERSION_LINE = re.compile(r"QEMU emulator version ([0-9]+)\.([0-9]+)\.([0-9]+)(?:\.[0-9]+)?(?:[^(\n]*)"
                           r"(?:\(([^)\n]*)\))?")
_EVENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, order=True)
class QemuVersion:
    """``major.minor.micro`` of a QEMU, and its ``package`` string (``Debian 1:10.0.2+ds-2...``,
    ``v10.0.0-123-gdeadbeef`` for a git build, "" when none). ``micro`` 50 or more
    is QEMU's mark of a development tree on the way to the next minor release
    (``10.0.50`` is not 10.0)."""

    major: int
    minor: int
    micro: int
    package: str = field(default="", compare=False)

    @property
    def series(self) -> str:
        """``major.minor`` (``10.0``)."""
        return f"{self.major}.{self.minor}"

    @property
    def development(self) -> bool:
        """A development tree between releases (``micro >= 50``)."""
        return self.micro >= 50

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.micro}"
        return f"{text} ({self.package})" if self.package else text


def parse_version(text: str) -> QemuVersion | None:
    """The version in QEMU's ``-version`` output, or None if ``text`` has none."""
    m = _VERSION_LINE.search(text)
    if m is None:
        return None
    return QemuVersion(int(m.group(1)), int(m.group(2)), int(m.group(3)), (m.group(4) or "").strip())


def parse_trace_help(text: str) -> frozenset[str]:
    """The event names of ``-trace help`` output (one a line; other lines ignored)."""
    return frozenset(line.strip() for line in text.splitlines() if _EVENT_NAME.fullmatch(line.strip()))


@dataclass(frozen=True)
class QemuProbe:
    """One probed binary: ``path`` (as given), ``version``, ``events`` (every trace
    event it knows) and ``version_text`` (the first line of ``-version``)."""

    path: str
    version: QemuVersion
    events: frozenset[str]
    version_text: str

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-able summary (the event list as a count)."""
        return {"path": self.path, "version": str(self.version), "series": self.version.series,
                "version_text": self.version_text, "trace_events": len(self.events)}


_CACHE: dict[tuple[str, int, int], QemuProbe] = {}


def clear_probe_cache() -> None:
    """Forget every probe (tests)."""
    _CACHE.clear()


def _run(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([path, *args], capture_output=True, text=True, errors="replace",
                              timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"QEMU {path!r}: '{' '.join(args)}' did not finish within {PROBE_TIMEOUT:.0f}s "
                          "(not a QEMU?)", key="qemu") from None
    except OSError as exc:
        raise ConfigError(f"QEMU {path!r} cannot be run: {exc.strerror or exc}", key="qemu") from None


def probe_qemu(path: str | os.PathLike[str]) -> QemuProbe:
    """Probe the QEMU binary ``path`` (``-version`` and ``-trace help``), once per
    (resolved path, mtime, size) in this process.

    Raises:
        ConfigError: one line naming ``path``: it cannot be run, or its output is not
            QEMU's (no ``QEMU emulator version``, no trace event list).
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError as exc:
        raise ConfigError(f"QEMU {name!r}: {exc.strerror or exc}", key="qemu") from None
    cache_key = (str(Path(name).resolve()), st.st_mtime_ns, st.st_size)
    found = _CACHE.get(cache_key)
    if found is not None:
        return found
    out = _run(name, "-version")
    version = parse_version(out.stdout)
    if out.returncode != 0 or version is None:
        said = (out.stdout + out.stderr).strip().splitlines()
        raise ConfigError(f"{name!r} is not a QEMU: '-version' printed "
                          f"{said[0][:120] if said else 'nothing'!r}", key="qemu")
    events_out = _run(name, "-trace", "help")
    events = parse_trace_help(events_out.stdout)
    if events_out.returncode != 0 or not events:
        raise ConfigError(f"QEMU {name!r} ({version}) lists no trace events with '-trace help' "
                          "(built without a trace backend?)", key="qemu")
    probe = QemuProbe(name, version, events, out.stdout.splitlines()[0].strip())
    _CACHE[cache_key] = probe
    return probe


def format_choice(path: str | os.PathLike[str]) -> FormatChoice:
    """The trace format table for the QEMU binary ``path``, from its probed version
    and event list (:func:`harness.trace.formats.choose_format`).

    Raises ConfigError as :func:`probe_qemu` does."""
    probe = probe_qemu(path)
    return choose_format(probe.version.series, probe.version.development, version=str(probe.version),
                         events=probe.events)


def trace_events_for(path: str | os.PathLike[str], requested: Iterable[str]) -> list[str]:
    """``requested`` (the harness's 7.2 event names and patterns) as the QEMU binary
    ``path`` names them, without names it does not list: what to write for its
    ``-trace events=FILE``.

    Raises ConfigError as :func:`probe_qemu` does."""
    probe = probe_qemu(path)
    return format_choice(path).trace_events(requested, probe.events)
