"""The one way a run ends: stop the VM, collect both event streams, run every
checker that applies, save the evidence and return the verdict.

The command line (``run``), the pytest plugin (fixture teardown and
``dma_verdict``) and the replay of a saved run (``check FOLDER``) all go
through here, so a test and a command judge the same evidence the same way.

What a run leaves (its *evidence*, in the VM's run directory and then in the
artifacts folder):

=====================  ======================================================
``trace.log``          QEMU's trace (what the device and the vIOMMU did)
``guest-trace.txt``    the guest kernel's trace (what the guest mapped,
                       invalidated, submitted; the agent's I/O markers)
``guest-trace.json``   how the guest trace was collected: lost events, size
``records.json``       the guest agent's op records (op, args, result)
``verdict.json/.txt``  the verdict
``config.toml``        a scenario that reproduces the VM (and its workload)
=====================  ======================================================

Checkers: ``vtd-consistency`` (:mod:`harness.checks.vtd`, QEMU against
itself), ``guest-intent`` (:mod:`harness.checks.guest_intent`, QEMU's
translations against the guest kernel's mappings), when the records hold
O_DIRECT I/O, ``block-data`` (:mod:`harness.checks.block_data`, the data
against the agent's buffer pages), and when they hold iommufd, VFIO, KVM or
userspace-NVMe ops, ``ioas`` (:mod:`harness.checks.ioas`, the ops against the
pinning, VFIO and KVM-VFIO models, the vfio controller's DMA against the IOAS).
On a Xen machine (dom0 is the guest), ``xen-grant`` (:mod:`harness.checks.grant`,
dom0's grant ops and Xen's dumped entries against the grant model) is the check.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.checks.block_data import BlockDataChecker, ios_from_records
from harness.checks.grant import GrantChecker
from harness.checks.grant import applies as grant_applies
from harness.checks.guest_intent import GuestIntentChecker
from harness.checks.ioas import IoasChecker
from harness.checks.ioas import applies as ioas_applies
from harness.checks.sync import SyncPairs, host_sync_keys
from harness.checks.verdict import Verdict
from harness.checks.virtio_iommu import VirtioIommuChecker, as_dmar_translations
from harness.checks.virtio_iommu_sync import VirtioIommuSync
from harness.checks.vtd import VtdChecker
from harness.checks.devices import require_devices
from harness.checks.verdict import CheckReport
from harness.checks.virtio_blk_data import VirtioBlkDataChecker, virtio_ios_from_records
from harness.vm.virtio import DmaDevice, expected_dma_devices
from harness.errors import AgentError, ConfigError, VMError
from harness.trace.events import VIRTIO_IOMMU_EVENT_CLASSES, Event
from harness.trace.guest import GUEST_TRACE_EVENTS, GuestEvent, parse_guest_file
from harness.trace.formats import DEFAULT_SERIES, FAMILIES, FormatChoice, device_families
from harness.trace.parser import parse_file
from harness.images.kernel import DEFAULT_KERNEL_VERSION
from harness.vm.machine import VM

__all__ = ["GUEST_TRACE_EVENTS", "RunEvidence", "Finished", "check_evidence", "collect_guest_trace", "finish_vm"]

QEMU_INFO = "qemu.json"
"""The versions a run used and the trace format table chosen for its QEMU."""
HOST_TRACE = "trace.log"
GUEST_TRACE = "guest-trace.txt"
GUEST_TRACE_INFO = "guest-trace.json"
RECORDS = "records.json"


@dataclass
class RunEvidence:
    """Paths and records of one run; see the module docstring.

    ``guest_trace`` None means the guest's stream is missing (then the
    guest-intent check is inconclusive).  ``guest_lost``: events the guest's
    ring buffer dropped.  ``nvme_controllers``: how many NVMe controllers the
    machine had (NVMe sync pairs are used only with one).
    """

    host_trace: Path | None
    guest_trace: Path | None = None
    guest_lost: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    nvme_controllers: int = 1
    virtio_iommu: bool | None = None
    """The machine has a virtio-iommu (None: decide from the host trace's first lines)."""
    devices: list[dict[str, Any]] | None = None
    """The machine's devices as tables (``spec.json``); their DMA devices must each
    have had something checked (:mod:`harness.checks.devices`).  None: unknown."""
    xen: bool | None = None
    """The machine booted Xen with the guest as dom0 (None: decide from the records)."""
    formats: FormatChoice | None = None
    """The trace format table of the QEMU that wrote ``host_trace`` and the event
    families it could not vouch for (:mod:`harness.trace.formats`); None: unknown
    (QEMU 7.2's table, as before versions were recorded)."""
    versions: dict[str, str] = field(default_factory=dict)
    """The versions the run used (``qemu.json``), named by the verdict."""

    @classmethod
    def from_folder(cls, folder: Path) -> RunEvidence:
        """The evidence saved in an artifacts folder (or a run directory).

        Raises ConfigError naming the file when the folder lacks the host trace
        or holds a file that is not what it should be.
        """
        host = compressed_or_plain(folder / HOST_TRACE)
        if host is None and not (folder / RECORDS).is_file():
            raise ConfigError(f"{folder} holds no {HOST_TRACE} and no {RECORDS} (not an artifacts folder of a run)")
        guest = compressed_or_plain(folder / GUEST_TRACE)
        info = _read_json(folder / GUEST_TRACE_INFO, {})
        records = _read_json(folder / RECORDS, [])
        spec = _read_json(folder / "spec.json", {})
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ConfigError(f"{folder / RECORDS}: not a list of op records")
        devices = spec.get("devices", []) if isinstance(spec, dict) else []
        nvme = sum(1 for d in devices if isinstance(d, dict) and d.get("kind") == "nvme") or 1
        viommu = any(isinstance(d, dict) and d.get("kind") == "virtio-iommu" for d in devices) or None
        qemu = _read_json(folder / QEMU_INFO, None)
        formats = None
        versions: dict[str, str] = {}
        if isinstance(qemu, dict) and isinstance(qemu.get("versions"), dict):
            versions = {str(k): str(v) for k, v in qemu["versions"].items()}
        if qemu is not None:
            try:
                formats = FormatChoice.from_dict(qemu.get("trace_formats", {}) if isinstance(qemu, dict) else {})
            except ValueError as exc:
                raise ConfigError(f"{folder / QEMU_INFO}: trace_formats: {exc}") from None
        return cls(host, guest, int(info.get("lost", 0)) if isinstance(info, dict) else 0, records, nvme, viommu,
                   devices=[d for d in devices if isinstance(d, dict)] if isinstance(spec, dict) else None,
                   xen=("xen" in spec) if isinstance(spec, dict) and spec else None, formats=formats,
                   versions=versions)


def compressed_or_plain(path: Path) -> Path | None:
    """``path``, or ``path.xz`` / ``path.gz`` (recorded runs kept as test data), if one is a file."""
    for candidate in (path, path.with_name(path.name + ".xz"), path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it as JSON: {exc}") from None


def op_records(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Agent calls (``{"op", "args", "result"}``) as the checkers' op records:
    ``{"op": name, **result}`` for dict results."""
    out = []
    for call in calls:
        result = call.get("result")
        if isinstance(result, dict):
            out.append({"op": call["op"], **result})
    return out


def check_evidence(ev: RunEvidence) -> Verdict:
    """Run every applicable checker over the evidence (two passes over QEMU's trace).

    Raises OSError (from the trace parsers) when a trace file cannot be read.
    """
    if ev.xen or (ev.xen is None and grant_applies(ev.records)):
        return Verdict(reports=[GrantChecker(ev.records).finish()])
    if ev.host_trace is None:
        raise ConfigError("the run left no QEMU trace (trace.log) to check")
    host_trace = ev.host_trace
    guest: list[GuestEvent] = list(parse_guest_file(ev.guest_trace)) if ev.guest_trace is not None else []
    nvme = ev.nvme_controllers <= 1

    table = ev.formats.table if ev.formats is not None else None

    def host() -> Iterator[Event]:
        return parse_file(host_trace, table=table)

    if _uses_virtio_iommu(ev, host):
        return _require_formats(ev, _check_virtio_iommu_evidence(ev, guest, host, nvme))
    sync = SyncPairs.build(guest, host_sync_keys(host(), nvme=nvme),
                           nvme=nvme)
    vtd = VtdChecker()
    intent = GuestIntentChecker(guest, sync, lost=ev.guest_lost)
    if ev.guest_trace is None:
        intent.counts.guest_events = 0
    records = op_records(ev.records) if ev.records and "result" in ev.records[0] else ev.records
    ios = ios_from_records(records)
    data = BlockDataChecker(ios, guest, sync) if ios else None
    ioas = IoasChecker(ev.records) if ev.records and ioas_applies(ev.records) else None
    virtio_ios = virtio_ios_from_records(records)  # virtio-blk (harness/checks/virtio_blk_data.py)
    vdata = VirtioBlkDataChecker(virtio_ios, guest, sync) if virtio_ios else None
    for event in host():
        vtd.feed(event)
        intent.feed(event)
        if data is not None:
            data.feed(event)
        if ioas is not None:
            ioas.feed(event)
        if vdata is not None:
            vdata.feed(event)
    reports = [vtd.finish(), intent.finish()]
    if data is not None:
        reports.append(data.finish())
    if ioas is not None:
        reports.append(ioas.finish())
    if vdata is not None:
        reports.append(vdata.finish())
    _require_devices(ev, reports)
    return _require_formats(ev, Verdict(reports=reports))


def _require_formats(ev: RunEvidence, verdict: Verdict) -> Verdict:
    """Every report is inconclusive, with the reason, when a trace event family the
    machine's checkers read (:func:`harness.trace.formats.device_families`) has no
    format the harness knows for the QEMU that wrote the trace: never OK on a guess."""
    verdict.versions.update(ev.versions)
    if ev.formats is None:
        return verdict
    kinds = None if ev.devices is None else [str(d.get("kind")) for d in ev.devices]
    reasons = ev.formats.reasons_for(device_families(kinds))
    for report in verdict.reports:
        report.inconclusive.extend(r for r in reasons if r not in report.inconclusive)
    return verdict


def _require_devices(ev: RunEvidence, reports: list[CheckReport]) -> None:
    """Every DMA device of the machine (nvme, virtio-blk, virtio-net) must have had
    translations checked by the translation checkers (vtd-consistency or
    virtio-iommu, and guest-intent): one with none makes them
    inconclusive (:func:`harness.checks.devices.require_devices`)."""
    if ev.devices is None:
        return
    expected = _placed_dma_devices(ev.devices)
    for report in reports:
        if report.checker in ("vtd-consistency", "virtio-iommu", "guest-intent") and (report.checker != "guest-intent"
                                                                      or ev.guest_trace is not None):
            require_devices(report, expected)


def _placed_dma_devices(devices: list[dict[str, Any]]) -> list[DmaDevice]:
    """:func:`~harness.vm.virtio.expected_dma_devices`, except that a device whose
    table holds its real source id (``sid``: a device hot-plugged after a snapshot
    restore, harness/vm/snapshot.py) is taken where it is."""
    placed = [DmaDevice(int(d["sid"]), str(d.get("kind", "")), str(d.get("id", "") or d.get("kind", "")), i)
              for i, d in enumerate(devices) if isinstance(d.get("sid"), int)]
    return expected_dma_devices([d for d in devices if not isinstance(d.get("sid"), int)]) + placed


# ---- virtio-iommu (harness/checks/virtio_iommu.py) ---------------------------

_VIRTIO_IOMMU_EVENTS = frozenset(VIRTIO_IOMMU_EVENT_CLASSES)
_VIRTIO_IOMMU_PROBE_LINES = 2000


def _uses_virtio_iommu(ev: RunEvidence, host: Callable[[], Iterator[Event]]) -> bool:
    """The machine's vIOMMU is a virtio-iommu: from the spec, else from the trace
    (QEMU traces ``virtio_iommu_switch_address_space`` for every PCI device as
    the machine is built, so the first lines tell)."""
    if ev.virtio_iommu is not None:
        return ev.virtio_iommu
    return any(type(e) in _VIRTIO_IOMMU_EVENTS for e in itertools.islice(host(), _VIRTIO_IOMMU_PROBE_LINES))


def _check_virtio_iommu_evidence(ev: RunEvidence, guest: list[GuestEvent], host: Callable[[], Iterator[Event]],
                                 nvme: bool) -> Verdict:
    """The checkers of a virtio-iommu machine: ``virtio-iommu`` (QEMU against the
    model of the driver's requests) in place of ``vtd-consistency``, then
    ``guest-intent`` and ``block-data`` as for intel-iommu, ordered by the
    virtio-iommu sync pairs; block-data reads the translations through
    :func:`~harness.checks.virtio_iommu.as_dmar_translations`."""
    sync = VirtioIommuSync.build_viommu(guest, host(), nvme=nvme)
    viommu = VirtioIommuChecker(expect_endpoints=ev.nvme_controllers)
    intent = GuestIntentChecker(guest, sync, lost=ev.guest_lost)
    if ev.guest_trace is None:
        intent.counts.guest_events = 0
    records = op_records(ev.records) if ev.records and "result" in ev.records[0] else ev.records
    ios = ios_from_records(records)
    data = BlockDataChecker(ios, guest, sync) if ios else None
    for event in host():
        viommu.feed(event)
        intent.feed(event)
        if data is not None:
            shown = as_dmar_translations(event)
            if shown is not None:
                data.feed(shown)
    reports = [viommu.finish(), intent.finish()]
    if data is not None:
        reports.append(data.finish())
    _require_devices(ev, reports)
    return Verdict(reports=reports)


def collect_guest_trace(vm: VM) -> tuple[Path | None, str | None]:
    """Ask the guest agent for the guest kernel's trace and save it in the run
    directory (``guest-trace.txt`` and ``guest-trace.json``).

    Returns the trace path (None when it could not be collected) and why not.
    """
    try:
        got = vm.agent.call("tracefs.collect", timeout=120)
    except (AgentError, VMError, TimeoutError, OSError) as exc:
        return None, f"the guest trace could not be collected: {exc}"
    path = vm.path(GUEST_TRACE)
    path.write_text(got.get("text", ""), encoding="utf-8")
    info = {k: v for k, v in got.items() if k != "text"}
    vm.path(GUEST_TRACE_INFO).write_text(json.dumps(info, indent=2))
    return path, None


@dataclass
class Finished:
    """What :func:`finish_vm` returns: the verdict, where the artifacts went
    (None if not saved) and an error saving them (the verdict is still valid)."""

    verdict: Verdict
    artifacts: Path | None = None
    artifacts_error: str | None = None
    notes: list[str] = field(default_factory=list)


def finish_vm(vm: VM, *, failures: list[str] | None = None, artifacts: Path | None = None,
              keep: bool = False, extra: dict[str, Any] | None = None) -> Finished:
    """Stop ``vm``, collect both streams, check them and save the evidence.

    ``failures``: failures of the system under test already seen (e.g. data
    that did not verify). ``artifacts``: the folder to save to, when the run
    did not pass or ``keep`` is set. ``extra``: more files for the artifacts
    (name -> text or JSON-able). The verdict is written into the run directory
    before anything is copied, so a failing copy loses nothing but the copy.
    """
    notes: list[str] = []
    guest_path: Path | None = None
    if vm.guest_trace_events and vm.run_dir is not None:
        with contextlib.suppress(VMError):
            vm.check_alive()
        guest_path, why = collect_guest_trace(vm)
        if why:
            notes.append(why)
    calls = list(vm.agent_calls)
    vm.shutdown()
    if vm.run_dir is None:
        raise VMError(f"{vm.name}: the VM was closed before its evidence was checked")
    vm.path(RECORDS).write_text(json.dumps(calls, indent=1, default=str))
    info = _read_json(vm.path(GUEST_TRACE_INFO), {}) if guest_path is not None else {}
    ev = RunEvidence(vm.trace_log, guest_path, int(info.get("lost", 0)), calls,
                     sum(1 for d in vm.spec.devices if d.kind == "nvme") or 1,
                     any(d.kind == "virtio-iommu" for d in vm.spec.devices),
                     devices=vm.device_tables(), xen=vm.spec.xen is not None)
    versions, ev.formats = run_versions(vm)
    vm.path(QEMU_INFO).write_text(json.dumps({"versions": versions, "trace_formats": ev.formats.to_dict()},
                                             indent=2))
    verdict = check_evidence(ev)
    verdict.versions.update(versions)
    verdict.failures.extend(failures or [])
    vm.path("verdict.json").write_text(json.dumps(verdict.to_dict(), indent=2))
    result = Finished(verdict, notes=notes)
    if artifacts is not None and (keep or not verdict.ok):
        files: dict[str, Any] = {"verdict.json": verdict.to_dict(), "verdict.txt": verdict.format(), **(extra or {})}
        files[QEMU_INFO] = vm.path(QEMU_INFO).read_text()
        if isinstance(files.get("config.toml"), str):
            files["config.toml"] = versions_comment(versions) + files["config.toml"]
        try:
            result.artifacts = vm.save_artifacts(artifacts, files)
        except OSError as exc:
            result.artifacts_error = f"cannot save artifacts to {artifacts}: {exc.strerror or exc}"
    return result


def evidence_folder_or_trace(path: Path) -> RunEvidence:
    """``check``'s input: an artifacts folder, or a bare QEMU trace file (then
    the guest stream is missing and the guest-intent check inconclusive)."""
    if path.is_dir():
        return RunEvidence.from_folder(path)
    return RunEvidence(path)



# ---- versions (Verdict.versions, qemu.json, the config.toml header) ------------------------


def _bzimage_version(path: Path) -> str | None:
    """The version string of an x86 bzImage (the setup header's ``kernel_version``
    pointer at 0x20e, the string at that pointer + 0x200: Documentation/arch/x86/boot.rst),
    its first word (``6.12.95``); None when it is not readable."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(0x8000)
        if head[0x202:0x206] != b"HdrS":
            return None
        offset = int.from_bytes(head[0x20E:0x210], "little") + 0x200
        text = head[offset:offset + 256].split(b"\0", 1)[0].decode("ascii", "replace")
        return text.split(" ", 1)[0] or None
    except (OSError, IndexError):
        return None


def _entry_manifest(path: Path) -> dict[str, Any]:
    """The ``manifest.json`` beside ``path`` when ``path`` is in an image cache entry, else {}."""
    try:
        data = json.loads((path.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_versions(vm: VM) -> tuple[dict[str, str], FormatChoice]:
    """What ``vm`` ran: ``{"qemu": version, "qemu.name"|"qemu.path": ..., "qemu.key":
    ..., "qemu.trace_formats": series, "kernel": ..., "kernel.key": ..., "xen": ...,
    "xen.key": ...}`` (keys present when known), and the trace format table for its
    QEMU (:func:`harness.vm.qemu_binary.format_choice`). A QEMU that cannot be probed
    gives a choice with every family unknown (the verdict is then inconclusive).
    Never raises."""
    from harness.images.qemu import build_of_binary
    from harness.vm.qemu_binary import format_choice, probe_qemu

    versions: dict[str, str] = {}
    try:
        probe = probe_qemu(vm.qemu)
        choice = format_choice(vm.qemu)
        versions["qemu"] = str(probe.version)
    except ConfigError as exc:
        reason = f"QEMU {vm.qemu} could not be probed for its version and trace events: {exc}"
        choice = FormatChoice(DEFAULT_SERIES, "", {family: reason for family in sorted(FAMILIES)})
    provided = build_of_binary(vm.qemu)
    if provided is not None:
        versions["qemu.name"] = provided.name
        versions["qemu.key"] = provided.key
    else:
        versions["qemu.path"] = vm.qemu
    versions["qemu.trace_formats"] = choice.series + (" (assumed)" if choice.assumed else "")
    kernel = Path(vm.images.kernel)
    kernel_version = _bzimage_version(kernel)
    if kernel_version:
        versions["kernel"] = kernel_version
    manifest = _entry_manifest(kernel)
    if manifest.get("key"):
        versions["kernel.key"] = str(manifest["key"])
    else:
        versions["kernel.path"] = str(kernel)
    name = _kernel_version_name(manifest)
    if name is not None:
        versions["kernel.name"] = name
    if vm.spec.xen is not None and vm.images.hypervisor is not None:
        manifest = _entry_manifest(Path(vm.images.hypervisor))
        versions["xen"] = str(manifest.get("version", "?"))
        if manifest.get("key"):
            versions["xen.key"] = str(manifest["key"])
        else:
            versions["xen.path"] = str(vm.images.hypervisor)
    return versions, choice


def _kernel_version_name(manifest: dict[str, Any]) -> str | None:
    """The version name (``--kernel 7.2``) of a project-built kernel from its cache
    manifest (``kernel_version``, or the ``linux-source-X.Y`` package of older
    manifests), None for a planted-bug variant or anything else."""
    from harness.images.kernel import KERNEL_SOURCES
    if manifest.get("patch"):
        return None
    name = manifest.get("kernel_version") or str(manifest.get("package", "")).removeprefix("linux-source-")
    return name if isinstance(name, str) and name in KERNEL_SOURCES else None


def versions_comment(versions: dict[str, str]) -> str:
    """TOML comment lines naming the versions of a run and the options that run it
    again with the same QEMU and kernel (a harness-provided QEMU by its version name)."""
    lines = ["# recorded with " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
    options = []
    if "qemu.name" in versions:
        options.append(f"--qemu {versions['qemu.name']}")
    elif "qemu.path" in versions:
        options.append(f"--qemu {versions['qemu.path']}")
    if "kernel.path" in versions:
        options.append(f"--kernel {versions['kernel.path']}")
    elif versions.get("kernel.name", DEFAULT_KERNEL_VERSION) != DEFAULT_KERNEL_VERSION:
        options.append(f"--kernel {versions['kernel.name']}")
    if options:
        lines.append("# run it again with the same QEMU: python -m harness run config.toml " + " ".join(options))
    return "\n".join(lines) + "\n"
