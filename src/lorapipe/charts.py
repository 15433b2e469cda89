"""The charts lorapipe writes, drawn with matplotlib's Figure API (Agg, no pyplot: no global
state, safe in threads and headless pods). Torch-free: select runs in the CPU image."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorapipe.checkpoint_layout import CheckpointLosses, checkpoint_name
from lorapipe.selection_rule import METRIC_LABELS, Selection

LOSS_CURVE_SIZE = (1000, 560)  # pixels
DPI = 100
CHOSEN_COLOR = "#c80000"
TRAIN_COLOR = "#1f77b4"
VALIDATION_COLOR = "#e66e14"
TOLERANCE_COLOR = "#787878"
TIMESTEP_COLORS = ("#9467bd", "#2ca02c", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


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


def _timestep_order(timestep: str) -> tuple[int, float | str]:
    try:
        return 0, float(timestep)
    except ValueError:
        return 1, timestep
