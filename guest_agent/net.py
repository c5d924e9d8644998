"""Packets through a virtio-net device to a peer that echoes them.

The peer is QEMU's user-mode network (slirp), which answers ICMP echo requests
to its own address with the request's payload.  The guest sends echo requests
of a seeded payload from a raw ICMP socket bound to the device's interface and
checks that every reply carries exactly that payload: the bytes went out
through the device's TX buffers and came back through its RX buffers, both
reached by the device through the IOMMU.

Ops:
  ``net.setup``         find the interface by MAC, give it an address, bring it up
  ``net.down``          bring it down: the device does no DMA after the workload
  ``net.ping_pattern``  echo ``count`` packets of ``size`` payload bytes and verify them
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time
from typing import Any

from guest_agent.nvme import pattern
from guest_agent.protocol import op
from guest_agent.tracefs import marker_fd

SO_BINDTODEVICE = 25
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
MAX_PAYLOAD = 1472
"""Largest echo payload that fits one 1500-byte frame (20 B IP + 8 B ICMP headers)."""


def _iface_by_mac(mac: str) -> str:
    """The interface whose address is ``mac``; raises OSError (ENODEV) if none."""
    for name in sorted(os.listdir("/sys/class/net")):
        try:
            with open(f"/sys/class/net/{name}/address") as fh:
                if fh.read().strip().lower() == mac.lower():
                    return name
        except OSError:
            continue
    raise OSError(19, f"no network interface has MAC address {mac}")


def _pci_of(iface: str) -> str | None:
    path = os.path.realpath(f"/sys/class/net/{iface}/device")
    for part in reversed(path.split("/")):
        if part.count(":") == 2 and "." in part:
            return part
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise OSError(5, f"ip {' '.join(args)}: {proc.stderr.strip()}")


@op("net.setup")
def setup(mac: str, addr: str, prefix: int = 24) -> dict[str, Any]:
    """Give the interface with MAC ``mac`` the address ``addr``/``prefix`` and bring it up.

    Returns ``{"iface": name, "pci": "0000:01:00.0" or None, "addr": addr}``.
    Raises OSError if no interface has the MAC or ``ip`` fails.
    """
    iface = _iface_by_mac(mac)
    try:  # no IPv6 chatter (router solicitations, MLD) from the device under test
        with open(f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6", "w") as fh:
            fh.write("1")
    except OSError:
        pass
    _ip("addr", "flush", "dev", iface)
    _ip("addr", "add", f"{addr}/{prefix}", "dev", iface)
    _ip("link", "set", iface, "up")
    return {"iface": iface, "pci": _pci_of(iface), "addr": addr}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = _checksum(head + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


@op("net.ping_pattern")
def ping_pattern(iface: str, peer: str, count: int = 256, size: int = 1400, seed: int = 1,
                 window: int = 8, reply_timeout: float = 5.0) -> dict[str, Any]:
    """Send ``count`` ICMP echo requests of ``size`` payload bytes (seeded
    pattern, different for each packet) to ``peer`` through ``iface``, with
    at most ``window`` unanswered at once, and verify each reply's payload.

    Returns a record: iface, peer, count, size, ``sent``, ``received`` (replies
    of this run), ``lost`` (sequence numbers never answered within ``reply_timeout``
    seconds of being sent), ``mismatches`` (sequence numbers whose reply
    payload differed), ``verified`` (every packet answered with its own
    payload), ``bytes_verified``, timings.  The guest trace gets a marker
    ``dma-harness net begin ...`` / ``... end`` around the run.
    Raises ValueError for a size outside 1..1472 or count outside 1..65535,
    OSError if the socket cannot be opened or bound.
    """
    if not 1 <= size <= MAX_PAYLOAD:
        raise ValueError(f"size must be 1..{MAX_PAYLOAD} bytes (one frame)")
    if not 1 <= count <= 65535:
        raise ValueError("count must be 1..65535")
    ident = os.getpid() & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    marks = marker_fd()
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, iface.encode() + b"\0")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if marks is not None:
            os.write(marks, f"dma-harness net begin iface={iface} count={count} size={size}".encode())
        sent_at: dict[int, float] = {}
        answered: set[int] = set()
        mismatches: list[int] = []
        lost: list[int] = []
        next_seq = 0
        t0 = time.monotonic()
        while len(answered) + len(lost) < count:
            now = time.monotonic()
            for seq, when in list(sent_at.items()):
                if now - when > reply_timeout:
                    lost.append(seq)
                    del sent_at[seq]
            while next_seq < count and len(sent_at) < window:
                payload = pattern(seed, next_seq * size, size)
                sock.sendto(_echo_request(ident, next_seq, payload), (peer, 0))
                sent_at[next_seq] = time.monotonic()
                next_seq += 1
            if not sent_at:
                continue
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            data = sock.recv(65535)
            ihl = (data[0] & 0xF) * 4
            icmp = data[ihl:]
            if len(icmp) < 8:
                continue
            kind, _code, _csum, rid, seq = struct.unpack("!BBHHH", icmp[:8])
            if kind != ICMP_ECHO_REPLY or rid != ident or seq not in sent_at:
                continue
            del sent_at[seq]
            answered.add(seq)
            if icmp[8:] != pattern(seed, seq * size, size):
                mismatches.append(seq)
        elapsed = time.monotonic() - t0
    finally:
        sock.close()
        if marks is not None:
            os.write(marks, b"dma-harness net end")
            os.close(marks)
    return {"iface": iface, "peer": peer, "count": count, "size": size, "seed": seed, "sent": next_seq,
            "received": len(answered), "lost": sorted(lost)[:64], "lost_count": len(lost),
            "mismatches": sorted(mismatches)[:64], "verified": not lost and not mismatches,
            "bytes_verified": (len(answered) - len(mismatches)) * size, "seconds": round(elapsed, 4)}


@op("net.down")
def down(iface: str) -> dict[str, Any]:
    """Bring ``iface`` down (its driver stops the queues and unmaps its buffers), so
    that the device does no DMA after the workload: the guest's trace is collected
    while the guest runs, and DMA the guest log no longer covers (an ARP refresh
    after the collection) could not be judged.  Raises OSError if ``ip`` fails."""
    _ip("link", "set", iface, "down")
    return {"iface": iface}
