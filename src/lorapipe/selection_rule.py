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

Across runs (a sweep: one training per config), ``choose_across_runs`` applies the same rule to
every checkpoint of every run, against the lowest validation loss of all of them (training
losses do not compare across runs), as ``ACROSS_RUNS_RULE`` says: the earliest checkpoint wins,
whichever run it is in, since a run that gets as good sooner has overfit less; between runs
with a checkpoint at that step the smaller LoRA rank wins (fewer parameters to overfit with),
then the run that trained fewer steps, then the run given first.
One run is exactly ``choose_checkpoint``. Pruning keeps what this rule chooses too: the lowest
loss of all runs is no higher than any one run's, so the winner's checkpoint is the earliest
of its run under a tolerance line no higher than its own, which ``steps_to_keep`` protects.

Torch-free: select runs in the CPU image.
"""

from __future__ import annotations

import dataclasses
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
# the rules as sentences: selection.json, the report and the LoRA's metadata quote them filled in
RULE = (
    "the earliest complete checkpoint whose {label} is within {tolerance} (relative) of the "
    "lowest {label}; ties go to the earlier step"
)
ACROSS_RUNS_RULE = (
    "the earliest complete checkpoint of any run whose {label} is within {tolerance} (relative) "
    "of the lowest {label} of all the runs; ties go to the run of smaller LoRA rank, then to the "
    "run of fewer training steps, then to the run given first"
)
ACROSS_RUNS_NEED_VALIDATION = (
    "runs are ranked by their validation losses, and these runs recorded none: a training loss "
    "depends on each run's own training settings (timestep range, loss weighting, "
    "augmentations), so it does not compare across runs; train with validation images "
    "(validation_split), or select each run alone"
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
    tolerance = _tolerance(epsilon)
    rule = RULE.format(label=label, tolerance=tolerance)
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


def _tolerance(epsilon: float) -> str:
    return f"{epsilon * 100:g}%"


# --------------------------------------------------------------------------- across runs


@dataclass(frozen=True)
class RunLosses:
    """One training run's checkpoints and what breaks its ties with other runs."""

    name: str
    checkpoints: Sequence[CheckpointLosses]
    rank: int  # the LoRA's rank
    steps: int  # the steps it trained (fewer than planned when it stopped early)


@dataclass(frozen=True)
class RunStanding:
    """Where one run places: its own choice by the one-run rule, and its earliest checkpoint
    within epsilon of the lowest of all runs (None: it never came that close)."""

    run: RunLosses
    place: int  # 1 for the winner
    own: Selection
    earliest_within: int | None

    @property
    def within_epsilon(self) -> bool:
        return self.earliest_within is not None


@dataclass(frozen=True)
class RunSelection:
    """The run and checkpoint that ship, and every run's standing, the winner's first."""

    winner: RunLosses
    selection: Selection  # the winner's checkpoint, judged against the lowest of all runs
    standings: tuple[RunStanding, ...]


def choose_across_runs(
    runs: Sequence[RunLosses], *, epsilon: float = DEFAULT_EPSILON, metric: str = "auto"
) -> RunSelection:
    """Apply ``ACROSS_RUNS_RULE`` to every checkpoint of ``runs``; one run is exactly
    ``choose_checkpoint``. Several runs are judged by their validation losses only (the metric
    ``auto`` or ``val_loss``). Raises InputError, naming the run, for a run with none."""
    if not runs:
        raise InputError("no training run to choose from; give at least one training output")
    if len(runs) == 1:
        only = choose_checkpoint(runs[0].checkpoints, epsilon=epsilon, metric=metric)
        return RunSelection(runs[0], only, (RunStanding(runs[0], 1, only, only.step),))
    metric, _ = resolve_metric([c for run in runs for c in run.checkpoints], metric)
    if metric != "val_loss":
        raise InputError(ACROSS_RUNS_NEED_VALIDATION)
    own = [_own_choice(run, epsilon, metric) for run in runs]
    minimum = min(selection.minimum for selection in own)
    limit = threshold(minimum, epsilon)
    earliest = [_earliest_within(run, metric, limit) for run in runs]
    order = sorted(range(len(runs)), key=lambda i: _standing_key(runs[i], own[i], earliest[i], i))
    standings = tuple(
        RunStanding(runs[i], place, own[i], earliest[i]) for place, i in enumerate(order, 1)
    )
    # the run holding the lowest loss comes within epsilon, so the winner has a checkpoint there
    step = earliest[order[0]] or 0
    return RunSelection(
        standings[0].run,
        _winning_selection(standings, step, metric, epsilon, limit),
        standings,
    )


def _own_choice(run: RunLosses, epsilon: float, metric: str) -> Selection:
    """The run's choice by the one-run rule, on the metric every run is judged by."""
    try:
        selection = choose_checkpoint(run.checkpoints, epsilon=epsilon, metric=metric)
    except InputError as error:
        raise InputError(f"run {run.name}: {error}") from error
    warnings = tuple(f"run {run.name}: {warning}" for warning in selection.warnings)
    return dataclasses.replace(selection, warnings=warnings)


def _earliest_within(run: RunLosses, metric: str, limit: float) -> int | None:
    steps = [c.step for c in run.checkpoints if (v := c.value(metric)) is not None and v <= limit]
    return min(steps, default=None)


def _standing_key(
    run: RunLosses, own: Selection, earliest: int | None, index: int
) -> tuple[int, float, int, int, int]:
    """The rule's order: the runs that come within epsilon of the lowest by their earliest such
    checkpoint, then smaller rank, fewer steps, given first; the others after, by their lowest."""
    if earliest is None:
        return (1, own.minimum, 0, 0, index)
    return (0, earliest, run.rank, run.steps, index)


def _winning_selection(
    standings: Sequence[RunStanding],
    step: int,
    metric: str,
    epsilon: float,
    limit: float,
) -> Selection:
    """The winner's checkpoint at ``step`` as a ``Selection`` against the lowest loss of all
    runs; the reason names the run holding that lowest loss, and the tie-break if one decided."""
    winner = standings[0]
    value = next(c.value(metric) for c in winner.run.checkpoints if c.step == step)
    best = min(standings, key=lambda s: (s.own.minimum, s.place))
    label, tolerance = METRIC_LABELS[metric], _tolerance(epsilon)
    where = f"{winner.run.name} {checkpoint_name(step)}"
    if best is winner and step == best.own.minimum_step:
        reason = (
            f"{where} has the lowest {label} of all {len(standings)} runs ({value:.5g}) and no "
            f"earlier checkpoint of any run comes within {tolerance} of it."
        )
    else:
        gain = (value - best.own.minimum) / abs(best.own.minimum) if best.own.minimum else 0.0
        reason = (
            f"{where} is the earliest checkpoint of any run within {tolerance} of the lowest "
            f"{label} ({best.own.minimum:.5g}, {best.run.name} "
            f"{checkpoint_name(best.own.minimum_step)}): its {value:.5g} is only {gain:.2%} "
            "higher, so the extra training after it is not worth the risk of overfitting."
        )
    tied = [s for s in standings[1:] if s.earliest_within == step]
    if tied:
        reason += " " + _tie_break(winner, tied[0], step)
    return Selection(
        step=step,
        metric=metric,
        value=value,
        minimum=best.own.minimum,
        minimum_step=best.own.minimum_step,
        threshold=limit,
        epsilon=epsilon,
        rule=ACROSS_RUNS_RULE.format(label=label, tolerance=tolerance),
        reason=reason,
        warnings=tuple(w for s in standings for w in s.own.warnings),
    )


def _tie_break(winner: RunStanding, other: RunStanding, step: int) -> str:
    """Why the winner beat a run with a checkpoint at the same step within epsilon."""
    if winner.run.rank != other.run.rank:
        why = f"its smaller LoRA rank ({winner.run.rank} < {other.run.rank})"
    elif winner.run.steps != other.run.steps:
        why = f"its fewer training steps ({winner.run.steps} < {other.run.steps})"
    else:
        why = "being given first (the same rank and training steps)"
    return (
        f"{other.run.name} also comes within epsilon at step {step}; {winner.run.name} wins by "
        f"{why}."
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
