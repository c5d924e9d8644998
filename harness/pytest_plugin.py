"""pytest plugin (entry point ``dma_harness``): fixtures that boot real QEMU guests
and check their DMA.

Fixtures:
  ``dma_harness``  (session) the :class:`~harness.session.Harness`: options, images, accel
  ``dma_images``   (session) the :class:`~harness.vm.machine.BootImages` (kernel, initrd, keys),
                   built once per cache and reused
  ``vm_factory``   (function) ``make(spec=None, name=None, trace=True)`` -> a running VM;
                   every VM it made is checked and torn down at teardown;
                   ``make(spec, snapshot=True)`` restores it from the session's snapshot of
                   that machine (saved at first use, harness/vm/snapshot.py), or cold-boots it
                   when the machine cannot be snapshotted (the reason is the JUnit property
                   ``<vm>.start`` and ``start.txt`` in the artifacts)
  ``vm``           (function) one running VM for the test's ``dma_machine`` marker (default:
                   q35 + intel-iommu caching-mode + NVMe)
  ``dma_verdict``  (function) ``dma_verdict(vm)`` ends ``vm``'s run (:func:`harness.finish.finish_vm`:
                   stop it, collect QEMU's and the guest kernel's events, run every checker)
                   and returns the :class:`~harness.checks.verdict.Verdict`

At teardown every VM made with ``trace=True`` is finished the same way; a verdict
that diverged fails the test, and so does an inconclusive one (nothing checked, or
evidence missing), with the reason, unless the test is marked ``dma_no_check``. On
a failure (or with ``--dma-keep-artifacts``) a folder per test holds each VM's QEMU
argv, console log, QMP log, both traces, op records, verdict and a config that
reproduces the VM and replays the agent ops the test ran (``agent-ops`` workload).
Each verdict's status and counts are attached to the JUnit XML as properties
(:func:`verdict_properties`: ``vm0.status``, ``vm0.guest-intent.status``,
``vm0.guest-intent.translations_checked``, ...).
Without QEMU the VM fixtures skip with the reason, unless DMA_HARNESS_REQUIRE_VM=1
(CI), where they fail.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.checks.verdict import Verdict, counts_dict
from harness.finish import QEMU_INFO, Finished, finish_vm, versions_comment
from harness.errors import ConfigError, HarnessError, QEMUNotFound
from harness.scenario import Scenario
from harness.options import ACCELS, OPTION_HELP, HarnessOptions
from harness.session import Harness
from harness.vm.machine import VM, BootImages
from harness.vm.snapshot import SnapshotStore
from harness.vm.spec import MachineSpec, default_machine
from harness.workloads import AgentOps

HARNESS_KEY = pytest.StashKey[Harness]()
MATRIX_HARNESSES_KEY = pytest.StashKey[dict[str, Harness]]()  # one per matrix column ("qemu-A/kernel-B")
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()  # "nodeid::when" -> report

# name, ini/option help, default, kind ("store" or "store_true"); each is --dma-NAME and ini dma_NAME
OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("qemu", OPTION_HELP["qemu"] + "; a version name (10.0) is the harness's build of it; repeat the "
             "option to run every VM test once per QEMU (test ids gain [qemu-VALUE])", None, "append"),
    ("kernel", OPTION_HELP["kernel"] + "; repeat the option to run every VM test once per kernel (test ids "
               "gain [kernel-VALUE])", None, "append"),
    ("accel", OPTION_HELP["accel"], None, "store"),
    ("cache", OPTION_HELP["cache"], None, "store"),
    ("artifacts", OPTION_HELP["artifacts"], "artifacts", "store"),
    ("keep-artifacts", OPTION_HELP["keep-artifacts"], False, "store_true"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dma-harness", "dma-harness: QEMU guests with DMA checking")
    for name, help_text, default, action in OPTIONS:
        ini = "dma_" + name.replace("-", "_")
        group.addoption(f"--dma-{name}", action=action, default=None, dest=ini, help=help_text)
        if action == "store_true":
            parser.addini(ini, help_text, type="bool", default=default)
        else:
            parser.addini(ini, help_text, type="string", default=default)


def _option(config: pytest.Config, name: str) -> Any:
    ini = "dma_" + name.replace("-", "_")
    value = config.getoption(ini)
    if isinstance(value, list):  # a repeatable option (a version matrix): the session's default is the first
        value = value[0] if value else None
    return value if value is not None else config.getini(ini)


# ---- version matrix: --dma-qemu A --dma-qemu B ----------------------------------------------

MATRIX_OPTIONS: tuple[str, ...] = ("qemu", "kernel")
"""Repeatable options whose values form a matrix: with two or more values, every test
using ``dma_harness`` runs once per value (fixture ``dma_matrix_<name>``, test id
``[<name>-<value>]``); with one value (or none) nothing is parametrized."""


def matrix_values(config: pytest.Config, name: str) -> list[str]:
    """The distinct values given for the repeatable option ``--dma-<name>``, in order."""
    values = config.getoption("dma_" + name) or []
    return list(dict.fromkeys(v for v in values if v))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dma_harness" not in metafunc.fixturenames:
        return
    for name in MATRIX_OPTIONS:
        values = matrix_values(metafunc.config, name)
        if len(values) > 1:
            metafunc.parametrize(f"dma_matrix_{name}", values, indirect=True, scope="session",
                                 ids=[f"{name}-{v}" for v in values])


@pytest.fixture(scope="session")
def dma_matrix_qemu(request: pytest.FixtureRequest) -> str | None:
    """The QEMU of this test's column of the matrix (``--dma-qemu`` given twice or
    more), or None without a matrix (the session's QEMU)."""
    value: str | None = getattr(request, "param", None)
    return value


@pytest.fixture(scope="session")
def dma_matrix_kernel(request: pytest.FixtureRequest) -> str | None:
    """The kernel of this test's column of the matrix (``--dma-kernel`` given twice or
    more: version names such as ``6.12`` and ``7.2``, or bzImage paths), or None
    without a matrix (the session's kernel)."""
    value: str | None = getattr(request, "param", None)
    return value


def _matrix_column(qemu: str | None, kernel: str | None) -> str | None:
    """The stash key of one column of the version matrix (``qemu-A/kernel-B``), None without a matrix."""
    parts = [f"{name}-{value}" for name, value in (("qemu", qemu), ("kernel", kernel)) if value is not None]
    return "/".join(parts) or None


def _resolve_versions(options: HarnessOptions) -> HarnessOptions:
    """``options`` with a QEMU version name (``10.0``) replaced by the path of the
    harness's build of it in the options' cache, built first if missing
    (:func:`harness.images.qemu.resolve_qemu_option`)."""
    import dataclasses

    from harness.images.cache import ImageCache
    from harness.images.qemu import is_version_name, resolve_qemu_option
    if options.qemu and is_version_name(options.qemu):
        options = dataclasses.replace(options, qemu=resolve_qemu_option(options.qemu, ImageCache(options.cache)).path)
    return options


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dma_machine(spec: MachineSpec): the machine the `vm` fixture boots")
    config.addinivalue_line("markers", "dma_no_check: do not fail the test on a diverging or inconclusive "
                                       "verdict at teardown")
    config.stash[REPORTS_KEY] = {}
    accel = _option(config, "accel")
    if accel not in (None, "", *ACCELS):
        raise pytest.UsageError(f"--dma-accel must be auto, tcg or kvm, not {accel!r}")
    try:
        _options(config)  # bad DMA_HARNESS_* environment values are a usage error, named once
        from harness.images.kernel import resolve_kernel_choice
        for kernel in {*matrix_values(config, "kernel"), _option(config, "kernel") or ""} - {""}:
            resolve_kernel_choice(kernel, option="--dma-kernel")  # a version name the project does not build
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def _options(config: pytest.Config) -> HarnessOptions:
    return HarnessOptions.from_env(
        qemu=_option(config, "qemu") or None, kernel=_option(config, "kernel") or None,
        accel=_option(config, "accel") or None, cache=_option(config, "cache") or None,
        artifacts=_option(config, "artifacts"), keep_artifacts=bool(_option(config, "keep-artifacts")))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.config.stash[REPORTS_KEY][f"{item.nodeid}::{report.when}"] = report
    return report


def _failed(item: pytest.Item) -> bool:
    reports = item.config.stash[REPORTS_KEY]
    return any(r.failed for when in ("setup", "call")
               if (r := reports.get(f"{item.nodeid}::{when}")) is not None)


@pytest.fixture(scope="session")
def dma_harness(pytestconfig: pytest.Config, dma_matrix_qemu: str | None,
                dma_matrix_kernel: str | None) -> Harness:
    column = _matrix_column(dma_matrix_qemu, dma_matrix_kernel)
    if column is not None:  # one session Harness per QEMU and kernel of the matrix
        harnesses = pytestconfig.stash.setdefault(MATRIX_HARNESSES_KEY, {})
        if column in harnesses:
            return harnesses[column]
    elif HARNESS_KEY in pytestconfig.stash:
        return pytestconfig.stash[HARNESS_KEY]
    options = _options(pytestconfig)
    if dma_matrix_qemu is not None:
        import dataclasses
        options = dataclasses.replace(options, qemu=dma_matrix_qemu)
    if dma_matrix_kernel is not None:  # a version name is resolved by the Harness (harness.images.kernel)
        import dataclasses
        options = dataclasses.replace(options, kernel=dma_matrix_kernel)
    try:
        options = _resolve_versions(options)
        h = Harness(options)
        h.images()
    except QEMUNotFound as exc:
        if os.environ.get("DMA_HARNESS_REQUIRE_VM"):
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    except HarnessError as exc:
        pytest.fail(f"dma-harness cannot prepare guest images: {exc}", pytrace=False)
    if column is not None:
        pytestconfig.stash[MATRIX_HARNESSES_KEY][column] = h
    else:
        pytestconfig.stash[HARNESS_KEY] = h
    pytestconfig.add_cleanup(h.close)  # releases the cache entries it holds
    return h


SNAPSHOTS_KEY = pytest.StashKey[dict[int, SnapshotStore]]()  # id(Harness) -> its SnapshotStore


def snapshot_store(config: pytest.Config, harness: Harness) -> SnapshotStore:
    """The session's :class:`~harness.vm.snapshot.SnapshotStore` for ``harness`` (one per
    Harness of the QEMU/kernel matrix), made on first use and removed with every snapshot
    it holds at the end of the session (``config.add_cleanup``)."""
    stores = config.stash.setdefault(SNAPSHOTS_KEY, {})
    if id(harness) not in stores:
        store = SnapshotStore(harness)
        store.open()
        config.add_cleanup(store.close)
        stores[id(harness)] = store
    return stores[id(harness)]


@pytest.fixture(scope="session")
def dma_images(dma_harness: Harness) -> BootImages:
    return dma_harness.images()


def _slug(nodeid: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")
    if len(slug) > 150:  # long ids that differ only past the cut (parametrized) keep their own folders
        slug = slug[:133] + "-" + hashlib.sha256(nodeid.encode()).hexdigest()[:16]
    return slug


class _Tracked:
    def __init__(self, vm: VM, trace: bool):
        self.vm = vm
        self.trace = trace
        self.finished: Finished | None = None

    def finish(self) -> Verdict | None:
        """End the VM's run once (see harness.finish); None for a VM without tracing
        or one that never got a run directory."""
        if self.finished is None and self.trace and self.vm.run_dir is not None:
            self.finished = finish_vm(self.vm)
        return self.finished.verdict if self.finished is not None else None


def verdict_properties(vm_name: str, verdict: Verdict) -> list[tuple[str, object]]:
    """The JUnit XML properties of one VM's verdict, as ``(name, value)`` pairs for
    ``item.user_properties`` (pytest writes them into the test case's ``<properties>``):

    * ``<vm>.status``: the verdict's status (``ok``, ``divergence``, ``inconclusive``);
    * ``<vm>.failures``: how many failures of the system under test were seen
      outside the checkers (data that did not verify, a guest panic, ...);
    * ``<vm>.<checker>.status``: each checker's own status;
    * ``<vm>.<checker>.<count>``: each of its counts (``vm0.guest-intent.translations_checked``,
      ``vm0.xen-grant.grants``), in the checker's units;
    * ``<vm>.version.<name>``: the versions the verdict names (QEMU, kernel), when it names any.

    ``harness.nightly`` reads them back from the XML.
    """
    props: list[tuple[str, object]] = [(f"{vm_name}.status", verdict.status),
                                       (f"{vm_name}.failures", len(verdict.failures))]
    for name, version in sorted(verdict.versions.items()):
        props.append((f"{vm_name}.version.{name}", version))
    for r in verdict.reports:
        props.append((f"{vm_name}.{r.checker}.status", r.status))
        props.extend((f"{vm_name}.{r.checker}.{key}", value) for key, value in counts_dict(r.counts).items())
    return props


def _config_toml(vm: VM, nodeid: str) -> str:
    calls = [{"op": c["op"], "args": c["args"]} for c in vm.agent_calls]
    scen = Scenario(name=vm.name, machine=vm.spec, workload=AgentOps(ops=tuple(calls)),
                    description=f"VM {vm.name} of test {nodeid}: the workload replays the guest agent ops "
                                "the test ran; the rest of the test's steps are its code",
                    boot_timeout=vm.boot_timeout)
    return scen.to_toml()


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, dma_harness: Harness) -> Iterator[Callable[..., VM]]:
    tracked: list[_Tracked] = []

    def make(spec: MachineSpec | None = None, name: str | None = None, *, trace: bool = True,
             boot_timeout: float = 60.0, snapshot: bool = False) -> VM:
        if snapshot:  # restored from the session's snapshot of this machine (harness/vm/snapshot.py)
            vm = snapshot_store(request.config, dma_harness).vm(
                spec or default_machine(), name=name or f"vm{len(tracked)}", boot_timeout=boot_timeout, trace=trace)
        else:
            vm = dma_harness.vm(spec or default_machine(), name=name or f"vm{len(tracked)}",
                                boot_timeout=boot_timeout, trace=trace)
        tracked.append(_Tracked(vm, trace))
        try:
            vm.launch()
            vm.wait_ready()
        except BaseException:
            vm.shutdown()  # the run directory stays for the teardown to save its console log
            raise
        start_note = getattr(vm, "start_note", None)  # restored from a snapshot, or why it was cold-booted
        if start_note:
            request.node.user_properties.append((f"{vm.name}.start", start_note))
        return vm

    make.tracked = tracked  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        problems = []
        no_check = request.node.get_closest_marker("dma_no_check") is not None
        for entry in tracked:
            try:
                verdict = None
                if entry.vm.boot_seconds is not None:  # it booted: its run has evidence to judge
                    verdict = entry.finish()
                if verdict is not None:
                    request.node.user_properties.extend(verdict_properties(entry.vm.name, verdict))
                bad = verdict is not None and verdict.status != "ok"
                if bad or _failed(request.node) or dma_harness.options.keep_artifacts:
                    dest = Path(dma_harness.options.artifacts) / _slug(request.node.nodeid) / entry.vm.name
                    entry.vm.shutdown()
                    extra: dict[str, Any] = {"config.toml": _config_toml(entry.vm, request.node.nodeid)}
                    if getattr(entry.vm, "start_note", None):
                        extra["start.txt"] = f"{entry.vm.start_note}\n"
                    if verdict is not None:
                        extra.update({"verdict.json": verdict.to_dict(), "verdict.txt": verdict.format()})
                        extra["config.toml"] = versions_comment(verdict.versions) + extra["config.toml"]
                        info = Path(entry.vm.run_dir) / QEMU_INFO if entry.vm.run_dir is not None else None
                        if info is not None and info.is_file():
                            extra[QEMU_INFO] = info.read_text()
                    entry.vm.save_artifacts(dest, extra)
                if bad and not no_check:
                    assert verdict is not None
                    what = ("DMA diverged from the models" if verdict.status == "divergence"
                            else "the DMA verdict is inconclusive")
                    problems.append(f"{entry.vm.name}: {what}\n{verdict.format()}")
            finally:
                entry.vm.close()
        if problems:
            pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def vm(request: pytest.FixtureRequest, vm_factory: Callable[..., VM]) -> VM:
    marker = request.node.get_closest_marker("dma_machine")
    spec = marker.args[0] if marker and marker.args else None
    if spec is not None and not isinstance(spec, MachineSpec):
        raise pytest.UsageError("@pytest.mark.dma_machine takes one MachineSpec")
    return vm_factory(spec)


@pytest.fixture
def dma_verdict(vm_factory: Callable[..., VM]) -> Callable[[VM], Verdict]:
    """``dma_verdict(vm)``: end ``vm``'s run and return its verdict (every checker)."""

    def get(target: VM) -> Verdict:
        for entry in vm_factory.tracked:  # type: ignore[attr-defined]
            if entry.vm is target:
                verdict: Verdict | None = entry.finish()
                if verdict is None:
                    raise pytest.UsageError("this VM was made with trace=False")
                return verdict
        raise pytest.UsageError("dma_verdict() takes a VM made by the vm/vm_factory fixtures")

    return get
