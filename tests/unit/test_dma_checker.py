"""Tests of harness.checks.vtd on synthetic traces in QEMU 7.2 ``log`` format.

Device 00:02.0 is sid 0x10, device 00:03.0 is sid 0x18, device 00:04.0 is sid 0x20.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from harness.checks import (
    VtdChecker,
    CheckReport,
    check_events,
    check_lines,
    check_trace_file,
)
from harness.trace import parse_lines


def trace(text: str) -> list[str]:
    """The non-blank lines of ``text``, without indentation (line 1 = first one)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def check(text: str, **options: int) -> CheckReport:
    return check_lines(trace(text), **options)


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based number of the ``occurrence``-th line of ``text`` containing ``needle``."""
    seen = 0
    for number, line in enumerate(trace(text), 1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{needle!r} not found")


def kinds(verdict: CheckReport) -> list[str]:
    return [d.kind for d in verdict.divergences]


CLEAN = """
    vtd_dmar_enable enable 1
    vtd_context_cache_reset 
    vtd_switch_address_space Device 00:02.0 switching address space (iommu enabled=1)
    pci_nvme_io_cmd cid 1 nsid 0x1 sqid 1 opc 0x2 opname 'NVME_NVM_CMD_READ'
    pci_nvme_read cid 1 nsid 1 nlb 8 count 4096 lba 0x0
    pci_nvme_map_prp trans_len 4096 len 4096 prp1 0x100000 prp2 0x0 num_prps 1
    vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x100400 slpte 0x3000003 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x3000000 mask 0xfff
    vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x100800 slpte 0x3000003 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x3000000 mask 0xfff
    pci_nvme_rw_cb cid 1 blk 'drive0'
    pci_nvme_enqueue_req_completion cid 1 cqid 1 dw0 0x0 dw1 0x0 status 0x0
    vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x2 addr 0x100000 mask 0x0
    pci_nvme_io_cmd cid 2 nsid 0x1 sqid 1 opc 0x1 opname 'NVME_NVM_CMD_WRITE'
    pci_nvme_write cid 2 opname 'write' nsid 1 nlb 8 count 4096 lba 0x8
    pci_nvme_map_prp trans_len 4096 len 4096 prp1 0x100000 prp2 0x0 num_prps 1
    vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x100000 slpte 0x5000001 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x5000000 mask 0xfff
    vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x100200 slpte 0x5000001 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x5000000 mask 0xfff
    pci_nvme_enqueue_req_completion cid 2 cqid 1 dw0 0x0 dw1 0x0 status 0x0
"""

INVALIDATION = "vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x2 addr 0x100000 mask 0x0"
REMAP_UPDATE = "slpte 0x5000001"
LAST_TRANSLATE = "vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x5000000 mask 0xfff"


def test_clean_sequence_is_ok_and_counted() -> None:
    verdict = check(CLEAN)
    assert verdict.ok, verdict.format()
    c = verdict.counts
    assert c.events_total == 21
    assert c.translations == 4 and c.passthrough == 0
    assert c.iotlb_updates == 2 and c.iotlb_hits == 2
    assert c.invalidations == 1 and c.inv_pages == 1 and c.inv_domain == 0 and c.inv_global == 0
    assert c.resets == 1  # the context-cache reset after DMAR enable (vtd_reset_caches)
    assert c.nvme_commands == 2 and c.nvme_reads == 1 and c.nvme_writes == 1
    assert c.nvme_prp_maps == 2
    assert c.walks_without_translate == 0 and c.unknown_lines == 0 and c.malformed_lines == 0
    assert verdict.total_divergences == 0 and verdict.divergences == [] and verdict.warnings == []
    assert verdict.conclusive and verdict.inconclusive == []
    assert "QEMU VT-d consistency" in verdict.format() and ": OK" in verdict.format()


def test_removed_invalidation_names_the_stale_maps_origin() -> None:
    text = "\n".join(line for line in trace(CLEAN) if INVALIDATION not in line)
    verdict = check(text)
    assert not verdict.ok
    assert kinds(verdict) == ["stale-entry"]
    d = verdict.divergences[0]
    assert d.lineno == line_of(text, REMAP_UPDATE)
    origin = line_of(text, "slpte 0x3000003")
    assert [(role, ln.lineno) for role, ln in d.related] == [("map added", origin)]
    assert f"added at line {origin}" in d.message
    assert d.sid == 0x10 and d.domain == 2 and d.iova == 0x100000
    assert d.expected == 0x3000000 and d.observed == 0x5000000
    # After the walk the model follows QEMU again: no further divergence.
    assert verdict.total_divergences == 1


def test_missed_invalidation_with_unchanged_mapping_is_unexpected_miss() -> None:
    verdict = check(
        """
        vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x100000 slpte 0x3000003 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x3000000 mask 0xfff
        vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x100000 slpte 0x3000003 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x3000000 mask 0xfff
        """
    )
    assert kinds(verdict) == ["unexpected-miss"]
    assert verdict.divergences[0].lineno == 3
    assert verdict.divergences[0].related[0][1].lineno == 1


def test_wrong_gpa_is_wrong_translation_naming_the_line() -> None:
    text = CLEAN.replace(
        LAST_TRANSLATE + "\n    pci_nvme_enqueue_req_completion cid 2",
        LAST_TRANSLATE.replace("gpa 0x5000000", "gpa 0x6000000")
        + "\n    pci_nvme_enqueue_req_completion cid 2",
    )
    assert text != CLEAN
    verdict = check(text)
    assert kinds(verdict) == ["wrong-translation"]
    d = verdict.divergences[0]
    assert d.lineno == line_of(text, "gpa 0x6000000")
    assert d.expected == 0x5000000 and d.observed == 0x6000000
    assert "0x6000000" in d.message and "0x5000000" in d.message
    assert d.related[0][1].lineno == line_of(text, REMAP_UPDATE)


def test_hit_after_invalidation_names_the_invalidation() -> None:
    text = """
        vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x100000 slpte 0x3000003 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x3000000 mask 0xfff
        vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x2 addr 0x100000 mask 0x0
        vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x100000 slpte 0x3000003 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x3000000 mask 0xfff
    """
    verdict = check(text)
    # The hit itself, and the translation it produced.
    assert kinds(verdict) == ["hit-after-invalidation", "translation-without-entry"]
    d = verdict.divergences[0]
    assert d.lineno == 4
    assert d.related[0][0] == "invalidated by" and d.related[0][1].lineno == 3
    assert "line 3" in d.message


def test_hit_mismatch() -> None:
    verdict = check(
        """
        vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x100000 slpte 0x3000003 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x3000000 mask 0xfff
        vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x100000 slpte 0x3000001 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x3000000 mask 0xfff
        """
    )
    assert kinds(verdict) == ["hit-mismatch"]
    assert verdict.divergences[0].lineno == 3


def test_translation_without_any_entry() -> None:
    verdict = check("vtd_dmar_translate dev 00:02.00 iova 0x100000 -> gpa 0x3000000 mask 0xfff")
    assert kinds(verdict) == ["translation-without-entry"]
    assert verdict.divergences[0].observed == 0x3000000


HUGE = """
    vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x203400 slpte 0x40000083 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x200000 -> gpa 0x40000000 mask 0x1fffff
    vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x3ff000 slpte 0x40000083 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x200000 -> gpa 0x40000000 mask 0x1fffff
"""


def test_2mib_pages() -> None:
    verdict = check(HUGE)
    assert verdict.ok, verdict.format()
    assert verdict.counts.translations == 2


def test_4k_invalidation_inside_a_2mib_page_drops_the_whole_page() -> None:
    text = HUGE + """
    vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x2 addr 0x3ff000 mask 0x0
    vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x200000 slpte 0x40000083 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x200000 -> gpa 0x40000000 mask 0x1fffff
    """
    verdict = check(text)
    assert kinds(verdict)[0] == "hit-after-invalidation"
    assert verdict.divergences[0].related[0][1].lineno == 5


def test_2mib_invalidation_then_4k_remap() -> None:
    text = HUGE + """
    vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x2 addr 0x200000 mask 0x9
    vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x201000 slpte 0x7000003 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x201000 -> gpa 0x7000000 mask 0xfff
    vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x201fff slpte 0x7000003 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x201000 -> gpa 0x7000000 mask 0xfff
    """
    verdict = check(text)
    assert verdict.ok, verdict.format()


def test_2mib_page_wrong_offset_is_reported() -> None:
    text = HUGE + """
    vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x200000 slpte 0x40000083 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x200000 -> gpa 0x40200000 mask 0x1fffff
    """
    verdict = check(text)
    assert kinds(verdict) == ["wrong-translation"]
    assert verdict.divergences[0].expected == 0x40000000


DOMAINS = """
    vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1000 slpte 0x11000003 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x1000 -> gpa 0x11000000 mask 0xfff
    vtd_iotlb_page_update IOTLB page update sid 0x18 iova 0x1000 slpte 0x12000003 domain 0x2
    vtd_dmar_translate dev 00:03.00 iova 0x1000 -> gpa 0x12000000 mask 0xfff
    vtd_iotlb_page_update IOTLB page update sid 0x20 iova 0x1000 slpte 0x13000003 domain 0x3
    vtd_dmar_translate dev 00:04.00 iova 0x1000 -> gpa 0x13000000 mask 0xfff
"""

HITS = """
    vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x1000 slpte 0x11000003 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x1000 -> gpa 0x11000000 mask 0xfff
    vtd_iotlb_page_hit IOTLB page hit sid 0x18 iova 0x1000 slpte 0x12000003 domain 0x2
    vtd_dmar_translate dev 00:03.00 iova 0x1000 -> gpa 0x12000000 mask 0xfff
    vtd_iotlb_page_hit IOTLB page hit sid 0x20 iova 0x1000 slpte 0x13000003 domain 0x3
    vtd_dmar_translate dev 00:04.00 iova 0x1000 -> gpa 0x13000000 mask 0xfff
"""


def test_page_invalidation_hits_every_sid_of_the_domain_only() -> None:
    inv = "    vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x2 addr 0x1000 mask 0x0\n"
    verdict = check(DOMAINS + inv + HITS)
    assert [(d.kind, d.sid) for d in verdict.divergences] == [
        ("hit-after-invalidation", 0x10),
        ("translation-without-entry", 0x10),
        ("hit-after-invalidation", 0x18),
        ("translation-without-entry", 0x18),
    ]


def test_domain_invalidation() -> None:
    inv = "    vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x2\n"
    verdict = check(DOMAINS + inv + HITS)
    assert [d.sid for d in verdict.divergences if d.kind == "hit-after-invalidation"] == [0x10, 0x18]
    assert all(
        d.related[0] == ("invalidated by", d.related[0][1]) and d.related[0][1].lineno == 7
        for d in verdict.divergences
        if d.kind == "hit-after-invalidation"
    )
    assert verdict.counts.inv_domain == 1 and verdict.counts.invalidations == 1
    # Domain 3 (sid 0x20) is untouched by it.
    assert all(d.sid != 0x20 for d in verdict.divergences)


@pytest.mark.parametrize(
    "reset",
    [
        "vtd_inv_desc_iotlb_global iotlb invalidate global",
        "vtd_iotlb_reset IOTLB reset (reason: iotlb exceeds size limit)",
        "vtd_context_cache_reset ",
    ],
)
def test_global_invalidation_and_resets_drop_everything(reset: str) -> None:
    verdict = check(DOMAINS + "    " + reset + "\n" + HITS)
    assert [d.kind for d in verdict.divergences].count("hit-after-invalidation") == 3
    assert all(
        d.related[0][1].lineno == 7 for d in verdict.divergences if d.kind == "hit-after-invalidation"
    )


def test_context_reset_after_cc_global_is_context_only() -> None:
    text = (
        DOMAINS
        + "    vtd_inv_desc_cc_global context invalidate globally\n"
        + "    vtd_context_cache_reset \n"
        + HITS
    )
    verdict = check(text)
    assert verdict.ok, verdict.format()
    assert verdict.counts.resets == 0 and verdict.counts.context_invalidations == 1


def test_context_reset_rule_only_looks_at_the_immediately_preceding_vtd_event() -> None:
    # An NVMe event in between does not matter; a vtd event in between does.
    between_nvme = (
        DOMAINS
        + "    vtd_inv_desc_cc_global context invalidate globally\n"
        + "    pci_nvme_rw_cb cid 1 blk 'drive0'\n"
        + "    vtd_context_cache_reset \n"
        + HITS
    )
    assert check(between_nvme).ok
    between_vtd = (
        DOMAINS
        + "    vtd_inv_desc_cc_global context invalidate globally\n"
        + "    vtd_dmar_enable enable 1\n"
        + "    vtd_context_cache_reset \n"
        + HITS
    )
    verdict = check(between_vtd)
    assert not verdict.ok and verdict.counts.resets == 1


def test_reset_between_walk_and_translate_keeps_the_walk() -> None:
    # vtd_update_iotlb traces the update, then the size-limit reset, then inserts.
    verdict = check(
        """
        vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1000 slpte 0x11000003 domain 0x2
        vtd_iotlb_reset IOTLB reset (reason: iotlb exceeds size limit)
        vtd_dmar_translate dev 00:02.00 iova 0x1000 -> gpa 0x11000000 mask 0xfff
        vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x1000 slpte 0x11000003 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x1000 -> gpa 0x11000000 mask 0xfff
        """
    )
    assert verdict.ok, verdict.format()
    assert verdict.counts.resets == 1


def test_passthrough() -> None:
    ok = check(
        """
        vtd_translate_pt source id 0x10, iova 0x7000
        vtd_dmar_translate dev 00:02.00 iova 0x7000 -> gpa 0x7000 mask 0xfff
        """
    )
    assert ok.ok and ok.counts.passthrough == 1 and ok.counts.translations == 1
    bad = check(
        """
        vtd_translate_pt source id 0x10, iova 0x7000
        vtd_dmar_translate dev 00:02.00 iova 0x7000 -> gpa 0x8000 mask 0xfff
        """
    )
    assert kinds(bad) == ["passthrough-mismatch"]
    assert bad.divergences[0].lineno == 2 and bad.divergences[0].related[0][1].lineno == 1


def test_dmar_disabled_is_identity() -> None:
    verdict = check(
        """
        vtd_dmar_enable enable 0
        vtd_context_cache_reset 
        vtd_dmar_translate dev 00:02.00 iova 0x7000 -> gpa 0x7000 mask 0xfff
        vtd_dmar_translate dev 00:02.00 iova 0x8000 -> gpa 0x9000 mask 0xfff
        """
    )
    assert kinds(verdict) == ["passthrough-mismatch"]
    assert verdict.counts.passthrough == 2


def test_fault_on_live_entry() -> None:
    base = """
        vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1000 slpte 0x11000003 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x1000 -> gpa 0x11000000 mask 0xfff
        vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x2000 slpte 0x12000001 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x2000 -> gpa 0x12000000 mask 0xfff
    """
    verdict = check(base + "    vtd_dmar_fault sid 0x10 fault 5 addr 0x1008 write 1\n")
    assert kinds(verdict) == ["fault-on-live-entry"]
    d = verdict.divergences[0]
    assert d.lineno == 5 and d.related[0][1].lineno == 1 and "write" in d.message
    # A write to a read-only entry, or to an unmapped page, is a legitimate fault.
    legit = check(
        base
        + "    vtd_dmar_fault sid 0x10 fault 5 addr 0x2008 write 1\n"
        + "    vtd_dmar_fault sid 0x10 fault 6 addr 0x3000 write 0\n"
        + "    vtd_dmar_fault sid 0x18 fault 6 addr 0x1000 write 0\n"
    )
    assert legit.ok and legit.counts.faults == 3


def test_divergence_context_lines() -> None:
    filler = "".join(
        f"    pci_nvme_rw_cb cid {i} blk 'drive0'\n" for i in range(12)
    )
    text = (
        filler
        + "    vtd_dmar_translate dev 00:02.00 iova 0x1000 -> gpa 0x11000000 mask 0xfff\n"
        + filler
    )
    verdict = check(text)
    d = verdict.divergences[0]
    assert d.lineno == 13
    assert [ln.lineno for ln in d.before] == list(range(5, 13))
    assert [ln.lineno for ln in d.after] == list(range(14, 22))
    assert d.before[-1].raw == "pci_nvme_rw_cb cid 11 blk 'drive0'"
    report = verdict.format()
    assert ">       13 | vtd_dmar_translate" in report
    assert "         5 | pci_nvme_rw_cb cid 4" in report
    assert "        21 | pci_nvme_rw_cb cid 7" in report
    assert "        22 |" not in report
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["ok"] is False and data["total_divergences"] == 1
    assert data["divergences"][0]["kind"] == "translation-without-entry"
    assert [x["lineno"] for x in data["divergences"][0]["after"]] == list(range(14, 22))
    assert data["counts"]["translations"] == 1


def test_context_after_is_partial_at_end_of_trace() -> None:
    verdict = check(
        """
        pci_nvme_rw_cb cid 1 blk 'drive0'
        vtd_dmar_translate dev 00:02.00 iova 0x1000 -> gpa 0x11000000 mask 0xfff
        pci_nvme_rw_cb cid 2 blk 'drive0'
        """
    )
    d = verdict.divergences[0]
    assert [ln.lineno for ln in d.before] == [1] and [ln.lineno for ln in d.after] == [3]


def test_divergences_are_bounded_but_all_counted() -> None:
    lines = [
        f"vtd_dmar_translate dev 00:02.00 iova 0x{i:x}000 -> gpa 0x{i:x}000 mask 0xfff"
        for i in range(1, 101)
    ]
    verdict = check_lines(lines, max_divergences=5, context=2)
    assert verdict.total_divergences == 100 and len(verdict.divergences) == 5
    assert verdict.divergences_by_kind == {"translation-without-entry": 100}
    assert all(len(d.before) <= 2 and len(d.after) <= 2 for d in verdict.divergences)


def test_walk_without_translate_is_counted_and_warned() -> None:
    verdict = check(
        "vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1000 slpte 0x11000003 domain 0x2"
    )
    assert verdict.ok
    assert verdict.counts.walks_without_translate == 1
    assert any("never got" in w for w in verdict.warnings)


def test_unknown_and_malformed_lines_are_counted() -> None:
    verdict = check(
        CLEAN
        + """
    qemu-system-x86_64: warning: something
    vtd_reg_write addr 0x88 size 0x4 value 0x0
    vtd_dmar_translate dev 00:02.00 iova broken
    """
    )
    assert verdict.ok
    assert verdict.counts.unknown_lines == 2 and verdict.counts.malformed_lines == 1
    # A vtd_* line that does not parse is evidence the checker depends on: no verdict without it.
    assert not verdict.conclusive and verdict.status == "inconclusive"
    assert any("1 vtd_* lines could not be parsed" in r and "iova broken" in r for r in verdict.inconclusive)


def test_nothing_checked_is_inconclusive_never_ok() -> None:
    empty = check_lines([])
    assert empty.status == "inconclusive" and empty.inconclusive == ["the host trace is empty"]
    no_dma = check("pci_nvme_read cid 1 nsid 1 nlb 8 count 4096 lba 0x0")
    assert no_dma.status == "inconclusive"
    assert "no vtd_dmar_translate event" in no_dma.inconclusive[0]


def test_all_vtd_lines_unparseable_is_inconclusive() -> None:
    """A newer QEMU whose vtd_* formats the parser does not know must not pass."""
    lines = [line.replace(" iova ", " IOVA=") if line.startswith("vtd_") else line for line in trace(CLEAN)]
    verdict = check_lines(lines)
    assert verdict.ok and verdict.status == "inconclusive", verdict.format()


def test_out_of_range_values_do_not_raise() -> None:
    verdict = check(
        """
        vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1ffffffffffffffffff slpte 0x3 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x1ffffffffffffffffff -> gpa 0x0 mask 0xfff
        vtd_dmar_fault sid 0x10 fault 5 addr 0x1ffffffffffffffffff write 1
        """
    )
    assert isinstance(verdict, CheckReport)


def test_timestamped_trace_and_file_api(tmp_path: Path) -> None:
    stamped = "\n".join(f"1234@1700000000.{i:06d}:{line}" for i, line in enumerate(trace(CLEAN)))
    path = tmp_path / "trace.log"
    path.write_text(stamped + "\n")
    verdict = check_trace_file(path)
    assert verdict.ok and verdict.counts.translations == 4
    packed = tmp_path / "trace.log.gz"
    with gzip.open(packed, "wt") as fh:
        fh.write(stamped + "\n")
    assert check_trace_file(packed).to_dict() == verdict.to_dict()


def test_incremental_feed_equals_check_events() -> None:
    checker = VtdChecker()
    for event in parse_lines(trace(CLEAN)):
        checker.feed(event)
    verdict = checker.finish()
    assert verdict is checker.finish()
    assert verdict.to_dict() == check_events(parse_lines(trace(CLEAN))).to_dict()
    with pytest.raises(RuntimeError):
        checker.feed(next(iter(parse_lines(trace(CLEAN)))))


def test_interleaved_threads_hit_before_the_walks_translate() -> None:
    # Thread A walks; thread B hits the fresh entry before A's translate is printed.
    verdict = check(
        """
        vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x1000 slpte 0x11000003 domain 0x2
        vtd_iotlb_page_hit IOTLB page hit sid 0x10 iova 0x1800 slpte 0x11000003 domain 0x2
        vtd_dmar_translate dev 00:02.00 iova 0x1000 -> gpa 0x11000000 mask 0xfff
        vtd_dmar_translate dev 00:02.00 iova 0x1000 -> gpa 0x11000000 mask 0xfff
        """
    )
    assert verdict.ok, verdict.format()
    assert verdict.counts.walks_without_translate == 0


# ---- block DMA direction (dma-helpers) ---------------------------------------

DMA_READ_INTO_RO = """
    vtd_dmar_enable enable 1
    pci_nvme_read cid 1 nsid 1 nlb 8 count 4096 lba 0x0
    dma_blk_io dbs=0x55aa00 bs=0x55bb00 offset=0 to_dev=0
    dma_blk_cb dbs=0x55aa00 ret=0
    vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x200000 slpte 0x4000001 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x200000 -> gpa 0x4000000 mask 0xfff
    pci_nvme_map_prp trans_len 4096 len 4096 prp1 0x300000 prp2 0x0 num_prps 1
    vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x300000 slpte 0x5000001 domain 0x2
    vtd_dmar_translate dev 00:02.00 iova 0x300000 -> gpa 0x5000000 mask 0xfff
    dma_blk_cb dbs=0x55aa00 ret=0
    dma_complete dbs=0x55aa00 ret=0 cb=(nil)
"""


def test_device_write_through_read_only_map_in_a_disk_read():
    v = check(DMA_READ_INTO_RO)
    assert kinds(v) == ["dma-permission"], v.format()
    d = v.divergences[0]
    assert d.lineno == line_of(DMA_READ_INTO_RO, "iova 0x200000 -> gpa")
    assert "write guest memory" in d.message and "to_dev=0" in d.message
    # The second translation comes after a non-IOMMU event: outside the mapping loop.
    assert v.counts.dma_requests == 1 and v.counts.dma_mappings_checked == 1


def test_disk_write_needs_only_read_permission():
    text = DMA_READ_INTO_RO.replace("to_dev=0", "to_dev=1")
    v = check(text)
    assert v.ok, v.format()
    assert v.counts.dma_mappings_checked == 1


def test_completed_request_opens_no_window():
    text = DMA_READ_INTO_RO.replace("dma_blk_cb dbs=0x55aa00 ret=0\n    vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x200000",
                                    "dma_complete dbs=0x55aa00 ret=0 cb=(nil)\n    dma_blk_cb dbs=0x55aa00 ret=0\n    vtd_iotlb_page_update IOTLB page update sid 0x10 iova 0x200000")
    v = check(text)
    assert v.ok and v.counts.dma_mappings_checked == 0, v.format()
