"""A pure model of a virtio-iommu device: its domains, endpoints and mappings,
driven by the driver's requests, and the translation of a device access.

Semantics: the virtio specification (1.2, section 5.13 "IOMMU device") and
QEMU 7.2's implementation (hw/virtio/virtio-iommu.c).  Where they differ the
model follows QEMU and says so; :meth:`VirtioIommuModel.spec_problems_map`
and :meth:`VirtioIommuModel.spec_problems_unmap` name what the
specification requires of a request.

Addresses: ``virt_start``/``virt_end`` (inclusive) and ``addr`` are
IO-virtual byte addresses, ``phys_start`` and a translation's ``gpa``
guest-physical.  Ids: ``domain`` and ``endpoint`` are u32 (an endpoint of a
PCI device is its source id, ``bus << 8 | devfn``).

Requests (QEMU 7.2 function, status returned):

* ATTACH (``virtio_iommu_attach``): ``flags`` other than ATTACH_F_BYPASS ->
  S_INVAL; an endpoint the device does not know -> S_NOENT; an endpoint
  already attached is detached first (and its old domain freed, mappings
  and all, if it has no endpoint left); a domain that exists with the other
  bypass mode -> S_INVAL (the endpoint stays detached: QEMU detaches before
  it looks); else the domain is created if needed and the endpoint joins it.
* DETACH (``virtio_iommu_detach``): unknown endpoint -> S_NOENT; endpoint not
  attached to that domain -> S_INVAL; else detached, and the domain freed
  when it has no endpoint left.
* MAP (``virtio_iommu_map``): unknown flag bits -> S_INVAL; no such domain ->
  S_NOENT; bypass domain -> S_INVAL; a mapping overlapping the range ->
  S_INVAL; else the mapping is inserted.  QEMU checks no alignment.
* UNMAP (``virtio_iommu_unmap``): no such domain -> S_NOENT; bypass domain
  -> S_INVAL; then every mapping overlapping the range is removed if the
  range covers it whole; the first one it does not cover stops the request
  with S_RANGE, and mappings removed before it *stay removed* (the spec:
  "the device SHOULD set the request status to VIRTIO_IOMMU_S_RANGE and
  SHOULD NOT remove any mapping").  QEMU visits the overlapping mappings in
  the order its GTree lookup finds them, which is not the address order;
  the model removes them in address order (:meth:`unmap`) and also offers the
  specification's all-or-nothing rule (:meth:`unmap_spec`).

Translation (``virtio_iommu_translate``, access ``flag``: 1 read, 2 write):
an endpoint the device does not know, or one attached to no domain, bypasses
if the config's ``bypass`` bit is set (``boot-bypass``) else faults
(FAULT_R_UNKNOWN / FAULT_R_DOMAIN); an address in a reserved region of type
MSI bypasses (identity), of type RESERVED faults; an endpoint in a bypass
domain bypasses; else the mapping holding ``addr`` gives ``phys_start +
(addr - virt_start)`` if its flags allow the access, else FAULT_R_MAPPING
(also with no mapping).  Reserved-region checks come after the endpoint
lookup and before the domain checks, as in QEMU.

Pure code.  Raises nothing for a request: every outcome is a status.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "S_OK", "S_IOERR", "S_UNSUPP", "S_DEVERR", "S_INVAL", "S_RANGE", "S_NOENT", "S_FAULT", "S_NOMEM",
    "STATUS_NAMES", "ATTACH_F_BYPASS", "MAP_F_READ", "MAP_F_WRITE", "MAP_F_MMIO", "MAP_F_MASK",
    "RESV_MEM_T_RESERVED", "RESV_MEM_T_MSI", "FAULT_R_UNKNOWN", "FAULT_R_DOMAIN", "FAULT_R_MAPPING",
    "ACCESS_READ", "ACCESS_WRITE", "DEFAULT_PAGE_SIZE_MASK", "U64_MAX",
    "ViommuMapping", "ViommuDomain", "Translation", "VirtioIommuModel", "granule",
]

S_OK: Final = 0
S_IOERR: Final = 1
S_UNSUPP: Final = 2
S_DEVERR: Final = 3
S_INVAL: Final = 4
S_RANGE: Final = 5
S_NOENT: Final = 6
S_FAULT: Final = 7
S_NOMEM: Final = 8
STATUS_NAMES: Final = {S_OK: "OK", S_IOERR: "IOERR", S_UNSUPP: "UNSUPP", S_DEVERR: "DEVERR", S_INVAL: "INVAL",
                       S_RANGE: "RANGE", S_NOENT: "NOENT", S_FAULT: "FAULT", S_NOMEM: "NOMEM"}
"""VIRTIO_IOMMU_S_* (include/uapi/linux/virtio_iommu.h)."""

ATTACH_F_BYPASS: Final = 1
MAP_F_READ: Final = 1
MAP_F_WRITE: Final = 2
MAP_F_MMIO: Final = 4
MAP_F_MASK: Final = 7
RESV_MEM_T_RESERVED: Final = 0
RESV_MEM_T_MSI: Final = 1
FAULT_R_UNKNOWN: Final = 1
FAULT_R_DOMAIN: Final = 2
FAULT_R_MAPPING: Final = 3
ACCESS_READ: Final = 1
"""IOMMU_RO of QEMU's IOMMUAccessFlags: the device reads guest memory."""
ACCESS_WRITE: Final = 2
"""IOMMU_WO: the device writes guest memory."""
U64_MAX: Final = (1 << 64) - 1
DEFAULT_PAGE_SIZE_MASK: Final = U64_MAX & ~0xFFF
"""QEMU 7.2's ``page_size_mask`` on x86: ``qemu_target_page_mask()`` (4 KiB and up)."""


def granule(page_size_mask: int) -> int:
    """The smallest page size (bytes) of a ``page_size_mask``: its lowest set bit.

    Raises ValueError for a mask of 0 (the driver refuses such a device:
    drivers/iommu/virtio-iommu.c ``viommu_probe``).
    """
    if page_size_mask <= 0:
        raise ValueError(f"page_size_mask {page_size_mask:#x} has no page size")
    return page_size_mask & -page_size_mask


@dataclass(frozen=True, slots=True)
class ViommuMapping:
    """``[virt_start, virt_end]`` (inclusive) -> ``phys_start`` with MAP ``flags``;
    ``origin``: what made it (the trace event), for evidence."""

    virt_start: int
    virt_end: int
    phys_start: int
    flags: int
    origin: object = None

    def gpa(self, addr: int) -> int:
        return self.phys_start + (addr - self.virt_start)

    def allows(self, access: int) -> bool:
        """Whether the flags allow an access (ACCESS_READ / ACCESS_WRITE bits)."""
        need = (MAP_F_READ if access & ACCESS_READ else 0) | (MAP_F_WRITE if access & ACCESS_WRITE else 0)
        return self.flags & need == need


@dataclass
class ViommuDomain:
    """One domain: ``bypass`` (attached with ATTACH_F_BYPASS), its endpoints and
    its mappings (non-overlapping, kept sorted by ``virt_start``)."""

    id: int
    bypass: bool = False
    endpoints: set[int] = field(default_factory=set)
    _starts: list[int] = field(default_factory=list, repr=False)
    _maps: list[ViommuMapping] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self._maps)

    def mappings(self) -> list[ViommuMapping]:
        return list(self._maps)

    def lookup(self, addr: int) -> ViommuMapping | None:
        """The mapping holding ``addr``, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self._maps[i].virt_end >= addr:
            return self._maps[i]
        return None

    def overlapping(self, start: int, end: int) -> Iterator[ViommuMapping]:
        """Mappings overlapping ``[start, end]``, in address order."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while i < len(self._maps) and self._maps[i].virt_start <= end:
            m = self._maps[i]
            if m.virt_end >= start:
                yield m
            i += 1

    def insert(self, m: ViommuMapping) -> None:
        i = bisect.bisect_left(self._starts, m.virt_start)
        self._starts.insert(i, m.virt_start)
        self._maps.insert(i, m)

    def remove(self, m: ViommuMapping) -> None:
        i = bisect.bisect_left(self._starts, m.virt_start)
        if i >= len(self._maps) or self._maps[i] != m:
            raise KeyError(f"no mapping {m.virt_start:#x}-{m.virt_end:#x} in domain {self.id}")
        del self._starts[i]
        del self._maps[i]


@dataclass(frozen=True, slots=True)
class Translation:
    """The outcome of a device access: ``kind`` is ``"mapped"`` (``gpa`` from
    ``mapping``), ``"bypass"`` (identity: no endpoint / no domain with the
    bypass bit set, or a bypass domain), ``"msi"`` (identity: an MSI reserved
    region) or ``"fault"`` (``reason``: FAULT_R_*)."""

    kind: str
    gpa: int | None = None
    mapping: ViommuMapping | None = None
    reason: int = 0
    why: str = ""


class VirtioIommuModel:
    """The device state: ``bypass`` (config bit, VIRTIO_IOMMU_F_BYPASS_CONFIG; QEMU
    sets it from ``boot-bypass`` at reset), ``page_size_mask``, ``reserved``
    regions ``(low, high, type)`` (global in QEMU), ``endpoints`` (endpoint ->
    domain id or None), ``domains``.

    ``known_endpoints``: the endpoint ids an ATTACH may name (QEMU knows the PCI
    devices behind it); None accepts any.
    """

    def __init__(self, *, bypass: bool = True, page_size_mask: int = DEFAULT_PAGE_SIZE_MASK,
                 known_endpoints: set[int] | None = None) -> None:
        granule(page_size_mask)
        self.bypass = bypass
        self.page_size_mask = page_size_mask
        self.known_endpoints = known_endpoints
        self.reserved: list[tuple[int, int, int]] = []
        self.endpoints: dict[int, int | None] = {}
        self.domains: dict[int, ViommuDomain] = {}

    # ---- lifecycle ---------------------------------------------------------

    def reset(self) -> None:
        """Device reset (``virtio_iommu_device_reset``): every domain and endpoint goes."""
        self.endpoints.clear()
        self.domains.clear()

    def add_reserved(self, low: int, high: int, type_: int) -> None:
        """A reserved region ``[low, high]`` (RESV_MEM_T_*), once."""
        if (low, high, type_) not in self.reserved:
            self.reserved.append((low, high, type_))

    # ---- requests ----------------------------------------------------------

    def attach(self, domain: int, endpoint: int, flags: int = 0) -> int:
        """ATTACH ``endpoint`` to ``domain`` (created if missing); returns S_*."""
        if flags & ~ATTACH_F_BYPASS:
            return S_INVAL
        if endpoint not in self.endpoints:
            if self.known_endpoints is not None and endpoint not in self.known_endpoints:
                return S_NOENT
            self.endpoints[endpoint] = None
        self._detach_ep(endpoint)
        bypass = bool(flags & ATTACH_F_BYPASS)
        d = self.domains.get(domain)
        if d is None:
            d = self.domains[domain] = ViommuDomain(domain, bypass)
        elif d.bypass != bypass:
            return S_INVAL
        d.endpoints.add(endpoint)
        self.endpoints[endpoint] = domain
        return S_OK

    def detach(self, domain: int, endpoint: int) -> int:
        """DETACH ``endpoint`` from ``domain``; returns S_*."""
        if endpoint not in self.endpoints:
            return S_NOENT
        if self.endpoints[endpoint] != domain:
            return S_INVAL
        self._detach_ep(endpoint)
        return S_OK

    def _detach_ep(self, endpoint: int) -> None:
        old = self.endpoints.get(endpoint)
        if old is None:
            return
        d = self.domains[old]
        d.endpoints.discard(endpoint)
        self.endpoints[endpoint] = None
        if not d.endpoints:
            del self.domains[old]

    def map(self, domain: int, virt_start: int, virt_end: int, phys_start: int, flags: int,
            origin: object = None) -> int:
        """MAP ``[virt_start, virt_end] -> phys_start``; returns S_*."""
        if flags & ~MAP_F_MASK:
            return S_INVAL
        d = self.domains.get(domain)
        if d is None:
            return S_NOENT
        if d.bypass:
            return S_INVAL
        if next(d.overlapping(virt_start, virt_end), None) is not None:
            return S_INVAL
        d.insert(ViommuMapping(virt_start, virt_end, phys_start, flags, origin))
        return S_OK

    def unmap(self, domain: int, virt_start: int, virt_end: int) -> tuple[int, list[ViommuMapping]]:
        """UNMAP as QEMU 7.2 does it (module docstring), overlapping mappings taken
        in address order; returns the status and the mappings removed."""
        d = self.domains.get(domain)
        if d is None:
            return S_NOENT, []
        if d.bypass:
            return S_INVAL, []
        removed: list[ViommuMapping] = []
        for m in list(d.overlapping(virt_start, virt_end)):
            if not (virt_start <= m.virt_start and m.virt_end <= virt_end):
                return S_RANGE, removed
            d.remove(m)
            removed.append(m)
        return S_OK, removed

    def unmap_spec(self, domain: int, virt_start: int, virt_end: int) -> tuple[int, list[ViommuMapping]]:
        """UNMAP as the specification asks: a range that would split a mapping
        removes nothing and returns S_RANGE."""
        d = self.domains.get(domain)
        if d is None:
            return S_NOENT, []
        if d.bypass:
            return S_INVAL, []
        hit = list(d.overlapping(virt_start, virt_end))
        if any(not (virt_start <= m.virt_start and m.virt_end <= virt_end) for m in hit):
            return S_RANGE, []
        for m in hit:
            d.remove(m)
        return S_OK, hit

    def remove_exact(self, domain: int, virt_start: int, virt_end: int) -> ViommuMapping | None:
        """Remove the mapping of ``domain`` that is exactly ``[virt_start, virt_end]``
        (what QEMU says it removed: ``virtio_iommu_unmap_done``); None if there is none."""
        d = self.domains.get(domain)
        m = d.lookup(virt_start) if d is not None else None
        if d is None or m is None or m.virt_start != virt_start or m.virt_end != virt_end:
            return None
        d.remove(m)
        return m

    # ---- what the specification asks of a request ----------------------------

    def spec_problems_map(self, domain: int, virt_start: int, virt_end: int, phys_start: int,
                          flags: int) -> list[str]:
        """Why a MAP request breaks the specification (empty: it does not).

        5.13.6.6: virt_start, phys_start and virt_end + 1 aligned on the page
        granularity (the lowest bit of ``page_size_mask``), virt_end not below
        virt_start, known flags only, no mapping already in the range.
        """
        out: list[str] = []
        g = granule(self.page_size_mask)
        if virt_end < virt_start:
            out.append(f"virt_end {virt_end:#x} is below virt_start {virt_start:#x}")
        for name, value in (("virt_start", virt_start), ("phys_start", phys_start), ("virt_end + 1", virt_end + 1)):
            if value % g:
                out.append(f"{name} {value:#x} is not aligned on the granule {g:#x}")
        if flags & ~MAP_F_MASK:
            out.append(f"unknown flags {flags & ~MAP_F_MASK:#x}")
        d = self.domains.get(domain)
        if d is not None:
            for m in d.overlapping(virt_start, virt_end):
                out.append(f"overlaps the mapping {m.virt_start:#x}-{m.virt_end:#x}")
                break
        return out

    def spec_problems_unmap(self, domain: int, virt_start: int, virt_end: int) -> list[str]:
        """Why an UNMAP request breaks the specification: it would split a mapping
        (5.13.6.7: such a request fails with S_RANGE and removes nothing)."""
        d = self.domains.get(domain)
        if d is None:
            return []
        return [f"would split the mapping {m.virt_start:#x}-{m.virt_end:#x}"
                for m in d.overlapping(virt_start, virt_end)
                if not (virt_start <= m.virt_start and m.virt_end <= virt_end)]

    # ---- translation -------------------------------------------------------

    def domain_of(self, endpoint: int) -> ViommuDomain | None:
        did = self.endpoints.get(endpoint)
        return self.domains.get(did) if did is not None else None

    def translate(self, endpoint: int, addr: int, access: int) -> Translation:
        """The outcome of a device access to ``addr`` (module docstring)."""
        if endpoint not in self.endpoints:
            if self.bypass:
                return Translation("bypass", addr, why="endpoint unknown, bypass bit set")
            return Translation("fault", reason=FAULT_R_UNKNOWN, why="endpoint unknown")
        for low, high, type_ in self.reserved:
            if low <= addr <= high:
                if type_ == RESV_MEM_T_MSI:
                    return Translation("msi", addr, why=f"MSI region {low:#x}-{high:#x}")
                return Translation("fault", reason=FAULT_R_MAPPING, why=f"reserved region {low:#x}-{high:#x}")
        d = self.domain_of(endpoint)
        if d is None:
            if self.bypass:
                return Translation("bypass", addr, why="no domain, bypass bit set")
            return Translation("fault", reason=FAULT_R_DOMAIN, why="endpoint attached to no domain")
        if d.bypass:
            return Translation("bypass", addr, why=f"bypass domain {d.id}")
        m = d.lookup(addr)
        if m is None:
            return Translation("fault", reason=FAULT_R_MAPPING, why=f"no mapping in domain {d.id}")
        if not m.allows(access):
            return Translation("fault", mapping=m, reason=FAULT_R_MAPPING,
                               why=f"mapping flags {m.flags} do not allow access {access}")
        return Translation("mapped", m.gpa(addr), m)
