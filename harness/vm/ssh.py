"""SSH into the guest with paramiko, through a hostfwd bound to 127.0.0.1 on a
free port, with the harness's key and the guest's host key pinned."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import paramiko

from harness.errors import VMError


def connect(port: int, key_path: Path, host_key: str | None, timeout: float = 60.0) -> paramiko.SSHClient:
    """A connected client to root@127.0.0.1:port; retries until sshd answers.

    Raises VMError when no session could be opened within ``timeout`` seconds.
    """
    client = paramiko.SSHClient()
    if host_key:
        kind, blob = host_key.split()[:2]
        client.get_host_keys().add(f"[127.0.0.1]:{port}", kind,
                                   paramiko.Ed25519Key(data=base64.b64decode(blob)))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    pkey = paramiko.Ed25519Key.from_private_key_file(str(key_path))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.connect("127.0.0.1", port=port, username="root", pkey=pkey, allow_agent=False,
                           look_for_keys=False, timeout=5, banner_timeout=10, auth_timeout=10)
            return client
        except paramiko.AuthenticationException as exc:
            client.close()
            raise VMError(f"the guest's sshd refused the harness key ({key_path}) on 127.0.0.1:{port}: {exc}") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            last = exc
            time.sleep(0.2)
    client.close()
    raise VMError(f"no SSH session to the guest on 127.0.0.1:{port} within {timeout:.0f}s: {last!r}")


def run(client: paramiko.SSHClient, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run a command; return (exit status, stdout, stderr)."""
    _, out, err = client.exec_command(command, timeout=timeout)
    status = out.channel.recv_exit_status()
    return status, out.read().decode(errors="replace"), err.read().decode(errors="replace")
