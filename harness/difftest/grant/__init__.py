"""The Xen grant-table target of ``difftest``: dom0 grants its own pages to itself
(/dev/xen/gntalloc), maps and copies those grants (/dev/xen/gntdev), and the
sequences run against :mod:`harness.models.grant` (one dom0 :class:`GrantTable`,
grant table version 1) plus the gntalloc/gntdev bookkeeping this module models.

The machine is :func:`harness.vm.spec.xen_machine` (Xen 4.17, the harness's kernel
as PV dom0, one vCPU). The system side is the guest agent's ``xen.*`` ops
(guest_agent/xen.py) and ``mem.read``/``mem.write``/``mem.map``.

Steps (``op``; every step also has ``tick``, see below). ``group`` k is the k-th
``grant`` step of the sequence (one gntalloc ALLOC), ``map`` k the k-th ``map``
step (one gntdev MAP_GRANT_REF + mmap), ``amap`` k the k-th ``amap`` step (one
gntalloc mmap); pages are 4 KiB, offsets and lengths bytes:

==========  ====================================================================
``grant``   IOCTL_GNTALLOC_ALLOC_GREF of ``count`` pages to ``domid`` (0, or 1: a
            domain that does not exist, so dom0's maps of it fail), ``writable``
            -> ``errno``, ``refs`` (the Linux free list's head: LIFO reuse)
``map``     IOCTL_GNTDEV_MAP_GRANT_REF of ``refs`` (granted by d0), then mmap
            (PROT_WRITE if ``writable``) -> ``gntdev_index`` (bytes; first fit in
            the fd's list), ``errno`` (the mmap's: EINVAL if Xen refused a page)
``unmap``   munmap of map k's mapping and IOCTL_GNTDEV_UNMAP_GRANT_REF (``ioctl_first``:
            the ioctl before the munmap) -> ``errno``, ``unmap_errno``
``end``     IOCTL_GNTALLOC_DEALLOC_GREF of ``count`` pages from page ``page`` of
            ``group`` (a range may run into the next group's pages) -> ``errno``.
            A page no gntalloc mapping holds is ended now (``gnttab_end_foreign_access``:
            freed at once, or deferred while mapped)
``amap``    mmap of ``count`` gntalloc pages from (``group``, ``page``) -> ``errno``
            (ENOENT: not contiguous pages of the file); holds the pages' grants
``aunmap``  munmap of amap k: a page already deallocated is ended here
``copy``    IOCTL_GNTDEV_GRANT_COPY of ``segments`` (``to_ref``: user -> grant, else
            grant -> user; ``ref``, ``domid`` of the grant side, ``offset``, ``len``;
            the user side is the sequence's scratch buffer at the same offset) ->
            ``errno``, ``status`` (GNTST per segment), ``scratch_sha`` (sha256 of
            the copy destination page after grant -> user copies)
``data``    through two views (a gntdev mapping's page or a gntalloc mapping's
            page): sha256 of the ``read`` view, ``mem.write`` of pattern ``seed``
            (4 KiB) into the ``write`` view, sha256 of the ``read`` view again ->
            ``read_before``, ``read_after`` (the model keeps every frame's bytes:
            gntalloc pages start zeroed, copies and writes change them)
``state``   Xen's own entries (``xen.grant_state``: debug key 'g') -> ``entries``,
            one per pinned ref of d0: ``ref``, ``active_domid``, ``pin``,
            ``shared_domid``, ``flags`` (against ``GrantTable.usage_lines``)
``settle``  nothing: waits for the deferred-end timer (see below)
==========  ====================================================================

How a gntdev mmap maps to the model: in a PV dom0 (``use_ptemod``) gntdev maps
every page twice, the user PTE (``map_ops``, GNTMAP_host_map|application_map|
contains_pte) and the kernel's linear address (``kmap_ops``, issued as a second
GNTTABOP_map_grant_ref by arch/x86/xen/p2m.c ``set_foreign_p2m_mapping``), so one
mmap page is two :meth:`GrantTable.map` calls (all user maps first, then all
kernel maps); any failure gives EINVAL and every successful map of the mmap is
unmapped again. Measured in dom0 (Xen 4.17, Linux 6.12): ``pin`` 0x2 for one
writable mmap of a ref, 0x200 for a read-only one; flags 0x19 and 0x0d. The unmap
happens at munmap (MMU notifier), whatever the order of munmap and UNMAP_GRANT_REF.

gntalloc (drivers/xen/gntalloc.c): each page (gref) has a use count, 1 for the
file's list plus 1 per gntalloc mmap; DEALLOC takes pages out of the file's list
(``find_grefs``: the range must be contiguous in the file, else EINVAL) and drops
their count; a page whose count reaches 0 is deleted (``__del_gref``, which ends
the grant) in the order of the global list (allocation order), at DEALLOC
(``do_cleanup``) or at the munmap of its last gntalloc mapping.
gntdev (drivers/xen/gntdev.c): ``gntdev_add_map`` gives a new map the first index
after which it fits before the next map with at least one page to spare
(``index + count < next->index``); a map that failed to mmap keeps its index until
UNMAP_GRANT_REF (the driver leaves it there until the teardown);
``gntdev_grant_copy_seg`` rejects a segment crossing its grant page with EINVAL
before any hypercall: the segments queued before it report GNTST_okay but were
never copied, it and the later ones keep their initial status (the agent's 1); a
segment of length 0 is never issued (status 0).

The deferred end. ``gnttab_end_foreign_access`` of a ref still mapped queues it;
Linux's timer (``gnttab_handle_deferred``, 1 Hz while the list is not empty,
re-armed ``jiffies + HZ`` from within itself) frees those no longer mapped. The
guest's own evidence of when it ran is ``xen.deferred_ticks`` (hit count of a
kprobe on it), read after every step. A step's ``tick`` True means: the executor
waits for the next run of the timer before the step (polling, at most
:data:`TICK_TIMEOUT` s) and the model applies :meth:`GrantTable.handle_deferred`
once before it. The target sets ``tick`` on a ``settle`` step while the model has
deferred refs, and on any step while a tick would change the model (a deferred ref
no longer mapped) or that would make one so (the munmap of a deferred ref's last
mapping) -- except the step right after a waited one: the timer just ran and runs
again only a second later, so those two steps (the *window*) run before it with
certainty; that is how a map right after the last unmap sees version 1's entry
still valid before the deferred end completes. Observation fields of this timing:
``tick`` ("ran"/"idle": did the timer run within the wait), ``quiet`` (window
steps: the timer did not run again up to the end of the step) and ``timer``
("idle" when the model has no deferred ref before and after the step, which the
kernel must confirm by no run of its timer). A tick seen during a step outside a
window is harmless by construction (a tick then changes nothing in the model):
counted as "ambiguous ticks". A window the timer broke into (only a stall of the
guest of about a second can do that) makes the executor run the sequence again
("tick retries"). So every sequence needs :class:`GrantExecutor`
(``GrantTarget.agent_executor``), not the engine's AgentExecutor.

Every sequence starts from the same state: the executor allocates
:data:`CANON_REFS` refs, checks they are refs 8.. 8 + CANON_REFS - 1 (else it
waits for the timer to free a ref the previous sequence left deferred) and frees
them one by one in descending order, so the Linux free list's head is 8, 9, ...
as in a fresh :class:`GrantTable`; Xen must show no pinned dom0 entry. The
teardown unmaps every mapping and deallocates every page.

Not observable here, so two mutants of harness/models/grant_mutants.py cannot
diverge on this target: maptrack handles never leave the kernel
(``grant-maptrack-lifo``), and with version 1 a pinned entry's flags are never
cleared (an end of a mapped ref leaves GTF_permit_access: ``grant-flags-rechecked-
when-pinned`` predicts the same as the model; it needs version 2's end).

Semantics: drivers/xen/grant-table.c, gntalloc.c, gntdev.c, arch/x86/xen/p2m.c of
Linux 6.12 and xen/common/grant_table.c of Xen 4.17.
"""

from harness.difftest.grant.common import (
    BAD_REF,
    CANON_REFS,
    COPY_NOT_REACHED,
    COPY_SEED,
    DOM0,
    NR_ENTRIES,
    PAGE,
    VERSION,
    gntdev_first_fit,
    pattern_bytes,
    sha,
)
from harness.difftest.grant.driver import GrantDriver
from harness.difftest.grant.executor import GrantExecutor
from harness.difftest.grant.model import GrantModel
from harness.difftest.grant.target import GrantTarget

__all__ = ["BAD_REF", "CANON_REFS", "COPY_NOT_REACHED", "COPY_SEED", "DOM0", "NR_ENTRIES", "PAGE", "VERSION",
           "GrantDriver", "GrantExecutor", "GrantModel", "GrantTarget", "gntdev_first_fit", "pattern_bytes", "sha"]
