"""The kernel ABI shared by the agent's ioctl modules (iommufd, vfio, kvm, ...):
ioctl number encoding, one ioctl call that returns the errno instead of raising,
the process's pin and lock counters, and the table of file descriptors the host
refers to by number.

Conventions every ioctl op follows (so the host can compare each one with a model):

- an op never raises for an errno the kernel returned: its record says
  ``{"errno": 0 | E, ...returned fields..., "vm_pin": pages, "vm_lck": pages}``;
  ``vm_pin``/``vm_lck`` are /proc/self/status VmPin/VmLck after the call, in
  4 KiB pages (the unit the models count in);
- a file descriptor the agent opened is kept in :data:`FDS` until the host closes
  it (``fd.close``) or the agent exits; ``fd.close_all`` closes every one.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from guest_agent.protocol import op

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)`` of include/uapi/asm-generic/ioctl.h."""
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def IO(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def IOR(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, type_, nr, size)


def IOW(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, type_, nr, size)


def IOWR(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


def ioctl(fd: int, request: int, arg: ctypes.Array[ctypes.c_char] | ctypes.Structure | int | None = None) -> int:
    """Call ioctl(2); return 0 or the errno (never raises for a kernel error).

    ``arg`` is a ctypes buffer or structure (passed by address, updated in place by
    the kernel), an integer (passed by value) or None (0).
    """
    if arg is None:
        ptr: Any = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.addressof(arg)
    ctypes.set_errno(0)
    rc = _libc.ioctl(fd, request, ptr)
    return ctypes.get_errno() if rc < 0 else 0


def ioctl_rc(fd: int, request: int, arg: Any = None) -> tuple[int, int]:
    """Like :func:`ioctl` but for ioctls whose return value is a result (a new fd):
    ``(rc, errno)``; rc is -1 when errno is set."""
    ptr = None if arg is None else (ctypes.c_void_p(arg) if isinstance(arg, int) else ctypes.addressof(arg))
    ctypes.set_errno(0)
    rc = _libc.ioctl(fd, request, ptr)
    return (rc, ctypes.get_errno() if rc < 0 else 0)


def pin_counters() -> dict[str, int]:
    """VmPin and VmLck of this process, in 4 KiB pages (/proc/self/status gives kB)."""
    out = {"vm_pin": 0, "vm_lck": 0}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmPin:"):
                out["vm_pin"] = int(line.split()[1]) // 4
            elif line.startswith("VmLck:"):
                out["vm_lck"] = int(line.split()[1]) // 4
    return out


def record(errno: int, **fields: Any) -> dict[str, Any]:
    """An op's result: its errno, the fields it returned, then VmPin/VmLck after it."""
    rec: dict[str, Any] = {"errno": errno}
    rec.update(fields)
    rec.update(pin_counters())
    return rec


FDS: dict[int, str] = {}
"""File descriptors this agent opened for the host, with what each is."""


def keep(fd: int, what: str) -> int:
    FDS[fd] = what
    return fd


def open_fd(path: str, flags: int = os.O_RDWR, what: str | None = None) -> dict[str, Any]:
    """open(2) ``path``; the record has ``fd`` (or -1 and the errno)."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        return record(exc.errno or 0, fd=-1, path=path)
    keep(fd, what or path)
    return record(0, fd=fd, path=path)


@op("fd.close")
def close(fd: int) -> dict[str, Any]:
    """close(2) one of the agent's fds (its errno, EBADF for one the agent did not open)."""
    if fd not in FDS:
        return record(9, fd=fd)  # EBADF: the agent never hands out other fds
    del FDS[fd]
    try:
        os.close(fd)
    except OSError as exc:
        return record(exc.errno or 0, fd=fd)
    return record(0, fd=fd)


@op("fd.dup")
def dup(fd: int) -> dict[str, Any]:
    """dup(2): a second fd on the same open file (same ``struct file``)."""
    try:
        new = os.dup(fd)
    except OSError as exc:
        return record(exc.errno or 0, fd=-1)
    keep(new, f"dup of {FDS.get(fd, fd)}")
    return record(0, fd=new)


@op("fd.close_all")
def close_all() -> dict[str, Any]:
    """Close every fd the agent opened for the host (newest first); their count."""
    n = 0
    for fd in sorted(FDS, reverse=True):
        del FDS[fd]
        try:
            os.close(fd)
            n += 1
        except OSError:
            pass
    return record(0, closed=n)


@op("fd.list")
def list_fds() -> dict[str, Any]:
    return {"fds": {str(fd): what for fd, what in sorted(FDS.items())}}
