"""Image files as the data check sees them: their size and a cheap integrity check, no pixels decoded.

Decoding every image of a large data set takes longer than anyone waits for training to start, so
the check reads each file's header (its size), runs Pillow's ``verify`` (for PNG: every chunk's
checksum) and, for JPEG, looks for the end-of-image marker, which a file cut short lacks. What it
finds is remembered by file size and modification time, so checking an unchanged data set again
opens no image.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import astuple, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..files import atomic_write, cache_folder

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# JPEG's end-of-image marker. Some writers pad after it, so the file's tail is searched; inside the
# compressed data 0xFF is always followed by 0x00 or a restart marker, so the pair is never a false find.
_JPEG_END = b"\xff\xd9"
_JPEG_TAIL = 64


@dataclass(frozen=True)
class ImageInfo:
    width: int = 0
    height: int = 0
    problem: str | None = None  # why the file cannot be used as an image, if it cannot


def inspect_image(path: str | os.PathLike) -> ImageInfo:
    """The size of the image at ``path`` from its header, or the problem that makes it unusable."""
    try:
        with open(path, "rb") as file, Image.open(file) as image:
            width, height = image.size
            image_format = image.format
            image.verify()
            if image_format == "JPEG":
                file.seek(-min(_JPEG_TAIL, os.fstat(file.fileno()).st_size), os.SEEK_END)
                if _JPEG_END not in file.read():
                    return ImageInfo(width, height, "cannot read image (JPEG cut short: no end-of-image marker)")
    except FileNotFoundError:
        return ImageInfo(problem="image file not found")
    except UnidentifiedImageError:
        return ImageInfo(problem="cannot read image (not an image format Pillow knows)")
    except Exception as error:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error ...
        return ImageInfo(problem=f"cannot read image ({error})")
    return ImageInfo(width, height)


class ImageProbe:
    """:func:`inspect_image` with a memory: results are kept in ``cache_file`` (JSON) by each file's
    size and modification time, and a file is opened again only when either has changed.

    Call :meth:`save` to write what was learnt; ``cache_file=None`` keeps it in memory only.
    """

    def __init__(self, cache_file: Path | None = None) -> None:
        self.cache_file = cache_file
        self._entries: dict[str, list] = {}  # path -> [size, mtime_ns, width, height, problem]
        self._changed = False
        if cache_file is not None and cache_file.is_file():
            try:
                self._entries = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                pass  # an unreadable cache is only a slower check

    @classmethod
    def for_data(cls, root: str | os.PathLike) -> ImageProbe:
        """The probe whose cache belongs to the data set at ``root``, in the package's cache folder
        (``$DEFORMABLE_DETR_CACHE`` or ``~/.cache/deformable_detr``), so data folders stay read-only."""
        key = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
        return cls(cache_folder() / "data-check" / f"{key}.json")

    def __call__(self, path: str | os.PathLike) -> ImageInfo:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return ImageInfo(problem="image file not found")
        key = os.path.abspath(path)
        entry = self._entries.get(key)
        if entry is not None and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            return ImageInfo(*entry[2:])
        info = inspect_image(path)
        self._entries[key] = [stat.st_size, stat.st_mtime_ns, *astuple(info)]
        self._changed = True
        return info

    def save(self) -> None:
        if self.cache_file is None or not self._changed:
            return
        with atomic_write(self.cache_file) as temporary:
            temporary.write_text(json.dumps(self._entries))
        self._changed = False
