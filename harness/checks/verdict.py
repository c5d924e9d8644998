"""What a check returns: divergences with their evidence, counts, and whether
anything was checked at all.

Every checker (:mod:`harness.checks.vtd`, :mod:`harness.checks.guest_intent`,
:mod:`harness.checks.block_data`, and the checkers of later paths) ends with a
:class:`CheckReport`; one run's reports are gathered in a :class:`Verdict`,
which is what the command line prints and exits with, what the pytest plugin
fails a test on, and what is saved as ``verdict.json``.

The rule every checker follows: a report that checked nothing, or that could
not read part of the evidence it depends on, is *inconclusive* (its
``inconclusive`` list says why), never OK.  Divergences win over
inconclusiveness: a run with a divergence has status ``divergence`` even when
another report is inconclusive.

Pure data: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

__all__ = [
    "STATUS_OK",
    "STATUS_DIVERGENCE",
    "STATUS_INCONCLUSIVE",
    "Located",
    "TraceLine",
    "Divergence",
    "CheckReport",
    "Verdict",
    "DivergenceLog",
    "counts_dict",
]

STATUS_OK: Final = "ok"
STATUS_DIVERGENCE: Final = "divergence"
STATUS_INCONCLUSIVE: Final = "inconclusive"


class Located(Protocol):
    """Anything with a line number and its raw text (a host or guest event)."""

    @property
    def lineno(self) -> int: ...

    @property
    def raw(self) -> str: ...


@dataclass(frozen=True, slots=True)
class TraceLine:
    """A line of evidence: its ``source`` (``host`` for QEMU's trace, ``guest``
    for the guest kernel's trace, ``ops`` for the agent's op records), its
    1-based ``lineno`` there and its text ``raw``."""

    lineno: int
    raw: str
    source: str = "host"

    @classmethod
    def of(cls, event: Located, source: str = "host") -> TraceLine:
        return cls(event.lineno, event.raw, source)

    def format(self, marker: str = " ") -> str:
        where = "" if self.source == "host" else f"{self.source}:"
        return f"{marker} {where}{self.lineno:>8} | {self.raw}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "lineno": self.lineno, "raw": self.raw}


@dataclass
class Divergence:
    """One disagreement between what the system under test did and what the
    model allows.

    ``line`` is the event where it was detected; ``before`` the up to K
    events preceding it, ``after`` the up to K following it (filled in as
    they are fed); ``related`` other lines that explain it, as
    ``(role, line)``, e.g. ``("map added", ...)``, ``("guest unmapped", ...)``.
    ``iova`` is IO-virtual, ``expected``/``observed`` guest-physical byte
    addresses (model's answer vs the device's), when they apply.
    """

    kind: str
    message: str
    line: TraceLine
    before: list[TraceLine] = field(default_factory=list)
    after: list[TraceLine] = field(default_factory=list)
    related: list[tuple[str, TraceLine]] = field(default_factory=list)
    sid: int | None = None
    domain: int | None = None
    iova: int | None = None
    expected: int | None = None
    observed: int | None = None

    @property
    def lineno(self) -> int:
        return self.line.lineno

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "source": self.line.source,
            "lineno": self.line.lineno,
            "raw": self.line.raw,
            "sid": self.sid,
            "domain": self.domain,
            "iova": self.iova,
            "expected": self.expected,
            "observed": self.observed,
            "related": [{"role": role, **ln.to_dict()} for role, ln in self.related],
            "before": [ln.to_dict() for ln in self.before],
            "after": [ln.to_dict() for ln in self.after],
        }

    def format(self) -> str:
        where = "" if self.line.source == "host" else f"{self.line.source} "
        out = [f"{self.kind} at {where}line {self.line.lineno}: {self.message}"]
        for role, ln in self.related:
            src = "" if ln.source == "host" else f"{ln.source} "
            out.append(f"    {role}: {src}line {ln.lineno}: {ln.raw}")
        if self.before or self.after:
            out.append("    context:")
            out.extend("    " + ln.format() for ln in self.before)
            out.append("    " + self.line.format(">"))
            out.extend("    " + ln.format() for ln in self.after)
        return "\n".join(out)


def counts_dict(counts: Any) -> dict[str, Any]:
    """A checker's counts (a dataclass or a mapping) as a plain dict."""
    if dataclasses.is_dataclass(counts) and not isinstance(counts, type):
        return dataclasses.asdict(counts)
    return dict(counts)


@dataclass
class CheckReport:
    """The outcome of one checker.

    ``checker`` names it (``vtd-consistency``, ``guest-intent``,
    ``block-data``); ``counts`` is the checker's own counts dataclass (or a
    dict); ``divergences`` the first ones with full detail, in order, while
    ``total_divergences`` and ``divergences_by_kind`` count all of them;
    ``warnings`` say what was incomplete without making the check fail;
    ``inconclusive`` gives the reasons the check could not judge (nothing
    checked, evidence missing or unreadable).
    """

    checker: str
    counts: Any
    divergences: list[Divergence] = field(default_factory=list)
    total_divergences: int = 0
    divergences_by_kind: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    inconclusive: list[str] = field(default_factory=list)
    title: str = ""

    @property
    def ok(self) -> bool:
        """No divergence (says nothing about whether anything was checked)."""
        return self.total_divergences == 0

    @property
    def conclusive(self) -> bool:
        return not self.inconclusive

    @property
    def status(self) -> str:
        if not self.ok:
            return STATUS_DIVERGENCE
        return STATUS_OK if self.conclusive else STATUS_INCONCLUSIVE

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (ints, strings, lists, dicts, None)."""
        return {
            "checker": self.checker,
            "status": self.status,
            "ok": self.ok,
            "conclusive": self.conclusive,
            "inconclusive": list(self.inconclusive),
            "counts": counts_dict(self.counts),
            "total_divergences": self.total_divergences,
            "divergences_by_kind": dict(self.divergences_by_kind),
            "warnings": list(self.warnings),
            "divergences": [d.to_dict() for d in self.divergences],
        }

    def format(self) -> str:
        """A human report: status, counts table, reasons, warnings, divergences."""
        n = self.total_divergences
        head = {STATUS_OK: "OK", STATUS_INCONCLUSIVE: "INCONCLUSIVE"}.get(
            self.status, f"FAILED ({n} divergence{'' if n == 1 else 's'})")
        out = [f"{self.title or self.checker}: {head}", "  counts:"]
        counts = counts_dict(self.counts)
        width = max((len(k) for k in counts), default=8)
        out.extend(f"    {k:<{width}}  {v:>12}" for k, v in counts.items())
        if self.divergences_by_kind:
            out.append("  divergences by kind:")
            out.extend(f"    {k:<{width}}  {v:>12}" for k, v in self.divergences_by_kind.items())
        if self.inconclusive:
            out.append("  inconclusive because:")
            out.extend(f"    - {r}" for r in self.inconclusive)
        if self.warnings:
            out.append("  warnings:")
            out.extend(f"    - {w}" for w in self.warnings)
        if self.divergences:
            out.append(f"  divergences (first {len(self.divergences)} of {n}):")
            for i, d in enumerate(self.divergences, 1):
                out.append(f"  [{i}] " + d.format().replace("\n", "\n  "))
        return "\n".join(out)


@dataclass
class Verdict:
    """One run's verdict: the reports of every checker that applied, plus the
    failures of the system under test seen outside the checkers (``failures``:
    e.g. data that did not verify in the guest, an I/O error, a guest panic).

    ``status``: ``divergence`` if any report diverged or any failure was seen;
    else ``inconclusive`` if there is no report or any report is inconclusive;
    else ``ok``.
    """

    reports: list[CheckReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.failures or any(not r.ok for r in self.reports):
            return STATUS_DIVERGENCE
        if not self.reports or any(not r.conclusive for r in self.reports):
            return STATUS_INCONCLUSIVE
        return STATUS_OK

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def conclusive(self) -> bool:
        return bool(self.reports) and all(r.conclusive for r in self.reports)

    @property
    def inconclusive_reasons(self) -> list[str]:
        if not self.reports:
            return ["no checker applied to this run"]
        return [f"{r.checker}: {why}" for r in self.reports for why in r.inconclusive]

    def report(self, checker: str) -> CheckReport:
        """The report of ``checker``; raises KeyError naming the ones present."""
        for r in self.reports:
            if r.checker == checker:
                return r
        raise KeyError(f"no {checker!r} report (have: {', '.join(r.checker for r in self.reports)})")

    def divergences(self) -> Iterable[Divergence]:
        for r in self.reports:
            yield from r.divergences

    def summary(self) -> str:
        """One line: status, and the reason when it is not OK."""
        if self.status == STATUS_OK:
            return "verdict: OK (" + ", ".join(f"{r.checker} ok" for r in self.reports) + ")"
        if self.status == STATUS_DIVERGENCE:
            parts = [f"{r.checker}: {r.total_divergences} divergence(s)" for r in self.reports if not r.ok]
            parts += self.failures
            return "verdict: FAILED (" + "; ".join(parts) + ")"
        return "verdict: INCONCLUSIVE (" + "; ".join(self.inconclusive_reasons) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "ok": self.ok,
            "conclusive": self.conclusive,
            "inconclusive": self.inconclusive_reasons if not self.conclusive else [],
            "failures": list(self.failures),
            "versions": dict(self.versions),
            "reports": [r.to_dict() for r in self.reports],
        }

    def format(self) -> str:
        return "\n".join([*(r.format() for r in self.reports), *(f"failure: {f}" for f in self.failures),
                          self.summary()])


class DivergenceLog:
    """Collects one checker's divergences with their context, in bounded memory.

    Call :meth:`seen` with every event the checker consumes (before handling
    it), :meth:`diverge` when one diverges, and :meth:`report` at the end.
    The first ``max_divergences`` divergences keep full detail (the
    ``context`` events before and after them); all are counted.
    ``source`` labels the lines (``host`` or ``guest``).
    """

    def __init__(self, *, max_divergences: int = 20, context: int = 8, source: str = "host") -> None:
        from collections import deque

        self.max_divergences = max_divergences
        self.context = context
        self.source = source
        self._ring: deque[Located] = deque(maxlen=max(context, 0) or 1)
        self._awaiting: list[Divergence] = []
        self._current: Located | None = None
        self.divergences: list[Divergence] = []
        self.total = 0
        self.by_kind: dict[str, int] = {}

    def seen(self, event: Located) -> None:
        """Call with every event *before* handling it: it becomes the line a
        divergence is detected at, the after-context of earlier ones and, from
        the next event on, the before-context of later ones."""
        if self._awaiting:
            line = TraceLine.of(event, self.source)
            keep: list[Divergence] = []
            for d in self._awaiting:
                d.after.append(line)
                if len(d.after) < self.context:
                    keep.append(d)
            self._awaiting = keep
        if self._current is not None:
            self._ring.append(self._current)
        self._current = event

    def diverge(self, kind: str, event: Located, message: str, *,
                related: Iterable[tuple[str, Located | TraceLine]] = (), **fields: Any) -> None:
        """Record a divergence of ``kind`` detected at ``event`` (the one last passed to :meth:`seen`).

        ``related``: ``(role, event or TraceLine)`` pairs; events are labelled
        with this log's source.  ``fields``: ``sid``, ``domain``, ``iova``,
        ``expected``, ``observed``.
        """
        self.total += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if len(self.divergences) >= self.max_divergences:
            return
        line = event if isinstance(event, TraceLine) else TraceLine.of(event, self.source)
        context = self.context > 0 and line.source == self.source  # another log's line: no context from this one
        d = Divergence(
            kind=kind,
            message=message,
            line=line,
            before=[TraceLine.of(e, self.source) for e in self._ring] if context else [],
            related=[(role, ln if isinstance(ln, TraceLine) else TraceLine.of(ln, self.source))
                     for role, ln in related],
            **fields,
        )
        self.divergences.append(d)
        if context:
            self._awaiting.append(d)

    def report(self, checker: str, counts: Any, *, warnings: Iterable[str] = (),
               inconclusive: Iterable[str] = (), title: str = "") -> CheckReport:
        self._awaiting.clear()
        return CheckReport(checker=checker, counts=counts, divergences=list(self.divergences),
                           total_divergences=self.total, divergences_by_kind=dict(self.by_kind),
                           warnings=list(warnings), inconclusive=list(inconclusive), title=title)
