"""Image files as the model and the data check see them.

The model reads 8-bit RGB (:func:`as_rgb`). Data sets read each image as it is stored, the frame
COCO's and VOC's recorded sizes describe; ``detect`` and :class:`~deformable_detr.Detector` read it
:func:`turned_upright`, as viewers show a photo whose EXIF orientation tag turns it.

The data check decodes no pixels: decoding every image of a large data set takes longer than anyone
waits for training to start, so it reads each file's header (its size, pixel format and EXIF
orientation), runs Pillow's ``verify`` (for PNG: every chunk's checksum) and looks for what a file
cut short lacks: JPEG's end-of-image marker, GIF's trailer, and for BMP and TIFF the bytes up to the
end of the pixel data their headers place. (Pillow refuses a WebP cut short as it opens it.) What it
finds is remembered by file size and modification time, so checking an unchanged data set again
opens no image.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from ..files import atomic_write, cache_folder

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# JPEG's end-of-image marker, looked for in the file's tail (some writers pad after it), then in the
# compressed data, where 0xFF is always followed by 0x00 or a restart marker: the pair is never a false find.
_JPEG_END = b"\xff\xd9"
_JPEG_TAIL = 64
_JPEG_START_OF_SCAN = 0xDA
# Markers that stand alone, without a length: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
# Pillow names a phone's multi-picture JPEG "MPO"; training reads its first picture, a JPEG.
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# A GIF ends with its last block's terminator, then the trailer; a file cut short ends inside a block.
_GIF_END = b"\x00;"
# Where a BMP records the size of its pixel data (the info header's biSizeImage), which run-length
# encoded pixels need: their size does not follow from width and height.
_BMP_DATA_SIZE_AT = 34
# Where a TIFF's first page records its pixel data: strips, or tiles, each an offset and a byte count.
_TIFF_DATA_TAGS = (
    (TiffImagePlugin.STRIPOFFSETS, TiffImagePlugin.STRIPBYTECOUNTS),
    (TiffImagePlugin.TILEOFFSETS, TiffImagePlugin.TILEBYTECOUNTS),
)


# Pillow's modes of 16-bit grayscale, which its own conversion to RGB clips at 255: nearly white.
_SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# 32-bit pixels have no range that says which value is white.
_THIRTY_TWO_BIT = {"I": "32-bit integer", "F": "32-bit float"}
# TIFF's SampleFormat of signed integers. Pillow reads signed 16-bit pixels as mode I, as 32-bit ones;
# tools map them to 8 bits in ways that disagree (a CT scan's window, negatives clipped, a shift by
# 32768), so the owner of the data chooses.
_TIFF_SIGNED = 2


# What each EXIF orientation other than 1 (as stored) does to the picture a viewer shows.
EXIF_TURNS = {
    2: "mirrored left to right", 3: "turned 180°", 4: "flipped top to bottom", 5: "turned 90° and mirrored",
    6: "turned 90° clockwise", 7: "turned 90° and mirrored", 8: "turned 90° anticlockwise",
}  # fmt: skip
SIDEWAYS_TURNS = frozenset({5, 6, 7, 8})  # those that swap width and height
# What Pillow's EXIF parser raises for a block that is not the TIFF structure EXIF is.
_MALFORMED_EXIF = (SyntaxError, ValueError, struct.error)


def _unreadable_pixels(image: Image.Image) -> str | None:
    if _signed_sixteen_bit(image):
        return "cannot read image (signed 16-bit pixels: save it unsigned, with 8 or 16 bits a channel)"
    if image.mode in _THIRTY_TWO_BIT:
        return f"cannot read image ({_THIRTY_TWO_BIT[image.mode]} pixels: save it with 8 or 16 bits a channel)"
    return None


def _signed_sixteen_bit(image: Image.Image) -> bool:
    if not isinstance(image, TiffImagePlugin.TiffImageFile):
        return False
    tags = image.tag_v2
    return tags.get(TiffImagePlugin.SAMPLEFORMAT) == (_TIFF_SIGNED,) and tags.get(TiffImagePlugin.BITSPERSAMPLE) == (16,)


def as_rgb(image: Image.Image, *, upright: bool = False) -> Image.Image:
    """``image`` in 8-bit RGB, as stored or ``upright`` (:func:`turned_upright`): 16-bit grayscale
    scaled from its whole range (65535 -> 255).

    Raises:
        ValueError: for 32-bit and signed 16-bit pixels, whose mapping to 8 bits is not known.
    """
    problem = _unreadable_pixels(image)  # before turning: a turned copy no longer knows a TIFF's tags
    if problem is not None:
        raise ValueError(problem)
    if upright:
        image = turned_upright(image)
    if image.mode in _SIXTEEN_BIT_GRAY:
        pixels = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))
    return image.convert("RGB")


def turned_upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says, as viewers show it (a copy, without the tag);
    as it is where its EXIF block cannot be parsed."""
    try:
        return ImageOps.exif_transpose(image)
    except _MALFORMED_EXIF:
        return image


def _orientation(image: Image.Image) -> int:
    """The orientation that reading ``image`` as stored leaves unapplied."""
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        return 1  # Pillow turns a TIFF upright as it reads it, and gives its size so
    # Image's own getexif reads what the header held. Pillow's PNG reader overrides it to decode the
    # whole image in search of an eXIf chunk after the pixels, where writers do not put it.
    try:
        value = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except _MALFORMED_EXIF:  # says nothing of the orientation, and stops nothing
        return 1
    return value if value in EXIF_TURNS else 1  # viewers ignore values outside 1-8, as Pillow does


@dataclass(frozen=True)
class ImageInfo:
    width: int = 0  # as stored, whatever the orientation
    height: int = 0
    problem: str | None = None  # why the file cannot be used as an image, if it cannot
    orientation: int = 1  # EXIF orientation: 1 as stored, 2-8 turned for viewers (EXIF_TURNS)


def inspect_image(path: str | os.PathLike) -> ImageInfo:
    """The size of the image at ``path`` from its header, or the problem that makes it unusable."""
    try:
        with open(path, "rb") as file, Image.open(file) as image:
            width, height = image.size
            problem = _unreadable_pixels(image)
            if problem is not None:
                return ImageInfo(width, height, problem)
            turn = _orientation(image)
            image.verify()
            cut_short = _cut_short(image, file)
            if cut_short is not None:
                return ImageInfo(width, height, f"cannot read image ({cut_short})")
    except FileNotFoundError:
        return ImageInfo(problem="image file not found")
    except UnidentifiedImageError:
        return ImageInfo(problem="cannot read image (not an image format Pillow knows)")
    except Exception as error:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error ...
        return ImageInfo(problem=f"cannot read image ({error})")
    return ImageInfo(width, height, orientation=turn)


def _cut_short(image: Image.Image, file: BinaryIO) -> str | None:
    """How the image in ``file`` shows it was cut short, where a check that decodes nothing can tell:
    a missing end marker, or fewer bytes than its header places its pixel data in."""
    if image.format in _JPEG_FORMATS and not _jpeg_has_end(file):
        return "JPEG cut short: no end-of-image marker"
    if image.format == "GIF" and not _gif_has_end(file):
        return "GIF cut short: no trailer"
    if image.format == "BMP":
        return _shorter_than_data("BMP", file, _bmp_data_end(image, file))
    if image.format == "TIFF":
        return _shorter_than_data("TIFF", file, _tiff_data_end(image))
    return None


def _shorter_than_data(format_name: str, file: BinaryIO, data_end: int | None) -> str | None:
    """The problem of a ``file`` that ends before ``data_end``, where its header says its pixel data
    ends (None: the header does not say)."""
    size = os.fstat(file.fileno()).st_size
    if data_end is None or size >= data_end:
        return None
    return f"{format_name} cut short: {size} bytes, its pixel data ends at byte {data_end}"


def _gif_has_end(file: BinaryIO) -> bool:
    file.seek(-len(_GIF_END), os.SEEK_END)
    return file.read() == _GIF_END


def _bmp_data_end(image: Image.Image, file: BinaryIO) -> int:
    """Where the BMP's pixel data ends: after its rows, each padded to 4 bytes (the stride Pillow's
    raw decoder is given), or, run-length encoded, after the size its header records."""
    (tile,) = image.tile
    if tile.codec_name == "raw":
        _, top, _, bottom = tile.extents
        return tile.offset + tile.args[1] * (bottom - top)
    file.seek(_BMP_DATA_SIZE_AT)
    return tile.offset + int.from_bytes(file.read(4), "little")


def _tiff_data_end(image: Image.Image) -> int | None:
    """Where the TIFF's first page's last strip or tile ends (compressed or not, the byte counts are
    what is stored); None for a file that records no byte counts."""
    for offsets_tag, counts_tag in _TIFF_DATA_TAGS:
        offsets, counts = image.tag_v2.get(offsets_tag), image.tag_v2.get(counts_tag)
        if offsets and counts:
            return max(offset + count for offset, count in zip(offsets, counts))
    return None


def _jpeg_has_end(file: BinaryIO) -> bool:
    """Whether the JPEG in ``file`` has its end-of-image marker. Mostly it ends the file; phones
    append data after it (Samsung's trailer, the video of a motion photo), so the main image's
    compressed data is searched then, from its first scan on, past an EXIF thumbnail and its own
    marker."""
    size = os.fstat(file.fileno()).st_size
    file.seek(-min(_JPEG_TAIL, size), os.SEEK_END)
    if _JPEG_END in file.read():
        return True
    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        scan = _jpeg_first_scan(data)
        return scan is not None and data.find(_JPEG_END, scan) != -1


def _jpeg_first_scan(data: mmap.mmap) -> int | None:
    """Where the compressed data of the JPEG's first scan starts, found by walking the segments
    before it by their lengths; None when the file ends first."""
    position = 2  # past the start-of-image marker
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
        elif marker in _JPEG_STANDALONE:
            position += 2
        else:
            end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
            if marker == _JPEG_START_OF_SCAN:
                return end
            position = end
    return None


# The version of what the check finds, to raise whenever it learns to find more (2: BMP, TIFF and GIF
# files cut short, signed 16-bit pixels): a cache of another version would call an unchanged file fine
# that the check now refuses, so it is read as empty, as are those from before the number was kept.
_CACHE_VERSION = 2


class ImageProbe:
    """:func:`inspect_image` with a memory: results are kept in ``cache_file`` (JSON) by each file's
    size and modification time, and a file is opened again only when either has changed.

    Call :meth:`save` to write what was learnt; ``cache_file=None`` keeps it in memory only.
    """

    def __init__(self, cache_file: Path | None = None) -> None:
        self.cache_file = cache_file
        # path -> [size, mtime_ns, width, height, problem, orientation]
        self._entries: dict[str, list] = {} if cache_file is None else _read_cache(cache_file)
        self._changed = False

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
            temporary.write_text(json.dumps({"version": _CACHE_VERSION, "images": self._entries}))
        self._changed = False


def _read_cache(cache_file: Path) -> dict[str, list]:
    """The entries ``cache_file`` holds: none where it is missing, unreadable (only a slower check) or
    of another version."""
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("version") != _CACHE_VERSION:
        return {}
    return cache["images"]
