"""Project-wide pytest configuration. The dma-harness plugin itself is loaded through
its entry point (``pytest11``), so it works the same in projects that install it."""

import os

from hypothesis import HealthCheck, settings

# CI runs derandomized (no run-to-run flakes); locally hypothesis explores freely.
settings.register_profile("ci", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
