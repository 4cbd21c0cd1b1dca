"""The package's metadata holds: a file beside its modules reaches a wheel (and a non-editable
install) only where pyproject.toml names it as package data, and every pinned dependency installs on
the oldest Python the package accepts."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "deformable_detr"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_file_beside_the_modules_is_package_data():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["deformable_detr"]
    shipped = {path for pattern in patterns for path in PACKAGE.glob(pattern)}
    data = {path for path in PACKAGE.rglob("*") if path.is_file() and path.suffix not in (".py", ".pyc")}
    assert data  # the page's assets and the kernel's source at least
    assert sorted(path.relative_to(PACKAGE).as_posix() for path in data - shipped) == []


def pinned_requirements() -> list[Requirement]:
    """The dependencies and every extra's, where pinned to one version (a looser one lets pip pick
    an older release for an older Python)."""
    project = PYPROJECT["project"]
    lines = [*project["dependencies"], *(line for extra in project["optional-dependencies"].values() for line in extra)]
    requirements = [Requirement(line) for line in lines]
    return [requirement for requirement in requirements if any(spec.operator == "==" for spec in requirement.specifier)]


def test_every_pinned_dependency_installs_on_the_oldest_python_accepted():
    oldest = next(spec.version for spec in SpecifierSet(PYPROJECT["project"]["requires-python"]) if spec.operator == ">=")
    refusing = []
    for requirement in pinned_requirements():
        try:
            installed = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:  # an extra not installed here (deploy's openvino)
            continue
        accepted = installed.metadata["Requires-Python"]
        if installed.version in requirement.specifier and accepted and not SpecifierSet(accepted).contains(oldest):
            refusing.append(f"{requirement} needs Python {accepted}")
    assert refusing == []
