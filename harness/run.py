"""The main job: boot a scenario's VM, run its workload, check the DMA it caused."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.checks.block_io import BlockIoCollector, BlockIoReport
from harness.checks.verdict import CheckReport as Verdict
from harness.checks.vtd import VtdChecker as DMAChecker
from harness.scenario import Scenario
from harness.session import Harness
from harness.trace import parse_file


@dataclass
class RunResult:
    scenario: str
    accel: str
    boot_seconds: float
    workload_seconds: float
    records: list[dict[str, Any]]
    verdict: Verdict
    block_io: BlockIoReport
    artifacts: Path | None = None

    @property
    def ok(self) -> bool:
        return self.verdict.ok and self.block_io.ok

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "accel": self.accel, "boot_seconds": round(self.boot_seconds, 3),
                "workload_seconds": round(self.workload_seconds, 3), "records": self.records,
                "verdict": self.verdict.to_dict(), "block_io": self.block_io.to_dict(),
                "artifacts": str(self.artifacts) if self.artifacts else None}


def check_run(trace: Path, records: list[dict[str, Any]]) -> tuple[Verdict, BlockIoReport]:
    """One pass over the trace: the DMA checker and the guest-I/O coverage check."""
    checker, io = DMAChecker(), BlockIoCollector()
    for event in parse_file(trace):
        checker.feed(event)
        io.feed(event)
    return checker.finish(), io.finish(records)


def run_scenario(harness: Harness, scenario: Scenario, artifacts_dir: Path | None = None) -> RunResult:
    """Boot, run the workload, stop QEMU, check its trace (DMA against the IOTLB
    model; the guest's I/O against the device's commands). Artifacts (argv, logs,
    trace, verdicts, a reproducing config) are saved to ``artifacts_dir`` when a
    check fails, the workload fails, or ``keep_artifacts`` is set."""
    accel = harness.accel(scenario.machine.accel).accel
    with harness.vm(scenario.machine, name=scenario.name, boot_timeout=scenario.boot_timeout) as vm:
        boot = vm.boot_seconds or 0.0
        t0 = time.monotonic()
        records: list[dict[str, Any]] = []
        error: BaseException | None = None
        try:
            records = scenario.workload.run(vm.agent)
        except Exception as exc:  # re-raised below, after the evidence is saved
            error = exc
        elapsed = time.monotonic() - t0
        vm.shutdown()
        verdict, block_io = check_run(vm.trace_log, records)
        saved: Path | None = None
        if artifacts_dir is not None and (error or not verdict.ok or not block_io.ok
                                          or harness.options.keep_artifacts):
            saved = vm.save_artifacts(artifacts_dir, {
                "verdict.json": verdict.to_dict(), "verdict.txt": verdict.format(),
                "block_io.json": block_io.to_dict(), "records.json": json.dumps(records, indent=2),
                "config.toml": scenario.to_toml(),
            })
        if error is not None:
            raise error
    return RunResult(scenario.name, accel, boot, elapsed, records, verdict, block_io, saved)
