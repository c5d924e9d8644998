"""dma-harness guest agent: runs inside the guest (Python standard library only)
and answers the harness's requests in JSON, one object per line.

Request:  {"id": 7, "op": "nvme.pattern_rw", "args": {...}}
Reply:    {"id": 7, "ok": true, "result": {...}}
      or  {"id": 7, "ok": false, "error": {"type": "OSError", "errno": 5, "message": "..."}}
On start the agent sends {"event": "ready", "uptime": <s>, "pid": <pid>}.

Transports: a virtio-serial port (``--serial NAME``, the default in the image) or
stdin/stdout (``--stdio``, e.g. over an SSH exec channel). One module per kernel
interface; each op returns a record of what it did and what the kernel returned.
"""
