"""Debian packages fetched with a private apt state under the image cache
(``<cache>/apt/<suite>/``): the system's apt sources and lists are never read or
touched, so a suite the host does not use (bookworm-backports) works the same as
its own, and no root-owned state changes."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote

from harness.errors import ImageError
from harness.images.cache import ImageCache
from harness.images.steps import run_step

DEBIAN_MIRROR = "http://deb.debian.org/debian"


def apt_options(cache: ImageCache, suite: str) -> list[str]:
    """``apt-get`` options for a private state of ``suite`` (main) under the cache
    (``<cache>/apt/<suite>/``: :func:`apt_options_suites` of that one suite)."""
    return apt_options_suites(cache, [suite])


def download(cache: ImageCache, package: str, suite: str, *, log: Path) -> tuple[Path, str]:
    """Download the candidate ``package`` of ``suite`` into ``<cache>/downloads``.

    Returns the .deb's path and its Debian version. Older downloads of the same
    package are removed first.

    Raises:
        ImageError: apt-get failed (the log is named) or left no .deb.
    """
    apt = apt_options(cache, suite)
    downloads = cache.path("downloads")
    downloads.mkdir(parents=True, exist_ok=True)
    run_step(f"apt-get update ({suite})", ["apt-get", *apt, "update"], log=log)
    for old in glob.glob(str(downloads / f"{package}_*.deb")):
        os.unlink(old)
    run_step(f"download {package}", ["apt-get", *apt, "download", package], log=log, cwd=downloads)
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        raise ImageError(f"apt-get download left no {package} .deb in {downloads}", log=str(log))
    return debs[-1], debs[-1].name.split("_")[1]


def apt_options_suites(cache: ImageCache, suites: Sequence[str]) -> list[str]:
    """``apt-get`` options for one private state holding several suites (main) at
    once, under ``<cache>/apt/<suite>+<suite>/``; a package is then chosen from
    one of them as ``PACKAGE/SUITE``."""
    base = cache.path("apt", "+".join(sorted(suites)))
    (base / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (base / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = base / "sources.list"
    sources.write_text("".join(f"deb {DEBIAN_MIRROR} {suite} main\n" for suite in sorted(suites)))
    return [
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={base / 'lists'}",
        "-o", f"Dir::Cache::Archives={base / 'archives'}",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Sandbox::User=root",
    ]


def download_packages(cache: ImageCache, packages: Sequence[tuple[str, str]], suites: Sequence[str], *,
                      dest: Path, log: Path) -> dict[str, tuple[Path, str]]:
    """Download each ``(package, suite)``'s candidate of that suite into ``dest``
    (created), with one private apt state holding ``suites`` (updated first).

    Returns ``{package: (.deb path, Debian version)}``.

    Raises:
        ImageError: apt-get failed (the log is named) or left no .deb of a package.
    """
    apt = apt_options_suites(cache, suites)
    dest.mkdir(parents=True, exist_ok=True)
    run_step(f"apt-get update ({', '.join(sorted(suites))})", ["apt-get", *apt, "update"], log=log)
    names = [f"{package}/{suite}" for package, suite in packages]
    run_step(f"download {' '.join(p for p, _ in packages)}", ["apt-get", *apt, "download", *names],
             log=log, cwd=dest)
    out: dict[str, tuple[Path, str]] = {}
    for package, _suite in packages:
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if not debs:
            raise ImageError(f"apt-get download left no {package} .deb in {dest}", log=str(log))
        out[package] = (debs[-1], unquote(debs[-1].name.split("_")[1]))
    return out
