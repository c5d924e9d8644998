"""The verdict of every VM a test made goes into pytest's JUnit XML as properties
(harness.pytest_plugin.verdict_properties), and harness.nightly reads them back.

The child pytest runs the plugin's real vm_factory teardown with a stand-in harness
and VM (nothing boots): finish_vm is replaced by one returning a fixed verdict."""

import xml.etree.ElementTree as ET

import pytest

from harness.checks.grant import GrantCounts
from harness.checks.verdict import CheckReport, Verdict
from harness.nightly import read_junit, record_from_junit
from harness.pytest_plugin import verdict_properties

pytest_plugins = ["pytester"]


def grant_verdict(*, diverge: bool = False) -> Verdict:
    grant = CheckReport(checker="xen-grant", counts=GrantCounts(grants=26, maps=28, deferred_ends=10),
                        total_divergences=1 if diverge else 0)
    sync = CheckReport(checker="sync", counts={"pairs": 0, "by_sid": "00:03.0=4"},
                       inconclusive=["no pair"])
    return Verdict(reports=[grant, sync], versions={"qemu": "7.2.19"})


def test_properties_name_status_counts_and_versions():
    props = dict(verdict_properties("vm0", grant_verdict()))
    assert props["vm0.status"] == "inconclusive"
    assert props["vm0.failures"] == 0
    assert props["vm0.version.qemu"] == "7.2.19"
    assert props["vm0.xen-grant.status"] == "ok"
    assert props["vm0.xen-grant.grants"] == 26 and props["vm0.xen-grant.maps"] == 28
    assert props["vm0.xen-grant.ops"] == 0  # every count, zero or not
    assert props["vm0.sync.status"] == "inconclusive"
    assert props["vm0.sync.by_sid"] == "00:03.0=4"


def test_properties_of_a_divergence_with_failures():
    verdict = grant_verdict(diverge=True)
    verdict.failures.append("data did not verify")
    props = dict(verdict_properties("guest", verdict))
    assert props["guest.status"] == "divergence" and props["guest.xen-grant.status"] == "divergence"
    assert props["guest.failures"] == 1


CONFTEST = """
    from pathlib import Path
    import pytest
    import harness.pytest_plugin as plugin
    from harness.checks.grant import GrantCounts
    from harness.checks.verdict import CheckReport, Verdict
    from harness.finish import Finished

    class FakeVM:
        def __init__(self, spec, name, boot_timeout, run_dir):
            self.spec, self.name, self.boot_timeout, self.run_dir = spec, name, boot_timeout, run_dir
            self.boot_seconds = None
            self.agent_calls = []
        def launch(self):
            pass
        def wait_ready(self):
            self.boot_seconds = 0.5
        def shutdown(self):
            pass
        def close(self):
            pass
        def save_artifacts(self, dest, extra):
            Path(dest).mkdir(parents=True, exist_ok=True)

    class FakeOptions:
        artifacts = "artifacts"
        keep_artifacts = False

    class FakeHarness:
        options = FakeOptions()
        def __init__(self, tmp):
            self.tmp = tmp
        def vm(self, spec, name, boot_timeout, trace):
            return FakeVM(spec, name, boot_timeout, self.tmp)

    def fake_finish(vm):
        diverge = vm.name == "bad"
        report = CheckReport(checker="xen-grant", counts=GrantCounts(grants=26, maps=28),
                             total_divergences=1 if diverge else 0)
        return Finished(verdict=Verdict(reports=[report]))

    plugin.finish_vm = fake_finish

    @pytest.fixture(scope="session")
    def dma_harness(tmp_path_factory):
        return FakeHarness(tmp_path_factory.mktemp("run"))
"""

TESTS = """
    import pytest

    def test_ok(vm):
        assert vm.name == "vm0"

    @pytest.mark.dma_no_check
    def test_two_vms(vm_factory):
        vm_factory(name="good")
        vm_factory(name="bad")

    def test_untraced(vm_factory):
        vm_factory(trace=False)

    def test_no_vm():
        pass
"""


def test_junit_xml_carries_the_verdicts(pytester, tmp_path):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=TESTS)
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess(f"--junitxml={junit}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    cases = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}
             for c in ET.parse(junit).getroot().iter("testcase")}
    assert cases["test_ok"]["vm0.status"] == "ok"
    assert cases["test_ok"]["vm0.xen-grant.status"] == "ok"
    assert cases["test_ok"]["vm0.xen-grant.grants"] == "26"
    assert cases["test_two_vms"]["good.status"] == "ok" and cases["test_two_vms"]["bad.status"] == "divergence"
    assert cases["test_untraced"] == {} and cases["test_no_vm"] == {}

    record = read_junit(junit)
    tests = record["tests"]
    assert tests["test_inner::test_ok"]["vms"]["vm0"]["checkers"]["xen-grant"] == {
        "status": "ok", "counts": {f: (26 if f == "grants" else 28 if f == "maps" else 0)
                                   for f in GrantCounts.__dataclass_fields__}}
    assert tests["test_inner::test_two_vms"]["vms"]["bad"]["status"] == "divergence"
    assert tests["test_inner::test_no_vm"] == {"outcome": "passed", "vms": {}}
    assert record["totals"]["verdicts_ok"] == 2 and record["totals"]["verdicts_divergence"] == 1
    assert record["totals"]["passed"] == 4


@pytest.mark.parametrize("status", ["ok", "divergence"])
def test_property_values_round_trip_through_the_record(status):
    verdict = grant_verdict(diverge=status == "divergence")
    props = verdict_properties("vm0", verdict)
    xml = "<testsuites><testsuite><testcase classname='t' name='x'><properties>" + "".join(
        f"<property name='{n}' value='{v}'/>" for n, v in props) + "</properties></testcase></testsuite></testsuites>"
    vm = record_from_junit(xml)["tests"]["t::x"]["vms"]["vm0"]
    assert vm["status"] == ("divergence" if status == "divergence" else "inconclusive")  # sync is inconclusive
    assert vm["versions"] == {"qemu": "7.2.19"}
    assert vm["checkers"]["xen-grant"]["status"] == status
    assert vm["checkers"]["sync"]["counts"] == {"pairs": 0}  # string counts are not tracked
