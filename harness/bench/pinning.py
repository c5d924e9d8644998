"""Benchmark of the iommufd pinning model (:mod:`harness.models.pinning`).

For each size n it builds a context with two IOASes, each with a domain
attached (so every operation also counts pins):

* ``src``: n one-page areas at ``IOVA_BASE + 2k * PAGE`` (a one-page hole
  after each), backed by n distinct user pages; everything below
  ``IOVA_BASE`` is reserved;
* ``dst``: a COPY of each of them at the same IOVA (sharing their pages).

The build cost per area (one MAP plus one COPY) is recorded.  Then it runs
``ops`` operations and times each kind separately:

* ``map``: a FIXED_IOVA MAP of one page into a random one-page hole of ``src``;
* ``unmap``: an UNMAP of a random existing area of ``dst`` (its pages stay
  pinned by ``src``; the undo copies it back);
* ``auto_map``: an automatic-IOVA MAP of two pages into ``src``: no one-page
  hole fits, so the search must skip all n of them (the area tree keeps the
  largest gap of each subtree, so this stays O(log n));
* ``copy``: a COPY of a random ``src`` area into a random hole of ``dst``.

After each timed block the IOASes are put back as they were (untimed), so n
stays constant.  The blocks, their timing, the normalisation by log2 n and the
table are :mod:`harness.bench.timing`'s.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Mapping, Sequence

from harness.bench import timing
from harness.bench.timing import BLOCK, DEFAULT_OPS, DEFAULT_SIZES, Bench, Block, Row
from harness.models.pinning import IOAS, IommufdCtx

PAGE = 4096
IOVA_BASE = 0x1_0000_0000  # where the areas' IOVAs begin
UVA_BASE = 0x7F00_0000_0000  # where their user memory begins
KINDS = ("map", "unmap", "auto_map", "copy")
WEIGHTS = (1, 1, 1, 1)
LABELS = {
    "build": "build (map+copy)",
    "map": "map (fixed iova)",
    "unmap": "unmap",
    "auto_map": "map (auto iova)",
    "copy": "copy",
    "mixed": "mixed",
}


class _Workload:
    """Two IOASes with domains, ``src`` with n one-page areas and holes between
    them, ``dst`` with a COPY of each; ``_undo`` reverts the last block."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n, self.rng = n, rng
        self.ctx = IommufdCtx()
        self.src: IOAS = self.ctx.ioas_alloc()
        self.dst: IOAS = self.ctx.ioas_alloc()
        self.src.add_reserved(0, IOVA_BASE - 1)  # automatic IOVAs must search among the areas
        self.src.attach_domain()
        self.dst.attach_domain()
        self.order = list(range(n))  # order in which the areas are built
        rng.shuffle(self.order)
        self._undo: Callable[[], object] = lambda: None

    def build(self) -> None:
        src, dst = self.src, self.dst
        for k in self.order:
            iova = IOVA_BASE + 2 * k * PAGE
            src.map(UVA_BASE + k * PAGE, PAGE, iova=iova)
            dst.copy_from(src, iova, PAGE, iova=iova)

    def factories(self) -> Mapping[str, Callable[[], Block]]:
        return {"map": self.map, "unmap": self.unmap, "auto_map": self.auto_map,
                "copy": self.copy}

    def _slots(self, holes: bool) -> list[int]:
        return [IOVA_BASE + (2 * self.rng.randrange(self.n) + holes) * PAGE for _ in range(BLOCK)]

    def map(self) -> Block:
        iovas = sorted(set(self._slots(holes=True)))
        src = self.src

        def block() -> int:
            for iova in iovas:
                src.map(UVA_BASE, PAGE, iova=iova)
            return len(iovas)

        self._undo = lambda: [src.unmap(iova, PAGE) for iova in iovas]
        return block

    def unmap(self) -> Block:
        iovas = sorted(set(self._slots(holes=False)))
        src, dst = self.src, self.dst

        def block() -> int:
            for iova in iovas:
                dst.unmap(iova, PAGE)
            return len(iovas)

        def undo() -> None:
            for iova in iovas:
                dst.copy_from(src, iova, PAGE, iova=iova)

        self._undo = undo
        return block

    def auto_map(self) -> Block:
        src = self.src
        got: list[int] = []

        def block() -> int:
            for _ in range(BLOCK):
                got.append(src.map(UVA_BASE, 2 * PAGE))
            return BLOCK

        self._undo = lambda: [src.unmap(iova, 2 * PAGE) for iova in got]
        return block

    def copy(self) -> Block:
        srcs = self._slots(holes=False)
        dsts = sorted(set(self._slots(holes=True)))
        src, dst = self.src, self.dst

        def block() -> int:
            for s, d in zip(srcs, dsts):
                dst.copy_from(src, s, PAGE, iova=d)
            return len(dsts)

        self._undo = lambda: [dst.unmap(d, PAGE) for d in dsts]
        return block

    def undo(self) -> None:
        """Revert the last block (untimed), so both IOASes hold n areas again."""
        self._undo()

    def verify(self) -> None:
        """Spot-check the model after the workload (not timed)."""
        for ioas in (self.src, self.dst):
            if len(ioas) != self.n:
                raise AssertionError(f"IOAS {ioas.id} holds {len(ioas)} areas, expected {self.n}")
        if self.ctx.pinned_vm != self.n:
            raise AssertionError(f"{self.ctx.pinned_vm} pages pinned, expected {self.n}")
        for _ in range(50):
            k = self.rng.randrange(self.n)
            if self.ctx.refs(UVA_BASE + k * PAGE) != 1:
                raise AssertionError(f"page {k} does not have exactly one pin")

    def stats(self) -> Row:
        return {}


BENCH = Bench(
    name="pinning",
    title="Pinning model",
    description="Time the iommufd pinning model's operations at several numbers of areas.",
    kinds=KINDS,
    weights=WEIGHTS,
    labels=LABELS,
    build_unit="area",
    size_column="areas",
    sizes_help="areas per IOAS",
    workload=_Workload,
    note="Every IOAS has a domain, so each operation also counts pins.",
)


def run(sizes: Sequence[int] = DEFAULT_SIZES, ops: int = DEFAULT_OPS, seed: int = 0) -> list[Row]:
    """Benchmark the pinning model at each size in ``sizes`` (areas per IOAS);
    one row per size: ``n``, ``build_ns_per_area``, ``build_log_ratio`` and
    for each kind K in ``map``, ``unmap``, ``auto_map``, ``copy``, ``mixed``:
    ``K_ops``, ``K_ns_per_op``, ``K_ops_per_s`` and ``K_log_ratio`` = (ns/op /
    log2 n) over the same in the first row.  Raises ValueError for an empty
    ``sizes``, a size below 2 or ``ops < 1``."""
    return timing.run(BENCH, sizes, ops=ops, seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    """``harness bench pinning [--sizes 1000,10000,100000] [--ops N] [--seed S]``:
    run the benchmark and print a table.  Returns 0 (argparse exits 2 on bad
    options)."""
    return timing.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
