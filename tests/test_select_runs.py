"""``lorapipe select`` over several runs (a sweep): the rule across runs and its tie-breaks,
runs whose validation losses do not compare refused, the ranking in selection.json, report.md,
the page and the chart, and the winner's LoRA exported and published as one run's would be."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lora_fixtures import add_random_lora, record, training_report, write_training_output
from PIL import Image

from lorapipe import lora_format
from lorapipe.checkpoint_layout import CheckpointLosses
from lorapipe.cli import main as cli
from lorapipe.errors import InputError
from lorapipe.selection_rule import (
    ACROSS_RUNS_RULE,
    RunLosses,
    choose_across_runs,
    choose_checkpoint,
)
from lorapipe.stages.select import SelectConfig, run
from lorapipe.stages.select_runs import resolve_sources


def _run(name: str, *val_losses: float, rank: int = 4, steps: int = 300) -> RunLosses:
    """A run whose checkpoints at steps 100, 200, ... recorded ``val_losses``."""
    checkpoints = [
        CheckpointLosses(step=100 * i, val_loss=loss) for i, loss in enumerate(val_losses, 1)
    ]
    return RunLosses(name, checkpoints, rank=rank, steps=steps)


# --------------------------------------------------------------------------- the rule across runs


def test_the_earliest_checkpoint_of_any_run_within_epsilon_of_the_lowest_of_all_wins() -> None:
    """rank-8 reaches the lowest loss (0.150 at step 300); rank-4 comes within 1% of it at
    step 200 already, so rank-4's checkpoint-200 ships."""
    rank_8 = _run("rank-8", 0.20, 0.17, 0.150, rank=8)
    rank_4 = _run("rank-4", 0.21, 0.1512, 0.1511)
    far = _run("far", 0.30, 0.25, 0.20)

    choice = choose_across_runs([rank_8, rank_4, far], epsilon=0.01)

    assert (choice.winner.name, choice.selection.step) == ("rank-4", 200)
    assert (choice.selection.minimum, choice.selection.minimum_step) == (0.150, 300)
    assert choice.selection.rule == ACROSS_RUNS_RULE.format(
        label="mean validation loss", tolerance="1%"
    )
    assert "rank-4 checkpoint-200 is the earliest checkpoint of any run" in choice.selection.reason
    assert "(0.15, rank-8 checkpoint-300)" in choice.selection.reason
    assert [(s.place, s.run.name, s.earliest_within) for s in choice.standings] == [
        (1, "rank-4", 200),
        (2, "rank-8", 300),
        (3, "far", None),  # never within epsilon: ranked after, by its lowest loss
    ]
    assert [s.own.step for s in choice.standings] == [200, 300, 300]  # each run's own choice


def test_equal_losses_go_to_the_smaller_rank_then_the_fewer_steps_then_the_first_given() -> None:
    same = (0.20, 0.150)

    by_rank = choose_across_runs([_run("r16", *same, rank=16), _run("r4", *same, rank=4)])
    assert by_rank.winner.name == "r4"
    assert "r4 wins by its smaller LoRA rank (4 < 16)" in by_rank.selection.reason

    by_steps = choose_across_runs([_run("long", *same, steps=600), _run("short", *same, steps=200)])
    assert by_steps.winner.name == "short"
    assert "its fewer training steps (200 < 600)" in by_steps.selection.reason

    by_order = choose_across_runs([_run("first", *same), _run("second", *same)])
    assert by_order.winner.name == "first" and "being given first" in by_order.selection.reason

    # the step comes first: a larger rank that gets there sooner wins
    sooner = choose_across_runs([_run("r4", 0.20, 0.150, rank=4), _run("r16", 0.150, rank=16)])
    assert (sooner.winner.name, sooner.selection.step) == ("r16", 100)


def test_one_run_is_exactly_the_one_run_rule() -> None:
    only = _run("only", 0.20, 0.1505, 0.150)

    choice = choose_across_runs([only])

    assert choice.selection == choose_checkpoint(only.checkpoints)
    assert choice.winner is only and [s.place for s in choice.standings] == [1]


def test_runs_without_validation_losses_are_not_ranked_on_their_training_loss() -> None:
    no_validation = [
        RunLosses(name, [CheckpointLosses(step=100, train_loss_ema=0.2)], rank=4, steps=100)
        for name in ("a", "b")
    ]
    with pytest.raises(InputError, match="does not compare across runs"):
        choose_across_runs(no_validation)

    missing = [_run("validated", 0.2), no_validation[0]]
    with pytest.raises(InputError, match="run a: no complete checkpoint recorded a finite mean"):
        choose_across_runs(missing)


def test_outputs_of_one_name_are_told_apart_by_their_paths(tmp_path: Path) -> None:
    """KFP names every task's output the same: the names take as much of the path as needed."""
    sources = resolve_sources([str(tmp_path / "train-1/out"), str(tmp_path / "train-2/out")])

    assert [r.name for r in sources.runs] == ["train-1/out", "train-2/out"] and sources.ranked
    assert not resolve_sources(str(tmp_path / "train-1/out")).ranked


def test_a_pipeline_sweep_runs_record_beside_its_report_names_it(tmp_path: Path) -> None:
    """The pipeline's train step leaves the sweep run's name and overrides beside its report."""
    for folder, name in (("train-1", "run-01-lora_rank-4"), ("train-2", "run-02-lora_rank-8")):
        (tmp_path / folder / "training").mkdir(parents=True)
        record = {"name": name, "overrides": {"lora_rank": int(name[-1])}}
        (tmp_path / folder / "training" / "sweep_run.json").write_text(json.dumps(record))

    sources = resolve_sources([str(tmp_path / f"train-{i}/training") for i in (1, 2)])

    assert [(r.name, r.overrides) for r in sources.runs] == [
        ("run-01-lora_rank-4", {"lora_rank": 4}),
        ("run-02-lora_rank-8", {"lora_rank": 8}),
    ]


# --------------------------------------------------------------------------- select on training outputs


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path):
    """The tiny pipeline with a LoRA on the UNet's attention."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    add_random_lora(pipeline, rank=4, alpha=8.0)
    return pipeline


def _training_output(
    root: Path,
    pipeline,
    model_dir: Path,
    val_losses: tuple[float, ...],
    *,
    seed: int,
    config: dict[str, Any] | None = None,
    **report: Any,
) -> dict[int, dict[str, torch.Tensor]]:
    """A run's training output: checkpoints at steps 100, 200, ... with ``val_losses``, its
    own weights (``seed``), and ``config`` and ``report`` over the fixture's report."""
    records = [
        record(100 * i, val_loss=loss, train_loss_ema=0.3, epoch=i)
        for i, loss in enumerate(val_losses, 1)
    ]
    base = training_report(model_dir)
    full_report = {**base, "config": {**base["config"], **(config or {})}, **report}
    return write_training_output(root, pipeline, records, report=full_report, seed=seed)


@pytest.fixture
def two_runs(tmp_path: Path, pipeline, tiny_model_dir: Path):
    """Two runs of different learning rates: lr-high reaches the lowest loss at step 300,
    lr-low comes within 1% of it at step 200 and wins."""
    high = _training_output(
        tmp_path / "lr-high", pipeline, tiny_model_dir, (0.20, 0.17, 0.150), seed=1000,
        config={"learning_rate": 2e-4},
    )  # fmt: skip
    low = _training_output(
        tmp_path / "lr-low", pipeline, tiny_model_dir, (0.22, 0.1512, 0.1511), seed=2000,
        config={"learning_rate": 5e-5},
    )  # fmt: skip
    return tmp_path / "lr-high", tmp_path / "lr-low", high, low


def test_select_ranks_both_runs_and_exports_the_better_runs_lora(two_runs, tmp_path: Path) -> None:
    high, low, _, low_weights = two_runs
    out = tmp_path / "selected"

    report = run([str(high), str(low)], str(out), SelectConfig(pipeline_run_id="run-9"))

    assert report["winner"] == {
        "name": "lr-low",
        "output": str(low),
        "overrides": {"learning_rate": 5e-5},  # what differs between the runs' configs
    }
    assert (report["chosen"]["step"], report["training_output"]) == (200, str(low))
    assert report["rule"].startswith("the earliest complete checkpoint of any run")
    ranked = [
        (r["place"], r["name"], r["best_step"], r["chosen_step"], r["earliest_within_step"])
        for r in report["runs"]
    ]
    assert ranked == [(1, "lr-low", 300, 200, 200), (2, "lr-high", 300, 300, 300)]
    assert [r["within_epsilon"] for r in report["runs"]] == [True, True]
    assert report["runs"][1]["overrides"] == {"learning_rate": 2e-4}
    assert report["failed_runs"] == []

    selection = json.loads((out / "selection.json").read_text())
    assert {key: selection[key] for key in ("runs", "winner", "rule")} == {
        key: report[key] for key in ("runs", "winner", "rule")
    }

    diffusers_state, _, _ = lora_format.load_lora_state_dict(
        str(out / lora_format.DIFFUSERS_WEIGHT_NAME)
    )
    chosen = {key.removeprefix("unet."): value for key, value in low_weights[200].items()}
    assert all(
        torch.equal(tensor, chosen[key.removeprefix("unet.")])
        for key, tensor in diffusers_state.items()
    )
    _, header, _ = lora_format.load_lora_state_dict(str(out / "film_style.safetensors"))
    assert header["lorapipe.sweep_run"] == "lr-low"
    assert json.loads(header["lorapipe.sweep_overrides"]) == {"learning_rate": 5e-5}
    assert header["ss_learning_rate"] == "5e-05" and header["ss_steps"] == "200"
    assert header["lorapipe.selection_rule"] == report["rule"]

    metrics = json.loads((out / "metrics.json").read_text())["values"]
    assert (metrics["runs"], metrics["winner_best_val_loss"]) == (2, 0.1511)
    assert high.joinpath("checkpoint-300").is_dir()  # the other run's records stay


def test_the_report_ranks_the_runs_with_a_chart_of_every_runs_validation_loss(
    two_runs, tmp_path: Path
) -> None:
    from lorapipe.report.run_report import stage_page

    high, low, _, _ = two_runs
    out = tmp_path / "selected"
    run([str(high), str(low)], str(out))

    chart = Image.open(out / "runs_loss.png")
    assert chart.size == (1000, 560)
    pixels = np.asarray(chart.convert("RGB")).reshape(-1, 3)
    assert ((pixels == (200, 0, 0)).all(axis=1)).sum() > 50  # the chosen checkpoint's ring
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# LoRA selection: lr-low checkpoint-200")
    assert "![validation loss of every run](runs_loss.png)" in markdown
    assert "| 1 | lr-low | learning_rate=5e-05 | 4 | 300 | 0.1511 (300) | 200 | 200 |" in markdown
    assert "**winner**" in markdown.split("| 1 | lr-low")[1].splitlines()[0]
    page = stage_page("select", str(out))
    assert "lr-low &#9664; winner" in page and "<td>learning_rate=5e-05</td>" in page
    assert page.count("data:image/png;base64,") == 2  # the winner's loss curve and the runs'


@pytest.mark.parametrize(
    ("report", "config", "message"),
    [
        ({"resolution": 128}, {}, "(resolution 64) and b (resolution 128)"),
        ({"base_model_hash": "cd" * 32}, {}, "(base_model_hash 'abab"),
        ({}, {"validation_split": 0.2}, "(validation_split None) and b (validation_split 0.2)"),
    ],
)
def test_runs_whose_validation_losses_do_not_compare_are_refused_in_one_line(
    tmp_path: Path, pipeline, tiny_model_dir: Path, report: dict, config: dict, message: str
) -> None:
    _training_output(tmp_path / "a", pipeline, tiny_model_dir, (0.2,), seed=0)
    _training_output(tmp_path / "b", pipeline, tiny_model_dir, (0.1,), seed=0, config=config,
                     **report)  # fmt: skip

    with pytest.raises(InputError) as error:
        run([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))

    line = str(error.value)
    assert line.startswith("runs a ") and message in line and "do not compare" in line
    assert "\n" not in line and not (tmp_path / "out").exists()


def test_the_cli_refuses_incomparable_runs_in_one_line(
    tmp_path: Path, pipeline, tiny_model_dir: Path, capsys
) -> None:
    _training_output(tmp_path / "a", pipeline, tiny_model_dir, (0.2,), seed=0)
    _training_output(tmp_path / "b", pipeline, tiny_model_dir, (0.1,), seed=0, num_val_images=5)

    assert (
        cli(["select", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 2
    )

    error = capsys.readouterr().err.strip()
    assert error.startswith("lorapipe select: error: runs a (num_val_images 2) and b")
    assert "\n" not in error


def _write_sweep(folder: Path, *runs: tuple[str, dict[str, Any], str | None]) -> None:
    """``sweep.json`` as ``lorapipe sweep`` writes it: each run (name, overrides, error) in
    ``<folder>/<name>``, finished when it has no error."""
    records = [
        {
            "name": name, "overrides": overrides, "output": str(folder / name),
            "status": "failed" if error else "finished", "stopped_early": None,
            "log": f"{folder}/logs/{name}.log", "error": error,
        }
        for name, overrides, error in runs
    ]  # fmt: skip
    folder.mkdir(exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps({"runs": records, "base_config": {}}))


def test_a_sweep_folder_ranks_its_finished_runs_and_lists_the_failed_one(
    tmp_path: Path, pipeline, tiny_model_dir: Path, capsys
) -> None:
    sweep = tmp_path / "sweep"
    names = ["run-01-lora_alpha-4", "run-02-lora_alpha-16", "run-03-lora_alpha-64"]
    _training_output(sweep / names[0], pipeline, tiny_model_dir, (0.2, 0.16), seed=0,
                     config={"lora_alpha": 4.0})  # fmt: skip
    _training_output(sweep / names[1], pipeline, tiny_model_dir, (0.2, 0.15), seed=0,
                     config={"lora_alpha": 16.0})  # fmt: skip
    _write_sweep(
        sweep,
        (names[0], {"lora_alpha": 4.0}, None),
        (names[1], {"lora_alpha": 16.0}, None),
        (names[2], {"lora_alpha": 64.0}, "out of memory: lower batch_size"),
    )
    out = tmp_path / "selected"

    assert cli(["select", str(sweep), "--out", str(out)]) == 0

    assert "run-02-lora_alpha-16 checkpoint-200 has the lowest" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == names[1::-1]
    assert report["winner"]["overrides"] == {"lora_alpha": 16.0}  # as sweep.json has them
    assert [(f["name"], f["error"]) for f in report["failed_runs"]] == [
        (names[2], "out of memory: lower batch_size")
    ]
    assert "Failed, not ranked: run-03-lora_alpha-64" in (out / "report.md").read_text()


def test_a_sweep_of_one_finished_run_is_that_runs_own_choice_and_none_finished_is_one_line(
    tmp_path: Path, pipeline, tiny_model_dir: Path
) -> None:
    one = tmp_path / "one"
    _training_output(one / "run-01", pipeline, tiny_model_dir, (0.2, 0.1505, 0.150), seed=0)
    _write_sweep(one, ("run-01", {}, None), ("run-02", {"lora_rank": 64}, "CUDA out of memory"))

    report = run(str(one / "sweep.json"), str(tmp_path / "out"))

    assert (report["winner"]["name"], report["chosen"]["step"]) == ("run-01", 200)
    assert report["rule"].startswith("the earliest complete checkpoint whose")  # the one-run rule
    assert [f["name"] for f in report["failed_runs"]] == ["run-02"]

    none = tmp_path / "none"
    _write_sweep(none, ("run-01", {}, "CUDA out of memory"))
    with pytest.raises(InputError, match=r"no run finished \(run-01: CUDA out of memory\)"):
        run(str(none), str(tmp_path / "out2"))


def test_the_winner_is_published_and_promoted_as_one_run_would_be(two_runs, tmp_path: Path) -> None:
    """Promotion compares the winner's validation loss with what the winner's training
    measured the published LoRA at (its published_validation.json), as for one run."""
    high, low, _, _ = two_runs
    publish = tmp_path / "loras"
    publish.mkdir()
    latest = {"run_id": "week-1", "uri": str(publish / "week-1"), "val_loss": 0.2, "history": []}
    (publish / "latest.json").write_text(json.dumps(latest))
    for root, measured in ((low, 0.1520), (high, 0.1000)):  # only the winner's counts
        (root / "published_validation.json").write_text(json.dumps({
            "compare_with": str(publish), "status": "measured", "reason": "", "run_id": "week-1",
            "uri": str(publish / "week-1"), "val_loss": measured, "val_loss_by_timestep": None,
            "validation_images": 2, "base_model_hash": None, "measured_at": "2026-12-01T00:00:00",
        }))  # fmt: skip

    config = SelectConfig(publish_uri=str(publish), pipeline_run_id="week-2")
    report = run([str(high), str(low)], str(tmp_path / "out"), config)

    assert report["promotion"]["promoted"] and report["promotion"]["compared_val_loss"] == 0.1520
    latest = json.loads((publish / "latest.json").read_text())
    assert (latest["run_id"], latest["checkpoint_step"]) == ("week-2", 200)
    _, header, _ = lora_format.load_lora_state_dict(
        str(publish / "week-2" / "film_style.safetensors")
    )
    assert header["lorapipe.sweep_run"] == "lr-low"
