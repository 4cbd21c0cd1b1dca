"""Where the package keeps files, and writing them so that a killed process, a full disk or a
machine that loses power never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def cache_folder() -> Path:
    """Where built kernels and the data check's findings are kept: ``$DEFORMABLE_DETR_CACHE``, or
    ``deformable_detr`` in the user's cache folder."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("DEFORMABLE_DETR_CACHE", Path(root) / "deformable_detr"))


# Read once, at import: os.umask can only be read by setting it, which is not safe among threads.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is synced to the disk and renamed onto
    ``path``, and the rename synced too where the file system can sync a folder.

    On any error the temporary file is removed and ``path`` keeps its previous content. Where
    ``path`` cannot be written (a folder in its place, a file where its folder should be, no
    permission, a disk that fails the sync) the ``OSError`` is one line naming ``path`` and the problem.
    """
    path = Path(path)
    temporary = _temporary_beside(path)
    try:
        yield temporary
        # Without the syncs a file system may write the rename before the data (XFS does): after a
        # power loss the name could hold an empty file, and the previous content be gone.
        try:
            _sync(temporary)
            os.replace(temporary, path)
            _sync_folder(path.parent)
        except OSError as error:
            raise _write_error(path, error) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# What a system says where it cannot sync a folder at all: Windows will not open one (EACCES,
# EISDIR), nor will a folder the user may write but not read (EACCES, EPERM); CIFS and some FUSE
# file systems refuse fsync on one (EINVAL, EBADF, ENOTSUP). PostgreSQL's fsync_fname_ext ignores
# the same. A real failure (EIO) still fails the write.
_FOLDER_SYNC_UNSUPPORTED = frozenset(
    {errno.EACCES, errno.EPERM, errno.EISDIR, errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP}
)


def _sync_folder(folder: Path) -> None:
    """Sync a rename in ``folder`` where the file system can: where it cannot, the rename is done and
    there is no better to be had."""
    try:
        _sync(folder)
    except OSError as error:
        if error.errno not in _FOLDER_SYNC_UNSUPPORTED:
            raise


def _temporary_beside(path: Path) -> Path:
    """A new empty file in ``path``'s folder (made where missing), named after ``path``."""
    try:
        if path.is_dir():
            # Found now, rather than by the rename after all the writing.
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _write_error(path, error) from error
    os.close(descriptor)
    # mkstemp makes the file private (0600); the result gets the permissions any new file would.
    os.chmod(temporary, 0o666 & ~_UMASK)
    return Path(temporary)


def _write_error(path: Path, error: OSError) -> OSError:
    """``error``, raised creating, syncing or renaming the temporary file, as what stops ``path``
    being written: the temporary file's name would mean nothing to the user."""
    if path.is_dir():
        problem = "is a folder, not a file"
    elif (file_in_the_way := next((folder for folder in path.parents if folder.is_file()), None)) is not None:
        problem = f"{file_in_the_way} is a file, not a folder"
    else:
        problem = f"cannot write there ({error.strerror or error})"
    return type(error)(f"{path}: {problem}")


def remove_abandoned_writes(folder: Path, names: Iterable[str] | None = None) -> None:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` for files named
    ``names`` (None: for any file, in a folder only one writer uses) when a process was killed while
    writing them (SIGKILL leaves no chance to clean up). Only while no other process writes those files."""
    names = None if names is None else set(names)
    for temporary in folder.glob(".*.tmp"):
        # mkstemp's names: "." + the file's name + "." + random letters and digits + ".tmp".
        if names is None or temporary.name[1:].rsplit(".", 2)[0] in names:
            temporary.unlink(missing_ok=True)
