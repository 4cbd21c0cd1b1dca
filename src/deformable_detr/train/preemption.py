"""Stopping cleanly on a signal: a scheduler's SIGTERM or SIGUSR1 before it preempts or requeues the
job, or Ctrl-C. The trainer finishes its update, writes the checkpoint and exits with a status that
asks to be run again; a second signal stops it at once."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ..data.loader import STOP_SIGNALS

# EX_TEMPFAIL of sysexits.h, "a temporary failure; the user is invited to retry": the exit status
# after a clean stop, for a scheduler to requeue the job on (docs/preemption.md).
REQUEUE_STATUS = 75
# A terminal's Ctrl-C reaches torchrun and its workers, and torchrun then passes it on to the
# workers again: a signal this soon after the first is the same request.
SAME_REQUEST_SECONDS = 1.0


class TrainingStopped(BaseException):
    """Training stopped on a signal before its end; ``status`` is the exit status the process should
    end with: :data:`REQUEUE_STATUS` after a clean stop, 128 + the signal's number (a shell's status for
    a process the signal ended) when a second signal stopped it at once.

    A BaseException, like KeyboardInterrupt: raised from a signal handler at any line of the program,
    it must not be caught by an ``except Exception`` on its way out.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class StopSignals:
    """While entered (in the main thread), SIGTERM, SIGUSR1 and SIGINT ask the trainer to stop:
    the first is recorded in ``received`` (its name), for the trainer to stop after its current update;
    a second one raises :class:`TrainingStopped` where the program is, which leaves ``checkpoint``
    as it was (a checkpoint being written is abandoned: files are written atomically)."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.received: str | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        # Python runs signal handlers in the main thread only, and lets only it install them.
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exception: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.received is None:
            self.received, self._received_at = name, time.monotonic()
        elif time.monotonic() - self._received_at >= SAME_REQUEST_SECONDS:
            last = f"{self.checkpoint} is the last one written" if self.checkpoint.is_file() else "none was written yet"
            raise TrainingStopped(f"second signal ({name}): stopped at once, without writing a checkpoint; {last}",
                                  128 + number)
