"""Project-wide pytest configuration. The dma-harness plugin itself is loaded through
its entry point (``pytest11``), so it works the same in projects that install it."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI runs derandomized (no run-to-run flakes); locally hypothesis explores freely.
settings.register_profile("ci", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist gives each worker the temporary folder ``<basetemp>/popen-gwN``;
    VM tests bind UNIX sockets (QMP, console, agent) in run directories under
    ``tmp_path``, and ``sun_path`` holds at most 107 bytes (``unix(7)``), which those
    ten characters push tests/vm/test_faults.py over. A worker uses ``<basetemp>/gwN``
    instead (the same length as a serial run's path plus four)."""
    basetemp = config.option.basetemp
    if hasattr(config, "workerinput") and basetemp:
        path = Path(basetemp)
        if path.name.startswith("popen-"):
            config.option.basetemp = str(path.with_name(path.name[len("popen-"):]))
