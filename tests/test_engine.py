"""The training loop: exact resumption, fine-tuning to new classes, stopping on a non-finite loss."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deformable_detr.checkpoints import read_checkpoint
from deformable_detr.cli import main
from deformable_detr.data import synthesize
from deformable_detr.train import SetCriterion, TrainConfig, TrainingError, engine, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("shapes"), train=8, val=4, image_size=96, seed=1)


def config(data, output_dir, **overrides) -> TrainConfig:
    settings = dict(preset="tiny", epochs=2, batch_size=4, image_size=96, workers=0, seed=3)
    return TrainConfig(data=str(data), output_dir=str(output_dir), **{**settings, **overrides})


def weights(path):
    return read_checkpoint(path).state_dict


def test_resume_continues_exactly(data, tmp_path):
    straight = config(data, tmp_path / "straight")
    train(straight)
    interrupted = config(data, tmp_path / "interrupted", epochs=1)
    train(interrupted)
    with pytest.raises(TrainingError, match="pass resume=True"):
        train(dataclasses.replace(interrupted, epochs=2))
    with pytest.raises(TrainingError, match=r"checkpoint.pt: the run was trained with other settings: "
                                            r"batch_size 4 \(now 2\), lr 0.0002 \(now 0.001\); "):
        train(dataclasses.replace(interrupted, epochs=2, resume=True, batch_size=2, lr=1e-3))
    # How long it runs may change.
    train(dataclasses.replace(interrupted, epochs=2, resume=True, max_minutes=60.0))
    expected, actual = weights(tmp_path / "straight" / "checkpoint.pt"), weights(tmp_path / "interrupted" / "checkpoint.pt")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    log = (tmp_path / "interrupted" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and (tmp_path / "interrupted" / "best.pt").is_file()


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(data, tmp_path):
    run = config(data, tmp_path / "run", epochs=1)
    train(run)
    last = tmp_path / "run" / "checkpoint.pt"
    payload = torch.load(last, weights_only=True)
    del payload["train_config"]["iou_aware_classification"]  # as an older version saved it
    torch.save(payload, last)
    with pytest.raises(TrainingError, match=r"iou_aware_classification False \(now True\)"):
        train(dataclasses.replace(run, epochs=2, resume=True, iou_aware_classification=True))
    train(dataclasses.replace(run, epochs=2, resume=True))
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2


def test_finetune_with_another_class_count(data, tmp_path, capsys):
    train(config(data, tmp_path / "first", epochs=1))
    train(config(data, tmp_path / "second", epochs=1, num_classes=9, finetune_from=str(tmp_path / "first" / "checkpoint.pt")))
    assert "class heads re-initialised for 9 classes (checkpoint had 6)" in capsys.readouterr().out
    second = weights(tmp_path / "second" / "checkpoint.pt")
    assert second["class_embed.0.weight"].shape == (9, 128)
    assert read_checkpoint(tmp_path / "second" / "checkpoint.pt").config.backbone_norm == "frozen"


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    run = config(data, tmp_path / "run", epochs=1)
    train(run)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(SetCriterion, "total_loss", lambda self, losses: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match="non-finite loss .* at epoch 1, step 0"):
        train(dataclasses.replace(run, epochs=2, resume=True))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


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
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run"), "--workers", "0"])
    assert code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "nowhere: no such data folder" in error


def test_cli_evaluates_a_checkpoint(data, tmp_path, capsys):
    train(config(data, tmp_path / "run", epochs=1))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "best.pt"), "--data", str(data), "--image-size", "96", "--workers", "0"]) == 0
    assert capsys.readouterr().out.strip().startswith("AP ")
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--data", str(data)]) == 1


def test_a_time_budget_stops_within_the_epoch_and_drops_the_learning_rate_at_its_share(data, tmp_path, monkeypatch):
    # Every update takes half a minute by this clock.
    ticks = iter(range(0, 10**6, 30))
    monkeypatch.setattr(engine.time, "perf_counter", lambda: float(next(ticks)))
    # 8 batches an epoch; the drop at 6 of 10 epochs, i.e. at 60 % of the budget: 1.2 minutes.
    run = config(data, tmp_path / "run", epochs=10, lr_drop_epoch=6, batch_size=1, lr=1e-3, max_minutes=2.0)
    train(run)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [step["lr"] for step in steps] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])  # 2 minutes: the end
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert record["batches"] == 4 and record["training_minutes"] == 2 and "AP" in record
    assert (tmp_path / "run" / "best.pt").is_file()

    assert train(dataclasses.replace(run, resume=True)) == {}  # the budget is spent
    # Twice the budget: the run is at its half, before the drop again, and goes on to the end.
    train(dataclasses.replace(run, resume=True, max_minutes=4.0))
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [(step["epoch"], step["batch"]) for step in steps] == [(0, batch) for batch in range(1, 9)]
    assert [step["lr"] for step in steps[4:]] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-4])
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt").extra["training_seconds"] == 240
