"""What each Kubeflow component hands to its stage: artifacts as paths, parameters as config.

A KFP component (``components/``) calls one of these. Each maps the component's parameters,
which carry the stage's config key names, onto the stage's config (checked by the one config
mechanism, ``lorapipe.config``), calls the stage's ``run`` exactly as ``lorapipe <stage>`` does,
writes the stage's page (``lorapipe.report``) as the component's ``HTML`` artifact and returns
the numbers the KFP UI shows; the last step, :func:`run_report`, writes the whole run's page. Nothing here decides anything a CLI user could not get: publishing, the
multi-node TrainJob and the LoRA-tag rule belong to the stages.

Every step runs as :func:`pipeline_task`: its output is scrubbed of credentials as the CLI's is,
and a retried pod takes over the outputs its killed predecessor still holds (an S3 lease lives
on for ``LORAPIPE_LEASE_TTL`` after its holder died), since a task's outputs are its own run's
and only earlier attempts of it can hold them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from lorapipe import config, writer_lock
from lorapipe.errors import ConfigError, TrainingError
from lorapipe.redaction import redacted_output

Metrics = dict[str, float]
P = ParamSpec("P")
R = TypeVar("R")


def pipeline_task(step: Callable[P, R]) -> Callable[P, R]:
    """Run ``step`` with redacted output, taking over its outputs from earlier attempts of
    the same task."""

    @functools.wraps(step)
    def attempt(*args: P.args, **kwargs: P.kwargs) -> R:
        with redacted_output(), writer_lock.taking_over():
            return step(*args, **kwargs)

    return attempt


@pipeline_task
def fingerprint(
    output_path: str,
    report_path: str,
    *,
    uris: Mapping[str, str],
    settings: Mapping[str, Any],
    publish_uri: str = "",
    force_retrain: bool = False,
) -> dict[str, Any]:
    """Fingerprint the run's inputs and decide whether it trains (``lorapipe.retraining``);
    the digests for the data stages' cache keys, the decision and the UI's numbers."""
    from lorapipe.retraining import check_inputs

    Path(output_path).mkdir(parents=True, exist_ok=True)
    report = check_inputs(
        output_path, uris, settings, publish_uri=publish_uri, force_retrain=force_retrain
    )
    _write_page("fingerprint", output_path, report_path)
    found = report["fingerprint"]
    inputs = found["inputs"].values()
    values = {
        "retrain": int(report["retrain"]),
        "files": sum(entry["files"] for entry in inputs),
        "bytes": sum(entry["bytes"] for entry in inputs),
    }
    return {
        "retrain": report["retrain"],
        "reason": report["reason"],
        "run": found["run"],
        "data": found["data"],
        "tagger": found["tagger"],
        "metrics": metrics_for_kfp(values),
    }


@pipeline_task
def ingest(
    data_uri: str,
    dataset_path: str,
    report_path: str,
    *,
    metadata_uri: str = "",
    min_size: int = 512,
    quality: str = "report",
) -> Metrics:
    """Decode and clean the raw images at ``data_uri`` into the dataset at ``dataset_path``."""
    from lorapipe.stages import ingest as stage

    values = {"metadata": metadata_uri or None, "min_size": min_size, "quality": quality}
    settings = _from_parameters(stage.IngestConfig, values, {"metadata": "metadata_uri"})
    report = stage.run(_required("data_uri", data_uri), dataset_path, settings)
    _write_page("ingest", dataset_path, report_path)
    return metrics_for_kfp(stage.metrics(report))


@pipeline_task
def tag(
    dataset_path: str,
    output_path: str,
    report_path: str,
    *,
    tagger_uri: str,
    threshold: float = 0.5,
    trigger_word: str = "",
    merge: str = "keep",
    defects: str = "caption",
) -> Metrics:
    """Tag the dataset with the DeepDanbooru project at ``tagger_uri``."""
    from lorapipe.stages import tag as stage

    values = {
        "project": _required("tagger_uri", tagger_uri),
        "threshold": threshold,
        "trigger_word": trigger_word,
        "merge": merge,
        "defects": defects,
    }
    settings = _from_parameters(stage.TagConfig, values, {"project": "tagger_uri"})
    report = stage.run(dataset_path, output_path, settings)
    _write_page("tag", output_path, report_path)
    return metrics_for_kfp(stage.metrics(report))


@pipeline_task
def augment(dataset_path: str, output_path: str, report_path: str) -> Metrics:
    """Add mirrored copies (captions rewritten left <-> right)."""
    from lorapipe.stages import augment as stage

    report = stage.run(dataset_path, output_path, stage.AugmentConfig())
    _write_page("augment", output_path, report_path)
    return metrics_for_kfp(stage.metrics(report))


@pipeline_task
def plan_sweep(training_config: str, sweep: str) -> list[dict[str, str]]:
    """The trainings of the pipeline's ``sweep`` over ``training_config`` (``lorapipe.sweep``),
    refused in one line when a run's config is wrong or the runs' losses would not compare.
    Each run's config is the base config's keys with its overrides, as YAML (one line of
    JSON); without a sweep, one run of ``training_config`` as given, with no name."""
    import yaml

    from lorapipe import sweep as sweeps
    from lorapipe.train_config import load_config_text

    overrides = sweeps.parse_sweep(sweep)
    if overrides == [{}]:
        return [{"run_name": "", "training_config": training_config, "overrides": "{}"}]
    base_values = yaml.safe_load(training_config) or {}
    runs = sweeps.plan_sweep(
        load_config_text(training_config), overrides, "pipeline parameter sweep"
    )
    return [
        {
            "run_name": run.name,
            "training_config": json.dumps({**base_values, **run.overrides}),
            "overrides": json.dumps(run.overrides),
        }
        for run in runs
    ]


@pipeline_task
def train(
    dataset_path: str,
    training_path: str,
    report_path: str,
    *,
    base_model_uri: str,
    training_config: str,
    num_gpus: int = 1,
    checkpoint_mirror_uri: str = "",
    run_id: str = "",
    num_nodes: int = 1,
    trainer_image: str = "",
    publish_uri: str = "",
    sweep_run: str = "",
    sweep_overrides: str = "{}",
) -> Metrics:
    """Train with the user's YAML config; the pipeline decides data, model and output.

    Checkpoints go to ``checkpoint_mirror_uri/<run_id>/`` and training resumes from the newest
    complete one there, so a retried pod continues instead of starting over. ``num_gpus`` are
    the pod's (one process each; on a node with none, one CPU process), or each node's with
    ``num_nodes`` > 1. The LoRA published at ``publish_uri`` is measured on this run's
    validation images (train's ``compare_with``), for select's promotion rule. A run of a
    sweep (``sweep_run``, from :func:`plan_sweep`) has a run id and checkpoint folder of its
    own, and its name and overrides are recorded beside its training report for select.
    """
    from lorapipe.checkpoint_layout import SWEEP_RUN_NAME
    from lorapipe.stages import train as stage
    from lorapipe.train_config import load_config_text

    pipeline_keys = {
        "train_data_dir": dataset_path,
        "metadata_path": "",
        "base_model": _required("base_model_uri", base_model_uri),
        "output_dir": training_path,
        "log_dir": "",
        "checkpoint_mirror": checkpoint_mirror_uri,
        "run_id": f"{run_id}-{sweep_run}" if sweep_run and run_id else run_id,
        "resume": "latest",
        "num_processes": num_gpus if num_nodes > 1 else stage.processes_for_gpus(num_gpus),
        "num_nodes": num_nodes,
        "trainer_image": trainer_image,
        "compare_with": publish_uri,
    }
    settings = load_config_text(training_config, pipeline_keys)
    if stage.train(settings) != 0:
        raise TrainingError(
            f"training in {settings.num_processes} processes failed; the first error is in the "
            "log above. A retry resumes from the last mirrored checkpoint"
        )
    if sweep_run:
        record = {"name": sweep_run, "overrides": json.loads(sweep_overrides)}
        Path(training_path, SWEEP_RUN_NAME).write_text(json.dumps(record) + "\n")
    _write_page("train", training_path, report_path)
    return metrics_for_kfp(stage.metrics(training_path))


@pipeline_task
def select(
    training_paths: Sequence[str],
    lora_path: str,
    report_path: str,
    *,
    epsilon: float = 0.01,
    publish_uri: str = "",
    run_id: str = "",
    promote: str = "better",
    promotion_epsilon: float = -1.0,
    fingerprint: str = "",
) -> Metrics:
    """Pick the checkpoint (of the best run, when a sweep trained several), write both LoRA
    formats; publish them under ``publish_uri``, moving latest.json only to a LoRA that is
    promoted. A negative ``promotion_epsilon`` is ``epsilon``'s (a KFP parameter cannot
    default to None: ``kfp.local`` refuses it)."""
    from lorapipe.stages import select as stage

    values = {
        "epsilon": epsilon,
        "publish_uri": publish_uri,
        "pipeline_run_id": run_id,
        "promote": promote,
        "promotion_epsilon": promotion_epsilon if promotion_epsilon >= 0 else None,
        "fingerprint": fingerprint,
    }
    settings = _from_parameters(stage.SelectConfig, values)
    report = stage.run(list(training_paths), lora_path, settings)
    _write_page("select", lora_path, report_path)
    return metrics_for_kfp(report["metrics"])


@pipeline_task
def generate(
    base_model_uri: str,
    lora_path: str,
    output_path: str,
    html_path: str,
    *,
    prompts: Sequence[str],
    negative_presets: Sequence[str],
    lora_scales: Sequence[float],
    cfg_scales: Sequence[float],
    seeds: Sequence[int],
    steps: int = 20,
    job_yaml: str = "",
) -> Metrics:
    """The grid prompts x negative presets x LoRA scales x CFG scales x seeds with the LoRA
    ``select`` chose (every prompt uses it); ``job_yaml`` may set any other generate key."""
    from lorapipe.stages import generate as stage

    values: dict[str, Any] = stage.job_values_from_text(job_yaml, "job_yaml")
    values.update(
        prompts=list(prompts),
        negative_presets=list(negative_presets),
        lora_scales=[float(scale) for scale in lora_scales] or None,
        cfg_scales=[float(scale) for scale in cfg_scales],
        seeds=[int(seed) for seed in seeds],
        steps=steps,
        trained_lora=lora_path,
    )
    settings = _from_parameters(stage.GenerateConfig, values)
    report = stage.run(base_model_uri, output_path, settings)
    _write_page("generate", output_path, html_path)
    return metrics_for_kfp(
        {"images": report["images"], "images_per_second": report["images_per_second"]}
    )


def _from_parameters(
    config_class: type, values: Mapping[str, Any], renamed: Mapping[str, str] | None = None
) -> Any:
    """The stage's config from pipeline parameters; an error names the parameter."""
    renamed = renamed or {}
    origins = {key: f"pipeline parameter {renamed.get(key, key)}" for key in values}
    return config.from_mapping(config_class, values, origins)


def _write_page(stage: str, stage_output: str, report_path: str) -> None:
    """The stage's page as the component's HTML artifact, which the KFP UI shows alone: every
    picture is embedded, nothing links to files beside it."""
    from lorapipe.report.run_report import stage_page

    Path(report_path).write_text(stage_page(stage, stage_output), encoding="utf-8")


@pipeline_task
def run_report(
    report_path: str,
    *,
    inputs: str,
    ingested: str,
    dataset: str,
    augmented: str,
    trainings: Sequence[str],
    lora: str,
    images: str,
) -> None:
    """The whole run on one page, the pipeline's last HTML artifact. ``dataset`` is what
    augment read: the tagged dataset, or ``ingested`` itself when no tagger ran; ``inputs`` is
    the fingerprint step's output. Of a sweep's trainings, the page shows the winner's."""
    from lorapipe.report.run_report import StageOutputs, run_page
    from lorapipe.report.sections import read_report

    tagged = dataset if read_report(dataset).get("stage") == "tag" else None
    training = winning_training(trainings, read_report(lora))
    outputs = StageOutputs(ingested, tagged, augmented, training, lora, images, inputs)
    Path(report_path).write_text(run_page(outputs), encoding="utf-8")


def winning_training(trainings: Sequence[str], selection: Mapping[str, Any]) -> str:
    """The training select chose from (by the run name each train step recorded)."""
    from lorapipe.checkpoint_layout import SWEEP_RUN_NAME

    winner = (selection.get("winner") or {}).get("name")
    for path in trainings:
        record = Path(path, SWEEP_RUN_NAME)
        if winner and record.is_file() and json.loads(record.read_text())["name"] == winner:
            return path
    return trainings[0]


def _required(key: str, value: str) -> str:
    if not value:
        raise ConfigError(f"pipeline parameter {key} is empty; give a local path or s3:// URI")
    return value


def metrics_for_kfp(values: Mapping[str, Any]) -> Metrics:
    """Only the numbers: the KFP UI shows a metric per (name, float)."""
    return {
        name: float(value)
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
