"""Loading batches: seeded per epoch and per sample, shared between processes, resumable within an
epoch, and stopped by a sample that cannot be read with one line, worker processes or not."""

from __future__ import annotations

import functools
import itertools
import math
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from ..distributed import is_distributed, world_size
from .coco import DatasetError
from .collate import collate

# The first word of a derived seed's key, so that two uses never draw the same numbers.
AUGMENTATION, TRAINING_STEP = 0, 1
# Signals the training process answers with a clean stop (deformable_detr.train.preemption); a
# scheduler sends them to every process of a job, loader workers included.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def data_loader(
    dataset: Dataset, *, batch_size: int, train: bool, workers: int, seed: int, epoch: int, pad_to_multiple: int = 1,
    skip_batches: int = 0,
) -> Loader:
    """Batches of ``dataset`` as :func:`collate` makes them, for one epoch: shuffled when ``train``,
    each process its share when distributed, the first ``skip_batches`` left out without reading their
    images (where a run resumes within an epoch).

    The order follows from ``seed`` and ``epoch``, and each sample's random augmentation from
    ``seed``, ``epoch`` and its index, whichever process or loader worker reads it and whatever it read
    before: a resumed run draws the same batches as an uninterrupted one, with any number of workers.
    """
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        sampler = SequentialSampler(dataset)
    # The generator seeds the workers, which would otherwise draw their seeds from the process's generator.
    return Loader(_SeededAugmentation(dataset, seed=seed, epoch=epoch), batch_size=batch_size,
                  sampler=_Skipping(sampler, skip_batches * batch_size), num_workers=workers,
                  collate_fn=functools.partial(collate, pad_to_multiple=pad_to_multiple),
                  generator=torch.Generator().manual_seed(seed * 1000 + epoch), persistent_workers=False,
                  worker_init_fn=_leave_signals_to_the_trainer)


def batches_per_epoch(dataset_size: int, batch_size: int) -> int:
    """How many batches :func:`data_loader` gives each process in an epoch (the distributed sampler
    pads the data to equal shares)."""
    return math.ceil(math.ceil(dataset_size / world_size()) / batch_size)


def derived_seed(*key: int) -> int:
    """A 64-bit seed decided by ``key`` (non-negative integers, the first one a use such as
    :data:`AUGMENTATION`), mixed by numpy's SeedSequence so that neighbouring keys (consecutive samples
    or steps) draw unrelated numbers."""
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])


class _SeededAugmentation(Dataset):
    """``dataset``'s samples, each transformed with torch's generator seeded by (seed, epoch, index)
    and the process's generator left as it was. torchvision's random transforms take no generator of
    their own: they draw from the global one."""

    def __init__(self, dataset: Dataset, *, seed: int, epoch: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(AUGMENTATION, self.seed, self.epoch, index))
            return self.dataset[index]


class _Skipping(Sampler[int]):
    """``sampler``'s indices after its first ``count``."""

    def __init__(self, sampler: Sampler[int], count: int) -> None:
        self.sampler = sampler
        self.count = count

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self.sampler, self.count, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.count, 0)


def _leave_signals_to_the_trainer(_worker_id: int) -> None:
    # The training process decides when to stop and then ends its workers; a worker ended by the
    # signal itself would fail the loader in the middle of the clean stop.
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class Loader(DataLoader):
    """A ``DataLoader`` from which a :class:`DatasetError` raised by the dataset arrives as itself.

    torch re-raises an exception of a worker process as a new one whose message is the worker's
    whole traceback (twenty lines for one unreadable image). Here the error travels from the worker
    as a value, in place of its batch, and is raised in this process unchanged.
    """

    def __init__(self, dataset: Dataset, *, collate_fn: Callable[[Sequence[Any]], Any], **kwargs: Any) -> None:
        super().__init__(_ErrorsAsValues(dataset), collate_fn=_CollateUnlessFailed(collate_fn), **kwargs)

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, DatasetError):
                raise batch
            yield batch


class _ErrorsAsValues(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except DatasetError as error:
            return error


class _CollateUnlessFailed:
    """The batch of the samples, or the first sample's error (a class, not a closure: workers pickle it)."""

    def __init__(self, collate_fn: Callable[[Sequence[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: Sequence[Any]) -> Any:
        failed = next((sample for sample in samples if isinstance(sample, DatasetError)), None)
        return failed if failed is not None else self.collate_fn(samples)
