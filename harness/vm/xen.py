"""Xen guests: the ``XenHost`` machine profile (Xen as the machine's firmware-level
kernel, the harness's kernel and initramfs as PV dom0) and the console signatures
of a Xen or dom0 crash.

QEMU boots Xen through its multiboot loader::

    -kernel XEN_ELF -append "XEN ARGS" -initrd "BZIMAGE DOM0 ARGS,INITRD"

The ``-initrd`` value is the multiboot module list: modules are separated by commas
and the first word of each is its file, the rest its command line, so a comma inside
dom0's command line is written ``,,`` (QEMU's option-value escape, read by
``hw/i386/multiboot.c`` with ``get_opt_value``).

Consoles: Xen owns COM1 (``console=com1``); dom0's console is ``hvc0``, which Xen
copies to COM1, so the VM's ``console.log`` holds both. The guest agent runs in dom0
on the same virtio-serial port as on bare QEMU (dom0 drives the PCI devices).

Facts this rests on (measured under TCG on 2 cores, FACTS.md): ``-cpu max`` crashes
dom0 early under TCG, ``-cpu qemu64,+svm`` (Xen's own CI) boots; dom0 reaches its
agent about 12 s after QEMU starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from harness.errors import DeviceConfigError

XEN_CPU = "qemu64,+svm"
XEN_KERNEL_OPTIONS: tuple[str, ...] = ("XEN", "XEN_PV", "XEN_DOM0", "XEN_PRIVCMD", "XEN_GNTDEV",
                                       "XEN_GRANT_DEV_ALLOC", "XEN_SYS_HYPERVISOR", "HVC_XEN")
"""What the dom0 kernel needs: PV dom0 itself, its hvc0 console, /sys/hypervisor,
and the devices the guest agent uses (privcmd for Xen's state, gntalloc, gntdev)."""

PANIC_SIGNATURES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Xen panicked", re.compile(r"Panic on CPU \d+")),
    ("dom0 crashed", re.compile(r"Hardware Dom0 crashed")),
    ("dom0 kernel panicked", re.compile(r"Kernel panic - not syncing")),
)
"""Console lines that mean the machine is going down: Xen's own ``panic()``
(xen/drivers/char/console.c), Xen's reaction to a crashed hardware domain
(xen/common/shutdown.c ``hwdom_shutdown``), and Linux's ``panic()`` in dom0. Xen
reboots 5 s after either; the harness reports at the first line instead."""


@dataclass(frozen=True)
class XenHost:
    """A Xen host: the machine boots Xen, which starts the harness's kernel and
    initramfs as PV dom0.

    ``dom0_mem_mib`` (MiB given to dom0, fixed: ``dom0_mem=N,max:N``),
    ``dom0_vcpus`` (``dom0_max_vcpus``; None = every vCPU of the machine),
    ``conring_kib`` (Xen's console ring in KiB: the grant-table dump the guest agent
    reads back through ``XEN_SYSCTL_readconsole`` must fit in it),
    ``xen_args`` (extra Xen command line), ``hypervisor`` (path of a Xen multiboot
    ELF; None = Debian's xen-hypervisor-4.17-amd64 from the image cache).

    Raises DeviceConfigError naming the field for an invalid value.
    """

    dom0_mem_mib: int = 1024
    dom0_vcpus: int | None = None
    conring_kib: int = 1024
    xen_args: str = ""
    hypervisor: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dom0_mem_mib, int) or isinstance(self.dom0_mem_mib, bool) \
                or not 256 <= self.dom0_mem_mib <= 65536:
            raise DeviceConfigError(f"dom0_mem_mib must be 256..65536, not {self.dom0_mem_mib!r}",
                                    key="dom0_mem_mib")
        if self.dom0_vcpus is not None and (not isinstance(self.dom0_vcpus, int)
                                            or isinstance(self.dom0_vcpus, bool) or not 1 <= self.dom0_vcpus <= 64):
            raise DeviceConfigError(f"dom0_vcpus must be 1..64, not {self.dom0_vcpus!r}", key="dom0_vcpus")
        if not isinstance(self.conring_kib, int) or isinstance(self.conring_kib, bool) \
                or not 16 <= self.conring_kib <= 65536:
            raise DeviceConfigError(f"conring_kib must be 16..65536, not {self.conring_kib!r}",
                                    key="conring_kib")
        if not isinstance(self.xen_args, str) or "\n" in self.xen_args:
            raise DeviceConfigError("xen_args must be one line of text", key="xen_args")
        if self.hypervisor is not None and (not isinstance(self.hypervisor, str) or not self.hypervisor
                                            or "," in self.hypervisor or " " in self.hypervisor):
            raise DeviceConfigError(f"hypervisor must be a path without commas or spaces, "
                                    f"not {self.hypervisor!r}", key="hypervisor")

    def xen_cmdline(self) -> str:
        """Xen's command line: COM1 console, dom0's memory and vCPUs, the console ring."""
        args = ["console=com1", "com1=115200,8n1", f"dom0_mem={self.dom0_mem_mib}M,max:{self.dom0_mem_mib}M",
                f"conring_size={self.conring_kib}k", "loglvl=all", "guest_loglvl=all"]
        if self.dom0_vcpus is not None:
            args.append(f"dom0_max_vcpus={self.dom0_vcpus}")
        if self.xen_args:
            args.append(self.xen_args)
        return " ".join(args)

    @staticmethod
    def modules(kernel: str, dom0_cmdline: str, initrd: str) -> str:
        """The ``-initrd`` value: dom0's kernel with its command line, then the initramfs.

        Raises DeviceConfigError when a file path holds a comma or a space (a path
        cannot be escaped there)."""
        for what, path in (("kernel", kernel), ("initrd", initrd)):
            if "," in path or " " in path:
                raise DeviceConfigError(f"the dom0 {what} path {path!r} holds a comma or a space, which a "
                                        "multiboot module list cannot carry", key=what)
        return f"{kernel} {dom0_cmdline.replace(',', ',,')},{initrd}"

    def to_table(self) -> dict[str, Any]:
        return {k: v for k, v in (("dom0_mem_mib", self.dom0_mem_mib), ("dom0_vcpus", self.dom0_vcpus),
                                  ("conring_kib", self.conring_kib), ("xen_args", self.xen_args),
                                  ("hypervisor", self.hypervisor)) if v not in (None, "")}


def panic_in(text: str) -> tuple[str, str] | None:
    """The first crash signature in console ``text``: (what, the line), or None."""
    for line in text.splitlines():
        for what, pattern in PANIC_SIGNATURES:
            if pattern.search(line):
                return what, line.strip()
    return None
