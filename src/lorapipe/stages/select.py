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
- ``<output_name>.safetensors``: kohya format with kohya's key names and metadata for the base
  model's family (``model_family`` in ``training_report.json``, SD 1.x when absent), for A1111
  WebUI's ``models/Lora`` (prompt ``<lora:output_name:0.7>``) and ComfyUI's ``models/loras``
- ``selection.json``: the rule, every checkpoint's losses, the choice and why
- ``loss_curve.png``: training EMA and validation loss per timestep against step, choice marked
- ``metrics.json``: ``{"metrics": [...]}`` as the KFP v1 UI reads it, plus ``"values"``, a flat
  ``{name: number}`` for KFP v2's ``Metrics.log_metric``
- ``report.json`` / ``report.md``

Several training outputs, or a sweep folder (``lorapipe sweep``'s, with ``sweep.json``), are
runs of different configs: :mod:`lorapipe.stages.select_runs` refuses runs whose validation
losses do not compare, applies the rule across them (``selection_rule.ACROSS_RUNS_RULE``: the
earliest checkpoint of any run within epsilon of the lowest validation loss of all; ties to
the smaller LoRA rank, then the fewer training steps) and exports the winner's checkpoint as
above. ``selection.json`` and the report then also rank the runs (``runs``, ``winner``,
``failed_runs``), ``runs_loss.png`` draws every run's validation loss, and the LoRA's metadata
names the winning run and its overrides (``lorapipe.sweep_run``, ``lorapipe.sweep_overrides``).

With ``publish_uri``, the LoRA is also published there (:mod:`lorapipe.publication`): always
under its run id, and ``latest.json`` moves to it only when it is promoted, i.e. with
``promote: better`` when its validation loss is not worse than the published LoRA's (measured
by train on this run's validation images) by more than ``promotion_epsilon``. The decision and
the publish folder's history are in ``selection.json`` (``promotion``, ``history``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from lorapipe import config as config_options
from lorapipe import kohya_names, lora_format, outputs, publication, store
from lorapipe.charts import draw_loss_curve, draw_runs_validation_loss
from lorapipe.checkpoint_layout import (
    COMPLETE_MARKER,
    LORA_CONFIG_NAME,
    SAMPLES_DIR,
    TRAINING_REPORT_NAME,
    CheckpointLosses,
    checkpoint_name,
    read_json,
    read_published_validation,
    read_samples,
)
from lorapipe.config import Where, option
from lorapipe.errors import ConfigError, InputError, LoraFormatError, ModelError, StorageError
from lorapipe.models.families import SD1, ModelFamily, family_named
from lorapipe.selection_rule import (
    DEFAULT_EPSILON,
    METRICS,
    Selection,
    choose_checkpoint,
)
from lorapipe.stages import select_runs
from lorapipe.training.buckets import kohya_bucket_info

log = logging.getLogger(__name__)

# an older select output (or nothing) at --out is replaced, anything else refused
OUTPUT_KIND = outputs.OutputKind(
    name="a lorapipe select output", markers=("selection.json", "report.json"), error=ConfigError
)
OUTPUT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
WEBUI_EXAMPLE_WEIGHT = 0.7


@dataclass
class SelectConfig:
    """How ``lorapipe select`` chooses, names and publishes the LoRA."""

    COMMAND: ClassVar[str] = "select"

    epsilon: float = option(
        DEFAULT_EPSILON,
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
        help="also copy the LoRA files to `<publish_uri>/<pipeline_run_id>/`, then point "
        "`<publish_uri>/latest.json` at them if they are promoted (`promote`); local or "
        "`s3://`; empty: no publishing",
    )
    promote: str = option(
        "better",
        help="when a published LoRA moves `latest.json` to the new one: `better` (its "
        "validation loss, on this run's validation images, is not worse than the published "
        "LoRA's by more than promotion_epsilon; train measures the published one, its "
        "`compare_with` key) or `always`",
        choices=publication.PROMOTE_CHOICES,
    )
    promotion_epsilon: float | None = option(
        None,
        help="relative tolerance of `promote: better`: promoted when the new validation loss "
        "<= the published LoRA's x (1 + promotion_epsilon)",
        default_text="epsilon",
        minimum=0,
    )
    fingerprint: str = option(
        "",
        help="the run's input fingerprint (`lorapipe fingerprint`), recorded in `latest.json` "
        "so that a scheduled run on the same inputs trains nothing",
    )

    def validate(self, where: Where | None = None) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ConfigError(f"epsilon {self.epsilon} must be a number >= 0, e.g. 0.01 for 1%")
        if self.metric not in METRICS:
            raise ConfigError(f"metric '{self.metric}' is unknown; use one of {', '.join(METRICS)}")
        if self.output_name is not None:
            check_output_name(self.output_name, "output_name")
        if self.promote not in publication.PROMOTE_CHOICES:
            raise ConfigError(
                f"promote '{self.promote}' is unknown; use "
                f"{' or '.join(publication.PROMOTE_CHOICES)}"
            )
        epsilon = self.promotion_epsilon
        if epsilon is not None and not (math.isfinite(epsilon) and epsilon >= 0):
            raise ConfigError(
                f"promotion_epsilon {epsilon} must be a number >= 0, e.g. 0.01 for 1%"
            )


def run(
    training_output_uri: str | Sequence[str],
    output_uri: str,
    config: SelectConfig | None = None,
) -> dict:
    """Choose a checkpoint of ``training_output_uri`` (given several training outputs or a
    sweep folder: a run and its checkpoint, ``select_runs``) and write the LoRA files,
    selection, plots, metrics and report to ``output_uri``; return the report."""
    config = config or SelectConfig()
    config.validate()
    sources = select_runs.resolve_sources(training_output_uri)
    if not sources.ranked:
        trained = select_runs.read_training_output(sources.runs[0].output)
        selection = choose_checkpoint(trained.losses, epsilon=config.epsilon, metric=config.metric)
        return _export(trained, selection, output_uri, config)
    ranking = select_runs.rank_runs(sources, epsilon=config.epsilon, metric=config.metric)
    return _export(ranking.winner_output, ranking.choice.selection, output_uri, config, ranking)


def _export(
    trained: select_runs.TrainingOutput,
    selection: Selection,
    output_uri: str,
    config: SelectConfig,
    ranking: select_runs.Ranking | None = None,
) -> dict:
    """Write the chosen checkpoint of ``trained`` in both formats with its report (and the
    ranking of the runs, when there were several), publish it with ``publish_uri``; the
    report."""
    if trained.incomplete:
        log.warning(
            "ignoring incomplete checkpoints (no %s): %s", COMPLETE_MARKER, trained.incomplete
        )
    for warning in selection.warnings:
        log.warning(warning)
    if not trained.report:
        log.warning(
            "%s is missing; the LoRA's training metadata will say None",
            store.join(trained.uri, TRAINING_REPORT_NAME),
        )

    chosen = next(c for c in trained.losses if c.step == selection.step)
    modules = load_checkpoint_lora(trained.complete[selection.step])
    training_report = trained.report
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
        **(select_runs.lorapipe_metadata(ranking) if ranking else {}),
    }
    facts = training_facts(training_report, modules, chosen, output_name, lorapipe_metadata)
    report = _report(trained, output_uri, selection, facts, modules)
    if ranking is not None:
        report.update(select_runs.report_entries(ranking))
        report["files"]["runs_loss"] = select_runs.RUNS_CHART_NAME
        report["metrics"].update(select_runs.metrics(ranking))
    samples = checkpoint_samples(trained.complete, selection.step)
    report.update(samples=[row.report_row() for row in samples], sample_prompts=_prompts(samples))

    with (
        outputs.staged_output(output_uri, OUTPUT_KIND) as staging,
        _publishing(config.publish_uri) as published,
    ):
        if published is not None:
            record = published.record(
                _candidate(config, selection, chosen, training_report),
                read_published_validation(trained.uri),
                promote=config.promote,
                epsilon=_promotion_epsilon(config),
            )
            report.update(promotion=asdict(record), history=published.history(record))
            report["metrics"].update(_promotion_metrics(record))
        lora_format.save_diffusers(
            staging / report["files"]["diffusers"],
            modules,
            {f"lorapipe.{key}": str(value) for key, value in lorapipe_metadata.items()},
        )
        lora_format.save_kohya(
            staging / report["files"]["kohya"],
            modules,
            lora_format.kohya_metadata(facts),
            family=facts.family,
            unet_config=_base_unet_config(training_report, facts.family),
        )
        draw_loss_curve(trained.losses, selection, staging / report["files"]["loss_curve"])
        if ranking is not None:
            chart = draw_runs_validation_loss(ranking.choice)
            (staging / report["files"]["runs_loss"]).write_bytes(chart)
        for row in samples:
            row.copy_into(staging)
        _write_json(
            staging / report["files"]["selection"],
            {key: report[key] for key in SELECTION_KEYS if key in report},
        )
        _write_json(staging / report["files"]["metrics"], _kfp_metrics(report["metrics"]))
        _write_json(staging / "report.json", report)
        (staging / "report.md").write_text(render_markdown(report))
        if published is not None:
            report["published"] = published.publish(staging, record)
    log.info("selected %s: %s", checkpoint_name(selection.step), selection.reason)
    return report


@contextlib.contextmanager
def _publishing(publish_uri: str) -> Iterator[publication.Publication | None]:
    """The publish folder held for the block (None without ``publish_uri``)."""
    if not publish_uri:
        yield None
        return
    with publication.publishing(publish_uri) as published:
        yield published


def _candidate(
    config: SelectConfig,
    selection: Selection,
    chosen: CheckpointLosses,
    training_report: Mapping[str, Any],
) -> publication.Candidate:
    return publication.Candidate(
        run_id=config.pipeline_run_id,
        fingerprint=config.fingerprint,
        checkpoint_step=selection.step,
        val_loss=chosen.val_loss,
        base_model_hash=training_report.get("base_model_hash"),
    )


def _promotion_epsilon(config: SelectConfig) -> float:
    return config.epsilon if config.promotion_epsilon is None else config.promotion_epsilon


def _promotion_metrics(record: publication.RunRecord) -> dict[str, float]:
    values = {"promoted": float(record.promoted), "published_val_loss": record.compared_val_loss}
    if record.margin is not None:
        values["val_loss_vs_published"] = record.margin
    return {name: value for name, value in values.items() if value is not None}


# --------------------------------------------------------------------------- reading train's output


def load_checkpoint_lora(checkpoint_uri: str) -> lora_format.LoraModules:
    """The LoRA of one checkpoint, with the alpha it was trained with."""
    config_uri = store.join(checkpoint_uri, LORA_CONFIG_NAME)
    lora_config = read_json(config_uri)
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


def _model_family(training_report: Mapping[str, Any]) -> ModelFamily:
    """The base model's family as train reports it (``model_family``; SD 1.x when absent)."""
    name = training_report.get("model_family", SD1.name)
    try:
        return family_named(str(name))
    except ModelError as error:
        raise InputError(
            f"{TRAINING_REPORT_NAME}: model_family '{name}' is not one lorapipe exports "
            "(sd1, sd2, sdxl); fix the report or retrain"
        ) from error


def _base_unet_config(
    training_report: Mapping[str, Any], family: ModelFamily
) -> dict[str, Any] | None:
    """The base model's ``unet/config.json`` where the family's kohya names number the UNet's
    blocks by its layout (SDXL); None where they do not, or where the base model cannot be read
    from here (then SDXL base's layout numbers them, as it does every SDXL fine-tune)."""
    base_model = training_report.get("base_model")
    if not kohya_names.numbers_unet_blocks(family) or not base_model:
        return None
    uri = store.join(str(base_model), "unet", "config.json")
    try:
        if store.exists(uri):
            return read_json(uri)
        reason = "it does not exist"
    except (StorageError, InputError) as error:
        reason = str(error)
    log.warning(
        "%s is not readable here (%s); the kohya file numbers the UNet's blocks as SDXL base's",
        uri,
        reason,
    )
    return None


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
    trains_text_encoder = any(name.startswith("text_encoder") for name in modules)
    family = _model_family(training_report)
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
        resolution=_resolution(
            training_report.get("resolution", config.get("resolution")), family.default_resolution
        ),
        enable_bucket=bool(training_report.get("enable_bucket")),
        min_bucket_reso=training_report.get("min_bucket_reso"),
        max_bucket_reso=training_report.get("max_bucket_reso"),
        bucket_no_upscale=bool(training_report.get("bucket_no_upscale")),
        prediction_type=str(training_report.get("prediction_type") or "epsilon"),
        bucket_info=kohya_bucket_info(training_report),
        seed=config.get("seed"),
        tag_frequency={dataset_name: dict(training_report.get("tag_frequency") or {})},
        training_started_at=_unix_seconds(training_report.get("started_at")),
        training_finished_at=_unix_seconds(training_report.get("finished_at")),
        base_model_name=_base_model_name(training_report.get("base_model")),
        family=family,
        lorapipe=lorapipe_metadata,
    )


def _resolution(value: Any, default: int) -> tuple[int, int]:
    if isinstance(value, int | float):
        return int(value), int(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    return default, default


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
    "incomplete_checkpoints", "runs", "winner", "failed_runs", "promotion", "history",
)  # fmt: skip


def _report(
    trained: select_runs.TrainingOutput,
    output_uri: str,
    selection: Selection,
    facts: lora_format.TrainingFacts,
    modules: lora_format.LoraModules,
) -> dict[str, Any]:
    losses, complete, incomplete = trained.losses, trained.complete, trained.incomplete
    chosen = next(c for c in losses if c.step == selection.step)
    name = facts.output_name
    return {
        "stage": "select",
        "training_output": trained.uri,
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
            "text_encoder": any(name.startswith("text_encoder") for name in modules),
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


@dataclass(frozen=True)
class CheckpointSamples:
    """The samples training rendered at one checkpoint, to show beside the loss curve."""

    step: int
    chosen: bool
    checkpoint_uri: str
    samples: list[dict[str, Any]]  # samples.json's entries

    @property
    def folder(self) -> str:
        """Where select's output keeps them: ``samples/checkpoint-<step>/``."""
        return f"{SAMPLES_DIR}/{checkpoint_name(self.step)}"

    def report_row(self) -> dict[str, Any]:
        files = [{**sample, "file": f"{self.folder}/{sample['file']}"} for sample in self.samples]
        return {"step": self.step, "chosen": self.chosen, "files": files}

    def copy_into(self, staging: Path) -> None:
        folder = staging / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        for sample in self.samples:
            source = store.join(self.checkpoint_uri, SAMPLES_DIR, sample["file"])
            (folder / sample["file"]).write_bytes(store.read_bytes(source))


def checkpoint_samples(complete: Mapping[int, str], chosen_step: int) -> list[CheckpointSamples]:
    """Every complete checkpoint's samples (``samples/samples.json``), by step; checkpoints
    training rendered none at are left out."""
    rows = []
    for step, uri in sorted(complete.items()):
        index = read_samples(uri)
        if index and index.get("samples"):
            rows.append(CheckpointSamples(step, step == chosen_step, uri, index["samples"]))
    return rows


def _prompts(samples: Sequence[CheckpointSamples]) -> list[str]:
    """The sample prompts in prompt order, as the newest checkpoint rendered them."""
    if not samples:
        return []
    by_index = {sample["prompt_index"]: sample["prompt"] for sample in samples[-1].samples}
    return [by_index[index] for index in sorted(by_index)]


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
    winner = f"{report['winner']['name']} " if "winner" in report else ""
    lines = [
        f"# LoRA selection: {winner}{checkpoint_name(chosen_step)}",
        "",
        f"**Rule:** {report['rule']} (epsilon = {report['epsilon']:g}).",
        "",
        f"**Why:** {report['reason']}",
        "",
    ]
    lines += [f"> warning: {warning}" for warning in report["warnings"]]
    if "runs" in report:
        lines += ["", *select_runs.markdown_lines(report), f"## The winner: {winner.strip()}"]
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
            f"Ignored (incomplete, no `{COMPLETE_MARKER}` marker): "
            + ", ".join(checkpoint_name(c["step"]) for c in report["incomplete_checkpoints"]),
        ]
    if report.get("samples"):
        lines += ["", "## Samples at each checkpoint", ""]
        lines += [f"- prompt {i}: {prompt}" for i, prompt in enumerate(report["sample_prompts"], 1)]
        for row in report["samples"]:
            images = " ".join(
                f"![{checkpoint_name(row['step'])} seed {sample['seed']}]({sample['file']})"
                for sample in row["files"]
            )
            mark = " **chosen**" if row["chosen"] else ""
            lines += ["", f"{checkpoint_name(row['step'])}{mark}: {images}"]
    if promotion := report.get("promotion"):
        verdict = "promoted" if promotion["promoted"] else "not promoted"
        lines += ["", "## Publishing", "", f"**{verdict.capitalize()}:** {promotion['reason']}."]
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


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "training_output",
        nargs="+",
        help="train's output directory (local or s3://); several, or a sweep folder "
        "(`lorapipe sweep`'s, with sweep.json): the runs are ranked and the winner's LoRA ships",
    )
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
    if promotion := report.get("promotion"):
        verdict = "promoted" if promotion["promoted"] else "not promoted"
        print(f"published {promotion['uri']} ({verdict}: {promotion['reason']})")
    return 0
