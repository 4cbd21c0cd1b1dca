"""Which process this is when torchrun starts several: the one place that asks the process group."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """Whether this process belongs to an initialised process group (``torch.distributed``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the process group; 0 when it is the only process."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Whether this process speaks for all of them: it alone writes files, logs and prints."""
    return rank() == 0
