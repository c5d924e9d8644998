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
  of the same page at a new address, so n stays constant.

The kinds are interleaved in blocks of ``BLOCK`` operations (each block's
kind drawn at random) and every block is timed with ``time.perf_counter``;
the cyclic garbage collector is paused while timing, as ``timeit`` does.
Each kind's result has ns/op, ops/s and ``(ns/op / log2 n)`` normalised to
the first (smallest) size: if the cost grows like log n that ratio stays near
1 (cache misses in a bigger heap push it up somewhat); linear growth would
multiply it by about n/n0.

The inputs are deterministic (``seed``); the timings are of course not.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from harness.models.iotlb import IOTLB, VHOST_MAP_RO, VHOST_MAP_RW, VHOST_MAP_WO

PAGE = 4096
IOVA_BASE = 0x1_0000_0000  # where the maps' IOVAs begin
ADDR_BASE = 0x7F00_0000_0000  # where their targets begin (a user-space-like address)
WALK_PAGES = 4
HOT_PAGES = 8
BLOCK = 64
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

Row = dict[str, float]
Block = Callable[[], int]  # runs one block, returns how many operations it did


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class _Workload:
    """An IOTLB of n 4 KiB maps and what the workload needs to know about it."""

    n: int
    rng: random.Random
    iotlb: IOTLB = field(default_factory=IOTLB)
    addrs: list[int] = field(default_factory=list)  # target address of each page
    hot: list[int] = field(default_factory=list)  # pages of translate_hot
    build_seconds: float = 0.0

    def build(self) -> None:
        pages = list(range(self.n))
        self.rng.shuffle(pages)
        self.addrs = [ADDR_BASE + p * PAGE for p in range(self.n)]
        self.hot = [self.rng.randrange(self.n) for _ in range(HOT_PAGES)]
        add, addrs = self.iotlb.add_range, self.addrs
        with _gc_paused():
            t0 = time.perf_counter()
            for p in pages:
                iova = IOVA_BASE + p * PAGE
                add(iova, iova + PAGE - 1, addrs[p], VHOST_MAP_RW)
            self.build_seconds = time.perf_counter() - t0

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


def _measure(n: int, ops: int, seed: int) -> Row:
    work = _Workload(n, random.Random(seed * 1_000_003 + n))
    work.build()
    factories: dict[str, Callable[[], Block]] = {kind: getattr(work, kind) for kind in KINDS}
    seconds = dict.fromkeys(KINDS, 0.0)
    counts = dict.fromkeys(KINDS, 0)
    kinds = work.rng.choices(KINDS, weights=WEIGHTS, k=max(1, ops // BLOCK))
    kinds += [kind for kind in KINDS if kind not in kinds]  # measure every kind
    for kind in kinds:
        block = factories[kind]()
        with _gc_paused():
            t0 = time.perf_counter()
            done = block()
            seconds[kind] += time.perf_counter() - t0
        counts[kind] += done
    work.verify()

    root = work.iotlb._root  # internal, reported to show the tree's depth
    row: Row = {
        "n": float(n),
        "height": float(root.height if root is not None else 0),
        "build_ns_per_insert": work.build_seconds / n * 1e9,
    }
    for kind in KINDS:
        row[f"{kind}_ops"] = float(counts[kind])
        row[f"{kind}_ns_per_op"] = seconds[kind] / counts[kind] * 1e9
        row[f"{kind}_ops_per_s"] = counts[kind] / seconds[kind]
    total_seconds, total_ops = sum(seconds.values()), sum(counts.values())
    row["mixed_ops"] = float(total_ops)
    row["mixed_ns_per_op"] = total_seconds / total_ops * 1e9
    row["mixed_ops_per_s"] = total_ops / total_seconds
    return row


def run(
    sizes: Sequence[int] = (1_000, 10_000, 100_000), ops: int = 20_000, seed: int = 0
) -> list[Row]:
    """Benchmark the IOTLB model at each size in ``sizes``; one row per size.

    Each row is a flat dict of floats: ``n``, ``height`` (of the AVL tree),
    ``build_ns_per_insert`` and ``build_log_ratio``, and for each kind K in
    ``translate``, ``translate_hot``, ``walk``, ``replace`` and ``mixed``:
    ``K_ops`` (operations timed), ``K_ns_per_op``, ``K_ops_per_s`` and
    ``K_log_ratio`` = (ns/op / log2 n) divided by the same in the first row.
    Raises ValueError for an empty ``sizes``, a size below 2 or ``ops < 1``.
    """
    if not sizes:
        raise ValueError("sizes must not be empty")
    if any(n < 2 for n in sizes):
        raise ValueError(f"every size must be at least 2 (log2 n must be > 0), got {list(sizes)}")
    if ops < 1:
        raise ValueError(f"ops must be positive, got {ops}")
    rows = [_measure(n, ops, seed) for n in sizes]
    base = rows[0]
    for row in rows:
        scale = math.log2(base["n"]) / math.log2(row["n"])
        row["build_log_ratio"] = row["build_ns_per_insert"] / base["build_ns_per_insert"] * scale
        for kind in (*KINDS, "mixed"):
            key = f"{kind}_ns_per_op"
            row[f"{kind}_log_ratio"] = row[key] / base[key] * scale
    return rows


def _table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["n", "height", "operation", "ns/op", "ops/s", "rel. ns/log2n"]
    body: list[list[str]] = []
    for row in rows:
        n, height = f"{int(row['n']):,}", str(int(row["height"]))
        build = row["build_ns_per_insert"]
        body.append(
            [n, height, LABELS["build"], f"{build:,.0f}", f"{1e9 / build:,.0f}",
             f"{row['build_log_ratio']:.2f}"]
        )
        for kind in (*KINDS, "mixed"):
            body.append(
                ["", "", LABELS[kind], f"{row[f'{kind}_ns_per_op']:,.0f}",
                 f"{row[f'{kind}_ops_per_s']:,.0f}", f"{row[f'{kind}_log_ratio']:.2f}"]
            )
    return header, body


def main(argv: Sequence[str] | None = None) -> int:
    """``harness bench iotlb [--sizes 1000,10000,100000] [--ops N] [--seed S]``:
    run the benchmark and print a table.  Returns 0 (argparse exits 2 on bad
    options)."""
    parser = argparse.ArgumentParser(
        prog="harness bench iotlb",
        description="Time the IOTLB reference model's operations at several sizes.",
    )
    parser.add_argument(
        "--sizes",
        default="1000,10000,100000",
        help="comma-separated numbers of 4 KiB maps (default: %(default)s)",
    )
    parser.add_argument(
        "--ops", type=int, default=20_000, help="operations per size (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the inputs (default: %(default)s)"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        sizes = [int(s.strip().replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes takes comma-separated integers, got {args.sizes!r}")
    try:
        rows = run(sizes, ops=args.ops, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))

    header, body = _table(rows)
    title = f"IOTLB model: {args.ops:,} mixed operations per size, seed {args.seed}"
    caption = (
        "rel. ns/log2n: (ns/op / log2 n) over the first row's; near 1 means the cost "
        f"grows like log n. 'translate hot' stays within {HOT_PAGES} maps: random "
        "translations and walks also pay cache misses as the tree grows."
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        print(title)
        print(caption)
        for r in [header, *body]:
            pairs = enumerate(zip(r, widths))
            cells = [c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in pairs]
            print("  ".join(cells).rstrip())
        return 0
    table = Table(title=title, caption=caption)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 2 else "right", no_wrap=True)
    for r in body:
        table.add_row(*r, end_section=r[2] == LABELS["mixed"])
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
