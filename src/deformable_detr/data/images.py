"""Image files as the model and the data check see them.

The model reads 8-bit RGB (:func:`as_rgb`). The data check decodes no pixels: decoding every image
of a large data set takes longer than anyone waits for training to start, so it reads each file's
header (its size and pixel format), runs Pillow's ``verify`` (for PNG: every chunk's checksum) and,
for JPEG, looks for the end-of-image marker, which a file cut short lacks. What it finds is
remembered by file size and modification time, so checking an unchanged data set again opens no image.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..files import atomic_write, cache_folder

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# JPEG's end-of-image marker. Some writers pad after it, so the file's tail is searched; inside the
# compressed data 0xFF is always followed by 0x00 or a restart marker, so the pair is never a false find.
_JPEG_END = b"\xff\xd9"
_JPEG_TAIL = 64


# Pillow's modes of 16-bit grayscale, which its own conversion to RGB clips at 255: nearly white.
_SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# 32-bit pixels have no range that says which value is white.
_THIRTY_TWO_BIT = {"I": "32-bit integer", "F": "32-bit float"}


def _unreadable_pixels(mode: str) -> str | None:
    if mode in _THIRTY_TWO_BIT:
        return f"cannot read image ({_THIRTY_TWO_BIT[mode]} pixels: save it with 8 or 16 bits a channel)"
    return None


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` in 8-bit RGB: 16-bit grayscale scaled from its whole range (65535 -> 255).

    Raises:
        ValueError: for 32-bit pixels, whose white is not known.
    """
    problem = _unreadable_pixels(image.mode)
    if problem is not None:
        raise ValueError(problem)
    if image.mode in _SIXTEEN_BIT_GRAY:
        pixels = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))
    return image.convert("RGB")


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
            problem = _unreadable_pixels(image.mode)
            if problem is not None:
                return ImageInfo(width, height, problem)
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
