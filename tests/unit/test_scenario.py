"""Scenario files: every key validated, errors name the key, round trip through TOML."""

import pytest

from harness.errors import ConfigError
from harness.scenario import load_scenario, scenario_from_table

GOOD = """
name = "t"
[machine]
memory_mib = 512
[[devices]]
kind = "intel-iommu"
caching_mode = true
[[devices]]
kind = "nvme"
serial = "abc"
namespaces = [{ size_mib = 16 }]
[workload]
kind = "nvme-pattern"
length = 65536
chunk = 4096
"""


def test_load_and_round_trip(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(GOOD)
    s = load_scenario(p)
    assert s.machine.memory_mib == 512 and s.workload.length == 65536
    again = tmp_path / "again.toml"
    again.write_text(s.to_toml())
    assert load_scenario(again) == s


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace('name = "t"\n', ""), "name"),
    (lambda t: t.replace("[workload]\nkind", "[workloadx]\nkind"), "workloadx"),
    (lambda t: t.replace("memory_mib = 512", "memory_mb = 512"), "machine.memory_mb"),
    (lambda t: t.replace("memory_mib = 512", 'memory_mib = "512"'), "machine.memory_mib"),
    (lambda t: t.replace("memory_mib = 512", "memory_mib = 1"), "machine.memory_mib"),
    (lambda t: t.replace('kind = "nvme"\n', 'kind = "nvmf"\n'), "devices[1].kind"),
    (lambda t: t.replace("chunk = 4096", "chunk = 1000"), "workload.chunk"),
    (lambda t: t.replace("chunk = 4096", "chunks = 4096"), "workload.chunks"),
    (lambda t: t.replace('kind = "nvme-pattern"', 'kind = "fio"'), "workload.kind"),
])
def test_bad_keys_are_named(tmp_path, edit, key):
    p = tmp_path / "bad.toml"
    p.write_text(edit(GOOD))
    with pytest.raises(ConfigError) as info:
        load_scenario(p)
    assert info.value.key == key, str(info.value)
    assert str(p) in str(info.value)


def test_toml_syntax_error_and_missing_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_scenario(p)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_scenario(tmp_path / "nope.toml")


def test_shipped_configs_load():
    from pathlib import Path
    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))
    assert configs
    for c in configs:
        assert load_scenario(c).name


def test_devices_must_be_array_of_tables():
    with pytest.raises(ConfigError) as info:
        scenario_from_table({"name": "x", "devices": {"kind": "nvme"}, "workload": {"kind": "nvme-pattern"}})
    assert info.value.key == "devices"
