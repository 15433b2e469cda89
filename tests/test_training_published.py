"""train measures the LoRA published now on its own validation images (``compare_with``).

Scheduled retraining moves ``latest.json`` to a new LoRA only if it is not worse than the one
published, on the same images with the same deterministic validation loss. With
``compare_with`` set, training ends by measuring the published LoRA in its own models and
writes ``published_validation.json`` (and the same record under ``published_validation`` in
training_report.json) for select to compare: ``measured``, ``none_published`` (a first run) or
``incomparable`` (another base model, a LoRA that does not load, no validation images), never
a failed training. Everything else the run writes stays as it was.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from lora_fixtures import TEXT_ENCODER_TARGETS, add_random_lora, publish_folder, save_lora
from safetensors.torch import load_file
from test_train import write_folder

from lorapipe import checkpoint_layout as layout
from lorapipe import lora_format, store
from lorapipe.errors import ConfigError
from lorapipe.models import load_base_model
from lorapipe.report.run_report import stage_page
from lorapipe.stages import select
from lorapipe.stages.train import load_models, run
from lorapipe.train_config import TrainConfig
from lorapipe.training import published
from lorapipe.training.checkpoints import Checkpointer

RTOL = 1e-5  # the published LoRA's loss against the one its own run recorded: one computation
# training_report.json keys that differ between two runs of one config: times and speeds
RUN_DEPENDENT_REPORT_KEYS = {"started_at", "finished_at", "samples_per_second", "sample_seconds"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "shapes", 8)


def small_config(base_model: Path, cache_dir: Path, **changes: Any) -> TrainConfig:
    """A few steps on the tiny model, two images held out, no sample images."""
    config = TrainConfig(
        base_model=str(base_model),
        cache_dir=str(cache_dir),
        batch_size=2,
        learning_rate=3e-3,
        validation_split=2,
        save_steps=2,
        max_train_steps=4,
        sample_prompts=[],
    )
    return dataclasses.replace(config, **changes)


@dataclass(frozen=True)
class PublishedRun:
    """Run A: trained, selected, and published by hand as select's publish_uri would be."""

    config: TrainConfig
    output: Path  # A's training output
    selected: Path  # select's output folder
    publish_uri: Path  # holding latest.json -> selected
    chosen_record: dict[str, Any]  # record.json of the checkpoint select chose


def train_and_publish(config: TrainConfig, images: Path, root: Path) -> PublishedRun:
    output, selected, publish_uri = root / "a", root / "selected-a", root / "loras"
    run(str(images), str(output), config)
    report = select.run(str(output), str(selected))
    publish_uri.mkdir()
    (publish_uri / "latest.json").write_text(json.dumps({"run_id": "a", "uri": str(selected)}))
    chosen = layout.read_record(output / layout.checkpoint_name(report["chosen"]["step"]))
    return PublishedRun(config, output, selected, publish_uri, chosen)


@pytest.fixture(scope="module")
def run_a(
    images: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> PublishedRun:
    root = tmp_path_factory.mktemp("run-a")
    return train_and_publish(small_config(tiny_model_dir, root / "cache"), images, root)


def quick(config: TrainConfig, **changes: Any) -> TrainConfig:
    """One step and one checkpoint: the published LoRA's loss does not depend on this run's
    training, only on its validation images and base model."""
    return dataclasses.replace(config, max_train_steps=1, save_steps=0, **changes)


def loss_log(output: Path) -> list[dict[str, str]]:
    with (output / layout.LOSS_LOG_NAME).open() as file:
        return list(csv.DictReader(file))


# --------------------------------------------------------------------------- measured


def test_the_published_lora_gets_the_loss_its_own_run_recorded_and_nothing_else_changes(
    run_a: PublishedRun, images: Path, tmp_path: Path
) -> None:
    """Run B: A's config and data, compare_with A's publish_uri."""
    config = dataclasses.replace(run_a.config, compare_with=str(run_a.publish_uri))
    report = run(str(images), str(tmp_path / "b"), config)

    record = layout.read_published_validation(tmp_path / "b")
    assert record is not None and set(record) == {
        "compare_with", "status", "reason", "run_id", "uri", "val_loss", "val_loss_by_timestep",
        "validation_images", "base_model_hash", "measured_at",
    }  # fmt: skip
    assert (record["status"], record["reason"]) == ("measured", "")
    assert (record["run_id"], record["uri"]) == ("a", str(run_a.selected))
    assert record["compare_with"] == str(run_a.publish_uri)
    assert record["val_loss"] == pytest.approx(run_a.chosen_record["val_loss"], rel=RTOL)
    assert record["val_loss_by_timestep"] == pytest.approx(
        run_a.chosen_record["val_loss_by_timestep"], rel=RTOL
    )
    page = stage_page("train", str(tmp_path / "b"))  # the train section says so too
    assert "(run a), measured on this run's validation images: validation loss" in page
    assert record["validation_images"] == 2
    assert record["base_model_hash"] == report["base_model_hash"]  # as select recorded it
    assert report[layout.PUBLISHED_VALIDATION_KEY] == record

    # B trained exactly what A trained, and reports what A reported
    assert loss_log(tmp_path / "b") == loss_log(run_a.output)
    a_steps = layout.complete_checkpoints(str(run_a.output))
    assert sorted(layout.complete_checkpoints(str(tmp_path / "b"))) == sorted(a_steps) == [2, 4]
    for step in a_steps:
        name = layout.checkpoint_name(step)
        b_record, a_record = (
            layout.read_record(out / name) for out in (tmp_path / "b", run_a.output)
        )
        assert {**b_record, "wall_time": None} == {**a_record, "wall_time": None}
        b_lora, a_lora = (
            load_file(out / name / lora_format.DIFFUSERS_WEIGHT_NAME)
            for out in (tmp_path / "b", run_a.output)
        )
        assert b_lora.keys() == a_lora.keys()
        assert all(torch.equal(b_lora[key], a_lora[key]) for key in a_lora)
    a_report = json.loads((run_a.output / layout.TRAINING_REPORT_NAME).read_text())
    assert set(report) - set(a_report) == {layout.PUBLISHED_VALIDATION_KEY}
    for key in set(a_report) - RUN_DEPENDENT_REPORT_KEYS - {"config"}:
        assert report[key] == a_report[key], key
    assert report["config"] == {
        **a_report["config"],
        "output_dir": str(tmp_path / "b"),
        "compare_with": str(run_a.publish_uri),
    }


def test_without_compare_with_nothing_is_measured_or_written(run_a: PublishedRun) -> None:
    assert layout.read_published_validation(run_a.output) is None
    report = json.loads((run_a.output / layout.TRAINING_REPORT_NAME).read_text())
    assert layout.PUBLISHED_VALIDATION_KEY not in report


def test_a_lora_folder_or_file_is_measured_like_a_publish_uri(
    run_a: PublishedRun, images: Path, tmp_path: Path
) -> None:
    weights = run_a.selected / lora_format.DIFFUSERS_WEIGHT_NAME
    for name, compare_with in (("folder", run_a.selected), ("file", weights)):
        run(str(images), str(tmp_path / name), quick(run_a.config, compare_with=str(compare_with)))
        record = layout.read_published_validation(tmp_path / name)
        assert (record["status"], record["run_id"], record["uri"]) == (
            "measured",
            None,
            str(compare_with),
        )
        assert record["val_loss"] == pytest.approx(run_a.chosen_record["val_loss"], rel=RTOL)


def test_a_publish_while_the_run_trains_does_not_change_what_is_measured(
    run_a: PublishedRun, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_uri = tmp_path / "loras"
    shutil.copytree(run_a.publish_uri, publish_uri)
    save = Checkpointer.save

    def save_then_publish_another(self: Checkpointer, *args: Any, **kwargs: Any) -> None:
        save(self, *args, **kwargs)
        pointer = {"run_id": "c", "uri": str(tmp_path / "nowhere")}
        (publish_uri / "latest.json").write_text(json.dumps(pointer))

    monkeypatch.setattr(Checkpointer, "save", save_then_publish_another)
    run(str(images), str(tmp_path / "b"), quick(run_a.config, compare_with=str(publish_uri)))

    assert json.loads((publish_uri / "latest.json").read_text())["run_id"] == "c"
    record = layout.read_published_validation(tmp_path / "b")
    assert (record["status"], record["run_id"]) == ("measured", "a")
    assert record["val_loss"] == pytest.approx(run_a.chosen_record["val_loss"], rel=RTOL)


def test_an_s3_publish_uri_is_followed_and_the_record_is_mirrored(
    run_a: PublishedRun, images: Path, s3_bucket: str
) -> None:
    """select's own publish on S3: the run folder is a versioned output behind a pointer."""
    run_folder = publish_folder(run_a.selected, f"{s3_bucket}/loras", "a").uri
    output = f"{s3_bucket}/runs/b"
    config = quick(run_a.config, compare_with=f"{s3_bucket}/loras")
    report = run(str(images), output, config)

    record = layout.read_published_validation(output)
    assert (record["status"], record["run_id"], record["uri"]) == ("measured", "a", run_folder)
    assert record["val_loss"] == pytest.approx(run_a.chosen_record["val_loss"], rel=RTOL)
    assert report[layout.PUBLISHED_VALIDATION_KEY] == record
    mirrored = json.loads(store.read_text(f"{output}/{layout.TRAINING_REPORT_NAME}"))
    assert mirrored[layout.PUBLISHED_VALIDATION_KEY] == record


def test_an_sdxl_run_measures_its_published_lora_text_encoders_included(
    images: Path, tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    """Both runs train both text encoders: the published adapter sits beside the trained one
    in the UNet and in each text encoder."""
    config = small_config(
        tiny_sdxl_dir,
        tmp_path / "cache",
        train_text_encoder=True,
        target_modules=["to_q", "to_v", "q_proj", "v_proj"],
        max_train_steps=2,
    )
    run_xl = train_and_publish(config, images, tmp_path)
    run(str(images), str(tmp_path / "b"), quick(config, compare_with=str(run_xl.publish_uri)))

    record = layout.read_published_validation(tmp_path / "b")
    assert record["status"] == "measured"
    assert record["val_loss"] == pytest.approx(run_xl.chosen_record["val_loss"], rel=RTOL)
    assert record["val_loss_by_timestep"] == pytest.approx(
        run_xl.chosen_record["val_loss_by_timestep"], rel=RTOL
    )


# --------------------------------------------------------------------------- not measured


def test_the_first_run_finds_nothing_published_and_trains_as_usual(
    run_a: PublishedRun, images: Path, tmp_path: Path
) -> None:
    nothing_yet = tmp_path / "loras"
    report = run(
        str(images), str(tmp_path / "b"), quick(run_a.config, compare_with=str(nothing_yet))
    )

    record = layout.read_published_validation(tmp_path / "b")
    assert record["status"] == "none_published"
    assert record["reason"] == f"no LoRA is published at {nothing_yet} yet (no latest.json there)"
    assert (record["run_id"], record["uri"], record["val_loss"]) == (None, None, None)
    assert record["val_loss_by_timestep"] is None and record["validation_images"] == 2
    assert layout.complete_checkpoints(str(tmp_path / "b")) and report["steps"] == 1


def test_a_lora_trained_on_another_base_model_is_incomparable(
    run_a: PublishedRun, images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """select records the base model's hash in the LoRA; another hash is another base model
    (a fine-tune of the same architecture loads fine, but its losses mean something else)."""
    other = tmp_path / "other-base"
    shutil.copytree(run_a.selected, other)
    weights = other / lora_format.DIFFUSERS_WEIGHT_NAME
    state_dict, metadata, kind = lora_format.load_lora_state_dict(str(weights))
    modules = lora_format.modules_from_state_dict(state_dict, metadata, kind)
    lora_format.save_diffusers(
        weights, modules, {**metadata, "lorapipe.base_model_hash": "cd" * 32}
    )

    with caplog.at_level("WARNING", logger="lorapipe"):
        run(str(images), str(tmp_path / "b"), quick(run_a.config, compare_with=str(other)))

    record = layout.read_published_validation(tmp_path / "b")
    assert (record["status"], record["val_loss"], record["base_model_hash"]) == (
        "incomparable",
        None,
        "cd" * 32,
    )
    assert "was trained on another base model (base_model_hash cdcdcdcdcdcd..." in record["reason"]
    assert any(record["reason"] in message for message in caplog.messages)


def test_an_sdxl_lora_does_not_load_into_an_sd1_run(
    run_a: PublishedRun, images: Path, tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    sdxl = load_base_model(str(tiny_sdxl_dir))
    add_random_lora(sdxl, text_encoder_targets=TEXT_ENCODER_TARGETS)
    lora_file = save_lora(sdxl, tmp_path / "sdxl-lora")  # no base model hash: the family decides

    run(str(images), str(tmp_path / "b"), quick(run_a.config, compare_with=str(lora_file)))

    record = layout.read_published_validation(tmp_path / "b")
    assert (record["status"], record["uri"]) == ("incomparable", str(lora_file))
    assert record["reason"].startswith("the published LoRA does not load into this run's model: ")
    assert "is for SDXL" in record["reason"] and "\n" not in record["reason"]


def test_a_run_without_validation_images_cannot_measure(
    run_a: PublishedRun, images: Path, tmp_path: Path
) -> None:
    config = quick(run_a.config, validation_split=0, compare_with=str(run_a.publish_uri))
    run(str(images), str(tmp_path / "b"), config)

    record = layout.read_published_validation(tmp_path / "b")
    assert (record["status"], record["validation_images"]) == ("incomparable", 0)
    assert record["reason"].startswith("this run holds out no validation images")
    assert record["run_id"] == "a"  # what was published, all the same


# --------------------------------------------------------------------------- resolution


def test_a_latest_json_that_points_nowhere_is_incomparable(tmp_path: Path) -> None:
    (tmp_path / "latest.json").write_text(json.dumps({"run_id": "a", "uri": str(tmp_path / "a")}))
    found = published.resolve(str(tmp_path))
    assert (found.status, found.weights_uri, found.run_id) == ("incomparable", None, "a")
    assert found.reason.endswith(
        f"points at {tmp_path / 'a'}, which holds no pytorch_lora_weights.safetensors"
    )

    (tmp_path / "latest.json").write_text("{")
    assert published.resolve(str(tmp_path)).reason.startswith(f"{tmp_path / 'latest.json'} line 1")


def test_a_safetensors_file_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="compare_with '.*missing.safetensors' does not exist"):
        published.resolve(str(tmp_path / "missing.safetensors"))


# --------------------------------------------------------------------------- the adapter


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_the_published_adapter_is_alone_in_the_block_and_gone_after_it(
    mixed_precision: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The published LoRA adapts more layers than training did (a UNet projection and every
    text-encoder layer kind), and under mixed precision diffusers casts a text encoder's
    adapters when it loads one: the trained adapters are back, bit for bit, all the same."""
    base = load_base_model(str(tiny_model_dir))
    add_random_lora(
        base, unet_targets=("to_q", "to_k", "proj_in"), text_encoder_targets=TEXT_ENCODER_TARGETS
    )
    lora_file = save_lora(base, tmp_path)
    config = small_config(
        tiny_model_dir,
        tmp_path / "cache",
        train_text_encoder=True,
        target_modules=["to_q", "to_v", "q_proj", "v_proj"],
        mixed_precision=mixed_precision,
    )
    models = load_models(config, Accelerator(cpu=True))
    trained = [models.unet, models.text_encoders["text_encoder"]]
    generator = torch.Generator().manual_seed(0)
    for parameter in (p for model in trained for p in model.parameters() if p.requires_grad):
        parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    for model in trained:
        model.train()  # transformers puts a text encoder it loads an adapter into in eval mode
    before = [model_state(model) for model in trained]
    trained_output = denoise(
        models.unet, models.text_encoders["text_encoder"], models.tokenizers[0]
    )

    with published.published_adapter(models, str(lora_file)):
        published_output = denoise(
            models.unet, models.text_encoders["text_encoder"], models.tokenizers[0]
        )

    assert not torch.allclose(published_output, trained_output)
    for model, state in zip(trained, before, strict=True):
        assert_same_state(model_state(model), state)
    after = denoise(models.unet, models.text_encoders["text_encoder"], models.tokenizers[0])
    assert torch.equal(after, trained_output)
    if mixed_precision == "no":  # what the LoRA alone does to the base model
        alone = load_base_model(str(tiny_model_dir))
        lora_format.load_into_pipeline(alone, str(lora_file), adapter_name="only")
        expected = denoise(alone.unet, alone.text_encoder, alone.tokenizer)
        torch.testing.assert_close(published_output, expected, rtol=1e-5, atol=1e-6)


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything measuring must leave as it was: modules, parameters (values, dtypes,
    requires_grad), active adapters, PEFT attributes."""
    return {
        "modules": [
            (name, f"{type(module).__module__}.{type(module).__qualname__}", module.training)
            for name, module in model.named_modules()
        ],
        "parameters": {
            name: (parameter.dtype, parameter.requires_grad, parameter.detach().clone())
            for name, parameter in model.named_parameters()
        },
        "active": [
            (name, list(module.active_adapters))
            for name, module in model.named_modules()
            if hasattr(module, "active_adapters") and hasattr(module, "lora_A")
        ],
        "peft_config": sorted(getattr(model, "peft_config", {})),
        "attributes": sorted(vars(model)),
    }


def assert_same_state(state: dict[str, Any], expected: dict[str, Any]) -> None:
    parameters, expected_parameters = state.pop("parameters"), expected.pop("parameters")
    assert state == expected
    assert parameters.keys() == expected_parameters.keys()
    for name, (dtype, requires_grad, value) in parameters.items():
        expected_dtype, expected_requires_grad, expected_value = expected_parameters[name]
        assert (dtype, requires_grad) == (expected_dtype, expected_requires_grad), name
        assert torch.equal(value, expected_value), name


def denoise(unet: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    """One UNet prediction conditioned on one caption."""
    input_ids = tokenizer(
        ["a red circle"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden_states = text_encoder(input_ids).last_hidden_state
        prediction = unet(latents.to(unet.dtype), torch.tensor([500]), hidden_states.to(unet.dtype))
    return prediction.sample.float()
