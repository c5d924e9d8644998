"""QEMU builds the harness provides, by version name (``10.0``, ``7.2``), and how a
``--qemu`` / ``--dma-qemu`` / ``DMA_HARNESS_QEMU`` value becomes a binary.

A provided QEMU is Debian's ``qemu-system-x86`` of one suite (10.0 from
``bookworm-backports``, 7.2 from ``bookworm``), downloaded with the harness's private
apt state (:mod:`harness.images.apt`: the system's apt sources are never read or
touched) together with what must match it: ``qemu-system-common`` and
``qemu-system-data`` of the same version, the firmware its package asks for
(``seabios``, ``ipxe-qemu``), and any shared library it depends on that the host
lacks. Everything is unpacked with ``dpkg-deb -x`` into one cache entry::

    qemu/<key>/usr/...                      the packages' files
    qemu/<key>/bin/qemu-system-x86_64       a wrapper: the real binary with -L for
                                            its own data, firmware and modules
    qemu/<key>/manifest.json                name, suite, package versions, sha256s

Debian builds QEMU with fixed data paths (``/usr/share/qemu``, ``/usr/share/seabios``,
``/usr/lib/ipxe/qemu``: ``-L help`` lists them), so the wrapper puts the entry's own
folders first with ``-L`` (QEMU's system/datadir.c searches them in order) and
points ``QEMU_MODULE_DIR`` at the entry's modules; ``LD_LIBRARY_PATH`` is set only
when a library had to be unpacked. The wrapper ``exec``s QEMU, so the process the
harness starts is QEMU itself (same pid, ``comm`` ``qemu-system-x86``).

The key covers the recipe (version name, suite, packages, recipe version), not the
Debian point release the suite has today: ``images build qemu --version 10.0
--refresh`` picks up a newer one, and the manifest records what was unpacked.

Version names and values (:func:`resolve_qemu_option`, mirrored for kernels):

- ``default`` or nothing: ``qemu-system-x86_64`` on PATH (Debian bookworm's 7.2 on the
  project's machines);
- a version name of :data:`QEMU_VERSIONS`: the provided build, built if missing;
- a folder holding ``qemu-system-x86_64`` (a user's QEMU build directory; QEMU finds
  its ``pc-bios`` through the build tree's ``qemu-bundle``);
- anything else: a binary path or a name on PATH (:func:`harness.vm.machine.find_qemu`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError, ImageError
from harness.images.apt import download_packages
from harness.images.cache import ImageCache, content_key
from harness.images.steps import announce, run_step

__all__ = [
    "DEFAULT_NAME",
    "QEMU_VERSIONS",
    "QemuRecipe",
    "QemuBuild",
    "QemuChoice",
    "is_version_name",
    "qemu_key",
    "cached_qemu",
    "ensure_qemu",
    "build_of_binary",
    "resolve_qemu_option",
]

RECIPE_VERSION = "qemu-recipe-1"
DEFAULT_NAME = "default"
"""The version name of the QEMU on PATH (no build of the harness's)."""
BINARY = "qemu-system-x86_64"
ARCH_LIBDIR = "usr/lib/x86_64-linux-gnu"
_VERSION_NAME = re.compile(r"[0-9]+\.[0-9]+")


@dataclass(frozen=True)
class QemuRecipe:
    """What a provided QEMU is made of: ``packages`` as ``(package, suite)``; the
    first is the emulator, whose library dependencies the host lacks are fetched
    from ``lib_suite``. ``upstream`` is the ``major.minor`` the binary must report."""

    name: str
    packages: tuple[tuple[str, str], ...]
    lib_suite: str
    upstream: str

    @property
    def suites(self) -> tuple[str, ...]:
        return tuple(sorted({suite for _, suite in self.packages} | {self.lib_suite}))


QEMU_VERSIONS: dict[str, QemuRecipe] = {
    "10.0": QemuRecipe("10.0", (("qemu-system-x86", "bookworm-backports"),
                                ("qemu-system-common", "bookworm-backports"),
                                ("qemu-system-data", "bookworm-backports"),
                                ("seabios", "bookworm-backports"),   # qemu-system-x86 10.0 needs seabios >> 1.16.3
                                ("ipxe-qemu", "bookworm")),
                       lib_suite="bookworm", upstream="10.0"),
    "7.2": QemuRecipe("7.2", (("qemu-system-x86", "bookworm"),
                              ("qemu-system-common", "bookworm"),
                              ("qemu-system-data", "bookworm"),
                              ("seabios", "bookworm"),
                              ("ipxe-qemu", "bookworm")),
                      lib_suite="bookworm", upstream="7.2"),
}
"""The QEMU versions the harness can provide, by version name."""


@dataclass(frozen=True)
class QemuBuild:
    """A provided QEMU in the cache: ``path`` is its wrapper (what to run), ``name``
    the version name, ``key`` the cache key, ``packages`` ``{package: Debian version}``."""

    path: Path
    name: str
    key: str
    packages: dict[str, str]


@dataclass(frozen=True)
class QemuChoice:
    """What a ``--qemu`` value resolved to: ``path`` (an executable), ``origin``
    (``"provided"``, ``"build-dir"``, ``"path"``), ``name`` (the version name of a
    provided build, else None), ``key`` (its cache key, else None) and ``value``
    (what the user gave, None for the default)."""

    path: str
    origin: str
    value: str | None = None
    name: str | None = None
    key: str | None = None


def is_version_name(value: str) -> bool:
    """True for ``default`` and for ``MAJOR.MINOR`` (``10.0``): never a path, since a
    path holds a ``/`` (a file named ``10.0`` in the current folder is ``./10.0``)."""
    return value == DEFAULT_NAME or _VERSION_NAME.fullmatch(value) is not None


def _recipe(name: str) -> QemuRecipe:
    recipe = QEMU_VERSIONS.get(name)
    if recipe is None:
        known = ", ".join([DEFAULT_NAME, *QEMU_VERSIONS])
        raise ConfigError(f"QEMU version {name!r} is not one the harness provides (known: {known}); "
                          "give a path to a qemu-system-x86_64 or a QEMU build folder instead", key="qemu")
    return recipe


def qemu_key(name: str) -> str:
    """The cache key of the provided QEMU ``name`` (from the recipe only: nothing is read
    or downloaded). Raises ConfigError for an unknown name."""
    recipe = _recipe(name)
    return content_key({"recipe": RECIPE_VERSION, "name": recipe.name, "upstream": recipe.upstream,
                        "packages": " ".join(f"{p}/{s}" for p, s in recipe.packages), "libs": recipe.lib_suite})


def cached_qemu(cache: ImageCache, name: str) -> QemuBuild | None:
    """The cached build of ``name``, or None (nothing is built or downloaded)."""
    key = qemu_key(name)
    if not cache.complete("qemu", key):
        return None
    manifest = cache.manifest("qemu", key)
    return QemuBuild(cache.entry("qemu", key) / "bin" / BINARY, name, key, dict(manifest.get("packages", {})))


def ensure_qemu(cache: ImageCache, name: str, *, refresh: bool = False) -> QemuBuild:
    """Return the provided QEMU ``name``, downloading and unpacking it first if it is not
    cached (about 15 MB of .debs; seconds on a good link).

    Raises:
        ConfigError: ``name`` is not a version the harness provides.
        ImageError: a download, unpack or check failed (the log file is named), e.g. the
            unpacked binary reports another version or lacks a shared library.
    """
    key = qemu_key(name)
    with cache.lock("qemu", key):
        if refresh and cache.complete("qemu", key):
            shutil.rmtree(cache.entry("qemu", key))
        if not cache.complete("qemu", key):
            _build(cache, _recipe(name), key)
    build = cached_qemu(cache, name)
    assert build is not None
    return build


def build_of_binary(path: str | os.PathLike[str]) -> QemuBuild | None:
    """The provided build whose wrapper ``path`` is (its entry's ``manifest.json``
    names it), or None for any other binary. Never raises."""
    try:
        entry = Path(path).resolve().parent.parent
        manifest = json.loads((entry / "manifest.json").read_text())
        if manifest.get("kind") != "qemu" or Path(path).name != BINARY:
            return None
        return QemuBuild(entry / "bin" / BINARY, str(manifest["name"]), str(manifest["key"]),
                         dict(manifest.get("packages", {})))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def resolve_qemu_option(value: str | None, cache: ImageCache, *, build: bool = True) -> QemuChoice:
    """Turn a ``--qemu`` / ``--dma-qemu`` / ``DMA_HARNESS_QEMU`` value into a binary.

    ``None``, ``""`` or ``default``: ``qemu-system-x86_64`` on PATH. A version name
    (:data:`QEMU_VERSIONS`): the provided build in ``cache``, built first if missing
    (with ``build`` False, a missing build is an error naming the build command). A
    folder holding ``qemu-system-x86_64``: that binary. Anything else: a binary path
    or name, checked by :func:`harness.vm.machine.find_qemu`.

    Raises:
        ConfigError: an unknown version name, a folder without ``qemu-system-x86_64``,
            or (``build`` False) a provided version that is not built yet.
        ImageError: building the provided version failed.
        VMError / QEMUNotFound: from ``find_qemu`` (not a file QEMU can run from).
    """
    from harness.vm.machine import find_qemu

    if value in (None, "", DEFAULT_NAME):
        return QemuChoice(find_qemu("qemu-system-x86_64"), "path", value or None)
    assert value is not None
    if is_version_name(value):
        if build:
            provided = ensure_qemu(cache, value)
        else:
            found = cached_qemu(cache, value)
            if found is None:
                raise ConfigError(f"QEMU {value} is not built in {cache.root}: run "
                                  f"python -m harness images build qemu --version {value}", key="qemu")
            provided = found
        return QemuChoice(str(provided.path), "provided", value, provided.name, provided.key)
    if os.sep in value and Path(value).is_dir():
        binary = Path(value) / BINARY
        if not binary.is_file():
            raise ConfigError(f"QEMU folder {value!r} holds no {BINARY} (give a QEMU build folder, a binary "
                              "or a version name)", key="qemu")
        return QemuChoice(find_qemu(str(binary.resolve())), "build-dir", value)
    provided_path = find_qemu(value)
    found_build = build_of_binary(provided_path)
    if found_build is not None:
        return QemuChoice(provided_path, "provided", value, found_build.name, found_build.key)
    return QemuChoice(provided_path, "path", value)


# ---------------------------------------------------------------------------- build

_WRAPPER = """#!/bin/sh
# QEMU {name} ({packages}), unpacked by dma-harness (harness/images/qemu.py).
# Debian's QEMU looks for its data in fixed system folders: the entry's own come first.
d=$(dirname "$(dirname "$(readlink -f "$0")")")
QEMU_MODULE_DIR="$d/{libdir}/qemu"
export QEMU_MODULE_DIR
{libpath}exec "$d/usr/bin/{binary}" -L "$d/usr/share/qemu" -L "$d/usr/share/seabios" -L "$d/usr/lib/ipxe/qemu" "$@"
"""


def _host_has(package: str) -> bool:
    """The host has ``package`` installed (dpkg); True when there is no dpkg to ask."""
    if shutil.which("dpkg-query") is None:
        return True
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True, text=True,
                          check=False)
    return proc.returncode == 0 and proc.stdout.strip().endswith(" installed")


def _lib_packages(deb: Path) -> list[str]:
    """The library packages (``lib*``) the .deb depends on, without version constraints
    or alternatives beyond the first (Debian's ``Depends`` field)."""
    out = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=False)
    names = []
    for item in out.stdout.split(","):
        name = item.split("|")[0].strip().split(" ")[0].split(":")[0]
        if name.startswith("lib"):
            names.append(name)
    return names


def _check_binary(binary: Path, recipe: QemuRecipe, log: Path) -> str:
    """Run ``binary -version``; return its first line. Raises ImageError if it does
    not run, lacks a library, or reports another upstream version."""
    try:
        proc = subprocess.run([str(binary), "-version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"the unpacked QEMU {recipe.name} does not run: {exc}", log=str(log)) from exc
    with open(log, "a") as fh:
        fh.write(f"\n==> {binary} -version\n{proc.stdout}{proc.stderr}")
    first = proc.stdout.splitlines()[0] if proc.stdout else ""
    if proc.returncode != 0:
        raise ImageError(f"the unpacked QEMU {recipe.name} does not run: {(proc.stderr or first).strip()[:300]}",
                         log=str(log))
    if f"version {recipe.upstream}." not in first:
        raise ImageError(f"the unpacked QEMU reports {first!r}, not version {recipe.upstream}", log=str(log))
    return first


def _build(cache: ImageCache, recipe: QemuRecipe, key: str) -> None:
    started = time.monotonic()
    log = cache.path("qemu", f"{key}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"qemu {recipe.name} {key}\n")
    announce(f"fetching QEMU {recipe.name} (Debian {', '.join(recipe.suites)}); log: {log}")
    downloads = cache.path("downloads", f"qemu-{key}")
    shutil.rmtree(downloads, ignore_errors=True)
    try:
        debs = download_packages(cache, recipe.packages, recipe.suites, dest=downloads, log=log)
        emulator = debs[recipe.packages[0][0]][0]
        missing_libs = [p for p in _lib_packages(emulator) if not _host_has(p)]
        if missing_libs:
            debs.update(download_packages(cache, [(p, recipe.lib_suite) for p in missing_libs], recipe.suites,
                                          dest=downloads, log=log))
        with cache.building("qemu", key) as out:
            for deb, _version in debs.values():
                run_step(f"unpack {deb.name}", ["dpkg-deb", "-x", deb, out], log=log)
            real = out / "usr" / "bin" / BINARY
            if not real.is_file():
                raise ImageError(f"the packages of QEMU {recipe.name} hold no usr/bin/{BINARY}", log=str(log))
            libpath = ""
            if missing_libs:
                libpath = (f'LD_LIBRARY_PATH="$d/{ARCH_LIBDIR}:$d/lib/x86_64-linux-gnu'
                           '${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\nexport LD_LIBRARY_PATH\n')
            wrapper = out / "bin" / BINARY
            wrapper.parent.mkdir()
            wrapper.write_text(_WRAPPER.format(
                name=recipe.name, binary=BINARY, libdir=ARCH_LIBDIR, libpath=libpath,
                packages=", ".join(f"{p} {v}" for p, (_, v) in sorted(debs.items()))))
            wrapper.chmod(0o755)
            version_line = _check_binary(wrapper, recipe, log)
            (out / "manifest.json").write_text(json.dumps({
                "kind": "qemu", "key": key, "name": recipe.name, "version": version_line,
                "suites": list(recipe.suites),
                "packages": {p: v for p, (_, v) in sorted(debs.items())},
                "libraries_unpacked": missing_libs,
                "deb_sha256": {p: hashlib.sha256(d.read_bytes()).hexdigest() for p, (d, _) in sorted(debs.items())},
                "seconds": round(time.monotonic() - started, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=2) + "\n")
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    announce(f"QEMU {recipe.name} ready: {cache.entry('qemu', key) / 'bin' / BINARY} ({version_line})")
