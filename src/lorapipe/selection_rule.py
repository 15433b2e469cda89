"""Which checkpoint ships: one rule, shared by ``lorapipe select`` (which applies it) and
``keep_last_n`` pruning in train (which must not delete what it would choose).

The rule: the **earliest** complete checkpoint whose metric is within ``epsilon`` (relative:
``<= lowest + epsilon * |lowest|``) of the lowest one; ties go to the earlier step. The metric
is the mean validation loss, or, when no checkpoint has one, the EMA of the training loss.

Pruning and the rule: train does not know the epsilon select will be given, so it protects
the checkpoints the rule could choose at select's default epsilon (``DEFAULT_EPSILON``),
whatever lower losses later checkpoints reach: every checkpoint whose loss is lower than every
earlier one's and within epsilon of the lowest so far. That set holds today's choice and the
lowest-loss checkpoint; run after every save, it makes select's choice at the default epsilon
independent of ``keep_last_n``. A larger epsilon given to select may prefer a checkpoint that
pruning deleted.

Torch-free: select runs in the CPU image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorapipe.checkpoint_layout import RECORD_NAME, CheckpointLosses, checkpoint_name
from lorapipe.errors import InputError

DEFAULT_EPSILON = 0.01
METRICS = ("auto", "val_loss", "train_loss_ema")
METRIC_LABELS = {"val_loss": "mean validation loss", "train_loss_ema": "EMA training loss"}
NOISY_TRAINING_LOSS = (
    "selecting on the EMA training loss, which is noisy (random timesteps and noise on the "
    "training images) and keeps falling as the LoRA overfits; train with validation images "
    "for a reliable choice"
)


@dataclass(frozen=True)
class Selection:
    """The chosen checkpoint and the numbers that justify it."""

    step: int
    metric: str
    value: float
    minimum: float
    minimum_step: int
    threshold: float
    epsilon: float
    rule: str
    reason: str
    warnings: tuple[str, ...] = ()


def resolve_metric(checkpoints: Sequence[CheckpointLosses], metric: str) -> tuple[str, list[str]]:
    """(the metric ``auto`` stands for, warnings about selecting on it)."""
    if metric == "auto":
        has_validation = any(c.value("val_loss") is not None for c in checkpoints)
        if has_validation:
            return "val_loss", []
        return "train_loss_ema", [f"no checkpoint has a validation loss: {NOISY_TRAINING_LOSS}"]
    if metric == "train_loss_ema":
        return metric, [NOISY_TRAINING_LOSS]
    return metric, []


def threshold(minimum: float, epsilon: float) -> float:
    return minimum + epsilon * abs(minimum)


def choose_checkpoint(
    checkpoints: Sequence[CheckpointLosses],
    *,
    epsilon: float = DEFAULT_EPSILON,
    metric: str = "auto",
) -> Selection:
    """Apply the rule: the earliest checkpoint whose metric is within ``epsilon`` (relative) of
    the minimum over all checkpoints that recorded it."""
    metric, warnings = resolve_metric(checkpoints, metric)
    label = METRIC_LABELS[metric]

    candidates = sorted(
        (c for c in checkpoints if c.value(metric) is not None), key=lambda c: c.step
    )
    skipped = [c.step for c in checkpoints if c.value(metric) is None]
    if not candidates:
        raise InputError(
            f"no complete checkpoint recorded a finite {label}; "
            + (
                "train with validation images or use --metric auto"
                if metric == "val_loss"
                else f"the training output's {RECORD_NAME} files are unusable"
            )
        )
    if skipped:
        steps = ", ".join(str(step) for step in sorted(skipped))
        warnings.append(
            f"checkpoints at steps {steps} have no finite {label} and were not considered"
        )

    best = min(candidates, key=lambda c: (c.value(metric), c.step))
    minimum = best.value(metric)
    limit = threshold(minimum, epsilon)
    chosen = next(c for c in candidates if c.value(metric) <= limit)
    value = chosen.value(metric)
    tolerance = f"{epsilon * 100:g}%"
    rule = (
        f"the earliest complete checkpoint whose {label} is within {tolerance} (relative) of the "
        f"lowest {label}; ties go to the earlier step"
    )
    if chosen.step == best.step:
        reason = (
            f"{checkpoint_name(chosen.step)} has the lowest {label} ({value:.5g}) and no earlier "
            f"checkpoint comes within {tolerance} of it."
        )
    else:
        gain = (value - minimum) / abs(minimum) if minimum else 0.0
        reason = (
            f"{checkpoint_name(chosen.step)} is the earliest checkpoint within {tolerance} of the lowest "
            f"{label} ({minimum:.5g} at {checkpoint_name(best.step)}): its {value:.5g} is only "
            f"{gain:.2%} higher, so the extra training after it is not worth the risk of overfitting."
        )
    return Selection(
        step=chosen.step,
        metric=metric,
        value=value,
        minimum=minimum,
        minimum_step=best.step,
        threshold=limit,
        epsilon=epsilon,
        rule=rule,
        reason=reason,
        warnings=tuple(warnings),
    )


def steps_to_keep(
    checkpoints: Sequence[CheckpointLosses], *, epsilon: float = DEFAULT_EPSILON
) -> set[int]:
    """The steps ``choose_checkpoint`` (metric ``auto``) could pick now or after any later,
    lower loss: the earliest checkpoint under a threshold always has a loss below every
    earlier one's, and later checkpoints only lower the threshold."""
    metric, _ = resolve_metric(checkpoints, "auto")
    scored = sorted((c.step, value) for c in checkpoints if (value := c.value(metric)) is not None)
    if not scored:
        return set()
    limit = threshold(min(value for _, value in scored), epsilon)
    keep, lowest_before = set(), float("inf")
    for step, value in scored:
        if value < lowest_before:
            lowest_before = value
            if value <= limit:
                keep.add(step)
    return keep
