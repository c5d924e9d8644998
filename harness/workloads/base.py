"""The workload base: what every workload is (a frozen dataclass built from the
``[workload]`` table of a scenario, run against an
:class:`~harness.vm.agent.AgentChannel`, returning op records: JSON-able dicts of
what the guest did and what the kernel returned), the registry by ``kind``, and
the helpers the workloads share."""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import ConfigError, HarnessError
from harness.vm.agent import AgentChannel


class WorkloadFailed(HarnessError):
    """The guest-side operation did not do what it should (e.g. data did not verify)."""


_DEVICE_RE = re.compile(r"/dev/[A-Za-z0-9._+:@/-]{1,200}")


def _check_timeout(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 86400:
        raise ConfigError(f"timeout must be a finite number of seconds in (0, 86400], not {value!r}", key="timeout")


@dataclass(frozen=True)
class Workload:
    kind: ClassVar[str] = ""

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        raise NotImplementedError

    def to_table(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}




def _failed(op: str, result: dict[str, Any], why: str = "") -> WorkloadFailed:
    err = result.get("errno")
    name = errno_mod.errorcode.get(err, str(err)) if isinstance(err, int) else repr(err)
    return WorkloadFailed(f"{op} failed with errno {name}" + (f": {why}" if why else ""))




WORKLOADS: dict[str, type[Workload]] = {}
"""Workload classes by their ``kind`` (the ``[workload]`` table's selector)."""


def register(*classes: type[Workload]) -> None:
    """Add workload classes to :data:`WORKLOADS` under their ``kind``."""
    WORKLOADS.update({cls.kind: cls for cls in classes})
