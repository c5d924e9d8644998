"""The Xen hypervisor: Debian bookworm's ``xen-hypervisor-4.17-amd64``, its
``/boot/xen-4.17-amd64.gz`` decompressed to the multiboot ELF that QEMU boots with
``-kernel`` (QEMU's multiboot loader does not read gzip).

Cache entry ``xen/<key>/``: ``xen`` (the ELF), ``manifest.json`` (package version,
sha256 of the .deb). The key covers the package, suite and recipe version; a newer
Debian point release is picked up with ``refresh=True``.

Nothing else of Xen is installed: dom0 runs the project's own kernel and initramfs,
and the guest agent reads Xen's state through ``/dev/xen/privcmd`` itself, so no
toolstack (xl, xenstored) is needed in the root filesystem.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ImageError
from harness.images.apt import download
from harness.images.cache import ImageCache, content_key
from harness.images.steps import announce, run_step

XEN_PACKAGE = "xen-hypervisor-4.17-amd64"
XEN_SUITE = "bookworm"
XEN_GZ = "boot/xen-4.17-amd64.gz"
RECIPE_VERSION = "xen-recipe-1"


@dataclass(frozen=True)
class XenImage:
    """A bootable Xen: ``path`` to the multiboot ELF, ``version`` the Debian package version."""

    path: Path
    version: str


def xen_key() -> str:
    return content_key({"recipe": RECIPE_VERSION, "package": XEN_PACKAGE, "suite": XEN_SUITE, "file": XEN_GZ})


def cached_xen(cache: ImageCache) -> XenImage | None:
    """The cached hypervisor, or None (nothing is built or downloaded)."""
    key = xen_key()
    if not cache.complete("xen", key):
        return None
    return XenImage(cache.entry("xen", key) / "xen", str(cache.manifest("xen", key).get("version", "?")))


def ensure_xen(cache: ImageCache, *, refresh: bool = False) -> XenImage:
    """Return the cached hypervisor, downloading and unpacking it first if needed
    (a few seconds: one 2.5 MB .deb).

    Raises:
        ImageError: the download or unpack failed (the log file is named), or the
            package no longer holds ``boot/xen-4.17-amd64.gz``.
    """
    key = xen_key()
    with cache.lock("xen", key):
        if refresh and cache.complete("xen", key):
            shutil.rmtree(cache.entry("xen", key))
        if not cache.complete("xen", key):
            _build(cache, key)
    image = cached_xen(cache)
    assert image is not None
    return image


def _build(cache: ImageCache, key: str) -> None:
    started = time.monotonic()
    log = cache.path("xen", f"{key}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"xen {key}\n")
    announce(f"fetching the Xen hypervisor ({XEN_PACKAGE}, Debian {XEN_SUITE}); log: {log}")
    deb, version = download(cache, XEN_PACKAGE, XEN_SUITE, log=log)
    with cache.building("xen", key) as out:
        unpacked = out / "deb"
        run_step("unpack .deb", ["dpkg-deb", "-x", deb, unpacked], log=log)
        gz = unpacked / XEN_GZ
        if not gz.is_file():
            raise ImageError(f"{deb.name} holds no {XEN_GZ}", log=str(log))
        try:
            (out / "xen").write_bytes(gzip.decompress(gz.read_bytes()))
        except (OSError, EOFError) as exc:
            raise ImageError(f"cannot decompress {XEN_GZ} from {deb.name}: {exc}", log=str(log)) from exc
        shutil.rmtree(unpacked)
        (out / "manifest.json").write_text(json.dumps({
            "key": key, "package": XEN_PACKAGE, "suite": XEN_SUITE, "version": version,
            "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
            "seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
    os.unlink(deb)
    announce(f"Xen {version} ready: {cache.entry('xen', key) / 'xen'}")
