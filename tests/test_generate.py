"""``lorapipe generate``: the job, the grid, batched rendering that matches the diffusers
pipeline image for image, the PNG parameters WebUI reads, and the files a run writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from lora_fixtures import TEXT_ENCODER_TARGETS, add_random_lora, save_lora
from PIL import Image

from lorapipe import cli, lora_format, store
from lorapipe.errors import ConfigError, PromptError
from lorapipe.models import load_base_model
from lorapipe.prompts import LoraTag, NegativeLibrary, parse_prompt
from lorapipe.stages.generate import (
    Cell,
    GenerateConfig,
    GridRenderer,
    ParameterContext,
    a1111_parameters,
    check_lora_tags,
    config_values,
    load_job,
    make_scheduler,
    parse_parameters,
    plan_grid,
    run,
    save_png,
    scaled_lora_tags,
)

# Images are compared as 8-bit pixels: batched and one-off runs may differ by float rounding in
# the UNet's matrix products, which moves a pixel by at most one level.
PIXEL_TOLERANCE = 1
STEPS = 4


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA (UNet and text encoder) as select writes it: the diffusers file and the kohya
    file ``film_style.safetensors``."""
    directory = tmp_path_factory.mktemp("selected")
    trained = load_base_model(str(tiny_model_dir))
    add_random_lora(trained, text_encoder_targets=TEXT_ENCODER_TARGETS)
    diffusers_file = save_lora(trained, directory)
    state_dict, metadata, kind = lora_format.load_lora_state_dict(str(diffusers_file))
    modules = lora_format.modules_from_state_dict(state_dict, metadata, kind)
    lora_format.save_kohya(
        directory / "film_style.safetensors", modules, {"ss_output_name": "film_style"}
    )
    return directory


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path, lora_dir: Path):
    """The tiny pipeline with the kohya LoRA loaded as generate loads it."""
    pipeline = load_base_model(str(tiny_model_dir))
    kohya_file = str(lora_dir / "film_style.safetensors")
    lora_format.load_into_pipeline(pipeline, kohya_file, adapter_name="lora_0")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def grid(**values) -> list[Cell]:
    config = GenerateConfig(**values)
    prompts = [parse_prompt(p) for p in config.prompts]
    return plan_grid(config, prompts, NegativeLibrary.load())


def renderer(pipe, sampler: str = "DPM++ 2M Karras", batch_size: int = 8) -> GridRenderer:
    return GridRenderer(
        pipe,
        adapters={"film_style": "lora_0"},
        sampler=sampler,
        steps=STEPS,
        width=64,
        height=64,
        batch_size=batch_size,
    )


def render_all(grid_renderer: GridRenderer, cells: list[Cell]) -> dict[Cell, Image.Image]:
    return {
        cell: image
        for batch, images in grid_renderer.render(cells)
        for cell, image in zip(batch, images, strict=True)
    }


# --------------------------------------------------------------------------- the job


def test_a_job_file_sets_the_grid_and_the_base_model(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "base_model: models/tiny-sd\n"
        "loras: {film_style: out/selected}\n"
        "prompts: ['street, <lora:film_style:0.7>']\n"
        "negative_presets: [portrait, base+style]\n"
        "lora_scales: [0.5, 1]\n"
        "cfg_scales: [7, 8.5]\n"
        "seeds: [1, 2, 3]\n"
        "sampler: Euler a\n"
        "width: 512\n"
        "height: 768\n"
    )
    values, base_model = load_job(str(job))
    config = GenerateConfig(**values)
    config.validate()
    assert base_model == "models/tiny-sd"
    assert config.lora_scales == [0.5, 1.0] and config.cfg_scales == [7.0, 8.5]
    assert (config.width, config.height, config.sampler) == (512, 768, "Euler a")
    json_job = tmp_path / "job.json"
    json_job.write_text(json.dumps({"prompts": "one prompt", "seeds": 4}))
    assert load_job(str(json_job)) == ({"prompts": ["one prompt"], "seeds": [4]}, None)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"seeds": []}, "job.yaml: seeds is empty; give at least one seed"),
        ({"prompts": []}, "job.yaml: prompts is empty; give at least one prompt"),
        ({"lora_scales": []}, "lora_scales is empty"),
        (
            {"sampler": "DPM++ 9M"},
            "sampler 'DPM++ 9M' is unknown; use one of DPM++ 2M Karras, DPM++ 2M,",
        ),
        ({"width": 500}, "width 500 must be a positive multiple of 8"),
        ({"seeds": [1, 2, 1]}, "seeds lists 1 twice"),
        ({"cfg_scales": [0.5]}, "cfg_scales value 0.5 must be between 1.0 and 100.0"),
    ],
)
def test_a_grid_that_cannot_run_is_a_one_line_config_error(values: dict, message: str) -> None:
    config = GenerateConfig(**{"prompts": ["a cat"], **values})
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        config.validate("job.yaml")
    assert "\n" not in str(error.value)


def test_a_misspelled_job_key_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="key 'cfg_scale' is unknown; did you mean 'cfg_scales'"):
        config_values({"cfg_scale": [7]}, "job.yaml")
    with pytest.raises(ConfigError, match="seeds must be whole numbers"):
        config_values({"seeds": [1.5]}, "job.yaml")


@pytest.mark.parametrize(
    ("sampler", "scheduler", "karras"),
    [
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", True),
        ("DPM++ 2M", "DPMSolverMultistepScheduler", False),
        ("Euler a", "EulerAncestralDiscreteScheduler", None),
        ("Euler", "EulerDiscreteScheduler", False),
        ("DDIM", "DDIMScheduler", None),
        ("UniPC", "UniPCMultistepScheduler", None),
    ],
)
def test_a1111_sampler_names_map_to_diffusers_schedulers(
    pipe, sampler: str, scheduler: str, karras: bool | None
) -> None:
    made = make_scheduler(sampler, pipe.scheduler.config)
    assert type(made).__name__ == scheduler
    assert made.config.num_train_timesteps == 1000  # the model's own schedule is kept
    if karras is not None:
        assert made.config.use_karras_sigmas is karras


def test_ddim_never_clips_the_latents_even_when_the_model_ships_a_dpm_solver_config() -> None:
    """diffusers' DDIM clips to [-1, 1] unless told not to; a config without the key (any
    DPM-Solver one) would turn every DDIM image into noise."""
    from diffusers import DPMSolverMultistepScheduler

    dpm_config = DPMSolverMultistepScheduler(beta_schedule="scaled_linear").config
    assert "clip_sample" not in dpm_config
    assert make_scheduler("DDIM", dpm_config).config.clip_sample is False


# --------------------------------------------------------------------------- the grid


def test_the_grid_is_every_combination_in_order() -> None:
    cells = grid(
        prompts=["a <lora:film_style:0.7>", "b <lora:film_style:0.7>"],
        negative_presets=["portrait", "landscape"],
        lora_scales=[0.5, 1.0],
        cfg_scales=[7, 9],
        seeds=[1, 2, 3],
    )
    assert len(cells) == 2 * 2 * 2 * 2 * 3
    first = cells[0]
    assert (first.prompt_index, first.negative_preset, first.lora_scale) == (0, "portrait", 0.5)
    assert (first.cfg_scale, first.seed) == (7, 1)
    assert [c.seed for c in cells[:4]] == [1, 2, 3, 1]
    assert cells[-1].file_name == "p02_landscape_lora1_cfg9_seed3.png"


def test_a_grid_lora_scale_replaces_the_tag_weight_and_keeps_a_split_ratio() -> None:
    assert scaled_lora_tags([LoraTag("a", 0.7, 0.7)], 0.5) == (LoraTag("a", 0.5, 0.5),)
    assert scaled_lora_tags([LoraTag("a", 0.5, 1.0)], 0.6) == (LoraTag("a", 0.3, 0.6),)
    assert scaled_lora_tags([LoraTag("a", 0.8, 0.0)], 0.4) == (LoraTag("a", 0.4, 0.0),)
    assert scaled_lora_tags([LoraTag("a", 0.5, 1.0)], None) == (LoraTag("a", 0.5, 1.0),)
    (cell,) = grid(prompts=["rain, <lora:film_style:0.7>"], lora_scales=[0.4])
    assert cell.prompt == "rain, <lora:film_style:0.4>"
    assert cell.loras == (LoraTag("film_style", 0.4, 0.4),)


def test_each_cells_negative_follows_its_lora_scale() -> None:
    cells = grid(
        prompts=["city <lora:film_style:1>"],
        negative_presets=["landscape"],
        lora_scales=[0.5, 0.7, 1.0],
    )
    lean, normal, strong = (cell.negative for cell in cells)
    assert "anime" not in lean.terms and "anime" in normal.terms
    assert strong.terms == (*normal.terms, "garish colors")
    no_lora = grid(prompts=["city"], negative_presets=["landscape"], lora_scales=[0.5])
    assert no_lora[0].negative.terms == normal.terms  # no LoRA in the prompt: no adjustment


def test_lora_tags_must_name_a_loaded_lora_and_unused_loras_are_flagged() -> None:
    prompts = [parse_prompt("a <lora:film_style:1>")]
    with pytest.raises(PromptError, match="prompt 1: <lora:film_style:...> names a LoRA the job"):
        check_lora_tags(prompts, [])
    (lint,) = check_lora_tags(prompts, ["film_style", "other"])
    assert "LoRA 'other' is loaded but no prompt has <lora:other:...>" in lint.message


# --------------------------------------------------------------------------- rendering


def test_each_image_equals_a_one_off_diffusers_pipeline_call(pipe) -> None:
    cells = grid(
        prompts=["red dog, <lora:film_style:0.7>", "(blue:1.3) sky BREAK star"],
        negative_presets=["portrait"],
        cfg_scales=[7, 9.5],
        seeds=[1, 2],
        sampler="DPM++ 2M Karras",
    )
    grid_renderer = renderer(pipe)
    batched = render_all(grid_renderer, cells)
    pipe.scheduler = make_scheduler("DPM++ 2M Karras", pipe.scheduler.config)
    for cell in cells:
        grid_renderer.apply_loras(cell.loras)
        positive, negative = grid_renderer.conditioning(cell)
        one_off = pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            guidance_scale=cell.cfg_scale,
            num_inference_steps=STEPS,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(cell.seed),
        ).images[0]
        assert max_difference(batched[cell], one_off) <= PIXEL_TOLERANCE, cell.label


def test_an_image_does_not_depend_on_its_batch_even_with_an_ancestral_sampler(pipe) -> None:
    cells = grid(
        prompts=["red dog, <lora:film_style:0.7>", "blue sky <lora:film_style:0.7>"],
        cfg_scales=[7, 11],
        seeds=[1, 2],
        sampler="Euler a",
    )
    all_at_once = render_all(renderer(pipe, "Euler a", batch_size=8), cells)
    one_by_one = render_all(renderer(pipe, "Euler a", batch_size=1), cells)
    in_threes = render_all(renderer(pipe, "Euler a", batch_size=3), cells)
    for cell in cells:
        assert max_difference(all_at_once[cell], one_by_one[cell]) <= PIXEL_TOLERANCE
        assert max_difference(all_at_once[cell], in_threes[cell]) <= PIXEL_TOLERANCE
    assert max_difference(all_at_once[cells[0]], all_at_once[cells[1]]) > 10  # seeds differ


def test_batches_mix_prompts_and_cfg_but_not_lora_weights(pipe) -> None:
    cells = grid(
        prompts=["red dog <lora:film_style:1>", "blue sky <lora:film_style:1>"],
        lora_scales=[0.5, 1.0],
        cfg_scales=[7, 9],
        seeds=[1],
    )
    sizes = [len(batch) for batch, _ in renderer(pipe, batch_size=3).render(cells)]
    assert sizes == [3, 1, 3, 1]  # 4 images at LoRA 0.5, then 4 at LoRA 1


def test_conditioning_is_encoded_once_per_distinct_text(pipe, monkeypatch) -> None:
    grid_renderer = renderer(pipe)
    encoded: list[str] = []
    encode = grid_renderer.encoder.encode
    monkeypatch.setattr(
        grid_renderer.encoder, "encode", lambda p: encoded.append(p.source) or encode(p)
    )
    cells = grid(
        prompts=["red dog", "blue sky"],
        negative_presets=["portrait", "landscape"],
        cfg_scales=[7, 9],
        seeds=[1, 2, 3],
    )
    render_all(grid_renderer, cells)
    assert len(cells) == 24
    assert sorted(encoded) == sorted(
        ["red dog", "blue sky", ""] + [cells[0].negative.text, cells[6].negative.text]
    )


def test_lora_weights_reach_unet_and_text_encoder_separately(pipe) -> None:
    cells = grid(
        prompts=[
            "red dog",
            "red dog <lora:film_style:0>",
            "red dog <lora:film_style:1>",
            "red dog <lora:film_style:0:1>",
            "red dog <lora:film_style:1:0>",
        ],
        negative_presets=["none"],
    )
    images = list(render_all(renderer(pipe), cells).values())
    no_lora, zero, full, unet_only, text_only = images
    assert max_difference(no_lora, zero) <= PIXEL_TOLERANCE
    for a, b in [(no_lora, full), (full, unet_only), (full, text_only), (unet_only, text_only)]:
        assert max_difference(a, b) > 10


# --------------------------------------------------------------------------- PNG parameters


def test_png_parameters_are_webui_infotext_and_parse_back(tmp_path: Path) -> None:
    (cell,) = grid(
        prompts=["vintage (street:1.2), 東京, <lora:film_style:0.7>"],
        negative_presets=["base"],
        lora_scales=[0.5],
        cfg_scales=[7.5],
        seeds=[42],
    )
    context = ParameterContext(
        sampler="DPM++ 2M Karras",
        steps=20,
        width=512,
        height=768,
        model_hash="0123456789",
        model_name="tiny-sd",
        clip_skip=2,
        lora_hashes={"film_style": "abcdef012345"},
        version="lorapipe 0.1.0",
    )
    text = a1111_parameters(cell, context)
    assert text == (
        "vintage (street:1.2), 東京, <lora:film_style:0.5>\n"
        "Negative prompt: low quality, worst quality, blurry, noisy, grainy, overexposed, "
        "underexposed\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        'Model hash: 0123456789, Model: tiny-sd, Clip skip: 2, Lora hashes: "film_style: '
        'abcdef012345", Version: lorapipe 0.1.0'
    )
    path = tmp_path / "image.png"
    save_png(Image.new("RGB", (8, 8)), path, text)
    parsed = parse_parameters(Image.open(path).info["parameters"])
    assert parsed["prompt"] == cell.prompt
    assert parsed["negative_prompt"] == cell.negative.text
    assert parsed["Seed"] == "42" and parsed["CFG scale"] == "7.5"
    assert parsed["Lora hashes"] == "film_style: abcdef012345"


# --------------------------------------------------------------------------- a whole run


JOB = """\
prompts:
  - "street photography, 35mm film grain, muted colors, soft focus, <lora:film_style:0.7>"
  - "a red dog under a blue sky, <lora:film_style:0.7>"
negative_presets: [portrait, landscape]
lora_scales: [0.5, 1.0]
cfg_scales: [7, 9]
seeds: [1, 2]
steps: 3
"""


def test_cli_generate_writes_images_sheets_index_and_report(
    tiny_model_dir: Path, lora_dir: Path, tmp_path: Path, capsys
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(tiny_model_dir), "--lora", str(lora_dir)]
    assert cli.main([*argv, "--job", str(job), "--out", str(out)]) == 0
    assert f"open {out / 'report.html'}" in capsys.readouterr().out

    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 2 * 2 * 2 * 2 * 2
    with Image.open(out / "images" / "p01_portrait_lora1_cfg9_seed2.png") as image:
        parameters = parse_parameters(image.info["parameters"])
    assert parameters["prompt"].endswith("soft focus, <lora:film_style:1>")
    assert "garish colors" in parameters["negative_prompt"]
    assert "grainy" not in parameters["negative_prompt"]  # the prompt asks for film grain
    assert (parameters["Steps"], parameters["Sampler"], parameters["Size"]) == (
        "3",
        "DPM++ 2M Karras",
        "64x64",
    )
    kohya_hash = lora_format.kohya_hashes(
        *lora_format.load_lora_state_dict(str(lora_dir / "film_style.safetensors"))[:2]
    )[0]
    assert parameters["Lora hashes"] == f"film_style: {kohya_hash[:12]}"

    sheets = sorted(p.name for p in (out / "sheets").glob("*.png"))
    assert sheets == [
        "p01_landscape.png",
        "p01_portrait.png",
        "p02_landscape.png",
        "p02_portrait.png",
    ]

    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == 32
    assert {row["file"] for row in index} == {f"images/{p.name}" for p in images}
    first = index[0]
    assert first["lora_scale"] == 0.5 and first["loras"] == [
        {"name": "film_style", "te_weight": 0.5, "unet_weight": 0.5}
    ]
    assert first["sharpness"] > 0 and 0 < first["mean_luminance"] < 1
    assert first["clip_score"] is None

    report = json.loads((out / "report.json").read_text())
    rules = {lint["rule"] for lint in report["lints"]}
    assert {"resolve_positive_conflicts", "check_term_count", "adapt_to_lora_scale"} <= rules
    assert len(report["metrics"]) == 2 * 2 * 2  # preset x LoRA scale x CFG
    html = (out / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") == 4
    assert "lorapipe generate --job" in html

    # the written job reproduces the run
    assert cli.main(["generate", "--job", str(out / "job.yaml"), "--out", str(out)]) == 0
    rerun = pq.read_table(out / "index.parquet").to_pylist()
    assert [row["sharpness"] for row in rerun] == [row["sharpness"] for row in index]


def test_cli_errors_are_one_line_and_leave_no_output(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("prompts: [a dog]\nseeds: []\n")
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(tiny_model_dir), "--job", str(job), "--out", str(out)]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"lorapipe generate: error: {job}: seeds is empty; give at least one seed"
    job.write_text("prompts: ['a (dog']\n")
    assert cli.main(argv) == 2
    assert "prompt 1, column 3: '(' is never closed" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [job]


def test_an_output_folder_with_other_files_is_not_replaced(tiny_model_dir: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    config = GenerateConfig(prompts=["a dog"], steps=1)
    with pytest.raises(ConfigError, match="not a lorapipe generate output"):
        run(str(tiny_model_dir), str(tmp_path), config)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_generate_reads_a_kohya_lora_from_s3_and_writes_to_s3(
    tiny_model_dir: Path, lora_dir: Path, s3_bucket: str
) -> None:
    lora_uri = f"{s3_bucket}/loras/film_style.safetensors"
    store.upload_file(lora_dir / "film_style.safetensors", lora_uri)
    config = GenerateConfig(
        prompts=["red dog <lora:film_style:0.8>"],
        loras={"film_style": lora_uri},
        cfg_scales=[7],
        seeds=[3],
        steps=2,
    )
    out = f"{s3_bucket}/generations/run1"
    report = run(str(tiny_model_dir), out, config)
    assert report["images"] == 1
    assert store.is_complete(out)
    names = {uri.removeprefix(out + "/") for uri in store.list_uris(out)}
    assert {"index.parquet", "report.html", "job.yaml", "sheets/p01_base.png"} <= names
    assert "images/p01_base_lora-tagged_cfg7_seed3.png" in names
