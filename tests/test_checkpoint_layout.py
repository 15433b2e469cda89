"""The training output layout: complete checkpoints are found the same way locally and on S3,
records read into losses or fail in one line, and the readers never import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe import checkpoint_layout as layout
from lorapipe import store
from lorapipe.errors import InputError


def write_output(root: str) -> None:
    """checkpoint-2 and -10 complete, -4 without its marker, -6 empty, a staging leftover."""
    for step in (2, 10, 4):
        name = layout.checkpoint_name(step)
        record = {"step": step, "epoch": 1, "val_loss": 0.5 / step, "train_loss_ema": 0.9}
        store.write_text(store.join(root, name, layout.RECORD_NAME), json.dumps(record))
        store.write_text(store.join(root, name, layout.STATE_DIR, layout.STATE_NAME), "{}")
        if step != 4:
            store.write_bytes(store.join(root, name, layout.COMPLETE_MARKER), b"")
    staging = f"{layout.STAGING_PREFIX}12-x"
    store.write_bytes(store.join(root, staging, layout.COMPLETE_MARKER), b"")
    store.write_text(store.join(root, "loss_log.csv"), "step,loss\n")


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        root = str(tmp_path / "train-out")
        write_output(root)
        (tmp_path / "train-out" / "checkpoint-6").mkdir()
        return root
    root = f"{request.getfixturevalue('s3_bucket')}/runs/1"
    write_output(root)
    return root


def test_complete_and_incomplete_checkpoints_are_told_apart(output: str) -> None:
    complete, incomplete = layout.find_checkpoints(output)
    assert complete == {step: store.join(output, f"checkpoint-{step}") for step in (2, 10)}
    assert incomplete == {4: store.join(output, "checkpoint-4")}
    assert list(layout.complete_checkpoints(output)) == [2, 10]


def test_a_missing_output_has_no_checkpoints(tmp_path: Path, s3_bucket: str) -> None:
    assert layout.find_checkpoints(str(tmp_path / "nothing")) == ({}, {})
    assert layout.find_checkpoints(f"{s3_bucket}/nothing") == ({}, {})


def test_losses_come_from_the_record_and_the_step_from_the_directory(output: str) -> None:
    losses = layout.read_losses(store.join(output, "checkpoint-10"), 10)
    assert (losses.step, losses.epoch, losses.val_loss) == (10, 1, 0.05)
    assert losses.value("train_loss_ema") == 0.9 and losses.value("train_loss_mean") is None
    assert layout.read_record(store.join(output, "checkpoint-2"))["val_loss"] == 0.25


def test_a_non_finite_loss_has_no_value() -> None:
    assert layout.CheckpointLosses(step=1, val_loss=float("nan")).value("val_loss") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "record.json is missing; the checkpoint is damaged"),
        ("{broken", "record.json line 1: not valid JSON"),
        ("[1]", "record.json: expected a JSON object"),
        ('{"val_loss": "low"}', "record.json: could not convert .*expected numbers"),
    ],
)
def test_a_damaged_record_is_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    if content is not None:
        (checkpoint / layout.RECORD_NAME).write_text(content)
    with pytest.raises(InputError, match=message) as error:
        layout.read_losses(str(checkpoint), 3)
    assert "\n" not in str(error.value)


def test_the_layout_the_rule_and_the_chart_never_import_torch() -> None:
    code = (
        "import sys; import lorapipe.checkpoint_layout, lorapipe.selection_rule, "
        "lorapipe.charts, lorapipe.stages.select; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
