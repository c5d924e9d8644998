"""The replay file: a minimal failing sequence saved by ``difftest`` so that
``python -m harness difftest --replay FILE`` runs exactly those steps again.

A JSON object (UTF-8)::

    {
      "format": "dma-harness-difftest-replay",
      "version": 1,
      "model": "pinning",                 # the target it belongs to
      "mutant": "unmap-splits" | null,     # the model variant that was compared
      "seed": 1 | null,                    # the search's seed (information only)
      "steps": [{"op": ..., ...}, ...],    # concrete steps, as the target resolved them
      "divergence": {...} | null,          # Divergence.to_dict() of the run that saved it
      "model_error": {...} | null,         # or ModelError.to_dict()
      "command": "python -m harness difftest --replay FILE"
    }

Only ``format``, ``version``, ``model``, ``mutant`` and ``steps`` are read back;
each step is validated by its target (``Target.check_step``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

FORMAT = "dma-harness-difftest-replay"
VERSION = 1
MAX_BYTES = 64 << 20
"""A replay file larger than this is refused unread (a saved sequence is a few KiB)."""


@dataclass(frozen=True)
class ReplayFile:
    """A replay file's content (see the module docstring)."""

    model: str
    mutant: str | None
    steps: list[dict[str, Any]]
    seed: int | None = None
    divergence: dict[str, Any] | None = None
    model_error: dict[str, Any] | None = None

    def to_dict(self, command: str = "") -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "mutant": self.mutant,
                "seed": self.seed, "steps": self.steps, "divergence": self.divergence,
                "model_error": self.model_error, "command": command}


def replay_name(model: str, mutant: str | None, seed: int | None, when: float | None = None) -> str:
    """``pinning-unmap-splits-seed1-20250101-120000.json`` (``model`` for no mutant)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if when is None else when))
    seed_part = f"-seed{seed}" if seed is not None else ""
    return f"{model}-{mutant or 'model'}{seed_part}-{stamp}.json"


def save(replay: ReplayFile, folder: Path) -> Path:
    """Write ``replay`` into ``folder`` (created if needed) under a new name; its path.

    Raises OSError when the folder or file cannot be written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = replay_name(replay.model, replay.mutant, replay.seed)
    path = folder / base
    n = 1
    while path.exists():
        n += 1
        path = folder / base.replace(".json", f"-{n}.json")
    command = f"python -m harness difftest --replay {path}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(replay.to_dict(command), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> ReplayFile:
    """Read a replay file; only its shape is checked here (the steps are checked by
    the target of its model).

    Raises:
        ConfigError: one line naming the file and what is wrong: missing, not a
            regular file, too large, not UTF-8 JSON, not a replay file (no
            ``format`` of :data:`FORMAT`), another version, or a field of the wrong
            type (``model``, ``mutant``, ``steps``).
    """
    p = Path(path)
    name = str(path)

    def bad(what: str) -> ConfigError:
        return ConfigError(f"replay file {name!r} {what}", key="--replay")

    if not p.exists():
        raise bad("does not exist")
    if not p.is_file():
        raise bad("is not a regular file")
    if p.stat().st_size > MAX_BYTES:
        raise bad(f"is larger than {MAX_BYTES >> 20} MiB: not a replay file")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad(f"is not UTF-8 (byte offset {exc.start}): not a replay file") from None
    except RecursionError:
        raise bad("is not JSON: nested too deeply") from None
    except ValueError as exc:
        raise bad(f"is not JSON: {exc}") from None
    except OSError as exc:
        raise bad(f"cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"is not a difftest replay file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise bad(f"has version {data.get('version')!r}; this harness reads version {VERSION}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad(f"has no model name (\"model\" is {model!r})")
    mutant = data.get("mutant")
    if mutant is not None and (not isinstance(mutant, str) or not mutant):
        raise bad(f"has a \"mutant\" that is not a name or null: {mutant!r}")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        raise bad("has no \"steps\" (a non-empty list of step objects)")
    seed = data.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        seed = None
    divergence = data.get("divergence") if isinstance(data.get("divergence"), dict) else None
    model_error = data.get("model_error") if isinstance(data.get("model_error"), dict) else None
    return ReplayFile(model, mutant, steps, seed, divergence, model_error)
