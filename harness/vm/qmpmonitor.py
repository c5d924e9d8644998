"""QMP through qemu.qmp's synchronous shim, with every command, reply and event
appended to a JSON-lines log (the ``qmp.log`` artifact)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.errors import VMError


class QMPMonitor:
    """A connected QMP monitor. The constructor raises :class:`VMError` when QEMU does
    not complete the QMP handshake; ``cmd`` raises it on a QMP error reply or a lost
    connection; :meth:`poll_events` never blocks."""

    def __init__(self, socket_path: Path, log_path: Path, *, nickname: str = "vm"):
        self._log = open(log_path, "a", buffering=1)
        self._qmp = QEMUMonitorProtocol(str(socket_path), nickname=nickname)
        try:
            self.greeting = self._qmp.connect(negotiate=True)
        except (QMPError, OSError, EOFError, asyncio.TimeoutError) as exc:
            self._record("error", repr(exc))
            self._log.close()
            raise VMError(f"cannot connect QMP on {socket_path}: {exc}") from exc
        self._record("greeting", self.greeting)
        self.events: list[dict[str, Any]] = []

    def _record(self, kind: str, payload: Any) -> None:
        self._log.write(json.dumps({"t": round(time.time(), 6), kind: payload}, default=str) + "\n")

    def cmd(self, name: str, timeout: float = 10.0, **args: Any) -> Any:
        self._record("execute", {"execute": name, "arguments": args})
        self._qmp.settimeout(timeout)
        try:
            ret = self._qmp.cmd(name, **args)
        except (QMPError, OSError, EOFError, asyncio.TimeoutError) as exc:
            self._record("error", repr(exc))
            raise VMError(f"QMP {name} failed: {exc!r}") from exc
        self._record("return", ret)
        return ret

    def poll_events(self) -> list[dict[str, Any]]:
        """Events received since the last call (also kept in :attr:`events`)."""
        try:
            new = self._qmp.get_events(wait=False)
        except (QMPError, OSError, EOFError):
            return []
        for ev in new:
            self._record("event", ev)
        self.events.extend(new)
        return new

    def close(self) -> None:
        try:
            self._qmp.close()
        except (QMPError, OSError, EOFError, RuntimeError):
            pass
        self._log.close()
