"""The run's log: one JSON line per epoch, and the same numbers as TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..distributed import is_main_process


class Logger:
    """A JSON-lines log and TensorBoard scalars, on the main process only."""

    def __init__(self, output_dir: Path) -> None:
        self.enabled = is_main_process()
        self.path = output_dir / "log.jsonl"
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
