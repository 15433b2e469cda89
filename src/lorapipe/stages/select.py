"""``lorapipe select``: pick the checkpoint to ship by its loss and export it for every tool.

The rule (``SelectConfig``): the **earliest** complete checkpoint whose mean validation loss is
within ``epsilon`` (relative, default 1%) of the lowest one. A later checkpoint that is only
marginally better has trained longer on the same few images, so it is more likely to be
overfit; within the tolerance the earlier one wins, and ties go to the earlier step. When no
checkpoint has a validation loss, the same rule runs on the EMA of the training loss, with a
warning: training loss is measured on random timesteps and noise, so it is noisy.

Input: a training output (local or s3://) laid out as train writes it, ``checkpoint-<step>/``
directories with ``record.json`` and a ``_COMPLETE`` marker. Checkpoints without the marker are
ignored and listed in the report.

Output (a directory, local or s3://):

- ``pytorch_lora_weights.safetensors``: diffusers/PEFT format for ``pipe.load_lora_weights``
- ``<output_name>.safetensors``: kohya format with kohya's metadata, for A1111 WebUI's
  ``models/Lora`` (prompt ``<lora:output_name:0.7>``) and ComfyUI's ``models/loras``
- ``selection.json``: the rule, every checkpoint's losses, the choice and why
- ``loss_curve.png``: training EMA and validation loss per timestep against step, choice marked
- ``metrics.json``: ``{"metrics": [...]}`` as the KFP v1 UI reads it, plus ``"values"``, a flat
  ``{name: number}`` for KFP v2's ``Metrics.log_metric``
- ``report.json`` / ``report.md``
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import math
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lorapipe import config as config_options
from lorapipe import lora_format, store
from lorapipe.config import Where, option
from lorapipe.errors import ConfigError, InputError, LoraFormatError, ObjectNotFoundError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
RECORD_NAME = "record.json"
LORA_CONFIG_NAME = "lora_config.json"
TRAINING_REPORT_NAME = "training_report.json"
METRICS = ("auto", "val_loss", "train_loss_ema")
METRIC_LABELS = {"val_loss": "mean validation loss", "train_loss_ema": "EMA training loss"}
OUTPUT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
WEBUI_EXAMPLE_WEIGHT = 0.7
NOISY_TRAINING_LOSS = (
    "selecting on the EMA training loss, which is noisy (random timesteps and noise on the "
    "training images) and keeps falling as the LoRA overfits; train with validation images "
    "for a reliable choice"
)


@dataclass
class SelectConfig:
    """How ``lorapipe select`` chooses, names and publishes the LoRA."""

    COMMAND: ClassVar[str] = "select"

    epsilon: float = option(
        0.01,
        help="relative tolerance: a loss <= lowest x (1 + epsilon) counts as as good as the "
        "lowest, and the earliest such checkpoint wins",
        minimum=0,
    )
    metric: str = option(
        "auto",
        help="loss to select on: `auto` (validation loss if any checkpoint has one, else the EMA "
        "training loss), `val_loss` or `train_loss_ema`",
        choices=METRICS,
    )
    output_name: str | None = option(
        None,
        help="kohya file name and the NAME in `<lora:NAME:0.7>`",
        default_text="the training config's output_name, else lora",
    )
    pipeline_run_id: str = option(
        "",
        help="recorded in the LoRA's metadata (`lorapipe.pipeline_run_id`); names the published "
        "folder",
        aliases=("run_id",),
    )
    publish_uri: str = option(
        "",
        help="also copy the LoRA files to `<publish_uri>/<pipeline_run_id>/` and then point "
        "`<publish_uri>/latest.json` at them (local or `s3://`); empty: no publishing",
    )

    def validate(self, where: Where | None = None) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ConfigError(f"epsilon {self.epsilon} must be a number >= 0, e.g. 0.01 for 1%")
        if self.metric not in METRICS:
            raise ConfigError(f"metric '{self.metric}' is unknown; use one of {', '.join(METRICS)}")
        if self.output_name is not None:
            check_output_name(self.output_name, "output_name")


@dataclass(frozen=True)
class CheckpointLosses:
    """The losses train recorded for one complete checkpoint."""

    step: int
    epoch: int | None = None
    train_loss_mean: float | None = None
    train_loss_ema: float | None = None
    val_loss: float | None = None
    val_loss_by_timestep: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        """The metric if it was recorded and is finite."""
        value = getattr(self, metric)
        return value if value is not None and math.isfinite(value) else None


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


def choose_checkpoint(
    checkpoints: Sequence[CheckpointLosses], *, epsilon: float = 0.01, metric: str = "auto"
) -> Selection:
    """Apply the rule: the earliest checkpoint whose metric is within ``epsilon`` (relative) of
    the minimum over all checkpoints that recorded it."""
    warnings: list[str] = []
    if metric == "auto":
        has_validation = any(c.value("val_loss") is not None for c in checkpoints)
        metric = "val_loss" if has_validation else "train_loss_ema"
        if not has_validation:
            warnings.append(f"no checkpoint has a validation loss: {NOISY_TRAINING_LOSS}")
    elif metric == "train_loss_ema":
        warnings.append(NOISY_TRAINING_LOSS)
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
                else "the training output's record.json files are unusable"
            )
        )
    if skipped:
        steps = ", ".join(str(step) for step in sorted(skipped))
        warnings.append(
            f"checkpoints at steps {steps} have no finite {label} and were not considered"
        )

    best = min(candidates, key=lambda c: (c.value(metric), c.step))
    minimum = best.value(metric)
    threshold = minimum + epsilon * abs(minimum)
    chosen = next(c for c in candidates if c.value(metric) <= threshold)
    value = chosen.value(metric)
    tolerance = f"{epsilon * 100:g}%"
    rule = (
        f"the earliest complete checkpoint whose {label} is within {tolerance} (relative) of the "
        f"lowest {label}; ties go to the earlier step"
    )
    if chosen.step == best.step:
        reason = (
            f"checkpoint-{chosen.step} has the lowest {label} ({value:.5g}) and no earlier "
            f"checkpoint comes within {tolerance} of it."
        )
    else:
        gain = (value - minimum) / abs(minimum) if minimum else 0.0
        reason = (
            f"checkpoint-{chosen.step} is the earliest checkpoint within {tolerance} of the lowest "
            f"{label} ({minimum:.5g} at checkpoint-{best.step}): its {value:.5g} is only "
            f"{gain:.2%} higher, so the extra training after it is not worth the risk of overfitting."
        )
    return Selection(
        step=chosen.step,
        metric=metric,
        value=value,
        minimum=minimum,
        minimum_step=best.step,
        threshold=threshold,
        epsilon=epsilon,
        rule=rule,
        reason=reason,
        warnings=tuple(warnings),
    )


def run(training_output_uri: str, output_uri: str, config: SelectConfig | None = None) -> dict:
    """Choose a checkpoint of ``training_output_uri`` and write the LoRA files, selection,
    plot, metrics and report to ``output_uri``; return the report."""
    config = config or SelectConfig()
    config.validate()
    complete, incomplete = find_checkpoints(training_output_uri)
    if incomplete:
        log.warning("ignoring incomplete checkpoints (no %s): %s", COMPLETE_MARKER, incomplete)
    if not complete:
        raise InputError(
            f"training output '{training_output_uri}' has no complete checkpoint "
            f"(a checkpoint-<step>/ directory with {COMPLETE_MARKER}); let training save one"
        )
    losses = [read_losses(uri, step) for step, uri in sorted(complete.items())]
    selection = choose_checkpoint(losses, epsilon=config.epsilon, metric=config.metric)
    for warning in selection.warnings:
        log.warning(warning)

    chosen = next(c for c in losses if c.step == selection.step)
    modules = load_checkpoint_lora(complete[selection.step])
    training_report = _read_training_report(training_output_uri)
    output_name = config.output_name or _default_output_name(training_report)
    lorapipe_metadata = {
        "selection_rule": selection.rule,
        "selection_metric": selection.metric,
        "val_loss": chosen.val_loss,
        "train_loss_ema": chosen.train_loss_ema,
        "checkpoint_step": selection.step,
        "pipeline_run_id": config.pipeline_run_id,
        "base_model": training_report.get("base_model"),
        "base_model_hash": training_report.get("base_model_hash"),
    }
    facts = training_facts(training_report, modules, chosen, output_name, lorapipe_metadata)
    report = _report(
        training_output_uri, output_uri, selection, losses, complete, incomplete, facts, modules
    )

    with tempfile.TemporaryDirectory(prefix="lorapipe-select-") as staging_dir:
        staging = Path(staging_dir)
        lora_format.save_diffusers(
            staging / report["files"]["diffusers"],
            modules,
            {f"lorapipe.{key}": str(value) for key, value in lorapipe_metadata.items()},
        )
        lora_format.save_kohya(
            staging / report["files"]["kohya"], modules, lora_format.kohya_metadata(facts)
        )
        draw_loss_curve(losses, selection, staging / report["files"]["loss_curve"])
        _write_json(
            staging / report["files"]["selection"], {key: report[key] for key in SELECTION_KEYS}
        )
        _write_json(staging / report["files"]["metrics"], _kfp_metrics(report["metrics"]))
        _write_json(staging / "report.json", report)
        (staging / "report.md").write_text(render_markdown(report))
        store.put_dir(staging, output_uri)
        if config.publish_uri:
            report["published"] = publish(staging, config.publish_uri, config.pipeline_run_id)
    log.info("selected checkpoint-%d: %s", selection.step, selection.reason)
    return report


def publish(lora_dir: str | Path, publish_uri: str, run_id: str) -> str:
    """Copy the chosen LoRA to ``publish_uri/<run_id>/`` and then point ``latest.json`` at it.

    Runs never overwrite each other's files; whoever reads ``latest.json`` finds a complete
    upload, because the pointer is written only after every file (and the manifest) is there.
    """
    run_prefix = store.join(publish_uri, store.safe_name(run_id))
    store.put_dir(lora_dir, run_prefix)
    pointer = {"run_id": run_id, "uri": run_prefix}
    store.write_text(store.join(publish_uri, "latest.json"), json.dumps(pointer, indent=2) + "\n")
    log.info("published the LoRA to %s", run_prefix)
    return run_prefix


# --------------------------------------------------------------------------- reading train's output


def find_checkpoints(training_output_uri: str) -> tuple[dict[int, str], dict[int, str]]:
    """({step: uri} of complete checkpoints, {step: uri} of those without ``_COMPLETE``)."""
    base = training_output_uri.rstrip("/")
    files_by_step: dict[int, set[str]] = {}
    directories: dict[int, str] = {}
    try:
        uris = store.list_uris(training_output_uri)
    except ObjectNotFoundError as error:
        raise InputError(f"training output '{training_output_uri}' does not exist") from error
    for uri in uris:
        relative = _relative(uri, base)
        if relative is None:
            continue
        top, _, rest = relative.partition("/")
        match = CHECKPOINT_DIR.fullmatch(top)
        if match and rest:
            step = int(match.group(1))
            files_by_step.setdefault(step, set()).add(rest)
            directories[step] = store.join(training_output_uri, top)
    complete = {s: directories[s] for s, files in files_by_step.items() if COMPLETE_MARKER in files}
    incomplete = {s: directories[s] for s in files_by_step if s not in complete}
    return complete, incomplete


def _relative(uri: str, base: str) -> str | None:
    for prefix in (base, base.removeprefix("file://")):
        if uri.startswith(prefix + "/"):
            return uri[len(prefix) + 1 :]
    return None


def read_losses(checkpoint_uri: str, step: int) -> CheckpointLosses:
    """The losses in a checkpoint's ``record.json``; the step is the directory's."""
    record_uri = store.join(checkpoint_uri, RECORD_NAME)
    record = _read_json(record_uri)
    try:
        return CheckpointLosses(
            step=step,
            epoch=None if record.get("epoch") is None else int(record["epoch"]),
            train_loss_mean=_optional_float(record.get("train_loss_mean")),
            train_loss_ema=_optional_float(record.get("train_loss_ema")),
            val_loss=_optional_float(record.get("val_loss")),
            val_loss_by_timestep={
                str(t): float(v) for t, v in (record.get("val_loss_by_timestep") or {}).items()
            },
        )
    except (TypeError, ValueError, AttributeError) as error:
        raise InputError(
            f"{record_uri}: {error}; expected numbers (or null) for the losses"
        ) from error


def load_checkpoint_lora(checkpoint_uri: str) -> lora_format.LoraModules:
    """The LoRA of one checkpoint, with the alpha it was trained with."""
    config_uri = store.join(checkpoint_uri, LORA_CONFIG_NAME)
    lora_config = _read_json(config_uri)
    weights_uri = store.join(checkpoint_uri, lora_format.DIFFUSERS_WEIGHT_NAME)
    state_dict, metadata, found_format = lora_format.load_lora_state_dict(weights_uri)
    if found_format != lora_format.DIFFUSERS:
        raise LoraFormatError(
            f"'{weights_uri}' holds {found_format} keys; train writes diffusers keys"
        )
    try:
        rank, alpha = int(lora_config["rank"]), float(lora_config["alpha"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{config_uri}: needs numeric 'rank' and 'alpha' ({error})") from error
    modules = lora_format.modules_from_diffusers(state_dict, metadata, default_alpha=alpha)
    for module in modules.values():
        if module.rank != rank:
            raise LoraFormatError(
                f"'{module.source_key}' has rank {module.rank} but {config_uri} says {rank}; "
                "the checkpoint is inconsistent"
            )
    return modules


def _read_training_report(training_output_uri: str) -> dict[str, Any]:
    uri = store.join(training_output_uri, TRAINING_REPORT_NAME)
    if not store.exists(uri):
        log.warning("%s is missing; the LoRA's training metadata will say None", uri)
        return {}
    return _read_json(uri)


def _read_json(uri: str) -> dict[str, Any]:
    try:
        value = json.loads(store.read_text(uri))
    except ObjectNotFoundError as error:
        raise InputError(
            f"{uri} is missing; the checkpoint is damaged, retrain or delete it"
        ) from error
    except json.JSONDecodeError as error:
        raise InputError(f"{uri} line {error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(value, dict):
        raise InputError(f"{uri}: expected a JSON object")
    return value


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# --------------------------------------------------------------------------- metadata


def check_output_name(name: str, what: str) -> None:
    if not OUTPUT_NAME_PATTERN.fullmatch(name) or name.endswith(".safetensors"):
        raise ConfigError(
            f"{what} '{name}' is not a usable LoRA name; use letters, digits, '.', '_' or '-' "
            "without the .safetensors suffix (it becomes <lora:NAME:0.7>)"
        )
    if name == Path(lora_format.DIFFUSERS_WEIGHT_NAME).stem:
        raise ConfigError(
            f"{what} '{name}' would overwrite the diffusers file; choose another name"
        )


def _default_output_name(training_report: Mapping[str, Any]) -> str:
    name = (training_report.get("config") or {}).get("output_name") or "lora"
    check_output_name(name, f"{TRAINING_REPORT_NAME} config output_name")
    return name


def training_facts(
    training_report: Mapping[str, Any],
    modules: lora_format.LoraModules,
    losses: CheckpointLosses,
    output_name: str,
    lorapipe_metadata: Mapping[str, Any],
) -> lora_format.TrainingFacts:
    """kohya's view of the training, from train's report and the chosen checkpoint."""
    config = training_report.get("config") or {}
    ranks = sorted(module.rank for module in modules.values())
    alphas = sorted(module.alpha for module in modules.values())
    trains_text_encoder = any(name.startswith("text_encoder.") for name in modules)
    learning_rate = config.get("learning_rate")
    dataset_name = Path(str(config.get("train_data_dir") or "dataset").rstrip("/")).name
    return lora_format.TrainingFacts(
        output_name=output_name,
        network_dim=ranks[len(ranks) // 2],
        network_alpha=alphas[len(alphas) // 2],
        steps=losses.step,
        epoch=losses.epoch,
        learning_rate=learning_rate,
        unet_lr=config.get("unet_lr", learning_rate),
        text_encoder_lr=config.get("text_encoder_lr", learning_rate)
        if trains_text_encoder
        else None,
        num_train_images=training_report.get("num_train_images"),
        resolution=_resolution(training_report.get("resolution", config.get("resolution"))),
        seed=config.get("seed"),
        tag_frequency={dataset_name: dict(training_report.get("tag_frequency") or {})},
        training_started_at=_unix_seconds(training_report.get("started_at")),
        training_finished_at=_unix_seconds(training_report.get("finished_at")),
        base_model_name=_base_model_name(training_report.get("base_model")),
        lorapipe=lorapipe_metadata,
    )


def _resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, int | float):
        return int(value), int(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    return 512, 512


def _unix_seconds(iso: Any) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def _base_model_name(uri: Any) -> str | None:
    return Path(str(uri).rstrip("/")).name if uri else None


# --------------------------------------------------------------------------- report

# what selection.json holds (report.json holds these and more)
SELECTION_KEYS = (
    "rule", "metric", "epsilon", "chosen", "reason", "warnings", "checkpoints",
    "incomplete_checkpoints",
)  # fmt: skip


def _report(
    training_output_uri: str,
    output_uri: str,
    selection: Selection,
    losses: Sequence[CheckpointLosses],
    complete: Mapping[int, str],
    incomplete: Mapping[int, str],
    facts: lora_format.TrainingFacts,
    modules: lora_format.LoraModules,
) -> dict[str, Any]:
    chosen = next(c for c in losses if c.step == selection.step)
    name = facts.output_name
    return {
        "stage": "select",
        "training_output": training_output_uri,
        "output": output_uri,
        "rule": selection.rule,
        "metric": selection.metric,
        "epsilon": selection.epsilon,
        "chosen": {
            "step": selection.step,
            "checkpoint": complete[selection.step],
            "value": selection.value,
            "minimum": selection.minimum,
            "minimum_step": selection.minimum_step,
            "threshold": selection.threshold,
        },
        "reason": selection.reason,
        "warnings": list(selection.warnings),
        "checkpoints": [{**asdict(c), "within_epsilon": _within(c, selection)} for c in losses],
        "incomplete_checkpoints": [
            {"step": step, "uri": uri, "reason": f"no {COMPLETE_MARKER} marker"}
            for step, uri in sorted(incomplete.items())
        ],
        "lora": {
            "rank": facts.network_dim,
            "alpha": facts.network_alpha,
            "scale": facts.network_alpha / facts.network_dim,
            "modules": len(modules),
            "text_encoder": any(name.startswith("text_encoder.") for name in modules),
        },
        "files": {
            "diffusers": lora_format.DIFFUSERS_WEIGHT_NAME,
            "kohya": f"{name}.safetensors",
            "selection": "selection.json",
            "loss_curve": "loss_curve.png",
            "metrics": "metrics.json",
        },
        "output_name": name,
        "webui_prompt": f"<lora:{name}:{WEBUI_EXAMPLE_WEIGHT}>",
        "metrics": _flat_metrics(selection, chosen, len(complete), len(incomplete)),
    }


def _within(checkpoint: CheckpointLosses, selection: Selection) -> bool:
    value = checkpoint.value(selection.metric)
    return value is not None and value <= selection.threshold


def _flat_metrics(
    selection: Selection, chosen: CheckpointLosses, complete: int, incomplete: int
) -> dict[str, float]:
    values = {
        "selected_step": selection.step,
        "selected_val_loss": chosen.value("val_loss"),
        "selected_train_loss_ema": chosen.value("train_loss_ema"),
        "min_" + selection.metric: selection.minimum,
        "epsilon": selection.epsilon,
        "complete_checkpoints": complete,
        "incomplete_checkpoints": incomplete,
    }
    return {name: value for name, value in values.items() if value is not None}


def _kfp_metrics(values: Mapping[str, float]) -> dict[str, Any]:
    """KFP v1 UI metrics (names: lower case and dashes) and the flat dict for KFP v2."""
    return {
        "metrics": [
            {"name": name.replace("_", "-"), "numberValue": value, "format": "RAW"}
            for name, value in values.items()
        ],
        "values": dict(values),
    }


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.5g}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: the choice and why, the table behind it, the plot and how to use the files."""
    chosen_step = report["chosen"]["step"]
    lines = [
        f"# LoRA selection: checkpoint-{chosen_step}",
        "",
        f"**Rule:** {report['rule']} (epsilon = {report['epsilon']:g}).",
        "",
        f"**Why:** {report['reason']}",
        "",
    ]
    lines += [f"> warning: {warning}" for warning in report["warnings"]]
    lines += [
        "",
        "![loss curve](loss_curve.png)",
        "",
        "| step | epoch | train loss (EMA) | validation loss | within epsilon | |",
        "| ---: | ---: | ---: | ---: | :---: | --- |",
    ]
    for checkpoint in report["checkpoints"]:
        lines.append(
            f"| {checkpoint['step']} | {checkpoint['epoch'] if checkpoint['epoch'] is not None else '–'} "
            f"| {_number(checkpoint['train_loss_ema'])} | {_number(checkpoint['val_loss'])} "
            f"| {'yes' if checkpoint['within_epsilon'] else 'no'} "
            f"| {'**chosen**' if checkpoint['step'] == chosen_step else ''} |"
        )
    if report["incomplete_checkpoints"]:
        lines += [
            "",
            "Ignored (incomplete, no `_COMPLETE` marker): "
            + ", ".join(f"checkpoint-{c['step']}" for c in report["incomplete_checkpoints"]),
        ]
    lora = report["lora"]
    lines += [
        "",
        "## Files",
        "",
        f"- `{report['files']['kohya']}`: kohya format for A1111 WebUI and ComfyUI. Copy it into "
        f"WebUI's `models/Lora/` (ComfyUI: `models/loras/`) and write `{report['webui_prompt']}` "
        "in the prompt.",
        f"- `{report['files']['diffusers']}`: diffusers format, "
        '`pipe.load_lora_weights(DIR, weight_name="pytorch_lora_weights.safetensors")`.',
        f"- rank {lora['rank']}, alpha {lora['alpha']:g} (scale {lora['scale']:g}), "
        f"{lora['modules']} layers, text encoder {'trained' if lora['text_encoder'] else 'not trained'}.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- loss curve

Color = tuple[int, int, int]
INK: Color = (40, 40, 40)
GRID: Color = (228, 228, 228)
TOLERANCE_COLOR: Color = (120, 120, 120)
CHOSEN_COLOR: Color = (200, 0, 0)
TRAIN_COLOR: Color = (31, 119, 180)
VALIDATION_COLOR: Color = (230, 110, 20)
TIMESTEP_COLORS: tuple[Color, ...] = (
    (148, 103, 189), (44, 160, 44), (23, 190, 207), (140, 86, 75), (227, 119, 194),
    (127, 127, 127), (188, 189, 34),
)  # fmt: skip


@dataclass(frozen=True)
class _Series:
    label: str
    points: list[tuple[float, float]]  # (step, loss)
    color: Color
    width: int


def draw_loss_curve(
    checkpoints: Sequence[CheckpointLosses], selection: Selection, path: Path
) -> None:
    """A PNG line chart against step: validation loss per timestep (thin), EMA training loss and
    mean validation loss (thick), the tolerance line and the chosen checkpoint."""
    ordered = sorted(checkpoints, key=lambda c: c.step)

    def points(loss_of: Callable[[CheckpointLosses], float | None]) -> list[tuple[float, float]]:
        return [
            (c.step, loss)
            for c in ordered
            if (loss := loss_of(c)) is not None and math.isfinite(loss)
        ]

    timesteps = sorted({t for c in ordered for t in c.val_loss_by_timestep}, key=_timestep_order)
    series = [
        _Series(f"val t={t}", points(lambda c, t=t: c.val_loss_by_timestep.get(t)), color, 1)
        for t, color in zip(timesteps, itertools.cycle(TIMESTEP_COLORS))
    ]
    series.append(
        _Series("train loss (EMA)", points(lambda c: c.value("train_loss_ema")), TRAIN_COLOR, 3)
    )
    series.append(
        _Series("val loss (mean)", points(lambda c: c.value("val_loss")), VALIDATION_COLOR, 3)
    )
    series = [s for s in series if s.points]

    chart = _Chart(
        steps=[c.step for c in ordered],
        losses=[loss for s in series for _, loss in s.points] + [selection.threshold],
        title=f"loss by step; chosen: checkpoint-{selection.step} ({METRIC_LABELS[selection.metric]})",
    )
    for line in series:
        chart.line(line.points, line.color, line.width)
    chart.horizontal_dashed(selection.threshold, f"lowest + {selection.epsilon * 100:g}%")
    chart.mark(selection.step, selection.value, f"chosen: step {selection.step}")
    chart.legend(series)
    chart.image.save(path, format="PNG")


def _timestep_order(timestep: str) -> tuple[int, float | str]:
    try:
        return 0, float(timestep)
    except ValueError:
        return 1, timestep


class _Chart:
    """Just enough of a line chart for the loss curve, drawn with PIL (no matplotlib in the
    image)."""

    size = (1000, 560)
    left, right, top, bottom = 80, 210, 50, 60  # margins around the plot area

    def __init__(self, steps: Sequence[int], losses: Sequence[float], title: str) -> None:
        from PIL import Image, ImageDraw, ImageFont

        self.image = Image.new("RGB", self.size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default(size=14)
        self.small = ImageFont.load_default(size=12)
        self.x_ticks = _nice_ticks(min(steps), max(steps))
        self.y_ticks = _nice_ticks(min(losses), max(losses), pad=0.05)
        self.box = (self.left, self.top, self.size[0] - self.right, self.size[1] - self.bottom)
        self._axes(title)

    def xy(self, step: float, loss: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        (s0, s1), (l0, l1) = (
            (self.x_ticks[0], self.x_ticks[-1]),
            (self.y_ticks[0], self.y_ticks[-1]),
        )
        return x0 + (step - s0) / (s1 - s0) * (x1 - x0), y1 - (loss - l0) / (l1 - l0) * (y1 - y0)

    def _axes(self, title: str) -> None:
        x0, y0, x1, y1 = self.box
        for tick in self.y_ticks:
            _, y = self.xy(self.x_ticks[0], tick)
            self.draw.line([(x0, y), (x1, y)], fill=GRID)
            self.draw.text(
                (x0 - 8, y), _tick_label(tick, self.y_ticks), fill=INK, font=self.small, anchor="rm"
            )
        for tick in self.x_ticks:
            x, _ = self.xy(tick, self.y_ticks[0])
            self.draw.line([(x, y0), (x, y1)], fill=GRID)
            self.draw.text(
                (x, y1 + 8), _tick_label(tick, self.x_ticks), fill=INK, font=self.small, anchor="mt"
            )
        self.draw.rectangle([x0, y0, x1, y1], outline=INK)
        self.draw.text(((x0 + x1) / 2, y1 + 32), "step", fill=INK, font=self.font, anchor="mt")
        self.draw.text((x0, y0 - 8), "loss", fill=INK, font=self.font, anchor="lb")
        self.draw.text((self.size[0] / 2, 12), title, fill=INK, font=self.font, anchor="mt")

    def line(self, points: Sequence[tuple[float, float]], color: Color, width: int) -> None:
        pixels = [self.xy(step, loss) for step, loss in points]
        if len(pixels) > 1:
            self.draw.line(pixels, fill=color, width=width, joint="curve")
        radius = width + 1
        for x, y in pixels:
            self.draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)

    def horizontal_dashed(self, loss: float, label: str) -> None:
        x0, _, x1, _ = self.box
        _, y = self.xy(self.x_ticks[0], loss)
        for start in range(x0, x1, 12):
            self.draw.line([(start, y), (min(start + 6, x1), y)], fill=TOLERANCE_COLOR)
        self.draw.text((x1 - 4, y - 3), label, fill=TOLERANCE_COLOR, font=self.small, anchor="rb")

    def mark(self, step: float, loss: float, label: str) -> None:
        _, y0, _, y1 = self.box
        x, y = self.xy(step, loss)
        for start in range(y0, y1, 10):
            self.draw.line([(x, start), (x, min(start + 5, y1))], fill=CHOSEN_COLOR)
        self.draw.ellipse([x - 8, y - 8, x + 8, y + 8], outline=CHOSEN_COLOR, width=3)
        self.draw.text((x + 10, y0 + 6), label, fill=CHOSEN_COLOR, font=self.font, anchor="lt")

    def legend(self, series: Sequence[_Series]) -> None:
        x, y = self.box[2] + 16, self.box[1] + 8
        for entry in series:
            self.draw.line([(x, y), (x + 24, y)], fill=entry.color, width=entry.width + 1)
            self.draw.text((x + 32, y), entry.label, fill=INK, font=self.small, anchor="lm")
            y += 22
        self.draw.line([(x, y), (x + 6, y)], fill=TOLERANCE_COLOR)
        self.draw.line([(x + 12, y), (x + 18, y)], fill=TOLERANCE_COLOR)
        self.draw.text((x + 32, y), "tolerance", fill=INK, font=self.small, anchor="lm")
        y += 22
        self.draw.ellipse([x + 6, y - 6, x + 18, y + 6], outline=CHOSEN_COLOR, width=3)
        self.draw.text((x + 32, y), "chosen", fill=INK, font=self.small, anchor="lm")


def _nice_ticks(low: float, high: float, *, pad: float = 0.0, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^n) covering [low, high] widened by
    ``pad`` of its span; a single value gets a span around it."""
    span = high - low
    if span <= 1e-12 * max(1.0, abs(high)):
        span = max(abs(high) * 0.1, 1.0)
        low, high = low - span / 2, high + span / 2
    low, high = low - pad * span, high + pad * span
    raw_step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    ticks = [math.floor(low / step) * step]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(ticks[-1] + step)
    return ticks


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    """``value`` with as many decimals as the tick spacing needs."""
    step = ticks[1] - ticks[0]
    decimals = 0
    while abs(round(step, decimals) - step) > step * 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("training_output", help="train's output directory (local or s3://)")
    parser.add_argument("--out", required=True, help="where to write the LoRA files and report")
    parser.add_argument("--config", help="YAML file of the options below")
    config_options.add_arguments(parser, SelectConfig)


def main(args: argparse.Namespace) -> int:
    config = config_options.load(
        SelectConfig, args.config, config_options.overrides_from_args(args, SelectConfig)
    )
    report = run(args.training_output, args.out, config)
    print(report["reason"])
    print(f"wrote {store.join(args.out, report['files']['kohya'])} (use {report['webui_prompt']})")
    print(f"wrote {store.join(args.out, report['files']['diffusers'])}")
    if config.publish_uri:
        print(f"published {report['published']}")
    return 0
