"""The options every front end shares (CLI flags, pytest options and ini keys,
environment variables), defined once with their help texts."""

from __future__ import annotations

import os
from dataclasses import dataclass

from harness.vm.accel import ACCELS

OPTION_HELP: dict[str, str] = {
    "qemu": "QEMU binary (default: $DMA_HARNESS_QEMU or qemu-system-x86_64 on PATH)",
    "kernel": "boot this bzImage instead of the project's kernel (default: $DMA_HARNESS_KERNEL)",
    "accel": "accelerator: auto (KVM only if a probe guest boots under it), tcg or kvm",
    "cache": "image cache folder (default: $DMA_HARNESS_CACHE or the user cache dir)",
    "artifacts": "folder for failure artifacts (default: artifacts)",
    "keep-artifacts": "save artifacts for passing runs too",
}
__all__ = ["ACCELS", "OPTION_HELP", "HarnessOptions"]


@dataclass(frozen=True)
class HarnessOptions:
    """``qemu`` (binary or None for PATH/DMA_HARNESS_QEMU), ``kernel`` (a bzImage of
    the user's, or None to build the project's), ``accel`` (auto/tcg/kvm), ``cache``
    (image cache root or None), ``artifacts`` (folder for failure artifacts),
    ``keep_artifacts`` (also keep them for passing runs)."""

    qemu: str | None = None
    kernel: str | None = None
    accel: str = "auto"
    cache: str | None = None
    artifacts: str = "artifacts"
    keep_artifacts: bool = False

    @classmethod
    def from_env(cls, **overrides: object) -> HarnessOptions:
        values: dict[str, object] = {
            "qemu": os.environ.get("DMA_HARNESS_QEMU"),
            "kernel": os.environ.get("DMA_HARNESS_KERNEL"),
            "accel": os.environ.get("DMA_HARNESS_ACCEL", "auto"),
            "cache": os.environ.get("DMA_HARNESS_CACHE"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
