"""What ``difftest`` prints: the summary line (sequences, operations, divergences,
operations per second) and, for a failure, the minimal sequence step by step with
the first divergent step's field, the model's prediction and the system's answer."""

from __future__ import annotations

from pathlib import Path

from harness.difftest.engine import MISSING, Failure, Report, Target


def _value(target: Target, field_name: str, value: object) -> str:
    return value if value == MISSING and isinstance(value, str) else target.format_value(field_name, value)


def summary(report: Report) -> str:
    """``sequences: 200; operations: 2431; divergences: 0; 41.3 ops/s (58.9 s)``, with the
    target's own counters (``Stats.counters``) after the divergences, e.g.
    ``divergences: 0; misses compared: 812; errnos compared: 5210; 41.3 ops/s``."""
    s = report.stats
    seq = f"{s.sequences}"
    if s.cached:
        seq += f" (+{s.cached} repeats not run again)"
    if s.shrink_runs:
        seq += f" +{s.shrink_runs} while shrinking"
    counted = "".join(f"; {name}: {n}" for name, n in s.counters.items())
    return (f"sequences: {seq}; operations: {s.operations}; divergences: {s.divergent}{counted}; "
            f"{s.ops_per_second:.1f} ops/s ({s.seconds:.1f} s)")


def failure_lines(target: Target, report: Report) -> list[str]:
    """The failure of ``report`` for a reader: where, what, and the minimal sequence."""
    failure = report.failure
    if failure is None:
        return []
    lines: list[str] = []
    if report.first_length is not None and report.stats.shrink_runs:
        lines.append(f"shrunk from {report.first_length} to {failure.length} steps in "
                     f"{report.stats.shrink_runs} attempts ({report.shrink_seconds:.1f} s)")
    if failure.model_error is not None:
        err = failure.model_error
        lines.append(f"the model raised at step {err.step} of {failure.length}: {err.op}")
        lines.append(f"  {err.error}")
    elif failure.divergence is not None:
        d = failure.divergence
        lines.append(f"first divergent step: {d.step} of {failure.length}: {d.op}")
        lines.append(f"  field:  {d.field}")
        lines.append(f"  model:  {_value(target, d.field, d.predicted)}")
        lines.append(f"  {target.system}: {' ' * max(0, 6 - len(target.system))}"
                     f"{_value(target, d.field, d.observed)}")
    lines.append("minimal sequence:")
    lines.extend(sequence_lines(target, failure))
    return lines


def sequence_lines(target: Target, failure: Failure) -> list[str]:
    """One line per step (the op and its answer), the divergent one marked."""
    out = []
    divergent = failure.divergence.step if failure.divergence is not None else None
    for i, p in enumerate(failure.steps):
        answer = {k: v for k, v in p.predicted.items() if not isinstance(v, (list, dict))}
        shown = ", ".join(f"{k} {_value(target, k, v)}" for k, v in list(answer.items())[:4])
        mark = "  <-- diverges" if p.index == divergent else ""
        out.append(f"  {p.index:3d}. {target.describe(p.step)} -> {shown}{mark}")
    if failure.model_error is not None:
        out.append(f"  {failure.model_error.step:3d}. {failure.model_error.op} -> the model raised")
    return out


def replay_lines(path: Path, mutant: str | None) -> list[str]:
    """Where the replay file is and the command that re-runs it."""
    return [f"replay file: {path}",
            f"replay with: python -m harness difftest --replay {path}"
            + (f"   (the file names mutant {mutant})" if mutant else "")]
