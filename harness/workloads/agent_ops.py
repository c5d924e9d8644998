"""Replay of saved guest agent ops (what a pytest test ran, from its artifacts)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import ConfigError
from harness.vm.agent import AgentChannel
from harness.workloads.base import Workload, _check_timeout, register


@dataclass(frozen=True)
class AgentOps(Workload):
    """Replay guest agent ops in order: ``ops`` is a list of ``{"op": name, "args": {...}}``
    (what a pytest test ran through ``vm.agent``, saved in its failure artifacts).
    Each op's result is returned as a record ``{"op": name, **result}``."""

    kind: ClassVar[str] = "agent-ops"
    ops: tuple[dict[str, Any], ...] = ()
    timeout: float = 120.0

    def __post_init__(self) -> None:
        _check_timeout(self.timeout)
        ops = _agent_ops()
        for i, entry in enumerate(self.ops):
            if not isinstance(entry, dict) or not isinstance(entry.get("op"), str) \
                    or not isinstance(entry.get("args", {}), dict) or set(entry) - {"op", "args"}:
                raise ConfigError(f"ops[{i}] must be a table with a string 'op' and an 'args' table", key=f"ops[{i}]")
            handler = ops.get(entry["op"])
            if handler is None:
                raise ConfigError(f"ops[{i}]: unknown guest agent op {entry['op']!r} (known: {', '.join(sorted(ops))})",
                                  key=f"ops[{i}].op")
            try:
                inspect.signature(handler).bind(**entry.get("args", {}))
            except TypeError as exc:
                raise ConfigError(f"ops[{i}]: arguments of {entry['op']!r} do not fit it: {exc}",
                                  key=f"ops[{i}].args") from None

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records = []
        for entry in self.ops:
            result = agent.call(entry["op"], timeout=self.timeout, **entry.get("args", {}))
            records.append({"op": entry["op"], **(result if isinstance(result, dict) else {"result": result})})
        return records

    def to_table(self) -> dict[str, Any]:
        return {"kind": self.kind, "ops": [dict(e) for e in self.ops], "timeout": self.timeout}


def _agent_ops() -> dict[str, Callable[..., Any]]:
    """The guest agent's ops by name (the agent baked into the guest is this package;
    every module of it is imported, as the agent does at start-up)."""
    from guest_agent.__main__ import load_ops
    from guest_agent.protocol import OPS
    load_ops()
    return dict(OPS)



register(AgentOps)
