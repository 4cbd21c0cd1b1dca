"""Checkpoints: ours round-trip, released reference files load safely, bad files fail in one line."""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import R50_PRESETS, REFERENCE_BACKBONE

from deformable_detr import PRESETS, CheckpointError, build_model, checkpoints, load_pretrained, save_checkpoint
from deformable_detr.checkpoints import convert_checkpoint, read_checkpoint
from deformable_detr.cli import main


def reference_args(preset: str) -> argparse.Namespace:
    """The training flags a released checkpoint carries (a subset of the reference's argparse)."""
    config = PRESETS[preset]
    return argparse.Namespace(
        lr=2e-4, lr_backbone=2e-5, batch_size=2, epochs=50, lr_drop=40, clip_max_norm=0.1,
        backbone="resnet50", dilation=config.dilation, position_embedding="sine",
        num_feature_levels=config.num_feature_levels, enc_layers=6, dec_layers=6, dim_feedforward=1024,
        hidden_dim=256, dropout=0.1, nheads=8, num_queries=300, dec_n_points=4, enc_n_points=4,
        with_box_refine=config.with_box_refine, two_stage=config.two_stage, masks=False,
        aux_loss=True, set_cost_class=2, dataset_file="coco", coco_path="./data/coco", output_dir="exps/r50",
        device="cuda", seed=42, resume="", start_epoch=0, eval=False, num_workers=2, lr_linear_proj_names=["reference_points", "sampling_offsets"],
    )


def save_reference_checkpoint(path, model, preset):
    torch.save(
        {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
         "lr_scheduler": {"step_size": 40, "gamma": 0.1, "last_epoch": 50}, "epoch": 49, "args": reference_args(preset)},
        path,
    )


def same_outputs(a, b):
    images = [torch.randn(3, 128, 160), torch.randn(3, 112, 128)]
    with torch.no_grad():
        first, second = a.eval()(images), b.eval()(images)
    torch.testing.assert_close(first["pred_logits"], second["pred_logits"])
    torch.testing.assert_close(first["pred_boxes"], second["pred_boxes"])


@pytest.mark.parametrize("preset", R50_PRESETS)
def test_released_reference_checkpoint_picks_its_configuration(tmp_path, preset):
    model = build_model(preset)
    path = tmp_path / "checkpoint.pth"
    save_reference_checkpoint(path, model, preset)
    checkpoint = read_checkpoint(path)
    assert checkpoint.source_format == "reference"
    assert checkpoint.config == PRESETS[preset]
    if preset in ("r50_two_stage", "r50_single_scale_dc5"):
        same_outputs(model, load_pretrained(path))


def test_reference_checkpoint_without_args_is_read_from_its_weights(tmp_path):
    model = build_model("r50_box_refine", num_classes=21)
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pth")
    config = read_checkpoint(tmp_path / "bare.pth").config
    assert config == PRESETS["r50_box_refine"].__class__(**{**PRESETS["r50_box_refine"].to_dict(), "num_classes": 21})


@pytest.mark.parametrize("overrides", [{}, {"backbone_norm": "batch"}], ids=["tiny", "tiny-trained-from-scratch"])
def test_a_bare_state_dict_is_read_with_the_backbone_its_weights_have(tmp_path, overrides):
    model = build_model("tiny", num_classes=5, **overrides)
    torch.save(model.state_dict(), tmp_path / "weights.pt")  # the weights alone, as torch's tutorials save them
    checkpoint = read_checkpoint(tmp_path / "weights.pt")
    assert checkpoint.config == model.config
    same_outputs(model, checkpoint.build_model())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("overrides", [{}, {"with_box_refine": False}, {"two_stage": True}], ids=["refine", "shared-heads", "two-stage"])
def test_our_checkpoint_round_trip(tmp_path, suffix, overrides):
    model = build_model("tiny", num_classes=5, **overrides)
    path = tmp_path / f"model{suffix}"
    save_checkpoint(path, model)
    loaded = load_pretrained(path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert not loaded.training
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_training_state_travels_in_pt_checkpoints(tmp_path):
    model = build_model("tiny")
    save_checkpoint(tmp_path / "last.pt", model, epoch=3, optimizer={"lr": 1e-4})
    checkpoint = read_checkpoint(tmp_path / "last.pt")
    assert checkpoint.extra == {"epoch": 3, "optimizer": {"lr": 1e-4}}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_class_names_and_image_size_travel_in_our_checkpoints(tmp_path, suffix):
    save_checkpoint(tmp_path / f"model{suffix}", build_model("tiny"), class_names={1: "cat", 7: "dog"}, image_size=320)
    checkpoint = read_checkpoint(tmp_path / f"model{suffix}")
    assert (checkpoint.class_names, checkpoint.image_size, checkpoint.extra) == ({1: "cat", 7: "dog"}, 320, {})


def test_a_safetensors_file_is_as_readable_as_any_other_written(tmp_path):
    model = build_model("tiny")
    save_checkpoint(tmp_path / "model.pt", model)
    save_checkpoint(tmp_path / "model.safetensors", model)  # safetensors replaces the file it is given with a private one
    assert (tmp_path / "model.safetensors").stat().st_mode == (tmp_path / "model.pt").stat().st_mode


def test_ours_named_like_a_hugging_face_file_reads_as_ours_beside_any_config_json(tmp_path):
    save_checkpoint(tmp_path / "model.safetensors", build_model("tiny", num_classes=5), class_names={1: "cat"})
    (tmp_path / "config.json").write_text('{"learning_rate": 0.001}')  # another tool's, in the same folder
    checkpoint = read_checkpoint(tmp_path / "model.safetensors")
    assert (checkpoint.source_format, checkpoint.config.num_classes, checkpoint.class_names) == ("deformable-detr", 5, {1: "cat"})


def assert_same_weights(first, second):
    assert sorted(first) == sorted(second)  # safetensors stores names sorted
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("preset, overrides", [("tiny", {"two_stage": True, **REFERENCE_BACKBONE}), ("r50_single_scale_dc5", {"num_classes": 21})])
def test_convert_ours_to_reference_and_back_is_lossless(tmp_path, preset, overrides):
    model = build_model(preset, **overrides)
    save_checkpoint(tmp_path / "ours.safetensors", model, image_size=256)
    assert convert_checkpoint(tmp_path / "ours.safetensors", tmp_path / "reference.pth") == "reference"
    assert read_checkpoint(tmp_path / "reference.pth").source_format == "reference"
    assert sorted(torch.load(tmp_path / "reference.pth", weights_only=False)) == ["args", "model"], "the reference's layout"
    assert convert_checkpoint(tmp_path / "reference.pth", tmp_path / "back.safetensors") == "ours"
    back = read_checkpoint(tmp_path / "back.safetensors")
    assert (back.config, back.image_size) == (model.config, 256)
    assert_same_weights(model.state_dict(), back.state_dict)


def test_a_reference_file_without_an_image_size_says_it_is_not_recorded(tmp_path, capsys):
    checkpoints.save_reference_checkpoint(tmp_path / "reference.pth", build_model("tiny", **REFERENCE_BACKBONE))  # no size, as released
    checkpoint = read_checkpoint(tmp_path / "reference.pth")
    assert (checkpoint.image_size, checkpoint.input_size) == (None, 800)
    assert main(["inspect", str(tmp_path / "reference.pth")]) == 0
    assert "image size: not recorded (800 is assumed)" in capsys.readouterr().out
    convert_checkpoint(tmp_path / "reference.pth", tmp_path / "ours.pt")
    assert read_checkpoint(tmp_path / "ours.pt").image_size is None


def test_save_reference_refuses_an_image_size_the_reader_would_refuse(tmp_path):
    with pytest.raises(ValueError, match=r"^image_size is 0; expected a positive integer"):
        checkpoints.save_reference_checkpoint(tmp_path / "model.pth", build_model("tiny"), image_size=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset", R50_PRESETS)
def test_reference_layout_reads_as_the_published_configuration(tmp_path, preset):
    checkpoints.save_reference_checkpoint(tmp_path / "model.pth", build_model(preset))
    payload = torch.load(tmp_path / "model.pth", weights_only=False)
    assert sorted(payload) == ["args", "model"]
    assert read_checkpoint(tmp_path / "model.pth").config == PRESETS[preset]


def test_trainable_batch_norm_converts_to_the_references_frozen_one(tmp_path):
    model = build_model("tiny", backbone_norm="batch", **REFERENCE_BACKBONE)
    model.train()(torch.randn(2, 3, 96, 96))  # running statistics away from their initial values
    save_checkpoint(tmp_path / "scratch.pt", model)
    convert_checkpoint(tmp_path / "scratch.pt", tmp_path / "reference.pth")
    converted = load_pretrained(tmp_path / "reference.pth")
    assert converted.config.backbone_norm == "frozen"
    same_outputs(model, converted)


@pytest.mark.parametrize("overrides, problem", [
    ({}, "backbone resnet18 has no place in the reference layout: the reference code builds bottleneck ResNets only"),
    ({"backbone": "resnet50"}, "backbone width 24 has no place in the reference layout: the reference code builds "
                               "torchvision's ResNets, of width 64"),
])  # fmt: skip
def test_convert_refuses_a_backbone_the_reference_code_cannot_build(tmp_path, capsys, overrides, problem):
    save_checkpoint(tmp_path / "tiny.pt", build_model("tiny", **overrides))
    (tmp_path / "reference.pth").write_bytes(b"kept")
    assert main(["convert", str(tmp_path / "tiny.pt"), str(tmp_path / "reference.pth")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"deformable-detr: error: {tmp_path / 'tiny.pt'}: {problem}") and error.count("\n") == 1
    assert (tmp_path / "reference.pth").read_bytes() == b"kept"


def test_cli_convert(tmp_path, capsys):
    save_checkpoint(tmp_path / "ours.pt", build_model("tiny"), class_names={1: "cat"}, epoch=2)
    assert main(["convert", str(tmp_path / "ours.pt"), str(tmp_path / "weights.safetensors"), "--to", "ours"]) == 0
    assert "written in the ours layout" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "weights.safetensors").class_names == {1: "cat"}
    convert_checkpoint(tmp_path / "ours.pt", tmp_path / "copy.pt", layout="ours")
    assert read_checkpoint(tmp_path / "copy.pt").extra == {}, "a conversion writes the model, never training state"
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "out.pth")]) == 1
    assert "missing.pt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("tiny"))
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, build_model("tiny"))
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


class Payload:
    """Stands for an arbitrary object a malicious checkpoint would smuggle in."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_arbitrary_objects_are_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "args": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: refused to unpickle"):
        load_pretrained(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content, refused", [
    (lambda: build_model("tiny"), "deformable_detr.model.detector.DeformableDETR"),  # torch.save(model), whole
    (lambda: {"model": {}, "args": Payload()}, f"{os.system.__module__}.system"),  # a module torch blocks
], ids=["whole-model", "code"])  # fmt: skip
def test_a_refused_class_is_named_without_torchs_advice_to_allow_it(tmp_path, capsys, content, refused):
    torch.save(content(), tmp_path / "model.pt")
    assert main(["inspect", str(tmp_path / "model.pt")]) == 1
    assert capsys.readouterr().err == (
        f"deformable-detr: error: {tmp_path / 'model.pt'}: refused to unpickle {refused}: a checkpoint holds only "
        "tensors and plain values, and loading runs no code from a file (save_checkpoint(path, model) writes a "
        "model's)\n"
    )


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("tiny"))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError) as error:
        load_pretrained(path)
    # torch's paragraph of guesses after its first sentence left out
    assert str(error.value) == (f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? (PytorchStreamReader "
                                f"failed reading zip archive: failed finding central directory)")


def legacy_pytorch_file() -> bytes:
    """A checkpoint in torch.save's format before torch 1.6: a bare pickle stream, not a zip archive."""
    buffer = io.BytesIO()
    torch.save({"model": {"weight": torch.zeros(3)}}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def test_a_legacy_pytorch_file_cut_anywhere_fails_in_one_line(tmp_path):
    # Cut short, the unpickler fails in whatever its last read raises: an EOFError without a message,
    # an IndexError, a struct.error, ...
    content, path = legacy_pytorch_file(), tmp_path / "legacy.pth"
    for length in range(2, len(content)):
        path.write_bytes(content[:length])
        with pytest.raises(CheckpointError) as error:
            read_checkpoint(path)
        assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value), length


@pytest.mark.parametrize("length", [2, 10, 50])
def test_cli_inspect_names_a_cut_legacy_pytorch_file(tmp_path, capsys, length):
    path = tmp_path / "legacy.pth"
    path.write_bytes(legacy_pytorch_file()[:length])  # the first 2 bytes: a pickle's protocol header alone
    assert main(["inspect", str(path)]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {path}: not a readable PyTorch checkpoint, truncated or corrupt? (EOFError)\n"


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, build_model("tiny"))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained(path)


def test_weights_that_do_not_fit_their_config(tmp_path):
    model = build_model("tiny", num_classes=5)
    payload = {"format": "deformable-detr", "config": {**model.config.to_dict(), "num_classes": 9}, "model": model.state_dict()}
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mismatch.pt: weights do not fit .*class_embed"):
        load_pretrained(tmp_path / "mismatch.pt")


def test_weights_that_do_not_fit_are_counted_not_listed(tmp_path):
    # torch's message names every missing weight: a whole encoder layer's here, hundreds for another backbone.
    model = build_model("tiny")
    config = {**model.config.to_dict(), "encoder_layers": model.config.encoder_layers + 1}
    torch.save({"format": "deformable-detr", "config": config, "model": model.state_dict()}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path / "short.pt")
    assert re.fullmatch(r".*short.pt: weights do not fit the model it describes: \d+ weights differ, "
                        r"the first: transformer\.encoder\.layers\.2\.\S+ \(missing\)", str(error.value))


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"not a checkpoint at all", "not a checkpoint \\(not a PyTorch file"),
        (None, "not a Deformable DETR checkpoint"),
        ({"model.level_embed": torch.zeros(4, 256)}, "a transformers state dict \\('model.level_embed' weights\\): it "
                                                    "reads from its folder, beside the config.json transformers saves"),
        ([1, 2, 3], "expected a dict of weights, found list"),
    ],
    ids=["garbage", "other-model", "transformers-weights-alone", "not-a-dict"],
)
def test_files_that_are_not_checkpoints(tmp_path, content, problem):
    path = tmp_path / "file.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content if content is not None else {"model": {"fc.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=f"file.pth: {problem}") as error:
        load_pretrained(path)
    assert "\n" not in str(error.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pt: no such file"):
        load_pretrained(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="holds no config.json with model.safetensors or pytorch_model.bin$"):
        load_pretrained(tmp_path)


def test_a_folder_of_checkpoints_is_refused_naming_them(tmp_path, capsys):
    """A training run's output folder, given where its best.pt is meant."""
    for name in ("checkpoint.pt", "best.pt", "log.jsonl", "model.safetensors"):  # the last, a transformers file
        (tmp_path / name).touch()
    assert main(["inspect", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"deformable-detr: error: {tmp_path}: folder holds no config.json with "
                                       "model.safetensors or pytorch_model.bin; give one of its files: best.pt, checkpoint.pt\n")


def test_cli_inspect_reports_good_and_bad_files(tmp_path, capsys):
    save_checkpoint(tmp_path / "tiny.safetensors", build_model("tiny"), class_names={2: "dog", 1: "cat"}, image_size=320)
    assert main(["inspect", str(tmp_path / "tiny.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "deformable-detr checkpoint, loads with strict=True" in out
    assert "class names: cat, dog" in out and "image size: 320" in out
    (tmp_path / "broken.pt").write_bytes(b"\x00" * 100)
    assert main(["inspect", str(tmp_path / "broken.pt")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "broken.pt" in error


def test_console_script_exits_non_zero_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deformable_detr.cli", "inspect", str(tmp_path / "absent.pth")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"deformable-detr: error: {tmp_path / 'absent.pth'}: no such file or folder"]


def save_altered_checkpoint(path, **changes):
    """A tiny checkpoint of ours with top-level entries replaced (None: removed) and config fields
    set (``config_changes``)."""
    save_checkpoint(path, build_model("tiny"))
    payload = torch.load(path, weights_only=True)
    payload["config"].update(changes.pop("config_changes", {}))
    payload.update(changes)
    torch.save({key: value for key, value in payload.items() if value is not None}, path)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"class_names": ["cat", "dog"]}, "class_names is ['cat', 'dog']; expected a mapping of category id to name"),
        ({"class_names": {"cat": 1}}, "class_names is {'cat': 1}; expected a mapping of category id to name"),
        ({"image_size": "800"}, "image_size is '800'; expected a positive integer"),
        ({"image_size": 0}, "image_size is 0; expected a positive integer"),
        ({"model": None}, "no 'model' entry: not a complete deformable-detr checkpoint"),
        ({"config": None}, "no 'config' entry: not a complete deformable-detr checkpoint"),
        ({"config": [1, 2]}, "config is [1, 2]; expected a mapping of ModelConfig fields"),
        ({"config_changes": {"num_queries": "300"}}, "config field num_queries is '300'; expected int"),
        ({"config_changes": {"backbone_weights": 1}}, "config field backbone_weights is 1; expected str | None"),
        ({"config_changes": {"two_stage": "yes"}}, "config field two_stage is 'yes'; expected bool"),
    ],
    ids=["names-list", "names-by-name", "size-string", "size-zero", "no-model", "no-config", "config-list",
         "int-field", "optional-field", "bool-field"],
)
def test_entries_of_the_wrong_kind_are_named(tmp_path, capsys, changes, problem):
    path = tmp_path / "altered.pt"
    save_altered_checkpoint(path, **changes)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert str(error.value).startswith(f"{path}: {problem}") and "\n" not in str(error.value)
    assert main(["inspect", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"deformable-detr: error: {path}: {problem}")


def test_a_whole_number_is_a_float_field(tmp_path):
    save_altered_checkpoint(tmp_path / "dropout.pt", config_changes={"dropout": 0})
    assert read_checkpoint(tmp_path / "dropout.pt").config.dropout == 0


@pytest.mark.parametrize("name, layout, read_as", [
    ("model.safetensors", "ours", "deformable-detr"),
    ("model.pt", "ours", "deformable-detr"),
    ("model.pth", "reference", "reference"),
    ("model-hf", "huggingface", "huggingface"),
])  # fmt: skip
def test_the_destinations_name_chooses_the_layout(tmp_path, capsys, name, layout, read_as):
    # Of a backbone the reference code and transformers hold, the transformer as small as the tests' others.
    save_checkpoint(tmp_path / "ours.pt", build_model("tiny", **REFERENCE_BACKBONE, d_model=64, dim_feedforward=64))
    assert main(["convert", str(tmp_path / "ours.pt"), str(tmp_path / name)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / name}: written in the {layout} layout\n"
    assert read_checkpoint(tmp_path / name).source_format == read_as


@pytest.mark.parametrize("name, to, problem", [
    ("model.bin", [], "its name does not tell the layout to write: name it .safetensors or .pt (ours), .pth "
                      "(reference) or a folder without a suffix (huggingface), or choose one with --to"),
    ("model.safetensors", ["--to", "reference"], "the reference layout (--to reference) is a PyTorch file, not "
                                                 ".safetensors; name it .pth, or choose --to ours for a .safetensors file"),
    ("hf.pt", ["--to", "huggingface"], "the huggingface layout (--to huggingface) is a folder, not a .pt file; name "
                                       "a folder without a suffix, or choose --to ours for a file"),
])  # fmt: skip
def test_convert_refuses_a_name_that_promises_another_format_naming_the_flag(tmp_path, capsys, name, to, problem):
    save_checkpoint(tmp_path / "ours.pt", build_model("tiny"))
    assert main(["convert", str(tmp_path / "ours.pt"), str(tmp_path / name), *to]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {tmp_path / name}: {problem}\n"
    assert sorted(tmp_path.iterdir()) == [tmp_path / "ours.pt"]


def test_convert_onto_a_folder_names_the_destination(tmp_path, capsys):
    save_checkpoint(tmp_path / "ours.pt", build_model("tiny"))
    (tmp_path / "cv").mkdir()
    assert main(["convert", str(tmp_path / "ours.pt"), str(tmp_path / "cv"), "--to", "ours"]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {tmp_path / 'cv'}: is a folder, not a file\n"
    assert sorted(tmp_path.iterdir()) == [tmp_path / "cv", tmp_path / "ours.pt"]


class Unreadable:
    """A value torch.load(weights_only=True) refuses, as every class outside its short list."""


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize(
    "arguments, problem",
    [
        ({"image_size": 0}, "image_size is 0; expected a positive integer"),
        ({"image_size": "800"}, "image_size is '800'; expected a positive integer"),
        ({"image_size": -5}, "image_size is -5; expected a positive integer"),
        ({"image_size": 800.0}, "image_size is 800.0; expected a positive integer"),
        ({"class_names": {"cat": 1}}, "class_names is {'cat': 1}; expected a mapping of category id to name"),
        ({"class_names": {-1: "a"}}, "class_names is {-1: 'a'}; expected a mapping of category id to name"),
        ({"class_names": ["a", "b"]}, "class_names is ['a', 'b']; expected a mapping of category id to name"),
    ],
    ids=["size-zero", "size-string", "size-negative", "size-float", "names-by-name", "negative-id", "names-list"],
)
def test_save_refuses_usage_the_reader_would_refuse(tmp_path, suffix, arguments, problem):
    with pytest.raises(ValueError) as error:
        save_checkpoint(tmp_path / f"model{suffix}", build_model("tiny"), **arguments)
    assert str(error.value).startswith(problem) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, problem",
    [
        ({"note": Unreadable()}, "extra entry note is a test_checkpoints.Unreadable: a checkpoint holds only tensors"),
        ({"source": Path("data")}, "extra entry source is a pathlib.PosixPath: a checkpoint holds only tensors"),
        ({"hook": lambda: None}, "extra entry hook is a builtins.function: a checkpoint holds only tensors"),
        ({"optimizer": {"state": {0: {"step": np.float64(3)}}}},
         "extra entry optimizer['state'][0]['step'] is a numpy.float64: a checkpoint holds only tensors"),
        ({"seen": {frozenset({1}): "x"}}, "extra entry seen key frozenset({1}) is a builtins.frozenset: a checkpoint"),
        ({"args": argparse.Namespace(out=Path("runs"))}, "extra entry args['out'] is a pathlib.PosixPath"),
        ({"config": {}}, "extra entry 'config' would replace the checkpoint's own; choose another name"),
        ({"format": "mine"}, "extra entry 'format' would replace the checkpoint's own; choose another name"),
        ({"ema": {"updates": 3}}, "the 'ema' entry has no 'model' weights"),
        ({"ema": {"model": 3}}, "the 'model' in the 'ema' entry is int; expected a state dict"),
        ({"ema": {"model": build_model("tiny", num_classes=3).state_dict()}},
         "the 'model' in the 'ema' entry does not fit the model: 6 weights differ, the first: class_embed.0.bias (of another shape)"),
    ],
    ids=["object", "path", "lambda", "numpy-deep-inside", "refused-key", "namespace-content", "config", "format",
         "ema-without-weights", "ema-weights-int", "ema-of-another-model"],
)
def test_save_refuses_extra_entries_the_reader_would_refuse(tmp_path, extra, problem):
    with pytest.raises(ValueError) as error:
        save_checkpoint(tmp_path / "model.pt", build_model("tiny"), **extra)
    assert str(error.value).startswith(problem) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_everything_weights_only_loading_reads_is_saved(tmp_path):
    model = build_model("tiny")
    optimizer = torch.optim.AdamW(model.parameters())
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # state: a step count and two averages per parameter
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.1 ** epoch)
    plain = {"none": None, "flags": [True, 1, 2.5, 1j, "s", b"b", bytearray(b"a")], "pair": (1, 2), "ids": {3, 4},
             "ordered": OrderedDict(a=1), "counts": Counter("aab"), "shape": torch.Size([2, 3]),
             "device": torch.device("cpu"), "dtype": torch.bfloat16, "args": argparse.Namespace(lr=1e-4)}
    ema = {"model": model.state_dict(), "updates": 3, "decay": 0.9999, "warmup_updates": 1000}
    save_checkpoint(tmp_path / "last.pt", model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    plain=plain, ema=ema)
    extra = read_checkpoint(tmp_path / "last.pt").extra
    assert extra["plain"] == plain and extra["scheduler"] == scheduler.state_dict()
    assert len(extra["optimizer"]["state"]) == len(list(model.parameters()))


def test_save_needs_a_deformable_detr(tmp_path):
    problem = "model is a Linear; expected a DeformableDETR (from build_model or load_pretrained)"
    with pytest.raises(TypeError, match=re.escape(problem)):
        save_checkpoint(tmp_path / "model.pt", torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=re.escape(problem)):
        checkpoints.save_reference_checkpoint(tmp_path / "model.pth", torch.nn.Linear(2, 2))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"model": 3}, "the 'model' entry is int; expected a state dict (weight names to tensors)"),
        ({"model": {"class_embed.0.bias": 1.5}},
         "the 'model' entry holds float as 'class_embed.0.bias'; expected a state dict (weight names to tensors)"),
        ({"ema": {"updates": 3}}, "the 'ema' entry has no 'model' weights"),
        ({"ema": {"model": [1, 2]}}, "the 'model' in the 'ema' entry is list; expected a state dict (weight names to tensors)"),
    ],
    ids=["model-int", "model-not-tensors", "ema-without-weights", "ema-weights-list"],
)
def test_tampered_weights_are_named(tmp_path, changes, problem):
    path = tmp_path / "altered.pt"
    save_altered_checkpoint(path, **changes)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(path)
    assert str(error.value) == f"{path}: {problem}"


def test_reference_file_missing_weights_names_the_first(tmp_path):
    state_dict = build_model("r50_box_refine").state_dict()
    del state_dict["transformer.encoder.layers.0.linear1.weight"]
    torch.save({"model": state_dict}, tmp_path / "r.pt")
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path / "r.pt")
    assert str(error.value) == f"{tmp_path / 'r.pt'}: missing weights, the first: transformer.encoder.layers.0.linear1.weight"


@pytest.mark.parametrize("device, problem", [("gpu", "unknown device 'gpu': expected cpu, cuda"), ("cuda:99", "device 'cuda:99': ")])
def test_load_pretrained_refuses_an_unusable_device_before_reading(tmp_path, device, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        load_pretrained(tmp_path / "absent.pt", device=device)  # the device is checked first


def test_a_checkpoint_write_that_fails_is_an_os_error_naming_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    """torch's archive writer reports a short write (a full disk) as a RuntimeError."""
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("tiny"))
    before = path.read_bytes()

    def full_disk(payload, file):
        Path(file).write_bytes(b"the first bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 19315712 vs 19315604")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"^{re.escape(str(path))}: cannot be written \(\[enforce fail"):
        save_checkpoint(path, build_model("tiny"))
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
