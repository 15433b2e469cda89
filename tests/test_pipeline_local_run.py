"""`make run`: the whole DAG through kfp.local on the demo's world images, model and tagger."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from lorapipe import store
from pipelines import local_run


def _task_dir(out: Path, task: str) -> Path:
    (run_dir,) = (out / "pipeline-root").glob("lorapipe-lora-training-*")
    # a train task runs in a sweep iteration's folder
    (directory,) = [*run_dir.glob(f"{task}*"), *run_dir.glob(f"for-loop-*/{task}*")]
    return directory


# a short training and a small grid, for the tests that check plumbing rather than claims
QUICK = {
    "training_config": (
        "{output_name: filmstyle, lora_rank: 4, batch_size: 4, max_train_steps: 20, "
        "save_steps: 10, resolution: 64, validation_split: 0.2}"
    ),
    "lora_scales": [0.0, 0.8],
    "seeds": [1],
    "steps": 4,
}


def test_make_run_shows_a_lora_that_learned_the_style_and_a_negative_that_removes_the_defects(
    demo_run: local_run.LocalRun,
) -> None:
    """The demo end to end: the claims of "What the demo shows" hold, with their thresholds,
    and the report shows each with its verdict. The DAG runs twice: cleaned (the default
    defect policy) and, under scraped/, on the captions as scraped."""
    run = demo_run
    tmp_path = run.report.parent

    assert run.report == tmp_path / "report.html"
    assert len(run.claims) == 8
    # the cleaning claim is measured and reported either way: on this world captioning the
    # watermark does not stop the LoRA drawing it (README, "What the demo shows")
    *claims, cleaning = run.claims
    failed = [c.line() for c in claims if not c.passed]
    assert not failed, failed
    assert cleaning.claim.startswith("cleaning the data lowers the watermark rate")
    assert "as scraped" in cleaning.measured and "cleaned" in cleaning.measured
    html = run.report.read_text()
    assert "What this run shows" in html and html.count(">PASS<") == 7 + cleaning.passed
    assert "cleaning the data lowers the watermark rate" in html
    assert (tmp_path / "scraped" / "report.html").is_file()
    assert not (tmp_path / "scraped" / "published").exists(), "the scraped LoRA is not published"
    assert json.loads((tmp_path / "demo_checks.json").read_text())[0]["passed"] is True
    ingest_report = (_task_dir(tmp_path, "ingest") / "report").read_text()
    for planted in ("copy_of_first.png", "truncated.jpg", "too_small.png"):
        assert planted in ingest_report
    assert not list((tmp_path / "pipeline-root").glob("*/augment-2")), "the tagger branch only"
    latest = json.loads((tmp_path / "published" / "latest.json").read_text())
    published = Path(latest["uri"])
    assert (published / "filmstyle.safetensors").is_file()
    assert (published / "pytorch_lora_weights.safetensors").is_file()


def test_with_a_bucket_inputs_checkpoints_and_the_lora_live_in_s3(
    tmp_path: Path, s3_bucket: str
) -> None:
    prefix = f"{s3_bucket}/lorapipe-demo"
    local_run.run_local(tmp_path, QUICK, s3_prefix=prefix, compare_scraped=False)

    assert store.exists(f"{prefix}/inputs/world-tagger/project.json")
    latest = json.loads(store.read_text(f"{prefix}/loras/latest.json"))
    assert latest["uri"].startswith(f"{prefix}/loras/")
    assert store.exists(store.join(latest["uri"], "filmstyle.safetensors"))
    checkpoints = store.list_uris(f"{prefix}/checkpoints/{latest['run_id']}/")
    assert any(uri.endswith("checkpoint-20/_COMPLETE") for uri in checkpoints), checkpoints


def test_the_dag_runs_unchanged_with_an_sdxl_base_model(
    tmp_path: Path, tiny_sdxl_dir: Path
) -> None:
    """The demo's photos and tagger with the tiny SDXL as the base model: every stage reads the
    family off the model, nothing in the DAG changes."""
    from lorapipe.demo import inputs as demo

    folder = demo.write_sample_folder(tmp_path / "photos", count=12)
    run = local_run.run_local(
        tmp_path,
        {
            **QUICK,
            "data_uri": str(folder),
            "base_model_uri": str(tiny_sdxl_dir),
            "tagger_uri": str(demo.WORLD_TAGGER),
            "publish_uri": str(tmp_path / "published"),
            "prompts": ["filmstyle, a red circle in the middle, white background"],
        },
    )

    assert run.report.is_file() and not run.claims  # claims are the world model's
    training = json.loads(
        (_task_dir(tmp_path, "train") / "training" / "training_report.json").read_text()
    )
    assert training["model_family"] == "sdxl"
    latest = json.loads((tmp_path / "published" / "latest.json").read_text())
    kohya_file = Path(latest["uri"]) / "filmstyle.safetensors"
    with safe_open(kohya_file, "pt") as kohya:
        assert kohya.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def test_without_a_tagger_the_no_tagger_branch_runs_instead(tmp_path: Path) -> None:
    """The other branch of dsl.If: the cleaned images go straight to augment."""
    run = local_run.run_local(tmp_path, {**QUICK, "tagger_uri": ""})

    assert not list((tmp_path / "pipeline-root").glob("*/tag*")), "no tagger: tag is skipped"
    assert list((tmp_path / "pipeline-root").glob("*/augment-2"))
    assert "tagger" not in " ".join(claim.claim for claim in run.claims)
    assert run.report.is_file()


@pytest.mark.faults  # kfp.local retries the stage twice (10 s, then 20 s) before giving up
def test_a_failing_stage_stops_the_run_with_one_line_naming_the_task(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from lorapipe.errors import PipelineRunError

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "photo.jpg").write_text("<html>not an image</html>")
    arguments = {"data_uri": str(bad), "base_model_uri": str(tiny_model_dir)}
    with pytest.raises(PipelineRunError, match="the pipeline stopped at task 'ingest'"):
        local_run.run_local(tmp_path / "run", arguments)
    (report,) = (tmp_path / "run" / "pipeline-root").glob("*/ingest/dataset/report.md")
    assert "photo.jpg" in report.read_text() and "not_an_image" in report.read_text()


def test_a_second_run_on_unchanged_inputs_trains_nothing_and_an_added_image_retrains(
    tmp_path: Path,
) -> None:
    """Scheduled retraining, on this machine: the second run stops after its fingerprint step;
    with one more image the third trains, measures the published LoRA on its own validation
    images and records the comparison in latest.json's history."""
    from lorapipe.demo import inputs as demo

    folder = demo.write_sample_folder(tmp_path / "photos", count=12)
    arguments = {
        **QUICK,
        "data_uri": str(folder),
        "base_model_uri": str(demo.WORLD_MODEL),
        "tagger_uri": "",
        "publish_uri": str(tmp_path / "published"),
    }
    first = local_run.run_local(tmp_path / "first", arguments)
    (first_run,) = json.loads((tmp_path / "published" / "latest.json").read_text())["history"]

    second = local_run.run_local(tmp_path / "second", arguments)

    assert first.trained and not second.trained
    assert second.reason.startswith(f"no new data since run {first_run['run_id']}; nothing trained")
    (run_dir,) = (tmp_path / "second" / "pipeline-root").glob("lorapipe-lora-training-*")
    ran = sorted(task.name for task in run_dir.iterdir())
    assert ran == ["fingerprint", "plan-sweep"], "nothing after them ran"
    assert not (tmp_path / "second" / "report.html").exists()

    demo.write_sample_folder(folder, count=13)  # one image more, the others untouched
    third = local_run.run_local(tmp_path / "third", arguments)

    assert third.trained
    latest = json.loads((tmp_path / "published" / "latest.json").read_text())
    assert [record["run_id"] for record in latest["history"]][0] == first_run["run_id"]
    newest = latest["history"][-1]
    assert newest["compared_with"] == first_run["run_id"]
    assert newest["compared_val_loss"] > 0 and newest["fingerprint"] != first_run["fingerprint"]
    assert latest["run_id"] == (newest["run_id"] if newest["promoted"] else first_run["run_id"])
    html = third.report.read_text()
    assert "the inputs changed since run" in html
    assert ("Promoted: " if newest["promoted"] else "Not promoted: ") in html


def test_a_sweep_trains_each_config_ranks_the_runs_and_publishes_the_winner(
    tmp_path: Path,
) -> None:
    """`make run PARAMS="--param 'sweep=[{lora_rank: 4}, {lora_rank: 8}]'"`: one train task
    per config in the ParallelFor, select over both, the winner published."""
    original_print = builtins.print
    run = local_run.run_local(
        tmp_path,
        {
            **QUICK,
            "training_config": QUICK["training_config"].replace(
                "max_train_steps: 20", "max_train_steps: 10"
            ),
            "tagger_uri": "",
            "sweep": "[{lora_rank: 4}, {lora_rank: 8}]",
        },
        compare_scraped=False,
    )

    assert builtins.print is original_print, "kfp.local's parallel tasks left print indented"
    (run_dir,) = (tmp_path / "pipeline-root").glob("lorapipe-lora-training-*")
    trainings = sorted(run_dir.glob(local_run.TRAININGS))
    assert len(trainings) == 2
    ranks = sorted(
        json.loads((t / "training_report.json").read_text())["lora"]["rank"] for t in trainings
    )
    assert ranks == [4, 8]
    selection = json.loads((_task_dir(tmp_path, "select") / "lora" / "selection.json").read_text())
    assert len(selection["runs"]) == 2
    winner = selection["winner"]
    assert winner["name"] in {"run-01-lora_rank-4", "run-02-lora_rank-8"}
    assert winner["overrides"] == {"lora_rank": int(winner["name"].rsplit("-", 1)[1])}
    assert "ties go to the run of smaller LoRA rank" in selection["rule"]
    latest = json.loads((tmp_path / "published" / "latest.json").read_text())
    with safe_open(Path(latest["uri"]) / "filmstyle.safetensors", "pt") as kohya:
        assert kohya.metadata()["ss_network_dim"] == str(winner["overrides"]["lora_rank"])
    assert winner["name"] in run.report.read_text()  # the ranking, in the run report
