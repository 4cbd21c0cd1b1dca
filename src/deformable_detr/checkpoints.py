"""Reading and writing checkpoints: ours, the reference implementation's and Hugging Face's.

Every format is read into one :class:`Checkpoint` (a config plus a state dict in the reference
names, which are also ours), so loading a model is the same step whatever the file was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import reprlib
import struct
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .checks import class_names_by_id
from .config import ModelConfig
from .environment import usable_device
from .files import atomic_write
from .huggingface import config_from_huggingface, save_huggingface, state_dict_from_huggingface
from .model import DeformableDETR, build_model, check_model
from .reference import PUBLISHED_IMAGE_SIZE, config_from_reference, reference_payload, released_class_names

FORMAT = "deformable-detr"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# transformers' name of the level embedding (ours: transformer.level_embed), which every one of its
# Deformable DETR state dicts holds.
_HF_LEVEL_EMBED = "model.level_embed"
# torch.save writes a zip archive (a pickle, protocol 2, before torch 1.6). torch.load fails on other
# files with messages about pickle opcodes ("101"), so they are told apart first.
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80\x02")
_CHECKPOINT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
LAYOUTS = ("ours", "reference", "huggingface")
# The layout a conversion writes where none is chosen, by the destination's suffix (none: a folder).
_LAYOUT_OF_SUFFIX = {".safetensors": "ours", ".pt": "ours", ".pth": "reference", "": "huggingface"}
# Released reference checkpoints pickle their training flags as an argparse.Namespace. It is the
# only class allowed on top of weights-only loading: a plain attribute bag, safe to rebuild.
_SAFE_CLASSES = (argparse.Namespace,)
# How torch's weights-only unpickler names a class it refuses, before its advice to allow it
# (torch.serialization.add_safe_globals), which a user of the commands has no way to follow.
_REFUSED_GLOBAL = re.compile(r"\bGLOBAL (\S+)")
# What torch.load(weights_only=True) rebuilds (torch/_weights_only_unpickler.py, _get_allowed_globals),
# by exact type: a subclass (a numpy float, an enum, a defaultdict) pickles as a class it refuses.
_LOADABLE_VALUES = (type(None), bool, int, float, complex, str, bytes, bytearray,
                    torch.Size, torch.device, torch.dtype, torch.layout, Tensor, torch.nn.Parameter)
_LOADABLE_CONTAINERS = (list, tuple, set, dict, OrderedDict, Counter)
# The entries of our .pt files beside the weights ("model") and the extra ones.
_OWN_ENTRIES = ("format", "config", "class_names", "image_size")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint, or that does not fit the model it describes."""


@dataclass
class Checkpoint:
    """A checkpoint of any format, read: the model it describes, its weights, and what using it takes.

    Like torchvision's weights objects, it carries the categories and the input size beside the
    weights; :meth:`build_model` is the one place a checkpoint becomes a model.
    """

    path: Path  # the file (or Hugging Face folder) it was read from, named in errors
    config: ModelConfig
    # The weights to use: of a training checkpoint with an average of the weights (train --ema), the
    # average's; the weights as trained are then extra["model"]. (Every other format: as saved.)
    state_dict: dict[str, Tensor]
    source_format: str  # "deformable-detr", "reference" or "huggingface"
    class_names: dict[int, str] | None = None  # category id -> name, where the file tells
    image_size: int | None = None  # the shorter side the model was trained for, where the file tells
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # training state (ours), if any

    @property
    def input_size(self) -> int:
        """The shorter side inputs are resized to: the size it was trained for, else the published one."""
        return self.image_size or PUBLISHED_IMAGE_SIZE

    def build_model(self, *, device: torch.device | str | None = None) -> DeformableDETR:
        """The model with these weights, on ``device``, in eval mode.

        Raises:
            CheckpointError: the weights do not fit the model the config describes.
        """
        # The checkpoint carries the backbone weights: never fetch ImageNet weights on top.
        model = build_model(dataclasses.replace(self.config, backbone_weights=None))
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as error:
            # torch's message lists every weight that differs (thousands of characters for a checkpoint
            # of another backbone); the count and the first one say it in a line.
            problem = _weights_mismatch(self.state_dict, model) or _first_problem(error)
            raise CheckpointError(f"{self.path}: weights do not fit the model it describes: {problem}") from None
        return model.to(device).eval()


def save_checkpoint(
    path: str | os.PathLike,
    model: DeformableDETR,
    *,
    class_names: Mapping[int, str] | None = None,
    image_size: int | None = None,
    **extra: Any,
) -> None:
    """Write ``model`` with its config, atomically (a temporary file renamed into place).

    ``class_names`` (category id -> name) and ``image_size`` (the shorter side it was trained for)
    let :class:`~deformable_detr.Detector` label and size its inputs. ``.safetensors`` holds the
    weights only; any other suffix is a ``torch.save`` dict that also holds ``extra`` (optimizer
    state, epoch, ...), which must be weights-only loadable.

    Raises:
        TypeError: ``model`` is not a DeformableDETR.
        ValueError: an argument :func:`read_checkpoint` would refuse to read back, named; nothing is written.
    """
    path = Path(path)
    check_model(model)
    if path.suffix == ".safetensors" and extra:
        raise ValueError(f"{path}: a .safetensors checkpoint holds weights only; use .pt for {sorted(extra)}")
    # Stored as the reader returns them, so that what is written is what it reads back.
    usage = {"class_names": class_names_by_id(class_names), "image_size": _image_size(image_size)}
    _check_extra(extra, model)
    with atomic_write(path) as temporary:
        if path.suffix == ".safetensors":
            metadata = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), "usage": json.dumps(usage)}
            save_file(_unshared(model.state_dict()), temporary, metadata)
        else:
            payload = {"format": FORMAT, "config": model.config.to_dict(), "model": model.state_dict(), **usage, **extra}
            _torch_save(payload, temporary, path)


def save_reference_checkpoint(path: str | os.PathLike, model: DeformableDETR, *, image_size: int | None = None) -> None:
    """Write ``model`` in the reference implementation's layout (:func:`~deformable_detr.reference.reference_payload`),
    with ``image_size`` (the shorter side it was trained for) among its flags where given,
    atomically. It loads into the reference code and back through :func:`read_checkpoint`.

    Raises:
        TypeError: ``model`` is not a DeformableDETR.
        ValueError: ``image_size`` is not a positive integer, or the reference code cannot build
            ``model`` (a backbone it lacks); nothing is written.
    """
    check_model(model)
    payload = reference_payload(model, image_size=_image_size(image_size))
    with atomic_write(path) as temporary:
        _torch_save(payload, temporary, path)


def _torch_save(payload: dict[str, Any], temporary: Path, path: Path) -> None:
    """``torch.save`` into ``temporary`` (written for ``path``), a failed write an OSError naming ``path``."""
    try:
        torch.save(payload, temporary)
    except RuntimeError as error:  # torch's archive writer reports a short write (a full disk) so
        raise OSError(f"{path}: cannot be written ({error})") from None


def _check_extra(extra: Mapping[str, object], model: DeformableDETR) -> None:
    """Refuse the extra entries :func:`read_checkpoint` would not read back: ours replaced, values
    weights-only loading refuses, or an average of the weights (``ema``) that is not one of ``model``'s."""
    for name, value in extra.items():
        if name in _OWN_ENTRIES:
            raise ValueError(f"extra entry {name!r} would replace the checkpoint's own; choose another name")
        refused = _unloadable_part(value, name)
        if refused is not None:
            raise ValueError(
                f"extra entry {refused}: a checkpoint holds only tensors, numbers, strings, bytes, None, torch "
                "sizes, devices and dtypes, in lists, tuples, sets and dicts (what torch.load(weights_only=True) reads)"
            )
    if "ema" in extra:
        _check_fits(_averaged_weights(extra["ema"]), model, "the 'model' in the 'ema' entry")


def _unloadable_part(value: object, where: str, seen: set[int] | None = None) -> str | None:
    """``<where> is <type>`` for the first part of ``value`` that weights-only loading refuses
    (``where`` names ``value``; its parts are named by index or key), or None where there is none."""
    seen = set() if seen is None else seen
    if type(value) in _LOADABLE_VALUES:
        return None
    if isinstance(value, _SAFE_CLASSES):
        return _unloadable_part(vars(value), where, seen)
    if type(value) not in _LOADABLE_CONTAINERS:
        return f"{where} is a {type(value).__module__}.{type(value).__qualname__}"
    if id(value) in seen:  # looked at already; a container holding itself would otherwise recurse forever
        return None
    seen.add(id(value))
    if isinstance(value, dict):
        parts = [(f"{where} key {key!r}", key) for key in value] + [(f"{where}[{key!r}]", item) for key, item in value.items()]
    else:
        parts = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
    return next((found for name, part in parts if (found := _unloadable_part(part, name, seen)) is not None), None)


def _check_fits(weights: Mapping[str, Tensor], model: DeformableDETR, what: str) -> None:
    # load_pretrained loads them with strict=True: the same names, each of the same shape.
    problem = _weights_mismatch(weights, model)
    if problem:
        raise ValueError(f"{what} does not fit the model: {problem}")


def _weights_mismatch(weights: Mapping[str, Tensor], model: DeformableDETR) -> str | None:
    """How many of ``weights`` differ from ``model``'s in name or shape, and the first of them; None
    where they fit."""
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    found = {name: tensor.shape for name, tensor in weights.items()}
    different = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    if not different:
        return None
    first = different[0]
    problem = "missing" if first not in found else "not the model's" if first not in expected else "of another shape"
    return f"{len(different)} weights differ, the first: {first} ({problem})"


def _unshared(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses aliased tensors (heads shared across decoder layers): store copies.
    seen: set[int] = set()
    result = {}
    for name, tensor in state_dict.items():
        pointer = tensor.data_ptr()
        result[name] = tensor.clone() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    return result


def load_pretrained(path: str | os.PathLike, *, device: torch.device | str | None = None) -> DeformableDETR:
    """Build a model from any checkpoint :func:`read_checkpoint` reads, in eval mode.

    Raises:
        CheckpointError: a one-line message naming the file and what is wrong with it.
        ValueError: ``device`` is unknown, or a GPU this process cannot see.
    """
    target = None if device is None else usable_device(device)  # found before the file is read
    return read_checkpoint(path).build_model(device=target)


def convert_checkpoint(source: str | os.PathLike, destination: str | os.PathLike, *, layout: str | None = None) -> str:
    """Rewrite any checkpoint :func:`read_checkpoint` reads as ours (``layout="ours"``), in the
    reference layout (``"reference"``) or as a Hugging Face folder (``"huggingface"``: the files
    transformers' ``save_pretrained`` writes, see :func:`~deformable_detr.huggingface.save_huggingface`);
    returns the layout written.

    By default the destination's name chooses: ``.safetensors`` or ``.pt`` ours, ``.pth`` the
    reference layout, a name without a suffix a Hugging Face folder; another name is refused.

    What is written is the model alone: its weights (a training checkpoint's average of the
    weights where it has one), with the class names where the layout has a place for them (ours,
    Hugging Face) and the image size where the source records it. A Hugging Face
    folder's image processor needs a size: where the source records none, it gets the published
    one. Training state is never written, whatever the destination's suffix: a converted ``.pt``
    does not resume a run.

    Raises:
        CheckpointError: the source cannot be read, or the layout cannot hold its model (a
            backbone the reference code or timm has no equivalent for).
        ValueError: an unknown layout, or a destination whose name promises another (or no) layout.
    """
    destination = Path(destination)
    layout = layout or _layout_named_by(destination)
    _check_destination(destination, layout)
    checkpoint = read_checkpoint(source)
    model = checkpoint.build_model()
    try:
        if layout == "reference":
            save_reference_checkpoint(destination, model, image_size=checkpoint.image_size)
        elif layout == "ours":
            save_checkpoint(destination, model, class_names=checkpoint.class_names, image_size=checkpoint.image_size)
        else:
            save_huggingface(destination, model, class_names=checkpoint.class_names, image_size=checkpoint.input_size)
    except ValueError as error:  # a model the layout has no place for (ours holds every model read)
        raise CheckpointError(f"{source}: {error}") from None
    return layout


def _layout_named_by(destination: Path) -> str:
    layout = _LAYOUT_OF_SUFFIX.get(destination.suffix)
    if layout is None:
        raise ValueError(f"{destination}: its name does not tell the layout to write: name it .safetensors or .pt "
                         "(ours), .pth (reference) or a folder without a suffix (huggingface), or choose one with --to")
    return layout


def _check_destination(destination: Path, layout: str) -> None:
    """Refuse an unknown layout, or a name that promises another format than ``layout``'s, which
    reading it back would assume."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "reference" and destination.suffix == ".safetensors":
        raise ValueError(f"{destination}: the reference layout (--to reference) is a PyTorch file, not .safetensors; "
                         "name it .pth, or choose --to ours for a .safetensors file")
    if layout == "huggingface" and destination.suffix in _CHECKPOINT_FILE_SUFFIXES:
        raise ValueError(f"{destination}: the huggingface layout (--to huggingface) is a folder, not a "
                         f"{destination.suffix} file; name a folder without a suffix, or choose --to ours for a file")


def _first_problem(error: RuntimeError) -> str:
    lines = _message_lines(error)
    return "; ".join(lines[1:3]) if len(lines) > 1 else lines[0]


def _message_lines(error: BaseException) -> list[str]:
    """The non-blank lines of ``error``'s message, or its type's name where it has none (an EOFError's)."""
    return [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint of any supported format.

    - ours: ``.safetensors`` with our metadata, or a ``torch.save`` dict with ``format``/``config``/``model``;
    - the reference implementation's released files: ``{"model", "args": argparse.Namespace, ...}``;
    - Hugging Face transformers: a folder (or a file inside it) with ``config.json`` and
      ``model.safetensors`` or ``pytorch_model.bin``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    try:
        if path.is_file() and path.suffix == ".safetensors":
            return _read_safetensors(path)
        huggingface_folder = _huggingface_folder(path)
        if huggingface_folder is not None:
            return _read_huggingface(huggingface_folder, path)
        if path.is_dir():
            raise CheckpointError(f"{path}: folder holds no config.json with {' or '.join(HF_WEIGHT_FILES)}"
                                  f"{_checkpoints_inside(path)}")
        return _read_pickled(path)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def _checkpoints_inside(folder: Path) -> str:
    """The checkpoint files in ``folder`` (a training run's output folder: best.pt, checkpoint.pt), to
    be given instead of it; nothing where it holds none."""
    # Not the weights of a transformers folder without its config.json, which read only beside one.
    files = sorted(file.name for file in folder.iterdir()
                   if file.suffix in _CHECKPOINT_FILE_SUFFIXES and file.name not in HF_WEIGHT_FILES and file.is_file())
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    return f"; give one of its files: {', '.join(files[:3])}{more}" if files else ""


def _huggingface_folder(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    if (folder / "config.json").is_file() and (path.is_dir() or path.name in (*HF_WEIGHT_FILES, "config.json")):
        return folder
    return None


def _read_huggingface(folder: Path, path: Path) -> Checkpoint:
    weights = path if path.name in HF_WEIGHT_FILES else next((folder / f for f in HF_WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: config.json found but no {' or '.join(HF_WEIGHT_FILES)} beside it")
    hf_config = _read_json(folder / "config.json")
    config = config_from_huggingface(hf_config)
    state_dict = _load_safetensors(weights) if weights.suffix == ".safetensors" else _torch_load(weights)
    return Checkpoint(path, config, state_dict_from_huggingface(state_dict, config), "huggingface",
                      class_names=_huggingface_class_names(hf_config), image_size=_huggingface_image_size(folder))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(content).__name__}")
    return content


def _huggingface_image_size(folder: Path) -> int | None:
    """The shorter side the folder's image processor resizes to (the size the model was trained
    at), or None where the folder has no processor that says."""
    processor = folder / "preprocessor_config.json"
    size = _read_json(processor).get("size") if processor.is_file() else None
    # Older processors wrote the shorter side as a bare number.
    shortest_edge = size.get("shortest_edge") if isinstance(size, dict) else size
    return shortest_edge if isinstance(shortest_edge, int) else None


def _huggingface_class_names(hf_config: Mapping[str, Any]) -> dict[int, str] | None:
    names = class_names_by_id(hf_config.get("id2label"), field="id2label") or {}
    # transformers (and config_to_huggingface) name each id that has no name LABEL_<id>: not a name.
    return {identifier: name for identifier, name in names.items() if name != f"LABEL_{identifier}"} or None


def _read_safetensors(path: Path) -> Checkpoint:
    """Ours, told by its metadata, else the weights of the Hugging Face folder it lies in."""
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    ours = metadata.get("format") == FORMAT
    # The metadata decides before the folder: ours may be named model.safetensors beside an unrelated config.json.
    huggingface_folder = None if ours else _huggingface_folder(path)
    if huggingface_folder is not None:
        return _read_huggingface(huggingface_folder, path)
    if not ours or "config" not in metadata:
        raise CheckpointError(
            f"{path}: safetensors file without a deformable-detr config (a Hugging Face file needs its config.json beside it)"
        )
    config = _model_config(json.loads(metadata["config"]))
    usage = json.loads(metadata.get("usage", "{}"))
    return Checkpoint(path, config, _load_safetensors(path), FORMAT, class_names_by_id(usage.get("class_names")),
                      _image_size(usage.get("image_size")))


def _model_config(fields: object) -> ModelConfig:
    """The stored config (ModelConfig checks each field's type)."""
    if not isinstance(fields, Mapping):
        raise ValueError(f"config is {reprlib.repr(fields)}; expected a mapping of ModelConfig fields")
    return ModelConfig.from_dict(dict(fields))


def _image_size(size: object) -> int | None:
    if size is not None and not (type(size) is int and size > 0):
        raise ValueError(f"image_size is {reprlib.repr(size)}; expected a positive integer (the shorter side in pixels)")
    return size


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _torch_load(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        if not file.read(4).startswith(_TORCH_FILE_STARTS):
            raise CheckpointError(
                f"{path}: not a checkpoint (not a PyTorch file, nor .safetensors, nor a Hugging Face folder)"
            )
    try:
        with torch.serialization.safe_globals(list(_SAFE_CLASSES)):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = _message_lines(error)
        refused = next((match[1] for line in lines if (match := _REFUSED_GLOBAL.search(line))), None)
        if refused is not None:
            raise CheckpointError(f"{path}: refused to unpickle {refused}: a checkpoint holds only tensors and plain "
                                  "values, and loading runs no code from a file (save_checkpoint(path, model) writes "
                                  "a model's)") from None
        # torch.load's message ends with a pointer to its documentation, after the unpickler's error.
        problem = lines[-2] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? ({problem})") from None
    # A legacy (pickle) file cut short fails inside the unpickler, as whatever its last read raised.
    except (RuntimeError, EOFError, OSError, IndexError, struct.error) as error:
        # Without the paragraph of guesses at the cause that torch adds to a cut zip archive's error.
        problem = _message_lines(error)[0].partition(". This is an internal miniz error")[0]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? ({problem})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(payload).__name__}")
    return payload


def _read_pickled(path: Path) -> Checkpoint:
    payload = _torch_load(path)
    if payload.get("format") == FORMAT:
        missing = [entry for entry in ("config", "model") if entry not in payload]
        if missing:
            raise CheckpointError(f"{path}: no {' or '.join(map(repr, missing))} entry: not a complete deformable-detr checkpoint")
        extra = {k: v for k, v in payload.items() if k not in _OWN_ENTRIES}
        # Where the run kept an average of the weights, it is what the checkpoint is used with, and
        # the weights as trained stay in extra (for a resumed run).
        _state_dict(extra["model"], "the 'model' entry")  # checked even beside an average: a resumed run loads it
        weights = _averaged_weights(extra["ema"]) if "ema" in extra else extra.pop("model")
        return Checkpoint(path, _model_config(payload["config"]), weights, FORMAT,
                          class_names_by_id(payload.get("class_names")), _image_size(payload.get("image_size")), extra)
    state_dict = payload.get("model", payload)
    if isinstance(state_dict, dict) and _HF_LEVEL_EMBED in state_dict:
        raise CheckpointError(f"{path}: a transformers state dict ({_HF_LEVEL_EMBED!r} weights): it reads from its "
                              f"folder, beside the config.json transformers saves with it")
    if not isinstance(state_dict, dict) or "transformer.level_embed" not in state_dict:
        raise CheckpointError(f"{path}: not a Deformable DETR checkpoint (no 'transformer.level_embed' weights)")
    state_dict = _state_dict(state_dict, "the 'model' entry" if "model" in payload else "the file")
    args = payload.get("args")
    flags = vars(args) if args is not None else {}
    try:
        config = config_from_reference(state_dict, flags)
    except KeyError as error:  # a weight the config is read from
        raise CheckpointError(f"{path}: missing weights, the first: {error.args[0]}") from None
    # Only files written here record the size (reference_payload); the released ones do not.
    image_size = _image_size(flags.get("image_size"))
    return Checkpoint(path, config, state_dict, "reference", released_class_names(config), image_size)


def _state_dict(value: object, what: str) -> dict[str, Tensor]:
    """``value``, checked to be a state dict: load_state_dict's own errors do not say which one."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {type(value).__name__}; expected a state dict (weight names to tensors)")
    for name, tensor in value.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{what} holds {type(tensor).__name__} as {name!r}; expected a state dict (weight names to tensors)")
    return value


def _averaged_weights(ema: object) -> dict[str, Tensor]:
    """The weights of an ``ema`` entry (:meth:`~deformable_detr.train.ema.WeightAverage.state_dict`)."""
    if not isinstance(ema, dict) or "model" not in ema:
        raise ValueError("the 'ema' entry has no 'model' weights")
    return _state_dict(ema["model"], "the 'model' in the 'ema' entry")
