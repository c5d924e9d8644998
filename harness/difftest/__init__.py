"""Differential testing of the reference models against the real kernel
(``python -m harness difftest MODEL``): random operation sequences run in one
booted guest and in the model, compared after every step; a divergence is shrunk
to a minimal sequence and saved as a replay file. See docs/difftest.md.

Modules:
  harness.difftest.engine   targets, executors, the Hypothesis search and the comparison
  harness.difftest.replay   the replay file format
  harness.difftest.report   what the command prints
  harness.difftest.command  the ``difftest`` command (checks its inputs, boots the guest)
  harness.difftest.pinning  the iommufd pinning target (harness.models.pinning)
  harness.difftest.vhost_net   the vhost-net device IOTLB target (harness.models.vhost_net)
  harness.difftest.vhost_vdpa  the vhost-vdpa IOTLB target (harness.models.vhost_vdpa)
  harness.difftest.iotlb    ``iotlb``: both vhost targets in one run
  harness.difftest.grant    the Xen grant-table target (harness.models.grant), in a Xen dom0

This module is the registry of targets: :data:`TARGETS` maps a model name to the
module and class of its target, imported only when asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from harness.errors import ConfigError

if TYPE_CHECKING:
    from harness.difftest.engine import Target

TARGETS: dict[str, tuple[str, str]] = {
    "pinning": ("harness.difftest.pinning", "PinningTarget"),
    "iotlb": ("harness.difftest.iotlb", "IotlbTarget"),
    "vhost-net": ("harness.difftest.vhost_net", "VhostNetTarget"),
    "vhost-vdpa": ("harness.difftest.vhost_vdpa", "VhostVdpaTarget"),
    "grant": ("harness.difftest.grant", "GrantTarget"),
}
"""Model name -> (module, class) of its :class:`~harness.difftest.engine.Target`."""


def known_models() -> list[str]:
    return sorted(TARGETS)


def get_target(model: str) -> Target:
    """The target of ``model``.

    Raises:
        ConfigError: ``model`` is not a known model (the message lists the known ones).
    """
    if model not in TARGETS:
        raise ConfigError(f"unknown model {model!r}: known models are {', '.join(known_models())}",
                          key="model")
    module, cls = TARGETS[model]
    target: Target = getattr(importlib.import_module(module), cls)()
    return target
