"""Packaging guard: every package folder is mapped in pyproject.toml and declares ``__all__``.

A wheel silently drops a package that `[tool.setuptools] packages` does not list, and a folder
that `package-dir` does not map lands under the wrong import name.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Folders under the repository root that are not part of the package.
_NOT_PACKAGES = {"build", "dist", "tests", "bench", "data", "node_modules"}


def _package_folders() -> dict[str, Path]:
    """Import name -> folder, for every folder under the root holding an ``__init__.py``."""
    found: dict[str, Path] = {}
    for top in sorted(REPO_ROOT.iterdir()):
        if not top.is_dir() or top.name in _NOT_PACKAGES or top.name.startswith("."):
            continue  # not walked at all: .venv and build/ hold other copies of packages
        if top.name.endswith(".egg-info"):
            continue
        for init in sorted(top.rglob("__init__.py")):
            rel = init.parent.relative_to(REPO_ROOT)
            found["personify." + ".".join(rel.parts)] = init.parent
    return found


def _setuptools() -> dict[str, object]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        table: dict[str, object] = tomllib.load(fh)["tool"]["setuptools"]
    return table


def _resolve(name: str, package_dir: dict[str, str]) -> Path | None:
    """The folder setuptools builds ``name`` from: the longest mapped prefix, then the rest."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return REPO_ROOT.joinpath(package_dir[prefix], *parts[cut:])
    return None


PACKAGES = _package_folders()


def test_expected_packages_are_found() -> None:
    """The scan finds the six top-level packages (so the guard below is not vacuous)."""
    expected = {"engine", "agents", "tables", "embeddings", "api", "plugins"}
    assert {f"personify.{name}" for name in expected} <= set(PACKAGES)


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_package_is_listed(name: str) -> None:
    """Every folder with an __init__.py is in [tool.setuptools] packages."""
    packages = _setuptools()["packages"]
    assert isinstance(packages, list)
    assert name in packages, f"add {name!r} to [tool.setuptools] packages in pyproject.toml"


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_package_dir_maps_folder(name: str) -> None:
    """[tool.setuptools] package-dir maps every package to its own folder."""
    package_dir = _setuptools()["package-dir"]
    assert isinstance(package_dir, dict)
    resolved = _resolve(name, package_dir)
    assert resolved is not None, f"map {name!r} in [tool.setuptools] package-dir"
    assert resolved.resolve() == PACKAGES[name].resolve()


def test_listed_packages_exist() -> None:
    """Every package listed in pyproject.toml is a folder with an __init__.py."""
    table = _setuptools()
    packages, package_dir = table["packages"], table["package-dir"]
    assert isinstance(packages, list)
    assert isinstance(package_dir, dict)
    assert set(package_dir) <= set(packages)
    for name in packages:
        folder = _resolve(name, package_dir)
        assert folder is not None, name
        assert (folder / "__init__.py").is_file(), name


def _has_all(init: Path) -> bool:
    tree = ast.parse(init.read_text(), filename=str(init))
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return True
    return False


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_package_declares_all(name: str) -> None:
    """Every package's __init__.py declares its public surface in __all__."""
    assert _has_all(PACKAGES[name] / "__init__.py"), f"{name}: add __all__ to __init__.py"
