"""Every deliberately wrong grant table model (:mod:`harness.models.grant_mutants`)
must be caught by the stateful comparison with the naive oracle of
``test_grant_stateful.py``, within a bounded, derandomised search."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from harness.models.grant import GrantTable
from harness.models.grant_mutants import MUTANTS
from tests.unit.test_grant_stateful import make_machine

# The version whose rules each mutant breaks visibly (v1 and v2 differ only in the end).
# Each mutant is found within about 80 examples (seen over several seeds); 400 leaves room
# for Hypothesis drawing differently as other test modules are loaded.
VERSION = {"grant-flags-rechecked-when-pinned": 2}

HUNT = settings(max_examples=400, stateful_step_count=40, deadline=None, derandomize=True,
                database=None, phases=[Phase.generate], report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck))


def test_at_least_the_required_mutants_exist() -> None:
    assert {"grant-fifo-reuse", "grant-v1-clears-flags", "grant-ro-map-writable",
            "grant-deferred-free-while-mapped"} <= set(MUTANTS)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_every_mutant_is_caught(name: str) -> None:
    machine = make_machine(MUTANTS[name].factory, VERSION.get(name, 1))
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine, settings=HUNT)


def test_the_hunt_passes_the_real_model() -> None:
    """The same bounded search finds nothing in the real model, so a caught
    mutant is caught for its bug (version 2 runs in test_grant_stateful.py)."""
    run_state_machine_as_test(make_machine(GrantTable, 1), settings=settings(HUNT, max_examples=100))
