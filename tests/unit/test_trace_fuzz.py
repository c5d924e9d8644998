"""Fuzzing the QEMU trace parser and the VT-d checker with hostile input.

Properties: :func:`parse_line` / :func:`parse_lines` / :func:`parse_file` and
:func:`harness.checks.vtd.check_lines` / ``check_trace_file`` never raise on
trace content (``parse_file`` raises only ``TraceReadError``, an ``OSError``,
for a damaged compressed stream), every typed event holds values inside the
width of its fields, valid lines round-trip, and memory stays bounded.

Inputs: arbitrary text; lines built from the real event formats
(:attr:`Event.FORMAT` and the fields' :class:`Arg`) with mutated fields (huge,
negative, missing, padded with spaces, binary garbage, NUL); coherent VT-d
streams over small pools of devices, domains and addresses with boundary
values; files with invalid UTF-8, over-long lines, and gzip/xz streams cut
short or corrupted.

Budget: ``DMA_HARNESS_FUZZ_EXAMPLES`` (default 50 examples per test, a few
seconds in all); ``DMA_HARNESS_FUZZ_LINES`` (default 20,000) sets the length
of the end-to-end fuzzed trace.  See docs/fuzzing.md.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import lzma
import os
import random
import re
import subprocess
import sys
import tracemalloc
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.checks.vtd import check_events, check_lines, check_trace_file
from harness.trace import (
    EVENT_CLASSES,
    MAX_LINE_CHARS,
    Event,
    MalformedEvent,
    NvmeError,
    ParseStats,
    TraceReadError,
    UnknownEvent,
    parse_file,
    parse_line,
    parse_lines,
)
from harness.trace.events import Arg

EXAMPLES = int(os.environ.get("DMA_HARNESS_FUZZ_EXAMPLES", "50"))
FUZZ_LINES = int(os.environ.get("DMA_HARNESS_FUZZ_LINES", "20000"))
PEAK_LIMIT = 200 << 20
"""Most memory (RSS) the end-to-end check of the fuzzed trace may use."""

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------
# The real formats, as lines
# --------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_OPTIONAL_GROUP = re.compile(r"\(\?:([^()]*)\)\?")


def field_args(cls: type[Event]) -> dict[str, Arg]:
    """Field -> :class:`Arg` of an event class (its fields after lineno/raw)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls)[2:]:
        (arg,) = [a for a in hints[f.name].__metadata__ if isinstance(a, Arg)]
        out[f.name] = arg
    return out


ARGS: dict[type[Event], dict[str, Arg]] = {cls: field_args(cls) for cls in EVENT_CLASSES}
OPTIONAL: dict[type[Event], set[str]] = {
    cls: {name for group in _OPTIONAL_GROUP.findall(cls.FORMAT or "") for name in _PLACEHOLDER.findall(group)}
    for cls in EVENT_CLASSES
}
"""The fields of each class that sit in an optional part of its format."""


def render(cls: type[Event], values: dict[str, str], optional: bool) -> str:
    """A line of ``cls`` as QEMU prints it, each field's text from ``values``.
    The format's optional parts (``(?:...)?``) are kept if ``optional``."""
    fmt = cls.FORMAT
    assert fmt is not None
    fmt = _OPTIONAL_GROUP.sub(lambda m: m.group(1) if optional else "", fmt)
    fmt = fmt.replace(",?", ",").replace("\\.", ".").replace("\\(", "(").replace("\\)", ")")
    assert "\\" not in fmt and "?" not in fmt, fmt
    return f"{cls.NAME} " + _PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), fmt)


def valid_text(arg: Arg, value: int | str) -> str:
    """How QEMU prints ``value`` for ``arg``."""
    if arg.kind == "hex":
        assert isinstance(value, int)
        return format(value, "02x" if arg.pad == 2 else "x")
    if arg.kind == "ptr":
        assert isinstance(value, int)
        return "(nil)" if value == 0 else f"{value:#x}"
    if arg.kind == "flag":
        return "1" if value else "0"
    return str(value)


def check_event(event: Event, lineno: int) -> None:
    """The invariants every parsed event holds."""
    assert isinstance(event, Event)
    assert event.lineno == lineno
    assert isinstance(event.raw, str) and len(event.raw) <= MAX_LINE_CHARS + 1
    event.pid, event.timestamp  # never raise
    if isinstance(event, (UnknownEvent, MalformedEvent, NvmeError)):
        return
    for name, arg in ARGS[type(event)].items():
        value = getattr(event, name)
        if value is None:
            assert arg.optional, (event, name)
        elif arg.kind == "text":
            assert isinstance(value, str)
        elif arg.kind == "flag":
            assert isinstance(value, bool)
        else:
            assert isinstance(value, int) and arg.min <= value <= arg.max, (event, name, value)


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

SAFE_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="')"),
    max_size=12,
)
JUNK = st.sampled_from(
    ["", " ", "  ", "\t", "\x00", "\x00\x00", "-", "0x", "(nil)", "\ufffd", "\u0663", "é",
     "9" * 5000, "f" * 5000, "1e9", "+1", "0x-1", "nan", "'", ")", "(", "\r", "\u2028"]
)


def value_text(arg: Arg) -> st.SearchStrategy[tuple[str, bool]]:
    """(text of the field, is it a valid value of the field)."""
    if arg.kind == "text":
        valid: st.SearchStrategy[str] = SAFE_TEXT
    elif arg.kind == "flag":
        valid = st.sampled_from(["0", "1"])
    else:
        edges = st.sampled_from([arg.min, arg.max, 0, 1, max(arg.min, -1)])
        valid = st.one_of(edges, st.integers(arg.min, arg.max)).map(lambda v: valid_text(arg, v))
    if arg.kind in ("hex", "ptr"):
        too_big = st.integers(arg.max + 1, 2**256).map(lambda v: format(v, "x"))
        if arg.kind == "ptr":
            too_big = too_big.map(lambda t: "0x" + t)
    elif arg.kind in ("uint", "int"):
        too_big = st.integers(arg.max + 1, 10**80).map(str)
    else:
        too_big = st.integers(2, 10**30).map(str)
    invalid = st.one_of(
        too_big,
        st.integers(-(2**100), -1).map(str),
        st.integers(-(2**100), arg.min - 1).map(str) if arg.kind == "int" else JUNK,
        JUNK,
        st.text(max_size=16),
        valid.map(lambda t: f" {t}"),
        valid.map(lambda t: f"{t}\x00"),
    )
    return st.one_of(valid.map(lambda t: (t, True)), invalid.map(lambda t: (t, False)))


@st.composite
def format_lines(draw: st.DrawFn) -> tuple[str, type[Event], dict[str, str], bool, bool]:
    """(line, class, field texts, all valid, optional parts present) of a real format,
    some fields mutated."""
    cls = draw(st.sampled_from(EVENT_CLASSES))
    optional = draw(st.booleans())
    values: dict[str, str] = {}
    all_valid = True
    for name, arg in ARGS[cls].items():
        if name in OPTIONAL[cls] and not optional:
            continue
        text, ok = draw(value_text(arg))
        values[name] = text
        all_valid = all_valid and ok
    line = render(cls, values, optional)
    prefix, ok = draw(st.sampled_from(
        [("", True), ("4242@1700000000.000123:", True), ("1@2.3:", True), ("x@y:", False),
         ("9" * 40 + "@1.1:", False)]))
    return prefix + line, cls, values, all_valid and ok, optional


@st.composite
def mangled(draw: st.DrawFn, lines: st.SearchStrategy[str]) -> str:
    """A line cut, spliced with junk, its spaces doubled, or left alone."""
    line = draw(lines)
    how = draw(st.sampled_from(["keep", "keep", "cut", "splice", "spaces", "drop_field"]))
    if how == "cut":
        return line[: draw(st.integers(0, len(line)))]
    if how == "splice":
        at = draw(st.integers(0, len(line)))
        return line[:at] + draw(st.one_of(JUNK, st.text(max_size=8))) + line[at:]
    if how == "spaces":
        return line.replace(" ", draw(st.sampled_from(["  ", "\t", " \x00"])))
    if how == "drop_field":
        words = line.split(" ")
        if len(words) > 2:
            del words[draw(st.integers(1, len(words) - 1))]
        return " ".join(words)
    return line


ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=200)
FORMATTED = format_lines().map(lambda t: t[0])

# A coherent VT-d/NVMe stream: small pools so that walks, hits, translations
# and invalidations meet in the checker's models, with boundary values in them.
SIDS = [0x18, 0xFA, 0x0, 0xFFFF]
DOMAINS = [0x1, 0x6, 0x0, 0xFFFF]
IOVAS = [0x0, 0x1000, 0xFFFE0000, 0x200000, 0x40000000, 2**64 - 4096, 2**64 - 1, 2**63]
GPAS = [0x0, 0x1D59000, 2**52 - 4096, 2**64 - 4096]
MASKS = [0xFFF, 0x1FFFFF, 0x3FFFFFFF, 0x0, 2**64 - 1, 0x1000]
AMS = [0, 1, 9, 18, 19, 63]


def stream_line(rng: Callable[[list[Any]], Any]) -> str:
    """One line of a coherent stream; ``rng(choices)`` picks one of ``choices``."""
    sid, dom, iova = rng(SIDS), rng(DOMAINS), rng(IOVAS)
    slpte = rng(GPAS) | rng([0, 1, 2, 3])
    bus, devfn = sid >> 8, sid & 0xFF
    kind = rng(["update", "translate", "hit", "translate", "inv", "inv", "dom", "glob", "reset",
                "cc", "ccg", "fault", "pt", "enable", "dma_io", "dma_cb", "dma_done", "nvme"])
    if kind == "update":
        return f"vtd_iotlb_page_update IOTLB page update sid {sid:#x} iova {iova:#x} slpte {slpte:#x} domain {dom:#x}"
    if kind == "hit":
        return f"vtd_iotlb_page_hit IOTLB page hit sid {sid:#x} iova {iova:#x} slpte {slpte:#x} domain {dom:#x}"
    if kind == "translate":
        mask = rng(MASKS)
        return (f"vtd_dmar_translate dev {bus:02x}:{devfn >> 3:02x}.{devfn & 7:02x} iova {iova & ~mask & (2**64 - 1):#x}"
                f" -> gpa {rng(GPAS) & ~mask & (2**64 - 1):#x} mask {mask:#x}")
    if kind == "inv":
        return f"vtd_inv_desc_iotlb_pages iotlb invalidate domain {dom:#x} addr {iova:#x} mask {rng(AMS):#x}"
    if kind == "dom":
        return f"vtd_inv_desc_iotlb_domain iotlb invalidate whole domain {dom:#x}"
    if kind == "glob":
        return "vtd_inv_desc_iotlb_global iotlb invalidate global"
    if kind == "reset":
        return "vtd_iotlb_reset IOTLB reset (reason: iotlb exceeds size limit)"
    if kind == "cc":
        return "vtd_context_cache_reset "
    if kind == "ccg":
        return "vtd_inv_desc_cc_global context invalidate globally"
    if kind == "fault":
        return f"vtd_dmar_fault sid {sid:#x} fault {rng([0, 5, 6, 255])} addr {iova:#x} write {rng([0, 1])}"
    if kind == "pt":
        return f"vtd_translate_pt source id {sid:#x}, iova {iova:#x}"
    if kind == "enable":
        return f"vtd_dmar_enable enable {rng([0, 1])}"
    dbs = rng(["0x5654f3557350", "0x1", "(nil)", "0xffffffffffffffff"])
    if kind == "dma_io":
        return f"dma_blk_io dbs={dbs} bs=0x2 offset={rng([0, -1, 2**63 - 1, 4096])} to_dev={rng([0, 1])}"
    if kind == "dma_cb":
        return f"dma_blk_cb dbs={dbs} ret={rng([0, -5, -(2**31)])}"
    if kind == "dma_done":
        return f"dma_complete dbs={dbs} ret=0 cb=(nil)"
    return f"pci_nvme_read cid {rng([0, 65535])} nsid 1 nlb {rng([0, 2**32 - 1])} count {rng([0, 2**64 - 1])} lba {iova:#x}"


STREAM_LINE = st.integers(0, 2**32 - 1).map(lambda seed: stream_line(random.Random(seed).choice))
"""One line of a coherent stream (a seed picks its values: one draw a line)."""

streams = st.lists(
    st.one_of(STREAM_LINE, STREAM_LINE, STREAM_LINE, FORMATTED, mangled(FORMATTED), ANY_TEXT),
    min_size=1, max_size=60,
)


# --------------------------------------------------------------------------
# Lines
# --------------------------------------------------------------------------


@FUZZ
@given(ANY_TEXT, st.integers(0, 2**40))
def test_parse_line_never_raises_on_any_text(text: str, lineno: int) -> None:
    check_event(parse_line(text, lineno), lineno)


@FUZZ
@given(format_lines())
def test_real_formats_round_trip_and_mutations_stay_in_width(
    drawn: tuple[str, type[Event], dict[str, str], bool, bool],
) -> None:
    line, cls, values, all_valid, _ = drawn
    event = parse_line(line, 7)
    check_event(event, 7)
    if all_valid:
        assert type(event) is cls, (line, event)
        for name, arg in ARGS[cls].items():
            if name not in values:
                continue
            parsed = getattr(event, name)
            assert valid_text(arg, parsed) == values[name] if arg.kind != "text" else parsed == values[name]
    elif type(event) is cls:
        # a mutation that still parses is a valid value after all (e.g. text
        # in a %s field): it was checked against the widths above
        pass


@FUZZ
@given(mangled(FORMATTED))
def test_mangled_real_lines_never_raise(line: str) -> None:
    check_event(parse_line(line, 1), 1)


@FUZZ
@given(st.lists(st.one_of(mangled(FORMATTED), ANY_TEXT), max_size=25))
def test_parse_lines_counts_every_line(lines: list[str]) -> None:
    stats = ParseStats()
    events = list(parse_lines(lines, stats=stats))
    assert len(events) == stats.lines == len(lines)
    for lineno, event in enumerate(events, 1):
        check_event(event, lineno)
    assert stats.malformed == sum(1 for e in events if type(e) is MalformedEvent)
    assert stats.malformed == sum(stats.malformed_by_family.values())
    assert set(stats.first_malformed) == set(stats.malformed_by_family)
    assert stats.unknown == sum(1 for e in events if type(e) is UnknownEvent)


# --------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------


@FUZZ
@given(streams)
def test_vtd_check_lines_never_raises(lines: list[str]) -> None:
    report = check_lines(lines)
    assert report.counts.events_total == len(lines)
    report.format()
    report.to_dict()


@FUZZ
@given(st.lists(st.sampled_from([
    "vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x1 addr 0x0 mask 0xffffffffffffffff",
    "vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x1 addr 0x0 mask 0xffffffff",
    "vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x1 addr 0xffffffffffffffff mask 0x3f",
    "vtd_inv_desc_iotlb_pasid_pages iotlb invalidate domain 0x1 addr 0x0 mask 0x3f pasid 0xffffffff",
    "vtd_iotlb_page_update IOTLB page update sid 0x1 iova 0xffffffffffffffff slpte 0xffffffffffffffff domain 0x1",
    "vtd_dmar_translate dev 00:00.01 iova 0xfffffffffffff000 -> gpa 0xfffffffffffff000 mask 0xffffffffffffffff",
]), min_size=1, max_size=30))
def test_hostile_invalidations_stay_small(lines: list[str]) -> None:
    tracemalloc.start()
    try:
        check_lines(lines)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

RAW_LINE = st.one_of(
    FORMATTED.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=80),
    st.sampled_from([b"\xff\xfe\x00", b"vtd_dmar_translate \xc3\x28 dev", b"\x00" * 10, b"\r", b"\xed\xa0\x80"]),
)


MAGICS = (b"\x1f\x8b\x08", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"BZh")


@st.composite
def trace_files(draw: st.DrawFn) -> tuple[bytes, bytes, str]:
    """(file content, the trace bytes inside it, how it was damaged)."""
    lines = draw(st.lists(RAW_LINE, max_size=30))
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), b"vtd_iotlb_reset IOTLB reset (reason: " + b"z" * (MAX_LINE_CHARS + draw(st.integers(-2, 3000))))
    data = b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))
    kind = draw(st.sampled_from(["plain", "gz", "xz"]))
    blob = data if kind == "plain" else gzip.compress(data) if kind == "gz" else lzma.compress(data, preset=0)
    damage = draw(st.sampled_from(["none", "none", "cut", "flip", "append"]))
    if damage == "cut" and blob:
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif damage == "flip" and blob:
        at = draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([blob[at] ^ draw(st.integers(1, 255))]) + blob[at + 1 :]
    elif damage == "append":
        blob += draw(st.binary(min_size=1, max_size=20))
    return blob, data, f"{kind}/{damage}"


@FUZZ
@given(trace_files(), st.sampled_from(["trace.log", "trace.log.gz", "trace.log.xz", "trace"]))
def test_parse_file_raises_only_trace_read_error(tmp_path_factory: pytest.TempPathFactory,
                                                 drawn: tuple[bytes, bytes, str], name: str) -> None:
    blob, data, how = drawn
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(blob)
    stats = ParseStats()
    events: list[Event] = []
    error: TraceReadError | None = None
    try:
        for event in parse_file(path, stats=stats):
            events.append(event)
    except TraceReadError as exc:
        error = exc
        assert str(path) in str(exc) and exc.lines_read == len(events)
    assert stats.lines == len(events)
    for lineno, event in enumerate(events, 1):
        check_event(event, lineno)
    looks_compressed = name.endswith((".gz", ".xz")) or data.startswith(MAGICS)
    if how.endswith("/none") and not (how.startswith("plain") and looks_compressed):
        # an undamaged file reads whole (compression is told by magic bytes,
        # whatever the name), unless a plain file's name claims a compression
        # or it starts with the magic bytes of one
        assert error is None, error
        assert stats.bytes_read == len(data)
        assert stats.truncated == (bool(data) and not data.endswith(b"\n"))
    try:
        report = check_trace_file(path)
    except TraceReadError:
        assert error is not None
    else:
        assert error is None and report.counts.events_total == len(events)


# --------------------------------------------------------------------------
# End to end: a long fuzzed trace, checked in bounded memory
# --------------------------------------------------------------------------


def fuzzed_trace(n: int, seed: int = 1) -> Iterator[bytes]:
    """``n`` lines of fuzzed trace (bytes, newline-terminated except maybe the
    last): coherent streams, real formats with mutated fields, garbage and
    binary, a few over-long lines.  Deterministic for a seed."""
    rng = random.Random(seed)
    pick = rng.choice
    classes = list(EVENT_CLASSES)
    junk = ["", " ", "\x00", "-1", "9" * 300, "f" * 300, "0x", "(nil)", "\ufffd", "  12"]

    def field(arg: Arg) -> str:
        roll = rng.random()
        if roll < 0.7:
            if arg.kind == "text":
                return pick(["write", "drive0", "x y", "", "iotlb exceeds size limit"])
            if arg.kind == "flag":
                return pick(["0", "1"])
            return valid_text(arg, pick([arg.min, arg.max, 0, 1, rng.randint(arg.min, arg.max)]))
        if roll < 0.85:
            return format(rng.getrandbits(pick([65, 128, 512])), "x" if arg.kind == "hex" else "d")
        return pick(junk)

    for i in range(n):
        roll = rng.random()
        if roll < 0.55:
            line = stream_line(pick).encode()
        elif roll < 0.85:
            cls = pick(classes)
            optional = rng.random() < 0.3
            values = {name: field(arg) for name, arg in ARGS[cls].items()
                      if optional or name not in OPTIONAL[cls]}
            line = render(cls, values, optional).encode("utf-8", "surrogatepass")
            if rng.random() < 0.2:
                cut = rng.randint(0, len(line))
                line = line[:cut] + pick([b"", b" ", b"\x00", b"\xff", b"  "]) + line[cut:]
        elif roll < 0.93:
            line = "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 60))).encode()
        elif roll < 0.99999:
            line = rng.randbytes(rng.randint(0, 60)).replace(b"\n", b"")
        else:
            line = b"vtd_iotlb_page_hit IOTLB page hit sid 0x" + b"f" * (MAX_LINE_CHARS + rng.randint(1, 200_000))
        if rng.random() < 0.05:
            line = b"%d@%d.%06d:" % (rng.randint(1, 99999), 1700000000 + i, rng.randint(0, 999999)) + line
        yield line + (b"\n" if i < n - 1 or rng.random() < 0.5 else b"")


_MEASURE = """
import json, sys, time
from harness.checks.vtd import check_events
from harness.trace import ParseStats, parse_file
stats = ParseStats()
start = time.perf_counter()
report = check_events(parse_file(sys.argv[1], stats=stats))
elapsed = time.perf_counter() - start
print(json.dumps({
    "lines": stats.lines, "malformed": stats.malformed, "unknown": stats.unknown,
    "overlong": stats.overlong, "malformed_by_family": stats.malformed_by_family,
    "truncated": stats.truncated, "bytes_read": stats.bytes_read,
    "seconds": round(elapsed, 2), "lines_per_second": round(stats.lines / elapsed),
    # VmHWM, not ru_maxrss: the kernel carries ru_maxrss over execve from the forking
    # parent (a big pytest process), while VmHWM belongs to this process's own memory.
    "peak_rss_mib": round(next(int(l.split()[1]) for l in open("/proc/self/status")
                               if l.startswith("VmHWM:")) / 1024, 1),
    "status": report.status, "divergences": report.total_divergences,
}))
"""


@pytest.mark.parametrize("compress", ["plain", "xz"])
def test_fuzzed_trace_end_to_end_in_bounded_memory(tmp_path: Path, compress: str) -> None:
    n = FUZZ_LINES if compress == "plain" else min(FUZZ_LINES, 20000)
    path = tmp_path / ("fuzz.trace" if compress == "plain" else "fuzz.trace.xz")
    opener: Callable[[Path], Any] = (lambda p: open(p, "wb")) if compress == "plain" else (
        lambda p: lzma.open(p, "wb", preset=0))
    with opener(path) as fh:
        for line in fuzzed_trace(n):
            fh.write(line)
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True,
                          text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    print(f"\nfuzzed trace ({compress}, {path.stat().st_size} bytes): {json.dumps(result)}")
    assert result["lines"] == n
    assert result["malformed"] > 0 and result["unknown"] > 0
    assert result["peak_rss_mib"] * (1 << 20) < PEAK_LIMIT, result


def test_fuzzed_trace_is_deterministic() -> None:
    assert list(fuzzed_trace(300, seed=5)) == list(fuzzed_trace(300, seed=5))
    report = check_events(parse_lines(b.decode("utf-8", "replace") for b in fuzzed_trace(2000)))
    assert report.counts.events_total == 2000
