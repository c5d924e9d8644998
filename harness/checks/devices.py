"""Per-device conclusiveness: a check that judged nothing for a DMA device the
machine has is inconclusive, not OK.

Checkers report how much they judged per device as a counts field holding
``sid=count`` pairs (``translations_by_sid = "0x0100=394 0x0200=1454"``,
source ids as ``%#06x``).  :func:`require_devices` reads it back and adds an
inconclusive reason to the report for every expected device with no count.

Pure code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from harness.checks.verdict import CheckReport, counts_dict
from harness.vm.virtio import DmaDevice

__all__ = ["parse_by_sid", "require_devices", "BY_SID_FIELDS"]

BY_SID_FIELDS: Final = ("translations_by_sid", "pages_checked_by_sid")
"""Counts fields read as per-device counts, first found wins."""


def parse_by_sid(text: str) -> dict[int, int]:
    """``"0x0100=394 0x0200=12"`` -> ``{0x100: 394, 0x200: 12}``; malformed items are skipped."""
    out: dict[int, int] = {}
    for item in text.split():
        sid, _, count = item.partition("=")
        try:
            out[int(sid, 0)] = int(count)
        except ValueError:
            continue
    return out


def require_devices(report: CheckReport, devices: Iterable[DmaDevice], *, what: str = "translation") -> dict[int, int]:
    """Add to ``report.inconclusive`` one reason per device of ``devices`` for
    which the report's per-device counts (:data:`BY_SID_FIELDS`) say nothing
    was checked.  Returns the per-device counts read.  A report without such a
    field is left alone (it does not judge per device)."""
    counts = counts_dict(report.counts)
    field = next((f for f in BY_SID_FIELDS if isinstance(counts.get(f), str)), None)
    if field is None:
        return {}
    by_sid = parse_by_sid(counts[field])
    for d in devices:
        if not by_sid.get(d.sid):
            reason = f"no {what} of {d.label} (sid {d.sid:#06x}) was checked"
            if reason not in report.inconclusive:
                report.inconclusive.append(reason)
    return by_sid
