"""The training loader: an epoch resumed at a batch reads none of the images before it, a sample's
augmentation follows from (seed, epoch, index) alone, and loader workers leave the stop signals to
the trainer."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch.utils.data import Dataset

from deformable_detr.data import coco_split, data_loader, recipe, synthesize


class Numbered(Dataset):
    """Sample i: a 3 x 4 x 4 image of i, its index as image_id; the indices read are recorded."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.read: list[int] = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        self.read.append(index)
        return torch.full((3, 4, 4), float(index)), {"image_id": torch.tensor(index)}


def ids(batches) -> list[list[int]]:
    return [[int(target["image_id"]) for target in targets] for _, _, targets in batches]


def test_an_epoch_resumed_at_a_batch_skips_the_batches_before_it_unread():
    settings = dict(batch_size=3, train=True, workers=0, seed=5, epoch=2)
    whole = ids(data_loader(Numbered(10), **settings))
    dataset = Numbered(10)
    loader = data_loader(dataset, **settings, skip_batches=2)
    assert len(loader) == 2
    assert ids(loader) == whole[2:]
    assert sorted(dataset.read) == sorted(index for batch in whole[2:] for index in batch)
    assert ids(data_loader(Numbered(10), **settings, skip_batches=4)) == []


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return coco_split(synthesize(tmp_path_factory.mktemp("shapes"), train=6, val=0, image_size=96, seed=2), "train",
                      recipe(96)[0])


def augmented(shapes, *, epoch: int, workers: int = 0, skip_batches: int = 0) -> dict[int, tuple]:
    """Image id -> (image, boxes) of the epoch's samples, batches of one."""
    loader = data_loader(shapes, batch_size=1, train=True, workers=workers, seed=3, epoch=epoch,
                         skip_batches=skip_batches)
    return {int(targets[0]["image_id"]): (images[0], targets[0]["boxes"]) for images, _, targets in loader}


def assert_same_samples(samples: dict, expected: dict) -> None:
    for image_id, (image, boxes) in samples.items():
        torch.testing.assert_close(image, expected[image_id][0], rtol=0, atol=0)
        torch.testing.assert_close(boxes, expected[image_id][1], rtol=0, atol=0)


def test_a_samples_augmentation_follows_from_the_seed_epoch_and_index_alone(shapes):
    expected = augmented(shapes, epoch=1)
    state = torch.get_rng_state()
    torch.rand(100)  # the process's generator elsewhere: no matter
    assert_same_samples(augmented(shapes, epoch=1, skip_batches=4), expected)  # nor what was read before
    assert_same_samples(augmented(shapes, epoch=1, workers=2), expected)  # nor which process reads it
    assert not torch.equal(torch.get_rng_state(), state)
    state = torch.get_rng_state()
    augmented(shapes, epoch=1)
    assert torch.equal(torch.get_rng_state(), state)  # and loading leaves the process's generator as it was
    other_epoch = augmented(shapes, epoch=2)
    assert any(image.shape != expected[image_id][0].shape or not torch.equal(image, expected[image_id][0])
               for image_id, (image, _) in other_epoch.items())


class SignalledInTheWorker(Numbered):
    """A scheduler's signal reaches every process of a job, the loader workers too."""

    def __getitem__(self, index: int):
        os.kill(os.getpid(), signal.SIGTERM if index % 2 else signal.SIGUSR1)
        return super().__getitem__(index)


def test_loader_workers_ignore_the_signals_the_trainer_stops_on():
    loader = data_loader(SignalledInTheWorker(6), batch_size=2, train=False, workers=2, seed=0, epoch=0)
    assert ids(loader) == [[0, 1], [2, 3], [4, 5]]
