"""Early stopping: end a run whose validation loss has stopped improving, so that a sweep does
not spend GPUs on it.

A checkpoint improves when its validation loss is below the best so far by more than
``epsilon`` relative to it (``< best - epsilon * |best|``, the measure of select's epsilon); a
loss that is not finite never improves. After ``patience`` checkpoints in a row without an
improvement the run stops; that checkpoint is saved as usual and is the run's last.

The loss it is fed is gathered to every process before it is averaged in one order, so every
process holds the same state and stops at the same step. The state is saved in each
checkpoint's ``training_state/state.json`` (rather than derived from the ``record.json`` files,
which ``keep_last_n`` may have pruned), so a resumed run stops where an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EarlyStopping:
    """The best validation loss so far and the checkpoints since it; ``patience`` 0: never
    stops (the state is still kept, so a resumed run may turn it on)."""

    patience: int
    epsilon: float
    best_step: int | None = None
    best_val_loss: float | None = None
    without_improvement: int = 0  # checkpoints in a row since the best
    last_step: int = 0  # of the last checkpoint fed

    @property
    def stopped(self) -> bool:
        """Whether the last checkpoint fed ends the run."""
        return 0 < self.patience <= self.without_improvement

    def update(self, step: int, val_loss: float | None) -> bool:
        """Feed checkpoint ``step``'s validation loss; True when training stops there."""
        self.last_step = step
        if val_loss is not None and math.isfinite(val_loss) and self._improves(val_loss):
            self.best_step, self.best_val_loss, self.without_improvement = step, val_loss, 0
        else:
            self.without_improvement += 1
        if self.stopped:
            log.info("early stopping at step %d: %s", step, self.reason)
        return self.stopped

    def _improves(self, val_loss: float) -> bool:
        if self.best_val_loss is None:
            return True
        return val_loss < self.best_val_loss - self.epsilon * abs(self.best_val_loss)

    @property
    def reason(self) -> str:
        """Why the run stopped, in one line."""
        best = (
            f"the best, {self.best_val_loss:.5g} at step {self.best_step}"
            if self.best_val_loss is not None
            else "the best (none was finite)"
        )
        count = self.without_improvement
        return (
            f"{count} checkpoint{'s' if count != 1 else ''} in a row without a validation loss "
            f"more than {self.epsilon:.2%} below {best} (early_stopping_patience {self.patience})"
        )

    def record(self, total_steps: int) -> dict[str, Any] | None:
        """``training_report.json``'s ``stopped_early``: where and why the run stopped, or None
        when it ran to ``total_steps`` (stopping at the last step is not stopping early)."""
        if not self.stopped or self.last_step >= total_steps:
            return None
        return {
            "step": self.last_step,
            "best_step": self.best_step,
            "best_val_loss": self.best_val_loss,
            "reason": self.reason,
        }

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        del state["patience"], state["epsilon"]  # the config's, also on resume
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_step = state["best_step"]
        self.best_val_loss = state["best_val_loss"]
        self.without_improvement = state["without_improvement"]
        self.last_step = state["last_step"]
