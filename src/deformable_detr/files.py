"""Where the package keeps files, writing them so that a killed process, a full disk or a machine
that loses power never leaves a half-written one behind, and a lock that keeps a second writer out."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows, where a lock is not taken
    fcntl = None


def cache_folder() -> Path:
    """Where built kernels and the data check's findings are kept: ``$DEFORMABLE_DETR_CACHE``, or
    ``deformable_detr`` in the user's cache folder."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("DEFORMABLE_DETR_CACHE", Path(root) / "deformable_detr"))


# Read once, at import: os.umask can only be read by setting it, which is not safe among threads.
_UMASK = os.umask(0)
os.umask(_UMASK)
# What a written file gets: the permissions any new file would, where mkstemp's are private.
_NEW_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it gets the permissions any new file gets
    (whether the caller wrote into it or replaced it), is synced to the disk and renamed onto
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
            # Set once the writer is done: some replace the file rather than write into it
            # (safetensors' save_file writes a private file of its own and renames it onto it).
            os.chmod(temporary, _NEW_FILE_MODE)
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
    os.close(descriptor)  # private (0600) while it is written, as mkstemp makes it
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


# flock's answer on a file system that keeps no locks: Lustre mounted without -o flock (ENOSYS), NFS
# without its lock service (ENOLCK), some FUSE file systems (EOPNOTSUPP).
_LOCKS_UNSUPPORTED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP})
# How often a wait for a lock asks for it again.
_LOCK_POLL_SECONDS = 0.2


class LockHeld(OSError):
    """Another process holds the lock on ``path``; ``holder`` is what it wrote there (its id and host)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path}: held by {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: float = 0.0) -> Iterator[str | None]:
    """Hold an exclusive lock on the file ``path`` (made where missing) for the block, with this
    process's id and host written in it for another process to name; where another process holds
    it, wait up to ``wait`` seconds for it to let go. Yields what it wrote there (None where it took
    no lock), on the file system by then: what a process on another node reads there where the
    folder is one they share.

    The lock is ``flock``'s: the system lets go of it when its process ends however it ends (and its
    forked children, which share it, have ended), so none is ever left stale. On Windows no lock is
    taken; on a file system that keeps no locks, none either, with a warning.

    Raises:
        LockHeld: another process holds it still after ``wait`` seconds.
    """
    if fcntl is None:
        yield None
        return
    path = Path(path)
    # Written in place, not by atomic_write: the lock belongs to this file, which a rename would replace.
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _lock(descriptor, path, wait):
            yield None
            return
        holder = f"process {os.getpid()} on {socket.gethostname()}"
        os.ftruncate(descriptor, 0)  # a killed holder's name
        os.pwrite(descriptor, holder.encode(), 0)
        os.fsync(descriptor)  # NFS keeps a write in its client until then
        try:
            yield holder
        finally:
            os.ftruncate(descriptor, 0)
            # Released for the forked children that share it too (loader workers), which closing would not do.
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _lock(descriptor: int, path: Path, wait: float) -> bool:
    """Lock ``descriptor`` (``path``), waiting up to ``wait`` seconds for another holder to let go;
    False, with a warning, where the file system keeps no locks."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockHeld(path, path.read_text().strip() or "another process") from None
            time.sleep(_LOCK_POLL_SECONDS)
        except OSError as error:
            if error.errno not in _LOCKS_UNSUPPORTED:
                raise
            warnings.warn(f"{path}: not locked, as its file system keeps no locks ({error.strerror}): nothing keeps "
                          f"another process out", stacklevel=4)
            return False
