"""``difftest iotlb``: the vhost device IOTLB targets in one run, vhost-net
(:mod:`harness.difftest.vhost_net`) and vhost-vdpa
(:mod:`harness.difftest.vhost_vdpa`), in one guest.

:class:`CompositeTarget` makes one target of several (the *parts*), generically:

* every sequence belongs to one part (Hypothesis draws the part, then a sequence
  of that part's strategy); its concrete steps are the part's steps with a
  ``"part"`` key added, so a replay file says which part each step is for, and the
  sequence runs on that part's driver (``driver_for``);
* the model of a sequence is the part's model;
* the mutants are the union of the parts' mutants; a mutant replaces only its own
  part's model (the other parts run their correct models). A name two parts
  share is qualified as ``part.name`` (e.g. ``vhost-net.del-range-split``);
* the machine is the union of the parts' machines (devices and kernel
  command-line words of both; the larger memory and CPU count); parts that ask
  for different machine types, accelerators, CPU models or kernels cannot be
  combined (DifftestError).

:class:`IotlbTarget` is that composition of VhostNetTarget and VhostVdpaTarget;
while harness.difftest.vhost_vdpa cannot be imported it has the vhost-net part
only (its description says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st

from harness.difftest.engine import Call, DifftestError, Driver, Observation, Probe, Step, Target, target_counters
from harness.difftest.engine import format_value as default_format

if TYPE_CHECKING:
    from harness.vm.spec import MachineSpec

PART = "part"
"""The key of a concrete step that names its part."""


@dataclass
class CompositeModel:
    """The model of one sequence of a composite target: the part it belongs to
    (set by its first step) and that part's model, made on first use with the
    mutant if the mutant is that part's (else the correct model)."""

    target: CompositeTarget
    mutant: str | None
    part: str | None = None
    models: dict[str, Any] = field(default_factory=dict)

    def of(self, part: str) -> Any:
        if self.part is None:
            self.part = part
        elif part != self.part:
            raise ValueError(f"a step of part {part!r} in a sequence of part {self.part!r}")
        if part not in self.models:
            owner, inner = self.target.mutant_owner(self.mutant)
            self.models[part] = self.target.parts[part].new_model(inner if owner == part else None)
        return self.models[part]


def _split(step: Step) -> tuple[str, Step]:
    inner = {k: v for k, v in step.items() if k != PART}
    return str(step[PART]), inner


class PartDriver:
    """The driver of one part, fed the part's own steps (the ``part`` key removed)."""

    def __init__(self, inner: Driver):
        self.inner = inner

    def setup(self) -> list[Call]:
        return self.inner.setup()

    def bind_setup(self, results: list[Any]) -> None:
        self.inner.bind_setup(results)

    def calls(self, step: Step, probes: Sequence[Probe]) -> list[Call]:
        return self.inner.calls(_split(step)[1], [_split(p)[1] for p in probes])

    def observe(self, step: Step, probes: Sequence[Probe], results: list[Any]) -> Observation:
        return self.inner.observe(_split(step)[1], [_split(p)[1] for p in probes], results)

    def teardown(self) -> list[Call]:
        return self.inner.teardown()


class CompositeTarget:
    """Several targets as one (see the module docstring). ``parts``: part name ->
    target, in the order Hypothesis prefers them (it shrinks toward the first).

    Raises ValueError for no parts, or a part name containing a ``.``.
    """

    system = "kernel"

    def __init__(self, name: str, description: str, parts: Mapping[str, Target]):
        if not parts:
            raise ValueError("a composite target needs at least one part")
        if any("." in p for p in parts):
            raise ValueError(f"part names must not contain '.': {sorted(parts)}")
        self.name = name
        self.description = description
        self.parts: dict[str, Target] = dict(parts)
        self._mutants: dict[str, tuple[str, str, str]] = {}
        counts: dict[str, int] = {}
        for target in self.parts.values():
            for m in target.mutants():
                counts[m] = counts.get(m, 0) + 1
        for part, target in self.parts.items():
            for m, text in target.mutants().items():
                key = m if counts[m] == 1 else f"{part}.{m}"
                self._mutants[key] = (part, m, f"{part}: {text}")
        self._format_part = next(iter(self.parts))

    # -- model side ------------------------------------------------------------

    def mutants(self) -> Mapping[str, str]:
        return {k: text for k, (_, _, text) in self._mutants.items()}

    def mutant_owner(self, mutant: str | None) -> tuple[str | None, str | None]:
        """(part, the part's own name) of a mutant of this target; (None, None) for None.
        KeyError for an unknown one."""
        if mutant is None:
            return None, None
        part, inner, _ = self._mutants[mutant]
        return part, inner

    def new_model(self, mutant: str | None) -> CompositeModel:
        self.mutant_owner(mutant)  # KeyError now for an unknown mutant
        return CompositeModel(self, mutant)

    def sequences(self, max_steps: int) -> st.SearchStrategy[list[Any]]:
        """A part, then a sequence of that part's strategy, each abstract step
        tagged ``(part, step)``."""
        names = list(self.parts)

        def of(part: str) -> st.SearchStrategy[list[Any]]:
            return self.parts[part].sequences(max_steps).map(lambda seq: [(part, a) for a in seq])

        return st.sampled_from(names).flatmap(of)

    def resolve(self, model: CompositeModel, abstract: Any) -> Step:
        part, inner = abstract
        step = self.parts[part].resolve(model.of(part), inner)
        if PART in step:
            raise ValueError(f"part {part!r} resolved a step that has a {PART!r} key itself: {step!r}")
        return {**step, PART: part}

    def apply(self, model: CompositeModel, step: Step) -> Observation:
        part, inner = _split(step)
        return self.parts[part].apply(model.of(part), inner)

    def probes(self, model: CompositeModel) -> list[Probe]:
        if model.part is None:
            return []
        return [{**p, PART: model.part} for p in self.parts[model.part].probes(model.of(model.part))]

    def answer_probes(self, model: CompositeModel, probes: Sequence[Probe]) -> Observation:
        if model.part is None:
            return {}
        return self.parts[model.part].answer_probes(model.of(model.part), [_split(p)[1] for p in probes])

    def counters(self, step: Step, predicted: Observation) -> dict[str, int]:
        """The part's own counters (see harness.difftest.engine.tally), if it has any."""
        part, inner = _split(step)
        counters = target_counters(self.parts[part])
        return dict(counters(inner, predicted)) if counters is not None else {}

    # -- replay files, reports ----------------------------------------------------

    def check_step(self, raw: Any) -> Step:
        if not isinstance(raw, dict):
            raise ValueError(f"{raw!r} is not a step object")
        part = raw.get(PART)
        if part not in self.parts:
            raise ValueError(f"{PART!r} is {part!r}, not one of {', '.join(self.parts)}")
        inner = self.parts[part].check_step({k: v for k, v in raw.items() if k != PART})
        return {**inner, PART: part}

    def describe(self, step: Step) -> str:
        part, inner = _split(step)
        self._format_part = part
        return f"[{part}] {self.parts[part].describe(inner)}"

    def format_value(self, field_name: str, value: Any) -> str:
        """Rendered by the part last described (the report describes the failing
        sequence's steps before it renders their values)."""
        part = self.parts.get(self._format_part)
        return part.format_value(field_name, value) if part is not None else default_format(field_name, value)

    # -- system side ---------------------------------------------------------------

    def driver(self) -> Driver:
        raise DifftestError(f"{self.name}: the driver depends on the sequence's part; use driver_for(steps)")

    def driver_for(self, steps: Sequence[Step]) -> Driver:
        """The driver of the part of ``steps`` (all of one part; DifftestError if not)."""
        parts = {s.get(PART) for s in steps}
        if len(parts) != 1:
            raise DifftestError(f"{self.name}: a sequence must belong to one part, not {sorted(map(str, parts))}")
        (part,) = parts
        if part not in self.parts:
            raise DifftestError(f"{self.name}: unknown part {part!r}")
        return PartDriver(self.parts[str(part)].driver())

    def machine(self) -> MachineSpec:
        return merge_machines([t.machine() for t in self.parts.values()])


def merge_machines(specs: Sequence[MachineSpec]) -> MachineSpec:
    """One machine for all of ``specs``: every device (once), every kernel
    command-line word (once, in order), the largest memory and CPU count.

    Raises DifftestError when they ask for different machine types, accelerators,
    CPU models, kernels or initrds, or two different devices with one id.
    """
    first = specs[0]
    devices: list[Any] = []
    words: list[str] = []
    for spec in specs:
        for key in ("machine", "accel", "cpu", "kernel", "initrd"):
            if getattr(spec, key) != getattr(first, key):
                raise DifftestError(f"the parts need different machines: {key} {getattr(first, key)!r} and "
                                    f"{getattr(spec, key)!r}")
        for d in spec.devices:
            if d not in devices:
                devices.append(d)
        for w in spec.cmdline.split():
            if w not in words:
                words.append(w)
    try:
        return first.replace(devices=tuple(devices), cmdline=" ".join(words),
                             memory_mib=max(s.memory_mib for s in specs), cpus=max(s.cpus for s in specs))
    except Exception as exc:  # DeviceConfigError: e.g. two IOMMUs, a duplicate device id
        raise DifftestError(f"the parts' machines cannot be combined: {exc}") from exc


def _parts() -> tuple[dict[str, Target], str]:
    from harness.difftest.vhost_net import VhostNetTarget
    parts: dict[str, Target] = {"vhost-net": VhostNetTarget()}
    try:
        from harness.difftest.vhost_vdpa import VhostVdpaTarget  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return parts, " (vhost-vdpa part not available: harness.difftest.vhost_vdpa is missing)"
    parts["vhost-vdpa"] = VhostVdpaTarget()
    return parts, ""


class IotlbTarget(CompositeTarget):
    """``iotlb``: VhostNetTarget and VhostVdpaTarget, each sequence on one of them."""

    def __init__(self) -> None:
        parts, note = _parts()
        super().__init__("iotlb", "the vhost device IOTLB of vhost-net and vhost-vdpa, one part per sequence"
                         + note, parts)
