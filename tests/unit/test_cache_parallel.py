"""The image cache shared by several processes at once (pytest-xdist workers, two
checkouts): the per-entry lock, one build for many askers, and a prune that never
removes an entry a live process holds (harness.images.cache)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.images.cache import ImageCache

HOLDER = """
import sys
from harness.images.cache import ImageCache
cache = ImageCache(sys.argv[1])
{body}
print("ready", flush=True)
sys.stdin.readline()
"""


def _holder(root: Path, body: str) -> subprocess.Popen[str]:
    """A child process that runs ``body`` (with ``cache`` bound), prints ``ready`` and
    keeps what it took until its stdin gets a line."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(body=body), str(root)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(timeout=60)
    assert proc.returncode == 0


def test_the_entry_lock_is_taken_by_one_process_at_a_time(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    child = _holder(tmp_path, "lock = cache.lock('kernel', 'k1'); lock.__enter__()")
    got = threading.Event()

    def take() -> None:
        with cache.lock("kernel", "k1"):
            got.set()

    taker = threading.Thread(target=take)
    try:
        taker.start()
        assert not got.wait(1.0), "two processes held the same entry lock"
        with cache.lock("kernel", "other"):  # other entries are not blocked
            pass
        _release(child)
        assert got.wait(30), "the lock was not handed over when its holder let go"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        taker.join(30)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    child = _holder(tmp_path, "lock = cache.lock('rootfs', 'k1'); lock.__enter__()")
    child.kill()
    child.wait()
    with cache.lock("rootfs", "k1"):  # flock dies with its process
        pass


ENSURE = """
import os, sys, time
from harness.images.cache import ImageCache
cache = ImageCache(sys.argv[1])
with cache.lock("kernel", "k1"):
    if not cache.complete("kernel", "k1"):
        with open(os.path.join(sys.argv[1], "builds"), "a") as log:
            log.write(f"{os.getpid()}\\n")
        with cache.building("kernel", "k1") as out:
            (out / "bzImage").write_bytes(b"half")
            time.sleep(0.5)
            (out / "bzImage").write_bytes(b"kernel " * 1000)
            (out / "manifest.json").write_text("{}")
print((cache.entry("kernel", "k1") / "bzImage").read_bytes() == b"kernel " * 1000)
"""


def test_many_askers_for_a_missing_entry_get_one_build(tmp_path: Path) -> None:
    """Four processes ask for the same missing entry, as ensure_kernel/ensure_initrd do
    (lock, check, build): one builds, the others wait and get the finished entry."""
    procs = [subprocess.Popen([sys.executable, "-c", ENSURE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["True"] * 4
    assert len((tmp_path / "builds").read_text().split()) == 1
    assert sorted(p.name for p in (tmp_path / "kernel").iterdir()) == ["k1", "k1.lock"]


def _entries(cache: ImageCache, n: int) -> None:
    for i in range(n):
        with cache.building("initrd", f"k{i}") as d:
            (d / "initrd.cpio").write_bytes(b"x")
            (d / "manifest.json").write_text("{}")
        os.utime(cache.entry("initrd", f"k{i}") / "manifest.json", (1000 + i, 1000 + i))


def _names(cache: ImageCache) -> list[str]:
    return sorted(p.name for p in cache.path("initrd").iterdir() if p.is_dir())


def test_prune_keeps_the_newest_and_every_held_entry(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    _entries(cache, 6)
    child = _holder(tmp_path, "hold = cache.hold('initrd', 'k0'); assert hold is not None")
    try:
        os.utime(cache.entry("initrd", "k0") / "manifest.json", (900, 900))  # oldest, but held
        removed = cache.prune("initrd", keep=2)
        assert sorted(p.name for p in removed) == ["k1", "k2", "k3"]
        assert _names(cache) == ["k0", "k4", "k5"]
    finally:
        _release(child)
    assert [p.name for p in cache.prune("initrd", keep=2)] == ["k0"]  # released: old again
    assert _names(cache) == ["k4", "k5"]


def test_hold_marks_the_entry_as_just_used(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    _entries(cache, 3)
    with cache.hold("initrd", "k0") as hold:
        assert hold is not None and hold.entry == cache.entry("initrd", "k0")
        assert (cache.entry("initrd", "k0") / "manifest.json").stat().st_mtime > time.time() - 60
        os.utime(cache.entry("initrd", "k0") / "manifest.json", (900, 900))
        hold.touch()
        assert (cache.entry("initrd", "k0") / "manifest.json").stat().st_mtime > time.time() - 60
        assert cache.prune("initrd", keep=2) == [cache.entry("initrd", "k1")]  # k0 counts as newest
    assert _names(cache) == ["k0", "k2"]


def test_hold_of_a_missing_or_pruned_entry_is_none(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    assert cache.hold("initrd", "nope") is None
    _entries(cache, 2)
    assert cache.prune("initrd", keep=1) == [cache.entry("initrd", "k0")]
    assert cache.hold("initrd", "k0") is None
    assert cache.prune("initrd", keep=0) == [cache.entry("initrd", "k1")]
    assert cache.prune("initrd", keep=0) == [] and _names(cache) == []


def test_prune_leaves_entries_being_built_alone(tmp_path: Path) -> None:
    """A NAME.tmp-PID folder whose manifest is written but not yet renamed into place."""
    cache = ImageCache(tmp_path)
    _entries(cache, 1)
    with cache.building("initrd", "k9") as d:
        (d / "manifest.json").write_text("{}")
        os.utime(d / "manifest.json", (500, 500))
        assert cache.prune("initrd", keep=0) == [cache.entry("initrd", "k0")]
        assert d.is_dir()
    assert cache.complete("initrd", "k9")


@pytest.mark.parametrize("rounds", [30])
def test_concurrent_holds_and_prunes_never_lose_a_held_entry(tmp_path: Path, rounds: int) -> None:
    """Two processes prune with keep=0 in a loop while this one takes and checks holds:
    every hold it gets is on an entry whose file is still there."""
    cache = ImageCache(tmp_path)
    _entries(cache, 1)
    code = ("import sys, time\nfrom harness.images.cache import ImageCache\n"
            "c = ImageCache(sys.argv[1])\nend = time.monotonic() + 3\n"
            "while time.monotonic() < end:\n    c.prune('initrd', keep=0)\n")
    pruners = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(2)]
    try:
        got = 0
        for i in range(rounds):
            with cache.building("initrd", f"r{i}") as d:
                (d / "initrd.cpio").write_bytes(b"x")
                (d / "manifest.json").write_text("{}")
            hold = cache.hold("initrd", f"r{i}")
            if hold is None:
                continue  # pruned before we held it: a caller builds it again
            with hold:
                got += 1
                time.sleep(0.02)
                assert (cache.entry("initrd", f"r{i}") / "initrd.cpio").read_bytes() == b"x"
    finally:
        for p in pruners:
            p.wait(timeout=60)
    assert got > 0
