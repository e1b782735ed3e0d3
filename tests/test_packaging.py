"""What `pip install .` and the container image ship: the product, never the lab.

The wheel is built for real from a copy of this tree (so no build/ or egg-info lands in the
checkout) and its file list is checked: every module of shardwg/ is there, and nothing from
lab/, tests/, fuzz/ or the other top-level folders. The Dockerfile and .dockerignore are
checked to copy only the package into the image's build context.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Floors and folders of the package that must reach every install.
PACKAGES = ("proto", "shm", "io", "config", "datapath", "observe", "uapi", "engine", "container")
NOT_SHIPPED = ("lab", "tests", "fuzz", "scripts", "deploy", "configs", "docs")
_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "*.so",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "bench-out",
)  # fmt: skip


def _can_build_wheel() -> bool:
    """setuptools builds wheels itself from 70.1 on; before, it needs the `wheel` package."""
    spec = importlib.util.find_spec
    return bool(spec("wheel") or spec("setuptools.command.bdist_wheel"))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """(how it was built, the paths an install of this tree gets, relative to site-packages)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(REPO_ROOT, src, ignore=_COPY_IGNORE)
    if _can_build_wheel():
        out = tmp / "wheel"
        cp = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "-q", "-w", str(out), "."],
            cwd=src, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert cp.returncode == 0, cp.stderr[-3000:]
        (wheel,) = out.glob("shardwg-*.whl")
        with zipfile.ZipFile(wheel) as z:
            return "wheel", z.namelist()
    # This venv cannot build a wheel (old setuptools without `wheel`; the test extra
    # installs it): the same setuptools build steps a wheel is made of, minus the zip.
    cp = subprocess.run(
        [sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp / "build")],
        cwd=src, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr[-3000:]
    (lib,) = (tmp / "build").glob("lib*")
    return "setup.py build", [p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()]


def test_every_module_of_the_package_is_shipped(shipped: tuple[str, list[str]]) -> None:
    how, names = shipped
    expected = {
        p.relative_to(REPO_ROOT).as_posix()
        for p in (REPO_ROOT / "shardwg").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(expected - set(names))
    assert not missing, f"{how}: modules left out of the install: {missing}"
    for floor in PACKAGES:
        assert f"shardwg/{floor}/__init__.py" in names, f"{how}: no shardwg/{floor}/"
    assert "shardwg/container/__main__.py" in names  # the image's ENTRYPOINT module


def test_nothing_but_the_package_is_shipped(shipped: tuple[str, list[str]]) -> None:
    how, names = shipped
    tops = {n.split("/", 1)[0] for n in names}
    foreign = sorted(t for t in tops if t != "shardwg" and not t.endswith(".dist-info"))
    assert not foreign, f"{how}: top-level entries besides shardwg/: {foreign}"
    for name in names:
        parts = name.split("/")
        assert not any(p in NOT_SHIPPED for p in parts[:-1]), f"{how}: ships {name}"
        assert parts[-1] != "conftest.py" and not parts[-1].startswith("test_"), name


def test_wheel_metadata_names_the_cli(shipped: tuple[str, list[str]]) -> None:
    how, names = shipped
    if how != "wheel":
        pytest.skip("metadata is written only into a wheel (this venv lacks `wheel`)")
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)
    assert any(n.endswith(".dist-info/METADATA") for n in names)


def _instructions(dockerfile: str) -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    text = "\n".join(ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#"))
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = line.split()
        if words:
            out.append((words[0].upper(), words[1:]))
    return out


def test_image_copies_only_the_package() -> None:
    allowed = {"pyproject.toml", "setup.py", "shardwg", "shardwg/", "./shardwg"}
    copies = [a for op, a in _instructions((REPO_ROOT / "Dockerfile").read_text()) if op in
              ("COPY", "ADD")]  # fmt: skip
    assert copies, "the Dockerfile copies nothing?"
    for args in copies:
        if any(a.startswith("--from=") for a in args):
            continue  # between build stages
        sources = [a for a in args if not a.startswith("--")][:-1]
        assert sources and set(sources) <= allowed, f"COPY of {sources}"
    ignore = [ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]  # fmt: skip
    assert ignore[0] == "*"
    let_in = {ln[1:].strip("/") for ln in ignore if ln.startswith("!")}
    assert let_in <= {"pyproject.toml", "setup.py", "shardwg"}, let_in
    assert not let_in & set(NOT_SHIPPED)


def test_readme_and_architecture_name_every_folder() -> None:
    """The layout table lists every folder of the package and around it; the architecture
    document places every package folder on a floor."""
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout") :]
    arch = (REPO_ROOT / "docs" / "architecture.md").read_text()
    packages = sorted(
        p.parent.relative_to(REPO_ROOT).as_posix()
        for p in (REPO_ROOT / "shardwg").glob("*/__init__.py")
    )
    assert len(packages) >= len(PACKAGES)
    for folder in packages:
        assert f"| `{folder}/` |" in table, f"README layout table lacks {folder}/"
        assert f"`{folder}/`" in arch, f"docs/architecture.md lacks {folder}/"
    for folder in ("lab", "fuzz", "scripts", "deploy", "configs", "docs", "tests"):
        assert f"| `{folder}/` |" in table, f"README layout table lacks {folder}/"
