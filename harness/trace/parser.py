"""Parse QEMU ``log`` trace-backend output into typed events.

QEMU 7.2's ``log`` backend (enabled with ``-trace events=FILE -D LOG``)
writes one line per event::

    NAME ARGS
    PID@SECONDS.USEC:NAME ARGS          (with -msg timestamp=on)

where ARGS is the event's format string from ``trace-events`` expanded
(formats as compiled into /usr/bin/qemu-system-x86_64, e.g.
``vtd_dmar_translate dev %02x:%02x.%02x iova 0x%lx -> gpa 0x%lx mask 0x%lx``).

The hot path is one dict lookup on the first token and one compiled regex
``fullmatch`` of the rest: no loop over patterns.

Nothing here raises on input text: :func:`parse_line` returns an
:class:`~harness.trace.events.UnknownEvent` for an unknown name or a line that
is not a trace line (QEMU warnings share the ``-D`` file), and a
:class:`~harness.trace.events.MalformedEvent` for a known name whose arguments
do not match.  :func:`parse_file` raises ``OSError`` only for the file itself
(missing, unreadable).
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Final, cast

from harness.trace import events as ev
from harness.trace.events import TRACE_EVENTS, Event, MalformedEvent, NvmeError, UnknownEvent

__all__ = [
    "ParseStats",
    "parse_line",
    "parse_lines",
    "parse_file",
    "write_events_file",
    "TRACE_EVENTS",
]

_H = r"([0-9a-fA-F]+)"  # hex digits (after a literal 0x, or %02x)
_D = r"(-?[0-9]+)"  # %d / %u / %lu
_S = r"(.*)"  # %s


def _hex(text: str) -> int:
    return int(text, 16)


def _opt_hex(text: str | None) -> int | None:
    return None if text is None else int(text, 16)


def _bool(text: str) -> bool:
    return text != "0"


def _str(text: str) -> str:
    return text


_P = r"(0x[0-9a-fA-F]+|\(nil\))"  # %p (glibc prints a null pointer as "(nil)")


def _ptr(text: str) -> int:
    return 0 if text == "(nil)" else int(text, 16)


_Conv = Callable[[str], object]

# name -> (class, args regex, converters of the regex's groups in field order)
_SPEC_TABLE: Final[list[tuple[type[Event], str, tuple[_Conv, ...]]]] = [
    (
        ev.IotlbPageUpdate,
        rf"IOTLB page update sid 0x{_H} iova 0x{_H} (?:sl)?pte 0x{_H} domain 0x{_H}"
        rf"(?:,? pasid 0x{_H})?",
        (_hex, _hex, _hex, _hex, _opt_hex),
    ),
    (
        ev.IotlbPageHit,
        rf"IOTLB page hit sid 0x{_H} iova 0x{_H} (?:sl)?pte 0x{_H} domain 0x{_H}"
        rf"(?:,? pasid 0x{_H})?",
        (_hex, _hex, _hex, _hex, _opt_hex),
    ),
    (
        ev.DmarTranslate,
        rf"dev {_H}:{_H}\.{_H} iova 0x{_H} -> gpa 0x{_H} mask 0x{_H}",
        (_hex, _hex, _hex, _hex, _hex, _hex),
    ),
    (ev.TranslatePassthrough, rf"source id 0x{_H}, iova 0x{_H}", (_hex, _hex)),
    (
        ev.InvIotlbPages,
        rf"iotlb invalidate domain 0x{_H} addr 0x{_H} mask 0x{_H}(?:,? pasid 0x{_H})?",
        (_hex, _hex, _hex, _opt_hex),
    ),
    (
        ev.InvIotlbPasidPages,
        rf"iotlb invalidate domain 0x{_H} addr 0x{_H} mask 0x{_H},? pasid 0x{_H}",
        (_hex, _hex, _hex, _hex),
    ),
    (ev.InvIotlbDomain, rf"iotlb invalidate whole domain 0x{_H}", (_hex,)),
    (ev.InvIotlbPasid, rf"iotlb invalidate domain 0x{_H},? pasid 0x{_H}", (_hex, _hex)),
    (ev.InvIotlbGlobal, r"iotlb invalidate global", ()),
    (ev.IotlbReset, rf"IOTLB reset \(reason: {_S}\)", (_str,)),
    (ev.ContextCacheReset, r"", ()),
    (ev.InvContextGlobal, r"context invalidate globally", ()),
    (
        ev.DmarFault,
        rf"sid 0x{_H} fault {_D} addr 0x{_H} write {_D}",
        (_hex, int, _hex, _bool),
    ),
    (ev.DmarEnable, rf"enable {_D}", (_bool,)),
    (
        ev.SwitchAddressSpace,
        rf"Device {_H}:{_H}\.{_H} switching address space \(iommu enabled={_D}\)",
        (_hex, _hex, _hex, _bool),
    ),
    (
        ev.NvmeMapPrp,
        rf"trans_len {_D} len {_D} prp1 0x{_H} prp2 0x{_H} num_prps {_D}",
        (int, int, _hex, _hex, int),
    ),
    (
        ev.NvmeRead,
        rf"cid {_D} nsid {_D} nlb {_D} count {_D} lba 0x{_H}",
        (int, int, int, int, _hex),
    ),
    (
        ev.NvmeWrite,
        rf"cid {_D} opname '{_S}' nsid {_D} nlb {_D} count {_D} lba 0x{_H}",
        (int, _str, int, int, int, _hex),
    ),
    (
        ev.NvmeIoCmd,
        rf"cid {_D} nsid 0x{_H} sqid {_D} opc 0x{_H} opname '{_S}'",
        (int, _hex, int, _hex, _str),
    ),
    (
        ev.NvmeAdminCmd,
        rf"cid {_D} sqid {_D} opc 0x{_H} opname '{_S}'",
        (int, int, _hex, _str),
    ),
    (ev.NvmeRwCb, rf"cid {_D} blk '{_S}'", (int, _str)),
    (ev.DmaBlkIo, rf"dbs={_P} bs={_P} offset={_D} to_dev={_D}", (_ptr, _ptr, int, _bool)),
    (ev.DmaBlkCb, rf"dbs={_P} ret={_D}", (_ptr, int)),
    (ev.DmaComplete, rf"dbs={_P} ret={_D} cb={_P}", (_ptr, int, _ptr)),
    (
        ev.NvmeEnqueueReqCompletion,
        rf"cid {_D} cqid {_D} dw0 0x{_H} dw1 0x{_H} status 0x{_H}",
        (int, int, _hex, _hex, _hex),
    ),
    (
        ev.NvmeCreateSq,
        rf"create submission queue, addr=0x{_H}, sqid={_D}, cqid={_D}, qsize={_D}, qflags={_D}",
        (_hex, int, int, int, int),
    ),
    (
        ev.NvmeCreateCq,
        rf"create completion queue, addr=0x{_H}, cqid={_D}, vector={_D}, qsize={_D}, "
        rf"qflags={_D}, ien={_D}",
        (_hex, int, int, int, int, int),
    ),
]

_INLINE: Final[dict[_Conv, str]] = {
    _hex: "int({}, 16)",
    _opt_hex: "(None if {0} is None else int({0}, 16))",
    int: "int({})",
    _bool: "({} != '0')",
    _str: "{}",
    _ptr: "(0 if {0} == '(nil)' else int({0}, 16))",
}

_Builder = Callable[[int, str, "re.Match[str]"], Event]


def _make_builder(cls: type[Event], convs: tuple[_Conv, ...]) -> _Builder:
    """Compile ``(lineno, raw, match) -> cls(lineno, raw, *converted groups)``
    with the conversions inlined (a generic loop over converter functions
    costs about as much as the regex match and the constructor together)."""
    names = [f"g{i}" for i in range(len(convs))]
    args = ", ".join(_INLINE[conv].format(name) for conv, name in zip(convs, names))
    if names:
        unpack = f"    {', '.join(names)}, = m.groups()\n"
    else:
        unpack = ""
    source = (
        "def build(lineno, raw, m):\n"
        + unpack
        + f"    return cls(lineno, raw{', ' if args else ''}{args})\n"
    )
    namespace: dict[str, object] = {"cls": cls}
    exec(compile(source, f"<trace builder {cls.NAME}>", "exec"), namespace)  # noqa: S102
    return cast(_Builder, namespace["build"])


_Spec = tuple[Callable[[str], "re.Match[str] | None"], _Builder]

_SPECS: Final[dict[str, _Spec]] = {
    cls.NAME: (re.compile(pattern).fullmatch, _make_builder(cls, convs))
    for cls, pattern, convs in _SPEC_TABLE
}

_TS_PREFIX: Final = re.compile(r"[0-9]+@[0-9]+\.[0-9]+:").match
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").fullmatch
_NVME_ERR: Final = "pci_nvme_err_"


def parse_line(line: str, lineno: int = 0) -> Event:
    """Turn one trace line into an :class:`~harness.trace.events.Event`.

    ``line`` may end with a newline (stripped from ``raw``).  Never raises:
    unknown names and non-trace lines give ``UnknownEvent``, known names with
    non-matching arguments ``MalformedEvent``.
    """
    try:
        raw = line.rstrip("\r\n")
        body = raw
        if body[:1].isdigit():
            m = _TS_PREFIX(body)
            if m is not None:
                body = body[m.end() :]
        name, _, args = body.partition(" ")
        spec = _SPECS.get(name)
        if spec is None:
            if name.startswith(_NVME_ERR) and _IDENT(name):
                return NvmeError(lineno, raw, name, args)
            if _IDENT(name):
                return UnknownEvent(lineno, raw, name, args)
            return UnknownEvent(lineno, raw, None, raw)
        match, build = spec
        m = match(args.rstrip())
        if m is None:
            return MalformedEvent(lineno, raw, name, args)
        return build(lineno, raw, m)
    except Exception:  # noqa: BLE001 - by contract: never raise on input
        text = line if isinstance(line, str) else repr(line)
        return UnknownEvent(lineno, text, None, text)


@dataclass
class ParseStats:
    """Running totals of one parse (filled in while the generator is consumed)."""

    lines: int = 0
    unknown: int = 0
    malformed: int = 0
    by_name: dict[str, int] = field(default_factory=dict)
    """Events per known event name (``UnknownEvent``/``MalformedEvent`` not included)."""


def parse_lines(
    lines: Iterable[str], *, start: int = 1, stats: ParseStats | None = None
) -> Iterator[Event]:
    """Yield one event per line of ``lines`` (numbered from ``start``).

    A generator: memory does not grow with the input.  If ``stats`` is given
    it is updated as lines are consumed.  Never raises on line content.
    """
    if stats is None:
        for lineno, line in enumerate(lines, start):
            yield parse_line(line, lineno)
        return
    by_name = stats.by_name
    for lineno, line in enumerate(lines, start):
        event = parse_line(line, lineno)
        stats.lines += 1
        kind = type(event)
        if kind is UnknownEvent:
            stats.unknown += 1
        elif kind is MalformedEvent:
            stats.malformed += 1
        else:
            name = event.name
            by_name[name] = by_name.get(name, 0) + 1
        yield event


def _open_text(path: str | os.PathLike[str]) -> IO[str]:
    name = os.fspath(path)
    if name.endswith(".gz"):
        return gzip.open(name, "rt", encoding="utf-8", errors="replace", newline="\n")
    if name.endswith(".xz"):
        return lzma.open(name, "rt", encoding="utf-8", errors="replace", newline="\n")
    return open(name, encoding="utf-8", errors="replace", newline="\n")


def parse_file(
    path: str | os.PathLike[str], *, stats: ParseStats | None = None
) -> Iterator[Event]:
    """Yield the events of a trace file, streaming (line numbers start at 1).

    ``.gz`` and ``.xz`` files are decompressed on the fly.  Bytes that are
    not UTF-8 are replaced (U+FFFD).  Lines are split on ``\\n`` only.
    Raises ``OSError`` if the file cannot be opened or read.
    """
    with _open_text(path) as fh:
        yield from parse_lines(fh, stats=stats)


def write_events_file(path: str | os.PathLike[str], events: Iterable[str] = TRACE_EVENTS) -> None:
    """Write event names/patterns one per line, for QEMU's ``-trace events=PATH``.

    Raises ``OSError`` if the file cannot be written.
    """
    with open(path, "w", encoding="utf-8") as fh:
        for name in events:
            fh.write(name + "\n")
