"""Trace event formats per QEMU version, and the choice of one for a binary.

QEMU's ``log`` trace backend prints each event with the format string of its
``trace-events`` file, and those change between releases: an event is renamed
(QEMU 10.0 traces the virtio-iommu reset as ``virtio_iommu_device_reset_exit``
since the device moved to the Resettable interface, hw/virtio/virtio-iommu.c),
a field changes its printf conversion (10.0's ``virtio_iommu_get_config``
prints the domain range ``%u`` where 7.2 printed ``%d``), fields are added.
Each :class:`TraceFormat` is the table of one release series, checked against
that release's ``trace-events`` (hw/i386, hw/nvme, hw/virtio, hw/block and the
top-level file, as installed in ``/usr/share/qemu/trace-events-all``):

======  ==============================================================
series  differences from 7.2 in the events the harness parses
======  ==============================================================
7.2     (the reference: :data:`harness.trace.parser.DEFAULT_FORMATS`)
10.0    ``virtio_iommu_device_reset`` -> ``virtio_iommu_device_reset_exit``;
        ``virtio_iommu_get_config`` domain range ``%u``.  The vtd_*,
        pci_nvme_*, dma_*, virtqueue_* and virtio_blk_* formats the
        harness reads are unchanged (the PASID-carrying vtd events,
        ``vtd_inv_desc_iotlb_pasid*``, exist in both).
======  ==============================================================

:func:`choose_format` picks the table from the binary's version *and* its
``-trace help`` list (:mod:`harness.vm.qemu_binary`): a family (``vtd``,
``pci_nvme``, ``dma``, ``virtio``, ``virtqueue``, ``virtio_iommu``) is *known*
for that binary only if its series has a table and the binary lists every
event of the family the table parses.  A family a run's checkers need that is
not known makes the verdict inconclusive with the reason
(:meth:`FormatChoice.reasons_for`): never OK on a guess.  A trace with no
version recorded (a bare ``trace.log``, artifacts saved before versions were)
is read with QEMU 7.2's table, as it always was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from harness.trace.events import (
    EVENT_CLASSES,
    Arg,
    VirtioIommuDeviceReset,
    VirtioIommuGetConfig,
    event_family,
)
from harness.trace.parser import DEFAULT_FORMATS, CompiledFormats, EventFormat

__all__ = [
    "FAMILIES",
    "FORMATS",
    "DEFAULT_SERIES",
    "TraceFormat",
    "FormatChoice",
    "format_family",
    "choose_format",
    "device_families",
]

DEFAULT_SERIES: Final = "7.2"
"""The series whose table reads a trace of unknown origin."""


def format_family(name: str) -> str:
    """The family of a trace event name as the version tables group them:
    ``virtio_iommu_*`` -> ``virtio_iommu``, else :func:`~harness.trace.events.event_family`
    (``vtd``, ``pci_nvme``, ``dma``, ``virtio``, ``virtqueue``...)."""
    if name.startswith("virtio_iommu_"):
        return "virtio_iommu"
    return event_family(name)


@dataclass(frozen=True)
class TraceFormat:
    """The event formats of one QEMU release series.

    ``series`` (``"10.0"``), ``entries`` (one :class:`EventFormat` a trace name),
    ``renamed`` (the 7.2 name -> this series' name, for the ``-trace events=``
    list), ``compiled`` (for :func:`harness.trace.parser.parse_file`'s ``table``)."""

    series: str
    entries: tuple[EventFormat, ...]
    compiled: CompiledFormats
    renamed: Mapping[str, str] = field(default_factory=dict)

    @property
    def families(self) -> dict[str, frozenset[str]]:
        """Family -> the trace names of the table in it."""
        out: dict[str, set[str]] = {}
        for entry in self.entries:
            out.setdefault(format_family(entry.trace_name), set()).add(entry.trace_name)
        return {family: frozenset(names) for family, names in out.items()}


def _table(series: str, changed: Sequence[EventFormat] = (), renamed: Mapping[str, str] | None = None) -> TraceFormat:
    """7.2's entries with those of ``changed`` (same class) replaced."""
    by_class = {entry.cls: entry for entry in changed}
    entries = tuple(by_class.get(cls, EventFormat(cls)) for cls in EVENT_CLASSES)
    compiled = DEFAULT_FORMATS if not changed else CompiledFormats(entries)
    return TraceFormat(series, entries, compiled, dict(renamed or {}))


_U32: Final = Arg("uint", 32)

FORMATS: Final[dict[str, TraceFormat]] = {
    "7.2": _table("7.2"),
    "10.0": _table(
        "10.0",
        [EventFormat(VirtioIommuDeviceReset, name="virtio_iommu_device_reset_exit"),
         EventFormat(VirtioIommuGetConfig, overrides={"domain_start": _U32, "domain_end": _U32})],
        renamed={"virtio_iommu_device_reset": "virtio_iommu_device_reset_exit"},
    ),
}
"""The tables the harness has, by release series."""

FAMILIES: Final[frozenset[str]] = frozenset(FORMATS[DEFAULT_SERIES].families)
"""Every family the harness parses."""

_DEVICE_FAMILIES: Final[dict[str, tuple[str, ...]]] = {
    "intel-iommu": ("vtd",),
    "virtio-iommu": ("virtio_iommu",),
    "nvme": ("pci_nvme", "dma"),
    "virtio-blk": ("virtio", "virtqueue"),
    "virtio-net": ("virtqueue",),
}


def device_families(kinds: Iterable[str] | None) -> frozenset[str]:
    """The families the checkers read for a machine with devices of ``kinds``
    (``intel-iommu``, ``nvme``...); None (a bare trace, devices unknown): all."""
    if kinds is None:
        return FAMILIES
    out: set[str] = set()
    for kind in kinds:
        out.update(_DEVICE_FAMILIES.get(kind, ()))
    return frozenset(out)


@dataclass(frozen=True)
class FormatChoice:
    """The table chosen for one QEMU: ``series`` (the table's), ``qemu`` (the
    version as probed, "" when unknown), ``unknown`` (family -> why its format is
    not known for this binary) and ``assumed`` (no version was known: 7.2's
    table, as for every trace before versions were recorded)."""

    series: str
    qemu: str = ""
    unknown: Mapping[str, str] = field(default_factory=dict)
    assumed: bool = False

    @property
    def format(self) -> TraceFormat:
        return FORMATS[self.series]

    @property
    def table(self) -> CompiledFormats:
        return self.format.compiled

    def reasons_for(self, families: Iterable[str]) -> list[str]:
        """The reasons, one a family of ``families`` whose format is unknown (sorted)."""
        return [self.unknown[f] for f in sorted(set(families)) if f in self.unknown]

    def trace_events(self, requested: Iterable[str], available: frozenset[str] | None = None) -> list[str]:
        """``requested`` (7.2 names and patterns) as this series names them, without
        the names ``available`` (the binary's ``-trace help``) lacks: the list for
        ``-trace events=FILE`` (QEMU warns about every unknown name)."""
        renamed = self.format.renamed
        out: list[str] = []
        for name in requested:
            name = renamed.get(name, name)
            if available is not None and "*" not in name and name not in available:
                continue
            if name not in out:
                out.append(name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"series": self.series, "qemu": self.qemu, "unknown": dict(self.unknown), "assumed": self.assumed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FormatChoice:
        """The choice saved by :meth:`to_dict` (``qemu.json`` of a run's artifacts).

        Raises ValueError naming what is wrong (an unknown series, a field of the wrong type)."""
        series = data.get("series")
        if not isinstance(series, str) or series not in FORMATS:
            raise ValueError(f"series {series!r} is not one of {', '.join(FORMATS)}")
        unknown = data.get("unknown", {})
        if not isinstance(unknown, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in unknown.items()):
            raise ValueError("'unknown' is not a table of family -> reason")
        return cls(series, str(data.get("qemu", "")), dict(unknown), bool(data.get("assumed", False)))


def choose_format(series: str | None, development: bool = False, *, version: str = "",
                  events: frozenset[str] | None = None) -> FormatChoice:
    """The table for a QEMU of release ``series`` (``"10.0"``; None: unknown) whose
    ``-trace help`` lists ``events``.

    - ``series`` None: 7.2's table, assumed (``assumed`` True, nothing unknown).
    - a series without a table, or a development tree (``development``: micro
      >= 50, between releases): 7.2's table to read the lines, every family unknown.
    - else that series' table; a family is unknown if ``events`` lacks one of its
      events (a build whose trace points differ from its release's).

    Never raises.
    """
    if series is None:
        return FormatChoice(DEFAULT_SERIES, version, {}, assumed=True)
    shown = version or series
    if series not in FORMATS or development:
        why = "a development tree between releases" if development and series in FORMATS else "no table"
        reason = (f"QEMU {shown}: the trace formats of this version are not known to the harness ({why}; "
                  f"known: {', '.join(FORMATS)}), so its {{family}}_* events cannot be read with confidence")
        return FormatChoice(DEFAULT_SERIES, shown, {f: reason.format(family=f) for f in sorted(FAMILIES)})
    table = FORMATS[series]
    unknown: dict[str, str] = {}
    if events is not None:
        for family, names in sorted(table.families.items()):
            missing = sorted(names - events)
            if missing:
                listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                unknown[family] = (f"QEMU {shown} does not list the {family}_* trace events {listed} that the "
                                   f"QEMU {series} format table reads ('-trace help'), so its {family}_* "
                                   "events cannot be read with confidence")
    return FormatChoice(series, shown, unknown)
