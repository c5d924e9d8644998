"""The virtio-iommu checker and guest-intent under virtio-iommu, on a recorded
run (tests/data/virtio-iommu-nvme-run: QEMU 7.2 + Linux 6.12, NVMe O_DIRECT
pattern I/O behind virtio-iommu-pci) and on divergences planted in it or in
small streams."""

from __future__ import annotations

import lzma
import re
from pathlib import Path

import pytest

from harness.checks.guest_intent import GUEST_PERMISSION, GUEST_WRONG_TRANSLATION, USE_AFTER_UNMAP
from harness.checks.virtio_iommu import (
    MAP_ACCEPTED,
    MISSING_TRANSLATION,
    PERMISSION,
    SPEC_VIOLATION,
    TRANSLATION_WITHOUT_MAPPING,
    UNMAP_INCOMPLETE,
    UNMAP_MISMATCH,
    WRONG_TRANSLATION,
    as_dmar_translations,
    check_virtio_iommu,
)
from harness.checks.verdict import CheckReport, Verdict
from harness.finish import RunEvidence, check_evidence
from harness.trace.events import DmarTranslate, VirtioIommuTranslate
from harness.trace.parser import parse_line, parse_lines

RUN = Path(__file__).resolve().parents[1] / "data" / "virtio-iommu-nvme-run"
NVME_SID = 0x10  # 00:02.0: the NVMe controller (virtio-iommu-pci is 00:01.0)


def host_lines() -> list[str]:
    return lzma.decompress((RUN / "trace.log.xz").read_bytes()).decode().splitlines()


def judge(tmp_path: Path, lines: list[str]) -> Verdict:
    """check_evidence over the recorded run with QEMU's trace replaced by ``lines``."""
    ev = RunEvidence.from_folder(RUN)
    trace = tmp_path / "trace.log"
    trace.write_text("\n".join(lines) + "\n")
    ev.host_trace = trace
    return check_evidence(ev)


def report(verdict: Verdict, checker: str) -> CheckReport:
    return next(r for r in verdict.reports if r.checker == checker)


# ---- the recorded run --------------------------------------------------------


def test_recorded_run_is_conclusive_and_ok() -> None:
    verdict = check_evidence(RunEvidence.from_folder(RUN))
    assert [r.checker for r in verdict.reports] == ["virtio-iommu", "guest-intent", "block-data"]
    assert verdict.ok and verdict.conclusive, verdict.format()
    viommu = report(verdict, "virtio-iommu").counts
    intent = report(verdict, "guest-intent").counts
    assert viommu.translations_checked == intent.translations_checked == 2207
    assert f"{NVME_SID:#06x}=2189" in viommu.translations_by_sid
    assert (viommu.maps, viommu.unmaps, viommu.unmaps_done, viommu.attaches) == (713, 75, 683, 7)
    # Every guest map and unmap reached QEMU as a request (one guest map can be
    # several MAP requests), and every range the guest unmapped was removed by
    # QEMU and is dead for the guest-intent rule from there on.
    assert (intent.guest_maps, intent.guest_unmaps) == (697, 75)
    assert intent.viommu_map_pairs == 697 and intent.viommu_unmap_pairs == 75
    assert intent.viommu_unmaps_done == 667
    assert intent.allowed_unflushed == 0
    assert intent.directions_checked == intent.translations_checked
    assert report(verdict, "block-data").counts.pages_checked == 1024


def test_the_machine_is_recognised_from_the_trace_alone(tmp_path: Path) -> None:
    ev = RunEvidence.from_folder(RUN)
    assert ev.virtio_iommu is True
    ev.virtio_iommu = None
    assert [r.checker for r in check_evidence(ev).reports][0] == "virtio-iommu"


# ---- planted in the recorded run -------------------------------------------------


def _last_unmap_of_a_page_never_mapped_again(lines: list[str]) -> tuple[int, int, int]:
    """(index after the UNMAP's unmap_done lines, iova, gpa it had) of an NVMe page
    that is unmapped and never mapped again."""
    maps: dict[int, int] = {}
    found: tuple[int, int, int] | None = None
    done = re.compile(r"virtio_iommu_unmap_done domain=0 virt_start=0x([0-9a-f]+) virt_end=0x([0-9a-f]+)")
    for i, line in enumerate(lines):
        m = re.match(r"virtio_iommu_map domain=0 virt_start=0x([0-9a-f]+) virt_end=0x[0-9a-f]+ "
                     r"phys_start=0x([0-9a-f]+)", line)
        if m:
            maps[int(m.group(1), 16)] = int(m.group(2), 16)
            if found is not None and int(m.group(1), 16) == found[1]:
                found = None
        d = done.match(line)
        if d and found is None and not lines[i + 1].startswith("virtio_iommu_unmap_done"):
            iova = int(d.group(1), 16)
            found = (i + 1, iova, maps[iova])
    assert found is not None
    return found


def test_translation_after_the_unmap(tmp_path: Path) -> None:
    lines = host_lines()
    at, iova, gpa = _last_unmap_of_a_page_never_mapped_again(lines)
    planted = [f"virtio_iommu_translate mr=virtio-iommu-memory-region-2-16 rid={NVME_SID} addr={iova:#x} flag=2",
               f"virtio_iommu_translate_out {iova:#x} -> {gpa:#x} for sid={NVME_SID}"]
    verdict = judge(tmp_path, lines[:at] + planted + lines[at:])
    assert report(verdict, "virtio-iommu").divergences_by_kind == {TRANSLATION_WITHOUT_MAPPING: 1}
    intent = report(verdict, "guest-intent")
    assert intent.divergences_by_kind == {USE_AFTER_UNMAP: 1}, intent.format()
    assert intent.divergences[0].iova == iova


def test_translation_to_another_gpa(tmp_path: Path) -> None:
    lines = host_lines()
    index = next(i for i, ln in enumerate(lines)
                 if ln.startswith("virtio_iommu_translate_out") and f"sid={NVME_SID}" in ln and i > len(lines) // 2)
    m = re.match(r"virtio_iommu_translate_out 0x([0-9a-f]+) -> 0x([0-9a-f]+) for sid=(\d+)", lines[index])
    assert m
    gpa = int(m.group(2), 16) + 0x200000
    lines[index] = f"virtio_iommu_translate_out 0x{m.group(1)} -> {gpa:#x} for sid={m.group(3)}"
    verdict = judge(tmp_path, lines)
    assert report(verdict, "virtio-iommu").divergences_by_kind == {WRONG_TRANSLATION: 1}
    assert report(verdict, "guest-intent").divergences_by_kind == {GUEST_WRONG_TRANSLATION: 1}
    assert not verdict.ok


def test_a_write_through_a_read_only_mapping(tmp_path: Path) -> None:
    """The access flag of a translation QEMU served turned into a write of a page
    the guest mapped TO_DEVICE (read only) and QEMU mapped with flags=1."""
    lines = host_lines()
    flags: dict[int, int] = {}  # virt_start -> flags of the live mappings of domain 0 (4 KiB ones)
    index = -1
    for i, ln in enumerate(lines):
        if m := re.match(r"virtio_iommu_map domain=0 virt_start=0x([0-9a-f]+) virt_end=0x[0-9a-f]+ .* flags=(\d)$", ln):
            flags[int(m.group(1), 16)] = int(m.group(2))
        elif m := re.match(r"virtio_iommu_unmap_done domain=0 virt_start=0x([0-9a-f]+)", ln):
            flags.pop(int(m.group(1), 16), None)
        elif ln.startswith("virtio_iommu_translate ") and f"rid={NVME_SID} " in ln and ln.endswith("flag=1") \
                and flags.get(int(ln.split("addr=")[1].split()[0], 16) & ~0xFFF) == 1:
            index = i
            break
    assert index > 0
    lines[index] = lines[index].replace("flag=1", "flag=2")
    verdict = judge(tmp_path, lines)
    assert report(verdict, "virtio-iommu").divergences_by_kind == {PERMISSION: 1}
    assert report(verdict, "guest-intent").divergences_by_kind == {GUEST_PERMISSION: 1}


def test_an_unmap_qemu_never_received(tmp_path: Path) -> None:
    """A lost UNMAP request (and the removals it did): the guest's unmap has no
    request; QEMU's mapping stays, and the next MAP of that iova overlaps it."""
    lines = host_lines()
    last: dict[str, int] = {}  # virt_end of an UNMAP request -> its last request (the pairing key's last)
    for i, ln in enumerate(lines):
        if ln.startswith("virtio_iommu_unmap "):
            last[ln.split("virt_end=")[1]] = i
    start = min(last.values())  # many requests of other ranges come after it
    end = start + 1
    while lines[end].startswith("virtio_iommu_unmap_done"):
        end += 1
    verdict = judge(tmp_path, lines[:start] + lines[end:])
    assert report(verdict, "guest-intent").divergences_by_kind.get("unmap-not-processed") == 1
    assert MAP_ACCEPTED in report(verdict, "virtio-iommu").divergences_by_kind


# ---- small streams --------------------------------------------------------------

HEAD = """virtio_iommu_get_config page_size_mask=0xfffffffffffff000 input range start=0x0 input range end=0xffffffffffffffff domain range start=0 domain range end=-1 probe_size=0x200 bypass=0x1
virtio_iommu_fill_resv_property dev= 16, type=1 start=0xfee00000 end=0xfeefffff
virtio_iommu_attach domain=0 endpoint=16
virtio_iommu_get_endpoint Alloc endpoint=16
virtio_iommu_get_domain Alloc domain=0
virtio_iommu_switch_address_space Device 00:02.0 switching address space (iommu enabled=1)
virtio_iommu_map domain=0 virt_start=0x10000 virt_end=0x11fff phys_start=0x80000 flags=3
virtio_iommu_map domain=0 virt_start=0x12000 virt_end=0x12fff phys_start=0x90000 flags=1
"""


def run(text: str) -> CheckReport:
    return check_virtio_iommu(parse_lines((HEAD + text).splitlines()))


def test_small_stream_ok() -> None:
    r = run("""virtio_iommu_translate mr=m rid=16 addr=0x11004 flag=2
virtio_iommu_translate_out 0x11004 -> 0x81004 for sid=16
virtio_iommu_translate mr=m rid=16 addr=0xfee00004 flag=2
virtio_iommu_translate mr=m rid=16 addr=0x30000 flag=1
virtio_iommu_report_fault FAULT reason=3 flags=257 endpoint=16 address =0x30000
virtio_iommu_unmap domain=0 virt_start=0x10000 virt_end=0x12fff
virtio_iommu_unmap_done domain=0 virt_start=0x10000 virt_end=0x11fff
virtio_iommu_unmap_done domain=0 virt_start=0x12000 virt_end=0x12fff
""")
    assert r.ok and r.conclusive, r.format()
    c = r.counts
    assert (c.translations_checked, c.identity_accesses, c.faults_expected, c.faults_reported) == (1, 1, 1, 1)
    assert c.translations_by_sid == "0x0010=1"


@pytest.mark.parametrize(("text", "kind"), [
    ("virtio_iommu_map domain=0 virt_start=0x11000 virt_end=0x11fff phys_start=0x70000 flags=3\n", MAP_ACCEPTED),
    ("virtio_iommu_map domain=0 virt_start=0x20800 virt_end=0x20fff phys_start=0x70000 flags=3\n", SPEC_VIOLATION),
    ("virtio_iommu_unmap domain=0 virt_start=0x10000 virt_end=0x10fff\n", SPEC_VIOLATION),
    ("virtio_iommu_unmap domain=0 virt_start=0x10000 virt_end=0x12fff\n"
     "virtio_iommu_unmap_done domain=0 virt_start=0x10000 virt_end=0x11fff\n", UNMAP_INCOMPLETE),
    ("virtio_iommu_unmap domain=0 virt_start=0x20000 virt_end=0x2ffff\n"
     "virtio_iommu_unmap_done domain=0 virt_start=0x10000 virt_end=0x11fff\n", UNMAP_MISMATCH),
    ("virtio_iommu_translate mr=m rid=16 addr=0x10000 flag=1\n"
     "virtio_iommu_translate mr=m rid=16 addr=0x10000 flag=1\n"
     "virtio_iommu_translate_out 0x10000 -> 0x80000 for sid=16\n", MISSING_TRANSLATION),
    ("virtio_iommu_translate mr=m rid=16 addr=0x12000 flag=2\n"
     "virtio_iommu_translate_out 0x12000 -> 0x90000 for sid=16\n", PERMISSION),
    ("virtio_iommu_translate mr=m rid=16 addr=0x30000 flag=1\n"
     "virtio_iommu_translate_out 0x30000 -> 0x30000 for sid=16\n", TRANSLATION_WITHOUT_MAPPING),
    ("virtio_iommu_translate mr=m rid=16 addr=0x10000 flag=1\n"
     "virtio_iommu_translate_out 0x10000 -> 0x70000 for sid=16\n", WRONG_TRANSLATION),
    ("virtio_iommu_translate mr=m rid=16 addr=0x11000 flag=1\n"
     "virtio_iommu_detach domain=0 endpoint=16\n"
     "virtio_iommu_translate mr=m rid=16 addr=0x10000 flag=1\n"
     "virtio_iommu_translate_out 0x10000 -> 0x80000 for sid=16\n", TRANSLATION_WITHOUT_MAPPING),
])
def test_small_stream_divergence(text: str, kind: str) -> None:
    r = run(text)
    assert kind in r.divergences_by_kind, r.format()
    assert not r.ok


def test_bypass_attach_is_read_from_the_switch_event() -> None:
    r = check_virtio_iommu(parse_lines("""virtio_iommu_attach domain=5 endpoint=24
virtio_iommu_switch_address_space Device 00:03.0 switching address space (iommu enabled=0)
virtio_iommu_translate mr=m rid=24 addr=0x1000 flag=1
virtio_iommu_translate_out 0x1000 -> 0x1000 for sid=24
""".splitlines()))
    assert r.counts.bypass_attaches == 1
    assert r.divergences_by_kind == {TRANSLATION_WITHOUT_MAPPING: 1}


def test_nothing_checked_is_inconclusive_and_too_few_devices_too() -> None:
    assert not check_virtio_iommu(parse_lines(HEAD.splitlines())).conclusive
    text = HEAD + ("virtio_iommu_translate mr=m rid=16 addr=0x10000 flag=1\n"
                   "virtio_iommu_translate_out 0x10000 -> 0x80000 for sid=16\n")
    assert check_virtio_iommu(parse_lines(text.splitlines())).conclusive
    assert not check_virtio_iommu(parse_lines(text.splitlines()), expect_endpoints=2).conclusive
    bad = check_virtio_iommu(parse_lines((text + "virtio_iommu_map domain=x\n").splitlines()))
    assert not bad.conclusive and bad.counts.malformed_lines == 1


def test_translations_are_shown_to_block_data_as_dmar_translations() -> None:
    out = as_dmar_translations(parse_line("virtio_iommu_translate_out 0xfffe1234 -> 0x3a2b1234 for sid=250", 7))
    assert isinstance(out, DmarTranslate)
    assert (out.sid, out.iova, out.gpa, out.mask, out.lineno) == (250, 0xFFFE1000, 0x3A2B1000, 0xFFF, 7)
    assert as_dmar_translations(parse_line("virtio_iommu_translate mr=m rid=16 addr=0x1 flag=1", 1)) is None
    assert isinstance(parse_line("virtio_iommu_translate mr=m rid=16 addr=0x1 flag=1", 1), VirtioIommuTranslate)
