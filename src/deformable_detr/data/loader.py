"""Loading batches: seeded per epoch, shared between processes, and stopped by a sample that cannot
be read with one line, worker processes or not."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from ..distributed import is_distributed, world_size
from .coco import DatasetError
from .collate import collate


def data_loader(
    dataset: Dataset, *, batch_size: int, train: bool, workers: int, seed: int, epoch: int, pad_to_multiple: int = 1
) -> Loader:
    """Batches of ``dataset`` as :func:`collate` makes them, for one epoch: shuffled when ``train``,
    each process its share when distributed.

    The order and the workers' seeds follow from ``seed`` and ``epoch``, so that a resumed run draws
    the same batches as an uninterrupted one.
    """
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        sampler = SequentialSampler(dataset)
    return Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                  collate_fn=functools.partial(collate, pad_to_multiple=pad_to_multiple),
                  generator=torch.Generator().manual_seed(seed * 1000 + epoch), persistent_workers=False)


def batches_per_epoch(dataset_size: int, batch_size: int) -> int:
    """How many batches :func:`data_loader` gives each process in an epoch (the distributed sampler
    pads the data to equal shares)."""
    return math.ceil(math.ceil(dataset_size / world_size()) / batch_size)


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
