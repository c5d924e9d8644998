"""Deliberately wrong variants of the vhost IOTLB model, for the differential
test (``python -m harness difftest vhost-net --model-mutant NAME``): each must
make the comparison with the kernel fail, which shows that the sequences and the
observations can tell that rule apart.

Each mutant changes one rule of ``drivers/vhost/iotlb.c`` or
``drivers/vhost/vhost.c`` as stated by :mod:`harness.models.iotlb` and
:mod:`harness.models.vhost_net`:

* ``del-range-split``: INVALIDATE trims maps to what lies outside the range (a
  map straddling it is split in two) instead of removing every overlapping map
  whole (``vhost_iotlb_del_range``).
* ``retire-lowest``: at the 2,048-map limit the map with the lowest start is
  evicted instead of the oldest-inserted one (``vhost_iotlb_add_range_ctx``).
* ``tie-newest``: among maps with the same start a lookup takes the newest
  instead of the oldest (the interval tree inserts an equal key to the right).
* ``lookup-request-start``: a MISS carries the start of the failed access
  instead of the first address no map covers (``translate_desc``,
  ``iotlb_access_ok``).

:data:`MUTANTS` maps each name to its description and a factory of the device
model (:class:`harness.models.vhost_net.VhostNetDevice`) that uses it. The IOTLB
classes are usable on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from harness.models.iotlb import U64_MAX, IOTLB, IOTLBMap
from harness.models.vhost_net import MAX_IOTLB_ENTRIES, Lookup, Miss, VhostNetDevice

__all__ = ["SplittingIOTLB", "RetireLowestIOTLB", "TieNewestIOTLB", "RequestStartDevice", "Mutant", "MUTANTS"]


class SplittingIOTLB(IOTLB):
    """``del_range`` keeps the parts of each overlapping map outside [start, last]
    (re-added as new maps: newest in the retire order)."""

    __slots__ = ()

    def del_range(self, start: int, last: int) -> list[IOTLBMap]:
        removed = super().del_range(start, last)
        if last < start:  # an inverted range: only the kernel's predicate makes sense
            return removed
        for m in removed:
            if m.start < start:
                self.add_range(m.start, start - 1, m.addr, m.perm, m.opaque)
            if m.last > last:
                self.add_range(last + 1, m.last, (m.addr + last + 1 - m.start) & U64_MAX, m.perm, m.opaque)
        return removed


class RetireLowestIOTLB(IOTLB):
    """At the limit (with retire) the lowest-start map goes, not the oldest."""

    __slots__ = ()

    def add_range(self, start: int, last: int, addr: int, perm: int, opaque: object = None) -> None:
        if self.limit and self.retire and len(self) >= self.limit:
            lowest = self.first(0, U64_MAX)
            if lowest is not None:
                self.del_map(lowest)
        super().add_range(start, last, addr, perm, opaque)

    def del_map(self, m: IOTLBMap) -> None:
        """Remove exactly ``m`` (the kernel's ``vhost_iotlb_map_free``)."""
        self._remove(m)


class TieNewestIOTLB(IOTLB):
    """``first`` prefers the newest of the overlapping maps with the lowest start."""

    __slots__ = ()

    def first(self, start: int, last: int) -> IOTLBMap | None:
        m = super().first(start, last)
        if m is None:
            return None
        nxt = self.next(m, start, last)
        while nxt is not None and nxt.start == m.start:
            m = nxt
            nxt = self.next(m, start, last)
        return m


class RequestStartDevice(VhostNetDevice):
    """The MISS names the start of the access that failed, not the first uncovered address."""

    def _miss(self, vq: int, request: int, lookup: Lookup, access: int) -> None:
        self.read_list.append(Miss(request, access, vq))


@dataclass(frozen=True)
class Mutant:
    """A wrong model: what is wrong (``description``) and a factory of its device."""

    description: str
    factory: Callable[[], VhostNetDevice]


def _with(iotlb: type[IOTLB]) -> Callable[[], VhostNetDevice]:
    return lambda: VhostNetDevice(make_iotlb=lambda: iotlb(limit=MAX_IOTLB_ENTRIES, retire=True))


MUTANTS: Final[dict[str, Mutant]] = {
    "del-range-split": Mutant("INVALIDATE trims and splits maps instead of removing overlapping maps whole",
                              _with(SplittingIOTLB)),
    "retire-lowest": Mutant("at 2048 maps the lowest-start map is evicted instead of the oldest",
                            _with(RetireLowestIOTLB)),
    "tie-newest": Mutant("of maps with equal starts a lookup finds the newest instead of the oldest",
                         _with(TieNewestIOTLB)),
    "lookup-request-start": Mutant("a MISS carries the start of the failed access, not the first uncovered "
                                   "address", RequestStartDevice),
}
"""Name -> mutant."""
