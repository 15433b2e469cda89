"""What each Kubeflow component does, as plain functions over paths and strings.

A KFP component (``components/``) only maps its artifacts to local paths and calls one of these;
everything it decides (which config wins, where checkpoints are mirrored, which LoRA file the
grid uses, which numbers the KFP UI shows) lives here, where tests run it without KFP.

Every step returns the metrics the component logs to its ``Metrics`` artifact (name -> number)
and copies the stage's ``report.md`` to the component's ``Markdown`` artifact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lorapipe import store
from lorapipe.errors import ConfigError, InputError, TrainingError

log = logging.getLogger(__name__)

Metrics = dict[str, float]


def ingest(
    input_uri: str,
    dataset_path: str,
    report_path: str,
    *,
    metadata_uri: str = "",
    min_size: int = 512,
) -> Metrics:
    """Decode and clean the raw images at ``input_uri`` into the dataset at ``dataset_path``."""
    from lorapipe.stages import ingest as stage

    config = stage.IngestConfig(min_size=min_size, metadata=metadata_uri or None)
    report = stage.run(_required("input_uri", input_uri), dataset_path, config)
    _copy_report(dataset_path, report_path)
    return {"images_kept": report["kept"], "images_dropped": report["dropped"]}


def tag(
    dataset_path: str,
    output_path: str,
    report_path: str,
    *,
    tagger_uri: str,
    threshold: float = 0.5,
    trigger_word: str = "",
    merge: str = "keep",
) -> Metrics:
    """Tag the dataset with the DeepDanbooru project at ``tagger_uri``."""
    from lorapipe.stages import tag as stage

    config = stage.TagConfig(
        project=_required("tagger_uri", tagger_uri),
        threshold=threshold,
        trigger_word=trigger_word,
        merge=merge,
    )
    report = stage.run(dataset_path, output_path, config)
    _copy_report(output_path, report_path)
    return {"images_tagged": report["rows"], "distinct_tags": len(report["tag_frequency"])}


def augment(dataset_path: str, output_path: str, report_path: str) -> Metrics:
    """Add mirrored copies (captions rewritten left <-> right)."""
    from lorapipe.stages import augment as stage

    report = stage.run(dataset_path, output_path)
    _copy_report(output_path, report_path)
    return {"images_mirrored": report["mirrored"], "images_out": report["output_rows"]}


def train(
    dataset_path: str,
    training_path: str,
    *,
    base_model_uri: str,
    config_yaml: str,
    num_gpus: int = 1,
    checkpoint_mirror_uri: str = "",
    run_id: str = "",
    num_nodes: int = 1,
    trainer_image: str = "",
) -> Metrics:
    """Train with the user's YAML config; the pipeline decides data, model and output.

    Checkpoints are mirrored to ``checkpoint_mirror_uri/<run_id>/`` and training resumes from
    the newest complete one there, so a retried pod (preempted node, OOM-killed) continues
    instead of starting over, and two runs never share checkpoints. With ``num_nodes`` > 1
    the training runs as a Kubeflow Trainer TrainJob (see ``train_on_nodes``).
    """
    if num_nodes > 1:
        return train_on_nodes(
            dataset_path,
            training_path,
            base_model_uri=base_model_uri,
            config_yaml=config_yaml,
            gpus_per_node=num_gpus,
            num_nodes=num_nodes,
            checkpoint_mirror_uri=checkpoint_mirror_uri,
            run_id=run_id,
            trainer_image=trainer_image,
        )
    import torch

    from lorapipe.stages import train as stage

    num_processes = min(max(num_gpus, 1), torch.cuda.device_count()) or 1
    overrides = {
        "train_data_dir": dataset_path,
        "metadata_path": "",
        "base_model": _required("base_model_uri", base_model_uri),
        "output_dir": training_path,
        "log_dir": "",
        "checkpoint_mirror": (
            store.join(checkpoint_mirror_uri, _safe_run_id(run_id)) if checkpoint_mirror_uri else ""
        ),
        "resume": "latest",
        "num_processes": num_processes,
    }
    config = _training_config(config_yaml, overrides)
    if num_processes > 1:
        if stage.launch(config) != 0:
            raise TrainingError(
                f"training in {num_processes} processes failed; the first error is in the log "
                "above. A retry resumes from the last mirrored checkpoint"
            )
    else:
        stage.run(dataset_path, training_path, config)
    return _training_metrics(training_path)


def train_on_nodes(
    dataset_path: str,
    training_path: str,
    *,
    base_model_uri: str,
    config_yaml: str,
    gpus_per_node: int,
    num_nodes: int,
    checkpoint_mirror_uri: str,
    run_id: str,
    trainer_image: str,
) -> Metrics:
    """Multi-node training: the nodes share only S3, so the dataset and the resolved config go
    to ``checkpoint_mirror_uri/<run_id>/``, a TrainJob trains into ``.../training``, and its
    output comes back as this step's artifact for select."""
    from lorapipe import trainjob

    if not store.is_s3(checkpoint_mirror_uri):
        raise ConfigError(
            f"num_nodes {num_nodes} needs checkpoint_mirror_uri on S3 (got "
            f"'{checkpoint_mirror_uri}'): the nodes share data and checkpoints only through it"
        )
    if not trainer_image:
        raise ConfigError("num_nodes > 1 needs trainer_image, the torch image the nodes run")
    work = store.join(checkpoint_mirror_uri, _safe_run_id(run_id))
    dataset_uri = store.join(work, "dataset")
    if not store.is_complete(dataset_uri):
        store.put_dir(dataset_path, dataset_uri)
    output_uri = store.join(work, "training")
    overrides = {
        "train_data_dir": dataset_uri,
        "metadata_path": "",
        "base_model": _required("base_model_uri", base_model_uri),
        "output_dir": output_uri,
        "log_dir": "",
        "checkpoint_mirror": "",
        "resume": "latest",
        "num_processes": 1,  # torchrun starts the processes on every node
    }
    config = _training_config(config_yaml, overrides)
    config_uri = store.join(work, "train_config.yaml")
    store.write_text(config_uri, yaml.safe_dump(config.to_dict(), sort_keys=False))
    trainjob.run_trainjob(
        trainjob.TrainJobSpec(
            name=trainjob.trainjob_name(run_id),
            namespace=pod_namespace(),
            image=trainer_image,
            config_uri=config_uri,
            num_nodes=num_nodes,
            gpus_per_node=gpus_per_node,
        )
    )
    store.get_dir(output_uri, training_path)
    return _training_metrics(training_path)


def pod_namespace() -> str:
    """The namespace this step's pod runs in (where the TrainJob goes), else ``kubeflow``."""
    service_account = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if service_account.is_file():
        return service_account.read_text().strip()
    return os.environ.get("POD_NAMESPACE", "kubeflow")


def _training_config(config_yaml: str, overrides: dict[str, Any]) -> Any:
    """The user's YAML (checked like ``lorapipe train --config``) under the pipeline's keys."""
    from lorapipe.train_config import load_config

    with tempfile.TemporaryDirectory(prefix="lorapipe-config-") as tmp:
        config_file = Path(tmp) / "training_config.yaml"
        config_file.write_text(config_yaml or "{}\n", encoding="utf-8")
        return load_config(str(config_file), overrides)


def _training_metrics(training_path: str) -> Metrics:
    from lorapipe.stages.train import TRAINING_REPORT_NAME

    report = json.loads((Path(training_path) / TRAINING_REPORT_NAME).read_text())
    return metrics_for_kfp(
        {
            "steps": report["steps"],
            "train_images": report["num_train_images"],
            "validation_images": report["num_val_images"],
            "samples_per_second": report["samples_per_second"],
            "processes": report["num_processes"],
        }
    )


def select(
    training_path: str,
    lora_path: str,
    report_path: str,
    *,
    epsilon: float = 0.01,
    publish_uri: str = "",
    run_id: str = "",
) -> Metrics:
    """Pick the checkpoint, write both LoRA formats; publish them under ``publish_uri``."""
    from lorapipe.stages import select as stage

    config = stage.SelectConfig(epsilon=epsilon, pipeline_run_id=run_id)
    report = stage.run(training_path, lora_path, config)
    _copy_report(lora_path, report_path)
    if publish_uri:
        publish(lora_path, publish_uri, run_id)
    return metrics_for_kfp(report["metrics"])


def publish(lora_path: str, publish_uri: str, run_id: str) -> str:
    """Copy the chosen LoRA to ``publish_uri/<run_id>/`` and then point ``latest.json`` at it.

    Runs never overwrite each other's files; whoever reads ``latest.json`` finds a complete
    upload, because the pointer is written only after every file (and the manifest) is there.
    """
    from lorapipe.stages.select import OUTPUT_KIND

    run_prefix = store.join(publish_uri, _safe_run_id(run_id))
    with store.staged_output(run_prefix, OUTPUT_KIND) as staging:
        ignore = shutil.ignore_patterns(store.MANIFEST_NAME)  # publishing writes its own
        shutil.copytree(lora_path, staging, ignore=ignore, dirs_exist_ok=True)
    pointer = {"run_id": run_id, "uri": run_prefix}
    store.write_text(store.join(publish_uri, "latest.json"), json.dumps(pointer, indent=2) + "\n")
    log.info("published the LoRA to %s", run_prefix)
    return run_prefix


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
    """The grid prompts x negative presets x LoRA scales x CFG scales x seeds with the chosen
    LoRA; ``job_yaml`` may set any other generate key (sampler, width, clip_skip, ...)."""
    from lorapipe.stages import generate as stage

    name, lora_file = chosen_lora(lora_path)
    values = stage.config_values(yaml.safe_load(job_yaml) or {}, "job_yaml") if job_yaml else {}
    values.update(
        prompts=[with_lora_tag(prompt, name) for prompt in prompts],
        loras={name: lora_file},
        negative_presets=list(negative_presets),
        lora_scales=[float(scale) for scale in lora_scales] or None,
        cfg_scales=[float(scale) for scale in cfg_scales],
        seeds=[int(seed) for seed in seeds],
        steps=steps,
    )
    report = stage.run(base_model_uri, output_path, stage.GenerateConfig(**values))
    shutil.copyfile(Path(output_path) / "report.html", html_path)
    return metrics_for_kfp(
        {"images": report["images"], "images_per_second": report["images_per_second"]}
    )


def chosen_lora(lora_path: str) -> tuple[str, str]:
    """(name, kohya file) of the LoRA that ``select`` wrote to ``lora_path``."""
    report_file = Path(lora_path) / "report.json"
    if not report_file.is_file():
        raise InputError(f"{lora_path}: no report.json; give the output of lorapipe select")
    files = json.loads(report_file.read_text())["files"]
    kohya = Path(lora_path) / files["kohya"]
    return kohya.stem, str(kohya)


def with_lora_tag(prompt: str, name: str) -> str:
    """The prompt with ``<lora:name:1>`` appended unless it already uses that LoRA, so a
    grid's LoRA scales always reach the LoRA just trained."""
    if re.search(rf"<lora:{re.escape(name)}:", prompt):
        return prompt
    return f"{prompt}, <lora:{name}:1>"


def _copy_report(stage_output: str, report_path: str) -> None:
    shutil.copyfile(Path(stage_output) / "report.md", report_path)


def _required(key: str, value: str) -> str:
    if not value:
        raise ConfigError(f"pipeline parameter {key} is empty; give a local path or s3:// URI")
    return value


def _safe_run_id(run_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-.")
    return safe or "manual"


def metrics_for_kfp(values: dict[str, Any]) -> Metrics:
    """Only the numbers: the KFP UI shows a metric per (name, float)."""
    return {
        name: float(value)
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
