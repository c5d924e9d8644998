"""Typed events of QEMU's ``log`` trace backend (QEMU 7.2, Debian bookworm).

Each trace line ``NAME ARGS`` (optionally prefixed by ``PID@SECONDS.USEC:``
when QEMU runs with ``-msg timestamp=on``) becomes one frozen, slotted
dataclass.  Every event carries ``lineno`` (1-based line number in the trace
file) and ``raw`` (the line without its newline); the other fields use the
names of the QEMU trace points (hw/i386/trace-events, hw/nvme/trace-events,
the dma-helpers events of the top-level trace-events).

Each class states its own line format next to its fields:

* ``NAME``: the trace event name;
* ``FORMAT``: a regular expression of the argument text (what follows
  ``NAME `` on the line) in which ``{field}`` stands for one field;
* each field's annotation carries an :class:`Arg`: how QEMU prints the value
  (``0x%PRIx64``, ``%u``, ``%d``, ``%p``, ``%s``) and how many bits the value
  has in the source it comes from.  ``X16`` is a hex value of 16 bits
  (``X3``, ``X5``: a PCI function and slot printed ``%02x``),
  ``U32`` an unsigned decimal of 32 bits, ``S32`` a signed decimal, ``Flag``
  a ``bool`` printed ``%d`` (0 or 1), ``Ptr`` a ``%p`` host pointer, ``Text``
  a ``%s`` string.

:mod:`harness.trace.parser` compiles these into one matcher per name.  A value
outside its width (an ``am`` of 64, a 17-bit source id, a negative ``cid``)
makes the line a :class:`MalformedEvent`: no consumer ever sees it.

Address spaces and units:

* ``iova``: IO-virtual byte address, as the device issued it (VT-d "input
  address").  ``vtd_dmar_translate`` prints it aligned down to the page the
  translation covers; ``vtd_iotlb_page_update`` / ``_hit`` print the
  unaligned address the device asked for.
* ``gpa``: guest-physical byte address.
* ``slpte``: the raw second-level page-table entry (leaf).  Bits 12..51 are
  the guest-physical page frame (:func:`slpte_gpa`), bit 0 read and bit 1
  write permission (:func:`slpte_perm`, returned as ``VHOST_MAP_*`` bits).
* ``mask``: in ``vtd_dmar_translate``, the byte offset mask of the page
  (``0xfff`` 4 KiB, ``0x1fffff`` 2 MiB, ``0x3fffffff`` 1 GiB).
* ``am``: in ``vtd_inv_desc_iotlb_pages``, the VT-d address mask: the
  invalidation covers ``2**am`` 4 KiB pages (printed as ``mask 0x%x``).  The
  descriptor field is 6 bits, so ``am <= 63``; QEMU 7.2 itself rejects
  ``am > VTD_MAMV`` (18) in ``vtd_process_iotlb_desc`` / ``vtd_iotlb_flush``
  before ``vtd_iotlb_page_invalidate`` traces it.
* ``sid``: PCI source id, ``bus << 8 | slot << 3 | func`` (16 bits).
* ``domain``: VT-d domain id (16 bits).

Nothing in this module raises on trace input; see :mod:`harness.trace.parser`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final, Literal, TypeAlias

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "SLPTE_ADDR_MASK",
    "SLPTE_READ",
    "SLPTE_WRITE",
    "VTD_FAULT_REASONS",
    "VTD_AM_MAX",
    "slpte_gpa",
    "slpte_perm",
    "make_sid",
    "perm_name",
    "event_family",
    "NO_FAMILY",
    "Arg",
    "Event",
    "VtdEvent",
    "NvmeEvent",
    "DmaEvent",
    "IotlbPageUpdate",
    "IotlbPageHit",
    "DmarTranslate",
    "TranslatePassthrough",
    "InvIotlbPages",
    "InvIotlbPasidPages",
    "InvIotlbDomain",
    "InvIotlbPasid",
    "InvIotlbGlobal",
    "IotlbReset",
    "ContextCacheReset",
    "InvContextGlobal",
    "DmarFault",
    "DmarEnable",
    "SwitchAddressSpace",
    "NvmeMapPrp",
    "NvmeRead",
    "NvmeWrite",
    "NvmeIoCmd",
    "NvmeAdminCmd",
    "NvmeRwCb",
    "NvmeEnqueueReqCompletion",
    "NvmeCreateSq",
    "NvmeCreateCq",
    "NvmeError",
    "DmaBlkIo",
    "DmaBlkCb",
    "DmaComplete",
    "UnknownEvent",
    "MalformedEvent",
    "EVENT_CLASSES",
    "TRACE_EVENTS",
    # virtio-iommu
    "VIRTIO_IOMMU_MAP_F_READ",
    "VIRTIO_IOMMU_MAP_F_WRITE",
    "VIRTIO_IOMMU_MAP_F_MMIO",
    "u32",
    "VirtioIommuEvent",
    "VirtioIommuDeviceReset",
    "VirtioIommuSystemReset",
    "VirtioIommuGetConfig",
    "VirtioIommuSetConfig",
    "VirtioIommuAttach",
    "VirtioIommuDetach",
    "VirtioIommuMap",
    "VirtioIommuUnmap",
    "VirtioIommuUnmapDone",
    "VirtioIommuTranslate",
    "VirtioIommuTranslateOut",
    "VirtioIommuReportFault",
    "VirtioIommuGetDomain",
    "VirtioIommuPutDomain",
    "VirtioIommuGetEndpoint",
    "VirtioIommuPutEndpoint",
    "VirtioIommuSwitchAddressSpace",
    "VirtioIommuFillResvProperty",
    "VIRTIO_IOMMU_EVENT_CLASSES",
    # virtio-blk, virtio-net and VT-d descriptors
    "VTD_INV_DESC_DEVICE",
    "VtdInvDesc",
    "VirtioEvent",
    "VirtioQueueNotify",
    "VirtqueueAllocElement",
    "VirtqueuePop",
    "VirtioBlkHandleWrite",
    "VirtioBlkHandleRead",
    "VirtioBlkReqComplete",
    "VirtioBlkRwComplete",
    "VIRTIO_EVENT_CLASSES",
]

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
SLPTE_ADDR_MASK: Final = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
"""Bits 12..51 of a second-level PTE: the guest-physical frame address."""
SLPTE_READ: Final = 1
SLPTE_WRITE: Final = 2
VTD_AM_MAX: Final = 63
"""Largest address mask a 6-bit ``AM`` field can hold (the parser's bound)."""

VTD_FAULT_REASONS: Final[dict[int, str]] = {
    1: "root entry not present",
    2: "context entry not present",
    3: "invalid context entry",
    4: "address beyond MGAW",
    5: "no write permission",
    6: "no read permission",
    7: "paging entry invalid (unreadable)",
    8: "root table invalid",
    9: "context table invalid",
    10: "root entry reserved bits",
    11: "context entry reserved bits",
    12: "paging entry reserved bits",
    13: "context entry translation type",
    0xE: "output address in interrupt range",
}
"""``VTDFaultReason`` of QEMU 7.2 hw/i386/intel_iommu_internal.h (DMAR part)."""

_PERM_NAMES: Final = ("--", "r-", "-w", "rw")

# QEMU prints "%d@%zu.%06zu:" (thread id, seconds, microseconds); the digit
# counts are bounded so that no consumer ever converts an unbounded number.
_TS_PREFIX: Final = re.compile(r"([0-9]{1,10})@([0-9]{1,20})\.([0-9]{1,9}):")

NO_FAMILY: Final = "?"
"""Family of a line whose event name could not be read (see :func:`event_family`)."""

_FAMILY_PREFIXES: Final = ("pci_nvme", "vtd", "dma", "virtio", "amdvi", "vfio", "vhost")


def event_family(name: str | None) -> str:
    """The family of a trace event name: the subsystem prefix the checkers
    depend on as a whole.

    ``vtd_*`` -> ``"vtd"``, ``pci_nvme_*`` -> ``"pci_nvme"``, ``dma_*``
    (``dma_blk_io``, ``dma_blk_cb``, ``dma_complete``) -> ``"dma"``,
    ``virtio_*`` -> ``"virtio"``; any other name -> the text before its
    first ``_``; no name (None or "") -> :data:`NO_FAMILY`.
    """
    if not name:
        return NO_FAMILY
    for prefix in _FAMILY_PREFIXES:
        if name.startswith(prefix) and name[len(prefix) : len(prefix) + 1] in ("_", ""):
            return prefix
    head, _, _ = name.partition("_")
    return head


def slpte_gpa(slpte: int) -> int:
    """Guest-physical byte address of the page a leaf SLPTE points to (bits 12..51).

    This is the page base for the entry's own page size (4 KiB, 2 MiB or
    1 GiB); QEMU's ``vtd_get_slpte_addr`` masks with the guest address width
    instead of bit 51, which is the same for any entry that walked without a
    reserved-bit fault.
    """
    return slpte & SLPTE_ADDR_MASK


def slpte_perm(slpte: int) -> int:
    """Permission bits of a SLPTE as ``VHOST_MAP_*`` bits: 1 read, 2 write, 3 both."""
    return slpte & 3


def make_sid(bus: int, slot: int, func: int) -> int:
    """PCI source id (requester id) ``bus << 8 | slot << 3 | func``."""
    return (bus << 8) | (slot << 3) | func


def perm_name(perm: int) -> str:
    """``"rw"``, ``"r-"``, ``"-w"`` or ``"--"`` for permission bits 0..3."""
    return _PERM_NAMES[perm & 3]


# --------------------------------------------------------------------------
# Field formats
# --------------------------------------------------------------------------

ArgKind = Literal["hex", "uint", "int", "flag", "ptr", "text"]


@dataclass(frozen=True, slots=True)
class Arg:
    """How one trace argument is printed and how wide its value is.

    ``kind``: ``"hex"`` (hex digits; the ``0x`` is part of the event's
    ``FORMAT``), ``"uint"`` / ``"int"`` (unsigned / signed decimal),
    ``"flag"`` (a C ``bool`` printed ``%d``: ``0`` or ``1``), ``"ptr"``
    (``%p``: ``0x...`` or glibc's ``(nil)``, 64 bits), ``"text"`` (``%s``).
    ``bits``: the width of the value in the spec it comes from.
    ``pad``: the printed minimum width (2 for ``%02x``), so that the leading
    zeros QEMU pads a narrow value with are accepted.
    ``optional``: the value may be absent from the line (the field is None).

    A value is accepted only if it fits: ``0 <= v < 2**bits`` (unsigned),
    ``-2**(bits-1) <= v < 2**(bits-1)`` (signed), written with no more digits
    than the width needs (or ``pad``): no unbounded number is ever converted.
    QEMU never prints more (``PRIx64`` does not pad).
    """

    kind: ArgKind
    bits: int = 0
    optional: bool = False
    pad: int = 0

    def __post_init__(self) -> None:
        if self.kind in ("hex", "uint", "int") and not 0 < self.bits <= 64:
            raise ValueError(f"Arg({self.kind!r}): bits must be 1..64, not {self.bits}")

    @property
    def min(self) -> int:
        """Smallest accepted value (integers)."""
        return -(1 << (self.bits - 1)) if self.kind == "int" else 0

    @property
    def max(self) -> int:
        """Largest accepted value (integers; 1 for a flag, 2**64-1 for a pointer)."""
        if self.kind == "int":
            return (1 << (self.bits - 1)) - 1
        if self.kind == "flag":
            return 1
        if self.kind == "ptr":
            return (1 << 64) - 1
        return (1 << self.bits) - 1

    @property
    def needs_range_check(self) -> bool:
        """True when the pattern alone does not bound the value (decimals)."""
        return self.kind in ("uint", "int")

    def pattern(self) -> str:
        """Regular expression of the printed value, with exactly one group.

        Hex patterns bound the value exactly (the top digit is limited when
        ``bits`` is not a multiple of 4); decimal patterns bound the number
        of digits, and the parser checks the range.
        """
        kind = self.kind
        if kind == "hex":
            digits, rest = divmod(self.bits, 4)
            width = digits + (rest > 0)
            zeros = f"0{{0,{self.pad - width}}}" if self.pad > width else ""
            count = f"{{1,{digits}}}" if digits > 1 else ""
            if rest == 0:
                return f"({zeros}[0-9a-fA-F]{count})"
            top = f"[0-{(1 << rest) - 1}]"
            if digits == 0:
                return f"({zeros}{top})"
            return f"({zeros}{top}?[0-9a-fA-F]{count})"
        if kind == "uint":
            return f"([0-9]{{1,{len(str(self.max))}}})"
        if kind == "int":
            return f"(-?[0-9]{{1,{len(str(self.max))}}})"
        if kind == "flag":
            return "([01])"
        if kind == "ptr":
            return r"(\(nil\)|0x[0-9a-fA-F]{1,16})"
        return "(.*)"

    def describe(self) -> str:
        """What the field holds, for messages: ``"hex, 6 bits: 0x0..0x3f"``,
        ``"decimal, 16 bits: 0..65535"``, ``"0 or 1"``..."""
        kind = self.kind
        if kind == "text":
            return "string"
        if kind == "flag":
            return "0 or 1"
        if kind == "ptr":
            return "pointer, 64 bits"
        if kind == "hex":
            return f"hex, {self.bits} bits: 0x0..{self.max:#x}"
        sign = "signed " if kind == "int" else ""
        return f"{sign}decimal, {self.bits} bits: {self.min}..{self.max}"

    def show(self, text: str) -> str:
        """The printed value ``text`` as it appears on the line (``0x`` before hex
        digits), cut to 40 characters."""
        if self.kind == "hex":
            text = "0x" + text
        return text if len(text) <= 40 else text[:37] + "..."


X3: TypeAlias = Annotated[int, Arg("hex", 3, pad=2)]
X5: TypeAlias = Annotated[int, Arg("hex", 5, pad=2)]
X6: TypeAlias = Annotated[int, Arg("hex", 6)]
X8: TypeAlias = Annotated[int, Arg("hex", 8)]
X16: TypeAlias = Annotated[int, Arg("hex", 16)]
X32: TypeAlias = Annotated[int, Arg("hex", 32)]
X64: TypeAlias = Annotated[int, Arg("hex", 64)]
OptX32: TypeAlias = Annotated[int | None, Arg("hex", 32, optional=True)]
U8: TypeAlias = Annotated[int, Arg("uint", 8)]
U16: TypeAlias = Annotated[int, Arg("uint", 16)]
U32: TypeAlias = Annotated[int, Arg("uint", 32)]
U64: TypeAlias = Annotated[int, Arg("uint", 64)]
S32: TypeAlias = Annotated[int, Arg("int", 32)]
S64: TypeAlias = Annotated[int, Arg("int", 64)]
Flag: TypeAlias = Annotated[bool, Arg("flag", 1)]
Ptr: TypeAlias = Annotated[int, Arg("ptr", 64)]
Text: TypeAlias = Annotated[str, Arg("text")]


# --------------------------------------------------------------------------
# Base classes
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One trace line.  ``lineno`` is 1-based; ``raw`` is the line without newline."""

    NAME: ClassVar[str] = ""
    FORMAT: ClassVar[str | None] = None
    """Regular expression of the argument text, ``{field}`` for each field
    (None: not a fixed-format event)."""
    IS_VTD: ClassVar[bool] = False

    lineno: int
    raw: str

    @property
    def name(self) -> str:
        """The trace event name (``vtd_dmar_translate`` ...)."""
        return self.NAME

    @property
    def pid(self) -> int | None:
        """QEMU's thread id from a ``PID@SEC.USEC:`` prefix, or None without one."""
        m = _TS_PREFIX.match(self.raw)
        return int(m.group(1)) if m else None

    @property
    def timestamp(self) -> float | None:
        """Seconds (wall clock) from a ``PID@SEC.USEC:`` prefix, or None without one."""
        m = _TS_PREFIX.match(self.raw)
        if not m:
            return None
        return int(m.group(2)) + int(m.group(3)) / 1_000_000


@dataclass(frozen=True, slots=True)
class VtdEvent(Event):
    """Base of the intel-iommu (``vtd_*``) events."""

    IS_VTD: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class NvmeEvent(Event):
    """Base of the NVMe controller (``pci_nvme_*``) events."""


@dataclass(frozen=True, slots=True)
class DmaEvent(Event):
    """Base of QEMU's dma-helpers events (system/dma-helpers.c: block DMA through
    a scatter-gather list, as hw/nvme uses for PRP-described data)."""


# --------------------------------------------------------------------------
# VT-d (hw/i386/intel_iommu.c; widths from hw/i386/trace-events)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _IotlbEntryEvent(VtdEvent):
    sid: X16
    iova: X64
    slpte: X64
    domain: X16
    pasid: OptX32 = None
    """Only in QEMU versions that print it (not 7.2)."""

    @property
    def gpa(self) -> int:
        """Guest-physical base of the leaf page (:func:`slpte_gpa`)."""
        return self.slpte & SLPTE_ADDR_MASK

    @property
    def perm(self) -> int:
        """Leaf permission bits (:func:`slpte_perm`)."""
        return self.slpte & 3

    @property
    def bus(self) -> int:
        return self.sid >> 8

    @property
    def devfn(self) -> int:
        return self.sid & 0xFF


@dataclass(frozen=True, slots=True)
class IotlbPageUpdate(_IotlbEntryEvent):
    """``vtd_iotlb_page_update``: a page walk succeeded and its leaf SLPTE is
    being cached (``vtd_update_iotlb``); ``iova`` is the unaligned address."""

    NAME: ClassVar[str] = "vtd_iotlb_page_update"
    FORMAT: ClassVar[str | None] = (
        r"IOTLB page update sid 0x{sid} iova 0x{iova} (?:sl)?pte 0x{slpte} domain 0x{domain}"
        r"(?:,? pasid 0x{pasid})?"
    )


@dataclass(frozen=True, slots=True)
class IotlbPageHit(_IotlbEntryEvent):
    """``vtd_iotlb_page_hit``: the IOTLB answered (``vtd_do_iommu_translate``);
    ``slpte`` and ``domain`` are those of the cached entry."""

    NAME: ClassVar[str] = "vtd_iotlb_page_hit"
    FORMAT: ClassVar[str | None] = (
        r"IOTLB page hit sid 0x{sid} iova 0x{iova} (?:sl)?pte 0x{slpte} domain 0x{domain}"
        r"(?:,? pasid 0x{pasid})?"
    )


@dataclass(frozen=True, slots=True)
class _DevEvent(VtdEvent):
    bus: X8
    slot: X5
    """PCI slot (device number), 5 bits."""
    func: X3
    """PCI function, 3 bits."""

    @property
    def devfn(self) -> int:
        return (self.slot << 3) | self.func

    @property
    def sid(self) -> int:
        """Source id ``bus << 8 | slot << 3 | func``."""
        return (self.bus << 8) | (self.slot << 3) | self.func


@dataclass(frozen=True, slots=True)
class DmarTranslate(_DevEvent):
    """``vtd_dmar_translate``: one successful device translation
    (``vtd_iommu_translate``).  ``iova`` and ``gpa`` are page-aligned,
    ``mask`` is the page's byte offset mask."""

    NAME: ClassVar[str] = "vtd_dmar_translate"
    FORMAT: ClassVar[str | None] = (
        r"dev {bus}:{slot}\.{func} iova 0x{iova} -> gpa 0x{gpa} mask 0x{mask}"
    )
    iova: X64
    gpa: X64
    mask: X64

    @property
    def page_size(self) -> int:
        """Bytes covered by this translation (``mask + 1``)."""
        return self.mask + 1


@dataclass(frozen=True, slots=True)
class SwitchAddressSpace(_DevEvent):
    """``vtd_switch_address_space``: the device now DMAs through the IOMMU
    region (``enabled``) or directly to memory (DMAR off or passthrough fast path)."""

    NAME: ClassVar[str] = "vtd_switch_address_space"
    FORMAT: ClassVar[str | None] = (
        r"Device {bus}:{slot}\.{func} switching address space \(iommu enabled={enabled}\)"
    )
    enabled: Flag


@dataclass(frozen=True, slots=True)
class TranslatePassthrough(VtdEvent):
    """``vtd_translate_pt``: the context entry is pass-through; the next
    translate of ``sid`` is the identity for the 4 KiB page ``iova``."""

    NAME: ClassVar[str] = "vtd_translate_pt"
    FORMAT: ClassVar[str | None] = r"source id 0x{sid}, iova 0x{iova}"
    sid: X16
    iova: X64


@dataclass(frozen=True, slots=True)
class InvIotlbPages(VtdEvent):
    """``vtd_inv_desc_iotlb_pages``: page-selective IOTLB invalidation of
    ``2**am`` 4 KiB pages at ``addr`` in ``domain`` (``vtd_iotlb_page_invalidate``).
    ``am`` is the 6-bit descriptor field (at most :data:`VTD_AM_MAX`)."""

    NAME: ClassVar[str] = "vtd_inv_desc_iotlb_pages"
    FORMAT: ClassVar[str | None] = (
        r"iotlb invalidate domain 0x{domain} addr 0x{addr} mask 0x{am}(?:,? pasid 0x{pasid})?"
    )
    domain: X16
    addr: X64
    am: X6
    pasid: OptX32 = None

    @property
    def pages(self) -> int:
        """Number of 4 KiB pages, ``2**am``."""
        return 1 << self.am

    @property
    def size(self) -> int:
        """Bytes covered, ``4096 * 2**am``."""
        return PAGE_SIZE << self.am

    @property
    def start(self) -> int:
        """First IO-virtual byte: ``addr`` aligned down to ``size`` (QEMU's gfn & mask)."""
        return ((self.addr >> PAGE_SHIFT) & ~((1 << self.am) - 1)) << PAGE_SHIFT

    @property
    def last(self) -> int:
        """Last IO-virtual byte covered (inclusive)."""
        return self.start + (PAGE_SIZE << self.am) - 1


@dataclass(frozen=True, slots=True)
class InvIotlbPasidPages(InvIotlbPages):
    """``vtd_inv_desc_iotlb_pasid_pages`` (PASID-based, not emitted by 7.2)."""

    NAME: ClassVar[str] = "vtd_inv_desc_iotlb_pasid_pages"
    FORMAT: ClassVar[str | None] = (
        r"iotlb invalidate domain 0x{domain} addr 0x{addr} mask 0x{am},? pasid 0x{pasid}"
    )


@dataclass(frozen=True, slots=True)
class InvIotlbDomain(VtdEvent):
    """``vtd_inv_desc_iotlb_domain``: every IOTLB entry of ``domain`` (``vtd_iotlb_domain_invalidate``)."""

    NAME: ClassVar[str] = "vtd_inv_desc_iotlb_domain"
    FORMAT: ClassVar[str | None] = r"iotlb invalidate whole domain 0x{domain}"
    domain: X16


@dataclass(frozen=True, slots=True)
class InvIotlbPasid(VtdEvent):
    """``vtd_inv_desc_iotlb_pasid`` (PASID-based, not emitted by 7.2)."""

    NAME: ClassVar[str] = "vtd_inv_desc_iotlb_pasid"
    FORMAT: ClassVar[str | None] = r"iotlb invalidate domain 0x{domain},? pasid 0x{pasid}"
    domain: X16
    pasid: X32


@dataclass(frozen=True, slots=True)
class InvIotlbGlobal(VtdEvent):
    """``vtd_inv_desc_iotlb_global``: the whole IOTLB (``vtd_iotlb_global_invalidate``)."""

    NAME: ClassVar[str] = "vtd_inv_desc_iotlb_global"
    FORMAT: ClassVar[str | None] = r"iotlb invalidate global"


@dataclass(frozen=True, slots=True)
class IotlbReset(VtdEvent):
    """``vtd_iotlb_reset``: the whole IOTLB is dropped, e.g. ``reason`` =
    ``"iotlb exceeds size limit"`` (``vtd_update_iotlb``, printed after the
    ``vtd_iotlb_page_update`` whose entry is inserted after the reset)."""

    NAME: ClassVar[str] = "vtd_iotlb_reset"
    FORMAT: ClassVar[str | None] = r"IOTLB reset \(reason: {reason}\)"
    reason: Text


@dataclass(frozen=True, slots=True)
class ContextCacheReset(VtdEvent):
    """``vtd_context_cache_reset`` (``vtd_reset_context_cache_locked``)."""

    NAME: ClassVar[str] = "vtd_context_cache_reset"
    FORMAT: ClassVar[str | None] = r""


@dataclass(frozen=True, slots=True)
class InvContextGlobal(VtdEvent):
    """``vtd_inv_desc_cc_global`` (``vtd_context_global_invalidate``)."""

    NAME: ClassVar[str] = "vtd_inv_desc_cc_global"
    FORMAT: ClassVar[str | None] = r"context invalidate globally"


@dataclass(frozen=True, slots=True)
class DmarFault(VtdEvent):
    """``vtd_dmar_fault``: a translation fault was reported (``vtd_report_dmar_fault``).
    ``fault`` is the ``VTDFaultReason`` (the 8-bit FR field of a fault record)."""

    NAME: ClassVar[str] = "vtd_dmar_fault"
    FORMAT: ClassVar[str | None] = r"sid 0x{sid} fault {fault} addr 0x{addr} write {write}"
    sid: X16
    fault: U8
    addr: X64
    write: Flag

    @property
    def reason(self) -> str:
        """Human name of the ``VTDFaultReason``."""
        return VTD_FAULT_REASONS.get(self.fault, f"fault reason {self.fault:#x}")


@dataclass(frozen=True, slots=True)
class DmarEnable(VtdEvent):
    """``vtd_dmar_enable``: GCMD.TE changed (``vtd_handle_gcmd_te``)."""

    NAME: ClassVar[str] = "vtd_dmar_enable"
    FORMAT: ClassVar[str | None] = r"enable {enable}"
    enable: Flag


# --------------------------------------------------------------------------
# NVMe (hw/nvme/ctrl.c; widths from hw/nvme/trace-events)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NvmeMapPrp(NvmeEvent):
    """``pci_nvme_map_prp``: PRP mapping of a data transfer; ``prp1``/``prp2`` are IOVAs."""

    NAME: ClassVar[str] = "pci_nvme_map_prp"
    FORMAT: ClassVar[str | None] = (
        r"trans_len {trans_len} len {len} prp1 0x{prp1} prp2 0x{prp2} num_prps {num_prps}"
    )
    trans_len: U64
    len: U32
    prp1: X64
    prp2: X64
    num_prps: S32


@dataclass(frozen=True, slots=True)
class NvmeRead(NvmeEvent):
    """``pci_nvme_read``: ``nlb`` blocks (``count`` bytes) from ``lba``."""

    NAME: ClassVar[str] = "pci_nvme_read"
    FORMAT: ClassVar[str | None] = r"cid {cid} nsid {nsid} nlb {nlb} count {count} lba 0x{lba}"
    cid: U16
    nsid: U32
    nlb: U32
    count: U64
    lba: X64


@dataclass(frozen=True, slots=True)
class NvmeWrite(NvmeEvent):
    """``pci_nvme_write``: ``opname`` is "write" or "write zeroes"."""

    NAME: ClassVar[str] = "pci_nvme_write"
    FORMAT: ClassVar[str | None] = (
        r"cid {cid} opname '{opname}' nsid {nsid} nlb {nlb} count {count} lba 0x{lba}"
    )
    cid: U16
    opname: Text
    nsid: U32
    nlb: U32
    count: U64
    lba: X64


@dataclass(frozen=True, slots=True)
class NvmeIoCmd(NvmeEvent):
    NAME: ClassVar[str] = "pci_nvme_io_cmd"
    FORMAT: ClassVar[str | None] = r"cid {cid} nsid 0x{nsid} sqid {sqid} opc 0x{opc} opname '{opname}'"
    cid: U16
    nsid: X32
    sqid: U16
    opc: X8
    opname: Text


@dataclass(frozen=True, slots=True)
class NvmeAdminCmd(NvmeEvent):
    NAME: ClassVar[str] = "pci_nvme_admin_cmd"
    FORMAT: ClassVar[str | None] = r"cid {cid} sqid {sqid} opc 0x{opc} opname '{opname}'"
    cid: U16
    sqid: U16
    opc: X8
    opname: Text


@dataclass(frozen=True, slots=True)
class NvmeRwCb(NvmeEvent):
    NAME: ClassVar[str] = "pci_nvme_rw_cb"
    FORMAT: ClassVar[str | None] = r"cid {cid} blk '{blk}'"
    cid: U16
    blk: Text


@dataclass(frozen=True, slots=True)
class NvmeEnqueueReqCompletion(NvmeEvent):
    NAME: ClassVar[str] = "pci_nvme_enqueue_req_completion"
    FORMAT: ClassVar[str | None] = (
        r"cid {cid} cqid {cqid} dw0 0x{dw0} dw1 0x{dw1} status 0x{status}"
    )
    cid: U16
    cqid: U16
    dw0: X32
    dw1: X32
    status: X16


@dataclass(frozen=True, slots=True)
class NvmeCreateSq(NvmeEvent):
    """``pci_nvme_create_sq``: ``addr`` is the queue's IOVA."""

    NAME: ClassVar[str] = "pci_nvme_create_sq"
    FORMAT: ClassVar[str | None] = (
        r"create submission queue, addr=0x{addr}, sqid={sqid}, cqid={cqid}, "
        r"qsize={qsize}, qflags={qflags}"
    )
    addr: X64
    sqid: U16
    cqid: U16
    qsize: U16
    qflags: U16


@dataclass(frozen=True, slots=True)
class NvmeCreateCq(NvmeEvent):
    """``pci_nvme_create_cq``: ``addr`` is the queue's IOVA."""

    NAME: ClassVar[str] = "pci_nvme_create_cq"
    FORMAT: ClassVar[str | None] = (
        r"create completion queue, addr=0x{addr}, cqid={cqid}, vector={vector}, "
        r"qsize={qsize}, qflags={qflags}, ien={ien}"
    )
    addr: X64
    cqid: U16
    vector: U16
    qsize: U16
    qflags: U16
    ien: S32


@dataclass(frozen=True, slots=True)
class NvmeError(NvmeEvent):
    """Any ``pci_nvme_err_*`` event; ``text`` is its argument text as printed."""

    trace_name: str
    text: str

    @property
    def name(self) -> str:
        return self.trace_name


# --------------------------------------------------------------------------
# dma-helpers (system/dma-helpers.c; widths from trace-events)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmaBlkIo(DmaEvent):
    """``dma_blk_io``: a block request starts; ``to_dev`` True means the device reads
    guest memory (a disk write), False that it writes guest memory (a disk read).
    ``dbs`` identifies the request (a host pointer) in later events."""

    NAME: ClassVar[str] = "dma_blk_io"
    FORMAT: ClassVar[str | None] = r"dbs={dbs} bs={bs} offset={offset} to_dev={to_dev}"
    dbs: Ptr
    bs: Ptr
    offset: S64
    to_dev: Flag


@dataclass(frozen=True, slots=True)
class DmaBlkCb(DmaEvent):
    """``dma_blk_cb``: the request's next step; it maps the rest of its
    scatter-gather list (``dma_memory_map``, one IOMMU translation a page)
    before the next trace event."""

    NAME: ClassVar[str] = "dma_blk_cb"
    FORMAT: ClassVar[str | None] = r"dbs={dbs} ret={ret}"
    dbs: Ptr
    ret: S32


@dataclass(frozen=True, slots=True)
class DmaComplete(DmaEvent):
    """``dma_complete``: the request is done (its mappings are released)."""

    NAME: ClassVar[str] = "dma_complete"
    FORMAT: ClassVar[str | None] = r"dbs={dbs} ret={ret} cb={cb}"
    dbs: Ptr
    ret: S32
    cb: Ptr


# --------------------------------------------------------------------------
# virtio-iommu (hw/virtio/virtio-iommu.c; formats from hw/virtio/trace-events
# of QEMU 7.2).  Domain and endpoint ids are uint32_t printed ``%d``: an id
# of 2**31 or more prints negative (``u32`` gives the id back).  Endpoint ids
# of PCI devices are source ids (``bus << 8 | devfn``).  Addresses: ``virt_*``
# and ``addr`` are IO-virtual, ``phys_start`` and the translation's output
# guest-physical; ``virt_end`` is inclusive.
# --------------------------------------------------------------------------

VIRTIO_IOMMU_MAP_F_READ: Final = 1
VIRTIO_IOMMU_MAP_F_WRITE: Final = 2
VIRTIO_IOMMU_MAP_F_MMIO: Final = 4
"""``flags`` bits of a MAP request (include/standard-headers/linux/virtio_iommu.h)."""


def u32(value: int) -> int:
    """A ``uint32_t`` printed with ``%d`` (domain and endpoint ids) as its unsigned value."""
    return value & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class VirtioIommuEvent(Event):
    """Base of the virtio-iommu (``virtio_iommu_*``) events."""


@dataclass(frozen=True, slots=True)
class VirtioIommuDeviceReset(VirtioIommuEvent):
    """``virtio_iommu_device_reset``: the virtio device was reset (driver or system):
    QEMU drops every domain and endpoint (``virtio_iommu_device_reset``)."""

    NAME: ClassVar[str] = "virtio_iommu_device_reset"
    FORMAT: ClassVar[str | None] = r"reset!"


@dataclass(frozen=True, slots=True)
class VirtioIommuSystemReset(VirtioIommuEvent):
    """``virtio_iommu_system_reset``: machine reset; ``config.bypass`` goes back to
    the ``boot-bypass`` property."""

    NAME: ClassVar[str] = "virtio_iommu_system_reset"
    FORMAT: ClassVar[str | None] = r"system reset!"


@dataclass(frozen=True, slots=True)
class VirtioIommuGetConfig(VirtioIommuEvent):
    """``virtio_iommu_get_config``: the driver read the config space; ``bypass`` is
    the global bypass bit (VIRTIO_IOMMU_F_BYPASS_CONFIG)."""

    NAME: ClassVar[str] = "virtio_iommu_get_config"
    FORMAT: ClassVar[str | None] = (
        r"page_size_mask=0x{page_size_mask} input range start=0x{input_start} input range end=0x{input_end} "
        r"domain range start={domain_start} domain range end={domain_end} probe_size=0x{probe_size} "
        r"bypass=0x{bypass}"
    )
    page_size_mask: X64
    input_start: X64
    input_end: X64
    domain_start: S32
    domain_end: S32
    probe_size: X32
    bypass: X8


@dataclass(frozen=True, slots=True)
class VirtioIommuSetConfig(VirtioIommuEvent):
    """``virtio_iommu_set_config``: the driver wrote the bypass bit."""

    NAME: ClassVar[str] = "virtio_iommu_set_config"
    FORMAT: ClassVar[str | None] = r"bypass=0x{bypass}"
    bypass: X8


@dataclass(frozen=True, slots=True)
class _DomainEndpointEvent(VirtioIommuEvent):
    FORMAT: ClassVar[str | None] = r"domain={domain} endpoint={endpoint}"
    domain: S32
    endpoint: S32


@dataclass(frozen=True, slots=True)
class VirtioIommuAttach(_DomainEndpointEvent):
    """``virtio_iommu_attach``: an ATTACH request, traced on arrival (before QEMU
    checks its flags or the endpoint)."""

    NAME: ClassVar[str] = "virtio_iommu_attach"


@dataclass(frozen=True, slots=True)
class VirtioIommuDetach(_DomainEndpointEvent):
    """``virtio_iommu_detach``: a DETACH request, traced on arrival."""

    NAME: ClassVar[str] = "virtio_iommu_detach"


@dataclass(frozen=True, slots=True)
class VirtioIommuMap(VirtioIommuEvent):
    """``virtio_iommu_map``: a MAP request QEMU accepted: traced only after the
    flags, the domain and the overlap checks passed, just before the mapping
    ``[virt_start, virt_end] -> phys_start`` is inserted (``virtio_iommu_map``)."""

    NAME: ClassVar[str] = "virtio_iommu_map"
    FORMAT: ClassVar[str | None] = (
        r"domain={domain} virt_start=0x{virt_start} virt_end=0x{virt_end} phys_start=0x{phys_start} flags={flags}"
    )
    domain: S32
    virt_start: X64
    virt_end: X64
    phys_start: X64
    flags: S32


@dataclass(frozen=True, slots=True)
class VirtioIommuUnmap(VirtioIommuEvent):
    """``virtio_iommu_unmap``: an UNMAP request of ``[virt_start, virt_end]``,
    traced on arrival (before the domain check)."""

    NAME: ClassVar[str] = "virtio_iommu_unmap"
    FORMAT: ClassVar[str | None] = r"domain={domain} virt_start=0x{virt_start} virt_end=0x{virt_end}"
    domain: S32
    virt_start: X64
    virt_end: X64


@dataclass(frozen=True, slots=True)
class VirtioIommuUnmapDone(VirtioIommuUnmap):
    """``virtio_iommu_unmap_done``: one whole mapping ``[virt_start, virt_end]``
    removed by the UNMAP request just traced."""

    NAME: ClassVar[str] = "virtio_iommu_unmap_done"


@dataclass(frozen=True, slots=True)
class VirtioIommuTranslate(VirtioIommuEvent):
    """``virtio_iommu_translate``: a device access to ``addr`` (unaligned iova)
    by requester ``rid`` with access ``flag`` (IOMMUAccessFlags: 1 read, 2 write,
    3 both); traced before any lookup, for every outcome."""

    NAME: ClassVar[str] = "virtio_iommu_translate"
    FORMAT: ClassVar[str | None] = r"mr={mr} rid={rid} addr=0x{addr} flag={flag}"
    mr: Text
    rid: S32
    addr: X64
    flag: U8


@dataclass(frozen=True, slots=True)
class VirtioIommuTranslateOut(VirtioIommuEvent):
    """``virtio_iommu_translate_out``: the access of the translate event just
    before it was translated through a mapping: ``addr`` (iova) -> ``gpa``
    (both unaligned).  Not traced for bypass, reserved regions or faults."""

    NAME: ClassVar[str] = "virtio_iommu_translate_out"
    FORMAT: ClassVar[str | None] = r"0x{addr} -> 0x{gpa} for sid={sid}"
    addr: X64
    gpa: X64
    sid: S32


@dataclass(frozen=True, slots=True)
class VirtioIommuReportFault(VirtioIommuEvent):
    """``virtio_iommu_report_fault``: a fault written to the event queue
    (``reason``: 1 unknown endpoint, 2 domain, 3 mapping; ``flags``: 1 read,
    2 write, 4 exec, 0x100 address valid).  A fault with no event buffer free
    is not traced."""

    NAME: ClassVar[str] = "virtio_iommu_report_fault"
    FORMAT: ClassVar[str | None] = r"FAULT reason={reason} flags={flags} endpoint={endpoint} address =0x{address}"
    reason: S32
    flags: S32
    endpoint: S32
    address: X64


@dataclass(frozen=True, slots=True)
class VirtioIommuGetDomain(VirtioIommuEvent):
    """``virtio_iommu_get_domain``: a domain created by an ATTACH."""

    NAME: ClassVar[str] = "virtio_iommu_get_domain"
    FORMAT: ClassVar[str | None] = r"Alloc domain={domain}"
    domain: S32


@dataclass(frozen=True, slots=True)
class VirtioIommuPutDomain(VirtioIommuEvent):
    """``virtio_iommu_put_domain``: a domain freed (its last endpoint detached, or reset)."""

    NAME: ClassVar[str] = "virtio_iommu_put_domain"
    FORMAT: ClassVar[str | None] = r"Free domain={domain}"
    domain: S32


@dataclass(frozen=True, slots=True)
class VirtioIommuGetEndpoint(VirtioIommuEvent):
    NAME: ClassVar[str] = "virtio_iommu_get_endpoint"
    FORMAT: ClassVar[str | None] = r"Alloc endpoint={endpoint}"
    endpoint: S32


@dataclass(frozen=True, slots=True)
class VirtioIommuPutEndpoint(VirtioIommuEvent):
    NAME: ClassVar[str] = "virtio_iommu_put_endpoint"
    FORMAT: ClassVar[str | None] = r"Free endpoint={endpoint}"
    endpoint: S32


@dataclass(frozen=True, slots=True)
class VirtioIommuSwitchAddressSpace(VirtioIommuEvent):
    """``virtio_iommu_switch_address_space``: device ``bus:slot.func`` now
    translates (``enabled``) or bypasses."""

    NAME: ClassVar[str] = "virtio_iommu_switch_address_space"
    FORMAT: ClassVar[str | None] = (
        r"Device {bus}:{slot}\.{func} switching address space \(iommu enabled={enabled}\)"
    )
    bus: X8
    slot: X5
    func: X3
    enabled: Flag

    @property
    def sid(self) -> int:
        return (self.bus << 8) | (self.slot << 3) | self.func


@dataclass(frozen=True, slots=True)
class VirtioIommuFillResvProperty(VirtioIommuEvent):
    """``virtio_iommu_fill_resv_property``: a reserved region reported to the driver
    in a PROBE reply for endpoint ``dev`` (``type`` 0 reserved, 1 MSI bypass),
    ``[start, end]`` inclusive."""

    NAME: ClassVar[str] = "virtio_iommu_fill_resv_property"
    FORMAT: ClassVar[str | None] = r"dev= {dev}, type={type} start=0x{start} end=0x{end}"
    dev: S32
    type: S32
    start: X64
    end: X64


VIRTIO_IOMMU_EVENT_CLASSES: Final[tuple[type[Event], ...]] = (
    VirtioIommuDeviceReset,
    VirtioIommuSystemReset,
    VirtioIommuGetConfig,
    VirtioIommuSetConfig,
    VirtioIommuAttach,
    VirtioIommuDetach,
    VirtioIommuMap,
    VirtioIommuUnmap,
    VirtioIommuUnmapDone,
    VirtioIommuTranslate,
    VirtioIommuTranslateOut,
    VirtioIommuReportFault,
    VirtioIommuGetDomain,
    VirtioIommuPutDomain,
    VirtioIommuGetEndpoint,
    VirtioIommuPutEndpoint,
    VirtioIommuSwitchAddressSpace,
    VirtioIommuFillResvProperty,
)
"""The virtio-iommu events the harness enables and parses."""


# --------------------------------------------------------------------------
# virtio devices (hw/virtio/virtio.c, hw/block/virtio-blk.c; formats from
# hw/virtio/trace-events and hw/block/trace-events of QEMU 7.2) and the VT-d
# invalidation descriptor event (hw/i386/intel_iommu.c vtd_process_inv_desc).
# Pointers (``vdev``, ``vq``, ``elem``, ``req``) identify objects within one
# run: a VirtIOBlockReq starts with its VirtQueueElement, so a virtio-blk
# ``req`` is the ``elem`` its ``virtqueue_pop`` returned.
# --------------------------------------------------------------------------

VTD_INV_DESC_DEVICE: Final = 0x3
"""Type of a device-TLB invalidation descriptor (``VTD_INV_DESC_DEVICE``,
hw/i386/intel_iommu_internal.h; ``QI_DIOTLB_TYPE`` in drivers/iommu/intel/iommu.h)."""


@dataclass(frozen=True, slots=True)
class VtdInvDesc(VtdEvent):
    """``vtd_inv_desc``: QEMU took one descriptor off the invalidation queue
    (``vtd_process_inv_desc``); ``type`` is QEMU's name for it (``cc``,
    ``iotlb``, ``wait``, ``iec``, ``device``...), ``high``/``low`` its two
    quadwords (qw1, qw0), traced before the descriptor is processed.

    A device-TLB invalidation (``type`` ``device``, ``low & 0xf`` = 3) asks
    the *device's* ATS translation cache to drop ``[dev_start, dev_last]``
    for source id ``dev_sid``; QEMU 7.2 (``vtd_process_device_iotlb_desc``)
    only notifies ``IOMMU_NOTIFIER_DEVIOTLB_UNMAP`` listeners (vhost): its own
    IOTLB is not touched."""

    NAME: ClassVar[str] = "vtd_inv_desc"
    FORMAT: ClassVar[str | None] = r"invalidate desc type {type} high 0x{high} low 0x{low}"
    type: Text
    high: X64
    low: X64

    @property
    def desc_type(self) -> int:
        """Descriptor type, ``low & 0xf`` (3: device-TLB)."""
        return self.low & 0xF

    @property
    def is_device_tlb(self) -> bool:
        return self.desc_type == VTD_INV_DESC_DEVICE

    @property
    def dev_sid(self) -> int:
        """Device-TLB descriptor: the source id of the device, ``low`` bits 47:32."""
        return (self.low >> 32) & 0xFFFF

    @property
    def dev_start(self) -> int:
        """Device-TLB descriptor: first IO-virtual byte of the range.  With the
        size bit (``high`` bit 0) the range is ``8 KiB << (trailing ones of
        addr >> 12)``, naturally aligned (QEMU's ``vtd_process_device_iotlb_desc``)."""
        return self.high & ~(self.dev_size - 1) & ~0xFFF

    @property
    def dev_size(self) -> int:
        """Device-TLB descriptor: bytes covered (4 KiB without the size bit)."""
        if not self.high & 1:
            return PAGE_SIZE
        ones = 0
        frame = self.high >> PAGE_SHIFT
        while frame & 1 and ones < 52:
            ones += 1
            frame >>= 1
        return (PAGE_SIZE * 2) << ones

    @property
    def dev_last(self) -> int:
        return self.dev_start + self.dev_size - 1


@dataclass(frozen=True, slots=True)
class VirtioEvent(Event):
    """Base of the virtio core and virtio-blk events."""


@dataclass(frozen=True, slots=True)
class VirtioQueueNotify(VirtioEvent):
    """``virtio_queue_notify``: the guest kicked queue ``n`` (``virtio_queue_notify``)."""

    NAME: ClassVar[str] = "virtio_queue_notify"
    FORMAT: ClassVar[str | None] = r"vdev {vdev} n {n} vq {vq}"
    vdev: Ptr
    n: S32
    vq: Ptr


@dataclass(frozen=True, slots=True)
class VirtqueueAllocElement(VirtioEvent):
    """``virtqueue_alloc_element``: ``virtqueue_split_pop`` / ``_packed_pop`` read
    every descriptor of a chain and mapped its buffers (``virtqueue_map_desc``:
    ``dma_memory_map``, one IOMMU translation a page) before this event."""

    NAME: ClassVar[str] = "virtqueue_alloc_element"
    FORMAT: ClassVar[str | None] = r"elem {elem} size {size} in_num {in_num} out_num {out_num}"
    elem: Ptr
    size: S64
    in_num: U32
    out_num: U32


@dataclass(frozen=True, slots=True)
class VirtqueuePop(VirtioEvent):
    """``virtqueue_pop``: the element is handed to the device model."""

    NAME: ClassVar[str] = "virtqueue_pop"
    FORMAT: ClassVar[str | None] = r"vq {vq} elem {elem} in_num {in_num} out_num {out_num}"
    vq: Ptr
    elem: Ptr
    in_num: U32
    out_num: U32


@dataclass(frozen=True, slots=True)
class _VirtioBlkRw(VirtioEvent):
    FORMAT: ClassVar[str | None] = r"vdev {vdev} req {req} sector {sector} nsectors {nsectors}"
    vdev: Ptr
    req: Ptr
    sector: U64
    """First 512-byte sector on the disk."""
    nsectors: U64
    """Length in 512-byte sectors (the request's data bytes / 512)."""


@dataclass(frozen=True, slots=True)
class VirtioBlkHandleWrite(_VirtioBlkRw):
    """``virtio_blk_handle_write``: a VIRTIO_BLK_T_OUT request (the device reads guest memory)."""

    NAME: ClassVar[str] = "virtio_blk_handle_write"


@dataclass(frozen=True, slots=True)
class VirtioBlkHandleRead(_VirtioBlkRw):
    """``virtio_blk_handle_read``: a VIRTIO_BLK_T_IN request (the device writes guest memory)."""

    NAME: ClassVar[str] = "virtio_blk_handle_read"


@dataclass(frozen=True, slots=True)
class VirtioBlkReqComplete(VirtioEvent):
    """``virtio_blk_req_complete``: the request's status is written and the element pushed."""

    NAME: ClassVar[str] = "virtio_blk_req_complete"
    FORMAT: ClassVar[str | None] = r"vdev {vdev} req {req} status {status}"
    vdev: Ptr
    req: Ptr
    status: S32


@dataclass(frozen=True, slots=True)
class VirtioBlkRwComplete(VirtioEvent):
    """``virtio_blk_rw_complete``: the block layer finished the request (``ret`` 0 or -errno)."""

    NAME: ClassVar[str] = "virtio_blk_rw_complete"
    FORMAT: ClassVar[str | None] = r"vdev {vdev} req {req} ret {ret}"
    vdev: Ptr
    req: Ptr
    ret: S32


VIRTIO_EVENT_CLASSES: Final[tuple[type[Event], ...]] = (
    VtdInvDesc,
    VirtioQueueNotify,
    VirtqueueAllocElement,
    VirtqueuePop,
    VirtioBlkHandleWrite,
    VirtioBlkHandleRead,
    VirtioBlkReqComplete,
    VirtioBlkRwComplete,
)
"""The virtio and VT-d descriptor events the virtio checks read."""


# --------------------------------------------------------------------------
# Lines the parser could not type
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnknownEvent(Event):
    """An event name the parser does not know, or a line that is not a trace
    line at all (``trace_name`` None, e.g. a QEMU warning in the ``-D`` file)."""

    trace_name: str | None
    text: str

    @property
    def name(self) -> str:
        return self.trace_name or ""

    @property
    def is_vtd(self) -> bool:
        return self.trace_name is not None and self.trace_name.startswith("vtd_")


@dataclass(frozen=True, slots=True)
class MalformedEvent(Event):
    """A line the parser could not type although it should have: a known event
    name whose arguments do not match its format or hold a value wider than
    its field (another QEMU version, a line cut short, corruption), or a line
    longer than the parser's limit.

    ``trace_name`` is the event name, or ``""`` when an over-long line's name
    could not be read; ``text`` the argument text (for an over-long line, a
    prefix of it; ``raw`` is then a prefix too); ``reason`` says what was
    wrong (empty when the arguments simply did not match the format).
    """

    trace_name: str
    text: str
    reason: str = ""

    @property
    def name(self) -> str:
        return self.trace_name

    @property
    def is_vtd(self) -> bool:
        return self.trace_name.startswith("vtd_")

    @property
    def family(self) -> str:
        """:func:`event_family` of the name (:data:`NO_FAMILY` if there is none)."""
        return event_family(self.trace_name)


EVENT_CLASSES: Final[tuple[type[Event], ...]] = (
    IotlbPageUpdate,
    IotlbPageHit,
    DmarTranslate,
    TranslatePassthrough,
    InvIotlbPages,
    InvIotlbPasidPages,
    InvIotlbDomain,
    InvIotlbPasid,
    InvIotlbGlobal,
    IotlbReset,
    ContextCacheReset,
    InvContextGlobal,
    DmarFault,
    DmarEnable,
    SwitchAddressSpace,
    NvmeMapPrp,
    NvmeRead,
    NvmeWrite,
    NvmeIoCmd,
    NvmeAdminCmd,
    NvmeRwCb,
    NvmeEnqueueReqCompletion,
    NvmeCreateSq,
    NvmeCreateCq,
    DmaBlkIo,
    DmaBlkCb,
    DmaComplete,
    *VIRTIO_IOMMU_EVENT_CLASSES,
    *VIRTIO_EVENT_CLASSES,
)
"""Every event class with a fixed trace name and ``FORMAT`` (not the catch-alls)."""

TRACE_EVENTS: Final[tuple[str, ...]] = tuple(cls.NAME for cls in EVENT_CLASSES) + (
    "pci_nvme_err_*",
)
"""Event-name patterns to enable with ``-trace events=FILE``: the specific
events above (not ``vtd_*``, which also enables per-register MMIO events)
plus every NVMe error event.  All exist in QEMU 7.2's trace-events."""
