"""Nightly regression history: what a run's JUnit XML says about its DMA verdicts,
kept one JSON line a run, and what changed since the previous run.

The pytest plugin (:mod:`harness.pytest_plugin`) attaches each VM's verdict to its
test in the JUnit XML as properties (``vm0.status``, ``vm0.<checker>.status``,
``vm0.<checker>.<count>``, ``vm0.failures``, ``vm0.version.<name>``).
:func:`read_junit` turns such a file into a *record*: a JSON-able dict

.. code-block:: text

    {"date": ISO 8601 (the test suite's timestamp, else now, UTC),
     "labels": {name: value} (given on the command line, e.g. the matrix entry),
     "versions": {name: [distinct values seen in the verdicts]},
     "totals": {"tests", "passed", "failed", "errors", "skipped",
                "verdicts_ok", "verdicts_divergence", "verdicts_inconclusive"},
     "tests": {"<classname>::<name>": {
         "outcome": "passed" | "failed" | "error" | "skipped",
         "vms": {"vm0": {"status": "ok" | "divergence" | "inconclusive",
                         "failures": int, "versions": {name: value},
                         "checkers": {"guest-intent": {"status": ..., "counts": {name: int}}}}}}}}

:func:`compare` says what changed between two records: *regressions* (a test that
now fails or errors and did not before, a verdict or checker status that moved
away from ``ok``, a verdict or checker that is gone, a count that dropped to zero,
no tests at all) and *notes* (everything else worth a line: versions, fixes, new
or vanished tests, trouble counts such as ``guest_unpaired`` that fell to zero or
rose from it). ``python -m harness nightly-history`` appends the record to a
history file and exits 1 when a regression shows.

Pure except for :func:`read_junit`, :func:`last_record` and :func:`append_record`
(file I/O). Errors in the input are :class:`~harness.errors.ConfigError`: one
line naming the file (CLI exit status 2).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from harness.errors import ConfigError

__all__ = [
    "MAX_JUNIT_BYTES",
    "MAX_HISTORY_LINE",
    "TROUBLE_COUNT",
    "Changes",
    "recipe_keys",
    "read_junit",
    "record_from_junit",
    "last_record",
    "append_record",
    "compare",
]

MAX_JUNIT_BYTES: Final = 256 << 20
"""Bytes of a JUnit XML file read at most (a whole suite's is well under 10 MiB)."""

MAX_HISTORY_LINE: Final = 64 << 20
"""Bytes of the last line of a history file read at most."""

VERDICT_STATUSES: Final = ("ok", "divergence", "inconclusive")
OUTCOMES: Final = ("passed", "failed", "error", "skipped")

TROUBLE_COUNT: Final = re.compile(
    r"unpaired|mismatch|ambiguous|unmodelled|unknown|malformed|lost|not_judged|errors?$|unattributed|"
    r"overflow|skipped|host_only|without|divergence|quirk_drops")
"""Counts of evidence that could not be used or went wrong (``guest_unpaired``,
``malformed_lines``, ``nvme_errors``, ...): for these, falling to zero is good and
rising from zero is only noted (the verdict's status says whether it mattered).
Every other count measures what was checked, and its drop to zero is a regression."""

_STATUS_RANK: Final = {"ok": 0, "inconclusive": 1, "divergence": 2}


def recipe_keys() -> dict[str, str]:
    """The harness's own recipe keys, ``{"kernel": key, "rootfs": key, "xen": key}``
    (16 hex digits each, :func:`harness.images.cache.content_key` of the recipe):
    what ``python -m harness images key`` prints and what a CI cache of the image
    folder is keyed by. Reads the packaged recipes only; nothing is built, locked,
    created or downloaded.

    Raises:
        ImageError: the recipes are not installed (see :func:`harness.images.cache.recipes_dir`).
    """
    from harness.images.kernel import recipe_key
    from harness.images.rootfs import base_key
    from harness.images.xen import xen_key
    return {"kernel": recipe_key(), "rootfs": base_key(), "xen": xen_key()}


def _number(text: str) -> int | str:
    return int(text) if re.fullmatch(r"-?[0-9]+", text.strip()) else text


def _outcome(case: ET.Element) -> str:
    tags = {child.tag for child in case}
    if "failure" in tags:
        return "failed"
    if "error" in tags:
        return "error"
    if "skipped" in tags:
        return "skipped"
    return "passed"


def _vms(properties: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """The verdicts among a test case's properties (see the module docstring)."""
    vms: dict[str, dict[str, Any]] = {}
    for name, value in properties:
        vm, dot, rest = name.partition(".")
        if dot and rest == "status" and value in VERDICT_STATUSES:
            vms[vm] = {"status": value, "failures": 0, "versions": {}, "checkers": {}}
    for name, value in properties:
        vm, _, rest = name.partition(".")
        if vm not in vms or rest == "status":
            continue
        entry = vms[vm]
        what, dot, key = rest.partition(".")
        if what == "failures" and not dot:
            number = _number(value)
            entry["failures"] = number if isinstance(number, int) else 0
        elif what == "version" and dot:
            entry["versions"][key] = value
        elif dot and key:
            checker = entry["checkers"].setdefault(what, {"status": None, "counts": {}})
            if key == "status":
                checker["status"] = value
            else:
                number = _number(value)
                if isinstance(number, int):  # string counts (per-sid tables) are not tracked
                    checker["counts"][key] = number
    return vms


def _suite_date(root: ET.Element, now: dt.datetime | None) -> str:
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    stamp = suite.get("timestamp") if suite is not None else None
    if stamp:
        try:
            return dt.datetime.fromisoformat(stamp).isoformat(timespec="seconds")
        except ValueError:
            pass
    return (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")


def record_from_junit(text: str, *, source: str = "JUnit XML", labels: dict[str, str] | None = None,
                      now: dt.datetime | None = None) -> dict[str, Any]:
    """The history record (module docstring) of one JUnit XML document ``text``.

    ``source`` names it in errors; ``labels`` are stored as given; ``now`` is the
    date when the suite carries no ``timestamp``.

    Raises:
        ConfigError: ``text`` is not XML, its root is neither ``testsuites`` nor
            ``testsuite``, or a ``testcase`` has no name.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ConfigError(f"not XML: {exc}", key="junit", source=source) from None
    if root.tag not in ("testsuites", "testsuite"):
        raise ConfigError(f"not JUnit XML: the root element is <{root.tag}>, not <testsuites> or <testsuite>",
                          key="junit", source=source)
    tests: dict[str, dict[str, Any]] = {}
    totals = dict.fromkeys(("tests", "passed", "failed", "errors", "skipped", "verdicts_ok",
                            "verdicts_divergence", "verdicts_inconclusive"), 0)
    versions: dict[str, set[str]] = {}
    for i, case in enumerate(root.iter("testcase")):
        name = case.get("name")
        if not name:
            raise ConfigError(f"testcase {i + 1} has no name", key="junit", source=source)
        classname = case.get("classname")
        test_id = f"{classname}::{name}" if classname else name
        properties = [(p.get("name", ""), p.get("value", "")) for p in case.iter("property")]
        vms = _vms(properties)
        outcome = _outcome(case)
        tests[test_id] = {"outcome": outcome, "vms": vms}
        totals["tests"] += 1
        totals["errors" if outcome == "error" else outcome] += 1
        for vm in vms.values():
            totals[f"verdicts_{vm['status']}"] += 1
            for vname, value in vm["versions"].items():
                versions.setdefault(vname, set()).add(value)
    return {"date": _suite_date(root, now), "labels": dict(labels or {}),
            "versions": {k: sorted(v) for k, v in sorted(versions.items())}, "totals": totals, "tests": tests}


def read_junit(path: Path, *, labels: dict[str, str] | None = None,
               now: dt.datetime | None = None) -> dict[str, Any]:
    """:func:`record_from_junit` of the file ``path``.

    Raises:
        ConfigError: the file is missing, not a regular file, larger than
            :data:`MAX_JUNIT_BYTES`, not UTF-8, or not JUnit XML.
    """
    source = str(path)
    if not path.exists():
        raise ConfigError("does not exist", key="junit", source=source)
    if not path.is_file():
        raise ConfigError("is not a regular file", key="junit", source=source)
    if path.stat().st_size > MAX_JUNIT_BYTES:
        raise ConfigError(f"is larger than {MAX_JUNIT_BYTES >> 20} MiB: not a JUnit XML file of a run",
                          key="junit", source=source)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"is not UTF-8 (byte offset {exc.start})", key="junit", source=source) from None
    return record_from_junit(text, source=source, labels=labels, now=now)


def _check_record(value: Any, where: str) -> dict[str, Any]:
    """``value`` has the shape :func:`compare` reads (tables where it expects tables)."""
    def table(v: Any) -> bool:
        return isinstance(v, dict)

    def vm_ok(vm: Any) -> bool:
        return table(vm) and table(vm.get("checkers", {})) and table(vm.get("versions", {})) and all(
            table(c) and table(c.get("counts", {})) for c in vm.get("checkers", {}).values())

    ok = (table(value) and table(value.get("tests")) and table(value.get("totals"))
          and table(value.get("versions", {}))
          and all(table(t) and table(t.get("vms", {})) and all(vm_ok(vm) for vm in t.get("vms", {}).values())
                  for t in value["tests"].values()))
    if not ok:
        raise ConfigError("not a history record (a JSON object with 'tests' and 'totals' tables, "
                          "as nightly-history writes)", key="--history", source=where)
    return value  # type: ignore[no-any-return]


def last_record(path: Path) -> tuple[dict[str, Any], int] | None:
    """The last record of the history file ``path`` and its 1-based line number, or
    None when the file does not exist or holds no line.

    Raises:
        ConfigError: ``path`` is not a regular file, or its last line is not a record
            (not UTF-8, not JSON, not an object with ``tests`` and ``totals``, or
            longer than :data:`MAX_HISTORY_LINE` bytes).
    """
    if not path.exists():
        return None
    if not path.is_file():
        raise ConfigError("is not a regular file", key="--history", source=str(path))
    last: bytes | None = None
    lineno = 0
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if len(line) > MAX_HISTORY_LINE:
                raise ConfigError(f"line {n} is longer than {MAX_HISTORY_LINE >> 20} MiB: not a history record",
                                  key="--history", source=str(path))
            if line.strip():
                last, lineno = line, n
    if last is None:
        return None
    where = f"{path} line {lineno}"
    try:
        value = json.loads(last.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"is not UTF-8 (byte offset {exc.start})", key="--history", source=where) from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"cannot read it as JSON: {exc}", key="--history", source=where) from None
    return _check_record(value, where), lineno


def append_record(path: Path, record: dict[str, Any], *, keep: int = 0) -> None:
    """Append ``record`` to the history file ``path`` as one JSON line (the file and
    its folder are created if missing; a last line without its newline gets one).
    ``keep`` > 0: afterwards only the last ``keep`` lines stay (the file is replaced
    atomically).

    Raises:
        OSError: the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    with path.open("a+b") as fh:
        fh.seek(0, 2)
        if fh.tell() > 0:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                line = "\n" + line
        fh.write(line.encode())
    if keep > 0:
        lines = [ln for ln in path.read_bytes().splitlines(keepends=True) if ln.strip()]
        if len(lines) > keep:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(b"".join(lines[-keep:]))
            tmp.replace(path)


@dataclass
class Changes:
    """What :func:`compare` found: ``regressions`` (each one line; any makes the
    nightly job fail) and ``notes`` (one line each, informational)."""

    regressions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _worse(before: Any, after: Any) -> bool:
    """A status moved away from ok (ok -> inconclusive/divergence, inconclusive -> divergence)."""
    return _STATUS_RANK.get(str(after), 2) > _STATUS_RANK.get(str(before), 2)


def _compare_status(changes: Changes, where: str, before: Any, after: Any) -> None:
    if before == after:
        return
    line = f"{where}: {before} -> {after}"
    (changes.regressions if _worse(before, after) else changes.notes).append(line)


def _compare_vm(changes: Changes, test: str, vm: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    _compare_status(changes, f"{test}: {vm} verdict", before.get("status"), after.get("status"))
    failures_before, failures_after = (v if isinstance(v := entry.get("failures"), int) else 0
                                       for entry in (before, after))
    if failures_after > failures_before:
        changes.regressions.append(f"{test}: {vm} failures {failures_before} -> {failures_after}")
    old_checkers: dict[str, Any] = before.get("checkers") or {}
    new_checkers: dict[str, Any] = after.get("checkers") or {}
    for checker in sorted(old_checkers.keys() - new_checkers.keys()):
        changes.regressions.append(f"{test}: {vm} checker {checker} is no longer reported")
    for checker in sorted(new_checkers.keys() - old_checkers.keys()):
        changes.notes.append(f"{test}: {vm} checker {checker} is new")
    for checker in sorted(old_checkers.keys() & new_checkers.keys()):
        old, new = old_checkers[checker] or {}, new_checkers[checker] or {}
        _compare_status(changes, f"{test}: {vm} {checker}", old.get("status"), new.get("status"))
        old_counts: dict[str, Any] = old.get("counts") or {}
        new_counts: dict[str, Any] = new.get("counts") or {}
        for name in sorted(old_counts.keys() | new_counts.keys()):
            was, now = old_counts.get(name, 0), new_counts.get(name, 0)
            if not isinstance(was, int) or not isinstance(now, int):
                continue
            trouble = TROUBLE_COUNT.search(name) is not None
            if was > 0 and now == 0:
                line = f"{test}: {vm} {checker}.{name} dropped to zero (was {was})"
                (changes.notes if trouble else changes.regressions).append(line)
            elif trouble and was == 0 and now > 0:
                changes.notes.append(f"{test}: {vm} {checker}.{name} rose from zero to {now}")


def compare(before: dict[str, Any] | None, after: dict[str, Any]) -> Changes:
    """What changed from the record ``before`` (None: there is no previous run) to
    ``after`` (records as :func:`record_from_junit` makes them).

    Regressions: a test that fails or errors now and passed, was skipped or did not
    exist before; a verdict or checker status that moved away from ``ok``; a VM's
    failures that rose; a verdict or checker present before and gone now; a count
    of something checked (not a :data:`TROUBLE_COUNT`) that dropped from above zero
    to zero or vanished; no test in the run while the previous one had some.
    With no previous run nothing is a regression.
    """
    changes = Changes()
    if before is None:
        return changes
    old_versions: dict[str, Any] = before.get("versions") or {}
    new_versions: dict[str, Any] = after.get("versions") or {}
    for name in sorted(old_versions.keys() | new_versions.keys()):
        if old_versions.get(name) != new_versions.get(name):
            changes.notes.append(f"version {name}: {old_versions.get(name)} -> {new_versions.get(name)}")
    old_tests: dict[str, Any] = before["tests"]
    new_tests: dict[str, Any] = after["tests"]
    if old_tests and not new_tests:
        changes.regressions.append(f"no test ran (the previous run had {len(old_tests)})")
    for test in sorted(new_tests):
        new = new_tests[test]
        old = old_tests.get(test)
        outcome = new.get("outcome")
        if old is None:
            if outcome in ("failed", "error"):
                changes.regressions.append(f"{test}: new failure ({outcome}; not in the previous run)")
            else:
                changes.notes.append(f"{test}: new test ({outcome})")
            continue
        was = old.get("outcome")
        if outcome in ("failed", "error") and was not in ("failed", "error"):
            changes.regressions.append(f"{test}: new failure ({was} -> {outcome})")
        elif outcome != was:
            changes.notes.append(f"{test}: {was} -> {outcome}")
        old_vms: dict[str, Any] = old.get("vms") or {}
        new_vms: dict[str, Any] = new.get("vms") or {}
        for vm in sorted(old_vms.keys() - new_vms.keys()):
            changes.regressions.append(f"{test}: {vm} has no verdict any more (was {old_vms[vm].get('status')})")
        for vm in sorted(new_vms.keys() - old_vms.keys()):
            status = new_vms[vm].get("status")
            (changes.notes if status == "ok" else changes.regressions).append(
                f"{test}: {vm} verdict is new ({status})")
        for vm in sorted(old_vms.keys() & new_vms.keys()):
            _compare_vm(changes, test, vm, old_vms[vm] or {}, new_vms[vm] or {})
    for test in sorted(old_tests.keys() - new_tests.keys()):
        changes.notes.append(f"{test}: not in this run any more (was {old_tests[test].get('outcome')})")
    return changes


def totals_line(record: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """One line of a record's totals, each with its previous value when it changed."""
    totals: dict[str, Any] = record.get("totals") or {}
    old: dict[str, Any] = (before or {}).get("totals") or {}

    def item(key: str, label: str) -> str:
        value = totals.get(key, 0)
        return f"{value} {label}" + (f" (was {old.get(key, 0)})" if before is not None and old.get(key, 0) != value
                                     else "")

    return (f"{item('tests', 'tests')}: {item('passed', 'passed')}, {item('failed', 'failed')}, "
            f"{item('errors', 'errors')}, {item('skipped', 'skipped')}; verdicts {item('verdicts_ok', 'ok')}, "
            f"{item('verdicts_divergence', 'divergence')}, {item('verdicts_inconclusive', 'inconclusive')}")
