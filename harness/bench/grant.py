"""Benchmark of the grant table model (:mod:`harness.models.grant`).

For each size n it builds a version 1 table of ``n + 8 + BLOCK`` refs and,
as domain 0, grants n refs (to domain 0, gfn = ref) and maps each of them
once writable; the build cost per entry (one grant plus one map) is
recorded.  Then it runs ``ops`` operations and times each kind separately:

* ``grant``: ``grant_foreign_access`` of one of the ``BLOCK`` free refs (the
  undo ends them);
* ``end``: ``end_foreign_access`` of a ref granted (untimed) just before and
  not mapped, so it is freed at once;
* ``map``: a read-only ``map`` of a random built ref (the undo unmaps it);
* ``unmap``: an ``unmap`` of a random built mapping (the undo maps it again).

After each block the table is put back (untimed), so n stays constant.
``peak KiB`` is the peak of Python allocations (``tracemalloc``) while
building a table of that size with its grants and maps, measured apart from
the timed runs.  The blocks, their timing, the normalisation by log2 n and
the table are :mod:`harness.bench.timing`'s; every operation should be O(1),
so the "rel. ns/log2n" column falls as n grows.
"""

from __future__ import annotations

import random
import sys
import tracemalloc
from collections.abc import Callable, Mapping, Sequence

from harness.bench import timing
from harness.bench.timing import BLOCK, DEFAULT_OPS, DEFAULT_SIZES, Bench, Block, Row
from harness.models.grant import NR_RESERVED_ENTRIES, GrantTable

KINDS = ("grant", "end", "map", "unmap")
WEIGHTS = (1, 1, 1, 1)
LABELS = {
    "build": "build (grant+map)",
    "grant": "grant",
    "end": "end (not mapped)",
    "map": "map (read-only)",
    "unmap": "unmap",
    "mixed": "mixed",
}


def _build(n: int) -> tuple[GrantTable, list[int], list[int]]:
    table = GrantTable(n + NR_RESERVED_ENTRIES + BLOCK)
    refs = [table.grant_foreign_access(0, NR_RESERVED_ENTRIES + i) for i in range(n)]
    handles = [table.map(ref, 0) for ref in refs]
    return table, refs, handles


def peak_kib(n: int) -> float:
    """Peak KiB of Python allocations while building the n-entry table (grants
    and maps included), by ``tracemalloc``; restores tracing as it was."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    built = _build(n)
    peak = tracemalloc.get_traced_memory()[1] - base
    del built
    if not was_tracing:
        tracemalloc.stop()
    return peak / 1024


class _Workload:
    """A table with n refs granted and mapped once each; ``_undo`` reverts the
    last block."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n, self.rng = n, rng
        self.table = GrantTable(NR_RESERVED_ENTRIES)  # replaced by build()
        self.refs: list[int] = []
        self.handles: list[int] = []  # handles[i] maps refs[i]
        self._undo: Callable[[], object] = lambda: None

    def build(self) -> None:
        self.table, self.refs, self.handles = _build(self.n)

    def factories(self) -> Mapping[str, Callable[[], Block]]:
        return {"grant": self.grant, "end": self.end, "map": self.map, "unmap": self.unmap}

    def grant(self) -> Block:
        table, got = self.table, []

        def block() -> int:
            for i in range(BLOCK):
                got.append(table.grant_foreign_access(0, i))
            return BLOCK

        self._undo = lambda: [table.end_foreign_access(ref) for ref in got]
        return block

    def end(self) -> Block:
        table = self.table
        refs = [table.grant_foreign_access(0, i) for i in range(BLOCK)]

        def block() -> int:
            for ref in refs:
                table.end_foreign_access(ref)
            return BLOCK

        self._undo = lambda: None
        return block

    def map(self) -> Block:
        table = self.table
        refs = [self.refs[self.rng.randrange(self.n)] for _ in range(BLOCK)]
        got: list[int] = []

        def block() -> int:
            for ref in refs:
                got.append(table.map(ref, 0, readonly=True))
            return BLOCK

        def undo() -> None:
            for h in got:
                table.unmap(h, domid=0)

        self._undo = undo
        return block

    def unmap(self) -> Block:
        table = self.table
        slots = sorted({self.rng.randrange(self.n) for _ in range(BLOCK)})
        handles = [self.handles[i] for i in slots]

        def block() -> int:
            for h in handles:
                table.unmap(h, domid=0)
            return len(handles)

        def undo() -> None:
            for i in slots:
                self.handles[i] = table.map(self.refs[i], 0)

        self._undo = undo
        return block

    def undo(self) -> None:
        """Revert the last block (untimed): n refs granted, each mapped once."""
        self._undo()

    def verify(self) -> None:
        """Spot-check the table after the workload (not timed)."""
        table = self.table
        if len(table) != self.n:
            raise AssertionError(f"{len(table)} refs in use, expected {self.n}")
        if len(table.live_handles(0)) != self.n:
            raise AssertionError(f"{len(table.live_handles(0))} mappings, expected {self.n}")
        for _ in range(50):
            e = table.entry(self.refs[self.rng.randrange(self.n)])
            if (e.pin_ro, e.pin_rw, e.in_use) != (0, 1, True):
                raise AssertionError(f"ref {e.ref}: {e}")

    def stats(self) -> Row:
        return {"peak_kib": peak_kib(self.n)}


BENCH = Bench(
    name="grant",
    title="Grant table model",
    description="Time the grant table model's operations at several numbers of granted and mapped refs.",
    kinds=KINDS,
    weights=WEIGHTS,
    labels=LABELS,
    build_unit="entry",
    size_column="refs",
    sizes_help="refs granted and mapped",
    workload=_Workload,
    stat_columns=(("peak_kib", "peak KiB"),),
    note="Every operation is O(1). peak KiB: tracemalloc peak while building the table.",
)


def run(sizes: Sequence[int] = DEFAULT_SIZES, ops: int = DEFAULT_OPS, seed: int = 0) -> list[Row]:
    """Benchmark the grant table model at each size in ``sizes`` (refs granted
    and mapped); one row per size: ``n``, ``peak_kib``, ``build_ns_per_entry``,
    ``build_log_ratio`` and for each kind K in ``grant``, ``end``, ``map``,
    ``unmap``, ``mixed``: ``K_ops``, ``K_ns_per_op``, ``K_ops_per_s`` and
    ``K_log_ratio``.  Raises ValueError for an empty ``sizes``, a size below 2
    or ``ops < 1``."""
    return timing.run(BENCH, sizes, ops=ops, seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    """``harness bench grant [--sizes 1000,10000,100000] [--ops N] [--seed S]``:
    run the benchmark and print a table.  Returns 0 (argparse exits 2 on bad
    options)."""
    return timing.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
