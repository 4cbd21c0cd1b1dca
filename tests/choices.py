"""Comparing two runs whose rounding may decide a discrete choice differently.

A near-tie in a top-k is decided by rounding, and rounding differs between implementations, op
paths and CPUs (AVX2, AVX-512, AMX). Two runs are therefore compared on what each choice is given
and on what follows from the same choice, never on two choices that may legitimately differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch
from torch import Tensor

from deformable_detr.train import HungarianMatcher


class TopKReplay:
    """Records every ``torch.topk`` choice of one run and replays those choices in later runs.

    While replaying, each top-k's input must equal the recorded one within ``tolerance`` (the
    comparison of what the choice is given), and every recorded choice must be made again.
    """

    def __init__(self, *, tolerance: float = 1e-5) -> None:
        self.tolerance = tolerance
        self.inputs: list[Tensor] = []
        self.indices: list[Tensor] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        topk = torch.topk

        def record(input: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
            result = topk(input, k, dim=dim, largest=largest, sorted=sorted)
            self.inputs.append(input)
            self.indices.append(result.indices)
            return result

        with mock.patch.object(torch, "topk", record):
            yield

    @contextmanager
    def replaying(self) -> Iterator[None]:
        recorded = iter(zip(self.inputs, self.indices))

        def replay(input: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
            recorded_input, indices = next(recorded)
            torch.testing.assert_close(input, recorded_input, rtol=self.tolerance, atol=self.tolerance,
                                       msg="a top-k's input")
            return torch.return_types.topk((input.gather(dim, indices), indices))

        with mock.patch.object(torch, "topk", replay):
            yield
        assert next(recorded, None) is None, "a recorded top-k was not made again"


class MatchReplay:
    """Records the Hungarian matcher's choices of one run (per call, per image) and replays them in
    another run, which may hold only some of the images."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[Tensor, Tensor]]] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        forward = HungarianMatcher.forward

        def record(matcher: HungarianMatcher, outputs: dict, targets: list) -> list[tuple[Tensor, Tensor]]:
            matches = forward(matcher, outputs, targets)
            self.calls.append(matches)
            return matches

        with mock.patch.object(HungarianMatcher, "forward", record):
            yield

    @contextmanager
    def replaying(self, images: slice = slice(None)) -> Iterator[None]:
        recorded = iter(self.calls)
        with mock.patch.object(HungarianMatcher, "forward", lambda matcher, outputs, targets: next(recorded)[images]):
            yield
        assert next(recorded, None) is None, "a recorded matching was not made again"
