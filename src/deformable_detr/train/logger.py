"""The run's logs: a JSON line per epoch and per optimiser update, and the same numbers as
TensorBoard scalars, all stepped by the run's update count."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..distributed import is_main_process
from ..files import atomic_write


class Logger:
    """``log.jsonl`` (a record per epoch), ``steps.jsonl`` (one per optimiser update) and TensorBoard
    scalars, on the main process only; every record holds ``update``, the run's updates so far.

    A run resuming from the checkpoint written after update ``since_update`` first drops what was
    logged after it, since it takes those steps again (TensorBoard hides them by ``purge_step``).
    """

    def __init__(self, output_dir: Path, *, since_update: int = 0) -> None:
        self.enabled = is_main_process()
        self.epochs_path, self.steps_path = output_dir / "log.jsonl", output_dir / "steps.jsonl"
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            for path in (self.epochs_path, self.steps_path):
                _drop_records_after(path, since_update)
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=since_update + 1)

    def log_epoch(self, record: dict[str, Any], update: int) -> None:
        scalars = [key for key, value in record.items() if isinstance(value, (int, float)) and key != "epoch"]
        self._log(self.epochs_path, record, update, scalars=scalars, tag="")
        if self.enabled:
            self.writer.flush()

    def log_update(self, record: dict[str, Any], update: int) -> None:
        # Two scalars an update: each costs tens of microseconds, and steps.jsonl has the rest.
        # TensorBoard's writer flushes them by itself, every two minutes.
        self._log(self.steps_path, record, update, scalars=("loss", "lr"), tag="step/")

    def _log(self, path: Path, record: dict[str, Any], update: int, *, scalars: Sequence[str], tag: str) -> None:
        if not self.enabled:
            return
        with path.open("a") as file:
            file.write(json.dumps({**record, "update": update}) + "\n")
        for key in scalars:
            self.writer.add_scalar(tag + key, record[key], update)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _drop_records_after(path: Path, update: int) -> None:
    """Rewrite ``path`` without its records of later updates and anything after a line cut short
    (a killed run's last write). Records of logs written before updates were counted are kept."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith("\n") or record.get("update", 0) > update:
            break
        kept.append(line)
    if len(kept) < len(lines):
        with atomic_write(path) as temporary:
            temporary.write_text("".join(kept))
