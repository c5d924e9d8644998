"""The differential-testing engine without a VM: a small key-value target whose
"system" is a second, correct model (ModelExecutor) or a fake guest agent
(AgentExecutor over a fake ``batch``), the search, shrinking, the comparison,
replay files and the command's bad-input cases."""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st

from harness import difftest
from harness.cli import main
from harness.difftest import command, engine, replay
from harness.difftest.engine import (
    AgentExecutor,
    Call,
    ModelExecutor,
    Observation,
    Pending,
    Probe,
    Step,
    first_difference,
    search,
)
from harness.errors import AgentError, ConfigError
from harness.vm.spec import MachineSpec

ENOENT, EEXIST = errno.ENOENT, errno.EEXIST


# ------------------------------------------------------------------ a toy target


class KV:
    """A key-value store with tickets: put (EEXIST if present), delete (ENOENT if
    absent), get (the value or ENOENT), take (a numbered ticket), drop (a ticket)."""

    def __init__(self, delete_keeps: bool = False, crash_on: int | None = None):
        self.data: dict[int, int] = {}
        self.tickets: list[int] = []
        self.next_ticket = 100
        self.delete_keeps = delete_keeps
        self.crash_on = crash_on

    def apply(self, step: Step) -> Observation:
        op, k = step["op"], step.get("key", 0)
        if self.crash_on is not None and op == "put" and k == self.crash_on:
            raise RuntimeError(f"crash on key {k}")
        if op == "put":
            if k in self.data:
                return {"errno": EEXIST}
            self.data[k] = step["value"]
            return {"errno": 0}
        if op == "delete":
            if k not in self.data:
                return {"errno": ENOENT}
            if not self.delete_keeps:
                del self.data[k]
            return {"errno": 0}
        if op == "get":
            return {"errno": 0, "value": self.data[k]} if k in self.data else {"errno": ENOENT}
        if op == "take":
            self.next_ticket += 1
            self.tickets.append(self.next_ticket)
            return {"errno": 0}
        if op == "drop":
            t = step["ticket"]
            if t >= len(self.tickets) or self.tickets[t] == 0:
                return {"errno": ENOENT}
            self.tickets[t] = 0
            return {"errno": 0}
        raise AssertionError(op)


class KVDriver:
    """The system side: a fake agent's kv.* ops; ``take`` returns a ticket that a
    later ``drop`` names (so a drop of a ticket taken in the same batch is Pending)."""

    def __init__(self) -> None:
        self.handle: int | None = None
        self.tickets: list[int] = []
        self.taken = 0

    def setup(self) -> list[Call]:
        return [{"op": "kv.open", "args": {}}]

    def bind_setup(self, results: list[Any]) -> None:
        self.handle = results[0]["handle"]

    def calls(self, step: Step, probes: Sequence[Probe]) -> list[Call]:
        args: dict[str, Any] = {"h": self.handle, **{k: v for k, v in step.items() if k != "op"}}
        if step["op"] == "take":
            self.taken += 1
        if step["op"] == "drop":
            if step["ticket"] < self.taken:
                if step["ticket"] >= len(self.tickets):
                    raise Pending()
                args["ticket"] = self.tickets[step["ticket"]]
            else:
                args["ticket"] = -1
        return [{"op": f"kv.{step['op']}", "args": args}] + [{"op": "kv.keys", "args": {"h": self.handle}}
                                                             for _ in probes]

    def observe(self, step: Step, probes: Sequence[Probe], results: list[Any]) -> Observation:
        obs = dict(results[0])
        if step["op"] == "take" and obs.get("ticket") is not None:
            self.tickets.append(obs.pop("ticket"))
        if probes:
            obs["keys"] = results[1]
        return obs

    def teardown(self) -> list[Call]:
        return [{"op": "kv.close", "args": {"h": self.handle}}]


class KVTarget:
    name = "kv"
    description = "a toy key-value store"
    system = "fake"

    def mutants(self) -> Mapping[str, str]:
        return {"delete-keeps": "delete answers 0 but keeps the key", "crash": "raises on put of key 3"}

    def new_model(self, mutant: str | None) -> KV:
        if mutant not in (None, "delete-keeps", "crash"):
            raise KeyError(mutant)
        return KV(delete_keeps=mutant == "delete-keeps", crash_on=3 if mutant == "crash" else None)

    def sequences(self, max_steps: int) -> st.SearchStrategy[list[Any]]:
        key = st.integers(0, 7)
        step = st.one_of(
            st.builds(lambda k, v: {"op": "put", "key": k, "value": v}, key, st.integers(0, 1000)),
            st.builds(lambda k: {"op": "delete", "key": k}, key),
            st.builds(lambda k: {"op": "get", "key": k}, key),
            st.just({"op": "take"}),
            st.builds(lambda t: {"op": "drop", "ticket": t}, st.integers(0, 3)),
        )
        return st.lists(step, min_size=1, max_size=max_steps)

    def resolve(self, model: KV, abstract: Any) -> Step:
        return dict(abstract)

    def apply(self, model: KV, step: Step) -> Observation:
        return model.apply(step)

    def probes(self, model: KV) -> list[Probe]:
        return [{"keys": True}]

    def answer_probes(self, model: KV, probes: Sequence[Probe]) -> Observation:
        return {"keys": sorted(model.data)} if probes else {}

    def check_step(self, raw: Any) -> Step:
        if not isinstance(raw, dict) or raw.get("op") not in ("put", "delete", "get", "take", "drop"):
            raise ValueError(f"'op' is {raw.get('op') if isinstance(raw, dict) else raw!r}, not a kv op")
        return dict(raw)

    def describe(self, step: Step) -> str:
        return " ".join(f"{k}={v}" if k != "op" else str(v) for k, v in step.items())

    def format_value(self, field_name: str, value: Any) -> str:
        return engine.format_value(field_name, value)

    def driver(self) -> KVDriver:
        return KVDriver()

    def machine(self) -> MachineSpec:
        return MachineSpec()


class FakeKVAgent:
    """A fake guest agent answering ``batch`` with a correct (or planted) store."""

    def __init__(self, delete_keeps: bool = False, fail_op: str | None = None):
        self.stores: dict[int, KV] = {}
        self.round_trips = 0
        self.delete_keeps = delete_keeps
        self.fail_op = fail_op
        self.closed: list[int] = []

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        assert op == "batch"
        self.round_trips += 1
        return [self._one(c["op"], c["args"]) for c in args["calls"]]

    def _one(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == self.fail_op:
            return {"ok": False, "error": {"type": "ValueError", "message": "planted"}}
        if op == "kv.open":
            h = len(self.stores) + 1
            self.stores[h] = KV(delete_keeps=self.delete_keeps)
            return {"ok": True, "result": {"handle": h}}
        store = self.stores[args.pop("h")]
        if op == "kv.close":
            self.closed.append(len(store.data))
            return {"ok": True, "result": {}}
        if op == "kv.keys":
            return {"ok": True, "result": sorted(store.data)}
        if op == "kv.take":
            store.apply({"op": "take"})
            return {"ok": True, "result": {"errno": 0, "ticket": store.next_ticket}}
        if op == "kv.drop":
            ticket = args["ticket"]
            index = store.tickets.index(ticket) if ticket in store.tickets else 99
            return {"ok": True, "result": store.apply({"op": "drop", "ticket": index})}
        return {"ok": True, "result": store.apply({"op": op.removeprefix("kv."), **args})}


def quiet(line: str) -> None:
    pass


# ------------------------------------------------------------------ comparison


def test_first_difference_names_the_first_field_in_prediction_order():
    assert first_difference({"errno": 0, "iova": 5}, {"errno": 0, "iova": 5, "extra": 1}) is None
    assert first_difference({"errno": 0, "iova": 5}, {"errno": 2, "iova": 6}) == ("errno", 0, 2)
    assert first_difference({"refs": [1, 1, 2]}, {"refs": [1, 1, 3]}) == ("refs[2]", 2, 3)
    assert first_difference({"refs": [1]}, {"refs": [1, 1]}) == ("refs", [1], [1, 1])
    assert first_difference({"a": {"b": 1}}, {"a": {"b": 2}}) == ("a.b", 1, 2)
    assert first_difference({"x": 1}, {}) == ("x", 1, engine.MISSING)
    assert first_difference({"ok": True}, {"ok": 1}) == ("ok", True, 1)


def test_format_value_names_errnos_and_hex_addresses():
    assert engine.format_value("errno", 2) == "2 (ENOENT)"
    assert engine.format_value("errno", 0) == "0"
    assert engine.format_value("iova", 0x1000000) == "0x1000000"
    assert engine.format_value("refs[3]", 2) == "2"


# ------------------------------------------------------------------ search


def test_correct_model_against_itself_never_diverges():
    report = search(KVTarget(), ModelExecutor(), sequences=60, seed=1, echo=quiet)
    assert report.status == "ok", report.failure
    assert report.stats.sequences == 60 and report.stats.operations > 60
    assert report.stats.compared == report.stats.operations and report.stats.divergent == 0


def test_mutant_diverges_and_shrinks_to_the_minimal_sequence():
    report = search(KVTarget(), ModelExecutor(), sequences=200, seed=1, mutant="delete-keeps", echo=quiet)
    assert report.status == "divergence"
    failure = report.failure
    assert failure is not None and failure.divergence is not None
    # the smallest witness: put k, delete k (the keys probe after it differs)
    assert [p.step["op"] for p in failure.steps] == ["put", "delete"]
    assert failure.divergence.step == 2 and failure.divergence.field.startswith("keys")
    assert failure.steps[0].step["key"] == failure.steps[1].step["key"]
    assert report.first_length is not None and report.first_length >= 2


def test_shrinking_stops_at_its_time_limit():
    ticks = iter(range(10**6))
    report = search(KVTarget(), ModelExecutor(), sequences=200, seed=3, mutant="delete-keeps", echo=quiet,
                    shrink_seconds=0, clock=lambda: float(next(ticks)))
    assert report.status == "divergence"
    assert any("shrinking stopped" in n for n in report.notes)


def test_same_seed_same_sequences():
    def steps(seed: int) -> list[Step]:
        class Recorder(ModelExecutor):
            seen: list[Step] = []

            def run(self, target, planned):  # type: ignore[no-untyped-def]
                self.seen.extend(p.step for p in planned)
                return super().run(target, planned)
        rec = Recorder()
        rec.seen = []
        search(KVTarget(), rec, sequences=20, seed=seed, echo=quiet)
        return rec.seen
    assert steps(5) == steps(5)
    assert steps(5) != steps(6)


def test_a_model_that_raises_is_a_model_error_with_its_step():
    report = search(KVTarget(), ModelExecutor(), sequences=200, seed=2, mutant="crash", echo=quiet)
    assert report.status == "model-error"
    err = report.failure.model_error
    assert err is not None and "crash on key 3" in err.error and err.concrete == {"op": "put", "key": 3,
                                                                                    "value": 0}
    assert report.failure.steps == []  # shrunk to the crashing step alone


def test_bad_search_arguments():
    for kwargs in ({"sequences": 0}, {"sequences": 1, "max_steps": 0}, {"sequences": 1, "shrink_seconds": -1}):
        with pytest.raises(ValueError):
            search(KVTarget(), ModelExecutor(), seed=0, echo=quiet, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the agent executor


def test_agent_executor_batches_and_resolves_pending_values():
    agent = FakeKVAgent()
    target = KVTarget()
    steps = [{"op": "put", "key": 1, "value": 7}, {"op": "take"}, {"op": "get", "key": 1},
             {"op": "drop", "ticket": 0}, {"op": "drop", "ticket": 0}, {"op": "delete", "key": 1}]
    planned, err = engine.plan(target, None, steps, abstract=False)
    assert err is None
    observed = AgentExecutor(agent).run(target, planned)  # type: ignore[arg-type]
    assert engine.compare(target, planned, observed) is None
    assert [o["errno"] for o in observed] == [0, 0, 0, 0, ENOENT, 0]
    # setup; the steps up to the drop that needs the ticket; the rest with the teardown
    assert agent.round_trips == 3
    assert agent.closed == [0]


def test_agent_executor_sees_a_planted_bug_of_the_system():
    report = search(KVTarget(), AgentExecutor(FakeKVAgent(delete_keeps=True)),  # type: ignore[arg-type]
                    sequences=200, seed=1, echo=quiet)
    assert report.status == "divergence"
    assert [p.step["op"] for p in report.failure.steps] == ["put", "delete"]


def test_agent_executor_raises_for_a_failed_call_and_still_tears_down():
    agent = FakeKVAgent(fail_op="kv.get")
    target = KVTarget()
    planned, _ = engine.plan(target, None, [{"op": "put", "key": 1, "value": 1}, {"op": "get", "key": 1}],
                             abstract=False)
    with pytest.raises(AgentError, match="kv.get"):
        AgentExecutor(agent).run(target, planned)  # type: ignore[arg-type]
    assert agent.closed == [1]  # the teardown ran after the failed batch


# ------------------------------------------------------------------ replay files


def test_replay_file_round_trips(tmp_path):
    saved = replay.ReplayFile("kv", "delete-keeps", [{"op": "put", "key": 1, "value": 2}], seed=4,
                              divergence={"step": 1, "field": "errno"})
    path = replay.save(saved, tmp_path / "out")
    assert path.parent == tmp_path / "out" and path.name.startswith("kv-delete-keeps-seed4-")
    again = replay.load(path)
    assert again == saved
    assert json.loads(path.read_text())["command"] == f"python -m harness difftest --replay {path}"
    assert replay.save(saved, tmp_path / "out") != path  # a second save does not overwrite the first


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    (b"{not json", "is not JSON"),
    (b"\xff\xfe", "is not UTF-8"),
    (b"[1, 2]", "is not a difftest replay file"),
    (b'{"format": "something-else"}', "is not a difftest replay file"),
    (b'{"format": "dma-harness-difftest-replay", "version": 9}', "version 9"),
    (b'{"format": "dma-harness-difftest-replay", "version": 1, "model": 3, "steps": [{}]}', "no model name"),
    (b'{"format": "dma-harness-difftest-replay", "version": 1, "model": "kv", "steps": []}', "no \\\"steps\\\""),
    (b'{"format": "dma-harness-difftest-replay", "version": 1, "model": "kv", "mutant": 5, "steps": [{}]}',
     "mutant"),
])
def test_bad_replay_files_are_one_config_error(tmp_path, content, needle):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        replay.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert needle.replace("\\", "") in str(info.value)


# ------------------------------------------------------------------ the command, no VM


@pytest.fixture
def kv_registered(monkeypatch):
    monkeypatch.setitem(difftest.TARGETS, "kv", (__name__, "KVTarget"))


def run_command(argv: list[str], executor: engine.Executor, lines: list[str]) -> int:
    from harness.cli import build_parser
    args = build_parser().parse_args(["difftest", *argv])
    return command.run_command(args, lambda: pytest.fail("no VM in unit tests"), executor=executor,
                               echo=lines.append)


def test_command_ok_divergence_and_replay(kv_registered, tmp_path, capsys):
    lines: list[str] = []
    assert run_command(["kv", "--sequences", "30", "--seed", "1", "--out", str(tmp_path)], ModelExecutor(),
                       lines) == 0
    assert "divergences: 0" in lines[-1] and "ops/s" in lines[-1]
    assert list(tmp_path.iterdir()) == []

    lines = []
    code = run_command(["kv", "--sequences", "200", "--seed", "1", "--model-mutant", "delete-keeps", "--out",
                        str(tmp_path)], ModelExecutor(), lines)
    assert code == 1
    text = "\n".join(lines)
    assert "first divergent step: 2 of 2: delete" in text and "field:  keys" in text
    (path,) = tmp_path.iterdir()
    assert f"replay with: python -m harness difftest --replay {path}" in text
    saved = replay.load(path)
    assert saved.model == "kv" and saved.mutant == "delete-keeps" and len(saved.steps) == 2

    # the file's mutant is used; it diverges as saved; against the correct model it does not
    lines = []
    assert run_command(["--replay", str(path)], ModelExecutor(), lines) == 1
    assert any("diverges as saved: step 2" in line for line in lines)
    lines = []
    assert run_command(["kv", "--replay", str(path), "--model-mutant", "crash"], ModelExecutor(), lines) == 0
    lines = []
    assert run_command(["--replay", str(path), "--model-mutant", "none"], ModelExecutor(), lines) == 0
    assert "against the model" in lines[0]
    # a replay never writes a new file
    assert len(list(tmp_path.iterdir())) == 1


def test_command_inconclusive_when_nothing_is_compared(kv_registered, tmp_path, capsys):
    from harness.cli import build_parser
    args = build_parser().parse_args(["difftest", "kv", "--out", str(tmp_path)])
    report = engine.Report("kv", None, 0, engine.Stats(sequences=3))
    assert report.status == "inconclusive"
    lines: list[str] = []
    assert command._finish(command.Inputs(args), report, lines.append) == 3
    assert "inconclusive" in capsys.readouterr().err


def test_an_executor_that_answers_fewer_steps_is_an_error():
    class Short(ModelExecutor):
        def run(self, target, planned):  # type: ignore[no-untyped-def]
            return super().run(target, planned)[:-1]

    with pytest.raises(engine.DifftestError, match="answered"):
        engine.replay_steps(KVTarget(), Short(), [{"op": "take"}], mutant=None)


def test_model_error_exits_70_and_saves_the_crashing_step(kv_registered, tmp_path):
    lines: list[str] = []
    code = run_command(["kv", "--sequences", "200", "--seed", "2", "--model-mutant", "crash", "--out",
                        str(tmp_path)], ModelExecutor(), lines)
    assert code == 70
    (path,) = tmp_path.iterdir()
    assert replay.load(path).steps[-1] == {"op": "put", "key": 3, "value": 0}
    assert any("the model raised at step 1" in line for line in lines)


def assert_usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> None:
    try:
        code = main(["difftest", *argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line(kv_registered, tmp_path, capsys):
    assert_usage_error(capsys, ["nosuchmodel"], "'nosuchmodel'", "pinning")
    assert_usage_error(capsys, ["kv", "--model-mutant", "nope"], "'nope'", "crash", "delete-keeps")
    assert_usage_error(capsys, ["kv", "--sequences", "0"], "--sequences 0")
    assert_usage_error(capsys, ["kv", "--sequences", "-3"], "--sequences -3")
    assert_usage_error(capsys, ["kv", "--sequences", "many"], "--sequences", "'many'")
    assert_usage_error(capsys, ["kv", "--shrink-seconds", "-1"], "--shrink-seconds")
    assert_usage_error(capsys, [], "--replay")
    assert_usage_error(capsys, ["--replay", str(tmp_path / "missing.json")], "missing.json", "does not exist")
    (tmp_path / "bad.json").write_text("{oops")
    assert_usage_error(capsys, ["--replay", str(tmp_path / "bad.json")], "bad.json", "not JSON")
    (tmp_path / "other.json").write_text('{"some": "json"}')
    assert_usage_error(capsys, ["--replay", str(tmp_path / "other.json")], "other.json", "not a difftest replay")
    other = replay.save(replay.ReplayFile("kv", None, [{"op": "take"}]), tmp_path)
    assert_usage_error(capsys, ["pinning", "--replay", str(other)], str(other), "model 'kv'", "'pinning'")
    bad_mutant = replay.save(replay.ReplayFile("kv", "gone", [{"op": "take"}]), tmp_path)
    assert_usage_error(capsys, ["--replay", str(bad_mutant)], "'gone'", "delete-keeps")
    bad_step = replay.save(replay.ReplayFile("kv", None, [{"op": "take"}, {"op": "fly"}]), tmp_path)
    assert_usage_error(capsys, ["--replay", str(bad_step)], "step 2", "'fly'")
    unknown = replay.save(replay.ReplayFile("grant-x", None, [{"op": "take"}]), tmp_path)
    assert_usage_error(capsys, ["--replay", str(unknown)], "unknown model 'grant-x'")
    (tmp_path / "file").write_text("")
    assert_usage_error(capsys, ["kv", "--out", str(tmp_path / "file")], "--out", "not a folder")


# ------------------------------------------------------------------ shrinking keeps to one failure, interrupts


class TwoBugs(KVTarget):
    """delete keeps the key (seen by the keys probe), and get of key 0 on an empty store
    answers 0 instead of ENOENT."""

    def mutants(self) -> Mapping[str, str]:
        return {"two-bugs": "delete keeps the key; get 0 answers 0"}

    def new_model(self, mutant: str | None) -> KV:
        return TwoBugsKV(delete_keeps=mutant == "two-bugs") if mutant else KV()


class TwoBugsKV(KV):
    def apply(self, step: Step) -> Observation:
        if self.delete_keeps and step["op"] == "get" and step["key"] == 0 and not self.data:
            return {"errno": 0, "value": 0}
        return super().apply(step)


def test_shrinking_does_not_slip_to_another_divergence():
    state = engine._Search(TwoBugs(), ModelExecutor(), mutant="two-bugs", sequences=10, shrink_seconds=60,
                           echo=quiet, progress_seconds=60, clock=lambda: 0.0)
    first = [{"op": "put", "key": 5, "value": 1}, {"op": "delete", "key": 5}]
    with pytest.raises(engine._SequenceFailed):
        state.run(first)
    assert state.signature == ("divergence", "delete", "keys")
    state.run([{"op": "get", "key": 0}])  # a smaller divergence of another kind: passes while shrinking
    assert state.best is not None and len(state.best.steps) == 2
    with pytest.raises(engine._SequenceFailed):
        state.run([{"op": "put", "key": 3, "value": 1}, {"op": "delete", "key": 3}])


def test_an_interrupt_propagates_and_the_sequence_is_torn_down():
    class Interrupting(FakeKVAgent):
        def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
            if any(c["op"] == "kv.get" for c in args["calls"]):
                raise KeyboardInterrupt()
            return super().call(op, timeout, **args)

    agent = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        search(KVTarget(), AgentExecutor(agent), sequences=50, seed=1, echo=quiet)  # type: ignore[arg-type]
    assert agent.closed  # the interrupted sequence's teardown still ran
