"""Request dispatch shared by every transport.

Op modules are imported on first use, not at start: the agent's hello is what the
host waits for at boot, and under TCG importing every module (ctypes structures,
ioctl tables) costs about half a second of the guest's only vCPU. An op
``"PREFIX.name"`` imports ``guest_agent.PREFIX`` if that module exists; any other
unknown name imports every module once (:func:`load_all`) before it is reported
unknown.
"""

from __future__ import annotations

import importlib
import json
import os

TYPE_CHECKING = False  # typing itself costs ~0.2 s of a TCG vCPU at every boot: for mypy only
if TYPE_CHECKING:
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


_ALL_LOADED = False
_NOT_OP_MODULES = ("__main__", "protocol")


def load_all() -> None:
    """Import every module of the agent: each registers its ops with ``@op``."""
    global _ALL_LOADED
    if _ALL_LOADED:
        return
    for fname in sorted(os.listdir(os.path.dirname(__file__))):
        stem, ext = os.path.splitext(fname)
        if ext == ".py" and stem not in _NOT_OP_MODULES and stem.isidentifier():
            importlib.import_module(f"{__package__}.{stem}")
    _ALL_LOADED = True


def lookup(name: str) -> Handler | None:
    """The handler of op ``name``, importing the module that registers it if needed
    (its prefix's module first, then every module); ``None`` if no module has it."""
    fn = OPS.get(name)
    if fn is not None:
        return fn
    prefix, dot, _ = name.partition(".")
    if dot and prefix.isidentifier() and prefix not in _NOT_OP_MODULES and os.path.isfile(
            os.path.join(os.path.dirname(__file__), prefix + ".py")):
        importlib.import_module(f"{__package__}.{prefix}")
        fn = OPS.get(name)
    if fn is None:
        load_all()
        fn = OPS.get(name)
    return fn


def dispatch(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one op: ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": {...}}``
    (a module that fails to import is reported like a failing op, with its traceback)."""
    try:
        fn = lookup(name)
        if fn is None:
            return {"ok": False, "error": {"type": "UnknownOp", "message": f"unknown op {name!r}",
                                           "known": sorted(OPS)}}
        return {"ok": True, "result": fn(**args)}
    except OSError as exc:
        return {"ok": False, "error": {"type": type(exc).__name__, "errno": exc.errno, "message": str(exc)}}
    except Exception as exc:  # reported to the host, which raises AgentError
        import traceback
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
