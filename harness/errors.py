"""Root of the harness's exceptions.

Hierarchy::

    HarnessError
     +-- ConfigError            bad user input (config file, option, device field); CLI exit 2
     |    +-- DeviceConfigError  unknown or conflicting device/machine option (names the field)
     +-- ImageError             a guest image step failed (names its log file)
     |    +-- KernelConfigError  a required kernel option is missing
     +-- VMError                anything about a running guest
          +-- QEMUNotFound      the QEMU binary is missing (says how to install it)
          +-- VMLaunchError     QEMU exited or failed during start-up (argv, output)
          +-- GuestError        a guest-side failure, with the last console lines
          |    +-- GuestBootTimeout  the guest agent never answered, or QEMU exited
          |    +-- GuestPanicked     the guest kernel panicked (pvpanic / GUEST_PANICKED)
          |    +-- QEMUExited        QEMU exited while the guest was in use (crash, kill)
          |    +-- GuestHung         an agent op got no answer in time (QEMU's run state attached)
          +-- AgentError        the guest agent answered with an error or garbage

The reference models have their own roots (e.g. ``harness.models.iotlb.IOTLBError``)
because they are pure code and usable without the rest of the harness.
"""

from __future__ import annotations

from collections.abc import Sequence


class HarnessError(Exception):
    """Base class of every error the harness raises on purpose."""


class ConfigError(HarnessError, ValueError):
    """Bad user input. ``key`` names the offending key or field when known."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{message}")


class DeviceConfigError(ConfigError):
    """A machine or device field is unknown, out of range or conflicts with another."""


class ImageError(HarnessError):
    """A guest image build step failed; ``log`` is the file holding its output."""

    def __init__(self, message: str, *, log: str | None = None):
        self.log = log
        super().__init__(message + (f" (log: {log})" if log else ""))


class KernelConfigError(ImageError):
    """Required kernel options are not enabled (``missing`` lists them, CONFIG_ names)."""

    def __init__(self, message: str, *, missing: Sequence[str], log: str | None = None):
        self.missing = list(missing)
        super().__init__(message, log=log)


class VMError(HarnessError):
    """Something went wrong with a guest; carries the evidence as fields."""


class QEMUNotFound(VMError):
    def __init__(self, binary: str):
        self.binary = binary
        super().__init__(
            f"QEMU binary {binary!r} not found; install it with "
            "'apt-get install qemu-system-x86 qemu-utils' or pass --dma-qemu / "
            "DMA_HARNESS_QEMU=/path/to/qemu-system-x86_64"
        )


class VMLaunchError(VMError):
    def __init__(self, message: str, *, argv: Sequence[str] = (), output: str = ""):
        self.argv = list(argv)
        self.output = output
        super().__init__(message)

    def __str__(self) -> str:
        text = str(self.args[0])
        if self.output.strip():
            text += "\nQEMU output:\n" + self.output.strip()[-4000:]
        if self.argv:
            text += "\nargv: " + " ".join(self.argv)
        return text


class GuestError(VMError):
    """A guest-side failure; ``console_tail`` holds the last console lines."""

    def __init__(self, message: str, *, console_tail: Sequence[str] = ()):
        self.console_tail = list(console_tail)
        super().__init__(message)

    def __str__(self) -> str:
        tail = "\n".join("  | " + line for line in self.console_tail)
        return str(self.args[0]) + ("\nlast console lines:\n" + tail if tail else " (console is empty)")


class GuestBootTimeout(GuestError):
    """The guest agent did not answer in time, or QEMU exited before it did
    (then ``exitcode`` is QEMU's status: the system under test died, not the input)."""

    def __init__(self, message: str, *, console_tail: Sequence[str] = (), exitcode: int | None = None):
        self.exitcode = exitcode
        super().__init__(message, console_tail=console_tail)


class GuestPanicked(GuestError):
    """The guest kernel panicked (pvpanic, QMP GUEST_PANICKED)."""


class QEMUExited(GuestError):
    """QEMU exited while the guest was in use; ``exitcode`` is its status (negative: signal)."""

    def __init__(self, message: str, *, exitcode: int | None, console_tail: Sequence[str] = ()):
        self.exitcode = exitcode
        super().__init__(message, console_tail=console_tail)


class GuestHung(GuestError):
    """An agent op got no answer within its timeout: ``op``, ``seconds`` (the
    timeout), ``qemu_state`` (QEMU's run state from QMP ``query-status``, or how
    QEMU is not answering or ended)."""

    def __init__(self, message: str, *, op: str, seconds: float, qemu_state: str,
                 console_tail: Sequence[str] = ()):
        self.op = op
        self.seconds = seconds
        self.qemu_state = qemu_state
        super().__init__(message, console_tail=console_tail)


class AgentError(VMError):
    def __init__(self, message: str, *, request: object = None, reply: object = None):
        self.request = request
        self.reply = reply
        super().__init__(message)
