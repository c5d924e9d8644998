"""Builders of small two-sided streams for the checkers' tests: guest kernel trace
lines (tracefs text, as the agent collects it) and QEMU 7.2 trace lines.

Device 0000:00:03.0 is sid 0x18, QEMU prints it ``dev 00:03.00``; VT-d domain 1.
"""

from __future__ import annotations

from harness.checks.verdict import CheckReport

DEV = "0000:00:03.0"
IOVA, IOVA2 = 0xFFFFF000, 0xFFFFE000
PAGE_A, PAGE_B = 0x5000000, 0x6000000
_ts = [100.0]


def g(event: str, body: str) -> str:
    """One guest trace line."""
    _ts[0] += 0.000001
    return f"          python3-120     [000] .....   {_ts[0]:.6f}: {event}: {body}"


def g_map(iova: int, paddr: int, size: int = 4096) -> str:
    return g("map", f"IOMMU: iova=0x{iova:016x} - 0x{iova + size:016x} paddr=0x{paddr:016x} size={size}")


def g_unmap(iova: int, size: int = 4096) -> str:
    return g("unmap", f"IOMMU: iova=0x{iova:016x} - 0x{iova + size:016x} size={size} unmapped_size={size}")


def g_dma_map(iova: int, paddr: int, direction: str, size: int = 4096) -> str:
    return g("dma_map_page", f"{DEV} dir={direction} dma_addr={iova:x} size={size} phys_addr={paddr:x} attrs=")


def g_dma_unmap(iova: int, direction: str, size: int = 4096) -> str:
    return g("dma_unmap_page", f"{DEV} dir={direction} dma_addr={iova:x} size={size} attrs=")


def g_inv(iova: int, did: int = 1) -> str:
    return g("qi_submit", f"iotlb_inv dmar0: {did << 16 | 0x32:#x} {iova:#x} 0x0 0x0")


def g_cmd(cid: int, opcode: str = "nvme_cmd_read", slba: int = 0) -> str:
    return g("nvme_setup_cmd", f"nvme0: disk=nvme0n1, qid=1, cmdid={cid}, nsid=1, flags=0x0, meta=0x0, "
                               f"cmd=({opcode} slba={slba}, len=7, ctrl=0x0, dsmgmt=0, reftag=0)")


def g_done(cid: int) -> str:
    return g("nvme_complete_rq", f"nvme0: disk=nvme0n1, qid=1, cmdid={cid}, res=0x0, retries=0, flags=0x0, "
                                 "status=0x0")


def g_mark(text: str) -> str:
    return g("tracing_mark_write", text)


def h_inv(iova: int, domain: int = 1) -> str:
    return f"vtd_inv_desc_iotlb_pages iotlb invalidate domain {domain:#x} addr {iova:#x} mask 0x0"


def h_cmd(cid: int, read: bool = True, lba: int = 0) -> list[str]:
    opc, name = ("0x2", "NVME_NVM_CMD_READ") if read else ("0x1", "NVME_NVM_CMD_WRITE")
    rw = (f"pci_nvme_read cid {cid} nsid 1 nlb 8 count 4096 lba {lba:#x}" if read
          else f"pci_nvme_write cid {cid} opname 'write' nsid 1 nlb 8 count 4096 lba {lba:#x}")
    return [f"pci_nvme_io_cmd cid {cid} nsid 0x1 sqid 1 opc {opc} opname '{name}'", rw]


def h_dma(dbs: int, to_dev: bool, *translations: tuple[int, int]) -> list[str]:
    out = [f"dma_blk_io dbs={dbs:#x} bs=0x5555 offset=0 to_dev={int(to_dev)}", f"dma_blk_cb dbs={dbs:#x} ret=0"]
    for iova, gpa in translations:
        out.append(f"vtd_iotlb_page_update IOTLB page update sid 0x18 iova {iova:#x} slpte {gpa | 3:#x} domain 0x1")
        out.append(f"vtd_dmar_translate dev 00:03.00 iova {iova:#x} -> gpa {gpa:#x} mask 0xfff")
    out.append(f"dma_complete dbs={dbs:#x} ret=0 cb=0x7777")
    return out


def h_done(cid: int) -> str:
    return f"pci_nvme_enqueue_req_completion cid {cid} cqid 1 dw0 0x0 dw1 0x0 status 0x0"


def one_read(direction: str = "FROM_DEVICE", gpa: int = PAGE_A, to_dev: bool = False) -> tuple[list[str], list[str]]:
    """A guest reading one page from the NVMe namespace into PAGE_A at IOVA (caching mode: flush on map)."""
    guest = [g_mark("dma-harness io 1 begin read pos=0 len=4096"), g_map(IOVA, PAGE_A),
             g_dma_map(IOVA, PAGE_A, direction), g_inv(IOVA), g_cmd(5), g_done(5), g_unmap(IOVA), g_inv(IOVA),
             g_dma_unmap(IOVA, direction), g_mark("dma-harness io 1 end")]
    host = [h_inv(IOVA), *h_cmd(5), *h_dma(0x1000, to_dev, (IOVA, gpa)), h_done(5), h_inv(IOVA)]
    return guest, host


ENABLE = "vtd_dmar_enable enable 1"


ENABLE = "vtd_dmar_enable enable 1"
"""QEMU's DMA-remapping enable: NVMe sync pairs count from here on."""


def kinds(report: CheckReport) -> list[str]:
    return [d.kind for d in report.divergences]
