"""The pure parts of ``bench boot``: summaries, the overhead ratio, the floor's
marker and its initramfs."""

from __future__ import annotations

import io
import stat

import pytest

from harness.bench.boot import (
    BootSummary,
    overhead_ratio,
    parse_loadavg,
    summarize,
    verdict_line,
)
from harness.images.busybox import FLOOR_INIT, FLOOR_MARKER, floor_key, marker_uptime, write_floor_cpio


def test_summarize_median_min_max() -> None:
    s = summarize([6.5, 7.1, 6.8, 6.6, 7.0])
    assert (s.median, s.min, s.max, s.n) == (6.8, 6.5, 7.1, 5)
    assert summarize([3.0, 5.0]).median == 4.0


@pytest.mark.parametrize("bad", [[], [1.0, 0.0], [-2.0]])
def test_summarize_refuses_no_or_nonpositive_times(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        summarize(bad)


def test_overhead_ratio_is_median_over_floor_median() -> None:
    harness = summarize([4.0, 4.2, 9.0])  # median 4.2: the outlier does not count
    floor = summarize([3.0, 3.1, 2.9])
    assert overhead_ratio(harness, floor) == pytest.approx(4.2 / 3.0)


def test_verdict_line_names_each_target() -> None:
    ok = verdict_line(BootSummary(3.9, 3.5, 4.1, 5), BootSummary(3.0, 2.9, 3.2, 5))
    assert ok == "targets: median 3.90s <= 4.0s, overhead 1.30x <= 1.4x"
    bad = verdict_line(BootSummary(6.8, 6.5, 7.1, 5), BootSummary(3.0, 2.9, 3.2, 5))
    assert bad == "targets: median 6.80s > 4.0s, overhead 2.27x > 1.4x"
    assert verdict_line(BootSummary(4.0, 4.0, 4.0, 1), None) == "targets: median 4.00s <= 4.0s"


def test_parse_loadavg() -> None:
    assert parse_loadavg("1.40 2.53 2.98 3/321 4567\n") == (1.40, 2.53, 2.98)
    with pytest.raises(ValueError):
        parse_loadavg("1.0\n")


def test_marker_uptime_waits_for_the_whole_marker() -> None:
    console = "[    2.1] Run /init as init process\n"
    assert marker_uptime(console) is None
    assert marker_uptime(console + f"{FLOOR_MARKER} 2.7") is None  # still being written
    assert marker_uptime(console + f"{FLOOR_MARKER} 2.73s upt") is None
    assert marker_uptime(console + f"{FLOOR_MARKER} 2.73s uptime\r\n") == 2.73
    assert marker_uptime(f"junk {FLOOR_MARKER} 3s uptime\n") == 3.0


def test_floor_init_prints_the_marker_marker_uptime_reads() -> None:
    # The shell line of /init, with ${up} as the kernel would give it.
    echo = next(ln for ln in FLOOR_INIT.splitlines() if FLOOR_MARKER in ln)
    printed = echo.split('"')[1].replace("${up}", "2.50") + "\n"
    assert marker_uptime(printed) == 2.5
    assert "poweroff -f" in FLOOR_INIT


def _entries(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    out = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = f[1], f[6], (f[9], f[10]), f[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, rdev)


def test_floor_cpio_has_busybox_init_and_console() -> None:
    elf = b"\x7fELF" + b"\0" * 61
    buf = io.BytesIO()
    write_floor_cpio(buf, elf)
    entries = _entries(buf.getvalue())
    mode, body, _ = entries["bin/busybox"]
    assert stat.S_ISREG(mode) and mode & 0o111 and body == elf
    mode, body, _ = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o100 and body == FLOOR_INIT.encode()
    mode, _, rdev = entries["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    assert stat.S_ISDIR(entries["proc"][0])


def test_floor_cpio_refuses_a_non_elf() -> None:
    with pytest.raises(ValueError):
        write_floor_cpio(io.BytesIO(), b"#!/bin/sh\n")


def test_floor_key_is_stable_and_follows_init(monkeypatch: pytest.MonkeyPatch) -> None:
    key = floor_key()
    assert key == floor_key() and len(key) == 16
    import harness.images.busybox as bb
    monkeypatch.setattr(bb, "FLOOR_INIT", FLOOR_INIT + "# changed\n")
    assert bb.floor_key() != key
