"""QEMU versions: probing a binary (harness/vm/qemu_binary.py), the choice of a trace
format table from its version and event list (harness/trace/formats.py) and how a
``--qemu`` value resolves (harness/images/qemu.py), with stand-in binaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.images.cache import ImageCache
from harness.images.qemu import (
    QEMU_VERSIONS,
    build_of_binary,
    cached_qemu,
    is_version_name,
    qemu_key,
    resolve_qemu_option,
)
from harness.trace.formats import FAMILIES, FORMATS, choose_format, device_families
from harness.vm.qemu_binary import (
    QemuVersion,
    clear_probe_cache,
    format_choice,
    parse_trace_help,
    parse_version,
    probe_qemu,
    trace_events_for,
)

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_10 = ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n"
             "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n")
DEBIAN_72 = ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"
             "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n")


def fake_qemu(folder: Path, version_text: str, events: list[str] | set[str] | frozenset[str],
              name: str = "qemu-system-x86_64") -> Path:
    """A stand-in for QEMU answering ``-version`` and ``-trace help`` (and counting calls)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "version.txt").write_text(version_text)
    (folder / "events.txt").write_text("".join(f"{e}\n" for e in sorted(events)))
    script = folder / name
    script.write_text(f"""#!/bin/sh
echo "$@" >> "{folder}/calls.log"
case "$1" in
  -version) cat "{folder}/version.txt" ;;
  -trace) cat "{folder}/events.txt" ;;
  *) exit 1 ;;
esac
""")
    script.chmod(0o755)
    return script


@pytest.fixture(autouse=True)
def _fresh_probes() -> None:
    clear_probe_cache()


def all_events(series: str) -> set[str]:
    return {name for names in FORMATS[series].families.values() for name in names} | {"trace_other_event"}


# ---- -version and -trace help ---------------------------------------------------------------


def test_version_lines_of_debian_and_git_builds() -> None:
    v10 = parse_version(DEBIAN_10)
    assert v10 == QemuVersion(10, 0, 2) and v10.package == "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"
    assert v10.series == "10.0" and not v10.development
    v72 = parse_version(DEBIAN_72)
    assert v72 is not None and (v72.series, v72.micro) == ("7.2", 22)
    dev = parse_version("QEMU emulator version 10.0.50 (v10.0.0-1234-gdeadbeef)\n")
    assert dev is not None and dev.development and dev.package == "v10.0.0-1234-gdeadbeef"
    bare = parse_version("QEMU emulator version 9.2.0\n")
    assert bare is not None and bare.package == "" and str(bare) == "9.2.0"
    assert parse_version("") is None and parse_version("GNU coreutils 9.1\n") is None


def test_trace_help_keeps_event_names_only() -> None:
    assert parse_trace_help("vtd_dmar_translate\npci_nvme_map_prp\n\nnot an event!\n  dma_blk_io \n") == {
        "vtd_dmar_translate", "pci_nvme_map_prp", "dma_blk_io"}


def test_probe_reads_version_and_events_once_per_binary(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path / "q", DEBIAN_10, all_events("10.0"))
    first = probe_qemu(qemu)
    assert first.version.series == "10.0" and "virtio_iommu_device_reset_exit" in first.events
    assert first.version_text == DEBIAN_10.splitlines()[0]
    assert probe_qemu(qemu) is first
    assert (tmp_path / "q" / "calls.log").read_text().splitlines() == ["-version", "-trace help"]
    # a rebuilt binary (new mtime, size) is probed again
    qemu.write_text(qemu.read_text() + "# rebuilt\n")
    os.utime(qemu, ns=(1, 1))
    probe_qemu(qemu)
    assert len((tmp_path / "q" / "calls.log").read_text().splitlines()) == 4


def test_probe_refuses_what_is_not_a_qemu(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'/bin/true' is not a QEMU"):
        probe_qemu("/bin/true")
    silent = fake_qemu(tmp_path / "q", DEBIAN_10, [])
    with pytest.raises(ConfigError, match="lists no trace events"):
        probe_qemu(silent)
    with pytest.raises(ConfigError, match="No such file"):
        probe_qemu(tmp_path / "missing")


# ---- version -> format table ------------------------------------------------------------------


def test_each_known_series_gets_its_own_table() -> None:
    for series in ("7.2", "10.0"):
        choice = choose_format(series, version=series + ".1", events=frozenset(all_events(series)))
        assert choice.series == series and not choice.unknown and not choice.assumed
    assert FORMATS["10.0"].compiled is not FORMATS["7.2"].compiled


def test_a_version_without_a_table_leaves_every_family_unknown() -> None:
    for series, dev in (("9.2", False), ("11.1", False), ("10.0", True)):
        choice = choose_format(series, dev, version=f"{series}.x", events=frozenset(all_events("10.0")))
        assert set(choice.unknown) == set(FAMILIES), choice
        assert choice.series == "7.2"  # lines are still read, but nothing is vouched for
        assert all(f"QEMU {series}.x" in why for why in choice.unknown.values())
    dev = choose_format("10.0", True, version="10.0.50")
    assert "development tree" in dev.unknown["vtd"]


def test_a_binary_missing_one_event_of_a_family_leaves_that_family_unknown() -> None:
    events = frozenset(all_events("10.0") - {"vtd_dmar_translate"})
    choice = choose_format("10.0", version="10.0.2", events=events)
    assert set(choice.unknown) == {"vtd"}
    assert "vtd_dmar_translate" in choice.unknown["vtd"]
    assert choice.reasons_for(device_families(["intel-iommu", "nvme"])) == [choice.unknown["vtd"]]
    assert choice.reasons_for(device_families(["virtio-iommu", "nvme"])) == []


def test_7_2_event_list_does_not_satisfy_the_10_0_table() -> None:
    """A binary claiming 10.0 but tracing 7.2's virtio-iommu reset is not read as 10.0."""
    choice = choose_format("10.0", version="10.0.2", events=frozenset(all_events("7.2")))
    assert set(choice.unknown) == {"virtio_iommu"}


def test_no_version_known_reads_the_trace_as_before() -> None:
    choice = choose_format(None)
    assert choice.assumed and choice.series == "7.2" and not choice.unknown


def test_format_choice_and_event_names_from_a_probed_binary(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path / "q", DEBIAN_10, all_events("10.0"))
    assert format_choice(qemu).series == "10.0"
    events = trace_events_for(qemu, ["vtd_dmar_translate", "virtio_iommu_device_reset", "pci_nvme_err_*",
                                     "no_such_event"])
    assert events == ["vtd_dmar_translate", "virtio_iommu_device_reset_exit", "pci_nvme_err_*"]
    old = fake_qemu(tmp_path / "o", DEBIAN_72, all_events("7.2"))
    assert trace_events_for(old, ["virtio_iommu_device_reset"]) == ["virtio_iommu_device_reset"]


def test_device_families() -> None:
    assert device_families(["intel-iommu", "nvme"]) == {"vtd", "pci_nvme", "dma"}
    assert device_families(["virtio-iommu", "virtio-blk"]) == {"virtio_iommu", "virtio", "virtqueue"}
    assert device_families(None) == FAMILIES


# ---- --qemu values ------------------------------------------------------------------------


def test_version_names_are_never_paths() -> None:
    assert is_version_name("10.0") and is_version_name("default") and is_version_name("7.2")
    assert not is_version_name("./10.0") and not is_version_name("/usr/bin/qemu-system-x86_64")
    assert not is_version_name("qemu-system-x86_64") and not is_version_name("10")


def test_keys_are_per_version_and_stable() -> None:
    keys = {name: qemu_key(name) for name in QEMU_VERSIONS}
    assert len(set(keys.values())) == len(keys) and all(len(k) == 16 for k in keys.values())
    assert keys == {name: qemu_key(name) for name in QEMU_VERSIONS}


def test_unknown_version_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"QEMU version '9\.9' is not one the harness provides \(known: "
                                          r"default, 10\.0, 7\.2\)"):
        resolve_qemu_option("9.9", ImageCache(tmp_path))
    assert not (tmp_path / "qemu").exists()


def test_provided_version_not_built_without_building(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    assert cached_qemu(cache, "10.0") is None
    with pytest.raises(ConfigError, match=r"images build qemu --version 10\.0"):
        resolve_qemu_option("10.0", cache, build=False)


def test_a_build_folder_is_its_binary(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path / "build", DEBIAN_10, ["vtd_dmar_translate"])
    choice = resolve_qemu_option(str(tmp_path / "build"), ImageCache(tmp_path / "c"))
    assert (choice.path, choice.origin, choice.name) == (str(qemu), "build-dir", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no qemu-system-x86_64"):
        resolve_qemu_option(str(tmp_path / "empty"), ImageCache(tmp_path / "c"))


def test_a_provided_build_is_recognised_by_its_path(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    key = qemu_key("10.0")
    entry = cache.entry("qemu", key)
    wrapper = fake_qemu(entry / "bin", DEBIAN_10, all_events("10.0"))
    (entry / "manifest.json").write_text(json.dumps({"kind": "qemu", "key": key, "name": "10.0",
                                                     "packages": {"qemu-system-x86": "1:10.0.2"}}))
    found = cached_qemu(cache, "10.0")
    assert found is not None and found.path == wrapper and found.packages == {"qemu-system-x86": "1:10.0.2"}
    by_name = resolve_qemu_option("10.0", cache, build=False)
    by_path = resolve_qemu_option(str(wrapper), cache)
    assert by_name.path == by_path.path == str(wrapper)
    assert (by_path.origin, by_path.name, by_path.key) == ("provided", "10.0", key)
    assert build_of_binary("/usr/bin/env") is None


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,env,words", [
    (("run", "configs/intel-iommu-nvme.toml", "--qemu", "9.9"), None, ("'9.9'", "known: default, 10.0, 7.2")),
    (("run", "configs/intel-iommu-nvme.toml"), {"DMA_HARNESS_QEMU": "8.1"}, ("'8.1'",)),
    (("images", "build", "qemu"), None, ("--version",)),
    (("images", "build", "qemu", "--version", "6.0"), None, ("'6.0'",)),
])
def test_cli_refuses_bad_qemu_values_in_one_line(tmp_path: Path, args: tuple[str, ...],
                                                  env: dict[str, str] | None, words: tuple[str, ...]) -> None:
    proc = _cli(*args, "--cache", str(tmp_path / "cache"), env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, lines
    assert all(w in lines[0] for w in words), lines[0]


def test_images_key_and_show_list_the_qemu_builds(tmp_path: Path) -> None:
    env = {"DMA_HARNESS_CACHE": str(tmp_path / "cache")}
    keys = _cli("images", "key", env=env)
    assert keys.returncode == 0, keys.stderr
    for name in QEMU_VERSIONS:
        assert f"qemu-{name} {qemu_key(name)}" in keys.stdout.splitlines()
    assert json.loads(_cli("images", "key", "--json", env=env).stdout)["qemu-10.0"] == qemu_key("10.0")
    show = _cli("images", "show", "--cache", str(tmp_path / "cache"))
    assert f"not built: images build qemu --version 10.0" in show.stdout
    assert not (tmp_path / "cache" / "qemu").exists()
