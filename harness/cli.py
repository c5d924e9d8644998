"""Command line: ``python -m harness {run,check,bench,images,doctor,soak,difftest,matrix,nightly-history}``.

Exit status:

* 0   the verdict is OK: every checker judged the evidence and found nothing;
* 1   the system under test misbehaved: a DMA or data divergence, data that did
      not verify, an I/O error in the guest, a guest panic, QEMU dying;
* 2   bad input or environment (config key, unknown device, missing QEMU, kernel
      lacking an option, unreadable trace, a guest that never comes up), printed
      as one line naming the offending key or value (plus the console tail for a
      guest);
* 3   inconclusive: nothing was checked, or evidence a checker depends on was
      missing or unreadable (the reason is printed);
* 70  a bug of the harness itself (one line, and the log file with the traceback);
* 130 interrupted (Ctrl-C).

Every VM is torn down before the process exits, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, Any

from harness.options import ACCELS, OPTION_HELP
from harness.errors import (
    AgentError,
    ConfigError,
    GuestBootTimeout,
    GuestHung,
    GuestPanicked,
    HarnessError,
    ImageError,
    QEMUExited,
    VMError,
)
from harness.workloads import WorkloadFailed

if TYPE_CHECKING:
    from harness.images.cache import ImageCache
    from harness.session import Harness

EXIT_OK = 0
EXIT_DIVERGENCE = 1
EXIT_USAGE = 2
EXIT_INCONCLUSIVE = 3
EXIT_SOFTWARE = 70
EXIT_INTERRUPTED = 130
_STATUS_EXIT = {"ok": EXIT_OK, "divergence": EXIT_DIVERGENCE, "inconclusive": EXIT_INCONCLUSIVE}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qemu", help=OPTION_HELP["qemu"])
    p.add_argument("--kernel", help=OPTION_HELP["kernel"])
    # Checked by _check_inputs (one line naming the option), not by argparse's choices.
    p.add_argument("--accel", metavar="{" + ",".join(ACCELS) + "}", help=OPTION_HELP["accel"])
    p.add_argument("--cache", help=OPTION_HELP["cache"])


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: PROG: message``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m harness", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a scenario, run its workload, print the DMA verdict")
    run.add_argument("config", help="scenario file, e.g. configs/intel-iommu-nvme.toml")
    run.add_argument("--artifacts", default="artifacts", help=OPTION_HELP["artifacts"])
    run.add_argument("--keep-artifacts", action="store_true", help=OPTION_HELP["keep-artifacts"])
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(run)

    bench = sub.add_parser("bench", help="benchmarks: boot time, IOTLB and pinning models")
    bsub = bench.add_subparsers(dest="bench", required=True)
    boot = bsub.add_parser("boot", help="time from QEMU start to the guest agent answering")
    boot.add_argument("--runs", type=int, default=5)
    boot.add_argument("--config", default=None, help="scenario whose machine to boot (default: the profile's)")
    boot.add_argument("--profile", choices=("default", "xen"), default="default",
                      help="machine to boot without --config: default (q35, intel-iommu, NVMe) or xen "
                           "(Xen 4.17 with the harness's kernel as PV dom0; the agent answers in dom0)")
    boot.add_argument("--trace", action="store_true",
                      help="boot with QEMU's and the guest kernel's tracing on (as runs do) and time collecting "
                           "the guest's trace")
    boot.add_argument("--snapshot", action="store_true",
                      help="save the booted guest once and time --runs restores from it (QEMU start -> guest "
                           "agent answers), with QEMU's and the guest's tracing on as in runs; devices QEMU cannot "
                           "migrate (NVMe) are hot-plugged after each restore")
    boot.add_argument("--no-floor", action="store_true",
                      help="skip the busybox floor (by default each round also boots a busybox initramfs with the "
                           "same kernel and machine, and the overhead over it is printed)")
    _common(boot)
    xd = bsub.add_parser("xdist", help="wall-time speed-up of the VM tests with pytest-xdist workers: the same "
                                       "selection run with -n 0, then -n N, in one invocation")
    xd.add_argument("--workers", type=int, default=2, help="workers of the parallel run (default 2)")
    xd.add_argument("--dist", default="loadfile",
                    help="pytest-xdist distribution mode of the parallel run (default loadfile: one test file per "
                         "worker at a time, so a module-scoped VM boots once)")
    xd.add_argument("--no-warm-up", action="store_true",
                    help="do not build/read the guest images before the timed runs")
    xd.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST ARGS",
                    help="the selection and options both runs get (default tests/vm); put -- before them")
    it = bsub.add_parser("iotlb", help="IOTLB model operations per second at 1k/10k/100k maps")
    it.add_argument("--ops", type=int, default=20000)
    pin = bsub.add_parser("pinning", help="pinning model (iommufd IOAS) operations per second at 1k/10k/100k areas")
    pin.add_argument("--ops", type=int, default=20000)
    gnt = bsub.add_parser("grant", help="grant table model (Xen grants) operations per second and peak memory "
                                        "at 1k/10k/100k refs")
    gnt.add_argument("--ops", type=int, default=20000)

    images = sub.add_parser("images", help="build or show the guest images")
    isub = images.add_subparsers(dest="images", required=True)
    b = isub.add_parser("build", help="build (or reuse) kernel, root filesystem, SSH key and the Xen hypervisor")
    b.add_argument("--refresh", action="store_true", help="rebuild even if cached")
    b.add_argument("--patch", metavar="NAME", help="build only the kernel variant with the planted-bug patch "
                                                     "images/patches/NAME.patch (for the opt-in planted-bug tests)")
    b.add_argument("image", nargs="?", metavar="IMAGE",
                   help="build only this image: kernel (the project's kernel of --version); default: all of them")
    b.add_argument("--version", metavar="VERSION",
                   help="with IMAGE (or --patch): the version to build (kernel: 6.12, the default, or 7.2)")
    _common(b)
    s = isub.add_parser("show", help="print what is cached where")
    _common(s)
    k = isub.add_parser("key", help="print the harness's own recipe keys (kind key, one a line): what a CI "
                                    "cache of the image folder is keyed by; nothing is built, locked or downloaded")
    k.add_argument("--json", action="store_true", help="print them as one JSON object {kind: key}")

    check = sub.add_parser("check", help="replay a saved run (its artifacts folder) through every checker")
    check.add_argument("evidence", help="an artifacts folder of a run (trace.log, guest-trace.txt, records.json), "
                                        "or a bare QEMU trace.log (then the guest-side check is inconclusive)")
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")

    soak = sub.add_parser("soak", help="boot VMs one after another, inject faults into some, look for leaks "
                                       "(QEMU processes, run directories, file descriptors, cache entries)")
    soak.add_argument("--vms", type=int, default=20, help="how many VMs to boot (default 20)")
    soak.add_argument("--faults", type=int, default=5, help="how many of them get a fault (default 5)")
    soak.add_argument("--seed", type=int, default=1, help="seed of the choice of VMs and faults (default 1)")
    _common(soak)

    difftest = sub.add_parser("difftest", help="random operation sequences run in a guest and in a model, "
                                               "compared after every step; a divergence is shrunk and saved "
                                               "as a replay file (docs/difftest.md)")
    from harness.difftest.command import add_arguments as difftest_arguments
    difftest_arguments(difftest)
    _common(difftest)

    matrix = sub.add_parser("matrix", help="the vIOMMU x device matrix: list its cells (and why a cell cannot "
                                           "run), or write them as scenario files")
    matrix.add_argument("--write", metavar="FOLDER", help="write every runnable cell as FOLDER/<cell>.toml "
                                                          "(configs/matrix holds the project's copy)")

    hist = sub.add_parser("nightly-history", help="append a pytest JUnit XML's verdicts to a history file "
                                                  "(one JSON line a run) and print what changed since the "
                                                  "previous run; exit 1 on a regression")
    hist.add_argument("junit", help="the JUnit XML of a pytest run (pytest --junitxml=FILE)")
    hist.add_argument("--history", required=True, metavar="FILE",
                      help="the history file (JSON lines; created if missing)")
    hist.add_argument("--label", action="append", default=[], metavar="NAME=VALUE",
                      help="store NAME=VALUE with the run (e.g. the matrix entry); repeatable")
    hist.add_argument("--keep", type=int, default=0, metavar="N",
                      help="keep only the last N runs in the history file (default: all)")
    hist.add_argument("--dry-run", action="store_true", help="compare and print, but do not append")

    doc = sub.add_parser("doctor", help="check this machine: QEMU, KVM, build tools")
    _common(doc)
    return ap


def _harness(args: argparse.Namespace) -> Harness:
    from harness.options import HarnessOptions
    from harness.session import Harness
    _check_inputs(args)
    qemu = _resolve_qemu_version(args)
    return Harness(HarnessOptions.from_env(qemu=qemu, kernel=args.kernel, accel=args.accel, cache=args.cache,
                                           artifacts=getattr(args, "artifacts", None),
                                           keep_artifacts=getattr(args, "keep_artifacts", None)))


def _resolve_qemu_version(args: argparse.Namespace) -> str | None:
    """``--qemu`` (or ``DMA_HARNESS_QEMU``) as a binary path when it names a QEMU version
    the harness provides (``10.0``; built into ``--cache`` if missing), else as given."""
    from harness.images.cache import ImageCache
    from harness.images.qemu import is_version_name, resolve_qemu_option
    value = getattr(args, "qemu", None) or os.environ.get("DMA_HARNESS_QEMU") or None
    if value is None or not is_version_name(value):
        return getattr(args, "qemu", None)
    return resolve_qemu_option(value, ImageCache(getattr(args, "cache", None))).path


def _check_inputs(args: argparse.Namespace) -> None:
    """Refuse, before anything is read, built or booted, an option or environment
    value that cannot be what it names: ``--accel`` and the ``DMA_HARNESS_*``
    choices, ``--cache``/``DMA_HARNESS_CACHE`` and ``--artifacts`` that are not (and
    cannot become) folders, ``--qemu`` that cannot run, and for ``check`` evidence
    that is neither a trace file nor an artifacts folder (a FIFO, a device, a folder
    without ``trace.log``, an evidence file in it that is not a regular file).

    Raises:
        ConfigError: one line naming the option or variable, the value and what is wrong.
        VMError: from :func:`harness.vm.machine.find_qemu`.
    """
    from harness.images.cache import CACHE_ENV
    from harness.options import check_env
    check_env()
    for option in ("qemu", "kernel", "cache", "artifacts", "evidence", "config"):
        if getattr(args, option, None) == "":
            name = option if option in ("evidence", "config") else f"--{option}"
            raise ConfigError(f"{name} is empty: give a path", key=name)
    accel = getattr(args, "accel", None)
    if accel is not None and accel not in ACCELS:
        raise ConfigError(f"--accel {accel!r} is not one of {', '.join(ACCELS)}", key="--accel")
    cache = getattr(args, "cache", None)
    if cache:
        _check_folder("--cache", cache)
    elif os.environ.get(CACHE_ENV):
        _check_folder(CACHE_ENV, os.environ[CACHE_ENV])
    if getattr(args, "artifacts", None):
        _check_folder("--artifacts", args.artifacts)
    if getattr(args, "qemu", None):
        from harness.images.qemu import DEFAULT_NAME, is_version_name, qemu_key
        from harness.vm.machine import find_qemu
        if is_version_name(args.qemu) and args.qemu != DEFAULT_NAME:
            qemu_key(args.qemu)  # a version the harness provides (built later, into --cache)
        else:
            find_qemu(args.qemu)
    if getattr(args, "evidence", None) is not None:
        _check_evidence(Path(args.evidence))
    if getattr(args, "kernel", None):  # a version name the project does not build (a path is read later)
        from harness.images.kernel import resolve_kernel_choice
        resolve_kernel_choice(args.kernel)


def _file_kind(path: Path) -> str:
    """What a path that exists is: "a directory", "a FIFO", "a regular file"..."""
    import stat
    mode = path.stat().st_mode
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _check_folder(option: str, value: str) -> None:
    """``value`` is a folder the harness may write into, or one it can create."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {value!r} is {_file_kind(path)}, not a folder", key=option)
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {value!r} is a folder this user cannot write into", key=option)
        return
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {value!r} cannot be created: {str(parent)!r} is {_file_kind(parent)}, "
                          "not a folder", key=option)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {value!r} cannot be created: this user cannot write into {str(parent)!r}",
                          key=option)


def _check_evidence(path: Path) -> None:
    """``check``'s input: a regular trace file, or a folder whose evidence files are regular files."""
    from harness.finish import GUEST_TRACE, GUEST_TRACE_INFO, HOST_TRACE, RECORDS, compressed_or_plain
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist", key="evidence")
    kind = _file_kind(path)
    if kind == "a directory":
        traces = [f"{HOST_TRACE}{suffix}" for suffix in ("", ".xz", ".gz")]
        for name in (*traces, GUEST_TRACE, GUEST_TRACE_INFO, RECORDS, "spec.json"):
            if (path / name).exists() and _file_kind(path / name) != "a regular file":
                raise ConfigError(f"{str(path / name)!r} is {_file_kind(path / name)}, not a regular file",
                                  key="evidence")
        if compressed_or_plain(path / HOST_TRACE) is None and not (path / RECORDS).is_file():
            raise ConfigError(f"{str(path)!r} is a folder without {HOST_TRACE} or {RECORDS}: not an artifacts "
                              "folder of a run", key="evidence")
        _check_evidence_json(path)
    elif kind != "a regular file":
        raise ConfigError(f"{str(path)!r} is {kind}, not a trace file or an artifacts folder", key="evidence")


MAX_JSON_EVIDENCE = 256 << 20
"""Bytes of a JSON file of an artifacts folder read at most (a run's are far smaller)."""


def _check_evidence_json(folder: Path) -> None:
    """The JSON files of an artifacts folder hold what a run writes: ``records.json`` a
    list of agent calls (``op``, ``args``, ``result``) or op records whose
    ``nvme.pattern_rw`` I/Os are well formed, ``guest-trace.json`` a table with a
    count ``lost``, ``spec.json`` a table with a list ``devices``."""
    from harness.finish import GUEST_TRACE_INFO, RECORDS

    def load(name: str) -> Any:
        path = folder / name
        if not path.exists():
            return None
        if path.stat().st_size > MAX_JSON_EVIDENCE:
            raise ConfigError(f"{str(path)!r} is larger than {MAX_JSON_EVIDENCE >> 20} MiB: not what a run writes",
                              key="evidence")
        try:
            return json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{str(path)!r} is not UTF-8 (byte offset {exc.start})", key="evidence") from None
        except RecursionError:
            raise ConfigError(f"{str(path)!r}: cannot read it as JSON: nested too deeply", key="evidence") from None
        except ValueError as exc:
            raise ConfigError(f"{str(path)!r}: cannot read it as JSON: {exc}", key="evidence") from None

    def bad(name: str, what: str) -> ConfigError:
        return ConfigError(f"{str(folder / name)!r}: {what}", key="evidence")

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64

    info = load(GUEST_TRACE_INFO)
    if info is not None and (not isinstance(info, dict) or not count(info.get("lost", 0))):
        raise bad(GUEST_TRACE_INFO, "not a table whose 'lost' is a count of events")
    spec = load("spec.json")
    if spec is not None and (not isinstance(spec, dict) or not isinstance(spec.get("devices", []), list)):
        raise bad("spec.json", "not a machine spec (a table with a list 'devices')")
    records = load(RECORDS)
    if records is None:
        return
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise bad(RECORDS, "not a list of op records")
    calls = bool(records) and "result" in records[0]
    for i, rec in enumerate(records):
        if not isinstance(rec.get("op"), str):
            raise bad(RECORDS, f"record {i} has no string 'op'")
        if calls:
            rec = {"op": rec["op"], **rec["result"]} if isinstance(rec.get("result"), dict) else {}
        if rec.get("op") != "nvme.pattern_rw" or "ios" not in rec:
            continue
        pages = rec.get("buffers_pages", [])
        if not isinstance(pages, list) or not all(isinstance(b, list) and all(count(p) for p in b) for b in pages):
            raise bad(RECORDS, f"record {i}: 'buffers_pages' is not a list of lists of page addresses")
        if not count(rec.get("lba_size", 512)) or not rec.get("lba_size", 512):
            raise bad(RECORDS, f"record {i}: 'lba_size' is not a positive number of bytes")
        ios = rec["ios"]
        if not isinstance(ios, list) or not all(
                isinstance(io, dict) and all(count(io.get(k)) for k in ("io", "pos", "len"))
                and count(io.get("buffer", 0)) and io.get("dir") in ("read", "write") for io in ios):
            raise bad(RECORDS, f"record {i}: 'ios' is not a list of I/Os (io, dir read/write, pos, len, buffer)")


def cmd_run(args: argparse.Namespace) -> int:
    _check_inputs(args)
    from harness.run import run_scenario
    from harness.scenario import load_scenario
    scenario = load_scenario(args.config)
    h = _harness(args)
    dest = Path(args.artifacts) / scenario.name
    result = run_scenario(h, scenario, artifacts_dir=dest)
    verdict = result.verdict
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"scenario {scenario.name}: accel {result.accel}, guest ready in {result.boot_seconds:.2f}s, "
              f"workload {result.workload_seconds:.2f}s ({len(result.records)} agent ops)")
        print(verdict.format())
        for note in result.finished.notes:
            print(f"note: {note}")
        if result.artifacts:
            print(f"artifacts: {result.artifacts}")
    if result.finished.artifacts_error:
        print(f"error: {result.finished.artifacts_error}", file=sys.stderr)
    return _STATUS_EXIT[verdict.status]


def cmd_bench_boot(args: argparse.Namespace) -> int:
    _check_inputs(args)
    from harness.bench import boot as boot_bench
    from harness.scenario import load_scenario
    from harness.vm.machine import VM
    from harness.vm.spec import default_machine, xen_machine
    if args.config:
        spec = load_scenario(args.config).machine
    else:
        spec = xen_machine() if args.profile == "xen" else default_machine()
    if args.runs < 1:
        raise HarnessError("--runs must be at least 1")
    h = _harness(args)
    accel = h.accel(spec.accel)
    print(f"accelerator: {accel.accel} ({accel.reason})")
    if spec.xen is not None:
        print(f"hypervisor: {h.images(spec).hypervisor} (dom0: the harness's kernel and initramfs)")

    def per_boot(i: int, vm: VM) -> str:
        rtt = _median_seconds(lambda: vm.agent.call("ping", timeout=10))
        line = f"; virtio-serial agent round trip median {rtt * 1000:.2f} ms"
        if args.trace:
            import time
            t0 = time.perf_counter()
            got = vm.agent.call("tracefs.collect", timeout=120)
            line += (f"; guest trace collected in {(time.perf_counter() - t0) * 1000:.0f} ms "
                     f"({got['bytes'] // 1024} KiB, {got['lost']} lost)")
        if i == args.runs - 1:
            vm.ssh()
            ssh_rtt = _median_seconds(lambda: vm.ssh_run("true"), n=10)
            line += f"; SSH exec round trip median {ssh_rtt * 1000:.1f} ms"
        return line

    if getattr(args, "snapshot", False):  # harness/vm/snapshot.py
        from harness.vm.snapshot import SnapshotUnsupported
        try:
            boot_bench.run_snapshot(h, spec, runs=args.runs)
        except SnapshotUnsupported as exc:
            raise HarnessError(f"this machine cannot be snapshotted: {exc}") from None
        return 0
    boot_bench.run(h, spec, runs=args.runs, trace=args.trace, floor=not args.no_floor, per_boot=per_boot)
    return 0


def _median_seconds(fn: Callable[[], object], n: int = 20) -> float:
    import time
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def cmd_bench_xdist(args: argparse.Namespace) -> int:
    from harness.bench import xdist
    return xdist.run(args.workers, args.dist, args.pytest_args, warm=not args.no_warm_up)


def cmd_bench_iotlb(args: argparse.Namespace) -> int:
    from harness.bench import iotlb
    return int(iotlb.main(["--ops", str(args.ops)]))


def cmd_bench_pinning(args: argparse.Namespace) -> int:
    from harness.bench import pinning
    return int(pinning.main(["--ops", str(args.ops)]))


def cmd_bench_grant(args: argparse.Namespace) -> int:
    from harness.bench import grant
    return int(grant.main(["--ops", str(args.ops)]))


def cmd_images(args: argparse.Namespace) -> int:
    if args.images == "key":
        return cmd_images_key(args)
    _check_inputs(args)
    from harness.images.cache import ImageCache, recipes_dir
    from harness.images.kernel import ensure_kernel, kernel_patches, recipe_key
    from harness.images.rootfs import base_key, ensure_initrd
    from harness.images.sshkey import ensure_ssh_key
    from harness.images.xen import ensure_xen, xen_key
    cache = ImageCache(args.cache)
    if args.images == "build":
        image_builder = IMAGE_BUILDERS.get(args.image or "")
        if args.image and image_builder is None:
            raise ConfigError(f"images build {args.image!r}: not an image it builds (known: "
                              f"{', '.join(sorted(IMAGE_BUILDERS))}; none for all of them)", key="IMAGE")
        if image_builder is not None:
            return image_builder(args, cache)
        if args.version:
            raise ConfigError("images build --version needs an IMAGE (images build kernel --version 7.2)",
                              key="--version")
        if args.patch:  # a planted-bug kernel only (the rest is shared with the project's kernel)
            kernel = ensure_kernel(cache, refresh=args.refresh, patch=args.patch)
            print(f"kernel:  {kernel.bzimage} ({kernel.origin})")
            return 0
        kernel = ensure_kernel(cache, refresh=args.refresh)
        key = ensure_ssh_key(cache)
        initrd = ensure_initrd(cache, key, refresh=args.refresh)
        xen = ensure_xen(cache, refresh=args.refresh)
        print(f"kernel:  {kernel.bzimage} ({kernel.origin})")
        print(f"initrd:  {initrd.path}")
        if initrd.usr_image is not None:
            print(f"/usr:    {initrd.usr_image} (erofs, with {initrd.usr_initrd})")
        print(f"ssh key: {key.private}")
        print(f"xen:     {xen.path} (Debian {xen.version})")
        return 0
    # show only looks: nothing is built, locked or created here.
    print(f"cache root: {cache.root}")
    print(f"recipes:    {recipes_dir()}")
    for kind, entry_key in (("kernel", recipe_key()), ("rootfs", base_key()), ("xen", xen_key())):
        state = "built" if cache.complete(kind, entry_key) else "not built"
        print(f"  {kind:7s} {cache.entry(kind, entry_key)}  [{state}]")
    for patch in kernel_patches():
        entry_key = recipe_key(patch)
        state = "built" if cache.complete("kernel", entry_key) else f"not built: images build --patch {patch}"
        print(f"  kernel + {patch}.patch {cache.entry('kernel', entry_key)}  [{state}]")
    from harness.images.kernel import DEFAULT_KERNEL_VERSION, KERNEL_SOURCES
    for version, source in KERNEL_SOURCES.items():  # the other kernel versions the project builds
        if version != DEFAULT_KERNEL_VERSION:
            entry_key = recipe_key(version=version)
            state = ("built" if cache.complete("kernel", entry_key)
                     else f"not built: images build kernel --version {version}")
            print(f"  kernel {version} ({source.package}) {cache.entry('kernel', entry_key)}  [{state}]")
    ssh_key = cache.path("ssh", "id_ed25519")
    print(f"  ssh key {ssh_key}  [{'present' if ssh_key.is_file() else 'not generated'}]")
    from harness.images.qemu import QEMU_VERSIONS, qemu_key
    for version in QEMU_VERSIONS:
        entry_key = qemu_key(version)
        state = "built" if cache.complete("qemu", entry_key) else f"not built: images build qemu --version {version}"
        print(f"  qemu {version:<6s} {cache.entry('qemu', entry_key)}  [{state}]")
    return 0


def _build_kernel_image(args: argparse.Namespace, cache: ImageCache) -> int:
    """``images build kernel [--version V] [--patch NAME] [--refresh]``: the project's
    kernel of one version (harness.images.kernel.KERNEL_SOURCES), or its planted-bug
    variant; nothing else is built."""
    from harness.images.kernel import ensure_kernel, resolve_kernel_choice
    choice = resolve_kernel_choice(args.version, option="--version")
    if choice.version is None:
        raise ConfigError(f"--version {args.version!r} is not a kernel version name (6.12, 7.2)", key="--version")
    kernel = ensure_kernel(cache, refresh=args.refresh, patch=args.patch, version=choice.version)
    print(f"kernel:  {kernel.bzimage} ({kernel.origin})")
    return 0


IMAGE_BUILDERS: dict[str, Callable[[argparse.Namespace, ImageCache], int]] = {"kernel": _build_kernel_image}
"""``images build IMAGE``: the builder of each image that can be built alone."""


def _build_qemu_image(args: argparse.Namespace, cache: ImageCache) -> int:
    """``images build qemu --version V [--refresh]``: the harness's build of QEMU ``V``
    (harness.images.qemu.QEMU_VERSIONS); nothing else is built."""
    from harness.images.qemu import QEMU_VERSIONS, ensure_qemu
    if not args.version:
        raise ConfigError(f"images build qemu needs --version ({', '.join(QEMU_VERSIONS)})", key="--version")
    if args.patch:
        raise ConfigError("images build qemu: --patch is for kernels", key="--patch")
    build = ensure_qemu(cache, args.version, refresh=args.refresh)
    print(f"qemu {build.name}: {build.path} (key {build.key}; "
          + ", ".join(f"{p} {v}" for p, v in build.packages.items()) + ")")
    return 0


IMAGE_BUILDERS["qemu"] = _build_qemu_image


def cmd_images_key(args: argparse.Namespace) -> int:
    """``images key``: the recipe keys (:func:`harness.nightly.recipe_keys`), from the
    packaged recipes alone (no cache is opened)."""
    from harness.nightly import recipe_keys
    from harness.images.qemu import QEMU_VERSIONS, qemu_key
    keys = recipe_keys()
    keys.update({f"qemu-{version}": qemu_key(version) for version in QEMU_VERSIONS})  # images build qemu --version
    from harness.images.kernel import DEFAULT_KERNEL_VERSION, KERNEL_SOURCES, recipe_key
    keys.update({f"kernel-{version}": recipe_key(version=version)  # images build kernel --version
                 for version in KERNEL_SOURCES if version != DEFAULT_KERNEL_VERSION})
    if args.json:
        print(json.dumps(keys, sort_keys=True))
    else:
        for kind, key in keys.items():
            print(f"{kind} {key}")
    return 0


def cmd_nightly_history(args: argparse.Namespace) -> int:
    """Exit 0 when nothing regressed against the history's last run (or there was
    none), 1 on a regression, 2 for bad input (see harness.nightly)."""
    from harness.nightly import append_record, compare, last_record, read_junit, totals_line
    labels: dict[str, str] = {}
    for label in args.label:
        name, eq, value = label.partition("=")
        if not eq or not name:
            raise ConfigError(f"--label {label!r} is not NAME=VALUE", key="--label")
        labels[name] = value
    if args.keep < 0:
        raise ConfigError(f"--keep {args.keep} is negative: give a number of runs (0 keeps all)", key="--keep")
    history = Path(args.history)
    previous = last_record(history)  # a bad history is refused before anything is appended
    record = read_junit(Path(args.junit), labels=labels)
    before = previous[0] if previous is not None else None
    changes = compare(before, record)
    if previous is None:
        print(f"run of {record['date']}: first run in {history}, nothing to compare with")
    else:
        print(f"run of {record['date']} against {previous[0].get('date', '?')} ({history} line {previous[1]})")
    print(totals_line(record, before))
    for line in changes.notes:
        print(f"note: {line}")
    for line in changes.regressions:
        print(f"REGRESSION: {line}")
    if not args.dry_run:
        append_record(history, record, keep=args.keep)
    n = len(changes.regressions)
    print(f"{n} regression{'' if n == 1 else 's'}" + ("" if args.dry_run else f"; run appended to {history}"))
    return EXIT_DIVERGENCE if n else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    _check_inputs(args)
    from harness.finish import check_evidence, evidence_folder_or_trace
    path = Path(args.evidence)
    if not path.exists():
        raise HarnessError(f"{str(path)!r} does not exist")
    verdict = check_evidence(evidence_folder_or_trace(path))
    print(json.dumps(verdict.to_dict(), indent=2) if args.json else verdict.format())
    if verdict.status == "inconclusive" and not args.json:
        print(f"inconclusive: {'; '.join(verdict.inconclusive_reasons)}", file=sys.stderr)
    return _STATUS_EXIT[verdict.status]


def cmd_soak(args: argparse.Namespace) -> int:
    """Exit 0 when no VM leaked anything, every fault was reported in time and no
    VM did something unexpected; else 1 (see harness.soak)."""
    from harness.soak import plan, run_soak
    plan(args.vms, args.faults, args.seed)  # refuse impossible numbers before building or booting anything
    report = run_soak(_harness(args), vms=args.vms, faults=args.faults, seed=args.seed,
                      echo=lambda line: print(line, flush=True))
    print(report.summary())
    return EXIT_OK if report.ok else EXIT_DIVERGENCE


def cmd_doctor(args: argparse.Namespace) -> int:
    import os
    import shutil
    from harness.images.kernel import DEFAULT_KERNEL_VERSION, cached_kernel, recipe_key
    from harness.vm.machine import find_qemu
    from harness.vm.spec import MachineSpec
    qemu = find_qemu(args.qemu)
    print(f"qemu: {qemu}")
    print(f"/dev/kvm: {'accessible' if os.access('/dev/kvm', os.R_OK | os.W_OK) else 'not accessible'}")
    missing = [t for t in ("make", "gcc", "flex", "bison", "bc", "mmdebstrap", "dpkg-deb", "apt-get", "xz")
               if shutil.which(t) is None]
    print("build tools: " + ("all present" if not missing else "missing " + ", ".join(missing)))
    h = _harness(args)
    requested = args.accel or h.options.accel
    # Never build here: the KVM probe boots the kernel, so it runs only if one is at hand.
    from harness.images.kernel import resolve_kernel_choice
    kernel_choice = resolve_kernel_choice(h.options.kernel)  # a version name is the project's build: never built here
    if kernel_choice.path is not None or cached_kernel(h.cache, version=kernel_choice.version) is not None:
        kernel = h.kernel(MachineSpec())  # a user's kernel: checked for what the harness itself needs
        print(f"kernel: {kernel.bzimage} ({kernel.origin})")
        choice = h.accel(requested)
        print(f"accelerator: {choice.accel} ({choice.reason})")
    else:
        print(f"kernel: not built yet ({h.cache.entry('kernel', recipe_key(version=kernel_choice.version))}); "
              "build it with: python -m harness images build"
              + ("" if kernel_choice.version == DEFAULT_KERNEL_VERSION
                 else f" kernel --version {kernel_choice.version}"))
        if requested == "auto":
            print("accelerator: not probed (auto needs the kernel: the KVM probe boots it)")
        else:
            print(f"accelerator: {requested} (requested)")
    return 0 if not missing else EXIT_USAGE


def cmd_matrix(args: argparse.Namespace) -> int:
    from harness.matrix import Cell, cells, write_configs
    for viommu, device, c in cells():
        what = f"runs {c.scenario.workload.kind}" if isinstance(c, Cell) else f"skipped: {c.reason}"
        print(f"{viommu:<14} {device:<12} {what}")
    if args.write:
        try:
            written = write_configs(Path(args.write))
        except OSError as exc:
            raise ConfigError(f"--write {args.write}: {exc.strerror or exc}", key="--write") from None
        print(f"wrote {len(written)} scenario files to {args.write}")
    return 0


def cmd_difftest(args: argparse.Namespace) -> int:
    """Exit 0 when sequences were compared and none diverged, 1 for a divergence,
    2 for bad input, 3 when nothing was compared (see harness.difftest.command)."""
    _check_inputs(args)
    _check_folder("--out", args.out)
    from harness.difftest.command import run_command
    return run_command(args, lambda: _harness(args))


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every VM context manager


def _crash_log(exc: BaseException) -> str:
    """Write the traceback of an unexpected exception to a log file; return its path."""
    import tempfile
    import traceback
    fd, name = tempfile.mkstemp(prefix="dma-harness-crash-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(traceback.format_exception(exc)))
    return name


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    handlers = {"run": cmd_run, "images": cmd_images, "check": cmd_check, "doctor": cmd_doctor,
                "soak": cmd_soak, "difftest": cmd_difftest,
                "matrix": cmd_matrix, "nightly-history": cmd_nightly_history}
    try:
        if args.command == "bench":
            bench = {"boot": cmd_bench_boot, "iotlb": cmd_bench_iotlb, "pinning": cmd_bench_pinning,
                     "grant": cmd_bench_grant, "xdist": cmd_bench_xdist}
            return bench[args.bench](args)
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; every VM was shut down", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:  # raised by _sigterm once every VM has unwound
            print("terminated; every VM was shut down", file=sys.stderr)
        raise
    except GuestBootTimeout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGENCE if exc.exitcode is not None else EXIT_USAGE
    except (GuestPanicked, QEMUExited, GuestHung, WorkloadFailed, AgentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGENCE
    except (HarnessError, ImageError, VMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a file the user named (trace, folder) could not be read
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a harness bug: say so, keep the traceback
        print(f"internal error (a bug of dma-harness): {type(exc).__name__}: {exc}; traceback in "
              f"{_crash_log(exc)}", file=sys.stderr)
        return EXIT_SOFTWARE
