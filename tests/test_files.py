"""atomic_write: the whole file or the previous one, with a new file's usual permissions;
exclusive_lock: one holder at a time, named to the others."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
import warnings

import pytest

from deformable_detr import files
from deformable_detr.files import LockHeld, atomic_write, exclusive_lock


def write_into(temporary):
    temporary.write_text("x")


def replace_with_a_private_file(temporary):
    # As safetensors' save_file does: it writes a file of its own, private, and renames it onto the one given.
    private = temporary.with_name("private")
    private.write_text("x")
    private.chmod(0o600)
    os.replace(private, temporary)


@pytest.mark.parametrize("writer", [write_into, replace_with_a_private_file])
def test_written_file_has_the_permissions_of_any_new_file(tmp_path, writer):
    (tmp_path / "plain.txt").write_text("x")
    with atomic_write(tmp_path / "atomic.txt") as temporary:
        writer(temporary)
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_failure_keeps_the_previous_content_and_no_temporary_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("before")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "before" and list(tmp_path.iterdir()) == [path]


def test_a_folder_where_the_file_goes_is_named_before_anything_is_written(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError) as error:
        with atomic_write(tmp_path / "out") as temporary:
            pytest.fail(f"{temporary} was handed out")
    assert str(error.value) == f"{tmp_path / 'out'}: is a folder, not a file"
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]


def test_a_file_where_a_folder_goes_is_named(tmp_path):
    (tmp_path / "slim.pt").write_text("weights")
    with pytest.raises(OSError) as error:
        with atomic_write(tmp_path / "slim.pt" / "x.safetensors"):
            pass
    assert str(error.value) == f"{tmp_path / 'slim.pt' / 'x.safetensors'}: {tmp_path / 'slim.pt'} is a file, not a folder"


@pytest.mark.parametrize("failing", ["tempfile.mkstemp", "os.replace"], ids=["creating", "renaming"])
def test_an_unwritable_destination_is_named_instead_of_the_temporary_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "result.json"
    path.write_text("before")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / ".result.json.x1y2z3.tmp"))

    monkeypatch.setattr(failing, refuse)
    with pytest.raises(PermissionError) as error:
        with atomic_write(path) as temporary:
            temporary.write_text("after")
    assert str(error.value) == f"{path}: cannot write there (Permission denied)"
    assert path.read_text() == "before" and list(tmp_path.iterdir()) == [path]


def test_the_data_reaches_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(dst))) or real_replace(src, dst))
    path = tmp_path / "checkpoint.pt"
    with atomic_write(path) as temporary:
        temporary.write_bytes(b"weights")
    assert events == [("fsync", str(temporary)), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert path.read_bytes() == b"weights"


def refuse_folders(call, error_number: int):
    """``call`` (os.open or os.fsync) raising ``error_number`` for a folder, as a file system that
    cannot sync one does."""

    def refusing(*args, **kwargs):
        target = args[0]
        is_folder = os.path.isdir(target) if isinstance(target, (str, os.PathLike)) else stat.S_ISDIR(os.fstat(target).st_mode)
        if is_folder:
            raise OSError(error_number, os.strerror(error_number))
        return call(*args, **kwargs)

    return refusing


@pytest.mark.parametrize(("call", "error_number"), [
    ("fsync", errno.EINVAL),  # CIFS, some FUSE file systems
    ("fsync", errno.ENOTSUP),
    ("fsync", errno.EBADF),
    ("open", errno.EACCES),  # Windows opens no folder
])
def test_a_folder_the_file_system_cannot_sync_leaves_the_write_done(tmp_path, monkeypatch, call, error_number):
    monkeypatch.setattr(os, call, refuse_folders(getattr(os, call), error_number))
    path = tmp_path / "checkpoint.pt"
    with atomic_write(path) as temporary:
        temporary.write_bytes(b"weights")
    assert path.read_bytes() == b"weights" and list(tmp_path.iterdir()) == [path]


def test_a_disk_that_fails_the_sync_fails_the_write_in_one_line_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"before")

    def failing_fsync(descriptor):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as error:
        with atomic_write(path) as temporary:
            temporary.write_bytes(b"weights")
    assert str(error.value) == f"{path}: cannot write there (Input/output error)"
    assert path.read_bytes() == b"before" and list(tmp_path.iterdir()) == [path]


def test_a_lock_is_refused_to_another_holder_named_in_it_until_let_go(tmp_path):
    path = tmp_path / ".lock"
    # Two opens of the file: flock's locks conflict between them as between processes.
    with exclusive_lock(path) as holder:
        assert holder == path.read_text() == f"process {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(LockHeld) as held:
            with exclusive_lock(path):
                pytest.fail("locked twice")
    assert held.value.holder == holder
    with exclusive_lock(path):
        pass


def test_a_wait_for_a_lock_takes_it_once_let_go_or_gives_up_after_its_time(tmp_path):
    path = tmp_path / ".lock"
    holder = exclusive_lock(path)
    holder.__enter__()
    with pytest.raises(LockHeld):
        with exclusive_lock(path, wait=0.3):
            pytest.fail("locked twice")
    threading.Timer(0.3, holder.__exit__, (None, None, None)).start()
    started = time.monotonic()
    with exclusive_lock(path, wait=60):
        assert 0.3 <= time.monotonic() - started < 60


def test_without_locks_the_block_runs_unlocked_with_a_warning_where_the_file_system_lacks_them(tmp_path, monkeypatch):
    def unsupported(descriptor, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))  # Lustre mounted without -o flock

    monkeypatch.setattr(files.fcntl, "flock", unsupported)
    with pytest.warns(UserWarning) as warned:
        with exclusive_lock(tmp_path / ".lock") as holder:
            assert holder is None  # nothing another process could check it by
    assert [str(warning.message) for warning in warned] == [
        f"{tmp_path / '.lock'}: not locked, as its file system keeps no locks (Function not implemented): nothing "
        f"keeps another process out"]

    monkeypatch.setattr(files, "fcntl", None)  # Windows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with exclusive_lock(tmp_path / "windows.lock") as holder:
            assert holder is None
