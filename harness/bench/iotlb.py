"""Benchmark of the IOTLB reference model (:mod:`harness.models.iotlb`).

For each size n it builds an IOTLB of n non-overlapping 4 KiB maps, inserted
in random order (the build cost per insert is recorded), then runs a mixed
workload of ``ops`` operations and times each kind separately:

* ``translate``: one ``translate()`` of a random byte of a random map, RO or
  WO (always a hit);
* ``translate_hot``: the same within a fixed set of ``HOT_PAGES`` maps, so the
  nodes visited stay in the CPU caches; it isolates the cost of the tree's
  path length from that of cache misses, which random translations pay more
  of as the tree outgrows the caches;
* ``walk``: ``first()`` then ``next()`` until None over a range covering
  ``WALK_PAGES`` consecutive maps (one walk counts as one operation);
* ``replace``: ``del_range()`` of one random map's page then ``add_range()``
  of the same page at a new address, so n stays constant (nothing to undo).

The blocks, their timing, the normalisation by log2 n and the table are
:mod:`harness.bench.timing`'s; each row also has the AVL tree's ``height``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Mapping, Sequence

from harness.bench import timing
from harness.bench.timing import BLOCK, DEFAULT_OPS, DEFAULT_SIZES, Bench, Block, Row
from harness.models.iotlb import IOTLB, VHOST_MAP_RO, VHOST_MAP_RW, VHOST_MAP_WO

PAGE = 4096
IOVA_BASE = 0x1_0000_0000  # where the maps' IOVAs begin
ADDR_BASE = 0x7F00_0000_0000  # where their targets begin (a user-space-like address)
WALK_PAGES = 4
HOT_PAGES = 8
KINDS = ("translate", "translate_hot", "walk", "replace")
WEIGHTS = (5, 1, 2, 2)
LABELS = {
    "build": "build/insert",
    "translate": "translate",
    "translate_hot": "translate hot",
    "walk": f"walk {WALK_PAGES} maps",
    "replace": "del+add",
    "mixed": "mixed",
}


class _Workload:
    """An IOTLB of n 4 KiB maps (map p: iova ``IOVA_BASE + p * PAGE``) and what
    the workload needs to know about it."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n, self.rng = n, rng
        self.iotlb = IOTLB()
        self.pages = list(range(n))  # insertion order
        rng.shuffle(self.pages)
        self.addrs = [ADDR_BASE + p * PAGE for p in range(n)]  # target address of each page
        self.hot = [rng.randrange(n) for _ in range(HOT_PAGES)]  # pages of translate_hot

    def build(self) -> None:
        add, addrs = self.iotlb.add_range, self.addrs
        for p in self.pages:
            iova = IOVA_BASE + p * PAGE
            add(iova, iova + PAGE - 1, addrs[p], VHOST_MAP_RW)

    def factories(self) -> Mapping[str, Callable[[], Block]]:
        return {"translate": self.translate, "translate_hot": self.translate_hot,
                "walk": self.walk, "replace": self.replace}

    def _random_iova(self) -> int:
        return IOVA_BASE + self.rng.randrange(self.n) * PAGE + self.rng.randrange(PAGE)

    def _translations(self, iovas: list[int]) -> Block:
        accesses = [self.rng.choice((VHOST_MAP_RO, VHOST_MAP_WO)) for _ in iovas]
        translate = self.iotlb.translate

        def block() -> int:
            for iova, access in zip(iovas, accesses):
                translate(iova, access)
            return len(iovas)

        return block

    def translate(self) -> Block:
        return self._translations([self._random_iova() for _ in range(BLOCK)])

    def translate_hot(self) -> Block:
        rng, hot = self.rng, self.hot
        iovas = [IOVA_BASE + rng.choice(hot) * PAGE + rng.randrange(PAGE) for _ in range(BLOCK)]
        return self._translations(iovas)

    def walk(self) -> Block:
        starts = [self._random_iova() for _ in range(BLOCK)]
        first, next_ = self.iotlb.first, self.iotlb.next
        span = (WALK_PAGES - 1) * PAGE

        def block() -> int:
            for start in starts:
                last = start + span
                m = first(start, last)
                while m is not None:
                    m = next_(m, start, last)
            return BLOCK

        return block

    def replace(self) -> Block:
        rng = self.rng
        pages = [rng.randrange(self.n) for _ in range(BLOCK)]
        new_addrs = [ADDR_BASE + rng.randrange(1 << 24) * PAGE for _ in range(BLOCK)]
        del_range, add_range, addrs = self.iotlb.del_range, self.iotlb.add_range, self.addrs

        def block() -> int:
            for p, addr in zip(pages, new_addrs):
                iova = IOVA_BASE + p * PAGE
                del_range(iova, iova)
                add_range(iova, iova + PAGE - 1, addr, VHOST_MAP_RW)
                addrs[p] = addr
            return BLOCK

        return block

    def undo(self) -> None:
        """Nothing: every kind leaves n maps (``replace`` re-adds what it deletes)."""

    def verify(self) -> None:
        """Spot-check the model after the workload (not timed)."""
        if len(self.iotlb) != self.n:
            raise AssertionError(f"the IOTLB holds {len(self.iotlb)} maps, expected {self.n}")
        for _ in range(200):
            p, offset = self.rng.randrange(self.n), self.rng.randrange(PAGE)
            got = self.iotlb.translate(IOVA_BASE + p * PAGE + offset)
            if got != self.addrs[p] + offset:
                raise AssertionError(
                    f"page {p}: translated to {got:#x}, expected {self.addrs[p] + offset:#x}"
                )

    def stats(self) -> Row:
        root = self.iotlb._root  # internal, reported to show the tree's depth
        return {"height": float(root.height if root is not None else 0)}


BENCH = Bench(
    name="iotlb",
    title="IOTLB model",
    description="Time the IOTLB reference model's operations at several sizes.",
    kinds=KINDS,
    weights=WEIGHTS,
    labels=LABELS,
    build_unit="insert",
    size_column="n",
    sizes_help="4 KiB maps",
    workload=_Workload,
    stat_columns=(("height", "height"),),
    note=(f"'translate hot' stays within {HOT_PAGES} maps: random translations and walks "
          "also pay cache misses as the tree grows."),
)


def run(sizes: Sequence[int] = DEFAULT_SIZES, ops: int = DEFAULT_OPS, seed: int = 0) -> list[Row]:
    """Benchmark the IOTLB model at each size in ``sizes`` (4 KiB maps); one
    row per size.

    Each row is a flat dict of floats: ``n``, ``height`` (of the AVL tree),
    ``build_ns_per_insert`` and ``build_log_ratio``, and for each kind K in
    ``translate``, ``translate_hot``, ``walk``, ``replace`` and ``mixed``:
    ``K_ops`` (operations timed), ``K_ns_per_op``, ``K_ops_per_s`` and
    ``K_log_ratio`` = (ns/op / log2 n) divided by the same in the first row.
    Raises ValueError for an empty ``sizes``, a size below 2 or ``ops < 1``.
    """
    return timing.run(BENCH, sizes, ops=ops, seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    """``harness bench iotlb [--sizes 1000,10000,100000] [--ops N] [--seed S]``:
    run the benchmark and print a table.  Returns 0 (argparse exits 2 on bad
    options)."""
    return timing.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
