"""Running one image build step: argv (never a shell), output to a log file,
progress shown with rich, a failure raised as :class:`ImageError` naming the log."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console

from harness.errors import ImageError

_console = Console(stderr=True)


def announce(message: str) -> None:
    _console.print(f"[bold cyan]images[/]: {message}", highlight=False)


def run_step(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    log: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run ``argv`` with stdout+stderr appended to ``log``; show a spinner meanwhile.

    Raises:
        ImageError: the program is missing or exited non-zero; the message names
            the step and the log file, and quotes the log's last lines.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [os.fspath(a) for a in argv]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    start = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(f"\n==> {name}: {' '.join(cmd)}\n".encode())
        fh.flush()
        try:
            with _console.status(f"[cyan]{name}[/] (log: {log})", spinner="dots"):
                proc = subprocess.run(cmd, cwd=cwd, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError as exc:
            raise ImageError(f"{name}: program {cmd[0]!r} not found", log=str(log)) from exc
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        tail = _tail(log, 15)
        raise ImageError(f"{name} failed with exit status {proc.returncode}\n{tail}", log=str(log))
    announce(f"{name} done in {elapsed:.1f}s")


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    return "\n".join("  | " + line for line in lines)
