"""The training loop: exact resumption, fine-tuning to new classes, stopping on a non-finite loss,
early stopping, and the checkpoint of a run that averages its weights."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch

from deformable_detr import build_model, evaluation, export, report
from deformable_detr.checkpoints import load_pretrained, read_checkpoint, save_checkpoint
from deformable_detr.cli import main
from deformable_detr.data import synthesize
from deformable_detr.predict import Detector
from deformable_detr.train import SetCriterion, TrainConfig, TrainingError, checkpointing, engine, loop, train
from deformable_detr.train.criterion import average_num_boxes

from choices import MatchReplay


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("shapes"), train=8, val=4, image_size=96, seed=1)


def config(data, output_dir, **overrides) -> TrainConfig:
    settings = dict(preset="tiny", epochs=2, batch_size=4, image_size=96, workers=0, seed=3)
    return TrainConfig(data=str(data), output_dir=str(output_dir), **{**settings, **overrides})


def weights(path):
    return read_checkpoint(path).state_dict


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished run of one epoch (of :func:`config`, without a report), to copy."""
    run = tmp_path_factory.mktemp("trained")
    train(config(data, run, epochs=1, report=False))
    return run


def copy_of(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def command(data, run, *flags: str) -> list[str]:
    """The command line of :func:`config`'s run in ``run``, with ``flags``."""
    return ["train", "--data", str(data), "--output-dir", str(run), "--epochs", "1", "--batch-size", "4",
            "--image-size", "96", "--workers", "0", "--seed", "3", "--no-report", *flags]


def test_resume_continues_exactly(data, tmp_path):
    straight = config(data, tmp_path / "straight")
    train(straight)
    interrupted = config(data, tmp_path / "interrupted", epochs=1)
    train(interrupted)
    with pytest.raises(TrainingError, match="exists: pass resume=True to continue that run"):
        train(dataclasses.replace(interrupted, epochs=2))
    with pytest.raises(TrainingError, match=r"checkpoint.pt: the run was trained with other settings: "
                                            r"batch_size=4 \(now 2\), lr=0.0002 \(now 0.001\); "):
        train(dataclasses.replace(interrupted, epochs=2, resume=True, batch_size=2, lr=1e-3))
    # How long it runs may change.
    train(dataclasses.replace(interrupted, epochs=2, resume=True, max_minutes=60.0))
    expected, actual = weights(tmp_path / "straight" / "checkpoint.pt"), weights(tmp_path / "interrupted" / "checkpoint.pt")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    log = (tmp_path / "interrupted" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and (tmp_path / "interrupted" / "best.pt").is_file()


def test_the_command_line_names_flags_where_python_names_fields(data, trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    assert main(command(data, run)) == 1
    assert capsys.readouterr().err == (f"deformable-detr: error: {run / 'checkpoint.pt'} exists: pass --resume to continue "
                                       f"that run, or use another output directory\n")
    assert main(command(data, run, "--resume", "--batch-size", "2", "--lr", "0.001")) == 1
    assert capsys.readouterr().err.startswith(
        f"deformable-detr: error: {run / 'checkpoint.pt'}: the run was trained with other settings: --batch-size 4 "
        f"(now 2), --lr 0.0002 (now 0.001); resume with its settings (only --epochs, --max-minutes, --patience, ")


def test_resume_on_the_command_line_takes_the_runs_settings_for_the_flags_left_out(data, tmp_path, monkeypatch,
                                                                                  capsys):
    """As torchrun restarts and Slurm requeues give the whole command line again, that still resumes;
    and the data, given as a relative path, are found from another working directory."""
    monkeypatch.chdir(data.parent)
    train(config(data.name, tmp_path / "run", epochs=1, report=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--output-dir", "../run", "--resume"]) == 0
    assert "../run/checkpoint.pt: the run is already complete" in capsys.readouterr().out
    assert main(command(data, "../run", "--resume")) == 0  # the same values given again
    assert main(["train", "--output-dir", "../run", "--resume", "--batch-size", "2", "--pad-to-multiple", "32"]) == 1
    assert capsys.readouterr().err.startswith(
        "deformable-detr: error: ../run/checkpoint.pt: the run was trained with other settings: --batch-size 4 (now 2), "
        "--pad-to-multiple 1 (now 32); ")
    assert main(["train", "--output-dir", "../other", "--resume"]) == 1
    assert capsys.readouterr().err == "deformable-detr: error: --data is needed to start a run (../other/checkpoint.pt: no run to resume)\n"
    assert not (tmp_path / "other").exists()


def test_a_warm_up_given_on_resuming_replaces_the_runs_in_the_other_unit(data, tmp_path, capsys):
    """--warmup-steps and --warmup-epochs are one setting: the one given is compared with the run's
    warm-up, not refused as if both had been given."""
    train(config(data, tmp_path / "run", epochs=1, warmup_steps=1, report=False))
    capsys.readouterr()
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--resume", "--warmup-epochs", "0.5"]) == 1
    assert capsys.readouterr().err.startswith(
        f"deformable-detr: error: {tmp_path / 'run' / 'checkpoint.pt'}: the run was trained with other settings: "
        f"--warmup-steps 1 (now 0), --warmup-epochs 0.0 (now 0.5); ")
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--resume", "--warmup-steps", "1"]) == 0


def test_a_resumed_run_reads_its_checkpoint_once_unless_it_is_rewritten_meanwhile(data, trained, tmp_path, monkeypatch):
    """The command takes the run's settings from checkpoint.pt and goes on from what it read there; a
    checkpoint written in between (by a predecessor the run waits for) is read again."""
    run = copy_of(trained, tmp_path)
    checkpoint = run / "checkpoint.pt"
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, *args, **kwargs: loads.append(path) or load(path, *args, **kwargs))
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    assert loads.count(checkpoint) == 1

    def rewritten(path):
        shutil.copyfile(path, tmp_path / "copy.pt")
        os.replace(tmp_path / "copy.pt", path)  # as atomic_write writes: a new file renamed into place
        return found(path)

    found, loads[:] = loop.found_by_every_process, []
    monkeypatch.setattr(loop, "found_by_every_process", rewritten)
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    assert loads.count(checkpoint) == 2


def test_a_run_resumes_on_its_data_however_spelt_wherever_it_lies_but_not_on_other_data(data, trained, tmp_path,
                                                                                         monkeypatch, capsys):
    """A trailing slash, a path from another working directory, a copy on another node's disk are
    the same data; the same folder holding other objects is not."""
    run = copy_of(trained, tmp_path)
    finished = config(data, run, epochs=1, report=False, resume=True)  # resumed, it has nothing left to train
    monkeypatch.chdir(data.parent)
    for place in (f"{data}/", data.name, f"../{data.parent.name}/{data.name}", shutil.copytree(data, tmp_path / "copy")):
        assert train(dataclasses.replace(finished, data=str(place))) == {}
        assert "the run is already complete: it is at epoch 1 and epochs is 1 (a larger epochs trains on)" in \
            capsys.readouterr().out
    changed = shutil.copytree(data, tmp_path / "changed")
    annotations = changed / "annotations" / "instances_train.json"
    instances = json.loads(annotations.read_text())
    instances["annotations"][0]["category_id"] = instances["annotations"][0]["category_id"] % 5 + 1
    annotations.write_text(json.dumps(instances))
    with pytest.raises(TrainingError) as refused:
        train(dataclasses.replace(finished, data=str(changed)))
    assert str(refused.value) == (
        f"{changed}: its 'train' split is not the one the run in {run / 'checkpoint.pt'} trained on (8 images and "
        f"{len(instances['annotations'])} boxes as then, but other objects): resume it on that data, or start a new run from its "
        f"weights (finetune_from='{run / 'checkpoint.pt'}')")
    left_out = instances["images"].pop()
    instances["annotations"] = [box for box in instances["annotations"] if box["image_id"] != left_out["id"]]
    annotations.write_text(json.dumps(instances))
    with pytest.raises(TrainingError, match=r"\(8 images and \d+ boxes then, 7 images and \d+ boxes now\)"):
        train(dataclasses.replace(finished, data=str(changed)))


def test_a_run_resumes_whether_or_not_the_weights_it_started_from_are_where_they_were(data, tmp_path, capsys):
    """They are in its checkpoint; whether it started from any changes the model (its batch norm)."""
    save_checkpoint(tmp_path / "start.pt", build_model("tiny", num_classes=6))
    started = config(data, tmp_path / "run", epochs=1, report=False, finetune_from=str(tmp_path / "start.pt"))
    train(started)
    (tmp_path / "start.pt").rename(tmp_path / "moved.pt")
    assert train(dataclasses.replace(started, finetune_from=str(tmp_path / "moved.pt"), resume=True)) == {}
    with pytest.raises(TrainingError, match=re.escape(f"finetune_from='{tmp_path / 'start.pt'}' (now None)")):
        train(dataclasses.replace(started, finetune_from=None, resume=True))


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(data, tmp_path):
    run = config(data, tmp_path / "run", epochs=1)
    train(run)
    last = tmp_path / "run" / "checkpoint.pt"
    payload = torch.load(last, weights_only=True)
    del payload["train_config"]["iou_aware_classification"]  # as an older version saved it
    torch.save(payload, last)
    with pytest.raises(TrainingError, match=r"iou_aware_classification=False \(now True\)"):
        train(dataclasses.replace(run, epochs=2, resume=True, iou_aware_classification=True))
    train(dataclasses.replace(run, epochs=2, resume=True))
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2


def test_finetune_into_mixed_query_selection_clears_the_content_gain_it_holds_at_zero(tmp_path):
    """A two-stage checkpoint trained without it has a content gain of about 1, which the gradient
    hook would then hold there: queries neither learned (DINO) nor as published."""
    save_checkpoint(tmp_path / "two_stage.pt", build_model("tiny", two_stage=True))
    model = build_model("tiny", two_stage=True, mixed_query_selection=True)
    loop._finetune(model, read_checkpoint(tmp_path / "two_stage.pt"), {1: "shape"})
    gain = model.transformer.pos_trans_norm.weight
    d_model = model.config.d_model
    assert not gain[d_model:].any() and torch.equal(gain[:d_model], torch.ones(d_model))  # the position half as loaded


def test_finetuning_between_runs_of_other_training_only_options_starts_their_tensors_anew(tmp_path):
    """A released two-stage model has no denoising label embedding and the demo's has one: each
    fine-tunes into a run of the other's options, where both were refused as not fitting."""
    plain = build_model("tiny", num_classes=4, two_stage=True)
    save_checkpoint(tmp_path / "plain.pt", plain)
    denoising = build_model("tiny", num_classes=4, two_stage=True, denoising_groups=2)
    own_embedding = denoising.denoising_label_embed.weight.clone()
    report = loop._finetune(denoising, read_checkpoint(tmp_path / "plain.pt"), {1: "shape"})
    assert report == (f"fine-tuning from {tmp_path / 'plain.pt'}: every weight loaded; training-only "
                      "denoising_label_embed.weight started anew")
    assert torch.equal(denoising.denoising_label_embed.weight, own_embedding)
    assert torch.equal(denoising.class_embed[0].weight, plain.class_embed[0].weight)
    save_checkpoint(tmp_path / "denoising.pt", denoising)
    assert loop._finetune(plain, read_checkpoint(tmp_path / "denoising.pt"), {1: "shape"}).endswith("every weight loaded")
    # Another number of one-to-many queries: the run's own.
    save_checkpoint(tmp_path / "hybrid.pt", build_model("tiny", num_classes=4, one_to_many_queries=20))
    more = build_model("tiny", num_classes=4, one_to_many_queries=30)
    assert loop._finetune(more, read_checkpoint(tmp_path / "hybrid.pt"), {1: "shape"}).endswith(
        "training-only one_to_many_query_embed.weight started anew")


def test_finetune_with_another_class_count(data, tmp_path, capsys):
    train(config(data, tmp_path / "first", epochs=1))
    train(config(data, tmp_path / "second", epochs=1, num_classes=9, finetune_from=str(tmp_path / "first" / "checkpoint.pt")))
    assert "class heads taken by class name for 5 of the data's 5 classes\n" in capsys.readouterr().out
    second = weights(tmp_path / "second" / "checkpoint.pt")
    assert second["class_embed.0.weight"].shape == (9, 128)
    assert read_checkpoint(tmp_path / "second" / "checkpoint.pt").config.backbone_norm == "frozen"


def test_finetuning_takes_each_classs_rows_of_the_class_heads_by_its_name(tmp_path):
    """Where the data number the checkpoint's classes otherwise (a VOC export sorts them by name), or
    have others: the heads were loaded by id, as long as the class count was the same."""
    started = build_model("tiny", num_classes=4, two_stage=True, denoising_groups=1)
    save_checkpoint(tmp_path / "rgb.pt", started, class_names={1: "red", 2: "green", 3: "blue"})
    model = build_model("tiny", num_classes=4, two_stage=True, denoising_groups=1)
    new = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = loop._finetune(model, read_checkpoint(tmp_path / "rgb.pt"), {1: "blue", 2: "green", 3: "cyan"})
    assert report == (f"fine-tuning from {tmp_path / 'rgb.pt'}: class heads taken by class name for 2 of the data's 3 "
                      f"classes (1 at another id); started anew for cyan")
    for name in ("class_embed.0.weight", "class_embed.3.bias", "transformer.decoder.class_embed.1.weight",
                 "denoising_label_embed.weight"):
        old = started.state_dict()[name]
        expected = [new[name][0], old[3], old[2], new[name][3]]  # no class, blue, green, cyan
        assert all(torch.equal(row, want) for row, want in zip(model.state_dict()[name], expected)), name
    assert loop._finetune(model, read_checkpoint(tmp_path / "rgb.pt"), {1: "red", 2: "green", 3: "blue"}).endswith(
        "every weight loaded")


def test_finetuning_refuses_a_checkpoint_whose_other_weights_have_other_shapes(data, tmp_path, capsys):
    # Another class count (the heads start anew) and another number of queries (refused).
    save_checkpoint(tmp_path / "other.pt", build_model("tiny", num_classes=9))
    run = config(data, tmp_path / "run", finetune_from=str(tmp_path / "other.pt"), model_overrides={"num_queries": 40})
    with pytest.raises(TrainingError) as refused:
        train(run)
    assert str(refused.value) == (f"{tmp_path / 'other.pt'}: query_embed.weight is (50, 256) there but (40, 256) in the "
                                  f"model being trained: only the class heads may differ: the checkpoint's model "
                                  f"(preset='tiny') has num_queries 50 where the run's has 40; without preset and those "
                                  f"options a run trains the checkpoint's")
    # Weights that do not fit the config they come with (edited by hand, say).
    edited = read_checkpoint(tmp_path / "other.pt")
    edited.state_dict["query_embed.weight"] = edited.state_dict["query_embed.weight"][:10]
    with pytest.raises(TrainingError, match=r"\(10, 256\) there but \(50, 256\) in the model being trained: only the "
                                            r"class heads may differ: its config is the run's model's, but its weights"):
        loop._finetune(build_model("tiny", num_classes=9), edited, {1: "shape"})
    # The command line names the flag: a released r50 given to a run of another preset.
    save_checkpoint(tmp_path / "r50.pt", build_model("r50", num_classes=3))
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "mine"), "--preset", "tiny",
                 "--finetune-from", str(tmp_path / "r50.pt")]) == 1
    assert capsys.readouterr().err.endswith(
        "only the class heads may differ: the checkpoint's model (--preset r50) has backbone resnet50, backbone_width 64, "
        "d_model 256 and 5 more where the run's has resnet18, 24, 128; without --preset and those options a run trains "
        "the checkpoint's\n")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_run_without_a_preset_trains_the_model_of_the_checkpoint_it_starts_from(data, tmp_path, capsys, monkeypatch):
    """As Hugging Face's from_pretrained and Ultralytics build it; resumed, after the checkpoint has
    moved, from the run's own record of it."""
    start, run = tmp_path / "start.pt", tmp_path / "run"
    save_checkpoint(start, build_model("tiny", num_classes=6, num_queries=20, two_stage=True, backbone_norm="batch",
                                       denoising_groups=2))
    assert main(command(data, run, "--finetune-from", str(start))) == 0
    assert f"fine-tuning from {start}: every weight loaded\n" in capsys.readouterr().out
    trained = read_checkpoint(run / "checkpoint.pt").config
    # Its architecture, not its run's training-only options.
    assert (trained.num_queries, trained.two_stage, trained.backbone_norm, trained.denoising_groups) == (20, True, "batch", 0)
    start.unlink()  # resumed, the run builds its model as its checkpoint records it, which then loads
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, *args, **kwargs: loads.append(path) or load(path, *args, **kwargs))
    assert main([*command(data, run, "--finetune-from", str(start)), "--resume"]) == 0
    assert "the run is already complete" in capsys.readouterr().out
    assert loads.count(run / "checkpoint.pt") == 1  # its settings, model and state from one read
    assert not checkpointing._kept  # nor held once the run is over
    # A preset's model is named so.
    save_checkpoint(start, build_model("tiny", num_classes=6))
    report = loop._finetune(build_model("tiny", num_classes=6), read_checkpoint(start), {1: "shape"})
    assert report.startswith(f"fine-tuning from {start} as preset='tiny': ")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    run = config(data, tmp_path / "run", epochs=1)
    train(run)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(SetCriterion, "total_loss", lambda self, losses: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match="non-finite loss .* at epoch 1, step 0"):
        train(dataclasses.replace(run, epochs=2, resume=True))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_curves_that_cannot_be_drawn_are_a_warning_after_the_epochs_checkpoint(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    checkpointed = []

    def failing_drawing(log_path, out):
        checkpointed.append(read_checkpoint(run / "checkpoint.pt").extra["epoch"])
        raise RuntimeError("Failed to allocate bitmap\n(matplotlib's details)")

    monkeypatch.setattr(report, "write_training_curves", failing_drawing)
    with pytest.warns(UserWarning) as warned:
        train(config(data, run, val_split=None))
    assert checkpointed == [0, 1], "the curves were drawn before the epoch's checkpoint was written"
    assert [str(warning.message) for warning in warned] == [
        f"{run / 'curves.png'}: not drawn (Failed to allocate bitmap); training goes on"] * 2
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


class ScaledMean(torch.nn.Module):
    """One weight; its "loss" is that weight times the mean of the batch, whose gradient is that mean."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, images, padding_mask, targets=None):
        return {"value": self.weight * images.mean()}


class ItsValue:
    """A loss of one box a batch: the model's value, divided by the box count as the set loss is."""

    def __call__(self, outputs, targets, *, num_boxes):
        return {"loss_ce": outputs["value"] / num_boxes}

    def total_loss(self, losses):
        return losses["loss_ce"]


ONE_BOX = [{"labels": torch.zeros(1, dtype=torch.int64), "boxes": torch.full((1, 4), 0.5)}]


def test_accumulation_steps_by_the_mean_gradient_of_each_group_the_epochs_last_shorter_one_too(tmp_path):
    model = ScaledMean()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # each update subtracts its gradient
    loader = [(torch.full((1, 3, 2, 2), value), torch.zeros(1, 2, 2, dtype=torch.bool), ONE_BOX)
              for value in (1.0, 2.0, 3.0, 4.0, 8.0)]  # fmt: skip
    run = TrainConfig(data="unused", output_dir=str(tmp_path), accumulation_steps=4, clip_max_norm=0.0)
    weights = [model.weight.item() for _ in engine.train_updates(
        model, ItsValue(), loader, optimizer, device=torch.device("cpu"), epoch=0, batches=5, config=run,
        progress=engine.EpochProgress())]
    # The first update by the mean of 1, 2, 3 and 4; the second, of the fifth batch alone, as a plain step would.
    assert weights == [1 - 2.5, 1 - 2.5 - 8]


def gradients(model):
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def test_accumulated_batches_step_by_the_gradient_of_one_batch_of_them_all():
    """Each box weighs the same in an update, however its batches share the boxes: as in one batch of
    them all (or in a batch split across processes)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=generator)  # one size: nothing padded in either way
    targets = [{"labels": torch.randint(1, 4, (count,), generator=generator),
                "boxes": torch.rand(count, 2, generator=generator).mul(0.5).add(0.25).repeat(1, 2) * torch.tensor([1, 1, 0.4, 0.4])}
               for count in (1, 3, 2, 0)]  # fmt: skip
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, dropout=0.0)
    optimizer, criterion = torch.optim.SGD(model.parameters(), lr=0.0), SetCriterion()
    # The halves make the whole batch's matching: a near-tie in a cost may round either way.
    matches = MatchReplay()
    with matches.recording():
        engine.train_step(model, criterion, optimizer, images, None, targets, clip_max_norm=0.0, update=False)
    whole = gradients(model)
    optimizer.zero_grad()
    update_boxes = average_num_boxes(targets)
    for half in (slice(0, 2), slice(2, 4)):  # 4 boxes, then 2
        with matches.replaying(half):
            engine.train_step(model, criterion, optimizer, images[half], None, targets[half], clip_max_norm=0.0,
                              update_boxes=update_boxes, update=False)
    accumulated = gradients(model)
    assert whole.keys() == accumulated.keys()
    for name, gradient in whole.items():
        torch.testing.assert_close(accumulated[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_outputs_that_are_not_finite_stop_the_step_before_the_matcher_refuses_them():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4)
    with torch.no_grad():
        model.transformer.encoder.layers[0].linear1.weight[0, 0] = float("nan")  # as after a bad update
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(engine.NonFiniteLossError, match=r"non-finite model outputs \(NaN or infinity\)"):
        engine.train_step(model, SetCriterion(), optimizer, torch.randn(1, 3, 64, 64), None, ONE_BOX)
    assert all(parameter.grad is None for parameter in model.parameters())


def test_cli_pads_training_batches_to_the_multiple(data, tmp_path, monkeypatch):
    sizes = []

    def recording_step(model, criterion, optimizer, images, *args, **kwargs):
        sizes.append(tuple(images.shape[-2:]))
        return train_step(model, criterion, optimizer, images, *args, **kwargs)

    train_step = engine.train_step
    monkeypatch.setattr(engine, "train_step", recording_step)
    arguments = ["--epochs", "1", "--batch-size", "4", "--image-size", "96", "--workers", "0", "--pad-to-multiple", "32"]
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), *arguments]) == 0
    assert len(sizes) == 2 and all(height % 32 == 0 and width % 32 == 0 for height, width in sizes)


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "runs" / "run"),
                 "--workers", "0"])
    assert code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "nowhere: no such data folder" in error
    assert not (tmp_path / "runs").exists()  # the run made it, and left nothing in it


def test_a_run_that_fails_before_it_begins_removes_only_the_folders_it_made_where_they_are_empty(data, tmp_path):
    (tmp_path / "mine").mkdir()
    for output_dir in (tmp_path / "mine", tmp_path / "runs" / "run"):
        with pytest.raises(TrainingError, match="no checkpoint to resume from"):
            train(config(data, output_dir, resume=True))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine"]
    assert [path.name for path in (tmp_path / "mine").iterdir()] == [".lock"]
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "run" / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        train(config(data, tmp_path / "runs" / "run", resume=True))
    assert (tmp_path / "runs" / "run" / "notes.txt").is_file()


@pytest.mark.parametrize("setting, value, rule", [
    ("batch_size", 0, "must be at least 1"),
    ("accumulation_steps", 0, "must be at least 1"),
    ("epochs", -2, "must be at least 1"),
    ("num_classes", 0, "must be at least 1"),
    ("image_size", 0, "must be at least 1"),
    ("warmup_epochs", -1.0, "must be at least 0"),
    ("lr", float("nan"), "must be at least 0"),
    ("max_minutes", 0.0, "must be above 0"),
    ("checkpoint_every", 0, "must be at least 1"),
    ("checkpoint_minutes", -1.0, "must be above 0"),
    ("min_lr_factor", 1.5, "must be within [0, 1]"),
    ("lr_drop_epoch", 0, "must be at least 1 with the step schedule"),
])
def test_settings_out_of_range_are_refused_before_anything_is_written(data, tmp_path, capsys, setting, value, rule):
    """By the field's name in Python, by the flag's on the command line."""
    with pytest.raises(ValueError, match=re.escape(f"{setting} {rule}, got {value}")):
        config(data, tmp_path / "run", **{setting: value})
    flag = "--" + setting.replace("_", "-")
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), flag, str(value)]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {flag} {rule}, got {value}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, value, expected", [
    ("batch_size", "2", "config field batch_size is '2'; expected int"),
    ("epochs", 1.5, "config field epochs is 1.5; expected int"),
    ("lr", "1e-4", "config field lr is '1e-4'; expected float"),
    ("model_overrides", ["x"], "config field model_overrides is ['x']; expected dict"),
    ("seed", -1, "seed must be at least 0, got -1"),
    ("ema", 1.5, "ema is a decay in [0, 1), got 1.5"),
])
def test_settings_of_the_wrong_type_are_refused_by_name(data, tmp_path, setting, value, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        config(data, tmp_path / "run", **{setting: value})
    # An int will do where a float goes, and a path or a numpy number as well as a str or a Python one.
    plain = TrainConfig(data=data, output_dir=tmp_path / "run", max_minutes=10, lr=np.float64(1e-4), epochs=np.int64(2))
    assert (plain.data, plain.output_dir, plain.max_minutes, plain.lr, plain.epochs) == (
        str(data), str(tmp_path / "run"), 10.0, 1e-4, 2)
    assert type(plain.epochs) is int and type(plain.lr) is float


@pytest.mark.parametrize("settings, expected", [
    ({"preset": "r51"}, "preset must be one of 'r50', 'r50_single_scale', 'r50_single_scale_dc5', "
                        "'r50_box_refine', 'r50_two_stage', 'tiny', got 'r51'"),
    ({"lr_schedule": "linear"}, "lr_schedule must be one of 'step', 'cosine', 'flat-cosine', got 'linear'"),
    ({"resume": "always"}, "resume must be one of True, False, 'auto', got 'always'"),
    ({"warmup_steps": 100, "warmup_epochs": 0.5},
     "warmup_steps and warmup_epochs are one or the other, got 100 and 0.5"),
])
def test_settings_that_cannot_go_together_or_name_nothing_are_refused(data, tmp_path, settings, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        config(data, tmp_path / "run", **settings)
    # Without the step schedule, the learning rate is not dropped every lr_drop_epoch epochs.
    assert config(data, tmp_path / "run", lr_schedule="flat-cosine", lr_drop_epoch=0).lr_drop_epoch == 0


@pytest.mark.parametrize("option, parsed, flag", [("two_stage=false", "two_stage=False", "--two-stage"),
                                                 ("num_queries=100", "num_queries=100", "--num-queries 300")])
def test_a_model_option_and_its_own_flag_that_disagree_are_refused(data, tmp_path, capsys, option, parsed, flag):
    """The flag used to win, silently."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output-dir", str(run), "--model-option", option, *flag.split()]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: --model-option {parsed} and {flag} disagree: give one of them\n"
    assert not run.exists()


@pytest.mark.parametrize("option, value, flag", [("num_classes", 3, "--num-classes"),
                                                 ("backbone_weights", "DEFAULT", "--backbone-weights")])
def test_model_options_the_run_sets_itself_are_refused_naming_their_flag(data, tmp_path, capsys, option, value, flag):
    """They were offered, and failed after the data check with a traceback (get_config given them twice)."""
    with pytest.raises(ValueError, match=re.escape(f"model_overrides {option}={value!r}: pass {option}={value!r} instead")):
        config(data, tmp_path / "run", model_overrides={option: value})
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output-dir", str(run), "--model-option", f"{option}={value}"]) == 1
    assert capsys.readouterr().err == (f"deformable-detr: error: --model-option {option}={value}: pass {flag} {value} "
                                       f"instead (the run sets the model's {option})\n")
    assert not run.exists()
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--output-dir", str(run), "--model-option", "size=3"])
    offered = capsys.readouterr().err.splitlines()[-1]
    assert "is not KEY=VALUE with KEY one of backbone, dilation," in offered and option not in offered
    with pytest.raises(ValueError, match="model_overrides size: not a model option; they are backbone, dilation,"):
        config(data, run, model_overrides={"size": 3})


def test_fewer_classes_than_the_data_has_are_refused(data, tmp_path):
    with pytest.raises(TrainingError, match="category ids go up to 5, so num_classes must be at least 6, not 2"):
        train(config(data, tmp_path / "run", num_classes=2))


def test_a_data_set_without_the_default_validation_split_trains_without_validation_and_says_so(tmp_path, capsys):
    without = synthesize(tmp_path / "shapes", train=2, val=0, image_size=64, seed=1)
    _, val_set = loop._datasets(config(without, tmp_path / "run"))
    assert val_set is None
    assert capsys.readouterr().out == f"{without}: no 'val' split (it has 'train'), so no validation\n"


@pytest.mark.parametrize("split", ["train_split", "val_split"])
def test_a_split_named_that_the_data_set_lacks_is_refused_with_the_splits_it_has(data, tmp_path, capsys, split):
    """A misspelt --val-split trained the whole run without validation, saying so only among the progress bars."""
    with pytest.raises(TrainingError) as refused:
        loop._datasets(config(data, tmp_path / "run", **{split: "valid"}))
    assert str(refused.value) == f"{split}='valid': {data} has no such split (it has 'train', 'val')"
    flag = "--" + split.replace("_", "-")
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), flag, "valid"]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {flag} valid: {data} has no such split (it has 'train', 'val')\n"
    _, val_set = loop._datasets(config(data, tmp_path / "run", val_split=None))  # no validation, asked for
    assert val_set is None


def test_images_much_smaller_than_the_training_size_are_said_with_the_size_to_pass(data, tmp_path, capsys):
    """The shapes' shorter sides are about 81 px: the default 800 scales them up almost tenfold."""
    with pytest.raises(TrainingError, match="num_classes must be at least 6"):  # refused once the data are read
        train(config(data, tmp_path / "run", image_size=800, num_classes=2))
    assert capsys.readouterr().out == (f"{data}: its training images' median shorter side is 81 px, which image_size=800 "
                                       f"scales up 9.9x, making every step slower for no detail they hold; image_size=81 "
                                       f"trains at their size\n")
    train_set, _ = loop._datasets(config(data, tmp_path / "run"))
    assert loop._image_size_hint(train_set, config(data, tmp_path / "run", image_size=160)) is None  # twice is fine


def test_cli_evaluates_a_checkpoint(data, tmp_path, capsys):
    train(config(data, tmp_path / "run", epochs=1))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "best.pt"), "--data", str(data), "--image-size", "96", "--workers", "0"]) == 0
    assert capsys.readouterr().out.strip().startswith("AP ")
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--data", str(data)]) == 1


def test_a_time_budget_stops_within_the_epoch_and_drops_the_learning_rate_at_its_share(data, tmp_path, monkeypatch,
                                                                                      capsys):
    # Every update takes half a minute by this clock.
    ticks = iter(range(0, 10**6, 30))
    monkeypatch.setattr(engine.time, "perf_counter", lambda: float(next(ticks)))
    # 8 batches an epoch; the drop at 6 of 10 epochs, i.e. at 60 % of the budget: 1.2 minutes.
    run = config(data, tmp_path / "run", epochs=10, lr_drop_epoch=6, batch_size=1, lr=1e-3, max_minutes=2.0)
    detect_all = loop.detect_all
    # A signal during the evaluation that ends the budget: nothing would be left to resume.
    monkeypatch.setattr(loop, "detect_all", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM) or
                        detect_all(*args, **kwargs))
    train(run)
    monkeypatch.setattr(loop, "detect_all", detect_all)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [step["lr"] for step in steps] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])  # 2 minutes: the end
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert record["batches"] == 4 and record["training_minutes"] == 2 and "AP" in record
    assert (tmp_path / "run" / "best.pt").is_file()
    assert "stopping at epoch 0, batch 4 of 8: the run's 2 training minutes have passed" in capsys.readouterr().out

    assert train(dataclasses.replace(run, resume=True)) == {}  # the budget is spent
    assert ("the run is already complete: it has trained 2.0 minutes and max_minutes is 2 (a larger max_minutes "
            "trains on)") in capsys.readouterr().out
    # Twice the budget: the run is at its half, before the drop again, and goes on to the end.
    train(dataclasses.replace(run, resume=True, max_minutes=4.0))
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [(step["epoch"], step["batch"]) for step in steps] == [(0, batch) for batch in range(1, 9)]
    assert [step["lr"] for step in steps[4:]] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-4])
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt").extra["training_seconds"] == 240


def test_early_stopping_stops_at_the_evaluation_its_patience_predicts_and_keeps_the_best(data, tmp_path, monkeypatch,
                                                                                        capsys):
    aps = iter([0.2, 0.5, 0.4, 0.45, 0.9])  # with patience 2: epochs 2 and 3 are not better than epoch 1

    class ScriptedEvaluation:
        def __init__(self, *_, **__):
            self.ap = next(aps)
            if self.ap == 0.45:  # the evaluation that stops the run: nothing would be left to resume
                os.kill(os.getpid(), signal.SIGUSR1)

        def summarize(self):
            return {"AP": self.ap, "AP50": self.ap}

    monkeypatch.setattr(loop, "detect_all", ScriptedEvaluation)
    run = config(data, tmp_path / "run", epochs=5, patience=2, report=False)
    train(run)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["AP"] for record in records] == [0.2, 0.5, 0.4, 0.45]
    assert records[-1]["stopped_early"] and not any("stopped_early" in record for record in records[:-1])
    out = capsys.readouterr().out
    # Named as the Python API spells the setting (the command names its flag, --patience 2).
    assert ("stopping early after epoch 3: no AP above 0.5000 by more than 0 in the last 2 evaluations (patience=2); "
            "best.pt is the best") in out
    best = read_checkpoint(tmp_path / "run" / "best.pt")
    assert best.extra["epoch"] == 1 and best.extra["best"]["AP"] == 0.5

    assert train(dataclasses.replace(run, resume=True)) == {}
    assert "the run is already complete: it stopped early: " in (out := capsys.readouterr().out)
    assert "(patience=2) (a larger patience trains on)" in out
    with pytest.raises(TrainingError, match="no validation split, so nothing for patience to count"):
        train(config(data, tmp_path / "without_validation", patience=2, val_split=None))
    train(dataclasses.replace(run, resume=True, patience=3))  # more patience: on to the better epoch 4
    assert read_checkpoint(tmp_path / "run" / "best.pt").extra["epoch"] == 4


def test_with_an_average_the_checkpoint_is_evaluated_detected_exported_and_converted_from_it(
    data, tmp_path, monkeypatch, capsys
):
    train(config(data, tmp_path / "run", epochs=1, ema=0.5, ema_warmup=0))
    best = tmp_path / "run" / "best.pt"
    checkpoint = read_checkpoint(best)
    average, trained = checkpoint.extra["ema"]["model"], checkpoint.extra["model"]
    assert checkpoint.state_dict is average and checkpoint.extra["ema"]["updates"] == 2
    assert any(not torch.equal(average[name], trained[name]) for name in average)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "raw_AP" in record and "AP" in record

    def assert_the_average(model):
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, average[name], rtol=0, atol=0, msg=name)

    assert_the_average(Detector.from_checkpoint(best, device="cpu").model)
    evaluated = []
    detect_all = evaluation.detect_all

    def recording_detect_all(model, *args, **kwargs):
        evaluated.append(model)
        return detect_all(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "detect_all", recording_detect_all)
    assert main(["evaluate", str(best), "--data", str(data), "--image-size", "96", "--workers", "0"]) == 0
    assert_the_average(evaluated[0])
    exported = []
    monkeypatch.setattr(export, "export_model", lambda model, *args, **kwargs: exported.append(model))
    assert main(["export", str(best), "--out", str(tmp_path / "model.onnx")]) == 0
    assert_the_average(exported[0])
    assert main(["convert", str(best), str(tmp_path / "weights.safetensors"), "--to", "ours"]) == 0
    assert_the_average(load_pretrained(tmp_path / "weights.safetensors"))
    capsys.readouterr()
    assert main(["inspect", str(best)]) == 0
    assert "weights: the average of the weights (EMA, 2 updates" in capsys.readouterr().out
