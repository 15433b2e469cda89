"""What a training run tells people while it runs: a progress bar, ``loss_log.csv`` and
TensorBoard scalars, written by the main process only.

TensorBoard tags: ``train/loss``, ``train/learning_rate``, ``train/samples_per_second``,
``validation/loss`` and ``validation/loss_t<timestep>`` for each validation timestep; the images
``samples/p<NN>_seed<S>`` at each checkpoint that rendered them; the text ``buckets``: the
bucket table.

Samples per second measure training: the time spent on validation and on sample images is left
out (checkpoint writes are not).
"""

from __future__ import annotations

import csv
import logging
import sys
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from lorapipe import store
from lorapipe.checkpoint_layout import LOSS_LOG_NAME

if TYPE_CHECKING:
    from lorapipe.training.samples import RenderedSamples

log = logging.getLogger(__name__)

LOSS_LOG_COLUMNS = ("step", "epoch", "loss", "lr")
EMA_DECAY = 0.9


class RunningLoss:
    """The training loss since the last checkpoint (its mean) and its exponential moving average
    (started at the first loss, so it is never biased towards zero)."""

    def __init__(self) -> None:
        self.ema: float | None = None
        self.total = 0.0
        self.count = 0

    def update(self, loss: float) -> None:
        self.ema = loss if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * loss
        self.total += loss
        self.count += 1

    def take_mean(self) -> float | None:
        """The mean since the last call, and start a new window."""
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.total, self.count = state["ema"], state["total"], state["count"]


class TrainingLog:
    """Progress bar, loss_log.csv and TensorBoard; does nothing on other processes than the main."""

    def __init__(self, paths: Any, start_step: int, total_steps: int, *, enabled: bool) -> None:
        """``paths``: where the run writes (``local``, ``logs``, ``mirrors``; train.OutputPaths)."""
        self.enabled = enabled
        self.loss_log = paths.local / LOSS_LOG_NAME
        self.started = self.last_time = time.perf_counter()
        self.samples = 0
        self.paused = 0.0  # seconds of validation and sample images: not training
        self.sample_seconds = 0.0
        if not enabled:
            return
        _start_loss_log(self.loss_log, start_step, paths.mirrors)
        self.writer = _summary_writer(paths.logs, purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )

    def step(self, step: int, epoch: int, loss: float, learning_rate: float, samples: int) -> None:
        """Record optimizer step ``step`` (1-based), which trained on ``samples`` images."""
        now = time.perf_counter()
        samples_per_second = samples / max(now - self.last_time, 1e-9)
        self.last_time = now
        self.samples += samples
        if not self.enabled:
            return
        with self.loss_log.open("a", newline="") as file:
            csv.writer(file).writerow([step, epoch, f"{loss:.6g}", f"{learning_rate:.6g}"])
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/learning_rate", learning_rate, step)
        self.writer.add_scalar("train/samples_per_second", samples_per_second, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", refresh=False)
        self.bar.update(1)

    def text(self, tag: str, markdown: str) -> None:
        """A Markdown note in TensorBoard's Text tab (the bucket table at the start)."""
        if self.enabled:
            self.writer.add_text(tag, markdown)

    def validation(self, step: int, validation: Any) -> None:
        """Record a ``ValidationLoss`` (or None: no held-out images), computed since the last
        step."""
        if self.enabled and validation is not None:
            self.writer.add_scalar("validation/loss", validation.mean, step)
            for timestep, loss in validation.by_timestep.items():
                self.writer.add_scalar(f"validation/loss_t{timestep}", loss, step)
            self.writer.flush()
        self._pause()

    def sample_images(self, rendered: RenderedSamples | None) -> None:
        """Show a checkpoint's sample images (None: none rendered), rendered just now."""
        if rendered is None:
            return
        self.sample_seconds += rendered.seconds
        if self.enabled:
            for sample in rendered.samples:
                tag = f"samples/{sample.file_name.removesuffix('.png')}"
                image = np.asarray(sample.image)
                self.writer.add_image(tag, image, rendered.step, dataformats="HWC")
            self.writer.flush()
        self._pause()

    def _pause(self) -> None:
        """The time since the last step or pause (and its logging) was not training: left out
        of throughput."""
        now = time.perf_counter()
        self.paused += now - self.last_time
        self.last_time = now

    @property
    def throughput(self) -> float | None:
        """Training samples per second of this attempt so far: checkpoint writes included,
        validation and sample images not."""
        if not self.samples:
            return None
        return self.samples / (time.perf_counter() - self.started - self.paused)

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any:
    """torch's TensorBoard writer, without importing TensorFlow (seconds and hundreds of MB) when
    it is installed: ``tensorboard.compat.notf`` is TensorBoard's switch for its TF-free stub."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault(
            "tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf")
        )
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step)


def _start_loss_log(path: Path, start_step: int, mirrors: list[str]) -> None:
    """A loss log with the header and the rows up to ``start_step`` of an earlier attempt (from a
    mirror if the local disk lost it); rows after it belong to work the resume redoes."""
    if start_step and not path.exists():
        for mirror_uri in mirrors:
            if store.exists(store.join(mirror_uri, LOSS_LOG_NAME)):
                store.download_file(store.join(mirror_uri, LOSS_LOG_NAME), path)
                break
    rows = []
    if start_step and path.exists():
        with path.open(newline="") as file:
            rows = [row for row in csv.DictReader(file) if int(row["step"]) <= start_step]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LOSS_LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)
