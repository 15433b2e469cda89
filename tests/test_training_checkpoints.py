"""Checkpoints appear complete or not at all, reach the S3 mirror marker-last, are pruned
without losing the best one, and are found again to resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lorapipe import checkpoint_layout as layout
from lorapipe import store
from lorapipe.checkpoint_layout import CheckpointLosses
from lorapipe.errors import TrainingError
from lorapipe.selection_rule import choose_checkpoint
from lorapipe.training import checkpoints


def make_checkpoint(output: Path, step: int, val_loss: float | None = None) -> Path:
    staging = checkpoints.staging_dir(output, step)
    (staging / layout.RECORD_NAME).write_text(json.dumps({"step": step, "val_loss": val_loss}))
    (staging / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    return checkpoints.publish(staging, output, step)


def test_a_published_checkpoint_is_complete_and_a_crashed_one_is_invisible(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 2)
    crashed = checkpoints.staging_dir(tmp_path, 4)  # a save that never finished
    (crashed / layout.RECORD_NAME).write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()  # a directory without _COMPLETE
    assert list(layout.complete_checkpoints(str(tmp_path))) == [2]
    checkpoints.remove_stale_staging(tmp_path)
    assert not crashed.exists()


def test_publishing_a_step_again_replaces_it(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 2, val_loss=0.5)
    make_checkpoint(tmp_path, 2, val_loss=0.4)
    assert layout.read_record(tmp_path / "checkpoint-2")["val_loss"] == 0.4


def test_keep_last_n_never_deletes_the_best_by_validation_loss(tmp_path: Path) -> None:
    for step, loss in ((100, 0.30), (200, 0.21), (300, 0.25), (400, 0.26), (500, 0.27)):
        make_checkpoint(tmp_path, step, loss)
    assert checkpoints.prune(tmp_path, keep_last_n=2, mirrors=[]) == [100, 300]
    assert list(layout.complete_checkpoints(str(tmp_path))) == [200, 400, 500]
    assert checkpoints.prune(tmp_path, keep_last_n=0, mirrors=[]) == []


def test_resume_latest_takes_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert checkpoints.find_resume_point("latest", tmp_path, []) is None
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoint-6").mkdir()
    assert checkpoints.find_resume_point("latest", tmp_path, []) == tmp_path / "checkpoint-4"
    assert (
        checkpoints.find_resume_point(str(tmp_path / "checkpoint-2"), tmp_path, [])
        == tmp_path / "checkpoint-2"
    )
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        checkpoints.find_resume_point(str(tmp_path / "checkpoint-6"), tmp_path, [])


def test_a_fresh_run_refuses_an_output_with_another_runs_checkpoints(tmp_path: Path) -> None:
    assert checkpoints.find_resume_point("", tmp_path, []) is None
    make_checkpoint(tmp_path, 300)
    with pytest.raises(
        TrainingError, match="already holds checkpoints .*checkpoint-300.*--resume latest"
    ):
        checkpoints.find_resume_point("", tmp_path, [])


def test_the_mirror_gets_the_marker_last_and_serves_resume(tmp_path: Path, s3_bucket: str) -> None:
    mirror = f"{s3_bucket}/run"
    for step, loss in ((2, 0.5), (4, 0.6), (6, 0.7)):
        checkpoints.mirror(make_checkpoint(tmp_path / "out", step, loss), mirror)
    assert list(layout.complete_checkpoints(mirror)) == [2, 4, 6]
    assert checkpoints.prune(tmp_path / "out", keep_last_n=1, mirrors=[mirror]) == [4]
    assert list(layout.complete_checkpoints(mirror)) == [2, 6]
    assert not store.list_uris(f"{mirror}/checkpoint-4")

    fresh = tmp_path / "fresh"  # the local disk was lost
    resumed = checkpoints.find_resume_point("latest", fresh, [mirror])
    assert resumed == fresh / "checkpoint-6"
    assert (resumed / layout.COMPLETE_MARKER).exists()
    assert (resumed / "pytorch_lora_weights.safetensors").read_bytes() == b"weights"
    explicit = checkpoints.find_resume_point(f"{mirror}/checkpoint-2", fresh, [])
    assert layout.read_record(explicit)["step"] == 2


def test_training_state_round_trips(tmp_path: Path) -> None:
    parameter = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    state_dir = tmp_path / "checkpoint-1" / layout.STATE_DIR
    checkpoints.save_training_state(
        state_dir, {"unet.w": parameter}, optimizer.state_dict(), {"step": 1}
    )
    trainable, optimizer_state, state = checkpoints.load_training_state(tmp_path / "checkpoint-1")
    assert torch.equal(trainable["unet.w"], parameter.detach())
    assert torch.equal(
        optimizer_state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert state == {"step": 1}


def test_a_directory_without_training_state_cannot_be_resumed(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="not written by `lorapipe train`"):
        checkpoints.load_training_state(tmp_path)


def test_random_states_restore_every_generator() -> None:
    saved = json.loads(json.dumps(checkpoints.rng_state()))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoints.restore_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


# --------------------------------------------------------------------------- pruning and select


def losses_of(output: Path) -> list[CheckpointLosses]:
    return [
        layout.read_losses(uri, step)
        for step, uri in layout.complete_checkpoints(str(output)).items()
    ]


# Validation losses whose earliest checkpoint within 1% of the lowest (200: 1.005 <= 0.996 x
# 1.01) is neither the newest (600) nor the lowest (400); at step 300 the rule alone would pick
# 100, so protecting only today's choice and the minimum would delete 200.
TRICKY = ((100, 1.009), (200, 1.005), (300, 1.000), (400, 0.996), (500, 1.05), (600, 1.06))


def test_keep_last_n_keeps_what_select_would_choose_without_pruning(tmp_path: Path) -> None:
    unpruned, pruned = tmp_path / "all", tmp_path / "pruned"
    for step, loss in TRICKY:
        make_checkpoint(unpruned, step, loss)
        make_checkpoint(pruned, step, loss)
        checkpoints.prune(pruned, keep_last_n=1, mirrors=[])  # as train does after each save

    expected = choose_checkpoint(losses_of(unpruned))
    assert (expected.step, expected.minimum_step) == (200, 400)
    assert choose_checkpoint(losses_of(pruned)).step == expected.step
    assert list(layout.complete_checkpoints(str(pruned))) == [200, 300, 400, 600]


def test_pruning_once_keeps_the_choice_the_minimum_and_the_newest(tmp_path: Path) -> None:
    for step, loss in TRICKY:
        make_checkpoint(tmp_path, step, loss)
    assert checkpoints.prune(tmp_path, keep_last_n=1, mirrors=[]) == [100, 500]
    assert choose_checkpoint(losses_of(tmp_path)).step == 200


def test_without_validation_loss_pruning_keeps_the_training_loss_choice(tmp_path: Path) -> None:
    for step, ema in ((1, 0.5), (2, 0.3), (3, 0.302), (4, 0.301), (5, 0.4)):
        staging = checkpoints.staging_dir(tmp_path, step)
        record = {"step": step, "val_loss": None, "train_loss_ema": ema}
        (staging / layout.RECORD_NAME).write_text(json.dumps(record))
        checkpoints.publish(staging, tmp_path, step)
    assert checkpoints.prune(tmp_path, keep_last_n=1, mirrors=[]) == [1, 3, 4]
    assert choose_checkpoint(losses_of(tmp_path)).step == 2
