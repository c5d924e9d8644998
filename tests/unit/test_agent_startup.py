"""The guest agent's start-up path: the hello needs no op module, ops are imported
on first use, and the initrd carries the agent's bytecode for the guest's Python."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from guest_agent import protocol
from guest_agent.__main__ import parse_args
from harness.images import rootfs

AGENT_DIR = Path(protocol.__file__).parent


def _agent(*lines: str, args: tuple[str, ...] = ("--stdio",)) -> tuple[int, list[dict[str, object]], str]:
    proc = subprocess.run([sys.executable, "-S", "-m", "guest_agent", *args], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=60, cwd=AGENT_DIR.parent)
    return proc.returncode, [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()], proc.stderr


def test_hello_before_any_op_module_is_imported() -> None:
    code = ("import sys, guest_agent.__main__ as m, guest_agent.protocol as p;"
            "mods = sorted(n for n in sys.modules if n.startswith('guest_agent.'));"
            "print(mods, len(p.OPS))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=AGENT_DIR.parent, check=True).stdout
    assert out.strip() == "['guest_agent.__main__', 'guest_agent.protocol', 'guest_agent.system'] 6"


def test_ops_are_imported_by_prefix_then_all() -> None:
    rc, replies, _ = _agent('{"id":1,"op":"mem.map","args":{"length":4096}}', '{"id":2,"op":"fd.list"}',
                            '{"id":3,"op":"nosuch"}', '{"id":4,"op":"batch","args":{"calls":[{"op":"ping"}]}}')
    assert rc == 0
    hello, mapped, fds, unknown, batch = replies
    assert hello["event"] == "ready"
    assert mapped["ok"] and mapped["result"]["length"] == 4096  # type: ignore[index]
    assert fds["ok"]  # "fd." is kabi's prefix, not a module: found by importing every module
    assert unknown["error"]["type"] == "UnknownOp"  # type: ignore[index]
    known = unknown["error"]["known"]  # type: ignore[index]
    assert {"xen.info", "iommufd.ioas_alloc", "nvme.pattern_rw"} <= set(known)


def test_every_module_registers_through_load_all() -> None:
    protocol.load_all()
    prefixes = {name.split(".")[0] for name in protocol.OPS if "." in name}
    modules = {p.stem for p in AGENT_DIR.glob("*.py")} - {"__init__", "__main__", "protocol", "system", "kabi"}
    assert modules <= prefixes


def test_a_module_that_fails_to_import_is_an_op_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> object:
        raise ImportError(f"planted: {name}")
    monkeypatch.setattr(protocol.importlib, "import_module", broken)
    monkeypatch.setattr(protocol, "_ALL_LOADED", False)
    reply = protocol.dispatch("nosuchmodule_xyz.op", {})
    assert reply["ok"] is False and reply["error"]["type"] == "ImportError"


@pytest.mark.parametrize("argv, expected", [(["--stdio"], None), (["--serial", "org.x.0"], "org.x.0"),
                                            (["--serial=org.x.0"], "org.x.0")])
def test_parse_args(argv: list[str], expected: str | None) -> None:
    assert parse_args(argv) == expected


@pytest.mark.parametrize("argv", [[], ["--serial"], ["--serial", ""], ["--stdio", "--serial", "x"], ["--bogus"]])
def test_bad_arguments_exit_2_with_usage(argv: list[str]) -> None:
    rc, replies, err = _agent(args=tuple(argv))
    assert rc == 2 and replies == [] and err.strip() == "usage: guest_agent (--serial NAME | --stdio)"


def test_bytecode_for_every_agent_module() -> None:
    sources = rootfs._agent_files()
    pycs = rootfs.agent_bytecode(sources)
    if sys.version_info[:2] != rootfs.GUEST_PYTHON:
        assert pycs == {}
        return
    assert len(pycs) == len(sources)
    for path, data in pycs.items():
        folder, name = path.rsplit("/", 1)
        assert folder == "opt/dma-harness/guest_agent/__pycache__" and name.endswith(".cpython-311.pyc")
        assert f"opt/dma-harness/guest_agent/{name.split('.')[0]}.py" in sources
        assert data[:4] == importlib.util.MAGIC_NUMBER
        assert int.from_bytes(data[4:8], "little") == 0b01  # unchecked hash (PEP 552)


def test_no_bytecode_for_another_guest_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootfs, "GUEST_PYTHON", (2, 7))
    assert rootfs.agent_bytecode(rootfs._agent_files()) == {}
