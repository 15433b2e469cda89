"""Progress: the running loss that checkpoints record, loss_log.csv across resumes, TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorapipe.training import progress as progress_module
from lorapipe.training.progress import RunningLoss, TrainingLog
from lorapipe.training.samples import RenderedSamples
from lorapipe.training.validation import ValidationLoss


def test_the_ema_starts_at_the_first_loss_and_the_mean_restarts_at_each_checkpoint() -> None:
    running = RunningLoss()
    running.update(2.0)
    assert running.ema == 2.0
    running.update(1.0)
    assert running.ema == pytest.approx(1.9)
    assert running.take_mean() == 1.5
    assert running.take_mean() is None
    restored = RunningLoss()
    restored.load_state_dict(running.state_dict())
    assert restored.ema == running.ema


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_a_resumed_run_keeps_the_log_up_to_its_checkpoint(tmp_path: Path) -> None:
    paths = SimpleNamespace(local=tmp_path, logs=tmp_path / "logs", mirrors=[])

    def log(start_step: int) -> TrainingLog:
        return TrainingLog(paths, start_step, total_steps=6, enabled=True)

    with log(0) as progress:
        for step in range(1, 6):  # killed after step 5
            progress.step(step, epoch=1, loss=1.0 / step, learning_rate=1e-4, samples=2)
    with log(4) as progress:  # resumed from checkpoint-4
        for step in (5, 6):
            progress.step(step, epoch=2, loss=0.5, learning_rate=1e-4, samples=2)
        progress.validation(6, ValidationLoss(0.4, {"100": 0.3, "900": 0.5}))
    logged = rows(tmp_path / "loss_log.csv")
    assert [(r["step"], r["epoch"]) for r in logged] == [
        ("1", "1"),
        ("2", "1"),
        ("3", "1"),
        ("4", "1"),
        ("5", "2"),
        ("6", "2"),
    ]
    assert logged[1]["loss"] == "0.5" and logged[0]["lr"] == "0.0001"
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 2


def test_other_processes_write_nothing(tmp_path: Path) -> None:
    paths = SimpleNamespace(local=tmp_path, logs=tmp_path / "logs", mirrors=[])
    with TrainingLog(paths, 0, 1, enabled=False) as progress:
        progress.step(1, epoch=1, loss=1.0, learning_rate=1e-4, samples=2)
        progress.validation(1, None)
    assert list(tmp_path.iterdir()) == []


def test_throughput_leaves_out_validation_and_sample_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    paths = SimpleNamespace(local=tmp_path, logs=tmp_path / "logs", mirrors=[])
    with TrainingLog(paths, 0, 1, enabled=False) as progress:
        now[0] = 1.0
        progress.step(1, epoch=1, loss=1.0, learning_rate=1e-4, samples=2)  # 1 s of training
        now[0] = 3.0
        progress.validation(1, None)  # 2 s
        now[0] = 6.0
        progress.sample_images(RenderedSamples(step=1, seconds=3.0, samples=[]))  # 3 s
        now[0] = 7.0  # 1 s writing the checkpoint
        assert progress.throughput == pytest.approx(2 / (1 + 1))
        assert progress.sample_seconds == 3.0
