"""Resources pytest-xdist workers (and any two harness processes) share, without a VM:
the SSH forwarding port (harness.vm.machine.reserve_port), the run-directory sweep
(a live worker's run directory is never swept), per-test artifacts folders and the
JUnit XML properties of a run with ``-n 2``."""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.pytest_plugin import _slug
from harness.vm.machine import RUN_PREFIX, owned_run_dirs, reserve_port, sweep_stale_run_dirs
from tests.unit.test_junit_properties import CONFTEST, TESTS

pytest_plugins = ["pytester"]


# ---------------------------------------------------------------- the SSH port
def _reuse_listener(port: int) -> socket.socket:
    """What libslirp's tcp_listen() does for a hostfwd rule: SO_REUSEADDR, bind, listen."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
    except BaseException:
        s.close()
        raise
    return s


def test_a_reserved_port_is_refused_to_other_binds_but_not_to_qemus_listener() -> None:
    with reserve_port() as hold:
        port = hold.getsockname()[1]
        other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with other, pytest.raises(OSError) as info:
            other.bind(("127.0.0.1", port))  # another worker picking a "free" port
        assert info.value.errno == errno.EADDRINUSE
        with _reuse_listener(port):
            with pytest.raises(OSError) as info:
                _reuse_listener(port).close()  # a second QEMU on the same port
            assert info.value.errno == errno.EADDRINUSE
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass


def test_reserved_ports_are_distinct_while_held() -> None:
    held = [reserve_port() for _ in range(64)]
    try:
        ports = [s.getsockname()[1] for s in held]
        assert len(set(ports)) == len(ports)
        for _ in range(500):  # bind(0) elsewhere (another worker's choice) never lands on one
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                assert s.getsockname()[1] not in ports
    finally:
        for s in held:
            s.close()


def test_qemu_forwards_a_reserved_port_and_a_second_qemu_is_refused(tmp_path: Path) -> None:
    """The real QEMU (paused with -S, no guest): its slirp hostfwd listens on the held
    port; a second QEMU asking for the same port exits with the message VM.launch
    retries on."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")

    def start(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([qemu, "-nodefaults", "-no-user-config", "-display", "none", "-S",
                                 "-machine", "q35,accel=tcg", "-netdev",
                                 f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
                                 "-device", "virtio-net-pci,netdev=n0"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    with reserve_port() as hold:
        port = hold.getsockname()[1]
        first = start(port)
        try:
            deadline = time.monotonic() + 30
            while True:
                assert first.poll() is None, first.communicate()[0]
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "QEMU never listened on the reserved port"
                    time.sleep(0.1)
            second = start(port)
            out, _ = second.communicate(timeout=60)
            assert second.returncode != 0
            assert b"host forwarding" in out.lower(), out
        finally:
            first.kill()
            first.wait()


# ---------------------------------------------------------------- run directories
@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of another live process (a stand-in for another xdist worker)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _run_dir(base: Path, name: str, owner: int | None) -> Path:
    d = base / (RUN_PREFIX + name)
    d.mkdir()
    if owner is not None:
        (d / "owner.pid").write_text(str(owner))
    return d


def test_sweep_removes_only_run_dirs_whose_owner_is_gone(tmp_path: Path, live_pid: int) -> None:
    import os
    other = _run_dir(tmp_path, "other-worker", live_pid)
    mine = _run_dir(tmp_path, "mine", os.getpid())
    stale = _run_dir(tmp_path, "stale", _dead_pid())
    starting = _run_dir(tmp_path, "starting", None)  # mkdtemp done, owner.pid not yet written
    (starting / "owner.pid").write_text("")  # ... or being written
    assert sweep_stale_run_dirs(tmp_path) == [stale]
    assert sorted(tmp_path.iterdir()) == sorted([other, mine, starting])
    assert owned_run_dirs(base=tmp_path) == [mine]
    assert owned_run_dirs(live_pid, base=tmp_path) == [other]


def test_concurrent_sweeps_leave_every_live_workers_run_dir(tmp_path: Path, live_pid: int) -> None:
    """Four processes sweep at once (four workers starting VMs): each stale directory
    goes once, the live ones stay."""
    live = [_run_dir(tmp_path, f"live{i}", live_pid) for i in range(5)]
    for i in range(20):
        _run_dir(tmp_path, f"stale{i}", _dead_pid())
    code = (f"from pathlib import Path; from harness.vm.machine import sweep_stale_run_dirs; "
            f"print(len(sweep_stale_run_dirs(Path({str(tmp_path)!r}))))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(tmp_path.iterdir()) == sorted(live)


# ---------------------------------------------------------------- artifacts and JUnit with -n 2
def test_long_parametrized_ids_get_their_own_artifacts_folders() -> None:
    base = "tests/vm/test_x.py::test_matrix[" + "q35-intel-iommu-caching-mode-nvme-" * 5
    a, b = _slug(base + "qemu-7.2]"), _slug(base + "qemu-8.2]")
    assert a != b and len(a) <= 150 and len(b) <= 150
    assert _slug("tests/vm/test_x.py::test_a[1]") == "tests_vm_test_x.py_test_a_1"


XDIST_CONFTEST = CONFTEST.replace("keep_artifacts = False", "keep_artifacts = True").replace(
    """        def save_artifacts(self, dest, extra):
            Path(dest).mkdir(parents=True, exist_ok=True)""",
    """        def save_artifacts(self, dest, extra):
            import os
            Path(dest).mkdir(parents=True, exist_ok=True)
            with open(Path(dest) / "writers", "a") as fh:
                fh.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")""")

XDIST_TESTS = TESTS + """
    import time

    @pytest.mark.parametrize("n", range(6))
    def test_many(vm, n):
        time.sleep(0.2)  # both workers busy at once
"""


def test_two_workers_keep_junit_properties_and_separate_artifacts(pytester: pytest.Pytester,
                                                                  tmp_path: Path) -> None:
    """The plugin's real vm_factory teardown (stand-in VMs) under ``-n 2``: every test's
    verdict properties reach the controller's JUnit XML, and each test's artifacts
    folder is written by exactly one worker, once per VM."""
    assert XDIST_CONFTEST != CONFTEST
    pytester.makeconftest(XDIST_CONFTEST)
    pytester.makepyfile(test_inner=textwrap.dedent(XDIST_TESTS))
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess("-n", "2", f"--junitxml={junit}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=10)
    cases = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}
             for c in ET.parse(junit).getroot().iter("testcase")}
    assert cases["test_ok"]["vm0.status"] == "ok"
    assert cases["test_two_vms"]["good.status"] == "ok" and cases["test_two_vms"]["bad.status"] == "divergence"
    for n in range(6):
        assert cases[f"test_many[{n}]"]["vm0.xen-grant.grants"] == "26"
    folders = sorted(p.parent for p in (pytester.path / "artifacts").rglob("writers"))
    assert len(folders) == 10  # test_ok, test_untraced, test_many x6: vm0; test_two_vms: good, bad
    workers = set()
    for folder in folders:
        lines = (folder / "writers").read_text().split()
        assert len(lines) == 1, (folder, lines)
        workers.add(lines[0])
    assert workers == {"gw0", "gw1"}


# ---------------------------------------------------------------- temporary folders of workers
def test_a_workers_tmp_path_leaves_room_for_unix_sockets(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Run inside an xdist worker (by the test below, or by any ``pytest -n``): the root
    conftest.py drops xdist's ``popen-`` prefix from the worker's temporary folder, so
    tests/vm/test_faults.py's run directories keep their sockets under 108 bytes."""
    if not hasattr(request.config, "workerinput"):
        pytest.skip("meaningful only in a pytest-xdist worker (the next test runs it in one)")
    assert not any(part.startswith("popen-") for part in tmp_path.parts), tmp_path
    assert tmp_path.parent.name == request.config.workerinput["workerid"], tmp_path


def test_worker_tmp_paths_in_two_workers() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider",
                           "tests/unit/test_xdist_parallel.py::test_a_workers_tmp_path_leaves_room_for_unix_sockets"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:]
