"""atomic_write: the whole file or the previous one, with a new file's usual permissions."""

from __future__ import annotations

import pytest

from deformable_detr.files import atomic_write


def test_written_file_has_the_permissions_of_any_new_file(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    with atomic_write(tmp_path / "atomic.txt") as temporary:
        temporary.write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_failure_keeps_the_previous_content_and_no_temporary_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("before")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "before" and list(tmp_path.iterdir()) == [path]
