"""Early stopping: the rule on a stream of validation losses, its config checks, a tiny training
whose validation loss has flattened stopping early with its record, and a resumed run stopping
where an uninterrupted one does."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
from test_train import write_folder

from lorapipe import checkpoint_layout as layout
from lorapipe.errors import ConfigError
from lorapipe.report.run_report import stage_page
from lorapipe.stages.train import run
from lorapipe.train_config import TrainConfig, load_config
from lorapipe.training.early_stopping import EarlyStopping

# --------------------------------------------------------------------------- the rule


def feed(stopping: EarlyStopping, losses: list[float]) -> list[bool]:
    """The stop decision after each loss, checkpoints at steps 10, 20, ..."""
    return [stopping.update(10 * (i + 1), loss) for i, loss in enumerate(losses)]


def test_it_stops_after_patience_checkpoints_without_an_improvement_beyond_epsilon() -> None:
    stopping = EarlyStopping(patience=2, epsilon=0.01)
    # 0.995 is lower than 1.0 but by less than 1%: not an improvement; 0.98 is one
    assert feed(stopping, [1.0, 0.995, 0.98, 0.975, 0.979]) == [False, False, False, False, True]
    assert (stopping.best_step, stopping.best_val_loss, stopping.last_step) == (30, 0.98, 50)
    record = stopping.record(total_steps=100)
    assert record is not None
    assert {key: record[key] for key in ("step", "best_step", "best_val_loss")} == {
        "step": 50,
        "best_step": 30,
        "best_val_loss": 0.98,
    }
    assert record["reason"] == (
        "2 checkpoints in a row without a validation loss more than 1.00% below the best, "
        "0.98 at step 30 (early_stopping_patience 2)"
    )


def test_a_loss_that_is_not_finite_never_improves_and_patience_0_never_stops() -> None:
    stopping = EarlyStopping(patience=1, epsilon=0.01)
    assert feed(stopping, [math.nan]) == [True]
    assert stopping.best_val_loss is None and "none was finite" in stopping.reason
    never = EarlyStopping(patience=0, epsilon=0.01)
    assert not any(feed(never, [1.0, 1.0, 1.0, 2.0]))
    assert never.without_improvement == 3 and never.record(total_steps=100) is None


def test_stopping_at_the_last_step_is_not_stopping_early() -> None:
    stopping = EarlyStopping(patience=1, epsilon=0.01)
    assert feed(stopping, [1.0, 1.0]) == [False, True]
    assert stopping.record(total_steps=20) is None
    assert stopping.record(total_steps=30) is not None


def test_its_state_round_trips_without_the_configs_values() -> None:
    stopping = EarlyStopping(patience=3, epsilon=0.05)
    feed(stopping, [1.0, 0.99])
    state = json.loads(json.dumps(stopping.state_dict()))
    assert "patience" not in state and "epsilon" not in state
    restored = EarlyStopping(patience=3, epsilon=0.05)
    restored.load_state_dict(state)
    assert restored == stopping


# --------------------------------------------------------------------------- config


def test_patience_needs_validation_images_and_is_not_negative(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(overrides={"early_stopping_patience": 2, "validation_split": 0})
    assert str(error.value) == (
        "--early-stopping-patience needs validation images to watch; set validation_split above "
        "0 (e.g. 0.1), or early_stopping_patience: 0"
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text("early_stopping_patience: -1\n")
    with pytest.raises(
        ConfigError, match="line 1: key 'early_stopping_patience' must be at least 0"
    ):
        load_config(str(config_file))
    assert load_config(overrides={"early_stopping_patience": 2}).early_stopping_epsilon == 0.01


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "shapes", 8)


@pytest.fixture
def flat(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    """A training whose validation loss cannot move (learning rate 1e-12), a checkpoint every
    step, patience 2: checkpoint 1 is the best, 2 and 3 do not improve, it stops at step 3 of
    10. Samples only at the last checkpoint."""
    return TrainConfig(
        base_model=str(tiny_model_dir),
        cache_dir=str(tmp_path_factory.getbasetemp() / "cache"),
        batch_size=2,
        learning_rate=1e-12,
        validation_split=2,
        save_steps=1,
        max_train_steps=10,
        early_stopping_patience=2,
        sample_steps=2,
        sample_seeds=[1],
        sample_every_n_steps=100,
    )


def logged_steps(output: Path) -> list[int]:
    with (output / "loss_log.csv").open() as file:
        return [int(row["step"]) for row in csv.DictReader(file)]


def test_a_run_whose_validation_loss_has_flattened_stops_early(
    images: Path, flat: TrainConfig, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    report = run(str(images), str(output), flat)

    stopped = report["stopped_early"]
    assert (stopped["step"], stopped["best_step"]) == (3, 1)
    record = layout.read_record(output / "checkpoint-1")
    assert stopped["best_val_loss"] == record["val_loss"]
    assert (
        "2 checkpoints in a row without a validation loss more than 1.00% below"
        in stopped["reason"]
    )
    assert report["steps"] == 3 and report["epochs"] == 1  # 4 steps to the epoch
    assert json.loads((output / "training_report.json").read_text()) == report
    assert sorted(layout.complete_checkpoints(str(output))) == [1, 2, 3]
    assert logged_steps(output) == [1, 2, 3]
    # the early-stopped checkpoint is the run's last: it gets the sample images
    assert [step for step in (1, 2, 3) if layout.read_samples(output / f"checkpoint-{step}")] == [3]
    assert "Stopped early at step 3: 2 checkpoints in a row" in stage_page("train", str(output))


def test_a_run_that_trains_to_the_end_records_no_early_stop(
    images: Path, flat: TrainConfig, tmp_path: Path
) -> None:
    report = run(
        str(images),
        str(tmp_path / "out"),
        dataclasses.replace(flat, early_stopping_patience=0, max_train_steps=3, save_steps=3),
    )
    assert report["stopped_early"] is None and report["steps"] == 3


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(
    images: Path, flat: TrainConfig, tmp_path: Path
) -> None:
    output = tmp_path / "resumed"
    first = run(str(images), str(output), dataclasses.replace(flat, max_train_steps=2))
    assert first["stopped_early"] is None and first["steps"] == 2  # one checkpoint without gain

    # the state carried over: a fresh one would take checkpoint 3 as the best and stop at 5
    resumed = run(str(images), str(output), dataclasses.replace(flat, resume="latest"))
    straight = run(str(images), str(tmp_path / "straight"), flat)
    assert resumed["stopped_early"] == straight["stopped_early"]
    assert resumed["stopped_early"]["step"] == resumed["steps"] == 3
    assert logged_steps(output) == [1, 2, 3]

    again = run(str(images), str(output), dataclasses.replace(flat, resume="latest"))
    assert again["stopped_early"] == straight["stopped_early"] and again["steps"] == 3
    assert sorted(layout.complete_checkpoints(str(output))) == [1, 2, 3]
