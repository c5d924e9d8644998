"""The guest kernel: Debian's ``linux-source-6.12`` (bookworm-backports) built as
x86_64 ``defconfig`` + ``kvm_guest.config`` + the project fragment
``images/kernel.fragment``, everything built in (no modules).

Other Linux versions are built the same way from another Debian source package
(:data:`KERNEL_SOURCES`: ``7.2`` is ``linux-source-7.2`` of trixie-backports), with
the same fragment and required-option check, plus ``images/kernel-<version>.fragment``
merged after the common fragment when that file exists. A version names its
differences explicitly (:class:`KernelSource`: required options renamed or gone in
it); nothing is dropped silently. :func:`resolve_kernel_choice` turns what a user
typed (``--kernel 7.2``, ``--dma-kernel``, ``DMA_HARNESS_KERNEL``) into a version or
a bzImage path.

Cache key: sha256 over the recipe (package, suite, fragment, required list, recipe
version; for a version other than the default also the version and its own
fragment). The default version's key is what it always was. The resolved Debian
package version is recorded in ``manifest.json``; a rebuild against a newer package
is asked for with ``refresh=True``.

Raises :class:`~harness.errors.KernelConfigError` naming every required option that
did not survive ``olddefconfig``; other failed steps raise
:class:`~harness.errors.ImageError` naming their log file.

images/kernel.required lists every option the project's kernel must have (for every
device the harness knows). A user's own kernel is checked only against what its
machine needs (:meth:`harness.vm.spec.MachineSpec.kernel_needs`: each device's
options plus the harness's own), with :func:`check_kernel`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import as_file
from pathlib import Path

from harness.errors import ConfigError, ImageError, KernelConfigError
from harness.images.apt import download
from harness.images.cache import ImageCache, content_key, recipes_dir
from harness.images.steps import announce, run_step

KERNEL_PACKAGE = "linux-source-6.12"
KERNEL_SUITE = "bookworm-backports"
RECIPE_VERSION = "kernel-recipe-1"


@dataclass(frozen=True)
class KernelSource:
    """One Linux version the project builds: Debian's source ``package`` from ``suite``
    (fetched with a private apt state, :mod:`harness.images.apt`).

    ``renamed``: required option (images/kernel.required name) -> its name in this
    version; ``gone``: required option -> why this version has no such option.
    Both are applied to the required-option check of this version's build, and
    named in its build log.
    """

    version: str
    package: str
    suite: str
    renamed: Mapping[str, str] = field(default_factory=dict)
    gone: Mapping[str, str] = field(default_factory=dict)

    @property
    def fragment_name(self) -> str:
        """The version's own fragment (merged after images/kernel.fragment when it exists)."""
        return f"kernel-{self.version}.fragment"

    def fragment(self) -> bytes | None:
        """The bytes of images/kernel-<version>.fragment, or None when the version has none."""
        f = recipes_dir() / self.fragment_name
        return f.read_bytes() if f.is_file() else None

    def required(self, names: Sequence[str]) -> list[str]:
        """``names`` (required options) as this version spells them, without the gone ones."""
        return [self.renamed.get(n, n) for n in names if n not in self.gone]


DEFAULT_KERNEL_VERSION = "6.12"
KERNEL_SOURCES: dict[str, KernelSource] = {
    "6.12": KernelSource("6.12", KERNEL_PACKAGE, KERNEL_SUITE),
    "7.2": KernelSource("7.2", "linux-source-7.2", "trixie-backports"),
}
"""The Linux versions the project builds, by version name (``--kernel 7.2``)."""

KERNEL_ENV = "DMA_HARNESS_KERNEL"
DEFAULT_NAME = "default"
"""The version name of the project's default kernel (:data:`DEFAULT_KERNEL_VERSION`)."""
_VERSION_NAME = re.compile(r"[0-9]+\.[0-9]+")


def kernel_source(version: str | None = None) -> KernelSource:
    """The :class:`KernelSource` of ``version`` (None or ``default``: :data:`DEFAULT_KERNEL_VERSION`).

    Raises:
        ConfigError: ``version`` is not one of :data:`KERNEL_SOURCES` (the message
            names the value and the known versions).
    """
    name = DEFAULT_KERNEL_VERSION if version in (None, DEFAULT_NAME) else version
    assert name is not None
    try:
        return KERNEL_SOURCES[name]
    except KeyError:
        raise ConfigError(f"kernel version {name!r} is not one the project builds (known: "
                          f"{', '.join([DEFAULT_NAME, *KERNEL_SOURCES])})", key="kernel") from None


def is_version_name(value: str) -> bool:
    """Whether a ``--kernel`` value is meant as a version name rather than a bzImage
    path: ``default`` or ``MAJOR.MINOR`` (``7.2``), as for QEMU
    (:func:`harness.images.qemu.is_version_name`). A file literally named like that
    is given as ``./7.2``."""
    return value == DEFAULT_NAME or _VERSION_NAME.fullmatch(value) is not None


@dataclass(frozen=True)
class KernelChoice:
    """What a ``--kernel`` value means: the project's build of ``version`` (``path``
    None), or the user's bzImage ``path`` (``version`` None)."""

    version: str | None
    path: str | None

    @property
    def label(self) -> str:
        """``kernel-7.2`` for a version, ``kernel-<file name>`` for a path (test ids)."""
        return f"kernel-{self.version}" if self.version else f"kernel-{Path(self.path or '').name}"


def resolve_kernel_choice(value: str | None, *, option: str = "--kernel") -> KernelChoice:
    """Resolve a kernel option value without touching any file: None, ``""`` or
    ``default`` -> :data:`DEFAULT_KERNEL_VERSION`; a version name
    (:func:`is_version_name`) -> that version, which must be one the project builds;
    anything else -> a bzImage path (checked when it is read: :func:`read_user_kernel`).

    Raises:
        ConfigError: a version name the project does not build; the one line names
            ``option``, the value and the known versions, and says how to give a
            file of that name.
    """
    if not value or value == DEFAULT_NAME:
        return KernelChoice(DEFAULT_KERNEL_VERSION, None)
    if not is_version_name(value):
        return KernelChoice(None, value)
    if value not in KERNEL_SOURCES:
        raise ConfigError(f"{option} {value!r} is not a kernel version the project builds (known: "
                          f"{', '.join([DEFAULT_NAME, *KERNEL_SOURCES])})"
                          + ("" if option == "--version" else f"; for a bzImage file of that name give ./{value}"),
                          key=option)
    return KernelChoice(value, None)


def resolve_kernel_option(value: str | None, cache: ImageCache, *, build: bool = True,
                          option: str = "--kernel") -> KernelImage:
    """Turn a ``--kernel`` / ``--dma-kernel`` / ``DMA_HARNESS_KERNEL`` value into a
    kernel (:func:`resolve_kernel_choice`): a version -> the project's build in
    ``cache``, built first if missing (with ``build`` False, a missing build is an
    error naming the build command); a path -> :func:`read_user_kernel` (nothing
    checked yet: :func:`check_kernel` against what the machine needs).

    Raises:
        ConfigError: an unknown version name, or (``build`` False) a version not built yet.
        ImageError: building failed, or the path is not an x86 bzImage.
    """
    choice = resolve_kernel_choice(value, option=option)
    if choice.path is not None:
        return read_user_kernel(choice.path)
    if build:
        return ensure_kernel(cache, version=choice.version)
    found = cached_kernel(cache, version=choice.version)
    if found is None:
        raise ConfigError(f"kernel {choice.version} is not built in {cache.root}: run "
                          f"python -m harness images build kernel --version {choice.version}", key=option)
    return found


class KernelConfigWarning(UserWarning):
    """A user-supplied kernel whose required options cannot be confirmed."""


@dataclass(frozen=True)
class KernelImage:
    """A bootable x86 kernel: ``bzimage`` path and, if known, its ``.config`` path.
    ``kconfig`` holds the parsed configuration when it was read (a user's kernel,
    possibly from its embedded IKCONFIG)."""

    bzimage: Path
    config: Path | None
    origin: str  # "built <key> (<package version>)" or "user"
    kconfig: dict[str, str] | None = field(default=None, compare=False, repr=False)

    def options(self) -> dict[str, str] | None:
        if self.kconfig is not None:
            return self.kconfig
        if self.config is None:
            return None
        return parse_kconfig(self.config.read_text(errors="replace"))


def required_options() -> list[str]:
    """Option names (without ``CONFIG_``) that must be ``=y``, from images/kernel.required."""
    text = (recipes_dir() / "kernel.required").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def parse_kconfig(text: str) -> dict[str, str]:
    """``CONFIG_FOO=y`` lines -> ``{"FOO": "y"}``; ``# CONFIG_FOO is not set`` -> ``"n"``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            out[name[len("CONFIG_"):]] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[len("# CONFIG_"):-len(" is not set")]] = "n"
    return out


def missing_options(options: Mapping[str, str], required: Sequence[str] | None = None) -> list[str]:
    """Required option names (default: images/kernel.required) whose value is not ``y``."""
    return [name for name in (required_options() if required is None else required) if options.get(name) != "y"]


def kernel_patches() -> list[str]:
    """Names of the planted-bug patches in images/patches/ (``NAME.patch``; a
    ``NAME@VERSION.patch`` beside it is that patch for another kernel version, not
    another name)."""
    folder = recipes_dir() / "patches"
    return sorted(p.name[:-len(".patch")] for p in folder.iterdir()
                  if p.name.endswith(".patch") and "@" not in p.name) if folder.is_dir() else []


def patch_file_name(name: str, version: str | None = None) -> str:
    """The file of planted-bug patch ``name`` for kernel ``version`` (None: the
    default): ``NAME@VERSION.patch`` when the source of that version needs its own
    (the lines the patch touches differ), else ``NAME.patch``.

    Raises ImageError for an unknown patch name.
    """
    if name not in kernel_patches():
        raise ImageError(f"unknown kernel patch {name!r} (known: {', '.join(kernel_patches()) or 'none'})")
    source = kernel_source(version)
    variant = f"{name}@{source.version}.patch"
    if source.version != DEFAULT_KERNEL_VERSION and (recipes_dir() / "patches" / variant).is_file():
        return variant
    return f"{name}.patch"


def _patch_file(name: str, version: str | None = None) -> bytes:
    return (recipes_dir() / "patches" / patch_file_name(name, version)).read_bytes()


def recipe_key(patch: str | None = None, version: str | None = None) -> str:
    """The cache key of the project's kernel of ``version`` (None: the default,
    :data:`DEFAULT_KERNEL_VERSION`), or of a variant with the planted-bug patch
    ``patch`` (images/patches/PATCH.patch) applied to the source before the build.

    The default version's recipe is package, suite, fragment, required list and
    recipe version (its keys are unchanged by the versions added later); another
    version's also holds the version name and its own fragment, if any.

    Raises ImageError for an unknown patch name, ConfigError for an unknown version.
    """
    source = kernel_source(version)
    r = recipes_dir()
    recipe: dict[str, str | bytes] = {
        "recipe": RECIPE_VERSION,
        "package": source.package,
        "suite": source.suite,
        "fragment": (r / "kernel.fragment").read_bytes(),
        "required": (r / "kernel.required").read_bytes(),
    }
    if source.version != DEFAULT_KERNEL_VERSION:
        recipe["version"] = source.version
        recipe["version-fragment"] = source.fragment() or b""
        recipe["renamed"] = json.dumps(dict(source.renamed), sort_keys=True)
        recipe["gone"] = json.dumps(sorted(source.gone))
    if patch is not None:
        recipe["patch"] = _patch_file(patch, source.version)
    return content_key(recipe)


def ensure_kernel(cache: ImageCache, *, refresh: bool = False, jobs: int | None = None,
                  patch: str | None = None, version: str | None = None) -> KernelImage:
    """Return the cached kernel of ``version`` (None: the default; with ``patch``
    applied, if given), building it first if needed (about 9 min on 2 cores for
    6.12).

    Raises:
        ConfigError: an unknown version.
        ImageError: an unknown patch, or a build step failed (names its log).
        KernelConfigError: a required option did not survive ``olddefconfig``.
    """
    key = recipe_key(patch, version)
    with cache.lock("kernel", key):
        if refresh and cache.complete("kernel", key):
            shutil.rmtree(cache.entry("kernel", key))
        if not cache.complete("kernel", key):
            _build(cache, key, jobs or os.cpu_count() or 1, patch, kernel_source(version))
    kernel = cached_kernel(cache, patch=patch, version=version)
    assert kernel is not None
    return kernel


def cached_kernel(cache: ImageCache, *, patch: str | None = None, version: str | None = None) -> KernelImage | None:
    """The project's kernel of ``version`` (None: the default; or its ``patch``
    variant) if it is built and cached, else None; never builds."""
    source = kernel_source(version)
    key = recipe_key(patch, version)
    if not cache.complete("kernel", key):
        return None
    entry = cache.entry("kernel", key)
    manifest = cache.manifest("kernel", key)
    variant = f" + {patch}.patch" if patch else ""
    return KernelImage(entry / "bzImage", entry / "config",
                       f"built {key} ({source.package} {manifest['version']}{variant})")


def kernel_release(bzimage: str | os.PathLike[str]) -> str | None:
    """The kernel release of an x86 bzImage (``uname -r``: ``6.12.95``), read from its
    boot header, or None when the file has none (not a bzImage, boot protocol
    before 2.00, an unreadable file).

    Source: Documentation/arch/x86/boot.rst, field ``kernel_version`` (offset 0x20E):
    a pointer to a NUL-terminated string (``"6.12.95 (user@host) #1 SMP ..."``, from
    arch/x86/boot/version.c) at that value + 0x200 in the file.
    """
    try:
        with open(bzimage, "rb") as fh:
            header = fh.read(0x210)
            if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
                return None
            pointer = int.from_bytes(header[0x20E:0x210], "little")
            if not pointer:
                return None
            fh.seek(pointer + 0x200)
            text = fh.read(256).split(b"\0", 1)[0].decode("ascii", errors="replace")
    except OSError:
        return None
    release = text.split(" ", 1)[0]
    return release or None


KernelNeeds = Mapping[str, Sequence[str]]
"""Kernel options (without ``CONFIG_``) that must be ``=y``, each with what needs it."""


def project_needs() -> dict[str, list[str]]:
    """Every option of images/kernel.required, needed by "the project's kernel"."""
    return {name: ["images/kernel.required"] for name in required_options()}


def user_kernel(path: str | os.PathLike[str], needs: KernelNeeds | None = None) -> KernelImage:
    """A kernel the user brought, checked against ``needs`` (option -> what needs it;
    default: every option of images/kernel.required). See :func:`read_user_kernel`
    and :func:`check_kernel`.

    Raises:
        KernelConfigError: the config is readable and a needed option is missing.
        ImageError: the file does not exist.
    """
    kernel = read_user_kernel(path)
    check_kernel(kernel, project_needs() if needs is None else needs)
    return kernel


def read_user_kernel(path: str | os.PathLike[str]) -> KernelImage:
    """A kernel the user brought, with its configuration read from ``<bzImage>.config``,
    a ``config`` or ``.config`` file beside it, or the embedded IKCONFIG (``kconfig``
    is None when none of them is readable). Nothing is checked here.

    Raises:
        ImageError: the file does not exist, is not a regular file, or is not an
            x86 bzImage (no ``HdrS`` boot protocol header at offset 0x202).
    """
    if "\0" in os.fspath(path):
        raise ImageError(f"kernel {os.fspath(path)!r} is not a valid path (it holds a NUL byte)")
    bz = Path(path).expanduser().resolve()
    if not bz.exists():
        raise ImageError(f"kernel {str(bz)!r} does not exist")
    if not bz.is_file():
        raise ImageError(f"kernel {str(bz)!r} is not a regular file")
    try:
        with open(bz, "rb") as fh:
            header = fh.read(0x206)
    except OSError as exc:
        raise ImageError(f"kernel {str(bz)!r} cannot be read: {exc.strerror}") from None
    if header[0x202:0x206] != b"HdrS":
        raise ImageError(f"kernel {str(bz)!r} is not an x86 bzImage (no 'HdrS' boot header at offset 0x202)")
    config_path: Path | None = None
    for cand in (bz.with_name(bz.name + ".config"), bz.parent / "config", bz.parent / ".config"):
        if cand.is_file():
            config_path = cand
            break
    text = config_path.read_text(errors="replace") if config_path else extract_ikconfig(bz)
    return KernelImage(bz, config_path, "user", parse_kconfig(text) if text is not None else None)


def check_kernel(kernel: KernelImage, needs: KernelNeeds) -> None:
    """Check that ``kernel`` has every option of ``needs`` built in (``=y``).

    A kernel whose configuration cannot be read gives a :class:`KernelConfigWarning`
    naming the options it could not confirm, and passes.

    Raises:
        KernelConfigError: an option is missing; the message names each missing
            option and what needs it (a device kind, "the harness").
    """
    wanted = sorted(needs)
    options = kernel.options()
    if options is None:
        warnings.warn(
            f"cannot read the configuration of {kernel.bzimage}: required options not confirmed: "
            + _describe(wanted, needs), KernelConfigWarning, stacklevel=2)
        return
    missing = missing_options(options, wanted)
    if missing:
        raise KernelConfigError(f"kernel {kernel.bzimage} lacks options: {_describe(missing, needs)}",
                                missing=missing)


def _describe(names: Sequence[str], needs: KernelNeeds) -> str:
    """``CONFIG_A (needed by x), CONFIG_B (needed by y, z)``."""
    return ", ".join(f"CONFIG_{n} (needed by {', '.join(needs[n])})" for n in names)


def extract_ikconfig(bzimage: Path) -> str | None:
    """The embedded ``.config`` of a kernel built with CONFIG_IKCONFIG, or None.

    Like the kernel's scripts/extract-ikconfig: find a gzip or xz stream in the
    image, decompress it, and look for the IKCFG_ST marker followed by a gzip blob.
    """
    data = bzimage.read_bytes()
    candidates: list[bytes] = [data]
    for magic, opener in ((b"\x1f\x8b\x08", "gzip"), (b"\xfd7zXZ\x00", "xz")):
        pos = data.find(magic)
        while pos != -1 and len(candidates) < 8:
            try:
                # One stream, whatever follows it (the rest of the bzImage is not gzip).
                if opener == "gzip":
                    candidates.append(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[pos:]))
                else:
                    candidates.append(lzma.LZMADecompressor().decompress(data[pos:]))
                break
            except (zlib.error, EOFError, lzma.LZMAError):
                pos = data.find(magic, pos + 1)
    for blob in candidates:
        i = blob.find(b"IKCFG_ST")
        if i != -1:
            try:
                return gzip.decompress(blob[i + 8:blob.find(b"IKCFG_ED", i)]).decode(errors="replace")
            except (OSError, EOFError):
                continue
    return None


def _build(cache: ImageCache, key: str, jobs: int, patch: str | None = None,
           source: KernelSource | None = None) -> None:
    started = time.monotonic()
    source = source or kernel_source()
    build = cache.path("kernel", f"{key}.build")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    log = cache.path("kernel", f"{key}.log")
    log.write_text(f"kernel build {key}\n")
    announce(f"building guest kernel {key} from {source.package} ({source.suite}); log: {log}")
    deb, version = download(cache, source.package, source.suite, log=log)
    src = _configure(build, deb, log, patch, source)
    run_step(f"make -j{jobs} bzImage (about 9 min on 2 cores for 6.12)",
             ["make", "-C", src, f"-j{jobs}", "bzImage"], log=log)
    with cache.building("kernel", key) as out:
        shutil.copy2(src / "arch" / "x86" / "boot" / "bzImage", out / "bzImage")
        shutil.copy2(src / ".config", out / "config")
        shutil.copy2(log, out / "build.log")
        (out / "manifest.json").write_text(json.dumps({
            "key": key, "package": source.package, "suite": source.suite, "version": version, "patch": patch,
            "kernel_version": source.version, "release": kernel_release(out / "bzImage"),
            "deb_sha256": _sha256(deb), "build_seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
    if not os.environ.get("DMA_HARNESS_KEEP_BUILD"):
        shutil.rmtree(build, ignore_errors=True)
        os.unlink(deb)
    announce(f"kernel ready: {cache.entry('kernel', key) / 'bzImage'}")


def _configure(build: Path, deb: Path, log: Path, patch: str | None, source: KernelSource) -> Path:
    """Unpack ``deb``'s source into ``build``, apply ``patch``, make the ``.config``
    (defconfig, kvm_guest.config, the fragments, olddefconfig) and check the required
    options as ``source`` spells them. Returns the source tree.

    Raises:
        ImageError: a step failed (names the log).
        KernelConfigError: a required option did not survive ``olddefconfig``.
    """
    run_step("unpack .deb", ["dpkg-deb", "-x", deb, build / "deb"], log=log)
    tarballs = list((build / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
    if not tarballs:
        raise ImageError(f"no linux-source tarball inside {deb}", log=str(log))
    run_step("unpack kernel source", ["tar", "-x", "--use-compress-program=xz -T0", "-f", tarballs[0],
                                      "-C", build], log=log)
    shutil.rmtree(build / "deb")
    src = next(p for p in build.iterdir() if p.is_dir() and p.name.startswith("linux-source"))
    if patch is not None:
        patch_name = patch_file_name(patch, source.version)
        patch_path = build / patch_name
        patch_path.write_bytes(_patch_file(patch, source.version))
        run_step(f"apply {patch_name}", ["patch", "-p1", "--forward", "-d", src, "-i", patch_path], log=log)
    run_step("make defconfig", ["make", "-C", src, "defconfig"], log=log)
    run_step("make kvm_guest.config", ["make", "-C", src, "kvm_guest.config"], log=log)
    fragments = [recipes_dir() / "kernel.fragment"]
    if source.fragment() is not None:
        fragments.append(recipes_dir() / source.fragment_name)
    with contextlib.ExitStack() as stack:
        paths = [stack.enter_context(as_file(f)) for f in fragments]
        run_step("merge fragment" + ("s" if len(paths) > 1 else ""),
                 [src / "scripts" / "kconfig" / "merge_config.sh", "-m", "-O", src, src / ".config", *paths],
                 log=log)
    run_step("make olddefconfig", ["make", "-C", src, "olddefconfig"], log=log)
    with open(log, "a") as fh:
        for old, new in sorted(source.renamed.items()):
            fh.write(f"required option CONFIG_{old} is CONFIG_{new} in Linux {source.version}\n")
        for old, why in sorted(source.gone.items()):
            fh.write(f"required option CONFIG_{old} is not checked in Linux {source.version}: {why}\n")
    missing = missing_options(parse_kconfig((src / ".config").read_text()), source.required(required_options()))
    if missing:
        raise KernelConfigError(
            f"required kernel options did not survive olddefconfig (Linux {source.version}): "
            + ", ".join("CONFIG_" + m for m in missing), missing=missing, log=str(log))
    return src


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
