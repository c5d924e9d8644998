"""The DMA checker on event streams recorded from real runs (QEMU 7.2 TCG, q35 +
intel-iommu + NVMe, Linux 6.12 with intel_iommu=on iommu.strict=1, O_DIRECT pattern
I/O; ``python -m harness run configs/intel-iommu-nvme{,-nocm}.toml --keep-artifacts``),
as recorded and with one event tampered.

With caching-mode=on the guest also invalidates every IOVA range when it maps it, so
dropping one unmap-time invalidation is masked by the next map-time one and changes
nothing the device could observe; the removed-invalidation tests therefore use the
caching-mode=off recording, where the unmap-time invalidation is the only one."""

import lzma
import re
from pathlib import Path

import pytest

from harness.checks.vtd import check_events, check_lines
from harness.trace import parse_line

DATA = Path(__file__).resolve().parents[1] / "data"
RECORDINGS = {"cm": DATA / "intel-iommu-nvme-qemu7.2.trace.xz",
              "nocm": DATA / "intel-iommu-nvme-nocm-qemu7.2.trace.xz"}


def load(name: str) -> list[str]:
    return lzma.decompress(RECORDINGS[name].read_bytes()).decode().splitlines()


@pytest.fixture(scope="module", params=sorted(RECORDINGS))
def recording(request) -> list[str]:
    return load(request.param)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return load("nocm")


def numbered(lines: list[str]) -> list[tuple[int, str]]:
    return list(enumerate(lines, start=1))


def check_numbered(pairs):
    """Check keeping the recorded line numbers even when lines were removed."""
    return check_events(parse_line(text, n) for n, text in pairs)


def test_recorded_run_agrees_with_the_model(recording):
    verdict = check_lines(recording)
    c = verdict.counts
    assert verdict.ok, verdict.format()
    assert c.translations > 1000 and c.iotlb_updates > 500 and c.iotlb_hits > 500
    assert c.inv_pages > 50 and c.nvme_reads > 0 and c.nvme_writes > 0
    assert c.unknown_lines == 0 and c.malformed_lines == 0


_UPDATE = re.compile(r"^vtd_iotlb_page_(update|hit) .* iova (0x[0-9a-f]+) .* domain (0x[0-9a-f]+)")
_INV = re.compile(r"^vtd_inv_desc_iotlb_pages .* domain (0x[0-9a-f]+) addr (0x[0-9a-f]+) mask (0x[0-9a-f]+)")
_FLUSH_ALL = ("vtd_inv_desc_iotlb_global", "vtd_iotlb_reset", "vtd_context_cache_reset")


def find_effective_invalidation(lines):
    """A deliberately naive oracle (4 KiB pages in a dict; not the checker's model):
    the first page invalidation that removed a cached page which the device then used
    again. Returns (invalidation line, line that cached the page, line that reused it)."""
    live: dict[tuple[int, int], int] = {}      # (domain, page) -> line that cached it
    removed: dict[tuple[int, int], tuple[int, int]] = {}  # page -> (inv line, cached line)
    for n, text in enumerate(lines, start=1):
        if text.startswith(_FLUSH_ALL) or text.startswith("vtd_inv_desc_iotlb_domain"):
            live.clear()
            removed.clear()
        elif m := _INV.match(text):
            dom, addr, am = (int(x, 16) for x in m.groups())
            first = (addr >> 12) & ~((1 << am) - 1)
            for page in range(first, first + (1 << am)):
                key = (dom, page)
                if key in live:
                    removed[key] = (n, live.pop(key))
                else:
                    removed.pop(key, None)
        elif m := _UPDATE.match(text):
            kind, iova, dom = m.group(1), int(m.group(2), 16), int(m.group(3), 16)
            key = (dom, iova >> 12)
            if key in removed:
                inv_line, cached_line = removed[key]
                return inv_line, cached_line, n
            if kind == "update":
                live[key] = n
    raise AssertionError("the recording has no invalidation of a page that was used again")


def test_removed_invalidation_is_reported_at_the_reuse(lines):
    inv_line, cached_line, reuse_line = find_effective_invalidation(lines)
    tampered = [(n, t) for n, t in numbered(lines) if n != inv_line]
    verdict = check_numbered(tampered)
    assert not verdict.ok
    first = verdict.divergences[0]
    assert first.lineno == reuse_line, first.format()
    assert first.kind in ("stale-entry", "unexpected-miss"), first.format()
    assert ("map added", cached_line) in [(role, tl.lineno) for role, tl in first.related], first.format()
    assert f"{reuse_line}" in verdict.format()


def test_translation_to_the_wrong_address_is_named(lines):
    enabled = next(n for n, t in numbered(lines) if t.startswith("vtd_dmar_enable enable 1"))
    target = next(n for n, t in numbered(lines) if n > enabled and t.startswith("vtd_dmar_translate"))
    m = re.search(r"-> gpa (0x[0-9a-f]+)", lines[target - 1])
    assert m
    good = int(m.group(1), 16)
    bad = good ^ 0x200000
    tampered = numbered(lines)
    tampered[target - 1] = (target, lines[target - 1].replace(m.group(0), f"-> gpa {bad:#x}"))
    verdict = check_numbered(tampered)
    assert not verdict.ok
    first = verdict.divergences[0]
    assert (first.kind, first.lineno) == ("wrong-translation", target), first.format()
    assert (first.expected, first.observed) == (good, bad)
    assert verdict.total_divergences == 1, verdict.format()


def find_hit_then_invalidation(lines):
    """Naive oracle again: (hit line, invalidation line) for the first page invalidation
    that removed a cached page which had been hit since it was cached."""
    live: dict[tuple[int, int], int | None] = {}  # (domain, page) -> last hit line
    for n, text in enumerate(lines, start=1):
        if text.startswith(_FLUSH_ALL) or text.startswith("vtd_inv_desc_iotlb_domain"):
            live.clear()
        elif m := _INV.match(text):
            dom, addr, am = (int(x, 16) for x in m.groups())
            first = (addr >> 12) & ~((1 << am) - 1)
            for page in range(first, first + (1 << am)):
                hit = live.pop((dom, page), None)
                if hit is not None:
                    return hit, n
        elif m := _UPDATE.match(text):
            kind, iova, dom = m.group(1), int(m.group(2), 16), int(m.group(3), 16)
            if kind == "update":
                live[(dom, iova >> 12)] = None
            elif (dom, iova >> 12) in live:
                live[(dom, iova >> 12)] = n
    raise AssertionError("no cached page was hit and then invalidated")


def test_hit_on_an_invalidated_entry_is_reported(recording):
    """Move a hit (and its translate) to just after the invalidation that removed its
    entry: QEMU would have served a translation from an invalidated entry."""
    hit, inv = find_hit_then_invalidation(recording)
    assert recording[hit].startswith("vtd_dmar_translate")
    pairs = [(n, t) for n, t in numbered(recording) if n not in (hit, hit + 1)]
    at = next(i for i, (n, _) in enumerate(pairs) if n == inv) + 1
    pairs[at:at] = [(hit, recording[hit - 1]), (hit + 1, recording[hit])]
    verdict = check_numbered(pairs)
    first = verdict.divergences[0]
    assert (first.kind, first.lineno) == ("hit-after-invalidation", hit), verdict.format()
    assert ("invalidated by", inv) in [(role, tl.lineno) for role, tl in first.related], first.format()


def test_device_writing_through_a_read_only_map_is_reported(recording):
    """Turn the page a disk read (dma_blk_io to_dev=0: the device writes guest memory)
    maps into a read-only map, in every walk and hit of it until its invalidation."""
    io = next(n for n, t in numbered(recording) if t.startswith("dma_blk_io") and t.endswith("to_dev=0"))
    walk = next(n for n, t in numbered(recording) if n > io and t.startswith("vtd_iotlb_page_update"))
    m = _UPDATE.match(recording[walk - 1])
    assert m and recording[walk].startswith("vtd_dmar_translate")
    page, dom = int(m.group(2), 16) >> 12, int(m.group(3), 16)
    tampered = numbered(recording)
    for i in range(walk - 1, len(recording)):
        text = recording[i]
        inv = _INV.match(text)
        if inv and int(inv.group(1), 16) == dom:
            first = (int(inv.group(2), 16) >> 12) & ~((1 << int(inv.group(3), 16)) - 1)
            if first <= page < first + (1 << int(inv.group(3), 16)):
                break
        u = _UPDATE.match(text)
        if u and int(u.group(2), 16) >> 12 == page:
            tampered[i] = (i + 1, re.sub(r"(slpte 0x[0-9a-f]*)[0-9a-f]( )", r"\g<1>1\2", text))
    verdict = check_numbered(tampered)
    first = verdict.divergences[0]
    assert (first.kind, first.lineno) == ("dma-permission", walk + 1), verdict.format()
    assert ("dma request", io) in [(role, tl.lineno) for role, tl in first.related]
    assert set(verdict.divergences_by_kind) == {"dma-permission"}, verdict.format()


def test_recorded_runs_check_block_dma_direction(recording):
    c = check_lines(recording).counts
    assert c.dma_requests == c.nvme_commands > 0
    assert c.dma_mappings_checked >= 16 * c.dma_requests  # 64 KiB requests: 16 pages each
