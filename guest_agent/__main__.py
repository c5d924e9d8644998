"""Entry point: ``python3 -m guest_agent --serial NAME`` or ``--stdio``.

Start-up is on the boot's critical path (the host waits for the hello), so this
module imports only what the hello needs: the command line is two flags, parsed by
hand (argparse alone costs ~0.15 s of a TCG vCPU), and op modules are imported on
first use (guest_agent.protocol.lookup).
"""

from __future__ import annotations

import os
import sys
import time

from guest_agent import system
from guest_agent.protocol import load_all, serve

USAGE = "usage: guest_agent (--serial NAME | --stdio)"


def load_ops() -> None:
    """Import every module of the agent: each registers its ops with ``@op``."""
    load_all()


def parse_args(argv: list[str]) -> str | None:
    """The virtio-serial port name of ``--serial NAME``, or ``None`` for ``--stdio``.
    Exits with status 2 and the usage line on anything else."""
    if argv == ["--stdio"]:
        return None
    if len(argv) == 2 and argv[0] == "--serial" and argv[1]:
        return argv[1]
    if len(argv) == 1 and argv[0].startswith("--serial=") and len(argv[0]) > len("--serial="):
        return argv[0].split("=", 1)[1]
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        raise SystemExit(0)
    print(USAGE, file=sys.stderr)
    raise SystemExit(2)


def find_port(name: str, timeout: float = 30.0) -> str:
    """The /dev/vportNpM node of the virtio-serial port called ``name`` (no udev here)."""
    deadline = time.monotonic() + timeout
    while True:
        base = "/sys/class/virtio-ports"
        if os.path.isdir(base):
            for port in os.listdir(base):
                try:
                    with open(f"{base}/{port}/name") as fh:
                        if fh.read().strip() == name:
                            return f"/dev/{port}"
                except OSError:
                    continue
        if time.monotonic() > deadline:
            raise SystemExit(f"guest_agent: no virtio-serial port named {name!r}")
        time.sleep(0.05)


def main() -> None:
    serial = parse_args(sys.argv[1:])
    hello = {"event": "ready", "uptime": system.uptime(), "pid": os.getpid()}
    if serial is None:
        serve(sys.stdin.buffer, sys.stdout.buffer, hello)
    else:
        path = find_port(serial)
        fd = os.open(path, os.O_RDWR)
        serve(os.fdopen(fd, "rb"), os.fdopen(os.dup(fd), "wb", buffering=0), hello)


if __name__ == "__main__":
    main()
