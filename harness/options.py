"""The options every front end shares (CLI flags, pytest options and ini keys,
environment variables), defined once with their help texts."""

from __future__ import annotations

import os
from dataclasses import dataclass

from harness.errors import ConfigError
from harness.vm.accel import ACCELS

OPTION_HELP: dict[str, str] = {
    "qemu": "QEMU binary (default: $DMA_HARNESS_QEMU or qemu-system-x86_64 on PATH)",
    "kernel": "boot this bzImage instead of the project's kernel, or a version the project builds "
              "(6.12, the default, or 7.2; see harness.images.kernel.KERNEL_SOURCES) (default: $DMA_HARNESS_KERNEL)",
    "accel": "accelerator: auto (KVM only if a probe guest boots under it), tcg or kvm",
    "cache": "image cache folder (default: $DMA_HARNESS_CACHE or the user cache dir)",
    "artifacts": "folder for failure artifacts (default: artifacts)",
    "keep-artifacts": "save artifacts for passing runs too",
}
ENV_FLAGS = ("DMA_HARNESS_KEEP_BUILD", "DMA_HARNESS_REQUIRE_VM")
"""Environment switches: set to 1, or unset (empty counts as unset)."""
__all__ = ["ACCELS", "ENV_FLAGS", "OPTION_HELP", "HarnessOptions", "check_env"]


def check_env() -> None:
    """Refuse an environment variable of the harness whose value is not one of its choices.

    Raises:
        ConfigError: names the variable, its value and the choices.
    """
    accel = os.environ.get("DMA_HARNESS_ACCEL", "")
    if accel and accel not in ACCELS:
        raise ConfigError(f"DMA_HARNESS_ACCEL={accel!r} is not one of {', '.join(ACCELS)}", key="DMA_HARNESS_ACCEL")
    kernel = os.environ.get("DMA_HARNESS_KERNEL", "")
    if kernel:  # a version name must be one the project builds (a path is read when it is used)
        from harness.images.kernel import resolve_kernel_choice
        resolve_kernel_choice(kernel, option="DMA_HARNESS_KERNEL")
    for name in ENV_FLAGS:
        value = os.environ.get(name, "")
        if value not in ("", "1"):
            raise ConfigError(f"{name}={value!r} is not valid: set it to 1 or leave it unset", key=name)


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

    def __post_init__(self) -> None:
        if self.accel not in ACCELS:
            raise ConfigError(f"accel must be one of {', '.join(ACCELS)}, not {self.accel!r}", key="accel")

    @classmethod
    def from_env(cls, **overrides: object) -> HarnessOptions:
        """Options from the environment (``DMA_HARNESS_QEMU``, ``_KERNEL``, ``_ACCEL``,
        ``_CACHE``), each overridden by a value given here that is not None.

        Raises:
            ConfigError: an environment variable or an option has a value outside its choices.
        """
        check_env()
        values: dict[str, object] = {
            "qemu": os.environ.get("DMA_HARNESS_QEMU") or None,
            "kernel": os.environ.get("DMA_HARNESS_KERNEL") or None,
            "accel": os.environ.get("DMA_HARNESS_ACCEL") or "auto",
            "cache": os.environ.get("DMA_HARNESS_CACHE") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
