"""``lorapipe select``: the checkpoint rule, and the LoRA files, plot and report it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_fixtures import (
    add_random_lora,
    record,
    training_report,
    write_training_output,
)
from PIL import Image
from safetensors import safe_open

from lorapipe import lora_format, store
from lorapipe.cli import main as cli
from lorapipe.errors import ConfigError, InputError
from lorapipe.stages.select import CheckpointLosses, SelectConfig, choose_checkpoint, run


def _losses(*rows: tuple[int, float | None, float]) -> list[CheckpointLosses]:
    return [
        CheckpointLosses(step=step, val_loss=val, train_loss_ema=ema) for step, val, ema in rows
    ]


# --------------------------------------------------------------------------- the rule


def test_an_earlier_checkpoint_within_epsilon_of_the_minimum_wins() -> None:
    checkpoints = _losses(
        (100, 0.200, 0.30), (200, 0.1505, 0.25), (300, 0.150, 0.20), (400, 0.160, 0.15)
    )

    selection = choose_checkpoint(checkpoints, epsilon=0.01)

    assert (selection.step, selection.metric) == (200, "val_loss")
    assert (selection.minimum, selection.minimum_step) == (0.150, 300)
    assert "within 1%" in selection.rule and "checkpoint-200" in selection.reason
    assert "0.33% higher" in selection.reason
    assert selection.warnings == ()


def test_the_minimum_wins_when_no_earlier_checkpoint_comes_close() -> None:
    checkpoints = _losses((100, 0.200, 0.3), (200, 0.170, 0.2), (300, 0.150, 0.1))

    selection = choose_checkpoint(checkpoints, epsilon=0.01)

    assert selection.step == 300 and "has the lowest mean validation loss" in selection.reason


def test_ties_go_to_the_earlier_step_even_with_epsilon_zero() -> None:
    checkpoints = _losses((300, 0.150, 0.1), (100, 0.150, 0.3), (200, 0.150, 0.2))

    assert choose_checkpoint(checkpoints, epsilon=0.0).step == 100


def test_a_larger_epsilon_prefers_earlier_checkpoints() -> None:
    checkpoints = _losses((100, 0.160, 0.3), (200, 0.152, 0.2), (300, 0.150, 0.1))

    assert [choose_checkpoint(checkpoints, epsilon=e).step for e in (0.0, 0.02, 0.1)] == [
        300,
        200,
        100,
    ]


def test_without_validation_loss_the_ema_training_loss_decides_with_a_warning() -> None:
    checkpoints = _losses((100, None, 0.30), (200, None, 0.2005), (300, None, 0.20))

    selection = choose_checkpoint(checkpoints)

    assert (selection.step, selection.metric) == (200, "train_loss_ema")
    assert "EMA training loss" in selection.rule
    assert any("noisy" in warning for warning in selection.warnings)


def test_checkpoints_without_a_finite_loss_are_skipped_and_named() -> None:
    checkpoints = _losses((100, float("nan"), 0.3), (200, None, 0.2), (300, 0.150, 0.1))

    selection = choose_checkpoint(checkpoints)

    assert selection.step == 300
    assert any(
        "steps 100, 200 have no finite mean validation loss" in w for w in selection.warnings
    )


def test_asking_for_validation_loss_that_was_never_recorded_is_an_error() -> None:
    with pytest.raises(
        InputError, match="no complete checkpoint recorded a finite mean validation loss"
    ):
        choose_checkpoint(_losses((100, None, 0.3)), metric="val_loss")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SelectConfig(epsilon=-0.1), "epsilon -0.1 must be a number >= 0"),
        (SelectConfig(metric="loss"), "metric 'loss' is unknown"),
        (SelectConfig(output_name="../x"), "output_name '../x' is not a usable LoRA name"),
        (SelectConfig(output_name="style.safetensors"), "without the .safetensors suffix"),
        (SelectConfig(output_name="pytorch_lora_weights"), "would overwrite the diffusers file"),
    ],
)
def test_bad_config_is_one_line(config: SelectConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.validate()


# --------------------------------------------------------------------------- run on a training output


@pytest.fixture(scope="module")
def trained_pipeline(tiny_model_dir: Path):
    """The tiny pipeline with a LoRA on the UNet's attention and two text-encoder layers."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    add_random_lora(pipeline, rank=4, alpha=8.0, text_encoder_targets=("q_proj", "out_proj"))
    return pipeline


RECORDS = [
    record(100, val_loss=0.200, train_loss_ema=0.30, epoch=1),
    record(200, val_loss=0.1512, train_loss_ema=0.25, epoch=2),
    record(300, val_loss=0.150, train_loss_ema=0.20, epoch=3),
]


@pytest.fixture
def training_output(tmp_path: Path, trained_pipeline, tiny_model_dir: Path):
    root = tmp_path / "train-out"
    saved = write_training_output(
        root,
        trained_pipeline,
        RECORDS,
        incomplete_steps=[400],
        report=training_report(tiny_model_dir),
    )
    return root, saved


def test_select_writes_both_lora_files_of_the_chosen_checkpoint(
    training_output, tmp_path: Path
) -> None:
    root, saved = training_output
    out = tmp_path / "selected"

    report = run(str(root), str(out), SelectConfig(pipeline_run_id="run-42"))

    assert report["chosen"]["step"] == 200
    diffusers_state, _, found = lora_format.load_lora_state_dict(
        str(out / "pytorch_lora_weights.safetensors")
    )
    assert found == "diffusers"
    chosen = {
        key.removeprefix("text_encoder.").removeprefix("unet."): value
        for key, value in saved[200].items()
    }
    for key, tensor in diffusers_state.items():
        module_key = key.removeprefix("unet.").removeprefix("text_encoder.text_model.")
        assert torch.equal(tensor, chosen[module_key]), key
    assert len(diffusers_state) == len(chosen)

    kohya_state, kohya_header, found = lora_format.load_lora_state_dict(
        str(out / "film_style.safetensors")
    )
    assert found == "kohya"
    assert {kohya_state[k].item() for k in kohya_state if k.endswith(".alpha")} == {8.0}
    assert kohya_header["ss_output_name"] == "film_style"
    assert (kohya_header["ss_steps"], kohya_header["ss_epoch"]) == ("200", "2")
    assert (kohya_header["ss_network_dim"], kohya_header["ss_network_alpha"]) == ("4", "8.0")
    assert kohya_header["ss_text_encoder_lr"] == kohya_header["ss_learning_rate"] == "0.0001"
    assert (
        kohya_header["ss_resolution"] == "(64, 64)" and kohya_header["ss_num_train_images"] == "12"
    )
    assert json.loads(kohya_header["ss_tag_frequency"]) == {
        "film_street": {"film grain": 12, "street": 9, "night": 4}
    }
    assert json.loads(kohya_header["ss_bucket_info"]) == {
        "buckets": {
            "0": {"resolution": [48, 72], "count": 8},
            "1": {"resolution": [64, 64], "count": 4},
        },
        "mean_img_ar_error": 0.0,
    }
    assert (kohya_header["ss_enable_bucket"], kohya_header["ss_bucket_no_upscale"]) == (
        "True",
        "False",
    )
    assert (kohya_header["ss_min_bucket_reso"], kohya_header["ss_max_bucket_reso"]) == ("32", "128")
    assert kohya_header["ss_training_started_at"] == "1735787045.0"
    assert kohya_header["lorapipe.pipeline_run_id"] == "run-42"
    assert kohya_header["lorapipe.checkpoint_step"] == "200"
    assert kohya_header["lorapipe.val_loss"] == "0.1512"
    assert "within 1%" in kohya_header["lorapipe.selection_rule"]
    assert len(kohya_header["sshs_model_hash"]) == 64


def test_select_explains_the_choice_in_json_markdown_plot_and_metrics(
    training_output, tmp_path: Path
) -> None:
    root, _ = training_output
    out = tmp_path / "selected"

    run(str(root), str(out), SelectConfig(output_name="film"))

    selection = json.loads((out / "selection.json").read_text())
    assert selection["chosen"]["step"] == 200 and selection["metric"] == "val_loss"
    assert "earliest complete checkpoint" in selection["rule"]
    assert "checkpoint-200" in selection["reason"]
    assert [c["step"] for c in selection["checkpoints"]] == [100, 200, 300]
    assert [c["within_epsilon"] for c in selection["checkpoints"]] == [False, True, True]
    assert selection["checkpoints"][0]["val_loss_by_timestep"] == pytest.approx(
        {"100": 0.3, "500": 0.2, "900": 0.1}
    )
    assert selection["incomplete_checkpoints"] == [
        {"step": 400, "uri": str(root / "checkpoint-400"), "reason": "no _COMPLETE marker"}
    ]

    metrics = json.loads((out / "metrics.json").read_text())
    v1 = {metric["name"]: metric["numberValue"] for metric in metrics["metrics"]}
    assert (
        v1["selected-step"] == 200
        and v1["selected-val-loss"] == 0.1512
        and v1["min-val-loss"] == 0.150
    )
    assert all(metric["format"] == "RAW" for metric in metrics["metrics"])
    assert (
        metrics["values"]["selected_step"] == 200
        and metrics["values"]["incomplete_checkpoints"] == 1
    )

    markdown = (out / "report.md").read_text()
    assert "![loss curve](loss_curve.png)" in markdown and "`<lora:film:0.7>`" in markdown
    assert "| 200 | 2 | 0.25 | 0.1512 | yes | **chosen** |" in markdown
    assert "checkpoint-400" in markdown

    plot = Image.open(out / "loss_curve.png")
    assert plot.size == (1000, 560)
    pixels = np.asarray(plot.convert("RGB")).reshape(-1, 3)
    assert ((pixels == (200, 0, 0)).all(axis=1)).sum() > 50  # the chosen-point marker
    assert ((pixels == (230, 110, 20)).all(axis=1)).sum() > 50  # the validation curve

    assert (out / "film.safetensors").is_file() and (out / "report.json").is_file()


def test_select_kohya_file_generates_what_the_trained_pipeline_generated(
    training_output, trained_pipeline, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline
    from lora_fixtures import randomize_lora

    root, _ = training_output
    out = tmp_path / "selected"
    run(str(root), str(out))

    def generate(pipeline) -> np.ndarray:
        return pipeline(
            "photo of a cat",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(1),
            cross_attention_kwargs={"scale": 0.7},
        ).images[0]

    randomize_lora(trained_pipeline, seed=200)  # the chosen checkpoint's weights
    expected = generate(trained_pipeline)
    loaded = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    loaded.set_progress_bar_config(disable=True)
    loaded.load_lora_weights(out, weight_name="film_style.safetensors")

    assert np.abs(generate(loaded) - expected).max() < 1e-4


def test_without_validation_loss_select_uses_training_loss_and_warns(
    tmp_path: Path, trained_pipeline, tiny_model_dir: Path
) -> None:
    root = tmp_path / "train-out"
    records = [
        record(100, val_loss=None, train_loss_ema=0.3),
        record(200, val_loss=None, train_loss_ema=0.2),
    ]
    write_training_output(
        root, trained_pipeline, records, report=training_report(tiny_model_dir, output_name=None)
    )

    report = run(str(root), str(tmp_path / "out"))

    assert report["metric"] == "train_loss_ema" and report["chosen"]["step"] == 200
    assert any("noisy" in warning for warning in report["warnings"])
    assert (tmp_path / "out" / "lora.safetensors").is_file()  # the default name
    assert "noisy" in (tmp_path / "out" / "report.md").read_text()


def test_a_training_output_with_no_complete_checkpoint_is_one_line(
    tmp_path: Path, trained_pipeline
) -> None:
    root = tmp_path / "train-out"
    write_training_output(root, trained_pipeline, [], incomplete_steps=[100, 200])

    with pytest.raises(
        InputError,
        match=r"has no complete checkpoint \(a checkpoint-<step>/ directory with _COMPLETE\)",
    ):
        run(str(root), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_selects_and_errors_in_one_line(training_output, tmp_path: Path, capsys) -> None:
    root, _ = training_output

    assert (
        cli(
            [
                "select",
                str(root),
                "--out",
                str(tmp_path / "a"),
                "--epsilon",
                "0",
                "--output-name",
                "film",
            ]
        )
        == 0
    )
    assert "checkpoint-300" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "selection.json").read_text())["chosen"]["step"] == 300

    assert cli(["select", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lorapipe select: error:") and "\n" not in error


def test_cli_publishes_like_the_pipeline_step(training_output, tmp_path: Path, s3_bucket) -> None:
    """`lorapipe select --publish-uri` does what the select component does: the LoRA goes to
    <publish_uri>/<run id>/ and latest.json points at it, with the run's record."""
    root, _ = training_output
    argv = ["select", str(root), "--out", str(tmp_path / "a"), "--output_name", "film"]
    publish = ["--publish-uri", f"{s3_bucket}/loras", "--pipeline-run-id", "run 5"]
    assert cli([*argv, *publish, "--fingerprint", "abc"]) == 0

    latest = json.loads(store.read_text(f"{s3_bucket}/loras/latest.json"))
    assert (latest["run_id"], latest["uri"]) == ("run 5", f"{s3_bucket}/loras/run-5")
    assert (latest["fingerprint"], latest["val_loss"], latest["checkpoint_step"]) == (
        "abc",
        0.1512,
        200,
    )
    assert [record["run_id"] for record in latest["history"]] == ["run 5"]
    assert (
        store.read_bytes(f"{s3_bucket}/loras/run-5/film.safetensors")
        == (tmp_path / "a" / "film.safetensors").read_bytes()
    )


def _published(tmp_path: Path, run_id: str, val_loss: float) -> str:
    """A publish folder whose latest.json points at ``run_id`` with ``val_loss``."""
    folder = tmp_path / "loras"
    folder.mkdir(exist_ok=True)
    latest = {"run_id": run_id, "uri": str(folder / run_id), "val_loss": val_loss, "history": []}
    (folder / "latest.json").write_text(json.dumps(latest))
    return str(folder)


def _measured(training_root: Path, run_id: str, val_loss: float) -> None:
    """What train writes when it measured the published LoRA on its validation images."""
    record = {
        "compare_with": "loras", "status": "measured", "reason": "", "run_id": run_id,
        "uri": f"loras/{run_id}", "val_loss": val_loss, "val_loss_by_timestep": None,
        "validation_images": 2, "base_model_hash": None, "measured_at": "2026-12-01T00:00:00+00:00",
    }  # fmt: skip
    (training_root / "published_validation.json").write_text(json.dumps(record))


def test_a_lora_worse_than_the_published_one_is_written_but_latest_stays(
    training_output, tmp_path: Path
) -> None:
    """The chosen checkpoint's validation loss (0.1512) against the published LoRA's 0.10 on
    the same images: 51% worse, so the new LoRA is published under its run id only."""
    root, _ = training_output
    publish_uri = _published(tmp_path, "week-1", 0.12)
    _measured(root, "week-1", 0.10)

    report = run(
        str(root),
        str(tmp_path / "out"),
        SelectConfig(publish_uri=publish_uri, pipeline_run_id="week-2"),
    )

    promotion = report["promotion"]
    assert not promotion["promoted"]
    assert (promotion["compared_with"], promotion["compared_val_loss"]) == ("week-1", 0.10)
    assert "51.2% worse" in promotion["reason"] and "stays at run week-1" in promotion["reason"]
    latest = json.loads((Path(publish_uri) / "latest.json").read_text())
    assert latest["run_id"] == "week-1"
    assert [(r["run_id"], r["promoted"]) for r in latest["history"]] == [("week-2", False)]
    assert (Path(publish_uri) / "week-2" / "pytorch_lora_weights.safetensors").is_file()
    selection = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert selection["promotion"] == promotion and selection["history"] == latest["history"]
    assert report["metrics"]["promoted"] == 0.0
    assert report["metrics"]["val_loss_vs_published"] == pytest.approx(0.512)
    assert "Not promoted" in (tmp_path / "out" / "report.md").read_text()


def test_a_lora_as_good_as_the_published_one_within_epsilon_is_promoted(
    training_output, tmp_path: Path
) -> None:
    root, _ = training_output
    publish_uri = _published(tmp_path, "week-1", 0.12)
    _measured(root, "week-1", 0.1500)  # 0.1512 is 0.8% worse: within the default 1%

    report = run(
        str(root),
        str(tmp_path / "out"),
        SelectConfig(publish_uri=publish_uri, pipeline_run_id="week-2"),
    )

    assert report["promotion"]["promoted"]
    assert json.loads((Path(publish_uri) / "latest.json").read_text())["run_id"] == "week-2"
    tight = SelectConfig(publish_uri=publish_uri, pipeline_run_id="week-3", promotion_epsilon=0.001)
    _measured(root, "week-2", 0.1500)
    assert not run(str(root), str(tmp_path / "out"), tight)["promotion"]["promoted"]


def test_promote_always_moves_latest_whatever_the_losses(training_output, tmp_path: Path) -> None:
    root, _ = training_output
    publish_uri = _published(tmp_path, "week-1", 0.12)
    _measured(root, "week-1", 0.05)

    config = SelectConfig(publish_uri=publish_uri, pipeline_run_id="week-2", promote="always")
    report = run(str(root), str(tmp_path / "out"), config)

    assert report["promotion"]["promoted"] and "promote: always" in report["promotion"]["reason"]
    assert json.loads((Path(publish_uri) / "latest.json").read_text())["run_id"] == "week-2"


def test_an_unmeasured_published_lora_is_not_replaced(training_output, tmp_path: Path) -> None:
    """Train measured nothing (no compare_with): the new LoRA is not promoted, and the reason
    says how to measure or to promote anyway."""
    root, _ = training_output
    publish_uri = _published(tmp_path, "week-1", 0.12)

    config = SelectConfig(publish_uri=publish_uri, pipeline_run_id="week-2")
    promotion = run(str(root), str(tmp_path / "out"), config)["promotion"]

    assert not promotion["promoted"]
    assert "compare_with" in promotion["reason"] and "promote: always" in promotion["reason"]


def test_select_reads_and_writes_s3(training_output, s3_bucket: str) -> None:
    root, _ = training_output
    store.put_dir(str(root), f"{s3_bucket}/runs/7/train")

    report = run(
        f"{s3_bucket}/runs/7/train", f"{s3_bucket}/runs/7/select", SelectConfig(output_name="film")
    )

    assert report["chosen"]["checkpoint"] == f"{s3_bucket}/runs/7/train/checkpoint-200"
    assert [c["step"] for c in report["incomplete_checkpoints"]] == [400]
    written = store.read_manifest(f"{s3_bucket}/runs/7/select")["files"]
    for name in (
        "film.safetensors",
        "pytorch_lora_weights.safetensors",
        "selection.json",
        "loss_curve.png",
        "metrics.json",
        "report.md",
        "report.json",
    ):
        assert name in written
    _, header, found = lora_format.load_lora_state_dict(
        f"{s3_bucket}/runs/7/select/film.safetensors"
    )
    assert found == "kohya" and header["ss_output_name"] == "film"


def test_the_diffusers_file_carries_alpha_for_diffusers(training_output, tmp_path: Path) -> None:
    root, _ = training_output
    run(str(root), str(tmp_path / "out"))

    with safe_open(tmp_path / "out" / "pytorch_lora_weights.safetensors", "pt") as handle:
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"]) == (4, 8.0)
    assert (adapter["text_encoder.r"], adapter["text_encoder.lora_alpha"]) == (4, 8.0)


def test_select_replaces_its_older_output_but_nothing_else(training_output, tmp_path: Path) -> None:
    root, _ = training_output
    out = tmp_path / "selected"
    run(str(root), str(out), SelectConfig(output_name="first"))
    run(str(root), str(out), SelectConfig(output_name="second"))
    assert (out / "second.safetensors").is_file() and not (out / "first.safetensors").exists()
    assert not list(tmp_path.glob(".selected.*"))  # no staging left

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"...")
    with pytest.raises(ConfigError, match="holds files that are not a lorapipe select output"):
        run(str(root), str(tmp_path / "photos"))
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]


def test_on_s3_a_new_output_name_leaves_no_earlier_lora_beside_it(
    training_output, s3_bucket: str
) -> None:
    root, _ = training_output
    out = f"{s3_bucket}/selected"
    run(str(root), out, SelectConfig(output_name="first"))
    run(str(root), out, SelectConfig(output_name="second"))
    loras = [u for u in store.list_uris(out) if u.endswith(".safetensors")]
    assert sorted(u.rsplit("/", 1)[1] for u in loras) == [
        "pytorch_lora_weights.safetensors",
        "second.safetensors",
    ]
    assert store.exists(f"{out}/second.safetensors") and not store.exists(
        f"{out}/first.safetensors"
    )


# --------------------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorapipe.demo.tiny_model import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", preset="tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_trained_pipeline(sdxl_model_dir: Path):
    """tiny-sdxl with a LoRA on the UNet's attention and two layers of each text encoder."""
    from lorapipe.models import load_base_model

    pipeline = load_base_model(str(sdxl_model_dir))
    add_random_lora(pipeline, rank=4, alpha=8.0, text_encoder_targets=("q_proj", "out_proj"))
    return pipeline


def _sdxl_training_output(root: Path, pipeline, model_dir: Path, **report) -> None:
    write_training_output(
        root,
        pipeline,
        RECORDS[:2],
        report={**training_report(model_dir), "model_family": "sdxl", **report},
    )


def test_select_exports_an_sdxl_lora_with_kohyas_sdxl_names_and_metadata(
    sdxl_trained_pipeline, sdxl_model_dir: Path, tmp_path: Path
) -> None:
    from lorapipe.models import SDXL

    _sdxl_training_output(tmp_path / "train-out", sdxl_trained_pipeline, sdxl_model_dir)
    out = tmp_path / "selected"

    report = run(str(tmp_path / "train-out"), str(out))

    kohya, header, _ = lora_format.load_lora_state_dict(str(out / "film_style.safetensors"))
    assert {key.split("_", 2)[1] for key in kohya} == {"unet", "te1", "te2"}
    for name in (
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k",  # up_blocks.0.attentions.1
        "lora_te1_text_model_encoder_layers_1_self_attn_out_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    ):
        assert f"{name}.lora_down.weight" in kohya and kohya[f"{name}.alpha"].item() == 8.0
    assert (header["ss_base_model_version"], header["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert header["modelspec.resolution"] == "64x64" and header["ss_text_encoder_lr"] == "0.0001"
    assert report["lora"]["text_encoder"] is True

    diffusers, diffusers_header, _ = lora_format.load_lora_state_dict(
        str(out / lora_format.DIFFUSERS_WEIGHT_NAME)
    )
    unet_config = json.loads((sdxl_model_dir / "unet" / "config.json").read_text())
    back, back_header = lora_format.kohya_to_diffusers(kohya, family=SDXL, unet_config=unet_config)
    assert list(back) == list(diffusers)
    assert all(torch.equal(back[key], diffusers[key]) for key in diffusers)
    assert (
        back_header[lora_format.ADAPTER_METADATA_KEY]
        == (diffusers_header[lora_format.ADAPTER_METADATA_KEY])
    )


def test_without_a_readable_base_model_sdxl_blocks_are_numbered_as_in_sdxl_base(
    sdxl_trained_pipeline, sdxl_model_dir: Path, tmp_path: Path, caplog
) -> None:
    _sdxl_training_output(
        tmp_path / "train-out",
        sdxl_trained_pipeline,
        sdxl_model_dir,
        base_model=str(tmp_path / "gone"),
    )

    run(str(tmp_path / "train-out"), str(tmp_path / "selected"))

    kohya, _, _ = lora_format.load_lora_state_dict(
        str(tmp_path / "selected/film_style.safetensors")
    )
    # down_blocks.1.attentions.0 sits at input_blocks.4 when every level has two resnets
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in kohya
    assert "unet/config.json is not readable" in caplog.text


def test_an_unknown_model_family_in_the_training_report_is_one_line(
    trained_pipeline, tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "train-out"
    report = {**training_report(tiny_model_dir), "model_family": "flux"}
    write_training_output(root, trained_pipeline, RECORDS[:1], report=report)

    with pytest.raises(InputError, match="model_family 'flux' is not one lorapipe exports"):
        run(str(root), str(tmp_path / "out"))


def test_select_shows_the_samples_of_every_checkpoint_with_the_chosen_one_marked(
    training_output, tmp_path: Path
) -> None:
    """The samples training rendered at each checkpoint come along into select's output, so
    its page shows them beside the loss curve and a person can judge the rule's choice."""
    from lorapipe.report.run_report import stage_page

    root, _ = training_output
    for shade, step in enumerate((100, 200, 300)):  # checkpoint-400 is incomplete
        samples = root / f"checkpoint-{step}" / "samples"
        samples.mkdir()
        entries = []
        for seed in (1, 2):
            name = f"p01_seed{seed}.png"
            Image.new("RGB", (64, 64), (80 * shade, 40, 200)).save(samples / name)
            entries.append({"file": name, "prompt_index": 0, "prompt": "filmstyle, a cat",
                            "seed": seed})  # fmt: skip
        (samples / "samples.json").write_text(
            json.dumps({"step": step, "seconds": 0.5, "samples": entries})
        )

    out = tmp_path / "selected"
    report = run(str(root), str(out), SelectConfig())

    assert [row["step"] for row in report["samples"]] == [100, 200, 300]
    assert [row["chosen"] for row in report["samples"]] == [False, True, False]  # the rule: 200
    assert report["sample_prompts"] == ["filmstyle, a cat"]
    copied = out / report["samples"][0]["files"][1]["file"]
    assert copied == out / "samples" / "checkpoint-100" / "p01_seed2.png" and copied.is_file()
    assert "checkpoint-200 **chosen**" in (out / "report.md").read_text()
    page = stage_page("select", str(out))
    assert page.count('<tr class="chosen"><th>200') == 1
    assert page.count("data:image/jpeg;base64,") == 6  # 3 checkpoints x 2 seeds
