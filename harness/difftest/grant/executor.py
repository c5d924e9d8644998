"""GrantExecutor: the agent executor of the grant target (a canonical free list at
every sequence start, the deferred-end timer waited for between batches)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from harness.difftest.engine import (
    AgentExecutor,
    Call,
    DifftestError,
    Observation,
    Pending,
    Planned,
    SystemStateError,
    Target,
)
from harness.difftest.grant.common import (
    CANON_REFS,
    NR_RESERVED,
    POLL_SECONDS,
    TICK_TIMEOUT,
)
from harness.difftest.grant.driver import _TICKS, GrantDriver, _ticks

if TYPE_CHECKING:
    from harness.vm.agent import AgentChannel



class GrantExecutor(AgentExecutor):
    """Runs grant sequences in dom0 (see the module docstring): the canonical start,
    the waits for Linux's deferred-end timer before ``tick`` steps (polling
    ``xen.deferred_ticks`` every ``poll_seconds``, at most ``tick_timeout`` s), the
    steps batched between waits, a teardown formed from every result. A sequence
    whose tick window the timer broke into is run again (at most ``attempts``
    times in all); the last run's observations are returned.

    ``counters()``: "ambiguous ticks" (timer runs seen during a step outside a
    window: the model is the same either way), "tick retries", "timer runs during steps".

    Raises AgentError (an agent op failed), DifftestError (the guest cannot run the
    target), SystemStateError (the start state cannot be made canonical)."""

    def __init__(self, agent: AgentChannel, *, timeout: float = 60.0, per_call: float = 0.5,
                 tick_timeout: float = TICK_TIMEOUT, poll_seconds: float = POLL_SECONDS, attempts: int = 3,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        super().__init__(agent, timeout=timeout, per_call=per_call)
        self.tick_timeout = tick_timeout
        self.poll_seconds = poll_seconds
        self.attempts = attempts
        self.clock = clock
        self.sleep = sleep
        self.counts: dict[str, int] = {"ambiguous ticks": 0, "tick retries": 0, "timer runs during steps": 0}
        self.info_checked = False

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

    def wait_tick(self, last: int) -> tuple[bool, int]:
        """Poll until the timer count exceeds ``last``: (ran, count)."""
        deadline = self.clock() + self.tick_timeout
        while True:
            ticks = _ticks(self._batch([_TICKS])[0])
            if ticks > last:
                return True, ticks
            if self.clock() >= deadline:
                return False, ticks
            self.sleep(self.poll_seconds)

    def _setup(self, driver: GrantDriver) -> None:
        driver.check_info = not self.info_checked
        driver.bind_setup(self._batch(driver.setup()))
        self.info_checked = True
        for _ in range(3):
            if driver.canonical():
                break
            self._batch(driver.release_canon())
            self.wait_tick(driver.last_ticks)
            alloc, ticks = self._batch(driver.retry_canon())
            driver.bind_canon(alloc)
            driver.last_ticks = _ticks(ticks)
        else:
            assert driver.canon is not None
            raise SystemStateError(f"the Linux free list does not start with refs {NR_RESERVED}.."
                                   f"{NR_RESERVED + CANON_REFS - 1} (got {sorted(driver.canon[1])}) even after "
                                   "the deferred-end timer ran: refs leaked by an earlier sequence")
        driver.bind_order(self._batch(driver.order_calls()))

    def run(self, target: Target, planned: Sequence[Planned]) -> list[Observation]:
        observations: list[Observation] = []
        for attempt in range(1, self.attempts + 1):
            observations = self._run_once(target, planned)
            broken = any(o.get("quiet") is False for o in observations)
            if not broken or attempt == self.attempts:
                break
            self.counts["tick retries"] += 1
        for p, o in zip(planned, observations):
            seen = int(o.get("ticks_after", 0)) - int(o.get("ticks_before", 0))
            self.counts["timer runs during steps"] += seen
            if seen and not p.step.get("tick") and "quiet" not in p.predicted and "timer" not in p.predicted:
                self.counts["ambiguous ticks"] += 1
        return observations

    def _run_once(self, target: Target, planned: Sequence[Planned]) -> list[Observation]:
        driver = target.driver()
        if not isinstance(driver, GrantDriver):
            raise DifftestError(f"GrantExecutor runs GrantDriver sequences, not {type(driver).__name__}")
        driver.bound_to_executor = True
        observations: list[Observation] = []
        pending: list[tuple[Planned, list[Call]]] = []

        def flush() -> None:
            calls = [c for _, cs in pending for c in cs]
            results = self._batch(calls)
            pos = 0
            for p, cs in pending:
                observations.append(driver.observe(p.step, p.probes, results[pos:pos + len(cs)]))
                pos += len(cs)
            pending.clear()

        try:
            self._setup(driver)
            for p in planned:
                if p.step.get("tick"):
                    flush()
                    driver.tick_waited(*self.wait_tick(driver.last_ticks))
                try:
                    calls = driver.calls(p.step, p.probes)
                except Pending:
                    flush()
                    calls = driver.calls(p.step, p.probes)
                pending.append((p, calls))
            flush()
        except BaseException:
            try:
                self._batch(driver.teardown())
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        self._batch(driver.teardown())
        return observations
