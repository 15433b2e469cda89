"""Publishing: every run under its id, latest.json moved only to a LoRA that is not worse, the
history kept, and a scheduled run on unchanged inputs told that there is nothing to train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lora_fixtures import selected_lora_folder

from lorapipe import publication, store
from lorapipe.errors import InputError
from lorapipe.publication import Candidate, decide, publishing, read_latest, retrain_decision


def _candidate(run_id: str, val_loss: float | None = 0.10, **fields) -> Candidate:
    values = dict(fingerprint=f"fp-{run_id}", checkpoint_step=100, base_model_hash="base-a")
    return Candidate(run_id=run_id, val_loss=val_loss, **{**values, **fields})


def _measured(run_id: str | None, val_loss: float | None, status: str = "measured") -> dict:
    return {"status": status, "run_id": run_id, "val_loss": val_loss, "reason": "why not"}


def _publish(publish_uri: str, lora: Path, candidate: Candidate, measured=None, **options):
    options = {"promote": "better", "epsilon": 0.01, **options}
    with publishing(publish_uri) as published:
        record = published.record(candidate, measured, **options)
        return published.publish(lora, record), record


def test_every_run_is_copied_under_its_id_and_latest_moves_when_promoted(
    tmp_path: Path, s3_bucket: str
) -> None:
    lora = selected_lora_folder(tmp_path / "lora")
    loras = f"{s3_bucket}/loras"

    first, _ = _publish(loras, lora, _candidate("run/1 (retry)", 0.20))
    second, record = _publish(
        loras, lora, _candidate("run-2", 0.15), _measured("run/1 (retry)", 0.2)
    )

    assert first["uri"] == f"{s3_bucket}/loras/run-1-retry"
    assert store.read_bytes(f"{first['uri']}/filmstyle.safetensors") == b"kohya"
    assert store.is_complete(first["uri"]) and store.is_complete(second["uri"])
    latest = read_latest(loras)
    assert (latest["run_id"], latest["uri"], latest["val_loss"]) == ("run-2", second["uri"], 0.15)
    assert record.margin == pytest.approx(-0.25)
    assert [(r["run_id"], r["promoted"]) for r in latest["history"]] == [
        ("run/1 (retry)", True),
        ("run-2", True),
    ]


def test_a_worse_lora_is_kept_under_its_id_and_joins_the_history_only(tmp_path: Path) -> None:
    lora = selected_lora_folder(tmp_path / "lora")
    loras = str(tmp_path / "loras")
    _publish(loras, lora, _candidate("week-1", 0.10))

    latest, record = _publish(loras, lora, _candidate("week-2", 0.13), _measured("week-1", 0.11))

    assert not record.promoted and "18.2% worse" in record.reason
    assert latest["run_id"] == "week-1" and latest["fingerprint"] == "fp-week-1"
    assert (tmp_path / "loras" / "week-2" / "filmstyle.safetensors").is_file()
    assert latest["history"][-1]["compared_val_loss"] == 0.11
    assert latest["history"][-1]["val_loss"] == 0.13


@pytest.mark.parametrize(
    ("measured", "candidate", "promoted", "reason"),
    [
        (_measured("week-1", 0.100), _candidate("new", 0.1009), True, "not worse by more than"),
        (_measured("week-1", 0.100), _candidate("new", 0.1011), False, "1.1% worse"),
        (None, _candidate("new"), False, "compare_with"),
        (_measured("week-0", 0.1), _candidate("new"), False, "moved from run week-0 to run week-1"),
        (_measured(None, None, "none_published"), _candidate("new"), False, "moved from nothing"),
        (_measured("week-1", None, "incomparable"), _candidate("new"), False, "why not"),
        (_measured("week-1", 0.1), _candidate("new", None), False, "no validation loss"),
        (None, _candidate("new", base_model_hash="base-b"), True, "another base model"),
    ],
    ids=[
        "within epsilon",
        "beyond epsilon",
        "not measured",
        "latest moved meanwhile",
        "published meanwhile",
        "incomparable",
        "no validation",
        "another base model",
    ],  # fmt: skip
)
def test_the_promotion_rule(measured, candidate, promoted: bool, reason: str) -> None:
    latest = {"run_id": "week-1", "uri": "loras/week-1", "base_model_hash": "base-a"}

    found, why, *_ = decide(candidate, measured, latest, promote="better", epsilon=0.01)

    assert (found, reason in why) == (promoted, True), why


def test_the_first_lora_and_promote_always_are_promoted_without_a_measurement() -> None:
    latest = {"run_id": "week-1", "uri": "loras/week-1"}
    assert decide(_candidate("a"), None, None, promote="better", epsilon=0)[0]
    assert decide(_candidate("a"), None, latest, promote="always", epsilon=0)[0]


def test_unchanged_inputs_mean_nothing_to_train_unless_forced(tmp_path: Path) -> None:
    lora = selected_lora_folder(tmp_path / "lora")
    loras = str(tmp_path / "loras")
    assert retrain_decision(loras, "fp-week-1", force=False).retrain  # nothing published yet
    _publish(loras, lora, _candidate("week-1"))

    same = retrain_decision(loras, "fp-week-1", force=False)
    changed = retrain_decision(loras, "fp-week-2", force=False)
    forced = retrain_decision(loras, "fp-week-1", force=True)

    assert not same.retrain
    assert same.reason.startswith("no new data since run week-1; nothing trained")
    assert changed.retrain and "inputs changed since run week-1" in changed.reason
    assert forced.retrain and "force_retrain" in forced.reason
    assert retrain_decision("", "fp-week-1", force=False).retrain  # no publish_uri


def test_a_run_that_was_not_promoted_is_not_trained_again_on_the_same_inputs(
    tmp_path: Path,
) -> None:
    """Training is deterministic: the same inputs would train the same, worse LoRA again."""
    lora = selected_lora_folder(tmp_path / "lora")
    loras = str(tmp_path / "loras")
    _publish(loras, lora, _candidate("week-1", 0.10))
    _publish(loras, lora, _candidate("week-2", 0.20), _measured("week-1", 0.10))

    decision = retrain_decision(loras, "fp-week-2", force=False)

    assert not decision.retrain and "since run week-2" in decision.reason
    assert "latest.json stays at run week-1" in decision.reason


def test_an_old_pointer_without_history_still_reads(tmp_path: Path) -> None:
    (tmp_path / publication.LATEST_NAME).write_text(json.dumps({"run_id": "a", "uri": "x"}))
    assert read_latest(str(tmp_path))["history"] == []
    assert retrain_decision(str(tmp_path), "fp", force=False).retrain


def test_a_damaged_latest_json_is_one_line(tmp_path: Path) -> None:
    (tmp_path / publication.LATEST_NAME).write_text("{not json")
    with pytest.raises(InputError, match=r"latest.json is not JSON.*restore it or remove it"):
        read_latest(str(tmp_path))


def test_a_longer_trained_lora_replaces_a_barely_trained_one_and_not_the_reverse(
    tmp_path: Path,
) -> None:
    """End to end on the demo world's base model and images: train measures the published
    LoRA on its validation images (compare_with), select compares and publishes. A LoRA of 40
    steps is promoted over one of 2; a LoRA of 2 steps afterwards is kept under its run id
    only, and the reports say by how much it lost."""
    from lorapipe.demo import inputs as demo
    from lorapipe.stages import ingest, select, train
    from lorapipe.train_config import TrainConfig

    dataset = tmp_path / "dataset"
    raw = demo.write_sample_folder(tmp_path / "raw", count=12)
    ingest.run(str(raw), str(dataset), ingest.IngestConfig(min_size=256, workers=1))
    loras = str(tmp_path / "loras")

    def train_and_publish(run_id: str, steps: int) -> dict:
        config = TrainConfig(
            base_model=str(demo.WORLD_MODEL),
            cache_dir=str(tmp_path / "cache"),
            resolution=64,
            lora_rank=8,
            batch_size=4,
            learning_rate=1e-3,
            max_train_steps=steps,
            save_steps=steps,
            validation_split=0.25,
            sample_prompts=[],
            compare_with=loras,
        )
        train.run(str(dataset), str(tmp_path / run_id), config)
        options = select.SelectConfig(publish_uri=loras, pipeline_run_id=run_id)
        return select.run(str(tmp_path / run_id), str(tmp_path / f"{run_id}-lora"), options)

    barely = train_and_publish("barely", 2)["promotion"]
    longer = train_and_publish("longer", 40)["promotion"]
    again = train_and_publish("barely-again", 2)

    assert barely["promoted"] and barely["reason"] == "the first LoRA published here"
    assert longer["promoted"] and longer["compared_with"] == "barely"
    # the same images, timesteps and noise: the published LoRA scores what its own run did
    assert longer["compared_val_loss"] == pytest.approx(barely["val_loss"], rel=1e-5)
    assert longer["val_loss"] < barely["val_loss"]
    promotion = again["promotion"]
    assert not promotion["promoted"] and promotion["compared_with"] == "longer"
    assert promotion["compared_val_loss"] == pytest.approx(longer["val_loss"], rel=1e-5)
    assert again["metrics"]["val_loss_vs_published"] > 0.01
    assert "stays at run longer" in promotion["reason"]
    latest = read_latest(loras)
    assert latest["run_id"] == "longer"
    assert [(r["run_id"], r["promoted"]) for r in latest["history"]] == [
        ("barely", True), ("longer", True), ("barely-again", False),
    ]  # fmt: skip
    assert store.exists(store.join(loras, "barely-again", "pytorch_lora_weights.safetensors"))
    assert "Not promoted" in (tmp_path / "barely-again-lora" / "report.md").read_text()
