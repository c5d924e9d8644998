"""Request dispatch shared by every transport."""

from __future__ import annotations

import json
import os
import traceback
from typing import Any, BinaryIO, Callable

Handler = Callable[..., Any]
OPS: dict[str, Handler] = {}


def op(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        OPS[name] = fn
        return fn
    return register


def handle(line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
        rid = req.get("id")
        name = req["op"]
        args = req.get("args") or {}
    except (ValueError, KeyError, AttributeError) as exc:
        return {"id": None, "ok": False, "error": {"type": "BadRequest", "message": str(exc)}}
    return {"id": rid, **dispatch(name, args)}


def dispatch(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one op: ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": {...}}``."""
    fn = OPS.get(name)
    if fn is None:
        return {"ok": False, "error": {"type": "UnknownOp", "message": f"unknown op {name!r}",
                                       "known": sorted(OPS)}}
    try:
        return {"ok": True, "result": fn(**args)}
    except OSError as exc:
        return {"ok": False, "error": {"type": type(exc).__name__, "errno": exc.errno, "message": str(exc)}}
    except Exception as exc:  # reported to the host, which raises AgentError
        return {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc),
                                       "traceback": traceback.format_exc()}}


@op("batch")
def batch(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``[{"op": name, "args": {...}}, ...]`` in order in one round trip; one
    ``{"ok": ..., "result" | "error": ...}`` per call (a failing call does not stop
    the rest: each ioctl op reports its errno in its result anyway)."""
    return [dispatch(c["op"], c.get("args") or {}) for c in calls]


def serve(rfile: BinaryIO, wfile: BinaryIO, hello: dict[str, Any]) -> None:
    def send(obj: dict[str, Any]) -> None:
        data = memoryview(json.dumps(obj).encode() + b"\n")
        while data:  # a raw write to a virtio port may take only part of a large reply
            written = wfile.write(data)
            data = data[written or 0:]
        wfile.flush()

    send(hello)
    for line in rfile:
        if not line.strip():
            continue
        reply = handle(line)
        send(reply)
        result = reply.get("result")
        if reply.get("ok") and isinstance(result, dict) and result.get("then") == "poweroff":
            from guest_agent import system
            system.power_off()
    os._exit(0)
