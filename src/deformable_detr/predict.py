"""Detections on images from a trained model: :class:`Detector` in Python, :func:`detect_files` for
the ``detect`` command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import clip_boxes_to_image
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from .checkpoints import read_checkpoint
from .checks import check_count, check_fraction
from .data import IMAGE_SUFFIXES, DatasetError, as_rgb, inference_transforms, read_image
from .data.transforms import max_side
from .distributed import folder_held, is_main_process, main_process_decides, rank, wait_for_all, world_size
from .environment import usable_device
from .evaluation import coco_results, write_results_json
from .files import atomic_write, remove_abandoned_writes
from .model import DeformableDETR, check_model, postprocess
from .precision import check_dtype, forward, inference_model
from .reference import PUBLISHED_IMAGE_SIZE
from .visualize import draw_detections, save_image

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
# How far outside [0, 1] a float image may stray and be clamped (see as_image_tensor).
FLOAT_IMAGE_SLACK = 0.25


@dataclass
class Detections:
    """One image's detections, best first."""

    boxes: Tensor  # (K, 4) absolute (x1, y1, x2, y2) in the input image's pixels
    scores: Tensor  # (K,)
    labels: Tensor  # (K,) category ids
    names: list[str]  # K category names (the id as text where the checkpoint has no names)

    def draw(self, image: ImageInput) -> Tensor:
        """``image``, the one detected (any one input :meth:`Detector.predict` takes, read as it reads
        them), as (3, H, W) uint8 with these boxes drawn and labelled with name and score."""
        names = dict(zip(self.labels.tolist(), self.names))
        boxes = {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}
        return draw_detections(as_image_tensor(image), boxes, names, threshold=0.0)


class Detector:
    """A model ready for inference: inputs resized and normalised as in validation, outputs as
    labelled boxes in the input's pixels.

    Args:
        model: the detector, its weights in float32 (``dtype`` chooses the precision it computes
            in); used in eval mode on its current device (in bfloat16 or float16, a copy of it,
            :func:`~deformable_detr.precision.inference_model`).
        class_names: category id -> name.
        image_size: the shorter side inputs are resized to (the size the model was trained for).
        dtype: the precision the model computes in: ``torch.float32`` (outputs equal to the
            reference code's), or ``torch.bfloat16`` / ``torch.float16`` autocast, about twice as
            fast where the hardware computes it (a warning says where it does not); scores and
            boxes are post-processed in float32 (:mod:`deformable_detr.precision`).
    """

    def __init__(self, model: DeformableDETR, *, class_names: dict[int, str] | None = None,
                 image_size: int = PUBLISHED_IMAGE_SIZE, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        check_model(model, file_reader="Detector.from_checkpoint")
        check_count("image_size", image_size, at_least=1)
        check_dtype(dtype, next(model.parameters()).device)
        _check_weights_compute_in(model, dtype)
        self.model = inference_model(model.eval(), dtype)
        self.class_names = class_names or {}
        self.image_size = image_size
        self.dtype = dtype
        self._transforms = inference_transforms(image_size)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, device: torch.device | str | None = None, image_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Detector:
        """Any checkpoint :func:`~deformable_detr.load_pretrained` reads, with its class names
        (COCO's for the released models) and the image size it was trained for (the published
        one where the file does not record it), unless ``image_size`` is given. ``device``
        defaults to CUDA where there is one."""
        checkpoint = read_checkpoint(path)
        model = checkpoint.build_model(device=usable_device(device))
        return cls(model, class_names=checkpoint.class_names, dtype=dtype,
                   image_size=checkpoint.input_size if image_size is None else image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def predict(
        self, images: ImageInput | Sequence[ImageInput], *, threshold: float = 0.5, batch_size: int = 8
    ) -> Detections | list[Detections]:
        """Detections scoring at least ``threshold``, for one image or a list of them.

        An image is a file path, a PIL image, an RGB ``numpy`` array (H, W, 3) or a tensor
        (3, H, W), uint8 or float in [0, 1]; an (N, 3, H, W) tensor is N images. A file or PIL
        image is turned upright as its EXIF orientation says, as viewers show it, and its boxes are
        in that picture's pixels. A list is processed ``batch_size`` images at a time, in order of
        size (equal sizes together), each batch padded to a common size; results come back in the
        input order.
        """
        check_fraction("threshold", threshold)
        check_count("batch_size", batch_size, at_least=1)
        if isinstance(images, Tensor) and images.dim() not in (3, 4):
            raise ValueError(f"an image tensor is (3, H, W), or (N, 3, H, W) for N images, not {tuple(images.shape)}")
        # Anything not iterable is taken for one image, so that as_image_tensor says it is none.
        single = (
            isinstance(images, (str, os.PathLike, Image.Image, np.ndarray))
            or (isinstance(images, Tensor) and images.dim() == 3)
            or not isinstance(images, Iterable)
        )
        pixels = [as_image_tensor(images)] if single else [as_image_tensor(image) for image in images]
        # Batched by size, so that equal sizes share batches: padding is not neutral (docs/detect.md#batches-and-padding).
        order = sorted(range(len(pixels)), key=lambda index: tuple(pixels[index].shape[-2:]))
        by_index: dict[int, Detections] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            by_index.update(zip(chunk, self._predict_batch([pixels[i] for i in chunk], threshold)))
        detections = [by_index[index] for index in range(len(pixels))]
        return detections[0] if single else detections

    def prepare(self, image: ImageInput) -> Tensor:
        """The model's input for ``image`` (any input :meth:`predict` takes, one image): resized and
        normalised as in validation, on the model's device, (3, H', W')."""
        pixels = as_image_tensor(image)
        check_resizable(pixels, self.image_size)
        # Moved as uint8 (a quarter of float's bytes), then resized where the model runs.
        return self._transforms(pixels.to(self.device))

    def _predict_batch(self, images: list[Tensor], threshold: float) -> list[Detections]:
        outputs = forward(self.model, [self.prepare(image) for image in images], dtype=self.dtype)
        # Boxes are relative to each image, so scaling by the input's size undoes the resize.
        sizes = [image.shape[-2:] for image in images]
        results = []
        for result, size in zip(postprocess(outputs, sizes), sizes):
            keep = result["scores"] >= threshold
            labels = result["labels"][keep].cpu()
            results.append(
                Detections(
                    boxes=clip_boxes_to_image(result["boxes"][keep].float().cpu(), size),
                    scores=result["scores"][keep].float().cpu(),
                    labels=labels,
                    names=[self.class_names.get(int(label), str(int(label))) for label in labels],
                )
            )
        return results


def _check_weights_compute_in(model: DeformableDETR, dtype: torch.dtype) -> None:
    """Raise ValueError where ``model``'s weights are in a precision ``dtype`` does not compute in
    (a model cast with ``.bfloat16()`` run in float32): its first convolution would refuse the input."""
    weights = next(model.parameters()).dtype
    if weights not in (torch.float32, dtype):
        raise ValueError(f"the model's weights are {weights}, which dtype={dtype} does not compute with: pass the "
                         f"float32 model (model.float()) and the precision to compute in as dtype")


# Channels of an image array or tensor: grey, RGB and RGBA, as image readers return them.
_CHANNELS = (1, 3, 4)


def as_image_tensor(image: ImageInput) -> Tensor:
    """Any accepted image input as a uint8 RGB (3, H, W) tensor; files and PIL images upright."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, upright=True).as_subclass(Tensor)
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(as_rgb(image, upright=True))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[2] not in _CHANNELS:
            raise ValueError(f"a numpy image must be (H, W) grey, or (H, W, C) with C 1, 3 (RGB) or 4 (RGBA), got "
                             f"shape {image.shape}")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: the array may be read-only
    if not isinstance(image, Tensor):
        raise TypeError(f"not an image: {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] not in _CHANNELS:
        raise ValueError(f"an image tensor must be (C, H, W) with C 1 (grey), 3 (RGB) or 4 (RGBA), got shape "
                         f"{tuple(image.shape)}")
    # Grey to RGB, and alpha dropped: as PIL's convert("RGB") reads an image file (an RGBA PNG, say).
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    if not image.shape[1] or not image.shape[2]:
        raise ValueError(f"an image has no pixels: {image.shape[2]} x {image.shape[1]}")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise TypeError(f"an image is uint8 (0 to 255) or float (0 to 1), not {str(image.dtype).removeprefix('torch.')}")
    lowest, highest = image.float().aminmax()
    # A resize with overshoot (bicubic, antialiased) leaves values a little outside [0, 1], which
    # clamping undoes; beyond that the image is on another scale (0 to 255, or normalised).
    if not -FLOAT_IMAGE_SLACK <= lowest <= highest <= 1 + FLOAT_IMAGE_SLACK:  # NaN fails too
        raise ValueError(f"a float image holds values in [0, 1], got {lowest.item():.6g} to {highest.item():.6g} "
                         f"(0 to 255 is uint8)")
    return F.to_dtype(image.float().clamp(0, 1), torch.uint8, scale=True)


def check_resizable(image: Tensor, image_size: int, *, name: str = "the image") -> None:
    """Raise ValueError where resizing ``image`` for a model of ``image_size`` would leave it no pixel
    across: its longer side is capped (at 1333 for 800), so an image more elongated than that has a
    shorter side that rounds to nothing."""
    height, width = image.shape[-2:]
    if max(height, width) > max_side(image_size) * min(height, width):
        raise ValueError(f"{name}: {width} x {height} pixels is too elongated to detect in: at {max_side(image_size)} "
                         f"pixels long, the most the model sees, its shorter side would be less than a pixel")


def image_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The inputs, with each folder replaced by the image files in it (sorted, not recursive).

    Raises:
        DatasetError: an input is not there (a mistyped path, not an unreadable image), or is a
            folder without images.
    """
    files = []
    for item in map(Path, inputs):
        if not item.exists():
            raise DatasetError(f"{item}: no such file or folder")
        if item.is_dir():
            images = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise DatasetError(f"{item}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += images
        else:
            files.append(item)
    return files


def detect_files(
    detector: Detector,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    threshold: float = 0.5,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Detect objects in image files and folders of them; write into ``out`` one annotated copy of
    each image and ``detections.json``, the run's detections in the COCO results format (with
    ``file_name``; ``image_id`` numbers the inputs in order). Images are read upright, as
    :meth:`Detector.predict` reads files, and boxes are in the upright picture's pixels. An input
    that is not there, or a folder without images, is a ValueError, as is an ``out`` that is an input
    folder or where an annotated copy would be written over an input image: all raised before
    anything is written.

    Under torchrun the processes share the work: the inputs are cut into batches of ``batch_size``,
    batch k goes to process k mod N, and the main process merges their detections, so that
    ``detections.json`` is what one process writes (the same batches, so the same padding; in the
    same order). ``out`` must be one folder all processes reach. Each batch done is kept in
    ``out/.detect-progress/`` until the merge: the same command run again after an interruption
    detects only the batches not done.

    A file that cannot be read is reported on stderr and skipped. Returns those reports (every
    process returns them all).
    """
    check_fraction("threshold", threshold)
    check_count("batch_size", batch_size, at_least=1)
    out = Path(out)
    files = image_files(inputs)
    output_names = _output_names(files)
    _check_inputs_are_kept(inputs, files, out, output_names)
    batches = range(0, len(files), batch_size)
    _make_output_folder(out)  # by every process, which all refuse a file alike before any waits for the others
    # One run at a time: another would clear this one's progress and write over its pictures.
    with folder_held(out, error=ValueError):
        done = _DetectProgress.open(out, _fingerprint(detector, files, threshold, batch_size), len(batches),
                                    outputs=[*output_names, "detections.json"])
        mine = [start for index, start in enumerate(batches) if index % world_size() == rank() and start not in done]
        with tqdm(total=sum(len(files[start : start + batch_size]) for start in mine), desc="detect", unit="image",
                  disable=not progress or not is_main_process()) as bar:  # fmt: skip
            for start in mine:
                done.record(start, *_detect_batch(detector, files, start, batch_size, threshold, out, output_names))
                bar.update(len(files[start : start + batch_size]))
        wait_for_all()
        failures: list[str] = []
        if is_main_process():
            results, failures = done.merge(batches)
            write_results_json(out / "detections.json", results)
            done.remove()
        return main_process_decides(failures)


def _detect_batch(detector: Detector, files: list[Path], start: int, batch_size: int, threshold: float, out: Path,
                  output_names: list[str]) -> tuple[list[dict], list[str]]:
    """Detect in the batch of ``files`` from ``start`` and draw each image's detections into ``out``:
    the batch's detections in the COCO results format, and the reports of the files it skipped."""
    results, failures, readable = [], [], []
    for image_id, path in enumerate(files[start : start + batch_size], start=start):
        try:
            image = read_image(path, upright=True).as_subclass(Tensor)
            check_resizable(image, detector.image_size, name=str(path))
            readable.append((image_id, path, image))
        except ValueError as error:  # DatasetError is one: a missing or unreadable file
            failures.append(str(error))
            tqdm.write(f"skipped: {error}", file=sys.stderr)
    if readable:
        batch = detector.predict([image for _, _, image in readable], threshold=threshold, batch_size=batch_size)
        for (image_id, path, image), detections in zip(readable, batch):
            save_image(detections.draw(image), out / output_names[image_id])
            results += [dict(result, file_name=str(path)) for result in
                        coco_results(image_id, detections.boxes, detections.scores, detections.labels)]
    return results, failures


def _make_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: a file, not a folder for the annotated copies and detections.json")
    out.mkdir(parents=True, exist_ok=True)


def _output_names(files: list[Path]) -> list[str]:
    """The annotated copy's name of each file: its stem, numbered where inputs from different folders
    share one, so that no copy overwrites another."""
    names, taken = [], set()
    for path in files:
        name, number = f"{path.stem}.png", 1
        while name in taken:
            name, number = f"{path.stem}_{number}.png", number + 1
        taken.add(name)
        names.append(name)
    return names


def _check_inputs_are_kept(
    inputs: Sequence[str | os.PathLike], files: list[Path], out: Path, output_names: list[str]
) -> None:
    """Raise ValueError, before anything is written, where ``out`` is an input folder or an
    annotated copy would be written over an input image."""
    # An input folder is refused even where no copy replaces an image (.jpg inputs): the copies
    # would join its images, and the next run on the folder would detect them as photos.
    for folder in map(Path, inputs):
        if folder.is_dir() and out.is_dir() and out.samefile(folder):
            raise ValueError(f"{out}: the output folder is an input folder, where the annotated copies would be "
                             f"taken for images; choose another")
    # Compared as files, not as names: a link, another spelling of the path or a case-insensitive
    # file system gives one file several names.
    input_by_file = {_file_identity(path): path for path in files if path.is_file()}
    for name in output_names:
        target = out / name
        if target.is_file() and (replaced := input_by_file.get(_file_identity(target))):
            raise ValueError(f"{replaced}: an annotated copy would be written over this input image; "
                             f"choose another output folder")


def _file_identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def _fingerprint(detector: Detector, files: list[Path], threshold: float, batch_size: int) -> str:
    """What the detections depend on: the weights, the settings and the inputs. Batches done by
    another run are only reused when it matches."""
    digest = hashlib.sha256(json.dumps([str(detector.dtype), detector.image_size, threshold, batch_size,
                                        [str(path) for path in files]]).encode())  # fmt: skip
    for name, tensor in detector.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _DetectProgress:
    """The batches of one ``detect`` run that are done, each in a file of its own in
    ``out/.detect-progress/`` with its detections and failures, until the main process merges them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def open(cls, out: Path, fingerprint: str, batches: int, *, outputs: Sequence[str]) -> _DetectProgress:
        """The progress of the run ``fingerprint`` names: the main process removes another run's and
        the temporary files of ``outputs`` that a killed run left (the folder's own go with it at the
        end), and says how much of this one is done (collective)."""
        progress = cls(out / ".detect-progress")
        if is_main_process():
            stamp = progress.folder / "fingerprint"
            if not stamp.is_file() or stamp.read_text() != fingerprint:
                shutil.rmtree(progress.folder, ignore_errors=True)
                with atomic_write(stamp) as temporary:
                    temporary.write_text(fingerprint)
            elif done := len(list(progress.folder.glob("batch-*.json"))):
                print(f"{out}: {done} of {batches} batches done by an earlier run; detecting the rest", flush=True)
            remove_abandoned_writes(out, outputs)
        wait_for_all()
        return progress

    def __contains__(self, start: int) -> bool:
        return self._path(start).is_file()

    def record(self, start: int, results: list[dict], failures: list[str]) -> None:
        with atomic_write(self._path(start)) as temporary:
            temporary.write_text(json.dumps({"results": results, "failures": failures}))

    def merge(self, batches: Sequence[int]) -> tuple[list[dict], list[str]]:
        """Every batch's detections and failures, in the order of the batches."""
        results, failures = [], []
        for start in batches:
            part = json.loads(self._path(start).read_text())
            results += part["results"]
            failures += part["failures"]
        return results, failures

    def remove(self) -> None:
        shutil.rmtree(self.folder)

    def _path(self, start: int) -> Path:
        return self.folder / f"batch-{start:010d}.json"
