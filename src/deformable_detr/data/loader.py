"""Loading batches so that a sample that cannot be read stops the run with one line, worker processes or not."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset

from .coco import DatasetError


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
