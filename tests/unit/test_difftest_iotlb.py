"""The vhost-net difftest target and the ``iotlb`` composite, without a VM: the
target against its own model and every mutant, its driver through a fake guest
agent built on the model (with planted bugs), and the composition over two toy
parts (mutant routing, replay steps, drivers, machines, counters)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from harness.difftest import command, replay
from harness.difftest.engine import (
    AgentExecutor,
    DifftestError,
    ModelExecutor,
    Stats,
    search,
    target_counters,
)
from harness.difftest.iotlb import CompositeTarget, IotlbTarget, merge_machines
from harness.difftest.report import summary
from harness.difftest.vhost_net import DELTA, REGION_VA, WINDOW_LEN, VhostNetTarget
from harness.models.iotlb_mutants import MUTANTS
from harness.models.vhost_net import IotlbMsg, VhostNetDevice
from harness.vm.spec import MachineSpec
from tests.unit.test_difftest_engine import FakeKVAgent, KVTarget


def quiet(line: str) -> None:
    pass


class VirtualClockExecutor(ModelExecutor):
    """The correct model as the system, each sequence "taking" half a second of a
    clock of its own (shrinking then gets the same number of runs on any host)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def run(self, target: Any, planned: Any) -> Any:
        self.now += 0.5
        return super().run(target, planned)


# ------------------------------------------------------------------ vhost-net: model against model


def test_the_vhost_net_target_agrees_with_its_own_model_and_counts():
    report = search(VhostNetTarget(), ModelExecutor(), sequences=40, seed=1, echo=quiet)
    assert report.status == "ok", report.failure and report.failure.divergence
    counters = report.stats.counters
    assert counters["misses compared"] > 20 and counters["errnos compared"] > report.stats.operations
    line = summary(report)
    assert "misses compared: " in line and "errnos compared: " in line and "ops/s" in line


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_every_mutant_diverges(mutant):
    executor = VirtualClockExecutor()
    report = search(VhostNetTarget(), executor, sequences=200, seed=1, mutant=mutant, echo=quiet,
                    shrink_seconds=8, clock=lambda: executor.now)
    assert report.status == "divergence", f"mutant {mutant} was not caught in 200 sequences"
    failure = report.failure
    assert failure is not None and failure.divergence is not None
    assert failure.divergence.step == failure.length
    assert failure.steps[0].step["op"] == "setup"


# ------------------------------------------------------------------ vhost-net: the driver on a fake agent


class FakeVhostAgent:
    """The guest agent's vhost ops answered by the model itself (so the driver's
    calls and observations are checked end to end); ``bug`` plants one wrong answer:
    ``miss-perm`` (every MISS says perm 3), ``size0-ok`` (an UPDATE of size 0 is
    accepted), ``no-pollin`` (poll never reports a queued message)."""

    def __init__(self, bug: str | None = None):
        self.bug = bug
        self.devs: dict[int, VhostNetDevice] = {}
        self.regions: set[int] = set()
        self.next_fd = 5

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        assert op == "batch"
        return [{"ok": True, "result": self._one(c["op"], dict(c["args"]))} for c in args["calls"]]

    def _tail(self, dev: VhostNetDevice, rec: dict[str, Any], read: bool) -> dict[str, Any]:
        rec.update(flush_errno=0, pollin=dev.pollin and self.bug != "no-pollin", vm_pin=0, vm_lck=0)
        if read:
            rec["misses"] = [{"outer": 2, "asid": 0, "type": 1, "iova": m.iova, "size": 0, "uaddr": 0,
                              "perm": 3 if self.bug == "miss-perm" else m.perm} for m in dev.read_all()]
        return rec

    def _one(self, op: str, a: dict[str, Any]) -> dict[str, Any]:
        if op == "vhost.net_open":
            fd = self.next_fd
            self.next_fd += 1
            self.devs[fd] = VhostNetDevice()
            return {"errno": 0, "fd": fd, "vm_pin": 0, "vm_lck": 0}
        if op == "mem.map":
            assert a["at"] == REGION_VA and a["length"] == WINDOW_LEN
            self.regions.add(a["at"])
            return {"user_va": a["at"], "length": a["length"]}
        if op == "mem.unmap":
            self.regions.remove(a["user_va"])
            return {"user_va": a["user_va"]}
        if op == "vhost.close":
            del self.devs[a["fd"]]
            return {"errno": 0, "closed": 1}
        dev = self.devs[a["fd"]]
        if op == "vhost.net_setup":
            errnos = {"set_owner": 0, "set_mem_table": 0, "set_features": dev.set_features(a["features"]),
                      "set_backend_features": 0}
            for i, (desc, avail, used) in enumerate(a["rings"]):
                errnos[f"vring{i}"] = dev.set_vring(i, a["num"], desc, avail, used)
                errnos[f"kick{i}"] = 0
            errnos["socket"] = 0
            return {"errno": next((e for e in errnos.values() if e), 0), "errnos": errnos, "sock": 9,
                    "vm_pin": 0, "vm_lck": 0}
        if op == "vhost.write":
            results = []
            for m in a["msgs"]:
                msg = IotlbMsg(**m)
                if self.bug == "size0-ok" and msg.type == 2 and msg.size == 0:
                    results.append([0, 72])
                    continue
                results.append(list(dev.write(msg)))
            return self._tail(dev, {"errno": 0, "results": results}, a["read"])
        if op == "vhost.fill":
            import hashlib
            import struct
            h, ok, errnos = hashlib.sha256(), 0, {}
            for k in range(a["n"]):
                at = a["iova"] + k * a["stride"]
                err, written = dev.write(IotlbMsg(2, at, a["size"], (at + a["uaddr_delta"]) % 2**64, a["perm"]))
                h.update(struct.pack("<iq", err, written))
                if err:
                    errnos[str(err)] = errnos.get(str(err), 0) + 1
                else:
                    ok += 1
            return self._tail(dev, {"errno": 0, "written": ok, "errnos": errnos, "sha256": h.hexdigest()},
                              a["read"])
        if op == "vhost.set_backend":
            err = dev.set_backend(a["index"], a["backend"] == "sock")
            return self._tail(dev, {"errno": err}, a["read"])
        if op == "vhost.kick":
            dev.kick(a["index"])
            return self._tail(dev, {"errno": 0}, a["read"])
        if op == "vhost.set_features":
            return {"errno": dev.set_features(a["features"]), "vm_pin": 0, "vm_lck": 0}
        if op == "vhost.read":
            return self._tail(dev, {"errno": 0}, True)
        raise AssertionError(op)


def test_the_driver_through_a_fake_agent_agrees_with_the_model():
    agent = FakeVhostAgent()
    report = search(VhostNetTarget(), AgentExecutor(agent), sequences=40, seed=2, echo=quiet)  # type: ignore[arg-type]
    assert report.status == "ok", report.failure and report.failure.divergence
    assert report.stats.counters["misses compared"] > 0
    assert agent.devs == {} and agent.regions == set()  # every sequence cleaned up


@pytest.mark.parametrize("bug, field", [("miss-perm", "misses"), ("size0-ok", "results"), ("no-pollin", "pollin")])
def test_a_planted_bug_of_the_system_diverges(bug, field):
    report = search(VhostNetTarget(), AgentExecutor(FakeVhostAgent(bug)), sequences=200, seed=1,  # type: ignore[arg-type]
                    echo=quiet, shrink_seconds=5)
    assert report.status == "divergence", bug
    d = report.failure.divergence if report.failure else None
    assert d is not None and d.field.startswith(field), (bug, d)


def test_vhost_net_steps_validate_and_describe():
    t = VhostNetTarget()
    step = t.check_step({"op": "write", "read": True,
                         "msgs": [{"type": 2, "iova": 0x40000, "size": 16, "uaddr": 0x40000 + DELTA, "perm": 3}]})
    assert t.describe(step) == "write UPDATE iova 0x40000 size 0x10 uaddr linear perm 3"
    assert t.describe(t.check_step({"op": "kick", "vq": 1, "read": False})) == "kick vq 1 (not read)"
    for bad, needle in [({"op": "kick", "vq": 2, "read": True}, "'vq'"),
                        ({"op": "write", "read": True, "msgs": []}, "'msgs'"),
                        ({"op": "write", "read": True, "msgs": [{"type": 2}]}, "without"),
                        ({"op": "fill", "n": 99999, "iova": 0, "stride": 1, "size": 1, "perm": 3, "read": True}, "'n'"),
                        ({"op": "setup", "num": 8, "rings": [[0, 0, 0], [0, 0, 0]]}, "window"),
                        ({"op": "nope"}, "'op'"),
                        ({"op": "reset", "extra": 1}, "unknown key")]:
        with pytest.raises(ValueError, match=needle):
            t.check_step(bad)


# ------------------------------------------------------------------ the composite over toy parts


class OtherKV(KVTarget):
    """A second toy part with one mutant name of its own and one shared."""

    def mutants(self) -> Mapping[str, str]:
        return {"delete-keeps": "delete answers 0 but keeps the key", "crash": "raises on put of key 3"}

    def machine(self) -> MachineSpec:
        return MachineSpec(cmdline="foo=1 bar", memory_mib=2048)


class RenamedKV(KVTarget):
    def mutants(self) -> Mapping[str, str]:
        return {"keeps": "delete answers 0 but keeps the key"}

    def new_model(self, mutant: str | None) -> Any:
        return super().new_model({"keeps": "delete-keeps"}.get(mutant or "", mutant))

    def counters(self, step: Any, predicted: Any) -> dict[str, int]:
        return {"errnos compared": 1}


def composite() -> CompositeTarget:
    return CompositeTarget("both", "two toy stores", {"a": RenamedKV(), "b": OtherKV()})


def test_mutants_are_the_union_and_replace_only_their_part():
    t = composite()
    assert sorted(t.mutants()) == ["crash", "delete-keeps", "keeps"]
    assert t.mutant_owner("keeps") == ("a", "keeps") and t.mutant_owner("crash") == ("b", "crash")
    clash = CompositeTarget("c", "", {"a": KVTarget(), "b": OtherKV()})
    assert sorted(clash.mutants()) == ["a.crash", "a.delete-keeps", "b.crash", "b.delete-keeps"]
    with pytest.raises(KeyError):
        t.new_model("nope")
    m = t.new_model("crash")
    assert m.of("a").crash_on is None  # the other part runs its correct model
    m2 = t.new_model("crash")
    assert m2.of("b").crash_on == 3
    with pytest.raises(ValueError, match="part 'a'"):
        m2.of("a")


def test_each_sequence_belongs_to_one_part_and_a_mutant_diverges_in_its_own():
    t = composite()
    report = search(t, ModelExecutor(), sequences=60, seed=1, echo=quiet)
    assert report.status == "ok"
    assert report.stats.counters.get("errnos compared", 0) > 0  # part a's counters(step, predicted)
    report = search(t, ModelExecutor(), sequences=200, seed=1, mutant="delete-keeps", echo=quiet)
    assert report.status == "divergence" and report.failure is not None
    assert {p.step["part"] for p in report.failure.steps} == {"b"}
    assert report.failure.divergence is not None and report.failure.divergence.op.startswith("[b] ")


def test_composite_steps_validate_and_route_to_their_driver():
    t = composite()
    step = t.check_step({"op": "put", "key": 1, "value": 2, "part": "b"})
    assert step == {"op": "put", "key": 1, "value": 2, "part": "b"}
    with pytest.raises(ValueError, match="'part'"):
        t.check_step({"op": "put", "key": 1, "value": 2, "part": "z"})
    with pytest.raises(ValueError, match="not a kv op"):
        t.check_step({"op": "zap", "part": "a"})
    with pytest.raises(DifftestError, match="one part"):
        t.driver_for([{"op": "take", "part": "a"}, {"op": "take", "part": "b"}])
    with pytest.raises(DifftestError):
        t.driver()
    agent = FakeKVAgent(delete_keeps=True)
    report = search(t, AgentExecutor(agent), sequences=200, seed=1, echo=quiet)  # type: ignore[arg-type]
    assert report.status == "divergence"  # the fake agent's planted bug, seen through the part's driver


def test_machines_merge_and_conflicts_are_refused():
    merged = composite().machine()
    assert merged.cmdline == "foo=1 bar" and merged.memory_mib == 2048
    merged = merge_machines([MachineSpec(cmdline="a b"), MachineSpec(cmdline="b c", cpus=2)])
    assert merged.cmdline == "a b c" and merged.cpus == 2
    with pytest.raises(DifftestError, match="machine"):
        merge_machines([MachineSpec(), MachineSpec(machine="pc")])


def test_counters_of_either_signature():
    stats = Stats()
    assert target_counters(KVTarget()) is None
    one = target_counters(VhostNetTarget())
    assert one is not None and one({"op": "read"}, {"misses": [{}, {}], "pollin": True}) == \
        {"misses compared": 2, "errnos compared": 0}

    class OneArg:
        def counters(self, predicted: Any) -> dict[str, int]:
            return {"n": len(predicted)}

    two = target_counters(OneArg())
    assert two is not None and two({"op": "x"}, {"a": 1, "b": 2}) == {"n": 2}
    assert stats.counters == {}


def test_the_iotlb_target_and_its_replay_file_through_the_command(tmp_path):
    """``iotlb`` with a mutant diverges, saves a replay file whose steps name their
    part, and the file re-runs (the correct model stands in for the kernel)."""
    from harness.cli import build_parser
    t = IotlbTarget()
    assert "vhost-net" in t.parts and "del-range-split" in t.mutants()
    assert "vdpa_sim.use_va=0" in t.machine().cmdline or "vhost-vdpa" not in t.parts
    lines: list[str] = []

    def run(argv: list[str]) -> int:
        args = build_parser().parse_args(["difftest", *argv])
        return command.run_command(args, lambda: pytest.fail("no VM in unit tests"), executor=ModelExecutor(),
                                   echo=lines.append)

    code = run(["iotlb", "--sequences", "200", "--seed", "1", "--model-mutant", "tie-newest", "--out",
                str(tmp_path), "--shrink-seconds", "5"])
    assert code == 1, "\n".join(lines)
    (path,) = tmp_path.iterdir()
    saved = replay.load(path)
    assert saved.model == "iotlb" and {s["part"] for s in saved.steps} == {"vhost-net"}
    lines.clear()
    assert run(["--replay", str(path)]) == 1
    assert any("diverges as saved" in line for line in lines)
    lines.clear()
    assert run(["--replay", str(path), "--model-mutant", "none"]) == 0
