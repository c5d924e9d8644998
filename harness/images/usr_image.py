"""The guest's ``/usr`` as a read-only erofs image, and the rest of the root as a
small initramfs.

Under TCG every byte of an initramfs is copied by the guest kernel before ``/init``
runs: the whole Debian root (about 80 MB) took 1.7 s of the one vCPU, more than the
rest of the boot to the agent. Debian's root is merged-``/usr`` (``/bin``, ``/sbin``
and ``/lib*`` are symlinks into it), so nearly all of it is ``/usr``. That part is
built into an erofs image (``usr.erofs``) which the guest reads on demand from an
emulated NVDIMM (harness.vm.pmem); the initramfs keeps only ``/etc``, ``/var``,
``/root`` and the symlinks (``rest.cpio``, a few MB), plus a static busybox copied
out of ``/usr`` (``busybox``) for the first-stage init that mounts ``/usr``.

Built from the same ``mmdebstrap`` tarball and the same trim list as the full
initramfs (harness.images.rootfs), which stays the root of machines that cannot use
the image (a Xen dom0, a kernel without ``ACPI_NFIT``/``BLK_DEV_PMEM``/``EROFS_FS``).

Files keep their modes and modification times (Python's cached bytecode of the
standard library is checked against its sources' mtimes); when the build does not
run as root, every file of the image is owned by root (``mkfs.erofs --all-root``)
instead of by the builder.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from harness.errors import ImageError
from harness.images.cpio import tar_to_newc
from harness.images.steps import run_step

USR_IMAGE = "usr.erofs"
REST_CPIO = "rest.cpio"
BUSYBOX = "busybox"
MKFS = "mkfs.erofs"
ALIGN = 16 << 20
"""The image is padded to a multiple of 16 MiB: an NVDIMM's size must be a multiple
of the memory backend's page size and Linux maps pmem regions in 2 MiB sections."""
REQUIRED_KCONFIG = ("ACPI_NFIT", "LIBNVDIMM", "BLK_DEV_PMEM", "EROFS_FS")
"""Kernel options (``=y``) the guest needs to mount ``/usr`` from the image."""


def in_usr(name: str) -> bool:
    """Whether tar member ``name`` (relative, normalised) lies under ``usr/``."""
    return name == "usr" or name.startswith("usr/")


def kernel_can_mount(options: dict[str, str] | None) -> bool:
    """Whether a kernel with configuration ``options`` (``{"EROFS_FS": "y", ...}``,
    None when unknown) can mount ``/usr`` from the image."""
    return options is not None and all(options.get(o) == "y" for o in REQUIRED_KCONFIG)


def mkfs_available() -> bool:
    return shutil.which(MKFS) is not None


def build(tar_path: Path, out: Path, *, skip: Callable[[str], bool], log: Path) -> dict[str, int]:
    """Write ``out/usr.erofs``, ``out/rest.cpio`` and ``out/busybox`` from the root
    filesystem tarball ``tar_path``; entries for which ``skip(name)`` is true are left
    out of both, as from the full initramfs. Returns their sizes in bytes.

    Raises:
        ImageError: ``mkfs.erofs`` (Debian's erofs-utils) is missing or fails (the
            ``log`` is named), or the tarball has no ``usr/bin/busybox``.
    """
    if not mkfs_available():
        raise ImageError(f"{MKFS} not found: install Debian's erofs-utils (images/host-packages)")
    tree = out / "usr-tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    try:
        with tarfile.open(tar_path) as tar:
            members = [m for m in tar if _usr_member(m, skip)]
            if hasattr(tarfile, "fully_trusted_filter"):  # Python >= 3.11.4 (PEP 706)
                tar.extractall(tree, members=members, numeric_owner=True, filter="fully_trusted")
            else:
                tar.extractall(tree, members=members, numeric_owner=True)
        busybox = tree / "usr" / "bin" / BUSYBOX
        if not busybox.is_file():
            raise ImageError("the root filesystem has no usr/bin/busybox (images/rootfs/packages: busybox-static)")
        shutil.copyfile(busybox, out / BUSYBOX)
        image = out / USR_IMAGE
        argv = [MKFS, "--preserve-mtime", "--quiet"]
        if os.geteuid() != 0:
            argv.append("--all-root")
        run_step(f"{MKFS} /usr", argv + [str(image), str(tree / "usr")], log=log)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    size = image.stat().st_size
    with open(image, "r+b") as fh:
        fh.truncate(-(-size // ALIGN) * ALIGN)
    tar_to_newc(tar_path, out / REST_CPIO, skip=lambda name: skip(name) or (in_usr(name) and name != "usr"))
    return {USR_IMAGE: image.stat().st_size, REST_CPIO: (out / REST_CPIO).stat().st_size,
            BUSYBOX: (out / BUSYBOX).stat().st_size}


def _usr_member(member: tarfile.TarInfo, skip: Callable[[str], bool]) -> bool:
    name = os.path.normpath(member.name.lstrip("/"))
    if not in_usr(name) or skip(name):
        return False
    if member.islnk():  # a hard link whose target was trimmed would fail to extract
        return not skip(os.path.normpath(member.linkname.lstrip("/")))
    return member.isdir() or member.isfile() or member.issym()
