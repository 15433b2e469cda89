"""``lorapipe train`` on the tiny model: it learns, writes the checkpoint layout `select` reads,
gives the same LoRA on 2 processes as on 1, resumes a killed run exactly, has a deterministic
validation loss, and answers bad configs with one line."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from lorapipe import checkpoint_layout as layout
from lorapipe import cli, store
from lorapipe.dataset import DatasetWriter, ImageRecord
from lorapipe.stages import select
from lorapipe.stages.train import load_models, run, training_noise_scheduler, validate_checkpoint
from lorapipe.train_config import TrainConfig

COLORS = ("red", "green", "blue", "yellow")
SIZES = ((80, 72), (56, 96), (96, 56))  # in buckets 64x56, 48x80 and 80x48 at resolution 64
SHAPES = ("circle", "square")
# Wide targets and a high learning rate: the tiny random UNet learns visibly in a few steps.
WIDE_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "conv1",
    "conv2",
]
# Two processes at batch b vs one at 2b, same samples, noise and timesteps: the losses agree to
# float32 rounding; Adam's normalised steps amplify last-bit differences in the weights a little.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-4


def shape_image(index: int) -> tuple[Image.Image, str]:
    """A coloured shape on white; landscape, portrait and near-square images take turns, so
    training runs in several aspect-ratio buckets."""
    color, shape = COLORS[index % 4], SHAPES[(index // 4) % 2]
    width, height = SIZES[index % len(SIZES)]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    box = (0.15 * width + index % 3, 0.1 * height, 0.8 * width, 0.85 * height)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return image, f"a {color} {shape}, white background"


def write_folder(folder: Path, count: int) -> Path:
    """A lora-scripts style folder: images plus metadata.csv (filename,text)."""
    folder.mkdir(parents=True)
    with (folder / "metadata.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filename", "text"])
        for index in range(count):
            image, caption = shape_image(index)
            image.save(folder / f"img_{index:03d}.png")
            writer.writerow([f"img_{index:03d}.png", caption])
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "shapes", 8)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def config(tiny_model_dir: Path, cache_dir: Path) -> TrainConfig:
    return TrainConfig(
        base_model=str(tiny_model_dir),
        cache_dir=str(cache_dir),
        batch_size=2,
        learning_rate=3e-3,
        validation_split=2,
        save_steps=2,
        max_train_steps=4,
        # sample images stay on (the default), so every test here also shows they change
        # nothing; at 2 steps they cost little (tests/test_training_samples.py looks at them)
        sample_steps=2,
    )


def losses(output: Path) -> list[float]:
    with (output / "loss_log.csv").open() as file:
        return [float(row["loss"]) for row in csv.DictReader(file)]


def lora(output: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(output / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors")


def assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=WEIGHT_ATOL, rtol=0, msg=key)


def lorapipe_train(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lorapipe.cli", "train", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def flags(config: TrainConfig, **changes: object) -> list[str]:
    """``config`` as command-line flags."""
    args = []
    for key, value in dataclasses.asdict(dataclasses.replace(config, **changes)).items():
        if value in ("", None):
            continue
        if isinstance(value, bool):
            args.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        elif isinstance(value, list):
            args += [f"--{key.replace('_', '-')}", *map(str, value)]
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


# --------------------------------------------------------------------------- learning


def test_a_lora_overfits_four_images(images: Path, config: TrainConfig, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "four", 4)
    config = dataclasses.replace(
        config,
        target_modules=WIDE_TARGETS,
        batch_size=4,
        max_train_steps=40,
        validation_split=0,
        save_steps=0,
    )
    run(str(folder), str(tmp_path / "out"), config)
    curve = losses(tmp_path / "out")
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5  # means: single steps are noisy
    assert last < 0.6 * first, curve


# --------------------------------------------------------------------------- outputs


def test_checkpoints_have_the_layout_select_reads(
    images: Path, config: TrainConfig, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    report = run(
        str(images), str(output), dataclasses.replace(config, target_modules=["q_proj", "v_proj"])
    )

    complete, incomplete = layout.find_checkpoints(str(output))
    assert sorted(complete) == [2, 4] and not incomplete
    record = json.loads((output / "checkpoint-4" / "record.json").read_text())
    # buckets of 3, 2 and 1 training images at global batch 2: batches of 2, 1, 2 and 1 (the
    # remainders trained as shorter batches), 4 steps to the epoch
    assert record["step"] == 4 and record["epoch"] == 1 and record["samples_seen"] == 6
    assert set(record["val_loss_by_timestep"]) == {"100", "300", "500", "700", "900"}
    assert layout.read_losses(complete[4], 4).val_loss == pytest.approx(record["val_loss"])
    modules = select.load_checkpoint_lora(complete[4])
    assert {name.rsplit(".", 1)[-1] for name in modules} == {"to_q", "to_v"}  # the seed's names
    assert all(m.rank == 16 and m.alpha == 16.0 for m in modules.values())
    assert all(key.startswith("unet.") and ".lora_" in key for key in lora(output, 4))

    assert json.loads((output / "training_report.json").read_text()) == report
    assert report["num_train_images"] == 6 and report["num_val_images"] == 2
    assert report["global_batch_size"] == 2 and report["steps"] == 4
    assert [(b["resolution"], b["images"]) for b in report["buckets"]] == [
        ([48, 80], 3),
        ([64, 56], 2),
        ([80, 48], 1),
    ]
    assert report["short_batches"] == 2 and report["enable_bucket"] is True
    assert report["tag_frequency"]["white background"] == 6
    assert [row["step"] for row in csv.DictReader((output / "loss_log.csv").open())] == [
        "1",
        "2",
        "3",
        "4",
    ]
    assert list((output / "logs").glob("events.out.tfevents.*"))


@pytest.mark.slow  # two trainings and two selections: ~45 s on 2 cores
def test_keep_last_n_does_not_change_what_select_chooses(
    images: Path, config: TrainConfig, tmp_path: Path
) -> None:
    config = dataclasses.replace(config, max_train_steps=8)
    chosen = {}
    for keep_last_n in (0, 1):
        output = tmp_path / f"keep-{keep_last_n}"
        run(str(images), str(output), dataclasses.replace(config, keep_last_n=keep_last_n))
        report = select.run(str(output), str(tmp_path / f"selected-{keep_last_n}"))
        chosen[keep_last_n] = report["chosen"]["step"], report["chosen"]["value"]
    assert sorted(layout.complete_checkpoints(str(tmp_path / "keep-0"))) == [2, 4, 6, 8]
    assert 8 in layout.complete_checkpoints(str(tmp_path / "keep-1"))
    assert chosen[1] == chosen[0]


def test_validation_loss_of_a_checkpoint_is_the_same_when_computed_again(
    images: Path, config: TrainConfig, tmp_path: Path
) -> None:
    config = dataclasses.replace(config, max_train_steps=2, train_data_dir=str(images))
    run(str(images), str(tmp_path / "out"), config)
    record = json.loads((tmp_path / "out" / "checkpoint-2" / "record.json").read_text())
    first = validate_checkpoint(tmp_path / "out" / "checkpoint-2", config)
    second = validate_checkpoint(tmp_path / "out" / "checkpoint-2", config)
    assert first == second
    assert first.mean == record["val_loss"]
    assert first.by_timestep == record["val_loss_by_timestep"]


def test_a_lorapipe_dataset_holds_out_an_image_with_its_mirror(
    config: TrainConfig, tmp_path: Path
) -> None:
    dataset = str(tmp_path / "dataset")
    with DatasetWriter(dataset) as writer:
        for index in range(4):
            image, caption = shape_image(index)
            for flipped in (False, True):
                pixels = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else image
                record_id = f"{index:016x}" + ("-flip" if flipped else "")
                png = tmp_path / "x.png"
                pixels.save(png)
                writer.write(
                    ImageRecord(
                        id=record_id, image=png.read_bytes(), format="png", width=80, height=72,
                        sha256=f"{index}-{flipped}".ljust(64, "0"), caption=caption,
                        tags=["white background"], flipped=flipped,
                        parent_id=f"{index:016x}" if flipped else None,
                    )
                )  # fmt: skip
    report = run(
        dataset,
        str(tmp_path / "out"),
        dataclasses.replace(config, validation_split=1, max_train_steps=1),
    )
    assert (report["num_train_images"], report["num_val_images"]) == (6, 2)


@pytest.mark.parametrize(
    "options",
    [
        {
            "train_text_encoder": True,
            "target_modules": ["q_proj", "v_proj"],
            "text_encoder_lr": 5e-4,
            "gradient_checkpointing": True,
            "gradient_accumulation_steps": 2,
        },
        {
            "flip_aug": True,
            "shuffle_caption": True,
            "keep_tokens": 1,
            "caption_dropout_rate": 0.2,
            "crop": "random",
            "snr_gamma": 5.0,
            "noise_offset": 0.05,
            "scheduler": "cosine",
            "lr_warmup_steps": 2,
            "optimizer": "sgd",
        },
    ],
    ids=["text-encoder", "augmentations"],
)
def test_training_options_run_end_to_end(
    options: dict[str, object], images: Path, config: TrainConfig, tmp_path: Path
) -> None:
    report = run(str(images), str(tmp_path / "out"), dataclasses.replace(config, **options))
    assert len(losses(tmp_path / "out")) == 4
    weights = lora(tmp_path / "out", 4)
    assert any(key.startswith("text_encoder.") for key in weights) == bool(
        options.get("train_text_encoder")
    )
    assert report["config"] == {**report["config"], **options}


def test_square_training_names_the_images_its_crop_cuts_most(
    images: Path, config: TrainConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    square = dataclasses.replace(config, enable_bucket=False, max_train_steps=1, save_steps=0)
    with caplog.at_level("WARNING", logger="lorapipe"):
        report = run(str(images), str(tmp_path / "out"), square)
    assert [b["resolution"] for b in report["buckets"]] == [[64, 64]]
    assert report["square_crop_fraction"] == report["mean_crop_fraction"] > 0.2
    (warning,) = [r.getMessage() for r in caplog.records if "lose more than" in r.getMessage()]
    assert warning.startswith("4 training images lose more than 20% of their pixels")
    assert "img_001.png 42%" in warning and warning.endswith(
        "enable_bucket: true trains them whole"
    )


def test_v_parameterization_and_zero_terminal_snr_change_the_training_schedule(
    tiny_model_dir: Path,
) -> None:
    scheduler_config = json.loads(
        (tiny_model_dir / "scheduler" / "scheduler_config.json").read_text()
    )
    plain = training_noise_scheduler(TrainConfig(), scheduler_config)
    assert plain.config.prediction_type == "epsilon"
    v_pred = training_noise_scheduler(
        TrainConfig(v_parameterization=True, zero_terminal_snr=True), scheduler_config
    )
    assert v_pred.config.prediction_type == "v_prediction"
    assert v_pred.alphas_cumprod[-1] < 1e-6 < plain.alphas_cumprod[-1]  # zero SNR at t = 999


def test_an_sdxl_run_records_its_family_and_keeps_the_vae_in_float32_under_fp16(
    images: Path, config: TrainConfig, tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    sdxl = dataclasses.replace(
        config, base_model=str(tiny_sdxl_dir), max_train_steps=1, save_steps=0
    )
    report = run(str(images), str(tmp_path / "out"), sdxl)
    assert report["model_family"] == "sdxl" and report["resolution"] == 64
    assert report["prediction_type"] == "epsilon"
    accelerator = Accelerator(cpu=True)
    models = load_models(dataclasses.replace(sdxl, mixed_precision="fp16"), accelerator)
    assert models.vae.dtype == torch.float32 and models.unet.dtype == torch.float16
    assert list(models.text_encoders) == ["text_encoder", "text_encoder_2"]


# --------------------------------------------------------------------------- processes


@pytest.fixture(params=["sd1", "sdxl"])
def family_config(
    request: pytest.FixtureRequest, config: TrainConfig, tiny_sdxl_dir: Path
) -> TrainConfig:
    """``config`` on the tiny SD 1.x model and on the tiny SDXL one (two text encoders, pooled
    text and size conditioning), with the text encoders trained on SDXL."""
    if request.param == "sd1":
        return config
    return dataclasses.replace(
        config,
        base_model=str(tiny_sdxl_dir),
        train_text_encoder=True,
        target_modules=["to_q", "to_v", "q_proj", "v_proj"],
    )


def test_two_processes_train_what_one_process_trains_at_double_batch(
    images: Path, family_config: TrainConfig, tmp_path: Path
) -> None:
    config = family_config
    two = lorapipe_train(
        *flags(
            config,
            batch_size=1,
            num_processes=2,
            train_data_dir=str(images),
            output_dir=str(tmp_path / "two"),
        )
    )
    stdout, stderr = two.communicate(timeout=300)
    assert two.returncode == 0, stderr[-3000:]
    one_report = run(str(images), str(tmp_path / "one"), dataclasses.replace(config, batch_size=2))

    two_report = json.loads((tmp_path / "two" / "training_report.json").read_text())
    assert (two_report["num_processes"], two_report["global_batch_size"]) == (2, 2)
    assert one_report["global_batch_size"] == 2
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=LOSS_RTOL)
    assert_same_lora(lora(tmp_path / "two", 4), lora(tmp_path / "one", 4))
    two_record = json.loads((tmp_path / "two" / "checkpoint-4" / "record.json").read_text())
    one_record = json.loads((tmp_path / "one" / "checkpoint-4" / "record.json").read_text())
    assert two_record["val_loss"] == pytest.approx(one_record["val_loss"], rel=LOSS_RTOL)


def test_a_killed_run_resumes_to_the_lora_of_an_uninterrupted_run(
    images: Path, family_config: TrainConfig, tmp_path: Path
) -> None:
    config = dataclasses.replace(
        family_config, max_train_steps=40, save_steps=4, train_data_dir=str(images)
    )
    output = tmp_path / "resumed"
    first = lorapipe_train(*flags(config, output_dir=str(output)))
    deadline = time.monotonic() + 300
    while not (output / "checkpoint-4" / "_COMPLETE").exists():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    assert not (output / "checkpoint-40").exists(), "the run finished before it was killed"

    run(str(images), str(output), dataclasses.replace(config, resume="latest"))
    run(str(images), str(tmp_path / "straight"), config)
    assert_same_lora(lora(output, 40), lora(tmp_path / "straight", 40))
    assert losses(output) == pytest.approx(losses(tmp_path / "straight"), rel=LOSS_RTOL)


def test_resume_from_the_s3_mirror_after_the_local_disk_is_lost(
    images: Path, config: TrainConfig, tmp_path: Path, s3_bucket: str
) -> None:
    output = f"{s3_bucket}/runs/1"
    run(str(images), output, dataclasses.replace(config, max_train_steps=2))
    assert store.exists(f"{output}/checkpoint-2/_COMPLETE")
    assert store.exists(f"{output}/training_report.json") and store.exists(f"{output}/loss_log.csv")
    shutil.rmtree(Path(config.cache_dir) / "train")  # where an s3:// output is trained locally

    run(str(images), output, dataclasses.replace(config, resume="latest"))
    run(str(images), str(tmp_path / "straight"), config)
    complete, _ = layout.find_checkpoints(output)
    assert sorted(complete) == [2, 4]
    with store.local_file(f"{output}/checkpoint-4/pytorch_lora_weights.safetensors") as path:
        assert_same_lora(load_file(path), lora(tmp_path / "straight", 4))


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    images: Path, config: TrainConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = flags(
        config,
        learning_rate=1e30,
        optimizer="sgd",
        max_train_steps=20,
        save_steps=1,
        train_data_dir=str(images),
        output_dir=str(tmp_path / "out"),
    )
    assert cli.main(["train", *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lorapipe train: error: step ")
    assert "the training loss is nan" in error or "the training loss is inf" in error
    complete, _ = layout.find_checkpoints(str(tmp_path / "out"))
    assert complete and error.endswith(
        f"resume from the last good checkpoint, {complete[max(complete)]}"
    )


# --------------------------------------------------------------------------- the seed's config and config errors


SEED_YAML = """\
train_data_dir: "{data}"
metadata_path: "{data}/metadata.csv"
base_model: "{model}"
lora_rank: 16
lora_alpha: 32
target_modules: ["q_proj", "v_proj"]
batch_size: 4
epochs: 20
learning_rate: 1e-4
optimizer: "AdamW"
scheduler: "cosine"
output_dir: "./output/film_style_lora"
save_steps: 100
log_dir: "./output/film_style_lora/logs"
"""


def test_the_seed_yaml_runs_as_written(images: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "configs" / "my_film_config.yaml"
    config_file.parent.mkdir()
    config_file.write_text(SEED_YAML.format(data=images, model=tiny_model_dir))
    process = lorapipe_train("--config", str(config_file), cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]

    output = tmp_path / "output" / "film_style_lora"
    assert "LoRA on 16 UNet layers: to_q (8), to_v (8)" in stderr
    # 7 training images in 3 buckets at batch 4: 3 steps per epoch, x 20 epochs
    assert sorted(layout.find_checkpoints(str(output))[0]) == [60]
    assert "aspect-ratio buckets at resolution 64" in stderr  # the default, as in kohya
    assert json.loads((output / "checkpoint-60" / "lora_config.json").read_text()) == {
        "rank": 16,
        "alpha": 32.0,
        "unet_target_modules": ["to_q", "to_v"],
        "text_encoder_target_modules": [],
    }
    assert list((output / "logs").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "learning_rat: 1e-4\n",
            "line 2: unknown key 'learning_rat'; did you mean 'learning_rate'?",
        ),
        ("batch_size: four\n", "line 2: key 'batch_size' must be a whole number, got 'four'"),
        (
            "target_modules: [to_q, attn_x]\n",
            "target_modules: 'attn_x' matches no layer of the UNet; available: ",
        ),
    ],
)
def test_config_errors_are_one_line(
    yaml_text: str,
    expected: str,
    images: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"base_model: {tiny_model_dir}\n{yaml_text}")
    assert cli.main(["train", "--config", str(config_file), "--train-data-dir", str(images)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("lorapipe train: error: ")
    assert expected in error


@pytest.mark.parametrize(
    ("base_model", "expected"),
    [
        ("missing-model", "base model 'missing-model' does not exist"),
        ("v1-5-pruned.safetensors", "is not a safetensors file (its header does not parse)"),
    ],
)
def test_an_unusable_base_model_is_one_line(
    base_model: str, expected: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "v1-5-pruned.safetensors").write_bytes(b"\0" * 16)
    args = ["train", "--base-model", str(tmp_path / base_model), "--train-data-dir", str(images)]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert expected.replace("'missing-model'", f"'{tmp_path / 'missing-model'}'") in error
