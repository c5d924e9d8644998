"""The iommufd pinning target of difftest without a VM: the correct model never
diverges from itself, every mutant diverges and shrinks to a short sequence, the
guest side (agent calls, batching, observations) is driven through a fake guest
agent built on the correct model, and planted bugs of that fake "kernel" are seen."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from harness.difftest import engine, pinning, replay
from harness.difftest.engine import AgentExecutor, ModelExecutor, search
from harness.difftest.pinning import (
    MAX_REFS,
    PAGE,
    REGION_END,
    REGION_LEN,
    REGION_PAGES,
    REGION_VA,
    NoSuchIOAS,
    PinningTarget,
    check_map_answer,
)
from harness.models.pinning import IommufdCtx, IommufdError, MockDomain
from harness.models.pinning_mutants import MUTANTS

EINVAL, ENOENT, EBADF = errno.EINVAL, errno.ENOENT, errno.EBADF


def quiet(line: str) -> None:
    pass


# ------------------------------------------------------------------ a fake guest agent


class FakeIommufdAgent:
    """The guest agent's iommufd.*, mem.*, fd.* and batch ops, answered by the
    correct model (one IommufdCtx per open /dev/iommu). ``bug`` plants one defect:
    ``unmap-all-zero`` (UNMAP-all reports 0 bytes), ``stale-check-map`` (MD_CHECK_MAP
    says a removed area is still mapped), ``refs-off`` (a page pinned twice reads 1)."""

    def __init__(self, bug: str | None = None):
        self.bug = bug
        self.next_fd = 3
        self.ctxs: dict[int, IommufdCtx] = {}
        self.mocks: dict[int, list[MockDomain]] = {}
        self.removed: dict[int, list[tuple[int, int, int]]] = {}
        self.accesses: dict[int, tuple[int, int, int]] = {}  # access fd -> (ctx fd, access id, ioas id)
        self.regions: dict[int, int] = {}
        self.round_trips = 0

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        assert op == "batch"
        self.round_trips += 1
        out = []
        for c in args["calls"]:
            try:
                out.append({"ok": True, "result": getattr(self, c["op"].replace(".", "_"))(**c["args"])})
            except OSError as exc:
                out.append({"ok": False, "error": {"type": "OSError", "errno": exc.errno}})
        return out

    def _pinned(self) -> int:
        return sum(c.pinned_vm for c in self.ctxs.values())

    def _rec(self, err: int, **fields: Any) -> dict[str, Any]:
        return {"errno": err, **fields, "vm_pin": self._pinned(), "vm_lck": 0}

    def _ctx(self, fd: int) -> IommufdCtx:
        ctx = self.ctxs[fd]
        ctx.set_user_memory([(va, va + n - 1) for va, n in self.regions.items()])
        return ctx

    def _ioas(self, fd: int, ioas_id: int) -> Any:
        ctx = self._ctx(fd)
        return ctx.ioas(ioas_id) if ctx.object_kind(ioas_id) == "ioas" else NoSuchIOAS(ctx, ioas_id)

    def _do(self, fn: Any, **ok: Any) -> dict[str, Any]:
        try:
            value = fn()
        except IommufdError as exc:
            return self._rec(exc.errno or 0, **{k: 0 for k in ok})
        return self._rec(0, **{k: (value if v is None else v) for k, v in ok.items()})

    # mem.* and fd.*
    def mem_map(self, length: int, at: int | None = None, fill: int | None = 0) -> dict[str, Any]:
        if at in self.regions:
            raise OSError(errno.EEXIST, "taken")
        assert at is not None
        self.regions[at] = length
        return {"user_va": at, "length": length}

    def mem_unmap(self, user_va: int) -> dict[str, Any]:
        return {"user_va": user_va, "length": self.regions.pop(user_va)}

    def fd_close(self, fd: int) -> dict[str, Any]:
        if fd in self.accesses:
            ctx_fd, access_id, _ = self.accesses.pop(fd)
            self._ctx(ctx_fd).close_access(access_id)
            return self._rec(0, fd=fd)
        if fd in self.ctxs:
            del self.ctxs[fd]
            return self._rec(0, fd=fd)
        return self._rec(EBADF, fd=fd)

    def fd_close_all(self) -> dict[str, Any]:
        n = len(self.accesses) + len(self.ctxs)
        for fd in sorted(self.accesses, reverse=True):
            self.fd_close(fd)
        self.ctxs.clear()
        return self._rec(0, closed=n)

    # iommufd.*
    def iommufd_open(self) -> dict[str, Any]:
        fd = self.next_fd
        self.next_fd += 1
        self.ctxs[fd] = IommufdCtx()
        self.mocks[fd] = []
        self.removed[fd] = []
        return self._rec(0, fd=fd, path="/dev/iommu")

    def iommufd_ioas_alloc(self, fd: int) -> dict[str, Any]:
        return self._rec(0, ioas_id=self._ctx(fd).ioas_alloc().id)

    def iommufd_map(self, fd: int, ioas_id: int, user_va: int, length: int, iova: int | None = None,
                    readable: bool = True, writeable: bool = True) -> dict[str, Any]:
        ioas = self._ioas(fd, ioas_id)
        return self._do(lambda: ioas.map(user_va, length, iova=iova, readable=readable, writeable=writeable),
                        iova=None)

    def _note_removed(self, fd: int, before: list[tuple[int, int, int]], ioas: Any) -> None:
        after = {(a.iova, a.last, a.user_va) for a in ioas.areas()} if not isinstance(ioas, NoSuchIOAS) else set()
        self.removed[fd] += [a for a in before if a not in after]

    def iommufd_unmap(self, fd: int, ioas_id: int, iova: int, length: int) -> dict[str, Any]:
        ioas = self._ioas(fd, ioas_id)
        before = [(a.iova, a.last, a.user_va) for a in ioas.areas()] if not isinstance(ioas, NoSuchIOAS) else []
        rec = self._do(lambda: ioas.unmap(iova, length), length=None)
        self._note_removed(fd, before, ioas)
        return rec

    def iommufd_unmap_all(self, fd: int, ioas_id: int) -> dict[str, Any]:
        ioas = self._ioas(fd, ioas_id)
        before = [(a.iova, a.last, a.user_va) for a in ioas.areas()] if not isinstance(ioas, NoSuchIOAS) else []
        rec = self._do(lambda: ioas.unmap_all(), length=None)
        self._note_removed(fd, before, ioas)
        if self.bug == "unmap-all-zero" and rec["errno"] == 0:
            rec["length"] = 0
        return rec

    def iommufd_copy(self, fd: int, dst_ioas_id: int, src_ioas_id: int, src_iova: int, length: int,
                     dst_iova: int | None = None, readable: bool = True, writeable: bool = True) -> dict[str, Any]:
        dst, src = self._ioas(fd, dst_ioas_id), self._ioas(fd, src_ioas_id)
        return self._do(lambda: dst.copy_from(src, src_iova, length, iova=dst_iova, readable=readable,
                                              writeable=writeable), dst_iova=None)

    def iommufd_destroy(self, fd: int, id: int) -> dict[str, Any]:
        return self._do(lambda: self._ctx(fd).destroy(id))

    def iommufd_test_mock_domain(self, fd: int, ioas_id: int) -> dict[str, Any]:
        try:
            md = self._ctx(fd).mock_domain(ioas_id)
        except IommufdError as exc:
            return self._rec(exc.errno or 0, stdev_id=0, hwpt_id=0, idev_id=0)
        self.mocks[fd].append(md)
        return self._rec(0, stdev_id=md.stdev_id, hwpt_id=md.hwpt_id, idev_id=md.idev_id)

    def iommufd_test_create_access(self, fd: int, ioas_id: int, flags: int = 0) -> dict[str, Any]:
        try:
            access_id = self._ctx(fd).create_access(ioas_id, needs_pin_pages=bool(flags & 1))
        except IommufdError as exc:
            return self._rec(exc.errno or 0, access_fd=-1)
        afd = self.next_fd
        self.next_fd += 1
        self.accesses[afd] = (fd, access_id, ioas_id)
        return self._rec(0, access_fd=afd)

    def iommufd_test_access_rw(self, fd: int, access_fd: int, iova: int, user_va: int, length: int,
                               write: bool = False) -> dict[str, Any]:
        if access_fd not in self.accesses:
            return self._rec(EBADF)
        _, _, ioas_id = self.accesses[access_fd]
        return self._do(lambda: self._ctx(fd).ioas(ioas_id).access_rw(iova, length, write=write))

    def iommufd_test_check_map(self, fd: int, hwpt_id: int, iova: int, length: int, user_va: int) -> dict[str, Any]:
        ctx = self._ctx(fd)
        live = [md for md in self.mocks[fd] if md.hwpt_id == hwpt_id and md.domain.attached]
        if not live:
            return self._rec(ENOENT)
        areas = [(a.iova, a.last, a.user_va) for a in live[0].ioas.areas()]
        if self.bug == "stale-check-map":
            areas = sorted(areas + self.removed[fd])
        del ctx
        return self._rec(check_map_answer(areas, iova, length, user_va))

    def iommufd_test_refs(self, fd: int, user_va: int, length: int, max_refs: int = 4) -> dict[str, Any]:
        refs: list[int | None] = []
        for page in range(length // PAGE):
            n = sum(c.refs(user_va + page * PAGE) for c in self.ctxs.values())
            if self.bug == "refs-off" and n == 2:
                n = 1
            refs.append(n if n <= max_refs else None)
        return self._rec(0, refs=refs, ioctls=1)


# ------------------------------------------------------------------ model against model


def test_the_correct_model_never_diverges_from_itself():
    report = search(PinningTarget(), ModelExecutor(), sequences=150, seed=1, echo=quiet)
    assert report.status == "ok", report.failure
    assert report.stats.sequences == 150 and report.stats.operations > 1000


class TimedExecutor(ModelExecutor):
    """The correct model as the system, each sequence "taking" half a second of a
    clock of its own: shrinking gets the same number of runs however loaded the
    machine running the tests is."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def run(self, target: Any, planned: Any) -> Any:
        self.now += 0.5
        return super().run(target, planned)


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_every_mutant_diverges_and_shrinks(mutant):
    # Which sequences a seed gives depends on Hypothesis's state, which other test
    # modules loaded in the same process change: a mutant must be caught within 200
    # sequences of one of three seeds.
    for seed in (1, 2, 3):
        executor = TimedExecutor()
        report = search(PinningTarget(), executor, sequences=200, seed=seed, mutant=mutant, echo=quiet,
                        shrink_seconds=60, clock=lambda: executor.now)
        if report.status == "divergence":
            break
    assert report.status == "divergence", f"mutant {mutant} was not caught in 200 sequences of seeds 1, 2 and 3"
    failure = report.failure
    assert failure is not None and failure.divergence is not None
    assert failure.length <= 8, [PinningTarget().describe(p.step) for p in failure.steps]
    assert failure.divergence.step == failure.length  # the minimal sequence ends at its divergence


# ------------------------------------------------------------------ the guest side, on a fake agent


def test_the_driver_through_a_fake_agent_agrees_with_the_model():
    agent = FakeIommufdAgent()
    report = search(PinningTarget(), AgentExecutor(agent), sequences=120, seed=2,  # type: ignore[arg-type]
                    echo=quiet)
    assert report.status == "ok", report.failure and report.failure.divergence
    assert report.stats.operations > 800
    # one round trip for the setup, usually one for the steps, a few more where a step
    # needs the fd of an access created in the same batch
    assert agent.round_trips < 3 * report.stats.sequences
    assert agent.ctxs == {} and agent.regions == {} and agent.accesses == {}  # every sequence cleaned up


@pytest.mark.parametrize("bug, field", [
    ("unmap-all-zero", "length"),
    ("stale-check-map", "check_map"),
    ("refs-off", "refs"),
])
def test_a_planted_bug_of_the_fake_kernel_is_found(bug, field):
    report = search(PinningTarget(), AgentExecutor(FakeIommufdAgent(bug)),  # type: ignore[arg-type]
                    sequences=300, seed=1, echo=quiet, shrink_seconds=20)
    assert report.status == "divergence", bug
    d = report.failure.divergence
    assert d is not None and field in d.field, (bug, d)


def test_an_access_created_in_the_same_batch_is_resolved_by_a_second_round_trip():
    agent = FakeIommufdAgent()
    target = PinningTarget()
    steps = [{"op": "ioas_alloc"},
             {"op": "map", "ioas": 1, "user_va": REGION_VA, "length": 2 * PAGE, "iova": None, "readable": True,
              "writeable": True},
             {"op": "access_create", "ioas": 1, "pin": False},
             {"op": "access_rw", "access": 0, "iova": PAGE, "length": PAGE, "write": True},
             {"op": "access_rw", "access": 0, "iova": 3 * PAGE, "length": PAGE, "write": False},
             {"op": "access_close", "access": 0}]
    planned, err = engine.plan(target, None, steps, abstract=False)
    assert err is None
    observed = AgentExecutor(agent).run(target, planned)  # type: ignore[arg-type]
    assert engine.compare(target, planned, observed) is None
    assert [o["errno"] for o in observed] == [0, 0, 0, 0, ENOENT, 0]
    assert agent.round_trips == 3  # setup; up to the access; the rest with the teardown


def test_pins_and_mock_domain_probes():
    target = PinningTarget()
    steps = [{"op": "ioas_alloc"},
             {"op": "mock_domain", "ioas": 1},
             {"op": "map", "ioas": 1, "user_va": REGION_VA, "length": 2 * PAGE, "iova": None, "readable": True,
              "writeable": True},
             {"op": "map", "ioas": 1, "user_va": REGION_VA + PAGE, "length": PAGE, "iova": None, "readable": True,
              "writeable": True},
             {"op": "unmap", "ioas": 1, "iova": 0x1000000, "length": 2 * PAGE}]
    planned, err = engine.plan(target, None, steps, abstract=False)
    assert err is None
    md = planned[1].predicted
    assert (md["stdev_id"], md["idev_id"], md["hwpt_id"]) == (2, 3, 4)
    assert planned[2].predicted["iova"] == 0x1000000  # the first automatic iova inside the mock aperture
    assert planned[3].predicted["refs"][:3] == [1, 2, 0] and planned[3].predicted["vm_pin"] == 3
    assert list(planned[3].predicted["check_map"].values()) == [0, 0]
    # the unmapped area is probed once more: the mock domain must not map it any longer
    after = planned[4].predicted
    assert after["refs"][:2] == [0, 1] and after["vm_pin"] == 1
    assert list(after["check_map"].values()) == [0, EINVAL]
    assert len(after["refs"]) == REGION_PAGES and MAX_REFS >= 4


# ------------------------------------------------------------------ pieces


def test_check_map_answer():
    areas = [(0x1000000, 0x1001FFF, REGION_VA), (0x1002000, 0x1002FFF, REGION_VA + 0x5000)]
    assert check_map_answer(areas, 0x1000000, 0x2000, REGION_VA) == 0
    assert check_map_answer(areas, 0x1000800, 0x800, REGION_VA + 0x800) == 0
    assert check_map_answer(areas, 0x1000000, 0x3000, REGION_VA) == EINVAL  # the next area maps other memory
    assert check_map_answer(areas, 0x1002000, 0x1000, REGION_VA + 0x5000) == 0
    assert check_map_answer(areas, 0x1003000, 0x1000, REGION_VA) == EINVAL  # nothing there
    assert check_map_answer(areas, 0x1000400, 0x800, REGION_VA + 0x400) == EINVAL  # not 2 KiB aligned
    assert check_map_answer(areas, 0xFFF000, 0x2000, REGION_VA) == EINVAL  # a gap first


def test_an_id_that_is_no_ioas_fails_where_the_kernel_looks_it_up():
    target = PinningTarget()
    m = target.new_model(None)
    assert target.apply(m, {"op": "ioas_alloc"}) == {"errno": 0, "ioas_id": 1}
    base = {"user_va": REGION_VA, "length": PAGE, "iova": None, "readable": True, "writeable": True}
    assert target.apply(m, {"op": "map", "ioas": 7, **base}) == {"errno": ENOENT}
    # the flags are checked before the IOAS is looked up
    assert target.apply(m, {"op": "map", "ioas": 7, **base, "readable": False, "writeable": False}) == \
        {"errno": EINVAL}
    # COPY reads the source range before it looks the destination up
    copy = {"op": "copy", "dst": 9, "src": 1, "src_iova": 0x1000, "length": 0, "iova": None, "readable": True,
            "writeable": True}
    assert target.apply(m, copy) == {"errno": EINVAL}
    assert target.apply(m, {**copy, "length": PAGE}) == {"errno": ENOENT}


def test_sequences_resolve_to_valid_replayable_steps(tmp_path):
    from hypothesis import given, settings

    target = PinningTarget()
    seen: set[str] = set()

    @settings(max_examples=60, database=None, deadline=None)
    @given(target.sequences(20))
    def check(abstract: list[Any]) -> None:
        planned, err = engine.plan(target, None, abstract, abstract=True)
        assert err is None, err
        steps = [p.step for p in planned]
        assert steps[0] == {"op": "ioas_alloc"} and steps[-1]["op"] == "audit"
        assert len(steps) <= 21
        for step in steps:
            assert target.check_step(step) == step
            seen.add(step["op"])
            assert target.describe(step)
        if len(seen) > 8:
            path = replay.save(replay.ReplayFile("pinning", None, steps, 1), tmp_path)
            assert [target.check_step(s) for s in replay.load(path).steps] == steps

    check()
    assert {"map", "unmap", "copy", "mock_domain", "audit"} <= seen


@pytest.mark.parametrize("raw, needle", [
    ({"op": "fly"}, "'op' is 'fly'"),
    ({"op": "map", "ioas": 1, "user_va": -1, "length": 1, "iova": None, "readable": True, "writeable": True},
     "'user_va' is -1"),
    ({"op": "map", "ioas": 1, "user_va": 1, "length": 1, "readable": True, "writeable": True}, "missing key 'iova'"),
    ({"op": "unmap", "ioas": 1, "iova": 0, "length": 2**64}, "'length' is"),
    ({"op": "destroy", "id": 2**32}, "'id' is"),
    ({"op": "access_rw", "access": 0, "iova": 0, "length": 1, "write": 1}, "'write' is 1"),
    ({"op": "unmap_all", "ioas": 1, "extra": 2}, "unknown key 'extra'"),
    ({"op": "audit", "areas": [[1, 2]], "ioas": [1]}, "'areas'"),
    ([1, 2], "not a step object"),
])
def test_bad_steps_are_refused_with_the_key(raw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        PinningTarget().check_step(raw)


def test_the_region_and_the_machine():
    assert REGION_END - REGION_VA == REGION_LEN == REGION_PAGES * PAGE
    assert REGION_VA % (1 << 40) == 0
    spec = PinningTarget().machine()
    assert spec.iommu is None  # with intel-iommu registered first, MOCK_DOMAIN is EINVAL
    assert set(PinningTarget().mutants()) == set(MUTANTS)
