"""What the Kubeflow components hand their stages, tested without KFP (the whole DAG runs in
test_pipeline_local_run.py). What the stages then do (publishing, the LoRA tag, the TrainJob)
is tested with the stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapipe import pipeline_steps, store
from lorapipe.errors import ConfigError


def test_an_empty_required_parameter_names_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pipeline parameter data_uri is empty"):
        pipeline_steps.ingest("", str(tmp_path / "out"), str(tmp_path / "report.html"))


def test_only_numbers_reach_the_kfp_metrics() -> None:
    values = {"steps": 30, "loss": 0.25, "finished": True, "name": "x", "missing": None}
    assert pipeline_steps.metrics_for_kfp(values) == {"steps": 30.0, "loss": 0.25}


def test_the_pipeline_decides_data_model_and_output_whatever_the_yaml_says(
    tmp_path: Path, tiny_model_dir: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorapipe.stages import train as stage

    seen = {}

    def record_run(train_data: str, output_dir: str, config: object) -> dict:
        seen.update(train_data=train_data, output_dir=output_dir, config=config)
        report = {
            "steps": 3,
            "num_train_images": 4,
            "num_val_images": 1,
            "samples_per_second": 1.5,
            "num_processes": 1,
        }
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / stage.TRAINING_REPORT_NAME).write_text(json.dumps(report))
        return report

    pages = []
    monkeypatch.setattr(stage, "run", record_run)
    monkeypatch.setattr(pipeline_steps, "_write_page", lambda *page: pages.append(page))
    metrics = pipeline_steps.train(
        str(tmp_path / "dataset"),
        str(tmp_path / "training"),
        str(tmp_path / "report.html"),
        base_model_uri=str(tiny_model_dir),
        training_config="{output_dir: /elsewhere, lora_rank: 8, learning_rate: 5e-4}",
        num_gpus=4,
        checkpoint_mirror_uri=f"{s3_bucket}/checkpoints",
        run_id="run 7",
    )
    config = seen["config"]
    assert pages == [("train", str(tmp_path / "training"), str(tmp_path / "report.html"))]
    assert config.output_dir == str(tmp_path / "training")
    assert config.train_data_dir == str(tmp_path / "dataset")
    assert config.base_model == str(tiny_model_dir)
    assert (config.lora_rank, config.learning_rate) == (8, 5e-4)
    assert config.checkpoint_mirror == f"{s3_bucket}/checkpoints/run-7"
    assert config.resume == "latest"
    assert config.num_processes == 1  # no GPU here: one CPU process whatever num_gpus says
    assert metrics == {
        "steps": 3.0,
        "train_images": 4.0,
        "validation_images": 1.0,
        "samples_per_second": 1.5,
        "processes": 1.0,
    }


def test_multi_node_training_shares_data_config_and_output_through_s3(
    tmp_path: Path, tiny_model_dir: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """num_nodes > 1: the step uploads the dataset and the resolved config, runs a TrainJob
    (here a stand-in that trains nothing but writes what the nodes would), and brings its
    output back as the step's artifact."""
    import yaml

    from lorapipe import trainjob
    from lorapipe.demo.inputs import write_sample_folder
    from lorapipe.stages import ingest

    dataset = tmp_path / "dataset"
    ingest.run(
        str(write_sample_folder(tmp_path / "raw", count=9)),
        str(dataset),
        ingest.IngestConfig(workers=1),
    )
    submitted = []

    def fake_trainjob(spec: trainjob.TrainJobSpec) -> dict:
        submitted.append(spec)
        config = yaml.safe_load(store.read_text(spec.config_uri))
        assert store.is_complete(config["train_data_dir"])
        report = {"steps": 5, "num_train_images": 6, "num_val_images": 1,
                  "samples_per_second": 9.0, "num_processes": 8}  # fmt: skip
        store.write_text(
            store.join(config["output_dir"], "training_report.json"), json.dumps(report)
        )
        return {}

    monkeypatch.setattr(trainjob, "run_trainjob", fake_trainjob)
    monkeypatch.setattr(pipeline_steps, "_write_page", lambda *page: None)
    metrics = pipeline_steps.train(
        str(dataset),
        str(tmp_path / "training"),
        str(tmp_path / "report.html"),
        base_model_uri=str(tiny_model_dir),
        training_config="{lora_rank: 8}",
        num_gpus=4,
        num_nodes=2,
        checkpoint_mirror_uri=f"{s3_bucket}/checkpoints",
        run_id="run-9",
        trainer_image="registry.example.com/lorapipe-torch:1",
    )

    (spec,) = submitted
    assert (spec.num_nodes, spec.gpus_per_node) == (2, 4)
    assert spec.name == "lorapipe-run-9" and spec.image == "registry.example.com/lorapipe-torch:1"
    assert spec.config_uri == f"{s3_bucket}/checkpoints/run-9/train_config.yaml"
    config = yaml.safe_load(store.read_text(spec.config_uri))
    assert config["train_data_dir"] == f"{s3_bucket}/checkpoints/run-9/dataset"
    assert config["output_dir"] == f"{s3_bucket}/checkpoints/run-9/training"
    assert (config["lora_rank"], config["resume"]) == (8, "latest")
    assert metrics["processes"] == 8.0
    assert (tmp_path / "training" / "training_report.json").is_file()


def test_multi_node_training_needs_an_s3_mirror(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_nodes 2 needs checkpoint_mirror on S3"):
        pipeline_steps.train(
            str(tmp_path), str(tmp_path / "out"), str(tmp_path / "report.html"),
            base_model_uri="m", training_config="",
            num_nodes=2, checkpoint_mirror_uri="", run_id="r", trainer_image="i",
        )  # fmt: skip


def test_a_pipeline_step_prints_no_credential_and_takes_over_its_outputs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorapipe import writer_lock
    from lorapipe.pipeline_steps import pipeline_task

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "pipeline-step-secret-0123")
    monkeypatch.delenv(writer_lock.FORCE_ENV, raising=False)

    @pipeline_task
    def step() -> bool:
        print("the secret is pipeline-step-secret-0123")
        return writer_lock.force_requested()

    assert step() is True and not writer_lock.force_requested()
    assert "pipeline-step-secret-0123" not in capsys.readouterr().out
