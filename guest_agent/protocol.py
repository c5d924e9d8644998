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
    fn = OPS.get(name)
    if fn is None:
        return {"id": rid, "ok": False, "error": {"type": "UnknownOp", "message": f"unknown op {name!r}",
                                                  "known": sorted(OPS)}}
    try:
        return {"id": rid, "ok": True, "result": fn(**args)}
    except OSError as exc:
        return {"id": rid, "ok": False, "error": {"type": type(exc).__name__, "errno": exc.errno,
                                                  "message": str(exc)}}
    except Exception as exc:  # reported to the host, which raises AgentError
        return {"id": rid, "ok": False, "error": {"type": type(exc).__name__, "message": str(exc),
                                                  "traceback": traceback.format_exc()}}


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
        if reply.get("ok") and reply.get("result", {}).get("then") == "poweroff":
            from guest_agent import system
            system.power_off()
    os._exit(0)
