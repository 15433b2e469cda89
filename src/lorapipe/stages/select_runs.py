"""``lorapipe select`` over several training runs (a sweep): where the runs are, whether their
validation losses compare, and the ranking that ``selection.json``, the report and the LoRA's
metadata carry.

A run is a training output (``checkpoint-<step>/`` directories and ``training_report.json``),
named by its folder (by as much of its path as tells it from the others), or every run of a
sweep folder that finished (``<folder>/sweep.json``, ``lorapipe sweep``), named as the sweep
named it; the sweep's failed runs are listed, not ranked.

Runs rank only when their losses compare: the same base model (``base_model_hash``), validation
images (``num_val_images``) and resolution in their training reports, and the same value of
every key of ``sweep.COMPARABILITY_KEYS`` in the configs they report. Else select refuses, in
one line naming both runs and the key.

The rule is ``selection_rule.ACROSS_RUNS_RULE``. ``runs`` in ``selection.json`` and
``report.json`` ranks every run, the winner first::

    {"place", "name", "output", "overrides", "rank", "steps", "best_step", "best_val_loss",
     "chosen_step", "chosen_val_loss", "earliest_within_step", "within_epsilon",
     "stopped_early", "winner", "checkpoints": [{"step", "val_loss"}, ...]}

``rank`` is the LoRA's rank, ``steps`` the steps the run trained, ``best_*`` its lowest
validation loss, ``chosen_*`` its own choice by the one-run rule, ``earliest_within_step`` its
earliest checkpoint within epsilon of the lowest of all runs (what the rule compares; None when
it never came that close). ``overrides`` are the sweep's for the run, else the config keys in
which the runs differ; ``checkpoints`` keep every run's validation losses, so the ranking can
be checked without the other runs' outputs. ``winner`` is ``{"name", "output", "overrides"}``,
``failed_runs`` the sweep.json records (name, overrides, output, error, log) of the runs that
failed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorapipe import store
from lorapipe.checkpoint_layout import (
    COMPLETE_MARKER,
    LORA_CONFIG_NAME,
    SWEEP_RUN_NAME,
    TRAINING_REPORT_NAME,
    CheckpointLosses,
    find_checkpoints,
    read_json,
    read_losses,
)
from lorapipe.errors import InputError
from lorapipe.selection_rule import RunLosses, RunSelection, RunStanding, choose_across_runs
from lorapipe.sweep import COMPARABILITY_KEYS, PER_RUN_KEYS, SWEEP_NAME

# what the training report itself says about what validation measured (beside its config)
REPORT_COMPARABILITY_KEYS = ("base_model_hash", "num_val_images", "resolution")
# config keys that say where or how a run ran, not what it trained: never a run's overrides
PLACEMENT_KEYS = (*PER_RUN_KEYS, "run_id", "resume", "cache_dir", "trainer_image")
RUNS_CHART_NAME = "runs_loss.png"
FAILED_KEYS = ("name", "overrides", "output", "error", "log")  # of a sweep.json record


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TrainingOutput:
    """One training output as select reads it."""

    uri: str
    complete: dict[int, str]  # step -> checkpoint URI, checkpoints with the marker
    incomplete: dict[int, str]
    losses: list[CheckpointLosses]  # of the complete checkpoints, by step
    report: dict[str, Any]  # training_report.json; {} when missing


def read_training_output(uri: str) -> TrainingOutput:
    """The complete checkpoints' losses and the training report of the output at ``uri``.

    Raises InputError, one line, when it has no complete checkpoint."""
    complete, incomplete = find_checkpoints(uri)
    if not complete:
        raise InputError(
            f"training output '{uri}' has no complete checkpoint "
            f"(a checkpoint-<step>/ directory with {COMPLETE_MARKER}); let training save one"
        )
    losses = [read_losses(checkpoint, step) for step, checkpoint in sorted(complete.items())]
    return TrainingOutput(uri, complete, incomplete, losses, _training_report(uri))


def _training_report(training_output_uri: str) -> dict[str, Any]:
    uri = store.join(training_output_uri, TRAINING_REPORT_NAME)
    if not store.exists(uri):
        return {}
    return read_json(uri)


# --------------------------------------------------------------------------- which runs


@dataclass(frozen=True)
class RunSource:
    """A training run to rank: its name, its training output and, when a sweep trained it,
    the sweep's overrides."""

    name: str
    output: str
    overrides: dict[str, Any] | None = None


@dataclass(frozen=True)
class Sources:
    """The runs select was given; ``ranked``: several runs or a sweep, so they are ranked."""

    runs: tuple[RunSource, ...]
    failed: tuple[dict[str, Any], ...] = ()  # sweep.json records of runs that failed
    ranked: bool = False


def resolve_sources(inputs: str | Sequence[str]) -> Sources:
    """The runs of ``inputs``: training outputs and sweep folders (or their sweep.json), a
    sweep standing for every run it finished.

    Raises InputError, one line, for a sweep none of whose runs finished or two runs of one
    name."""
    given = [inputs] if isinstance(inputs, str) else list(inputs)
    if not given:
        raise InputError("no training output to select from; give at least one")
    sweeps = {uri: sweep for uri in given if (sweep := _sweep_json(uri)) is not None}
    outputs = [uri for uri in given if uri not in sweeps]
    names = dict(zip(outputs, _distinct_names(outputs), strict=True))
    runs: list[RunSource] = []
    failed: list[dict[str, Any]] = []
    for uri in given:
        if uri in sweeps:
            finished, failures = _sweep_runs(uri, sweeps[uri])
            runs += finished
            failed += failures
        else:
            runs.append(_plain_run(names[uri], uri))
    _check_names(runs)
    return Sources(tuple(runs), tuple(failed), ranked=len(given) > 1 or bool(sweeps))


def _plain_run(name: str, uri: str) -> RunSource:
    """A training output given alone: named by its folder, or by the pipeline's sweep run
    record beside its report (``SWEEP_RUN_NAME``: every KFP output folder has one name)."""
    record_uri = store.join(uri, SWEEP_RUN_NAME)
    if not store.exists(record_uri):
        return RunSource(name, uri)
    record = json.loads(store.read_text(record_uri))
    return RunSource(record["name"], uri, dict(record.get("overrides") or {}))


def _sweep_json(uri: str) -> tuple[str, dict[str, Any]] | None:
    """(the sweep folder, its sweep.json) when ``uri`` is a sweep folder or its sweep.json."""
    folder = uri.rstrip("/")
    if folder.endswith(f"/{SWEEP_NAME}") or folder == SWEEP_NAME:
        folder = folder.removesuffix(SWEEP_NAME).rstrip("/") or "."
    sweep_uri = store.join(folder, SWEEP_NAME)
    if not store.exists(sweep_uri):
        return None
    document = read_json(sweep_uri)
    if not isinstance(document.get("runs"), list):
        raise InputError(f"{sweep_uri}: no list of 'runs'; it is not what `lorapipe sweep` writes")
    return folder, document


def _sweep_runs(
    uri: str, sweep: tuple[str, dict[str, Any]]
) -> tuple[list[RunSource], list[dict[str, Any]]]:
    """The sweep's finished runs (each in ``output``, else in ``<folder>/<name>`` when the
    sweep was moved) and the records of its failed ones."""
    folder, document = sweep
    finished, failed = [], []
    for record in document["runs"]:
        if record.get("status") != "finished":
            failed.append({key: record.get(key) for key in FAILED_KEYS})
            continue
        output = str(record.get("output") or "")
        if not output or not store.exists(store.join(output, TRAINING_REPORT_NAME)):
            output = store.join(folder, record["name"])
        finished.append(RunSource(record["name"], output, dict(record.get("overrides") or {})))
    if not finished:
        errors = "; ".join(f"{record['name']}: {record['error']}" for record in failed)
        raise InputError(
            f"sweep {uri}: no run finished ({errors or 'it lists none'}); fix them and train "
            "again with --resume latest"
        )
    return finished, failed


def _distinct_names(uris: Sequence[str]) -> list[str]:
    """Each output's folder name, or as many of its last path segments as tell it apart from
    the others' (KFP names every training output the same, in folders of its task)."""
    parts = [uri.removeprefix("file://").rstrip("/").split("/") for uri in uris]
    for length in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-length:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return names  # the same output given twice: _check_names refuses it


def _check_names(runs: Sequence[RunSource]) -> None:
    seen: dict[str, RunSource] = {}
    for run in runs:
        if run.name in seen:
            raise InputError(
                f"two runs are named {run.name} ({seen[run.name].output} and {run.output}); "
                "give each training output once"
            )
        seen[run.name] = run


# --------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class Ranking:
    """The runs read, checked and ranked: what select exports (the winner) and reports."""

    sources: Sources
    outputs: dict[str, TrainingOutput]  # by run name
    choice: RunSelection
    overrides: dict[str, dict[str, Any]]  # by run name

    @property
    def winner(self) -> RunSource:
        return next(run for run in self.sources.runs if run.name == self.choice.winner.name)

    @property
    def winner_output(self) -> TrainingOutput:
        return self.outputs[self.choice.winner.name]


def rank_runs(sources: Sources, *, epsilon: float, metric: str) -> Ranking:
    """Read every run, refuse runs whose losses do not compare, and apply the rule."""
    outputs = {run.name: read_training_output(run.output) for run in sources.runs}
    check_comparable(sources.runs, outputs)
    runs = [
        RunLosses(run.name, outputs[run.name].losses, _lora_rank(outputs[run.name]),
                  _trained_steps(outputs[run.name]))
        for run in sources.runs
    ]  # fmt: skip
    choice = choose_across_runs(runs, epsilon=epsilon, metric=metric)
    return Ranking(sources, outputs, choice, _overrides(sources.runs, outputs))


def check_comparable(runs: Sequence[RunSource], outputs: Mapping[str, TrainingOutput]) -> None:
    """Refuse runs whose validation losses do not compare, by what their training reports
    say: the first two that differ in a comparability key, in one line."""
    for run in runs:
        if not outputs[run.name].report:
            raise InputError(
                f"run {run.name} ({run.output}) has no {TRAINING_REPORT_NAME}, so whether its "
                "validation losses compare with the other runs' cannot be checked; select it "
                "alone"
            )
    values = {run.name: comparability_values(outputs[run.name].report) for run in runs}
    first = runs[0]
    for index, (key, value) in enumerate(values[first.name]):
        other = next((run for run in runs[1:] if values[run.name][index][1] != value), None)
        if other is not None:
            raise InputError(
                f"runs {first.name} ({key} {_short(value)}) and {other.name} ({key} "
                f"{_short(values[other.name][index][1])}) do not compare: their validation losses "
                "were not measured on the same images, noise and timesteps; rank runs trained "
                f"with the same {key}, and select the others apart"
            )


def comparability_values(report: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """What a training report says validation measured, as (key, value): the report's facts,
    then the values of ``sweep.COMPARABILITY_KEYS`` in its config (``resolution`` is in both:
    the size trained at, and the size asked for)."""
    config = report.get("config") or {}
    return [(key, report.get(key)) for key in REPORT_COMPARABILITY_KEYS] + [
        (key, config.get(key)) for key in COMPARABILITY_KEYS
    ]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]}"


def _lora_rank(output: TrainingOutput) -> int:
    """The LoRA rank the run trained, as its first checkpoint's ``lora_config.json`` says."""
    uri = store.join(output.complete[min(output.complete)], LORA_CONFIG_NAME)
    try:
        return int(read_json(uri)["rank"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{uri}: needs a numeric 'rank' ({error})") from error


def _trained_steps(output: TrainingOutput) -> int:
    """The steps the run trained (the report's, fewer when it stopped early), else its last
    checkpoint's."""
    steps = output.report.get("steps")
    return int(steps) if isinstance(steps, int | float) else max(output.complete)


def _overrides(
    runs: Sequence[RunSource], outputs: Mapping[str, TrainingOutput]
) -> dict[str, dict[str, Any]]:
    """Each run's config as it differs from the others': the sweep's overrides when a sweep
    trained it, else the values of the config keys in which the runs differ."""
    configs = {run.name: outputs[run.name].report.get("config") or {} for run in runs}
    keys = list(dict.fromkeys(key for config in configs.values() for key in config))
    differing = [
        key
        for key in keys
        if key not in PLACEMENT_KEYS
        and len({json.dumps(config.get(key), sort_keys=True) for config in configs.values()}) > 1
    ]
    return {
        run.name: run.overrides
        if run.overrides is not None
        else {key: configs[run.name].get(key) for key in differing}
        for run in runs
    }


# --------------------------------------------------------------------------- what select writes


def report_entries(ranking: Ranking) -> dict[str, Any]:
    """``runs``, ``winner`` and ``failed_runs``, for selection.json and report.json."""
    winner = ranking.winner
    return {
        "runs": [_run_record(ranking, standing) for standing in ranking.choice.standings],
        "winner": {
            "name": winner.name,
            "output": winner.output,
            "overrides": ranking.overrides[winner.name],
        },
        "failed_runs": list(ranking.sources.failed),
    }


def _run_record(ranking: Ranking, standing: RunStanding) -> dict[str, Any]:
    name = standing.run.name
    output = ranking.outputs[name]
    own = standing.own
    best = _lowest_val_loss(output.losses)
    chosen = next(c for c in output.losses if c.step == own.step)
    return {
        "place": standing.place,
        "name": name,
        "output": output.uri,
        "overrides": ranking.overrides[name],
        "rank": standing.run.rank,
        "steps": standing.run.steps,
        "best_step": best.step if best else None,
        "best_val_loss": best.val_loss if best else None,
        "chosen_step": own.step,
        "chosen_val_loss": chosen.value("val_loss"),
        "earliest_within_step": standing.earliest_within,
        "within_epsilon": standing.within_epsilon,
        "stopped_early": output.report.get("stopped_early"),
        "winner": standing.place == 1,
        "checkpoints": [{"step": c.step, "val_loss": c.val_loss} for c in output.losses],
    }


def _lowest_val_loss(losses: Sequence[CheckpointLosses]) -> CheckpointLosses | None:
    """The checkpoint of the lowest validation loss, the earlier on a tie (None without any:
    a sweep of one run may have trained without validation images)."""
    validated = [c for c in losses if c.value("val_loss") is not None]
    return min(validated, key=lambda c: (c.val_loss, c.step)) if validated else None


def lorapipe_metadata(ranking: Ranking) -> dict[str, str]:
    """The winner's name and config in the LoRA's ``lorapipe.*`` metadata."""
    winner = ranking.winner
    return {
        "sweep_run": winner.name,
        "sweep_overrides": json.dumps(ranking.overrides[winner.name], sort_keys=True),
    }


def metrics(ranking: Ranking) -> dict[str, float]:
    """The KFP metrics of a ranking: how many runs, and the winner's lowest validation loss."""
    values = {"runs": float(len(ranking.choice.standings))}
    if best := _lowest_val_loss(ranking.winner_output.losses):
        values["winner_best_val_loss"] = best.val_loss
    return values


def markdown_lines(report: Mapping[str, Any]) -> list[str]:
    """report.md's ranking: a row per run, the winner marked, the chart and the failed runs."""
    winner = report["winner"]
    lines = [
        "## Runs",
        "",
        f"**Winner:** {winner['name']} ({overrides_text(winner['overrides'])}).",
        "",
        f"![validation loss of every run]({report['files']['runs_loss']})",
        "",
        "| place | run | overrides | rank | steps | lowest val loss (step) | own choice "
        "| earliest within epsilon | stopped early | |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | :---: | --- |",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['place']} | {run['name']} | {overrides_text(run['overrides'])} "
            f"| {run['rank']} | {run['steps']} | {_loss_at(run['best_val_loss'], run['best_step'])} "
            f"| {run['chosen_step']} | {_or_dash(run['earliest_within_step'])} "
            f"| {'yes' if run['stopped_early'] else 'no'} "
            f"| {'**winner**' if run['winner'] else ''} |"
        )
    for failed in report["failed_runs"]:
        lines += ["", f"Failed, not ranked: {failed['name']}: {failed['error']}"]
    return lines + [""]


def overrides_text(overrides: Mapping[str, Any]) -> str:
    """A run's overrides in a table cell: ``lora_rank=8, learning_rate=5e-05``."""
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in overrides.items()) or "–"


def _loss_at(loss: float | None, step: int | None) -> str:
    return "–" if loss is None else f"{loss:.5g} ({step})"


def _or_dash(value: Any) -> str:
    return "–" if value is None else str(value)
