"""The image cache: ``<root>/<kind>/<key>/`` directories, one per content hash.

The root is, in order: an explicit path (``--dma-cache``, ``--cache``), the
``DMA_HARNESS_CACHE`` environment variable, or platformdirs' user cache dir
(``~/.cache/dma-harness`` on Linux). An entry is built in a temporary sibling
directory and renamed into place, under an exclusive ``flock`` on
``<kind>/<key>.lock``, so concurrent runs never see half-built entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import platformdirs

from harness.errors import ImageError

CACHE_ENV = "DMA_HARNESS_CACHE"
APP_NAME = "dma-harness"
RECIPES_PACKAGE = "harness.images.recipes"


def recipes_dir() -> Traversable:
    """The project's image recipes (kernel fragment and required options, rootfs
    package list, init, sshd config): the repository's ``images/`` folder, installed
    as the package ``harness.images.recipes`` and read through importlib.resources,
    so a wheel finds them wherever it is installed.

    Raises:
        ImageError: the package is not installed (an editable install made before
            the recipes were packaged: run ``pip install -e .`` again).
    """
    try:
        return files(RECIPES_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ImageError(f"the image recipes (package {RECIPES_PACKAGE}) are not installed; "
                         "reinstall the project: pip install -e .") from exc


def default_cache_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(platformdirs.user_cache_dir(APP_NAME))


PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
"""Modes of cache entries that hold private keys (the SSH key, the root filesystem
and initrd with the guest's SSH host keys), whatever the umask or the root's mode."""


def make_private(directory: Path, *names: str) -> None:
    """Restrict ``directory`` to its owner (0700) and each existing file ``names`` in it
    to 0600; idempotent, so entries built before this existed are fixed on use."""
    os.chmod(directory, PRIVATE_DIR_MODE)
    for name in names:
        path = directory / name
        if path.is_file() and not path.is_symlink():
            os.chmod(path, PRIVATE_FILE_MODE)


def content_key(parts: Mapping[str, str | bytes]) -> str:
    """A short sha256 over named parts (order-independent in the mapping's keys)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        value = parts[name]
        data = value.encode() if isinstance(value, str) else value
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


class ImageCache:
    """A cache root with keyed entries. ``entry(kind, key)`` is ``root/kind/key``."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = default_cache_root(root)

    def __repr__(self) -> str:
        return f"ImageCache({str(self.root)!r})"

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def complete(self, kind: str, key: str) -> bool:
        return (self.entry(kind, key) / "manifest.json").is_file()

    def manifest(self, kind: str, key: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.entry(kind, key) / "manifest.json").read_text())
        return data

    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Hold an exclusive lock for building ``kind/key`` (blocks while another holds it)."""
        d = self.root / kind
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def building(self, kind: str, key: str, *, private: bool = False) -> Iterator[Path]:
        """A fresh temporary directory that becomes ``kind/key`` if the block succeeds.

        The caller writes its outputs and ``manifest.json`` (last) into it. On any
        exception the temporary directory is removed and nothing is published.
        ``private``: the directory is 0700 from its creation on (the entry holds
        private keys; the caller makes those files 0600).
        """
        final = self.entry(kind, key)
        tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(mode=PRIVATE_DIR_MODE if private else 0o777)
        if private:
            os.chmod(tmp, PRIVATE_DIR_MODE)
        try:
            yield tmp
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
