"""Typed events of QEMU's ``log`` trace backend (QEMU 7.2, Debian bookworm).

Each trace line ``NAME ARGS`` (optionally prefixed by ``PID@SECONDS.USEC:``
when QEMU runs with ``-msg timestamp=on``) becomes one frozen, slotted
dataclass.  Every event carries ``lineno`` (1-based line number in the trace
file) and ``raw`` (the line without its newline); the other fields use the
names of the QEMU trace points (hw/i386/trace-events, hw/nvme/trace-events).

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
  invalidation covers ``2**am`` 4 KiB pages (printed as ``mask 0x%x``).
* ``sid``: PCI source id, ``bus << 8 | slot << 3 | func``.
* ``domain``: VT-d domain id.

Nothing in this module raises on trace input; see :mod:`harness.trace.parser`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Final

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "SLPTE_ADDR_MASK",
    "SLPTE_READ",
    "SLPTE_WRITE",
    "VTD_FAULT_REASONS",
    "slpte_gpa",
    "slpte_perm",
    "make_sid",
    "perm_name",
    "Event",
    "VtdEvent",
    "NvmeEvent",
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
    "UnknownEvent",
    "MalformedEvent",
    "EVENT_CLASSES",
    "TRACE_EVENTS",
]

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
SLPTE_ADDR_MASK: Final = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
"""Bits 12..51 of a second-level PTE: the guest-physical frame address."""
SLPTE_READ: Final = 1
SLPTE_WRITE: Final = 2

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

_TS_PREFIX: Final = re.compile(r"(\d+)@(\d+)\.(\d+):")


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
# Base classes
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One trace line.  ``lineno`` is 1-based; ``raw`` is the line without newline."""

    NAME: ClassVar[str] = ""
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


# --------------------------------------------------------------------------
# VT-d (hw/i386/intel_iommu.c)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _IotlbEntryEvent(VtdEvent):
    sid: int
    iova: int
    slpte: int
    domain: int
    pasid: int | None = None
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


@dataclass(frozen=True, slots=True)
class IotlbPageHit(_IotlbEntryEvent):
    """``vtd_iotlb_page_hit``: the IOTLB answered (``vtd_do_iommu_translate``);
    ``slpte`` and ``domain`` are those of the cached entry."""

    NAME: ClassVar[str] = "vtd_iotlb_page_hit"


@dataclass(frozen=True, slots=True)
class _DevEvent(VtdEvent):
    bus: int
    slot: int
    func: int

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
    iova: int
    gpa: int
    mask: int

    @property
    def page_size(self) -> int:
        """Bytes covered by this translation (``mask + 1``)."""
        return self.mask + 1


@dataclass(frozen=True, slots=True)
class SwitchAddressSpace(_DevEvent):
    """``vtd_switch_address_space``: the device now DMAs through the IOMMU
    region (``enabled``) or directly to memory (DMAR off or passthrough fast path)."""

    NAME: ClassVar[str] = "vtd_switch_address_space"
    enabled: bool


@dataclass(frozen=True, slots=True)
class TranslatePassthrough(VtdEvent):
    """``vtd_translate_pt``: the context entry is pass-through; the next
    translate of ``sid`` is the identity for the 4 KiB page ``iova``."""

    NAME: ClassVar[str] = "vtd_translate_pt"
    sid: int
    iova: int


@dataclass(frozen=True, slots=True)
class InvIotlbPages(VtdEvent):
    """``vtd_inv_desc_iotlb_pages``: page-selective IOTLB invalidation of
    ``2**am`` 4 KiB pages at ``addr`` in ``domain`` (``vtd_iotlb_page_invalidate``)."""

    NAME: ClassVar[str] = "vtd_inv_desc_iotlb_pages"
    domain: int
    addr: int
    am: int
    pasid: int | None = None

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


@dataclass(frozen=True, slots=True)
class InvIotlbDomain(VtdEvent):
    """``vtd_inv_desc_iotlb_domain``: every IOTLB entry of ``domain`` (``vtd_iotlb_domain_invalidate``)."""

    NAME: ClassVar[str] = "vtd_inv_desc_iotlb_domain"
    domain: int


@dataclass(frozen=True, slots=True)
class InvIotlbPasid(VtdEvent):
    """``vtd_inv_desc_iotlb_pasid`` (PASID-based, not emitted by 7.2)."""

    NAME: ClassVar[str] = "vtd_inv_desc_iotlb_pasid"
    domain: int
    pasid: int


@dataclass(frozen=True, slots=True)
class InvIotlbGlobal(VtdEvent):
    """``vtd_inv_desc_iotlb_global``: the whole IOTLB (``vtd_iotlb_global_invalidate``)."""

    NAME: ClassVar[str] = "vtd_inv_desc_iotlb_global"


@dataclass(frozen=True, slots=True)
class IotlbReset(VtdEvent):
    """``vtd_iotlb_reset``: the whole IOTLB is dropped, e.g. ``reason`` =
    ``"iotlb exceeds size limit"`` (``vtd_update_iotlb``, printed after the
    ``vtd_iotlb_page_update`` whose entry is inserted after the reset)."""

    NAME: ClassVar[str] = "vtd_iotlb_reset"
    reason: str


@dataclass(frozen=True, slots=True)
class ContextCacheReset(VtdEvent):
    """``vtd_context_cache_reset`` (``vtd_reset_context_cache_locked``)."""

    NAME: ClassVar[str] = "vtd_context_cache_reset"


@dataclass(frozen=True, slots=True)
class InvContextGlobal(VtdEvent):
    """``vtd_inv_desc_cc_global`` (``vtd_context_global_invalidate``)."""

    NAME: ClassVar[str] = "vtd_inv_desc_cc_global"


@dataclass(frozen=True, slots=True)
class DmarFault(VtdEvent):
    """``vtd_dmar_fault``: a translation fault was reported (``vtd_report_dmar_fault``)."""

    NAME: ClassVar[str] = "vtd_dmar_fault"
    sid: int
    fault: int
    addr: int
    write: bool

    @property
    def reason(self) -> str:
        """Human name of the ``VTDFaultReason``."""
        return VTD_FAULT_REASONS.get(self.fault, f"fault reason {self.fault:#x}")


@dataclass(frozen=True, slots=True)
class DmarEnable(VtdEvent):
    """``vtd_dmar_enable``: GCMD.TE changed (``vtd_handle_gcmd_te``)."""

    NAME: ClassVar[str] = "vtd_dmar_enable"
    enable: bool


# --------------------------------------------------------------------------
# NVMe (hw/nvme/ctrl.c)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NvmeMapPrp(NvmeEvent):
    """``pci_nvme_map_prp``: PRP mapping of a data transfer; ``prp1``/``prp2`` are IOVAs."""

    NAME: ClassVar[str] = "pci_nvme_map_prp"
    trans_len: int
    len: int
    prp1: int
    prp2: int
    num_prps: int


@dataclass(frozen=True, slots=True)
class NvmeRead(NvmeEvent):
    """``pci_nvme_read``: ``nlb`` blocks (``count`` bytes) from ``lba``."""

    NAME: ClassVar[str] = "pci_nvme_read"
    cid: int
    nsid: int
    nlb: int
    count: int
    lba: int


@dataclass(frozen=True, slots=True)
class NvmeWrite(NvmeEvent):
    """``pci_nvme_write``: ``opname`` is "write" or "write zeroes"."""

    NAME: ClassVar[str] = "pci_nvme_write"
    cid: int
    opname: str
    nsid: int
    nlb: int
    count: int
    lba: int


@dataclass(frozen=True, slots=True)
class NvmeIoCmd(NvmeEvent):
    NAME: ClassVar[str] = "pci_nvme_io_cmd"
    cid: int
    nsid: int
    sqid: int
    opc: int
    opname: str


@dataclass(frozen=True, slots=True)
class NvmeAdminCmd(NvmeEvent):
    NAME: ClassVar[str] = "pci_nvme_admin_cmd"
    cid: int
    sqid: int
    opc: int
    opname: str


@dataclass(frozen=True, slots=True)
class NvmeRwCb(NvmeEvent):
    NAME: ClassVar[str] = "pci_nvme_rw_cb"
    cid: int
    blk: str


@dataclass(frozen=True, slots=True)
class NvmeEnqueueReqCompletion(NvmeEvent):
    NAME: ClassVar[str] = "pci_nvme_enqueue_req_completion"
    cid: int
    cqid: int
    dw0: int
    dw1: int
    status: int


@dataclass(frozen=True, slots=True)
class NvmeCreateSq(NvmeEvent):
    """``pci_nvme_create_sq``: ``addr`` is the queue's IOVA."""

    NAME: ClassVar[str] = "pci_nvme_create_sq"
    addr: int
    sqid: int
    cqid: int
    qsize: int
    qflags: int


@dataclass(frozen=True, slots=True)
class NvmeCreateCq(NvmeEvent):
    """``pci_nvme_create_cq``: ``addr`` is the queue's IOVA."""

    NAME: ClassVar[str] = "pci_nvme_create_cq"
    addr: int
    cqid: int
    vector: int
    qsize: int
    qflags: int
    ien: int


@dataclass(frozen=True, slots=True)
class NvmeError(NvmeEvent):
    """Any ``pci_nvme_err_*`` event; ``text`` is its argument text as printed."""

    trace_name: str
    text: str

    @property
    def name(self) -> str:
        return self.trace_name


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
    """A known event name whose arguments do not match its format (another
    QEMU version, or a line cut short)."""

    trace_name: str
    text: str

    @property
    def name(self) -> str:
        return self.trace_name

    @property
    def is_vtd(self) -> bool:
        return self.trace_name.startswith("vtd_")


@dataclass(frozen=True, slots=True)
class DmaEvent(Event):
    """Base of QEMU's dma-helpers events (system/dma-helpers.c: block DMA through
    a scatter-gather list, as hw/nvme uses for PRP-described data)."""


@dataclass(frozen=True, slots=True)
class DmaBlkIo(DmaEvent):
    """``dma_blk_io``: a block request starts; ``to_dev`` True means the device reads
    guest memory (a disk write), False that it writes guest memory (a disk read).
    ``dbs`` identifies the request (a host pointer) in later events."""

    NAME: ClassVar[str] = "dma_blk_io"
    dbs: int
    bs: int
    offset: int
    to_dev: bool


@dataclass(frozen=True, slots=True)
class DmaBlkCb(DmaEvent):
    """``dma_blk_cb``: the request's next step; it maps the rest of its
    scatter-gather list (``dma_memory_map``, one IOMMU translation a page)
    before the next trace event."""

    NAME: ClassVar[str] = "dma_blk_cb"
    dbs: int
    ret: int


@dataclass(frozen=True, slots=True)
class DmaComplete(DmaEvent):
    """``dma_complete``: the request is done (its mappings are released)."""

    NAME: ClassVar[str] = "dma_complete"
    dbs: int
    ret: int
    cb: int


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
)
"""Every event class with a fixed trace name (not the catch-alls)."""

TRACE_EVENTS: Final[tuple[str, ...]] = tuple(cls.NAME for cls in EVENT_CLASSES) + (
    "pci_nvme_err_*",
)
"""Event-name patterns to enable with ``-trace events=FILE``: the specific
events above (not ``vtd_*``, which also enables per-register MMIO events)
plus every NVMe error event.  All exist in QEMU 7.2's trace-events."""
