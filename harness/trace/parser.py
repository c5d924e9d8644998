"""Parse QEMU ``log`` trace-backend output into typed events.

QEMU 7.2's ``log`` backend (enabled with ``-trace events=FILE -D LOG``)
writes one line per event::

    NAME ARGS
    PID@SECONDS.USEC:NAME ARGS          (with -msg timestamp=on)

where ARGS is the event's format string from ``trace-events`` expanded
(formats as compiled into /usr/bin/qemu-system-x86_64, e.g.
``vtd_dmar_translate dev %02x:%02x.%02x iova 0x%lx -> gpa 0x%lx mask 0x%lx``).

The formats live on the event classes (``NAME``, ``FORMAT`` and the
:class:`~harness.trace.events.Arg` of each field, in
:mod:`harness.trace.events`); this module compiles each class into one regex
and one builder with the conversions and range checks inlined.  The hot path
is one dict lookup on the first token and one compiled regex ``fullmatch`` of
the rest: no loop over patterns.

Nothing here raises on input text: :func:`parse_line` returns an
:class:`~harness.trace.events.UnknownEvent` for an unknown name or a line that
is not a trace line (QEMU warnings share the ``-D`` file), and a
:class:`~harness.trace.events.MalformedEvent` for a known name whose arguments
do not match or hold a value wider than its field, and for a line longer than
:data:`MAX_LINE_CHARS` (read in bounded memory, its ``raw`` cut short).

Errors (:func:`parse_file` only, about the file itself)::

    OSError                     the file is missing or unreadable
     +-- TraceReadError         not a regular file (a directory, a FIFO, a
                                device); compressed with an unsupported tool;
                                a .gz/.xz stream that is truncated or corrupt
                                (raised from the generator after the events
                                read before the damage)
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import gzip
import io
import lzma
import os
import re
import stat
import typing
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, Final, cast

from harness.trace.events import (
    EVENT_CLASSES,
    TRACE_EVENTS,
    Arg,
    Event,
    MalformedEvent,
    NvmeError,
    UnknownEvent,
    event_family,
)

__all__ = [
    "CompiledFormats",
    "DEFAULT_FORMATS",
    "EventFormat",
    "MAX_LINE_CHARS",
    "ParseStats",
    "TraceReadError",
    "parse_line",
    "parse_lines",
    "parse_file",
    "write_events_file",
    "TRACE_EVENTS",
]

MAX_LINE_CHARS: Final = 64 * 1024
"""Longest line, in characters without its newline, the parser reads whole.
A longer line becomes one ``MalformedEvent`` whose ``raw`` is its first
:data:`RAW_KEEP` characters; :func:`parse_file` skips the rest without
holding it in memory."""
RAW_KEEP: Final = 1024
"""Characters of an over-long line kept in its ``MalformedEvent.raw``."""
FIRST_MALFORMED_CHARS: Final = 200
"""Characters of the raw line kept in ``ParseStats.first_malformed``."""
XZ_MEMLIMIT: Final = 128 * 1024 * 1024
"""Most memory the xz decoder may use (``xz -9`` needs 65 MiB); a file
asking for more is reported as corrupt."""

_BLOCK: Final = 64 * 1024  # decompressed bytes read at once (one raw read)
_READ_CHUNK: Final = 64 * 1024
_XZ_MAGIC: Final = b"\xfd7zXZ\x00"
_GZ_MAGIC: Final = b"\x1f\x8b\x08"  # ID1 ID2 and CM = deflate, the only method defined
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_BZ2_MAGIC: Final = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")
_DECODE_ERRORS: Final = (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile)


class TraceReadError(OSError):
    """A trace file that cannot be read as a trace: ``path`` names it,
    ``reason`` says why ("is a directory", "is a FIFO, not a regular file",
    "truncated xz data ...", "corrupt: not valid xz data ...").
    ``lines_read`` lines were parsed (and yielded) before the damage."""

    def __init__(self, path: str, reason: str, lines_read: int = 0) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.lines_read = lines_read
        self.filename = path

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[type[TraceReadError], tuple[str, str, int]]:
        return (type(self), (self.path, self.reason, self.lines_read))


# --------------------------------------------------------------------------
# Compiling the event classes
# --------------------------------------------------------------------------

_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

_Builder = Callable[[int, str, "re.Match[str]"], Event]
_Matcher = Callable[[str], "re.Match[str] | None"]


@dataclass(frozen=True)
class _Spec:
    """One event class compiled: its strict matcher and builder, and a lenient
    matcher (unbounded digits) that only serves to say which field is too wide."""

    cls: type[Event]
    match: _Matcher
    build: _Builder
    fields: tuple[tuple[str, Arg], ...]
    """(field, Arg) in the order of the FORMAT's groups."""
    lenient: _Matcher


def _field_args(cls: type[Event]) -> dict[str, Arg]:
    """The :class:`Arg` of every field of ``cls`` after ``lineno`` and ``raw``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, Arg] = {}
    for f in dataclasses.fields(cls)[2:]:
        metadata = getattr(hints[f.name], "__metadata__", ())
        args = [a for a in metadata if isinstance(a, Arg)]
        if len(args) != 1:
            raise TypeError(
                f"{cls.__name__}.{f.name}: annotate the field with one Arg (X16, U32, Text, ...)"
            )
        out[f.name] = args[0]
    return out


_LENIENT: Final[dict[str, str]] = {
    "hex": "([0-9a-fA-F]+)",
    "uint": "(-?[0-9]+)",
    "int": "(-?[0-9]+)",
    "flag": "(-?[0-9]+)",
    "ptr": r"(\(nil\)|0x[0-9a-fA-F]+)",
    "text": "(.*)",
}


def _compile(cls: type[Event], name: str | None = None, fmt: str | None = None,
             overrides: Mapping[str, Arg] | None = None) -> _Spec:
    """Turn ``cls.FORMAT`` and its fields' :class:`Arg` into a :class:`_Spec`.

    ``name``, ``fmt`` and ``overrides`` (field -> :class:`Arg`) replace the
    class's trace name, format and field widths: how another QEMU version
    prints the same event (:mod:`harness.trace.formats`).

    Raises ``TypeError`` if the class is inconsistent (a field missing from
    the format or given twice, a placeholder that is no field, a capturing
    group of the format's own): a programming error, caught at import.
    """
    fmt = cls.FORMAT if fmt is None else fmt
    if fmt is None:
        raise TypeError(f"{cls.__name__} has no FORMAT")
    args = _field_args(cls)
    if overrides:
        unknown = sorted(set(overrides) - set(args))
        if unknown:
            raise TypeError(f"{cls.__name__}: overrides name no field: {unknown}")
        args.update(overrides)
    order: list[str] = []

    def placeholder(m: re.Match[str], lenient: bool) -> str:
        name = m.group(1)
        if name not in args:
            raise TypeError(f"{cls.__name__}.FORMAT: {{{name}}} is not a field")
        if not lenient:
            if name in order:
                raise TypeError(f"{cls.__name__}.FORMAT: {{{name}}} appears twice")
            order.append(name)
        arg = args[name]
        return _LENIENT[arg.kind] if lenient else arg.pattern()

    strict = re.compile(_PLACEHOLDER.sub(lambda m: placeholder(m, False), fmt))
    lenient = re.compile(_PLACEHOLDER.sub(lambda m: placeholder(m, True), fmt))
    missing = [name for name in args if name not in order]
    if missing:
        raise TypeError(f"{cls.__name__}.FORMAT lacks the fields {missing}")
    if strict.groups != len(order):
        raise TypeError(f"{cls.__name__}.FORMAT: use (?:...), not capturing groups")
    fields = tuple((name, args[name]) for name in order)
    return _Spec(cls, strict.fullmatch, _make_builder(cls, fields, list(args), name or cls.NAME), fields,
                 lenient.fullmatch)


def _reject(trace_name: str, lineno: int, raw: str, text: str, name: str, value: int,
            arg: Arg) -> MalformedEvent:
    return MalformedEvent(
        lineno, raw, trace_name, text,
        f"{name} {value} does not fit its field ({arg.describe()})",
    )


def _make_builder(cls: type[Event], groups: tuple[tuple[str, Arg], ...],
                  field_order: list[str], trace_name: str) -> _Builder:
    """Compile ``(lineno, raw, match) -> cls(lineno, raw, *fields)`` with the
    conversions and range checks inlined (a generic loop over converter
    functions costs about as much as the regex match and the constructor
    together).  A decimal out of its range gives a ``MalformedEvent``."""
    body: list[str] = []
    names = [f"g{i}" for i in range(len(groups))]
    if names:
        body.append(f"    {', '.join(names)}, = m.groups()")
    value_of: dict[str, str] = {}
    for (fname, arg), g in zip(groups, names):
        kind = arg.kind
        if kind == "hex":
            expr = f"int({g}, 16)"
        elif kind in ("uint", "int"):
            expr = f"int({g})"
        elif kind == "flag":
            expr = f"({g} == '1')"
        elif kind == "ptr":
            expr = f"(0 if {g} == '(nil)' else int({g}, 16))"
        else:
            expr = g
        if arg.optional:
            expr = f"(None if {g} is None else {expr})"
        if arg.needs_range_check:
            body.append(f"    {g} = {expr}")
            if kind == "uint":
                cond = f"{g} > {arg.max}"
            else:
                cond = f"not {arg.min} <= {g} <= {arg.max}"
            if arg.optional:
                cond = f"{g} is not None and ({cond})"
            body.append(f"    if {cond}:")
            body.append(f"        return reject(trace_name, lineno, raw, m.string, {fname!r}, {g}, "
                        f"args[{fname!r}])")
            expr = g
        value_of[fname] = expr
    values = "".join(f", {value_of[name]}" for name in field_order)
    body.append(f"    return cls(lineno, raw{values})")
    source = "def build(lineno, raw, m):\n" + "\n".join(body) + "\n"
    namespace: dict[str, object] = {"cls": cls, "reject": _reject, "args": dict(groups), "trace_name": trace_name}
    exec(compile(source, f"<trace builder {trace_name}>", "exec"), namespace)  # noqa: S102
    return cast(_Builder, namespace["build"])


def _diagnose(spec: _Spec, args: str) -> str:
    """Why ``args`` (which the strict format rejected) is malformed: the first
    field whose value is wider than its width, else "" (another shape)."""
    m = spec.lenient(args)
    if m is None:
        return ""
    for (fname, arg), text in zip(spec.fields, m.groups()):
        if text is None or arg.kind == "text":
            continue
        if re.fullmatch(arg.pattern(), text) is None:
            return f"{fname} {arg.show(text)} does not fit its field ({arg.describe()})"
    return ""


@dataclass(frozen=True)
class EventFormat:
    """How one QEMU version prints one event: its trace ``name``, the event class
    it becomes, and, where they differ from the class's, the ``format`` and
    field widths (``overrides``).  The class is what checkers dispatch on, so
    an event renamed in a later QEMU (``virtio_iommu_device_reset`` ->
    ``virtio_iommu_device_reset_exit``) still gives the same class."""

    cls: type[Event]
    name: str = ""
    format: str | None = None
    overrides: Mapping[str, Arg] = field(default_factory=dict)

    @property
    def trace_name(self) -> str:
        return self.name or self.cls.NAME


class CompiledFormats:
    """A compiled table of event formats (one matcher and builder per trace name):
    what :func:`parse_line` and :func:`parse_file` take as ``table``.

    Raises ``TypeError`` (at construction) for an inconsistent entry or a name
    given twice: a programming error."""

    def __init__(self, entries: Iterable[EventFormat]) -> None:
        specs: dict[str, _Spec] = {}
        for entry in entries:
            name = entry.trace_name
            if name in specs:
                raise TypeError(f"trace event {name} is given twice")
            specs[name] = _compile(entry.cls, entry.name or None, entry.format, entry.overrides)
        self.specs: Final[dict[str, _Spec]] = specs
        self.hot: Final[dict[str, tuple[_Matcher, _Builder]]] = {
            name: (spec.match, spec.build) for name, spec in specs.items()
        }

    @property
    def names(self) -> frozenset[str]:
        """Every trace event name of the table."""
        return frozenset(self.specs)


DEFAULT_FORMATS: Final = CompiledFormats(EventFormat(cls) for cls in EVENT_CLASSES)
"""QEMU 7.2's formats (the event classes as they are): the table used when none is given."""
_SPECS: Final[dict[str, _Spec]] = DEFAULT_FORMATS.specs
_HOT: Final[dict[str, tuple[_Matcher, _Builder]]] = DEFAULT_FORMATS.hot

_TS_PREFIX: Final = re.compile(r"[0-9]{1,10}@[0-9]{1,20}\.[0-9]{1,9}:").match
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").fullmatch
_NVME_ERR: Final = "pci_nvme_err_"


# --------------------------------------------------------------------------
# Lines
# --------------------------------------------------------------------------


def _overlong(lineno: int, head: str, size: int) -> MalformedEvent:
    """The event of a line of ``size`` characters of which ``head`` was kept."""
    raw = head[:RAW_KEEP].rstrip("\r\n")
    body = raw
    m = _TS_PREFIX(body)
    if m is not None:
        body = body[m.end() :]
    name, sep, rest = body.partition(" ")
    if not (sep and _IDENT(name)):
        name, rest = "", body
    return MalformedEvent(
        lineno, raw, name, rest,
        f"line of {size} characters is longer than the {MAX_LINE_CHARS}-character limit; "
        f"its first {len(raw)} characters are kept",
    )


def parse_line(line: str, lineno: int = 0, *, table: CompiledFormats | None = None) -> Event:
    """Turn one trace line into an :class:`~harness.trace.events.Event`.

    ``table``: the event formats of the QEMU that wrote the line (default
    :data:`DEFAULT_FORMATS`, QEMU 7.2's; :mod:`harness.trace.formats`).
    ``line`` may end with a newline (stripped from ``raw``).  Never raises:
    unknown names and non-trace lines give ``UnknownEvent``; known names with
    non-matching arguments or a value wider than its field, and lines longer
    than :data:`MAX_LINE_CHARS` characters, give ``MalformedEvent``.
    """
    try:
        if len(line) > MAX_LINE_CHARS and (len(line) > MAX_LINE_CHARS + 1 or line[-1] != "\n"):
            return _overlong(lineno, line[:RAW_KEEP], len(line))
        raw = line.rstrip("\r\n")
        body = raw
        if body[:1].isdigit():
            m = _TS_PREFIX(body)
            if m is not None:
                body = body[m.end() :]
        name, _, args = body.partition(" ")
        hot = (_HOT if table is None else table.hot).get(name)
        if hot is None:
            if name.startswith(_NVME_ERR) and _IDENT(name):
                return NvmeError(lineno, raw, name, args)
            if _IDENT(name):
                return UnknownEvent(lineno, raw, name, args)
            return UnknownEvent(lineno, raw, None, raw)
        match, build = hot
        m = match(args.rstrip())
        if m is None:
            specs = _SPECS if table is None else table.specs
            return MalformedEvent(lineno, raw, name, args, _diagnose(specs[name], args.rstrip()))
        return build(lineno, raw, m)
    except Exception:  # noqa: BLE001 - by contract: never raise on input
        text = line[:RAW_KEEP] if isinstance(line, str) else repr(line)[:RAW_KEEP]
        return UnknownEvent(lineno, text, None, text)


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


@dataclass
class ParseStats:
    """Running totals of one parse (filled in while the generator is consumed)."""

    lines: int = 0
    unknown: int = 0
    malformed: int = 0
    """Lines that gave a ``MalformedEvent`` (over-long lines included)."""
    by_name: dict[str, int] = field(default_factory=dict)
    """Events per known event name (``UnknownEvent``/``MalformedEvent`` not included)."""
    malformed_by_family: dict[str, int] = field(default_factory=dict)
    """Malformed lines per :func:`~harness.trace.events.event_family` of their
    name (``"vtd"``, ``"pci_nvme"``, ``"dma"``, ...; ``"?"`` when the name of
    an over-long line could not be read)."""
    first_malformed: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Family -> (line number, first 200 characters of the raw line) of its
    first malformed line."""
    overlong: int = 0
    """Lines longer than :data:`MAX_LINE_CHARS` (also counted in ``malformed``)."""
    truncated: bool = False
    """The last line had no newline (QEMU killed mid-write), or a compressed
    stream ended before its end marker (:func:`parse_file` only)."""
    bytes_read: int = 0
    """Bytes of trace text read, after decompression (:func:`parse_file` only)."""

    def unparsed(self, family: str) -> str | None:
        """One sentence on the unparseable lines of ``family`` (for a checker's
        "inconclusive" reasons), or None if it had none."""
        count = self.malformed_by_family.get(family, 0)
        if not count:
            return None
        where = ""
        first = self.first_malformed.get(family)
        if first is not None:
            where = f" (first: line {first[0]}: {first[1]})"
        return f"{count} {family}_* lines could not be parsed{where}"

    def _count_other(self, event: Event) -> None:
        """Count an event without a class-level ``NAME`` (the hot path counts the rest)."""
        kind = type(event)
        if kind is MalformedEvent:
            assert isinstance(event, MalformedEvent)
            self.malformed += 1
            family = event_family(event.trace_name)
            by_family = self.malformed_by_family
            by_family[family] = by_family.get(family, 0) + 1
            if family not in self.first_malformed:
                self.first_malformed[family] = (event.lineno, event.raw[:FIRST_MALFORMED_CHARS])
            if event.reason.startswith("line of "):
                self.overlong += 1
        elif kind is UnknownEvent:
            self.unknown += 1
        else:
            name = event.name
            self.by_name[name] = self.by_name.get(name, 0) + 1



def parse_lines(
    lines: Iterable[str], *, start: int = 1, stats: ParseStats | None = None,
    table: CompiledFormats | None = None,
) -> Iterator[Event]:
    """Yield one event per line of ``lines`` (numbered from ``start``).

    A generator: memory does not grow with the input.  If ``stats`` is given
    it is updated as lines are consumed.  ``table`` as for :func:`parse_line`.
    Never raises on line content.
    """
    if stats is None:
        for lineno, line in enumerate(lines, start):
            yield parse_line(line, lineno, table=table)
        return
    by_name = stats.by_name
    for lineno, line in enumerate(lines, start):
        event = parse_line(line, lineno, table=table)
        stats.lines += 1
        name = event.NAME
        if name:
            by_name[name] = by_name.get(name, 0) + 1
        else:
            stats._count_other(event)
        yield event


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


class _XzReader(io.RawIOBase):
    """Raw stream of the decompressed bytes of an .xz file, with the decoder's
    memory bounded by ``memlimit`` (``lzma.LZMAFile`` has no such limit).
    Concatenated streams are read in turn; trailing bytes that are not an xz
    stream end the data, as ``xz`` and ``lzma.LZMAFile`` do.

    Raises ``EOFError`` (truncated) or ``lzma.LZMAError`` (corrupt) from
    :meth:`readinto`."""

    def __init__(self, fp: IO[bytes], memlimit: int) -> None:
        super().__init__()
        self._fp = fp
        self._memlimit = memlimit
        self._dec = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=memlimit)
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: typing.Any) -> int:
        with memoryview(buffer) as view, view.cast("B") as out:
            data = self._read(len(out))
            out[: len(data)] = data
            return len(data)

    def _read(self, size: int) -> bytes:
        while not self._done:
            dec = self._dec
            if dec.eof:
                rest = (dec.unused_data or self._fp.read(_READ_CHUNK)).lstrip(b"\x00")
                while not rest:  # stream padding, or the end of the file
                    more = self._fp.read(_READ_CHUNK)
                    if not more:
                        self._done = True
                        return b""
                    rest = more.lstrip(b"\x00")
                self._dec = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=self._memlimit)
                try:
                    data = self._dec.decompress(rest, size)
                except lzma.LZMAError:
                    self._done = True  # trailing garbage, ignored as LZMAFile does
                    return b""
            elif dec.needs_input:
                chunk = self._fp.read(_READ_CHUNK)
                if not chunk:
                    raise EOFError("the compressed stream ends before its end-of-stream marker")
                data = dec.decompress(chunk, size)
            else:
                data = dec.decompress(b"", size)
            if data:
                return data
        return b""


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is ("is a directory" ...), None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO, not a regular file"
    if stat.S_ISCHR(mode):
        return "is a character device, not a regular file"
    if stat.S_ISBLK(mode):
        return "is a block device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"


def _open_binary(stack: ExitStack, name: str) -> tuple[io.BufferedIOBase, str]:
    """Open ``name`` for reading decompressed bytes: (stream, "plain"|"gzip"|"xz").

    The type of file is checked with ``os.stat`` before opening (a FIFO is
    never opened, so nothing blocks) and again on the open descriptor.
    Raises ``OSError`` / :class:`TraceReadError`.
    """
    what = _not_regular(os.stat(name).st_mode)
    if what is not None:
        raise TraceReadError(name, what)
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        what = _not_regular(os.fstat(fd).st_mode)
        if what is not None:
            raise TraceReadError(name, what)
        raw = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    stack.enter_context(raw)
    head = raw.peek(16)[:16]
    lower = name.lower()
    if head.startswith(_XZ_MAGIC):
        return io.BufferedReader(_XzReader(raw, XZ_MEMLIMIT), _READ_CHUNK), "xz"
    if head.startswith(_GZ_MAGIC):
        gz = gzip.GzipFile(fileobj=raw, mode="rb")
        stack.enter_context(gz)
        return gz, "gzip"
    if head.startswith(_ZSTD_MAGIC) or _BZ2_MAGIC.match(head):
        tool = "zstd" if head.startswith(_ZSTD_MAGIC) else "bzip2"
        raise TraceReadError(name, f"is compressed with {tool}; only plain, gzip and xz traces are read")
    if lower.endswith((".xz", ".txz")):
        if _XZ_MAGIC.startswith(head):
            raise TraceReadError(name, f"truncated xz data ({len(head)} bytes, shorter than the xz header)")
        raise TraceReadError(name, "corrupt: not valid xz data (no xz header)")
    if lower.endswith((".gz", ".tgz")):
        if _GZ_MAGIC.startswith(head):
            raise TraceReadError(name, f"truncated gzip data ({len(head)} bytes, shorter than the gzip header)")
        raise TraceReadError(name, "corrupt: not valid gzip data (no gzip header)")
    return raw, "plain"


def _decode_error(name: str, fmt: str, exc: BaseException, lines: int) -> TraceReadError:
    where = f"after line {lines}" if lines else "before the first line"
    if isinstance(exc, EOFError):
        reason = f"truncated {fmt} data: the compressed stream ends before its end marker ({where})"
    else:
        detail = str(exc) or type(exc).__name__
        reason = f"corrupt: not valid {fmt} data ({detail}; {where})"
    return TraceReadError(name, reason, lines)


def parse_file(
    path: str | os.PathLike[str], *, stats: ParseStats | None = None,
    table: CompiledFormats | None = None,
) -> Iterator[Event]:
    """Yield the events of a trace file, streaming (line numbers start at 1).

    gzip and xz files are recognised by their magic bytes, whatever their
    name (a plain file that starts with them is taken for compressed, which
    QEMU's text never does), and decompressed on the fly.  Bytes that are not
    UTF-8 are replaced (U+FFFD).  Lines are split on ``\\n`` only.  Memory
    stays bounded whatever the input: a line longer than
    :data:`MAX_LINE_CHARS` is skipped block by block and gives one
    ``MalformedEvent``.  If ``stats`` is given it is updated as lines are
    consumed (``truncated`` is set if the last line has no newline).
    ``table``: the event formats of the QEMU that wrote it (:func:`parse_line`).

    Raises (from the generator) ``OSError`` if the file cannot be opened or
    read, and :class:`TraceReadError` if it is not a regular file (checked
    before opening: a FIFO never blocks), is compressed with another tool, or
    is a compressed stream that is truncated or corrupt: then after yielding
    every line decoded before the damage, the last one cut short.
    """
    name = os.fspath(path)
    if stats is None:
        stats = ParseStats()
    with ExitStack() as stack:
        fh, fmt = _open_binary(stack, name)
        yield from _parse_stream(fh, name, fmt, stats, table)


def _parse_stream(fh: io.BufferedIOBase, name: str, fmt: str, stats: ParseStats,
                  table: CompiledFormats | None = None) -> Iterator[Event]:
    """The events of the decompressed bytes of ``fh``, read in blocks.

    Each block is decoded at once and split on ``\\n``; the unfinished last
    line is carried to the next block, and once it passes
    :data:`MAX_LINE_CHARS` only its head is kept while the rest is skipped.
    One raw read a block (``read1``), so a decompressor error loses nothing
    that was decoded before it: the unfinished line is yielded, then the
    :class:`TraceReadError` raised.
    """
    read = fh.read1
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    parse: Callable[[str, int], Event] = (
        parse_line if table is None else functools.partial(parse_line, table=table))
    limit = MAX_LINE_CHARS
    by_name = stats.by_name
    lineno = 0
    carry = ""  # the line being read (no newline yet)
    head = ""  # the start of an over-long line being skipped
    skipped = 0  # characters of that line so far (0: not skipping)
    failure: BaseException | None = None  # the decompressor's, raised after the last line
    while True:
        try:
            block = read(_BLOCK)
        except _DECODE_ERRORS as exc:
            stats.truncated = stats.truncated or isinstance(exc, EOFError)
            failure = exc
            block = b""
        final = not block
        stats.bytes_read += len(block)
        text = decode(block, final)
        if skipped:
            newline = text.find("\n")
            if newline < 0 and not final:
                skipped += len(text)
                continue
            lineno += 1
            if newline < 0:
                skipped += len(text)
                text = ""
                stats.truncated = True
            else:
                skipped += newline
                text = text[newline + 1 :]
            event: Event = _overlong(lineno, head, skipped)
            skipped = 0
            stats.lines += 1
            stats._count_other(event)
            yield event
        lines = (carry + text).split("\n") if carry else text.split("\n")
        carry = lines.pop()
        for line in lines:
            lineno += 1
            event = parse(line, lineno)
            stats.lines += 1
            ename = event.NAME
            if ename:
                by_name[ename] = by_name.get(ename, 0) + 1
            else:
                stats._count_other(event)
            yield event
        if final:
            if carry:  # the last line has no newline: QEMU was killed mid-write
                stats.truncated = True
                lineno += 1
                event = parse(carry, lineno)
                stats.lines += 1
                ename = event.NAME
                if ename:
                    by_name[ename] = by_name.get(ename, 0) + 1
                else:
                    stats._count_other(event)
                yield event
            if failure is not None:
                raise _decode_error(name, fmt, failure, lineno) from failure
            return
        if len(carry) > limit:
            head, skipped, carry = carry[:RAW_KEEP], len(carry), ""


def write_events_file(path: str | os.PathLike[str], events: Iterable[str] = TRACE_EVENTS) -> None:
    """Write event names/patterns one per line, for QEMU's ``-trace events=PATH``.

    Raises ``OSError`` if the file cannot be written.
    """
    with open(path, "w", encoding="utf-8") as fh:
        for name in events:
            fh.write(name + "\n")
