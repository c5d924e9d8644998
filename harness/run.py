"""The main job: boot a scenario's VM, run its workload, end the run through
:func:`harness.finish.finish_vm` (which checks everything the run observed)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.checks.verdict import Verdict
from harness.finish import Finished, finish_vm
from harness.scenario import Scenario
from harness.session import Harness
from harness.errors import AgentError
from harness.workloads import WorkloadFailed


@dataclass
class RunResult:
    scenario: str
    accel: str
    boot_seconds: float
    workload_seconds: float
    records: list[dict[str, Any]]
    finished: Finished

    @property
    def verdict(self) -> Verdict:
        return self.finished.verdict

    @property
    def artifacts(self) -> Path | None:
        return self.finished.artifacts

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "accel": self.accel, "boot_seconds": round(self.boot_seconds, 3),
                "workload_seconds": round(self.workload_seconds, 3), "ops": len(self.records),
                "verdict": self.verdict.to_dict(), "notes": self.finished.notes,
                "artifacts": str(self.artifacts) if self.artifacts else None,
                "artifacts_error": self.finished.artifacts_error}


def run_scenario(harness: Harness, scenario: Scenario, artifacts_dir: Path | None = None) -> RunResult:
    """Boot, run the workload, then finish the run (stop QEMU, collect the guest's
    and QEMU's events, run every checker, save artifacts when it did not pass or
    ``keep_artifacts`` is set).

    A workload that finds its data corrupted (:class:`WorkloadFailed`) or whose
    guest op fails (:class:`AgentError`, e.g. an I/O error) is a failure of the
    system under test: it goes into the verdict, and the evidence is still
    checked (the checkers then say where the DMA went).
    Other exceptions (the guest did not come up, died, an agent op failed)
    propagate after the VM is torn down; the evidence (console log, argv, traces)
    is saved to ``artifacts_dir`` first.
    """
    accel = harness.accel(scenario.machine.accel).accel
    vm = harness.vm(scenario.machine, name=scenario.name, boot_timeout=scenario.boot_timeout)
    try:
        vm.launch()
        vm.wait_ready()
    except BaseException:
        vm.shutdown()  # keep the console log and argv of a guest that did not come up
        if artifacts_dir is not None and vm.run_dir is not None:
            with contextlib.suppress(OSError):
                vm.save_artifacts(artifacts_dir, {"config.toml": scenario.to_toml()})
        vm.close()
        raise
    with vm:
        boot = vm.boot_seconds or 0.0
        t0 = time.monotonic()
        records: list[dict[str, Any]] = []
        failures: list[str] = []
        error: BaseException | None = None
        try:
            records = scenario.workload.run(vm.agent)
        except (WorkloadFailed, AgentError) as exc:  # the guest's own op failed: judge what it did
            failures.append(str(exc))
        except Exception as exc:  # re-raised below, after the evidence is saved
            error = exc
        elapsed = time.monotonic() - t0
        if error is not None:
            vm.shutdown()
            if artifacts_dir is not None:
                vm.save_artifacts(artifacts_dir, {"config.toml": scenario.to_toml()})
            raise error
        finished = finish_vm(vm, failures=failures, artifacts=artifacts_dir,
                             keep=harness.options.keep_artifacts,
                             extra={"config.toml": scenario.to_toml()})
    return RunResult(scenario.name, accel, boot, elapsed, records, finished)
