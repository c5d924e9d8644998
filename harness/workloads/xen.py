"""Xen grant tables from dom0 (guest side: guest_agent/xen.py): dom0 grants its own
pages through gntalloc and maps them back through gntdev, the two sides of a grant
in one domain (Xen's ``map_grant_ref`` allows the mapping domain to be the granting
one), so every grant, map, copy and end of access happens on real Xen.

The workload only does things and records what the kernel and Xen answered; the
``xen-grant`` check (:mod:`harness.checks.grant`) judges every answer against the
grant model. It raises :class:`WorkloadFailed` only when the guest cannot do what
the scenario needs at all (not Xen, no gntalloc).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import ConfigError
from harness.vm.agent import AgentChannel
from harness.workloads.base import Workload, WorkloadFailed, _check_timeout, register

PAGE = 4096
FOREIGN_DOMID = 7
"""A domain id no domain has here: grants to it cannot be mapped by dom0
(``map_grant_ref``: the entry's grantee is not the mapping domain)."""
OUT_OF_TABLE_REF = 60000
"""A ref past the end of dom0's grant table (Xen's default ``gnttab_max_frames``
of 64 frames holds 32768 v1 entries): GNTST_bad_gntref."""


@dataclass(frozen=True)
class XenGrant(Workload):
    """Grant, map, share data, copy, end while mapped, unmap and free, ``rounds``
    times, with Xen's grant table dumped at three points of each round.

    ``writable`` / ``readonly``: how many pages dom0 grants writable and read-only
    each round (each 1..16); ``seed``: the data patterns; ``tick_wait``: seconds to
    wait for Linux's deferred-end timer (1 Hz) to run once.

    Each round: grant W writable + R read-only pages to dom0 and one to a foreign
    domid; write a pattern through the granting side (gntalloc mmap) and read it
    through a gntdev mapping; write through the gntdev mapping and read it through
    the granting side; map the read-only grants read-only (works) and writable
    (EINVAL); map the foreign grant (EINVAL); grant copy to and from refs (good,
    into a read-only grant, a ref outside the table); dump Xen's entries; end
    access to every grant while mapped (deferred); dump; map an ended grant that
    is still mapped once more (works: Xen does not recheck a pinned entry's
    flags, even with version 2); unmap the read-only
    grants, wait for the timer (it frees them, not the still-mapped writable
    ones), grant one page (it gets the last ref freed) and free it; dump; unmap the last mapping and
    map one grant again at once (version 1: the entry stays valid until the
    deferred end completes); unmap everything, wait for the timer, dump; grant
    again (LIFO reuse of the freed refs) and free.
    """

    kind: ClassVar[str] = "xen-grant"
    writable: int = 3
    readonly: int = 2
    rounds: int = 2
    seed: int = 1
    tick_wait: float = 3.0
    timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("writable", "readonly"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
                raise ConfigError(f"{name} must be 1..16 pages, not {value!r}", key=name)
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= 100:
            raise ConfigError(f"rounds must be 1..100, not {self.rounds!r}", key="rounds")
        if isinstance(self.tick_wait, bool) or not isinstance(self.tick_wait, (int, float)) \
                or not 1.0 <= self.tick_wait <= 60.0:
            raise ConfigError(f"tick_wait must be 1..60 seconds, not {self.tick_wait!r}", key="tick_wait")
        _check_timeout(self.timeout)

    def run(self, agent: AgentChannel) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []

        def call(op: str, **args: Any) -> dict[str, Any]:
            result: dict[str, Any] = agent.call(op, timeout=self.timeout, **args)
            records.append({"op": op, **result})
            return result

        info = call("xen.info")
        if not info.get("xen") or not info.get("devices", {}).get("gntalloc"):
            raise WorkloadFailed(f"the guest is not a Xen dom0 with /dev/xen/gntalloc: {info}")
        if call("xen.deferred_ticks").get("ticks") is None:
            raise WorkloadFailed("no kprobe on gnttab_handle_deferred: the deferred ends cannot be timed")
        call("xen.grant_state")
        for r in range(self.rounds):
            self._round(call, agent, self.seed + 100 * r)
        return records

    def _round(self, call: Any, agent: AgentChannel, seed: int) -> None:
        w, ro = self.writable, self.readonly
        gw = call("xen.alloc", domid=0, count=w, writable=True)
        gr = call("xen.alloc", domid=0, count=ro, writable=False)
        gf = call("xen.alloc", domid=FOREIGN_DOMID, count=1, writable=True)
        for g in (gw, gr, gf):
            if g["errno"]:
                raise WorkloadFailed(f"gntalloc could not grant pages: errno {g['errno']}")
        # the granting side's view of the writable pages, and data through it
        side = call("xen.alloc_mmap", index=gw["index"], count=w)
        call("mem.write", user_va=side["user_va"], pattern=seed, length=w * PAGE)
        mw = call("xen.map", domid=0, refs=gw["refs"])
        vw = call("xen.mmap", index=mw["index"], count=w, writable=True)
        if vw["errno"] == 0:
            call("mem.read", user_va=vw["user_va"], length=w * PAGE, hex=True)
            call("mem.write", user_va=vw["user_va"], pattern=seed + 1, length=PAGE)
            call("mem.read", user_va=side["user_va"], length=w * PAGE, hex=True)
        # read-only grants: a read-only map works, a writable one does not
        mr = call("xen.map", domid=0, refs=gr["refs"])
        vr = call("xen.mmap", index=mr["index"], count=ro, writable=False)
        if vr["errno"] == 0:
            call("mem.read", user_va=vr["user_va"], length=ro * PAGE, hex=True)
        mr2 = call("xen.map", domid=0, refs=gr["refs"])
        call("xen.mmap", index=mr2["index"], count=ro, writable=True)
        # a grant to another domain, and a ref dom0 never granted
        mf = call("xen.map", domid=0, refs=gf["refs"])
        call("xen.mmap", index=mf["index"], count=1, writable=True)
        # grant copy: out of a grant, into a grant, into a read-only grant, a ref outside the table
        buf = call("mem.map", length=2 * PAGE)
        call("xen.copy", segments=[
            {"source": {"ref": gw["refs"][0], "domid": 0, "offset": 0}, "dest": {"user_va": buf["user_va"]},
             "len": PAGE},
            {"source": {"user_va": buf["user_va"] + PAGE}, "dest": {"ref": gw["refs"][-1], "domid": 0,
                                                                    "offset": 512}, "len": 256},
            {"source": {"user_va": buf["user_va"]}, "dest": {"ref": gr["refs"][0], "domid": 0, "offset": 0},
             "len": 64},
            {"source": {"ref": OUT_OF_TABLE_REF, "domid": 0, "offset": 0}, "dest": {"user_va": buf["user_va"]},
             "len": 64},
            {"source": {"ref": gf["refs"][0], "domid": FOREIGN_DOMID, "offset": 0},
             "dest": {"user_va": buf["user_va"]}, "len": 64},
        ])
        call("mem.read", user_va=buf["user_va"], length=2 * PAGE, hex=True)
        if vw["errno"] == 0:
            call("mem.read", user_va=vw["user_va"], length=w * PAGE, hex=True)
        call("xen.grant_state")
        # end access while mapped: the ends are deferred
        call("xen.alloc_munmap", user_va=side["user_va"], count=w)
        call("xen.dealloc", index=gw["index"], count=w)
        call("xen.dealloc", index=gr["index"], count=ro)
        call("xen.dealloc", index=gf["index"], count=1)
        call("xen.deferred_ticks")
        call("xen.grant_state")
        # a new writable map of an ended grant that is still mapped: Xen does not look at the
        # flags of a pinned entry again, so it works with version 2 too (whose end cleared them)
        if vw["errno"] == 0:
            pinned = call("xen.map", domid=0, refs=gw["refs"][:1])
            second = call("xen.mmap", index=pinned["index"], count=1, writable=True)
            if second["errno"] == 0:
                call("mem.read", user_va=second["user_va"], length=PAGE, hex=True)
                call("xen.munmap", user_va=second["user_va"], count=1)
            call("xen.unmap", index=pinned["index"], count=1)
        # unmap the read-only grants only, and let the timer run once: it frees them (they are behind
        # the writable grants on the deferred list, which stay: still mapped); the next grant
        # takes the last one it freed
        if vr["errno"] == 0:
            call("xen.munmap", user_va=vr["user_va"], count=ro)
        self._wait_tick(call)
        one = call("xen.alloc", domid=0, count=1, writable=True)
        if one["errno"] == 0:
            call("xen.dealloc", index=one["index"], count=1)
        call("xen.deferred_ticks")
        call("xen.grant_state")
        # the last unmap of the writable grants, and a map of one of them at once (one batch, the
        # timer's count read on both sides of it: the check knows whether a tick came in between)
        if vw["errno"] == 0:
            calls: list[dict[str, Any]] = [{"op": "xen.deferred_ticks"}, {"op": "xen.munmap", "args": {"user_va": vw["user_va"], "count": w}},
                     {"op": "xen.map", "args": {"domid": 0, "refs": gw["refs"][:1]}}]
            got = agent.call("batch", timeout=self.timeout, calls=calls)
            again = got[2].get("result", {}) if got[2].get("ok") else {}
            calls = [{"op": "xen.mmap", "args": {"index": again.get("index"), "count": 1, "writable": True}},
                     {"op": "xen.deferred_ticks"}] if again.get("errno") == 0 else [{"op": "xen.deferred_ticks"}]
            got2 = agent.call("batch", timeout=self.timeout, calls=calls)
            for c, g in zip(calls, got2):
                if c["op"] == "xen.mmap" and g.get("ok") and g["result"].get("errno") == 0:
                    call("mem.read", user_va=g["result"]["user_va"], length=PAGE, hex=True)
                    call("xen.munmap", user_va=g["result"]["user_va"], count=1)
            if again.get("errno") == 0:
                call("xen.unmap", index=again["index"], count=1)
            call("xen.unmap", index=mw["index"], count=w)
        for m, n in ((mr, ro), (mr2, ro), (mf, 1)):
            call("xen.unmap", index=m["index"], count=n)
        call("mem.unmap", user_va=buf["user_va"])
        self._wait_tick(call)
        call("xen.grant_state")
        # the freed refs come back last-freed first
        again = call("xen.alloc", domid=0, count=w + ro + 1, writable=True)
        if again["errno"] == 0:
            call("xen.dealloc", index=again["index"], count=w + ro + 1)
        call("xen.deferred_ticks")

    def _wait_tick(self, call: Any) -> None:
        """Wait until Linux's deferred-end timer has run once more (its kprobe count)."""
        start = call("xen.deferred_ticks").get("ticks")
        deadline = time.monotonic() + self.tick_wait
        while time.monotonic() < deadline:
            time.sleep(0.25)
            if call("xen.deferred_ticks").get("ticks") != start:
                return


register(XenGrant)
