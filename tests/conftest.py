import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"

# The smallest backbone the reference code builds (it refuses resnet18 and resnet34, and has no width
# option): the tiny preset on it can be written in the reference layout.
REFERENCE_BACKBONE = {"backbone": "resnet50", "backbone_width": 64}

R50_PRESETS = ["r50", "r50_single_scale", "r50_single_scale_dc5", "r50_box_refine", "r50_two_stage"]


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


def reference_state_dict_entries(preset: str) -> list[str]:
    """`name (shape)` lines read off the reference implementation for a published configuration."""
    return (DATA / "reference_state_dicts" / f"{preset}.txt").read_text().split("\n")[:-1]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` of torch's threads, then give back the number it had."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
