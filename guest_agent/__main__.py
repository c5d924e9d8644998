"""Entry point: ``python3 -m guest_agent --serial NAME`` or ``--stdio``."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time

import guest_agent
from guest_agent import system
from guest_agent.protocol import serve


def load_ops() -> None:
    """Import every module of the agent: each registers its ops with ``@op``."""
    for mod in pkgutil.iter_modules(guest_agent.__path__):
        if mod.name not in ("__main__", "protocol"):
            importlib.import_module(f"guest_agent.{mod.name}")


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
    ap = argparse.ArgumentParser(prog="guest_agent")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--serial", metavar="NAME", help="virtio-serial port name")
    g.add_argument("--stdio", action="store_true", help="serve on stdin/stdout")
    args = ap.parse_args()
    load_ops()
    hello = {"event": "ready", "uptime": system.uptime(), "pid": os.getpid()}
    if args.stdio:
        serve(sys.stdin.buffer, sys.stdout.buffer, hello)
    else:
        path = find_port(args.serial)
        fd = os.open(path, os.O_RDWR)
        serve(os.fdopen(fd, "rb"), os.fdopen(os.dup(fd), "wb", buffering=0), hello)


if __name__ == "__main__":
    main()
