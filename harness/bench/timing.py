"""Timing machinery shared by the model benchmarks (:mod:`harness.bench.iotlb`,
:mod:`harness.bench.pinning`).

A benchmark is a :class:`Bench`: a name, the kinds of operation it times (with
their draw weights and table labels) and a factory of :class:`Workload`
objects, which say what building a model of n entries and what one operation
of each kind are.  For each size n, :func:`run`

1. makes the workload with a ``random.Random`` seeded from ``seed`` and n (so
   the inputs are deterministic; the timings are of course not) and times its
   ``build()`` (n entries; the cost per entry is reported);
2. draws ``ops // BLOCK`` kinds at random by weight (then adds any kind not
   drawn, so every kind is measured) and, for each, asks the workload for a
   block of about ``BLOCK`` operations of that kind (prepared untimed), times
   the block, then lets the workload ``undo()`` it (untimed) so n stays
   constant;
3. lets the workload ``verify()`` the model (untimed).

Every timed region runs with the cyclic garbage collector paused, as
``timeit`` does, and is measured with ``time.perf_counter``.  Each kind's
result has ns/op, ops/s and ``(ns/op / log2 n)`` normalised to the first
(smallest) size: if the cost grows like log n that ratio stays near 1 (cache
misses in a bigger heap push it up somewhat); linear growth would multiply it
by about n/n0.  ``mixed`` is all the timed blocks of a size together.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

BLOCK = 64  # operations per timed block
DEFAULT_SIZES = (1_000, 10_000, 100_000)
DEFAULT_OPS = 20_000
LOG_CAPTION = (
    "rel. ns/log2n: (ns/op / log2 n) over the first row's; near 1 means the cost grows like log n."
)

Row = dict[str, float]
"""One size's results: a flat dict of floats, keys as :func:`run` describes."""

Block = Callable[[], int]
"""Runs one timed block of operations; returns how many operations it did."""

T = TypeVar("T")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector inside the block (as ``timeit`` does);
    restore it afterwards only if it was enabled before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Call ``fn()`` with the garbage collector paused; return its result and
    the seconds it took (``time.perf_counter``)."""
    with gc_paused():
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    return result, seconds


class Workload(Protocol):
    """A model of n entries and the operations a benchmark times on it.

    The constructor (``Bench.workload(n, rng)``) prepares everything untimed;
    it and the block factories must draw their inputs from ``rng`` only.
    """

    def build(self) -> None:
        """Insert the n entries (this call is timed, per entry)."""

    def factories(self) -> Mapping[str, Callable[[], Block]]:
        """For each kind of ``Bench.kinds``: a function that prepares (untimed)
        and returns a :data:`Block` of about ``BLOCK`` operations of that kind."""

    def undo(self) -> None:
        """Put the model back as it was before the last block ran (untimed)."""

    def verify(self) -> None:
        """Spot-check the model after the workload (untimed); raise
        AssertionError if it is wrong."""

    def stats(self) -> Row:
        """Extra columns of the size's row (e.g. a tree's height); may be empty."""


@dataclass(frozen=True)
class Bench:
    """What differs between the model benchmarks.

    ``kinds``/``weights``: the operation kinds and how often each is drawn;
    ``labels``: table label of each kind, of ``"build"`` and of ``"mixed"``;
    ``build_unit``: what one built entry is called (row key
    ``build_ns_per_<build_unit>``); ``size_column``/``sizes_help``: the table
    header and the ``--sizes`` help for n; ``stat_columns``: (row key, header)
    of the extra columns from ``Workload.stats()``; ``note``: the end of the
    table's caption.
    """

    name: str  # of the command: ``harness bench <name>``
    title: str  # start of the table's title, e.g. "IOTLB model"
    description: str  # of the command, for --help
    kinds: tuple[str, ...]
    weights: tuple[int, ...]
    labels: Mapping[str, str]
    build_unit: str
    size_column: str
    sizes_help: str
    workload: Callable[[int, random.Random], Workload]
    stat_columns: tuple[tuple[str, str], ...] = ()
    note: str = ""

    @property
    def build_key(self) -> str:
        return f"build_ns_per_{self.build_unit}"


def measure(bench: Bench, n: int, ops: int, seed: int) -> Row:
    """Build ``bench``'s workload at size ``n`` and time about ``ops``
    operations on it (see the module docstring); the row has no log ratios yet."""
    rng = random.Random(seed * 1_000_003 + n)
    work = bench.workload(n, rng)
    _, build_seconds = timed(work.build)
    factories = work.factories()
    if set(factories) != set(bench.kinds):
        raise TypeError(f"workload kinds {sorted(factories)} != bench kinds {sorted(bench.kinds)}")
    seconds = dict.fromkeys(bench.kinds, 0.0)
    counts = dict.fromkeys(bench.kinds, 0)
    kinds = rng.choices(bench.kinds, weights=bench.weights, k=max(1, ops // BLOCK))
    kinds += [kind for kind in bench.kinds if kind not in kinds]  # measure every kind
    for kind in kinds:
        block = factories[kind]()
        done, spent = timed(block)
        seconds[kind] += spent
        counts[kind] += done
        work.undo()
    work.verify()

    row: Row = {"n": float(n), **work.stats(), bench.build_key: build_seconds / n * 1e9}
    for kind in bench.kinds:
        row[f"{kind}_ops"] = float(counts[kind])
        row[f"{kind}_ns_per_op"] = seconds[kind] / counts[kind] * 1e9
        row[f"{kind}_ops_per_s"] = counts[kind] / seconds[kind]
    total_seconds, total_ops = sum(seconds.values()), sum(counts.values())
    row["mixed_ops"] = float(total_ops)
    row["mixed_ns_per_op"] = total_seconds / total_ops * 1e9
    row["mixed_ops_per_s"] = total_ops / total_seconds
    return row


def add_log_ratios(bench: Bench, rows: list[Row]) -> None:
    """Set ``build_log_ratio`` and ``K_log_ratio`` of every row (in place):
    (ns/op / log2 n) divided by the same in ``rows[0]``."""
    base = rows[0]
    for row in rows:
        scale = math.log2(base["n"]) / math.log2(row["n"])
        row["build_log_ratio"] = row[bench.build_key] / base[bench.build_key] * scale
        for kind in (*bench.kinds, "mixed"):
            key = f"{kind}_ns_per_op"
            row[f"{kind}_log_ratio"] = row[key] / base[key] * scale


def run(
    bench: Bench, sizes: Sequence[int] = DEFAULT_SIZES, ops: int = DEFAULT_OPS, seed: int = 0
) -> list[Row]:
    """Benchmark ``bench`` at each size in ``sizes``; one row per size.

    Each row is a flat dict of floats: ``n``, the ``stat_columns`` keys,
    ``build_ns_per_<build_unit>`` and ``build_log_ratio``, and for each kind K
    in ``bench.kinds`` and ``mixed``: ``K_ops`` (operations timed),
    ``K_ns_per_op``, ``K_ops_per_s`` and ``K_log_ratio`` = (ns/op / log2 n)
    divided by the same in the first row.  Raises ValueError for an empty
    ``sizes``, a size below 2 or ``ops < 1``.
    """
    if not sizes:
        raise ValueError("sizes must not be empty")
    if any(n < 2 for n in sizes):
        raise ValueError(f"every size must be at least 2 (log2 n must be > 0), got {list(sizes)}")
    if ops < 1:
        raise ValueError(f"ops must be positive, got {ops}")
    rows = [measure(bench, n, ops, seed) for n in sizes]
    add_log_ratios(bench, rows)
    return rows


def table(bench: Bench, rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """The header and body cells of the results table: per size a ``build``
    line, one line per kind and a ``mixed`` line."""
    header = [bench.size_column, *(h for _, h in bench.stat_columns),
              "operation", "ns/op", "ops/s", "rel. ns/log2n"]
    body: list[list[str]] = []
    for row in rows:
        build = row[bench.build_key]
        first = [f"{int(row['n']):,}", *(str(int(row[key])) for key, _ in bench.stat_columns)]
        body.append([*first, bench.labels["build"], f"{build:,.0f}", f"{1e9 / build:,.0f}",
                     f"{row['build_log_ratio']:.2f}"])
        blank = [""] * len(first)
        for kind in (*bench.kinds, "mixed"):
            body.append([*blank, bench.labels[kind], f"{row[f'{kind}_ns_per_op']:,.0f}",
                         f"{row[f'{kind}_ops_per_s']:,.0f}", f"{row[f'{kind}_log_ratio']:.2f}"])
    return header, body


def render(title: str, caption: str, header: list[str], body: list[list[str]],
           label_column: int, end_label: str) -> None:
    """Print the table: with ``rich`` if installed (a section ends after each
    line labelled ``end_label``), else as plain aligned text.  The
    ``label_column`` is left-aligned, the others right-aligned."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        print(title)
        print(caption)
        for r in [header, *body]:
            pairs = enumerate(zip(r, widths))
            cells = [c.ljust(w) if i == label_column else c.rjust(w) for i, (c, w) in pairs]
            print("  ".join(cells).rstrip())
        return
    rich_table = Table(title=title, caption=caption)
    for i, h in enumerate(header):
        rich_table.add_column(h, justify="left" if i == label_column else "right", no_wrap=True)
    for r in body:
        rich_table.add_row(*r, end_section=r[label_column] == end_label)
    Console().print(rich_table)


def main(bench: Bench, argv: Sequence[str] | None = None) -> int:
    """``harness bench <name> [--sizes 1000,10000,100000] [--ops N] [--seed S]``:
    run ``bench`` and print a table.  Returns 0 (argparse exits 2 on bad options)."""
    parser = argparse.ArgumentParser(prog=f"harness bench {bench.name}",
                                     description=bench.description)
    parser.add_argument("--sizes", default=",".join(str(n) for n in DEFAULT_SIZES),
                        help=f"comma-separated numbers of {bench.sizes_help} (default: %(default)s)")
    parser.add_argument("--ops", type=int, default=DEFAULT_OPS,
                        help="operations per size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the inputs (default: %(default)s)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        sizes = [int(s.strip().replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes takes comma-separated integers, got {args.sizes!r}")
    try:
        rows = run(bench, sizes, ops=args.ops, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))

    header, body = table(bench, rows)
    title = f"{bench.title}: {args.ops:,} mixed operations per size, seed {args.seed}"
    caption = f"{LOG_CAPTION} {bench.note}".rstrip()
    render(title, caption, header, body, label_column=len(bench.stat_columns) + 1,
           end_label=bench.labels["mixed"])
    return 0
