"""The boot-time floor: a minimal busybox initramfs for the harness's own kernel.

``python -m harness bench boot`` boots it beside the harness's root filesystem, on
the same machine (same QEMU argv but for ``-initrd``), to tell what the kernel and
the machine cost from what the harness's userspace costs. Its ``/init`` mounts
``/proc``, prints :data:`FLOOR_MARKER` with the kernel's uptime on the console
(``/dev/console``: ``ttyS0``, or ``hvc0`` for a Xen dom0) and powers off.

The archive (``busybox/<key>/initrd.cpio``) is keyed by the recipe (package, suite,
``/init``), so a cached floor needs no network; the first build downloads Debian's
``busybox-static`` with the harness's private apt state (harness.images.apt), never
the host's.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import time
from pathlib import Path
from typing import BinaryIO

from harness.errors import ImageError
from harness.images.apt import download
from harness.images.cache import ImageCache, content_key
from harness.images.cpio import NewcWriter
from harness.images.steps import announce, run_step

PACKAGE = "busybox-static"
SUITE = "bookworm"
RECIPE_VERSION = "busybox-floor-1"
FLOOR_MARKER = "dma-harness-floor: ready at"
"""Printed by the floor's ``/init``, followed by the uptime in seconds."""

FLOOR_INIT = f"""#!/bin/busybox sh
# PID 1 of the boot-time floor: print the marker with the uptime, then power off.
/bin/busybox mount -t proc proc /proc
read up idle </proc/uptime
echo "{FLOOR_MARKER} ${{up}}s uptime" >/dev/console
/bin/busybox poweroff -f
"""

_MARKER_RE = re.compile(re.escape(FLOOR_MARKER) + r" ([0-9]+(?:\.[0-9]+)?)s uptime")


def floor_key() -> str:
    """The cache key of the floor initramfs (recipe, package, suite, ``/init``)."""
    return content_key({"recipe": RECIPE_VERSION, "package": PACKAGE, "suite": SUITE, "init": FLOOR_INIT})


def marker_uptime(console: str) -> float | None:
    """The guest uptime (seconds) in the floor's marker line of ``console`` text,
    or None while the marker is not there (a marker still being written does not
    match before its ``s uptime``, so its number is whole)."""
    m = _MARKER_RE.search(console)
    return float(m.group(1)) if m else None


def write_floor_cpio(out: BinaryIO, busybox: bytes) -> None:
    """Write the floor's newc archive to ``out``: ``/bin/busybox`` (``busybox`` is
    the static ELF), ``/init``, ``/dev/console`` (char 5:1, so PID 1 has a console
    before any devtmpfs), ``/proc``.

    Raises ValueError if ``busybox`` is not an ELF file.
    """
    if not busybox.startswith(b"\x7fELF"):
        raise ValueError("busybox must be an ELF executable")
    w = NewcWriter(out)
    for d in ("bin", "dev", "proc"):
        w.add_dir(d)
    w.add_file("bin/busybox", busybox, 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_node("dev/console", stat.S_IFCHR, 0o600, 5, 1)
    w.add_file("init", FLOOR_INIT.encode(), 0o755)
    w.close()


def ensure_floor_initrd(cache: ImageCache, *, refresh: bool = False) -> Path:
    """The floor initramfs (``busybox/<key>/initrd.cpio``), built if missing.

    Raises ImageError when the download or the extraction fails (the log is named).
    """
    key = floor_key()
    with cache.lock("busybox", key):
        if refresh and cache.complete("busybox", key):
            shutil.rmtree(cache.entry("busybox", key))
        if not cache.complete("busybox", key):
            _build(cache, key)
    return cache.entry("busybox", key) / "initrd.cpio"


def _build(cache: ImageCache, key: str) -> None:
    started = time.monotonic()
    log = cache.path("busybox", f"{key}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"busybox floor build {key}\n")
    announce(f"building the busybox boot floor {key} (Debian {SUITE} {PACKAGE}); log: {log}")
    deb, version = download(cache, PACKAGE, SUITE, log=log)
    with cache.building("busybox", key) as out:
        tree = out / "deb"
        run_step(f"unpack {PACKAGE}", ["dpkg-deb", "-x", str(deb), str(tree)], log=log)
        binary = tree / "bin" / "busybox"
        if not binary.is_file():
            raise ImageError(f"{PACKAGE}'s .deb has no bin/busybox", log=str(log))
        busybox = binary.read_bytes()
        shutil.rmtree(tree)
        with open(out / "initrd.cpio", "wb") as cpio:
            write_floor_cpio(cpio, busybox)
        (out / "manifest.json").write_text(json.dumps({
            "key": key, "package": PACKAGE, "version": version, "suite": SUITE,
            "bytes": (out / "initrd.cpio").stat().st_size,
            "build_seconds": round(time.monotonic() - started, 1),
        }, indent=2) + "\n")
    deb.unlink(missing_ok=True)
