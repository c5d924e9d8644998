"""Writing ``newc`` cpio archives (the format of a Linux initramfs), and turning a
tar archive (mmdebstrap's output) into one without unpacking it on disk, so no
root privileges are needed. Hard links are stored as full copies.

Format: Documentation/driver-api/early-userspace/buffer-format.rst in Linux.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_TRAILER = "TRAILER!!!"


class NewcWriter:
    """Append entries to a binary stream in newc format; call :meth:`close` for the trailer."""

    def __init__(self, out: BinaryIO):
        self._out = out
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", *, uid: int = 0, gid: int = 0,
               mtime: int = 0, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, uid, gid, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % (f & 0xFFFFFFFF) for f in fields)
        self._out.write(header + encoded + _pad(len(header) + len(encoded)))
        if data:
            self._out.write(data + _pad(len(data)))

    def add_dir(self, name: str, perm: int = 0o755, *, uid: int = 0, gid: int = 0, mtime: int = 0) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2, uid=uid, gid=gid, mtime=mtime)

    def add_file(self, name: str, data: bytes, perm: int = 0o644, *, uid: int = 0, gid: int = 0,
                 mtime: int = 0) -> None:
        self._entry(name, stat.S_IFREG | perm, data, uid=uid, gid=gid, mtime=mtime)

    def add_symlink(self, name: str, target: str, *, uid: int = 0, gid: int = 0, mtime: int = 0) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode(), uid=uid, gid=gid, mtime=mtime)

    def add_node(self, name: str, kind: int, perm: int, major: int, minor: int, *, uid: int = 0,
                 gid: int = 0, mtime: int = 0) -> None:
        self._entry(name, kind | perm, rdev=(major, minor), uid=uid, gid=gid, mtime=mtime)

    def close(self) -> None:
        self._entry(_TRAILER, 0, nlink=1)
        self._out.flush()


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def tar_to_newc(tar_path: Path, out_path: Path, skip: Callable[[str], bool] | None = None) -> int:
    """Convert ``tar_path`` to a newc archive at ``out_path``; return the entry count.

    ``skip(name)`` (name relative, without a leading ``./``) drops entries from the output.
    """
    count = 0
    with tarfile.open(tar_path) as tar, open(out_path, "wb") as out:
        writer = NewcWriter(out)
        for member in tar:
            name = os.path.normpath(member.name.lstrip("/"))
            if name in (".", "") or (skip is not None and skip(name)):
                continue
            common = {"uid": member.uid, "gid": member.gid, "mtime": int(member.mtime)}
            perm = member.mode & 0o7777
            if member.isdir():
                writer.add_dir(name, perm, **common)
            elif member.issym():
                writer.add_symlink(name, member.linkname, **common)
            elif member.islnk():
                target = tar.getmember(member.linkname)
                src = tar.extractfile(target)
                writer.add_file(name, src.read() if src else b"", target.mode & 0o7777, **common)
            elif member.isfile():
                src = tar.extractfile(member)
                writer.add_file(name, src.read() if src else b"", perm, **common)
            elif member.ischr() or member.isblk() or member.isfifo():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
                writer.add_node(name, kind, perm, member.devmajor, member.devminor, **common)
            else:
                continue
            count += 1
        writer.close()
    return count
