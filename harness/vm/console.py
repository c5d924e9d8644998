"""The serial console: QEMU writes everything to ``console.log`` (its chardev
logfile, complete even when nobody reads); :class:`Console` attaches pexpect to the
console socket for interaction."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import pexpect
import pexpect.fdpexpect


def tail_lines(path: Path, n: int = 20) -> list[str]:
    """The last ``n`` non-empty lines of a log file ([] if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read().decode(errors="replace")
    except OSError:
        return []
    lines = [ln.rstrip("\r") for ln in data.splitlines() if ln.strip()]
    return lines[-n:]


class Console:
    """An interactive view of the serial console (a root shell once init is done)."""

    PROMPT = "DMAHARNESS# "

    def __init__(self, socket_path: Path, log_path: Path):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(socket_path))
        self.log_path = log_path
        self.pexpect = pexpect.fdpexpect.fdspawn(self._sock.fileno(), timeout=30, encoding="utf-8",
                                                 codec_errors="replace")
        self._shell_ready = False

    def expect(self, pattern: str | Sequence[str], timeout: float = 30.0) -> int:
        return int(self.pexpect.expect(pattern, timeout=timeout))

    def sendline(self, line: str) -> None:
        self.pexpect.sendline(line)

    def run(self, command: str, timeout: float = 30.0) -> str:
        """Run a shell command on the console and return its output (without the echo)."""
        if not self._shell_ready:
            self.sendline(f"export PS1='{self.PROMPT}'; stty -echo")
            self.expect(self.PROMPT, timeout)
            self._shell_ready = True
        self.sendline(command)
        self.expect(self.PROMPT, timeout)
        return str(self.pexpect.before).replace("\r", "").strip("\n")

    def tail(self, n: int = 20) -> list[str]:
        return tail_lines(self.log_path, n)

    def close(self) -> None:
        try:
            self.pexpect.close()
        except (OSError, pexpect.ExceptionPexpect):
            pass
        self._sock.close()
