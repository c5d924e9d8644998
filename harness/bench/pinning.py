"""Benchmark of the iommufd pinning model (:mod:`harness.models.pinning`).

For each size n it builds a context with two IOASes, each with a domain
attached (so every operation also counts pins):

* ``src``: n one-page areas at ``IOVA_BASE + 2k * PAGE`` (a one-page hole
  after each), backed by n distinct user pages; everything below
  ``IOVA_BASE`` is reserved;
* ``dst``: a COPY of each of them at the same IOVA (sharing their pages).

The build cost per area (one MAP plus one COPY) is recorded.  Then it runs
``ops`` operations in blocks of ``BLOCK``, each block's kind drawn at random,
and times each kind separately:

* ``map``: a FIXED_IOVA MAP of one page into a random one-page hole of ``src``;
* ``unmap``: an UNMAP of a random existing area of ``dst`` (its pages stay
  pinned by ``src``; the undo copies it back);
* ``auto_map``: an automatic-IOVA MAP of two pages into ``src``: no one-page
  hole fits, so the search must skip all n of them (the area tree keeps the
  largest gap of each subtree, so this stays O(log n));
* ``copy``: a COPY of a random ``src`` area into a random hole of ``dst``.

After each timed block the IOASes are put back as they were (untimed), so n
stays constant.  The cyclic garbage collector is paused while timing, as
``timeit`` does.  Each kind's result has ns/op, ops/s and ``(ns/op / log2 n)``
normalised to the first (smallest) size: if the cost grows like log n that
ratio stays near 1; linear growth would multiply it by about n/n0.

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

from harness.models.pinning import IOAS, IommufdCtx

PAGE = 4096
IOVA_BASE = 0x1_0000_0000  # where the areas' IOVAs begin
UVA_BASE = 0x7F00_0000_0000  # where their user memory begins
BLOCK = 64
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

Row = dict[str, float]
Block = Callable[[], int]  # runs one timed block, returns how many operations it did


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
    n: int
    rng: random.Random
    ctx: IommufdCtx = field(default_factory=IommufdCtx)
    build_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.src: IOAS = self.ctx.ioas_alloc()
        self.dst: IOAS = self.ctx.ioas_alloc()
        self._undo: Callable[[], object] = lambda: None

    def build(self) -> None:
        src, dst = self.src, self.dst
        src.add_reserved(0, IOVA_BASE - 1)  # automatic IOVAs must search among the areas
        src.attach_domain()
        dst.attach_domain()
        order = list(range(self.n))
        self.rng.shuffle(order)
        with _gc_paused():
            t0 = time.perf_counter()
            for k in order:
                iova = IOVA_BASE + 2 * k * PAGE
                src.map(UVA_BASE + k * PAGE, PAGE, iova=iova)
                dst.copy_from(src, iova, PAGE, iova=iova)
            self.build_seconds = time.perf_counter() - t0

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
        work.undo()
    work.verify()
    row: Row = {"n": float(n), "build_ns_per_area": work.build_seconds / n * 1e9}
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
    """Benchmark the pinning model at each size in ``sizes`` (areas per IOAS);
    one row per size: ``n``, ``build_ns_per_area``, ``build_log_ratio`` and
    for each kind K in ``map``, ``unmap``, ``auto_map``, ``copy``, ``mixed``:
    ``K_ops``, ``K_ns_per_op``, ``K_ops_per_s`` and ``K_log_ratio`` = (ns/op /
    log2 n) over the same in the first row.  Raises ValueError for an empty
    ``sizes``, a size below 2 or ``ops < 1``."""
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
        row["build_log_ratio"] = row["build_ns_per_area"] / base["build_ns_per_area"] * scale
        for kind in (*KINDS, "mixed"):
            key = f"{kind}_ns_per_op"
            row[f"{kind}_log_ratio"] = row[key] / base[key] * scale
    return rows


def _table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["areas", "operation", "ns/op", "ops/s", "rel. ns/log2n"]
    body: list[list[str]] = []
    for row in rows:
        build = row["build_ns_per_area"]
        body.append([f"{int(row['n']):,}", LABELS["build"], f"{build:,.0f}",
                     f"{1e9 / build:,.0f}", f"{row['build_log_ratio']:.2f}"])
        for kind in (*KINDS, "mixed"):
            body.append(["", LABELS[kind], f"{row[f'{kind}_ns_per_op']:,.0f}",
                         f"{row[f'{kind}_ops_per_s']:,.0f}", f"{row[f'{kind}_log_ratio']:.2f}"])
    return header, body


def main(argv: Sequence[str] | None = None) -> int:
    """``harness bench pinning [--sizes 1000,10000,100000] [--ops N] [--seed S]``:
    run the benchmark and print a table.  Returns 0 (argparse exits 2 on bad
    options)."""
    parser = argparse.ArgumentParser(
        prog="harness bench pinning",
        description="Time the iommufd pinning model's operations at several numbers of areas.",
    )
    parser.add_argument("--sizes", default="1000,10000,100000",
                        help="comma-separated numbers of areas per IOAS (default: %(default)s)")
    parser.add_argument("--ops", type=int, default=20_000,
                        help="operations per size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the inputs (default: %(default)s)")
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
    title = f"Pinning model: {args.ops:,} operations per size, seed {args.seed}"
    caption = ("rel. ns/log2n: (ns/op / log2 n) over the first row's; near 1 means the cost "
               "grows like log n. Every IOAS has a domain, so each operation also counts pins.")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        print(title)
        print(caption)
        for r in [header, *body]:
            cells = [c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
            print("  ".join(cells).rstrip())
        return 0
    table = Table(title=title, caption=caption)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 1 else "right", no_wrap=True)
    for r in body:
        table.add_row(*r, end_section=r[1] == LABELS["mixed"])
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
