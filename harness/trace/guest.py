"""Typed events of the guest kernel's ftrace text output (Linux 6.12).

Input: the lines of ``/sys/kernel/tracing/trace`` with the ``nop`` tracer and
the default trace options.  Header lines start with ``#``; an event line is::

    <TASK>-<PID> [<CPU>] <FLAGS> <SECONDS>.<MICROS>: <EVENT>: <BODY>
              python3-1234    [000] .....    12.345678: map: IOMMU: iova=...

(``print_trace_fmt`` / ``trace_print_context`` in kernel/trace/trace.c and
trace_output.c).  The task name is right-aligned in 16 columns and may contain
spaces and dashes: the pid is the digits after the last dash before the
``[CPU]`` field.  The flags field (``.....``, ``d.h1.``) is absent when the
``irq-info`` option is off and the ``(TGID)`` column present with
``record-tgid``; both are tolerated.  ``BODY`` is what the event's
``TP_printk`` prints; each class below names the header and event it comes
from, and its ``FORMAT`` is the regular expression of that body.

Every event carries ``lineno`` (1-based line number in the file), ``raw`` (the
line without its newline), ``timestamp`` (seconds of the trace clock; the
default ``local`` clock counts from boot), ``cpu``, ``task`` and ``pid``.
Lines that are not event lines (:class:`GuestHeader`, :class:`GuestLostEvents`,
and :class:`GuestUnknownEvent` / :class:`GuestMalformedEvent` of a line
without an event header) have no such context: their ``timestamp`` is
``NO_TIMESTAMP`` (-1.0), ``cpu`` and ``pid`` -1 (``cpu`` is set for
``GuestLostEvents``) and ``task`` "".

Address spaces and units: all sizes are in bytes.  ``iova`` and ``dma_addr``
are IO-virtual addresses (what the device is given, translated by the IOMMU);
``paddr`` and ``phys`` are guest-physical addresses.  Every number is checked
against the width the kernel holds it in (addresses and sizes 64 bits, ``u32``
fields 32 bits, ...): a value out of range makes the line a
:class:`GuestMalformedEvent`, never an exception.

Nothing here raises on input text: :func:`parse_guest_line` returns a
:class:`GuestUnknownEvent` for a line that is not an event of a known name and
a :class:`GuestMalformedEvent` for a known event whose body does not match
its format (or a line longer than ``MAX_LINE_CHARS``).  :func:`parse_guest_file`
raises ``OSError`` only for the file itself.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, ClassVar, Final, TypedDict

__all__ = [
    "MAX_LINE_CHARS",
    "NO_TIMESTAMP",
    "DMA_DIRECTIONS",
    "QI_DESC_TYPES",
    "GUEST_TRACE_EVENTS",
    "GUEST_EVENT_CLASSES",
    "pci_sid",
    "GuestEvent",
    "GuestHeader",
    "GuestLostEvents",
    "GuestIommuMap",
    "GuestIommuUnmap",
    "GuestIoPageFault",
    "GuestAttachDevice",
    "GuestDetachDevice",
    "GuestAddDeviceToGroup",
    "GuestRemoveDeviceFromGroup",
    "GuestDmaMap",
    "GuestDmaMapPage",
    "GuestDmaMapResource",
    "GuestDmaAlloc",
    "GuestDmaAllocPages",
    "GuestDmaMapSg",
    "GuestDmaUnmap",
    "GuestDmaUnmapPage",
    "GuestDmaUnmapResource",
    "GuestDmaMapPhys",
    "GuestDmaUnmapPhys",
    "GuestDmaFree",
    "GuestDmaFreePages",
    "GuestDmaUnmapSg",
    "GuestQiSubmit",
    "GuestNvmeSetupCmd",
    "GuestNvmeCompleteRq",
    "GuestMarker",
    "GuestUnknownEvent",
    "GuestMalformedEvent",
    "parse_guest_line",
    "parse_guest_lines",
    "parse_guest_file",
]

MAX_LINE_CHARS: Final = 64 * 1024
"""Longest line parsed; a longer one becomes a :class:`GuestMalformedEvent`."""

_RAW_KEEP: Final = 1024
"""Characters of an over-long line kept in its event's ``raw``."""

NO_TIMESTAMP: Final = -1.0
"""``timestamp`` of a line that has no event header."""

DMA_DIRECTIONS: Final = ("BIDIRECTIONAL", "TO_DEVICE", "FROM_DEVICE", "NONE")
"""``decode_dma_data_direction`` names (include/trace/events/dma.h)."""

QI_DESC_TYPES: Final[dict[str, int]] = {
    "cc_inv": 0x1,
    "iotlb_inv": 0x2,
    "dev_tlb_inv": 0x3,
    "iec_inv": 0x4,
    "inv_wait": 0x5,
    "p_iotlb_inv": 0x6,
    "pc_inv": 0x7,
    "p_dev_tlb_inv": 0x8,
    "page_grp_resp": 0x9,
}
"""``qi_submit``'s descriptor type names and their ``qw0 & 0xf`` codes
(``QI_*_TYPE``, drivers/iommu/intel/iommu.h; names from intel/trace.h)."""

_U8: Final = 8
_U16: Final = 16
_U32: Final = 32
_U64: Final = 64


class _Bad(Exception):
    """A body that matched its format but holds an impossible value."""


# --------------------------------------------------------------------------
# Number helpers (all raise _Bad, never ValueError)
# --------------------------------------------------------------------------

_MAX_DIGITS: Final = {16: 16, 10: 20}


def _uint(text: str, bits: int, base: int = 16) -> int:
    """Unsigned number in ``base`` (digits only, no prefix) of at most ``bits`` bits."""
    digits = text.lstrip("0")
    if len(digits) > _MAX_DIGITS[base]:
        raise _Bad(f"{text[:40]!r} wider than {bits} bits")
    value = int(digits, base) if digits else 0
    if value >> bits:
        raise _Bad(f"{text!r} wider than {bits} bits")
    return value


def _sint(text: str, bits: int = 32) -> int:
    """Signed decimal (``%d``) of a ``bits``-bit C int."""
    neg = text.startswith("-")
    value = _uint(text[1:] if neg else text, bits, 10)
    if neg:
        value = -value
    if not -(1 << (bits - 1)) <= value < (1 << (bits - 1)):
        raise _Bad(f"{text!r} outside a {bits}-bit int")
    return value


def _alt_hex(text: str, bits: int) -> int:
    """``%#x`` / ``%#llx``: ``0x``-prefixed hex, or a bare ``0`` for zero."""
    return _uint(text[2:] if text[:2] in ("0x", "0X") else text, bits)


_ARRAY_ITEM: Final = re.compile(r"0x[0-9a-fA-F]+")


def _array(text: str, bits: int) -> tuple[int, ...]:
    """The inside of a ``__print_array`` (``{0x1,0x2}`` without the braces)."""
    if not text:
        return ()
    items = text.split(",")
    for item in items:
        if _ARRAY_ITEM.fullmatch(item) is None:
            raise _Bad(f"array element {item[:40]!r}")
    return tuple(_uint(item[2:], bits) for item in items)


_PCI_NAME: Final = re.compile(
    r"[0-9a-fA-F]{4,8}:(?P<bus>[0-9a-fA-F]{2}):(?P<slot>[0-9a-fA-F]{2})\.(?P<func>[0-7])"
)


def pci_sid(device: str) -> int | None:
    """PCI requester id ``bus << 8 | slot << 3 | func`` of a ``DDDD:BB:SS.F``
    device name (``dev_name`` of a PCI device), or None for any other name."""
    m = _PCI_NAME.fullmatch(device)
    if m is None:
        return None
    slot = int(m["slot"], 16)
    if slot > 0x1F:
        return None
    return (int(m["bus"], 16) << 8) | (slot << 3) | int(m["func"])


# --------------------------------------------------------------------------
# Base classes
# --------------------------------------------------------------------------


class _Context(TypedDict):
    lineno: int
    raw: str
    timestamp: float
    cpu: int
    task: str
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestEvent:
    """One line of the guest's trace.

    ``lineno`` is 1-based; ``raw`` is the line without its newline;
    ``timestamp`` (seconds), ``cpu``, ``task`` and ``pid`` come from the event
    header (see the module docstring for lines without one).
    """

    NAME: ClassVar[str] = ""
    """The ftrace event name (``map``, ``dma_map_page`` ...)."""
    SYSTEM: ClassVar[str] = ""
    """The ftrace event system (``iommu``, ``dma`` ...)."""
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(r"(?!)")
    """The body as ``TP_printk`` prints it (matched with ``fullmatch``)."""
    ENABLED: ClassVar[bool] = True
    """Whether the event is in :data:`GUEST_TRACE_EVENTS`."""

    lineno: int
    raw: str
    timestamp: float
    cpu: int
    task: str
    pid: int

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestEvent:
        raise NotImplementedError(cls.__name__)


_NO_CONTEXT_CPU: Final = -1


def _no_context(lineno: int, raw: str, cpu: int = _NO_CONTEXT_CPU) -> _Context:
    return {"lineno": lineno, "raw": raw, "timestamp": NO_TIMESTAMP, "cpu": cpu,
            "task": "", "pid": -1}


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestHeader(GuestEvent):
    """A ``#`` line of the trace header (``# tracer: nop``, the column legend,
    ``# entries-in-buffer/entries-written: 5/5   #P:2``)."""

    text: str
    """The line after the ``#``."""

    _ENTRIES: ClassVar[re.Pattern[str]] = re.compile(
        r"\s*entries-in-buffer/entries-written:\s*(\d{1,20})/(\d{1,20})")

    @property
    def entries_in_buffer(self) -> int | None:
        """Events still in the ring buffer (from the ``entries-in-buffer`` line), else None."""
        m = self._ENTRIES.match(self.text)
        return int(m[1]) if m else None

    @property
    def entries_written(self) -> int | None:
        """Events ever written (from the ``entries-in-buffer`` line), else None.
        More than ``entries_in_buffer`` means the ring buffer overwrote events."""
        m = self._ENTRIES.match(self.text)
        return int(m[2]) if m else None


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestLostEvents(GuestEvent):
    """``CPU:%d [LOST %lu EVENTS]`` (kernel/trace/trace.c ``print_trace_line``):
    the ring buffer of ``cpu`` dropped ``count`` events here."""

    count: int


# --------------------------------------------------------------------------
# iommu: include/trace/events/iommu.h, emitted by drivers/iommu/iommu.c
# --------------------------------------------------------------------------

_HEX: Final = r"[0-9a-fA-F]+"
_DEC: Final = r"[0-9]+"
_SDEC: Final = r"-?[0-9]+"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestIommuMap(GuestEvent):
    """``iommu:map`` (include/trace/events/iommu.h), traced by ``__iommu_map``
    (drivers/iommu/iommu.c) only when the whole range was mapped.

    Body ``IOMMU: iova=0x%016llx - 0x%016llx paddr=0x%016llx size=%zu``; the
    second address is ``iova + size`` (u64 arithmetic), checked.
    """

    NAME: ClassVar[str] = "map"
    SYSTEM: ClassVar[str] = "iommu"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"IOMMU: iova=0x(?P<iova>{_HEX}) - 0x(?P<end>{_HEX}) paddr=0x(?P<paddr>{_HEX})"
        rf" size=(?P<size>{_DEC})")

    iova: int
    """First IO-virtual byte mapped."""
    paddr: int
    """Guest-physical address ``iova`` maps to."""
    size: int
    """Bytes mapped."""

    @property
    def last(self) -> int:
        """Last IO-virtual byte mapped (inclusive); ``iova - 1`` for size 0."""
        return self.iova + self.size - 1

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestIommuMap:
        iova, size = _uint(m["iova"], _U64), _uint(m["size"], _U64, 10)
        if _uint(m["end"], _U64) != (iova + size) & ((1 << 64) - 1):
            raise _Bad("end address is not iova + size")
        return cls(**ctx, iova=iova, paddr=_uint(m["paddr"], _U64), size=size)


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestIommuUnmap(GuestEvent):
    """``iommu:unmap`` (include/trace/events/iommu.h), traced by ``__iommu_unmap``
    (drivers/iommu/iommu.c) after every unmap, even one that unmapped nothing.

    Body ``IOMMU: iova=0x%016llx - 0x%016llx size=%zu unmapped_size=%zu``.
    ``unmapped_size`` may be smaller than ``size`` (a hole stops the unmap)
    and, with the VT-d driver, larger (``intel_iommu_unmap`` rounds up to the
    large page or the non-present directory entry it finds).
    """

    NAME: ClassVar[str] = "unmap"
    SYSTEM: ClassVar[str] = "iommu"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"IOMMU: iova=0x(?P<iova>{_HEX}) - 0x(?P<end>{_HEX}) size=(?P<size>{_DEC})"
        rf" unmapped_size=(?P<unmapped>{_DEC})")

    iova: int
    """First IO-virtual byte asked to unmap."""
    size: int
    """Bytes asked to unmap."""
    unmapped_size: int
    """Bytes the driver reports unmapped."""

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestIommuUnmap:
        iova, size = _uint(m["iova"], _U64), _uint(m["size"], _U64, 10)
        if _uint(m["end"], _U64) != (iova + size) & ((1 << 64) - 1):
            raise _Bad("end address is not iova + size")
        return cls(**ctx, iova=iova, size=size, unmapped_size=_uint(m["unmapped"], _U64, 10))


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestIoPageFault(GuestEvent):
    """``iommu:io_page_fault`` (class ``iommu_error``, include/trace/events/iommu.h),
    traced by ``report_iommu_fault`` (drivers/iommu/iommu.c).

    Body ``IOMMU:%s %s iova=0x%016llx flags=0x%04x`` (driver, device).
    ``flags`` are ``IOMMU_FAULT_READ`` (0) / ``IOMMU_FAULT_WRITE`` (1).
    """

    NAME: ClassVar[str] = "io_page_fault"
    SYSTEM: ClassVar[str] = "iommu"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"IOMMU:(?P<driver>\S*) (?P<device>.*?) iova=0x(?P<iova>{_HEX}) flags=0x(?P<flags>{_HEX})")

    driver: str
    device: str
    iova: int
    """IO-virtual address that faulted."""
    flags: int

    @property
    def sid(self) -> int | None:
        """PCI requester id of ``device`` (:func:`pci_sid`)."""
        return pci_sid(self.device)

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestIoPageFault:
        return cls(**ctx, driver=m["driver"], device=m["device"], iova=_uint(m["iova"], _U64),
                   flags=_uint(m["flags"], _U32))


@dataclass(frozen=True, slots=True, kw_only=True)
class _IommuDeviceEvent(GuestEvent):
    """Event class ``iommu_device_event`` (include/trace/events/iommu.h).

    Body ``IOMMU: device=%s``.
    """

    SYSTEM: ClassVar[str] = "iommu"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(r"IOMMU: device=(?P<device>.*)")

    device: str

    @property
    def sid(self) -> int | None:
        """PCI requester id of ``device`` (:func:`pci_sid`)."""
        return pci_sid(self.device)

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> _IommuDeviceEvent:
        return cls(**ctx, device=m["device"])


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestAttachDevice(_IommuDeviceEvent):
    """``iommu:attach_device_to_domain`` (class ``iommu_device_event``), traced
    by ``__iommu_attach_device`` (drivers/iommu/iommu.c)."""

    NAME: ClassVar[str] = "attach_device_to_domain"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDetachDevice(_IommuDeviceEvent):
    """``iommu:detach_device_from_domain``: same class and body as
    :class:`GuestAttachDevice`.  Linux 6.12 no longer defines this event (only
    older kernels do), so it is parsed but not in :data:`GUEST_TRACE_EVENTS`."""

    NAME: ClassVar[str] = "detach_device_from_domain"
    ENABLED: ClassVar[bool] = False


@dataclass(frozen=True, slots=True, kw_only=True)
class _IommuGroupEvent(GuestEvent):
    """Event class ``iommu_group_event`` (include/trace/events/iommu.h).

    Body ``IOMMU: groupID=%d device=%s``.
    """

    SYSTEM: ClassVar[str] = "iommu"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"IOMMU: groupID=(?P<group_id>{_SDEC}) device=(?P<device>.*)")

    group_id: int
    device: str

    @property
    def sid(self) -> int | None:
        """PCI requester id of ``device`` (:func:`pci_sid`)."""
        return pci_sid(self.device)

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> _IommuGroupEvent:
        return cls(**ctx, group_id=_sint(m["group_id"]), device=m["device"])


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestAddDeviceToGroup(_IommuGroupEvent):
    """``iommu:add_device_to_group`` (class ``iommu_group_event``), traced by
    ``iommu_group_add_device`` (drivers/iommu/iommu.c)."""

    NAME: ClassVar[str] = "add_device_to_group"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestRemoveDeviceFromGroup(_IommuGroupEvent):
    """``iommu:remove_device_from_group``: same class and body as
    :class:`GuestAddDeviceToGroup`, traced by ``__iommu_group_remove_device``."""

    NAME: ClassVar[str] = "remove_device_from_group"


# --------------------------------------------------------------------------
# dma: include/trace/events/dma.h, emitted by kernel/dma/mapping.c
# --------------------------------------------------------------------------

_DMA_HEAD: Final = r"(?P<device>.+?) dir=(?P<dir>\S+)"
_DMA_DIRS: Final = frozenset(DMA_DIRECTIONS)
_NULL_POINTERS: Final = frozenset({"(null)", "(nil)", "0", "0x0", "00000000", "0000000000000000"})


def _dir(text: str) -> str:
    # __print_symbolic prints an unknown value as 0x..: not a direction.
    if text not in _DMA_DIRS:
        raise _Bad(f"unknown DMA direction {text[:40]!r}")
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaMap(GuestEvent):
    """A DMA-API mapping or allocation (include/trace/events/dma.h, traced by
    kernel/dma/mapping.c after the mapping was made).  Concrete classes:
    :class:`GuestDmaMapPage`, :class:`GuestDmaMapResource`,
    :class:`GuestDmaAlloc`, :class:`GuestDmaAllocPages`, :class:`GuestDmaMapSg`.

    ``segments`` are the mapped IO-virtual ranges ``(dma_addr, size in bytes)``
    (one except for ``map_sg``); ``phys`` the guest-physical addresses the
    event prints (for ``map_sg`` one per *input* entry, which need not
    correspond 1:1 to the segments: the IOMMU path merges entries).
    ``truncated``: ``map_sg`` traced only the first 128 entries.
    """

    device: str
    """``dev_name`` of the device (``0000:00:03.0`` for PCI)."""
    dir: str
    """One of :data:`DMA_DIRECTIONS`."""
    segments: tuple[tuple[int, int], ...]
    phys: tuple[int, ...]
    truncated: bool = False
    attrs: str = ""
    """``DMA_ATTR_*`` names joined by ``|`` (empty for none)."""
    virt_addr: str | None = None
    """The (hashed) kernel virtual address as printed (``%p``), alloc only."""
    gfp_flags: str | None = None
    """``show_gfp_flags`` text (``GFP_KERNEL``...), alloc only."""

    @property
    def api(self) -> str:
        """The event name without ``dma_``: ``map_page``, ``map_resource``,
        ``alloc``, ``alloc_pages`` or ``map_sg``."""
        return self.NAME.removeprefix("dma_")

    @property
    def sid(self) -> int | None:
        """PCI requester id of ``device`` (:func:`pci_sid`)."""
        return pci_sid(self.device)

    @property
    def failed(self) -> bool:
        """An allocation that failed: ``dma_alloc_attrs`` / ``dma_alloc_pages``
        trace a failure with a NULL ``virt_addr`` (and ``dma_addr`` 0); the
        caller got NULL, so nothing is mapped whatever ``dma_addr`` says."""
        return self.virt_addr is not None and self.virt_addr in _NULL_POINTERS

    @property
    def size(self) -> int:
        """Total bytes of the segments."""
        return sum(size for _, size in self.segments)


@dataclass(frozen=True, slots=True, kw_only=True)
class _DmaMapClass(GuestDmaMap):
    """Event class ``dma_map`` (include/trace/events/dma.h).

    Body ``%s dir=%s dma_addr=%llx size=%zu phys_addr=%llx attrs=%s`` (the
    ``%llx`` have no ``0x``).
    """

    SYSTEM: ClassVar[str] = "dma"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"{_DMA_HEAD} dma_addr=(?P<dma>{_HEX}) size=(?P<size>{_DEC})"
        rf" phys_addr=(?P<phys>{_HEX}) attrs=(?P<attrs>\S*)")

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestDmaMap:
        return cls(**ctx, device=m["device"], dir=_dir(m["dir"]),
                   segments=((_uint(m["dma"], _U64), _uint(m["size"], _U64, 10)),),
                   phys=(_uint(m["phys"], _U64),), attrs=m["attrs"])


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaMapPage(_DmaMapClass):
    """``dma:dma_map_page`` (class ``dma_map``), traced by ``dma_map_page_attrs``."""

    NAME: ClassVar[str] = "dma_map_page"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaMapResource(_DmaMapClass):
    """``dma:dma_map_resource`` (class ``dma_map``), traced by
    ``dma_map_resource`` (``phys_addr`` is an MMIO address)."""

    NAME: ClassVar[str] = "dma_map_resource"


@dataclass(frozen=True, slots=True, kw_only=True)
class _DmaAllocClass(GuestDmaMap):
    """Event class ``dma_alloc_class`` (include/trace/events/dma.h).

    Body ``%s dir=%s dma_addr=%llx size=%zu virt_addr=%p flags=%s attrs=%s``;
    ``phys`` is empty (not printed).  A failure is traced too (see ``failed``).
    """

    SYSTEM: ClassVar[str] = "dma"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"{_DMA_HEAD} dma_addr=(?P<dma>{_HEX}) size=(?P<size>{_DEC})"
        rf" virt_addr=\s*(?P<virt>\S+) flags=(?P<flags>\S*) attrs=(?P<attrs>\S*)")

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestDmaMap:
        return cls(**ctx, device=m["device"], dir=_dir(m["dir"]),
                   segments=((_uint(m["dma"], _U64), _uint(m["size"], _U64, 10)),),
                   phys=(), attrs=m["attrs"], virt_addr=m["virt"], gfp_flags=m["flags"])


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaAlloc(_DmaAllocClass):
    """``dma:dma_alloc`` (class ``dma_alloc_class``), traced by ``dma_alloc_attrs``
    (``dir`` is always ``BIDIRECTIONAL``)."""

    NAME: ClassVar[str] = "dma_alloc"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaAllocPages(_DmaAllocClass):
    """``dma:dma_alloc_pages`` (class ``dma_alloc_class``), traced by ``dma_alloc_pages``."""

    NAME: ClassVar[str] = "dma_alloc_pages"


_MAX_SG_TRACED: Final = 128
"""``DMA_TRACE_MAX_ENTRIES``: entries ``dma_map_sg`` traces at most."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaMapSg(GuestDmaMap):
    """``dma:dma_map_sg``: ``dma_map_sg_attrs`` / ``dma_map_sgtable`` that mapped
    at least one segment.

    Body ``%s dir=%s nents=%d/%d ents=%d/%d%s dma_addrs=%s sizes=%s
    phys_addrs=%s attrs=%s``: traced/total input entries, traced/total mapped
    segments, `` [TRUNCATED]`` when either total exceeds 128, then
    ``__print_array`` lists (``{0x1,0x2}``; sizes are u32).  The counts and
    the list lengths are checked against each other.
    """

    NAME: ClassVar[str] = "dma_map_sg"
    SYSTEM: ClassVar[str] = "dma"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"{_DMA_HEAD} nents=(?P<nt>{_SDEC})/(?P<nf>{_SDEC}) ents=(?P<et>{_SDEC})/(?P<ef>{_SDEC})"
        r"(?P<trunc> \[TRUNCATED\])? dma_addrs=\{(?P<dma>[^}]*)\} sizes=\{(?P<sizes>[^}]*)\}"
        r" phys_addrs=\{(?P<phys>[^}]*)\} attrs=(?P<attrs>\S*)")

    nents: int = 0
    """Input scatterlist entries (all, not only the traced ones)."""
    ents: int = 0
    """Mapped DMA segments (all, not only the traced ones)."""

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestDmaMap:
        nt, nf, et, ef = (_sint(m[k]) for k in ("nt", "nf", "et", "ef"))
        dma, sizes, phys = _array(m["dma"], _U64), _array(m["sizes"], _U32), _array(m["phys"], _U64)
        if nf < 0 or ef < 0 or nt != min(nf, _MAX_SG_TRACED) or et != min(ef, _MAX_SG_TRACED):
            raise _Bad("traced counts do not match the totals")
        if len(dma) != et or len(sizes) != et or len(phys) != nt:
            raise _Bad("array lengths do not match the counts")
        truncated = m["trunc"] is not None
        if truncated != (nf > _MAX_SG_TRACED or ef > _MAX_SG_TRACED):
            raise _Bad("[TRUNCATED] does not match the counts")
        return cls(**ctx, device=m["device"], dir=_dir(m["dir"]),
                   segments=tuple(zip(dma, sizes)), phys=phys, truncated=truncated,
                   attrs=m["attrs"], nents=nf, ents=ef)


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaUnmap(GuestEvent):
    """A DMA-API unmapping or free (include/trace/events/dma.h, traced by
    kernel/dma/mapping.c before the unmap is done).  Concrete classes:
    :class:`GuestDmaUnmapPage`, :class:`GuestDmaUnmapResource`,
    :class:`GuestDmaFree`, :class:`GuestDmaFreePages`, :class:`GuestDmaUnmapSg`.

    ``segments`` ``(dma_addr, size in bytes)`` (empty for ``unmap_sg``, which
    prints only the guest-physical addresses of its entries, in ``phys``).
    """

    device: str
    dir: str
    segments: tuple[tuple[int, int], ...]
    phys: tuple[int, ...]
    attrs: str = ""
    virt_addr: str | None = None
    """``%p`` as printed, free only."""

    @property
    def api(self) -> str:
        """The event name without ``dma_``: ``unmap_page``, ``unmap_resource``,
        ``free``, ``free_pages`` or ``unmap_sg``."""
        return self.NAME.removeprefix("dma_")

    @property
    def sid(self) -> int | None:
        """PCI requester id of ``device`` (:func:`pci_sid`)."""
        return pci_sid(self.device)


@dataclass(frozen=True, slots=True, kw_only=True)
class _DmaUnmapClass(GuestDmaUnmap):
    """Event class ``dma_unmap`` (include/trace/events/dma.h).

    Body ``%s dir=%s dma_addr=%llx size=%zu attrs=%s``.
    """

    SYSTEM: ClassVar[str] = "dma"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"{_DMA_HEAD} dma_addr=(?P<dma>{_HEX}) size=(?P<size>{_DEC}) attrs=(?P<attrs>\S*)")

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestDmaUnmap:
        return cls(**ctx, device=m["device"], dir=_dir(m["dir"]),
                   segments=((_uint(m["dma"], _U64), _uint(m["size"], _U64, 10)),),
                   phys=(), attrs=m["attrs"])


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaUnmapPage(_DmaUnmapClass):
    """``dma:dma_unmap_page`` (class ``dma_unmap``), traced by ``dma_unmap_page_attrs``."""

    NAME: ClassVar[str] = "dma_unmap_page"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaUnmapResource(_DmaUnmapClass):
    """``dma:dma_unmap_resource`` (class ``dma_unmap``), traced by ``dma_unmap_resource``."""

    NAME: ClassVar[str] = "dma_unmap_resource"


# Linux 7.2 has no dma_map_page/dma_map_resource events (nor their unmaps): one map and
# one unmap event of class dma_map / dma_unmap serve both, since dma_map_page_attrs()
# and dma_map_resource() call dma_map_phys(), which traces dma_map_phys
# (kernel/dma/mapping.c, include/trace/events/dma.h of 7.2); same body format.
# They are page maps for the checkers (a resource map carries attrs=MMIO). Linux 6.12
# has neither event: the unknown names on its trace_event= are skipped and the other
# events are enabled as before (checked: the intel-iommu-nvme run, 0 unattributed maps).


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaMapPhys(GuestDmaMapPage):
    """``dma:dma_map_phys`` (class ``dma_map``; Linux 7.2), traced by ``dma_map_phys``
    for ``dma_map_page_attrs`` and ``dma_map_resource`` alike."""

    NAME: ClassVar[str] = "dma_map_phys"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaUnmapPhys(GuestDmaUnmapPage):
    """``dma:dma_unmap_phys`` (class ``dma_unmap``; Linux 7.2), traced by
    ``dma_unmap_phys`` for ``dma_unmap_page_attrs`` and ``dma_unmap_resource`` alike."""

    NAME: ClassVar[str] = "dma_unmap_phys"


@dataclass(frozen=True, slots=True, kw_only=True)
class _DmaFreeClass(GuestDmaUnmap):
    """Event class ``dma_free_class`` (include/trace/events/dma.h).

    Body ``%s dir=%s dma_addr=%llx size=%zu virt_addr=%p attrs=%s``.
    """

    SYSTEM: ClassVar[str] = "dma"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"{_DMA_HEAD} dma_addr=(?P<dma>{_HEX}) size=(?P<size>{_DEC})"
        rf" virt_addr=\s*(?P<virt>\S+) attrs=(?P<attrs>\S*)")

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestDmaUnmap:
        return cls(**ctx, device=m["device"], dir=_dir(m["dir"]),
                   segments=((_uint(m["dma"], _U64), _uint(m["size"], _U64, 10)),),
                   phys=(), attrs=m["attrs"], virt_addr=m["virt"])


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaFree(_DmaFreeClass):
    """``dma:dma_free`` (class ``dma_free_class``), traced by ``dma_free_attrs``."""

    NAME: ClassVar[str] = "dma_free"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaFreePages(_DmaFreeClass):
    """``dma:dma_free_pages`` (class ``dma_free_class``), traced by ``dma_free_pages``."""

    NAME: ClassVar[str] = "dma_free_pages"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestDmaUnmapSg(GuestDmaUnmap):
    """``dma:dma_unmap_sg``: ``dma_unmap_sg_attrs``.

    Body ``%s dir=%s phys_addrs=%s attrs=%s`` (``__print_array`` of the
    entries' guest-physical addresses; no DMA addresses are printed).
    """

    NAME: ClassVar[str] = "dma_unmap_sg"
    SYSTEM: ClassVar[str] = "dma"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"{_DMA_HEAD} phys_addrs=\{{(?P<phys>[^}}]*)\}} attrs=(?P<attrs>\S*)")

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestDmaUnmap:
        return cls(**ctx, device=m["device"], dir=_dir(m["dir"]), segments=(),
                   phys=_array(m["phys"], _U64), attrs=m["attrs"])


# --------------------------------------------------------------------------
# intel_iommu: drivers/iommu/intel/trace.h
# --------------------------------------------------------------------------

_QI_GRANULARITY: Final = {1: "global", 2: "domain", 3: "page"}


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestQiSubmit(GuestEvent):
    """``intel_iommu:qi_submit`` (drivers/iommu/intel/trace.h), traced by
    ``qi_submit_sync`` (drivers/iommu/intel/dmar.c) for every descriptor queued.

    Body ``%s %s: 0x%llx 0x%llx 0x%llx 0x%llx``: the descriptor type name
    (``__print_symbolic`` of ``qw0 & 0xf``; an unknown type prints as hex),
    the IOMMU name (``dmar0``) and the four quadwords.

    The ``iotlb_inv`` properties decode qw0/qw1 as drivers/iommu/intel/iommu.h
    ``QI_IOTLB_*`` builds them and QEMU's ``vtd_process_iotlb_desc``
    (hw/i386/intel_iommu.c) reads them; on another descriptor type they are
    the same bits, meaningless.
    """

    NAME: ClassVar[str] = "qi_submit"
    SYSTEM: ClassVar[str] = "intel_iommu"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"(?P<type>\w+) (?P<iommu>.+?): 0x(?P<qw0>{_HEX}) 0x(?P<qw1>{_HEX})"
        rf" 0x(?P<qw2>{_HEX}) 0x(?P<qw3>{_HEX})")

    desc_type: str
    """A name of :data:`QI_DESC_TYPES`, or ``0x..`` for another type."""
    iommu: str
    qw0: int
    qw1: int
    qw2: int
    qw3: int

    @property
    def granularity(self) -> str | None:
        """``global``, ``domain`` or ``page`` from qw0 bits 5:4 (``QI_IOTLB_GRAN``)
        of an ``iotlb_inv`` descriptor, else None."""
        if self.desc_type != "iotlb_inv":
            return None
        return _QI_GRANULARITY.get((self.qw0 >> 4) & 3)

    @property
    def did(self) -> int:
        """Domain id, qw0 bits 31:16 (``QI_IOTLB_DID``)."""
        return (self.qw0 >> 16) & 0xFFFF

    @property
    def addr(self) -> int:
        """IO-virtual address of a page-selective invalidation, ``qw1 & ~0xfff``
        (``QI_IOTLB_ADDR``)."""
        return self.qw1 & ~0xFFF

    @property
    def am(self) -> int:
        """Address mask: the invalidation covers ``2**am`` 4 KiB pages, ``qw1 & 0x3f``."""
        return self.qw1 & 0x3F

    @property
    def ih(self) -> int:
        """Invalidation hint (only leaf entries changed), qw1 bit 6."""
        return (self.qw1 >> 6) & 1

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestQiSubmit:
        desc_type = m["type"]
        qw0 = _uint(m["qw0"], _U64)
        code = QI_DESC_TYPES.get(desc_type)
        if code is None:
            if not desc_type.startswith("0x") or _uint(desc_type[2:], _U64) != qw0 & 0xF:
                raise _Bad(f"unknown descriptor type {desc_type[:40]!r}")
        elif code != qw0 & 0xF:
            raise _Bad(f"{desc_type} does not match qw0 type {qw0 & 0xF:#x}")
        return cls(**ctx, desc_type=desc_type, iommu=m["iommu"], qw0=qw0,
                   qw1=_uint(m["qw1"], _U64), qw2=_uint(m["qw2"], _U64),
                   qw3=_uint(m["qw3"], _U64))


# --------------------------------------------------------------------------
# nvme: drivers/nvme/host/trace.h and trace.c
# --------------------------------------------------------------------------

_NVME_HEAD: Final = rf"nvme(?P<ctrl>{_SDEC}): (?:disk=(?P<disk>.*?), )?qid=(?P<qid>{_SDEC}), cmdid=(?P<cid>{_DEC})"
_SLBA: Final = re.compile(r"(?:^|, )slba=(?:0x(?P<hex>[0-9a-fA-F]+)|(?P<dec>[0-9]+))(?:,|$)")
_LEN: Final = re.compile(r"(?:^|, )len=(?P<len>[0-9]+)(?:,|$)")


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestNvmeSetupCmd(GuestEvent):
    """``nvme:nvme_setup_cmd`` (drivers/nvme/host/trace.h), traced by
    ``nvme_setup_cmd`` (drivers/nvme/host/core.c) for every command built.

    Body ``nvme%d: %sqid=%d, cmdid=%u, nsid=%u, flags=0x%x, meta=0x%x,
    cmd=(%s %s)``: the ``%s`` after the controller is ``disk=nvme0n1, `` or
    empty (admin queue); ``cmd=(`` holds ``show_opcode_name`` (e.g.
    ``nvme_cmd_write``, ``nvme_admin_identify``, ``0x..`` if unknown) and
    what drivers/nvme/host/trace.c prints for the opcode
    (``nvme_trace_read_write``: ``slba=%llu, len=%u, ctrl=0x%x, dsmgmt=%u,
    reftag=%u``).
    """

    NAME: ClassVar[str] = "nvme_setup_cmd"
    SYSTEM: ClassVar[str] = "nvme"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"{_NVME_HEAD}, nsid=(?P<nsid>{_DEC}), flags=0x(?P<flags>{_HEX}), meta=0x(?P<meta>{_HEX}),"
        r" cmd=\((?P<op>\S+)(?: (?P<args>.*))?\)")

    ctrl: int
    """Controller instance (the N of ``nvmeN``)."""
    disk: str | None
    """Disk name (``nvme0n1``) or None (admin commands)."""
    qid: int
    """Queue id, 0 for the admin queue."""
    cid: int
    """Command id (u16)."""
    nsid: int
    flags: int
    meta: int
    opcode_name: str
    cmd_args: str
    slba: int | None
    """Starting LBA when the arguments print one (read, write, ...)."""
    length: int | None
    """The NVMe 0-based block count ``len`` as printed (NLB - 1), or None."""

    @property
    def blocks(self) -> int | None:
        """Logical blocks the command moves (``length + 1``), or None."""
        return None if self.length is None else self.length + 1

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestNvmeSetupCmd:
        args = m["args"] or ""
        slba: int | None = None
        length: int | None = None
        sm = _SLBA.search(args)
        if sm is not None:
            slba = _uint(sm["hex"], _U64) if sm["hex"] is not None else _uint(sm["dec"], _U64, 10)
        lm = _LEN.search(args)
        if lm is not None:
            length = _uint(lm["len"], _U16, 10)
        return cls(**ctx, ctrl=_sint(m["ctrl"]), disk=m["disk"], qid=_sint(m["qid"]),
                   cid=_uint(m["cid"], _U16, 10), nsid=_uint(m["nsid"], _U32, 10),
                   flags=_uint(m["flags"], _U8), meta=_uint(m["meta"], _U8),
                   opcode_name=m["op"], cmd_args=args, slba=slba, length=length)


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestNvmeCompleteRq(GuestEvent):
    """``nvme:nvme_complete_rq`` (drivers/nvme/host/trace.h), traced by
    ``nvme_complete_rq`` (drivers/nvme/host/core.c).

    Body ``nvme%d: %sqid=%d, cmdid=%u, res=%#llx, retries=%u, flags=0x%x,
    status=%#x`` (``%#x`` prints zero as ``0``).
    """

    NAME: ClassVar[str] = "nvme_complete_rq"
    SYSTEM: ClassVar[str] = "nvme"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(
        rf"{_NVME_HEAD}, res=(?P<res>0x{_HEX}|0), retries=(?P<retries>{_DEC}),"
        rf" flags=0x(?P<flags>{_HEX}), status=(?P<status>0x{_HEX}|0)")

    ctrl: int
    disk: str | None
    qid: int
    cid: int
    result: int
    """The completion's result (DW0/DW1), u64."""
    retries: int
    flags: int
    """``nvme_req(req)->flags`` (u8)."""
    status: int
    """NVMe status (status code and type, no phase bit), 0 on success."""

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestNvmeCompleteRq:
        return cls(**ctx, ctrl=_sint(m["ctrl"]), disk=m["disk"], qid=_sint(m["qid"]),
                   cid=_uint(m["cid"], _U16, 10), result=_alt_hex(m["res"], _U64),
                   retries=_uint(m["retries"], _U8, 10), flags=_uint(m["flags"], _U8),
                   status=_alt_hex(m["status"], _U16))


# --------------------------------------------------------------------------
# ftrace: trace_marker
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestMarker(GuestEvent):
    """``tracing_mark_write``: a line userspace wrote into
    ``/sys/kernel/tracing/trace_marker`` (``ftrace:print`` printed by
    ``trace_print_print``, kernel/trace/trace_output.c).  Always enabled."""

    NAME: ClassVar[str] = "tracing_mark_write"
    SYSTEM: ClassVar[str] = "ftrace"
    FORMAT: ClassVar[re.Pattern[str]] = re.compile(r"(?P<text>.*)", re.DOTALL)
    ENABLED: ClassVar[bool] = False

    text: str
    """What was written, without its trailing newline."""

    @classmethod
    def _build(cls, ctx: _Context, m: re.Match[str]) -> GuestMarker:
        return cls(**ctx, text=m["text"].rstrip("\n"))


# --------------------------------------------------------------------------
# Unknown and malformed lines
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestUnknownEvent(GuestEvent):
    """An event of a name this module does not know (``name`` set, with its
    header context), or a line that is neither an event line nor a header
    (``name`` None, ``body`` the whole line, no context)."""

    name: str | None
    body: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestMalformedEvent(GuestEvent):
    """A known event whose body does not match its format or holds a value
    wider than its field, or a line longer than :data:`MAX_LINE_CHARS`
    (``raw`` then truncated; ``name`` None if no header was found in it)."""

    name: str | None
    body: str
    reason: str
    """Why the line was rejected."""

    @property
    def family(self) -> str:
        """The event's ftrace system (``iommu``, ``dma``, ``intel_iommu``,
        ``nvme``, ``ftrace``), or "" for an unknown name."""
        cls = _BY_NAME.get(self.name or "")
        return cls.SYSTEM if cls is not None else ""


# --------------------------------------------------------------------------
# Registry and parsing
# --------------------------------------------------------------------------

GUEST_EVENT_CLASSES: Final[tuple[type[GuestEvent], ...]] = (
    GuestIommuMap,
    GuestIommuUnmap,
    GuestIoPageFault,
    GuestAttachDevice,
    GuestDetachDevice,
    GuestAddDeviceToGroup,
    GuestRemoveDeviceFromGroup,
    GuestDmaMapPage,
    GuestDmaMapResource,
    GuestDmaAlloc,
    GuestDmaAllocPages,
    GuestDmaMapSg,
    GuestDmaUnmapPage,
    GuestDmaUnmapResource,
    GuestDmaMapPhys,  # Linux 7.2
    GuestDmaUnmapPhys,  # Linux 7.2
    GuestDmaFree,
    GuestDmaFreePages,
    GuestDmaUnmapSg,
    GuestQiSubmit,
    GuestNvmeSetupCmd,
    GuestNvmeCompleteRq,
    GuestMarker,
)
"""Every class of a named event, one per ftrace event name."""

_BY_NAME: Final[dict[str, type[GuestEvent]]] = {cls.NAME: cls for cls in GUEST_EVENT_CLASSES}

GUEST_TRACE_EVENTS: Final[tuple[str, ...]] = tuple(
    f"{cls.SYSTEM}:{cls.NAME}" for cls in GUEST_EVENT_CLASSES if cls.ENABLED)
"""``system:event`` names the harness enables (``set_event`` / ``trace_event=``
syntax).  ``tracing_mark_write`` is always on; ``detach_device_from_domain``
does not exist in Linux 6.12."""

# TASK-PID [(TGID)] [CPU] [FLAGS] SECONDS[.MICROS]: NAME: BODY
_HEAD: Final = re.compile(
    r" *+(?P<task>\S.{0,255}?)-(?P<pid>[0-9]{1,10}) +(?:\( *(?:[0-9]{1,10}|-+)\) +)?"
    r"\[(?P<cpu>[0-9]{1,6})\] +(?:\S{1,16} +)?(?P<ts>[0-9]{1,20}(?:\.[0-9]{1,12})?): "
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]{0,127}): ?")
_LOST: Final = re.compile(r"CPU:(?P<cpu>[0-9]{1,6}) \[LOST (?P<count>[0-9]{1,20}) EVENTS\]")


def _context(lineno: int, raw: str, h: re.Match[str]) -> _Context:
    return {"lineno": lineno, "raw": raw, "timestamp": float(h["ts"]), "cpu": int(h["cpu"]),
            "task": h["task"], "pid": int(h["pid"])}


def parse_guest_line(line: str, lineno: int = 0) -> GuestEvent:
    """Turn one line of the guest's ``trace`` file into a :class:`GuestEvent`.

    ``line`` may end with a newline (not part of ``raw``).  Never raises on
    any text: a ``#`` line is a :class:`GuestHeader`, an unknown event or
    any other line a :class:`GuestUnknownEvent`, a known event that does not
    match its format a :class:`GuestMalformedEvent`.
    """
    raw = line.rstrip("\n")
    if raw.endswith("\r"):
        raw = raw[:-1]
    if len(raw) > MAX_LINE_CHARS:
        head = raw[:_RAW_KEEP]
        h = _HEAD.match(head)
        reason = f"line of {len(raw)} characters (limit {MAX_LINE_CHARS})"
        if h is None:
            return GuestMalformedEvent(**_no_context(lineno, head), name=None, body=head,
                                       reason=reason)
        return GuestMalformedEvent(**_context(lineno, head, h), name=h["name"],
                                   body=head[h.end():], reason=reason)
    if raw.startswith("#"):
        return GuestHeader(**_no_context(lineno, raw), text=raw[1:])
    h = _HEAD.match(raw)
    if h is None:
        lost = _LOST.fullmatch(raw)
        if lost is not None:
            return GuestLostEvents(**_no_context(lineno, raw, int(lost["cpu"])),
                                   count=int(lost["count"]))
        return GuestUnknownEvent(**_no_context(lineno, raw), name=None, body=raw)
    name = h["name"]
    body = raw[h.end():]
    ctx = _context(lineno, raw, h)
    cls = _BY_NAME.get(name)
    if cls is None:
        return GuestUnknownEvent(**ctx, name=name, body=body)
    m = cls.FORMAT.fullmatch(body if cls is GuestMarker else body.rstrip())
    if m is None:
        return GuestMalformedEvent(**ctx, name=name, body=body,
                                   reason=f"body does not match the {name} format")
    try:
        return cls._build(ctx, m)
    except _Bad as exc:
        return GuestMalformedEvent(**ctx, name=name, body=body, reason=str(exc))


def parse_guest_lines(lines: Iterable[str], start: int = 1) -> Iterator[GuestEvent]:
    """Yield one event per line of ``lines``, numbered from ``start``.

    A generator: memory does not grow with the input.  Never raises on
    line content.
    """
    for lineno, line in enumerate(lines, start):
        yield parse_guest_line(line, lineno)


def _open_text(path: str | os.PathLike[str]) -> IO[str]:
    name = os.fspath(path)
    if name.endswith(".gz"):
        return gzip.open(name, "rt", encoding="utf-8", errors="replace", newline="\n")
    if name.endswith(".xz"):
        return lzma.open(name, "rt", encoding="utf-8", errors="replace", newline="\n")
    return open(name, encoding="utf-8", errors="replace", newline="\n")


def _bounded_lines(fh: IO[str]) -> Iterator[str]:
    """Lines of ``fh`` (split on ``\\n``), never holding more than
    ``MAX_LINE_CHARS + 1`` characters of one: an over-long line is cut there
    (and still longer than the limit, so it parses as malformed) and the rest
    of it is skipped."""
    limit = MAX_LINE_CHARS + 1
    while True:
        line = fh.readline(limit)
        if not line:
            return
        if len(line) == limit and not line.endswith("\n"):
            while True:  # skip to the end of this line
                rest = fh.readline(limit)
                if not rest or rest.endswith("\n"):
                    break
        yield line


def parse_guest_file(path: str | os.PathLike[str]) -> Iterator[GuestEvent]:
    """Yield the events of a saved guest trace, streaming (lines numbered from 1).

    ``.gz`` and ``.xz`` files are decompressed on the fly; bytes that are not
    UTF-8 are replaced (U+FFFD); lines are split on ``\\n`` only.  Memory is
    bounded by :data:`MAX_LINE_CHARS` whatever the file holds.  Raises
    ``OSError`` only if the file cannot be opened or read (a damaged or
    truncated compressed file included).
    """
    with _open_text(path) as fh:
        try:
            yield from parse_guest_lines(_bounded_lines(fh))
        except (lzma.LZMAError, EOFError, zlib.error) as exc:
            raise OSError(f"{os.fspath(path)}: damaged compressed file: {exc}") from exc
