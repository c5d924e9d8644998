"""The guest root filesystem: Debian bookworm from ``mmdebstrap --variant=minbase``
with the packages listed in ``images/rootfs/packages``, as a newc initramfs, and
split into a ``/usr`` erofs image plus a small initramfs (harness.images.usr_image)
for machines that read ``/usr`` from an emulated NVDIMM (harness.vm.pmem).

Two layers, concatenated into one initrd (the kernel unpacks concatenated cpio
archives in order):

- the *base* (``rootfs/<key>/base.cpio``): Debian packages only; keyed by the
  package list and recipe version; about 20 s to build, rebuilt rarely;
- the *overlay* (``initrd/<key>/initrd.cpio`` = base + overlay): ``/init``, the
  sshd configuration, the harness's public key and ``guest_agent``; keyed by their
  content, so editing the agent rebuilds only this layer (well under a second).

An initramfs was chosen over a disk image: every boot starts from a pristine root,
no per-VM image copy is needed, and no block device of the harness's own shares the
vIOMMU with the devices under test. The ``/usr`` image keeps those properties: it is
read-only, shared by every VM, and an NVDIMM is no PCI device (no IOMMU group, no
DMA), described to the guest by ACPI's NFIT alone.

The split flavour's initrd (``initrd/<key>/initrd-usr.cpio``) is ``rest.cpio``, the
same overlay, ``/busybox`` and ``/init.usr``: the kernel runs ``/init.usr``
(``rdinit=``), which mounts ``/usr`` and hands over to the same ``/init``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import py_compile
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from harness.errors import ImageError
from harness.images.cache import ImageCache, content_key, make_private, recipes_dir
from harness.images.cpio import NewcWriter, tar_to_newc
from harness.images.sshkey import SSHKey
from harness.images.steps import announce, run_step
from harness.images import usr_image

SUITE = "bookworm"
GUEST_PYTHON = (3, 11)  # bookworm's python3: the agent's bytecode is compiled for it
DEBIAN_MIRROR = "http://deb.debian.org/debian"
RECIPE_VERSION = "rootfs-recipe-3"
AGENT_PACKAGE = "guest_agent"  # copied into the guest as /opt/dma-harness/guest_agent
KEEP_INITRDS = 4
EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
            "/usr/share/lintian/*", "/usr/share/zoneinfo/right/*"]
# Dropped from the initramfs (needed to install packages, not to run the guest): a
# smaller initramfs is a faster boot under TCG.
TRIM = ["usr/bin/perl*", "usr/lib/x86_64-linux-gnu/perl*", "usr/lib/x86_64-linux-gnu/libperl*",
        "usr/share/perl*", "usr/lib/x86_64-linux-gnu/gconv/*", "var/lib/dpkg/info/*", "var/cache/*",
        "var/log/*", "usr/share/i18n/*",
        # Python's own test suite and help texts, apt (the guest installs nothing),
        # shell completions and licence texts: about 6.4 MB that no guest op runs.
        "usr/lib/python3.11/test/*", "usr/lib/python3.11/pydoc_data/*", "usr/bin/apt*", "usr/lib/apt/*",
        "usr/lib/x86_64-linux-gnu/libapt-*", "usr/share/bash-completion/*", "usr/share/common-licenses/*",
        # Every byte of the initramfs is unpacked by the guest kernel before /init runs
        # (~45 MB/s of the one vCPU under TCG), so what no program of the guest loads goes
        # too: libraries that nothing left links (apt's TLS stack, C++, Berkeley DB,
        # SQLite, libmvec; checked with readelf's NEEDED entries over the whole tree) and
        # the programs that were their only users (gpgv, arpd, pam_userdb: sshd runs
        # with UsePAM no), package tools, lspci's name database (the harness reads
        # numeric ids), and the Python packages and extension modules the guest agent
        # never imports (asyncio, email, xml, http, unittest, multiprocessing, CJK
        # codecs, Python's own test extensions).
        "usr/lib/x86_64-linux-gnu/libgnutls*", "usr/lib/x86_64-linux-gnu/libunistring*",
        "usr/lib/x86_64-linux-gnu/libp11-kit*", "usr/lib/x86_64-linux-gnu/libtasn1*",
        "usr/lib/x86_64-linux-gnu/libidn2*", "usr/lib/x86_64-linux-gnu/libnettle*",
        "usr/lib/x86_64-linux-gnu/libhogweed*", "usr/lib/x86_64-linux-gnu/libstdc++*",
        "usr/lib/x86_64-linux-gnu/libmvec*", "usr/lib/x86_64-linux-gnu/libexpatw*",
        "usr/lib/x86_64-linux-gnu/libdb-5*", "usr/lib/x86_64-linux-gnu/libsqlite3*",
        "usr/lib/x86_64-linux-gnu/security/pam_userdb.so", "usr/sbin/arpd", "usr/bin/gpgv",
        "usr/bin/dpkg*", "usr/bin/localedef", "usr/sbin/ldconfig", "usr/share/misc/pci.ids",
        "usr/lib/python3.11/asyncio/*", "usr/lib/python3.11/email/*", "usr/lib/python3.11/xml/*",
        "usr/lib/python3.11/xmlrpc/*", "usr/lib/python3.11/http/*", "usr/lib/python3.11/html/*",
        "usr/lib/python3.11/wsgiref/*", "usr/lib/python3.11/unittest/*",
        "usr/lib/python3.11/multiprocessing/*", "usr/lib/python3.11/venv/*",
        "usr/lib/python3.11/curses/*", "usr/lib/python3.11/dbm/*", "usr/lib/python3.11/sqlite3/*",
        "usr/lib/python3.11/lib2to3/*", "usr/lib/python3.11/idlelib/*", "usr/lib/python3.11/tkinter/*",
        "usr/lib/python3.11/ensurepip/*", "usr/lib/python3.11/turtledemo/*",
        "usr/lib/python3.11/lib-dynload/_codecs_*", "usr/lib/python3.11/lib-dynload/_test*",
        "usr/lib/python3.11/lib-dynload/_xx*", "usr/lib/python3.11/lib-dynload/xxlimited*",
        "usr/lib/python3.11/lib-dynload/_ctypes_test*", "usr/lib/python3.11/lib-dynload/_sqlite3*",
        "usr/lib/python3.11/lib-dynload/_dbm*", "usr/lib/python3.11/lib-dynload/_curses*",
        "usr/lib/python3.11/lib-dynload/_asyncio*", "usr/lib/python3.11/lib-dynload/_multiprocessing*",
        "usr/lib/python3.11/lib-dynload/_posixshmem*", "usr/lib/python3.11/lib-dynload/ossaudiodev*",
        "usr/lib/python3.11/lib-dynload/audioop*", "usr/lib/python3.11/lib-dynload/nis*"]


def _trimmed(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TRIM)


@dataclass(frozen=True)
class Initrd:
    """The bootable initramfs and the guest's SSH host public key (for pinning).

    ``usr_image`` / ``usr_initrd``: the split flavour (``/usr`` as an erofs image,
    the rest as a small initramfs whose kernel must be told ``rdinit=`` :data:`USR_INIT`),
    or None when the base was built without it (no ``mkfs.erofs`` on the host)."""

    path: Path
    host_key: str  # "ssh-ed25519 AAAA..." line of the guest's host key
    usr_image: Path | None = None
    usr_initrd: Path | None = None


USR_INIT = "/init.usr"
"""The split flavour's first-stage init (images/rootfs/init.usr)."""


def packages() -> list[str]:
    text = (recipes_dir() / "rootfs" / "packages").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def base_key() -> str:
    return content_key({"recipe": RECIPE_VERSION, "suite": SUITE, "packages": "\n".join(packages()),
                        "excludes": "\n".join(EXCLUDES), "trim": "\n".join(TRIM)})


def ensure_base(cache: ImageCache, *, refresh: bool = False) -> Path:
    """Return the base root filesystem directory (``base.cpio``, ``ssh_host_ed25519_key.pub``)."""
    key = base_key()
    with cache.lock("rootfs", key):
        if refresh and cache.complete("rootfs", key):
            shutil.rmtree(cache.entry("rootfs", key))
        if not cache.complete("rootfs", key):
            _build_base(cache, key)
        # base.cpio and rest.cpio hold the guest's SSH host private keys
        make_private(cache.entry("rootfs", key), "base.cpio", usr_image.REST_CPIO)
    return cache.entry("rootfs", key)


def _build_base(cache: ImageCache, key: str) -> None:
    started = time.monotonic()
    log = cache.path("rootfs", f"{key}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"rootfs build {key}\n")
    announce(f"building guest root filesystem {key} (Debian {SUITE}); log: {log}")
    with cache.building("rootfs", key, private=True) as out:
        tar = out / "rootfs.tar"
        argv: list[str] = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(packages())]
        argv += [f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDES]
        argv += [
            "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
            f"--customize-hook=copy-out /etc/ssh/ssh_host_ed25519_key.pub {out}",
            SUITE, str(tar), DEBIAN_MIRROR,
        ]
        run_step("mmdebstrap", argv, log=log)
        if not (out / "ssh_host_ed25519_key.pub").is_file():
            raise ImageError("the root filesystem has no SSH host key", log=str(log))
        entries = tar_to_newc(tar, out / "base.cpio", skip=_trimmed)
        split: dict[str, int] | str
        if usr_image.mkfs_available():
            split = usr_image.build(tar, out, skip=_trimmed, log=log)
        else:
            split = f"{usr_image.MKFS} not found: every VM unpacks the whole root as its initramfs"
            announce(f"{split} (install erofs-utils for faster boots)")
        tar.unlink()
        (out / "manifest.json").write_text(json.dumps({
            "key": key, "suite": SUITE, "packages": packages(), "entries": entries,
            "bytes": (out / "base.cpio").stat().st_size, "usr_image": split,
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
        shutil.copy2(log, out / "build.log")
    announce(f"root filesystem ready in {time.monotonic() - started:.0f}s")


def _agent_files() -> dict[str, bytes]:
    """The guest agent's modules (the installed ``guest_agent`` package), by guest path."""
    agent = files(AGENT_PACKAGE)
    if not (agent / "__main__.py").is_file():
        raise ImageError(f"guest agent sources not found in {agent}")
    sources = sorted((p for p in agent.iterdir() if p.name.endswith(".py") and p.is_file()),
                     key=lambda p: p.name)
    return {f"opt/dma-harness/guest_agent/{p.name}": p.read_bytes() for p in sources}


def agent_bytecode(sources: dict[str, bytes]) -> dict[str, bytes]:
    """The agent's modules compiled for the guest's Python, by guest path
    (``.../guest_agent/__pycache__/NAME.cpython-311.pyc``), or ``{}`` when the host's
    Python is not the guest's version (bytecode is version-specific; the guest then
    compiles the sources at every boot, about a second under TCG).

    The files are unchecked-hash pycs (PEP 552): the guest uses them without
    comparing timestamps, which the initramfs does not preserve; they are rebuilt
    whenever a source changes, because they are part of the overlay's content key."""
    if sys.version_info[:2] != GUEST_PYTHON:
        return {}
    tag = f"cpython-{GUEST_PYTHON[0]}{GUEST_PYTHON[1]}"
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="dma-harness-pyc-") as tmp:
        for guest_path, data in sources.items():
            name = guest_path.rsplit("/", 1)[1]
            src = Path(tmp) / name
            src.write_bytes(data)
            pyc = Path(tmp) / (name + "c")
            py_compile.compile(str(src), cfile=str(pyc), dfile="/" + guest_path, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            folder, stem = guest_path.rsplit("/", 1)[0], name[:-3]
            out[f"{folder}/__pycache__/{stem}.{tag}.pyc"] = pyc.read_bytes()
    return out


def ensure_initrd(cache: ImageCache, key_pair: SSHKey, *, refresh: bool = False) -> Initrd:
    """Return the initrds (full, and the split flavour's if the base has a ``/usr``
    image), building whichever layer is stale."""
    base = ensure_base(cache, refresh=refresh)
    r = recipes_dir() / "rootfs"
    agent = _agent_files()
    agent.update(agent_bytecode(agent))
    pub = key_pair.public_line().encode() + b"\n"
    overlay: dict[str, bytes] = {"init": (r / "init").read_bytes(), "etc/fstab": (r / "fstab").read_bytes(),
                                 "etc/dma-harness/start-agent": (r / "start-agent").read_bytes(),
                                 "etc/ssh/sshd_config.d/dma-harness.conf": (r / "sshd_config").read_bytes(),
                                 "etc/ssh/authorized_keys/root": pub}
    overlay.update(agent)
    split = (base / usr_image.USR_IMAGE).is_file()
    usr_init = (r / USR_INIT.lstrip("/")).read_bytes()
    usr_fstab = (r / "fstab.usr").read_bytes()
    key = content_key({"base": base.name, **overlay, "magic": importlib.util.MAGIC_NUMBER.hex(),
                       "split": (usr_init + usr_fstab).decode() if split else ""})
    host_key = (base / "ssh_host_ed25519_key.pub").read_text().strip()
    with cache.lock("initrd", key):
        if not cache.complete("initrd", key):
            with cache.building("initrd", key, private=True) as out:
                _write_initrd(out / "initrd.cpio", base / "base.cpio", overlay)
                if split:
                    extra = {USR_INIT.lstrip("/"): usr_init, "busybox": (base / usr_image.BUSYBOX).read_bytes(),
                             "etc/fstab.usr": usr_fstab}
                    _write_initrd(out / "initrd-usr.cpio", base / usr_image.REST_CPIO, overlay, extra)
                (out / "manifest.json").write_text(json.dumps({"key": key, "base": base.name}) + "\n")
            _prune_initrds(cache, keep=KEEP_INITRDS)
        for entry in cache.path("initrd").iterdir():  # older entries hold the same host keys
            if entry.is_dir() and not entry.is_symlink():
                make_private(entry, "initrd.cpio", "initrd-usr.cpio")
    entry = cache.entry("initrd", key)
    if split:
        return Initrd(entry / "initrd.cpio", host_key, base / usr_image.USR_IMAGE, entry / "initrd-usr.cpio")
    return Initrd(entry / "initrd.cpio", host_key)


_EXECUTABLE = ("init", USR_INIT.lstrip("/"), "busybox")
_SECRET = ("etc/ssh/authorized_keys/root",)


def _write_initrd(target: Path, base_cpio: Path, overlay: dict[str, bytes],
                  extra: dict[str, bytes] | None = None) -> None:
    """``base_cpio`` followed by a second archive with ``overlay`` and ``extra``
    (guest path -> content; the folders they need are created; ``init``,
    ``init.usr`` and ``busybox`` executable). The kernel unpacks concatenated
    archives in order, so the overlay's files replace the base's."""
    shutil.copyfile(base_cpio, target)
    make_private(target.parent, target.name)  # the guest's SSH host private keys are in it
    files = {**overlay, **(extra or {})}
    with open(target, "ab") as fh:
        w = NewcWriter(fh)
        made: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folder = "/".join(parts[:i])
                if folder not in made and folder not in ("etc", "etc/ssh", "etc/ssh/sshd_config.d"):
                    w.add_dir(folder)
                made.add(folder)
            perm = 0o755 if name in _EXECUTABLE else 0o600 if name in _SECRET else 0o644
            w.add_file(name, files[name], perm)
        w.close()


def _prune_initrds(cache: ImageCache, keep: int) -> None:
    """Each overlay edit makes a new full-size initrd; keep only the ``keep`` most
    recently built or used, never one a live session holds (ImageCache.prune; a
    running QEMU has already read its initrd into guest memory)."""
    cache.prune("initrd", keep)
