"""The differential-testing engine, the same for every model: Hypothesis draws
sequences of abstract operations, the target resolves each to a concrete step
against its model, the model predicts what the system under test answers, the
system (the guest kernel, through the guest agent) runs the same steps, and the two
are compared after every step. The first divergent sequence is shrunk by Hypothesis
to a minimal one.

Vocabulary (every value is JSON-able, so a sequence can be saved and replayed):

* a *step* (:data:`Step`) is one concrete operation with concrete arguments
  (object ids, user VAs, iovas, lengths), e.g. ``{"op": "map", "ioas": 1, ...}``;
* a *probe* (:data:`Probe`) is one read-only question about the state after a step
  (e.g. "is this area mapped in that mock domain"), chosen from the model's state;
* an *observation* (:data:`Observation`) is a table of fields: the step's own answer
  (``errno``, returned fields) and the probes' answers. The model's is the
  *prediction*; the system's the *observation*. The comparison walks the
  prediction's fields in order and names the first one the observation differs in.

The pieces a model brings are a :class:`Target` (model side: strategies, resolve,
apply, probes) with a :class:`Driver` (system side: the agent calls of a step and
how to read their results). The engine brings the search (:func:`search`), the
re-run of a saved sequence (:func:`replay_steps`) and two executors: the
:class:`AgentExecutor` (a guest, batching each sequence into few agent round trips)
and the :class:`ModelExecutor` (a second model standing in for the system, for
tests and self-checks without a VM).
"""

from __future__ import annotations

import errno as errno_names
import inspect
import json
import re
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from harness.errors import AgentError, HarnessError

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from harness.vm.agent import AgentChannel
    from harness.vm.spec import MachineSpec

Step = dict[str, Any]
"""One concrete operation, JSON-able: ``{"op": name, <arguments>}``."""
Probe = dict[str, Any]
"""One read-only question about the state after a step, JSON-able."""
Observation = dict[str, Any]
"""Field name -> value (JSON-able): a step's answer and its probes' answers."""
Call = dict[str, Any]
"""One guest agent call: ``{"op": name, "args": {...}}`` (an element of the ``batch`` op)."""

Echo = Callable[[str], None]


class DifftestError(HarnessError):
    """The differential test cannot run (the system lacks what the target needs, a
    bad replay step); the CLI reports it as bad input or environment (exit 2)."""


class SystemStateError(DifftestError):
    """The system under test is not in the state a sequence starts from (e.g. pages
    still pinned after the previous sequence closed its context): the system
    misbehaved outside any one sequence, so nothing can be shrunk (CLI exit 1)."""


class Pending(Exception):
    """Raised by :meth:`Driver.calls` when a step needs a value that a call not yet
    run returns (e.g. the fd of an object created earlier in the same batch): the
    executor runs the calls gathered so far, then asks again."""


class Driver(Protocol):
    """The system side of one sequence (a new driver for each sequence).

    Every method returns or takes agent calls and their results, in order; the
    executor decides how they are batched. ``observe`` must return the fields of
    the step's prediction (what the step returned, and one answer per probe).
    """

    def setup(self) -> list[Call]:
        """Calls that prepare a fresh context for the sequence (open, map buffers)."""
        ...

    def bind_setup(self, results: list[Any]) -> None:
        """Read the setup calls' results (fds, addresses). Raises
        :class:`DifftestError` if the system cannot run the target (no device node),
        :class:`SystemStateError` if it does not start from a clean state."""
        ...

    def calls(self, step: Step, probes: Sequence[Probe]) -> list[Call]:
        """The calls that run ``step`` and then answer ``probes``. Raises
        :class:`Pending` if a value from an earlier call of this sequence is needed."""
        ...

    def observe(self, step: Step, probes: Sequence[Probe], results: list[Any]) -> Observation:
        """The observation of ``step`` from the results of its :meth:`calls`."""
        ...

    def teardown(self) -> list[Call]:
        """Calls that release everything the sequence created (every sequence
        starts from nothing: no object, no pin)."""
        ...


class Target(Protocol):
    """A model and the system it describes, as the engine drives them.

    Model side (pure, no I/O): ``new_model``, ``sequences`` (a Hypothesis strategy
    of lists of abstract steps), ``resolve`` (abstract step + model state -> concrete
    :data:`Step`), ``apply`` (runs the step on the model; returns the predicted
    answer), ``probes`` and ``answer_probes`` (the state probes after a step and the
    model's answers). ``apply`` never raises for an error the system reports as a
    value (an errno): that is part of the prediction; anything it raises is a bug of
    the model, reported as such.

    System side: ``driver()`` (see :class:`Driver`) and ``machine()`` (the guest it
    needs).

    Optional (looked up with getattr, so existing targets need nothing):
    ``counters(predicted)`` or ``counters(step, predicted)`` -> ``{name: count}``, counts of its own that the
    summary line adds up over the compared steps (:func:`tally`); and
    ``driver_for(steps) -> Driver``, used by :class:`AgentExecutor` instead of
    ``driver()`` when the driver depends on the sequence (a target made of parts).
    """

    name: str
    description: str
    system: str
    """What the observations come from, in reports: "kernel"."""

    def mutants(self) -> Mapping[str, str]:
        """Deliberately wrong model variants: name -> what is wrong in it."""
        ...

    def new_model(self, mutant: str | None) -> Any:
        """A fresh model (the correct one for ``mutant`` None). KeyError for an unknown mutant."""
        ...

    def sequences(self, max_steps: int) -> SearchStrategy[list[Any]]:
        """Lists of 1..``max_steps`` abstract steps."""
        ...

    def resolve(self, model: Any, abstract: Any) -> Step:
        """The concrete step an abstract one stands for in the model's current state."""
        ...

    def apply(self, model: Any, step: Step) -> Observation:
        """Run ``step`` on the model; its predicted answer (errno and returned fields)."""
        ...

    def probes(self, model: Any) -> list[Probe]:
        """The state probes to take after a step, chosen from the model's state."""
        ...

    def answer_probes(self, model: Any, probes: Sequence[Probe]) -> Observation:
        """The model's answers to ``probes`` (fields that :meth:`Driver.observe` also gives)."""
        ...

    def check_step(self, raw: Any) -> Step:
        """A step read from a replay file, validated. Raises ValueError naming the
        offending key and value."""
        ...

    def describe(self, step: Step) -> str:
        """One line: the operation and its arguments."""
        ...

    def format_value(self, field_name: str, value: Any) -> str:
        """A field's value for a report (errno names, hex addresses)."""
        ...

    def driver(self) -> Driver:
        """The system side of one new sequence."""
        ...

    def machine(self) -> MachineSpec:
        """The guest machine the system runs in."""
        ...


# ---------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Planned:
    """One step of a sequence as the model sees it: its 1-based ``index``, the
    concrete ``step``, the ``probes`` after it and the ``predicted`` observation."""

    index: int
    step: Step
    probes: tuple[Probe, ...]
    predicted: Observation


@dataclass(frozen=True)
class Divergence:
    """The first field where the system's observation differs from the prediction.

    ``step``: 1-based index in the sequence; ``op``: the step described;
    ``field``: a path into the observation (``errno``, ``refs[3]``, ...);
    ``predicted`` / ``observed``: the two values there (``"<missing>"`` when the
    observation lacks the field); ``predicted_step`` / ``observed_step``: both whole
    observations of that step.
    """

    step: int
    op: str
    field: str
    predicted: Any
    observed: Any
    predicted_step: Observation
    observed_step: Observation

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "op": self.op, "field": self.field, "predicted": self.predicted,
                "observed": self.observed, "predicted_step": self.predicted_step,
                "observed_step": self.observed_step}


MISSING = "<missing>"


def first_difference(predicted: Any, observed: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first place where ``observed`` differs from ``predicted``: ``(path,
    predicted value, observed value)`` or None when they agree.

    Tables are walked in the order of the prediction's keys (keys only the
    observation has are not compared: the system may report more than the model
    predicts); lists of equal length element by element (``refs[3]``); anything
    else with ``==``.
    """
    if isinstance(predicted, dict) and isinstance(observed, dict):
        for key, value in predicted.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in observed:
                return sub, value, MISSING
            diff = first_difference(value, observed[key], sub)
            if diff is not None:
                return diff
        return None
    if isinstance(predicted, list) and isinstance(observed, list) and len(predicted) == len(observed):
        for i, (p, o) in enumerate(zip(predicted, observed)):
            diff = first_difference(p, o, f"{path}[{i}]")
            if diff is not None:
                return diff
        return None
    if type(predicted) is bool or type(observed) is bool:  # True is not the count 1
        same = type(predicted) is type(observed) and predicted == observed
    else:
        same = predicted == observed
    return None if same else (path, predicted, observed)


def compare(target: Target, planned: Sequence[Planned], observed: Sequence[Observation]) -> Divergence | None:
    """The first divergence of a sequence (steps in order, fields in the prediction's order)."""
    if len(observed) != len(planned):
        raise DifftestError(f"the system answered {len(observed)} steps of {len(planned)}")
    for p, o in zip(planned, observed):
        diff = first_difference(p.predicted, o)
        if diff is not None:
            path, want, got = diff
            return Divergence(p.index, target.describe(p.step), path, want, got, p.predicted, o)
    return None


def format_value(field_name: str, value: Any) -> str:
    """Default rendering of a field value: errno numbers with their name, integers
    of 4096 and more in hex, lists of them likewise."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int):
        leaf = field_name.rsplit(".", 1)[-1]
        if leaf == "errno" or leaf.endswith("_errno"):
            return f"{value} ({errno_names.errorcode.get(value, '?')})" if value else "0"
        return hex(value) if abs(value) >= 4096 else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(format_value(field_name, v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(str(k), v)}" for k, v in value.items()) + "}"
    return repr(value)


# ---------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ModelError:
    """The model raised while planning step ``step`` (1-based): a bug of the model."""

    step: int
    op: str
    error: str
    traceback: str
    concrete: Step | None = None
    """The concrete step, if the model raised after resolving it."""

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "op": self.op, "error": self.error, "traceback": self.traceback,
                "concrete": self.concrete}


def plan(target: Target, mutant: str | None, steps: Sequence[Any], *,
         abstract: bool) -> tuple[list[Planned], ModelError | None]:
    """Run ``steps`` on a fresh model: the planned steps (concrete step, probes,
    prediction) and, if the model raised, where (the plan then ends before that step).
    ``abstract``: the steps are abstract (resolved one by one against the model's
    state) rather than concrete (a replay)."""
    model = target.new_model(mutant)
    out: list[Planned] = []
    for index, raw in enumerate(steps, 1):
        step: Step | None = None if abstract else raw
        try:
            step = target.resolve(model, raw) if abstract else raw
            predicted = dict(target.apply(model, step))
            probes = target.probes(model)
            predicted.update(target.answer_probes(model, probes))
        except Exception as exc:  # noqa: BLE001 - any exception of the model is its bug, reported as such
            op = target.describe(step) if step is not None else repr(raw)
            return out, ModelError(index, op, f"{type(exc).__name__}: {exc}", traceback.format_exc(), step)
        out.append(Planned(index, step, tuple(probes), predicted))
    return out, None


# ---------------------------------------------------------------------- executors


class Executor(Protocol):
    """Runs a planned sequence on the system under test: one observation per step."""

    def run(self, target: Target, planned: Sequence[Planned]) -> list[Observation]: ...


class ModelExecutor:
    """A model standing in for the system: each step is applied to a fresh model of
    ``mutant`` (None: the correct one) and the planned probes are answered from it.
    Used by the unit tests (a mutant planned against the correct model must diverge)."""

    def __init__(self, mutant: str | None = None):
        self.mutant = mutant

    def run(self, target: Target, planned: Sequence[Planned]) -> list[Observation]:
        model = target.new_model(self.mutant)
        out = []
        for p in planned:
            obs = dict(target.apply(model, p.step))
            obs.update(target.answer_probes(model, p.probes))
            out.append(obs)
        return out


class AgentExecutor:
    """Runs sequences in a guest through its agent's ``batch`` op: the setup calls in
    one round trip, then the steps and their probes gathered into as few batches
    as :class:`Pending` allows (usually one), the teardown joined to the last.

    ``timeout``: seconds allowed for a batch, plus ``per_call`` seconds per call.

    Raises AgentError when a call of a batch failed (the guest agent raised: a
    harness or agent bug, not a kernel errno); the teardown is still attempted.
    """

    def __init__(self, agent: AgentChannel, *, timeout: float = 60.0, per_call: float = 0.5):
        self.agent = agent
        self.timeout = timeout
        self.per_call = per_call
        self.round_trips = 0

    def _batch(self, calls: list[Call]) -> list[Any]:
        if not calls:
            return []
        self.round_trips += 1
        replies = self.agent.call("batch", timeout=self.timeout + self.per_call * len(calls), calls=calls)
        if not isinstance(replies, list) or len(replies) != len(calls):
            raise AgentError(f"guest agent batch of {len(calls)} calls answered {replies!r:.200}")
        results = []
        for call, reply in zip(calls, replies):
            if not isinstance(reply, dict) or not reply.get("ok"):
                err = reply.get("error") if isinstance(reply, dict) else reply
                raise AgentError(f"guest agent op {call['op']!r} failed in a batch: {err!r:.500}",
                                 request=call, reply=reply)
            results.append(reply.get("result"))
        return results

    def run(self, target: Target, planned: Sequence[Planned]) -> list[Observation]:
        # A target may pick the driver from the sequence's steps (``driver_for(steps)``:
        # a target made of parts runs each sequence on the driver of its part).
        driver_for = getattr(target, "driver_for", None)
        driver: Driver = driver_for([p.step for p in planned]) if driver_for is not None else target.driver()
        observations: list[Observation] = []
        pending: list[tuple[Planned, list[Call]]] = []
        torn_down = False

        def flush(extra: list[Call]) -> None:
            calls = [c for _, cs in pending for c in cs] + extra
            results = self._batch(calls)
            pos = 0
            for p, cs in pending:
                observations.append(driver.observe(p.step, p.probes, results[pos:pos + len(cs)]))
                pos += len(cs)
            pending.clear()

        try:
            setup = driver.setup()
            driver.bind_setup(self._batch(setup))
            for p in planned:
                try:
                    calls = driver.calls(p.step, p.probes)
                except Pending:
                    flush([])
                    calls = driver.calls(p.step, p.probes)
                pending.append((p, calls))
            torn_down = True  # the teardown rides with the last batch
            flush(driver.teardown())
        except BaseException:
            if not torn_down:
                try:
                    self._batch(driver.teardown())
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
            raise
        return observations


# ---------------------------------------------------------------------- search


@dataclass
class Stats:
    """Counts of a run: ``sequences`` distinct sequences the search ran (``cached``:
    repeats it drew besides, answered from the cache), ``shrink_runs`` sequences
    run while shrinking, ``operations`` steps run on the system,
    ``compared`` steps compared, ``divergent`` sequences drawn by the search that
    diverged or crashed the model (not counting the shrinker's attempts), ``seconds``
    of wall time."""

    sequences: int = 0
    cached: int = 0
    shrink_runs: int = 0
    operations: int = 0
    compared: int = 0
    divergent: int = 0
    seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    """Per-target counts over the steps compared (see :func:`tally`), e.g. ``misses compared``."""

    @property
    def ops_per_second(self) -> float:
        return self.operations / self.seconds if self.seconds > 0 else 0.0


def target_counters(target: Any) -> Callable[[Step, Observation], Mapping[str, int]] | None:
    """The target's ``counters`` as a function of (step, predicted), whichever of the
    two signatures it has; None if it has none."""
    counters = getattr(target, "counters", None)
    if counters is None:
        return None
    try:
        takes_step = len(inspect.signature(counters).parameters) >= 2
    except (TypeError, ValueError):
        takes_step = False
    if takes_step:
        return lambda step, predicted: counters(step, predicted)
    return lambda step, predicted: counters(predicted)


def tally(target: Target, planned: Sequence[Planned], stats: Stats) -> None:
    """Add the target's own counts of the compared steps ``planned`` to
    ``stats.counters``. A target may define ``counters(predicted)`` or
    ``counters(step, predicted)`` returning ``{name: count}`` (e.g. how many MISS
    messages or errnos a step's prediction holds); targets without it count nothing."""
    counters = target_counters(target)
    if counters is None:
        return
    for p in planned:
        for name, n in counters(p.step, p.predicted).items():
            stats.counters[name] = stats.counters.get(name, 0) + int(n)


@dataclass
class Failure:
    """A failing sequence: its concrete ``steps`` (planned), what the system observed
    (one per step run) and the ``divergence`` or the ``model_error``."""

    steps: list[Planned]
    observed: list[Observation]
    divergence: Divergence | None = None
    model_error: ModelError | None = None

    @property
    def kind(self) -> Literal["divergence", "model-error"]:
        return "model-error" if self.model_error is not None else "divergence"

    @property
    def length(self) -> int:
        return len(self.steps) + (1 if self.model_error is not None else 0)


@dataclass
class Report:
    """The result of :func:`search` or :func:`replay_steps`.

    ``status``: ``ok`` (steps were compared, none diverged), ``divergence``,
    ``model-error`` (the model itself raised) or ``inconclusive`` (nothing compared).
    ``failure``: the minimal failing sequence found; ``first_length``: how many steps
    the first failing sequence had before shrinking; ``notes``: anything the reader
    should know (shrinking cut short, a flaky replay).
    """

    model: str
    mutant: str | None
    seed: int | None
    stats: Stats
    failure: Failure | None = None
    first_length: int | None = None
    shrink_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> Literal["ok", "divergence", "model-error", "inconclusive"]:
        if self.failure is not None:
            return self.failure.kind
        return "ok" if self.stats.compared > 0 else "inconclusive"


class _SequenceFailed(Exception):
    """Raised inside the Hypothesis test for a failing sequence (so it shrinks it)."""


class _QuotaReached(BaseException):
    """Raised inside the Hypothesis test once enough distinct sequences ran: not an
    Exception, so Hypothesis lets it through instead of shrinking it."""


def _signature(failure: Failure) -> tuple[str, ...]:
    """What makes two failures "the same" for shrinking (see _Search.same_failure)."""
    if failure.model_error is not None:
        return ("model-error", failure.model_error.error.split(":", 1)[0])
    d = failure.divergence
    assert d is not None
    op = failure.steps[-1].step.get("op") if failure.steps else None
    return ("divergence", str(op), re.split(r"[.\[]", d.field, maxsplit=1)[0])


def _key(steps: Sequence[Step]) -> str:
    return json.dumps(steps, sort_keys=True, separators=(",", ":"))


class _Search:
    """The state of one search: the cache of sequences already run, the counts,
    the smallest failure seen, the shrink deadline."""

    def __init__(self, target: Target, executor: Executor, *, mutant: str | None, sequences: int,
                 shrink_seconds: float, echo: Echo, progress_seconds: float,
                 clock: Callable[[], float]):
        self.target = target
        self.executor = executor
        self.mutant = mutant
        self.total = sequences
        self.shrink_seconds = shrink_seconds
        self.echo = echo
        self.progress_seconds = progress_seconds
        self.clock = clock
        self.stats = Stats()
        self.cache: dict[str, Failure | None] = {}
        self.by_abstract: dict[str, Failure | None] = {}
        """Outcomes by abstract sequence: past the shrink deadline only these are
        answered (so Hypothesis's final re-run of its example still fails)."""
        self.best: Failure | None = None
        self.first_length: int | None = None
        self.shrink_started: float | None = None
        self.signature: tuple[str, ...] | None = None
        self.shrink_cut = False
        self.started = clock()
        self.last_progress = self.started

    def progress(self, force: bool = False) -> None:
        now = self.clock()
        self.stats.seconds = now - self.started
        if not force and now - self.last_progress < self.progress_seconds:
            return
        self.last_progress = now
        s = self.stats
        extra = f" (+{s.shrink_runs} while shrinking)" if s.shrink_runs else ""
        self.echo(f"  {s.sequences}/{self.total} sequences{extra}, {s.operations} operations, "
                  f"{s.divergent} divergent, {s.ops_per_second:.1f} ops/s")

    def shrinking(self) -> bool:
        return self.shrink_started is not None

    def run(self, abstract: list[Any]) -> None:
        """The body of the Hypothesis test: plan, run (or take from the cache), compare.
        Raises _SequenceFailed for a failing sequence, _QuotaReached once ``total``
        distinct sequences were run (repeats of a sequence already run are answered
        from the cache and not counted)."""
        if not self.shrinking() and self.stats.sequences >= self.total:
            raise _QuotaReached()
        abstract_key = repr(abstract)
        if self.shrinking() and self.hypothesis_time_left() <= 0 and abstract_key not in self.by_abstract:
            self.shrink_cut = True  # out of time: not even planned (a model can be slow to plan)
            return
        planned, model_error = plan(self.target, self.mutant, abstract, abstract=True)
        key = _key([p.step for p in planned]
                   + ([{"model-error": model_error.step, "step": model_error.concrete}] if model_error else []))
        if key in self.cache:
            if not self.shrinking():
                self.stats.cached += 1
            failure = self.cache[key]
        elif self.shrinking() and self.hypothesis_time_left() <= 0:
            self.shrink_cut = True  # out of time: untried sequences count as passing
            return
        else:
            if self.shrinking():
                self.stats.shrink_runs += 1
            else:
                self.stats.sequences += 1
            failure = self._execute(planned, model_error)
            self.cache[key] = failure
        self.by_abstract[abstract_key] = failure
        self.progress()
        if failure is None or not self.same_failure(failure):
            return
        self._record(failure)
        raise _SequenceFailed(failure.kind)

    def same_failure(self, failure: Failure) -> bool:
        """While shrinking, only failures like the first one count: the same kind,
        the same op at the divergent step and the same top-level field (or, for a
        model error, the same exception type). Without this the shrinker slips to
        whatever other divergence a smaller sequence shows."""
        return self.signature is None or _signature(failure) == self.signature

    def _record(self, failure: Failure) -> None:
        if self.best is None or failure.length <= self.best.length:
            self.best = failure
        if self.shrink_started is None:
            self.signature = _signature(failure)
            self.first_length = failure.length
            self.shrink_started = self.clock()
            self.stats.seconds = self.shrink_started - self.started
            what = f"step {failure.model_error.step}: the model raised {failure.model_error.error}" \
                if failure.model_error else f"step {failure.divergence.step if failure.divergence else '?'}"
            self.echo(f"sequence {self.stats.sequences} diverged ({failure.kind} at {what}); shrinking it "
                      f"(at most {self.shrink_seconds:g} s)")

    HYPOTHESIS_SHARE = 0.75
    """Part of the shrink time Hypothesis may use; the rest is for :meth:`delete_steps`."""

    def hypothesis_time_left(self) -> float:
        if self.shrink_started is None:
            return self.shrink_seconds * self.HYPOTHESIS_SHARE
        return self.shrink_started + self.shrink_seconds * self.HYPOTHESIS_SHARE - self.clock()

    def time_left(self) -> float:
        if self.shrink_started is None:
            return self.shrink_seconds
        return self.shrink_started + self.shrink_seconds - self.clock()

    def delete_steps(self) -> None:
        """After Hypothesis: delete concrete steps of the best divergent sequence one at
        a time (all but its divergent last one), keeping each deletion after which the
        sequence still diverges, until a whole pass deletes nothing or time is up.
        (Hypothesis shrinks abstract steps, whose meaning can shift when an earlier one
        goes; this pass catches the steps that stayed only for that reason.)"""
        improved = True
        while improved and self.best is not None and self.best.divergence is not None:
            improved = False
            steps = [p.step for p in self.best.steps]
            for i in range(len(steps) - 2, -1, -1):
                if self.time_left() <= 0:
                    self.shrink_cut = True
                    return
                candidate = steps[:i] + steps[i + 1:]
                planned, model_error = plan(self.target, self.mutant, candidate, abstract=False)
                key = _key([p.step for p in planned])
                if model_error is not None:
                    continue  # the sequence does not make sense without that step
                if key in self.cache:
                    failure = self.cache[key]
                else:
                    self.stats.shrink_runs += 1
                    failure = self._execute(planned, None)
                    self.cache[key] = failure
                    self.progress()
                if failure is not None and self.same_failure(failure) and failure.length < self.best.length:
                    self.best = failure
                    improved = True
                    break

    def _execute(self, planned: list[Planned], model_error: ModelError | None) -> Failure | None:
        if model_error is not None:
            self.stats.divergent += 0 if self.shrinking() else 1
            return Failure(planned, [], model_error=model_error)
        observed = self.executor.run(self.target, planned)
        self.stats.operations += len(observed)
        divergence = compare(self.target, planned, observed)
        self.stats.compared += len(observed) if divergence is None else divergence.step
        tally(self.target, planned[:len(observed) if divergence is None else divergence.step], self.stats)
        if divergence is None:
            return None
        self.stats.divergent += 0 if self.shrinking() else 1
        return Failure(planned[:divergence.step], observed[:divergence.step], divergence=divergence)


REPEATS_ALLOWED = 4
"""Hypothesis may draw up to this many examples per distinct sequence asked for
(it draws some sequences again, and some abstract sequences resolve to the same
concrete one: those repeats are answered from the cache and not counted)."""


def search(target: Target, executor: Executor, *, sequences: int, seed: int, mutant: str | None = None,
           max_steps: int = 20, shrink_seconds: float = 120.0, echo: Echo = print,
           progress_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic) -> Report:
    """Run ``sequences`` distinct random sequences (Hypothesis, seeded with ``seed``)
    of at most ``max_steps`` steps against ``executor`` and the model (``mutant``
    None: the correct one); stop at the first that diverges and shrink it, for at
    most ``shrink_seconds`` (each attempt re-runs on the system; attempts seen before
    are answered from a cache): Hypothesis for 3/4 of that time, then
    :meth:`_Search.delete_steps`. Progress lines go to ``echo``.

    Raises ValueError for ``sequences`` or ``max_steps`` below 1 or a negative
    ``shrink_seconds``; whatever the executor raises (AgentError, VMError,
    SystemStateError) propagates.
    """
    if sequences < 1:
        raise ValueError(f"sequences must be at least 1, not {sequences}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, not {max_steps}")
    if shrink_seconds < 0:
        raise ValueError(f"shrink_seconds must not be negative, not {shrink_seconds}")
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed

    state = _Search(target, executor, mutant=mutant, sequences=sequences, shrink_seconds=shrink_seconds,
                    echo=echo, progress_seconds=progress_seconds, clock=clock)
    notes: list[str] = []

    @hypothesis_seed(seed)
    @settings(max_examples=sequences * REPEATS_ALLOWED, database=None, deadline=None, derandomize=False,
              phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck),
              report_multiple_bugs=False, verbosity=Verbosity.quiet, print_blob=False)
    @given(target.sequences(max_steps))
    def run_one(abstract: list[Any]) -> None:
        state.run(abstract)

    try:
        with _quiet_hypothesis():
            run_one()
    except (_SequenceFailed, _QuotaReached):
        pass
    except Exception as exc:  # noqa: BLE001 - e.g. Hypothesis's Flaky: report the failure it found
        if state.best is None or isinstance(exc, HarnessError):
            raise
        notes.append(f"Hypothesis ended with {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if state.best is not None:
        state.delete_steps()
    shrink_time = state.clock() - state.shrink_started if state.shrink_started is not None else 0.0
    if state.shrink_cut:
        notes.append(f"shrinking stopped after {shrink_seconds:g} s: the sequence may not be minimal")
    state.stats.seconds = state.clock() - state.started
    return Report(target.name, mutant, seed, state.stats, state.best, state.first_length, shrink_time, notes)


@contextmanager
def _quiet_hypothesis() -> Iterator[None]:
    """Keep Hypothesis from printing its own falsifying example (the report says it)."""
    from hypothesis import reporting
    with reporting.with_reporter(lambda value: None):
        yield


def replay_steps(target: Target, executor: Executor, steps: Sequence[Step], *, mutant: str | None,
                 seed: int | None = None, clock: Callable[[], float] = time.monotonic) -> Report:
    """Run one saved concrete sequence against ``executor`` and the model (``mutant``)."""
    started = clock()
    stats = Stats(sequences=1)
    planned, model_error = plan(target, mutant, steps, abstract=False)
    failure: Failure | None = None
    if model_error is not None:
        stats.divergent = 1
        failure = Failure(planned, [], model_error=model_error)
    else:
        observed = executor.run(target, planned)
        stats.operations = len(observed)
        divergence = compare(target, planned, observed)
        stats.compared = len(observed) if divergence is None else divergence.step
        tally(target, planned[:stats.compared], stats)
        if divergence is not None:
            stats.divergent = 1
            failure = Failure(planned[:divergence.step], observed[:divergence.step], divergence=divergence)
    stats.seconds = clock() - started
    return Report(target.name, mutant, seed, stats, failure, len(steps) if failure else None)
