"""A harness session: the options shared by every VM of one run (QEMU binary,
kernel, accelerator, image cache, artifacts), with images built or found once and
the accelerator resolved once. The CLI and the pytest plugin are thin front ends
over it."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from harness.errors import ConfigError, ImageError

from harness.images.cache import EntryHold, ImageCache
from harness.images.kernel import KernelImage, check_kernel, resolve_kernel_option, user_kernel
from harness.images import usr_image
from harness.images.rootfs import USR_INIT, Initrd, ensure_initrd
from harness.images.vmlinux import ensure_pvh_vmlinux
from harness.images.sshkey import SSHKey, ensure_ssh_key
from harness.images.xen import ensure_xen
from harness.options import HarnessOptions
from harness.trace.guest import GUEST_TRACE_EVENTS
from harness.trace.parser import TRACE_EVENTS
from harness.vm.accel import AccelChoice, resolve_accel
from harness.vm.machine import VM, BootImages, find_qemu
from harness.vm.spec import MachineSpec


class Harness:
    def __init__(self, options: HarnessOptions):
        self.options = options
        self.cache = ImageCache(options.cache)
        self.qemu = find_qemu(options.qemu)
        self._kernel: KernelImage | None = None
        self._images: BootImages | None = None
        self._initrd: Initrd | None = None
        self._accel: dict[str, AccelChoice] = {}
        self._holds: list[EntryHold] = []  # cache entries this session boots (see close())

    def kernel(self, spec: MachineSpec | None = None) -> KernelImage:
        """The session's kernel: the user's (``--kernel``), or the project's, built first
        if it is not cached. Given ``spec``, a user's kernel is refused if it lacks an
        option that machine needs (its devices' and the harness's own).

        Raises:
            KernelConfigError: names each missing option and what needs it.
        """
        if self._kernel is None:
            # a version name (--kernel 7.2) is the project's build of it; anything else a bzImage path
            self._kernel = resolve_kernel_option(self.options.kernel, self.cache)
        if spec is not None and self.options.kernel:
            check_kernel(self._kernel, spec.kernel_needs())
        return self._kernel

    def images(self, spec: MachineSpec | None = None) -> BootImages:
        """Boot images for ``spec`` (its own kernel/initrd if it names them). A user's
        kernel is checked first against what ``spec`` needs (without a spec: what the
        harness itself needs). The boot shortcuts of :class:`BootImages` are used
        where the kernel allows them: the PVH entry for the project's own kernels,
        ``/usr`` on an NVDIMM for any kernel whose configuration is known to have
        what mounting it needs (harness.images.usr_image.REQUIRED_KCONFIG)."""
        if spec is not None and spec.kernel:
            kernel = user_kernel(spec.kernel, spec.kernel_needs())
        else:
            kernel = self.kernel(spec or MachineSpec())
        if self._images is None:
            key = ensure_ssh_key(self.cache)
            initrd = self._held_initrd(key)
            self._initrd = initrd
            self._images = self._boot_images(self.kernel(), initrd.path, initrd)
            self._images = dataclasses.replace(self._images, ssh_key=key.private, host_key=initrd.host_key)
        images = self._images
        if spec is not None and (spec.kernel or spec.initrd):
            initrd_path = Path(spec.initrd) if spec.initrd else images.initrd
            images = dataclasses.replace(self._boot_images(kernel, initrd_path, self._initrd),
                                         ssh_key=images.ssh_key, host_key=images.host_key)
            if spec.initrd:  # the spec's own root: the same machine (NVDIMM and all), its initrd
                images = dataclasses.replace(images, usr_initrd=None)
        if spec is not None and spec.xen is not None:
            hypervisor = Path(spec.xen.hypervisor) if spec.xen.hypervisor else ensure_xen(self.cache).path
            if not hypervisor.is_file():
                raise ConfigError(f"xen.hypervisor {str(hypervisor)!r} is not a file", key="xen.hypervisor")
            images = dataclasses.replace(images, hypervisor=hypervisor)
        return images

    @staticmethod
    def _boot_images(kernel: KernelImage, initrd: Path, root: Initrd | None) -> BootImages:
        pvh = None
        if kernel.origin.startswith("built "):  # the image cache's own: its vmlinux is written beside it
            with contextlib.suppress(OSError):
                pvh = ensure_pvh_vmlinux(kernel.bzimage)
        split = root is not None and root.usr_image is not None and usr_image.kernel_can_mount(kernel.options())
        return BootImages(kernel.bzimage, initrd, pvh_kernel=pvh,
                          usr_image=root.usr_image if split and root is not None else None,
                          usr_initrd=root.usr_initrd if split and root is not None else None, usr_init=USR_INIT)

    def _held_initrd(self, key: SSHKey) -> Initrd:
        """The project's initrd, held in the cache for this session (ImageCache.hold),
        so another process's prune of old initrds never removes the one this session
        boots (several pytest-xdist workers, or checkouts with other guest agents,
        sharing one cache).

        Raises:
            ImageError: the initrd was pruned by others three times in a row.
        """
        for _ in range(3):
            initrd = ensure_initrd(self.cache, key)
            hold = self.cache.hold("initrd", initrd.path.parent.name)
            if hold is not None:
                self._holds.append(hold)
                return initrd
        raise ImageError(f"the initrd {initrd.path.parent.name} was removed by another process "
                         "each time it was built (cache prune race)")

    def close(self) -> None:
        """Release the cache entries this session held (also released when the
        process exits); the session's images may be pruned by others afterwards."""
        while self._holds:
            self._holds.pop().close()

    def accel(self, requested: str | None = None) -> AccelChoice:
        """Resolve the accelerator; the session option overrides ``auto`` in a spec."""
        req = requested if requested not in (None, "auto") else self.options.accel
        assert req is not None
        if req not in self._accel:
            self._accel[req] = resolve_accel(req, self.qemu, self.kernel().bzimage, self.cache.root)
        return self._accel[req]

    def vm(self, spec: MachineSpec, *, name: str = "vm", boot_timeout: float = 60.0, trace: bool = True) -> VM:
        """A VM for ``spec`` (not started: use it as a context manager). With
        ``trace``, QEMU's trace events and the guest kernel's (from boot) are recorded."""
        images = self.images(spec)
        for hold in self._holds:
            hold.touch()  # just used: an age-ordered prune keeps it
        trace = trace and spec.xen is None  # under Xen the evidence is dom0's op records and Xen's dumps
        return VM(spec, images, accel=self.accel(spec.accel).accel, qemu=self.qemu,
                  trace_events=TRACE_EVENTS if trace else (),
                  guest_trace_events=GUEST_TRACE_EVENTS if trace else (),
                  boot_timeout=boot_timeout, name=name)
