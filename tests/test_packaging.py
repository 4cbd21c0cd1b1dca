"""The package ships what it reads at run time: a file beside its modules reaches a wheel (and a
non-editable install) only where pyproject.toml names it as package data."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "deformable_detr"


def test_every_file_beside_the_modules_is_package_data():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["deformable_detr"]
    shipped = {path for pattern in patterns for path in PACKAGE.glob(pattern)}
    data = {path for path in PACKAGE.rglob("*") if path.is_file() and path.suffix not in (".py", ".pyc")}
    assert data  # the page's assets and the kernel's source at least
    assert sorted(path.relative_to(PACKAGE).as_posix() for path in data - shipped) == []
