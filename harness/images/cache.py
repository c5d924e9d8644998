"""The image cache: ``<root>/<kind>/<key>/`` directories, one per content hash.

The root is, in order: an explicit path (``--dma-cache``, ``--cache``), the
``DMA_HARNESS_CACHE`` environment variable, or platformdirs' user cache dir
(``~/.cache/dma-harness`` on Linux). An entry is built in a temporary sibling
directory and renamed into place, under an exclusive ``flock`` on
``<kind>/<key>.lock``, so concurrent runs never see half-built entries.

Concurrency (several harness processes at once: pytest-xdist workers, two
checkouts sharing one cache): two processes asking for the same missing entry
serialize on its lock; the first builds it, the second waits and then finds it
complete. A process that boots an entry holds it (:meth:`ImageCache.hold`, a
shared ``flock`` on the entry's ``manifest.json``) and :meth:`ImageCache.prune`
never removes a held entry. Locks are ``flock(2)`` locks: the kernel drops them
when the process dies, so a killed run leaves no stale lock (the lock files
themselves stay, empty).
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

    def hold(self, kind: str, key: str) -> EntryHold | None:
        """Mark the complete entry ``kind/key`` as in use by this process until the
        returned hold is closed (a shared ``flock`` on its ``manifest.json``; any
        number of processes may hold one entry). Holding also touches the manifest,
        so an age-ordered prune counts the entry as just used.

        Returns None when the entry is not complete, or was removed while this call
        waited for a prune that held it: the caller ensures (rebuilds) it again.
        Blocks while :meth:`prune` is deciding about this very entry (milliseconds).
        """
        manifest = self.entry(kind, key) / "manifest.json"
        try:
            fd = os.open(manifest, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            opened = os.fstat(fd)
            try:
                now = os.stat(manifest)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
                os.close(fd)  # pruned (or rebuilt) between our open and our lock
                return None
            os.utime(manifest)
        except BaseException:
            os.close(fd)
            raise
        return EntryHold(manifest, fd)

    def prune(self, kind: str, keep: int) -> list[Path]:
        """Remove the complete entries of ``kind`` but the ``keep`` most recently
        built or held (by ``manifest.json`` mtime), skipping every entry some live
        process holds (:meth:`hold`). Returns the removed entry paths.

        An entry is taken with a non-blocking exclusive ``flock`` on its manifest,
        renamed aside (so it stops being complete at once) and then deleted.
        """
        folder = self.root / kind
        if not folder.is_dir():
            return []
        entries = []
        for d in folder.iterdir():
            with contextlib.suppress(OSError):
                if "." not in d.name and d.is_dir() and not d.is_symlink():  # not NAME.tmp-PID, NAME.pruned-PID
                    entries.append((os.stat(d / "manifest.json").st_mtime, d))
        entries.sort(key=lambda pair: pair[0], reverse=True)
        removed = []
        for _, old in entries[max(keep, 0):]:
            try:
                fd = os.open(old / "manifest.json", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # held: a live process is about to boot it, or is booting it
                doomed = old.with_name(f"{old.name}.pruned-{os.getpid()}")
                try:
                    old.rename(doomed)
                except OSError:
                    continue  # another process pruned it first
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(old)
            finally:
                os.close(fd)
        return removed


class EntryHold:
    """A cache entry held in use (see :meth:`ImageCache.hold`); ``close()`` (or leaving
    the ``with`` block) releases it, as does the process's exit."""

    def __init__(self, manifest: Path, fd: int):
        self.entry = manifest.parent
        self._fd: int | None = fd

    def __repr__(self) -> str:
        return f"EntryHold({str(self.entry)!r}, {'released' if self._fd is None else 'held'})"

    def touch(self) -> None:
        """Mark the entry as just used (its manifest's mtime: what an age-ordered
        prune sorts by); a no-op once released or if the entry is gone."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.utime(self._fd)

    def close(self) -> None:
        """Release the hold; idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EntryHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
