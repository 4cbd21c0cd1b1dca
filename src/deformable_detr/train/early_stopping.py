"""Early stopping: the run ends once its validation AP has stopped improving."""

from __future__ import annotations

from dataclasses import dataclass

from .config import setting


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations in a row without an AP above the best by more than
    ``min_improvement`` (None: never stop). What it has seen is saved in the checkpoint (:meth:`state`),
    so that a resumed run counts on where it stopped."""

    patience: int | None
    min_improvement: float = 0.0
    best_ap: float = -1.0  # the AP the evaluations since are measured against
    evaluations_since: int = 0  # evaluations since that AP, without one better by min_improvement

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 1 or self.min_improvement < 0:
            raise ValueError(f"patience ({self.patience}) is at least 1 and min_improvement ({self.min_improvement}) "
                             f"not negative")

    def observe(self, ap: float) -> bool:
        """Count an evaluation's ``ap``; whether the run stops after it."""
        if ap > self.best_ap + self.min_improvement:
            self.best_ap, self.evaluations_since = ap, 0
        else:
            self.evaluations_since += 1
        return self.stops()

    def stops(self) -> bool:
        """Whether the evaluations seen so far end the run."""
        return self.patience is not None and self.evaluations_since >= self.patience

    def describe(self) -> str:
        """Why the run stopped, in the words of its last line."""
        return (f"no AP above {self.best_ap:.4f} by more than {self.min_improvement:g} in the last "
                f"{self.evaluations_since} evaluations ({setting('patience', self.patience)})")

    def state(self) -> dict[str, float]:
        return {"best_ap": self.best_ap, "evaluations_since": self.evaluations_since}

    def restore(self, state: dict[str, float]) -> None:
        self.best_ap, self.evaluations_since = state["best_ap"], state["evaluations_since"]
