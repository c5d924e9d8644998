"""Hostile inputs through the command line: configs, option values, environment
values, traces and artifacts folders that are wrong in every way a user (or a
damaged disk) can make them wrong.

Each case runs ``python -m harness run|check|images|bench`` in a subprocess and must
end with exit 2 (3 for a trace that is readable but proves nothing), ONE line on
stderr without a traceback, within a time bound, having written nothing outside the
artifacts folder (the working directory, TMPDIR, XDG_RUNTIME_DIR, HOME and the cache
are compared before and after). No case boots a VM: every one is refused before
QEMU starts (``/bin/true`` stands in for QEMU, a file with the x86 boot header's
"HdrS" magic for the kernel, so a case that slipped through would not hang but fail).

The private entries of the image cache (SSH key, root filesystem and initrd, which
hold private keys) are checked for their modes at the end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
GOOD = (ROOT / "configs" / "intel-iommu-nvme.toml").read_text()
TIME_BOUND = 20.0
"""Seconds a refused input may take (Python start-up and imports included)."""


def fake_bzimage(path: Path) -> Path:
    data = bytearray(4096)
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


@dataclass
class Env:
    """A sandbox for one case: where the harness runs and what it may touch."""

    tmp: Path
    cwd: Path = field(init=False)
    cache: Path = field(init=False)
    artifacts: Path = field(init=False)
    bzimage: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cwd = self.tmp / "cwd"
        self.cache = self.tmp / "cache"
        self.artifacts = self.tmp / "artifacts"
        for d in ("cwd", "tmp", "run", "home", "inputs"):
            (self.tmp / d).mkdir()
        self.bzimage = fake_bzimage(self.tmp / "inputs" / "bzImage")
        (self.tmp / "inputs" / "plain.txt").write_text("neither a program nor a kernel nor a folder\n")
        (self.tmp / "inputs" / "plain.txt").chmod(0o644)

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / "inputs" / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def fifo(self, name: str) -> str:
        path = self.tmp / "inputs" / name
        os.mkfifo(path)
        return str(path)

    def folder(self, name: str, files: dict[str, str | bytes | None]) -> str:
        """An artifacts-like folder; a None content makes that file a FIFO."""
        path = self.tmp / "inputs" / name
        path.mkdir()
        for fname, content in files.items():
            if content is None:
                os.mkfifo(path / fname)
            else:
                (path / fname).write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def safe(self) -> list[str]:
        """Options that keep a case away from real QEMU, real kernels and the real cache."""
        return ["--qemu", "/bin/true", "--accel", "tcg", "--cache", str(self.cache), "--kernel", str(self.bzimage)]

    def run_config(self, content: str | bytes, *extra: str) -> list[str]:
        return ["run", self.file("scenario.toml", content), *self.safe(), "--artifacts", str(self.artifacts),
                *extra]

    def watched(self) -> list[Path]:
        return [self.cwd, self.tmp / "tmp", self.tmp / "run", self.tmp / "home", self.cache, self.tmp / "inputs"]


def snapshot(paths: list[Path]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for base in paths:
        if not base.exists():
            continue
        out[str(base)] = (0, 0)
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (st.st_mode, st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return out


def toml(**edits: str) -> str:
    """The good config with whole lines replaced: ``toml(name='name = "x"')`` replaces
    the line starting with ``name =``; a key that is not there is added to its table
    (``workload.offset`` -> under ``[workload]``)."""
    lines = GOOD.splitlines()
    for key, line in edits.items():
        table, _, bare = key.rpartition(".")
        hits = [i for i, ln in enumerate(lines) if ln.split("=")[0].strip() == bare]
        if hits and not table:
            lines[hits[0]] = line
            continue
        header = f"[{table}]" if table else None
        if table and table in ("workload", "machine"):
            start = lines.index(header)
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
            own = [i for i in range(start + 1, end) if lines[i].split("=")[0].strip() == bare]
            if own:
                lines[own[0]] = line
            else:
                lines.insert(start + 1, line)
        else:
            lines.insert(0, line)
    return "\n".join(lines) + "\n"


def nvme(**fields: str) -> str:
    """The good config with its NVMe device table given these ``key = value`` lines."""
    block = '[[devices]]\nkind = "nvme"\nserial = "dmaharness0"\nnamespaces = [{ size_mib = 64, lba_size = 512 }]\n'
    new = '[[devices]]\nkind = "nvme"\n' + "".join(
        f"{k} = {v}\n" for k, v in {"serial": '"dmaharness0"',
                                    "namespaces": "[{ size_mib = 64, lba_size = 512 }]", **fields}.items())
    assert block in GOOD
    return GOOD.replace(block, new)


Case = Callable[[Env], list[str]]


def config_case(content: str | bytes, *needles: str) -> tuple[Case, tuple[str, ...]]:
    return (lambda e: e.run_config(content)), needles


CONFIG_CASES: dict[str, tuple[Case, tuple[str, ...]]] = {
    # what the file is
    "latin-1": config_case(GOOD.replace("O_DIRECT", "O_DIRECT \u00e9").encode("latin-1"), "not UTF-8"),
    "binary": config_case(bytes(range(256)) * 4, "not UTF-8"),
    "utf-16": config_case(GOOD.encode("utf-16"), "not UTF-8"),
    "nul-bytes": config_case(GOOD.replace("\n", "\n\0", 1), "invalid TOML"),
    "empty": config_case("", "missing required key 'name'"),
    "too-large": config_case("# " + "x" * (1 << 20) + "\n" + GOOD, "larger than 1 MiB"),
    "nested-arrays": config_case("a = " + "[" * 100000, "invalid TOML"),
    "nested-tables": config_case("a = " + "{b = " * 20000, "invalid TOML"),
    "huge-integer": config_case(toml(memory_mib="memory_mib = " + "9" * 5000), "invalid TOML"),
    "not-toml": config_case("this is = not [ toml", "invalid TOML"),
    "dev-zero": ((lambda e: ["run", "/dev/zero", *e.safe()]), ("/dev/zero", "character device")),
    "directory": ((lambda e: ["run", str(e.tmp / "inputs"), *e.safe()]), ("is a directory",)),
    "fifo": ((lambda e: ["run", e.fifo("scenario.toml"), *e.safe()]), ("is a FIFO",)),
    "missing": ((lambda e: ["run", str(e.tmp / "nope.toml"), *e.safe()]), ("nope.toml", "cannot read config")),
    "symlink-loop": ((lambda e: (os.symlink("loop.toml", e.tmp / "inputs" / "loop.toml"),
                                 ["run", str(e.tmp / "inputs" / "loop.toml"), *e.safe()])[1]),
                     ("loop.toml", "cannot read config")),
    # name: a QEMU option value and a path component
    "name-comma": config_case(toml(name='name = "x,debug-threads=on"'), "'x,debug-threads=on'", "name must be"),
    "name-absolute": config_case(toml(name='name = "/etc/cron.d"'), "name must be"),
    "name-slash": config_case(toml(name='name = "a/b"'), "name must be"),
    "name-dotdot": config_case(toml(name='name = ".."'), "name must be"),
    "name-parent": config_case(toml(name='name = "../../x"'), "name must be"),
    "name-empty": config_case(toml(name='name = ""'), "name must be"),
    "name-too-long": config_case(toml(name=f'name = "{"a" * 65}"'), "name must be"),
    "name-newline": config_case(toml(name='name = "a\\nb"'), "name must be"),
    "name-unicode": config_case(toml(name='name = "\u00e9t\u00e9"'), "name must be"),
    "name-not-string": config_case(toml(name="name = 5"), "name must be a string"),
    "description-table": config_case(toml(description="description = { a = 1 }"), "description must be a string"),
    # boot_timeout
    "boot-timeout-nan": config_case(toml(boot_timeout="boot_timeout = nan"), "boot_timeout", "nan"),
    "boot-timeout-inf": config_case(toml(boot_timeout="boot_timeout = inf"), "boot_timeout", "inf"),
    "boot-timeout-minus-inf": config_case(toml(boot_timeout="boot_timeout = -inf"), "boot_timeout"),
    "boot-timeout-1e999": config_case(toml(boot_timeout="boot_timeout = 1e999"), "boot_timeout"),
    "boot-timeout-zero": config_case(toml(boot_timeout="boot_timeout = 0"), "boot_timeout"),
    "boot-timeout-huge-int": config_case(toml(boot_timeout="boot_timeout = 0x" + "f" * 200), "boot_timeout"),
    "boot-timeout-string": config_case(toml(boot_timeout='boot_timeout = "60"'), "boot_timeout"),
    "boot-timeout-bool": config_case(toml(boot_timeout="boot_timeout = true"), "boot_timeout"),
    # the workload against the machine
    "offset-past-namespace": config_case(toml(**{"workload.offset": "offset = 67108864"}),
                                         "workload.offset", "workload.length", "size_mib = 64"),
    "offset-straddles-end": config_case(toml(**{"workload.offset": "offset = 66060288",
                                                "workload.length": "length = 2097152"}), "workload.offset"),
    "length-past-namespace": config_case(toml(**{"workload.length": "length = 68157440"}), "workload.length"),
    "offset-huge": config_case(toml(**{"workload.offset": "offset = 9223372036854771712"}), "workload.offset"),
    "offset-beyond-64-bit": config_case(toml(**{"workload.offset": "offset = 0x" + "f" * 40}), "workload.offset",
                                        "out of range"),
    "offset-negative": config_case(toml(**{"workload.offset": "offset = -4096"}), "offset"),
    "offset-unaligned": config_case(toml(**{"workload.offset": "offset = 512"}), "offset"),
    "device-second-controller": config_case(toml(**{"workload.device": 'device = "/dev/nvme1n1"'}),
                                            "workload.device", "controller 1"),
    "device-second-namespace": config_case(toml(**{"workload.device": 'device = "/dev/nvme0n2"'}),
                                           "workload.device", "namespace 2"),
    "device-partition": config_case(toml(**{"workload.device": 'device = "/dev/nvme0n1p1"'}), "workload.device"),
    "device-char": config_case(toml(**{"workload.device": 'device = "/dev/nvme0"'}), "workload.device"),
    "cmdline-too-long": config_case(toml(**{"machine.cmdline": f'cmdline = "{"x" * 4000}"'}), "machine.cmdline"),
    "device-relative": config_case(toml(**{"workload.device": 'device = "nvme0n1"'}), "device must be"),
    "device-dotdot": config_case(toml(**{"workload.device": 'device = "/dev/../etc/passwd"'}), "device must be"),
    "device-nul": config_case(toml(**{"workload.device": 'device = "/dev/nvme0n1\\u0000"'}), "device must be"),
    "device-not-string": config_case(toml(**{"workload.device": "device = 1"}), "workload.device"),
    "chunk-larger-than-memory": config_case(toml(**{"workload.chunk": "chunk = 268435456"}), "workload.chunk",
                                            "memory_mib"),
    "length-zero": config_case(toml(**{"workload.length": "length = 0"}), "length"),
    "rounds-zero": config_case(toml(**{"workload.rounds": "rounds = 0"}), "rounds"),
    "buffers-many": config_case(toml(**{"workload.buffers": "buffers = 100000"}), "buffers"),
    "workload-timeout-nan": config_case(toml(**{"workload.timeout": "timeout = nan"}), "timeout"),
    "workload-unknown-key": config_case(toml(**{"workload.offest": "offest = 0"}), "unknown key 'offest'"),
    "workload-unknown-kind": config_case(GOOD.replace('kind = "nvme-pattern"', 'kind = "fio"'),
                                         "unknown workload kind"),
    "workload-not-table": config_case(GOOD.split("[workload]")[0].replace('name = "intel-iommu-nvme"',
                                                                           'name = "a"\nworkload = 5'),
                                      "[workload] must be a table"),
    "agent-op-unknown": config_case(GOOD.split("[workload]")[0] + '[workload]\nkind = "agent-ops"\n'
                                    'ops = [{ op = "rm-rf" }]\n', "unknown guest agent op 'rm-rf'"),
    "agent-op-bad-args": config_case(GOOD.split("[workload]")[0] + '[workload]\nkind = "agent-ops"\n'
                                     'ops = [{ op = "ping", args = { x = 1 } }]\n', "ops[0]"),
    "agent-ops-not-list": config_case(GOOD.split("[workload]")[0] + '[workload]\nkind = "agent-ops"\n'
                                      'ops = "ping"\n', "workload.ops"),
    "agent-ops-not-tables": config_case(GOOD.split("[workload]")[0] + '[workload]\nkind = "agent-ops"\n'
                                        "ops = [5]\n", "ops[0]"),
    # the machine
    "memory-huge": config_case(toml(**{"machine.memory_mib": "memory_mib = 9223372036854775807"}),
                               "memory_mib"),
    "memory-float": config_case(toml(**{"machine.memory_mib": "memory_mib = 1e999"}), "memory_mib"),
    "cpus-zero": config_case(toml(**{"machine.cpus": "cpus = 0"}), "cpus"),
    "accel-bogus": config_case(toml(**{"machine.accel": 'accel = "bogus"'}), "accel"),
    "machine-type": config_case(toml(**{"machine.machine": 'machine = "virt"'}), "machine"),
    "cpu-nul": config_case(toml(**{"machine.cpu": 'cpu = "max\\u0000"'}), "machine.cpu"),
    "cmdline-nul": config_case(toml(**{"machine.cmdline": 'cmdline = "quiet\\u0000"'}), "machine.cmdline"),
    "cmdline-newline": config_case(toml(**{"machine.cmdline": 'cmdline = "a\\nb"'}), "cmdline"),
    "initrd-missing": config_case(toml(**{"machine.initrd": 'initrd = "/nonexistent/initrd"'}), "machine.initrd",
                                  "does not exist"),
    "initrd-directory": config_case(toml(**{"machine.initrd": 'initrd = "/"'}), "machine.initrd"),
    "kernel-missing": config_case(toml(**{"machine.kernel": 'kernel = "/nonexistent/bzImage"'}),
                                  "machine.kernel", "/nonexistent/bzImage", "does not exist"),
    "kernel-directory": config_case(toml(**{"machine.kernel": 'kernel = "/"'}), "machine.kernel",
                                    "not a regular file"),
    "kernel-not-bzimage": config_case(toml(**{"machine.kernel": 'kernel = "/bin/true"'}),
                                      "is not an x86 bzImage"),
    "kernel-empty": config_case(toml(**{"machine.kernel": 'kernel = ""'}), "machine.kernel"),
    "machine-not-table": config_case(GOOD.replace("[machine]\n", "machine = 5\n[machine_]\n"), "machine"),
    "machine-devices": config_case(toml(**{"machine.devices": "devices = []"}), "not in [machine]"),
    # devices
    "nvme-id-path": config_case(nvme(id='"../../etc/x"'), "devices[1].id"),
    "nvme-id-comma": config_case(nvme(id='"a,b=c"'), "devices[1].id"),
    "nvme-id-empty": config_case(nvme(id='""'), "devices[1].id"),
    "nvme-serial-comma": config_case(nvme(serial='"a,b"'), "serial"),
    "nvme-no-namespaces": config_case(nvme(namespaces="[]"), "namespace"),
    "nvme-namespaces-not-tables": config_case(nvme(namespaces="[1, 2]"), "namespaces"),
    "nvme-size-zero": config_case(nvme(namespaces="[{ size_mib = 0 }]"), "size_mib"),
    "nvme-size-huge": config_case(nvme(namespaces="[{ size_mib = 9223372036854775807 }]"), "size_mib"),
    "nvme-nsid-zero": config_case(nvme(namespaces="[{ nsid = 0 }]"), "nsid"),
    "nvme-nsid-huge": config_case(nvme(namespaces="[{ nsid = 100000 }]"), "nsid"),
    "nvme-nsid-duplicate": config_case(nvme(namespaces="[{ nsid = 1 }, { nsid = 1 }]"), "namespace"),
    "nvme-lba": config_case(nvme(namespaces="[{ lba_size = 1000 }]"), "lba_size"),
    "nvme-addr": config_case(nvme(addr="99"), "addr"),
    "iommu-aw-bits": config_case(GOOD.replace("caching_mode = true", "caching_mode = true\naw_bits = 40"),
                                 "aw_bits"),
    "two-iommus": config_case(GOOD.replace('[[devices]]\nkind = "nvme"',
                                           '[[devices]]\nkind = "intel-iommu"\n[[devices]]\nkind = "nvme"'),
                              "only one IOMMU"),
    "device-kind-unknown": config_case(GOOD.replace('kind = "nvme"', 'kind = "virtio-gpu"'), "unknown device kind"),
    "device-kind-missing": config_case(GOOD.replace('kind = "nvme"\n', ""), "unknown device kind"),
    "devices-not-tables": config_case("devices = [5]\n" + re.sub(r"\[\[devices\]\]\n(?:[^\[\n].*\n)*", "", GOOD),
                                      "devices must be"),
    "unknown-top-key": config_case(toml(extra="extra = 1"), "unknown top-level key 'extra'"),
}


def _cli(args: Callable[[Env], list[str]], *needles: str) -> tuple[Case, tuple[str, ...]]:
    return args, needles


CLI_CASES: dict[str, tuple[Case, tuple[str, ...]]] = {
    "cache-is-a-file": _cli(lambda e: ["run", str(ROOT / "configs" / "intel-iommu-nvme.toml"), "--qemu", "/bin/true",
                                       "--accel", "tcg", "--kernel", str(e.bzimage), "--cache",
                                       e.file("cachefile", "")], "--cache", "cachefile", "not a folder"),
    "cache-under-a-file": _cli(lambda e: ["run", str(ROOT / "configs" / "intel-iommu-nvme.toml"), "--qemu",
                                          "/bin/true", "--accel", "tcg", "--kernel", str(e.bzimage), "--cache",
                                          e.file("cachefile", "") + "/sub"], "--cache", "not a folder"),
    "artifacts-is-a-file": _cli(lambda e: e.run_config(GOOD, "--artifacts", e.file("afile", "")),
                                "--artifacts", "afile", "not a folder"),
    "artifacts-under-a-file": _cli(lambda e: e.run_config(GOOD, "--artifacts", e.file("afile", "") + "/x/y"),
                                   "--artifacts", "not a folder"),
    "artifacts-is-a-fifo": _cli(lambda e: e.run_config(GOOD, "--artifacts", e.fifo("afifo")),
                                "--artifacts", "FIFO"),
    "qemu-missing": _cli(lambda e: e.run_config(GOOD, "--qemu", "/nonexistent/qemu"),
                         "/nonexistent/qemu", "not found"),
    "qemu-not-executable": _cli(lambda e: e.run_config(GOOD, "--qemu", e.file("qemu", "#!/bin/sh\n")),
                                "is not executable"),
    "qemu-directory": _cli(lambda e: e.run_config(GOOD, "--qemu", str(e.tmp / "inputs")), "is a directory"),
    "kernel-missing": _cli(lambda e: e.run_config(GOOD, "--kernel", "/nonexistent/bzImage"), "does not exist"),
    "kernel-not-bzimage": _cli(lambda e: e.run_config(GOOD, "--kernel", e.file("vmlinux", b"\x7fELF" + bytes(2000))),
                               "vmlinux", "is not an x86 bzImage"),
    "kernel-short": _cli(lambda e: e.run_config(GOOD, "--kernel", e.file("tiny", b"MZ")), "is not an x86 bzImage"),
    "kernel-directory": _cli(lambda e: e.run_config(GOOD, "--kernel", str(e.tmp / "inputs")),
                             "is not a regular file"),
    "kernel-fifo": _cli(lambda e: e.run_config(GOOD, "--kernel", e.fifo("kfifo")), "is not a regular file"),
    "kernel-dev-zero": _cli(lambda e: e.run_config(GOOD, "--kernel", "/dev/zero"), "is not a regular file"),
    "kernel-empty": _cli(lambda e: e.run_config(GOOD, "--kernel", ""), "--kernel is empty"),
    "cache-empty": _cli(lambda e: e.run_config(GOOD, "--cache", ""), "--cache is empty"),
    "artifacts-empty": _cli(lambda e: e.run_config(GOOD, "--artifacts", ""), "--artifacts is empty"),
    "qemu-empty": _cli(lambda e: e.run_config(GOOD, "--qemu", ""), "--qemu is empty"),
    "config-empty": _cli(lambda e: ["run", "", *e.safe()], "config is empty"),
    "check-empty": _cli(lambda e: ["check", ""], "evidence is empty"),
    "accel-bogus": _cli(lambda e: e.run_config(GOOD, "--accel", "bogus"), "--accel", "'bogus'"),
    "images-unknown-patch": _cli(lambda e: ["images", "build", "--patch", "../../etc/passwd", "--cache", str(e.cache)],
                                 "unknown kernel patch"),
    "images-cache-is-a-file": _cli(lambda e: ["images", "build", "--cache", e.file("cachefile", "")], "--cache"),
    "bench-runs-zero": _cli(lambda e: ["bench", "boot", "--runs", "0", *e.safe()], "--runs"),
    "bench-bad-config": _cli(lambda e: ["bench", "boot", "--config", e.file("b.toml", b"\xff"), *e.safe()],
                             "not UTF-8"),
}

ENV_CASES: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "accel-bogus": ({"DMA_HARNESS_ACCEL": "bogus"}, ("DMA_HARNESS_ACCEL", "'bogus'")),
    "accel-upper-case": ({"DMA_HARNESS_ACCEL": "KVM"}, ("DMA_HARNESS_ACCEL", "'KVM'")),
    "keep-build-yes": ({"DMA_HARNESS_KEEP_BUILD": "yes"}, ("DMA_HARNESS_KEEP_BUILD",)),
    "require-vm-true": ({"DMA_HARNESS_REQUIRE_VM": "true"}, ("DMA_HARNESS_REQUIRE_VM",)),
    "qemu-not-executable": ({"DMA_HARNESS_QEMU": "{inputs}/plain.txt"}, ("plain.txt", "is not executable")),
    "qemu-missing": ({"DMA_HARNESS_QEMU": "/nonexistent/qemu"}, ("/nonexistent/qemu", "not found")),
    "kernel-not-bzimage": ({"DMA_HARNESS_KERNEL": "{inputs}/plain.txt"}, ("is not an x86 bzImage",)),
    "cache-is-a-file": ({"DMA_HARNESS_CACHE": "{inputs}/plain.txt"}, ("DMA_HARNESS_CACHE", "not a folder")),
}

_RECORD_IO = {"io": 1, "dir": "write", "pos": 0, "len": 4096, "buffer": 0}


def _records(**changes: object) -> str:
    result = {"device": "/dev/nvme0n1", "ios": [_RECORD_IO], "buffers_pages": [[4096]], "lba_size": 512, **changes}
    return json.dumps([{"op": "nvme.pattern_rw", "args": {}, "result": result}])


def _check(files: dict[str, str | bytes | None], *needles: str,
           expect: int = 2) -> tuple[Case, int, tuple[str, ...]]:
    return (lambda e: ["check", e.folder("run", files)]), expect, needles


def _huge_records(e: Env) -> list[str]:
    folder = e.folder("run", {"trace.log": "", "records.json": b""})
    os.truncate(Path(folder) / "records.json", 300 << 20)  # sparse: no disk used
    return ["check", folder]


CHECK_CASES: dict[str, tuple[Case, int, tuple[str, ...]]] = {
    "missing": ((lambda e: ["check", str(e.tmp / "nope")]), 2, ("does not exist",)),
    "fifo": ((lambda e: ["check", e.fifo("trace.log")]), 2, ("is a FIFO",)),
    "dev-zero": ((lambda e: ["check", "/dev/zero"]), 2, ("character device",)),
    "folder-without-trace": _check({"records.json": "[]"}, "no QEMU trace (trace.log)"),
    "folder-empty": _check({}, "without trace.log or records.json"),
    "trace-is-a-fifo": _check({"trace.log": None}, "trace.log", "FIFO"),
    "trace-is-a-folder": ((lambda e: (e.folder("run", {}), (e.tmp / "inputs" / "run" / "trace.log").mkdir(),
                                      ["check", str(e.tmp / "inputs" / "run")])[2]), 2, ("trace.log", "directory")),
    "records-fifo": _check({"trace.log": "", "records.json": None}, "records.json", "FIFO"),
    "guest-trace-fifo": _check({"trace.log": "", "guest-trace.txt": None}, "guest-trace.txt", "FIFO"),
    "records-huge": (_huge_records, 2, ("records.json", "larger than")),
    "records-not-json": _check({"trace.log": "", "records.json": "["}, "records.json", "JSON"),
    "records-not-utf8": _check({"trace.log": "", "records.json": b"\xff\xfe["}, "records.json"),
    "records-nested": _check({"trace.log": "", "records.json": "[" * 100000}, "records.json"),
    "records-not-list": _check({"trace.log": "", "records.json": "{}"}, "records.json"),
    "records-no-op": _check({"trace.log": "", "records.json": '[{"result": {}}]'}, "records.json", "'op'"),
    "records-ios-not-list": _check({"trace.log": "", "records.json": _records(ios=5)}, "'ios'"),
    "records-io-fields": _check({"trace.log": "", "records.json": _records(ios=[{"io": 1}])}, "'ios'"),
    "records-io-direction": _check({"trace.log": "", "records.json": _records(
        ios=[{**_RECORD_IO, "dir": "sideways"}])}, "'ios'"),
    "records-pages": _check({"trace.log": "", "records.json": _records(buffers_pages=3)}, "'buffers_pages'"),
    "records-lba": _check({"trace.log": "", "records.json": _records(lba_size=0)}, "'lba_size'"),
    "guest-info-lost": _check({"trace.log": "", "guest-trace.json": '{"lost": "x"}'}, "guest-trace.json"),
    "guest-info-lost-inf": _check({"trace.log": "", "guest-trace.json": '{"lost": 1e999}'}, "guest-trace.json"),
    "spec-devices": _check({"trace.log": "", "spec.json": '{"devices": 5}'}, "spec.json"),
    "trace-truncated-gzip": _check({"trace.log": b"\x1f\x8b\x08\x00abc"}, "trace.log", "gzip"),
    "trace-bzip2": _check({"trace.log": b"BZh91AY&SY" + bytes(64)}, "trace.log"),
    # readable but proving nothing: inconclusive, the reason on one line
    "trace-empty": _check({"trace.log": ""}, "inconclusive", expect=3),
    "trace-binary": ((lambda e: ["check", e.file("trace.log", bytes(range(256)) * 64)]), 3, ("inconclusive",)),
    "trace-garbage-lines": ((lambda e: ["check", e.file("trace.log", "vtd_dmar_translate garbage\n" * 100)]), 3,
                            ("inconclusive",)),
    "guest-trace-binary": _check({"trace.log": "", "guest-trace.txt": bytes(range(256)) * 16}, "inconclusive",
                                 expect=3),
}


@dataclass(frozen=True)
class Spec:
    """One hostile input: how to make its argv in a sandbox, extra environment, the
    exit status it must get and what its one stderr line must say."""

    make: Case
    expect: int = 2
    needles: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def _env_case(values: dict[str, str], needles: tuple[str, ...]) -> Spec:
    def make(e: Env) -> list[str]:
        argv = ["run", str(ROOT / "configs" / "intel-iommu-nvme.toml"), "--artifacts", str(e.artifacts)]
        argv += [] if "DMA_HARNESS_CACHE" in values else ["--cache", str(e.cache)]
        argv += [] if "DMA_HARNESS_ACCEL" in values else ["--accel", "tcg"]
        argv += [] if "DMA_HARNESS_QEMU" in values else ["--qemu", "/bin/true"]
        argv += [] if "DMA_HARNESS_KERNEL" in values else ["--kernel", str(e.bzimage)]
        return argv
    return Spec(make, 2, needles, values)


CASES: dict[str, Spec] = {
    **{f"config-{k}": Spec(make, 2, needles) for k, (make, needles) in CONFIG_CASES.items()},
    **{f"option-{k}": Spec(make, 2, needles) for k, (make, needles) in CLI_CASES.items()},
    **{f"env-{k}": _env_case(values, needles) for k, (values, needles) in ENV_CASES.items()},
    **{f"check-{k}": Spec(make, expect, needles) for k, (make, expect, needles) in CHECK_CASES.items()},
}


@dataclass
class Outcome:
    env: Env
    argv: list[str]
    proc: subprocess.CompletedProcess[str] | None  # None: it did not end in time (it was killed)
    elapsed: float
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]
    left_running: bool


_BUILD_TOOLS = ("mmdebstrap", "apt-get", "dpkg-deb", "make", "tar", "xz")


def execute(env: Env, spec: Spec) -> Outcome:
    """Run one case in its sandbox. Build tools are stubs that fail at once, so an
    input that slipped through to an image build fails fast instead of building;
    the whole process group is killed if it outlives the bound."""
    stubs = env.tmp / "stubs"
    stubs.mkdir()
    for tool in _BUILD_TOOLS:
        (stubs / tool).write_text("#!/bin/sh\necho 'stub: no builds in this test' >&2\nexit 97\n")
        (stubs / tool).chmod(0o755)
    sandbox = {k: v for k, v in os.environ.items() if not k.startswith("DMA_HARNESS_")}
    sandbox.update(TMPDIR=str(env.tmp / "tmp"), XDG_RUNTIME_DIR=str(env.tmp / "run"), HOME=str(env.tmp / "home"),
                   XDG_CACHE_HOME=str(env.tmp / "home" / ".cache"), PYTHONPATH=str(ROOT),
                   PYTHONDONTWRITEBYTECODE="1", PATH=f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    sandbox.update({k: v.format(inputs=env.tmp / "inputs") for k, v in spec.env.items()})
    argv = spec.make(env)
    before = snapshot(env.watched())
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "harness", *argv], cwd=env.cwd, env=sandbox,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    proc: subprocess.CompletedProcess[str] | None
    try:
        out, err = child.communicate(timeout=TIME_BOUND * 2)
        proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        proc = None
    elapsed = time.monotonic() - started
    left_running = True
    try:
        os.killpg(child.pid, signal.SIGKILL)  # nothing may be left running: a leftover fails the case
    except ProcessLookupError:
        left_running = False
    return Outcome(env, argv, proc, elapsed, before, snapshot(env.watched()), left_running)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every selected case, run in parallel (each in its own sandbox)."""
    wanted = sorted({item.callspec.params["case"] for item in request.session.items
                     if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
                     and "case" in item.callspec.params})
    envs = {name: Env(tmp_path_factory.mktemp(name.replace("/", "_"))) for name in wanted}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        futures = {name: pool.submit(execute, envs[name], CASES[name]) for name in wanted}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input(outcomes: dict[str, Outcome], case: str) -> None:
    spec, outcome = CASES[case], outcomes[case]
    proc = outcome.proc
    assert proc is not None, f"{outcome.argv}: still running after {TIME_BOUND * 2:.0f}s (killed)"
    assert not outcome.left_running, f"{outcome.argv}: left processes running"
    assert proc.returncode == spec.expect, (proc.returncode, proc.stdout[-2000:], proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in spec.needles:
        assert needle in lines[0], lines[0]
    assert outcome.elapsed < TIME_BOUND, f"took {outcome.elapsed:.1f}s"
    assert outcome.after == outcome.before, sorted(set(outcome.after) ^ set(outcome.before))
    artifacts = outcome.env.artifacts
    assert not artifacts.exists() or not any(artifacts.iterdir())


def test_the_good_config_passes_every_load_time_check(tmp_path: Path) -> None:
    """The corpus refuses for the reason it names, not because the base config is bad:
    the good config gets past loading and is stopped only by the stand-in QEMU."""
    from harness.scenario import load_scenario
    for cfg in (ROOT / "configs").glob("*.toml"):
        assert load_scenario(cfg).name == cfg.stem
    path = tmp_path / "ok.toml"
    path.write_text(toml(**{"workload.offset": "offset = 66060288"}))  # 63 MiB + 1 MiB: ends exactly at 64 MiB
    assert load_scenario(path).workload.offset == 66060288  # type: ignore[attr-defined]


_SCALARS = st.one_of(st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70), st.floats(),
                    st.text(max_size=20),
                    st.sampled_from(["", "/dev/nvme0n1", "/dev/nvme3n9", "nvme", "intel-iommu", "agent-ops",
                                     "nvme-pattern", "q35", "auto", "ping", "x,y=z", "../x"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=8)
_PATHS: list[tuple[str | int, ...]] = [
    ("name",), ("boot_timeout",), ("description",), ("machine",), ("machine", "memory_mib"), ("machine", "cpus"),
    ("machine", "accel"), ("machine", "cpu"), ("machine", "cmdline"), ("machine", "kernel"), ("machine", "initrd"),
    ("devices",), ("devices", 0), ("devices", 0, "aw_bits"), ("devices", 0, "caching_mode"), ("devices", 1, "kind"),
    ("devices", 1, "namespaces"), ("devices", 1, "id"), ("devices", 1, "addr"), ("devices", 1, "serial"),
    ("devices", 1, "namespaces", 0, "nsid"), ("devices", 1, "namespaces", 0, "size_mib"), ("workload",),
    ("workload", "kind"), ("workload", "offset"), ("workload", "length"), ("workload", "chunk"),
    ("workload", "device"), ("workload", "ops"), ("workload", "timeout"), ("workload", "buffers"),
    ("workload", "rounds"), ("workload", "seed"),
]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _VALUES), min_size=1, max_size=3))
def test_any_config_table_loads_or_is_refused_with_a_config_error(edits: list[tuple[tuple[str | int, ...], object]]) \
        -> None:
    """Whatever values a config's keys hold, loading gives a scenario (that writes its
    TOML) or a ConfigError: never another exception, which the CLI reports as its own bug."""
    from harness.errors import ConfigError
    from harness.scenario import scenario_from_table
    table: Any = tomllib.loads(GOOD)
    for path, value in edits:
        node = table
        with contextlib.suppress(KeyError, IndexError, TypeError):
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
    try:
        scenario_from_table(table).to_toml()
    except ConfigError:
        pass


# ------------------------------------------------------------------ private cache entries

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_private_cache_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int) -> None:
    """The SSH key and the initramfs layers (the guest's SSH host private keys) are
    0600 in 0700 folders whatever the umask and the cache root's mode, also when an
    entry made before was world-readable."""
    from harness.images import rootfs
    from harness.images.cache import ImageCache
    from harness.images.sshkey import ensure_ssh_key

    root = tmp_path / "cache"
    root.mkdir()
    os.chmod(root, 0o777)
    cache = ImageCache(root)
    base = cache.entry("rootfs", rootfs.base_key())  # a stand-in for the mmdebstrap build
    base.mkdir(parents=True)
    os.chmod(base, 0o755)
    (base / "base.cpio").write_bytes(b"070701" + bytes(200))
    os.chmod(base / "base.cpio", 0o644)
    (base / "ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAA host\n")
    (base / "manifest.json").write_text("{}")
    stale = cache.entry("initrd", "older")  # an entry of an earlier overlay, made world-readable
    stale.mkdir(parents=True)
    (stale / "initrd.cpio").write_bytes(b"070701")
    (stale / "manifest.json").write_text("{}")
    os.chmod(stale, 0o755)
    os.chmod(stale / "initrd.cpio", 0o644)
    old = os.umask(umask)
    try:
        key = ensure_ssh_key(cache)
        initrd = rootfs.ensure_initrd(cache, key)
    finally:
        os.umask(old)
    assert _mode(key.private) == 0o600 and _mode(key.private.parent) == 0o700
    assert _mode(initrd.path) == 0o600 and _mode(initrd.path.parent) == 0o700
    assert _mode(base / "base.cpio") == 0o600 and _mode(base) == 0o700
    assert _mode(stale / "initrd.cpio") == 0o600 and _mode(stale) == 0o700
    # an entry someone loosened is tightened on the next use
    os.chmod(initrd.path, 0o644)
    os.chmod(initrd.path.parent, 0o755)
    os.chmod(key.private, 0o644)
    os.chmod(key.private.parent, 0o755)
    assert rootfs.ensure_initrd(cache, ensure_ssh_key(cache)).path == initrd.path
    assert _mode(initrd.path) == 0o600 and _mode(initrd.path.parent) == 0o700
    assert _mode(key.private) == 0o600 and _mode(key.private.parent) == 0o700
