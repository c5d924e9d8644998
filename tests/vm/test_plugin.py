"""The pytest plugin, run in a child pytest (pytester) that boots real guests."""

from pathlib import Path

import pytest

from harness.vm.spec import default_machine
from harness.scenario import load_scenario

pytest_plugins = ["pytester"]
DATA = Path(__file__).resolve().parents[1] / "data"


def run_child(pytester, dma_harness, artifacts, *extra):
    return pytester.runpytest_subprocess(f"--dma-cache={dma_harness.cache.root}",
                                         f"--dma-artifacts={artifacts}",
                                         f"--dma-accel={dma_harness.accel().accel}", "-p", "no:cacheprovider",
                                         *extra)


def test_failed_test_leaves_reproducible_artifacts(pytester, dma_harness, tmp_path, no_leftovers):
    pytester.makepyfile(test_inner="""
        def test_fails(vm):
            assert vm.agent.call("ping")["uptime"] > 0
            vm.agent.call("nvme.pattern_rw", length=65536, chunk=65536)
            assert False, "deliberate failure"
    """)
    result = run_child(pytester, dma_harness, tmp_path)
    result.assert_outcomes(failed=1)
    folder = tmp_path / "test_inner.py_test_fails" / "vm0"
    for name in ("argv.json", "console.log", "qmp.log", "trace.log", "qemu.log", "verdict.json",
                 "verdict.txt", "config.toml", "guest-trace.txt", "records.json"):
        assert (folder / name).is_file(), name
    assert "dma-harness: init done" in (folder / "console.log").read_text()
    scenario = load_scenario(folder / "config.toml")
    assert scenario.machine == default_machine()
    # the saved config replays what the test asked the guest agent to do
    assert [op["op"] for op in scenario.workload.ops] == ["nvme.pattern_rw"]


def test_divergence_fails_the_test_at_teardown(pytester, dma_harness, tmp_path, no_leftovers):
    """The checker is pointed at a recorded stream with one translation tampered, so
    the teardown sees a real divergence verdict while the guest itself was fine."""
    pytester.makeconftest(f"""
        import lzma, re
        import harness.finish as finish
        from harness.checks.verdict import Verdict
        from harness.checks.vtd import check_lines

        def tampered(evidence):
            lines = lzma.decompress(open({str(DATA / 'intel-iommu-nvme-nocm-qemu7.2.trace.xz')!r}, 'rb').read()).decode().splitlines()
            i = next(i for i, t in enumerate(lines) if i > 900 and t.startswith("vtd_dmar_translate"))
            lines[i] = re.sub(r"-> gpa 0x([0-9a-f]+)", lambda m: "-> gpa %#x" % (int(m.group(1), 16) ^ 0x200000), lines[i])
            return Verdict(reports=[check_lines(lines)])

        finish.check_evidence = tampered
    """)
    pytester.makepyfile(test_inner="""
        def test_passes(vm):
            assert vm.agent.call("ping")["uptime"] > 0
    """)
    junit = tmp_path / "junit.xml"
    result = run_child(pytester, dma_harness, tmp_path, f"--junitxml={junit}")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*vm0: DMA diverged from the models*", "*wrong-translation at line*"])
    xml = junit.read_text()
    assert 'name="vm0.vtd-consistency.translations"' in xml and 'name="vm0.status" value="divergence"' in xml
    assert "wrong-translation" in (tmp_path / "test_inner.py_test_passes" / "vm0" / "verdict.txt").read_text()


def test_bad_accel_option_is_a_usage_error(pytester):
    pytester.makepyfile(test_inner="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--dma-accel=hvf")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--dma-accel must be auto, tcg or kvm, not 'hvf'*"])


def test_session_images_are_cached_files(dma_images, dma_harness):
    root = dma_harness.cache.root
    for path in (dma_images.kernel, dma_images.initrd, dma_images.ssh_key):
        assert path.is_file() and root in path.parents
    assert dma_images.ssh_key.stat().st_mode & 0o777 == 0o600
    assert dma_images.host_key.startswith("ssh-ed25519 ")


def test_guest_that_does_not_boot_leaves_its_console_log(pytester, dma_harness, tmp_path, no_leftovers):
    pytester.makepyfile(test_inner="""
        from harness.vm.spec import default_machine

        def test_stuck(vm_factory):
            vm_factory(default_machine().replace(cmdline="rdinit=/bin/cat loglevel=7"), boot_timeout=15)
    """)
    result = run_child(pytester, dma_harness, tmp_path)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*GuestBootTimeout*did not answer within 15s*"])
    console = (tmp_path / "test_inner.py_test_stuck" / "vm0" / "console.log").read_text()
    assert "Run /bin/cat as init process" in console
