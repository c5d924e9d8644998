"""intel-iommu + virtio-blk + virtio-net (both with ATS behind their own root
ports, caching mode and device IOTLB on): real O_DIRECT block I/O and echoed
packets in one guest, every translation of both devices checked against the
guest kernel's mappings and QEMU's IOTLB, the block data against the agent's
buffer pages.  One boot."""

from harness.checks.devices import parse_by_sid
from harness.vm import IntelIommu, MachineSpec, VirtioBlk, VirtioNet
from harness.workloads import VirtioMix

BLK, NET = 0x0100, 0x0200  # each device at 00.0 of its root port's bus (1, 2)


def test_virtio_blk_and_net_dma_with_ats(vm_factory, dma_verdict):
    vm = vm_factory(MachineSpec(devices=(IntelIommu(caching_mode=True, device_iotlb=True),
                                         VirtioBlk(addr=2, size_mib=32, ats=True), VirtioNet(addr=3, ats=True))))
    disks = vm.agent.call("block.find_virtio", pci="0000:01:00.0")
    assert disks["device"] == "/dev/vda", disks

    records = VirtioMix(block_length=128 << 10, block_chunk=64 << 10, block_rounds=2, net_count=128).run(vm.agent)
    blk = [r for r in records if r["op"] == "block.pattern_rw"]
    net = [r for r in records if r["op"] == "net.ping_pattern"]
    assert all(r["verified"] for r in blk) and sum(r["writes"] + r["reads"] for r in blk) == 8
    assert net[0]["verified"] and net[0]["received"] == 128 and net[0]["bytes_verified"] == 128 * 1400

    verdict = dma_verdict(vm)
    assert verdict.status == "ok", verdict.format()
    vtd = verdict.report("vtd-consistency").counts
    assert parse_by_sid(vtd.translations_by_sid).keys() >= {BLK, NET}, verdict.format()
    assert set(parse_by_sid(vtd.dev_tlb_invalidations_by_sid)) == {BLK, NET}, verdict.format()
    checked = parse_by_sid(verdict.report("guest-intent").counts.translations_by_sid)
    assert checked[BLK] > 100 and checked[NET] > 500, verdict.format()
    data = verdict.report("virtio-blk-data").counts
    # 2 rounds, each writing then reading 128 KiB in 64 KiB I/Os: every page checked
    assert data.ios_checked == data.ios == 8 and parse_by_sid(data.pages_checked_by_sid) == {BLK: 128}, \
        verdict.format()
