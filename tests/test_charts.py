"""select's loss curve, drawn with matplotlib: a PNG of the promised size showing the curves
and the chosen checkpoint (select's own test checks the colours in a real run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lorapipe.charts import CHOSEN_COLOR, LOSS_CURVE_SIZE, VALIDATION_COLOR, draw_loss_curve
from lorapipe.checkpoint_layout import CheckpointLosses
from lorapipe.selection_rule import choose_checkpoint


def _pixels_of(path: Path, color: str) -> int:
    rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return int((pixels == rgb).all(axis=1).sum())


def test_the_loss_curve_shows_the_losses_and_the_choice(tmp_path: Path) -> None:
    checkpoints = [
        CheckpointLosses(
            step=step,
            train_loss_ema=ema,
            val_loss=val,
            val_loss_by_timestep={"100": val * 1.5, "900": val * 0.5, "bad": float("nan")},
        )
        for step, ema, val in ((100, 0.3, 0.2), (200, 0.25, 0.1512), (300, 0.2, 0.15))
    ]
    selection = choose_checkpoint(checkpoints)
    path = tmp_path / "loss_curve.png"

    draw_loss_curve(checkpoints, selection, path)

    image = Image.open(path)
    assert image.format == "PNG" and image.size == LOSS_CURVE_SIZE
    assert np.asarray(image.convert("L")).std() > 5  # not blank
    assert _pixels_of(path, CHOSEN_COLOR) > 50 and _pixels_of(path, VALIDATION_COLOR) > 50


def test_one_checkpoint_without_validation_still_draws(tmp_path: Path) -> None:
    checkpoints = [CheckpointLosses(step=10, train_loss_ema=0.4)]
    path = tmp_path / "loss_curve.png"
    draw_loss_curve(checkpoints, choose_checkpoint(checkpoints), path)
    assert Image.open(path).size == LOSS_CURVE_SIZE
    assert _pixels_of(path, CHOSEN_COLOR) > 20
