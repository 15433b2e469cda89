"""SDXL through ``generate``: both text encoders with WebUI's prompt semantics, the pooled
embedding and size conditioning, the same grid and files as SD 1.x."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from generation_helpers import grid
from PIL import Image

from lorapipe import cli
from lorapipe.errors import ConfigError
from lorapipe.generation.grid import Cell
from lorapipe.generation.infotext import parse_parameters
from lorapipe.generation.rendering import GridRenderer, load_pipeline
from lorapipe.generation.samplers import make_scheduler
from lorapipe.models import SDXL, load_base_model
from lorapipe.prompts.encoding import ConditioningEncoder
from lorapipe.stages.generate import GenerateConfig, load_job, run

STEPS = 4
PIXEL_TOLERANCE = 1  # batched and one-off UNet calls may round differently by one level
WIDTH = 64  # tiny-sdxl: text_encoder and text_encoder_2 are 32 wide each, concatenated
POOLED_WIDTH = 32  # text_encoder_2's projection


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir: Path):
    pipeline = load_base_model(str(tiny_sdxl_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def encoder(sdxl_pipe) -> ConditioningEncoder:
    return ConditioningEncoder(sdxl_pipe, SDXL)


def renderer(pipe, batch_size: int = 8) -> GridRenderer:
    return GridRenderer(
        pipe,
        family=SDXL,
        adapters={},
        batch_size=batch_size,
    )


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


# --------------------------------------------------------------------------- conditioning


def test_a_plain_prompt_is_conditioned_exactly_as_diffusers_encodes_it(sdxl_pipe, encoder):
    conditioning = encoder.encode("a red cat")
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt("a red cat", do_classifier_free_guidance=False)
    assert conditioning.embeds.shape == (1, 77, WIDTH)
    assert conditioning.pooled.shape == (1, POOLED_WIDTH)
    # both encoders' penultimate layers side by side, text_encoder_2's projected pooled output
    assert torch.equal(conditioning.embeds, embeds)
    assert torch.equal(conditioning.pooled, pooled)


def test_break_and_long_prompts_make_chunks_and_the_first_chunk_gives_the_pooled(encoder):
    first = encoder.encode("red dog")
    two_chunks = encoder.encode("red dog BREAK blue sky")
    assert two_chunks.embeds.shape == (1, 2 * 77, WIDTH)
    assert torch.equal(two_chunks.embeds[:, :77], first.embeds)
    assert torch.allclose(two_chunks.pooled, first.pooled, atol=1e-6)  # WebUI's: chunk 1 only
    assert encoder.encode("dog " * 100).embeds.shape == (1, 2 * 77, WIDTH)


def test_weights_scale_their_tokens_in_both_encoders_and_restore_each_mean(
    sdxl_pipe, encoder
) -> None:
    plain = encoder.encode("red dog")
    weighted = encoder.encode("red (dog:1.5)")
    dog = sdxl_pipe.tokenizer("red dog").input_ids.index(sdxl_pipe.tokenizer.get_vocab()["dog</w>"])
    for features in (slice(0, 32), slice(32, 64)):  # text_encoder's, then text_encoder_2's
        before, after = plain.embeds[0, :, features], weighted.embeds[0, :, features]
        assert after.mean().item() == pytest.approx(before.mean().item(), rel=1e-5)
        ratio = (after[dog] / before[dog]) / (after[dog + 1] / before[dog + 1])
        assert torch.allclose(ratio, torch.full_like(ratio, 1.5), rtol=1e-4)
    assert torch.equal(weighted.pooled, plain.pooled)  # WebUI pools the unweighted tokens


def test_an_empty_negative_prompt_conditions_with_zeros_as_webui_does(sdxl_pipe) -> None:
    (cell,) = grid(prompts=["red dog BREAK blue sky"], negative_presets=["none"])
    grid_renderer = renderer(sdxl_pipe)
    positive, negative = grid_renderer.conditioning(cell)
    assert negative.embeds.shape == positive.embeds.shape == (1, 2 * 77, WIDTH)
    assert not negative.embeds[:, :77].any() and not negative.pooled.any()
    # the padding chunk is the empty prompt's, as for SD 1.x
    assert torch.equal(negative.embeds[:, 77:], grid_renderer.encoder.encode("").embeds)


def test_clip_skip_is_refused_before_the_model_loads(tiny_sdxl_dir: Path, tmp_path: Path):
    config = GenerateConfig(prompts=["a dog"], clip_skip=2)
    message = (
        "clip_skip 2: SDXL reads the penultimate layer of its text encoders (as WebUI does); "
        "leave clip_skip at 1"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        run(str(tiny_sdxl_dir), str(tmp_path / "out"), config)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- rendering


def one_off(pipe, grid_renderer: GridRenderer, cell: Cell) -> Image.Image:
    """``cell`` rendered alone by a plain StableDiffusionXLPipeline call, same conditioning;
    the pipeline sets the size conditioning from height and width."""
    positive, negative = grid_renderer.conditioning(cell)
    pipe.scheduler = make_scheduler("DPM++ 2M Karras", pipe.scheduler.config)
    return pipe(
        prompt_embeds=positive.embeds,
        negative_prompt_embeds=negative.embeds,
        pooled_prompt_embeds=positive.pooled,
        negative_pooled_prompt_embeds=negative.pooled,
        guidance_scale=cell.cfg_scale,
        num_inference_steps=STEPS,
        height=cell.height,
        width=cell.width,
        generator=torch.Generator().manual_seed(cell.seed),
    ).images[0]


def test_each_image_equals_a_one_off_diffusers_sdxl_pipeline_call(sdxl_pipe) -> None:
    cells = grid(
        prompts=["(red:1.3) dog, [blue] sky", "red dog BREAK star"],
        negative_presets=["portrait"],
        sizes=["64x96", "96x64"],
        cfg_scales=[7, 9.5],
        seeds=[1],
        steps=STEPS,
    )
    grid_renderer = renderer(sdxl_pipe)
    batches = list(grid_renderer.render(cells))
    # one size per batch; prompts (each with its pooled embedding) and CFG mix within it
    assert [[cell.size for cell in batch] for batch, _ in batches] == [["64x96"] * 4, ["96x64"] * 4]
    for batch, images in batches:
        for cell, image in zip(batch, images, strict=True):
            assert image.size == (cell.width, cell.height)
            alone = one_off(sdxl_pipe, grid_renderer, cell)
            assert max_difference(image, alone) <= PIXEL_TOLERANCE, cell.label


def test_a_float16_pipeline_keeps_the_sdxl_vae_in_float32(tiny_sdxl_dir: Path) -> None:
    pipe = load_pipeline(
        str(tiny_sdxl_dir), [], family=SDXL, device=torch.device("cpu"), dtype=torch.float16
    )
    assert pipe.unet.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32  # SDXL's VAE overflows in float16


# --------------------------------------------------------------------------- a whole run


def test_cli_generate_renders_sdxl_with_infotext_index_and_report(
    tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    long_prompt = ", ".join(["red dog"] * 30)  # 89 tokens: two chunks
    argv = ["generate", "--base-model", str(tiny_sdxl_dir), "--out", str(out), "--steps", "2"]
    prompts = ["--prompt", "(red:1.2) dog BREAK blue sky", "--prompt", long_prompt]
    assert cli.main([*argv, *prompts, "--size", "64x96", "--negative-preset", "landscape"]) == 0

    name = "p01_landscape_64x96_lora-tagged_cfg7_seed1.png"
    with Image.open(out / "images" / name) as image:
        assert image.size == (64, 96)
        parameters = parse_parameters(image.info["parameters"])
    assert parameters["prompt"] == "(red:1.2) dog BREAK blue sky"
    assert parameters["Size"] == "64x96" and parameters["Model"] == "tiny-sdxl"
    assert parameters["Model hash"]  # its value is the model hash's own business
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [(row["width"], row["height"]) for row in index] == [(64, 96), (64, 96)]
    report = json.loads((out / "report.json").read_text())
    assert report["sheets"] == ["sheets/p01_landscape_64x96.png", "sheets/p02_landscape_64x96.png"]
    assert any(
        lint["rule"] == "count_prompt_tokens" and "prompt 2 has 89 tokens" in lint["message"]
        for lint in report["lints"]
    )


def test_an_unsized_sdxl_grid_renders_at_the_models_native_size(
    tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run(str(tiny_sdxl_dir), str(out), GenerateConfig(prompts=["a red dog"], steps=1))
    values, _ = load_job(str(out / "job.yaml"))
    assert values["sizes"] == ["64x64"]  # unet sample_size x VAE scale (1024 for SDXL base)
    with Image.open(out / "images" / "p01_base_64x64_lora-tagged_cfg7_seed1.png") as image:
        assert image.size == (64, 64)


def test_a_lora_at_scale_zero_leaves_both_text_encoders_as_the_base_model_has_them(
    tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    from lora_fixtures import add_random_lora, save_lora

    from lorapipe.generation.loras import resolve_lora

    trained = load_base_model(str(tiny_sdxl_dir))
    add_random_lora(trained, text_encoder_targets=("q_proj", "v_proj"))
    lora_file = save_lora(trained, tmp_path / "film")
    lora = resolve_lora("film", str(lora_file), adapter="lora_0")
    pipe = load_pipeline(str(tiny_sdxl_dir), [lora], family=SDXL, device="cpu", dtype=torch.float32)
    with_lora = GridRenderer(pipe, family=SDXL, adapters={"film": "lora_0"})
    base = renderer(load_base_model(str(tiny_sdxl_dir)))
    off, on = grid(prompts=["red dog <lora:film:0>", "red dog <lora:film:1>"], seeds=[1])
    with_lora.apply_loras(off.loras)
    assert torch.equal(with_lora.conditioning(off)[0].embeds, base.conditioning(off)[0].embeds)
    with_lora.apply_loras(on.loras)
    assert not torch.equal(with_lora.conditioning(on)[0].embeds, base.conditioning(on)[0].embeds)
