"""Replay of observed events into the reference models; verdicts.

:mod:`harness.checks.dma` checks every DMA translation of QEMU's emulated
VT-d against per-(sid, domain) IOTLB models; ``check_trace_file(path)``
returns a :class:`Verdict`.
"""

from harness.checks.dma import (
    DIVERGENCE_KINDS,
    FAULT_ON_LIVE_ENTRY,
    HIT_AFTER_INVALIDATION,
    HIT_MISMATCH,
    PASSTHROUGH_MISMATCH,
    STALE_ENTRY,
    TRANSLATION_WITHOUT_ENTRY,
    UNEXPECTED_MISS,
    WRONG_TRANSLATION,
    Counts,
    Divergence,
    DMAChecker,
    TraceLine,
    Verdict,
    check_events,
    check_lines,
    check_trace_file,
)

__all__ = [
    "DIVERGENCE_KINDS",
    "FAULT_ON_LIVE_ENTRY",
    "HIT_AFTER_INVALIDATION",
    "HIT_MISMATCH",
    "PASSTHROUGH_MISMATCH",
    "STALE_ENTRY",
    "TRANSLATION_WITHOUT_ENTRY",
    "UNEXPECTED_MISS",
    "WRONG_TRANSLATION",
    "Counts",
    "DMAChecker",
    "Divergence",
    "TraceLine",
    "Verdict",
    "check_events",
    "check_lines",
    "check_trace_file",
]
