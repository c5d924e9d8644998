"""Checkers: observations in, a :class:`~harness.checks.verdict.CheckReport` out.

- :mod:`harness.checks.verdict`: the result types every checker shares
  (divergences with evidence, counts, conclusive or not) and the run's
  :class:`~harness.checks.verdict.Verdict`.
- :mod:`harness.checks.vtd`: QEMU-internal consistency of the emulated VT-d
  (QEMU's IOTLB hits against its own page walks and invalidations).
- :mod:`harness.checks.guest_intent`: every translation against the guest
  kernel's own mappings (its trace), the logs ordered by
  :mod:`harness.checks.sync`, the guest replayed by
  :mod:`harness.checks.guest_state`.
- :mod:`harness.checks.block_data`: the guest's O_DIRECT data against the
  pages of the agent's buffers.
- :mod:`harness.checks.dma_window`: which block DMA request (and so which
  direction) a translation belongs to.
"""

from harness.checks.verdict import CheckReport, Divergence, DivergenceLog, TraceLine, Verdict
from harness.checks.vtd import (
    DIVERGENCE_KINDS,
    DMA_PERMISSION,
    FAULT_ON_LIVE_ENTRY,
    HIT_AFTER_INVALIDATION,
    HIT_MISMATCH,
    PASSTHROUGH_MISMATCH,
    STALE_ENTRY,
    TRANSLATION_WITHOUT_ENTRY,
    UNEXPECTED_MISS,
    WRONG_TRANSLATION,
    Counts,
    VtdChecker,
    check_events,
    check_lines,
    check_trace_file,
)

__all__ = [
    "DIVERGENCE_KINDS",
    "DMA_PERMISSION",
    "FAULT_ON_LIVE_ENTRY",
    "HIT_AFTER_INVALIDATION",
    "HIT_MISMATCH",
    "PASSTHROUGH_MISMATCH",
    "STALE_ENTRY",
    "TRANSLATION_WITHOUT_ENTRY",
    "UNEXPECTED_MISS",
    "WRONG_TRANSLATION",
    "CheckReport",
    "Counts",
    "Divergence",
    "DivergenceLog",
    "TraceLine",
    "Verdict",
    "VtdChecker",
    "check_events",
    "check_lines",
    "check_trace_file",
]
