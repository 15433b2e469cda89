"""The charts lorapipe writes, drawn with matplotlib's Figure API (Agg, no pyplot: no global
state, safe in threads and headless pods). Torch-free: select runs in the CPU image."""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorapipe.checkpoint_layout import CheckpointLosses, checkpoint_name
from lorapipe.selection_rule import METRIC_LABELS, RunSelection, Selection

LOSS_CURVE_SIZE = (1000, 560)  # pixels
TRAINING_CHART_SIZE = (760, 420)
DPI = 100
CHOSEN_COLOR = "#c80000"
TRAIN_COLOR = "#1f77b4"
VALIDATION_COLOR = "#e66e14"
TOLERANCE_COLOR = "#787878"
TIMESTEP_COLORS = ("#9467bd", "#2ca02c", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
RUN_COLORS = ("#1f77b4", "#e66e14", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
              "#bcbd22", "#7f7f7f")  # fmt: skip


def draw_loss_curve(
    checkpoints: Sequence[CheckpointLosses], selection: Selection, path: Path
) -> None:
    """``loss_curve.png`` against step: validation loss per timestep (thin), EMA training loss
    and mean validation loss (thick), the tolerance line and the chosen checkpoint."""
    ordered = sorted(checkpoints, key=lambda c: c.step)

    def points(loss_of: Callable[[CheckpointLosses], float | None]) -> tuple[list, list]:
        pairs = [
            (c.step, loss)
            for c in ordered
            if (loss := loss_of(c)) is not None and math.isfinite(loss)
        ]
        return [step for step, _ in pairs], [loss for _, loss in pairs]

    figure = Figure(figsize=(LOSS_CURVE_SIZE[0] / DPI, LOSS_CURVE_SIZE[1] / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    timesteps = sorted({t for c in ordered for t in c.val_loss_by_timestep}, key=_timestep_order)
    for timestep, color in zip(timesteps, itertools.cycle(TIMESTEP_COLORS)):
        steps, losses = points(lambda c, t=timestep: c.val_loss_by_timestep.get(t))
        if steps:
            axes.plot(steps, losses, marker="o", markersize=3, linewidth=1, color=color,
                      label=f"val t={timestep}")  # fmt: skip
    for label, metric, color in (
        ("train loss (EMA)", "train_loss_ema", TRAIN_COLOR),
        ("val loss (mean)", "val_loss", VALIDATION_COLOR),
    ):
        steps, losses = points(lambda c, m=metric: c.value(m))
        if steps:
            axes.plot(steps, losses, marker="o", markersize=5, linewidth=3, color=color,
                      label=label)  # fmt: skip
    axes.axhline(selection.threshold, color=TOLERANCE_COLOR, linestyle="--", linewidth=1,
                 label=f"tolerance: lowest + {selection.epsilon * 100:g}%")  # fmt: skip
    axes.axvline(selection.step, color=CHOSEN_COLOR, linestyle=":", linewidth=1.5)
    axes.plot([selection.step], [selection.value], marker="o", markersize=14, fillstyle="none",
              markeredgewidth=3, linestyle="none", color=CHOSEN_COLOR,
              label=f"chosen: step {selection.step}")  # fmt: skip
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(
        f"loss by step; chosen: {checkpoint_name(selection.step)} "
        f"({METRIC_LABELS[selection.metric]})"
    )
    axes.grid(True, color="#e4e4e4")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    figure.subplots_adjust(left=0.08, right=0.79, top=0.91, bottom=0.11)
    figure.savefig(path, format="png", dpi=DPI)


def draw_runs_validation_loss(choice: RunSelection) -> bytes:
    """``runs_loss.png``: every run's mean validation loss by step, a line each (the winner's
    thick), the tolerance line of the lowest across runs and the checkpoint that ships, as PNG
    bytes; a run's legend entry carries its place in the ranking."""
    figure, axes = _figure(LOSS_CURVE_SIZE)
    selection = choice.selection
    for standing, color in zip(choice.standings, itertools.cycle(RUN_COLORS)):
        scored = sorted(
            (c.step, value)
            for c in standing.run.checkpoints
            if (value := c.value(selection.metric)) is not None
        )
        winner = standing.run is choice.winner
        axes.plot([step for step, _ in scored], [value for _, value in scored], marker="o",
                  markersize=5 if winner else 3, linewidth=3 if winner else 1.4, color=color,
                  label=f"{standing.place}. {_shortened(standing.run.name)}")  # fmt: skip
    axes.axhline(selection.threshold, color=TOLERANCE_COLOR, linestyle="--", linewidth=1,
                 label=f"tolerance: lowest + {selection.epsilon * 100:g}%")  # fmt: skip
    axes.plot([selection.step], [selection.value], marker="o", markersize=14, fillstyle="none",
              markeredgewidth=3, linestyle="none", color=CHOSEN_COLOR,
              label=f"chosen: {_shortened(choice.winner.name)}, step {selection.step}")  # fmt: skip
    axes.set_xlabel("step")
    axes.set_ylabel(METRIC_LABELS[selection.metric])
    axes.set_title(f"{METRIC_LABELS[selection.metric]} of every run by step")
    axes.grid(True, color="#e4e4e4")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    figure.subplots_adjust(left=0.08, right=0.72, top=0.91, bottom=0.11)
    return _png(figure)


def _shortened(name: str, length: int = 36) -> str:
    """A run name that fits the legend (a sweep's names run to 80 characters)."""
    return name if len(name) <= length else name[: length - 1] + "…"


def _timestep_order(timestep: str) -> tuple[int, float | str]:
    try:
        return 0, float(timestep)
    except ValueError:
        return 1, timestep


def draw_training_loss(
    loss_by_step: Sequence[tuple[int, float]], checkpoints: Sequence[CheckpointLosses]
) -> bytes:
    """Training loss by step (every step thin, a moving mean thick) and each checkpoint's mean
    validation loss, as PNG bytes."""
    figure, axes = _figure(TRAINING_CHART_SIZE)
    finite = [(step, loss) for step, loss in loss_by_step if math.isfinite(loss)]
    if finite:
        steps, losses = zip(*finite, strict=True)
        axes.plot(steps, losses, linewidth=0.6, color=TRAIN_COLOR, alpha=0.45, label="train loss")
        window = max(1, len(losses) // 25)
        axes.plot(steps, _moving_mean(losses, window), linewidth=2.2, color=TRAIN_COLOR,
                  label=f"train loss, mean of {window} steps")  # fmt: skip
    validated = [(c.step, c.val_loss) for c in checkpoints if c.val_loss is not None]
    if validated:
        steps, losses = zip(*sorted(validated), strict=True)
        axes.plot(steps, losses, marker="o", linewidth=2, color=VALIDATION_COLOR,
                  label="validation loss (mean)")  # fmt: skip
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("training and validation loss")
    axes.grid(True, color="#e4e4e4")
    axes.legend(loc="upper right", fontsize="small", frameon=False)
    return _png(figure)


def draw_validation_by_timestep(checkpoints: Sequence[CheckpointLosses]) -> bytes | None:
    """Validation loss against the timestep it was measured at, a line per checkpoint (later
    checkpoints darker), as PNG bytes; None without per-timestep losses."""
    ordered = [c for c in sorted(checkpoints, key=lambda c: c.step) if c.val_loss_by_timestep]
    if not ordered:
        return None
    figure, axes = _figure(TRAINING_CHART_SIZE)
    colormap = matplotlib.colormaps["viridis_r"]
    for index, checkpoint in enumerate(ordered):
        timesteps = sorted(checkpoint.val_loss_by_timestep, key=_timestep_order)
        axes.plot([_timestep_order(t)[1] for t in timesteps],
                  [checkpoint.val_loss_by_timestep[t] for t in timesteps],
                  marker="o", markersize=3, linewidth=1.4,
                  color=colormap(0.15 + 0.85 * index / max(1, len(ordered) - 1)),
                  label=checkpoint_name(checkpoint.step))  # fmt: skip
    axes.set_xlabel("timestep")
    axes.set_ylabel("validation loss")
    axes.set_yscale("log")
    axes.set_title("validation loss by timestep (fixed noise, same images)")
    axes.grid(True, color="#e4e4e4")
    axes.legend(loc="upper right", fontsize="x-small", frameon=False, ncol=2)
    return _png(figure)


def draw_tag_frequency(tag_frequency: Mapping[str, int], images: int, top: int = 30) -> bytes:
    """The ``top`` most frequent caption tags as horizontal bars (share of images), PNG."""
    ranked = sorted(tag_frequency.items(), key=lambda item: (-item[1], item[0]))[:top]
    height = 120 + 22 * max(1, len(ranked))
    figure, axes = _figure((TRAINING_CHART_SIZE[0], height))
    names = [name if len(name) <= 48 else name[:47] + "…" for name, _ in ranked][::-1]
    counts = [count for _, count in ranked][::-1]
    axes.barh(names, counts, color=TRAIN_COLOR)
    for position, count in enumerate(counts):
        axes.text(count, position, f" {count}", va="center", fontsize="x-small")
    axes.set_xlabel(f"images (of {images})")
    axes.set_title(f"the {len(ranked)} most frequent tags")
    axes.tick_params(axis="y", labelsize="small")
    figure.subplots_adjust(left=0.32, right=0.95)
    return _png(figure)


def _figure(size: tuple[int, int]) -> tuple[Figure, Any]:
    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _moving_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    sums = list(itertools.accumulate(values, initial=0.0))
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1)
            for i in range(len(values))]  # fmt: skip
