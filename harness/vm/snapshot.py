"""Snapshot restore: boot a guest once, save it, start every test from the save.

A *snapshot* is a booted, agent-ready guest saved with QEMU's migration to a file
(QMP ``stop``, ``migrate`` to ``exec:cat > FILE``: QEMU 7.2 has no ``file:`` URI),
beside the QEMU trace of its boot (``trace.log`` up to the stop) and its console
log. A *restore* is a new QEMU with the same argv plus ``-S -incoming defer``;
QMP ``migrate-incoming exec:cat FILE`` loads it, the trace events are switched on
(QMP ``trace-event-set-state``) so the new trace starts exactly at the restore
point, the devices that cannot migrate are hot-plugged, QMP ``cont`` runs the
guest, and the guest agent answers a ping on the new QEMU's virtio-serial socket
(the guest side of the port never closed: virtio-serial migrates the port state,
hw/char/virtio-serial-bus.c ``virtio_serial_load_device``).

What migrates (QEMU 7.2: a ``migrate`` that completes with no ``blocked-reasons``
in ``query-migrate``): ``intel-iommu`` (caching-mode on and off, ``intremap``,
``device-iotlb``: hw/i386/intel_iommu.c ``vtd_vmstate``), ``virtio-iommu-pci``
(hw/virtio/virtio-iommu.c ``vmstate_virtio_iommu_device``),
``virtio-blk-pci``/``virtio-net-pci`` with ``iommu_platform`` (and ``ats``), an
empty ``pcie-root-port``, and the harness's own devices (virtio-serial,
virtio-net with slirp, pvpanic). Restored guests that then did NVMe O_DIRECT
DMA got an OK verdict from every checker with intel-iommu caching-mode on,
caching-mode off + ``intremap`` (+ virtio-blk in the snapshot), and
virtio-iommu. ``nvme`` does not migrate: hw/nvme/ctrl.c registers
``vmstate_nvme`` with ``.unmigratable = 1`` (``State blocked by non-migratable
device``).

So the snapshot is taken of the machine *without* its NVMe controllers: each
one's place (its ``addr`` and its position in the argv) holds an empty
``pcie-root-port`` (:class:`PcieRootPort`), and after the restore the
controller is added behind it (QMP ``blockdev-add`` + ``device_add nvme,drive=``;
QEMU 7.2's ``nvme-ns`` bus does not support hot-plugging, so only a controller
with one namespace, nsid 1, can be added). The guest finds it with
``echo 1 > /sys/bus/pci/rescan`` through the agent, then waits until the
namespace's block device exists: a rescan is synchronous (the PCI device is
enumerated and the nvme driver bound when the write returns; the namespace scan
then runs in the driver's workqueue), it works with and without a kernel PCIe
hot-plug driver (pciehp handling the same presence change adds nothing twice:
drivers/pci/hotplug/pciehp_ctrl.c ``board_added`` accepts ``-EEXIST``), and it
does not depend on the guest servicing the slot's interrupt in time.

What cannot be snapshotted gets a cold boot with a one-line reason
(:func:`snapshot_plan`): a Xen machine, machine ``pc`` with an NVMe controller (no
PCIe root port to plug it into), an NVMe controller with more namespaces or
another nsid, a device kind not known to migrate, or QEMU's own
``blocked-reasons`` at save time.

Event streams: QEMU's trace of the restored QEMU starts at the restore; the
checkers replay vIOMMU events into models that need the state from boot (root
table pointer, context entries, invalidations). A restored VM's ``trace.log``
is therefore the snapshot's boot trace followed by the restored QEMU's trace
(spliced when QEMU has stopped, before the checkers read it); the guest
kernel's tracefs ring buffer lives in guest memory and so continues across the
restore by itself. ``snapshot.json`` in the run directory (and the artifacts)
says where the boot trace ends.

Everything a snapshot holds lives in a :class:`SnapshotStore` folder
(``dma-snapshots-*`` under the run base, mode 0700) removed when the store is
closed; a store whose owning process died is removed by the next store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Protocol

from harness.errors import AgentError, GuestBootTimeout, HarnessError, VMError
from harness.vm.devices import Device, NvmeController, RenderContext
from harness.vm.machine import VM, run_base
from harness.vm.spec import MachineSpec



class VMMaker(Protocol):
    """What a store needs from a session (harness.session.Harness): the unstarted VM
    it would cold-boot for a machine."""

    def vm(self, spec: MachineSpec, *, name: str = "vm", boot_timeout: float = 60.0, trace: bool = True) -> VM: ...

__all__ = ["MIGRATABLE_KINDS", "HOTPLUG_KINDS", "PcieRootPort", "SnapshotPlan", "Snapshot", "SnapshotStore",
           "RestoredVM", "SnapshotUnsupported", "snapshot_plan", "snapshot_key", "SNAPSHOT_INFO",
           "STORE_PREFIX", "sweep_stale_stores"]

STORE_PREFIX = "dma-snapshots-"
SNAPSHOT_INFO = "snapshot.json"
BOOT_TRACE = "boot-trace.log"
BOOT_CONSOLE = "boot-console.log"
RESTORED_TRACE = "restored-trace.log"
RESTORED_CONSOLE = "restored-console.log"

MIGRATABLE_KINDS: frozenset[str] = frozenset({"intel-iommu", "virtio-iommu", "virtio-blk", "virtio-net"})
"""Device kinds whose QEMU 7.2 state migrates (they are in the snapshot)."""
HOTPLUG_KINDS: dict[str, str] = {
    "nvme": "hw/nvme/ctrl.c vmstate_nvme is unmigratable in QEMU 7.2",
}
"""Device kinds that cannot migrate and are hot-plugged after the restore, with why."""


class SnapshotUnsupported(HarnessError):
    """This machine cannot be snapshotted (the message is the one-line reason)."""


@dataclass(frozen=True)
class PcieRootPort(Device):
    """An empty ``pcie-root-port`` on ``pcie.0`` holding the place of a device
    that is hot-plugged after a restore. ``id`` (QEMU id), ``chassis`` (distinct
    per port), ``addr`` (slot on the root bus; None: the lowest free one).
    Not a config-file device kind: only snapshots make it."""

    kind: ClassVar[str] = "pcie-root-port"
    id: str = "hp0-port"
    chassis: int = 201
    addr: int | None = None

    def argv(self, ctx: RenderContext) -> list[str]:
        opts = f"pcie-root-port,id={self.id},bus=pcie.0,chassis={self.chassis}"
        if self.addr is not None:
            opts += f",addr={self.addr:#x}"
        return ["-device", opts]


@dataclass(frozen=True)
class SnapshotPlan:
    """How a machine is snapshotted: ``base`` (the machine that is booted and
    saved: every device that cannot migrate replaced by an empty root port) and
    ``hotplug`` (``(device, port id)`` pairs added after each restore)."""

    base: MachineSpec
    hotplug: tuple[tuple[NvmeController, str], ...] = ()


def snapshot_plan(spec: MachineSpec) -> SnapshotPlan:
    """The snapshot plan of ``spec`` (see the module docstring).

    Raises SnapshotUnsupported with a one-line reason when ``spec`` cannot be
    snapshotted.
    """
    if spec.xen is not None:
        raise SnapshotUnsupported("a Xen machine is not snapshotted (Xen and dom0 migration is not tried)")
    devices: list[Device] = []
    hotplug: list[tuple[NvmeController, str]] = []
    for d in spec.devices:
        if d.kind in MIGRATABLE_KINDS:
            devices.append(d)
            continue
        if d.kind not in HOTPLUG_KINDS or not isinstance(d, NvmeController):
            raise SnapshotUnsupported(f"device kind {d.kind!r} is not known to migrate")
        if spec.machine != "q35":
            raise SnapshotUnsupported(f"{d.kind} cannot migrate ({HOTPLUG_KINDS[d.kind]}) and machine "
                                      f"{spec.machine!r} has no PCIe root port to hot-plug it into")
        if len(d.namespaces) != 1 or (d.namespaces[0].nsid or 1) != 1:
            raise SnapshotUnsupported(f"nvme {d.id}: {HOTPLUG_KINDS[d.kind]} and QEMU 7.2 cannot hot-plug "
                                      "nvme-ns, so only a controller with one namespace (nsid 1) is added "
                                      "after a restore")
        port = PcieRootPort(id=f"{d.id}-hp", chassis=201 + len(hotplug), addr=d.addr)
        devices.append(port)
        hotplug.append((d, port.id))
    return SnapshotPlan(spec.replace(devices=tuple(devices)), tuple(hotplug))


_QEMU_VERSIONS: dict[str, str] = {}


def _qemu_version(qemu: str) -> str:
    """``qemu --version``'s first line plus the binary's size and mtime (cached per path)."""
    if qemu not in _QEMU_VERSIONS:
        try:
            out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            out = f"unknown ({exc})"
        st = os.stat(qemu)
        _QEMU_VERSIONS[qemu] = f"{out.splitlines()[0] if out else ''} size={st.st_size} mtime={st.st_mtime_ns}"
    return _QEMU_VERSIONS[qemu]


def _ignore_shared(vm: VM) -> None:
    """With the ``/usr`` NVDIMM (harness.vm.pmem), leave its shared, read-only RAM
    block out of the stream (capability ``x-ignore-shared``, QEMU >= 4.0; set on
    both sides): the restored QEMU maps the same file, and loading the image into
    a read-only mapping would fail."""
    if vm.images.usr_dimm(vm.spec) is not None:
        vm.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])


def _file_id(path: Path | None) -> str | None:
    if path is None:
        return None
    st = path.stat()
    return f"{path.resolve()} size={st.st_size} mtime={st.st_mtime_ns}"


def snapshot_key(vm: VM) -> str:
    """What determines a saved guest, hashed (16 hex digits): the machine ``vm``
    boots (its spec table, CPU model, kernel command line with its tracing), the
    kernel, initrd and hypervisor files (path, size, mtime), the QEMU binary and
    its version, the accelerator and QEMU's trace events. ``vm`` need not be
    launched. Raises OSError when an image file is missing."""
    recipe = {
        "spec": vm.spec.to_table(), "cpu": vm.spec.cpu_model(vm.accel), "cmdline": vm.kernel_cmdline(),
        "kernel": _file_id(vm.images.boot_kernel(vm.spec)), "initrd": _file_id(vm.images.boot_initrd(vm.spec)),
        "usr_image": _file_id(vm.images.usr_image if vm.images.usr_dimm(vm.spec) else None),
        "hypervisor": _file_id(vm.images.hypervisor), "qemu": vm.qemu, "qemu_version": _qemu_version(vm.qemu),
        "accel": vm.accel, "trace_events": list(vm.trace_events),
    }
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Snapshot:
    """A saved guest in a store: ``key`` (:func:`snapshot_key` of the base
    machine), ``plan``, ``folder`` (holds ``migration.bin``, ``boot-trace.log``,
    ``boot-console.log``), ``boot_seconds`` (the cold boot that was saved),
    ``save_seconds`` (stop -> migration file written), ``size`` (bytes)."""

    key: str
    plan: SnapshotPlan
    folder: Path
    boot_seconds: float
    save_seconds: float
    size: int

    @property
    def migration(self) -> Path:
        return self.folder / "migration.bin"

    @property
    def empty_initrd(self) -> Path:
        return self.folder / "empty-initrd"

    @property
    def boot_trace(self) -> Path:
        return self.folder / BOOT_TRACE

    @property
    def boot_console(self) -> Path:
        return self.folder / BOOT_CONSOLE


def _owner_alive(folder: Path) -> bool:
    try:
        owner = int((folder / "owner.pid").read_text())
    except (OSError, ValueError):
        return True  # not ours to judge (being created, or not a store)
    return owner == os.getpid() or Path(f"/proc/{owner}").exists()


def sweep_stale_stores(base: Path | None = None) -> list[Path]:
    """Remove snapshot stores whose owning process is gone (it was SIGKILLed)."""
    removed = []
    for d in (base or run_base()).glob(STORE_PREFIX + "*"):
        if not _owner_alive(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _wait_migration(vm: VM, timeout: float, what: str) -> dict[str, Any]:
    """Poll QMP ``query-migrate`` until ``completed``; return it.
    Raises SnapshotUnsupported (failed) or VMError (timeout)."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        vm.check_alive()
        st = vm.qmp.cmd("query-migrate")
        status = st.get("status") if isinstance(st, dict) else None
        if status == "completed":
            return dict(st)
        if status in ("failed", "cancelled"):
            raise SnapshotUnsupported(f"{what} {status}: {st.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise VMError(f"{vm.name}: {what} did not complete within {timeout:g}s (status {status})")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class SnapshotStore:
    """The snapshots of one session, keyed by :func:`snapshot_key`, each saved on
    first use; a context manager whose exit removes them all.

    ``harness``: the session (a :class:`VMMaker`, e.g. harness.session.Harness) whose
    images, QEMU and accelerator the VMs use.
    :meth:`vm` is the one entry point: a VM restored from the snapshot of its
    machine, or a cold-booted one carrying the reason (``start_note``).
    """

    def __init__(self, harness: VMMaker, base: Path | None = None):
        self.harness = harness
        self.base = base
        self.folder: Path | None = None
        self.snapshots: dict[str, Snapshot] = {}
        self.unsupported: dict[str, str] = {}  # key -> why saving failed

    def __enter__(self) -> SnapshotStore:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> Path:
        if self.folder is None:
            base = self.base or run_base()
            sweep_stale_stores(base)
            self.folder = Path(tempfile.mkdtemp(prefix=STORE_PREFIX, dir=base))
            os.chmod(self.folder, 0o700)
            (self.folder / "owner.pid").write_text(str(os.getpid()))
        return self.folder

    def close(self) -> None:
        """Remove every snapshot (idempotent)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.snapshots.clear()

    # ------------------------------------------------------------------ save
    def snapshot(self, spec: MachineSpec, *, trace: bool = True, boot_timeout: float = 60.0) -> Snapshot:
        """The snapshot of ``spec`` (saved now if this store has none).

        Raises SnapshotUnsupported (the one-line reason) when ``spec`` cannot be
        snapshotted, and what a cold boot raises (GuestBootTimeout, VMLaunchError,
        GuestPanicked) when the guest to save does not come up.
        """
        plan = snapshot_plan(spec)
        template = self.harness.vm(plan.base, name="snapshot", boot_timeout=boot_timeout, trace=trace)
        key = snapshot_key(template)
        if key in self.unsupported:
            raise SnapshotUnsupported(self.unsupported[key])
        if key in self.snapshots:
            return self.snapshots[key]
        try:
            snap = self._save(template, key, plan)
        except SnapshotUnsupported as exc:
            self.unsupported[key] = str(exc)
            raise
        self.snapshots[key] = snap
        return snap

    def _save(self, vm: VM, key: str, plan: SnapshotPlan) -> Snapshot:
        folder = self.open() / key
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        try:
            with vm:
                assert vm.boot_seconds is not None
                blocked = vm.qmp.cmd("query-migrate").get("blocked-reasons") or []
                if blocked:
                    raise SnapshotUnsupported("QEMU blocks migration: " + "; ".join(map(str, blocked)))
                t0 = time.monotonic()
                vm.qmp.cmd("stop")
                # the boot trace ends here: nothing after the stop belongs to a restored guest
                with contextlib.suppress(VMError):
                    _trace_event(vm, "*", False)
                target = folder / "migration.bin"
                _ignore_shared(vm)
                vm.qmp.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(target))}")
                _wait_migration(vm, 300.0, "saving the snapshot")
                save_seconds = time.monotonic() - t0
                vm.shutdown()  # QMP quit: QEMU flushes its trace log
                if vm.trace_events:
                    shutil.copyfile(vm.trace_log, folder / BOOT_TRACE)
                else:
                    (folder / BOOT_TRACE).write_bytes(b"")
                shutil.copyfile(vm.console_log, folder / BOOT_CONSOLE)
                (folder / "empty-initrd").write_bytes(b"")
                return Snapshot(key, plan, folder, vm.boot_seconds, save_seconds, target.stat().st_size)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    # ------------------------------------------------------------------ restore
    def vm(self, spec: MachineSpec, *, name: str = "vm", boot_timeout: float = 60.0, trace: bool = True) -> VM:
        """A VM for ``spec`` (not started: launch it, or use it as a context
        manager): restored from this store's snapshot of its machine (saved first
        if needed), or, when the machine cannot be snapshotted, the session's
        cold-booted VM with ``start_note`` = ``cold boot: REASON``.

        Raises what :meth:`snapshot` raises other than SnapshotUnsupported.
        """
        try:
            snap = self.snapshot(spec, trace=trace, boot_timeout=boot_timeout)
        except SnapshotUnsupported as exc:
            cold = self.harness.vm(spec, name=name, boot_timeout=boot_timeout, trace=trace)
            cold.start_note = f"cold boot: {exc}"
            return cold
        template = self.harness.vm(spec, name=name, boot_timeout=boot_timeout, trace=trace)
        return RestoredVM(snap, template)


class RestoredVM(VM):
    """A VM started from a :class:`Snapshot` (see the module docstring).

    ``template``: the unstarted VM the session would cold-boot for the full
    machine (its spec, images, accelerator, QEMU, tracing and timeouts are used;
    ``spec`` keeps every device, QEMU's argv is the snapshot's base machine).

    After :meth:`wait_ready`: ``restore_seconds`` (QEMU start -> the guest agent
    answered a ping), ``boot_seconds`` (QEMU start -> hot-plugged devices found
    by the guest), ``hotplugged`` (device id -> source id). Raises what a cold
    boot raises, with GuestBootTimeout also for a guest that never finds a
    hot-plugged device.
    """

    RESCAN_TIMEOUT = 30.0

    def __init__(self, snapshot: Snapshot, template: VM):
        super().__init__(template.spec, template.images, accel=template.accel, qemu=template.qemu,
                         trace_events=template.trace_events, guest_trace_events=template.guest_trace_events,
                         guest_trace_buffer_kb=template.guest_trace_buffer_kb, boot_timeout=template.boot_timeout,
                         kill_timeout=template.kill_timeout, name=template.name)
        self.snapshot = snapshot
        self.restore_seconds: float | None = None
        self.hotplug_seconds: float | None = None
        self.hotplugged: dict[str, int] = {}
        self._spliced = False
        self.start_note = f"restored from snapshot {snapshot.key}"

    def build_argv(self) -> list[str]:
        full = self.spec
        self.spec = self.snapshot.plan.base
        try:
            argv = super().build_argv()
        finally:
            self.spec = full
        if self.trace_events:  # no event on at start: QMP switches them on at the restore point
            self.path("trace-events-off").write_text("")
            argv = [a.replace(f"events={self.path('trace-events')}", f"events={self.path('trace-events-off')}")
                    for a in argv]
            argv = [str(self.path(RESTORED_TRACE)) if a == str(self.path("trace.log")) else a for a in argv]
        argv = [a.replace(f"logfile={self.path('console.log')},", f"logfile={self.path(RESTORED_CONSOLE)},")
                for a in argv]
        # The guest has booted: QEMU needs -initrd for the same machine (x86_load_linux) but its
        # content only ever reaches fw_cfg, never a RAM block the migration compares; an empty
        # file spares reading the whole initramfs at every restore.
        initrd = str(self.images.boot_initrd(self.spec))
        for i in range(len(argv) - 1):
            if argv[i] == "-initrd" and argv[i + 1] == initrd:
                argv[i + 1] = str(self.snapshot.empty_initrd)
        return argv + ["-S", "-incoming", "defer"]

    def launch(self, attempts: int = 3) -> None:
        """Start QEMU, load the snapshot, switch tracing on, hot-plug, run the guest."""
        super().launch(attempts)
        try:
            self._restore()
        except BaseException:
            self.shutdown()
            raise

    def _restore(self) -> None:
        qmp = self.qmp
        _ignore_shared(self)
        qmp.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(self.snapshot.migration))}")
        _wait_migration(self, 120.0, "loading the snapshot")
        if self.trace_events:
            for name in self.path("trace-events").read_text().split():
                _trace_event(self, name, True)
        for device, port in self.snapshot.plan.hotplug:
            self._hotplug(device, port)
        qmp.cmd("cont")

    def _hotplug(self, d: NvmeController, port: str) -> None:
        ctx = RenderContext(self.path(""), self.accel)
        ns = d.namespaces[0]
        node = f"{d.id}n1"
        file_node: dict[str, Any] = {"driver": "file", "filename": str(d.image(ctx, 0)), "node-name": f"{node}-file"}
        raw_node: dict[str, Any] = {"driver": "raw", "file": f"{node}-file", "node-name": node}
        self.qmp.cmd("blockdev-add", **file_node)
        self.qmp.cmd("blockdev-add", **raw_node)
        self.qmp.cmd("device_add", driver="nvme", id=d.id, serial=d.serial, bus=port, addr="0x0", drive=node,
                     logical_block_size=ns.lba_size, physical_block_size=ns.lba_size)

    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait for the guest agent to answer a ping on the new channel, then for
        the guest to find the hot-plugged devices; return seconds since QEMU started."""
        limit = self.boot_timeout if timeout is None else timeout
        deadline = self._started + limit
        try:
            self.agent.call("ping", timeout=max(1.0, deadline - time.monotonic()))
        except (TimeoutError, AgentError) as exc:
            raise GuestBootTimeout(f"{self.name}: the restored guest's agent did not answer: {exc}",
                                   console_tail=self.console_tail(25)) from None
        self.restore_seconds = time.monotonic() - self._started
        if self.snapshot.plan.hotplug:
            self._find_hotplugged(deadline)
        self.boot_seconds = time.monotonic() - self._started
        self.hotplug_seconds = self.boot_seconds - self.restore_seconds
        self.start_note = (f"restored from snapshot {self.snapshot.key} in {self.restore_seconds:.2f}s"
                           + (f", {', '.join(self.hotplugged)} hot-plugged in {self.hotplug_seconds:.2f}s"
                              if self.hotplugged else ""))
        self.path("spec.json").write_text(json.dumps({**self.spec.to_table(), "devices": self.device_tables()},
                                                     indent=2, default=str))
        self._write_info()
        return self.boot_seconds

    def _find_hotplugged(self, deadline: float) -> None:
        want = len(self.snapshot.plan.hotplug)
        calls = len(self.agent.calls)
        self.agent.call("exec", argv=["sh", "-c", "echo 1 > /sys/bus/pci/rescan"], timeout=30)
        del self.agent.calls[calls:]  # the harness's own step, not the test's op records
        limit = min(deadline, time.monotonic() + self.RESCAN_TIMEOUT)
        serials = {d.serial for d, _ in self.snapshot.plan.hotplug}
        while True:
            found = self.agent.call("exec", argv=["sh", "-c", "cat /sys/class/nvme/nvme*/serial 2>/dev/null; "
                                                              "ls /sys/block"], timeout=10)
            del self.agent.calls[calls:]
            words = set(found["stdout"].split())
            blocks = [w for w in words if w.startswith("nvme")]
            if serials <= words and len(blocks) >= want:
                break
            if time.monotonic() > limit:
                raise GuestBootTimeout(f"{self.name}: the restored guest did not find the hot-plugged "
                                       f"NVMe controller(s) {sorted(serials)} after a PCI rescan",
                                       console_tail=self.console_tail(25))
            time.sleep(0.02)
        ids = {d.id for d, _ in self.snapshot.plan.hotplug}
        self.hotplugged = {k: v for k, v in _sids(self.qmp.cmd("query-pci")).items() if k in ids}

    def device_tables(self) -> list[dict[str, Any]]:
        """The devices as QEMU has them: the base machine's (root ports included)
        and each hot-plugged one with its real source id (``sid``, from QMP
        ``query-pci``) and ``hotplugged`` (its root port)."""
        tables = [d.to_table() for d in self.snapshot.plan.base.devices]
        for d, port in self.snapshot.plan.hotplug:
            table = d.to_table()
            table["hotplugged"] = port
            if d.id in self.hotplugged:
                table["sid"] = self.hotplugged[d.id]
            tables.append(table)
        return tables

    def _write_info(self) -> None:
        boot_trace = self.snapshot.boot_trace.stat().st_size if self.trace_events else 0
        info = {"key": self.snapshot.key, "restore_seconds": self.restore_seconds,
                "hotplug_seconds": self.hotplug_seconds, "hotplugged": self.hotplugged,
                "snapshot_boot_seconds": self.snapshot.boot_seconds, "boot_trace_bytes": boot_trace,
                "note": self.start_note,
                "trace": "trace.log = the snapshot's boot trace (boot_trace_bytes) + this QEMU's trace "
                         "from the restore on"}
        self.path(SNAPSHOT_INFO).write_text(json.dumps(info, indent=2))

    def shutdown(self) -> None:
        """Stop QEMU (as :meth:`VM.shutdown`), then splice the boot trace and
        console in front of this QEMU's (``trace.log``, ``console.log``)."""
        super().shutdown()
        if self._spliced or self.run_dir is None:
            return
        self._spliced = True
        pairs = [(self.snapshot.boot_console, RESTORED_CONSOLE, "console.log")]
        if self.trace_events:
            pairs.append((self.snapshot.boot_trace, RESTORED_TRACE, "trace.log"))
        for boot, restored, out in pairs:
            with open(self.path(out), "wb") as dst:
                for src in (boot, self.path(restored)):
                    with contextlib.suppress(FileNotFoundError), open(src, "rb") as fh:
                        shutil.copyfileobj(fh, dst)

    def console_tail(self, n: int = 20) -> list[str]:
        if self.run_dir is not None and not self._spliced and self.path(RESTORED_CONSOLE).exists():
            from harness.vm.console import tail_lines
            return tail_lines(self.path(RESTORED_CONSOLE), n)
        return super().console_tail(n)


def _trace_event(vm: VM, pattern: str, on: bool) -> None:
    """Switch the trace events matching ``pattern`` on or off (HMP ``trace-event``
    through QMP: QMPMonitor.cmd's own ``name`` parameter hides the QMP command's).
    Raises VMError when QEMU refuses."""
    args: dict[str, Any] = {"command-line": f"trace-event {pattern} {'on' if on else 'off'}"}
    out = vm.qmp.cmd("human-monitor-command", **args)
    if isinstance(out, str) and out.strip():
        raise VMError(f"{vm.name}: trace-event {pattern}: {out.strip()}")


def _sids(pci: Any) -> dict[str, int]:
    """qdev id -> source id (``bus << 8 | slot << 3 | function``) of every device
    in QMP ``query-pci``'s answer, through bridges (their secondary bus number)."""
    out: dict[str, int] = {}

    def walk(bus: int, devices: Sequence[dict[str, Any]]) -> None:
        for dev in devices:
            if dev.get("qdev_id"):
                out[dev["qdev_id"]] = bus << 8 | int(dev["slot"]) << 3 | int(dev["function"])
            bridge = dev.get("pci_bridge")
            if bridge:
                walk(int(bridge["bus"]["secondary"]), bridge.get("devices", []))

    for root in pci or []:
        walk(int(root.get("bus", 0)), root.get("devices", []))
    return out

