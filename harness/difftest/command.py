"""The ``difftest`` command: check every input before anything is built or booted,
boot the target's guest (always shut down on the way out), search or replay, print
the report, save the minimal failing sequence.

Exit status (harness.cli's conventions): 0 sequences were compared and none
diverged; 1 a divergence (or the system left state behind between sequences);
2 bad input (one line naming the value); 3 inconclusive (nothing compared); 70 the
model itself raised (a harness bug; the sequence is saved all the same).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.difftest import get_target, known_models, replay
from harness.difftest.engine import (
    AgentExecutor,
    Echo,
    Executor,
    Report,
    SystemStateError,
    Target,
    replay_steps,
    search,
)
from harness.difftest.report import failure_lines, replay_lines, summary
from harness.errors import ConfigError

if TYPE_CHECKING:
    from harness.session import Harness

EXIT_OK, EXIT_DIVERGENCE, EXIT_USAGE, EXIT_INCONCLUSIVE, EXIT_SOFTWARE = 0, 1, 2, 3, 70
_STATUS_EXIT = {"ok": EXIT_OK, "divergence": EXIT_DIVERGENCE, "inconclusive": EXIT_INCONCLUSIVE,
                "model-error": EXIT_SOFTWARE}

DEFAULT_SEQUENCES = 100
DEFAULT_MAX_STEPS = 20
DEFAULT_SHRINK_SECONDS = 120.0
DEFAULT_OUT = "artifacts/difftest"
NO_MUTANT = "none"
"""``--model-mutant none``: the correct model (to replay a mutant's file against it)."""
BOOT_TIMEOUT = 120.0
"""Seconds the guest may take to come up (a shared, loaded TCG host can need more than a minute)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's own options (the CLI adds --qemu, --kernel, --accel, --cache)."""
    p.add_argument("model", nargs="?", help=f"the model to test: {', '.join(known_models())} "
                                            "(optional with --replay: the file names it)")
    p.add_argument("--sequences", type=int, default=DEFAULT_SEQUENCES,
                   help=f"random sequences to run (default {DEFAULT_SEQUENCES})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sequences (default 0)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help=f"steps per sequence at most (default {DEFAULT_MAX_STEPS})")
    p.add_argument("--model-mutant", metavar="NAME",
                   help="compare against a deliberately wrong variant of the model (must diverge); "
                        "'none': the correct model (overrides a replay file's mutant)")
    p.add_argument("--replay", metavar="FILE", help="re-run the sequence of a replay file saved by difftest")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for replay files of divergent sequences (default {DEFAULT_OUT})")
    p.add_argument("--shrink-seconds", type=float, default=DEFAULT_SHRINK_SECONDS,
                   help=f"time allowed for shrinking a divergent sequence (default {DEFAULT_SHRINK_SECONDS:g})")


class Inputs:
    """The command's inputs once checked: the target, the mutant (None: the correct
    model), the replay file and its validated steps (or None for a search)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        loaded = replay.load(args.replay) if args.replay is not None else None
        if args.model is None and loaded is None:
            raise ConfigError(f"give a model ({', '.join(known_models())}) or --replay FILE", key="model")
        if args.model is not None and loaded is not None and loaded.model != args.model:
            raise ConfigError(f"replay file {args.replay!r} is of model {loaded.model!r}, not {args.model!r}",
                              key="--replay")
        model = args.model if args.model is not None else loaded.model if loaded is not None else ""
        if args.model is None and model not in known_models():
            raise ConfigError(f"replay file {args.replay!r} is of unknown model {model!r}: known models are "
                              f"{', '.join(known_models())}", key="--replay")
        self.target: Target = get_target(model)
        known = self.target.mutants()
        self.mutant: str | None = args.model_mutant if args.model_mutant is not None else (
            loaded.mutant if loaded is not None else None)
        if self.mutant == NO_MUTANT:
            self.mutant = None
        if self.mutant is not None and self.mutant not in known:
            where = "--model-mutant" if args.model_mutant is not None else f"replay file {args.replay!r}: mutant"
            raise ConfigError(f"{where} {self.mutant!r} is not a mutant of model {model!r}: known mutants are "
                              f"{', '.join(sorted(known)) or 'none'}", key="--model-mutant")
        if args.sequences < 1:
            raise ConfigError(f"--sequences {args.sequences}: give a positive number of sequences",
                              key="--sequences")
        if args.max_steps < 1:
            raise ConfigError(f"--max-steps {args.max_steps}: give a positive number of steps", key="--max-steps")
        if not args.shrink_seconds >= 0:  # also refuses nan
            raise ConfigError(f"--shrink-seconds {args.shrink_seconds}: give a number of seconds >= 0",
                              key="--shrink-seconds")
        self.replay = loaded
        self.steps = None
        if loaded is not None:
            steps = []
            for i, raw in enumerate(loaded.steps, 1):
                try:
                    steps.append(self.target.check_step(raw))
                except ValueError as exc:
                    raise ConfigError(f"replay file {args.replay!r}: step {i}: {exc}", key="--replay") from None
            self.steps = steps


def run_command(args: argparse.Namespace, make_harness: Callable[[], Harness], *,
                executor: Executor | None = None, echo: Echo | None = None) -> int:
    """Check the inputs, then run against a booted guest (or ``executor`` when
    given: the tests' stand-in for the guest, no VM booted). Returns the exit status.

    Raises ConfigError (exit 2) for bad input, before anything is booted;
    whatever booting or the guest raises propagates (the VM is shut down first).
    """
    out: Echo = echo if echo is not None else (lambda line: print(line, flush=True))
    inputs = Inputs(args)
    if executor is not None:
        return _run(inputs, executor, out)
    h = make_harness()
    target = inputs.target
    with h.vm(target.machine(), name=f"difftest-{target.name}", trace=False, boot_timeout=BOOT_TIMEOUT) as vm:
        out(f"guest ready in {vm.boot_seconds or 0:.1f} s")
        # A target may need its own executor (``agent_executor(agent)``: e.g. the grant
        # target waits for a kernel timer between steps); the others use AgentExecutor.
        make_executor = getattr(target, "agent_executor", None)
        agent_executor: Executor = make_executor(vm.agent) if make_executor is not None \
            else AgentExecutor(vm.agent)
        return _run(inputs, agent_executor, out)


def _run(inputs: Inputs, executor: Executor, out: Echo) -> int:
    args, target, mutant = inputs.args, inputs.target, inputs.mutant
    against = f"mutant {mutant} ({target.mutants()[mutant]})" if mutant else "the model"
    try:
        if inputs.steps is not None:
            out(f"difftest {target.name}: replay of {args.replay} ({len(inputs.steps)} steps) against {against}")
            report = replay_steps(target, executor, inputs.steps, mutant=mutant,
                                  seed=inputs.replay.seed if inputs.replay else None)
        else:
            out(f"difftest {target.name}: {args.sequences} sequences of at most {args.max_steps} steps, "
                f"seed {args.seed}, against {against}")
            report = search(target, executor, sequences=args.sequences, seed=args.seed, mutant=mutant,
                            max_steps=args.max_steps, shrink_seconds=args.shrink_seconds, echo=out)
    except SystemStateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGENCE
    executor_counters = getattr(executor, "counters", None)  # counts only the executor sees (e.g. timer runs)
    if callable(executor_counters):
        for name, n in executor_counters().items():
            report.stats.counters[name] = report.stats.counters.get(name, 0) + int(n)
    return _finish(inputs, report, out)


def _finish(inputs: Inputs, report: Report, out: Echo) -> int:
    target = inputs.target
    for line in failure_lines(target, report):
        out(line)
    for note in report.notes:
        out(f"note: {note}")
    out(summary(report))
    status = _STATUS_EXIT[report.status]
    if report.status == "inconclusive":
        print("inconclusive: no step was compared", file=sys.stderr)
    if report.failure is not None and inputs.steps is None:
        failure = report.failure
        steps = [p.step for p in failure.steps]
        if failure.model_error is not None and failure.model_error.concrete is not None:
            steps.append(failure.model_error.concrete)  # the step the model raised at, to raise again
        saved = replay.ReplayFile(
            target.name, report.mutant, steps, report.seed,
            failure.divergence.to_dict() if failure.divergence is not None else None,
            failure.model_error.to_dict() if failure.model_error is not None else None)
        try:
            path = replay.save(saved, Path(inputs.args.out))
        except OSError as exc:
            print(f"error: cannot write the replay file into {inputs.args.out!r}: {exc.strerror or exc}",
                  file=sys.stderr)
            return EXIT_USAGE
        for line in replay_lines(path, report.mutant):
            out(line)
    elif report.failure is not None and report.failure.divergence is not None and inputs.replay is not None:
        d, saved_div = report.failure.divergence, inputs.replay.divergence
        if saved_div and saved_div.get("step") == d.step and saved_div.get("field") == d.field:
            out(f"the replay diverges as saved: step {d.step}, field {d.field}")
        elif saved_div:
            out(f"the replay diverges at step {d.step}, field {d.field} (the file saved step "
                f"{saved_div.get('step')}, field {saved_div.get('field')})")
    return status
