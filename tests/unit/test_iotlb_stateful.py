"""Stateful test of the IOTLB model: a hypothesis state machine drives the
model and the naive list-of-tuples oracle side by side and compares their
full contents after every step, for several limit/retire configurations."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from harness.models.iotlb import (
    U64_MAX,
    VHOST_MAP_RO,
    VHOST_MAP_RW,
    VHOST_MAP_WO,
    IOTLB,
    IOTLBError,
    IOTLBMap,
)
from tests.unit.test_iotlb import NaiveIOTLB, entry, model_translate, model_walk

HALF = 2**63

SMALL = st.integers(0, 32)
EXTREME = st.sampled_from([0, 1, HALF - 1, HALF, HALF + 1, U64_MAX - 1, U64_MAX])
ADDRESS = st.one_of(SMALL, SMALL, SMALL, SMALL, EXTREME)
TARGET = st.one_of(st.integers(0, 2**12), st.sampled_from([U64_MAX, U64_MAX - 1, HALF - 1, HALF]))
PERM = st.one_of(st.integers(0, 3), st.sampled_from([4, 7, 0xFFFF_FFFF]))
ACCESS = st.sampled_from([VHOST_MAP_RO, VHOST_MAP_WO, VHOST_MAP_RW])


class IOTLBMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = IOTLB()
        self.naive = NaiveIOTLB()
        self.tag = 0
        self.dead: list[IOTLBMap] = []  # maps known to have left the model

    def _next_tag(self) -> int:
        self.tag += 1
        return self.tag

    def _forget(self, before: list[IOTLBMap]) -> None:
        """Remember maps that disappeared (removed or evicted) since ``before``."""
        alive = {id(m) for m in self.model}
        self.dead.extend(m for m in before if id(m) not in alive)
        del self.dead[:-20]

    @initialize(
        config=st.sampled_from([(0, False), (0, True), (3, False), (1, True), (2, True), (4, True)])
    )
    def configure(self, config: tuple[int, bool]) -> None:
        limit, retire = config
        self.model = IOTLB(limit=limit, retire=retire)
        self.naive = NaiveIOTLB(limit=limit, retire=retire)

    @rule(a=ADDRESS, b=ADDRESS, addr=TARGET, perm=PERM)
    def add_range(self, a: int, b: int, addr: int, perm: int) -> None:
        start, last = min(a, b), max(a, b)
        before = list(self.model)
        tag = self._next_tag()
        self.model.add_range(start, last, addr, perm, tag)
        self.naive.add_range(start, last, addr, perm, tag)
        self._forget(before)

    @rule(starts=st.lists(SMALL, min_size=1, max_size=12), width=st.integers(0, 3))
    def add_batch(self, starts: list[int], width: int) -> None:
        # Grows the tree faster than one map per step, so rebalancing at depth happens.
        before = list(self.model)
        for start in starts:
            tag = self._next_tag()
            self.model.add_range(start, start + width, start, VHOST_MAP_RW, tag)
            self.naive.add_range(start, start + width, start, VHOST_MAP_RW, tag)
        self._forget(before)

    @rule(addr=TARGET, perm=PERM)
    def add_everything(self, addr: int, perm: int) -> None:
        before = list(self.model)
        tag = self._next_tag()
        self.model.add_range(0, U64_MAX, addr, perm, tag)
        self.naive.add_range(0, U64_MAX, addr, perm, tag)
        self._forget(before)

    @rule(start=ADDRESS, last=ADDRESS)
    def del_range(self, start: int, last: int) -> None:
        # start/last in either order: inverted ranges are legal.
        removed = self.model.del_range(start, last)
        assert [entry(m) for m in removed] == self.naive.del_range(start, last)
        self.dead.extend(removed)
        del self.dead[:-20]

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def del_exactly_one_existing(self, data: st.DataObject) -> None:
        # Aim at an existing map's bounds so deletions often hit something.
        maps = list(self.model)
        m = maps[data.draw(st.integers(0, len(maps) - 1))]
        point = data.draw(st.sampled_from([m.start, m.last]))
        self.del_range(point, point)

    @rule()
    def reset(self) -> None:
        self.dead.extend(self.model)
        del self.dead[:-20]
        self.model.reset()
        self.naive.reset()

    @rule(start=ADDRESS, last=ADDRESS)
    def walk(self, start: int, last: int) -> None:
        expected = self.naive.walk(start, last)
        first = self.model.first(start, last)
        assert entry(first) == (expected[0] if expected else None)
        assert [entry(m) for m in model_walk(self.model, start, last)] == expected

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data(), start=ADDRESS, last=ADDRESS)
    def next_from_any_map(self, data: st.DataObject, start: int, last: int) -> None:
        maps = list(self.model)
        m = maps[data.draw(st.integers(0, len(maps) - 1))]
        got = self.model.next(m, start, last)
        assert entry(got) == self.naive.next_after(entry(m), start, last)  # type: ignore[arg-type]

    @precondition(lambda self: len(self.dead) > 0)
    @rule(data=st.data())
    def next_on_dead_map_raises(self, data: st.DataObject) -> None:
        m = self.dead[data.draw(st.integers(0, len(self.dead) - 1))]
        assert m not in self.model
        with pytest.raises(IOTLBError):
            self.model.next(m, 0, U64_MAX)

    @rule(iova=ADDRESS, access=ACCESS)
    def translate(self, iova: int, access: int) -> None:
        assert model_translate(self.model, iova, access) == self.naive.translate(iova, access)

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data(), access=ACCESS)
    def translate_inside_a_map(self, data: st.DataObject, access: int) -> None:
        maps = list(self.model)
        m = maps[data.draw(st.integers(0, len(maps) - 1))]
        iova = data.draw(st.sampled_from([m.start, m.last, m.start + (m.last - m.start) // 2]))
        assert model_translate(self.model, iova, access) == self.naive.translate(iova, access)

    @invariant()
    def same_contents(self) -> None:
        assert len(self.model) == len(self.naive.entries)
        assert [(m.start, m.last, m.addr, m.perm) for m in self.model] == self.naive.contents()
        assert [entry(m) for m in self.model] == self.naive.ordered()

    @invariant()
    def limit_respected_with_retire(self) -> None:
        if self.model.limit and self.model.retire:
            assert len(self.model) <= self.model.limit

    @invariant()
    def tree_is_sound(self) -> None:
        self.model._check_invariants()

    def teardown(self) -> None:
        # Everything still in the model is reachable by a full walk.
        assert model_walk(self.model, 0, U64_MAX) == list(self.model)


IOTLBMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestIOTLBMachine = IOTLBMachine.TestCase
