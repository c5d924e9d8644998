"""The split root (harness.images.usr_image) from a small synthetic root tarball:
``/usr`` in an erofs image (read back with erofs-utils' dump.erofs), everything else
in ``rest.cpio``, the trim list applied to both, busybox copied out."""

import io
import shutil
import subprocess
import tarfile

import pytest

from harness.errors import ImageError
from harness.images import usr_image
from harness.images.cpio import tar_to_newc

pytestmark = pytest.mark.skipif(shutil.which("dump.erofs") is None or not usr_image.mkfs_available(),
                                reason="erofs-utils is not installed (images/host-packages lists it)")

MTIME = 1_700_000_000


def _tar(path, *, busybox=True):
    with tarfile.open(path, "w") as tar:
        def add(name, data=None, *, kind=tarfile.REGTYPE, link="", mode=0o644):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode, info.mtime = kind, link, mode, MTIME
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        for d in ("./", "./etc", "./usr", "./usr/bin", "./usr/lib", "./usr/share", "./usr/share/doc"):
            add(d, kind=tarfile.DIRTYPE, mode=0o755)
        add("./etc/hostname", b"guest\n")
        add("./bin", kind=tarfile.SYMTYPE, link="usr/bin")
        if busybox:
            add("./usr/bin/busybox", b"\x7fELF busybox", mode=0o755)
        add("./usr/lib/os.py", b"# os\n")
        add("./usr/share/doc/README", b"trimmed")
        add("./usr/lib/readme-link", kind=tarfile.LNKTYPE, link="./usr/share/doc/README")


def _trim(name):
    return name.startswith("usr/share/doc/")


def _erofs_stat(image, path):
    """dump.erofs's description of ``path`` in ``image``, or None when it is not there
    (erofs-utils 1.5 exits 0 with an error message then)."""
    done = subprocess.run(["dump.erofs", f"--path={path}", str(image)], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 and "File :" in done.stdout else None


def test_build_splits_usr_from_the_rest(tmp_path):
    _tar(tmp_path / "root.tar")
    sizes = usr_image.build(tmp_path / "root.tar", tmp_path, skip=_trim, log=tmp_path / "log")
    image = tmp_path / usr_image.USR_IMAGE
    assert image.stat().st_size % usr_image.ALIGN == 0 and sizes[usr_image.USR_IMAGE] == image.stat().st_size
    found = _erofs_stat(image, "/lib/os.py")
    assert found is not None and "0644" in found and "Uid: 0" in found
    assert "Timestamp: 2023-11-14 22:13:20" in found  # MTIME: bytecode caches compare it
    assert _erofs_stat(image, "/bin/busybox") is not None
    assert _erofs_stat(image, "/share/doc/README") is None  # trimmed
    assert _erofs_stat(image, "/lib/readme-link") is None  # a hard link to a trimmed file
    assert (tmp_path / usr_image.BUSYBOX).read_bytes() == b"\x7fELF busybox"
    tar_to_newc(tmp_path / "root.tar", tmp_path / "full.cpio", skip=_trim)
    rest = (tmp_path / usr_image.REST_CPIO).read_bytes()
    names = subprocess.run(["cpio", "-it", "--quiet"], input=rest, capture_output=True, check=True).stdout.split()
    assert sorted(names) == [b"bin", b"etc", b"etc/hostname", b"usr"]  # /usr: the mount point only
    assert len(rest) < (tmp_path / "full.cpio").stat().st_size
    assert not (tmp_path / "usr-tree").exists()


def test_a_root_without_busybox_is_refused_in_one_line(tmp_path):
    _tar(tmp_path / "root.tar", busybox=False)
    with pytest.raises(ImageError, match="busybox-static"):
        usr_image.build(tmp_path / "root.tar", tmp_path, skip=_trim, log=tmp_path / "log")
    assert not (tmp_path / "usr-tree").exists()


def test_kernel_can_mount_needs_every_option():
    options = {name: "y" for name in usr_image.REQUIRED_KCONFIG}
    assert usr_image.kernel_can_mount(options)
    assert not usr_image.kernel_can_mount({**options, "EROFS_FS": "m"})
    assert not usr_image.kernel_can_mount(None)
