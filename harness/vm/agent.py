"""Host side of the guest agent channel (JSON lines; see guest_agent/__init__.py)."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from harness.errors import AgentError


class AgentChannel(Protocol):
    """What a workload needs from a guest: call an agent op and get its result."""

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any: ...


class SocketAgent:
    """The agent over a connected stream socket (QEMU's virtio-serial chardev).

    ``check(grace)`` is called while waiting (about every 100 ms, ``grace=0``) and
    when the channel fails (``grace`` > 0: give a dying QEMU that long to be reaped);
    it raises when QEMU exited or the guest panicked, so no wait outlives the guest.
    """

    CHANNEL_GRACE = 3.0
    UNLOGGED = frozenset({"ping", "sysinfo", "tracefs.collect", "tracefs.status", "tracefs.mark"})
    """Ops left out of :attr:`calls` (liveness and the harness's own evidence collection)."""

    def __init__(self, sock: socket.socket, check: Callable[[float], None],
                 on_timeout: Callable[[str, float], BaseException] | None = None):
        self._sock = sock
        self._check = check
        self._on_timeout = on_timeout
        self._buf = bytearray()
        self._next_id = 1
        self.hello: dict[str, Any] | None = None
        self.calls: list[dict[str, Any]] = []
        """Every op the guest ran successfully, in order (except :attr:`UNLOGGED`):
        ``{"op": name, "args": {...}, "result": ...}``: the run's op records."""

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\n" not in self._buf:
            self._check(0.0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer from the guest agent for {what}")
            ready, _, _ = select.select([self._sock], [], [], min(0.1, remaining))
            if ready:
                try:
                    chunk = self._sock.recv(65536)
                except OSError as exc:
                    self._check(self.CHANNEL_GRACE)
                    raise AgentError(f"guest agent channel failed while waiting for {what}: {exc}") from exc
                if not chunk:
                    self._check(self.CHANNEL_GRACE)
                    raise AgentError(f"guest agent channel closed while waiting for {what}")
                self._buf += chunk
        end = self._buf.index(b"\n")
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        try:
            msg: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise AgentError(f"guest agent sent garbage: {line[:200]!r}") from exc
        return msg

    def wait_hello(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline, "its start-up")
            if msg.get("event") == "ready":
                self.hello = msg
                return msg

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        """Run ``op`` in the guest and return its result.

        Raises:
            AgentError: the agent answered with an error (its type, errno, message).
            TimeoutError: no answer within ``timeout`` seconds -- or, when the channel
                was made with ``on_timeout``, what that returns (the VM's
                :class:`~harness.errors.GuestHung`, with QEMU's run state).
        """
        rid = self._next_id
        self._next_id += 1
        request = {"id": rid, "op": op, "args": args}
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            self._check(self.CHANNEL_GRACE)
            raise AgentError(f"cannot send op {op!r} to the guest agent: {exc}", request=request) from exc
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._read_message(deadline, f"op {op!r}")
            except TimeoutError:
                if self._on_timeout is None:
                    raise
                raise self._on_timeout(op, timeout) from None
            if reply.get("id") == rid:
                break
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise AgentError(f"guest agent op {op!r} failed: {err.get('type')}: {err.get('message')}"
                             + (f" (errno {err['errno']})" if err.get("errno") else ""),
                             request=request, reply=reply)
        result = reply.get("result")
        if op not in self.UNLOGGED:
            self.calls.append({"op": op, "args": args, "result": result})
        return result

    def close(self) -> None:
        self._sock.close()
