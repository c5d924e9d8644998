"""Packaging: the image recipes and the guest agent are package data, read through
importlib.resources, so an installed wheel works from any directory."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.resources import files
from pathlib import Path

from harness.images.cache import RECIPES_PACKAGE, recipes_dir
from harness.images.kernel import recipe_key
from harness.images.rootfs import _agent_files, base_key

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["kernel.fragment", "kernel.required", "host-packages", "rootfs/init", "rootfs/init.usr", "rootfs/fstab.usr", "rootfs/start-agent", "rootfs/packages",
           "rootfs/sshd_config"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _recipe_files() -> set[str]:
    """Every file of the images/ folder (relative names), but its package marker."""
    return {p.relative_to(ROOT / "images").as_posix() for p in (ROOT / "images").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")}


def test_recipe_files_are_found_through_importlib_resources():
    recipes = files(RECIPES_PACKAGE)
    for name in sorted(_recipe_files()):
        resource = recipes.joinpath(*name.split("/"))
        assert resource.is_file(), name
        assert resource.read_bytes() == (ROOT / "images" / name).read_bytes(), name
    assert str(recipes_dir()) == str(recipes)


def test_guest_agent_is_found_through_importlib_resources():
    agent = _agent_files()
    assert "opt/dma-harness/guest_agent/__main__.py" in agent
    assert agent["opt/dma-harness/guest_agent/protocol.py"] == files("guest_agent").joinpath("protocol.py").read_bytes()


def test_every_package_and_recipe_is_declared():
    config = _pyproject()["tool"]["setuptools"]
    declared = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("harness", "guest_agent")
               for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk - declared == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"][RECIPES_PACKAGE] == "images"
    patterns = config["package-data"][RECIPES_PACKAGE]
    recipe_files = _recipe_files()
    assert set(RECIPES) <= recipe_files
    for name in recipe_files:
        assert any(Path(name).match(pattern) and len(Path(name).parts) == len(Path(pattern).parts)
                   for pattern in patterns), f"{name} is not package data"


def test_wheel_carries_recipes_and_agent_and_works_from_elsewhere(tmp_path):
    """Build the wheel as `pip wheel .` does (setuptools from the registry), unpack it, and
    compute the recipe keys from another directory: they equal the source tree's."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("harness", "guest_agent", "images"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("dma_harness-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"harness/images/recipes/{n}" for n in _recipe_files()} <= names
    assert {"guest_agent/__main__.py", "harness/cli.py"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("from harness.images.cache import recipes_dir\n"
            "from harness.images.kernel import recipe_key\n"
            "from harness.images.rootfs import base_key, _agent_files\n"
            "print(recipes_dir()); print(recipe_key()); print(base_key()); print(len(_agent_files()))\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out[0] == str(site / "harness" / "images" / "recipes")
    assert out[1:3] == [recipe_key(), base_key()]
    assert int(out[3]) == len(_agent_files())
